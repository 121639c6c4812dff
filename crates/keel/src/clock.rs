//! Time, injected.
//!
//! No policy in keel reads the system clock directly: each takes a [`Clock`].
//!
//! - [`MonotonicClock`] is the default for synchronous primitives.
//! - [`ManualClock`] is a cloneable handle that only moves when told to, for
//!   tests of state machines.
//! - [`TokioClock`] follows tokio's clock, so `tokio::time::pause()` and
//!   `tokio::time::advance` drive it together with tokio's timers. Async
//!   policies (retry, timeout) sleep on tokio's timer and read this clock.
//!
//! ```
//! use keel::clock::{Clock, ManualClock};
//! use std::time::Duration;
//!
//! let clock = ManualClock::new();
//! let t0 = clock.now();
//! clock.advance(Duration::from_secs(5));
//! assert_eq!(clock.now() - t0, Duration::from_secs(5));
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A monotonic source of time.
///
/// `now` is the time elapsed since the clock's own origin; only differences
/// between two readings of the same clock mean anything.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Time since this clock's origin. Never decreases.
    fn now(&self) -> Duration;

    /// [`now`](Clock::now) in whole nanoseconds, saturating after ~584 years.
    fn now_nanos(&self) -> u64 {
        duration_nanos(self.now())
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Duration {
        (**self).now()
    }
    fn now_nanos(&self) -> u64 {
        (**self).now_nanos()
    }
}

/// Converts a duration to nanoseconds, saturating at `u64::MAX`.
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The machine's monotonic clock, read through [`quanta`]: the CPU's
/// invariant time-stamp counter where it has one (about 12 ns a read on the
/// machine in `docs/BENCHMARKS.md`, against 31 ns for `std::time::Instant`),
/// else the operating system's monotonic clock.
///
/// All `MonotonicClock`s share one origin (the first use in the process).
#[derive(Debug, Clone, Copy, Default)]
pub struct MonotonicClock;

impl MonotonicClock {
    /// The monotonic clock.
    pub const fn new() -> Self {
        MonotonicClock
    }
}

pub(crate) struct Source {
    clock: quanta::Clock,
    origin: u64,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MonotonicClock")
    }
}

fn source() -> &'static Source {
    static SOURCE: OnceLock<Source> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let clock = quanta::Clock::new();
        let origin = clock.raw();
        Source { clock, origin }
    })
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_nanos())
    }

    #[inline]
    fn now_nanos(&self) -> u64 {
        monotonic_nanos()
    }
}

#[inline]
fn monotonic_nanos() -> u64 {
    source().now_nanos()
}

impl Source {
    #[inline]
    fn now_nanos(&self) -> u64 {
        self.clock.delta_as_nanos(self.origin, self.clock.raw())
    }
}

/// A policy's clock: the default monotonic clock read directly (no virtual
/// call on the hot path), or one given to the builder.
#[derive(Debug, Clone)]
pub(crate) enum ClockSource {
    /// The process's monotonic source, resolved once at build time.
    Monotonic(&'static Source),
    Given(SharedClock),
}

impl ClockSource {
    pub(crate) fn new(given: Option<SharedClock>) -> Self {
        given.map_or_else(|| ClockSource::Monotonic(source()), ClockSource::Given)
    }

    #[inline]
    pub(crate) fn now_nanos(&self) -> u64 {
        match self {
            ClockSource::Monotonic(s) => s.now_nanos(),
            ClockSource::Given(c) => c.now_nanos(),
        }
    }
}

/// A clock that moves only when [`advance`](ManualClock::advance)d.
///
/// Clones share the same time, so a test keeps one handle and gives clones to
/// the policies under test.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = duration_nanos(by);
        let _ = self
            .nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(by))
            });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_nanos())
    }
    fn now_nanos(&self) -> u64 {
        self.nanos.load(Ordering::Acquire)
    }
}

/// tokio's clock (`tokio::time::Instant`), which stops under
/// `tokio::time::pause()` and moves with `tokio::time::advance`.
///
/// Outside a runtime with paused time it reads the system's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is tokio's "now" at the time of the call.
    pub fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.origin)
    }
}

/// A shared clock, as policies store it.
pub(crate) type SharedClock = Arc<dyn Clock>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_clones_share_time() {
        let a = ManualClock::new();
        let b = a.clone();
        a.advance(Duration::from_millis(1500));
        assert_eq!(b.now(), Duration::from_millis(1500));
        assert_eq!(b.now_nanos(), 1_500_000_000);
    }

    #[test]
    fn monotonic_clock_never_goes_back() {
        let c = MonotonicClock::new();
        let t0 = c.now();
        let t1 = c.now();
        assert!(t1 >= t0);
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let c = TokioClock::new();
        assert_eq!(c.now(), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(c.now(), Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(c.now(), Duration::from_millis(3250));
    }
}
