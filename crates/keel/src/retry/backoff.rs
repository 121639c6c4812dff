//! Delays between attempts: a [`Backoff`] schedule and a [`Jitter`] that
//! spreads it, drawing on an injectable [`Rng`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How the delay grows between attempts. Every kind is capped by
/// [`max_delay`](Backoff::max_delay) when one is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    kind: Kind,
    max_delay: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Constant(Duration),
    Linear { initial: Duration, step: Duration },
    Exponential { base: Duration, factor: f64 },
}

impl Backoff {
    /// The same delay before every retry.
    pub const fn constant(delay: Duration) -> Self {
        Backoff {
            kind: Kind::Constant(delay),
            max_delay: None,
        }
    }

    /// `initial`, then `initial + step`, `initial + 2 * step`, ...
    pub const fn linear(initial: Duration, step: Duration) -> Self {
        Backoff {
            kind: Kind::Linear { initial, step },
            max_delay: None,
        }
    }

    /// `base`, then `base * 2`, `base * 4`, ... (see [`factor`](Self::factor)).
    pub const fn exponential(base: Duration) -> Self {
        Backoff {
            kind: Kind::Exponential { base, factor: 2.0 },
            max_delay: None,
        }
    }

    /// The growth factor of an exponential backoff (default 2). No effect on
    /// other kinds.
    pub const fn factor(mut self, factor: f64) -> Self {
        if let Kind::Exponential { base, .. } = self.kind {
            self.kind = Kind::Exponential { base, factor };
        }
        self
    }

    /// No delay longer than `max`.
    pub const fn max_delay(mut self, max: Duration) -> Self {
        self.max_delay = Some(max);
        self
    }

    /// The first delay, the "base" decorrelated jitter starts from.
    pub fn base(&self) -> Duration {
        self.delay(1)
    }

    /// The cap, if any.
    pub fn cap(&self) -> Option<Duration> {
        self.max_delay
    }

    /// The delay before retry number `retry` (1 for the first retry), without
    /// jitter.
    ///
    /// ```
    /// use keel::retry::Backoff;
    /// use std::time::Duration;
    /// let b = Backoff::exponential(Duration::from_millis(100)).max_delay(Duration::from_millis(500));
    /// let delays: Vec<_> = (1..=5).map(|n| b.delay(n).as_millis()).collect();
    /// assert_eq!(delays, [100, 200, 400, 500, 500]);
    /// ```
    pub fn delay(&self, retry: u32) -> Duration {
        let n = retry.max(1) - 1;
        let raw = match self.kind {
            Kind::Constant(d) => d,
            Kind::Linear { initial, step } => initial.saturating_add(step.saturating_mul(n)),
            Kind::Exponential { base, factor } => {
                let secs = base.as_secs_f64() * factor.powi(n.min(i32::MAX as u32) as i32);
                if secs.is_finite() && secs < Duration::MAX.as_secs_f64() {
                    Duration::from_secs_f64(secs)
                } else {
                    Duration::MAX
                }
            }
        };
        match self.max_delay {
            Some(max) => raw.min(max),
            None => raw,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), crate::ConfigError> {
        if let Kind::Exponential { factor, .. } = self.kind {
            if !(factor >= 1.0 && factor.is_finite()) {
                return Err(crate::ConfigError::new(
                    "backoff.factor",
                    format!("must be a finite number of at least 1, got {factor}"),
                ));
            }
        }
        Ok(())
    }
}

/// How a computed delay is randomized so that clients do not retry in step.
///
/// The first four follow the AWS Architecture Blog's "Exponential Backoff And
/// Jitter"; `d` is the backoff's delay for this retry:
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Jitter {
    /// `d` exactly.
    #[default]
    None,
    /// Uniform in `[0, d]`.
    Full,
    /// `d / 2` plus uniform in `[0, d / 2]`.
    Equal,
    /// Uniform in `[base, previous * 3]`, capped by the backoff's
    /// `max_delay`; ignores the schedule after the first delay.
    Decorrelated,
    /// Uniform in `[d * (1 - f), d * (1 + f)]` for a fraction `f` in [0, 1]
    /// (e.g. 0.25 for plus or minus 25%), capped by `max_delay`.
    Proportional(f64),
}

impl Jitter {
    /// The jittered delay for retry `retry`, given the previous delay
    /// actually used (for decorrelated jitter).
    pub fn apply(
        &self,
        backoff: &Backoff,
        retry: u32,
        previous: Duration,
        rng: &dyn Rng,
    ) -> Duration {
        let d = backoff.delay(retry);
        let cap = backoff.cap().unwrap_or(Duration::MAX);
        match *self {
            Jitter::None => d,
            Jitter::Full => uniform(rng, Duration::ZERO, d),
            Jitter::Equal => {
                let half = d / 2;
                half.saturating_add(uniform(rng, Duration::ZERO, d - half))
            }
            Jitter::Decorrelated => {
                let base = backoff.base();
                let hi = previous.max(base).saturating_mul(3);
                uniform(rng, base, hi).min(cap)
            }
            Jitter::Proportional(f) => {
                let lo = d.mul_f64((1.0 - f).max(0.0));
                let hi = d.saturating_add(d.mul_f64(f));
                uniform(rng, lo, hi).min(cap)
            }
        }
    }

    pub(crate) fn validate(&self) -> Result<(), crate::ConfigError> {
        if let Jitter::Proportional(f) = *self {
            if !(0.0..=1.0).contains(&f) {
                return Err(crate::ConfigError::new(
                    "jitter",
                    format!("a proportional jitter is a fraction in [0, 1], got {f}"),
                ));
            }
        }
        Ok(())
    }
}

/// Uniform in `[lo, hi]`.
fn uniform(rng: &dyn Rng, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let unit = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    let span = (hi - lo).as_secs_f64() * unit;
    lo.saturating_add(Duration::from_secs_f64(span)).min(hi)
}

/// A source of random numbers for jitter, shared by concurrent callers.
pub trait Rng: Send + Sync + fmt::Debug {
    /// The next 64 random bits.
    fn next_u64(&self) -> u64;
}

/// SplitMix64 on an atomic counter: lock-free, and reproducible when seeded.
#[derive(Debug)]
pub struct SplitMix {
    state: AtomicU64,
}

impl SplitMix {
    /// A generator with a fixed seed, for reproducible tests.
    pub fn seeded(seed: u64) -> Self {
        SplitMix {
            state: AtomicU64::new(seed),
        }
    }

    /// A generator seeded from the process's hash randomness and the time.
    pub fn from_entropy() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        SplitMix::seeded(h.finish())
    }
}

impl Rng for SplitMix {
    fn next_u64(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn schedules_without_jitter_are_exact() {
        let c = Backoff::constant(MS * 50);
        assert_eq!(
            (1..=3).map(|n| c.delay(n)).collect::<Vec<_>>(),
            [MS * 50; 3]
        );
        let l = Backoff::linear(MS * 100, MS * 50).max_delay(MS * 220);
        assert_eq!(
            (1..=5).map(|n| l.delay(n)).collect::<Vec<_>>(),
            [MS * 100, MS * 150, MS * 200, MS * 220, MS * 220]
        );
        let e = Backoff::exponential(MS * 10).factor(3.0);
        assert_eq!(
            (1..=4).map(|n| e.delay(n)).collect::<Vec<_>>(),
            [MS * 10, MS * 30, MS * 90, MS * 270]
        );
        // No overflow far down the schedule.
        assert_eq!(Backoff::exponential(MS).delay(10_000), Duration::MAX);
        assert_eq!(
            Backoff::exponential(MS).max_delay(MS * 7).delay(10_000),
            MS * 7
        );
    }

    #[test]
    fn seeded_rng_is_reproducible() {
        let a = SplitMix::seeded(7);
        let b = SplitMix::seeded(7);
        for _ in 0..10 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn invalid_jitter_and_factor_are_rejected() {
        assert_eq!(
            Jitter::Proportional(1.5)
                .validate()
                .unwrap_err()
                .to_string(),
            "jitter: a proportional jitter is a fraction in [0, 1], got 1.5"
        );
        assert_eq!(
            Backoff::exponential(MS)
                .factor(0.5)
                .validate()
                .unwrap_err()
                .field(),
            "backoff.factor"
        );
    }
}
