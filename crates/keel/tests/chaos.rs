//! Fault injection: rates, seeds, the runtime switch, and the other policies
//! reacting to injected faults as to real ones (paused tokio time).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel::chaos::{Chaos, ChaosLayer, FaultKind, Injection};
use keel::circuit_breaker::{CircuitBreaker, State, Window};
use keel::events::EventKind;
use keel::retry::{Backoff, Jitter, Retry};
use keel::{Error, Pipeline};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);

#[test]
fn faults_are_injected_at_their_rate_and_a_seed_repeats_them() {
    let draw = |seed| {
        let chaos = Chaos::builder("dep")
            .error(25.0)
            .latency(10.0, 5 * MS)
            .seed(seed)
            .build()
            .unwrap();
        (0..10_000).map(|_| chaos.decide()).collect::<Vec<_>>()
    };
    let a = draw(42);
    let errors = a.iter().filter(|i| i.error).count();
    let delays = a.iter().filter(|i| i.delay.is_some()).count();
    assert!(
        (2_300..=2_700).contains(&errors),
        "{errors} errors in 10,000 at 25%"
    );
    assert!(
        (800..=1_200).contains(&delays),
        "{delays} delays in 10,000 at 10%"
    );
    assert_eq!(a, draw(42), "the same seed draws the same faults");
    assert_ne!(a, draw(43));
}

#[test]
fn the_switch_turns_injection_off_for_every_clone() {
    let ran = Arc::new(AtomicU32::new(0));
    let counted = ran.clone();
    let chaos = Chaos::builder("dep")
        .error(100.0)
        .behaviour(100.0, move || {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    let clone = chaos.clone();
    assert!(chaos.decide().error);
    assert_eq!(ran.load(Ordering::SeqCst), 1, "the behaviour ran");
    clone.set_enabled(false);
    assert_eq!(chaos.decide(), Injection::default());
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    let events = chaos.events().recent();
    let kinds: Vec<_> = events.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            EventKind::FaultInjected {
                kind: FaultKind::Behaviour
            },
            EventKind::FaultInjected {
                kind: FaultKind::Error
            }
        ]
    );

    let off = Chaos::builder("drill")
        .error(100.0)
        .enabled(false)
        .build()
        .unwrap();
    assert!(!off.decide().error);
}

#[tokio::test(start_paused = true)]
async fn retry_and_the_breaker_react_to_injected_errors_as_to_real_ones() {
    let breaker = CircuitBreaker::builder("payment")
        .window(Window::Count(4))
        .minimum_calls(4)
        .build()
        .unwrap();
    let pipeline = Pipeline::builder()
        .retry(
            Retry::builder()
                .max_attempts(2)
                .backoff(Backoff::constant(10 * MS))
                .jitter(Jitter::None)
                .build()
                .unwrap(),
        )
        .circuit_breaker(breaker.clone())
        .chaos(Chaos::builder("payment").error(100.0).build().unwrap())
        .build();
    let reached = AtomicU32::new(0);
    for _ in 0..2 {
        let result = pipeline
            .call(|| {
                reached.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, std::io::Error>(()) }
            })
            .await;
        match result {
            Err(Error::RetriesExhausted { attempts: 2, last }) => {
                assert!(matches!(*last, Error::FaultInjected))
            }
            other => panic!("expected exhausted retries, got {other:?}"),
        }
    }
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "the dependency was never called"
    );
    assert_eq!(
        breaker.state(),
        State::Open,
        "four injected failures opened it"
    );
}

#[tokio::test(start_paused = true)]
async fn the_tower_layer_delays_and_fails_without_calling_the_service() {
    let calls = Arc::new(AtomicU32::new(0));
    let service = {
        let calls = calls.clone();
        tower::service_fn(move |()| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::io::Error>("ok") }
        })
    };
    let slow = Chaos::builder("dep")
        .latency(100.0, 250 * MS)
        .build()
        .unwrap();
    let mut svc = tower::Layer::layer(&ChaosLayer::new(slow), service.clone());
    let start = Instant::now();
    assert_eq!(svc.ready().await.unwrap().call(()).await.unwrap(), "ok");
    assert_eq!(start.elapsed(), 250 * MS);

    let failing = Chaos::builder("dep").error(100.0).build().unwrap();
    let mut svc = tower::Layer::layer(&ChaosLayer::new(failing), service);
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(matches!(err, Error::FaultInjected), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "only the delayed call ran");
}

#[test]
fn configuration_errors_name_the_field() {
    let err = Chaos::builder("x").error(101.0).build().unwrap_err();
    assert_eq!(
        err.to_string(),
        "error.percent: must be between 0 and 100, got 101"
    );
    let err = Chaos::builder("x")
        .latency(5.0, Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "latency.duration");
}
