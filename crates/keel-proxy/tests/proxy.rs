//! End to end: the real `keel` binary in front of stub upstreams on loopback.

mod support;

use std::time::{Duration, Instant};

use support::{eventually, free_port, raw, upstream, Keel, Reply, Stub};

const SECOND: Duration = Duration::from_secs(1);

/// One upstream `web` (the stub) and one route `web` on `/` with `extra`.
fn web(stub: &Stub, extra: &str) -> String {
    format!(
        "{}{}",
        upstream("web", &[stub.addr]),
        route("web", "/", "web", extra)
    )
}

fn route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!("[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\n{extra}\n")
}

#[tokio::test]
async fn proxies_the_path_unchanged_to_the_longest_matching_route() {
    let (a, b) = (Stub::start().await, Stub::start().await);
    a.behave(|_, _| Reply::ok("from a\n").header("x-upstream", "a"));
    b.behave(|_, _| Reply::ok("from b\n"));
    let keel = Keel::start(&format!(
        "{}{}{}{}",
        upstream("a", &[a.addr]),
        upstream("b", &[b.addr]),
        route("api", "/api", "a", ""),
        route("api-v2", "/api/v2", "b", ""),
    ))
    .await;

    let r = keel.get("/api/items?page=2").await;
    assert_eq!((r.status, r.body.as_str()), (200, "from a\n"));
    assert_eq!(r.header("x-upstream"), Some("a"));
    assert_eq!(
        r.reason(),
        None,
        "an upstream's answer carries no x-keel-reason"
    );
    let r = keel.get("/api/v2/items").await;
    assert_eq!(r.body, "from b\n");

    let hit = &a.hits()[0];
    assert_eq!(hit.path, "/api/items?page=2");
    assert_eq!(hit.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(b.hits()[0].path, "/api/v2/items");

    let r = keel
        .request(
            "POST",
            "/api/orders",
            &[("content-type", "application/json")],
            "{\"n\":1}",
        )
        .await;
    assert_eq!(r.status, 200);
    let hit = a.hits().pop().unwrap();
    assert_eq!(
        (hit.method.as_str(), &hit.body[..]),
        ("POST", &b"{\"n\":1}"[..])
    );

    // A chunked upload of unknown length goes up chunked, whole.
    let answer = raw(keel.listen, b"POST /api/upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let hit = a.hits().pop().unwrap();
    assert_eq!(
        (hit.path.as_str(), &hit.body[..]),
        ("/api/upload", &b"hello world"[..])
    );

    let r = keel.get("/elsewhere").await;
    assert_eq!((r.status, r.reason()), (404, Some("no-route")));

    // A request in absolute form (as to a forward proxy) reaches the
    // upstream in origin form.
    let answer = raw(keel.listen, b"GET http://example.test/api/abs?q=1 HTTP/1.1\r\nhost: example.test\r\nconnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(a.hits().last().unwrap().path, "/api/abs?q=1");
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let stub = Stub::start().await;
    stub.behave(|h, _| {
        if h.path == "/error" {
            Reply::status(500)
        } else {
            Reply::ok(&"x".repeat(10_000))
        }
    });
    let keel = Keel::start(&web(&stub, "")).await;
    for i in 0..50 {
        let r = keel.get(if i % 5 == 0 { "/error" } else { "/" }).await;
        assert!(r.status == 500 || r.body.len() == 10_000);
    }
    // One after another: one connection carries them all.
    assert_eq!(stub.connections(), 1);
    // Cut off before its body ends, a response's connection is not reused.
    stub.behave(|_, _| Reply::ok("late\n").after(Duration::from_secs(10)));
    let keel = std::sync::Arc::new(keel);
    let k = keel.clone();
    let pending = tokio::spawn(async move { k.get("/").await });
    eventually(5 * SECOND, || async { (stub.count() == 51).then_some(()) })
        .await
        .unwrap();
    pending.abort();
    stub.behave(|_, _| Reply::ok("ok\n"));
    assert_eq!(keel.get("/").await.status, 200);
    assert_eq!(stub.connections(), 2);
}

/// A raw HTTP/1.1 upstream answering by path, one connection at a time:
/// `/chunked` in chunks, `/close` delimited by the close, `/last` with a
/// length and then a close (its sender hears when it closed), else `ok`.
async fn raw_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed, closes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let answer: &[u8] = match head.split(' ').nth(1) {
                        Some("/chunked") => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
                        Some("/close") => b"HTTP/1.1 200 OK\r\n\r\nuntil the close",
                        Some("/last") => b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlast",
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                    if head.starts_with("GET /close ") || head.starts_with("GET /last ") {
                        drop(s);
                        let _ = closed.send(());
                        return;
                    }
                }
            });
        }
    });
    (addr, closes)
}

#[tokio::test]
async fn chunked_close_delimited_and_closed_idle_upstream_connections() {
    let (addr, mut closes) = raw_upstream().await;
    let keel = Keel::start(&format!(
        "{}{}",
        upstream("raw", &[addr]),
        route("raw", "/", "raw", "")
    ))
    .await;
    let r = keel.get("/chunked").await;
    assert_eq!((r.status, r.body.as_str()), (200, "hello world"));
    let r = keel.get("/close").await;
    assert_eq!((r.status, r.body.as_str()), (200, "until the close"));
    closes.recv().await.unwrap();
    for _ in 0..3 {
        // The upstream closed the connection keel kept idle: keel sees it
        // and does not send the next request (which has no retry) into it.
        let r = keel.get("/last").await;
        assert_eq!((r.status, r.body.as_str()), (200, "last"));
        closes.recv().await.unwrap();
        let r = keel.get("/").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{:?}", r.reason());
    }
}

#[tokio::test]
async fn spreads_requests_over_endpoints() {
    let (a, b) = (Stub::start().await, Stub::start().await);
    let keel = Keel::start(&format!(
        "{}{}",
        upstream("web", &[a.addr, b.addr]),
        route("web", "/", "web", "")
    ))
    .await;
    for _ in 0..40 {
        assert_eq!(keel.get("/").await.status, 200);
    }
    assert!(
        a.count() >= 5 && b.count() >= 5,
        "a {} b {}",
        a.count(),
        b.count()
    );
}

const RETRY: &str =
    "[routes.retry]\nmax_attempts = 3\nbackoff = { base = \"1ms\", max = \"5ms\" }\n";

#[tokio::test]
async fn retries_5xx_for_idempotent_requests_only() {
    let stub = Stub::start().await;
    // Every first and second request of three fails.
    stub.behave(|_, n| {
        if n % 3 == 0 {
            Reply::ok("third time\n")
        } else {
            Reply::status(503)
        }
    });
    let keel = Keel::start(&web(&stub, &format!("{RETRY}on = [\"5xx\"]\n"))).await;

    let r = keel.get("/a").await;
    assert_eq!((r.status, r.body.as_str()), (200, "third time\n"));
    assert_eq!(stub.count(), 3);

    // POST is not retried: the upstream's 503 comes back as it is.
    let r = keel.request("POST", "/a", &[], "x").await;
    assert_eq!((r.status, r.reason()), (503, None));
    assert_eq!(stub.count(), 4);

    // ...unless it carries an Idempotency-Key.
    stub.behave(|_, n| {
        if n % 3 == 0 {
            Reply::ok("third time\n")
        } else {
            Reply::status(503)
        }
    });
    let before = stub.count(); // 4: the next two fail, the third (6) succeeds
    let r = keel
        .request("POST", "/a", &[("idempotency-key", "k1")], "x")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(stub.count() - before, 2);
    assert!(
        stub.hits().iter().skip(before).all(|h| &h.body[..] == b"x"),
        "the body is sent again"
    );

    // PUT and DELETE are idempotent.
    for method in ["PUT", "DELETE"] {
        let before = stub.count();
        stub.behave(move |_, n| {
            if n == before + 1 {
                Reply::status(502)
            } else {
                Reply::ok("ok\n")
            }
        });
        assert_eq!(keel.request(method, "/a", &[], "").await.status, 200);
        assert_eq!(stub.count() - before, 2, "{method}");
    }
}

#[tokio::test]
async fn retry_conditions_are_honoured() {
    let stub = Stub::start().await;
    let keel = Keel::start(&format!(
        "{}{}{}",
        upstream("web", &[stub.addr]),
        route(
            "gw",
            "/gw",
            "web",
            &format!("{RETRY}on = [\"gateway-error\", \"429\"]\n")
        ),
        route(
            "reset",
            "/reset",
            "web",
            &format!("{RETRY}on = [\"reset\"]\n")
        ),
    ))
    .await;

    // gateway-error: 502, 503, 504 but not 500.
    for (status, attempts) in [(500, 1), (502, 3), (503, 3), (504, 3), (429, 3), (404, 1)] {
        stub.behave(move |_, _| Reply::status(status));
        let before = stub.count();
        let r = keel.get("/gw").await;
        assert_eq!(r.status, status);
        assert_eq!(stub.count() - before, attempts, "status {status}");
    }

    // reset: the upstream drops the connection, then answers.
    let before = stub.count();
    stub.behave(move |_, n| {
        if n == before + 1 {
            Reply::Reset
        } else {
            Reply::ok("ok\n")
        }
    });
    let r = keel.get("/reset").await;
    assert_eq!(r.status, 200);
    assert_eq!(stub.count() - before, 2);

    // Resets every time: 502 upstream-unavailable after the attempts.
    stub.behave(|_, _| Reply::Reset);
    let before = stub.count();
    let r = keel.get("/reset").await;
    assert_eq!((r.status, r.reason()), (502, Some("upstream-unavailable")));
    assert_eq!(stub.count() - before, 3);
}

#[tokio::test]
async fn retries_connect_failures_on_another_endpoint() {
    let alive = Stub::start().await;
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    // Outlier detection takes the dead endpoint out at its first failure,
    // so at most one attempt per request can meet it.
    let keel = Keel::start(&format!(
        "[upstreams.web]\nendpoints = [\"{dead}\", \"{}\"]\noutlier_detection = {{ consecutive_failures = 1 }}\n{}{}{}",
        alive.addr,
        upstream("nothing", &[dead]),
        route("web", "/web", "web", &format!("{RETRY}on = [\"connect-failure\"]\n")),
        route("solo", "/solo", "nothing", ""),
    ))
    .await;
    for _ in 0..20 {
        assert_eq!(keel.get("/web").await.status, 200);
    }
    assert_eq!(alive.count(), 20);
    let r = keel.get("/solo").await;
    assert_eq!((r.status, r.reason()), (502, Some("upstream-unavailable")));
}

#[tokio::test]
async fn per_try_timeout_cuts_an_attempt_and_retries() {
    let stub = Stub::start().await;
    stub.behave(|_, n| {
        if n == 1 {
            Reply::ok("slow\n").after(10 * SECOND)
        } else {
            Reply::ok("fast\n")
        }
    });
    let keel = Keel::start(&web(
        &stub,
        &format!("timeout = \"5s\"\n{RETRY}per_try_timeout = \"200ms\"\non = [\"timeout\"]\n"),
    ))
    .await;
    let started = Instant::now();
    let r = keel.get("/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "fast\n"));
    assert!(started.elapsed() < 3 * SECOND, "{:?}", started.elapsed());
    assert_eq!(stub.count(), 2);
}

#[tokio::test]
async fn the_total_timeout_answers_504() {
    let stub = Stub::start().await;
    stub.behave(|_, _| Reply::ok("slow\n").after(10 * SECOND));
    let keel = Keel::start(&web(
        &stub,
        &format!("timeout = \"300ms\"\n{RETRY}on = [\"timeout\"]\n"),
    ))
    .await;
    let started = Instant::now();
    let r = keel.get("/").await;
    assert_eq!((r.status, r.reason()), (504, Some("timeout")));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < 3 * SECOND,
        "{took:?}"
    );
    assert!(keel.metric("keel_timeouts_total{route=\"web\"}").await >= Some(1.0));
}

#[tokio::test]
async fn retry_after_replaces_the_backoff() {
    let stub = Stub::start().await;
    stub.behave(|_, n| {
        if n == 1 {
            Reply::status(503).header("retry-after", "1")
        } else {
            Reply::ok("ok\n")
        }
    });
    let keel = Keel::start(&web(&stub, &format!("{RETRY}on = [\"5xx\"]\n"))).await;
    assert_eq!(keel.get("/").await.status, 200);
    let hits = stub.hits();
    let gap = hits[1].at - hits[0].at;
    // The backoff alone would be at most 5 ms.
    assert!(gap >= Duration::from_millis(950), "{gap:?}");
}

const BREAKER: &str = "[routes.circuit_breaker]\nfailure_rate = 0.5\nwindow = { kind = \"count\", size = 4 }\nminimum_calls = 4\nopen_duration = \"1s\"\nhalf_open_max_calls = 1\n";

#[tokio::test]
async fn the_breaker_opens_fails_fast_and_recovers_through_half_open() {
    let stub = Stub::start().await;
    stub.behave(|_, _| Reply::status(500));
    let keel = Keel::start(&web(&stub, BREAKER)).await;
    for _ in 0..4 {
        assert_eq!(keel.get("/").await.status, 500);
    }
    // Open: fails fast without calling the upstream.
    let r = keel.get("/").await;
    assert_eq!((r.status, r.reason()), (503, Some("circuit-open")));
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=1).contains(&after), "retry-after {after}");
    assert_eq!(stub.count(), 4);
    let ready = keel.admin_get("/health/ready").await.unwrap();
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(ready.json()["checks"]["web"]["status"], "DOWN");
    assert_eq!(
        keel.metric("keel_circuit_breaker_state{route=\"web\",state=\"open\"}")
            .await,
        Some(1.0)
    );

    // The upstream recovers; after open_duration a probe goes through and
    // closes the breaker.
    stub.behave(|_, _| Reply::ok("ok\n"));
    let recovered = eventually(5 * SECOND, || async {
        (keel.get("/").await.status == 200).then_some(())
    })
    .await;
    assert!(recovered.is_some());
    let state = keel.admin_get("/state").await.unwrap().json();
    assert_eq!(state["routes"]["web"]["circuit_breaker"]["state"], "closed");
    assert_eq!(keel.admin_get("/health/ready").await.unwrap().status, 200);
}

#[tokio::test]
async fn the_fallback_answers_failures_and_keeps_their_reason() {
    let stub = Stub::start().await;
    stub.behave(|_, _| Reply::status(500));
    let keel = Keel::start(&format!(
        "{}{}",
        upstream("recs", &[stub.addr]),
        route(
            "recs",
            "/recs",
            "recs",
            &format!("{BREAKER}[routes.fallback]\nstatus = 200\nbody = '{{\"items\":[]}}'\nheaders = {{ \"content-type\" = \"application/json\" }}\n")
        )
    ))
    .await;
    let r = keel.get("/recs").await;
    assert_eq!((r.status, r.body.as_str()), (200, "{\"items\":[]}"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.reason(), Some("upstream-error"));
    for _ in 0..3 {
        keel.get("/recs").await;
    }
    let r = keel.get("/recs").await;
    assert_eq!((r.status, r.reason()), (200, Some("circuit-open")));
    assert_eq!(stub.count(), 4);
}

#[tokio::test]
async fn rate_limits_globally_and_per_header_key() {
    let stub = Stub::start().await;
    let keel = Keel::start(&format!(
        "{}{}{}",
        upstream("web", &[stub.addr]),
        route("global", "/global", "web", "[routes.rate_limit]\nrequests_per_second = 0.5\nburst = 2\n"),
        route("keyed", "/keyed", "web", "[routes.rate_limit]\nrequests_per_second = 0.5\nburst = 1\nkey = \"header:x-tenant\"\n"),
    ))
    .await;
    assert_eq!(keel.get("/global").await.status, 200);
    assert_eq!(keel.get("/global").await.status, 200);
    let r = keel.get("/global").await;
    assert_eq!((r.status, r.reason()), (429, Some("rate-limited")));
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&after), "retry-after {after}");

    let tenant = |t: &'static str| [("x-tenant", t)];
    assert_eq!(
        keel.request("GET", "/keyed", &tenant("a"), "").await.status,
        200
    );
    assert_eq!(
        keel.request("GET", "/keyed", &tenant("a"), "").await.status,
        429
    );
    assert_eq!(
        keel.request("GET", "/keyed", &tenant("b"), "").await.status,
        200
    );
    assert_eq!(stub.count(), 4);
    assert!(
        keel.metric("keel_rejections_total{policy=\"rate_limiter\",route=\"global\",reason=\"rate_limited\"}")
            .await
            >= Some(1.0)
    );
}

#[tokio::test]
async fn a_full_bulkhead_rejects_and_a_slow_route_does_not_slow_a_fast_one() {
    let (slow, fast) = (Stub::start().await, Stub::start().await);
    slow.behave(|_, _| Reply::ok("slow\n").after(2 * SECOND));
    let keel = Keel::start(&format!(
        "{}{}{}{}",
        upstream("slow", &[slow.addr]),
        upstream("fast", &[fast.addr]),
        route(
            "slow",
            "/slow",
            "slow",
            "[routes.bulkhead]\nmax_concurrent = 4\n"
        ),
        route(
            "fast",
            "/fast",
            "fast",
            "[routes.bulkhead]\nmax_concurrent = 4\n"
        ),
    ))
    .await;
    let keel = std::sync::Arc::new(keel);
    let held: Vec<_> = (0..4)
        .map(|_| {
            let keel = keel.clone();
            tokio::spawn(async move { keel.get("/slow").await.status })
        })
        .collect();
    eventually(5 * SECOND, || async { (slow.count() == 4).then_some(()) })
        .await
        .expect("four requests hold the four seats");
    let full = keel.get("/slow").await;
    assert_eq!(full.status, 503);
    assert_eq!(full.reason(), Some("bulkhead-full"));
    // Meanwhile the fast route answers at once.
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(keel.get("/fast").await.status, 200);
        assert!(started.elapsed() < SECOND, "{:?}", started.elapsed());
    }
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn injected_faults_abort_without_calling_the_upstream_and_delay() {
    let stub = Stub::start().await;
    let keel = Keel::start(&format!(
        "{}{}{}",
        upstream("web", &[stub.addr]),
        route(
            "abort",
            "/abort",
            "web",
            "[routes.fault]\nabort = { percent = 100, status = 503 }\n"
        ),
        route(
            "delay",
            "/delay",
            "web",
            "[routes.fault]\ndelay = { percent = 100, duration = \"400ms\" }\n"
        ),
    ))
    .await;
    let r = keel.get("/abort").await;
    assert_eq!((r.status, r.reason()), (503, Some("fault-injected")));
    assert_eq!(stub.count(), 0);
    let started = Instant::now();
    assert_eq!(keel.get("/delay").await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(stub.count(), 1);
}

#[tokio::test]
async fn injected_aborts_are_retried_and_trip_the_breaker_like_real_failures() {
    let stub = Stub::start().await;
    let keel = Keel::start(&web(&stub, &format!("{RETRY}on = [\"5xx\"]\n{BREAKER}[routes.fault]\nabort = {{ percent = 100, status = 503 }}\n")))
    .await;
    // Three attempts, each aborted: the breaker saw 3 failures.
    let r = keel.get("/").await;
    assert_eq!((r.status, r.reason()), (503, Some("fault-injected")));
    assert_eq!(
        keel.metric("keel_retries_total{route=\"web\"}").await,
        Some(2.0)
    );
    let r = keel.get("/").await; // the fourth failure opens it
    assert_eq!(r.status, 503);
    let r = keel.get("/").await;
    assert_eq!(r.reason(), Some("circuit-open"));
    assert_eq!(stub.count(), 0);
}

/// With three of four seats taken, a request that says it is low priority:
/// its status, and whether the header reached the upstream.
async fn low_priority_at_three_of_four(server: &str) -> (u16, bool) {
    let stub = Stub::start().await;
    stub.behave(|h, _| {
        if h.path == "/hold" {
            Reply::ok("held\n").after(2 * SECOND)
        } else {
            Reply::ok("ok\n")
        }
    });
    let keel = std::sync::Arc::new(
        Keel::start_with(
            server,
            &format!(
                "{}{}[load_shed]\nmax_in_flight = 4\n",
                upstream("web", &[stub.addr]),
                route("web", "/", "web", "priority = \"critical\"\n"),
            ),
        )
        .await,
    );
    let held: Vec<_> = (0..3)
        .map(|_| {
            let keel = keel.clone();
            tokio::spawn(async move { keel.get("/hold").await.status })
        })
        .collect();
    eventually(5 * SECOND, || async { (stub.count() == 3).then_some(()) })
        .await
        .expect("three requests in flight");
    let low = keel
        .request("GET", "/x", &[("x-keel-priority", "low")], "")
        .await;
    if low.status == 503 {
        assert_eq!(low.reason(), Some("shed"));
    }
    // The route's own priority (critical) is never shed.
    assert_eq!(keel.get("/x").await.status, 200);
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    // Load gone: low passes again.
    let r = keel
        .request("GET", "/x", &[("x-keel-priority", "low")], "")
        .await;
    assert_eq!(r.status, 200);
    let forwarded = stub
        .hits()
        .iter()
        .any(|h| h.headers.contains_key("x-keel-priority"));
    (low.status, forwarded)
}

#[tokio::test]
async fn load_shedding_sheds_low_priority_first_and_never_critical() {
    // Believed only when the configuration says so; never forwarded.
    assert_eq!(
        low_priority_at_three_of_four("trust_priority_header = true").await,
        (503, false),
        "a trusted low priority is shed at 3 of 4 in flight"
    );
    assert_eq!(
        low_priority_at_three_of_four("").await,
        (200, false),
        "by default a client cannot lower (or raise) its priority: the route's applies"
    );
}

#[tokio::test]
async fn readiness_follows_upstream_health_checks() {
    let (payment, recs) = (Stub::start().await, Stub::start().await);
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let checks = |stub: &Stub, healthy: std::sync::Arc<std::sync::atomic::AtomicBool>| {
        stub.behave(move |h, _| {
            if h.path == "/health" && !healthy.load(std::sync::atomic::Ordering::Relaxed) {
                Reply::status(503)
            } else {
                Reply::ok("ok\n")
            }
        })
    };
    checks(&payment, healthy.clone());
    let recs_healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    checks(&recs, recs_healthy.clone());
    let hc = "health_check = { path = \"/health\", interval = \"50ms\", timeout = \"500ms\", unhealthy_threshold = 2, healthy_threshold = 1 }\n";
    let keel = Keel::start(&format!(
        "[upstreams.payment]\nendpoints = [\"{}\"]\n{hc}[upstreams.recs]\nendpoints = [\"{}\"]\nrequired = false\n{hc}{}{}",
        payment.addr,
        recs.addr,
        route("payment", "/pay", "payment", ""),
        route("recs", "/recs", "recs", ""),
    ))
    .await;
    let status = || async {
        let r = keel.admin_get("/health/ready").await.unwrap();
        (r.status, r.json()["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(status().await, (200, "UP".to_owned()));
    assert_eq!(keel.admin_get("/health/live").await.unwrap().status, 200);

    // The optional upstream fails its checks: DEGRADED, still 200.
    recs_healthy.store(false, std::sync::atomic::Ordering::Relaxed);
    let degraded = eventually(5 * SECOND, || async {
        (status().await == (200, "DEGRADED".to_owned())).then_some(())
    })
    .await;
    assert!(degraded.is_some());
    let r = keel.get("/recs").await;
    assert_eq!((r.status, r.reason()), (502, Some("upstream-unavailable")));

    // The required one fails: DOWN, 503.
    healthy.store(false, std::sync::atomic::Ordering::Relaxed);
    let down = eventually(5 * SECOND, || async {
        (status().await == (503, "DOWN".to_owned())).then_some(())
    })
    .await;
    assert!(down.is_some());
    let ready = keel.admin_get("/health/ready").await.unwrap().json();
    assert_eq!(ready["checks"]["payment"]["healthy_endpoints"], 0);
    assert_eq!(
        keel.metric(&format!(
            "keel_upstream_healthy{{upstream=\"payment\",endpoint=\"{}\"}}",
            payment.addr
        ))
        .await,
        Some(0.0)
    );

    // Both recover.
    healthy.store(true, std::sync::atomic::Ordering::Relaxed);
    recs_healthy.store(true, std::sync::atomic::Ordering::Relaxed);
    let up = eventually(5 * SECOND, || async {
        (status().await == (200, "UP".to_owned())).then_some(())
    })
    .await;
    assert!(up.is_some());
    assert_eq!(keel.get("/pay").await.status, 200);
}

#[tokio::test]
async fn outlier_detection_ejects_a_failing_endpoint_but_never_the_last() {
    let (good, bad) = (Stub::start().await, Stub::start().await);
    bad.behave(|_, _| Reply::status(500));
    let keel = Keel::start(&format!(
        "[upstreams.web]\nendpoints = [\"{}\", \"{}\"]\noutlier_detection = {{ consecutive_failures = 3, base_ejection_time = \"30s\" }}\n{}",
        good.addr,
        bad.addr,
        route("web", "/", "web", ""),
    ))
    .await;
    for _ in 0..60 {
        keel.get("/").await;
    }
    assert_eq!(bad.count(), 3, "ejected after three failures in a row");
    assert_eq!(
        keel.metric(&format!(
            "keel_upstream_ejections_total{{upstream=\"web\",endpoint=\"{}\"}}",
            bad.addr
        ))
        .await,
        Some(1.0)
    );
    // The good one fails too: it is the last in rotation, so it stays.
    good.behave(|_, _| Reply::status(500));
    for _ in 0..10 {
        assert_eq!(keel.get("/").await.status, 500);
    }
    assert_eq!(good.count(), 57 + 10);
}

#[tokio::test]
async fn metrics_and_state_describe_the_routes() {
    let stub = Stub::start().await;
    let keel = Keel::start(&web(&stub, &format!("{RETRY}on = [\"5xx\"]\n{BREAKER}[routes.bulkhead]\nmax_concurrent = 7\n[routes.rate_limit]\nrequests_per_second = 1000\nburst = 50\n")))
    .await;
    for _ in 0..5 {
        keel.get("/").await;
    }
    stub.behave(|_, n| {
        if n == 6 {
            Reply::status(503)
        } else {
            Reply::ok("ok\n")
        }
    });
    keel.get("/").await;

    let text = keel.admin_get("/metrics").await.unwrap();
    assert!(text
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(
        keel.metric("keel_requests_total{route=\"web\",code=\"200\"}")
            .await,
        Some(6.0)
    );
    assert_eq!(
        keel.metric("keel_retries_total{route=\"web\"}").await,
        Some(1.0)
    );
    assert_eq!(
        keel.metric("keel_in_flight{route=\"web\"}").await,
        Some(0.0)
    );
    assert_eq!(
        keel.metric("keel_request_duration_seconds_count{route=\"web\"}")
            .await,
        Some(6.0)
    );
    assert!(text
        .body
        .contains("keel_request_duration_seconds_bucket{route=\"web\",le=\"0.005\"}"));
    assert_eq!(
        keel.metric("keel_circuit_breaker_state{route=\"web\",state=\"closed\"}")
            .await,
        Some(1.0)
    );
    assert!(text.body.contains(&format!(
        "keel_upstream_healthy{{upstream=\"web\",endpoint=\"{}\"}} 1",
        stub.addr
    )));
    assert!(text.body.contains(
        "keel_rejections_total{policy=\"circuit_breaker\",route=\"web\",reason=\"circuit_open\"} 0"
    ));

    let state = keel.admin_get("/state").await.unwrap().json();
    let web = &state["routes"]["web"];
    assert_eq!(web["circuit_breaker"]["state"], "closed");
    assert_eq!(
        web["circuit_breaker"]["calls"], 4,
        "the count window holds 4: {web}"
    );
    assert_eq!(web["bulkhead"]["available"], 7);
    assert_eq!(web["rate_limit"]["burst"], 50);
    // 6 of the burst of 50 taken, refilling at one a millisecond.
    let available = web["rate_limit"]["available"].as_u64().unwrap();
    assert!((44..=50).contains(&available), "{available}");
    assert_eq!(state["upstreams"]["web"]["endpoints"][0]["healthy"], true);
}

#[tokio::test]
async fn the_breaker_switch_and_the_admin_token() {
    let stub = Stub::start().await;
    let keel = Keel::start_with(
        "admin_token = \"s3cret\"",
        &format!(
            "{}{}",
            upstream("web", &[stub.addr]),
            route("web", "/", "web", BREAKER)
        ),
    )
    .await;
    let auth = [("authorization", "Bearer s3cret")];
    // Probes need no token; everything else does.
    assert_eq!(keel.admin_get("/health/ready").await.unwrap().status, 200);
    let denied = keel.admin_get("/metrics").await.unwrap();
    assert_eq!(denied.status, 401);
    assert_eq!(denied.header("www-authenticate"), Some("Bearer"));
    let wrong = keel
        .admin("GET", "/state", &[("authorization", "Bearer nope")], "")
        .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(keel.admin("GET", "/metrics", &auth, "").await.status, 200);

    let r = keel
        .admin(
            "POST",
            "/routes/web/circuit_breaker",
            &auth,
            r#"{"state": "forced_open"}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "forced_open");
    let r = keel.get("/").await;
    assert_eq!((r.status, r.reason()), (503, Some("circuit-open")));
    assert_eq!(stub.count(), 0);

    let r = keel
        .admin(
            "POST",
            "/routes/web/circuit_breaker",
            &auth,
            r#"{"state": "closed"}"#,
        )
        .await;
    assert_eq!(r.json()["state"], "closed");
    assert_eq!(keel.get("/").await.status, 200);

    let r = keel
        .admin(
            "POST",
            "/routes/web/circuit_breaker",
            &auth,
            r#"{"state": "ajar"}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("ajar"), "{}", r.body);
    let r = keel
        .admin(
            "POST",
            "/routes/nope/circuit_breaker",
            &auth,
            r#"{"state": "closed"}"#,
        )
        .await;
    assert_eq!(r.status, 404);
    let r = keel
        .admin("GET", "/routes/web/circuit_breaker", &auth, "")
        .await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_the_proxy_stays_up() {
    let stub = Stub::start().await;
    let keel = Keel::start(&web(&stub, "")).await;
    let answer = raw(keel.listen, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let answer = raw(keel.listen, huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let answer = raw(
        keel.listen,
        b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(keel.get("/").await.status, 200);
    assert_eq!(stub.count(), 1);
}

#[tokio::test]
async fn a_broken_request_body_is_the_clients_fault_not_the_upstreams() {
    let stub = Stub::start().await;
    stub.behave(|_, _| Reply::ok("ok\n"));
    let keel = Keel::start(&web(
        &stub,
        "[routes.circuit_breaker]\nconsecutive_failures = 1\n",
    ))
    .await;
    // A chunked upload whose chunk size is not hexadecimal.
    let answer = raw(
        keel.listen,
        b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
    )
    .await;
    assert!(!answer.contains(" 502 "), "{answer}");
    // The breaker (one failure trips it) did not hear of it.
    let r = keel.get("/").await;
    assert_eq!((r.status, r.reason()), (200, None));
}

#[tokio::test]
async fn slow_and_idle_clients_are_closed_at_the_request_head_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stub = Stub::start().await;
    stub.behave(|h, _| {
        if h.path == "/slow" {
            Reply::ok("slow\n").after(Duration::from_millis(1500))
        } else {
            Reply::ok("ok\n")
        }
    });
    let keel = Keel::start_with("request_head_timeout = \"1s\"", &web(&stub, "")).await;
    // Read to the close, which must come within 10 s.
    let until_closed = |mut s: tokio::net::TcpStream| async move {
        let mut out = Vec::new();
        tokio::time::timeout(10 * SECOND, s.read_to_end(&mut out))
            .await
            .expect("keel closes the connection")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };

    // A head that never ends.
    let mut s = tokio::net::TcpStream::connect(keel.listen).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-slow")
        .await
        .unwrap();
    assert_eq!(until_closed(s).await, "");

    // A request in flight longer than the timeout is answered; the
    // connection, idle after it, is closed.
    let mut s = tokio::net::TcpStream::connect(keel.listen).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(s).await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("slow\n"),
        "{answer}"
    );
    assert_eq!(keel.get("/").await.status, 200);
}

#[tokio::test]
async fn sighup_reloads_keeping_unchanged_routes_state_and_rejects_a_bad_file() {
    let stub = Stub::start().await;
    let base = format!(
        "{}{}",
        upstream("web", &[stub.addr]),
        route("web", "/web", "web", BREAKER)
    );
    let keel = Keel::start(&base).await;
    // State to keep: the operator forced the breaker open.
    keel.admin(
        "POST",
        "/routes/web/circuit_breaker",
        &[],
        r#"{"state": "forced_open"}"#,
    )
    .await;
    assert_eq!(keel.get("/new").await.status, 404);

    keel.rewrite(&format!("{base}{}", route("new", "/new", "web", "")));
    keel.signal("HUP");
    let reloaded = eventually(5 * SECOND, || async {
        (keel.get("/new").await.status == 200).then_some(())
    })
    .await;
    assert!(reloaded.is_some(), "log:\n{}", keel.log_text());
    assert_eq!(
        keel.get("/web").await.reason(),
        Some("circuit-open"),
        "the unchanged route kept its breaker"
    );

    // A bad file: logged, and the old configuration keeps serving.
    keel.rewrite(&format!("{base}{}", route("broken", "/broken", "nope", "")));
    keel.signal("HUP");
    let logged = eventually(5 * SECOND, || async {
        keel.log_text()
            .contains("routes[1].upstream: no upstream named \"nope\"")
            .then_some(())
    })
    .await;
    assert!(logged.is_some(), "log:\n{}", keel.log_text());
    assert_eq!(keel.get("/new").await.status, 200);
    assert_eq!(keel.get("/broken").await.status, 404);

    // A changed route starts afresh.
    keel.rewrite(&format!(
        "{}{}",
        upstream("web", &[stub.addr]),
        route("web", "/web", "web", &BREAKER.replace("1s", "2s"))
    ));
    keel.signal("HUP");
    let fresh = eventually(5 * SECOND, || async {
        (keel.get("/web").await.status == 200).then_some(())
    })
    .await;
    assert!(fresh.is_some());
    assert_eq!(keel.get("/new").await.status, 404);
}

#[tokio::test]
async fn sigterm_drains_a_request_in_flight_then_exits_0() {
    let stub = Stub::start().await;
    stub.behave(|_, _| Reply::ok("finished\n").after(SECOND));
    let mut keel = Keel::start(&web(&stub, "")).await;
    let listen = keel.listen;
    let client = keel.client.clone();
    let in_flight = tokio::spawn(async move {
        let response = client
            .get(format!("http://{listen}/").parse().unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, body)
    });
    eventually(5 * SECOND, || async { (stub.count() == 1).then_some(()) })
        .await
        .unwrap();
    keel.signal("TERM");
    // Draining: no new connections.
    let refused = eventually(5 * SECOND, || async {
        tokio::net::TcpStream::connect(listen)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(refused.is_some());
    let (status, body) = in_flight.await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"finished\n"[..]));
    let exit = tokio::time::timeout(10 * SECOND, keel.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}; log:\n{}", keel.log_text());
}
