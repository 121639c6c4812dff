//! The last good value per key, served stale when the source fails.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{duration_nanos, Clock, ClockSource};
use crate::sync::{lock, Mutex};
use crate::ConfigError;

/// A value from a [`StaleCache`], with how long ago it was fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale<V> {
    /// The value as last seen.
    pub value: V,
    /// Time since it was stored.
    pub age: Duration,
}

/// A [`StaleCache`]'s configuration, as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaleCacheConfig {
    /// How old a value may be and still be served (default 5 minutes).
    #[serde(with = "crate::config::duration")]
    pub max_staleness: Duration,
    /// Keys kept; the least recently stored goes first (default 10 000).
    pub capacity: usize,
}

impl Default for StaleCacheConfig {
    fn default() -> Self {
        StaleCacheConfig {
            max_staleness: Duration::from_secs(300),
            capacity: 10_000,
        }
    }
}

impl StaleCacheConfig {
    /// Builds the cache, or says which field is wrong.
    pub fn build<K, V>(&self) -> Result<StaleCache<K, V>, ConfigError> {
        StaleCache::builder()
            .max_staleness(self.max_staleness)
            .capacity(self.capacity)
            .build()
    }
}

/// Builds a [`StaleCache`].
#[derive(Debug)]
pub struct StaleCacheBuilder {
    config: StaleCacheConfig,
    clock: Option<crate::clock::SharedClock>,
}

impl StaleCacheBuilder {
    /// How old a value may be and still be served (default 5 minutes).
    pub fn max_staleness(mut self, d: Duration) -> Self {
        self.config.max_staleness = d;
        self
    }

    /// Keys kept; when full, the least recently stored is dropped
    /// (default 10 000).
    pub fn capacity(mut self, n: usize) -> Self {
        self.config.capacity = n;
        self
    }

    /// The clock that ages values (default: the process's monotonic clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The cache, or the field that is wrong.
    pub fn build<K, V>(self) -> Result<StaleCache<K, V>, ConfigError> {
        if self.config.max_staleness.is_zero() {
            return Err(ConfigError::new("max_staleness", "must be more than zero"));
        }
        if self.config.capacity == 0 {
            return Err(ConfigError::new("capacity", "must be at least 1"));
        }
        Ok(StaleCache {
            inner: Arc::new(Inner {
                max_staleness: duration_nanos(self.config.max_staleness),
                capacity: self.config.capacity,
                clock: ClockSource::new(self.clock),
                state: Mutex::new(State {
                    map: HashMap::new(),
                    order: VecDeque::new(),
                    seq: 0,
                }),
            }),
        })
    }
}

/// Remembers the last good value per key and when it was stored, and gives
/// it back, marked [`Stale`] with its age, for as long as it is younger than
/// `max_staleness`. Memory is bounded by `capacity` keys; the least recently
/// stored key is dropped first. Clones share the cache.
///
/// ```
/// use keel::clock::ManualClock;
/// use keel::fallback::StaleCache;
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let prices = StaleCache::builder()
///     .max_staleness(Duration::from_secs(60))
///     .clock(clock.clone())
///     .build()?;
/// prices.put("sku-1", 1999);
/// clock.advance(Duration::from_secs(45));
/// let stale = prices.get("sku-1").unwrap();
/// assert_eq!((stale.value, stale.age), (1999, Duration::from_secs(45)));
/// clock.advance(Duration::from_secs(16));
/// assert!(prices.get("sku-1").is_none()); // too old to serve
/// # Ok::<(), keel::ConfigError>(())
/// ```
pub struct StaleCache<K, V> {
    inner: Arc<Inner<K, V>>,
}

struct Inner<K, V> {
    max_staleness: u64,
    capacity: usize,
    clock: ClockSource,
    state: Mutex<State<K, V>>,
}

struct State<K, V> {
    map: HashMap<K, Entry<V>>,
    /// Keys in the order they were stored, with the store's sequence
    /// number; an entry whose number is not the key's current one is a
    /// leftover of an earlier store and is skipped.
    order: VecDeque<(K, u64)>,
    seq: u64,
}

struct Entry<V> {
    value: V,
    stored: u64,
    seq: u64,
}

impl<K, V> Clone for StaleCache<K, V> {
    fn clone(&self) -> Self {
        StaleCache {
            inner: self.inner.clone(),
        }
    }
}

impl<K, V> fmt::Debug for StaleCache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaleCache")
            .field(
                "max_staleness",
                &Duration::from_nanos(self.inner.max_staleness),
            )
            .field("capacity", &self.inner.capacity)
            .field("len", &lock(&self.inner.state).map.len())
            .finish()
    }
}

impl StaleCache<(), ()> {
    /// A builder: `max_staleness` 5 minutes, `capacity` 10 000.
    pub fn builder() -> StaleCacheBuilder {
        StaleCacheBuilder {
            config: StaleCacheConfig::default(),
            clock: None,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> StaleCache<K, V> {
    /// Stores `value` as the last good value for `key`, fresh now.
    pub fn put(&self, key: K, value: V) {
        let now = self.inner.clock.now_nanos();
        let mut state = lock(&self.inner.state);
        let state = &mut *state;
        state.seq += 1;
        let seq = state.seq;
        state.order.push_back((key.clone(), seq));
        state.map.insert(
            key,
            Entry {
                value,
                stored: now,
                seq,
            },
        );
        while state.map.len() > self.inner.capacity {
            let Some((key, seq)) = state.order.pop_front() else {
                break;
            };
            if state.map.get(&key).is_some_and(|e| e.seq == seq) {
                state.map.remove(&key);
            }
        }
        // Leftovers of keys stored again pile up in `order`; sweep them
        // when they outnumber the live keys, so each store costs O(1)
        // amortised and memory stays within twice the capacity.
        if state.order.len() > 2 * self.inner.capacity {
            let map = &state.map;
            state
                .order
                .retain(|(k, s)| map.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    /// The last good value for `key` and its age, if it is younger than
    /// `max_staleness`. A value too old is forgotten.
    pub fn get<Q>(&self, key: &Q) -> Option<Stale<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = self.inner.clock.now_nanos();
        let mut state = lock(&self.inner.state);
        let entry = state.map.get(key)?;
        let age = now.saturating_sub(entry.stored);
        if age > self.inner.max_staleness {
            state.map.remove(key);
            return None;
        }
        Some(Stale {
            value: entry.value.clone(),
            age: Duration::from_nanos(age),
        })
    }

    /// Keys held (some may be too old to serve).
    pub fn len(&self) -> usize {
        lock(&self.inner.state).map.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
