//! Compose policies around a closure call.
//!
//! ```
//! use keel::{circuit_breaker::CircuitBreaker, retry::{Backoff, Jitter, Retry}, Pipeline};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let breaker = CircuitBreaker::builder("inventory").build()?;
//! let pipeline = Pipeline::builder()
//!     .timeout(Duration::from_secs(2))           // total, retries included
//!     .retry(Retry::builder().max_attempts(3).build()?)
//!     .circuit_breaker(breaker.clone())          // every attempt is counted
//!     .timeout(Duration::from_millis(500))       // per attempt
//!     .build();
//!
//! let stock: Result<u32, keel::Error<std::io::Error>> =
//!     pipeline.call(|| async { Ok(7) }).await;
//! assert_eq!(stock?, 7);
//! # Ok(())
//! # }
//! ```
//!
//! Steps wrap in the order they are added, outermost first, as
//! `tower::ServiceBuilder` layers do. The recommended order is the one above:
//! a total timeout outside retry bounds what the caller waits, retries
//! included; the breaker inside retry sees (and counts) every attempt and
//! rejects retries at once while open; a per-attempt timeout innermost makes a
//! hung attempt a failure that the breaker records and retry may try again.
//!
//! One classifier (set with [`PipelineBuilder::classifier`]) decides for every
//! step what a result means.

use std::future::Future;

use crate::adaptive::AdaptiveLimiter;
use crate::bulkhead::Bulkhead;
use crate::chaos::Chaos;
use crate::circuit_breaker::CircuitBreaker;
use crate::classify::{classify_lifted, Classify, DefaultClassifier, Outcome};
use crate::error::LiftErr;
use crate::hedge::Hedge;
use crate::observe::Observer;
use crate::rate_limit::RateLimiter;
use crate::retry::Retry;
use crate::shed::Prioritized;
use crate::timeout::{AdaptiveTimeout, Timeout};
use crate::Error;

mod sealed {
    pub trait Sealed {}
}

/// A policy that can be a step of a [`Pipeline`]. Implemented by keel's
/// policies; sealed.
pub trait Step: sealed::Sealed {
    /// Runs `op` under this step. `op` may be called more than once (retry).
    #[doc(hidden)]
    fn run<'a, T, E, C, F, Fut>(
        &'a self,
        cx: Ctx<'a, C>,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + 'a
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a;
}

/// What every step of one call shares: the pipeline's classifier, and
/// whether the caller marked the operation idempotent (safe to run more
/// than once at the same time, as hedging does).
#[doc(hidden)]
#[derive(Debug)]
pub struct Ctx<'a, C: ?Sized> {
    pub(crate) classifier: &'a C,
    pub(crate) idempotent: bool,
}

impl<C: ?Sized> Clone for Ctx<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C: ?Sized> Copy for Ctx<'_, C> {}

/// The empty pipeline: calls the operation directly.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity;

/// `Outer` wrapped around `Inner`.
#[derive(Debug, Clone)]
pub struct Stack<Outer, Inner> {
    outer: Outer,
    inner: Inner,
}

impl sealed::Sealed for Identity {}
impl Step for Identity {
    fn run<'a, T, E, C, F, Fut>(
        &'a self,
        _: Ctx<'a, C>,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + 'a
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        op()
    }
}

impl<O: Step, I: Step> sealed::Sealed for Stack<O, I> {}
impl<O: Step, I: Step> Step for Stack<O, I> {
    async fn run<'a, T, E, C, F, Fut>(&'a self, cx: Ctx<'a, C>, op: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        let inner = &self.inner;
        let op = &op;
        self.outer.run(cx, move || inner.run(cx, op)).await
    }
}

impl sealed::Sealed for Timeout {}
impl Step for Timeout {
    fn run<'a, T, E, C, F, Fut>(
        &'a self,
        _: Ctx<'a, C>,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + 'a
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        Timeout::run(self, op)
    }
}

impl sealed::Sealed for Retry {}
impl Step for Retry {
    fn run<'a, T, E, C, F, Fut>(
        &'a self,
        cx: Ctx<'a, C>,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + 'a
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        Retry::run(self, cx.classifier, op)
    }
}

impl sealed::Sealed for CircuitBreaker {}
impl Step for CircuitBreaker {
    async fn run<'a, T, E, C, F, Fut>(&'a self, cx: Ctx<'a, C>, op: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        let permit = self.try_acquire()?;
        let (verdict, result) = classify_lifted(cx.classifier, op().await);
        permit.record(verdict.outcome);
        result
    }
}

impl sealed::Sealed for Bulkhead {}
impl Step for Bulkhead {
    async fn run<'a, T, E, C, F, Fut>(&'a self, _: Ctx<'a, C>, op: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        let _seat = self.acquire().await?;
        op().await
    }
}

impl sealed::Sealed for RateLimiter {}
impl Step for RateLimiter {
    async fn run<'a, T, E, C, F, Fut>(&'a self, _: Ctx<'a, C>, op: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        self.check()?;
        op().await
    }
}

impl sealed::Sealed for AdaptiveLimiter {}
impl Step for AdaptiveLimiter {
    async fn run<'a, T, E, C, F, Fut>(&'a self, cx: Ctx<'a, C>, op: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        let permit = self.try_acquire()?;
        let (verdict, result) = classify_lifted(cx.classifier, op().await);
        match verdict.outcome {
            Outcome::Success => permit.success(),
            Outcome::Failure => permit.dropped(),
            Outcome::Ignore => permit.ignore(),
        }
        result
    }
}

impl sealed::Sealed for AdaptiveTimeout {}
impl Step for AdaptiveTimeout {
    fn run<'a, T, E, C, F, Fut>(
        &'a self,
        _: Ctx<'a, C>,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + 'a
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        AdaptiveTimeout::run(self, op)
    }
}

impl sealed::Sealed for Hedge {}
impl Step for Hedge {
    fn run<'a, T, E, C, F, Fut>(
        &'a self,
        cx: Ctx<'a, C>,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + 'a
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        Hedge::run(self, cx.classifier, cx.idempotent, op)
    }
}

impl sealed::Sealed for Prioritized {}
impl Step for Prioritized {
    async fn run<'a, T, E, C, F, Fut>(&'a self, _: Ctx<'a, C>, op: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        let _permit = self.try_acquire()?;
        op().await
    }
}

impl sealed::Sealed for Chaos {}
impl Step for Chaos {
    fn run<'a, T, E, C, F, Fut>(
        &'a self,
        _: Ctx<'a, C>,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + 'a
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        Chaos::run(self, op)
    }
}

impl sealed::Sealed for Observer {}
impl Step for Observer {
    fn run<'a, T, E, C, F, Fut>(
        &'a self,
        cx: Ctx<'a, C>,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + 'a
    where
        C: Classify<T, E> + ?Sized,
        F: Fn() -> Fut + 'a,
        Fut: Future<Output = Result<T, Error<E>>> + 'a,
        T: 'a,
        E: 'a,
    {
        Observer::run(self, cx.classifier, op())
    }
}

/// Policies composed around closure calls. Build with [`Pipeline::builder`].
#[derive(Debug, Clone)]
pub struct Pipeline<S = Identity, C = DefaultClassifier> {
    steps: S,
    classifier: C,
}

/// Builds a [`Pipeline`], outermost step first.
#[derive(Debug, Clone)]
pub struct PipelineBuilder<S, C> {
    steps: S,
    classifier: C,
}

impl Pipeline<Identity, DefaultClassifier> {
    /// An empty pipeline with the default classifier.
    pub fn builder() -> PipelineBuilder<Identity, DefaultClassifier> {
        PipelineBuilder {
            steps: Identity,
            classifier: DefaultClassifier,
        }
    }
}

impl<S, C> PipelineBuilder<S, C> {
    fn push<P>(self, step: P) -> PipelineBuilder<Stack<S, P>, C> {
        PipelineBuilder {
            steps: Stack {
                outer: self.steps,
                inner: step,
            },
            classifier: self.classifier,
        }
    }

    /// Adds a timeout (a `Duration` or a [`Timeout`]).
    pub fn timeout(self, timeout: impl Into<Timeout>) -> PipelineBuilder<Stack<S, Timeout>, C> {
        self.push(timeout.into())
    }

    /// Adds a timeout that follows the dependency's recent latencies (a
    /// handle: clones share the window).
    pub fn adaptive_timeout(
        self,
        timeout: AdaptiveTimeout,
    ) -> PipelineBuilder<Stack<S, AdaptiveTimeout>, C> {
        self.push(timeout)
    }

    /// Adds a retry policy.
    pub fn retry(self, retry: Retry) -> PipelineBuilder<Stack<S, Retry>, C> {
        self.push(retry)
    }

    /// Adds a circuit breaker (a handle: other users of the same breaker see
    /// this pipeline's calls).
    pub fn circuit_breaker(
        self,
        breaker: CircuitBreaker,
    ) -> PipelineBuilder<Stack<S, CircuitBreaker>, C> {
        self.push(breaker)
    }

    /// Adds a bulkhead (a handle: its seats are shared with its other users).
    pub fn bulkhead(self, bulkhead: Bulkhead) -> PipelineBuilder<Stack<S, Bulkhead>, C> {
        self.push(bulkhead)
    }

    /// Adds a rate limiter: calls over the rate fail with
    /// `Error::RateLimited { retry_after }` without running.
    pub fn rate_limit(self, limiter: RateLimiter) -> PipelineBuilder<Stack<S, RateLimiter>, C> {
        self.push(limiter)
    }

    /// Adds an adaptive concurrency limiter (a handle). The pipeline's
    /// classifier decides each sample: a success feeds its latency, a
    /// failure is a drop, an ignored result no sample.
    pub fn adaptive_limit(
        self,
        limiter: AdaptiveLimiter,
    ) -> PipelineBuilder<Stack<S, AdaptiveLimiter>, C> {
        self.push(limiter)
    }

    /// Adds hedging. Only calls made with
    /// [`Pipeline::call_idempotent`] are hedged; others run once.
    pub fn hedge(self, hedge: Hedge) -> PipelineBuilder<Stack<S, Hedge>, C> {
        self.push(hedge)
    }

    /// Adds a load shedder with the priority of this pipeline's calls
    /// ([`LoadShedder::with_priority`](crate::shed::LoadShedder::with_priority)):
    /// shed calls fail with `Error::Shed` without running.
    pub fn shed(self, shedder: Prioritized) -> PipelineBuilder<Stack<S, Prioritized>, C> {
        self.push(shedder)
    }

    /// Measures the calls (the golden signals, see [`crate::observe`]);
    /// added first, it measures what the caller sees, retries included.
    pub fn observe(self, observer: Observer) -> PipelineBuilder<Stack<S, Observer>, C> {
        self.push(observer)
    }

    /// Adds fault injection; add it last (innermost), so every attempt
    /// draws its own faults and the other steps react to them.
    pub fn chaos(self, chaos: Chaos) -> PipelineBuilder<Stack<S, Chaos>, C> {
        self.push(chaos)
    }

    /// Sets the classifier every step uses (default: `Ok` succeeds, `Err`
    /// fails and is retryable).
    pub fn classifier<C2>(self, classifier: C2) -> PipelineBuilder<S, C2> {
        PipelineBuilder {
            steps: self.steps,
            classifier,
        }
    }

    /// The pipeline.
    pub fn build(self) -> Pipeline<S, C> {
        Pipeline {
            steps: self.steps,
            classifier: self.classifier,
        }
    }
}

impl<S: Step, C> Pipeline<S, C> {
    /// Runs `op` through every step. `op` is called once per attempt.
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E>,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let cx = Ctx {
            classifier: &self.classifier,
            idempotent: false,
        };
        self.steps.run(cx, || LiftErr::new(op())).await
    }

    /// Like [`call`](Self::call), for an operation that is safe to run more
    /// than once, even at the same time (a read, a `PUT`, a write with an
    /// idempotency key): a hedging step may start extra attempts.
    pub async fn call_idempotent<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E>,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let cx = Ctx {
            classifier: &self.classifier,
            idempotent: true,
        };
        self.steps.run(cx, || LiftErr::new(op())).await
    }
}
