//! Breaker transitions as `tracing` events.
//!
//! In a test binary of its own: tracing caches per call site whether anyone is
//! interested, process-wide, so a scoped subscriber in one test can miss
//! events while other tests run on other threads of the same process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::circuit_breaker::{CircuitBreaker, Window};
use keel::clock::ManualClock;

const SEC: Duration = Duration::from_secs(1);

/// Records the fields of every event.
#[derive(Default, Clone)]
struct Events(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Events {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::always()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={:?} ", field.name(), value));
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.push_str(&format!("{}={} ", field.name(), value));
            }
        }
        let mut fields = Fields(format!(
            "{} {} ",
            event.metadata().level(),
            event.metadata().target()
        ));
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0.trim_end().to_string());
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn every_transition_is_a_tracing_event() {
    let events = Events::default();
    let clock = ManualClock::new();
    let cb = CircuitBreaker::builder("dep")
        .window(Window::Count(4))
        .minimum_calls(4)
        .wait_in_open(10 * SEC)
        .half_open_max_calls(1)
        .clock(clock.clone())
        .build()
        .unwrap();
    tracing::subscriber::with_default(events.clone(), || {
        for _ in 0..4 {
            cb.try_acquire().unwrap().failure();
        }
        clock.advance(10 * SEC);
        cb.try_acquire().unwrap().success();
        cb.force_open();
        cb.reset();
    });
    let transitions: Vec<String> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.contains("state transition"))
        .cloned()
        .collect();
    let expected = [
        "WARN keel::circuit_breaker message=circuit breaker state transition breaker=dep from=closed to=open",
        "INFO keel::circuit_breaker message=circuit breaker state transition breaker=dep from=open to=half_open",
        "INFO keel::circuit_breaker message=circuit breaker state transition breaker=dep from=half_open to=closed",
        "WARN keel::circuit_breaker message=circuit breaker state transition breaker=dep from=closed to=forced_open",
        "INFO keel::circuit_breaker message=circuit breaker state transition breaker=dep from=forced_open to=closed",
    ];
    assert_eq!(transitions, expected);
}
