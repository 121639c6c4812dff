//! Policy decisions as `tracing` events: each carries the policy and its
//! name, and is emitted inside the caller's span.
//!
//! In a test binary of its own: tracing caches per call site whether anyone
//! is interested, process-wide, so a scoped subscriber in one test can miss
//! events while other tests run on other threads of the same process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::bulkhead::Bulkhead;
use keel::circuit_breaker::{CircuitBreaker, Window};
use keel::clock::ManualClock;
use keel::fallback::Fallback;
use keel::hedge::{Hedge, Idempotent};
use keel::rate_limit::RateLimiter;
use keel::retry::{Backoff, Jitter, Retry};
use keel::shed::{LoadShedder, Priority};
use keel::timeout::Timeout;
use keel::Error;
use tracing::Instrument;

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

/// Records every event as "LEVEL target span=<current span> fields".
#[derive(Default, Clone)]
struct Recorder {
    events: Arc<Mutex<Vec<String>>>,
    spans: Arc<Mutex<Vec<&'static str>>>,
    /// Span names by id, and the stack of entered spans.
    entered: Arc<Mutex<Vec<u64>>>,
}

impl tracing::Subscriber for Recorder {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::always()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut spans = self.spans.lock().unwrap();
        spans.push(span.metadata().name());
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() != "message" {
                    self.0.push_str(&format!(" {}={:?}", field.name(), value));
                }
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.push_str(&format!(" {}={}", field.name(), value));
            }
        }
        let span = match self.entered.lock().unwrap().last() {
            Some(&id) => self.spans.lock().unwrap()[id as usize - 1],
            None => "none",
        };
        let mut fields = Fields(format!(
            "{} {} span={span}",
            event.metadata().level(),
            event.metadata().target()
        ));
        event.record(&mut fields);
        self.events.lock().unwrap().push(fields.0);
    }
    fn enter(&self, id: &tracing::span::Id) {
        self.entered.lock().unwrap().push(id.into_u64());
    }
    fn exit(&self, _: &tracing::span::Id) {
        self.entered.lock().unwrap().pop();
    }
}

impl Recorder {
    fn keel_events(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.contains(" keel span="))
            .cloned()
            .collect()
    }
}

#[test]
fn every_breaker_transition_is_a_tracing_event_in_the_callers_span() {
    let recorder = Recorder::default();
    let clock = ManualClock::new();
    let cb = CircuitBreaker::builder("dep")
        .window(Window::Count(4))
        .minimum_calls(4)
        .wait_in_open(10 * SEC)
        .half_open_max_calls(1)
        .clock(clock.clone())
        .build()
        .unwrap();
    tracing::subscriber::with_default(recorder.clone(), || {
        tracing::info_span!("checkout").in_scope(|| {
            for _ in 0..4 {
                cb.try_acquire().unwrap().failure();
            }
            assert!(cb.try_acquire().is_err());
            clock.advance(10 * SEC);
            cb.try_acquire().unwrap().success();
            cb.force_open();
            cb.reset();
        });
    });
    let expected = [
        "WARN keel span=checkout policy=circuit_breaker name=dep event=state changed from closed to open",
        "DEBUG keel span=checkout policy=circuit_breaker name=dep event=rejected: circuit_open, retry after 10s",
        "INFO keel span=checkout policy=circuit_breaker name=dep event=state changed from open to half_open",
        "INFO keel span=checkout policy=circuit_breaker name=dep event=state changed from half_open to closed",
        "WARN keel span=checkout policy=circuit_breaker name=dep event=state changed from closed to forced_open",
        "INFO keel span=checkout policy=circuit_breaker name=dep event=state changed from forced_open to closed",
    ];
    assert_eq!(recorder.keel_events(), expected);
}

#[test]
fn every_policys_decisions_are_traced_with_its_name_in_the_callers_span() {
    let recorder = Recorder::default();
    let _default = tracing::subscriber::set_default(recorder.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(
        async {
            let bulkhead = Bulkhead::builder("inventory")
                .max_concurrent(1)
                .build()
                .unwrap();
            let _seat = bulkhead.try_acquire().unwrap();
            assert!(bulkhead.try_acquire().is_err());

            let limiter = RateLimiter::builder("api")
                .burst(1)
                .clock(ManualClock::new())
                .build()
                .unwrap();
            limiter.check().unwrap();
            assert!(limiter.check().is_err());

            let shedder = LoadShedder::builder("front").capacity(1).build().unwrap();
            let _busy = shedder.try_acquire(Priority::Critical).unwrap();
            assert!(shedder.try_acquire(Priority::Low).is_err());

            let retry = Retry::builder()
                .name("payment")
                .max_attempts(2)
                .backoff(Backoff::constant(10 * MS))
                .jitter(Jitter::None)
                .build()
                .unwrap();
            let _ = retry.call(|| async { Err::<(), _>("down") }).await;

            let timeout = Timeout::named("payment", 50 * MS);
            let _ = timeout.call(std::future::pending::<Result<(), ()>>).await;

            let hedge = Hedge::builder()
                .name("pricing")
                .delay(20 * MS)
                .build()
                .unwrap();
            let _ = hedge
                .call(Idempotent(|| async {
                    tokio::time::sleep(30 * MS).await;
                    Ok::<_, ()>(1)
                }))
                .await;

            let fallback = Fallback::builder()
                .name("recommendations")
                .value(Vec::<u32>::new)
                .build();
            let _ = fallback
                .call(|| async { Err::<Vec<u32>, _>(Error::Inner("down")) })
                .await;
        }
        .instrument(tracing::info_span!("checkout")),
    );
    let expected = [
        "DEBUG keel span=checkout policy=bulkhead name=inventory event=rejected: bulkhead_full",
        "DEBUG keel span=checkout policy=rate_limiter name=api event=rejected: rate_limited, retry after 10ms",
        "DEBUG keel span=checkout policy=shed name=front event=rejected: shed (low priority)",
        "DEBUG keel span=checkout policy=retry name=payment event=retry scheduled: attempt 2 after 10ms",
        "DEBUG keel span=checkout policy=timeout name=payment event=timed out after 50ms",
        "DEBUG keel span=checkout policy=hedge name=pricing event=hedge started: attempt 2",
        "DEBUG keel span=checkout policy=fallback name=recommendations event=fallback used: default",
    ];
    assert_eq!(recorder.keel_events(), expected);
}
