//! A timeout that follows the dependency's own latency: the classic
//! "p99 x 2", clamped, over a rolling window of recent calls.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Timed, Watch};
use crate::clock::{duration_nanos, Clock, SharedClock, TokioClock};
use crate::error::LiftErr;
use crate::events::PolicyEvents;
use crate::latency::LatencyWindow;
use crate::{ConfigError, Error};

/// An adaptive timeout's configuration, as data.
///
/// ```
/// use keel::timeout::AdaptiveTimeoutConfig;
/// use std::time::Duration;
/// let config: AdaptiveTimeoutConfig = toml::from_str(r#"
///     quantile = 0.99
///     multiplier = 2.0
///     min = "50ms"
///     max = "5s"
///     initial = "1s"
/// "#)?;
/// let timeout = config.build()?;
/// assert_eq!(timeout.current(), Duration::from_secs(1)); // no samples yet
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveTimeoutConfig {
    /// Which latency quantile to follow, in (0, 1] (default 0.99).
    pub quantile: f64,
    /// What the quantile is multiplied by (default 2).
    pub multiplier: f64,
    /// The shortest timeout (default 10ms).
    #[serde(with = "crate::config::duration")]
    pub min: Duration,
    /// The longest timeout (default 30s).
    #[serde(with = "crate::config::duration")]
    pub max: Duration,
    /// The timeout until `min_samples` calls have been measured (default 1s).
    #[serde(with = "crate::config::duration")]
    pub initial: Duration,
    /// How many recent calls the window holds (default 1000).
    pub window: u32,
    /// Calls measured before the quantile is trusted (default 100).
    pub min_samples: u32,
}

impl Default for AdaptiveTimeoutConfig {
    fn default() -> Self {
        AdaptiveTimeoutConfig {
            quantile: 0.99,
            multiplier: 2.0,
            min: Duration::from_millis(10),
            max: Duration::from_secs(30),
            initial: Duration::from_secs(1),
            window: 1000,
            min_samples: 100,
        }
    }
}

impl AdaptiveTimeoutConfig {
    /// Builds the timeout, or says which field is wrong.
    pub fn build(&self) -> Result<AdaptiveTimeout, ConfigError> {
        AdaptiveTimeout::builder().config(self.clone()).build()
    }
}

/// Builds an [`AdaptiveTimeout`]; defaults are [`AdaptiveTimeoutConfig`]'s.
#[derive(Debug, Clone)]
pub struct AdaptiveTimeoutBuilder {
    name: Arc<str>,
    config: AdaptiveTimeoutConfig,
    clock: Option<SharedClock>,
}

impl AdaptiveTimeoutBuilder {
    /// The name in events and metrics: the dependency timed (default
    /// `"default"`).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    fn config(mut self, config: AdaptiveTimeoutConfig) -> Self {
        self.config = config;
        self
    }

    /// The quantile to follow and what it is multiplied by (default p99 x 2).
    pub fn quantile(mut self, quantile: f64, multiplier: f64) -> Self {
        self.config.quantile = quantile;
        self.config.multiplier = multiplier;
        self
    }

    /// The bounds (default 10ms to 30s).
    pub fn bounds(mut self, min: Duration, max: Duration) -> Self {
        self.config.min = min;
        self.config.max = max;
        self
    }

    /// The timeout before enough calls are measured (default 1s).
    pub fn initial(mut self, initial: Duration) -> Self {
        self.config.initial = initial;
        self
    }

    /// The window of recent calls and how many must be in it before the
    /// quantile is used (default 1000 and 100).
    pub fn window(mut self, calls: u32, min_samples: u32) -> Self {
        self.config.window = calls;
        self.config.min_samples = min_samples;
        self
    }

    /// The clock that times calls (default [`TokioClock`], which follows
    /// `tokio::time::pause` like the timer does).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The timeout, or the field that is wrong.
    pub fn build(self) -> Result<AdaptiveTimeout, ConfigError> {
        let c = self.config;
        let latencies = LatencyWindow::from_config(c.quantile, c.window, c.min_samples)?;
        if !(c.multiplier.is_finite() && c.multiplier > 0.0) {
            return Err(ConfigError::new(
                "multiplier",
                format!("must be a number above 0, got {}", c.multiplier),
            ));
        }
        if c.min.is_zero() {
            return Err(ConfigError::new("min", "must be longer than zero"));
        }
        if c.max < c.min {
            return Err(ConfigError::new(
                "max",
                format!("must not be shorter than min ({:?})", c.min),
            ));
        }
        if !(c.min..=c.max).contains(&c.initial) {
            return Err(ConfigError::new(
                "initial",
                format!("must be between min ({:?}) and max ({:?})", c.min, c.max),
            ));
        }
        Ok(AdaptiveTimeout {
            inner: Arc::new(Inner {
                watch: Watch::new(self.name),
                latencies,
                clock: self.clock.unwrap_or_else(|| Arc::new(TokioClock::new())),
                config: c,
            }),
        })
    }
}

/// A timeout of `clamp(quantile of recent latencies x multiplier, min,
/// max)`, or `initial` until enough calls are measured. A cheap, cloneable
/// handle; clones share the window.
///
/// Every finished call's latency enters the window, errors included; a call
/// that times out enters as the timeout itself, so a dependency that slows
/// down for good lifts the timeout (up to `max`) instead of failing every
/// call.
///
/// ```
/// use keel::timeout::AdaptiveTimeout;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let timeout = AdaptiveTimeout::builder().window(100, 10).build()?;
/// for _ in 0..10 {
///     timeout
///         .call(|| async {
///             tokio::time::sleep(Duration::from_millis(40)).await;
///             Ok::<_, std::io::Error>(())
///         })
///         .await?;
/// }
/// assert_eq!(timeout.current(), Duration::from_millis(80)); // p99 x 2
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct AdaptiveTimeout {
    inner: Arc<Inner>,
}

struct Inner {
    watch: Watch,
    latencies: LatencyWindow,
    clock: SharedClock,
    config: AdaptiveTimeoutConfig,
}

impl fmt::Debug for AdaptiveTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveTimeout")
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl AdaptiveTimeout {
    /// A builder with the defaults of [`AdaptiveTimeoutConfig`].
    pub fn builder() -> AdaptiveTimeoutBuilder {
        AdaptiveTimeoutBuilder {
            name: "default".into(),
            config: AdaptiveTimeoutConfig::default(),
            clock: None,
        }
    }

    /// The timeout a call starting now gets.
    pub fn current(&self) -> Duration {
        let c = &self.inner.config;
        match self.inner.latencies.get() {
            None => c.initial,
            Some(q) => Duration::from_nanos(q)
                .mul_f64(c.multiplier)
                .clamp(c.min, c.max),
        }
    }

    /// The timeout's events: calls timed out.
    pub fn events(&self) -> &PolicyEvents {
        self.inner.watch.events()
    }

    #[cfg(feature = "tower")]
    pub(crate) fn watch(&self) -> &Watch {
        &self.inner.watch
    }

    #[cfg(feature = "tower")]
    pub(crate) fn now(&self) -> Duration {
        self.inner.clock.now()
    }

    /// Adds a latency to the window (for calls timed elsewhere).
    pub fn record(&self, latency: Duration) {
        self.inner.latencies.record(duration_nanos(latency));
    }

    /// Runs `op` under the current timeout and measures it.
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
        let after = self.current();
        let start = self.inner.clock.now();
        match Timed::new(op(), after).await {
            Ok(result) => {
                self.record(self.inner.clock.now().saturating_sub(start));
                result
            }
            Err(elapsed) => {
                self.record(after);
                Err(elapsed.into_error(Some(&self.inner.watch)))
            }
        }
    }
}
