//! A rolling window of the latest latencies and a quantile of them, for the
//! policies that adapt to latency (adaptive timeout, hedging).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::{lock, Mutex};
use crate::ConfigError;

/// The last `capacity` latencies (nanoseconds) and their `quantile`,
/// recomputed every `refresh` samples so that reading it is one atomic load.
#[derive(Debug)]
pub(crate) struct LatencyWindow {
    quantile: f64,
    min_samples: usize,
    refresh: usize,
    state: Mutex<Ring>,
    /// The quantile; `u64::MAX` until `min_samples` are in.
    current: AtomicU64,
}

#[derive(Debug)]
struct Ring {
    samples: Vec<u64>,
    next: usize,
    since_refresh: usize,
    scratch: Vec<u64>,
}

impl LatencyWindow {
    /// A window from configuration: `quantile` in 0..=1, `window` calls
    /// (at least 1), `min_samples` between 1 and `window`; or the field
    /// that is wrong.
    pub(crate) fn from_config(
        quantile: f64,
        window: u32,
        min_samples: u32,
    ) -> Result<Self, ConfigError> {
        crate::error::check_fraction("quantile", quantile)?;
        if window == 0 {
            return Err(ConfigError::new("window", "must be at least 1"));
        }
        if min_samples == 0 || min_samples > window {
            return Err(ConfigError::new(
                "min_samples",
                format!("must be between 1 and window ({window})"),
            ));
        }
        Ok(Self::new(window as usize, quantile, min_samples as usize))
    }

    pub(crate) fn new(capacity: usize, quantile: f64, min_samples: usize) -> Self {
        LatencyWindow {
            quantile,
            min_samples: min_samples.clamp(1, capacity),
            refresh: (capacity / 10).max(1).min(min_samples.max(1)),
            state: Mutex::new(Ring {
                samples: Vec::with_capacity(capacity),
                next: 0,
                since_refresh: 0,
                scratch: Vec::new(),
            }),
            current: AtomicU64::new(u64::MAX),
        }
    }

    /// Adds a latency.
    pub(crate) fn record(&self, nanos: u64) {
        let mut ring = lock(&self.state);
        let ring = &mut *ring;
        let capacity = ring.samples.capacity();
        if ring.samples.len() < capacity {
            ring.samples.push(nanos);
        } else {
            ring.samples[ring.next] = nanos;
        }
        ring.next = (ring.next + 1) % capacity;
        ring.since_refresh += 1;
        if ring.samples.len() >= self.min_samples && ring.since_refresh >= self.refresh {
            ring.since_refresh = 0;
            ring.scratch.clear();
            ring.scratch.extend_from_slice(&ring.samples);
            // The nearest-rank quantile: the smallest sample with at least
            // `quantile` of the samples at or below it.
            let rank = (self.quantile * ring.scratch.len() as f64).ceil() as usize;
            let index = rank.clamp(1, ring.scratch.len()) - 1;
            let (_, q, _) = ring.scratch.select_nth_unstable(index);
            self.current.store(*q, Ordering::Release);
        }
    }

    /// The quantile, once enough samples are in.
    pub(crate) fn get(&self) -> Option<u64> {
        let q = self.current.load(Ordering::Acquire);
        (q != u64::MAX).then_some(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_over_the_latest_samples() {
        let w = LatencyWindow::new(100, 0.99, 10);
        for i in 1..=9 {
            w.record(i);
        }
        assert_eq!(w.get(), None, "fewer than min_samples");
        w.record(10);
        assert_eq!(w.get(), Some(10)); // p99 of 1..=10
        for i in 11..=100 {
            w.record(i);
        }
        assert_eq!(w.get(), Some(99)); // p99 of 1..=100
                                       // The window rolls: a hundred 5s replace everything.
        for _ in 0..100 {
            w.record(5);
        }
        assert_eq!(w.get(), Some(5));
    }
}
