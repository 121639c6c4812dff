//! What every store shared between instances has in common: its calls
//! are futures that can fail ([`StoreError`]), and each use of a store says
//! what a failure does ([`FailMode`]).
//!
//! The stores themselves live with their users:
//! [`IdempotencyStore`](crate::idempotency::IdempotencyStore) for
//! idempotency records and [`GcraStore`](crate::rate_limit::GcraStore) for
//! shared rate limits. `RedisStore` (feature `redis`) is both.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

/// A store call in flight.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Why a store call failed. A store's user treats every kind the same way,
/// by its fail mode; the kind is for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store could not be reached, or answered with an error.
    Unavailable(String),
    /// The store did not answer within its user's store timeout.
    Timeout,
    /// The store has no room for another key.
    Full,
    /// A record in the store could not be read (written by something else).
    Corrupt(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
            StoreError::Timeout => f.write_str("store did not answer in time"),
            StoreError::Full => f.write_str("store full"),
            StoreError::Corrupt(why) => write!(f, "unreadable record in the store: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// What a store failure does to the call that needed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Let the call through without the store's protection (the default
    /// for rate limits: an outage of the store must not become an outage
    /// of the service).
    FailOpen,
    /// Refuse the call ([`Error::StoreUnavailable`](crate::Error::StoreUnavailable));
    /// the default for idempotency, where running twice is the harm.
    FailClosed,
}

impl FailMode {
    /// `fail_open` or `fail_closed`, as in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::FailOpen => "fail_open",
            FailMode::FailClosed => "fail_closed",
        }
    }
}
