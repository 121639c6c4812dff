//! Where idempotency records live: the [`IdempotencyStore`] trait and the
//! in-memory [`MemoryStore`].
//!
//! A record is either *in flight* (a holder, named by its [`Token`], is
//! running the operation and holds the key until its lock expires) or
//! *done* (the stored result, kept until its time to live runs out). Every
//! call is one atomic step on one key, so several processes sharing a store
//! agree on who runs.

use std::collections::HashMap;
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

/// Records in this process's memory: the default, and right for one
/// instance. At most `capacity` keys (expired ones are swept when it is
/// reached); a `begin` for a new key beyond that fails with
/// [`StoreError::Full`] rather than forget a live record.
pub struct MemoryStore {
    clock: ClockSource,
    capacity: usize,
    records: Mutex<HashMap<String, Record>>,
    /// Woken on every completion and release, for waiting duplicates.
    changes: tokio::sync::Notify,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("capacity", &self.capacity)
            .field("keys", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// A store for up to a million keys, on the monotonic clock.
    pub fn new() -> MemoryStore {
        MemoryStore::with_capacity(1_000_000)
    }

    /// A store for up to `capacity` keys.
    pub fn with_capacity(capacity: usize) -> MemoryStore {
        MemoryStore {
            clock: ClockSource::new(None),
            capacity: capacity.max(1),
            records: Mutex::new(HashMap::new()),
            changes: tokio::sync::Notify::new(),
        }
    }

    /// Keeps time with `clock` (tests: a `ManualClock` or `TokioClock`).
    pub fn clock(mut self, clock: impl Clock) -> MemoryStore {
        self.clock = ClockSource::new(Some(Arc::new(clock)));
        self
    }

    /// Keys held now, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        lock(&self.records).len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let mut records = lock(&self.records);
        if !records.contains_key(key) && records.len() >= self.capacity {
            records.retain(|_, r| r.until() > now);
            if records.len() >= self.capacity {
                return Err(StoreError::Full);
            }
        }
        let (begin, record) = Record::begin(
            records.get(key),
            now,
            fingerprint,
            self.deadline(lock_timeout),
        );
        if let Some(record) = record {
            records.insert(key.to_owned(), record);
        }
        Ok(begin)
    }

    /// Runs `change` on the record if `token` holds the key; whether it did.
    fn if_held(&self, key: &str, token: Token, change: impl FnOnce(&mut Record)) -> bool {
        let now = self.clock.now_nanos();
        let mut records = lock(&self.records);
        match records.get_mut(key) {
            Some(record) if Record::held_by(Some(record), token, now) => {
                change(record);
                true
            }
            _ => false,
        }
    }

    fn remove_if_held(&self, key: &str, token: Token) {
        let now = self.clock.now_nanos();
        let mut records = lock(&self.records);
        if Record::held_by(records.get(key), token, now) {
            records.remove(key);
        }
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
        let until = self.deadline(ttl);
        let stored = self.if_held(key, token, |record| {
            let held = std::mem::replace(
                record,
                Record::Done {
                    fingerprint: Vec::new(),
                    value: Vec::new(),
                    until: 0,
                },
            );
            *record = held.completed(value, until);
        });
        self.changes.notify_waiters();
        Box::pin(std::future::ready(Ok(stored)))
    }

    fn release<'a>(&'a self, key: &'a str, token: Token) -> StoreFuture<'a, ()> {
        self.remove_if_held(key, token);
        self.changes.notify_waiters();
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
        _key: &'a str,
        at_most: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let _ = tokio::time::timeout(at_most, self.changes.notified()).await;
        })
    }
}
