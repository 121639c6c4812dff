//! Adaptive concurrency limit: a bulkhead whose size follows the dependency.
//!
//! A fixed bulkhead needs someone to know the right size, and the right size
//! moves with the dependency's health. An [`AdaptiveLimiter`] admits calls
//! while fewer than its *limit* are in flight, and after each call feeds the
//! measured latency (and whether the call was dropped) to a
//! [`LimitAlgorithm`] that moves the limit, as in Netflix's
//! `concurrency-limits`:
//!
//! - [`Aimd`]: additive increase, multiplicative decrease, as TCP does. A
//!   success while at least half the limit is in use adds one; a drop (or a
//!   call slower than `timeout`) multiplies the limit by `backoff_ratio`.
//! - [`Gradient2`]: compares the latency of each call (short RTT) with an
//!   exponential average of latencies (long RTT). While they agree the limit
//!   grows by up to `queue_size`; when the short RTT rises, the limit shrinks
//!   by the ratio (at most halving per step), smoothed.
//!
//! ```
//! use keel::adaptive::{AdaptiveLimiter, Aimd};
//!
//! let limiter = AdaptiveLimiter::builder("payment")
//!     .algorithm(Aimd::default().initial_limit(2).min_limit(1))
//!     .build()?;
//! let a = limiter.try_acquire()?;
//! let b = limiter.try_acquire()?;
//! assert!(limiter.try_acquire().is_err()); // the limit is 2
//! b.dropped(); // the dependency pushed back: 2 x 0.9, rounded down
//! assert_eq!(limiter.limit(), 1);
//! a.success(); // a success with the limit in use adds one
//! assert_eq!(limiter.limit(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "tower")]
mod layer;
#[cfg(feature = "tower")]
pub use crate::admission::ResponseFuture;
#[cfg(feature = "tower")]
pub use layer::{AdaptiveLimitLayer, AdaptiveLimitService};

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bulkhead::BulkheadFull;
use crate::clock::{Clock, ClockSource, SharedClock};
use crate::events::{Policy, PolicyEvents, Reason};
use crate::sync::{lock, Mutex};
use crate::telemetry::{self, Refusals};
use crate::{ConfigError, Error};

/// One finished call, as a limit algorithm sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// How long the call took.
    pub rtt: Duration,
    /// Calls in flight when this one was admitted, itself included.
    pub in_flight: u32,
    /// The call was dropped: rejected by the dependency, timed out, or
    /// failed in a way that signals overload.
    pub dropped: bool,
}

/// Moves a concurrency limit from samples of finished calls.
pub trait LimitAlgorithm: Send + fmt::Debug + 'static {
    /// The limit before any sample.
    fn initial_limit(&self) -> u32;
    /// The new limit after `sample`.
    fn update(&mut self, sample: &Sample) -> u32;
}

/// Additive increase, multiplicative decrease (Netflix's `AIMDLimit`).
///
/// On a drop, or a call slower than `timeout`: `limit = floor(limit x
/// backoff_ratio)`. On a success with `in_flight x 2 >= limit` (the limit is
/// actually in use): `limit + 1`. Then clamped to `[min_limit, max_limit]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Aimd {
    /// The limit before any sample (default 20).
    #[serde(rename = "initial_limit")]
    pub initial: u32,
    /// The least the limit may fall to (default 20).
    #[serde(rename = "min_limit")]
    pub min: u32,
    /// The most the limit may grow to (default 200).
    #[serde(rename = "max_limit")]
    pub max: u32,
    /// What a drop multiplies the limit by, in (0, 1) (default 0.9).
    pub backoff_ratio: f64,
    /// A call slower than this counts as a drop (default 5 s).
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
    /// The limit now (`None`: the initial limit).
    #[serde(skip)]
    limit: Option<u32>,
}

impl Default for Aimd {
    fn default() -> Self {
        Aimd {
            initial: 20,
            min: 20,
            max: 200,
            backoff_ratio: 0.9,
            timeout: Duration::from_secs(5),
            limit: None,
        }
    }
}

impl Aimd {
    /// Sets the initial limit.
    pub fn initial_limit(mut self, n: u32) -> Self {
        self.initial = n;
        self
    }

    /// Sets the least limit.
    pub fn min_limit(mut self, n: u32) -> Self {
        self.min = n;
        self
    }

    /// Sets the most limit.
    pub fn max_limit(mut self, n: u32) -> Self {
        self.max = n;
        self
    }

    /// Sets what a drop multiplies the limit by.
    pub fn backoff_ratio(mut self, ratio: f64) -> Self {
        self.backoff_ratio = ratio;
        self
    }

    /// Sets the latency above which a call counts as a drop.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_limits(self.initial, self.min, self.max)?;
        if !(self.backoff_ratio > 0.0 && self.backoff_ratio < 1.0) {
            return Err(ConfigError::new(
                "backoff_ratio",
                format!("must be in (0, 1), got {}", self.backoff_ratio),
            ));
        }
        Ok(())
    }
}

impl LimitAlgorithm for Aimd {
    fn initial_limit(&self) -> u32 {
        self.initial
    }

    fn update(&mut self, s: &Sample) -> u32 {
        let mut limit = self.limit.unwrap_or(self.initial);
        if s.dropped || s.rtt > self.timeout {
            limit = (f64::from(limit) * self.backoff_ratio) as u32;
        } else if u64::from(s.in_flight) * 2 >= u64::from(limit) {
            limit += 1;
        }
        let limit = limit.clamp(self.min, self.max);
        self.limit = Some(limit);
        limit
    }
}

fn check_limits(initial: u32, min: u32, max: u32) -> Result<(), ConfigError> {
    if min == 0 {
        return Err(ConfigError::new("min_limit", "must be at least 1"));
    }
    if max < min {
        return Err(ConfigError::new(
            "max_limit",
            format!("must be at least min_limit ({min}), got {max}"),
        ));
    }
    if !(min..=max).contains(&initial) {
        return Err(ConfigError::new(
            "initial_limit",
            format!("must be between min_limit ({min}) and max_limit ({max}), got {initial}"),
        ));
    }
    Ok(())
}

/// Netflix's `Gradient2Limit`.
///
/// Per sample: `short = rtt`; `long` is an exponential moving average of
/// rtt over `long_window` samples (a plain mean over the first 10); when
/// `long / short > 2` (latency has recovered after a long overload) `long`
/// is cut by 10%. Unless the call was app-limited (`in_flight < limit / 2`):
///
/// ```text
///   gradient = clamp(long / short, 0.5, 1.0)
///   new      = limit x gradient + queue_size
///   limit    = clamp(limit x (1 - smoothing) + new x smoothing, min_limit, max_limit)
/// ```
///
/// The limit is kept as a real number; admission uses its integer part.
/// Drops do not enter the arithmetic (as in the original): latency does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gradient2 {
    /// The limit before any sample (default 20).
    #[serde(rename = "initial_limit")]
    pub initial: u32,
    /// The least the limit may fall to (default 20).
    #[serde(rename = "min_limit")]
    pub min: u32,
    /// The most the limit may grow to (default 200).
    #[serde(rename = "max_limit")]
    pub max: u32,
    /// How much of each new estimate is taken, in (0, 1] (default 0.2).
    pub smoothing: f64,
    /// How far the limit may grow past the estimate while latency holds
    /// (default 4).
    pub queue_size: u32,
    /// The samples the long RTT averages over (default 600).
    pub long_window: u32,
    #[serde(skip)]
    state: GradientState,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct GradientState {
    estimate: Option<f64>,
    long: f64,
    sum: f64,
    count: u32,
}

impl Default for Gradient2 {
    fn default() -> Self {
        Gradient2 {
            initial: 20,
            min: 20,
            max: 200,
            smoothing: 0.2,
            queue_size: 4,
            long_window: 600,
            state: GradientState::default(),
        }
    }
}

/// Samples averaged plainly before the long RTT becomes exponential.
const WARMUP: u32 = 10;

impl Gradient2 {
    /// Sets the initial limit.
    pub fn initial_limit(mut self, n: u32) -> Self {
        self.initial = n;
        self
    }

    /// Sets the least limit.
    pub fn min_limit(mut self, n: u32) -> Self {
        self.min = n;
        self
    }

    /// Sets the most limit.
    pub fn max_limit(mut self, n: u32) -> Self {
        self.max = n;
        self
    }

    /// Sets the smoothing factor.
    pub fn smoothing(mut self, smoothing: f64) -> Self {
        self.smoothing = smoothing;
        self
    }

    /// Sets the queue size.
    pub fn queue_size(mut self, n: u32) -> Self {
        self.queue_size = n;
        self
    }

    /// Sets the long window.
    pub fn long_window(mut self, n: u32) -> Self {
        self.long_window = n;
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_limits(self.initial, self.min, self.max)?;
        crate::error::check_fraction("smoothing", self.smoothing)?;
        if self.long_window == 0 {
            return Err(ConfigError::new("long_window", "must be at least 1"));
        }
        Ok(())
    }

    /// The long RTT, after adding `rtt`.
    fn add_long(&mut self, rtt: f64) -> f64 {
        let s = &mut self.state;
        if s.count < WARMUP {
            s.count += 1;
            s.sum += rtt;
            s.long = s.sum / f64::from(s.count);
        } else {
            let factor = 2.0 / (f64::from(self.long_window) + 1.0);
            s.long = s.long * (1.0 - factor) + rtt * factor;
        }
        s.long
    }
}

impl LimitAlgorithm for Gradient2 {
    fn initial_limit(&self) -> u32 {
        self.initial
    }

    fn update(&mut self, s: &Sample) -> u32 {
        let estimate = self.state.estimate.unwrap_or(f64::from(self.initial));
        let short = s.rtt.as_nanos() as f64;
        let long = self.add_long(short);
        if short > 0.0 && long / short > 2.0 {
            self.state.long *= 0.9;
        }
        if f64::from(s.in_flight) < estimate / 2.0 {
            self.state.estimate = Some(estimate);
            return estimate as u32;
        }
        let gradient = if short > 0.0 {
            (long / short).clamp(0.5, 1.0)
        } else {
            1.0
        };
        let new = estimate * gradient + f64::from(self.queue_size);
        let smoothed = estimate * (1.0 - self.smoothing) + new * self.smoothing;
        let limit = smoothed.clamp(f64::from(self.min), f64::from(self.max));
        self.state.estimate = Some(limit);
        limit as u32
    }
}

/// An adaptive limiter's configuration, as data: the algorithm and its
/// parameters.
///
/// ```
/// use keel::adaptive::AdaptiveConfig;
/// let config: AdaptiveConfig = toml::from_str(r#"
///     algorithm = "aimd"
///     initial_limit = 10
///     min_limit = 2
///     backoff_ratio = 0.8
/// "#)?;
/// let limiter = config.build("inventory")?;
/// assert_eq!(limiter.limit(), 10);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "lowercase")]
pub enum AdaptiveConfig {
    /// [`Aimd`].
    Aimd(Aimd),
    /// [`Gradient2`].
    Gradient2(Gradient2),
}

impl AdaptiveConfig {
    /// Builds the limiter, or says which field is wrong.
    pub fn build(&self, name: impl Into<Arc<str>>) -> Result<AdaptiveLimiter, ConfigError> {
        let builder = AdaptiveLimiter::builder(name);
        match self {
            AdaptiveConfig::Aimd(a) => builder.algorithm(a.clone()).build(),
            AdaptiveConfig::Gradient2(g) => builder.algorithm(g.clone()).build(),
        }
    }
}

/// Builds an [`AdaptiveLimiter`].
#[derive(Debug)]
pub struct Builder {
    name: Arc<str>,
    algorithm: Result<Box<dyn LimitAlgorithm>, ConfigError>,
    clock: Option<SharedClock>,
}

/// An algorithm keel can validate before use.
pub trait Validate {
    /// The field that is wrong, if one is.
    fn validate(&self) -> Result<(), ConfigError>;
}

impl Validate for Aimd {
    fn validate(&self) -> Result<(), ConfigError> {
        Aimd::validate(self)
    }
}

impl Validate for Gradient2 {
    fn validate(&self) -> Result<(), ConfigError> {
        Gradient2::validate(self)
    }
}

impl Builder {
    /// The algorithm (default [`Gradient2::default`]).
    pub fn algorithm<A: LimitAlgorithm + Validate>(mut self, algorithm: A) -> Self {
        self.algorithm = algorithm
            .validate()
            .map(|()| Box::new(algorithm) as Box<dyn LimitAlgorithm>);
        self
    }

    /// An algorithm of your own.
    pub fn custom_algorithm(mut self, algorithm: impl LimitAlgorithm) -> Self {
        self.algorithm = Ok(Box::new(algorithm));
        self
    }

    /// The clock that times calls (default monotonic).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The limiter, or the field that is wrong.
    pub fn build(self) -> Result<AdaptiveLimiter, ConfigError> {
        let algorithm = self.algorithm?;
        let limit = algorithm.initial_limit().max(1);
        Ok(AdaptiveLimiter {
            inner: Arc::new(Inner {
                refusals: Refusals::new(
                    Policy::AdaptiveLimit,
                    &self.name,
                    Reason::ConcurrencyLimit,
                ),
                limit_gauge: {
                    let gauge = telemetry::gauge(telemetry::CONCURRENCY_LIMIT, &self.name);
                    gauge.set(f64::from(limit));
                    gauge
                },
                name: self.name,
                limit: AtomicU32::new(limit),
                in_flight: AtomicU32::new(0),
                rejected: AtomicU64::new(0),
                algorithm: Mutex::new(algorithm),
                clock: ClockSource::new(self.clock),
            }),
        })
    }
}

/// An adaptive concurrency limiter: a cheap, cloneable handle; clones share
/// the limit.
#[derive(Clone)]
pub struct AdaptiveLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    refusals: Refusals,
    limit_gauge: metrics::Gauge,
    limit: AtomicU32,
    in_flight: AtomicU32,
    rejected: AtomicU64,
    algorithm: Mutex<Box<dyn LimitAlgorithm>>,
    clock: ClockSource,
}

impl fmt::Debug for AdaptiveLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveLimiter")
            .field("name", &self.inner.name)
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// A call in flight. Report how it ended with [`success`](Self::success) or
/// [`dropped`](Self::dropped); dropping the permit (or
/// [`ignore`](Self::ignore)) ends the call without a sample.
#[must_use = "the seat is given back as soon as the permit is dropped"]
pub struct Permit {
    inner: Arc<Inner>,
    start: u64,
    in_flight: u32,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Permit {
    /// The call succeeded: its latency is a sample.
    pub fn success(self) {
        self.finish(false);
    }

    /// The call was dropped (timed out, rejected or overloaded downstream).
    pub fn dropped(self) {
        self.finish(true);
    }

    /// The call says nothing about the dependency: no sample.
    pub fn ignore(self) {}

    fn finish(self, dropped: bool) {
        let inner = self.inner.clone();
        let sample = Sample {
            rtt: Duration::from_nanos(inner.clock.now_nanos().saturating_sub(self.start)),
            in_flight: self.in_flight,
            dropped,
        };
        drop(self); // the seat first, as Netflix's limiter does
        let mut algorithm = lock(&inner.algorithm);
        let new = algorithm.update(&sample).max(1);
        let old = inner.limit.swap(new, Ordering::AcqRel);
        drop(algorithm);
        if old != new {
            inner.limit_gauge.set(f64::from(new));
            tracing::debug!(target: "keel::adaptive", limiter = %inner.name, old, new, "limit changed");
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AdaptiveLimiter {
    /// A builder for a limiter called `name`, running [`Gradient2`] with
    /// Netflix's defaults.
    pub fn builder(name: impl Into<Arc<str>>) -> Builder {
        Builder {
            name: name.into(),
            algorithm: Ok(Box::new(Gradient2::default())),
            clock: None,
        }
    }

    /// The limiter's events: rejected calls.
    pub fn events(&self) -> &PolicyEvents {
        self.inner.refusals.events()
    }

    /// The limiter's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.inner.limit.load(Ordering::Acquire)
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> u32 {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// Calls rejected since the limiter was built.
    pub fn rejected(&self) -> u64 {
        self.inner.rejected.load(Ordering::Relaxed)
    }

    /// A seat if fewer than the limit are in flight; never waits.
    pub fn try_acquire(&self) -> Result<Permit, BulkheadFull> {
        let inner = &self.inner;
        let mut in_flight = inner.in_flight.load(Ordering::Acquire);
        loop {
            if in_flight >= inner.limit.load(Ordering::Acquire) {
                inner.rejected.fetch_add(1, Ordering::Relaxed);
                inner.refusals.refuse(None);
                return Err(BulkheadFull {
                    name: inner.name.clone(),
                });
            }
            match inner.in_flight.compare_exchange_weak(
                in_flight,
                in_flight + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Permit {
                        inner: inner.clone(),
                        start: inner.clock.now_nanos(),
                        in_flight: in_flight + 1,
                    })
                }
                Err(actual) => in_flight = actual,
            }
        }
    }

    /// Runs `op` in a seat; an `Ok` is a success sample, an `Err` a drop.
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire()?;
        let result = op().await;
        match &result {
            Ok(_) => permit.success(),
            Err(_) => permit.dropped(),
        }
        result.map_err(Error::Inner)
    }
}
