//! Redis as the store a fleet shares; see [`RedisStore`].

use std::fmt;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{FromRedisValue, Script, ScriptInvocation};
use tokio::sync::OnceCell;

use super::{StoreError, StoreFuture};
use crate::idempotency::{Begin, IdempotencyStore, Token};
use crate::rate_limit::{Gcra, GcraStore};
use crate::ConfigError;

/// Claims a free key, or reports its live record.
/// KEYS[1] the record; ARGV: fingerprint, token, lock_ms.
const BEGIN: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'done' then
  local r = redis.call('HMGET', KEYS[1], 'fp', 'value')
  return {'done', r[1], r[2]}
elseif state == 'inflight' then
  return {'inflight', redis.call('HGET', KEYS[1], 'fp')}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'inflight', 'token', ARGV[2], 'fp', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'acquired'}
";

/// Stores the holder's result. KEYS[1] the record; ARGV: token, value,
/// ttl_ms. 1 if stored, 0 if the token no longer holds the key.
const COMPLETE: &str = r"
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'inflight' or r[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'value', ARGV[2])
redis.call('HDEL', KEYS[1], 'token')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Frees the key if the token holds it. KEYS[1] the record; ARGV: token.
const RELEASE: &str = r"
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] == 'inflight' and r[2] == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
";

/// Renews the holder's lock. KEYS[1] the record; ARGV: token, lock_ms.
const EXTEND: &str = r"
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'inflight' or r[2] ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// GCRA in Redis's clock, in microseconds (a Lua number holds them exactly;
/// nanoseconds since 1970 it would not). KEYS[1] the key's TAT; ARGV:
/// interval_us, capacity_us, n (fractional microseconds allowed). Returns
/// -1 if admitted, else the wait in whole microseconds, rounded up.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
local new = tat + tonumber(ARGV[3]) * interval
local ahead = new - now
if ahead > capacity then return math.ceil(ahead - capacity) end
redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', math.ceil(ahead / 1000) + 1)
return -1
";

/// Redis as the store a fleet shares: idempotency records and GCRA rate
/// limits, each decision one Lua script, so one atomic round trip.
///
/// Layout, under the store's key prefix (default `keel:`):
///
/// - `{prefix}idem:{key}`: a hash. `state` is `inflight` (with the holder's
///   `token`) or `done` (with the stored `value`); `fp` is the request's
///   fingerprint. Redis expires the key itself: at the holder's lock
///   timeout while in flight, at the ttl once done. A dead holder's key is
///   therefore free once its lock runs out, with no sweeper.
/// - `{prefix}rl:{limiter}:{key}`: the key's theoretical arrival time, in
///   microseconds of Redis's own clock (`TIME`), expiring when it has
///   passed. Instances' clocks never enter a decision.
///
/// The connection is made on first use and remade after a failure
/// (redis-rs's `ConnectionManager`, one multiplexed connection: concurrent
/// calls are pipelined on it). A store whose Redis is down answers
/// [`StoreError::Unavailable`] quickly, and its user's fail mode decides.
///
/// Implements [`IdempotencyStore`] and [`GcraStore`].
pub struct RedisStore {
    client: ::redis::Client,
    url: String,
    prefix: String,
    connect_timeout: Duration,
    conn: OnceCell<ConnectionManager>,
    begin: Script,
    complete: Script,
    release: Script,
    extend: Script,
    gcra: Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://host:port/db`). Nothing is
    /// connected yet: the first call connects, so a fleet can start while
    /// Redis is down (its calls then fail, by their fail mode).
    pub fn open(url: &str) -> Result<RedisStore, ConfigError> {
        let client = ::redis::Client::open(url)
            .map_err(|e| ConfigError::new("url", format!("not a Redis URL ({e}): {url:?}")))?;
        Ok(RedisStore {
            client,
            url: url.to_owned(),
            prefix: "keel:".to_owned(),
            connect_timeout: Duration::from_secs(1),
            conn: OnceCell::new(),
            begin: Script::new(BEGIN),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
            extend: Script::new(EXTEND),
            gcra: Script::new(GCRA),
        })
    }

    /// What every key this store writes starts with (default `keel:`), so
    /// that several deployments can share one Redis.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a connection attempt may take (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The connection, made on first use. A failed attempt leaves none, so
    /// the next call tries again; once made, the manager reconnects itself.
    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        self.conn
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.connect_timeout)
                    // One attempt per reconnection: a call waiting on a
                    // reconnection learns of a dead Redis at once and the
                    // next call tries again, instead of queueing behind a
                    // backoff schedule.
                    .set_number_of_retries(0);
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await
            .cloned()
            .map_err(unavailable)
    }

    /// Runs `script` on `key` with the arguments `args` adds: one
    /// EVALSHA (the script is loaded on its first NOSCRIPT).
    async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        key: Vec<u8>,
        args: impl FnOnce(&mut ScriptInvocation<'_>),
    ) -> Result<T, StoreError> {
        let mut conn = self.conn().await?;
        let mut call = script.prepare_invoke();
        call.key(key);
        args(&mut call);
        call.invoke_async(&mut conn).await.map_err(unavailable)
    }

    fn key(&self, kind: &str, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + kind.len() + key.len());
        k.extend_from_slice(self.prefix.as_bytes());
        k.extend_from_slice(kind.as_bytes());
        k.extend_from_slice(key);
        k
    }
}

fn unavailable(e: ::redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn millis(d: Duration) -> u64 {
    // Redis refuses a zero expiry; a lock shorter than 1 ms is 1 ms.
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn token_bytes(token: Token) -> [u8; 16] {
    token.0.to_be_bytes()
}

impl IdempotencyStore for RedisStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a [u8],
        lock_timeout: Duration,
    ) -> StoreFuture<'a, Begin> {
        Box::pin(async move {
            let token = Token::random();
            let reply: Vec<Vec<u8>> = self
                .eval(&self.begin, self.key("idem:", key.as_bytes()), |call| {
                    call.arg(fingerprint)
                        .arg(&token_bytes(token)[..])
                        .arg(millis(lock_timeout));
                })
                .await?;
            let mut reply = reply.into_iter();
            let state = reply.next().unwrap_or_default();
            match (state.as_slice(), reply.next(), reply.next()) {
                (b"acquired", None, None) => Ok(Begin::Acquired(token)),
                (b"inflight", Some(fingerprint), None) => Ok(Begin::InFlight { fingerprint }),
                (b"done", Some(fingerprint), Some(value)) => Ok(Begin::Done { fingerprint, value }),
                _ => Err(StoreError::Corrupt(format!(
                    "record {key:?} is not one keel wrote"
                ))),
            }
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: Token,
        value: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let stored: i64 = self
                .eval(&self.complete, self.key("idem:", key.as_bytes()), |call| {
                    call.arg(&token_bytes(token)[..])
                        .arg(value)
                        .arg(millis(ttl));
                })
                .await?;
            Ok(stored == 1)
        })
    }

    fn release<'a>(&'a self, key: &'a str, token: Token) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let _: i64 = self
                .eval(&self.release, self.key("idem:", key.as_bytes()), |call| {
                    call.arg(&token_bytes(token)[..]);
                })
                .await?;
            Ok(())
        })
    }

    fn extend<'a>(
        &'a self,
        key: &'a str,
        token: Token,
        lock_timeout: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let held: i64 = self
                .eval(&self.extend, self.key("idem:", key.as_bytes()), |call| {
                    call.arg(&token_bytes(token)[..]).arg(millis(lock_timeout));
                })
                .await?;
            Ok(held == 1)
        })
    }
}

impl GcraStore for RedisStore {
    fn acquire<'a>(
        &'a self,
        key: &'a [u8],
        gcra: Gcra,
        n: u32,
    ) -> StoreFuture<'a, Result<(), Duration>> {
        Box::pin(async move {
            // Microseconds with three decimals: exact for any rate up to
            // one request a nanosecond.
            let micros = |nanos: u64| format!("{}.{:03}", nanos / 1000, nanos % 1000);
            let wait: i64 = self
                .eval(&self.gcra, self.key("rl:", key), |call| {
                    call.arg(micros(gcra.interval_nanos))
                        .arg(micros(gcra.capacity_nanos))
                        .arg(n);
                })
                .await?;
            Ok(match u64::try_from(wait) {
                Ok(micros) => Err(Duration::from_micros(micros)),
                Err(_) => Ok(()),
            })
        })
    }
}
