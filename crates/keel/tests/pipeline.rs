//! The async pipeline: order of steps, one classifier for all, and a breaker
//! shared with other users, on tokio's paused clock.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel::circuit_breaker::{CircuitBreaker, State};
use keel::classify::Verdict;
use keel::clock::TokioClock;
use keel::retry::{Backoff, Jitter, Retry};
use keel::{Error, Pipeline};
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

fn retry(max_attempts: u32, delay: Duration) -> Retry {
    Retry::builder()
        .max_attempts(max_attempts)
        .backoff(Backoff::constant(delay))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

fn breaker(minimum_calls: u32) -> CircuitBreaker {
    CircuitBreaker::builder("dep")
        .minimum_calls(minimum_calls)
        .wait_in_open(Duration::from_secs(30))
        .clock(TokioClock::new())
        .build()
        .unwrap()
}

/// A dependency that never answers; counts the calls it receives.
fn hangs(
    calls: &Arc<AtomicU32>,
) -> impl Fn() -> std::future::Pending<Result<(), &'static str>> + '_ {
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::pending()
    }
}

#[tokio::test(start_paused = true)]
async fn steps_wrap_outermost_first() {
    // Total timeout outside retry: it bounds the whole call.
    let calls = Arc::new(AtomicU32::new(0));
    let total_outside = Pipeline::builder()
        .timeout(Duration::from_millis(1000))
        .retry(retry(5, 400 * MS))
        .timeout(Duration::from_millis(300))
        .build();
    let start = Instant::now();
    let result = total_outside.call(hangs(&calls)).await;
    assert_eq!(start.elapsed(), 1000 * MS);
    assert!(matches!(result, Err(Error::Timeout { after }) if after == 1000 * MS));
    // Attempts at 0 ms and 700 ms; the third would start at 1400 ms.
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // The same steps the other way round: each attempt has the long timeout.
    let calls = Arc::new(AtomicU32::new(0));
    let retry_outside = Pipeline::builder()
        .retry(retry(2, 400 * MS))
        .timeout(Duration::from_millis(1000))
        .build();
    let start = Instant::now();
    let result = retry_outside.call(hangs(&calls)).await;
    assert_eq!(start.elapsed(), 2400 * MS);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    match result {
        Err(Error::RetriesExhausted { attempts: 2, last }) => {
            assert!(matches!(*last, Error::Timeout { .. }))
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_breaker_inside_retry_counts_every_attempt_and_a_per_attempt_timeout_is_a_failure() {
    let cb = breaker(3);
    let calls = Arc::new(AtomicU32::new(0));
    let pipeline = Pipeline::builder()
        .retry(retry(3, 10 * MS))
        .circuit_breaker(cb.clone())
        .timeout(Duration::from_millis(100))
        .build();
    let _ = pipeline.call(hangs(&calls)).await;
    // Three timed-out attempts, three failures: the breaker opened.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(cb.metrics().failed_calls, 3);
    assert_eq!(cb.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn retry_does_not_wait_for_an_open_breaker_past_its_time_budget() {
    let cb = breaker(1);
    let calls = AtomicU32::new(0);
    let pipeline = Pipeline::builder()
        .retry(
            Retry::builder()
                .max_attempts(5)
                .backoff(Backoff::constant(100 * MS))
                .jitter(Jitter::None)
                .time_budget(Duration::from_secs(5))
                .build()
                .unwrap(),
        )
        .circuit_breaker(cb.clone())
        .build();
    let start = Instant::now();
    let result = pipeline
        .call(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("down") }
        })
        .await;
    // The first failure opened the breaker for 30 s. After the 100 ms
    // backoff the second attempt is rejected; waiting the breaker's 29.9 s
    // would pass the 5 s budget, so retry gives up then and there.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(start.elapsed(), 100 * MS);
    match result {
        Err(Error::RetriesExhausted { last, .. }) => {
            assert!(
                matches!(*last, Error::CircuitOpen { retry_after } if retry_after == Duration::from_secs(30) - 100 * MS)
            )
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    // A rejection is not a failure of the dependency: not counted again.
    assert_eq!(cb.metrics().failed_calls, 1);
    assert_eq!(cb.metrics().not_permitted_calls, 1);
}

#[tokio::test(start_paused = true)]
async fn one_classifier_decides_for_every_step() {
    let cb = breaker(2);
    let calls = AtomicU32::new(0);
    // The operation returns HTTP-like statuses; 503 is a retryable failure.
    let pipeline = Pipeline::builder()
        .retry(retry(2, 10 * MS))
        .circuit_breaker(cb.clone())
        .classifier(|r: &Result<u16, ()>| match r {
            Ok(503) => Verdict::failure(),
            Ok(_) => Verdict::success(),
            Err(()) => Verdict::failure(),
        })
        .build();
    let status = pipeline
        .call(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<u16, ()>(503) }
        })
        .await;
    assert_eq!(status.unwrap(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(cb.metrics().failed_calls, 2);
    assert_eq!(cb.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_handle_shared_with_a_tower_layer_is_one_breaker() {
    use tower::{Service, ServiceExt};

    let cb = breaker(2);
    let pipeline = Pipeline::builder().circuit_breaker(cb.clone()).build();
    let mut svc = tower::ServiceBuilder::new()
        .layer(keel::circuit_breaker::CircuitBreakerLayer::new(cb.clone()))
        .service_fn(|_: ()| async { Ok::<_, std::io::Error>("ok") });

    let _ = pipeline.call(|| async { Err::<(), _>("down") }).await;
    let _ = pipeline.call(|| async { Err::<(), _>("down") }).await;
    assert_eq!(cb.state(), State::Open);

    let result = svc.ready().await.unwrap().call(()).await;
    assert!(matches!(result, Err(Error::CircuitOpen { .. })));
    assert_eq!(cb.metrics().not_permitted_calls, 1);
}

#[tokio::test]
async fn an_empty_pipeline_calls_directly() {
    let pipeline = Pipeline::builder().build();
    assert_eq!(pipeline.call(|| async { Ok::<_, ()>(1) }).await, Ok(1));
    assert!(matches!(
        pipeline.call(|| async { Err::<(), _>("e") }).await,
        Err(Error::Inner("e"))
    ));
}
