//! A retry budget shared by many calls: retries may add at most a fraction of
//! the traffic, so a struggling dependency is not hit by a retry storm.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{duration_nanos, Clock, ClockSource, SharedClock};
use crate::window::TimeBuckets;
use crate::ConfigError;

const BUCKETS: usize = 10;

/// Finagle's and Linkerd's retry budget: every original call deposits, every
/// retry withdraws. Over a sliding window (`ttl`, default 10 s) retries may
/// number at most `ratio` times the calls, plus `min_per_second * ttl` so that
/// low traffic can still retry.
///
/// Cheap to clone; clones share one budget. Lock-free: a ring of ten time
/// buckets with running totals.
///
/// ```
/// use keel::retry::RetryBudget;
/// use keel::clock::ManualClock;
/// use std::time::Duration;
///
/// let budget = RetryBudget::builder()
///     .ratio(0.1)
///     .min_per_second(0)
///     .clock(ManualClock::new())
///     .build()?;
/// for _ in 0..20 {
///     budget.deposit();
/// }
/// assert!(budget.try_withdraw());
/// assert!(budget.try_withdraw());
/// assert!(!budget.try_withdraw()); // 10% of 20 calls
/// # Ok::<(), keel::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    ratio: f64,
    reserve: f64,
    clock: ClockSource,
    window: TimeBuckets<2>,
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.inner.ratio)
            .field("reserve", &self.inner.reserve)
            .field("balance", &self.balance())
            .finish()
    }
}

/// Builds a [`RetryBudget`].
#[derive(Debug, Clone)]
pub struct RetryBudgetBuilder {
    ratio: f64,
    min_per_second: u32,
    ttl: Duration,
    clock: Option<SharedClock>,
}

impl RetryBudgetBuilder {
    /// Retries allowed per original call (default 0.2, at most 1000).
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// Retries allowed per second whatever the traffic (default 10).
    pub fn min_per_second(mut self, n: u32) -> Self {
        self.min_per_second = n;
        self
    }

    /// How long a deposit counts (default 10 s, at least 1 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The clock the window follows (default [`MonotonicClock`](crate::clock::MonotonicClock)).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Validates and builds the budget.
    pub fn build(self) -> Result<RetryBudget, ConfigError> {
        if !(self.ratio >= 0.0 && self.ratio <= 1000.0) {
            return Err(ConfigError::new(
                "ratio",
                format!("must be between 0 and 1000, got {}", self.ratio),
            ));
        }
        if self.ttl < Duration::from_secs(1) || self.ttl > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "ttl",
                format!("must be between 1 s and 1 h, got {:?}", self.ttl),
            ));
        }
        let width = (duration_nanos(self.ttl) / BUCKETS as u64).max(1);
        Ok(RetryBudget {
            inner: Arc::new(Inner {
                ratio: self.ratio,
                reserve: f64::from(self.min_per_second) * self.ttl.as_secs_f64(),
                clock: ClockSource::new(self.clock),
                window: TimeBuckets::new(BUCKETS, width),
            }),
        })
    }
}

impl RetryBudget {
    /// A builder with Linkerd's defaults: ratio 0.2, 10 per second, ttl 10 s.
    pub fn builder() -> RetryBudgetBuilder {
        RetryBudgetBuilder {
            ratio: 0.2,
            min_per_second: 10,
            ttl: Duration::from_secs(10),
            clock: None,
        }
    }

    /// Records an original call.
    pub fn deposit(&self) {
        let now = self.inner.clock.now_nanos();
        self.inner.window.add(now, [1, 0]);
    }

    /// Takes one retry from the budget, or returns `false` if it is spent.
    pub fn try_withdraw(&self) -> bool {
        let now = self.inner.clock.now_nanos();
        let [deposits, withdrawals] = self.inner.window.add(now, [0, 1]);
        if withdrawals as f64 <= self.allowance(deposits) {
            true
        } else {
            // Give it back: the retry does not happen.
            self.inner.window.add(now, [0, 1u64.wrapping_neg()]);
            false
        }
    }

    fn allowance(&self, deposits: u64) -> f64 {
        deposits as f64 * self.inner.ratio + self.inner.reserve
    }

    /// Retries currently available (may be fractional).
    pub fn balance(&self) -> f64 {
        let now = self.inner.clock.now_nanos();
        let [deposits, withdrawals] = self.inner.window.snapshot(now);
        (self.allowance(deposits) - withdrawals as f64).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn reserve_allows_retries_without_traffic_and_expires_with_the_window() {
        let clock = ManualClock::new();
        let b = RetryBudget::builder()
            .ratio(0.5)
            .min_per_second(1)
            .ttl(Duration::from_secs(2))
            .clock(clock.clone())
            .build()
            .unwrap();
        // 1/s over 2 s: two retries with no traffic.
        assert!(b.try_withdraw());
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
        // Four calls earn two more.
        for _ in 0..4 {
            b.deposit();
        }
        assert!(b.try_withdraw());
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
        // Once the window has passed, only the reserve is left.
        clock.advance(Duration::from_secs(2));
        assert_eq!(b.balance(), 2.0);
    }

    #[test]
    fn invalid_budgets_name_the_field() {
        assert_eq!(
            RetryBudget::builder()
                .ratio(-1.0)
                .build()
                .unwrap_err()
                .field(),
            "ratio"
        );
        assert_eq!(
            RetryBudget::builder()
                .ttl(Duration::from_millis(10))
                .build()
                .unwrap_err()
                .field(),
            "ttl"
        );
    }
}
