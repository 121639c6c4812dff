//! keel's policies as tower layers, driven by a mock service on tokio's
//! paused clock.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel::circuit_breaker::{CircuitBreaker, CircuitBreakerLayer, State};
use keel::classify::Verdict;
use keel::clock::TokioClock;
use keel::retry::{Backoff, Jitter, Retry, RetryLayer};
use keel::timeout::TimeoutLayer;
use keel::{Error, ServiceError};
use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_test::mock;

#[derive(Debug, PartialEq)]
struct Refused;
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection refused")
    }
}
impl std::error::Error for Refused {}

/// Sets its flag when dropped: shows whether the inner future was cancelled.
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn breaker() -> CircuitBreaker {
    CircuitBreaker::builder("mock")
        .minimum_calls(2)
        .wait_in_open(Duration::from_secs(10))
        .half_open_max_calls(1)
        .clock(TokioClock::new())
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn breaker_layer_opens_on_failures_and_rejects_without_calling_the_service() {
    let cb = breaker();
    let (mut svc, mut handle) =
        mock::spawn_layer::<&str, &str, _>(CircuitBreakerLayer::new(cb.clone()));

    for _ in 0..2 {
        assert_ready_ok!(svc.poll_ready());
        let response = svc.call("pay");
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req, "pay");
        send.send_error(Refused);
        let err = response.await.unwrap_err();
        match err {
            Error::Inner(e) => assert_eq!(e.downcast_ref::<Refused>(), Some(&Refused)),
            other => panic!("expected the service's error, got {other:?}"),
        }
    }
    assert_eq!(cb.state(), State::Open);

    assert_ready_ok!(svc.poll_ready());
    let err = svc.call("pay").await.unwrap_err();
    assert!(
        matches!(err, Error::CircuitOpen { retry_after } if retry_after == Duration::from_secs(10))
    );
    assert!(err.to_string().contains("retry after 10s"), "{err}");
    // The mock never saw the rejected request.
    handle.allow(1);
    assert_pending!(handle.poll_request());
}

#[tokio::test(start_paused = true)]
async fn dropping_a_probe_s_response_future_frees_the_half_open_slot() {
    let cb = breaker();
    for _ in 0..2 {
        cb.try_acquire().unwrap().failure();
    }
    tokio::time::advance(Duration::from_secs(10)).await;

    let (mut svc, mut handle) =
        mock::spawn_layer::<(), (), _>(CircuitBreakerLayer::new(cb.clone()));
    assert_ready_ok!(svc.poll_ready());
    let probe = svc.call(());
    assert_eq!(cb.state(), State::HalfOpen);
    // The only probe slot is taken: a second call is rejected.
    assert_ready_ok!(svc.poll_ready());
    assert!(matches!(svc.call(()).await, Err(Error::CircuitOpen { .. })));
    // The caller gives up on the probe (a client timeout, say).
    drop(probe);
    let _ = handle.next_request().await;
    assert_ready_ok!(svc.poll_ready());
    let next = svc.call(());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(());
    next.await.unwrap();
    assert_eq!(cb.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn timeout_layer_cancels_a_slow_call() {
    let dropped = Arc::new(AtomicBool::new(false));
    let slow = {
        let dropped = dropped.clone();
        tower::service_fn(move |_: ()| {
            let guard = DropFlag(dropped.clone());
            async move {
                let _guard = guard;
                std::future::pending::<Result<(), Refused>>().await
            }
        })
    };
    let mut svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(200)))
        .service(slow);
    let mut response = tokio_test::task::spawn(svc.ready().await.unwrap().call(()));
    assert_pending!(response.poll());
    tokio::time::advance(Duration::from_millis(199)).await;
    assert_pending!(response.poll());
    tokio::time::advance(Duration::from_millis(1)).await;
    let err = assert_ready_err!(response.poll());
    assert!(matches!(err, Error::Timeout { after } if after == Duration::from_millis(200)));
    assert!(
        dropped.load(Ordering::SeqCst),
        "the inner call must be dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_layer_passes_the_service_s_errors_through() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<(), (), _>(TimeoutLayer::new(Duration::from_millis(200)));
    assert_ready_ok!(svc.poll_ready());
    let response = svc.call(());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(Refused);
    match response.await.unwrap_err() {
        Error::Inner(e) => assert_eq!(e.downcast_ref::<Refused>(), Some(&Refused)),
        other => panic!("expected the service's error, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn retry_layer_resends_the_request_until_it_succeeds() {
    let calls = Arc::new(AtomicU32::new(0));
    let svc = {
        let calls = calls.clone();
        tower::service_fn(move |req: &'static str| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n < 3 {
                    Err(Refused)
                } else {
                    Ok(format!("{req} #{n}"))
                }
            }
        })
    };
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::from_millis(50)))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new(retry))
        .service(svc);
    let start = tokio::time::Instant::now();
    let response = svc.ready().await.unwrap().call("reserve").await.unwrap();
    assert_eq!(response, "reserve #3");
    assert_eq!(start.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn retry_layer_uses_the_classifier_for_responses() {
    let calls = Arc::new(AtomicU32::new(0));
    let svc = {
        let calls = calls.clone();
        tower::service_fn(move |_: ()| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<u16, Refused>(429) }
        })
    };
    let retry = Retry::builder().max_attempts(3).build().unwrap();
    let layer = RetryLayer::new(retry).classifier(|r: &Result<u16, ServiceError>| match r {
        Ok(429) => Verdict::failure().retry_after(Duration::from_secs(2)),
        Ok(_) => Verdict::success(),
        Err(_) => Verdict::failure(),
    });
    let mut svc = ServiceBuilder::new().layer(layer).service(svc);
    let start = tokio::time::Instant::now();
    let status = svc.ready().await.unwrap().call(()).await.unwrap();
    assert_eq!(status, 429);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Two retries, each after the server's hint.
    assert_eq!(start.elapsed(), Duration::from_secs(4));
}

#[tokio::test(start_paused = true)]
async fn layers_compose_in_service_builder_with_flat_errors() {
    let cb = breaker();
    let calls = Arc::new(AtomicU32::new(0));
    let hanging = {
        let calls = calls.clone();
        tower::service_fn(move |_: ()| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<(), Refused>>()
        })
    };
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::from_millis(100)))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .layer(RetryLayer::new(retry))
        .layer(CircuitBreakerLayer::new(cb.clone()))
        .layer(TimeoutLayer::new(Duration::from_millis(300)))
        .service(hanging);
    let start = tokio::time::Instant::now();
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    // Attempts 0-300 ms and 400-700 ms time out, and the second failure
    // opens the breaker; at 800 ms the third attempt is rejected by it.
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(cb.state(), State::Open);
    match err {
        Error::RetriesExhausted { attempts: 3, last } => {
            assert!(matches!(*last, Error::CircuitOpen { .. }), "{last:?}")
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    assert_eq!(start.elapsed(), Duration::from_millis(800));
}
