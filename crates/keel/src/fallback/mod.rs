//! Fallback: when a call fails, answer from somewhere else rather than
//! failing the caller. The classic chain, tried in order until one answers:
//!
//! ```text
//!   primary ─fails─▶ stale cache ─miss─▶ alternate source ─fails─▶ default value
//!                    (last good,         (popular items,            (empty list)
//!                     marked stale)       another region)
//!                                                       or ─▶ graceful error
//! ```
//!
//! - Which errors trigger the chain is configurable ([`FallbackBuilder::on`]);
//!   by default every error does. An error that does not trigger it is
//!   returned as is.
//! - Every answer says where it came from ([`Served::source`]), so a caller
//!   can mark a page "prices may be out of date" or count degraded answers.
//! - A primary success refreshes the stale caches in the chain.
//! - If no level answers, the primary's error is returned (or the graceful
//!   error, if the chain ends with one).
//!
//! Fallback sits outermost, around a [`Pipeline`](crate::Pipeline) or a
//! single policy: its answer is a [`Served<T>`], not a `T`, so it is not a
//! pipeline step. The chain reacts to errors; an answer that is a failure
//! in disguise (an HTTP 503 response, say) must be turned into an error
//! inside the operation to trigger it.
//!
//! ```
//! use keel::fallback::{Fallback, Source, StaleCache};
//! use keel::Error;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let recommendations = Fallback::builder()
//!     .alternate(|_user: &u64| async { Ok(vec!["bestseller"]) })
//!     .value(Vec::new)
//!     // A bad request is the caller's fault: no answer from elsewhere.
//!     .on(|err: &Error<std::io::Error>| !matches!(err, Error::Inner(_)))
//!     .build();
//! let served = recommendations
//!     .call_keyed(&42, || async { Err(Error::Timeout { after: Duration::from_millis(80) }) })
//!     .await
//!     .unwrap();
//! assert_eq!(served.value, vec!["bestseller"]);
//! assert_eq!(served.source, Source::Alternate);
//! # }
//! ```

mod cache;
#[cfg(feature = "tower")]
mod layer;

pub use cache::{Stale, StaleCache, StaleCacheBuilder, StaleCacheConfig};
#[cfg(feature = "tower")]
pub use layer::{FallbackLayer, FallbackService};

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::events::{EventKind, Policy, PolicyEvents};
use crate::telemetry;
use crate::{ConfigError, Error};

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The call itself.
    Primary,
    /// A stale cache: the last good value, this old.
    Stale {
        /// Time since the value was fresh.
        age: Duration,
    },
    /// An alternate source.
    Alternate,
    /// The default value.
    Default,
}

impl Source {
    /// Lower-case name, as in metric labels and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Primary => "primary",
            Source::Stale { .. } => "stale",
            Source::Alternate => "alternate",
            Source::Default => "default",
        }
    }
}

/// An answer and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served<T> {
    /// The answer.
    pub value: T,
    /// Where it came from.
    pub source: Source,
}

impl<T> Served<T> {
    /// Whether the answer came from the call itself.
    pub fn is_primary(&self) -> bool {
        self.source == Source::Primary
    }
}

/// The kinds of [`Error`], to say in configuration which trigger fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// [`Error::Inner`]: the operation's own error.
    Inner,
    /// [`Error::CircuitOpen`].
    CircuitOpen,
    /// [`Error::Timeout`].
    Timeout,
    /// [`Error::BulkheadFull`].
    BulkheadFull,
    /// [`Error::RateLimited`].
    RateLimited,
    /// [`Error::Shed`].
    Shed,
    /// [`Error::RetriesExhausted`].
    RetriesExhausted,
    /// [`Error::FaultInjected`].
    FaultInjected,
    /// [`Error::KeyMismatch`].
    KeyMismatch,
    /// [`Error::StoreUnavailable`].
    StoreUnavailable,
    /// [`Error::InProgress`].
    InProgress,
    /// [`Error::OutcomeUnknown`].
    OutcomeUnknown,
    /// [`Error::NotReplayable`].
    NotReplayable,
    /// [`Error::StoreFull`].
    StoreFull,
}

impl ErrorKind {
    /// The kind of `err`.
    pub fn of<E>(err: &Error<E>) -> ErrorKind {
        match err {
            Error::Inner(_) => ErrorKind::Inner,
            Error::CircuitOpen { .. } => ErrorKind::CircuitOpen,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::BulkheadFull => ErrorKind::BulkheadFull,
            Error::RateLimited { .. } => ErrorKind::RateLimited,
            Error::Shed { .. } => ErrorKind::Shed,
            Error::RetriesExhausted { .. } => ErrorKind::RetriesExhausted,
            Error::FaultInjected => ErrorKind::FaultInjected,
            Error::KeyMismatch => ErrorKind::KeyMismatch,
            Error::StoreUnavailable => ErrorKind::StoreUnavailable,
            Error::InProgress { .. } => ErrorKind::InProgress,
            Error::OutcomeUnknown => ErrorKind::OutcomeUnknown,
            Error::NotReplayable => ErrorKind::NotReplayable,
            Error::StoreFull => ErrorKind::StoreFull,
        }
    }
}

/// The data part of a fallback chain: which errors trigger it and the stale
/// cache. The other levels are code, added to the builder this returns.
///
/// ```
/// use keel::fallback::FallbackConfig;
/// let config: FallbackConfig = toml::from_str(r#"
///     on = ["timeout", "circuit_open", "retries_exhausted"]
///     stale = { max_staleness = "10m", capacity = 5000 }
/// "#)?;
/// let fallback = config.builder::<String, std::io::Error, String>()?.build();
/// # drop(fallback);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackConfig {
    /// The error kinds that trigger the chain; empty means every error.
    pub on: Vec<ErrorKind>,
    /// Serve the last good value within `max_staleness` first.
    pub stale: Option<StaleCacheConfig>,
}

impl FallbackConfig {
    /// A builder with these triggers and stale cache, or the wrong field.
    pub fn builder<T, E, K>(&self) -> Result<FallbackBuilder<T, E, K>, ConfigError>
    where
        T: Clone + Send + Sync + 'static,
        E: 'static,
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        let mut builder = Fallback::builder();
        if let Some(stale) = &self.stale {
            builder = builder.stale(stale.build().map_err(|e| e.within("stale"))?);
        }
        if !self.on.is_empty() {
            let kinds = self.on.clone();
            builder = builder.on(move |err: &Error<E>| kinds.contains(&ErrorKind::of(err)));
        }
        Ok(builder)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Trigger<E> = Arc<dyn Fn(&Error<E>) -> bool + Send + Sync>;
type AlternateFn<T, E, K> = Arc<dyn Fn(&K) -> BoxFuture<Result<T, E>> + Send + Sync>;
type GracefulFn<E> = Arc<dyn Fn(&Error<E>) -> E + Send + Sync>;

enum Level<T, E, K> {
    Stale(StaleCache<K, T>),
    Alternate(AlternateFn<T, E, K>),
    Value(Arc<dyn Fn() -> T + Send + Sync>),
    Graceful(GracefulFn<E>),
}

/// Builds a [`Fallback`]: levels are tried in the order they are added.
pub struct FallbackBuilder<T, E, K = ()> {
    name: Arc<str>,
    levels: Vec<Level<T, E, K>>,
    trigger: Option<Trigger<E>>,
}

impl<T, E, K> fmt::Debug for FallbackBuilder<T, E, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackBuilder")
            .field(
                "levels",
                &self.levels.iter().map(Level::name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl<T, E, K> Level<T, E, K> {
    fn name(&self) -> &'static str {
        match self {
            Level::Stale(_) => "stale",
            Level::Alternate(_) => "alternate",
            Level::Value(_) => "default",
            Level::Graceful(_) => "graceful",
        }
    }
}

impl<T, E, K> FallbackBuilder<T, E, K> {
    /// Serve the last good value for the call's key from `cache`, marked
    /// stale; the primary's successes fill it.
    pub fn stale(mut self, cache: StaleCache<K, T>) -> Self {
        self.levels.push(Level::Stale(cache));
        self
    }

    /// Ask another source (another region, a simpler query, popular items
    /// instead of personal ones). If it fails too, the next level is tried.
    pub fn alternate<F, Fut>(mut self, source: F) -> Self
    where
        F: Fn(&K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.levels
            .push(Level::Alternate(Arc::new(move |k| Box::pin(source(k)))));
        self
    }

    /// Answer with a default value. It always answers, so it ends the chain.
    pub fn value(mut self, value: impl Fn() -> T + Send + Sync + 'static) -> Self {
        self.levels.push(Level::Value(Arc::new(value)));
        self
    }

    /// Fail with an error made for the caller ("payments are paused, try in
    /// a minute") instead of the raw one. It always answers, so it ends the
    /// chain.
    pub fn graceful(mut self, error: impl Fn(&Error<E>) -> E + Send + Sync + 'static) -> Self {
        self.levels.push(Level::Graceful(Arc::new(error)));
        self
    }

    /// The name in events and metrics: the dependency it stands in for
    /// (default `"default"`).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Which errors trigger the chain (default: every error).
    pub fn on(mut self, trigger: impl Fn(&Error<E>) -> bool + Send + Sync + 'static) -> Self {
        self.trigger = Some(Arc::new(trigger));
        self
    }

    /// The chain.
    pub fn build(self) -> Fallback<T, E, K> {
        Fallback {
            inner: Arc::new(Inner {
                levels: self.levels,
                trigger: self.trigger,
                served: Default::default(),
                used: ["stale", "alternate", "default", "graceful"].map(|source| {
                    telemetry::describe_metrics();
                    metrics::counter!(
                        telemetry::FALLBACKS,
                        "name" => self.name.to_string(),
                        "source" => source
                    )
                }),
                events: PolicyEvents::new(Policy::Fallback, self.name),
            }),
        }
    }
}

/// A fallback chain; a cheap handle, clones share levels and counts.
pub struct Fallback<T, E, K = ()> {
    inner: Arc<Inner<T, E, K>>,
}

struct Inner<T, E, K> {
    levels: Vec<Level<T, E, K>>,
    trigger: Option<Trigger<E>>,
    served: [AtomicU64; 6],
    /// `keel_fallbacks_total` for STALE, ALTERNATE, DEFAULT, GRACEFUL.
    used: [metrics::Counter; 4],
    events: PolicyEvents,
}

impl<T, E, K> Clone for Fallback<T, E, K> {
    fn clone(&self) -> Self {
        Fallback {
            inner: self.inner.clone(),
        }
    }
}

impl<T, E, K> fmt::Debug for Fallback<T, E, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field(
                "levels",
                &self
                    .inner
                    .levels
                    .iter()
                    .map(Level::name)
                    .collect::<Vec<_>>(),
            )
            .field("metrics", &self.metrics())
            .finish_non_exhaustive()
    }
}

/// How a [`Fallback`]'s calls were answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FallbackMetrics {
    /// By the call itself.
    pub primary: u64,
    /// By a stale cache.
    pub stale: u64,
    /// By an alternate source.
    pub alternate: u64,
    /// With the default value.
    pub default: u64,
    /// With the graceful error.
    pub graceful: u64,
    /// With the primary's error: it did not trigger the chain, or no level
    /// answered.
    pub failed: u64,
}

const PRIMARY: usize = 0;
const STALE: usize = 1;
const ALTERNATE: usize = 2;
const DEFAULT: usize = 3;
const GRACEFUL: usize = 4;
const FAILED: usize = 5;

impl Fallback<(), (), ()> {
    /// An empty chain to add levels to.
    pub fn builder<T, E, K>() -> FallbackBuilder<T, E, K> {
        FallbackBuilder {
            name: "default".into(),
            levels: Vec::new(),
            trigger: None,
        }
    }
}

impl<T, E, K> Fallback<T, E, K> {
    /// The chain's events: fallbacks used.
    pub fn events(&self) -> &PolicyEvents {
        &self.inner.events
    }

    /// How calls were answered so far.
    pub fn metrics(&self) -> FallbackMetrics {
        let n = |i: usize| self.inner.served[i].load(Ordering::Relaxed);
        FallbackMetrics {
            primary: n(PRIMARY),
            stale: n(STALE),
            alternate: n(ALTERNATE),
            default: n(DEFAULT),
            graceful: n(GRACEFUL),
            failed: n(FAILED),
        }
    }

    fn count(&self, i: usize) {
        self.inner.served[i].fetch_add(1, Ordering::Relaxed);
    }
}

impl<T: Clone, E, K: Hash + Eq + Clone> Fallback<T, E, K> {
    /// Runs `op` for `key` (the key of the stale cache and of the alternate
    /// source), falling back down the chain if it fails with a triggering
    /// error.
    pub async fn call_keyed<F, Fut>(&self, key: &K, op: F) -> Result<Served<T>, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Error<E>>>,
    {
        let err = match op().await {
            Ok(value) => {
                for level in &self.inner.levels {
                    if let Level::Stale(cache) = level {
                        cache.put(key.clone(), value.clone());
                    }
                }
                self.count(PRIMARY);
                return Ok(Served {
                    value,
                    source: Source::Primary,
                });
            }
            Err(err) => err,
        };
        if !self.inner.trigger.as_ref().is_none_or(|t| t(&err)) {
            self.count(FAILED);
            return Err(err);
        }
        for level in &self.inner.levels {
            let (served, i) = match level {
                Level::Stale(cache) => match cache.get(key) {
                    Some(stale) => (
                        Served {
                            value: stale.value,
                            source: Source::Stale { age: stale.age },
                        },
                        STALE,
                    ),
                    None => continue,
                },
                Level::Alternate(source) => match source(key).await {
                    Ok(value) => (
                        Served {
                            value,
                            source: Source::Alternate,
                        },
                        ALTERNATE,
                    ),
                    Err(_) => {
                        tracing::debug!(target: "keel::fallback", "alternate source failed");
                        continue;
                    }
                },
                Level::Value(value) => (
                    Served {
                        value: value(),
                        source: Source::Default,
                    },
                    DEFAULT,
                ),
                Level::Graceful(graceful) => {
                    self.count(GRACEFUL);
                    self.inner.used[GRACEFUL - STALE].increment(1);
                    return Err(Error::Inner(graceful(&err)));
                }
            };
            tracing::trace!(target: "keel::fallback", error = ?ErrorKind::of(&err));
            self.count(i);
            self.inner.used[i - STALE].increment(1);
            self.inner.events.emit(EventKind::FallbackUsed {
                source: served.source,
            });
            return Ok(served);
        }
        self.count(FAILED);
        Err(err)
    }
}

impl<T: Clone, E> Fallback<T, E, ()> {
    /// Runs `op`, falling back down the chain if it fails with a
    /// triggering error.
    pub async fn call<F, Fut>(&self, op: F) -> Result<Served<T>, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Error<E>>>,
    {
        self.call_keyed(&(), op).await
    }
}
