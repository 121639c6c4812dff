//! A lock-free ring of time buckets with running totals.
//!
//! Used by the circuit breaker's time window (one-second buckets of calls,
//! failures and slow calls) and by the retry budget (deposits and
//! withdrawals). Recording costs the same however many events the window
//! holds: one bucket is updated and the totals are kept up to date as events
//! arrive and as buckets expire, so nothing is summed on the hot path.
//!
//! Each bucket carries the index of the period it holds (`tag`, period + 1 so
//! that 0 means empty). A bucket whose period has passed is claimed by one
//! thread with a compare-and-swap that sets a lock bit, emptied (its counts
//! leave the totals) and released with its new period. Claims happen at most
//! once per bucket per period, so the lock bit is almost never seen.

use crate::sync::{spin, AtomicU64, Ordering};

const LOCKED: u64 = 1 << 63;

#[derive(Debug)]
struct Bucket<const N: usize> {
    tag: AtomicU64,
    counts: [AtomicU64; N],
}

/// `N` counters summed over the last `len` periods of `width` nanoseconds.
#[derive(Debug)]
pub(crate) struct TimeBuckets<const N: usize> {
    width: u64,
    buckets: Box<[Bucket<N>]>,
    totals: [AtomicU64; N],
    /// The newest period the window has advanced to, plus one (0: none yet).
    latest: AtomicU64,
}

impl<const N: usize> TimeBuckets<N> {
    /// `len` buckets of `width_nanos` each; both must be at least 1.
    pub(crate) fn new(len: usize, width_nanos: u64) -> Self {
        assert!(len >= 1 && width_nanos >= 1);
        TimeBuckets {
            width: width_nanos,
            buckets: (0..len)
                .map(|_| Bucket {
                    tag: AtomicU64::new(0),
                    counts: std::array::from_fn(|_| AtomicU64::new(0)),
                })
                .collect(),
            totals: std::array::from_fn(|_| AtomicU64::new(0)),
            latest: AtomicU64::new(0),
        }
    }

    fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    /// Adds `delta` (two's complement, so subtraction works) to the bucket of
    /// `now_nanos` and returns the totals over the window afterwards.
    ///
    /// Under concurrency the returned totals may miss other threads' updates
    /// that are in flight; they never drift: every count that enters a bucket
    /// enters the totals and leaves both together.
    pub(crate) fn add(&self, now_nanos: u64, delta: [u64; N]) -> [u64; N] {
        let period = now_nanos / self.width;
        self.advance(period);
        let want = period + 1;
        let bucket = &self.buckets[(period % self.len()) as usize];
        loop {
            let tag = bucket.tag.load(Ordering::Acquire);
            if tag == want {
                break;
            }
            if tag & LOCKED != 0 {
                spin();
            } else if tag > want {
                // The bucket already holds a newer period: this event is older
                // than the window (its thread was descheduled for a full
                // window). Dropped.
                return self.totals();
            } else {
                self.claim(bucket, tag, want);
            }
        }
        let mut out = [0; N];
        for i in 0..N {
            if delta[i] != 0 {
                bucket.counts[i].fetch_add(delta[i], Ordering::Relaxed);
                out[i] = self.totals[i]
                    .fetch_add(delta[i], Ordering::Relaxed)
                    .wrapping_add(delta[i]);
            } else {
                out[i] = self.totals[i].load(Ordering::Relaxed);
            }
        }
        out.map(clamp)
    }

    /// The totals over the window that ends at `now_nanos`.
    pub(crate) fn snapshot(&self, now_nanos: u64) -> [u64; N] {
        self.advance(now_nanos / self.width);
        self.totals()
    }

    fn totals(&self) -> [u64; N] {
        std::array::from_fn(|i| clamp(self.totals[i].load(Ordering::Relaxed)))
    }

    /// Empties the window. Callers serialize resets with a lock of their own;
    /// concurrent `add`s may land in the emptied window.
    pub(crate) fn reset(&self) {
        for b in self.buckets.iter() {
            b.tag.store(0, Ordering::Relaxed);
            for c in &b.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
        for t in &self.totals {
            t.store(0, Ordering::Relaxed);
        }
        self.latest.store(0, Ordering::Release);
    }

    /// Expires every bucket whose period left the window by `period`.
    fn advance(&self, period: u64) {
        let latest = self.latest.load(Ordering::Acquire);
        if period < latest {
            return;
        }
        if self
            .latest
            .compare_exchange(latest, period + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Another thread advances; buckets it has not reached yet are
            // claimed by whoever records into them.
            return;
        }
        let first = latest.max((period + 1).saturating_sub(self.len()));
        for p in first..=period {
            let bucket = &self.buckets[(p % self.len()) as usize];
            loop {
                let tag = bucket.tag.load(Ordering::Acquire);
                if tag & LOCKED != 0 {
                    spin();
                } else if tag > p {
                    break;
                } else {
                    self.claim(bucket, tag, p + 1);
                }
            }
        }
    }

    /// Moves `bucket` from period tag `seen` to `want`, removing its counts
    /// from the totals. Does nothing if another thread got there first.
    fn claim(&self, bucket: &Bucket<N>, seen: u64, want: u64) {
        if bucket
            .tag
            .compare_exchange(seen, want | LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        for i in 0..N {
            let old = bucket.counts[i].swap(0, Ordering::Relaxed);
            if old != 0 {
                self.totals[i].fetch_sub(old, Ordering::Relaxed);
            }
        }
        bucket.tag.store(want, Ordering::Release);
    }
}

/// A total can be briefly negative while a bucket is emptied between another
/// thread's bucket and total updates; it reads as zero.
fn clamp(v: u64) -> u64 {
    if (v as i64) < 0 {
        0
    } else {
        v
    }
}

#[cfg(all(test, not(keel_loom)))]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn totals_cover_only_the_last_periods() {
        let w = TimeBuckets::<2>::new(3, SEC);
        assert_eq!(w.add(0, [1, 0]), [1, 0]);
        assert_eq!(w.add(SEC / 2, [1, 1]), [2, 1]);
        assert_eq!(w.add(SEC, [1, 0]), [3, 1]);
        assert_eq!(w.add(2 * SEC, [1, 0]), [4, 1]);
        // Period 0 leaves the window when period 3 starts.
        assert_eq!(w.snapshot(3 * SEC), [2, 0]);
        assert_eq!(w.add(3 * SEC + 1, [0, 1]), [2, 1]);
        // A long silence empties it.
        assert_eq!(w.snapshot(100 * SEC), [0, 0]);
        assert_eq!(w.add(100 * SEC, [1, 0]), [1, 0]);
    }

    #[test]
    fn subtraction_by_wrapping_delta() {
        let w = TimeBuckets::<1>::new(2, SEC);
        w.add(0, [5]);
        assert_eq!(w.add(0, [2u64.wrapping_neg()]), [3]);
    }

    #[test]
    fn events_older_than_the_window_are_dropped() {
        let w = TimeBuckets::<1>::new(2, SEC);
        w.add(5 * SEC, [1]);
        // Period 3 maps to the same bucket as period 5, which is newer.
        assert_eq!(w.add(3 * SEC, [1]), [1]);
    }

    #[test]
    fn concurrent_adds_never_drift() {
        use std::sync::Arc;
        let w = Arc::new(TimeBuckets::<1>::new(4, 1000));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        // All threads share one slowly advancing clock range.
                        w.add(i / 10 + t, [1]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Whatever was expired, the totals equal what the buckets hold.
        let sum: u64 = w
            .buckets
            .iter()
            .map(|b| b.counts[0].load(Ordering::Relaxed))
            .sum();
        assert_eq!(w.totals()[0], sum);
    }
}
