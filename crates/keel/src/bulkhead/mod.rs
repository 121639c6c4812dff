//! Bulkhead: a bounded number of calls in flight to one dependency, so that
//! when it slows down it holds at most that many of the caller's resources.
//!
//! ```text
//!   call ──▶ seat free? ──yes──▶ run, seat released when the permit drops
//!               │ no
//!               ▼
//!          queue has room? ──no──▶ Error::BulkheadFull
//!               │ yes
//!               ▼
//!          wait in FIFO order ──seat frees──▶ run
//!               │ queue_timeout passes (or the caller gives up)
//!               ▼
//!          Error::BulkheadFull (the place in the queue is freed)
//! ```
//!
//! ```
//! use keel::bulkhead::Bulkhead;
//!
//! let bulkhead = Bulkhead::builder("inventory").max_concurrent(2).build()?;
//! let a = bulkhead.try_acquire()?;
//! let b = bulkhead.try_acquire()?;
//! assert!(bulkhead.try_acquire().is_err()); // both seats taken, no queue
//! drop(a); // a finished (or cancelled) call frees its seat
//! assert!(bulkhead.try_acquire().is_ok());
//! # drop(b);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Seats are the permits of a FIFO-fair `tokio::sync::Semaphore`: a caller
//! that waits is served in arrival order, `try_acquire` never jumps the
//! queue, and a permit (or a waiting future) that is dropped gives its seat
//! (or its place) back, so a cancelled call never leaks one.
//!
//! For blocking work (a synchronous driver, file I/O, heavy computation)
//! [`ThreadPool`] is the classic thread-pool bulkhead: the work runs on the
//! dependency's own named threads behind a bounded queue.

#[cfg(feature = "tower")]
mod layer;
mod pool;
#[cfg(feature = "tower")]
pub use layer::{BulkheadLayer, BulkheadService, ResponseFuture};
pub use pool::{PoolMetrics, Run, ThreadPool, ThreadPoolBuilder, ThreadPoolConfig, MAX_THREADS};

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use crate::events::{EventKind, Policy, PolicyEvents, Reason};
use crate::telemetry;

use crate::{ConfigError, Error};

/// The most seats a bulkhead can have.
pub const MAX_CONCURRENT: u32 = u32::MAX >> 3; // within tokio's Semaphore::MAX_PERMITS

/// A bulkhead's configuration, as data (for example a section of a TOML
/// file). Unknown fields are rejected; [`build`](Self::build) names the field
/// that is wrong.
///
/// ```
/// use keel::bulkhead::BulkheadConfig;
/// let config: BulkheadConfig = toml::from_str(r#"
///     max_concurrent = 10
///     max_queue = 5
///     queue_timeout = "250ms"
/// "#)?;
/// let bulkhead = config.build("payment")?;
/// assert_eq!(bulkhead.metrics().available, 10);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BulkheadConfig {
    /// Calls allowed in flight at once.
    pub max_concurrent: u32,
    /// Calls allowed to wait for a seat; more are rejected at once.
    pub max_queue: u32,
    /// How long a call may wait for a seat.
    #[serde(with = "crate::config::duration")]
    pub queue_timeout: Duration,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        BulkheadConfig {
            max_concurrent: 25,
            max_queue: 0,
            queue_timeout: Duration::ZERO,
        }
    }
}

impl BulkheadConfig {
    /// Builds the bulkhead, or says which field is wrong.
    pub fn build(&self, name: impl Into<Arc<str>>) -> Result<Bulkhead, ConfigError> {
        Bulkhead::builder(name)
            .max_concurrent(self.max_concurrent)
            .max_queue(self.max_queue)
            .queue_timeout(self.queue_timeout)
            .build()
    }
}

/// Builds a [`Bulkhead`]; defaults are [`BulkheadConfig`]'s.
#[derive(Debug, Clone)]
pub struct Builder {
    name: Arc<str>,
    config: BulkheadConfig,
}

impl Builder {
    /// Calls allowed in flight at once (default 25).
    pub fn max_concurrent(mut self, n: u32) -> Self {
        self.config.max_concurrent = n;
        self
    }

    /// Calls allowed to wait for a seat (default 0: no waiting).
    pub fn max_queue(mut self, n: u32) -> Self {
        self.config.max_queue = n;
        self
    }

    /// How long a call may wait for a seat (default 0; must be longer than
    /// zero when `max_queue` is not 0).
    pub fn queue_timeout(mut self, d: Duration) -> Self {
        self.config.queue_timeout = d;
        self
    }

    /// The bulkhead, or the field that is wrong.
    pub fn build(self) -> Result<Bulkhead, ConfigError> {
        let c = self.config;
        if c.max_concurrent == 0 || c.max_concurrent > MAX_CONCURRENT {
            return Err(ConfigError::new(
                "max_concurrent",
                format!(
                    "must be between 1 and {MAX_CONCURRENT}, got {}",
                    c.max_concurrent
                ),
            ));
        }
        if c.max_queue > 0 && c.queue_timeout.is_zero() {
            return Err(ConfigError::new(
                "queue_timeout",
                format!(
                    "must be longer than zero when max_queue is {} (a queue nobody may wait in)",
                    c.max_queue
                ),
            ));
        }
        let policy = Policy::Bulkhead;
        let in_use = telemetry::gauge(telemetry::BULKHEAD_IN_USE, &self.name);
        let queued = telemetry::gauge(telemetry::BULKHEAD_QUEUED, &self.name);
        in_use.set(0.0);
        queued.set(0.0);
        Ok(Bulkhead {
            seats: Arc::new(Semaphore::new(c.max_concurrent as usize)),
            inner: Arc::new(Inner {
                events: PolicyEvents::new(policy, self.name.clone()),
                rejections: telemetry::rejections(policy, &self.name, Reason::BulkheadFull),
                in_use,
                queued,
                name: self.name,
                max_concurrent: c.max_concurrent,
                max_queue: c.max_queue,
                queue_timeout: c.queue_timeout,
                waiting: AtomicU32::new(0),
                rejected: AtomicU64::new(0),
            }),
        })
    }
}

/// A bulkhead: a cheap, cloneable handle; clones share the seats.
#[derive(Clone)]
pub struct Bulkhead {
    // The semaphore beside the rest, not inside it: admission is one load
    // from the handle instead of two dependent ones.
    seats: Arc<Semaphore>,
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    max_concurrent: u32,
    max_queue: u32,
    queue_timeout: Duration,
    waiting: AtomicU32,
    rejected: AtomicU64,
    events: PolicyEvents,
    rejections: metrics::Counter,
    in_use: Gauge,
    queued: Gauge,
}

impl fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead")
            .field("name", &self.inner.name)
            .field("metrics", &self.metrics())
            .finish()
    }
}

/// A snapshot of a bulkhead's use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// Seats taken by calls in flight.
    pub in_use: u32,
    /// Seats free.
    pub available: u32,
    /// Calls waiting for a seat.
    pub waiting: u32,
    /// Calls rejected since the bulkhead was built.
    pub rejected: u64,
}

/// The bulkhead had no seat for the call. Converts into
/// [`Error::BulkheadFull`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BulkheadFull {
    /// The bulkhead's name.
    pub name: Arc<str>,
}

impl fmt::Display for BulkheadFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bulkhead {} is full: every seat is taken and no place to wait was free in time",
            self.name
        )
    }
}

impl std::error::Error for BulkheadFull {}

impl<E> From<BulkheadFull> for Error<E> {
    fn from(_: BulkheadFull) -> Self {
        Error::BulkheadFull
    }
}

/// A seat, given back when dropped.
#[must_use = "the seat is given back as soon as the permit is dropped"]
#[derive(Debug)]
pub struct Permit<'a> {
    _seat: SemaphorePermit<'a>,
    in_use: &'a Gauge,
}

/// A seat that owns a handle to its bulkhead (for `'static` futures).
#[must_use = "the seat is given back as soon as the permit is dropped"]
#[derive(Debug)]
pub struct OwnedPermit {
    _seat: OwnedSemaphorePermit,
    /// A no-op unless a metrics recorder was installed.
    in_use: Gauge,
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        self.in_use.decrement(1.0);
    }
}

impl Drop for OwnedPermit {
    #[inline]
    fn drop(&mut self) {
        self.in_use.decrement(1.0);
    }
}

impl Bulkhead {
    /// A builder for a bulkhead called `name`.
    pub fn builder(name: impl Into<Arc<str>>) -> Builder {
        Builder {
            name: name.into(),
            config: BulkheadConfig::default(),
        }
    }

    /// The bulkhead's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A seat if one is free now; never waits and never jumps the queue.
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit<'_>, BulkheadFull> {
        match self.seats.try_acquire() {
            Ok(seat) => Ok(self.seated(seat)),
            Err(_) => Err(self.reject("no seat free")),
        }
    }

    /// Like [`try_acquire`](Self::try_acquire), with an owned permit.
    pub fn try_acquire_owned(&self) -> Result<OwnedPermit, BulkheadFull> {
        match self.seats.clone().try_acquire_owned() {
            Ok(seat) => Ok(self.seated_owned(seat)),
            Err(_) => Err(self.reject("no seat free")),
        }
    }

    /// A seat, waiting for one in FIFO order if the queue has room, for at
    /// most `queue_timeout`. Dropping the future gives its place back.
    pub async fn acquire(&self) -> Result<Permit<'_>, BulkheadFull> {
        if let Ok(seat) = self.seats.try_acquire() {
            return Ok(self.seated(seat));
        }
        let seat = self.wait(self.seats.acquire()).await?;
        Ok(self.seated(seat))
    }

    /// Like [`acquire`](Self::acquire), with an owned permit.
    pub fn acquire_owned(
        &self,
    ) -> impl Future<Output = Result<OwnedPermit, BulkheadFull>> + Send + Sync + 'static {
        let this = self.clone();
        async move {
            let seats = this.seats.clone();
            if let Ok(seat) = seats.clone().try_acquire_owned() {
                return Ok(this.seated_owned(seat));
            }
            let seat = this.wait(seats.acquire_owned()).await?;
            Ok(this.seated_owned(seat))
        }
    }

    #[inline]
    fn seated<'a>(&'a self, seat: SemaphorePermit<'a>) -> Permit<'a> {
        self.inner.in_use.increment(1.0);
        Permit {
            _seat: seat,
            in_use: &self.inner.in_use,
        }
    }

    #[inline]
    fn seated_owned(&self, seat: OwnedSemaphorePermit) -> OwnedPermit {
        self.inner.in_use.increment(1.0);
        OwnedPermit {
            _seat: seat,
            in_use: self.inner.in_use.clone(),
        }
    }

    /// The bulkhead's events: rejected calls.
    pub fn events(&self) -> &PolicyEvents {
        &self.inner.events
    }

    /// Waits for `seat` (the semaphore's acquire) in a place in the queue,
    /// for at most `queue_timeout`.
    async fn wait<P>(
        &self,
        seat: impl Future<Output = Result<P, tokio::sync::AcquireError>>,
    ) -> Result<P, BulkheadFull> {
        let _place = self.enqueue()?;
        match tokio::time::timeout(self.inner.queue_timeout, seat).await {
            Ok(Ok(seat)) => Ok(seat),
            // The semaphore is never closed: only the timeout ends a wait.
            _ => Err(self.reject("waited queue_timeout for a seat")),
        }
    }

    /// Runs `op` in a seat (waiting for one as configured).
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let _seat = self.acquire().await?;
        op().await.map_err(Error::Inner)
    }

    /// A snapshot of seats and queue.
    pub fn metrics(&self) -> Metrics {
        let available = self.seats.available_permits() as u32;
        Metrics {
            in_use: self.inner.max_concurrent - available.min(self.inner.max_concurrent),
            available,
            waiting: self.inner.waiting.load(Ordering::Acquire),
            rejected: self.inner.rejected.load(Ordering::Relaxed),
        }
    }

    /// Takes a place in the queue, if there is room.
    fn enqueue(&self) -> Result<Place<'_>, BulkheadFull> {
        let max = self.inner.max_queue;
        self.inner
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < max).then_some(w + 1)
            })
            .map(|_| {
                self.inner.queued.increment(1.0);
                Place(&self.inner)
            })
            .map_err(|_| self.reject("no seat free and the queue is full"))
    }

    // Out of line: the admitting path stays small enough to inline.
    #[cold]
    #[inline(never)]
    fn reject(&self, why: &'static str) -> BulkheadFull {
        self.inner.rejected.fetch_add(1, Ordering::Relaxed);
        self.inner.rejections.increment(1);
        tracing::trace!(target: "keel::bulkhead", bulkhead = %self.inner.name, why);
        self.inner.events.emit(EventKind::Rejected {
            reason: Reason::BulkheadFull,
            retry_after: None,
        });
        BulkheadFull {
            name: self.inner.name.clone(),
        }
    }
}

/// A place in the queue, given back when the wait ends (or is cancelled).
struct Place<'a>(&'a Inner);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.queued.decrement(1.0);
    }
}
