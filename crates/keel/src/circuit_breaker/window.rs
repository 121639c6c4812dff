//! The breaker's sliding windows: the last `n` calls, or the calls of the
//! last `d` in one-second buckets.

use std::time::Duration;

use crate::sync::{AtomicU64, AtomicU8, Ordering};
use crate::window::TimeBuckets;

/// Which calls the failure and slow-call rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last `n` recorded calls.
    Count(u32),
    /// The calls recorded in the last `d`, in one-second buckets of the
    /// breaker's clock (`d` is rounded up to whole seconds).
    Time(Duration),
}

/// Outcome bits stored per call.
pub(super) const FAILED: u8 = 1;
pub(super) const SLOW: u8 = 2;

/// What a window holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Counts {
    pub(super) calls: u64,
    pub(super) failed: u64,
    pub(super) slow: u64,
}

#[derive(Debug)]
pub(super) enum Calls {
    Count(CountWindow),
    Time(TimeBuckets<3>),
}

const NANOS_PER_SEC: u64 = 1_000_000_000;

impl Calls {
    pub(super) fn new(window: Window) -> Self {
        match window {
            Window::Count(n) => Calls::Count(CountWindow::new(n)),
            Window::Time(d) => Calls::Time(TimeBuckets::new(
                time_window_seconds(d) as usize,
                NANOS_PER_SEC,
            )),
        }
    }

    /// Records one call's outcome bits. `None` when the counts did not
    /// change in a way that can move the rates.
    #[inline]
    pub(super) fn record(&self, now_nanos: u64, bits: u8) -> Option<Counts> {
        match self {
            Calls::Count(w) => w.record(bits),
            Calls::Time(w) => {
                let [calls, failed, slow] = w.add(
                    now_nanos,
                    [1, u64::from(bits & FAILED), u64::from((bits & SLOW) >> 1)],
                );
                Some(Counts {
                    calls,
                    failed: failed.min(calls),
                    slow: slow.min(calls),
                })
            }
        }
    }

    pub(super) fn snapshot(&self, now_nanos: u64) -> Counts {
        match self {
            Calls::Count(w) => w.snapshot(),
            Calls::Time(w) => {
                let [calls, failed, slow] = w.snapshot(now_nanos);
                Counts {
                    calls,
                    failed: failed.min(calls),
                    slow: slow.min(calls),
                }
            }
        }
    }

    pub(super) fn reset(&self) {
        match self {
            Calls::Count(w) => w.reset(),
            Calls::Time(w) => w.reset(),
        }
    }

    pub(super) fn is_time(&self) -> bool {
        matches!(self, Calls::Time(_))
    }
}

/// Whole seconds a time window covers (at least one).
pub(super) fn time_window_seconds(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// A ring of the last `size` outcomes with packed running counts.
///
/// Recording claims the next slot with one compare-and-swap on `head`, swaps
/// the new outcome into it, and adjusts the packed failure/slow counts by the
/// difference between the new and the evicted outcome: one `fetch_add` whose
/// returned value gives the new counts without another load. In the steady
/// state of a healthy dependency (a success evicting a success) the counts do
/// not change and are not touched.
///
/// The swap keeps the counts equal to what the slots hold whatever the
/// interleaving; a reader may briefly see one thread's eviction before its
/// addition (a count of -1 in one field), which the signed decoding absorbs.
#[derive(Debug)]
pub(super) struct CountWindow {
    size: u32,
    /// Low 32 bits: the next slot; bit 32: the ring has wrapped at least once.
    head: AtomicU64,
    slots: Box<[AtomicU8]>,
    /// Failures in the low 32 bits, slow calls in the high 32, two's complement.
    outcomes: AtomicU64,
}

const FULL: u64 = 1 << 32;
const SLOT_MASK: u64 = FULL - 1;

fn packed(bits: u8) -> u64 {
    u64::from(bits & FAILED) | (u64::from((bits & SLOW) >> 1) << 32)
}

impl CountWindow {
    pub(super) fn new(size: u32) -> Self {
        assert!(size >= 1);
        CountWindow {
            size,
            head: AtomicU64::new(0),
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
            outcomes: AtomicU64::new(0),
        }
    }

    #[inline]
    fn record(&self, bits: u8) -> Option<Counts> {
        let mut head = self.head.load(Ordering::Relaxed);
        let (slot, full) = loop {
            let slot = (head & SLOT_MASK) as u32;
            let full = head & FULL != 0;
            let next = if slot + 1 == self.size {
                FULL
            } else {
                (head & FULL) | u64::from(slot + 1)
            };
            match self
                .head
                .compare_exchange_weak(head, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break (slot, full),
                Err(actual) => head = actual,
            }
        };
        let calls = if full { self.size } else { slot + 1 };
        let old = self.slots[slot as usize].swap(bits, Ordering::Relaxed);
        let delta = packed(bits).wrapping_sub(packed(old));
        let outcomes = if delta == 0 {
            if full {
                return None;
            }
            self.outcomes.load(Ordering::Relaxed)
        } else {
            self.outcomes
                .fetch_add(delta, Ordering::Relaxed)
                .wrapping_add(delta)
        };
        Some(decode(u64::from(calls), outcomes))
    }

    fn snapshot(&self) -> Counts {
        let head = self.head.load(Ordering::Relaxed);
        let calls = if head & FULL != 0 {
            self.size
        } else {
            (head & SLOT_MASK) as u32
        };
        decode(u64::from(calls), self.outcomes.load(Ordering::Relaxed))
    }

    fn reset(&self) {
        for s in self.slots.iter() {
            s.store(0, Ordering::Relaxed);
        }
        self.outcomes.store(0, Ordering::Relaxed);
        self.head.store(0, Ordering::Release);
    }
}

/// Unpacks two signed 32-bit fields (low field's borrow undone) and clamps
/// them to `0..=calls`.
fn decode(calls: u64, outcomes: u64) -> Counts {
    let failed = outcomes as u32 as i32;
    let slow = ((outcomes >> 32) as u32 as i32).wrapping_add(i32::from(failed < 0));
    let clamp = |v: i32| (v.max(0) as u64).min(calls);
    Counts {
        calls,
        failed: clamp(failed),
        slow: clamp(slow),
    }
}

#[cfg(all(test, not(keel_loom)))]
mod tests {
    use super::*;

    #[test]
    fn count_window_keeps_the_last_n() {
        let w = CountWindow::new(3);
        assert_eq!(
            w.record(FAILED),
            Some(Counts {
                calls: 1,
                failed: 1,
                slow: 0
            })
        );
        assert_eq!(w.record(0).unwrap().calls, 2);
        assert_eq!(
            w.record(SLOW),
            Some(Counts {
                calls: 3,
                failed: 1,
                slow: 1
            })
        );
        // Evicts the failure.
        assert_eq!(
            w.record(0),
            Some(Counts {
                calls: 3,
                failed: 0,
                slow: 1
            })
        );
        // A success evicting a success changes nothing.
        assert_eq!(w.record(0), None);
        assert_eq!(
            w.record(FAILED | SLOW),
            Some(Counts {
                calls: 3,
                failed: 1,
                slow: 1
            })
        );
        w.reset();
        assert_eq!(w.snapshot(), Counts::default());
    }

    #[test]
    fn decode_absorbs_transient_negatives() {
        // failed = -1, slow = 2
        let v = 2u64.wrapping_shl(32).wrapping_add(1u64.wrapping_neg());
        assert_eq!(
            decode(5, v),
            Counts {
                calls: 5,
                failed: 0,
                slow: 2
            }
        );
    }

    #[test]
    fn concurrent_records_keep_counts_equal_to_slots() {
        use std::sync::Arc;
        let w = Arc::new(CountWindow::new(7));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..50_000u32 {
                        w.record(((i as u8).wrapping_add(t)) % 4);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (mut f, mut s) = (0, 0);
        for slot in w.slots.iter() {
            let b = slot.load(Ordering::Relaxed);
            f += u64::from(b & FAILED);
            s += u64::from((b & SLOW) >> 1);
        }
        let c = w.snapshot();
        assert_eq!((c.calls, c.failed, c.slow), (7, f, s));
    }
}
