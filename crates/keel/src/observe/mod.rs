//! The golden signals of one dependency: traffic and errors
//! (`keel_calls_total{policy="call",name,outcome}`), latency
//! (`keel_call_duration_seconds{name}`, a histogram: p50, p95, p99 come from
//! it) and saturation (`keel_in_flight{name}`), measured where the caller
//! names the dependency: outermost in a [`Pipeline`](crate::Pipeline)
//! ([`PipelineBuilder::observe`](crate::pipeline::PipelineBuilder::observe)),
//! or as the outermost tower layer ([`ObserveLayer`]).
//!
//! Outcomes are the classifier's (`success`, `failure`, `ignored`), and
//! `rejected` when keel refused the call (breaker open, bulkhead full, rate
//! limited, shed), also when retries ended on such a refusal
//! ([`Error::rejection`]). A call dropped before it finished counts as
//! `ignored`.
//!
//! ```
//! use keel::observe::Observer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let payment = Observer::new("payment");
//! let paid = payment.call(|| async { Ok::<_, std::io::Error>("paid") }).await;
//! assert_eq!(paid.unwrap(), "paid");
//! # }
//! ```

#[cfg(feature = "tower")]
mod layer;
#[cfg(feature = "tower")]
pub use layer::{ObserveLayer, ObserveService, ResponseFuture};

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;

use metrics::{Gauge, Histogram};

use crate::classify::{classify_lifted, Classify, DefaultClassifier, Outcome};
use crate::clock::{Clock, SharedClock, TokioClock};
use crate::error::LiftErr;
use crate::events::Policy;
use crate::telemetry;
use crate::Error;

/// Measures the calls to one named dependency. A cheap, cloneable handle.
#[derive(Clone)]
pub struct Observer {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    name: Arc<str>,
    calls: telemetry::Calls,
    duration: Histogram,
    in_flight: Gauge,
    clock: SharedClock,
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observer")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl Observer {
    /// Measures calls to `name`, timed on tokio's clock.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Observer::with_clock(name, TokioClock::new())
    }

    /// Measures calls to `name`, timed on `clock`.
    pub fn with_clock(name: impl Into<Arc<str>>, clock: impl Clock) -> Self {
        let name = name.into();
        let in_flight = telemetry::gauge(telemetry::IN_FLIGHT, &name);
        in_flight.set(0.0);
        Observer {
            inner: Arc::new(Inner {
                calls: telemetry::Calls::new(Policy::Call, &name),
                duration: telemetry::histogram(telemetry::CALL_DURATION, &name),
                in_flight,
                clock: Arc::new(clock),
                name,
            }),
        }
    }

    /// The dependency's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Runs `op` and measures it (`Ok` is a success, `Err` a failure).
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run(&DefaultClassifier, LiftErr::new(op())).await
    }

    pub(crate) async fn run<T, E, C, Fut>(&self, classifier: &C, call: Fut) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        Fut: Future<Output = Result<T, Error<E>>>,
    {
        let mut guard = InFlight::start(&*self.inner);
        let result = call.await;
        if matches!(&result, Err(e) if e.rejection().is_some()) {
            guard.rejected();
            return result;
        }
        let (verdict, result) = classify_lifted(classifier, result);
        guard.finish(verdict.outcome);
        result
    }

    /// A guard owning a handle to the observer, for `'static` futures.
    #[cfg(feature = "tower")]
    pub(crate) fn start_owned(&self) -> InFlight<Arc<Inner>> {
        InFlight::start(self.inner.clone())
    }
}

/// One call in flight; records it when dropped. Borrows the observer where
/// the call's future may (a `Pipeline` step: no reference count touched per
/// call) and owns a handle where it must be `'static` (the tower layer).
pub(crate) struct InFlight<O: Deref<Target = Inner>> {
    observer: O,
    start: std::time::Duration,
    /// `None` until finished: a dropped call is ignored.
    outcome: Option<Option<Outcome>>,
}

impl<O: Deref<Target = Inner>> InFlight<O> {
    /// Counts a call in flight until the guard is finished or dropped.
    fn start(observer: O) -> Self {
        observer.in_flight.increment(1.0);
        InFlight {
            start: observer.clock.now(),
            observer,
            outcome: None,
        }
    }

    pub(crate) fn finish(&mut self, outcome: Outcome) {
        self.outcome = Some(Some(outcome));
    }

    pub(crate) fn rejected(&mut self) {
        self.outcome = Some(None);
    }
}

impl<O: Deref<Target = Inner>> Drop for InFlight<O> {
    fn drop(&mut self) {
        let o = &*self.observer;
        o.in_flight.decrement(1.0);
        let took = o.clock.now().saturating_sub(self.start);
        o.duration.record(took.as_secs_f64());
        match self.outcome {
            Some(Some(outcome)) => o.calls.record(outcome),
            Some(None) => o.calls.rejected(),
            None => o.calls.record(Outcome::Ignore),
        }
    }
}
