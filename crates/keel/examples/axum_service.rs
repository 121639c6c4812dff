//! An axum service that calls two simulated dependencies through keel, and
//! shows what keel did: `/metrics` (Prometheus text) and the three health
//! endpoints.
//!
//! ```text
//! cargo run --example axum_service --all-features
//! curl localhost:3000/price/sku-1            # pricing: timeout, retry, breaker, hedge, bulkhead
//! curl localhost:3000/recommendations        # recommendations: shed, rate limit, adaptive limit, fallback
//! curl localhost:3000/receipt/42             # blocking work on a thread-pool bulkhead
//! curl -X POST -H 'idempotency-key: k1' localhost:3000/pay/42   # once per key; again replays
//! curl -X POST 'localhost:3000/chaos/pricing?fail_percent=100'   # break pricing
//! curl -X POST 'localhost:3000/drill?enabled=true'   # keel's own fault injection on pricing
//! curl localhost:3000/metrics
//! curl -i localhost:3000/health/ready
//! ```
//!
//! Every layer is a keel tower layer; `ObserveLayer` gives each dependency
//! its golden signals (calls by outcome, latency histogram, in flight).
//! `tests/axum_service.rs` drives this service and scrapes its `/metrics`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel::adaptive::{AdaptiveLimitLayer, AdaptiveLimiter, Aimd};
use keel::bulkhead::{Bulkhead, BulkheadLayer, ThreadPool};
use keel::chaos::{Chaos, ChaosLayer};
use keel::circuit_breaker::{CircuitBreaker, CircuitBreakerLayer, Window};
use keel::fallback::{Fallback, FallbackLayer, Served};
use keel::health::{Check, HealthRegistry, Kind};
use keel::hedge::{Hedge, HedgeLayer};
use keel::idempotency::{Idempotency, MemoryStore};
use keel::observe::{ObserveLayer, Observer};
use keel::rate_limit::{RateLimitLayer, RateLimiter};
use keel::retry::{Backoff, Jitter, Retry, RetryBudget, RetryLayer};
use keel::shed::{LoadShedLayer, LoadShedder, Priority};
use keel::timeout::{Timeout, TimeoutLayer};
use keel::{Error, ServiceError};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

/// A simulated dependency: answers after `latency`, fails `fail_percent` of
/// calls and hangs `hang_percent` of them (deterministically, by a counter,
/// so that runs repeat).
#[derive(Debug, Default)]
pub struct Dependency {
    latency_ms: AtomicU64,
    fail_percent: AtomicU32,
    hang_percent: AtomicU32,
    calls: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Behaviour {
    #[serde(default)]
    pub latency_ms: u64,
    #[serde(default)]
    pub fail_percent: u32,
    #[serde(default)]
    pub hang_percent: u32,
}

impl Dependency {
    fn new(latency_ms: u64) -> Arc<Self> {
        let dep = Dependency::default();
        dep.latency_ms.store(latency_ms, Ordering::Relaxed);
        Arc::new(dep)
    }

    /// Changes how the dependency behaves from now on.
    pub fn set(&self, chaos: Behaviour) {
        self.latency_ms.store(chaos.latency_ms, Ordering::Relaxed);
        self.fail_percent
            .store(chaos.fail_percent.min(100), Ordering::Relaxed);
        self.hang_percent
            .store(chaos.hang_percent.min(100), Ordering::Relaxed);
    }

    /// Calls that reached the dependency.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn serve(&self) -> Result<(), std::io::Error> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let slot = (n % 100) as u32;
        let fail = self.fail_percent.load(Ordering::Relaxed);
        let hang = self.hang_percent.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(
            self.latency_ms.load(Ordering::Relaxed),
        ))
        .await;
        if slot < fail {
            return Err(std::io::Error::other("503 from the dependency"));
        }
        if slot < fail + hang {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

type Pricing = BoxCloneSyncService<String, u32, Error<ServiceError>>;
type Recommendations = BoxCloneSyncService<(), Served<Vec<String>>, Error<ServiceError>>;

/// The service's state: its dependencies' clients and what it reports.
#[derive(Clone)]
pub struct App {
    pricing: Pricing,
    recommendations: Recommendations,
    receipts: ThreadPool,
    payments: Idempotency,
    /// Payments actually made (replays make none).
    pub payments_made: Arc<AtomicU64>,
    /// The simulated dependencies, to break them.
    pub pricing_dep: Arc<Dependency>,
    pub recommendations_dep: Arc<Dependency>,
    pub health: HealthRegistry,
    pub payment_breaker: CircuitBreaker,
    pub drill: Chaos,
    metrics: PrometheusHandle,
}

/// Installs the Prometheus recorder (before any policy is built, so their
/// metric handles register with it), with histogram buckets for latency.
pub fn install_recorder() -> PrometheusHandle {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("keel_call_duration_seconds".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .expect("the bucket list is not empty")
        .install_recorder()
        .expect("no other recorder is installed")
}

/// Builds the service's policies and routes. Call inside a tokio runtime
/// (health checks run in the background), after `install_recorder`.
pub fn app(metrics: PrometheusHandle) -> Result<(Router, App), keel::ConfigError> {
    // Pricing: total timeout > retry (with a budget) > breaker > hedge >
    // bulkhead > per-try timeout > the dependency.
    let pricing_dep = Dependency::new(10);
    let drill = Chaos::builder("pricing")
        .error(20.0)
        .latency(10.0, Duration::from_millis(300))
        .seed(2024) // the same drill every run
        .enabled(false)
        .build()?;
    let breaker = CircuitBreaker::builder("pricing")
        .window(Window::Count(20))
        .minimum_calls(10)
        .failure_rate_threshold(0.5)
        .wait_in_open(Duration::from_secs(5))
        .build()?;
    let budget = RetryBudget::builder()
        .ratio(0.5)
        .min_per_second(5)
        .build()?;
    let pricing = ServiceBuilder::new()
        .layer(ObserveLayer::new(Observer::new("pricing")))
        .layer(TimeoutLayer::new(Timeout::named(
            "pricing",
            Duration::from_secs(1),
        )))
        .layer(RetryLayer::new(
            Retry::builder()
                .name("pricing")
                .max_attempts(3)
                .backoff(Backoff::exponential(Duration::from_millis(10)))
                .jitter(Jitter::Full)
                // Do not wait for an open breaker past what the caller waits.
                .time_budget(Duration::from_millis(800))
                .budget(budget.clone())
                .build()?,
        ))
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .layer(HedgeLayer::new(
            Hedge::builder()
                .name("pricing")
                .delay(Duration::from_millis(50))
                .budget(budget)
                .build()?,
            |_: &String| true, // a price lookup is a read
        ))
        .layer(BulkheadLayer::new(
            Bulkhead::builder("pricing").max_concurrent(8).build()?,
        ))
        .layer(TimeoutLayer::new(Timeout::named(
            "pricing-attempt",
            Duration::from_millis(200),
        )))
        // An incident drill, off until `POST /drill?enabled=true`.
        .layer(ChaosLayer::new(drill.clone()))
        .service_fn({
            let dep = pricing_dep.clone();
            move |sku: String| {
                let dep = dep.clone();
                async move {
                    dep.serve().await?;
                    Ok::<_, std::io::Error>(sku.len() as u32 * 100)
                }
            }
        });

    // Recommendations (optional): fallback to an empty list > observe >
    // shed (low priority) > rate limit > adaptive limit > timeout.
    let recommendations_dep = Dependency::new(5);
    let fallback = Fallback::builder()
        .name("recommendations")
        .value(Vec::new)
        .build();
    let recommendations = ServiceBuilder::new()
        .layer(FallbackLayer::new(fallback, |_: &()| ()))
        .layer(ObserveLayer::new(Observer::new("recommendations")))
        .layer(LoadShedLayer::new(
            LoadShedder::builder("recommendations")
                .capacity(16)
                .build()?,
            |_: &()| Priority::Low,
        ))
        .layer(RateLimitLayer::new(
            RateLimiter::builder("recommendations")
                .per_second(50.0)
                .burst(10)
                .build()?,
        ))
        .layer(AdaptiveLimitLayer::new(
            AdaptiveLimiter::builder("recommendations")
                .algorithm(Aimd::default().initial_limit(20).min_limit(2))
                .build()?,
        ))
        .layer(TimeoutLayer::new(Timeout::named(
            "recommendations",
            Duration::from_millis(100),
        )))
        .service_fn({
            let dep = recommendations_dep.clone();
            move |()| {
                let dep = dep.clone();
                async move {
                    dep.serve().await?;
                    Ok::<_, std::io::Error>(vec!["socks".to_string(), "laces".to_string()])
                }
            }
        });

    let receipts = ThreadPool::builder("receipts")
        .threads(2)
        .max_queue(8)
        .build()?;

    let health = HealthRegistry::new();
    health.register(Check::new("process", Kind::Liveness, || async {
        Ok::<_, String>(())
    }))?;
    health.register_breaker(&breaker, Kind::Readiness, true)?;
    health.register(
        Check::new("recommendations", Kind::Readiness, {
            let dep = recommendations_dep.clone();
            move || {
                let dep = dep.clone();
                async move {
                    match tokio::time::timeout(Duration::from_millis(200), dep.serve()).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("no answer in 200ms".to_string()),
                    }
                }
            }
        })
        .optional()
        .interval(Duration::from_secs(2))
        .timeout(Duration::from_millis(500)),
    )?;
    health.register(Check::new("config", Kind::Startup, || async {
        Ok::<_, String>("loaded".to_string())
    }))?;

    let payments = Idempotency::builder("payments")
        .store(MemoryStore::new())
        .ttl(Duration::from_secs(24 * 3600))
        .lock_timeout(Duration::from_secs(30))
        .build()?;

    let state = App {
        pricing: BoxCloneSyncService::new(pricing),
        recommendations: BoxCloneSyncService::new(recommendations),
        receipts,
        payments,
        payments_made: Arc::default(),
        pricing_dep,
        recommendations_dep,
        health: health.clone(),
        payment_breaker: breaker,
        drill,
        metrics,
    };
    let router = Router::new()
        .route("/price/{sku}", get(price))
        .route("/recommendations", get(recommend))
        .route("/receipt/{order}", get(receipt))
        .route("/pay/{order}", post(pay))
        .route("/chaos/{dependency}", post(chaos))
        .route("/drill", post(drill_switch))
        .route("/metrics", get(render_metrics))
        .merge(keel::health::axum::routes(health))
        .with_state(state.clone());
    Ok((router, state))
}

/// A keel error as a response: why, and when known, when to retry.
fn unavailable(err: Error<ServiceError>) -> Response {
    let refusal = err.rejection();
    let status = match refusal.unwrap_or(&err) {
        Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut response = (status, err.to_string()).into_response();
    if let Some(after) = refusal.and_then(Error::retry_after) {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert("retry-after", secs.to_string().parse().expect("digits"));
    }
    response
}

async fn price(State(app): State<App>, Path(sku): Path<String>) -> Response {
    match app.pricing.oneshot(sku.clone()).await {
        Ok(cents) => Json(serde_json::json!({ "sku": sku, "cents": cents })).into_response(),
        Err(err) => unavailable(err),
    }
}

async fn recommend(State(app): State<App>) -> Response {
    match app.recommendations.oneshot(()).await {
        Ok(served) => Json(serde_json::json!({
            "items": served.value,
            "source": served.source.as_str(),
        }))
        .into_response(),
        Err(err) => unavailable(err),
    }
}

async fn receipt(State(app): State<App>, Path(order): Path<u64>) -> Response {
    // Rendering a receipt blocks (a PDF library, say): on its own threads.
    match app
        .receipts
        .run(move || format!("receipt for order {order}"))
        .await
    {
        Ok(text) => text.into_response(),
        Err(full) => unavailable(Error::from(full)),
    }
}

/// A payment runs once per `Idempotency-Key`: a client retrying after a
/// timeout gets the first answer back instead of paying twice.
async fn pay(
    State(app): State<App>,
    Path(order): Path<u64>,
    headers: axum::http::HeaderMap,
) -> Response {
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) else {
        return (
            StatusCode::BAD_REQUEST,
            "an Idempotency-Key header is required",
        )
            .into_response();
    };
    let fingerprint = format!("pay {order}");
    let made = app.payments_made.clone();
    let paid = app
        .payments
        .call(key, fingerprint.as_bytes(), || async move {
            let n = made.fetch_add(1, Ordering::Relaxed) + 1;
            Ok::<_, std::convert::Infallible>(format!("paid order {order} (payment #{n})"))
        })
        .await;
    match paid {
        Ok(done) => {
            let mut response = done.value.into_response();
            if done.replayed {
                response.headers_mut().insert(
                    "idempotent-replay",
                    axum::http::HeaderValue::from_static("true"),
                );
            }
            response
        }
        Err(Error::KeyMismatch) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "this Idempotency-Key was used for another request",
        )
            .into_response(),
        Err(err) => unavailable(err.map_inner(|never| match never {})),
    }
}

async fn chaos(
    State(app): State<App>,
    Path(dependency): Path<String>,
    Query(chaos): Query<Behaviour>,
) -> Response {
    let dep = match dependency.as_str() {
        "pricing" => &app.pricing_dep,
        "recommendations" => &app.recommendations_dep,
        other => {
            return (
                StatusCode::NOT_FOUND,
                format!("no dependency named {other:?}: pricing or recommendations"),
            )
                .into_response()
        }
    };
    dep.set(chaos);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct Drill {
    enabled: bool,
}

async fn drill_switch(State(app): State<App>, Query(drill): Query<Drill>) -> Response {
    app.drill.set_enabled(drill.enabled);
    StatusCode::NO_CONTENT.into_response()
}

async fn render_metrics(State(app): State<App>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

#[allow(dead_code)] // the test includes this file for `app`, not `main`
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let metrics = install_recorder();
    let (router, _) = app(metrics)?;
    let addr = std::env::var("KEEL_EXAMPLE_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
