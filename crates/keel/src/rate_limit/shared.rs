//! A GCRA limiter whose state lives in a store shared by several instances
//! (processes, hosts), so that a limit holds for the fleet, not per copy.
//!
//! The in-memory limiters decide in nanoseconds and cannot fail. A shared
//! store is a network round trip that can: the decision is one atomic step
//! in the store ([`GcraStore::acquire`], timed by the store's own clock so
//! the instances' clocks need not agree), every call has a timeout, and a
//! failure lets the request through or refuses it as the limiter's
//! [`FailMode`] says (default: let it through, counted in
//! `keel_store_unavailable_total`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;

use super::{limited, Rate, RateLimited};
use crate::events::{Policy, PolicyEvents, Reason};
use crate::store::{FailMode, StoreError, StoreFuture};
use crate::telemetry::Refusals;
use crate::Error;

/// The rate a shared limiter asks its store to enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Nanoseconds between requests at the sustained rate.
    pub interval_nanos: u64,
    /// How far ahead of time requests may run: burst x interval.
    pub capacity_nanos: u64,
}

/// A store that runs GCRA decisions for keys, each one atomic step in the
/// store. Implemented by `RedisStore` (feature `redis`).
pub trait GcraStore: Send + Sync + fmt::Debug {
    /// Admits `n` requests for `key` at `gcra`'s rate (recording them), or
    /// answers how long until they would be admitted. `n x interval` is
    /// never above the capacity (the limiter refuses such requests itself).
    fn acquire<'a>(
        &'a self,
        key: &'a [u8],
        gcra: Gcra,
        n: u32,
    ) -> StoreFuture<'a, Result<(), Duration>>;
}

/// Why a shared limiter refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Over the rate.
    RateLimited(RateLimited),
    /// The store failed and the limiter fails closed.
    StoreUnavailable(StoreError),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::RateLimited(r) => r.fmt(f),
            Refused::StoreUnavailable(e) => write!(f, "rate limit store: {e}"),
        }
    }
}

impl std::error::Error for Refused {}

impl<E> From<Refused> for Error<E> {
    fn from(r: Refused) -> Self {
        match r {
            Refused::RateLimited(r) => r.into(),
            Refused::StoreUnavailable(_) => Error::StoreUnavailable,
        }
    }
}

/// A GCRA limiter per key, shared through a [`GcraStore`]. Build with
/// [`RateLimiter::builder(..).build_shared(store)`](super::Builder::build_shared).
///
/// Keys are namespaced by the limiter's name, so limiters with different
/// names share a store without sharing counts, and instances whose limiters
/// have the same name share them.
pub struct SharedRateLimiter {
    name: Arc<str>,
    rate: Rate,
    store: Arc<dyn GcraStore>,
    store_timeout: Duration,
    fail: FailMode,
    refusals: Refusals,
    unavailable: Counter,
}

impl fmt::Debug for SharedRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRateLimiter")
            .field("name", &self.name)
            .field("rate", &self.rate)
            .field("store", &self.store)
            .field("fail", &self.fail)
            .finish_non_exhaustive()
    }
}

impl SharedRateLimiter {
    pub(super) fn new(
        name: Arc<str>,
        rate: Rate,
        store: Arc<dyn GcraStore>,
        store_timeout: Duration,
        fail: FailMode,
    ) -> Self {
        crate::describe_metrics();
        SharedRateLimiter {
            refusals: Refusals::new(Policy::RateLimiter, &name, Reason::RateLimited),
            unavailable: metrics::counter!(
                crate::telemetry::STORE_UNAVAILABLE,
                "policy" => "rate_limiter",
                "name" => name.to_string(),
                "mode" => fail.as_str()
            ),
            name,
            rate,
            store,
            store_timeout,
            fail,
        }
    }

    /// The limiter's events: rejected requests.
    pub fn events(&self) -> &PolicyEvents {
        self.refusals.events()
    }

    /// What a store failure does.
    pub fn fail_mode(&self) -> FailMode {
        self.fail
    }

    /// Admits one request for `key`, or says why not.
    pub async fn check_key(&self, key: &[u8]) -> Result<(), Refused> {
        self.check_key_n(key, 1).await
    }

    /// Admits `n` requests for `key` at once, or none.
    pub async fn check_key_n(&self, key: &[u8], n: u32) -> Result<(), Refused> {
        let gcra = self.rate.gcra();
        if u64::from(n).saturating_mul(gcra.interval_nanos) > gcra.capacity_nanos {
            return Err(Refused::RateLimited(limited(&self.refusals, Duration::MAX)));
        }
        let mut namespaced = Vec::with_capacity(self.name.len() + 1 + key.len());
        namespaced.extend_from_slice(self.name.as_bytes());
        namespaced.push(b':');
        namespaced.extend_from_slice(key);
        let answer = match tokio::time::timeout(
            self.store_timeout,
            self.store.acquire(&namespaced, gcra, n),
        )
        .await
        {
            Ok(answer) => answer,
            Err(_) => Err(StoreError::Timeout),
        };
        match answer {
            Ok(Ok(())) => Ok(()),
            Ok(Err(wait)) => Err(Refused::RateLimited(limited(&self.refusals, wait))),
            Err(e) => {
                self.unavailable.increment(1);
                tracing::warn!(limiter = %self.name, error = %e, mode = self.fail.as_str(), "rate limit store failed");
                match self.fail {
                    FailMode::FailOpen => Ok(()),
                    FailMode::FailClosed => Err(Refused::StoreUnavailable(e)),
                }
            }
        }
    }
}
