//! The proxy's metrics: a Prometheus recorder for the `metrics` facade that
//! labels the library's per-policy series by route, and the handles the data
//! plane updates per request.
//!
//! Every policy the proxy builds for a route is named after the route, and
//! the library labels its series `name`. [`RouteLabels`] renames that label
//! to `route` when its value is a route's name, so `keel_retries_total`,
//! `keel_rejections_total`, `keel_circuit_breaker_state` and the rest line
//! up with the proxy's own `keel_requests_total{route,code}`. The shared
//! load shedder keeps its own name: shedding is not a route's.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered, by route and status code.
pub(crate) const REQUESTS: &str = "keel_requests_total";
/// Time from a request's arrival to its response's head, by route.
pub(crate) const DURATION: &str = "keel_request_duration_seconds";
/// Requests being handled, by route.
pub(crate) const IN_FLIGHT: &str = "keel_in_flight";
/// Whether an endpoint is in rotation, by upstream and endpoint.
pub(crate) const UPSTREAM_HEALTHY: &str = "keel_upstream_healthy";
/// Endpoints taken out of rotation by outlier detection.
pub(crate) const EJECTIONS: &str = "keel_upstream_ejections_total";
/// Client connections open, by plane (`data`, `admin`).
pub(crate) const CONNECTIONS: &str = "keel_connections";
/// Client connections closed at once because their plane's budget was
/// spent, by plane.
pub(crate) const CONNECTIONS_REJECTED: &str = "keel_connections_rejected_total";

/// The route label's value for requests no route matched.
pub(crate) const UNMATCHED: &str = "unmatched";

/// Latency buckets in seconds: 1 ms to 30 s.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The recorder's handle: renders the exposition and keeps the route names.
#[derive(Clone)]
pub(crate) struct Metrics {
    prometheus: PrometheusHandle,
    routes: Arc<RwLock<BTreeSet<String>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Installs the process-wide recorder (once; later calls return the
    /// first one's handle).
    pub(crate) fn install() -> Metrics {
        static INSTALLED: OnceLock<Metrics> = OnceLock::new();
        INSTALLED
            .get_or_init(|| {
                let recorder = PrometheusBuilder::new()
                    .set_buckets(BUCKETS)
                    .and_then(|b| {
                        b.set_buckets_for_metric(
                            Matcher::Full("keel_call_duration_seconds".into()),
                            BUCKETS,
                        )
                    })
                    .expect("the buckets are not empty")
                    .build_recorder();
                let metrics = Metrics {
                    prometheus: recorder.handle(),
                    routes: Arc::default(),
                };
                let labelled = RouteLabels {
                    inner: recorder,
                    routes: metrics.routes.clone(),
                };
                if metrics::set_global_recorder(labelled).is_err() {
                    tracing::warn!(
                        "a metrics recorder was already installed; /metrics shows only keel's own"
                    );
                }
                keel::describe_metrics();
                describe();
                metrics
            })
            .clone()
    }

    /// Declares the routes about to be built, so their policies' series are
    /// labelled `route`.
    pub(crate) fn set_routes<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes.extend(names.into_iter().map(str::to_owned));
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        self.prometheus.render()
    }

    /// Drains histogram samples into their buckets; call now and then.
    pub(crate) fn upkeep(&self) {
        self.prometheus.run_upkeep();
    }
}

fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        "Requests answered by the proxy, by route and status code."
    );
    metrics::describe_histogram!(
        DURATION,
        Unit::Seconds,
        "Time from a request's arrival to its response's head, by route."
    );
    metrics::describe_gauge!(IN_FLIGHT, "Requests being handled, by route.");
    metrics::describe_gauge!(
        UPSTREAM_HEALTHY,
        "1 while an upstream endpoint is in rotation (passing health checks, not ejected), else 0."
    );
    metrics::describe_counter!(
        EJECTIONS,
        "Endpoints taken out of rotation by outlier detection, by upstream and endpoint."
    );
}

/// Renames the library's `name` label to `route` when it names a route.
struct RouteLabels<R> {
    inner: R,
    routes: Arc<RwLock<BTreeSet<String>>>,
}

impl<R> RouteLabels<R> {
    fn relabel(&self, key: &Key) -> Key {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let is_route = |l: &Label| l.key() == "name" && routes.contains(l.value());
        if !key.labels().any(is_route) {
            return key.clone();
        }
        let labels: Vec<Label> = key
            .labels()
            .map(|l| {
                if is_route(l) {
                    Label::new("route", l.value().to_owned())
                } else {
                    l.clone()
                }
            })
            .collect();
        Key::from_parts(key.name().to_owned(), labels)
    }
}

impl<R: Recorder> Recorder for RouteLabels<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description)
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.inner.register_counter(&self.relabel(key), metadata)
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner.register_gauge(&self.relabel(key), metadata)
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.inner.register_histogram(&self.relabel(key), metadata)
    }
}

/// A route's request metrics; handles are registered once, the per-code
/// counters on first use.
pub(crate) struct RouteMetrics {
    route: Arc<str>,
    codes: Box<[OnceLock<Counter>]>,
    duration: Histogram,
    in_flight: Gauge,
    in_flight_now: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    pub(crate) fn new(route: &str) -> RouteMetrics {
        let route: Arc<str> = route.into();
        RouteMetrics {
            codes: (100..600).map(|_| OnceLock::new()).collect(),
            duration: metrics::histogram!(DURATION, "route" => route.to_string()),
            in_flight: metrics::gauge!(IN_FLIGHT, "route" => route.to_string()),
            in_flight_now: std::sync::atomic::AtomicU32::new(0),
            route,
        }
    }

    /// Counts a request as in flight until the guard drops.
    pub(crate) fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.increment(1.0);
        self.in_flight_now
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(self)
    }

    /// Requests in flight now.
    pub(crate) fn in_flight_now(&self) -> u32 {
        self.in_flight_now
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts an answered request.
    pub(crate) fn answered(&self, status: u16, took: Duration) {
        self.duration.record(took.as_secs_f64());
        let Some(slot) = self.codes.get(usize::from(status).wrapping_sub(100)) else {
            return;
        };
        slot.get_or_init(|| {
            metrics::counter!(REQUESTS, "route" => self.route.to_string(), "code" => status.to_string())
        })
        .increment(1);
    }
}

/// A request in flight; decrements the gauge when dropped.
pub(crate) struct InFlight<'a>(&'a RouteMetrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.decrement(1.0);
        self.0
            .in_flight_now
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
