//! Rate limiting with GCRA, the generic cell rate algorithm: a token bucket
//! (`rate` tokens a second, up to `burst` at once) kept as one number, the
//! *theoretical arrival time* (TAT) of the next request.
//!
//! ```text
//!   interval = 1 / rate            capacity = burst x interval
//!   on a request for n at `now`:   tat' = max(tat, now) + n x interval
//!     tat' - now <= capacity  ──▶  admitted, tat = tat'
//!     otherwise               ──▶  RateLimited { retry_after = tat' - now - capacity }
//! ```
//!
//! A key whose TAT has passed is indistinguishable from a key never seen,
//! which is what lets the keyed limiter forget idle keys without changing a
//! decision.
//!
//! ```
//! use keel::rate_limit::RateLimiter;
//! use keel::clock::ManualClock;
//! use std::time::Duration;
//!
//! let clock = ManualClock::new();
//! let limiter = RateLimiter::builder("api")
//!     .per_second(10.0)
//!     .burst(2)
//!     .clock(clock.clone())
//!     .build()?;
//! assert!(limiter.check().is_ok());
//! assert!(limiter.check().is_ok()); // the burst
//! let limited = limiter.check().unwrap_err();
//! assert_eq!(limited.retry_after, Duration::from_millis(100));
//! clock.advance(Duration::from_millis(100));
//! assert!(limiter.check().is_ok());
//! # Ok::<(), keel::ConfigError>(())
//! ```

mod keyed;
#[cfg(feature = "tower")]
mod layer;
mod shared;
mod window;

pub use keyed::{InMemoryStore, KeyedRateLimiter, StateStore};
#[cfg(feature = "tower")]
pub use layer::{RateLimitLayer, RateLimitService, ResponseFuture};
pub use shared::{Gcra, GcraStore, Refused, SharedRateLimiter};
pub use window::Algorithm;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{duration_nanos, Clock, ClockSource, SharedClock};
use crate::events::{Policy, PolicyEvents, Reason};
use crate::store::FailMode;
use crate::telemetry::Refusals;
use crate::{ConfigError, Error};
use window::Windowed;

/// A rate limiter's configuration, as data. `requests_per_second` may be
/// fractional (0.5 is one request every two seconds).
///
/// ```
/// use keel::rate_limit::{Algorithm, RateLimitConfig};
/// let config: RateLimitConfig = toml::from_str(r#"
///     requests_per_second = 50
///     algorithm = "sliding-log"
///     window = "10s"                # 500 requests in any 10 seconds
/// "#)?;
/// assert_eq!(config.algorithm, Algorithm::SlidingLog);
/// let limiter = config.build("search")?;
/// # drop(limiter);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Requests admitted at once after a quiet period (default 1; GCRA only).
    #[serde(default = "one")]
    pub burst: u32,
    /// The algorithm: `gcra` (default), `sliding-log`, `sliding-window` or
    /// `fixed-window`.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// The window of the window algorithms (default 1s): they admit
    /// `requests_per_second x window` requests per window.
    #[serde(default = "one_second", with = "crate::config::duration")]
    pub window: Duration,
}

fn one() -> u32 {
    1
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}

impl RateLimitConfig {
    /// Builds a limiter, or says which field is wrong.
    pub fn build(&self, name: impl Into<Arc<str>>) -> Result<RateLimiter, ConfigError> {
        RateLimiter::builder(name)
            .per_second(self.requests_per_second)
            .burst(self.burst)
            .algorithm(self.algorithm)
            .window(self.window)
            .build()
    }
}

/// The call was over the rate. Converts into [`Error::RateLimited`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimited {
    /// When the same request would be admitted, if nothing else is.
    pub retry_after: Duration,
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limited: over the configured rate; retry after {:?}",
            self.retry_after
        )
    }
}

impl std::error::Error for RateLimited {}

impl<E> From<RateLimited> for Error<E> {
    fn from(r: RateLimited) -> Self {
        Error::RateLimited {
            retry_after: r.retry_after,
        }
    }
}

/// The rate: nanoseconds per request, and the burst as the nanoseconds of
/// requests that may be ahead of time (burst x interval). Changeable at
/// runtime; a check that races a change may see the old interval with the
/// new capacity once.
#[derive(Debug)]
pub(crate) struct Rate {
    interval: AtomicU64,
    capacity: AtomicU64,
}

impl Rate {
    pub(crate) fn new(interval: u64, burst: u32) -> Self {
        Rate {
            interval: AtomicU64::new(interval),
            capacity: AtomicU64::new(interval.saturating_mul(u64::from(burst))),
        }
    }

    /// The rate now, for a store that decides itself.
    fn gcra(&self) -> Gcra {
        Gcra {
            interval_nanos: self.interval.load(Ordering::Relaxed),
            capacity_nanos: self.capacity.load(Ordering::Relaxed),
        }
    }

    fn set(&self, interval: u64, burst: u32) {
        self.interval.store(interval, Ordering::Relaxed);
        self.capacity
            .store(interval.saturating_mul(u64::from(burst)), Ordering::Relaxed);
    }

    /// Requests admitted one after another at `now` given the stored TAT.
    fn available(&self, tat: u64, now: u64) -> u64 {
        let interval = self.interval.load(Ordering::Relaxed).max(1);
        let capacity = self.capacity.load(Ordering::Relaxed);
        let ahead = tat.saturating_sub(now).min(capacity);
        (capacity - ahead) / interval
    }

    /// The GCRA decision for `n` requests at `now` given the stored TAT (0:
    /// none): the new TAT, or how long until they would be admitted
    /// (`Duration::MAX` for more than the burst: never).
    #[inline]
    pub(crate) fn decide(&self, tat: u64, now: u64, n: u32) -> Result<u64, Duration> {
        let increment = u64::from(n).saturating_mul(self.interval.load(Ordering::Relaxed));
        let capacity = self.capacity.load(Ordering::Relaxed);
        if increment > capacity {
            return Err(Duration::MAX);
        }
        let new_tat = tat.max(now).saturating_add(increment);
        let ahead = new_tat - now;
        if ahead <= capacity {
            Ok(new_tat)
        } else {
            Err(Duration::from_nanos(ahead - capacity))
        }
    }
}

fn interval_of(per_second: f64) -> Result<u64, ConfigError> {
    if !(per_second.is_finite() && per_second > 0.0) {
        return Err(ConfigError::new(
            "requests_per_second",
            format!("must be a number above 0, got {per_second}"),
        ));
    }
    let nanos = 1e9 / per_second;
    if nanos < 1.0 {
        return Err(ConfigError::new(
            "requests_per_second",
            format!("at most 1e9 (one a nanosecond), got {per_second}"),
        ));
    }
    Ok(nanos.round() as u64)
}

/// Requests per window for the window algorithms.
fn limit_of(per_second: f64, window: Duration) -> Result<u64, ConfigError> {
    let limit = (per_second * window.as_secs_f64()).round();
    if limit < 1.0 {
        return Err(ConfigError::new(
            "window",
            format!(
                "{window:?} at {per_second} requests a second admits no request; it must hold at least one"
            ),
        ));
    }
    Ok(limit as u64)
}

fn check_burst(burst: u32) -> Result<(), ConfigError> {
    if burst == 0 {
        return Err(ConfigError::new("burst", "must be at least 1"));
    }
    Ok(())
}

/// Builds a [`RateLimiter`] or a [`KeyedRateLimiter`].
#[derive(Debug, Clone)]
pub struct Builder {
    name: Arc<str>,
    per_second: f64,
    burst: u32,
    algorithm: Algorithm,
    window: Duration,
    clock: Option<SharedClock>,
    store_timeout: Duration,
    fail: FailMode,
}

impl Builder {
    /// The algorithm (default [`Algorithm::Gcra`]).
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// The window of the window algorithms (default 1 s); they admit
    /// `per_second x window` requests per window. GCRA ignores it.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The sustained rate, in requests a second (default 100).
    pub fn per_second(mut self, rate: f64) -> Self {
        self.per_second = rate;
        self
    }

    /// Requests admitted at once after a quiet period (default 1).
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// The clock (default [`MonotonicClock`](crate::clock::MonotonicClock)).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// How long a shared limiter waits for its store (default 100 ms); a
    /// store that has not answered by then has failed.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// What a shared limiter does when its store fails (default
    /// [`FailMode::FailOpen`]: the request is admitted, and counted in
    /// `keel_store_unavailable_total`).
    pub fn on_store_error(mut self, fail: FailMode) -> Self {
        self.fail = fail;
        self
    }

    fn parts(self) -> Result<(Arc<str>, Rate, ClockSource), ConfigError> {
        let interval = interval_of(self.per_second)?;
        check_burst(self.burst)?;
        Ok((
            self.name,
            Rate::new(interval, self.burst),
            ClockSource::new(self.clock),
        ))
    }

    /// A limiter for all callers together.
    pub fn build(self) -> Result<RateLimiter, ConfigError> {
        let windowed = match self.algorithm {
            Algorithm::Gcra => None,
            algorithm => {
                if self.window.is_zero() {
                    return Err(ConfigError::new("window", "must be longer than zero"));
                }
                let limit = limit_of(self.per_second, self.window)?;
                Some(Box::new(Windowed::new(
                    algorithm,
                    duration_nanos(self.window),
                    limit,
                )))
            }
        };
        let window = self.window;
        let (name, rate, clock) = self.parts()?;
        Ok(RateLimiter {
            inner: Arc::new(Inner {
                refusals: Refusals::new(Policy::RateLimiter, &name, Reason::RateLimited),
                name,
                rate,
                clock,
                windowed,
                window,
                tat: Padded(AtomicU64::new(0)),
            }),
        })
    }

    /// A limiter per key (user, API key, address) in the in-memory store,
    /// which keeps at most `max_keys` keys (idle keys are forgotten first).
    pub fn build_keyed<K>(self, max_keys: usize) -> Result<KeyedRateLimiter<K>, ConfigError>
    where
        K: std::hash::Hash + Eq + Clone,
    {
        self.check_keyed()?;
        if max_keys == 0 {
            return Err(ConfigError::new("max_keys", "must be at least 1"));
        }
        let (name, rate, clock) = self.parts()?;
        Ok(KeyedRateLimiter::new(
            name,
            rate,
            clock,
            InMemoryStore::new(max_keys),
        ))
    }

    /// A limiter per key, its state in `store` (shared between instances
    /// when the store is).
    pub fn build_keyed_with<K, S>(self, store: S) -> Result<KeyedRateLimiter<K, S>, ConfigError>
    where
        S: StateStore<K>,
    {
        self.check_keyed()?;
        let (name, rate, clock) = self.parts()?;
        Ok(KeyedRateLimiter::new(name, rate, clock, store))
    }

    /// A limiter per key whose state is in `store`, shared by every
    /// instance whose limiter has the same name and store: GCRA only.
    pub fn build_shared(self, store: Arc<dyn GcraStore>) -> Result<SharedRateLimiter, ConfigError> {
        self.check_keyed()?;
        if self.store_timeout.is_zero() {
            return Err(ConfigError::new(
                "store_timeout",
                "must be longer than zero",
            ));
        }
        let (store_timeout, fail) = (self.store_timeout, self.fail);
        let (name, rate, _) = self.parts()?;
        Ok(SharedRateLimiter::new(
            name,
            rate,
            store,
            store_timeout,
            fail,
        ))
    }

    fn check_keyed(&self) -> Result<(), ConfigError> {
        if self.algorithm != Algorithm::Gcra {
            return Err(ConfigError::new(
                "algorithm",
                format!(
                    "keyed limiters run gcra (one value per key), not {}",
                    self.algorithm.name()
                ),
            ));
        }
        Ok(())
    }
}

/// A rate limiter for all its callers together. A cheap, cloneable handle.
///
/// GCRA (the default) is one `AtomicU64`, lock-free; the window algorithms
/// ([`Algorithm`]) keep their counts behind a mutex.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    rate: Rate,
    clock: ClockSource,
    /// The window algorithm, if not GCRA.
    windowed: Option<Box<Windowed>>,
    window: Duration,
    refusals: Refusals,
    /// On a cache line of its own: every admission writes it, and the rate
    /// and clock beside it are read by every check on every core.
    tat: Padded,
}

#[repr(align(128))]
struct Padded(AtomicU64);

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("name", &self.inner.name)
            .field("rate", &self.inner.rate)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A builder for a limiter called `name`: GCRA, 100 a second, burst 1.
    pub fn builder(name: impl Into<Arc<str>>) -> Builder {
        Builder {
            name: name.into(),
            per_second: 100.0,
            burst: 1,
            algorithm: Algorithm::Gcra,
            window: Duration::from_secs(1),
            clock: None,
            store_timeout: Duration::from_millis(100),
            fail: FailMode::FailOpen,
        }
    }

    /// The limiter's events: rejected requests.
    pub fn events(&self) -> &PolicyEvents {
        self.inner.refusals.events()
    }

    /// Admits one request, or says when it would be admitted.
    #[inline]
    pub fn check(&self) -> Result<(), RateLimited> {
        self.check_n(1)
    }

    /// Admits `n` requests at once, or none. `n` above the burst (for a
    /// window algorithm: above the limit per window) can never be admitted:
    /// `retry_after` is then `Duration::MAX`.
    #[inline]
    pub fn check_n(&self, n: u32) -> Result<(), RateLimited> {
        let inner = &*self.inner;
        let now = inner.clock.now_nanos();
        if let Some(windowed) = &inner.windowed {
            return windowed
                .check(now, n)
                .map_err(|retry_after| limited(&inner.refusals, retry_after));
        }
        let mut tat = inner.tat.0.load(Ordering::Acquire);
        loop {
            match inner.rate.decide(tat, now, n) {
                Ok(new_tat) => match inner.tat.0.compare_exchange_weak(
                    tat,
                    new_tat,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Ok(()),
                    Err(actual) => tat = actual,
                },
                Err(retry_after) => return Err(limited(&inner.refusals, retry_after)),
            }
        }
    }

    /// How many requests would be admitted if they came now, one after
    /// another: the burst left (GCRA), or the room left in the window.
    /// A snapshot for dashboards; it may be stale by the time it is read.
    pub fn available(&self) -> u64 {
        let inner = &*self.inner;
        let now = inner.clock.now_nanos();
        if let Some(windowed) = &inner.windowed {
            return windowed.available(now);
        }
        let tat = inner.tat.0.load(Ordering::Acquire);
        inner.rate.available(tat, now)
    }

    /// Waits until one request is admitted (on tokio's timer).
    pub async fn until_ready(&self) {
        while let Err(limited) = self.check() {
            tokio::time::sleep(limited.retry_after).await;
        }
    }

    /// Changes the rate and burst; takes effect for the next request. A
    /// window algorithm's new limit is `per_second x window`; what it has
    /// counted so far stays.
    pub fn set_rate(&self, per_second: f64, burst: u32) -> Result<(), ConfigError> {
        let interval = interval_of(per_second)?;
        check_burst(burst)?;
        if let Some(windowed) = &self.inner.windowed {
            windowed.set_limit(limit_of(per_second, self.inner.window)?);
        }
        self.inner.rate.set(interval, burst);
        Ok(())
    }

    /// Runs `op` if the rate allows it now.
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        self.check()?;
        op().await.map_err(Error::Inner)
    }
}

/// A rejection, counted and published.
#[cold]
fn limited(refusals: &Refusals, retry_after: Duration) -> RateLimited {
    refusals.refuse(Some(retry_after));
    RateLimited { retry_after }
}
