//! The admin plane: health probes, metrics, state, and the breaker switch.
//!
//! | request | answer |
//! |---|---|
//! | `GET /health/live` | 200 while the process serves |
//! | `GET /health/startup` | 200 once configured and listening, else 503 |
//! | `GET /health/ready` | UP / DEGRADED (200) or DOWN (503), per upstream |
//! | `GET /metrics` | Prometheus text |
//! | `GET /state` | routes' breakers, bulkheads, limiters; upstreams' endpoints |
//! | `POST /routes/<name>/circuit_breaker` | `{"state": "forced_open" \| "disabled" \| "closed"}` |
//!
//! With `server.admin_token` set, every request but the health probes needs
//! `Authorization: Bearer <token>` (the scheme in any case); a state-changing
//! request needs `Content-Type: application/json` (else 415).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use keel::circuit_breaker::State;
use serde_json::{json, Value};

use crate::proxy::{Proxy, Table};

type Answer = Response<Full<Bytes>>;

/// Serves one admin request.
pub(crate) async fn handle(proxy: Arc<Proxy>, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "/health/live") => json_answer(StatusCode::OK, &json!({"status": "UP"})),
        (Method::GET, "/health/startup") => {
            if proxy.is_started() {
                json_answer(StatusCode::OK, &json!({"status": "UP"}))
            } else {
                json_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "DOWN", "detail": "starting"}),
                )
            }
        }
        (Method::GET, "/health/ready") => ready(&proxy),
        (_, "/health/live" | "/health/startup" | "/health/ready") => not_allowed("GET"),
        _ => {
            let table = proxy.table();
            if let Some(denied) = authorize(&table, &request) {
                return denied;
            }
            match (request.method().clone(), path.as_str()) {
                (Method::GET, "/metrics") => {
                    let mut answer = Response::new(Full::new(Bytes::from(proxy.metrics.render())));
                    answer.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    answer
                }
                (Method::GET, "/state") => json_answer(StatusCode::OK, &state(&table)),
                (_, "/metrics" | "/state") => not_allowed("GET"),
                (method, p) => match breaker_switch_route(p) {
                    Some(_) if method == Method::POST && !is_json(&request) => error(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "send the body with content-type: application/json",
                    ),
                    Some(name) if method == Method::POST => {
                        switch_breaker(&table, name, request).await
                    }
                    Some(_) => not_allowed("POST"),
                    None => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
                },
            }
        }
    }
}

fn breaker_switch_route(path: &str) -> Option<&str> {
    path.strip_prefix("/routes/")?
        .strip_suffix("/circuit_breaker")
        .filter(|name| !name.is_empty() && !name.contains('/'))
}

/// `None` when the request may go on, else the refusal.
fn authorize(table: &Table, request: &Request<Incoming>) -> Option<Answer> {
    let token = table.config.server.admin_token.as_ref()?.expose();
    // The scheme is case-insensitive (RFC 9110 section 11.1).
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim_matches(' '));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
        return None;
    }
    let mut answer = error(
        StatusCode::UNAUTHORIZED,
        "this admin endpoint needs the bearer token in server.admin_token",
    );
    answer
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(answer)
}

/// Whether a request's body is declared JSON. State-changing requests must
/// be: a browser's cross-site form post can send only form and text types
/// without a preflight, so it cannot switch a breaker on this machine.
fn is_json(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Readiness: each upstream UP or DOWN (no endpoint passing health checks,
/// or a route's breaker open); DOWN overall if a required one is down,
/// DEGRADED if only optional ones are.
fn ready(proxy: &Proxy) -> Answer {
    let table = proxy.table();
    let mut checks = serde_json::Map::new();
    let mut required_down = false;
    let mut optional_down = false;
    for (name, upstream) in &table.upstreams {
        let healthy = upstream.healthy_endpoints();
        let mut down = Vec::new();
        if healthy == 0 {
            down.push("no endpoint passes its health check".to_owned());
        }
        let mut breakers = serde_json::Map::new();
        for route in table
            .routes
            .iter()
            .filter(|r| Arc::ptr_eq(&r.upstream, upstream))
        {
            if let Some(breaker) = &route.breaker {
                let state = breaker.state();
                if matches!(state, State::Open | State::ForcedOpen) {
                    down.push(format!(
                        "the circuit breaker of route \"{}\" is {state}",
                        route.name
                    ));
                }
                breakers.insert(route.name.to_string(), json!(state.as_str()));
            }
        }
        let required = upstream.config.required;
        if !down.is_empty() {
            if required {
                required_down = true;
            } else {
                optional_down = true;
            }
        }
        let mut check = json!({
            "status": if down.is_empty() { "UP" } else { "DOWN" },
            "required": required,
            "healthy_endpoints": healthy,
            "endpoints": upstream.endpoints.len(),
            "circuit_breakers": breakers,
        });
        if !down.is_empty() {
            check["detail"] = json!(down.join("; "));
        }
        checks.insert(name.clone(), check);
    }
    let draining = proxy.is_draining();
    let (status, code) = if required_down || draining {
        ("DOWN", StatusCode::SERVICE_UNAVAILABLE)
    } else if optional_down {
        ("DEGRADED", StatusCode::OK)
    } else {
        ("UP", StatusCode::OK)
    };
    let mut body = json!({"status": status, "checks": checks});
    if draining {
        body["detail"] = json!("shutting down: finishing requests in flight");
    }
    json_answer(code, &body)
}

fn state(table: &Table) -> Value {
    let mut routes = serde_json::Map::new();
    for route in &table.routes {
        let mut r = json!({
            "path_prefix": route.config.path_prefix,
            "upstream": route.config.upstream,
            "in_flight": route.metrics.in_flight_now(),
        });
        if let Some(breaker) = &route.breaker {
            let m = breaker.metrics();
            r["circuit_breaker"] = json!({
                "state": breaker.state().as_str(),
                "failure_rate": m.failure_rate,
                "slow_call_rate": m.slow_call_rate,
                "calls": m.calls,
                "failed_calls": m.failed_calls,
                "successful_calls": m.successful_calls,
                "slow_calls": m.slow_calls,
                "not_permitted_calls": m.not_permitted_calls,
            });
        }
        if let Some(bulkhead) = &route.bulkhead {
            let m = bulkhead.metrics();
            r["bulkhead"] = json!({
                "in_use": m.in_use,
                "available": m.available,
                "waiting": m.waiting,
                "rejected": m.rejected,
            });
        }
        if let Some(limit) = route.rate_limit_state() {
            r["rate_limit"] = limit;
        }
        routes.insert(route.name.to_string(), r);
    }
    let upstreams: serde_json::Map<String, Value> = table
        .upstreams
        .iter()
        .map(|(name, u)| (name.clone(), u.state()))
        .collect();
    let mut state = json!({"routes": routes, "upstreams": upstreams});
    if let Some(shed) = &table.shed {
        let m = shed.metrics();
        state["load_shed"] = json!({
            "max_in_flight": table.config.load_shed.as_ref().map(|l| l.max_in_flight),
            "in_flight": m.in_flight,
        });
    }
    state
}

async fn switch_breaker(table: &Table, name: &str, request: Request<Incoming>) -> Answer {
    let Some(route) = table.route_named(name) else {
        return error(StatusCode::NOT_FOUND, &format!("no route named \"{name}\""));
    };
    let Some(breaker) = &route.breaker else {
        return error(
            StatusCode::CONFLICT,
            &format!("route \"{name}\" has no circuit breaker; add [routes.circuit_breaker]"),
        );
    };
    let body = match Limited::new(request.into_body(), 4096).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the body could not be read (at most 4 KiB)",
            )
        }
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Switch {
        state: String,
    }
    let wanted = match serde_json::from_slice::<Switch>(&body) {
        Ok(s) => s.state,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "expected {{\"state\": \"forced_open\" | \"disabled\" | \"closed\"}}: {e}"
                ),
            )
        }
    };
    match wanted.as_str() {
        "forced_open" => breaker.force_open(),
        "disabled" => breaker.disable(),
        "closed" => breaker.reset(),
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("state: \"{other}\" is not one of forced_open, disabled, closed"),
            )
        }
    }
    tracing::warn!(route = %name, state = %breaker.state(), "circuit breaker switched by an operator");
    json_answer(
        StatusCode::OK,
        &json!({"route": name, "state": breaker.state().as_str()}),
    )
}

fn json_answer(status: StatusCode, body: &Value) -> Answer {
    let mut text = body.to_string();
    text.push('\n');
    let mut answer = Response::new(Full::new(Bytes::from(text)));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

fn error(status: StatusCode, message: &str) -> Answer {
    json_answer(status, &json!({"error": message}))
}

fn not_allowed(allow: &'static str) -> Answer {
    let mut answer = error(StatusCode::METHOD_NOT_ALLOWED, &format!("use {allow}"));
    answer
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    answer
}
