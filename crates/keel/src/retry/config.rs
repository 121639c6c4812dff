//! Retry's configuration as data (the names the sidecar's TOML uses).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Backoff, Jitter, Retry, RetryBudget};
use crate::ConfigError;

/// A retry policy's configuration, as data.
///
/// ```
/// use keel::retry::RetryConfig;
/// let config: RetryConfig = toml::from_str(r#"
///     max_attempts = 3
///     backoff = { base = "25ms", max = "1s", jitter = "full" }
///     budget = { ratio = 0.2, min_per_second = 10 }
/// "#)?;
/// let retry = config.build("payment")?;
/// assert_eq!(retry.max_attempts(), 3);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Which results are retried is the classifier's business (for HTTP, the
/// sidecar's `on` list); this is the schedule and the limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included (default 3, at least 1).
    pub max_attempts: u32,
    /// Exponential backoff with jitter.
    pub backoff: BackoffConfig,
    /// No retry starts past this long after the first attempt.
    #[serde(with = "crate::config::optional_duration")]
    pub time_budget: Option<Duration>,
    /// A retry budget for this policy's calls; none when absent.
    pub budget: Option<BudgetConfig>,
}

/// Exponential backoff: `base`, doubling, capped at `max`, then jittered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    /// The first delay (default 25ms).
    #[serde(with = "crate::config::duration")]
    pub base: Duration,
    /// The longest delay (default 1s).
    #[serde(with = "crate::config::duration")]
    pub max: Duration,
    /// `none`, `full` (default), `equal` or `decorrelated`.
    pub jitter: JitterKind,
}

/// The jitter of a [`BackoffConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JitterKind {
    /// The computed delay exactly.
    None,
    /// Uniform in `[0, d]`.
    #[default]
    Full,
    /// `d / 2` plus uniform in `[0, d / 2]`.
    Equal,
    /// Uniform in `[base, previous * 3]`, capped.
    Decorrelated,
}

/// A retry budget: retries allowed per call, plus a floor per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Retries allowed per original call (default 0.2).
    pub ratio: f64,
    /// Retries allowed per second whatever the traffic (default 10).
    pub min_per_second: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            backoff: BackoffConfig::default(),
            time_budget: None,
            budget: None,
        }
    }
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_millis(25),
            max: Duration::from_secs(1),
            jitter: JitterKind::Full,
        }
    }
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

impl RetryConfig {
    /// Builds the policy named `name`, or says which field is wrong.
    pub fn build(&self, name: impl Into<Arc<str>>) -> Result<Retry, ConfigError> {
        if self.backoff.base.is_zero() {
            return Err(ConfigError::new("backoff.base", "must be longer than zero"));
        }
        if self.backoff.max < self.backoff.base {
            return Err(ConfigError::new(
                "backoff.max",
                format!(
                    "must be at least backoff.base ({}), got {}",
                    crate::config::format_duration(self.backoff.base),
                    crate::config::format_duration(self.backoff.max)
                ),
            ));
        }
        let mut b = Retry::builder()
            .name(name)
            .max_attempts(self.max_attempts)
            .backoff(Backoff::exponential(self.backoff.base).max_delay(self.backoff.max))
            .jitter(match self.backoff.jitter {
                JitterKind::None => Jitter::None,
                JitterKind::Full => Jitter::Full,
                JitterKind::Equal => Jitter::Equal,
                JitterKind::Decorrelated => Jitter::Decorrelated,
            });
        if let Some(t) = self.time_budget {
            b = b.time_budget(t);
        }
        if let Some(budget) = self.budget {
            let budget = RetryBudget::builder()
                .ratio(budget.ratio)
                .min_per_second(budget.min_per_second)
                .build()
                .map_err(|e| e.within("budget"))?;
            b = b.budget(budget);
        }
        b.build()
    }
}
