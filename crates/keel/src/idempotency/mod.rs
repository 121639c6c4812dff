//! Idempotency keys: a repeated request with the same key is recognised as
//! the same intent and answered with the first one's result instead of
//! running again.
//!
//! A timeout does not say whether the dependency acted; retrying a payment
//! is safe only if the second attempt cannot charge twice. [`Idempotency`]
//! keeps, per key, who is running the operation and then its result:
//!
//! - the first call for a key runs, and its result is stored for `ttl`;
//! - a duplicate arriving while it runs waits for it (up to `wait_timeout`)
//!   and receives the same result;
//! - a later duplicate receives the stored result without running;
//! - the same key with a different fingerprint (another request) is
//!   [`Error::KeyMismatch`];
//! - a result that means "did not act" (by default, an error the classifier
//!   marks retryable) is not stored: the key is released, so a retry runs
//!   again;
//! - a holder that dies (a process killed mid-call) keeps the key only
//!   until its lock expires (`lock_timeout`; a live holder renews it);
//! - a store that cannot be reached (every store call has `store_timeout`)
//!   fails closed by default ([`Error::StoreUnavailable`], nothing runs),
//!   or fails open (the call runs unprotected); either is counted in
//!   `keel_store_unavailable_total`.
//!
//! Records live in an [`IdempotencyStore`]: [`MemoryStore`] (one process),
//! `EmbeddedStore` (on disk in a redb file, survives restarts; feature
//! `embedded`) or
//! `RedisStore` (a fleet; feature `redis`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use keel::idempotency::{Idempotency, MemoryStore};
//! use std::time::Duration;
//!
//! let idem = Idempotency::builder("payments")
//!     .store(MemoryStore::new())
//!     .ttl(Duration::from_secs(24 * 3600))
//!     .build()?;
//! let charge = || async { Ok::<String, std::convert::Infallible>("charged 42".to_owned()) };
//! let first = idem.call("order-17", b"POST /charge 42", charge).await?;
//! let again = idem.call("order-17", b"POST /charge 42", charge).await?;
//! assert_eq!((first.value.as_str(), first.replayed), ("charged 42", false));
//! assert_eq!((again.value.as_str(), again.replayed), ("charged 42", true));
//! # Ok(()) }
//! ```

#[cfg(feature = "embedded")]
mod embedded;
mod store;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use metrics::Counter;

pub use crate::store::FailMode;
#[cfg(feature = "embedded")]
pub use embedded::EmbeddedStore;
pub use store::{Begin, IdempotencyStore, MemoryStore, StoreError, StoreFuture, Token};

use crate::classify::{Classify, DefaultClassifier};
use crate::{ConfigError, Error};

/// A value that can be kept in a store: encoded to bytes and back.
pub trait Stored: Sized {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// The value `bytes` encodes, or `None` if they are not an encoding.
    fn decode(bytes: &[u8]) -> Option<Self>;
}

impl Stored for Vec<u8> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(bytes.to_vec())
    }
}

impl Stored for String {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

impl Stored for () {
    fn encode(&self, _: &mut Vec<u8>) {}
    fn decode(bytes: &[u8]) -> Option<Self> {
        bytes.is_empty().then_some(())
    }
}

impl Stored for std::convert::Infallible {
    fn encode(&self, _: &mut Vec<u8>) {
        match *self {}
    }
    fn decode(_: &[u8]) -> Option<Self> {
        None
    }
}

/// `Ok` or `Err` as one tag byte, then the value.
impl<T: Stored, E: Stored> Stored for Result<T, E> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Ok(t) => {
                out.push(0);
                t.encode(out);
            }
            Err(e) => {
                out.push(1);
                e.encode(out);
            }
        }
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes.split_first()? {
            (0, rest) => T::decode(rest).map(Ok),
            (1, rest) => E::decode(rest).map(Err),
            _ => None,
        }
    }
}

/// A call's value, and whether it was replayed from the store (the
/// operation did not run for this call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed<T> {
    /// The operation's value, this call's or the first call's.
    pub value: T,
    /// True when the value is the stored result of an earlier call.
    pub replayed: bool,
}

/// The idempotency executor. Cheap to clone; clones share the store.
#[derive(Clone)]
pub struct Idempotency {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    store: Arc<dyn IdempotencyStore>,
    ttl: Duration,
    lock_timeout: Duration,
    store_timeout: Duration,
    wait_timeout: Duration,
    execution_timeout: Option<Duration>,
    on_unknown: OnUnknown,
    fail: FailMode,
    counts: Counts,
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("name", &self.inner.name)
            .field("store", &self.inner.store)
            .field("ttl", &self.inner.ttl)
            .field("lock_timeout", &self.inner.lock_timeout)
            .field("fail", &self.inner.fail)
            .finish_non_exhaustive()
    }
}

/// `keel_idempotency_total` by result and `keel_store_unavailable_total`.
struct Counts {
    executed: Counter,
    released: Counter,
    replayed: Counter,
    mismatch: Counter,
    wait_timeout: Counter,
    unknown: Counter,
    not_replayable: Counter,
    store_unavailable: Counter,
}

impl Counts {
    fn new(name: &str, fail: FailMode) -> Counts {
        crate::describe_metrics();
        let result = |r: &'static str| metrics::counter!(crate::telemetry::IDEMPOTENCY, "name" => name.to_owned(), "result" => r);
        Counts {
            executed: result("executed"),
            released: result("released"),
            replayed: result("replayed"),
            mismatch: result("mismatch"),
            wait_timeout: result("wait_timeout"),
            unknown: result("unknown"),
            not_replayable: result("not_replayable"),
            store_unavailable: metrics::counter!(
                crate::telemetry::STORE_UNAVAILABLE,
                "policy" => "idempotency",
                "name" => name.to_owned(),
                "mode" => fail.as_str()
            ),
        }
    }
}

/// Builds an [`Idempotency`]; see [`Idempotency::builder`].
#[derive(Debug)]
#[must_use]
pub struct Builder {
    name: Arc<str>,
    store: Option<Arc<dyn IdempotencyStore>>,
    ttl: Duration,
    lock_timeout: Duration,
    store_timeout: Duration,
    wait_timeout: Option<Duration>,
    execution_timeout: Option<Duration>,
    on_unknown: OnUnknown,
    fail: FailMode,
}

impl Builder {
    /// Where records live (default: a new [`MemoryStore`]).
    pub fn store(mut self, store: impl IdempotencyStore + 'static) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// A store shared with other executors (or kept by the caller).
    pub fn shared_store(mut self, store: Arc<dyn IdempotencyStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// How long a result is kept (default 24 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a key stays held without its holder renewing it (default
    /// 30 s). A live holder renews it every third of this; a dead one loses
    /// the key this long after its last renewal.
    pub fn lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout;
        self
    }

    /// Time allowed for each store call (default 1 s).
    pub fn store_timeout(mut self, store_timeout: Duration) -> Self {
        self.store_timeout = store_timeout;
        self
    }

    /// How long a duplicate waits for the call in flight before it gives up
    /// with [`Error::Timeout`] (default: `lock_timeout`).
    pub fn wait_timeout(mut self, wait_timeout: Duration) -> Self {
        self.wait_timeout = Some(wait_timeout);
        self
    }

    /// How long a detached call ([`Idempotency::call_detached`]) may run
    /// once started, whoever is waiting for it (default: `lock_timeout`).
    /// Past it the outcome is unknown.
    pub fn execution_timeout(mut self, execution_timeout: Duration) -> Self {
        self.execution_timeout = Some(execution_timeout);
        self
    }

    /// What an unknown outcome does to the key (default
    /// [`OnUnknown::Conflict`]).
    pub fn on_unknown(mut self, on_unknown: OnUnknown) -> Self {
        self.on_unknown = on_unknown;
        self
    }

    /// What a store failure does (default [`FailMode::FailClosed`]).
    pub fn on_store_error(mut self, fail: FailMode) -> Self {
        self.fail = fail;
        self
    }

    /// The executor, or the first invalid setting.
    pub fn build(self) -> Result<Idempotency, ConfigError> {
        for (field, value) in [
            ("ttl", self.ttl),
            ("lock_timeout", self.lock_timeout),
            ("store_timeout", self.store_timeout),
            (
                "execution_timeout",
                self.execution_timeout.unwrap_or(self.lock_timeout),
            ),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(field, "must be greater than zero"));
            }
        }
        let counts = Counts::new(&self.name, self.fail);
        Ok(Idempotency {
            inner: Arc::new(Inner {
                store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
                ttl: self.ttl,
                lock_timeout: self.lock_timeout,
                store_timeout: self.store_timeout,
                wait_timeout: self.wait_timeout.unwrap_or(self.lock_timeout),
                execution_timeout: self.execution_timeout,
                on_unknown: self.on_unknown,
                fail: self.fail,
                counts,
                name: self.name,
            }),
        })
    }
}

/// The longest pause between two looks at a key held by another call.
const MAX_POLL: Duration = Duration::from_millis(50);

/// What a duplicate that waited out `wait_timeout` is told: ask again in
/// a second.
const IN_PROGRESS_RETRY: Duration = Duration::from_secs(1);

impl Idempotency {
    /// A builder for an executor named `name` (in metrics and logs).
    pub fn builder(name: impl Into<Arc<str>>) -> Builder {
        Builder {
            name: name.into(),
            store: None,
            ttl: Duration::from_secs(24 * 3600),
            lock_timeout: Duration::from_secs(30),
            store_timeout: Duration::from_secs(1),
            wait_timeout: None,
            execution_timeout: None,
            on_unknown: OnUnknown::Conflict,
            fail: FailMode::FailClosed,
        }
    }

    /// The executor's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The store it uses.
    pub fn store(&self) -> &Arc<dyn IdempotencyStore> {
        &self.inner.store
    }

    /// Runs `op` once per `key`: see the [module docs](self). Every error
    /// releases the key (the [`DefaultClassifier`] calls every error
    /// retryable); [`call_classified`](Self::call_classified) decides
    /// otherwise.
    pub async fn call<T, E, F, Fut>(
        &self,
        key: &str,
        fingerprint: &[u8],
        op: F,
    ) -> Result<Completed<T>, Error<E>>
    where
        T: Stored,
        E: Stored,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_classified(&DefaultClassifier, key, fingerprint, op)
            .await
    }

    /// Like [`call`](Self::call); a result `classify` calls retryable
    /// means "did not act" and releases the key, any other is stored.
    pub async fn call_classified<T, E, C, F, Fut>(
        &self,
        classify: &C,
        key: &str,
        fingerprint: &[u8],
        op: F,
    ) -> Result<Completed<T>, Error<E>>
    where
        T: Stored,
        E: Stored,
        C: Classify<T, E> + ?Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let ran = |result: Result<T, E>| {
            result
                .map(|value| Completed {
                    value,
                    replayed: false,
                })
                .map_err(Error::Inner)
        };
        let claim = match self.begin(key, fingerprint).await {
            Ok(Begun::Run(claim)) => claim,
            Ok(Begun::Replay(stored)) => return self.replayed(key, &stored),
            Ok(Begun::Unprotected) => return ran(op().await),
            Err(e) => return Err(e.map_inner(|never| match never {})),
        };
        let result = claim.run(op()).await;
        if classify.classify(&result).retryable {
            claim.release().await;
        } else {
            let mut value = Vec::new();
            result.encode(&mut value);
            claim.complete(&value).await;
        }
        ran(result)
    }

    /// A stored result, decoded.
    fn replayed<T: Stored, E: Stored>(
        &self,
        key: &str,
        stored: &[u8],
    ) -> Result<Completed<T>, Error<E>> {
        match Result::<T, E>::decode(stored) {
            Some(result) => result
                .map(|value| Completed {
                    value,
                    replayed: true,
                })
                .map_err(Error::Inner),
            None => {
                let why = format!("the record for key {key:?} does not decode");
                self.unavailable(StoreError::Corrupt(why))?;
                Err(Error::StoreUnavailable)
            }
        }
    }

    /// Runs `op` once per `key`, detached from the caller: the operation
    /// runs on its own task, so it runs to its end (up to
    /// `execution_timeout`) and its outcome is kept even if the caller
    /// stops waiting (its future is dropped, its own timeout fires). `settle`
    /// says what each result means for the key: [`Settle::Store`] (it ran:
    /// replay it), [`Settle::Release`] (it did not act: the next call runs)
    /// or [`Settle::Unknown`] (it may have acted: `on_unknown` decides).
    /// Past `execution_timeout` the outcome is unknown and the caller gets
    /// [`Error::Timeout`].
    ///
    /// A duplicate of a call that ended unknown gets
    /// [`Error::OutcomeUnknown`] (with [`OnUnknown::Conflict`]); one still
    /// running after `wait_timeout`, [`Error::InProgress`].
    pub async fn call_detached<T, E, S, F, Fut>(
        &self,
        key: &str,
        fingerprint: &[u8],
        settle: S,
        op: F,
    ) -> Result<Completed<T>, Error<E>>
    where
        T: Stored + Send + 'static,
        E: Stored + Send + 'static,
        S: FnOnce(&Result<T, E>) -> Settle + Send + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let claim = match self.begin(key, fingerprint).await {
            Ok(Begun::Run(claim)) => claim,
            Ok(Begun::Replay(stored)) => return self.replayed(key, &stored),
            Ok(Begun::Unprotected) => {
                return op()
                    .await
                    .map(|value| Completed {
                        value,
                        replayed: false,
                    })
                    .map_err(Error::Inner)
            }
            Err(e) => return Err(e.map_inner(|never| match never {})),
        };
        let mut claim = claim;
        claim.unknown_if_dropped();
        let limit = self.execution_timeout();
        let work = op();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let Ok(result) = tokio::time::timeout(limit, claim.run(work)).await else {
                claim.settle(Settled::Unknown).await;
                let _ = tx.send(None);
                return;
            };
            match settle(&result) {
                Settle::Store => {
                    let mut value = Vec::new();
                    result.encode(&mut value);
                    claim.settle(Settled::Stored(&value)).await;
                }
                Settle::Release => claim.settle(Settled::Released).await,
                Settle::Unknown => claim.settle(Settled::Unknown).await,
            }
            let _ = tx.send(Some(result));
        });
        match rx.await {
            Ok(Some(result)) => result
                .map(|value| Completed {
                    value,
                    replayed: false,
                })
                .map_err(Error::Inner),
            Ok(None) => Err(Error::Timeout { after: limit }),
            // The task panicked: what it did is not known.
            Err(_) => Err(Error::OutcomeUnknown),
        }
    }

    /// How long a detached call may run.
    pub fn execution_timeout(&self) -> Duration {
        self.inner
            .execution_timeout
            .unwrap_or(self.inner.lock_timeout)
    }

    /// The first half of a call, for callers whose results are not one
    /// value (a proxy streaming a response it may or may not store): looks
    /// `key` up, waiting for a call in flight, and answers with the stored
    /// result, or the key's [`Claim`] to run under, or (a failed store that
    /// fails open) leave to run unprotected.
    ///
    /// Errors: [`Error::KeyMismatch`], [`Error::Timeout`] (waited
    /// `wait_timeout` for a call in flight), [`Error::StoreUnavailable`]
    /// (a failed store that fails closed).
    /// A stored result may also be [`Error::OutcomeUnknown`] or
    /// [`Error::NotReplayable`]; a store with no room, [`Error::StoreFull`].
    pub async fn begin(
        &self,
        key: &str,
        fingerprint: &[u8],
    ) -> Result<Begun, Error<std::convert::Infallible>> {
        let inner = &*self.inner;
        let waited_since = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let begun = self
                .store_call(inner.store.begin(key, fingerprint, inner.lock_timeout))
                .await;
            match begun {
                Err(StoreError::Full) => {
                    tracing::warn!(target: "keel", policy = "idempotency", name = &*inner.name, key, "the store is full of calls in flight; refused");
                    return Err(Error::StoreFull);
                }
                Err(e) => return self.unavailable(e),
                Ok(Begin::Acquired(token)) => {
                    return Ok(Begun::Run(Claim {
                        executor: self.clone(),
                        key: key.into(),
                        token,
                        done: false,
                        unknown_on_drop: false,
                    }))
                }
                Ok(Begin::Done {
                    fingerprint: first,
                    value,
                }) => {
                    if first != fingerprint {
                        return Err(self.mismatch(key));
                    }
                    return match Settled::decode(&value) {
                        Settled::Stored(value) => {
                            inner.counts.replayed.increment(1);
                            tracing::debug!(target: "keel", policy = "idempotency", name = &*inner.name, key, "replayed the stored result");
                            Ok(Begun::Replay(value.to_vec()))
                        }
                        Settled::Unknown => {
                            inner.counts.unknown.increment(1);
                            Err(Error::OutcomeUnknown)
                        }
                        Settled::NotReplayable => {
                            inner.counts.not_replayable.increment(1);
                            Err(Error::NotReplayable)
                        }
                        Settled::Released => unreachable!("a released key has no record"),
                    };
                }
                Ok(Begin::InFlight { fingerprint: first }) => {
                    if first != fingerprint {
                        return Err(self.mismatch(key));
                    }
                    let waited = waited_since.elapsed();
                    if waited >= inner.wait_timeout {
                        inner.counts.wait_timeout.increment(1);
                        return Err(Error::InProgress {
                            retry_after: IN_PROGRESS_RETRY,
                        });
                    }
                    inner
                        .store
                        .changed(key, pause.min(inner.wait_timeout - waited))
                        .await;
                    pause = (pause * 2).min(MAX_POLL);
                }
            }
        }
    }

    /// Renews `token`'s lock every third of `lock_timeout`, for as long as
    /// it is polled.
    async fn renew(&self, key: &str, token: Token) -> std::convert::Infallible {
        let inner = &*self.inner;
        let every = (inner.lock_timeout / 3).max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(every).await;
            let renewed = self
                .store_call(inner.store.extend(key, token, inner.lock_timeout))
                .await;
            if !matches!(renewed, Ok(true)) {
                tracing::warn!(target: "keel", policy = "idempotency", name = &*inner.name, key, "could not renew the key's lock");
            }
        }
    }

    fn mismatch<E>(&self, key: &str) -> Error<E> {
        self.inner.counts.mismatch.increment(1);
        tracing::debug!(target: "keel", policy = "idempotency", name = &*self.inner.name, key, "key reused with a different request");
        Error::KeyMismatch
    }

    /// The store failed: run unprotected or refuse, by the fail mode.
    fn unavailable<E>(&self, error: StoreError) -> Result<Begun, Error<E>> {
        let inner = &*self.inner;
        inner.counts.store_unavailable.increment(1);
        tracing::warn!(target: "keel", policy = "idempotency", name = &*inner.name, error = %error, mode = inner.fail.as_str(), "idempotency store unavailable");
        match inner.fail {
            FailMode::FailClosed => Err(Error::StoreUnavailable),
            FailMode::FailOpen => Ok(Begun::Unprotected),
        }
    }

    /// Writes a settled record, trying again (three tries in all, 50 and
    /// 200 ms apart) when the store fails: a lost write would free the key
    /// once its lock expires, and the call would run again.
    async fn settle_call(&self, key: &str, token: Token, value: &[u8]) -> Result<bool, StoreError> {
        let inner = &*self.inner;
        let mut last = Err(StoreError::Timeout);
        for pause in [
            Duration::ZERO,
            Duration::from_millis(50),
            Duration::from_millis(200),
        ] {
            tokio::time::sleep(pause).await;
            last = self
                .store_call(inner.store.complete(key, token, value, inner.ttl))
                .await;
            match &last {
                Err(StoreError::Unavailable(_) | StoreError::Timeout) => continue,
                _ => return last,
            }
        }
        last
    }

    async fn store_call<T>(&self, call: StoreFuture<'_, T>) -> Result<T, StoreError> {
        tokio::time::timeout(self.inner.store_timeout, call)
            .await
            .unwrap_or(Err(StoreError::Timeout))
    }
}

/// What [`Idempotency::begin`] found.
#[derive(Debug)]
pub enum Begun {
    /// This call holds the key: run under [`Claim::run`], then
    /// [`settle`](Claim::settle) it.
    Run(Claim),
    /// An earlier call with the same fingerprint stored this result.
    Replay(Vec<u8>),
    /// The store failed and the executor fails open: run without it.
    Unprotected,
}

/// What [`Idempotency::call_detached`] does with a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// The operation ran: keep its result for duplicates.
    Store,
    /// The operation did not act: free the key, the next call runs.
    Release,
    /// The operation may have acted, and its result says nothing of it:
    /// `on_unknown` decides.
    Unknown,
}

/// What an unknown outcome does to its key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnknown {
    /// Keep the key until its record expires (`ttl`): duplicates get
    /// [`Error::OutcomeUnknown`] rather than risk acting twice.
    #[default]
    Conflict,
    /// Free the key: the next duplicate runs. Right only for dependencies
    /// that deduplicate on the forwarded key themselves.
    Release,
}

/// How a held key's call ended: the one place its record is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled<'a> {
    /// It ran; this is its result, replayed to duplicates for `ttl`.
    Stored(&'a [u8]),
    /// It did not act: the key is freed and the next call runs.
    Released,
    /// It may have acted and its answer is not known: by `on_unknown`,
    /// duplicates get [`Error::OutcomeUnknown`] for `ttl`, or the key is
    /// freed.
    Unknown,
    /// It ran, and its answer was not kept (too large): duplicates get
    /// [`Error::NotReplayable`] for `ttl`.
    NotReplayable,
}

/// A settled record's value starts with one of these; anything else is a
/// stored result from before outcomes were recorded (its whole value).
const STORED: u8 = 0x80;
const UNKNOWN: u8 = 0x81;
const NOT_REPLAYABLE: u8 = 0x82;

impl Settled<'_> {
    fn encode(self, out: &mut Vec<u8>) {
        match self {
            Settled::Stored(value) => {
                out.reserve(value.len() + 1);
                out.push(STORED);
                out.extend_from_slice(value);
            }
            Settled::Unknown => out.push(UNKNOWN),
            Settled::NotReplayable => out.push(NOT_REPLAYABLE),
            Settled::Released => {}
        }
    }

    fn decode(bytes: &[u8]) -> Settled<'_> {
        match bytes.split_first() {
            Some((&STORED, value)) => Settled::Stored(value),
            Some((&UNKNOWN, _)) => Settled::Unknown,
            Some((&NOT_REPLAYABLE, _)) => Settled::NotReplayable,
            _ => Settled::Stored(bytes),
        }
    }
}

/// A record's key bound to a principal: `key` alone when `scope` is empty,
/// else the key after the SHA-256 of the scope's values (each
/// length-prefixed), in hex. The values are never kept in clear; the same
/// key under another principal is another record, which can never be
/// replayed to the first. Stable across processes and versions, so a
/// shared store agrees on it.
pub fn scoped_key<'v>(key: &str, scope: impl IntoIterator<Item = &'v [u8]>) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    let mut any = false;
    for value in scope {
        any = true;
        hash.update((value.len() as u64).to_be_bytes());
        hash.update(value);
    }
    if !any {
        return key.to_owned();
    }
    let digest = hash.finalize();
    let mut out = String::with_capacity(33 + key.len());
    for b in &digest[..16] {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out.push('~');
    out.push_str(key);
    out
}

/// A held key. It owns what it needs, so the call can run on a task of its
/// own ([`Idempotency::call_detached`], a proxy's exchange) and outlive
/// whoever asked. Dropped without being settled (a cancelled call), it
/// releases the key in the background.
pub struct Claim {
    executor: Idempotency,
    key: Arc<str>,
    token: Token,
    done: bool,
    /// Dropped unsettled, the outcome is unknown rather than released.
    unknown_on_drop: bool,
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Claim {
    /// The key held.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// From now on, dropping the claim unsettled (a panic, a cancelled
    /// task) records the outcome as unknown instead of releasing the key:
    /// for work that may already have reached the dependency.
    pub fn unknown_if_dropped(&mut self) {
        self.unknown_on_drop = true;
    }

    /// Runs `work` holding the key, renewing the lock every third of
    /// `lock_timeout` while it runs (the renewal's timer is armed only if
    /// the work does not finish at once; no task is spawned).
    pub async fn run<F: Future>(&self, work: F) -> F::Output {
        let mut work = std::pin::pin!(work);
        let mut renewing = std::pin::pin!(self.executor.renew(&self.key, self.token));
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(output);
            }
            let _never = renewing.as_mut().poll(cx);
            Poll::Pending
        })
        .await
    }

    /// Stores `value` as the key's result: [`Settled::Stored`].
    pub async fn complete(self, value: &[u8]) {
        self.settle(Settled::Stored(value)).await;
    }

    /// Frees the key: [`Settled::Released`].
    pub async fn release(self) {
        self.settle(Settled::Released).await;
    }

    /// Records how the call ended. A result too large for the store is
    /// kept as [`Settled::NotReplayable`]: the operation ran, so its key
    /// must not run again.
    pub async fn settle(mut self, settled: Settled<'_>) {
        self.done = true;
        let executor = &self.executor;
        let inner = &*executor.inner;
        let key = &*self.key;
        let settled = match settled {
            Settled::Unknown if inner.on_unknown == OnUnknown::Release => {
                inner.counts.unknown.increment(1);
                Settled::Released
            }
            other => other,
        };
        if settled == Settled::Released {
            if let Err(e) = executor
                .store_call(inner.store.release(key, self.token))
                .await
            {
                tracing::warn!(target: "keel", policy = "idempotency", name = &*inner.name, key, error = %e, "could not release the key; it frees itself when its lock expires");
            }
            inner.counts.released.increment(1);
            return;
        }
        let mut value = Vec::new();
        settled.encode(&mut value);
        let mut stored = executor.settle_call(key, self.token, &value).await;
        if matches!(stored, Err(StoreError::Full)) {
            tracing::warn!(target: "keel", policy = "idempotency", name = &*inner.name, key, bytes = value.len(), "the result does not fit in the store; its key is kept as not replayable");
            value.clear();
            Settled::NotReplayable.encode(&mut value);
            stored = executor.settle_call(key, self.token, &value).await;
        }
        match stored {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(target: "keel", policy = "idempotency", name = &*inner.name, key, "the key's lock expired while the call ran; its outcome was not stored")
            }
            Err(e) => {
                tracing::warn!(target: "keel", policy = "idempotency", name = &*inner.name, key, error = %e, "could not store the outcome; a duplicate will run again once the lock expires")
            }
        }
        match settled {
            Settled::Unknown => inner.counts.unknown.increment(1),
            Settled::NotReplayable => inner.counts.not_replayable.increment(1),
            _ => {}
        }
        inner.counts.executed.increment(1);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (executor, key, token) = (self.executor.clone(), self.key.clone(), self.token);
            let inner = &*executor.inner;
            if self.unknown_on_drop && inner.on_unknown == OnUnknown::Conflict {
                inner.counts.unknown.increment(1);
                runtime.spawn(async move {
                    let mut value = Vec::new();
                    Settled::Unknown.encode(&mut value);
                    let _ = executor.settle_call(&key, token, &value).await;
                });
            } else {
                let store = inner.store.clone();
                runtime.spawn(async move {
                    let _ = store.release(&key, token).await;
                });
            }
        }
    }
}
