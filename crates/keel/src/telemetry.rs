//! Metrics, through the `metrics` facade: the names, and the handles each
//! policy registers when it is built. `docs/METRICS.md` lists them all.
//!
//! Handles are registered with the recorder installed when the policy is
//! built (install the exporter first, as the `metrics` crate advises); with
//! no recorder they are no-ops costing a branch.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};

use crate::classify::Outcome;
use crate::events::{EventKind, Policy, PolicyEvents, Reason};

pub(crate) const CALLS: &str = "keel_calls_total";
pub(crate) const CALL_DURATION: &str = "keel_call_duration_seconds";
pub(crate) const IN_FLIGHT: &str = "keel_in_flight";
pub(crate) const BREAKER_STATE: &str = "keel_circuit_breaker_state";
pub(crate) const BREAKER_FAILURE_RATE: &str = "keel_circuit_breaker_failure_rate";
pub(crate) const RETRIES: &str = "keel_retries_total";
pub(crate) const REJECTIONS: &str = "keel_rejections_total";
pub(crate) const TIMEOUTS: &str = "keel_timeouts_total";
pub(crate) const BULKHEAD_IN_USE: &str = "keel_bulkhead_in_use";
pub(crate) const BULKHEAD_QUEUED: &str = "keel_bulkhead_queued";
pub(crate) const CONCURRENCY_LIMIT: &str = "keel_concurrency_limit";
pub(crate) const HEDGES: &str = "keel_hedges_total";
pub(crate) const FALLBACKS: &str = "keel_fallbacks_total";
pub(crate) const HEALTH: &str = "keel_health_check_up";
pub(crate) const EVENTS_DROPPED: &str = "keel_events_dropped_total";
pub(crate) const FAULTS: &str = "keel_faults_injected_total";
pub(crate) const IDEMPOTENCY: &str = "keel_idempotency_total";
pub(crate) const STORE_UNAVAILABLE: &str = "keel_store_unavailable_total";

/// Every metric keel records, with its description, so exporters print
/// `# HELP` and units. Called when a policy is built; call it yourself to
/// have the descriptions before any policy exists.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        CALLS,
        "Calls by policy, name and outcome (success, failure, ignored, rejected)"
    );
    describe_histogram!(
        CALL_DURATION,
        Unit::Seconds,
        "Duration of calls to a named dependency, rejections included"
    );
    describe_gauge!(IN_FLIGHT, "Calls to a named dependency running now");
    describe_gauge!(
        BREAKER_STATE,
        "1 for the circuit breaker's current state, 0 for the others"
    );
    describe_gauge!(
        BREAKER_FAILURE_RATE,
        "Failure rate in the circuit breaker's window (0 to 1)"
    );
    describe_counter!(RETRIES, "Retries scheduled (attempts after the first)");
    describe_counter!(
        REJECTIONS,
        "Calls, retries or hedges refused without running, by reason"
    );
    describe_counter!(TIMEOUTS, "Calls cancelled by a timeout");
    describe_gauge!(BULKHEAD_IN_USE, "Bulkhead seats (or pool threads) in use");
    describe_gauge!(
        BULKHEAD_QUEUED,
        "Calls waiting for a bulkhead seat or pool thread"
    );
    describe_gauge!(CONCURRENCY_LIMIT, "The adaptive concurrency limit now");
    describe_counter!(HEDGES, "Hedged attempts started");
    describe_counter!(FALLBACKS, "Calls answered by a fallback, by source");
    describe_gauge!(HEALTH, "1 when the health check passes, 0 when it fails");
    describe_counter!(FAULTS, "Faults injected by chaos, by kind");
    describe_counter!(
        IDEMPOTENCY,
        "Idempotent calls by result: executed, released, replayed, mismatch, wait_timeout"
    );
    describe_counter!(
        STORE_UNAVAILABLE,
        "Store calls that failed or timed out, by the policy's fail mode"
    );
    describe_counter!(
        EVENTS_DROPPED,
        "Events dropped because a subscriber's buffer was full"
    );
}

/// `keel_calls_total` for one policy, by outcome.
#[derive(Clone)]
pub(crate) struct Calls {
    success: Counter,
    failure: Counter,
    ignored: Counter,
    rejected: Counter,
}

impl Calls {
    pub(crate) fn new(policy: Policy, name: &Arc<str>) -> Self {
        describe_metrics();
        let counter = |outcome: &'static str| {
            metrics::counter!(
                CALLS,
                "policy" => policy.as_str(),
                "name" => name.to_string(),
                "outcome" => outcome
            )
        };
        Calls {
            success: counter("success"),
            failure: counter("failure"),
            ignored: counter("ignored"),
            rejected: counter("rejected"),
        }
    }

    #[inline]
    pub(crate) fn record(&self, outcome: Outcome) {
        match outcome {
            Outcome::Success => self.success.increment(1),
            Outcome::Failure => self.failure.increment(1),
            Outcome::Ignore => self.ignored.increment(1),
        }
    }

    #[inline]
    pub(crate) fn rejected(&self) {
        self.rejected.increment(1);
    }
}

/// `keel_rejections_total{policy,name,reason}`.
pub(crate) fn rejections(policy: Policy, name: &Arc<str>, reason: Reason) -> Counter {
    describe_metrics();
    metrics::counter!(
        REJECTIONS,
        "policy" => policy.as_str(),
        "name" => name.to_string(),
        "reason" => reason.as_str()
    )
}

/// A counter labelled with the policy's name only.
pub(crate) fn counter(metric: &'static str, name: &Arc<str>) -> Counter {
    describe_metrics();
    metrics::counter!(metric, "name" => name.to_string())
}

/// A gauge labelled with the policy's name only.
pub(crate) fn gauge(metric: &'static str, name: &Arc<str>) -> Gauge {
    describe_metrics();
    metrics::gauge!(metric, "name" => name.to_string())
}

/// A histogram labelled with the policy's name only.
pub(crate) fn histogram(metric: &'static str, name: &Arc<str>) -> Histogram {
    describe_metrics();
    metrics::histogram!(metric, "name" => name.to_string())
}

/// A policy's events and its `keel_rejections_total` counter, for the
/// policies whose one decision is to refuse.
pub(crate) struct Refusals {
    events: PolicyEvents,
    counter: Counter,
    reason: Reason,
}

impl Refusals {
    pub(crate) fn new(policy: Policy, name: &Arc<str>, reason: Reason) -> Self {
        Refusals {
            events: PolicyEvents::new(policy, name.clone()),
            counter: rejections(policy, name, reason),
            reason,
        }
    }

    pub(crate) fn events(&self) -> &PolicyEvents {
        &self.events
    }

    /// Counts and publishes one refusal.
    #[cold]
    pub(crate) fn refuse(&self, retry_after: Option<Duration>) {
        self.refuse_because(self.reason, retry_after);
    }

    /// Like `refuse`, with a more precise reason of the same kind (for
    /// example the priority shed).
    #[cold]
    pub(crate) fn refuse_because(&self, reason: Reason, retry_after: Option<Duration>) {
        self.counter.increment(1);
        self.events.emit(EventKind::Rejected {
            reason,
            retry_after,
        });
    }
}
