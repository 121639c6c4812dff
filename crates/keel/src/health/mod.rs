//! Health checks for probes: liveness, readiness and startup.
//!
//! Each check runs in the background at its own interval, under its own
//! timeout, and a probe reads the last result: a probe answers at once, and
//! a sick dependency gets one check per interval however often it is
//! probed. A check that hangs is reported `DOWN` ("timed out") once its
//! timeout passes, and a check that panics is reported `DOWN` too.
//!
//! A check is `required` (the default) or optional: the aggregate for a kind
//! is `DOWN` when a required check fails, `DEGRADED` when only optional ones
//! do, `UP` otherwise. A check that has not finished its first run counts
//! as failing ("not checked yet"). Probes answer 200 unless `DOWN` (503).
//!
//! ```
//! use keel::health::{Check, HealthRegistry, Kind, Status};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let health = HealthRegistry::new();
//! health.register(
//!     Check::new("database", Kind::Readiness, || async { Ok::<_, String>(()) })
//!         .interval(Duration::from_secs(5))
//!         .timeout(Duration::from_secs(1)),
//! )?;
//! health.register(
//!     Check::new("recommendations", Kind::Readiness, || async {
//!         Err::<(), _>("connection refused")
//!     })
//!     .optional(),
//! )?;
//! tokio::time::sleep(Duration::from_millis(1)).await; // the first runs
//! let report = health.report(Kind::Readiness);
//! assert_eq!(report.status, Status::Degraded);
//! assert_eq!(report.http_status(), 200);
//! assert_eq!(
//!     report.checks["recommendations"].detail.as_deref(),
//!     Some("connection refused")
//! );
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "axum")]
pub mod axum;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::task::AbortHandle;

use crate::circuit_breaker::{CircuitBreaker, State};
use crate::telemetry;
use crate::ConfigError;

/// Which probe a check answers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Is the process alive (restart it if not)?
    Liveness,
    /// May it take traffic now?
    Readiness,
    /// Has it finished starting?
    Startup,
}

impl Kind {
    /// Lower-case name, as in the `kind` label and the probe paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Liveness => "liveness",
            Kind::Readiness => "readiness",
            Kind::Startup => "startup",
        }
    }
}

/// A check's or an aggregate's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Working.
    Up,
    /// Working, with an optional check failing.
    Degraded,
    /// Not working.
    Down,
}

/// The last result of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// `UP` or `DOWN`.
    pub status: Status,
    /// What the check said: its error, or its detail when it passed.
    pub detail: Option<String>,
    /// How long the check took.
    pub duration_ms: u64,
}

/// The aggregate of one kind's checks: the probe's JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// `UP`, `DEGRADED` (an optional check fails) or `DOWN` (a required one
    /// does).
    pub status: Status,
    /// Every check of this kind, by name.
    pub checks: BTreeMap<String, CheckReport>,
}

impl Report {
    /// The probe's HTTP status: 503 when `DOWN`, else 200.
    pub fn http_status(&self) -> u16 {
        match self.status {
            Status::Down => 503,
            Status::Up | Status::Degraded => 200,
        }
    }
}

/// What a check's future may return: `Ok(())`, `Ok(detail)`, or an error
/// whose text becomes the detail.
pub trait IntoCheckResult {
    /// `Ok(detail)` when the check passed.
    fn into_check_result(self) -> Result<Option<String>, String>;
}

impl<E: fmt::Display> IntoCheckResult for Result<(), E> {
    fn into_check_result(self) -> Result<Option<String>, String> {
        self.map(|()| None).map_err(|e| e.to_string())
    }
}

impl<E: fmt::Display> IntoCheckResult for Result<String, E> {
    fn into_check_result(self) -> Result<Option<String>, String> {
        self.map(Some).map_err(|e| e.to_string())
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Option<String>, String>> + Send>>;
type Probe = Arc<dyn Fn() -> BoxFuture + Send + Sync>;

/// A check to register: a name, the probe it answers to, and an async
/// function. Defaults: every 10 s, 2 s timeout, required.
pub struct Check {
    name: String,
    kind: Kind,
    interval: Duration,
    timeout: Duration,
    required: bool,
    probe: Probe,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

impl Check {
    /// A check called `name` for `kind` probes, running `check`.
    pub fn new<F, Fut>(name: impl Into<String>, kind: Kind, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: IntoCheckResult,
    {
        Check {
            name: name.into(),
            kind,
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            required: true,
            probe: Arc::new(move || {
                let run = check();
                Box::pin(async move { run.await.into_check_result() })
            }),
        }
    }

    /// How often the check runs (default 10 s), counted from the end of
    /// one run to the start of the next.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// How long one run may take before it counts as failed (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A failing optional check makes the aggregate `DEGRADED`, not `DOWN`.
    pub fn optional(mut self) -> Self {
        self.required = false;
        self
    }

    /// Whether a failure makes the aggregate `DOWN` (default true).
    pub fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a registered check's result comes from.
enum Source {
    /// The background task's last result.
    Cached(Arc<Mutex<CheckReport>>),
    /// Read at once when probed (a circuit breaker's state).
    Live(Box<dyn Fn() -> CheckReport + Send + Sync>),
}

struct Registered {
    name: String,
    kind: Kind,
    required: bool,
    source: Source,
}

#[derive(Default)]
struct Inner {
    checks: Mutex<Vec<Registered>>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

/// The process's health checks. A cheap, cloneable handle; the background
/// checks stop when the last handle goes.
#[derive(Clone, Default)]
pub struct HealthRegistry {
    inner: Arc<Inner>,
}

impl fmt::Debug for HealthRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let checks = lock(&self.inner.checks);
        f.debug_struct("HealthRegistry")
            .field(
                "checks",
                &checks.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl HealthRegistry {
    /// An empty registry: every probe is `UP`.
    pub fn new() -> Self {
        HealthRegistry::default()
    }

    /// Registers `check` and starts running it in the background (on the
    /// current tokio runtime), or says which field is wrong.
    pub fn register(&self, check: Check) -> Result<(), ConfigError> {
        let field = |f: &str| format!("checks.{}.{f}", check.name);
        if check.interval.is_zero() {
            return Err(ConfigError::new(
                field("interval"),
                "must be longer than zero",
            ));
        }
        if check.timeout.is_zero() {
            return Err(ConfigError::new(
                field("timeout"),
                "must be longer than zero",
            ));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ConfigError::new(
                field("runtime"),
                "checks run in the background: register them inside a tokio runtime",
            )
        })?;
        let up = gauge(&check.name, check.kind, check.required);
        up.set(0.0);
        let last = Arc::new(Mutex::new(CheckReport {
            status: Status::Down,
            detail: Some("not checked yet".into()),
            duration_ms: 0,
        }));
        self.add(Registered {
            name: check.name.clone(),
            kind: check.kind,
            required: check.required,
            source: Source::Cached(last.clone()),
        })?;
        let task = runtime.spawn(run(check, last, up));
        lock(&self.inner.tasks).push(task.abort_handle());
        Ok(())
    }

    /// Registers a circuit breaker as a check of `kind`, read when probed:
    /// `DOWN` while it is open (or forced open), `UP` otherwise, with the
    /// state as detail.
    pub fn register_breaker(
        &self,
        breaker: &CircuitBreaker,
        kind: Kind,
        required: bool,
    ) -> Result<(), ConfigError> {
        let breaker = breaker.clone();
        let up = gauge(breaker.name(), kind, required);
        self.add(Registered {
            name: breaker.name().to_string(),
            kind,
            required,
            source: Source::Live(Box::new(move || {
                let state = breaker.state();
                let status = match state {
                    State::Open | State::ForcedOpen => Status::Down,
                    State::Closed | State::HalfOpen | State::Disabled => Status::Up,
                };
                up.set(if status == Status::Up { 1.0 } else { 0.0 });
                CheckReport {
                    status,
                    detail: Some(format!("circuit breaker {}", state.as_str())),
                    duration_ms: 0,
                }
            })),
        })
    }

    fn add(&self, check: Registered) -> Result<(), ConfigError> {
        let mut checks = lock(&self.inner.checks);
        if checks
            .iter()
            .any(|c| c.name == check.name && c.kind == check.kind)
        {
            return Err(ConfigError::new(
                format!("checks.{}", check.name),
                format!("a {} check of that name is registered", check.kind.as_str()),
            ));
        }
        checks.push(check);
        Ok(())
    }

    /// The aggregate and every check of `kind`, from the last results; never
    /// waits for a check.
    pub fn report(&self, kind: Kind) -> Report {
        let checks = lock(&self.inner.checks);
        let mut report = Report {
            status: Status::Up,
            checks: BTreeMap::new(),
        };
        for check in checks.iter().filter(|c| c.kind == kind) {
            let result = match &check.source {
                Source::Cached(last) => lock(last).clone(),
                Source::Live(read) => read(),
            };
            if result.status != Status::Up {
                report.status = match (report.status, check.required) {
                    (_, true) | (Status::Down, false) => Status::Down,
                    _ => Status::Degraded,
                };
            }
            report.checks.insert(check.name.clone(), result);
        }
        report
    }
}

fn gauge(check: &str, kind: Kind, required: bool) -> metrics::Gauge {
    telemetry::describe_metrics();
    metrics::gauge!(
        telemetry::HEALTH,
        "check" => check.to_string(),
        "kind" => kind.as_str(),
        "required" => if required { "true" } else { "false" }
    )
}

/// One check's background loop: run under the timeout (in a task of its
/// own, so a panic is a result, not the end of the loop), store, sleep.
async fn run(check: Check, last: Arc<Mutex<CheckReport>>, up: metrics::Gauge) {
    loop {
        let start = tokio::time::Instant::now();
        let mut task = tokio::spawn((check.probe)());
        let outcome = match tokio::time::timeout(check.timeout, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) if join.is_panic() => Err("the check panicked".to_string()),
            Ok(Err(_)) => Err("the check was cancelled".to_string()),
            Err(_) => {
                task.abort();
                Err(format!("timed out after {:?}", check.timeout))
            }
        };
        let report = CheckReport {
            status: if outcome.is_ok() {
                Status::Up
            } else {
                Status::Down
            },
            detail: outcome.unwrap_or_else(Some),
            duration_ms: start.elapsed().as_millis().try_into().unwrap_or(u64::MAX),
        };
        up.set(if report.status == Status::Up {
            1.0
        } else {
            0.0
        });
        *lock(&last) = report;
        tokio::time::sleep(check.interval).await;
    }
}
