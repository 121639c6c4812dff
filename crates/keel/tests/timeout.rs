//! Behaviour of the fixed timeout, on tokio's paused clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel::timeout::Timeout;
use keel::Error;
use tokio::time::Instant;

/// Sets its flag when dropped: shows whether the inner future was cancelled.
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn expiry_drops_the_inner_future_and_says_how_long_it_waited() {
    let dropped = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let result = Timeout::new(Duration::from_millis(250))
        .call(|| {
            let guard = DropFlag(dropped.clone());
            let finished = finished.clone();
            async move {
                let _guard = guard;
                tokio::time::sleep(Duration::from_secs(10)).await;
                finished.store(true, Ordering::SeqCst);
                Ok::<(), &str>(())
            }
        })
        .await;
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    assert!(
        dropped.load(Ordering::SeqCst),
        "the inner future must be dropped"
    );
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Timeout { after } if after == Duration::from_millis(250)));
    assert_eq!(
        err.to_string(),
        "timed out after 250ms; the call was cancelled"
    );
    // Even if time goes on, the cancelled work never completes.
    tokio::time::advance(Duration::from_secs(20)).await;
    assert!(!finished.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn a_call_that_finishes_in_time_returns_its_result() {
    let result = Timeout::new(Duration::from_secs(1))
        .call(|| async {
            tokio::time::sleep(Duration::from_millis(999)).await;
            Err::<(), _>("refused")
        })
        .await;
    assert!(matches!(result, Err(Error::Inner("refused"))));

    let result = Timeout::new(Duration::from_secs(1))
        .call(|| async { Ok::<_, ()>(5) })
        .await;
    assert_eq!(result, Ok(5));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_exact() {
    // A millisecond either side of the deadline.
    let t = Timeout::new(Duration::from_millis(100));
    let on_time = t
        .call(|| async {
            tokio::time::sleep(Duration::from_millis(99)).await;
            Ok::<_, ()>(())
        })
        .await;
    assert_eq!(on_time, Ok(()));
    let late = t
        .call(|| async {
            tokio::time::sleep(Duration::from_millis(101)).await;
            Ok::<_, ()>(())
        })
        .await;
    assert!(matches!(late, Err(Error::Timeout { .. })));
}

#[test]
fn a_timeout_is_built_from_a_duration() {
    let t: Timeout = Duration::from_secs(3).into();
    assert_eq!(t.duration(), Duration::from_secs(3));
}

mod adaptive {
    use std::time::Duration;

    use keel::timeout::{AdaptiveTimeout, AdaptiveTimeoutConfig, TimeoutLayer};
    use keel::{Error, Pipeline};

    const MS: Duration = Duration::from_millis(1);

    async fn call_taking(
        timeout: &AdaptiveTimeout,
        d: Duration,
    ) -> Result<(), Error<std::io::Error>> {
        timeout
            .call(|| async move {
                tokio::time::sleep(d).await;
                Ok(())
            })
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn initial_until_enough_samples_then_the_quantile_times_the_multiplier() {
        let timeout = AdaptiveTimeout::builder()
            .quantile(0.9, 2.0)
            .bounds(20 * MS, Duration::from_secs(1))
            .initial(500 * MS)
            .window(10, 10)
            .build()
            .unwrap();
        for ms in 1..=9u32 {
            call_taking(&timeout, ms * 10 * MS).await.unwrap();
            assert_eq!(timeout.current(), 500 * MS, "{ms} samples: initial");
        }
        call_taking(&timeout, 100 * MS).await.unwrap();
        // p90 of 10..=100ms is 90ms; x 2.
        assert_eq!(timeout.current(), 180 * MS);
        // Fast calls fill the window: p90 of ten 1ms calls x 2 is below min.
        for _ in 0..10 {
            call_taking(&timeout, MS).await.unwrap();
        }
        assert_eq!(timeout.current(), 20 * MS);
        // And a call slower than that is cut off at 20ms.
        let err = call_taking(&timeout, 50 * MS).await.unwrap_err();
        assert!(matches!(err, Error::Timeout { after } if after == 20 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dependency_slow_for_good_lifts_the_timeout_up_to_max() {
        let timeout = AdaptiveTimeout::builder()
            .quantile(0.5, 2.0)
            .bounds(10 * MS, 400 * MS)
            .initial(50 * MS)
            .window(4, 4)
            .build()
            .unwrap();
        // Every call now takes 300ms. Timed-out calls enter the window as
        // their timeout, so the timeout doubles until calls fit.
        let mut seen = Vec::new();
        for _ in 0..16 {
            let _ = call_taking(&timeout, 300 * MS).await;
            seen.push(timeout.current().as_millis());
        }
        assert_eq!(seen[3], 100, "{seen:?}");
        assert_eq!(seen[7], 200, "{seen:?}");
        assert_eq!(*seen.last().unwrap(), 400, "{seen:?}");
        call_taking(&timeout, 300 * MS).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_pipeline_step_and_the_tower_layer_share_the_window() {
        use tower::{service_fn, Layer, ServiceExt};
        let timeout = AdaptiveTimeout::builder().window(2, 2).build().unwrap();
        let pipeline = Pipeline::builder()
            .adaptive_timeout(timeout.clone())
            .build();
        pipeline
            .call(|| async {
                tokio::time::sleep(30 * MS).await;
                Ok::<_, std::io::Error>(())
            })
            .await
            .unwrap();
        let svc =
            TimeoutLayer::adaptive(timeout.clone()).layer(service_fn(|d: Duration| async move {
                tokio::time::sleep(d).await;
                Ok::<_, std::io::Error>(())
            }));
        svc.clone().oneshot(30 * MS).await.unwrap();
        assert_eq!(timeout.current(), 60 * MS);
        let err = svc.oneshot(61 * MS).await.unwrap_err();
        assert!(matches!(err, Error::Timeout { after } if after == 60 * MS));
    }

    #[test]
    fn configuration_names_the_field() {
        let bad: AdaptiveTimeoutConfig = toml::from_str("min = \"1s\"\nmax = \"500ms\"").unwrap();
        assert_eq!(bad.build().unwrap_err().field(), "max");
        let bad: AdaptiveTimeoutConfig = toml::from_str("quantile = 99.0").unwrap();
        assert_eq!(bad.build().unwrap_err().field(), "quantile");
        let bad: AdaptiveTimeoutConfig = toml::from_str("window = 10\nmin_samples = 20").unwrap();
        assert_eq!(
            bad.build().unwrap_err().to_string(),
            "min_samples: must be between 1 and window (10)"
        );
        assert!(toml::from_str::<AdaptiveTimeoutConfig>("p = 0.99").is_err());
    }
}
