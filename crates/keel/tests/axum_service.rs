//! Drives the axum example through every policy over real HTTP on
//! loopback, scrapes its `/metrics`, parses the Prometheus text format, and
//! checks that every metric `docs/METRICS.md` lists is there with the
//! documented labels.

#[path = "../examples/axum_service.rs"]
#[allow(dead_code, unreachable_pub)]
mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request on a fresh connection: the status and the body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_with(addr, method, path, "").await
}

/// `http` with extra header lines (each ending in CRLF).
async fn http_with(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{headers}connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        String::from_utf8(raw).unwrap()
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the service answers within 10s");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a full response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// Sends `n` requests at once.
async fn burst(addr: SocketAddr, path: &'static str, n: usize) -> Vec<(u16, String)> {
    let calls: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { http(addr, "GET", path).await }))
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.unwrap());
    }
    statuses
}

/// The metrics table of docs/METRICS.md: name -> label names.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let doc = include_str!("../../../docs/METRICS.md");
    let mut metrics = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `name` | type | labels | meaning |
        if cells.len() < 5 || !cells[1].starts_with("`keel_") {
            continue;
        }
        let name = cells[1].trim_matches('`').to_string();
        let labels = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_string())
            .filter(|l| !l.is_empty() && l != "-")
            .collect();
        metrics.insert(name, labels);
    }
    assert!(metrics.len() >= 10, "docs/METRICS.md lists the metrics");
    metrics
}

type Samples = Vec<prometheus_parse::Sample>;

fn value(sample: &prometheus_parse::Sample) -> f64 {
    match &sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        prometheus_parse::Value::Histogram(buckets) => {
            buckets.iter().map(|b| b.count).fold(0.0, f64::max)
        }
        prometheus_parse::Value::Summary(_) => f64::NAN,
    }
}

/// The value of the sample of `metric` with exactly these label values.
fn find(samples: &Samples, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let hit = samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
    match hit {
        Some(sample) => value(sample),
        None => panic!("no {metric}{labels:?} in the scrape"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_list_every_documented_metric_after_traffic_through_every_policy() {
    let handle = service::install_recorder();
    // A subscriber that never reads: its buffer fills and drops are counted.
    let _slow_subscriber = keel::events::subscribe(1);
    let (router, app) = service::app(handle).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    // Healthy pricing.
    for _ in 0..10 {
        assert_eq!(http(addr, "GET", "/price/sku-1").await.0, 200);
    }
    // A drill: keel's own faults, retried like real ones, then switched off.
    assert_eq!(http(addr, "POST", "/drill?enabled=true").await.0, 204);
    for _ in 0..10 {
        http(addr, "GET", "/price/sku-1").await;
    }
    assert_eq!(http(addr, "POST", "/drill?enabled=false").await.0, 204);
    // Slow pricing: hedged after 50ms.
    let chaos = |path: &'static str| async move {
        assert_eq!(http(addr, "POST", path).await.0, 204);
    };
    chaos("/chaos/pricing?latency_ms=120").await;
    for _ in 0..3 {
        assert_eq!(http(addr, "GET", "/price/sku-1").await.0, 200);
    }
    // Hanging pricing: per-attempt timeouts, retries.
    chaos("/chaos/pricing?hang_percent=100").await;
    for _ in 0..2 {
        http(addr, "GET", "/price/sku-1").await;
    }
    // A crowd: the bulkhead fills.
    chaos("/chaos/pricing?latency_ms=150").await;
    burst(addr, "/price/sku-1", 24).await;
    // Failing pricing: the breaker opens and rejects.
    chaos("/chaos/pricing?fail_percent=100").await;
    for _ in 0..20 {
        http(addr, "GET", "/price/sku-1").await;
    }
    let (status, body) = http(addr, "GET", "/price/sku-1").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("circuit breaker"), "{body}");
    assert_eq!(
        app.payment_breaker.state(),
        keel::circuit_breaker::State::Open
    );

    // Recommendations: a crowd meets the shedder and the rate limit, and
    // the fallback answers.
    chaos("/chaos/recommendations?latency_ms=50").await;
    let answers = burst(addr, "/recommendations", 40).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    let from = |source: &str| {
        let source = format!("\"source\":\"{source}\"");
        answers
            .iter()
            .filter(|(_, body)| body.contains(&source))
            .count()
    };
    assert!(from("primary") > 0 && from("default") > 0, "{answers:?}");

    assert_eq!(http(addr, "GET", "/receipt/42").await.0, 200);
    // A payment runs once per idempotency key.
    let key = "idempotency-key: order-42-attempt\r\n";
    let first = http_with(addr, "POST", "/pay/42", key).await;
    let again = http_with(addr, "POST", "/pay/42", key).await;
    assert_eq!(first, (200, "paid order 42 (payment #1)".to_string()));
    assert_eq!(again, first, "the retry is answered with the first payment");
    assert_eq!(
        app.payments_made.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(http_with(addr, "POST", "/pay/43", key).await.0, 422);
    assert_eq!(http(addr, "POST", "/pay/42").await.0, 400);
    let (status, body) = http(addr, "GET", "/health/ready").await;
    assert_eq!(
        status, 503,
        "the pricing breaker is a required check: {body}"
    );
    assert_eq!(http(addr, "GET", "/health/live").await.0, 200);
    // A malformed request is a 4xx, and the service stays up.
    assert_eq!(
        http(addr, "POST", "/chaos/pricing?fail_percent=x").await.0,
        400
    );
    assert_eq!(http(addr, "POST", "/chaos/nope").await.0, 404);

    let (status, text) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format");
    let samples = scrape.samples;

    // Every documented metric, with exactly its documented label names.
    for (metric, labels) in documented() {
        let found: Vec<_> = samples.iter().filter(|s| s.metric == metric).collect();
        assert!(!found.is_empty(), "{metric} is documented but not exported");
        for sample in found {
            let got: BTreeSet<String> = sample
                .labels
                .keys()
                .filter(|k| *k != "le" && *k != "quantile")
                .cloned()
                .collect();
            assert_eq!(got, labels, "labels of {metric}");
        }
    }

    // And what the traffic did.
    let call = |outcome| {
        find(
            &samples,
            "keel_calls_total",
            &[
                ("policy", "call"),
                ("name", "pricing"),
                ("outcome", outcome),
            ],
        )
    };
    assert!(call("success") >= 13.0);
    assert!(call("failure") > 0.0);
    assert!(call("rejected") > 0.0);
    assert!(
        find(
            &samples,
            "keel_call_duration_seconds",
            &[("name", "pricing")]
        ) > 0.0
    );
    assert_eq!(
        find(
            &samples,
            "keel_circuit_breaker_state",
            &[("name", "pricing"), ("state", "open")]
        ),
        1.0
    );
    assert_eq!(
        find(
            &samples,
            "keel_circuit_breaker_state",
            &[("name", "pricing"), ("state", "closed")]
        ),
        0.0
    );
    assert!(find(&samples, "keel_retries_total", &[("name", "pricing")]) > 0.0);
    assert!(find(&samples, "keel_hedges_total", &[("name", "pricing")]) > 0.0);
    assert!(
        find(
            &samples,
            "keel_timeouts_total",
            &[("name", "pricing-attempt")]
        ) > 0.0
    );
    let rejected = |policy, reason| {
        find(
            &samples,
            "keel_rejections_total",
            &[("policy", policy), ("reason", reason)],
        )
    };
    assert!(rejected("circuit_breaker", "circuit_open") > 0.0);
    // The crowd's fallbacks came from the shedder or the rate limit
    // (which of them refused first depends on arrival order).
    assert!(rejected("rate_limiter", "rate_limited") + rejected("shed", "shed") > 0.0);
    rejected("bulkhead", "bulkhead_full");
    rejected("adaptive_limit", "concurrency_limit");
    rejected("retry", "budget_exhausted");
    assert!(
        find(
            &samples,
            "keel_fallbacks_total",
            &[("name", "recommendations"), ("source", "default")]
        ) > 0.0
    );
    assert_eq!(
        find(&samples, "keel_bulkhead_in_use", &[("name", "pricing")]),
        0.0,
        "every seat was given back"
    );
    assert_eq!(
        find(&samples, "keel_in_flight", &[("name", "pricing")]),
        0.0
    );
    assert_eq!(
        find(
            &samples,
            "keel_health_check_up",
            &[
                ("check", "pricing"),
                ("kind", "readiness"),
                ("required", "true")
            ]
        ),
        0.0
    );
    assert!(find(&samples, "keel_events_dropped_total", &[]) > 0.0);
    assert!(
        find(
            &samples,
            "keel_faults_injected_total",
            &[("name", "pricing"), ("kind", "error")]
        ) + find(
            &samples,
            "keel_faults_injected_total",
            &[("name", "pricing"), ("kind", "latency")]
        ) > 0.0,
        "the seeded drill drew faults in its first requests"
    );
    server.abort();
}
