//! A GCRA limiter per key, its state behind [`StateStore`].

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;
use std::sync::Arc;

use super::{limited, Rate, RateLimited};
use crate::clock::ClockSource;
use crate::events::{Policy, PolicyEvents, Reason};
use crate::sync::{lock, Mutex};
use crate::telemetry::Refusals;

/// Where a keyed limiter keeps its state: one `u64` per key (the key's
/// theoretical arrival time in the limiter's clock's nanoseconds; 0 means
/// none), read and replaced by compare-and-swap. An in-memory store is
/// [`InMemoryStore`]; a store shared by several instances (Redis) can
/// implement the same two calls.
pub trait StateStore<K> {
    /// The value stored for `key`, or 0.
    fn load(&self, key: &K) -> u64;

    /// Stores `new` for `key` if it still holds `current`; otherwise returns
    /// what it holds. `now` is the limiter's time: a key whose value is not
    /// after `now` is idle and may be forgotten.
    fn compare_and_swap(&self, key: &K, current: u64, new: u64, now: u64) -> Result<(), u64>;

    /// Runs `decide` on the key's value until its answer is stored (or it
    /// answers `None`). Stores that can do this in one step override it.
    fn update(&self, key: &K, now: u64, decide: &mut dyn FnMut(u64) -> Option<u64>) {
        let mut current = self.load(key);
        while let Some(new) = decide(current) {
            match self.compare_and_swap(key, current, new, now) {
                Ok(()) => return,
                Err(actual) => current = actual,
            }
        }
    }
}

const SHARDS: usize = 16;

/// The in-memory store: sharded maps holding at most `max_keys` keys.
///
/// A shard that is full forgets its idle keys (whose time has passed: they
/// would be decided the same without their state); if that frees nothing,
/// it forgets the quarter of its keys closest to idle, which lets those keys'
/// next requests through early. Memory is bounded by `max_keys` whatever the
/// number of distinct keys, and an insert costs O(1) amortized. A key is
/// hashed once: the hash picks the shard and finds the key in it.
pub struct InMemoryStore<K> {
    hasher: RandomState,
    per_shard: usize,
    shards: Box<[Mutex<Shard<K>>]>,
}

/// Keys and their theoretical arrival times.
type Shard<K> = HashTable<(K, u64)>;

impl<K> fmt::Debug for InMemoryStore<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryStore")
            .field("max_keys", &(self.per_shard * SHARDS))
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> InMemoryStore<K> {
    /// A store for at most `max_keys` keys (rounded up to a multiple of 16).
    pub fn new(max_keys: usize) -> Self {
        InMemoryStore {
            hasher: RandomState::new(),
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key's hash and its shard (chosen by the hash's high bits; the
    /// table inside uses the low ones).
    fn locate(&self, key: &K) -> (u64, &Mutex<Shard<K>>) {
        let hash = self.hasher.hash_one(key);
        (hash, &self.shards[(hash >> 60) as usize % SHARDS])
    }

    fn rehash(&self) -> impl Fn(&(K, u64)) -> u64 + '_ {
        move |(k, _)| self.hasher.hash_one(k)
    }

    /// Makes room in a full shard: forgets idle keys and, if that is not
    /// enough, the quarter of keys closest to idle, so that a shard full of
    /// active keys is swept once per quarter of its size, not on every insert.
    fn make_room(&self, table: &mut Shard<K>, now: u64) {
        table.retain(|(_, tat)| *tat > now);
        if table.len() >= self.per_shard {
            let mut tats: Vec<u64> = table.iter().map(|(_, tat)| *tat).collect();
            let quarter = tats.len() / 4;
            let (_, threshold, _) = tats.select_nth_unstable(quarter);
            let threshold = *threshold;
            table.retain(|(_, tat)| *tat > threshold);
        }
    }

    fn store(&self, table: &mut Shard<K>, hash: u64, key: &K, new: u64, now: u64) {
        if let Some((_, v)) = table.find_mut(hash, |(k, _)| k == key) {
            *v = new;
            return;
        }
        if table.len() >= self.per_shard {
            self.make_room(table, now);
        }
        table.insert_unique(hash, (key.clone(), new), self.rehash());
    }
}

impl<K: Hash + Eq + Clone> StateStore<K> for InMemoryStore<K> {
    fn load(&self, key: &K) -> u64 {
        let (hash, shard) = self.locate(key);
        lock(shard)
            .find(hash, |(k, _)| k == key)
            .map_or(0, |(_, v)| *v)
    }

    fn compare_and_swap(&self, key: &K, current: u64, new: u64, now: u64) -> Result<(), u64> {
        let (hash, shard) = self.locate(key);
        let mut table = lock(shard);
        let held = table.find(hash, |(k, _)| k == key).map_or(0, |(_, v)| *v);
        if held != current {
            return Err(held);
        }
        self.store(&mut table, hash, key, new, now);
        Ok(())
    }

    fn update(&self, key: &K, now: u64, decide: &mut dyn FnMut(u64) -> Option<u64>) {
        let (hash, shard) = self.locate(key);
        let mut table = lock(shard);
        match table.find_mut(hash, |(k, _)| k == key) {
            Some((_, v)) => {
                if let Some(new) = decide(*v) {
                    *v = new;
                }
            }
            None => {
                if let Some(new) = decide(0) {
                    self.store(&mut table, hash, key, new, now);
                }
            }
        }
    }
}

/// A GCRA limiter per key. Build with
/// [`RateLimiter::builder(..).build_keyed(max_keys)`](super::Builder::build_keyed).
pub struct KeyedRateLimiter<K, S = InMemoryStore<K>> {
    name: Arc<str>,
    rate: Rate,
    clock: ClockSource,
    store: S,
    refusals: Refusals,
    _key: std::marker::PhantomData<fn(&K)>,
}

impl<K, S: fmt::Debug> fmt::Debug for KeyedRateLimiter<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiter")
            .field("name", &self.name)
            .field("rate", &self.rate)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl<K, S: StateStore<K>> KeyedRateLimiter<K, S> {
    pub(super) fn new(name: Arc<str>, rate: Rate, clock: ClockSource, store: S) -> Self {
        KeyedRateLimiter {
            refusals: Refusals::new(Policy::RateLimiter, &name, Reason::RateLimited),
            name,
            rate,
            clock,
            store,
            _key: std::marker::PhantomData,
        }
    }

    /// The limiter's events: rejected requests.
    pub fn events(&self) -> &PolicyEvents {
        self.refusals.events()
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Admits one request for `key`, or says when it would be admitted.
    pub fn check_key(&self, key: &K) -> Result<(), RateLimited> {
        self.check_key_n(key, 1)
    }

    /// Admits `n` requests for `key` at once, or none.
    pub fn check_key_n(&self, key: &K, n: u32) -> Result<(), RateLimited> {
        let now = self.clock.now_nanos();
        let mut verdict = Ok(());
        self.store
            .update(key, now, &mut |tat| match self.rate.decide(tat, now, n) {
                Ok(new_tat) => {
                    verdict = Ok(());
                    Some(new_tat)
                }
                Err(wait) => {
                    verdict = Err(wait);
                    None
                }
            });
        verdict.map_err(|retry_after| limited(&self.refusals, retry_after))
    }
}
