//! Health checks on tokio's paused clock: probes answer from the last
//! result at once, checks run at their own interval, and the aggregate
//! follows required and optional checks.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel::circuit_breaker::CircuitBreaker;
use keel::health::{Check, HealthRegistry, Kind, Status};
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

/// Lets the background checks run what is due now.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn passing(name: &str, kind: Kind) -> Check {
    Check::new(name, kind, || async { Ok::<_, String>(()) })
}

fn failing(name: &str, kind: Kind) -> Check {
    Check::new(name, kind, || async { Err::<(), _>("connection refused") })
}

#[tokio::test(start_paused = true)]
async fn a_hanging_check_never_makes_the_probe_wait() {
    let health = HealthRegistry::new();
    health
        .register(
            Check::new("payment", Kind::Readiness, || {
                std::future::pending::<Result<(), String>>()
            })
            .timeout(500 * MS)
            .interval(Duration::from_secs(5)),
        )
        .unwrap();
    settle().await;
    let start = Instant::now();
    let report = health.report(Kind::Readiness);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(report.status, Status::Down);
    assert_eq!(
        report.checks["payment"].detail.as_deref(),
        Some("not checked yet")
    );

    tokio::time::advance(500 * MS).await;
    settle().await;
    let report = health.report(Kind::Readiness);
    assert_eq!(report.status, Status::Down);
    assert_eq!(report.http_status(), 503);
    let payment = &report.checks["payment"];
    assert_eq!(payment.detail.as_deref(), Some("timed out after 500ms"));
    assert_eq!(payment.duration_ms, 500);
}

#[tokio::test(start_paused = true)]
async fn the_aggregate_follows_required_and_optional_checks() {
    let health = HealthRegistry::new();
    health
        .register(passing("database", Kind::Readiness))
        .unwrap();
    settle().await;
    assert_eq!(health.report(Kind::Readiness).status, Status::Up);

    health
        .register(failing("recommendations", Kind::Readiness).optional())
        .unwrap();
    settle().await;
    let report = health.report(Kind::Readiness);
    assert_eq!(report.status, Status::Degraded);
    assert_eq!(report.http_status(), 200);

    health
        .register(failing("payment", Kind::Readiness))
        .unwrap();
    settle().await;
    let report = health.report(Kind::Readiness);
    assert_eq!(report.status, Status::Down);
    assert_eq!(report.http_status(), 503);
    assert_eq!(report.checks.len(), 3);

    // Other kinds are separate.
    assert_eq!(health.report(Kind::Liveness).status, Status::Up);
    assert!(health.report(Kind::Liveness).checks.is_empty());
}

#[tokio::test(start_paused = true)]
async fn checks_run_at_their_interval_however_often_probed() {
    let runs = Arc::new(AtomicU32::new(0));
    let health = HealthRegistry::new();
    let counted = runs.clone();
    health
        .register(
            Check::new("cache", Kind::Liveness, move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, String>(()) }
            })
            .interval(Duration::from_secs(10)),
        )
        .unwrap();
    settle().await;
    for _ in 0..1000 {
        assert_eq!(health.report(Kind::Liveness).status, Status::Up);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    tokio::time::advance(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_check_that_recovers_is_up_again_and_a_panic_is_a_failure() {
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let health = HealthRegistry::new();
    health
        .register(
            Check::new("flaky", Kind::Readiness, move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        panic!("bug in the check");
                    }
                    Ok::<_, String>(format!("run {n}"))
                }
            })
            .interval(Duration::from_secs(1)),
        )
        .unwrap();
    settle().await;
    let report = health.report(Kind::Readiness);
    assert_eq!(report.status, Status::Down);
    assert_eq!(
        report.checks["flaky"].detail.as_deref(),
        Some("the check panicked")
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    let report = health.report(Kind::Readiness);
    assert_eq!(report.status, Status::Up);
    assert_eq!(report.checks["flaky"].detail.as_deref(), Some("run 1"));
}

#[tokio::test(start_paused = true)]
async fn a_circuit_breaker_is_a_readiness_check() {
    let breaker = CircuitBreaker::builder("payment").build().unwrap();
    let health = HealthRegistry::new();
    health
        .register_breaker(&breaker, Kind::Readiness, true)
        .unwrap();
    assert_eq!(health.report(Kind::Readiness).status, Status::Up);
    breaker.force_open();
    let report = health.report(Kind::Readiness);
    assert_eq!(report.status, Status::Down);
    assert_eq!(
        report.checks["payment"].detail.as_deref(),
        Some("circuit breaker forced_open")
    );
    breaker.reset();
    assert_eq!(health.report(Kind::Readiness).status, Status::Up);
}

#[tokio::test(start_paused = true)]
async fn registration_errors_name_the_field() {
    let health = HealthRegistry::new();
    let err = health
        .register(passing("db", Kind::Readiness).timeout(Duration::ZERO))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "checks.db.timeout: must be longer than zero"
    );
    health.register(passing("db", Kind::Readiness)).unwrap();
    let err = health.register(passing("db", Kind::Readiness)).unwrap_err();
    assert!(err.to_string().starts_with("checks.db:"), "{err}");
}

#[test]
fn registering_outside_a_runtime_is_an_error_not_a_panic() {
    let err = HealthRegistry::new()
        .register(passing("db", Kind::Readiness))
        .unwrap_err();
    assert!(err.to_string().contains("tokio runtime"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn the_report_serializes_as_the_documented_json() {
    let health = HealthRegistry::new();
    health.register(passing("database", Kind::Startup)).unwrap();
    health
        .register(failing("search", Kind::Startup).optional())
        .unwrap();
    settle().await;
    let json = serde_json::to_value(health.report(Kind::Startup)).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "status": "DEGRADED",
            "checks": {
                "database": {"status": "UP", "detail": null, "duration_ms": 0},
                "search": {"status": "DOWN", "detail": "connection refused", "duration_ms": 0},
            }
        })
    );
}

#[cfg(feature = "axum")]
mod axum_routes {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(app: &axum::Router, path: &str) -> (u16, serde_json::Value) {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn the_endpoints_answer_from_cache_while_a_check_hangs() {
        let health = HealthRegistry::new();
        health.register(passing("process", Kind::Liveness)).unwrap();
        health
            .register(
                Check::new("payment", Kind::Readiness, || {
                    std::future::pending::<Result<(), String>>()
                })
                .timeout(500 * MS),
            )
            .unwrap();
        health.register(passing("config", Kind::Startup)).unwrap();
        let app: axum::Router = keel::health::axum::routes(health);
        settle().await;

        let start = Instant::now();
        let (status, body) = get(&app, "/health/ready").await;
        assert_eq!(start.elapsed(), Duration::ZERO, "answered from cache");
        assert_eq!(status, 503);
        assert_eq!(body["status"], "DOWN");
        assert_eq!(body["checks"]["payment"]["detail"], "not checked yet");

        tokio::time::advance(500 * MS).await;
        settle().await;
        let (status, body) = get(&app, "/health/ready").await;
        assert_eq!(status, 503);
        assert_eq!(body["checks"]["payment"]["detail"], "timed out after 500ms");

        let (status, body) = get(&app, "/health/live").await;
        assert_eq!((status, &body["status"]), (200, &"UP".into()));
        let (status, body) = get(&app, "/health/startup").await;
        assert_eq!((status, &body["status"]), (200, &"UP".into()));
    }
}
