//! The future of a retried call, as an explicit state machine:
//!
//! ```text
//!   Attempt ──(done; retryable, and budgets allow)──▶ Sleeping ──▶ Attempt ...
//!      │
//!      └──(done otherwise)──▶ the result (or RetriesExhausted)
//! ```
//!
//! Written by hand rather than as an `async fn` so that a call that succeeds
//! at once costs one poll of the operation and a classification: the future
//! holds the operation's future and a few words, and the timer of a backoff
//! is boxed only when a retry sleeps.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::{give_up, Config, GiveUp};
use crate::classify::{classify_lifted, Classify, Verdict};
use crate::error::LiftErr;
use crate::events::EventKind;
use crate::Error;

/// Makes the future of each attempt, with keel's error type.
pub(crate) trait Attempt<T, E> {
    type Future: Future<Output = Result<T, Error<E>>>;
    fn attempt(&self) -> Self::Future;
}

/// The user's operation, whose error is lifted into [`Error::Inner`].
pub(crate) struct Lifted<F>(pub(crate) F);

impl<T, E, F, Fut> Attempt<T, E> for Lifted<F>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    type Future = LiftErr<Fut>;
    fn attempt(&self) -> LiftErr<Fut> {
        LiftErr::new((self.0)())
    }
}

/// An operation that already returns keel's error (a pipeline's inner steps).
pub(crate) struct Raw<F>(pub(crate) F);

impl<T, E, F, Fut> Attempt<T, E> for Raw<F>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, Error<E>>>,
{
    type Future = Fut;
    fn attempt(&self) -> Fut {
        (self.0)()
    }
}

pin_project! {
    #[project = StateProj]
    enum State<Fut> {
        Attempt { #[pin] fut: Fut },
        Sleeping { sleep: Pin<Box<Sleep>> },
    }
}

pin_project! {
    /// A call under a retry policy. See the module docs.
    pub(crate) struct RetryFuture<'a, T, E, C: ?Sized, A, Fut> {
        config: &'a Config,
        classifier: &'a C,
        attempts: A,
        // Set at the start when a time budget needs it.
        start: Option<Duration>,
        // The attempt under way (1 for the first).
        attempt: u32,
        // The delay slept before this attempt (decorrelated jitter uses it).
        previous: Duration,
        #[pin]
        state: State<Fut>,
        _output: PhantomData<fn() -> (T, E)>,
    }
}

impl<'a, T, E, C, A> RetryFuture<'a, T, E, C, A, A::Future>
where
    C: Classify<T, E> + ?Sized,
    A: Attempt<T, E>,
{
    /// Starts the call: deposits in the retry budget, notes the start time
    /// if a time budget needs it, and makes the first attempt's future.
    pub(crate) fn new(config: &'a Config, classifier: &'a C, attempts: A) -> Self {
        if let Some(budget) = &config.budget {
            budget.deposit();
        }
        let start = config.time_budget.map(|_| config.clock.now());
        let fut = attempts.attempt();
        RetryFuture {
            config,
            classifier,
            attempts,
            start,
            attempt: 1,
            previous: Duration::ZERO,
            state: State::Attempt { fut },
            _output: PhantomData,
        }
    }
}

impl<T, E, C, A> Future for RetryFuture<'_, T, E, C, A, A::Future>
where
    C: Classify<T, E> + ?Sized,
    A: Attempt<T, E>,
{
    type Output = Result<T, Error<E>>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let cfg = *this.config;
        loop {
            match this.state.as_mut().project() {
                StateProj::Attempt { fut } => {
                    let (verdict, result) = classify_lifted(*this.classifier, ready!(fut.poll(cx)));
                    if !verdict.retryable || cfg.max_attempts == 1 {
                        return Poll::Ready(result);
                    }
                    let delay = match schedule(
                        cfg,
                        *this.attempt,
                        *this.previous,
                        *this.start,
                        verdict,
                        result,
                    ) {
                        Ok(delay) => delay,
                        Err(last) => return Poll::Ready(last),
                    };
                    *this.previous = delay;
                    *this.attempt += 1;
                    if delay.is_zero() {
                        let fut = this.attempts.attempt();
                        this.state.set(State::Attempt { fut });
                    } else {
                        let sleep = Box::pin(tokio::time::sleep(delay));
                        this.state.set(State::Sleeping { sleep });
                    }
                }
                StateProj::Sleeping { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    let fut = this.attempts.attempt();
                    this.state.set(State::Attempt { fut });
                }
            }
        }
    }
}

/// After a retryable failure of attempt `attempt`: the delay before the next
/// attempt, or the call's final result if retry gives up. Out of line: the
/// path of a call that succeeds does not carry it.
#[cold]
#[inline(never)]
fn schedule<T, E>(
    cfg: &Config,
    attempt: u32,
    previous: Duration,
    start: Option<Duration>,
    verdict: Verdict,
    result: Result<T, Error<E>>,
) -> Result<Duration, Result<T, Error<E>>> {
    if attempt >= cfg.max_attempts {
        return Err(give_up(cfg, result, attempt, GiveUp::MaxAttempts));
    }
    let delay = match verdict.retry_after {
        Some(hint) => hint.min(cfg.max_retry_after),
        None => cfg.jitter.apply(&cfg.backoff, attempt, previous, &*cfg.rng),
    };
    if let (Some(limit), Some(start)) = (cfg.time_budget, start) {
        let elapsed = cfg.clock.now().saturating_sub(start);
        if elapsed.saturating_add(delay) >= limit {
            return Err(give_up(cfg, result, attempt, GiveUp::TimeBudget));
        }
    }
    if let Some(budget) = &cfg.budget {
        if !budget.try_withdraw() {
            return Err(give_up(cfg, result, attempt, GiveUp::RetryBudget));
        }
    }
    cfg.retries.increment(1);
    cfg.events.emit(EventKind::RetryScheduled {
        attempt: attempt + 1,
        delay,
    });
    Ok(delay)
}
