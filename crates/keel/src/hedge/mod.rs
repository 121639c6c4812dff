//! Hedging: when a call is slower than usual, start another attempt beside
//! it and take whichever answers first. It cuts tail latency when slowness
//! is a property of one attempt (one slow replica, one lost packet), at the
//! cost of extra load, so hedges draw on a [`RetryBudget`].
//!
//! ```text
//!   t=0      attempt 1 ───────────────────────────────▶ (cancelled)
//!   t=delay           attempt 2 ─────────▶ answer: the call's result
//!                                          every other attempt is dropped
//! ```
//!
//! - The delay is fixed, or a quantile of the call's recent latencies (say
//!   p95: about one call in twenty is hedged), with a fixed delay until
//!   enough calls are measured.
//! - An attempt that fails with a retryable error starts the next hedge at
//!   once; a success, or a failure the classifier calls final, wins. An
//!   attempt keel itself refused (a full bulkhead, an open breaker, a rate
//!   limit, shed) is no answer: the others keep running, and the refusal is
//!   the result only if nothing else answers.
//! - With a quantile delay, only successful calls are measured.
//! - At most `max_hedged_attempts` extra attempts per call.
//! - Only operations the caller marks idempotent are hedged: running one
//!   twice at the same time must be harmless. [`Hedge::call`] takes an
//!   [`Idempotent`] operation; in a [`Pipeline`](crate::Pipeline) only
//!   [`call_idempotent`](crate::Pipeline::call_idempotent) hedges.
//!
//! ```
//! use keel::hedge::{Hedge, Idempotent};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let hedge = Hedge::builder().delay(Duration::from_millis(50)).build()?;
//! let attempts = std::sync::atomic::AtomicU32::new(0);
//! let price = hedge
//!     .call(Idempotent(|| async {
//!         // The first attempt hangs on a slow replica; the hedge is fast.
//!         let n = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!         let took = if n == 0 { 10_000 } else { 5 };
//!         tokio::time::sleep(Duration::from_millis(took)).await;
//!         Ok::<_, std::io::Error>(n)
//!     }))
//!     .await?;
//! assert_eq!(price, 1); // the hedge answered first
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "tower")]
mod layer;
#[cfg(feature = "tower")]
pub use layer::{HedgeLayer, HedgeService};

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Sleep;

use crate::classify::{classify_lifted, Classify, DefaultClassifier, Outcome};
use crate::clock::{duration_nanos, Clock, SharedClock, TokioClock};
use crate::error::LiftErr;
use crate::events::{EventKind, Policy, PolicyEvents, Reason};
use crate::latency::LatencyWindow;
use crate::retry::RetryBudget;
use crate::telemetry;
use crate::{ConfigError, Error};

/// An operation its caller declares safe to run more than once at the same
/// time. Only these are hedged.
#[derive(Debug, Clone, Copy)]
pub struct Idempotent<F>(pub F);

/// A hedging policy's configuration, as data. Give `delay`, or `quantile`
/// (with `delay` as the delay until enough calls are measured).
///
/// ```
/// use keel::hedge::HedgeConfig;
/// let config: HedgeConfig = toml::from_str(r#"
///     delay = "20ms"
///     quantile = 0.95
///     max_hedged_attempts = 2
/// "#)?;
/// let hedge = config.build()?;
/// # drop(hedge);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HedgeConfig {
    /// How long an attempt may run before the next starts (with
    /// `quantile`: until enough calls are measured). Default 50ms.
    #[serde(with = "crate::config::duration")]
    pub delay: Duration,
    /// Hedge after this quantile of recent call latencies instead.
    pub quantile: Option<f64>,
    /// Extra attempts per call (default 1).
    pub max_hedged_attempts: u32,
    /// Calls the latency window holds (default 1000; with `quantile`).
    pub window: u32,
    /// Calls measured before the quantile is used (default 100).
    pub min_samples: u32,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        HedgeConfig {
            delay: Duration::from_millis(50),
            quantile: None,
            max_hedged_attempts: 1,
            window: 1000,
            min_samples: 100,
        }
    }
}

impl HedgeConfig {
    /// Builds the policy, or says which field is wrong.
    pub fn build(&self) -> Result<Hedge, ConfigError> {
        Hedge::builder().config(self.clone()).build()
    }
}

/// Builds a [`Hedge`]; defaults are [`HedgeConfig`]'s.
#[derive(Debug, Clone)]
pub struct HedgeBuilder {
    name: Arc<str>,
    config: HedgeConfig,
    budget: Option<RetryBudget>,
    clock: Option<SharedClock>,
}

impl HedgeBuilder {
    fn config(mut self, config: HedgeConfig) -> Self {
        self.config = config;
        self
    }

    /// The name in events and metrics: the dependency hedged (default
    /// `"default"`).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// A fixed delay before each hedge (default 50ms).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.config.delay = delay;
        self.config.quantile = None;
        self
    }

    /// Hedge after `quantile` of the recent latencies of `window` calls,
    /// once `min_samples` are measured; `initial` before that.
    pub fn quantile_delay(
        mut self,
        quantile: f64,
        initial: Duration,
        window: u32,
        min_samples: u32,
    ) -> Self {
        self.config.quantile = Some(quantile);
        self.config.delay = initial;
        self.config.window = window;
        self.config.min_samples = min_samples;
        self
    }

    /// Extra attempts per call (default 1).
    pub fn max_hedged_attempts(mut self, n: u32) -> Self {
        self.config.max_hedged_attempts = n;
        self
    }

    /// Every hedge withdraws from `budget` (and every call deposits); an
    /// empty budget means no more hedges until it refills.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The clock that times calls for the quantile (default [`TokioClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The policy, or the field that is wrong.
    pub fn build(self) -> Result<Hedge, ConfigError> {
        let c = self.config;
        if c.max_hedged_attempts == 0 {
            return Err(ConfigError::new(
                "max_hedged_attempts",
                "must be at least 1 (leave hedging out to have none)",
            ));
        }
        let latencies = c
            .quantile
            .map(|q| LatencyWindow::from_config(q, c.window, c.min_samples))
            .transpose()?;
        Ok(Hedge {
            inner: Arc::new(Inner {
                events: PolicyEvents::new(Policy::Hedge, self.name.clone()),
                started: telemetry::counter(telemetry::HEDGES, &self.name),
                budget_spent: telemetry::rejections(
                    Policy::Hedge,
                    &self.name,
                    Reason::BudgetExhausted,
                ),
                delay: c.delay,
                max_hedged: c.max_hedged_attempts,
                latencies,
                budget: self.budget,
                clock: self.clock.unwrap_or_else(|| Arc::new(TokioClock::new())),
                hedges: AtomicU64::new(0),
            }),
        })
    }
}

/// A hedging policy: a cheap, cloneable handle; clones share the latency
/// window and the counts.
#[derive(Clone)]
pub struct Hedge {
    inner: Arc<Inner>,
}

struct Inner {
    events: PolicyEvents,
    started: metrics::Counter,
    budget_spent: metrics::Counter,
    delay: Duration,
    max_hedged: u32,
    latencies: Option<LatencyWindow>,
    budget: Option<RetryBudget>,
    clock: SharedClock,
    hedges: AtomicU64,
}

impl fmt::Debug for Hedge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("delay", &self.delay())
            .field("max_hedged_attempts", &self.inner.max_hedged)
            .field("hedges_started", &self.hedges_started())
            .finish_non_exhaustive()
    }
}

impl Hedge {
    /// A builder with the defaults of [`HedgeConfig`].
    pub fn builder() -> HedgeBuilder {
        HedgeBuilder {
            name: "default".into(),
            config: HedgeConfig::default(),
            budget: None,
            clock: None,
        }
    }

    /// How long an attempt may run before the next starts, now.
    pub fn delay(&self) -> Duration {
        self.inner
            .latencies
            .as_ref()
            .and_then(LatencyWindow::get)
            .map_or(self.inner.delay, Duration::from_nanos)
    }

    /// The policy's events: hedges started, hedges the budget refused.
    pub fn events(&self) -> &PolicyEvents {
        &self.inner.events
    }

    /// Hedges started since the policy was built.
    pub fn hedges_started(&self) -> u64 {
        self.inner.hedges.load(Ordering::Relaxed)
    }

    /// Runs the operation, hedging it as configured; the first acceptable
    /// result wins and the other attempts are dropped (cancelled).
    pub async fn call<T, E, F, Fut>(&self, op: Idempotent<F>) -> Result<T, Error<E>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let op = op.0;
        self.run(&DefaultClassifier, true, || LiftErr::new(op()))
            .await
    }

    pub(crate) async fn run<T, E, C, F, Fut>(
        &self,
        classifier: &C,
        idempotent: bool,
        op: F,
    ) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Error<E>>>,
    {
        if !idempotent {
            return op().await;
        }
        let inner = &*self.inner;
        if let Some(budget) = &inner.budget {
            budget.deposit();
        }
        let start = inner.latencies.as_ref().map(|_| inner.clock.now());
        let delay = self.delay();

        let mut primary = pin!(op());
        let mut primary_running = true;
        let mut hedges: Vec<Pin<Box<Fut>>> = Vec::new();
        let mut timer: Option<Pin<Box<Sleep>>> = None;
        let mut hedged = 0u32;
        let mut may_hedge = true;
        let mut last: Option<Result<T, Error<E>>> = None;

        let (result, outcome) = poll_fn(|cx| loop {
            let mut failed = false;
            let mut judge = |r: Result<T, Error<E>>| match Judged::of(classifier, r) {
                Judged::Final(r, outcome) => Some((r, outcome)),
                Judged::Retryable(r) => {
                    failed = true;
                    last = Some(r);
                    None
                }
                // Keel refused this attempt (a full bulkhead, an open
                // breaker, a limit): it is no answer and says nothing about
                // the attempts still running, which keep racing. A hedge
                // started now would be refused the same way, so the next
                // one waits for the delay. The refusal is the call's result
                // only when nothing better comes.
                Judged::Rejected(r) => {
                    if last.is_none() {
                        last = Some(r);
                    }
                    None
                }
            };
            if primary_running {
                if let Poll::Ready(r) = primary.as_mut().poll(cx) {
                    primary_running = false;
                    if let Some(win) = judge(r) {
                        return Poll::Ready(win);
                    }
                }
            }
            let mut i = 0;
            while i < hedges.len() {
                if let Poll::Ready(r) = hedges[i].as_mut().poll(cx) {
                    drop(hedges.swap_remove(i));
                    if let Some(win) = judge(r) {
                        return Poll::Ready(win);
                    }
                } else {
                    i += 1;
                }
            }
            may_hedge &= hedged < inner.max_hedged;
            let mut start_hedge = may_hedge && failed;
            if may_hedge && !start_hedge {
                let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
                start_hedge = t.as_mut().poll(cx).is_ready();
            }
            if start_hedge {
                timer = None;
                if inner.budget.as_ref().is_none_or(RetryBudget::try_withdraw) {
                    hedged += 1;
                    inner.hedges.fetch_add(1, Ordering::Relaxed);
                    inner.started.increment(1);
                    inner.events.emit(EventKind::HedgeStarted {
                        attempt: hedged + 1,
                    });
                    hedges.push(Box::pin(op()));
                    continue; // poll it
                }
                may_hedge = false; // the budget is spent
                inner.budget_spent.increment(1);
                inner.events.emit(EventKind::Rejected {
                    reason: Reason::BudgetExhausted,
                    retry_after: None,
                });
            }
            if !primary_running && hedges.is_empty() {
                let r = last.take().expect("a finished attempt left its result");
                return Poll::Ready((r, Outcome::Failure));
            }
            return Poll::Pending;
        })
        .await;
        // Only answers the dependency gave measure its latency: counting
        // instant failures and refusals would pull the quantile, and so the
        // hedge delay, towards zero just when the dependency is in trouble.
        if let (Some(window), Some(start), Outcome::Success) = (&inner.latencies, start, outcome) {
            window.record(duration_nanos(inner.clock.now().saturating_sub(start)));
        }
        result
    }
}

/// What one finished attempt means to the race.
enum Judged<T, E> {
    /// A success, or a failure not worth another attempt: the call's result.
    Final(Result<T, Error<E>>, Outcome),
    /// A failure another attempt may fix.
    Retryable(Result<T, Error<E>>),
    /// Keel refused the attempt without running it.
    Rejected(Result<T, Error<E>>),
}

impl<T, E> Judged<T, E> {
    fn of<C: Classify<T, E> + ?Sized>(classifier: &C, r: Result<T, Error<E>>) -> Self {
        if matches!(&r, Err(e) if e.is_rejection()) {
            return Judged::Rejected(r);
        }
        let (verdict, r) = classify_lifted(classifier, r);
        if verdict.outcome == Outcome::Failure && verdict.retryable {
            Judged::Retryable(r)
        } else {
            Judged::Final(r, verdict.outcome)
        }
    }
}
