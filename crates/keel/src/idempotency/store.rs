//! Where idempotency records live: the [`IdempotencyStore`] trait and the
//! in-memory [`MemoryStore`].
//!
//! A record is either *in flight* (a holder, named by its [`Token`], is
//! running the operation and holds the key until its lock expires) or
//! *done* (the stored result, kept until its time to live runs out). Every
//! call is one atomic step on one key, so several processes sharing a store
//! agree on who runs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, ClockSource};
pub use crate::store::{StoreError, StoreFuture};
use crate::sync::{lock, Mutex};

/// Who holds a key: a random number drawn by the holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub u128);

impl Token {
    /// A fresh token, unguessable enough to tell holders apart.
    pub fn random() -> Token {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        // Randomly keyed hashes of a process-wide counter: never the same
        // twice in a process, unrelated across processes.
        static DRAWN: AtomicU64 = AtomicU64::new(0);
        let n = DRAWN.fetch_add(1, Ordering::Relaxed);
        let state = std::collections::hash_map::RandomState::new();
        let half = |lane: u64| {
            let mut h = state.build_hasher();
            h.write_u64(n);
            h.write_u64(lane);
            h.finish()
        };
        Token((u128::from(half(0)) << 64) | u128::from(half(1)))
    }
}

/// What [`IdempotencyStore::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The key was free (or its holder's lock had expired): the caller now
    /// holds it with this token and runs the operation.
    Acquired(Token),
    /// Another holder is running the operation for this key.
    InFlight {
        /// The fingerprint the holder registered.
        fingerprint: Vec<u8>,
    },
    /// The operation ran; its result is stored.
    Done {
        /// The fingerprint of the request that ran.
        fingerprint: Vec<u8>,
        /// The stored result.
        value: Vec<u8>,
    },
}

/// Idempotency records, shared by every executor that uses the store.
///
/// Implementations make each call one atomic step on one key (a mutex, a
/// database transaction, a Redis script). They keep time themselves: a
/// store shared by processes cannot use any one process's clock.
pub trait IdempotencyStore: Send + Sync + fmt::Debug {
    /// Claims `key` for a holder whose lock lasts `lock_timeout`, unless a
    /// live holder or a stored result has it.
    fn begin<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a [u8],
        lock_timeout: Duration,
    ) -> StoreFuture<'a, Begin>;

    /// Stores the result of the holder of `token`, kept for `ttl`. `false`
    /// if `token` no longer holds the key (its lock expired and someone
    /// else took it); nothing is stored then.
    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: Token,
        value: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, bool>;

    /// Frees the key if `token` holds it, so the next request runs anew.
    fn release<'a>(&'a self, key: &'a str, token: Token) -> StoreFuture<'a, ()>;

    /// Renews the lock of the holder of `token` for `lock_timeout` from now.
    /// `false` if `token` no longer holds the key.
    fn extend<'a>(
        &'a self,
        key: &'a str,
        token: Token,
        lock_timeout: Duration,
    ) -> StoreFuture<'a, bool>;

    /// Resolves when `key` may have changed, or after `at_most`. A store
    /// that cannot tell just waits `at_most` (the default); waiters then
    /// look again.
    fn changed<'a>(
        &'a self,
        key: &'a str,
        at_most: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        let _ = key;
        Box::pin(tokio::time::sleep(at_most))
    }
}

/// One key's record, in any store that keeps records itself (memory,
/// embedded): times are in the store's clock, in nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    InFlight {
        token: Token,
        fingerprint: Vec<u8>,
        /// When the lock expires.
        until: u64,
    },
    Done {
        fingerprint: Vec<u8>,
        value: Vec<u8>,
        /// When the result is forgotten.
        until: u64,
    },
}

impl Record {
    pub(crate) fn until(&self) -> u64 {
        match self {
            Record::InFlight { until, .. } | Record::Done { until, .. } => *until,
        }
    }

    /// The answer to `begin` at `now` given this record (or none), and the
    /// record to write when the key is acquired.
    pub(crate) fn begin(
        existing: Option<&Record>,
        now: u64,
        fingerprint: &[u8],
        lock_until: u64,
    ) -> (Begin, Option<Record>) {
        match existing {
            Some(Record::Done {
                fingerprint,
                value,
                until,
            }) if *until > now => (
                Begin::Done {
                    fingerprint: fingerprint.clone(),
                    value: value.clone(),
                },
                None,
            ),
            Some(Record::InFlight {
                fingerprint, until, ..
            }) if *until > now => (
                Begin::InFlight {
                    fingerprint: fingerprint.clone(),
                },
                None,
            ),
            _ => {
                let token = Token::random();
                let record = Record::InFlight {
                    token,
                    fingerprint: fingerprint.to_vec(),
                    until: lock_until,
                };
                (Begin::Acquired(token), Some(record))
            }
        }
    }

    /// Whether `token` holds the key at `now`.
    pub(crate) fn held_by(existing: Option<&Record>, token: Token, now: u64) -> bool {
        matches!(existing, Some(Record::InFlight { token: t, until, .. }) if *t == token && *until > now)
    }

    /// Renews a holder's lock until `until` (a stored result keeps its time).
    pub(crate) fn renew(&mut self, new_until: u64) {
        if let Record::InFlight { until, .. } = self {
            *until = new_until;
        }
    }

    /// The record once its holder stored `value` until `until`.
    pub(crate) fn completed(self, value: &[u8], until: u64) -> Record {
        let fingerprint = match self {
            Record::InFlight { fingerprint, .. } | Record::Done { fingerprint, .. } => fingerprint,
        };
        Record::Done {
            fingerprint,
            value: value.to_vec(),
            until,
        }
    }
}

/// `now` plus `d` in nanoseconds, saturating.
pub(crate) fn after(now: u64, d: Duration) -> u64 {
    now.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What a record costs beyond its key, fingerprint and value: the map's
/// slot and entry, the expiry index's entry, allocator rounding.
const RECORD_OVERHEAD: usize = 160;

/// Records in this process's memory: the default, and right for one
/// instance. They take at most `max_bytes` (keys, fingerprints and stored
/// values counted, plus a fixed overhead per record). When a new record
/// does not fit, the stored results closest to expiry are forgotten first
/// (an expiry-ordered index makes that O(log n) per record, with no scan);
/// only when every byte is held by calls still running is a new key
/// refused with [`StoreError::Full`]. Expired results are dropped from the
/// same index as time passes. A waiting duplicate is woken by a change to
/// its own key only.
pub struct MemoryStore {
    clock: ClockSource,
    max_bytes: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    records: HashMap<Arc<str>, Entry>,
    /// Settled records by expiry, earliest first. Lazy: an entry whose
    /// record has gone or changed (another generation) is skipped.
    expiry: BinaryHeap<Reverse<(u64, u64, Arc<str>)>>,
    /// Bytes the records take, as counted.
    used: usize,
    /// The part of `used` that settled records take (what eviction can
    /// free).
    settled: usize,
    generation: u64,
}

struct Entry {
    record: Record,
    generation: u64,
    bytes: usize,
    /// Duplicates waiting for this key's holder.
    waiters: Option<Arc<tokio::sync::Notify>>,
}

fn record_bytes(key: &str, record: &Record) -> usize {
    let (fingerprint, value) = match record {
        // Counted with a one-byte value: settling as an outcome marker
        // (unknown, not replayable) never needs more room than the call
        // held, so a full store can always record that a call ran.
        Record::InFlight { fingerprint, .. } => (fingerprint.len(), 1),
        Record::Done {
            fingerprint, value, ..
        } => (fingerprint.len(), value.len()),
    };
    key.len() + fingerprint + value + RECORD_OVERHEAD
}

impl State {
    fn remove(&mut self, key: &str) -> Option<Entry> {
        let entry = self.records.remove(key)?;
        self.used -= entry.bytes;
        if matches!(entry.record, Record::Done { .. }) {
            self.settled -= entry.bytes;
        }
        if let Some(waiters) = &entry.waiters {
            waiters.notify_waiters();
        }
        Some(entry)
    }

    /// Drops settled records whose time is up (stale index entries on the
    /// way are discarded; a live record not yet expired is left).
    fn expire(&mut self, now: u64) {
        while let Some(Reverse((until, _, _))) = self.expiry.peek() {
            if *until > now {
                break;
            }
            let Some(Reverse((_, generation, key))) = self.expiry.pop() else {
                break;
            };
            if self
                .records
                .get(&*key)
                .is_some_and(|e| e.generation == generation)
            {
                self.remove(&key);
            }
        }
    }

    /// Drops every expired record, in flight ones included (a holder
    /// that stopped renewing): a scan, run only when the store is full of
    /// records in flight.
    fn expire_in_flight(&mut self, now: u64) {
        let expired: Vec<Arc<str>> = self
            .records
            .iter()
            .filter(|(_, e)| e.record.until() <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.remove(&key);
        }
    }

    /// Forgets the settled record closest to expiry; false if none is left.
    fn pop_settled(&mut self) -> bool {
        while let Some(Reverse((_, generation, key))) = self.expiry.pop() {
            if self
                .records
                .get(&*key)
                .is_some_and(|e| e.generation == generation)
            {
                self.remove(&key);
                return true;
            }
        }
        false
    }

    /// Makes room for `bytes` more within `max`, forgetting stored results
    /// closest to expiry; false, forgetting nothing, if calls in flight
    /// hold too much for it to fit at all.
    fn make_room(&mut self, bytes: usize, max: usize, now: u64) -> bool {
        if self.used + bytes <= max {
            return true;
        }
        if self.used - self.settled + bytes > max {
            self.expire_in_flight(now);
            if self.used - self.settled + bytes > max {
                return false;
            }
        }
        while self.used + bytes > max {
            if !self.pop_settled() {
                return false;
            }
        }
        true
    }

    fn insert(&mut self, key: Arc<str>, record: Record, bytes: usize) {
        self.generation += 1;
        let generation = self.generation;
        if let Record::Done { until, .. } = &record {
            self.expiry.push(Reverse((*until, generation, key.clone())));
            self.settled += bytes;
        }
        self.used += bytes;
        self.records.insert(
            key,
            Entry {
                record,
                generation,
                bytes,
                waiters: None,
            },
        );
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("max_bytes", &self.max_bytes)
            .field("keys", &self.len())
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// A store of at most 64 MiB, on the monotonic clock.
    pub fn new() -> MemoryStore {
        MemoryStore::with_max_bytes(64 << 20)
    }

    /// A store whose records take at most `max_bytes`.
    pub fn with_max_bytes(max_bytes: usize) -> MemoryStore {
        MemoryStore {
            clock: ClockSource::new(None),
            max_bytes: max_bytes.max(RECORD_OVERHEAD),
            state: Mutex::new(State::default()),
        }
    }

    /// Keeps time with `clock` (tests: a `ManualClock` or `TokioClock`).
    pub fn clock(mut self, clock: impl Clock) -> MemoryStore {
        self.clock = ClockSource::new(Some(Arc::new(clock)));
        self
    }

    /// Keys held now, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        lock(&self.state).records.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes the records take, as the bound counts them.
    pub fn bytes(&self) -> usize {
        lock(&self.state).used
    }

    fn deadline(&self, d: Duration) -> u64 {
        after(self.clock.now_nanos(), d)
    }

    fn begin_now(
        &self,
        key: &str,
        fingerprint: &[u8],
        lock_timeout: Duration,
    ) -> Result<Begin, StoreError> {
        let now = self.clock.now_nanos();
        let mut state = lock(&self.state);
        state.expire(now);
        let (begin, record) = Record::begin(
            state.records.get(key).map(|e| &e.record),
            now,
            fingerprint,
            after(now, lock_timeout),
        );
        if let Some(record) = record {
            // An expired holder's record gives way to the new one.
            let waiters = state.remove(key).and_then(|e| e.waiters);
            let bytes = record_bytes(key, &record);
            if !state.make_room(bytes, self.max_bytes, now) {
                return Err(StoreError::Full);
            }
            let key: Arc<str> = key.into();
            state.insert(key.clone(), record, bytes);
            if let Some(entry) = state.records.get_mut(&key) {
                entry.waiters = waiters;
            }
        }
        Ok(begin)
    }

    /// Runs `change` on the record if `token` holds the key; whether it did.
    fn if_held(&self, key: &str, token: Token, change: impl FnOnce(&mut Record)) -> bool {
        let now = self.clock.now_nanos();
        let mut state = lock(&self.state);
        match state.records.get_mut(key) {
            Some(entry) if Record::held_by(Some(&entry.record), token, now) => {
                change(&mut entry.record);
                true
            }
            _ => false,
        }
    }

    fn complete_now(
        &self,
        key: &str,
        token: Token,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = self.clock.now_nanos();
        let mut state = lock(&self.state);
        let held = match state.records.get(key) {
            Some(entry) if Record::held_by(Some(&entry.record), token, now) => entry,
            _ => return Ok(false),
        };
        let held_bytes = held.bytes;
        let record = held.record.clone().completed(value, after(now, ttl));
        let bytes = record_bytes(key, &record);
        // The held record stays while room is made: only settled ones go.
        if !state.make_room(bytes.saturating_sub(held_bytes), self.max_bytes, now) {
            return Err(StoreError::Full);
        }
        let entry = state
            .remove(key)
            .expect("held above; only settled records were evicted");
        drop(entry);
        state.insert(key.into(), record, bytes);
        Ok(true)
    }
}

impl IdempotencyStore for MemoryStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a [u8],
        lock_timeout: Duration,
    ) -> StoreFuture<'a, Begin> {
        Box::pin(std::future::ready(self.begin_now(
            key,
            fingerprint,
            lock_timeout,
        )))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: Token,
        value: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(std::future::ready(
            self.complete_now(key, token, value, ttl),
        ))
    }

    fn release<'a>(&'a self, key: &'a str, token: Token) -> StoreFuture<'a, ()> {
        let now = self.clock.now_nanos();
        let mut state = lock(&self.state);
        if Record::held_by(state.records.get(key).map(|e| &e.record), token, now) {
            state.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn extend<'a>(
        &'a self,
        key: &'a str,
        token: Token,
        lock_timeout: Duration,
    ) -> StoreFuture<'a, bool> {
        let new_until = self.deadline(lock_timeout);
        let held = self.if_held(key, token, |record| record.renew(new_until));
        Box::pin(std::future::ready(Ok(held)))
    }

    fn changed<'a>(
        &'a self,
        key: &'a str,
        at_most: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        // Registered under the lock, so a change right after it is seen.
        let notified = {
            let mut state = lock(&self.state);
            match state.records.get_mut(key) {
                Some(Entry {
                    record: Record::InFlight { .. },
                    waiters,
                    ..
                }) => {
                    let notify = waiters.get_or_insert_with(Default::default).clone();
                    let mut notified = Box::pin(notify.notified_owned());
                    notified.as_mut().enable();
                    Some(notified)
                }
                // Settled or gone: look again now.
                _ => None,
            }
        };
        Box::pin(async move {
            if let Some(notified) = notified {
                let _ = tokio::time::timeout(at_most, notified).await;
            }
        })
    }
}
