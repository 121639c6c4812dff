//! Fault injection: rehearse a failing dependency before it fails for real.
//!
//! A [`Chaos`] policy holds faults, each with an injection rate: latency
//! (the call waits first), an error (the call does not run and fails with
//! [`Error::FaultInjected`], which every policy treats as a failure of the
//! dependency), and a behaviour of your own (burn CPU, drop a cache). It
//! sits innermost, per attempt, so retries, the breaker and fallbacks react
//! to it as to the real thing. A runtime switch turns it on and off; a seed
//! makes the draws repeat.
//!
//! ```
//! use keel::chaos::Chaos;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let chaos = Chaos::builder("payment")
//!     .latency(100.0, Duration::from_millis(300)) // every call: 300ms more
//!     .error(50.0)                                 // half of them fail
//!     .seed(7)
//!     .build()?;
//! let start = tokio::time::Instant::now();
//! let _ = chaos.call(|| async { Ok::<_, std::io::Error>("paid") }).await;
//! assert_eq!(start.elapsed(), Duration::from_millis(300));
//!
//! chaos.set_enabled(false); // the incident drill is over
//! assert_eq!(chaos.call(|| async { Ok::<_, std::io::Error>(1) }).await?, 1);
//! # Ok(())
//! # }
//! ```
//!
//! [`Chaos::decide`] is the synchronous primitive (the sidecar uses it to
//! answer an injected abort with a status); `call`, the `Pipeline` step and
//! [`ChaosLayer`] apply its decision.

#[cfg(feature = "tower")]
mod layer;
#[cfg(feature = "tower")]
pub use layer::{ChaosLayer, ChaosService};

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::LiftErr;
use crate::events::{EventKind, Policy, PolicyEvents};
use crate::retry::{Rng, SplitMix};
use crate::{ConfigError, Error};

type Behaviour = Arc<dyn Fn() + Send + Sync>;

/// What [`Chaos::decide`] drew for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Injection {
    /// Wait this long before the call.
    pub delay: Option<Duration>,
    /// Fail the call (after the delay) without running it.
    pub error: bool,
}

/// Which fault was injected (the `kind` of `keel_faults_injected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Added latency.
    Latency,
    /// An injected error.
    Error,
    /// The user's behaviour.
    Behaviour,
}

impl FaultKind {
    /// Lower-case name, as in metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Latency => "latency",
            FaultKind::Error => "error",
            FaultKind::Behaviour => "behaviour",
        }
    }
}

/// Builds a [`Chaos`] policy; no fault until one is added.
pub struct ChaosBuilder {
    name: Arc<str>,
    latency: Option<(f64, Duration)>,
    error: Option<f64>,
    behaviour: Option<(f64, Behaviour)>,
    seed: Option<u64>,
    enabled: bool,
}

impl fmt::Debug for ChaosBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosBuilder")
            .field("name", &self.name)
            .field("latency", &self.latency)
            .field("error", &self.error)
            .field("behaviour", &self.behaviour.as_ref().map(|(p, _)| p))
            .finish_non_exhaustive()
    }
}

impl ChaosBuilder {
    /// Delays `percent` of calls (0 to 100) by `delay`.
    pub fn latency(mut self, percent: f64, delay: Duration) -> Self {
        self.latency = Some((percent, delay));
        self
    }

    /// Fails `percent` of calls with [`Error::FaultInjected`].
    pub fn error(mut self, percent: f64) -> Self {
        self.error = Some(percent);
        self
    }

    /// Runs `behaviour` before `percent` of calls (burn CPU, evict a cache).
    pub fn behaviour(mut self, percent: f64, behaviour: impl Fn() + Send + Sync + 'static) -> Self {
        self.behaviour = Some((percent, Arc::new(behaviour)));
        self
    }

    /// Draws from a generator seeded with `seed`, so runs repeat.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Whether it starts switched on (default true).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// The policy, or the field that is wrong.
    pub fn build(self) -> Result<Chaos, ConfigError> {
        let check = |field: &str, p: f64| {
            if (0.0..=100.0).contains(&p) {
                Ok(())
            } else {
                Err(ConfigError::new(
                    field,
                    format!("must be between 0 and 100, got {p}"),
                ))
            }
        };
        if let Some((p, delay)) = self.latency {
            check("latency.percent", p)?;
            if delay.is_zero() {
                return Err(ConfigError::new(
                    "latency.duration",
                    "must be longer than zero",
                ));
            }
        }
        if let Some(p) = self.error {
            check("error.percent", p)?;
        }
        if let Some((p, _)) = &self.behaviour {
            check("behaviour.percent", *p)?;
        }
        let counter = |kind: FaultKind| {
            crate::telemetry::describe_metrics();
            metrics::counter!(
                crate::telemetry::FAULTS,
                "name" => self.name.to_string(),
                "kind" => kind.as_str()
            )
        };
        Ok(Chaos {
            inner: Arc::new(Inner {
                injected: [
                    counter(FaultKind::Latency),
                    counter(FaultKind::Error),
                    counter(FaultKind::Behaviour),
                ],
                events: PolicyEvents::new(Policy::Chaos, self.name.clone()),
                name: self.name,
                latency: self.latency,
                error: self.error,
                behaviour: self.behaviour,
                rng: match self.seed {
                    Some(seed) => SplitMix::seeded(seed),
                    None => SplitMix::from_entropy(),
                },
                enabled: AtomicBool::new(self.enabled),
            }),
        })
    }
}

/// A fault injection policy: a cheap, cloneable handle; clones share the
/// switch and the generator.
#[derive(Clone)]
pub struct Chaos {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    latency: Option<(f64, Duration)>,
    error: Option<f64>,
    behaviour: Option<(f64, Behaviour)>,
    rng: SplitMix,
    enabled: AtomicBool,
    /// `keel_faults_injected_total` for latency, error, behaviour.
    injected: [metrics::Counter; 3],
    events: PolicyEvents,
}

impl fmt::Debug for Chaos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chaos")
            .field("name", &self.inner.name)
            .field("enabled", &self.is_enabled())
            .field("latency", &self.inner.latency)
            .field("error", &self.inner.error)
            .finish_non_exhaustive()
    }
}

impl Chaos {
    /// A builder for a policy called `name`, switched on, with no fault yet.
    pub fn builder(name: impl Into<Arc<str>>) -> ChaosBuilder {
        ChaosBuilder {
            name: name.into(),
            latency: None,
            error: None,
            behaviour: None,
            seed: None,
            enabled: true,
        }
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The policy's events: faults injected.
    pub fn events(&self) -> &PolicyEvents {
        &self.inner.events
    }

    /// Switches injection on or off, at once for every clone.
    pub fn set_enabled(&self, enabled: bool) {
        self.inner.enabled.store(enabled, Ordering::Relaxed);
    }

    /// Whether injection is on.
    pub fn is_enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Relaxed)
    }

    /// Draws the faults for one call (and runs the behaviour, if drawn).
    /// Nothing when switched off.
    pub fn decide(&self) -> Injection {
        let inner = &*self.inner;
        let mut injection = Injection::default();
        if !self.is_enabled() {
            return injection;
        }
        if let Some((percent, behaviour)) = &inner.behaviour {
            if self.draw(*percent) {
                self.injected(FaultKind::Behaviour);
                behaviour();
            }
        }
        if let Some((percent, delay)) = inner.latency {
            if self.draw(percent) {
                self.injected(FaultKind::Latency);
                injection.delay = Some(delay);
            }
        }
        if let Some(percent) = inner.error {
            if self.draw(percent) {
                self.injected(FaultKind::Error);
                injection.error = true;
            }
        }
        injection
    }

    /// True for `percent` of draws.
    fn draw(&self, percent: f64) -> bool {
        if percent >= 100.0 {
            return true;
        }
        // 53 random bits as a fraction in [0, 1).
        let unit = (self.inner.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit * 100.0 < percent
    }

    #[cold]
    fn injected(&self, kind: FaultKind) {
        self.inner.injected[kind as usize].increment(1);
        self.inner.events.emit(EventKind::FaultInjected { kind });
    }

    /// Runs `op` with the faults drawn for it.
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run(|| LiftErr::new(op())).await
    }

    pub(crate) async fn run<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Error<E>>>,
    {
        let injection = self.decide();
        if let Some(delay) = injection.delay {
            tokio::time::sleep(delay).await;
        }
        if injection.error {
            return Err(Error::FaultInjected);
        }
        op().await
    }
}
