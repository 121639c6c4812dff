//! Retry: try again what the classifier calls retryable, with backoff and
//! jitter, within a time budget and a shared retry budget, honouring the
//! server's `Retry-After`.
//!
//! ```
//! use keel::retry::{Backoff, Jitter, Retry};
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let retry = Retry::builder()
//!     .max_attempts(3)
//!     .backoff(Backoff::exponential(Duration::from_millis(100)))
//!     .jitter(Jitter::Full)
//!     .build()?;
//!
//! let calls = AtomicU32::new(0);
//! let value = retry
//!     .call(|| async {
//!         if calls.fetch_add(1, Ordering::SeqCst) < 2 {
//!             Err(std::io::Error::other("flaky"))
//!         } else {
//!             Ok(42)
//!         }
//!     })
//!     .await?;
//! assert_eq!(value, 42);
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # Ok(())
//! # }
//! ```
//!
//! `max_attempts` counts the first call. When retry gives up on a retryable
//! error it returns [`Error::RetriesExhausted`] with the last error; a
//! non-retryable error is returned as it is, and a retryable *value* (an
//! HTTP 503 response, say) is returned as the last value.

mod backoff;
mod budget;
mod config;
mod future;
#[cfg(feature = "tower")]
mod layer;

pub use backoff::{Backoff, Jitter, Rng, SplitMix};
pub use budget::{RetryBudget, RetryBudgetBuilder};
pub use config::{BackoffConfig, BudgetConfig, JitterKind, RetryConfig};
#[cfg(feature = "tower")]
pub use layer::{RetryLayer, RetryService};

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::classify::{Classify, DefaultClassifier};
use crate::clock::{Clock, SharedClock, TokioClock};
use crate::events::{EventKind, Policy, PolicyEvents, Reason};
use crate::telemetry;
use crate::{ConfigError, Error};
use future::{Lifted, Raw, RetryFuture};

/// A retry policy. Cheap to clone; clones share the retry budget and RNG.
#[derive(Clone)]
pub struct Retry {
    inner: Arc<Config>,
}

struct Config {
    name: Arc<str>,
    events: PolicyEvents,
    retries: metrics::Counter,
    budget_spent: metrics::Counter,
    max_attempts: u32,
    backoff: Backoff,
    jitter: Jitter,
    time_budget: Option<Duration>,
    max_retry_after: Duration,
    budget: Option<RetryBudget>,
    rng: Arc<dyn Rng>,
    clock: SharedClock,
}

impl fmt::Debug for Retry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.inner;
        f.debug_struct("Retry")
            .field("name", &c.name)
            .field("max_attempts", &c.max_attempts)
            .field("backoff", &c.backoff)
            .field("jitter", &c.jitter)
            .field("time_budget", &c.time_budget)
            .field("max_retry_after", &c.max_retry_after)
            .field("budget", &c.budget)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Retry`].
#[derive(Debug, Clone)]
pub struct Builder {
    name: Arc<str>,
    max_attempts: u32,
    backoff: Backoff,
    jitter: Jitter,
    time_budget: Option<Duration>,
    max_retry_after: Duration,
    budget: Option<RetryBudget>,
    rng: Option<Arc<dyn Rng>>,
    clock: Option<SharedClock>,
}

impl Builder {
    /// The name in events and metrics: the dependency retried (default
    /// `"default"`).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Attempts in all, the first call included (default 3, at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The delay schedule (default exponential from 100 ms, capped at 10 s).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How delays are randomized (default [`Jitter::Full`]).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// A limit on the time from the first attempt to the start of the last:
    /// a retry whose delay would end at or past it is not made.
    pub fn time_budget(mut self, budget: Duration) -> Self {
        self.time_budget = Some(budget);
        self
    }

    /// The longest server hint (`Retry-After`) that is honoured as given;
    /// longer hints are cut to this (default 60 s).
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// A retry budget shared with other calls (and other policies).
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The random source for jitter (default [`SplitMix::from_entropy`]).
    pub fn rng(mut self, rng: impl Rng + 'static) -> Self {
        self.rng = Some(Arc::new(rng));
        self
    }

    /// The clock the time budget is measured with (default [`TokioClock`]).
    /// Delays are slept on tokio's timer.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Validates the configuration and builds the policy.
    pub fn build(self) -> Result<Retry, ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::new("max_attempts", "must be at least 1"));
        }
        self.backoff.validate()?;
        self.jitter.validate()?;
        if self.time_budget == Some(Duration::ZERO) {
            return Err(ConfigError::new("time_budget", "must be longer than zero"));
        }
        let policy = Policy::Retry;
        Ok(Retry {
            inner: Arc::new(Config {
                events: PolicyEvents::new(policy, self.name.clone()),
                retries: telemetry::counter(telemetry::RETRIES, &self.name),
                budget_spent: telemetry::rejections(policy, &self.name, Reason::BudgetExhausted),
                name: self.name,
                max_attempts: self.max_attempts,
                backoff: self.backoff,
                jitter: self.jitter,
                time_budget: self.time_budget,
                max_retry_after: self.max_retry_after,
                budget: self.budget,
                rng: self
                    .rng
                    .unwrap_or_else(|| Arc::new(SplitMix::from_entropy())),
                clock: self.clock.unwrap_or_else(|| Arc::new(TokioClock::new())),
            }),
        })
    }
}

/// Why retry stopped retrying a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GiveUp {
    MaxAttempts,
    TimeBudget,
    RetryBudget,
}

impl GiveUp {
    fn as_str(self) -> &'static str {
        match self {
            GiveUp::MaxAttempts => "max_attempts reached",
            GiveUp::TimeBudget => "next attempt would start past the time budget",
            GiveUp::RetryBudget => "retry budget spent",
        }
    }
}

impl Retry {
    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder {
            name: "default".into(),
            max_attempts: 3,
            backoff: Backoff::exponential(Duration::from_millis(100))
                .max_delay(Duration::from_secs(10)),
            jitter: Jitter::Full,
            time_budget: None,
            max_retry_after: Duration::from_secs(60),
            budget: None,
            rng: None,
            clock: None,
        }
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The policy's events: retries scheduled, retries the budget refused.
    pub fn events(&self) -> &PolicyEvents {
        &self.inner.events
    }

    /// Attempts in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.inner.max_attempts
    }

    /// Runs `op`, retrying `Err`s (the default classifier).
    pub fn call<'a, T, E, F, Fut>(
        &'a self,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + use<'a, T, E, F, Fut>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        RetryFuture::new(&self.inner, &DefaultClassifier, Lifted(op))
    }

    /// Runs `op`, retrying what `classifier` calls retryable.
    pub fn call_classified<'a, T, E, C, F, Fut>(
        &'a self,
        classifier: &'a C,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + use<'a, T, E, C, F, Fut>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        RetryFuture::new(&self.inner, classifier, Lifted(op))
    }

    /// Runs `op`, whose errors may already be keel's (inner steps).
    pub(crate) fn run<'a, T, E, C, F, Fut>(
        &'a self,
        classifier: &'a C,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + use<'a, T, E, C, F, Fut>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Error<E>>>,
    {
        RetryFuture::new(&self.inner, classifier, Raw(op))
    }
}

fn give_up<T, E>(
    cfg: &Config,
    result: Result<T, Error<E>>,
    attempts: u32,
    why: GiveUp,
) -> Result<T, Error<E>> {
    if why == GiveUp::RetryBudget {
        cfg.budget_spent.increment(1);
        cfg.events.emit(EventKind::Rejected {
            reason: Reason::BudgetExhausted,
            retry_after: None,
        });
    }
    tracing::debug!(target: "keel::retry", retry = %cfg.name, attempts, reason = why.as_str(), "retries exhausted");
    result.map_err(|last| Error::RetriesExhausted {
        attempts,
        last: Box::new(last),
    })
}
