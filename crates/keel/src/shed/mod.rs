//! Load shedding: when the service is overloaded, turn away the least
//! important work first, so the most important still gets through.
//!
//! Every call has a [`Priority`]. The shedder decides a *level* (how many
//! classes to shed, 0 to 3) from two signals and takes the higher:
//!
//! ```text
//!   in flight / capacity >= low_at     ──▶ level 1: shed Low
//!                        >= medium_at  ──▶ level 2: shed Low, Medium
//!                        >= high_at    ──▶ level 3: shed Low, Medium, High
//!
//!   queueing delay (CoDel): every interval whose *minimum* delay stayed
//!   above the target raises the level by one (up to 3); an interval whose
//!   minimum fell to the target or below (or that saw no queueing) clears it
//! ```
//!
//! `Critical` is never shed. The minimum over an interval (CoDel's insight)
//! ignores bursts that drain by themselves and reacts to a standing queue.
//! The queueing delay is what the caller measures (time from arrival to the
//! start of work) and reports with [`LoadShedder::observe_queue_delay`].
//!
//! ```
//! use keel::shed::{LoadShedder, Priority};
//!
//! let shedder = LoadShedder::builder("checkout").capacity(10).build()?;
//! let held: Vec<_> = (0..5)
//!     .map(|_| shedder.try_acquire(Priority::Critical).unwrap())
//!     .collect();
//! // Half full: Low is shed, the rest admitted.
//! assert!(shedder.try_acquire(Priority::Low).is_err());
//! assert!(shedder.try_acquire(Priority::Medium).is_ok());
//! # drop(held);
//! # Ok::<(), keel::ConfigError>(())
//! ```

#[cfg(feature = "tower")]
mod layer;
#[cfg(feature = "tower")]
pub use crate::admission::ResponseFuture;
#[cfg(feature = "tower")]
pub use layer::{LoadShedLayer, LoadShedService};

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{duration_nanos, Clock, ClockSource, SharedClock};
use crate::events::{Policy, PolicyEvents, Reason};
use crate::sync::{lock, Mutex};
use crate::telemetry::Refusals;
use crate::{ConfigError, Error};

/// How much a call matters, most important first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Never shed (the checkout itself, health checks).
    Critical,
    /// Shed last (level 3).
    High,
    /// Shed at level 2.
    Medium,
    /// Shed first (level 1): prefetches, recommendations, batch work.
    Low,
}

impl Priority {
    /// Every priority, most important first.
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Medium,
        Priority::Low,
    ];

    /// The lowest shedding level at which this priority is shed.
    fn shed_from(self) -> u8 {
        match self {
            Priority::Critical => u8::MAX,
            Priority::High => 3,
            Priority::Medium => 2,
            Priority::Low => 1,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The name used in configuration (`"high"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A load shedder's configuration, as data.
///
/// ```
/// use keel::shed::ShedConfig;
/// let config: ShedConfig = toml::from_str(r#"
///     capacity = 200
///     queue_delay_target = "5ms"
/// "#)?;
/// let shedder = config.build("edge")?;
/// # drop(shedder);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShedConfig {
    /// Calls in flight the service is sized for.
    pub capacity: u32,
    /// Fraction of capacity in flight at which `Low` is shed.
    pub low_at: f64,
    /// Fraction of capacity in flight at which `Medium` is shed too.
    pub medium_at: f64,
    /// Fraction of capacity in flight at which `High` is shed too.
    pub high_at: f64,
    /// CoDel's target: the queueing delay a healthy service stays under
    /// (absent: the queueing signal is off).
    #[serde(with = "crate::config::optional_duration")]
    pub queue_delay_target: Option<Duration>,
    /// CoDel's interval: how long the minimum delay must stay above the
    /// target before one more class is shed.
    #[serde(with = "crate::config::duration")]
    pub queue_delay_interval: Duration,
}

impl Default for ShedConfig {
    fn default() -> Self {
        ShedConfig {
            capacity: 100,
            low_at: 0.5,
            medium_at: 0.7,
            high_at: 0.9,
            queue_delay_target: None,
            queue_delay_interval: Duration::from_millis(100),
        }
    }
}

impl ShedConfig {
    /// Builds the shedder, or says which field is wrong.
    pub fn build(&self, name: impl Into<Arc<str>>) -> Result<LoadShedder, ConfigError> {
        LoadShedder::builder(name).config(self.clone()).build()
    }
}

/// Builds a [`LoadShedder`]; defaults are [`ShedConfig`]'s.
#[derive(Debug, Clone)]
pub struct Builder {
    name: Arc<str>,
    config: ShedConfig,
    clock: Option<SharedClock>,
}

impl Builder {
    fn config(mut self, config: ShedConfig) -> Self {
        self.config = config;
        self
    }

    /// Calls in flight the service is sized for (default 100).
    pub fn capacity(mut self, n: u32) -> Self {
        self.config.capacity = n;
        self
    }

    /// The fractions of capacity at which `Low`, `Medium` and `High` are
    /// shed (default 0.5, 0.7, 0.9).
    pub fn thresholds(mut self, low: f64, medium: f64, high: f64) -> Self {
        self.config.low_at = low;
        self.config.medium_at = medium;
        self.config.high_at = high;
        self
    }

    /// Turns on the queueing-delay signal: shed while the minimum delay over
    /// each `interval` stays above `target`.
    pub fn queue_delay(mut self, target: Duration, interval: Duration) -> Self {
        self.config.queue_delay_target = Some(target);
        self.config.queue_delay_interval = interval;
        self
    }

    /// The clock for the queueing signal's intervals (default monotonic).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The shedder, or the field that is wrong.
    pub fn build(self) -> Result<LoadShedder, ConfigError> {
        let c = &self.config;
        if c.capacity == 0 {
            return Err(ConfigError::new("capacity", "must be at least 1"));
        }
        let mut previous = ("", 0.0);
        for (field, v) in [
            ("low_at", c.low_at),
            ("medium_at", c.medium_at),
            ("high_at", c.high_at),
        ] {
            crate::error::check_fraction(field, v)?;
            if v < previous.1 {
                return Err(ConfigError::new(
                    field,
                    format!("must not be below {} ({}), got {v}", previous.0, previous.1),
                ));
            }
            previous = (field, v);
        }
        let at = |f: f64| ((f * f64::from(c.capacity)).ceil() as u32).max(1);
        let codel = match c.queue_delay_target {
            None => None,
            Some(target) => {
                if c.queue_delay_interval.is_zero() {
                    return Err(ConfigError::new(
                        "queue_delay_interval",
                        "must be longer than zero",
                    ));
                }
                Some(CoDel {
                    target: duration_nanos(target),
                    interval: duration_nanos(c.queue_delay_interval),
                    state: Mutex::new(CoDelState {
                        interval_end: None,
                        min_delay: None,
                    }),
                    interval_end: AtomicU64::new(u64::MAX),
                })
            }
        };
        Ok(LoadShedder {
            inner: Arc::new(Inner {
                refusals: Refusals::new(Policy::Shed, &self.name, Reason::Shed(Priority::Low)),
                name: self.name,
                capacity: c.capacity,
                thresholds: [at(c.low_at), at(c.medium_at), at(c.high_at)],
                in_flight: AtomicU32::new(0),
                codel,
                codel_level: AtomicU8::new(0),
                clock: ClockSource::new(self.clock),
                shed: Default::default(),
            }),
        })
    }
}

/// A load shedder: a cheap, cloneable handle; clones share the counts.
#[derive(Clone)]
pub struct LoadShedder {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    refusals: Refusals,
    capacity: u32,
    /// In-flight counts at which levels 1, 2, 3 begin.
    thresholds: [u32; 3],
    in_flight: AtomicU32,
    codel: Option<CoDel>,
    codel_level: AtomicU8,
    clock: ClockSource,
    shed: [AtomicU64; 4],
}

struct CoDel {
    target: u64,
    interval: u64,
    state: Mutex<CoDelState>,
    /// When the current interval ends (`u64::MAX` before the first sample):
    /// admissions read it to know whether the level is stale.
    interval_end: AtomicU64,
}

struct CoDelState {
    interval_end: Option<u64>,
    /// The least delay seen in the current interval.
    min_delay: Option<u64>,
}

impl fmt::Debug for LoadShedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadShedder")
            .field("name", &self.inner.name)
            .field("metrics", &self.metrics())
            .finish()
    }
}

/// The call was shed. Converts into [`Error::Shed`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Shed {
    /// The shedder's name.
    pub name: Arc<str>,
    /// The priority that was shed.
    pub priority: Priority,
}

impl fmt::Display for Shed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is overloaded: {} priority work is shed until load falls",
            self.name, self.priority
        )
    }
}

impl std::error::Error for Shed {}

impl<E> From<Shed> for Error<E> {
    fn from(s: Shed) -> Self {
        Error::Shed {
            priority: s.priority,
        }
    }
}

/// A snapshot of a shedder's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// Calls in flight.
    pub in_flight: u32,
    /// Calls in flight the service is sized for.
    pub capacity: u32,
    /// The shedding level now (0: nothing shed, 3: all but `Critical`).
    pub level: u8,
    /// Calls shed since the shedder was built, by priority (in the order of
    /// [`Priority::ALL`]; `Critical`'s is always 0).
    pub shed: [u64; 4],
}

/// A call in flight; dropping it ends the call.
#[must_use = "the call counts as in flight only while the permit is held"]
pub struct Permit {
    inner: Arc<Inner>,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Permit")
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LoadShedder {
    /// A builder for a shedder called `name`.
    pub fn builder(name: impl Into<Arc<str>>) -> Builder {
        Builder {
            name: name.into(),
            config: ShedConfig::default(),
            clock: None,
        }
    }

    /// The shedder's events: shed calls.
    pub fn events(&self) -> &PolicyEvents {
        self.inner.refusals.events()
    }

    /// The shedder's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Admits a call of `priority`, or sheds it.
    pub fn try_acquire(&self, priority: Priority) -> Result<Permit, Shed> {
        let inner = &self.inner;
        let codel = self.codel_level();
        let mut in_flight = inner.in_flight.load(Ordering::Acquire);
        loop {
            let level = self.in_flight_level(in_flight).max(codel);
            if level >= priority.shed_from() {
                return Err(self.shed(priority, level));
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
                    })
                }
                Err(actual) => in_flight = actual,
            }
        }
    }

    #[cold]
    fn shed(&self, priority: Priority, level: u8) -> Shed {
        let inner = &self.inner;
        inner.shed[priority.index()].fetch_add(1, Ordering::Relaxed);
        tracing::trace!(target: "keel::shed", shedder = %inner.name, level);
        inner.refusals.refuse_because(Reason::Shed(priority), None);
        Shed {
            name: inner.name.clone(),
            priority,
        }
    }

    /// Reports how long a call waited before its work began (the queueing
    /// delay), for the CoDel signal. Does nothing when it is off.
    pub fn observe_queue_delay(&self, delay: Duration) {
        let Some(codel) = &self.inner.codel else {
            return;
        };
        let now = self.inner.clock.now_nanos();
        let mut state = lock(&codel.state);
        self.roll(codel, &mut state, now);
        let delay = duration_nanos(delay);
        state.min_delay = Some(state.min_delay.map_or(delay, |m| m.min(delay)));
    }

    /// Runs `op` as a call of `priority`, unless it is shed.
    pub async fn call<T, E, F, Fut>(&self, priority: Priority, op: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let _permit = self.try_acquire(priority)?;
        op().await.map_err(Error::Inner)
    }

    /// This shedder with a fixed priority: a [`Pipeline`](crate::Pipeline)
    /// step.
    pub fn with_priority(&self, priority: Priority) -> Prioritized {
        Prioritized {
            shedder: self.clone(),
            priority,
        }
    }

    /// A snapshot of load, level and sheds.
    pub fn metrics(&self) -> Metrics {
        let inner = &self.inner;
        let in_flight = inner.in_flight.load(Ordering::Acquire);
        Metrics {
            in_flight,
            capacity: inner.capacity,
            level: self.in_flight_level(in_flight).max(self.codel_level()),
            shed: std::array::from_fn(|i| inner.shed[i].load(Ordering::Relaxed)),
        }
    }

    fn in_flight_level(&self, in_flight: u32) -> u8 {
        self.inner
            .thresholds
            .iter()
            .filter(|&&t| in_flight >= t)
            .count() as u8
    }

    /// The queueing signal's level, brought up to date if an interval has
    /// ended since the last report.
    fn codel_level(&self) -> u8 {
        let Some(codel) = &self.inner.codel else {
            return 0;
        };
        let now = self.inner.clock.now_nanos();
        if now >= codel.interval_end.load(Ordering::Acquire) {
            let mut state = lock(&codel.state);
            self.roll(codel, &mut state, now);
        }
        self.inner.codel_level.load(Ordering::Acquire)
    }

    /// Closes every interval that has ended by `now`.
    fn roll(&self, codel: &CoDel, state: &mut CoDelState, now: u64) {
        let Some(end) = state.interval_end else {
            state.interval_end = Some(now + codel.interval);
            codel
                .interval_end
                .store(now + codel.interval, Ordering::Release);
            return;
        };
        if now < end {
            return;
        }
        let level = &self.inner.codel_level;
        let standing = state.min_delay.is_some_and(|m| m > codel.target);
        let next = if standing && now - end < codel.interval {
            level.load(Ordering::Acquire).saturating_add(1).min(3)
        } else {
            // Below the target, or an interval (or more) without any
            // queueing: the standing queue is gone.
            0
        };
        if next != level.swap(next, Ordering::AcqRel) {
            tracing::debug!(target: "keel::shed", shedder = %self.inner.name, level = next, "queueing level changed");
        }
        let new_end = now + codel.interval - (now - end) % codel.interval;
        state.interval_end = Some(new_end);
        state.min_delay = None;
        codel.interval_end.store(new_end, Ordering::Release);
    }
}

/// A [`LoadShedder`] with the priority of the calls it admits: the
/// [`Pipeline`](crate::Pipeline) step (see [`LoadShedder::with_priority`]).
#[derive(Debug, Clone)]
pub struct Prioritized {
    shedder: LoadShedder,
    priority: Priority,
}

impl Prioritized {
    /// The shedder.
    pub fn shedder(&self) -> &LoadShedder {
        &self.shedder
    }

    /// The priority of its calls.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    pub(crate) fn try_acquire(&self) -> Result<Permit, Shed> {
        self.shedder.try_acquire(self.priority)
    }
}
