//! The three probe endpoints for axum: `GET /health/live`,
//! `/health/ready` and `/health/startup`, answering the [`Report`] as JSON
//! with 200, or 503 when `DOWN`.
//!
//! ```
//! use keel::health::HealthRegistry;
//!
//! let health = HealthRegistry::new();
//! let app: axum::Router = axum::Router::new().merge(keel::health::axum::routes(health));
//! # drop(app);
//! ```

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::{HealthRegistry, Kind, Report};

/// The probe endpoints, reading `registry`.
pub fn routes<S>(registry: HealthRegistry) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let probe = |kind: Kind| {
        let registry = registry.clone();
        get(move || {
            let report = registry.report(kind);
            std::future::ready(respond(report))
        })
    };
    Router::new()
        .route("/health/live", probe(Kind::Liveness))
        .route("/health/ready", probe(Kind::Readiness))
        .route("/health/startup", probe(Kind::Startup))
}

/// A report as a probe's response.
pub fn respond(report: Report) -> Response {
    let status =
        StatusCode::from_u16(report.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(report)).into_response()
}
