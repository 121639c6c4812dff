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
#[cfg(feature = "tower")]
mod layer;

pub use backoff::{Backoff, Jitter, Rng, SplitMix};
pub use budget::{RetryBudget, RetryBudgetBuilder};
#[cfg(feature = "tower")]
pub use layer::{RetryLayer, RetryService};

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::classify::{classify_lifted, Classify, DefaultClassifier};
use crate::clock::{Clock, SharedClock, TokioClock};
use crate::{ConfigError, Error};

/// A retry policy. Cheap to clone; clones share the retry budget and RNG.
#[derive(Clone)]
pub struct Retry {
    inner: Arc<Config>,
}

struct Config {
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
        Ok(Retry {
            inner: Arc::new(Config {
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

    /// Attempts in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.inner.max_attempts
    }

    /// Runs `op`, retrying `Err`s (the default classifier).
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_classified(&DefaultClassifier, op).await
    }

    /// Runs `op`, retrying what `classifier` calls retryable.
    pub async fn call_classified<T, E, C, F, Fut>(
        &self,
        classifier: &C,
        op: F,
    ) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        // The first attempt inline, as in `run`, without lifting each
        // attempt's future into another state machine.
        let start = self.begin();
        let result = op().await;
        let verdict = classifier.classify(&result);
        let result = result.map_err(Error::Inner);
        if !verdict.retryable || self.inner.max_attempts == 1 {
            return result;
        }
        let lifted = || {
            let fut = op();
            async move { fut.await.map_err(Error::Inner) }
        };
        Box::pin(self.retry_loop(classifier, &lifted, start, verdict, result)).await
    }

    /// What every call does before its first attempt: deposits in the retry
    /// budget, and reads the clock if a time budget needs the start time.
    #[inline]
    fn begin(&self) -> Option<Duration> {
        let cfg = &*self.inner;
        if let Some(budget) = &cfg.budget {
            budget.deposit();
        }
        cfg.time_budget.map(|_| cfg.clock.now())
    }

    /// The retry loop over operations whose errors may already be keel's.
    ///
    /// The first attempt runs inline; the loop that follows a retryable
    /// failure is boxed, so the future of a call that succeeds at once stays
    /// small (it is moved on every await) and costs no more than the
    /// operation. The allocation happens only on the way to a retry, which
    /// sleeps anyway.
    pub(crate) async fn run<T, E, C, F, Fut>(&self, classifier: &C, op: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Error<E>>>,
    {
        let start = self.begin();
        let (verdict, result) = classify_lifted(classifier, op().await);
        if !verdict.retryable || self.inner.max_attempts == 1 {
            return result;
        }
        Box::pin(self.retry_loop(classifier, &op, start, verdict, result)).await
    }

    async fn retry_loop<T, E, C, F, Fut>(
        &self,
        classifier: &C,
        op: &F,
        start: Option<Duration>,
        mut verdict: crate::classify::Verdict,
        mut result: Result<T, Error<E>>,
    ) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Error<E>>>,
    {
        let cfg = &*self.inner;
        let mut attempt = 1;
        let mut previous = Duration::ZERO;
        loop {
            if !verdict.retryable {
                return result;
            }
            if attempt >= cfg.max_attempts {
                return give_up(result, attempt, GiveUp::MaxAttempts);
            }
            let delay = match verdict.retry_after {
                Some(hint) => hint.min(cfg.max_retry_after),
                None => cfg.jitter.apply(&cfg.backoff, attempt, previous, &*cfg.rng),
            };
            if let (Some(limit), Some(start)) = (cfg.time_budget, start) {
                let elapsed = cfg.clock.now().saturating_sub(start);
                if elapsed.saturating_add(delay) >= limit {
                    return give_up(result, attempt, GiveUp::TimeBudget);
                }
            }
            if let Some(budget) = &cfg.budget {
                if !budget.try_withdraw() {
                    return give_up(result, attempt, GiveUp::RetryBudget);
                }
            }
            tracing::debug!(
                target: "keel::retry",
                attempt,
                next_attempt = attempt + 1,
                ?delay,
                server_hint = verdict.retry_after.is_some(),
                "retry scheduled"
            );
            drop(result);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            previous = delay;
            attempt += 1;
            (verdict, result) = classify_lifted(classifier, op().await);
        }
    }
}

fn give_up<T, E>(result: Result<T, Error<E>>, attempts: u32, why: GiveUp) -> Result<T, Error<E>> {
    tracing::debug!(target: "keel::retry", attempts, reason = why.as_str(), "retries exhausted");
    result.map_err(|last| Error::RetriesExhausted {
        attempts,
        last: Box::new(last),
    })
}
