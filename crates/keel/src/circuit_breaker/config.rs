//! The breaker's configuration as data (the names the sidecar's TOML uses).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{CircuitBreaker, Window};
use crate::ConfigError;

/// A circuit breaker's configuration, as data.
///
/// ```
/// use keel::circuit_breaker::CircuitBreakerConfig;
/// let config: CircuitBreakerConfig = toml::from_str(r#"
///     failure_rate = 0.5
///     window = { kind = "time", duration = "10s" }
///     minimum_calls = 10
///     slow_call_duration = "2s"
///     open_duration = "30s"
///     half_open_max_calls = 1
/// "#)?;
/// let breaker = config.build("payment")?;
/// # drop(breaker);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Defaults are resilience4j's (rate 0.5 over the last 100 calls, at least
/// 100 calls, 60 s open, 10 probes), except that slow-call detection is off
/// unless `slow_call_duration` is given. `consecutive_failures` switches to
/// the other trip mode; the rate fields then do not apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Open when this fraction of the window's calls failed, in (0, 1].
    pub failure_rate: f64,
    /// The window the rates are computed over.
    pub window: WindowConfig,
    /// No rate is computed below this many calls in the window.
    pub minimum_calls: u32,
    /// A call slower than this is slow; off when absent.
    #[serde(with = "crate::config::optional_duration")]
    pub slow_call_duration: Option<Duration>,
    /// Open when this fraction of calls was slow, in (0, 1].
    pub slow_call_rate: f64,
    /// How long to stay open before probing.
    #[serde(with = "crate::config::duration")]
    pub open_duration: Duration,
    /// Probes admitted (and waited for) in half-open.
    pub half_open_max_calls: u32,
    /// Trip after this many consecutive failures instead of on rates.
    pub consecutive_failures: Option<u32>,
}

/// A breaker window, as data: `{ kind = "count", size = 20 }` or
/// `{ kind = "time", duration = "10s" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum WindowConfig {
    /// The last `size` calls.
    Count {
        /// Calls held.
        size: u32,
    },
    /// The calls of the last `duration` (whole seconds).
    Time {
        /// How far back.
        #[serde(with = "crate::config::duration")]
        duration: Duration,
    },
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_rate: 0.5,
            window: WindowConfig::Count { size: 100 },
            minimum_calls: 100,
            slow_call_duration: None,
            slow_call_rate: 1.0,
            open_duration: Duration::from_secs(60),
            half_open_max_calls: 10,
            consecutive_failures: None,
        }
    }
}

impl CircuitBreakerConfig {
    /// Builds a breaker called `name`, or says which field is wrong (by this
    /// struct's field names).
    pub fn build(&self, name: impl Into<Arc<str>>) -> Result<CircuitBreaker, ConfigError> {
        let window = match self.window {
            WindowConfig::Count { size } => Window::Count(size),
            WindowConfig::Time { duration } => Window::Time(duration),
        };
        let mut b = CircuitBreaker::builder(name)
            .failure_rate_threshold(self.failure_rate)
            .window(window)
            .minimum_calls(self.minimum_calls)
            .slow_call_rate_threshold(self.slow_call_rate)
            .wait_in_open(self.open_duration)
            .half_open_max_calls(self.half_open_max_calls);
        b = match self.slow_call_duration {
            Some(d) => b.slow_call_duration(d),
            None => b.disable_slow_call_detection(),
        };
        if let Some(n) = self.consecutive_failures {
            b = b.consecutive_failures(n);
        }
        b.build().map_err(|e| e.renamed(BUILDER_TO_CONFIG))
    }
}

/// The builder's field names and this struct's, where they differ.
const BUILDER_TO_CONFIG: &[(&str, &str)] = &[
    ("failure_rate_threshold", "failure_rate"),
    ("slow_call_rate_threshold", "slow_call_rate"),
    ("wait_in_open", "open_duration"),
];
