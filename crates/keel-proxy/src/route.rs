//! A route: its policies, built from the library's primitives, and the path
//! of one request through them.
//!
//! Outermost first: load shedding (shared by every route), the rate limit,
//! the total timeout, the bulkhead, retry (idempotent requests only), and per
//! attempt the circuit breaker, the per-try timeout, injected faults and the
//! upstream call. The fallback answers whatever failure comes out, if it is
//! one it is configured for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Body as _;
use keel::bulkhead::Bulkhead;
use keel::chaos::Chaos;
use keel::circuit_breaker::CircuitBreaker;
use keel::classify::{Outcome, Verdict};
use keel::idempotency::{scoped_key, Begun, Claim, Idempotency, Settled};
use keel::rate_limit::{KeyedRateLimiter, RateLimiter, Refused, SharedRateLimiter};
use keel::retry::Retry;
use keel::shed::{LoadShedder, Priority};
use keel::timeout::Timeout;

use crate::config::{self, Condition, RateKey};
use crate::h1::RequestBody;
use crate::idempotency;
use crate::metrics::RouteMetrics;
use crate::stall::{ClientBody, ClientBodyError, Sending};
use crate::store::Stores;
use crate::upstream::{PooledBody, SendError, Upstream, Written};

/// A response on its way to the client: the upstream's, streamed, or one
/// keel wrote.
pub(crate) type ResponseBody = Either<PooledBody, Full<Bytes>>;

/// Request bodies up to this size are buffered so that a retry can send
/// them again; larger or unsized ones stream through in one attempt.
const MAX_REPLAYABLE_BODY: u64 = 1 << 20;

/// Keyed requests' executions still running, detached from their clients:
/// shutdown waits for them (up to `server.shutdown_timeout`), since one cut
/// off leaves its key held, unsettled, until its lock expires; then a
/// duplicate runs again.
static EXECUTIONS: Executions = Executions {
    running: std::sync::atomic::AtomicUsize::new(0),
    idle: tokio::sync::Notify::const_new(),
};

struct Executions {
    running: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One execution, counted while it lives.
struct Running;

impl Running {
    fn start() -> Running {
        EXECUTIONS
            .running
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if EXECUTIONS
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            EXECUTIONS.idle.notify_waiters();
        }
    }
}

/// Resolves when no keyed request's execution is running.
pub(crate) async fn executions_finished() {
    loop {
        let idle = EXECUTIONS.idle.notified();
        let mut idle = std::pin::pin!(idle);
        idle.as_mut().enable();
        if EXECUTIONS
            .running
            .load(std::sync::atomic::Ordering::Acquire)
            == 0
        {
            return;
        }
        idle.await;
    }
}

/// Keys a keyed rate limit remembers at most.
const MAX_RATE_KEYS: usize = 100_000;

pub(crate) const REASON: HeaderName = HeaderName::from_static("x-keel-reason");
pub(crate) const PRIORITY: HeaderName = HeaderName::from_static("x-keel-priority");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The client at the other end of a connection.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    /// Its IP as a header value, for `x-forwarded-for`, made once per
    /// connection.
    ip: HeaderValue,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr) -> Peer {
        Peer {
            ip: HeaderValue::from_str(&addr.ip().to_string())
                .expect("an IP is a valid header value"),
            addr,
        }
    }
}

/// Why a request did not get its upstream's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No connection to an endpoint (or none in rotation).
    Connect,
    /// Every connection to the endpoint (`max_connections`) stayed busy
    /// for `connect_timeout`: keel's own bound, not the endpoint failing.
    PoolFull,
    /// The connection failed before a response.
    Reset,
    /// The per-try or the total timeout.
    Timeout,
    /// The upstream answered with a status the fallback replaces.
    Status(u16),
    /// An injected abort, with its status.
    Injected(u16),
    /// The route's breaker is open.
    CircuitOpen(Duration),
    /// The route's bulkhead is full.
    BulkheadFull,
    /// Over the route's rate limit.
    RateLimited(Duration),
    /// Shed under load.
    Shed,
    /// The request's body could not be read.
    BadBody,
    /// The request's body stalled: no byte within
    /// `server.request_body_timeout`, or a timeout while keel waited for it.
    RequestTimeout,
    /// A body too large for what the route must do with it (hash it for
    /// an idempotency key).
    TooLarge,
    /// An idempotency key that is not visible ASCII.
    BadKey,
    /// An idempotency key reused for another request.
    KeyMismatch,
    /// A duplicate waited out its timeout while the first with its key
    /// still ran.
    InProgress(Duration),
    /// The first with this key reached the upstream and ended without an
    /// answer; the key is kept.
    OutcomeUnknown,
    /// The first with this key ran; its answer was too large to keep.
    NotReplayable,
    /// The memory store is full of requests still running.
    StoreFull,
    /// The store failed and the policy fails closed.
    StoreUnavailable,
    /// No route matched.
    NoRoute,
    /// `TRACE` or `CONNECT`.
    MethodNotAllowed,
    /// HTTP/1.1 without exactly one `Host`, or an unusable authority.
    BadHost,
    /// A path that climbs above the root.
    BadPath,
}

impl Failure {
    /// The `x-keel-reason` of a response keel writes for this failure.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Failure::Connect | Failure::Reset | Failure::PoolFull => "upstream-unavailable",
            Failure::Timeout => "timeout",
            Failure::Status(_) => "upstream-error",
            Failure::Injected(_) => "fault-injected",
            Failure::CircuitOpen(_) => "circuit-open",
            Failure::BulkheadFull => "bulkhead-full",
            Failure::RateLimited(_) => "rate-limited",
            Failure::Shed => "shed",
            Failure::BadBody | Failure::BadKey | Failure::BadHost | Failure::BadPath => {
                "bad-request"
            }
            Failure::MethodNotAllowed => "method-not-allowed",
            Failure::RequestTimeout => "request-timeout",
            Failure::TooLarge => "body-too-large",
            Failure::KeyMismatch => "idempotency-key-mismatch",
            Failure::InProgress(_) => "idempotency-in-progress",
            Failure::OutcomeUnknown => "idempotency-outcome-unknown",
            Failure::NotReplayable => "idempotency-not-replayable",
            Failure::StoreFull => "store-full",
            Failure::StoreUnavailable => "store-unavailable",
            Failure::NoRoute => "no-route",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Failure::Connect | Failure::Reset => StatusCode::BAD_GATEWAY,
            Failure::PoolFull => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::Status(s) | Failure::Injected(s) => {
                StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            Failure::CircuitOpen(_)
            | Failure::BulkheadFull
            | Failure::Shed
            | Failure::StoreUnavailable
            | Failure::StoreFull => StatusCode::SERVICE_UNAVAILABLE,
            Failure::InProgress(_) | Failure::OutcomeUnknown | Failure::NotReplayable => {
                StatusCode::CONFLICT
            }
            Failure::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Failure::BadBody | Failure::BadKey | Failure::BadHost | Failure::BadPath => {
                StatusCode::BAD_REQUEST
            }
            Failure::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Failure::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Failure::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Failure::KeyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Failure::NoRoute => StatusCode::NOT_FOUND,
        }
    }

    fn retry_after(self) -> Option<Duration> {
        match self {
            Failure::CircuitOpen(d) | Failure::RateLimited(d) | Failure::InProgress(d) => Some(d),
            Failure::StoreFull => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    fn describe(self, route: &str) -> String {
        match self {
            Failure::Connect => {
                format!("route \"{route}\": no connection to the upstream could be made")
            }
            Failure::Reset => {
                format!("route \"{route}\": the upstream connection failed before a response")
            }
            Failure::PoolFull => format!(
                "route \"{route}\": every connection to the endpoint (its upstream's max_connections) stayed busy for connect_timeout; the request did not run"
            ),
            Failure::Timeout => format!("route \"{route}\": the upstream did not answer in time"),
            Failure::Status(s) => format!("route \"{route}\": the upstream answered {s}"),
            Failure::Injected(s) => format!(
                "route \"{route}\": fault injected (chaos): {s} without calling the upstream"
            ),
            Failure::CircuitOpen(d) => format!(
                "route \"{route}\": circuit breaker is open; retry after {}",
                keel::config::format_duration(d)
            ),
            Failure::BulkheadFull => {
                format!("route \"{route}\": bulkhead full; the request did not run")
            }
            Failure::RateLimited(d) => format!(
                "route \"{route}\": rate limited; retry after {}",
                keel::config::format_duration(d)
            ),
            Failure::Shed => {
                format!("route \"{route}\": shed: the proxy is overloaded; the request did not run")
            }
            Failure::BadBody => format!("route \"{route}\": the request body could not be read"),
            Failure::RequestTimeout => format!(
                "route \"{route}\": the request body stalled (no byte within server.request_body_timeout, or the route's timeout passed while keel waited for it)"
            ),
            Failure::TooLarge => format!(
                "route \"{route}\": a request with an idempotency key may carry at most 1 MiB"
            ),
            Failure::BadKey => {
                format!("route \"{route}\": the idempotency key must be 1 to 256 visible ASCII characters")
            }
            Failure::KeyMismatch => format!(
                "route \"{route}\": this idempotency key was used for a different request (method, path, query or body)"
            ),
            Failure::StoreUnavailable => format!(
                "route \"{route}\": the state store is unavailable; the request did not run"
            ),
            Failure::InProgress(_) => format!(
                "route \"{route}\": a request with this idempotency key is still running; ask again later for its response"
            ),
            Failure::OutcomeUnknown => format!(
                "route \"{route}\": the first request with this idempotency key reached the upstream and ended without an answer; it may have acted, so the key is kept until it expires"
            ),
            Failure::NotReplayable => format!(
                "route \"{route}\": the first request with this idempotency key ran, but its response was too large to keep; it cannot be replayed"
            ),
            Failure::StoreFull => format!(
                "route \"{route}\": the idempotency store is full of requests still running; the request did not run"
            ),
            Failure::NoRoute => "no route matches this path".to_owned(),
            Failure::MethodNotAllowed => "keel does not proxy TRACE or CONNECT".to_owned(),
            Failure::BadHost => {
                "an HTTP/1.1 request needs exactly one Host header".to_owned()
            }
            Failure::BadPath => "the path climbs above the root with \"..\"".to_owned(),
        }
    }

    /// Whether it counts against the upstream (breaker, outlier detection).
    fn is_upstream_failure(self) -> bool {
        match self {
            Failure::Connect | Failure::Reset | Failure::Timeout => true,
            Failure::Status(s) | Failure::Injected(s) => s >= 500,
            _ => false,
        }
    }

    /// The response keel writes for it.
    pub(crate) fn response(self, route: &str) -> Response<ResponseBody> {
        let mut body = self.describe(route);
        body.push('\n');
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(REASON, HeaderValue::from_static(self.reason()));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(after) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, retry_after_seconds(after));
        }
        if self == Failure::MethodNotAllowed {
            headers.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        if self == Failure::TooLarge || self == Failure::RequestTimeout {
            // The body was not read: the connection cannot carry another
            // request, and the client must not wait to reuse it.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// Whole seconds, rounded up, at least 1.
fn retry_after_seconds(d: Duration) -> HeaderValue {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

/// A set of conditions, checked per failure.
#[derive(Debug, Clone, Default)]
struct Conditions {
    connect: bool,
    reset: bool,
    timeout: bool,
    server_error: bool,
    gateway_error: bool,
    statuses: Vec<u16>,
    circuit_open: bool,
    bulkhead_full: bool,
    rate_limited: bool,
    shed: bool,
    /// Any injected abort, whatever its status (a fallback's default).
    injected: bool,
}

impl Conditions {
    fn new(list: &[Condition]) -> Conditions {
        let mut c = Conditions::default();
        for condition in list {
            match *condition {
                Condition::ConnectFailure => c.connect = true,
                Condition::Reset => c.reset = true,
                Condition::Timeout => c.timeout = true,
                Condition::ServerError => c.server_error = true,
                Condition::GatewayError => c.gateway_error = true,
                Condition::Status(s) => c.statuses.push(s),
                Condition::CircuitOpen => c.circuit_open = true,
                Condition::BulkheadFull => c.bulkhead_full = true,
                Condition::RateLimited => c.rate_limited = true,
                Condition::Shed => c.shed = true,
            }
        }
        c
    }

    /// A fallback's default: every failure except rate limiting.
    fn every_failure() -> Conditions {
        Conditions {
            connect: true,
            reset: true,
            timeout: true,
            server_error: true,
            circuit_open: true,
            bulkhead_full: true,
            shed: true,
            injected: true,
            ..Conditions::default()
        }
    }

    fn status(&self, s: u16) -> bool {
        (self.server_error && s >= 500)
            || (self.gateway_error && (502..=504).contains(&s))
            || self.statuses.contains(&s)
    }

    fn matches(&self, failure: Failure) -> bool {
        match failure {
            Failure::Connect => self.connect,
            Failure::Reset => self.reset,
            Failure::Timeout => self.timeout,
            Failure::Status(s) => self.status(s),
            // An injected abort is the dependency failing with its status:
            // a fallback's default takes any.
            Failure::Injected(s) => self.injected || self.status(s),
            Failure::CircuitOpen(_) => self.circuit_open,
            Failure::BulkheadFull => self.bulkhead_full,
            Failure::RateLimited(_) => self.rate_limited,
            Failure::Shed => self.shed,
            Failure::BadBody
            | Failure::TooLarge
            | Failure::BadKey
            | Failure::KeyMismatch
            | Failure::InProgress(_)
            | Failure::OutcomeUnknown
            | Failure::NotReplayable
            | Failure::StoreFull
            | Failure::StoreUnavailable
            | Failure::NoRoute
            | Failure::MethodNotAllowed
            | Failure::BadHost
            | Failure::BadPath
            | Failure::RequestTimeout
            | Failure::PoolFull => false,
        }
    }
}

enum Limiter {
    Global(RateLimiter),
    Keyed(Box<KeyedRateLimiter<[u8; 16]>>, KeyBy),
    /// Counted in the shared store, by every instance.
    Shared(Box<SharedRateLimiter>, KeyBy),
}

/// What a keyed limit counts by.
enum KeyBy {
    All,
    Ip,
    Header(HeaderName),
}

impl KeyBy {
    /// The key, a fixed 16 bytes whatever the client sent: an IP as
    /// itself (v4 mapped to v6), a header's value as the first half of its
    /// SHA-256 (stable, so instances sharing a Redis count alike, and a
    /// client cannot grow a limiter's memory with long values).
    fn key(&self, headers: &HeaderMap, peer: &Peer) -> [u8; 16] {
        match self {
            KeyBy::All => [0; 16],
            KeyBy::Ip => match peer.addr.ip() {
                std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(ip) => ip.octets(),
            },
            KeyBy::Header(name) => {
                use sha2::{Digest, Sha256};
                let value = headers.get(name).map_or(&[][..], HeaderValue::as_bytes);
                let digest = Sha256::digest(value);
                let mut key = [0; 16];
                key.copy_from_slice(&digest[..16]);
                key
            }
        }
    }
}

impl Limiter {
    async fn check(&self, headers: &HeaderMap, peer: &Peer) -> Result<(), Failure> {
        let limited = |r: keel::rate_limit::RateLimited| Failure::RateLimited(r.retry_after);
        match self {
            Limiter::Global(limiter) => limiter.check().map_err(limited),
            Limiter::Keyed(limiter, by) => {
                limiter.check_key(&by.key(headers, peer)).map_err(limited)
            }
            Limiter::Shared(limiter, by) => match limiter.check_key(&by.key(headers, peer)).await {
                Ok(()) => Ok(()),
                Err(Refused::RateLimited(r)) => Err(limited(r)),
                Err(Refused::StoreUnavailable(_)) => Err(Failure::StoreUnavailable),
            },
        }
    }
}

/// A route's idempotency keys.
struct Once {
    executor: Idempotency,
    header: HeaderName,
    max_body: u64,
    /// Headers whose values bind a record to a principal.
    scope: Vec<HeaderName>,
}

struct Fallback {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    on: Conditions,
}

struct Fault {
    chaos: Chaos,
    abort_status: u16,
}

/// A route, built from its configuration. Unchanged routes are kept across
/// reloads, and with them their breaker, limiter and bulkhead state.
pub(crate) struct Route {
    pub(crate) name: Arc<str>,
    pub(crate) config: config::Route,
    pub(crate) upstream: Arc<Upstream>,
    timeout: Timeout,
    per_try: Option<Timeout>,
    /// The upstream's `read_timeout` for a response head, when it is
    /// shorter than the route's own timeouts (else those end the wait).
    head_timeout: Option<Duration>,
    retry: Option<(Retry, Conditions)>,
    pub(crate) breaker: Option<CircuitBreaker>,
    pub(crate) bulkhead: Option<Bulkhead>,
    limiter: Option<Limiter>,
    fallback: Option<Fallback>,
    fault: Option<Fault>,
    once: Option<Once>,
    /// The store its idempotency keys and shared limit use, if any.
    pub(crate) stores: Option<Arc<Stores>>,
    pub(crate) metrics: RouteMetrics,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// Builds a route's policies. The configuration was checked, so the
    /// library's own checks pass; any error is reported with its field.
    pub(crate) fn new(
        config: &config::Route,
        upstream: Arc<Upstream>,
        stores: &Arc<Stores>,
    ) -> Result<Route, keel::ConfigError> {
        let name: Arc<str> = config.name.as_str().into();
        let field = |prefix: &str| {
            let prefix = prefix.to_owned();
            move |e: keel::ConfigError| {
                keel::ConfigError::new(format!("{prefix}.{}", e.field()), e.reason())
            }
        };
        let retry = match &config.retry {
            Some(r) => {
                let mut policy = r.policy();
                // Retries stop when the next attempt would start too late.
                policy.time_budget = Some(config.timeout);
                Some((
                    policy.build(name.clone()).map_err(field("retry"))?,
                    Conditions::new(&r.on),
                ))
            }
            None => None,
        };
        let limiter = match &config.rate_limit {
            Some(rl) => {
                let builder = RateLimiter::builder(name.clone())
                    .per_second(rl.requests_per_second)
                    .burst(rl.burst);
                let by = match &rl.key {
                    RateKey::Global => KeyBy::All,
                    RateKey::Ip => KeyBy::Ip,
                    RateKey::Header(name) => {
                        KeyBy::Header(HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                            keel::ConfigError::new("rate_limit.key", "not a header name")
                        })?)
                    }
                };
                Some(match (by, rl.shared) {
                    (by, true) => {
                        let store = stores.gcra.clone().ok_or_else(|| {
                            keel::ConfigError::new(
                                "rate_limit.shared",
                                "needs [store] kind = \"redis\"",
                            )
                        })?;
                        Limiter::Shared(
                            Box::new(
                                builder
                                    .store_timeout(stores.config.timeout)
                                    .on_store_error(rl.on_store_error)
                                    .build_shared(store)
                                    .map_err(field("rate_limit"))?,
                            ),
                            by,
                        )
                    }
                    (KeyBy::All, false) => {
                        Limiter::Global(builder.build().map_err(field("rate_limit"))?)
                    }
                    (by, false) => Limiter::Keyed(
                        Box::new(
                            builder
                                .build_keyed(MAX_RATE_KEYS)
                                .map_err(field("rate_limit"))?,
                        ),
                        by,
                    ),
                })
            }
            None => None,
        };
        let once = match &config.idempotency {
            Some(idem) => Some(Once {
                executor: Idempotency::builder(name.clone())
                    .shared_store(stores.idempotency.clone())
                    .ttl(idem.ttl)
                    .lock_timeout(idem.lock_timeout)
                    .store_timeout(stores.config.timeout)
                    // A duplicate waits for the first up to the route's
                    // timeout.
                    .wait_timeout(config.timeout)
                    .execution_timeout(idem.execution_timeout(config.timeout))
                    .on_unknown(idem.on_unknown)
                    .on_store_error(idem.on_store_error)
                    .build()
                    .map_err(field("idempotency"))?,
                header: HeaderName::from_bytes(idem.header.as_bytes()).map_err(|_| {
                    keel::ConfigError::new("idempotency.header", "not a header name")
                })?,
                max_body: idem.max_body.0,
                scope: idem
                    .scope
                    .iter()
                    .map(|h| {
                        HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                            keel::ConfigError::new("idempotency.scope", "not a header name")
                        })
                    })
                    .collect::<Result<_, _>>()?,
            }),
            None => None,
        };
        let uses_store = once.is_some() || matches!(limiter, Some(Limiter::Shared(..)));
        let fallback = match &config.fallback {
            Some(fb) => Some(Fallback {
                status: StatusCode::from_u16(fb.status)
                    .map_err(|_| keel::ConfigError::new("fallback.status", "not an HTTP status"))?,
                headers: config::fallback_headers(&fb.headers).map_err(|e| {
                    keel::ConfigError::new(format!("fallback.{}", e.path), e.reason)
                })?,
                body: Bytes::from(fb.body.clone()),
                on: fb
                    .on
                    .as_deref()
                    .map_or_else(Conditions::every_failure, Conditions::new),
            }),
            None => None,
        };
        let fault = match &config.fault {
            Some(f) => {
                let mut chaos = Chaos::builder(name.clone());
                if let Some(delay) = &f.delay {
                    chaos = chaos.latency(delay.percent, delay.duration);
                }
                if let Some(abort) = &f.abort {
                    chaos = chaos.error(abort.percent);
                }
                Some(Fault {
                    chaos: chaos.build().map_err(field("fault"))?,
                    abort_status: f.abort.as_ref().map_or(503, |a| a.status),
                })
            }
            None => None,
        };
        let read_timeout = upstream.config.read_timeout;
        let per_try = config.retry.as_ref().and_then(|r| r.per_try_timeout);
        let head_timeout = (read_timeout < per_try.unwrap_or(config.timeout).min(config.timeout))
            .then_some(read_timeout);
        Ok(Route {
            head_timeout,
            timeout: Timeout::named(name.clone(), config.timeout),
            per_try: config
                .retry
                .as_ref()
                .and_then(|r| r.per_try_timeout)
                .map(|d| Timeout::named(name.clone(), d)),
            retry,
            breaker: config
                .circuit_breaker
                .as_ref()
                .map(|cb| cb.build(name.clone()))
                .transpose()
                .map_err(field("circuit_breaker"))?,
            bulkhead: config
                .bulkhead
                .as_ref()
                .map(|b| b.build(name.clone()))
                .transpose()
                .map_err(field("bulkhead"))?,
            limiter,
            fallback,
            fault,
            once,
            stores: uses_store.then(|| stores.clone()),
            metrics: RouteMetrics::new(&name),
            upstream,
            config: config.clone(),
            name,
        })
    }

    /// For `/state`: the rate limit and what is left of it.
    pub(crate) fn rate_limit_state(&self) -> Option<serde_json::Value> {
        let config = self.config.rate_limit.as_ref()?;
        let key = match &config.key {
            RateKey::Global => "global".to_owned(),
            RateKey::Ip => "ip".to_owned(),
            RateKey::Header(name) => format!("header:{name}"),
        };
        let mut state = serde_json::json!({
            "requests_per_second": config.requests_per_second,
            "burst": config.burst,
            "key": key,
        });
        match self.limiter.as_ref()? {
            Limiter::Global(limiter) => state["available"] = limiter.available().into(),
            Limiter::Keyed(limiter, _) => state["keys"] = limiter.store().len().into(),
            Limiter::Shared(limiter, _) => {
                state["shared"] = true.into();
                state["on_store_error"] = limiter.fail_mode().as_str().into();
            }
        }
        Some(state)
    }

    /// Serves one request and counts it.
    pub(crate) async fn serve(
        self: &Arc<Self>,
        shed: Option<&LoadShedder>,
        request: Request<ClientBody>,
        peer: &Peer,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let in_flight = self.metrics.in_flight();
        let response = match self.forward(shed, request, peer).await {
            Ok(response) => response,
            Err(failure) => self.failed(failure),
        };
        drop(in_flight);
        self.metrics
            .answered(response.status().as_u16(), started.elapsed());
        response
    }

    /// The response for a failure: the fallback's, if it answers this one.
    fn failed(&self, failure: Failure) -> Response<ResponseBody> {
        match &self.fallback {
            Some(fb) if fb.on.matches(failure) => {
                let mut response = Response::new(Either::Right(Full::new(fb.body.clone())));
                *response.status_mut() = fb.status;
                *response.headers_mut() = fb.headers.clone();
                response
                    .headers_mut()
                    .insert(REASON, HeaderValue::from_static(failure.reason()));
                response
            }
            _ => failure.response(&self.name),
        }
    }

    async fn forward(
        self: &Arc<Self>,
        shed: Option<&LoadShedder>,
        request: Request<ClientBody>,
        peer: &Peer,
    ) -> Result<Response<ResponseBody>, Failure> {
        let (mut parts, body) = request.into_parts();
        let _admitted = match shed {
            Some(shedder) => Some(
                shedder
                    .try_acquire(priority(&parts.headers, self.config.priority))
                    .map_err(|_| Failure::Shed)?,
            ),
            None => None,
        };
        if let Some(limiter) = &self.limiter {
            limiter.check(&parts.headers, peer).await?;
        }
        // keel's own headers are read before the hop-by-hop ones go (and
        // are never taken for them).
        let key_header = self.once.as_ref().map(|once| &once.header);
        let idempotent = is_idempotent(&parts, key_header.unwrap_or(&IDEMPOTENCY_KEY));
        let key = key_header.and_then(|h| parts.headers.get(h).cloned());
        prepare_request(
            &mut parts,
            peer,
            Some(key_header.unwrap_or(&IDEMPOTENCY_KEY)),
        );
        if let (Some(once), Some(key)) = (&self.once, key) {
            return self.once(once, key, parts, body).await;
        }
        let sending = body.sending();
        let response = self
            .proxied(parts, RequestBody::from_client(body), idempotent)
            .await
            .map_err(|f| blame(f, sending.as_deref()))?;
        Ok(relay(response))
    }

    /// The route's policies and the upstream, within the total timeout; a
    /// status the fallback replaces is a failure.
    async fn proxied(
        &self,
        parts: Parts,
        body: RequestBody,
        idempotent: bool,
    ) -> Result<Response<PooledBody>, Failure> {
        let response = self
            .timeout
            .call(|| self.admitted(parts, body, idempotent))
            .await
            .map_err(lower)?;
        self.replaced(response.status())?;
        Ok(response)
    }

    /// The failure a response with `status` is, if the fallback is
    /// configured to replace it.
    fn replaced(&self, status: StatusCode) -> Result<(), Failure> {
        let status = status.as_u16();
        match &self.fallback {
            Some(fb) if fb.on.matches(Failure::Status(status)) => Err(Failure::Status(status)),
            _ => Ok(()),
        }
    }

    /// `response`, unless the fallback replaces its status.
    fn substitute(
        &self,
        response: Response<ResponseBody>,
    ) -> Result<Response<ResponseBody>, Failure> {
        self.replaced(response.status()).map(|()| response)
    }

    /// A request carrying an idempotency key. The first with its key (in
    /// its scope) runs on a task of its own, detached from this client:
    /// once written to the upstream it runs to its end, up to the
    /// execution timeout, whether the client stays or the route's timeout
    /// answers it first; [`Route::execute`] settles the key. Duplicates
    /// wait for it, then get its stored response, or a 409 saying why
    /// there is none.
    async fn once(
        self: &Arc<Self>,
        once: &Once,
        key: HeaderValue,
        parts: Parts,
        body: ClientBody,
    ) -> Result<Response<ResponseBody>, Failure> {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let key = match key.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 256 => k,
            _ => return Err(Failure::BadKey),
        };
        let scope: Vec<Vec<u8>> = once
            .scope
            .iter()
            .map(|name| {
                let mut joined = Vec::new();
                for (i, value) in parts.headers.get_all(name).iter().enumerate() {
                    if i > 0 {
                        joined.extend_from_slice(b", ");
                    }
                    joined.extend_from_slice(value.as_bytes());
                }
                joined
            })
            .collect();
        // No scope header present: the key alone, as before scopes were
        // (so records kept by an earlier version are still found).
        let scope = if scope.iter().all(Vec::is_empty) {
            Vec::new()
        } else {
            scope
        };
        let record = scoped_key(
            &format!("{}:{key}", self.name),
            scope.iter().map(Vec::as_slice),
        );
        // Read whole to be fingerprinted, whether its length is announced
        // or it comes chunked.
        if body.size_hint().lower() > MAX_REPLAYABLE_BODY {
            return Err(Failure::TooLarge);
        }
        let body = match Limited::new(body, MAX_REPLAYABLE_BODY as usize)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) => return Err(unreadable(&*e)),
        };
        let fingerprint = idempotency::fingerprint(&parts.method, &parts.uri, &body);
        let claim = match once.executor.begin(&record, &fingerprint).await {
            Ok(Begun::Run(claim)) => claim,
            Ok(Begun::Replay(stored)) => {
                let (status, headers, body) =
                    idempotency::decode(&stored).ok_or(Failure::StoreUnavailable)?;
                let mut response = Response::new(Either::Right(Full::new(body)));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                response
                    .headers_mut()
                    .insert(idempotency::REPLAYED, HeaderValue::from_static("true"));
                return self.substitute(response);
            }
            Ok(Begun::Unprotected) => {
                let response = self
                    .proxied(parts, RequestBody::Buffered(body), true)
                    .await?;
                return Ok(relay(response));
            }
            Err(keel::Error::KeyMismatch) => return Err(Failure::KeyMismatch),
            Err(keel::Error::StoreUnavailable) => return Err(Failure::StoreUnavailable),
            Err(keel::Error::StoreFull) => return Err(Failure::StoreFull),
            Err(keel::Error::InProgress { retry_after }) => {
                return Err(Failure::InProgress(retry_after))
            }
            Err(keel::Error::OutcomeUnknown) => return Err(Failure::OutcomeUnknown),
            Err(keel::Error::NotReplayable) => return Err(Failure::NotReplayable),
            Err(_) => return Err(Failure::Timeout),
        };
        let (answer, answered) = tokio::sync::oneshot::channel();
        let route = self.clone();
        let (limit, max_body) = (once.executor.execution_timeout(), once.max_body);
        let running = Running::start();
        tokio::spawn(async move {
            let answer_now = route.execute(claim, limit, max_body, parts, body).await;
            drop(running);
            // The client may be gone: the outcome is kept all the same.
            let _ = answer.send(answer_now);
        });
        match tokio::time::timeout_at(deadline, answered).await {
            Ok(Ok(answer)) => self.substitute(answer?),
            // The execution's task panicked.
            Ok(Err(_)) => Err(Failure::Reset),
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// One keyed request's execution, under `claim`, within `limit`: the
    /// route's policies and the upstream, then the response body read for
    /// storing. The one place its key's record is decided, from whether the
    /// request was written and what came back:
    ///
    /// - a response, 429 and 503 aside ("did not act"), is stored, or, over
    ///   `max_body`, passed through with the key kept as not replayable;
    /// - no response, or a body cut short, after the request was written is
    ///   unknown (`on_unknown` decides);
    /// - keel's refusals before any write (no connection, an open breaker,
    ///   a full bulkhead, an injected abort), and 429 and 503, release it.
    async fn execute(
        &self,
        mut claim: Claim,
        limit: Duration,
        max_body: u64,
        mut parts: Parts,
        body: Bytes,
    ) -> Result<Response<ResponseBody>, Failure> {
        // A panic from here on leaves the outcome unknown, not released.
        claim.unknown_if_dropped();
        let written = Written::default();
        parts.extensions.insert(written.clone());
        let exchange = async {
            let response = match self
                .admitted(parts, RequestBody::Buffered(body), true)
                .await
            {
                Ok(response) => response,
                Err(failure) => return (None, Err(failure)),
            };
            let status = response.status();
            // "Did not act" holds for this attempt only: after an earlier
            // one was written, what that one did is not known.
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
            {
                let released = (written.count() <= 1).then_some(Stored::Released);
                return (released, Ok(relay(response)));
            }
            let (mut head, body) = response.into_parts();
            relay_head(&mut head);
            match buffer(body, max_body).await {
                Buffered::Whole(bytes) => {
                    let value = idempotency::encode(head.status, &head.headers, &bytes);
                    let response = Response::from_parts(head, Either::Right(Full::new(bytes)));
                    (Some(Stored::Response(value)), Ok(response))
                }
                Buffered::TooLarge(body) => (
                    Some(Stored::NotReplayable),
                    Ok(Response::from_parts(head, Either::Left(body))),
                ),
                Buffered::Unreadable => (None, Err(Failure::Reset)),
            }
        };
        let (stored, answer) = match tokio::time::timeout(limit, claim.run(exchange)).await {
            Ok(ended) => ended,
            Err(_) => (None, Err(Failure::Timeout)),
        };
        let settled = match &stored {
            Some(Stored::Response(value)) => Settled::Stored(value),
            Some(Stored::NotReplayable) => Settled::NotReplayable,
            Some(Stored::Released) => Settled::Released,
            // No answer: whether the upstream may have acted decides.
            None if written.count() > 0 => Settled::Unknown,
            None => Settled::Released,
        };
        claim.settle(settled).await;
        answer
    }

    /// Inside the total timeout: the bulkhead, then retry or one attempt.
    async fn admitted(
        &self,
        parts: Parts,
        body: RequestBody,
        idempotent: bool,
    ) -> Result<Response<PooledBody>, Failure> {
        let _seat = match &self.bulkhead {
            Some(bulkhead) => Some(
                bulkhead
                    .acquire()
                    .await
                    .map_err(|_| Failure::BulkheadFull)?,
            ),
            None => None,
        };
        let Some((retry, on)) = self.retry.as_ref().filter(|_| idempotent) else {
            return self.attempt(&parts, body).await;
        };
        let body = match body {
            RequestBody::Buffered(bytes) => bytes,
            RequestBody::Streaming(body) => match replayable(body).await {
                Replayable::Yes(bytes) => bytes,
                Replayable::No(body) => {
                    return self.attempt(&parts, RequestBody::Streaming(body)).await
                }
                Replayable::Unreadable(failure) => return Err(failure),
            },
        };
        let classify = |result: &Result<Response<PooledBody>, Failure>| -> Verdict {
            let (outcome, retryable, hint) = match result {
                Ok(response) => {
                    let s = response.status().as_u16();
                    let retryable = on.status(s);
                    let hint = if retryable {
                        parse_retry_after(response.headers())
                    } else {
                        None
                    };
                    (outcome(s >= 500), retryable, hint)
                }
                Err(Failure::CircuitOpen(_)) => (Outcome::Ignore, false, None),
                Err(f) => (outcome(f.is_upstream_failure()), on.matches(*f), None),
            };
            let verdict = Verdict::from(outcome).with_retryable(retryable);
            match hint {
                Some(after) => verdict.retry_after(after),
                None => verdict,
            }
        };
        retry
            .call_classified(&classify, || {
                self.attempt(&parts, RequestBody::Buffered(body.clone()))
            })
            .await
            .map_err(lower)
    }

    /// One attempt: the breaker, the per-try timeout, faults, the upstream.
    async fn attempt(
        &self,
        parts: &Parts,
        body: RequestBody,
    ) -> Result<Response<PooledBody>, Failure> {
        let permit = match &self.breaker {
            Some(breaker) => Some(
                breaker
                    .try_acquire()
                    .map_err(|r| Failure::CircuitOpen(r.retry_after))?,
            ),
            None => None,
        };
        let sending = match &body {
            RequestBody::Streaming(b) => b.sending(),
            RequestBody::Buffered(_) => None,
        };
        let result = match &self.per_try {
            Some(per_try) => per_try
                .call(|| self.send(parts, body))
                .await
                .map_err(lower)
                .map_err(|f| blame(f, sending.as_deref())),
            None => self.send(parts, body).await,
        };
        if let Some(permit) = permit {
            permit.record(match &result {
                Ok(response) => outcome(response.status().is_server_error()),
                // The client's body failed or stalled: nothing to hold
                // against the dependency, nor to credit it with.
                Err(Failure::BadBody | Failure::RequestTimeout | Failure::PoolFull) => {
                    Outcome::Ignore
                }
                Err(f) => outcome(f.is_upstream_failure()),
            });
        }
        result
    }

    async fn send(
        &self,
        parts: &Parts,
        body: RequestBody,
    ) -> Result<Response<PooledBody>, Failure> {
        if let Some(fault) = &self.fault {
            let injection = fault.chaos.decide();
            if let Some(delay) = injection.delay {
                tokio::time::sleep(delay).await;
            }
            if injection.error {
                return Err(Failure::Injected(fault.abort_status));
            }
        }
        let picked = self.upstream.pick().ok_or(Failure::Connect)?;
        let sending = match &body {
            RequestBody::Streaming(b) => b.sending(),
            RequestBody::Buffered(_) => None,
        };
        let mut result = self
            .upstream
            .send(picked.endpoint, parts, body, self.head_timeout)
            .await;
        // An upstream that gave up on a client stalling mid-body (its own
        // body timeout) is not to blame.
        if matches!(result, Err(SendError::Reset | SendError::Timeout))
            && sending.as_deref().is_some_and(Sending::held_by_client)
        {
            result = Err(SendError::RequestTimeout);
        }
        match &result {
            Ok(response) => picked.done(response.status().is_server_error()),
            // The client's body failed or stalled, or keel's own bound on
            // connections held it back: outlier detection hears nothing.
            Err(SendError::RequestBody | SendError::RequestTimeout | SendError::PoolFull) => {
                drop(picked)
            }
            Err(_) => picked.done(true),
        }
        result.map_err(|e| match e {
            SendError::Connect => Failure::Connect,
            SendError::PoolFull => Failure::PoolFull,
            SendError::Reset => Failure::Reset,
            SendError::Timeout => Failure::Timeout,
            SendError::RequestBody => Failure::BadBody,
            SendError::RequestTimeout => Failure::RequestTimeout,
        })
    }
}

fn outcome(failed: bool) -> Outcome {
    if failed {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}

/// A keel error from a policy, as the failure it means for the request.
fn lower(e: keel::Error<Failure>) -> Failure {
    match e {
        keel::Error::Inner(f) => f,
        keel::Error::Timeout { .. } => Failure::Timeout,
        keel::Error::RetriesExhausted { last, .. } => lower(*last),
        keel::Error::CircuitOpen { retry_after } => Failure::CircuitOpen(retry_after),
        keel::Error::BulkheadFull => Failure::BulkheadFull,
        keel::Error::RateLimited { retry_after } => Failure::RateLimited(retry_after),
        keel::Error::Shed { .. } => Failure::Shed,
        keel::Error::StoreUnavailable => Failure::StoreUnavailable,
        _ => Failure::Reset,
    }
}

/// The request's priority: `x-keel-priority` when it names one (the header
/// is gone before this unless `server.trust_priority_header`), else the
/// route's.
fn priority(headers: &HeaderMap, default: Priority) -> Priority {
    match headers.get(PRIORITY).map(HeaderValue::as_bytes) {
        Some(b"critical") => Priority::Critical,
        Some(b"high") => Priority::High,
        Some(b"medium") => Priority::Medium,
        Some(b"low") => Priority::Low,
        _ => default,
    }
}

/// Safe to send twice: an idempotent method, or an idempotency key in
/// `key_header` (the route's, else `Idempotency-Key`).
fn is_idempotent(parts: &Parts, key_header: &HeaderName) -> bool {
    matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    ) || parts.headers.contains_key(key_header)
}

/// The upstream's response, as the client gets it: HTTP/1.1, without the
/// upstream connection's own headers.
fn relay(response: Response<PooledBody>) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    relay_head(&mut parts);
    Response::from_parts(parts, Either::Left(body))
}

fn relay_head(parts: &mut http::response::Parts) {
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, None);
}

/// What an execution's end leaves for its key (`None`: no answer).
enum Stored {
    Response(Vec<u8>),
    NotReplayable,
    Released,
}

/// A response body read for storing.
enum Buffered {
    Whole(Bytes),
    /// Over the limit: what was read is put back in front of the rest.
    TooLarge(PooledBody),
    Unreadable,
}

/// Reads `body` to its end if it holds at most `max` bytes (trailers are
/// dropped; HTTP/1 responses rarely carry them).
async fn buffer(mut body: PooledBody, max: u64) -> Buffered {
    if body.size_hint().lower() > max {
        return Buffered::TooLarge(body);
    }
    let mut read = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Buffered::Unreadable;
        };
        if let Ok(data) = frame.into_data() {
            read.extend_from_slice(&data);
            if read.len() as u64 > max {
                return Buffered::TooLarge(body.with_prefix(Bytes::from(read)));
            }
        }
    }
    Buffered::Whole(Bytes::from(read))
}

enum Replayable {
    Yes(Bytes),
    No(Box<ClientBody>),
    Unreadable(Failure),
}

/// A timeout that cut a request while keel waited for its client's body
/// is the client's: 408, not held against the upstream.
fn blame(failure: Failure, sending: Option<&Sending>) -> Failure {
    match failure {
        Failure::Timeout if sending.is_some_and(Sending::held_by_client) => Failure::RequestTimeout,
        other => other,
    }
}

/// Why a body read whole failed: over the limit, stalled, or broken.
fn unreadable(e: &(dyn std::error::Error + Send + Sync + 'static)) -> Failure {
    if e.is::<LengthLimitError>() {
        Failure::TooLarge
    } else if matches!(e.downcast_ref(), Some(ClientBodyError::Stalled)) {
        Failure::RequestTimeout
    } else {
        Failure::BadBody
    }
}

/// Buffers a small body so it can be sent again.
async fn replayable(body: Box<ClientBody>) -> Replayable {
    if body.is_end_stream() {
        return Replayable::Yes(Bytes::new());
    }
    match body.size_hint().upper() {
        Some(n) if n <= MAX_REPLAYABLE_BODY => {}
        _ => return Replayable::No(body),
    }
    match Limited::new(*body, MAX_REPLAYABLE_BODY as usize)
        .collect()
        .await
    {
        Ok(collected) => Replayable::Yes(collected.to_bytes()),
        Err(e) => Replayable::Unreadable(match unreadable(&*e) {
            // Within its announced size, so not too large: broken.
            Failure::TooLarge => Failure::BadBody,
            other => other,
        }),
    }
}

/// Headers never forwarded: those that belong to one connection, not to
/// the message (`Connection` first), and keel's own `x-keel-priority`. A
/// static, not a const: a const array of names is built and dropped at
/// every use.
static NOT_FORWARDED: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    PRIORITY,
];

/// The index of `name` in [`NOT_FORWARDED`]: a match on the name's text,
/// which the compiler turns into a switch on its length, where comparing
/// with each of the eight would cost a call apiece.
fn not_forwarded(name: &HeaderName) -> Option<u8> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "te" => 3,
        "trailer" => 4,
        "transfer-encoding" => 5,
        "upgrade" => 6,
        "x-keel-priority" => 7,
        _ => return None,
    })
}

/// Removes the fields in [`NOT_FORWARDED`] and those the `Connection`
/// field names. One pass over the names finds which are there first: most
/// messages carry none of them, or only `Connection`, and comparing a name
/// costs less than looking one up.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep: Option<&HeaderName>) {
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = not_forwarded(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // `Connection` (the first) may name more fields; `close` and
    // `keep-alive` name none to look up.
    let tokens = |v: &HeaderValue| -> Vec<HeaderName> {
        v.as_bytes()
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect()
    };
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(tokens)
            .collect();
        for name in named {
            // `Connection` cannot take what keel routes and keys by.
            if name == header::HOST || name == X_FORWARDED_FOR || Some(&name) == keep {
                continue;
            }
            headers.remove(name);
        }
    }
    for (i, name) in NOT_FORWARDED.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

fn prepare_request(parts: &mut Parts, peer: &Peer, keep: Option<&HeaderName>) {
    // HTTP/1.1 to the upstream whatever the client spoke, and none of the
    // server side's request extensions.
    parts.version = http::Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    // x-keel-priority with them: keel's own, never the upstream's business.
    strip_hop_by_hop(&mut parts.headers, keep);
    let earlier = parts
        .headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .map(|earlier| format!("{earlier}, {}", peer.addr.ip()));
    match earlier.and_then(|list| HeaderValue::from_str(&list).ok()) {
        Some(list) => parts.headers.insert(X_FORWARDED_FOR, list),
        None => parts.headers.insert(X_FORWARDED_FOR, peer.ip.clone()),
    };
}

/// `Retry-After` in seconds or as an HTTP date.
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(3)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let d = parse_retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn retry_after_header_rounds_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1500)), "2");
        assert_eq!(retry_after_seconds(Duration::ZERO), "1");
        assert_eq!(retry_after_seconds(Duration::from_secs(30)), "30");
    }

    #[test]
    fn conditions_match_failures() {
        let on = Conditions::new(&[
            Condition::GatewayError,
            Condition::Status(429),
            Condition::Timeout,
        ]);
        assert!(on.matches(Failure::Status(503)));
        assert!(!on.matches(Failure::Status(500)));
        assert!(on.matches(Failure::Status(429)));
        assert!(on.matches(Failure::Timeout));
        assert!(!on.matches(Failure::Connect));
        let every = Conditions::every_failure();
        assert!(every.matches(Failure::Status(500)));
        assert!(!every.matches(Failure::Status(404)));
        assert!(every.matches(Failure::Injected(429)));
        assert!(!every.matches(Failure::RateLimited(Duration::ZERO)));
        assert!(every.matches(Failure::CircuitOpen(Duration::ZERO)));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, None);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn every_connection_field_is_read_and_nothing_else_is_dropped() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-a , X-B"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        for name in ["x-a", "x-b", "x-c"] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h, None);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-c"]);
        let mut untouched = HeaderMap::new();
        untouched.insert(header::HOST, HeaderValue::from_static("a"));
        untouched.insert("x-close", HeaderValue::from_static("close"));
        strip_hop_by_hop(&mut untouched, None);
        assert_eq!(untouched.len(), 2);
    }
}
