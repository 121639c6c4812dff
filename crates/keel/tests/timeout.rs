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
