//! The sidecar's configuration: one TOML file, parsed and then checked as a
//! whole, so that `keel check` lists every error with its field path
//! (`routes[0].retry.max_attempts: must be at least 1`).
//!
//! Every field has a default except `server.listen`, `server.admin`, an
//! upstream's `endpoints`, and a route's `name`, `path_prefix` and
//! `upstream`; inside a policy table only `rate_limit.requests_per_second`
//! is required. An absent policy table means the policy is off for the
//! route. Unknown fields are errors. `docs/CONFIGURATION.md` lists them all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use keel::bulkhead::BulkheadConfig;
use keel::circuit_breaker::CircuitBreakerConfig;
use keel::config::format_duration;
use keel::idempotency::OnUnknown;
use keel::retry::{BackoffConfig, BudgetConfig, RetryConfig};
use keel::shed::Priority;
use keel::store::FailMode;
use serde::{Deserialize, Deserializer};

/// One configuration error: the field's path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where, like `routes[0].retry.max_attempts`.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Every error found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<FieldError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and shutdown.
    pub server: Server,
    /// Upstreams by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    /// Routes; the longest matching `path_prefix` wins.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Load shedding across all routes; off when absent.
    pub load_shed: Option<LoadShed>,
    /// Where idempotency records and shared rate limits live (default: in
    /// memory).
    #[serde(default)]
    pub store: Store,
}

/// `[store]`: one store for the whole proxy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Store {
    /// `memory` (default), `embedded` (a redb file that survives
    /// restarts) or `redis` (shared by every instance on the same Redis).
    pub kind: StoreKind,
    /// The file, for `kind = "embedded"` (default `keel-state.redb`,
    /// relative to the working directory).
    pub path: Option<String>,
    /// The server, for `kind = "redis"` (default
    /// `redis://127.0.0.1:6379/`).
    pub url: Option<String>,
    /// What every key written to Redis starts with (default `keel:`).
    pub key_prefix: String,
    /// How long any store call may take before it counts as failed
    /// (default 250ms).
    #[serde(with = "keel::config::duration")]
    pub timeout: Duration,
    /// The most the memory store's records may take, keys, heads and
    /// bodies counted (`kind = "memory"`; default 64MiB).
    pub max_bytes: Option<ByteSize>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            kind: StoreKind::Memory,
            path: None,
            url: None,
            key_prefix: "keel:".into(),
            timeout: Duration::from_millis(250),
            max_bytes: None,
        }
    }
}

impl Store {
    /// The embedded store's file.
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("keel-state.redb")
    }

    /// The Redis store's URL.
    pub fn url(&self) -> &str {
        self.url.as_deref().unwrap_or("redis://127.0.0.1:6379/")
    }

    /// The memory store's bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.map_or(64 << 20, |b| b.0)
    }
}

/// The store's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// This process only.
    #[default]
    Memory,
    /// On disk, this host; survives restarts.
    Embedded,
    /// Redis, shared by a fleet.
    Redis,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// The data plane's address, `host:port`.
    pub listen: String,
    /// The admin plane's address (health, metrics, state).
    pub admin: String,
    /// How long in-flight requests may take to finish on shutdown.
    #[serde(default = "thirty_seconds", with = "keel::config::duration")]
    pub shutdown_timeout: Duration,
    /// How long a client connection with no request in flight may take to
    /// send a complete request head (from its accept, or from the end of
    /// its previous response) before it is closed.
    #[serde(default = "thirty_seconds", with = "keel::config::duration")]
    pub request_head_timeout: Duration,
    /// The longest a request body may go without a byte (default 30s);
    /// then 408 and the connection closes.
    #[serde(default = "thirty_seconds", with = "keel::config::duration")]
    pub request_body_timeout: Duration,
    /// The longest keel waits for a client to take more of a response
    /// (default 60s); then the connection closes.
    #[serde(default = "sixty_seconds", with = "keel::config::duration")]
    pub response_idle_timeout: Duration,
    /// A bearer token required on admin requests except the health ones;
    /// required when `admin` is not a loopback address.
    #[serde(default)]
    pub admin_token: Option<Secret>,
    /// Threads serving requests (default: one per CPU).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Client connections open on the data plane at most (default
    /// 10000); beyond, new ones are accepted and closed at once.
    #[serde(default = "max_client_connections")]
    pub max_connections: usize,
    /// Whether a client's `x-keel-priority` header is believed (default
    /// false: the route's `priority` applies, whatever the client claims).
    #[serde(default)]
    pub trust_priority_header: bool,
}

/// A secret read from the file: compared, never printed (its `Debug` shows
/// no part of it, so neither does any log of the configuration).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, to compare with what a request presents.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `[upstreams.<name>]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `host:port` of each endpoint.
    pub endpoints: Vec<String>,
    /// How long connecting to an endpoint may take (default 1s).
    #[serde(default = "one_second", with = "keel::config::duration")]
    pub connect_timeout: Duration,
    /// An active health check; endpoints failing it leave the rotation.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Whether readiness depends on this upstream (default true).
    #[serde(default = "yes")]
    pub required: bool,
    /// Passive outlier detection per endpoint (on by default).
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    /// A pooled connection unused this long is closed (default 90s).
    #[serde(default = "ninety_seconds", with = "keel::config::duration")]
    pub idle_timeout: Duration,
    /// Connections open to each endpoint at most, idle or busy (default
    /// 1024); a request that finds none free waits for one within
    /// `connect_timeout`.
    #[serde(default = "max_upstream_connections")]
    pub max_connections: u32,
    /// The longest an upstream response, head or body, may go without a
    /// byte once the request is sent (default 30s).
    #[serde(default = "thirty_seconds", with = "keel::config::duration")]
    pub read_timeout: Duration,
}

/// An upstream's outlier detection: an endpoint failing this many times in
/// a row leaves the rotation for a while, never the last one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierDetection {
    /// Failures in a row (connect failures, resets, timeouts, 5xx) that
    /// eject an endpoint (default 5; 0 turns detection off).
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th ejection in a row lasts n
    /// times as long (default 30s).
    #[serde(with = "keel::config::duration")]
    pub base_ejection_time: Duration,
    /// The longest an ejection lasts (default 300s).
    #[serde(with = "keel::config::duration")]
    pub max_ejection_time: Duration,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
        }
    }
}

/// An upstream's active health check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheck {
    /// The path asked with `GET` (default `/health`); 2xx is healthy.
    pub path: String,
    /// Between checks of one endpoint (default 5s).
    #[serde(with = "keel::config::duration")]
    pub interval: Duration,
    /// How long a check may take (default 1s).
    #[serde(with = "keel::config::duration")]
    pub timeout: Duration,
    /// Failed checks in a row that take an endpoint out (default 2).
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that put it back (default 1).
    pub healthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: "/health".into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        }
    }
}

/// `[[routes]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The route's name (in metrics, the admin plane, errors).
    pub name: String,
    /// Requests whose path starts with this go here; the path is forwarded
    /// unchanged.
    pub path_prefix: String,
    /// The upstream's name.
    pub upstream: String,
    /// Total time for a request, retries included (default 15s).
    #[serde(default = "fifteen_seconds", with = "keel::config::duration")]
    pub timeout: Duration,
    /// For load shedding (default high).
    #[serde(default = "high")]
    pub priority: Priority,
    /// Retries; off when absent.
    #[serde(default)]
    pub retry: Option<RouteRetry>,
    /// A breaker for the route; off when absent.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// A bulkhead for the route; off when absent.
    #[serde(default)]
    pub bulkhead: Option<BulkheadConfig>,
    /// A rate limit for the route; off when absent.
    #[serde(default)]
    pub rate_limit: Option<RouteRateLimit>,
    /// A canned response when the route fails; off when absent.
    #[serde(default)]
    pub fallback: Option<RouteFallback>,
    /// Injected faults; off when absent.
    #[serde(default)]
    pub fault: Option<RouteFault>,
    /// Idempotency keys; off when absent.
    #[serde(default)]
    pub idempotency: Option<RouteIdempotency>,
}

/// `[routes.idempotency]`: a request carrying the header is executed once
/// per key; duplicates get the stored response.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteIdempotency {
    /// The request header holding the key (default `Idempotency-Key`).
    pub header: String,
    /// How long a stored response is replayed (default 24h).
    #[serde(with = "keel::config::duration")]
    pub ttl: Duration,
    /// How long a key stays held by an instance that stopped renewing it
    /// (one that died mid-request) (default 30s).
    #[serde(with = "keel::config::duration")]
    pub lock_timeout: Duration,
    /// Larger responses are passed through, not stored (default 1MiB).
    pub max_body: ByteSize,
    /// What a failed store does: `fail_closed` (default: 503, the request
    /// does not run) or `fail_open` (it runs unprotected).
    pub on_store_error: FailMode,
    /// How long a keyed request that reached the upstream may run,
    /// whatever its client does (default: 60s, or the route's timeout if
    /// longer; at least the route's timeout).
    #[serde(with = "keel::config::optional_duration")]
    pub execution_timeout: Option<Duration>,
    /// Request headers whose values (hashed) bind a record to a principal
    /// (default `["authorization"]`; `[]`: the key alone).
    pub scope: Vec<String>,
    /// What an ambiguous end (no response after the request was written)
    /// does to the key: `conflict` (default) keeps it, `release` frees it.
    pub on_unknown: OnUnknown,
}

impl RouteIdempotency {
    /// How long a keyed request may run once it reached the upstream.
    pub fn execution_timeout(&self, route_timeout: Duration) -> Duration {
        self.execution_timeout
            .unwrap_or_else(|| route_timeout.max(Duration::from_secs(60)))
    }
}

impl Default for RouteIdempotency {
    fn default() -> Self {
        RouteIdempotency {
            header: "idempotency-key".into(),
            ttl: Duration::from_secs(24 * 3600),
            lock_timeout: Duration::from_secs(30),
            max_body: ByteSize(1 << 20),
            on_store_error: FailMode::FailClosed,
            execution_timeout: None,
            scope: vec!["authorization".into()],
            on_unknown: OnUnknown::Conflict,
        }
    }
}

/// A size in bytes: a number, or a string like `"512KiB"`, `"1MiB"`,
/// `"10MB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    fn parse(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            _ => {
                return Err(format!(
                    "\"{text}\" is not a size like \"1MiB\" (units: B, KB, KiB, MB, MiB, GB, GiB)"
                ))
            }
        };
        number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .map(ByteSize)
            .ok_or_else(|| format!("\"{text}\" is not a size like \"1MiB\""))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(text) => ByteSize::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

/// `[routes.retry]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteRetry {
    /// Attempts in all, the first included (default 3).
    pub max_attempts: u32,
    /// Time for one attempt; none beyond the route's timeout when absent.
    #[serde(with = "keel::config::optional_duration")]
    pub per_try_timeout: Option<Duration>,
    /// What is retried (default connect-failure, reset, timeout,
    /// gateway-error).
    pub on: Vec<Condition>,
    /// Backoff between attempts.
    pub backoff: BackoffConfig,
    /// A retry budget for the route; none when absent.
    pub budget: Option<BudgetConfig>,
}

impl Default for RouteRetry {
    fn default() -> Self {
        RouteRetry {
            max_attempts: 3,
            per_try_timeout: None,
            on: vec![
                Condition::ConnectFailure,
                Condition::Reset,
                Condition::Timeout,
                Condition::GatewayError,
            ],
            backoff: BackoffConfig::default(),
            budget: None,
        }
    }
}

impl RouteRetry {
    /// The library's retry configuration (the schedule and limits).
    pub fn policy(&self) -> RetryConfig {
        RetryConfig {
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            time_budget: None,
            budget: self.budget,
        }
    }
}

/// A failure a retry (or a fallback) reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Condition {
    /// The upstream could not be connected to.
    ConnectFailure,
    /// The connection was reset before a response.
    Reset,
    /// The attempt (or the request) timed out.
    Timeout,
    /// Any 5xx response.
    ServerError,
    /// 502, 503 or 504.
    GatewayError,
    /// This status code.
    Status(u16),
    /// The route's breaker is open (fallback only).
    CircuitOpen,
    /// The route's bulkhead is full (fallback only).
    BulkheadFull,
    /// Over the route's rate limit (fallback only).
    RateLimited,
    /// Shed under load (fallback only).
    Shed,
}

impl Condition {
    const NAMES: &'static str = "connect-failure, reset, timeout, 5xx, gateway-error, circuit-open, bulkhead-full, rate-limited, shed, or a status code like \"429\"";

    fn parse(text: &str) -> Result<Condition, String> {
        Ok(match text {
            "connect-failure" => Condition::ConnectFailure,
            "reset" => Condition::Reset,
            "timeout" => Condition::Timeout,
            "5xx" => Condition::ServerError,
            "gateway-error" => Condition::GatewayError,
            "circuit-open" => Condition::CircuitOpen,
            "bulkhead-full" => Condition::BulkheadFull,
            "rate-limited" => Condition::RateLimited,
            "shed" => Condition::Shed,
            code => match code.parse::<u16>() {
                Ok(status) if (100..=599).contains(&status) => Condition::Status(status),
                _ => return Err(format!("unknown condition \"{text}\"; use {}", Self::NAMES)),
            },
        })
    }

    /// Whether keel itself decides this (no upstream answer involved).
    fn is_keels_own(self) -> bool {
        matches!(
            self,
            Condition::CircuitOpen
                | Condition::BulkheadFull
                | Condition::RateLimited
                | Condition::Shed
        )
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Condition::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `[routes.rate_limit]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRateLimit {
    /// Sustained rate (required).
    pub requests_per_second: f64,
    /// Requests admitted at once after a quiet period (default 1).
    #[serde(default = "one")]
    pub burst: u32,
    /// `global` (default), `ip`, or `header:<name>`.
    #[serde(default)]
    pub key: RateKey,
    /// Counted across every instance on the same `[store]`, which must be
    /// `kind = "redis"` (default false: counted in this process).
    #[serde(default)]
    pub shared: bool,
    /// What a failed store does to a shared limit: `fail_open` (default:
    /// the request is admitted) or `fail_closed` (503).
    #[serde(default = "fail_open")]
    pub on_store_error: FailMode,
}

/// What a route's rate limit is counted by.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RateKey {
    /// All requests together.
    #[default]
    Global,
    /// The client's address.
    Ip,
    /// A request header's value (requests without it share one key).
    Header(String),
}

impl<'de> Deserialize<'de> for RateKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "global" => Ok(RateKey::Global),
            "ip" => Ok(RateKey::Ip),
            other => match other.strip_prefix("header:") {
                Some(name) if is_token(name) => Ok(RateKey::Header(name.to_ascii_lowercase())),
                Some(name) => Err(serde::de::Error::custom(format!(
                    "\"{name}\" is not a header name"
                ))),
                None => Err(serde::de::Error::custom(format!(
                    "unknown key \"{other}\"; use global, ip or header:<name>"
                ))),
            },
        }
    }
}

/// `[routes.fallback]`: the response sent instead of a failure.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteFallback {
    /// Status (default 200).
    pub status: u16,
    /// Body (default empty).
    pub body: String,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// The failures it answers (default: every failure except
    /// rate-limited).
    pub on: Option<Vec<Condition>>,
}

impl Default for RouteFallback {
    fn default() -> Self {
        RouteFallback {
            status: 200,
            body: String::new(),
            headers: BTreeMap::new(),
            on: None,
        }
    }
}

/// `[routes.fault]`: chaos injected per attempt, before the upstream call.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteFault {
    /// Delay some attempts.
    pub delay: Option<FaultDelay>,
    /// Answer some attempts with a status, without calling the upstream.
    pub abort: Option<FaultAbort>,
}

/// An injected delay.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    /// Share of attempts delayed, 0 to 100.
    pub percent: f64,
    /// How long.
    #[serde(with = "keel::config::duration")]
    pub duration: Duration,
}

/// An injected abort.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    /// Share of attempts aborted, 0 to 100.
    pub percent: f64,
    /// The status answered (default 503).
    #[serde(default = "service_unavailable")]
    pub status: u16,
}

/// `[load_shed]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadShed {
    /// Requests in flight across all routes at which the lowest priority is
    /// shed first (critical never is).
    pub max_in_flight: u32,
}

fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}
fn fifteen_seconds() -> Duration {
    Duration::from_secs(15)
}
fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn high() -> Priority {
    Priority::High
}
fn fail_open() -> FailMode {
    FailMode::FailOpen
}
fn max_client_connections() -> usize {
    10_000
}
fn sixty_seconds() -> Duration {
    Duration::from_secs(60)
}
fn ninety_seconds() -> Duration {
    Duration::from_secs(90)
}
fn max_upstream_connections() -> u32 {
    1024
}
fn service_unavailable() -> u16 {
    503
}

/// An HTTP token (header names): visible ASCII without separators.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Config {
    /// Parses and checks `text`; every error found, with its field path.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let de = toml::Deserializer::parse(text).map_err(|e| {
            ConfigErrors(vec![FieldError {
                path: String::new(),
                reason: format!("not valid TOML: {}", e.message()),
            }])
        })?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ConfigErrors(vec![FieldError {
                path: if path == "." { String::new() } else { path },
                reason: inner.message().to_string(),
            }])
        })?;
        let errors = config.check();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Checks what the types cannot: values, references between tables,
    /// and the policies' own validation.
    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut err = |path: String, reason: String| errors.push(FieldError { path, reason });

        for (field, addr) in [
            ("server.listen", &self.server.listen),
            ("server.admin", &self.server.admin),
        ] {
            if let Err(reason) = socket_addr(addr) {
                err(field.into(), reason);
            }
        }
        if self.server.workers == Some(0) {
            err(
                "server.workers".into(),
                "must be at least 1 (leave it out for one per CPU)".into(),
            );
        }
        if self.server.max_connections == 0 {
            err("server.max_connections".into(), "must be at least 1".into());
        }
        for (field, d) in [
            ("request_head_timeout", self.server.request_head_timeout),
            ("request_body_timeout", self.server.request_body_timeout),
            ("response_idle_timeout", self.server.response_idle_timeout),
        ] {
            positive(&mut err, format!("server.{field}"), d);
        }
        match (&self.server.admin_token, socket_addr(&self.server.admin)) {
            (Some(token), _) if token.expose().is_empty() => err(
                "server.admin_token".into(),
                "must not be empty (leave it out for no token)".into(),
            ),
            (None, Ok(admin)) if !admin.ip().is_loopback() => err(
                "server.admin_token".into(),
                format!(
                    "is required when server.admin ({admin}) is not a loopback address: the admin plane shows every route's state and can switch breakers"
                ),
            ),
            _ => {}
        }

        for (name, up) in &self.upstreams {
            let at = format!("upstreams.{name}");
            if up.endpoints.is_empty() {
                err(
                    format!("{at}.endpoints"),
                    "must list at least one endpoint".into(),
                );
            }
            let mut seen = BTreeSet::new();
            for (i, endpoint) in up.endpoints.iter().enumerate() {
                if let Err(reason) = self::endpoint(endpoint) {
                    err(format!("{at}.endpoints[{i}]"), reason);
                } else if !seen.insert(endpoint) {
                    err(
                        format!("{at}.endpoints[{i}]"),
                        format!("\"{endpoint}\" is listed twice"),
                    );
                }
            }
            positive(
                &mut err,
                format!("{at}.connect_timeout"),
                up.connect_timeout,
            );
            positive(&mut err, format!("{at}.idle_timeout"), up.idle_timeout);
            positive(&mut err, format!("{at}.read_timeout"), up.read_timeout);
            if up.max_connections == 0 {
                err(format!("{at}.max_connections"), "must be at least 1".into());
            }
            let od = &up.outlier_detection;
            if od.consecutive_failures > 0 {
                positive(
                    &mut err,
                    format!("{at}.outlier_detection.base_ejection_time"),
                    od.base_ejection_time,
                );
                if od.max_ejection_time < od.base_ejection_time {
                    err(
                        format!("{at}.outlier_detection.max_ejection_time"),
                        "must not be shorter than base_ejection_time".into(),
                    );
                }
            }
            if let Some(hc) = &up.health_check {
                let at = format!("{at}.health_check");
                if let Err(reason) = health_check_request(&hc.path) {
                    err(format!("{at}.path"), reason);
                }
                positive(&mut err, format!("{at}.interval"), hc.interval);
                positive(&mut err, format!("{at}.timeout"), hc.timeout);
                if hc.unhealthy_threshold == 0 {
                    err(
                        format!("{at}.unhealthy_threshold"),
                        "must be at least 1".into(),
                    );
                }
                if hc.healthy_threshold == 0 {
                    err(
                        format!("{at}.healthy_threshold"),
                        "must be at least 1".into(),
                    );
                }
            }
        }

        let mut names = BTreeMap::new();
        let mut prefixes = BTreeMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if route.name.is_empty() {
                err(format!("{at}.name"), "must not be empty".into());
            } else if let Some(first) = names.insert(route.name.as_str(), i) {
                err(
                    format!("{at}.name"),
                    format!("\"{}\" is also the name of routes[{first}]", route.name),
                );
            }
            let prefix = route.path_prefix.as_str();
            // `/api` and `/api/` match the same paths.
            let segments = prefix.strip_suffix('/').unwrap_or(prefix);
            if !prefix.starts_with('/') {
                err(
                    format!("{at}.path_prefix"),
                    format!("must start with \"/\", got \"{prefix}\""),
                );
            } else if prefix.contains(['?', '#']) || prefix.bytes().any(|b| !b.is_ascii_graphic()) {
                err(
                    format!("{at}.path_prefix"),
                    format!("\"{prefix}\" is not a path (no query, fragment, spaces or controls)"),
                );
            } else if !matches!(
                crate::path::normalise(prefix),
                Ok(std::borrow::Cow::Borrowed(_))
            ) {
                err(
                    format!("{at}.path_prefix"),
                    format!("\"{prefix}\" is not a normalised path (no \".\" or \"..\" segments, no encoded letters or digits): requests are matched after they are normalised"),
                );
            } else if let Some(first) = prefixes.insert(segments, i) {
                err(
                    format!("{at}.path_prefix"),
                    format!("\"{prefix}\" matches the same paths as the prefix of routes[{first}]"),
                );
            }
            if !self.upstreams.contains_key(&route.upstream) {
                err(
                    format!("{at}.upstream"),
                    format!("no upstream named \"{}\"", route.upstream),
                );
            }
            positive(&mut err, format!("{at}.timeout"), route.timeout);

            if let Some(retry) = &route.retry {
                let at = format!("{at}.retry");
                if let Some(per_try) = retry.per_try_timeout {
                    positive(&mut err, format!("{at}.per_try_timeout"), per_try);
                    if per_try > route.timeout {
                        err(
                            format!("{at}.per_try_timeout"),
                            format!(
                                "is longer than the route's timeout ({}), which bounds every attempt",
                                format_duration(route.timeout)
                            ),
                        );
                    }
                }
                if retry.on.is_empty() {
                    err(format!("{at}.on"), "must name at least one condition (leave [routes.retry] out for no retries)".into());
                }
                for (j, c) in retry.on.iter().enumerate() {
                    if c.is_keels_own() {
                        err(format!("{at}.on[{j}]"), "keel's own refusals are not retried; use connect-failure, reset, timeout, 5xx, gateway-error or a status code".into());
                    }
                }
                if let Err(e) = retry.policy().build(route.name.as_str()) {
                    err(format!("{at}.{}", e.field()), e.reason().into());
                }
            }
            if let Some(cb) = &route.circuit_breaker {
                if let Err(e) = cb.build(route.name.as_str()) {
                    err(
                        format!("{at}.circuit_breaker.{}", e.field()),
                        e.reason().into(),
                    );
                }
            }
            if let Some(bulkhead) = &route.bulkhead {
                if let Err(e) = bulkhead.build(route.name.as_str()) {
                    err(format!("{at}.bulkhead.{}", e.field()), e.reason().into());
                }
            }
            if let Some(rl) = &route.rate_limit {
                let at = format!("{at}.rate_limit");
                if !(rl.requests_per_second > 0.0 && rl.requests_per_second.is_finite()) {
                    err(
                        format!("{at}.requests_per_second"),
                        format!("must be a positive number, got {}", rl.requests_per_second),
                    );
                }
                if rl.burst == 0 {
                    err(format!("{at}.burst"), "must be at least 1".into());
                }
                if rl.shared && self.store.kind != StoreKind::Redis {
                    err(
                        format!("{at}.shared"),
                        "needs [store] kind = \"redis\": the memory and embedded stores belong to one process".into(),
                    );
                }
            }
            if let Some(idem) = &route.idempotency {
                let at = format!("{at}.idempotency");
                if !is_token(&idem.header) {
                    err(
                        format!("{at}.header"),
                        format!("\"{}\" is not a header name", idem.header),
                    );
                }
                positive(&mut err, format!("{at}.ttl"), idem.ttl);
                positive(&mut err, format!("{at}.lock_timeout"), idem.lock_timeout);
                if let Some(execution) = idem.execution_timeout {
                    if execution < route.timeout {
                        err(
                            format!("{at}.execution_timeout"),
                            format!(
                                "is shorter than the route's timeout ({}): a keyed request that reached the upstream must be allowed at least as long as its client waits",
                                format_duration(route.timeout)
                            ),
                        );
                    }
                }
                for (j, name) in idem.scope.iter().enumerate() {
                    if !is_token(name) {
                        err(
                            format!("{at}.scope[{j}]"),
                            format!("\"{name}\" is not a header name"),
                        );
                    }
                }
            }
            if let Some(fb) = &route.fallback {
                let at = format!("{at}.fallback");
                status(&mut err, format!("{at}.status"), fb.status);
                if let Err(e) = fallback_headers(&fb.headers) {
                    err(format!("{at}.{}", e.path), e.reason);
                }
                if fb.on.as_ref().is_some_and(Vec::is_empty) {
                    err(
                        format!("{at}.on"),
                        "must name at least one condition (leave it out for every failure)".into(),
                    );
                }
            }
            if let Some(fault) = &route.fault {
                let at = format!("{at}.fault");
                if let Some(delay) = &fault.delay {
                    percent(&mut err, format!("{at}.delay.percent"), delay.percent);
                    positive(&mut err, format!("{at}.delay.duration"), delay.duration);
                }
                if let Some(abort) = &fault.abort {
                    percent(&mut err, format!("{at}.abort.percent"), abort.percent);
                    status(&mut err, format!("{at}.abort.status"), abort.status);
                }
            }
        }
        let store = &self.store;
        if store.path.is_some() && store.kind != StoreKind::Embedded {
            err("store.path".into(), "is for kind = \"embedded\"".into());
        }
        if store.url.is_some() && store.kind != StoreKind::Redis {
            err("store.url".into(), "is for kind = \"redis\"".into());
        }
        if store.kind == StoreKind::Redis {
            if let Err(e) = keel::store::RedisStore::open(store.url()) {
                err("store.url".into(), e.reason().into());
            }
        }
        if store.kind == StoreKind::Embedded && store.path().is_empty() {
            err("store.path".into(), "must not be empty".into());
        }
        positive(&mut err, "store.timeout".into(), store.timeout);
        match store.max_bytes {
            Some(_) if store.kind != StoreKind::Memory => err(
                "store.max_bytes".into(),
                "is for kind = \"memory\" (the embedded store's file and Redis's maxmemory bound the others)".into(),
            ),
            Some(ByteSize(n)) if n < 64 << 10 => {
                err("store.max_bytes".into(), "must be at least 64KiB".into());
            }
            _ => {}
        }
        if let Some(shed) = &self.load_shed {
            if shed.max_in_flight == 0 {
                err(
                    "load_shed.max_in_flight".into(),
                    "must be at least 1".into(),
                );
            }
        }
        errors
    }
}

/// A fallback's headers, as the data plane sends them: an error names the
/// header (`headers.<name>`).
pub(crate) fn fallback_headers(
    headers: &BTreeMap<String, String>,
) -> Result<http::HeaderMap, FieldError> {
    let mut map = http::HeaderMap::new();
    for (name, value) in headers {
        let at = || format!("headers.{name}");
        let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| FieldError {
            path: at(),
            reason: "is not a header name".into(),
        })?;
        let value = http::HeaderValue::from_bytes(value.as_bytes()).map_err(|_| FieldError {
            path: at(),
            reason: "holds control characters".into(),
        })?;
        map.insert(name, value);
    }
    Ok(map)
}

/// The longest duration the timeouts take (a year): beyond, a deadline
/// computed from now could overflow the clock.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn positive(err: &mut impl FnMut(String, String), path: String, d: Duration) {
    if d.is_zero() {
        err(path, "must be longer than zero".into());
    } else if d > MAX_DURATION {
        err(
            path,
            format!("must be at most {}", format_duration(MAX_DURATION)),
        );
    }
}

fn percent(err: &mut impl FnMut(String, String), path: String, p: f64) {
    if !(0.0..=100.0).contains(&p) {
        err(path, format!("must be between 0 and 100, got {p}"));
    }
}

fn status(err: &mut impl FnMut(String, String), path: String, code: u16) {
    if !(100..=599).contains(&code) {
        err(
            path,
            format!("must be an HTTP status (100 to 599), got {code}"),
        );
    }
}

fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("\"{text}\" is not an address like \"127.0.0.1:8080\""))
}

/// An endpoint as the data plane uses it: a `host:port` authority.
pub(crate) fn endpoint(text: &str) -> Result<http::uri::Authority, String> {
    host_port(text)?;
    text.parse().map_err(|_| {
        format!("\"{text}\" is not an endpoint (an authority like \"payment.internal:80\")")
    })
}

/// A health check's request, as the data plane sends it.
pub(crate) fn health_check_request(path: &str) -> Result<http::request::Parts, String> {
    if !path.starts_with('/') {
        return Err(format!("must start with \"/\", got \"{path}\""));
    }
    http::Request::get(path)
        .header(http::header::USER_AGENT, "keel-health-check")
        .body(())
        .map(|r| r.into_parts().0)
        .map_err(|_| {
            format!("\"{path}\" is not a path and query (no spaces or controls; escape them)")
        })
}

fn host_port(text: &str) -> Result<(), String> {
    let bad = || {
        format!("\"{text}\" is not an endpoint like \"127.0.0.1:9001\" or \"payment.internal:80\"")
    };
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    if text.len() > 255 + 6 {
        return Err(format!(
            "an endpoint of {} bytes is longer than any host name",
            text.len()
        ));
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}
