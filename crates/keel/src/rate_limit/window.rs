//! The window algorithms: a limit of requests per window of time, kept
//! three ways. Each is a few integers (or, for the log, the admissions of the
//! last window) behind one mutex.
//!
//! | algorithm | admits | any span of length `t` holds at most | memory |
//! |---|---|---|---|
//! | sliding log | exactly `limit` in every trailing window | `limit x t / window + limit` | one entry per admission in the window |
//! | sliding window (counter) | `limit` in the current window and an estimate of the trailing one | `limit x t / window + 2 x limit` | three integers |
//! | fixed window | `limit` per aligned window | `limit x t / window + 2 x limit` | two integers |
//!
//! The sliding-window counter is Cloudflare's: the previous window's count,
//! weighted by how much of it still overlaps the trailing window, plus the
//! current window's count. It is exact when traffic is even and never admits
//! more than `limit` in one aligned window.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sync::{lock, Mutex};

/// Which algorithm a [`RateLimiter`](super::RateLimiter) runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Algorithm {
    /// GCRA (a token bucket of `burst` tokens refilled at the rate), one
    /// `AtomicU64`, lock-free. The default.
    #[default]
    Gcra,
    /// An exact count over the trailing window: remembers every admission
    /// in the window.
    SlidingLog,
    /// Cloudflare's sliding-window counter: the current window's count plus
    /// the previous window's, weighted by its overlap.
    SlidingWindow,
    /// A count per aligned window; allows up to twice the limit across a
    /// window boundary.
    FixedWindow,
}

impl Algorithm {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Algorithm::Gcra => "gcra",
            Algorithm::SlidingLog => "sliding-log",
            Algorithm::SlidingWindow => "sliding-window",
            Algorithm::FixedWindow => "fixed-window",
        }
    }
}

/// A window limiter's state.
#[derive(Debug)]
pub(crate) struct Windowed {
    window: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    limit: u64,
    counts: Counts,
}

#[derive(Debug)]
enum Counts {
    /// (admitted at, how many), oldest first; all within the last window.
    Log {
        held: u64,
        log: VecDeque<(u64, u32)>,
    },
    /// Counts of the current aligned window and the one before it.
    Counter {
        index: u64,
        previous: u64,
        current: u64,
    },
    Fixed {
        index: u64,
        current: u64,
    },
}

impl Windowed {
    /// `limit` requests per `window` nanoseconds (both at least 1).
    pub(crate) fn new(algorithm: Algorithm, window: u64, limit: u64) -> Self {
        let counts = match algorithm {
            Algorithm::SlidingLog => Counts::Log {
                held: 0,
                log: VecDeque::new(),
            },
            Algorithm::SlidingWindow => Counts::Counter {
                index: 0,
                previous: 0,
                current: 0,
            },
            // GCRA is not a window; the limiter never builds one for it.
            Algorithm::FixedWindow | Algorithm::Gcra => Counts::Fixed {
                index: 0,
                current: 0,
            },
        };
        Windowed {
            window,
            state: Mutex::new(State { limit, counts }),
        }
    }

    pub(crate) fn set_limit(&self, limit: u64) {
        lock(&self.state).limit = limit;
    }

    /// How many single requests would be admitted at `now`.
    pub(crate) fn available(&self, now: u64) -> u64 {
        let w = self.window;
        let state = lock(&self.state);
        let limit = state.limit;
        let used = match &state.counts {
            Counts::Log { log, .. } => log
                .iter()
                .filter(|(at, _)| at + w > now)
                .map(|(_, k)| u64::from(*k))
                .sum(),
            Counts::Fixed { index, current } => {
                if now / w == *index {
                    *current
                } else {
                    0
                }
            }
            Counts::Counter {
                index,
                previous,
                current,
            } => {
                let now_index = now / w;
                let (previous, current) = match now_index.checked_sub(*index) {
                    Some(0) => (*previous, *current),
                    Some(1) => (*current, 0),
                    _ => (0, 0),
                };
                let into = now - now_index * w;
                let weighted =
                    (u128::from(previous) * u128::from(w - into)).div_ceil(u128::from(w));
                u64::try_from(weighted)
                    .unwrap_or(u64::MAX)
                    .saturating_add(current)
            }
        };
        limit.saturating_sub(used)
    }

    /// Admits `n` at `now`, or says how long until they would be.
    pub(crate) fn check(&self, now: u64, n: u32) -> Result<(), Duration> {
        let w = self.window;
        let mut state = lock(&self.state);
        let limit = state.limit;
        let n64 = u64::from(n);
        if n64 > limit {
            return Err(Duration::MAX);
        }
        match &mut state.counts {
            Counts::Log { held, log } => {
                while let Some(&(at, k)) = log.front() {
                    if at + w > now {
                        break;
                    }
                    log.pop_front();
                    *held -= u64::from(k);
                }
                if *held + n64 <= limit {
                    *held += n64;
                    match log.back_mut() {
                        Some((at, k)) if *at == now && *k <= u32::MAX - n => *k += n,
                        _ => log.push_back((now, n)),
                    }
                    return Ok(());
                }
                // Wait for the oldest admissions to leave the window until
                // `n` fit.
                let mut must_leave = *held + n64 - limit;
                for &(at, k) in log.iter() {
                    must_leave = must_leave.saturating_sub(u64::from(k));
                    if must_leave == 0 {
                        return Err(Duration::from_nanos(at + w - now));
                    }
                }
                unreachable!("n <= limit, so the whole log leaving makes room")
            }
            Counts::Fixed { index, current } => {
                let now_index = now / w;
                if now_index != *index {
                    *index = now_index;
                    *current = 0;
                }
                if *current + n64 <= limit {
                    *current += n64;
                    Ok(())
                } else {
                    Err(Duration::from_nanos((now_index + 1) * w - now))
                }
            }
            Counts::Counter {
                index,
                previous,
                current,
            } => {
                let now_index = now / w;
                if now_index != *index {
                    *previous = if now_index == *index + 1 { *current } else { 0 };
                    *current = 0;
                    *index = now_index;
                }
                let into = now - now_index * w;
                // previous x (w - into) / w + current + n <= limit, in integers.
                let room = limit - n64; // n <= limit
                let fits = |previous: u64, current: u64, into: u64| {
                    current <= room
                        && u128::from(previous) * u128::from(w - into)
                            <= u128::from(room - current) * u128::from(w)
                };
                if fits(*previous, *current, into) {
                    *current += n64;
                    return Ok(());
                }
                // Later in this window, once enough of the previous one has
                // slid out; else in the next, where this one is the previous.
                let later = (*current <= room)
                    .then(|| earliest(*previous, room - *current, w))
                    .filter(|&e| e < w);
                Err(Duration::from_nanos(match later {
                    Some(e) => e - into,
                    None => w - into + earliest(*current, room, w),
                }))
            }
        }
    }
}

/// The least offset `e` into a window at which `weight x (w - e) / w <= room`.
fn earliest(weight: u64, room: u64, w: u64) -> u64 {
    if weight == 0 {
        return 0;
    }
    let allowed = u128::from(room) * u128::from(w) / u128::from(weight);
    w.saturating_sub(u64::try_from(allowed).unwrap_or(u64::MAX))
}
