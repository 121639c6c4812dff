//! The edge: keel in front of hostile or broken clients and upstreams, the
//! real binary driven over raw sockets where a client must misbehave.

mod support;

use std::time::Duration;

use support::{raw, upstream, Keel, Stub};

fn route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!("[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\n{extra}\n")
}

/// The status line's code of a raw answer.
fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"))
}

#[tokio::test]
async fn request_rules_host_methods_and_absolute_form() {
    let stub = Stub::start().await;
    let keel = Keel::start(&format!(
        "{}{}",
        upstream("web", &[stub.addr]),
        route("web", "/", "web", "")
    ))
    .await;
    let send = |bytes: &'static [u8]| raw(keel.listen, bytes);

    // HTTP/1.1 needs exactly one Host.
    let a = send(b"GET /a HTTP/1.1\r\nconnection: close\r\n\r\n").await;
    assert_eq!(status(&a), 400, "{a}");
    assert!(a.contains("x-keel-reason: bad-request"), "{a}");
    let a = send(b"GET /a HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n").await;
    assert_eq!(status(&a), 400, "{a}");
    // HTTP/1.0 may leave it out.
    let a = send(b"GET /a HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&a), 200, "{a}");

    // TRACE and CONNECT are refused, with what is allowed.
    for request in [
        &b"TRACE / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"[..],
        &b"CONNECT example.test:443 HTTP/1.1\r\nhost: example.test:443\r\nconnection: close\r\n\r\n"[..],
    ] {
        let a = raw(keel.listen, request).await;
        assert_eq!(status(&a), 405, "{a}");
        assert!(a.contains("x-keel-reason: method-not-allowed"), "{a}");
        assert!(a.to_ascii_lowercase().contains("allow: get"), "{a}");
    }
    assert_eq!(stub.count(), 1, "none of the refused reached the upstream");

    // An absolute-form target's authority is the Host sent upstream,
    // whatever the Host header said.
    let a = send(b"GET http://user:pw@payments.test:8080/abs?q=1 HTTP/1.1\r\nhost: other.test\r\nconnection: close\r\n\r\n").await;
    assert_eq!(status(&a), 200, "{a}");
    let hit = stub.hits().pop().unwrap();
    assert_eq!(hit.path, "/abs?q=1");
    assert_eq!(hit.headers["host"], "payments.test:8080");
    assert_eq!(hit.headers.get_all("host").iter().count(), 1);

    // A Connection header cannot take Host away.
    let a = send(b"GET /c HTTP/1.1\r\nhost: kept.test\r\nconnection: host, close\r\n\r\n").await;
    assert_eq!(status(&a), 200, "{a}");
    assert_eq!(stub.hits().pop().unwrap().headers["host"], "kept.test");
}

#[tokio::test]
async fn paths_are_normalised_before_matching_and_prefixes_match_whole_segments() {
    let (api, rest) = (Stub::start().await, Stub::start().await);
    let keel = Keel::start(&format!(
        "{}{}{}{}",
        upstream("api", &[api.addr]),
        upstream("rest", &[rest.addr]),
        route(
            "api",
            "/api",
            "api",
            "[routes.rate_limit]\nrequests_per_second = 0.001\nburst = 1\n"
        ),
        route("rest", "/", "rest", ""),
    ))
    .await;

    // Whole segments: /apiary is not /api's.
    assert_eq!(keel.get("/apiary").await.status, 200);
    assert_eq!(rest.hits().pop().unwrap().path, "/apiary");
    // /api?q is; its one request a long while is spent.
    assert_eq!(keel.get("/api?q=1").await.status, 200);
    assert_eq!(api.hits().pop().unwrap().path, "/api?q=1");

    // Written to dodge the limit, each is still /api's, and refused.
    for dodge in [
        "/x/../api/pay",
        "/%61pi/pay",
        "/api/./pay",
        "/api/%2e/pay",
        "/x/%2E%2e/api",
    ] {
        let r = keel.get(dodge).await;
        assert_eq!(
            (r.status, r.reason()),
            (429, Some("rate-limited")),
            "{dodge}"
        );
    }
    assert_eq!(api.count(), 1);

    // The normalised path is what goes upstream.
    assert_eq!(keel.get("/other/./a/../b?x=%2e").await.status, 200);
    assert_eq!(rest.hits().pop().unwrap().path, "/other/b?x=%2e");
    // Encoded reserved characters stay encoded.
    assert_eq!(keel.get("/a%2Fb").await.status, 200);
    assert_eq!(rest.hits().pop().unwrap().path, "/a%2Fb");

    // Above the root: 400, and nothing is forwarded.
    let before = rest.count();
    for climb in ["/../etc/passwd", "/a/../../b", "/%2e%2e/x"] {
        let request = format!("GET {climb} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let a = raw(keel.listen, request.as_bytes()).await;
        assert_eq!(status(&a), 400, "{climb}: {a}");
    }
    assert_eq!(rest.count(), before);
    assert_eq!(keel.get("/").await.status, 200, "keel is still up");
}

#[tokio::test]
async fn a_client_is_answered_before_it_has_sent_all_it_sends() {
    // Lingering close: a 413 sent without reading an oversized keyed body
    // reaches a client still sending it.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stub = Stub::start().await;
    let keel = Keel::start(&format!(
        "{}{}",
        upstream("web", &[stub.addr]),
        route("web", "/", "web", "[routes.idempotency]\n")
    ))
    .await;
    let body = vec![b'x'; 8 << 20];
    for round in 0..5 {
        let mut s = tokio::net::TcpStream::connect(keel.listen).await.unwrap();
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(
                format!(
                    "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: k{round}\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .await?;
            w.write_all(&body).await
        };
        let mut answer = Vec::new();
        let receive = tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut answer));
        let (sent, received) = tokio::join!(send, receive);
        sent.unwrap_or_else(|e| panic!("round {round}: the upload failed: {e}"));
        received.expect("answered in time").unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status(&answer), 413, "round {round}: {answer}");
    }
    assert_eq!(stub.count(), 0);
}

#[tokio::test]
async fn state_changing_admin_requests_need_json_and_the_bearer_scheme_is_any_case() {
    let stub = Stub::start().await;
    let keel = Keel::start_with(
        "admin_token = \"s3cret\"",
        &format!(
            "{}{}",
            upstream("web", &[stub.addr]),
            route("web", "/", "web", "[routes.circuit_breaker]\n")
        ),
    )
    .await;
    let open = r#"{"state": "forced_open"}"#;
    // What a cross-site form post can send without a preflight.
    for content_type in [
        "application/x-www-form-urlencoded",
        "text/plain",
        "multipart/form-data; boundary=x",
    ] {
        let r = keel
            .admin(
                "POST",
                "/routes/web/circuit_breaker",
                &[
                    ("authorization", "Bearer s3cret"),
                    ("content-type", content_type),
                ],
                open,
            )
            .await;
        assert_eq!(r.status, 415, "{content_type}");
    }
    assert_eq!(
        keel.get("/").await.status,
        200,
        "the breaker was not switched"
    );
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let auth = format!("{scheme} s3cret");
        let r = keel
            .admin(
                "POST",
                "/routes/web/circuit_breaker",
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json; charset=utf-8"),
                ],
                open,
            )
            .await;
        assert_eq!(r.status, 200, "{scheme}: {}", r.body);
    }
    assert_eq!(keel.get("/").await.status, 503);
    assert!(!keel.log_text().contains("s3cret"));
}

#[tokio::test]
async fn past_max_connections_new_clients_are_closed_and_the_admin_plane_answers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stub = Stub::start().await;
    let keel = Keel::start_with(
        "max_connections = 5",
        &format!(
            "{}{}",
            upstream("web", &[stub.addr]),
            route("web", "/", "web", "")
        ),
    )
    .await;
    let open = |n: f64| {
        let keel = &keel;
        async move {
            support::eventually(Duration::from_secs(10), || async {
                (keel.metric("keel_connections{plane=\"data\"}").await == Some(n)).then_some(())
            })
            .await
            .unwrap_or_else(|| panic!("{n} connections never counted open"))
        }
    };
    // Five idle clients take every place.
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(tokio::net::TcpStream::connect(keel.listen).await.unwrap());
    }
    open(5.0).await;
    // The sixth is closed at once, without an answer.
    let mut sixth = tokio::net::TcpStream::connect(keel.listen).await.unwrap();
    let _ = sixth.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), sixth.read_to_end(&mut out))
        .await
        .expect("closed at once");
    assert!(
        read.is_err() || out.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(
        keel.metric("keel_connections_rejected_total{plane=\"data\"}")
            .await,
        Some(1.0)
    );
    // The admin plane keeps its own budget.
    assert_eq!(keel.admin_get("/health/live").await.unwrap().status, 200);
    assert_eq!(stub.count(), 0);
    // One leaves: there is room again.
    drop(idle.pop());
    open(4.0).await;
    let a = raw(
        keel.listen,
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&a), 200, "{a}");
}

/// A raw upstream answering every request `200 ok` on keep-alive
/// connections; reports each connection's close (by the peer), with its
/// number.
async fn closing_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(usize, std::time::Instant)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed, closes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..i + 4);
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                            .await
                            .is_err()
                        {
                            break;
                        }
                        continue;
                    }
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let _ = closed.send((n, std::time::Instant::now()));
            });
        }
    });
    (addr, closes)
}

#[tokio::test]
async fn pooled_upstream_connections_close_after_their_idle_timeout() {
    let (addr, mut closes) = closing_upstream().await;
    let keel = Keel::start(&format!(
        "[upstreams.web]\nendpoints = [\"{addr}\"]\nidle_timeout = \"1s\"\n{}",
        route("web", "/", "web", "")
    ))
    .await;
    assert_eq!(keel.get("/").await.status, 200);
    let answered = std::time::Instant::now();
    let (n, at) = tokio::time::timeout(Duration::from_secs(10), closes.recv())
        .await
        .expect("the idle connection is closed")
        .unwrap();
    assert_eq!(n, 0);
    let idle = at - answered;
    assert!(
        idle >= Duration::from_millis(900),
        "closed after {idle:?}, before its idle timeout"
    );
    // The next request opens a new one.
    assert_eq!(keel.get("/").await.status, 200);
    assert_eq!(keel.get("/").await.status, 200);
    assert!(
        closes.try_recv().is_err(),
        "the new one is reused, not closed"
    );
}

#[tokio::test]
async fn upstream_connections_never_exceed_max_connections_per_endpoint() {
    use support::Reply;
    let stub = Stub::start().await;
    stub.behave(|_, _| Reply::ok("held\n").after(Duration::from_millis(300)));
    let keel = std::sync::Arc::new(
        Keel::start(&format!(
            "[upstreams.web]\nendpoints = [\"{}\"]\nmax_connections = 2\nconnect_timeout = \"10s\"\noutlier_detection = {{ consecutive_failures = 0 }}\n{}",
            stub.addr,
            route("web", "/", "web", "")
        ))
        .await,
    );
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let keel = keel.clone();
            tokio::spawn(async move { keel.get("/").await.status })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200, "every request waits its turn");
    }
    assert_eq!(stub.count(), 8);
    assert_eq!(stub.connections(), 2, "two connections carried all eight");

    // None comes free within connect_timeout: upstream-unavailable.
    stub.behave(|_, _| Reply::ok("held\n").after(Duration::from_secs(3)));
    let keel = std::sync::Arc::new(
        Keel::start(&format!(
            "[upstreams.web]\nendpoints = [\"{}\"]\nmax_connections = 1\nconnect_timeout = \"200ms\"\noutlier_detection = {{ consecutive_failures = 0 }}\n{}",
            stub.addr,
            route("web", "/", "web", "")
        ))
        .await,
    );
    let k = keel.clone();
    let held = tokio::spawn(async move { k.get("/").await.status });
    support::eventually(Duration::from_secs(5), || async {
        (stub.count() == 9).then_some(())
    })
    .await
    .unwrap();
    let r = keel.get("/").await;
    assert_eq!((r.status, r.reason()), (503, Some("upstream-unavailable")));
    assert_eq!(held.await.unwrap(), 200);
    assert_eq!(stub.count(), 9);
}

/// A raw upstream: `serve(stream)` for each connection it accepts.
async fn raw_upstream<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// Reads a request head off `s` (and whatever came with it).
async fn read_head(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    got
}

/// Reads what `s` sends until it closes (or resets), for at most `limit`.
async fn read_to_close(s: &mut tokio::net::TcpStream, limit: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .map_err(|_| panic!("not closed within {limit:?}"));
    out
}

const BREAKER_OF_ONE: &str = "[routes.circuit_breaker]\nconsecutive_failures = 1\n";

#[tokio::test]
async fn a_stalled_request_body_gets_408_and_a_close_and_is_not_the_upstreams_fault() {
    use tokio::io::AsyncWriteExt;
    let stub = Stub::start().await;
    let keel = Keel::start_with(
        "request_body_timeout = \"1s\"",
        &format!(
            "{}{}",
            upstream("web", &[stub.addr]),
            route(
                "web",
                "/",
                "web",
                &format!("{BREAKER_OF_ONE}[routes.retry]\n")
            )
        ),
    )
    .await;
    // Streamed (POST) and buffered for retries (PUT): 10 of 100 bytes,
    // then nothing.
    for method in ["POST", "PUT"] {
        let mut s = tokio::net::TcpStream::connect(keel.listen).await.unwrap();
        s.write_all(
            format!("{method} /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
                .as_bytes(),
        )
        .await
        .unwrap();
        let started = std::time::Instant::now();
        let answer = String::from_utf8_lossy(&read_to_close(&mut s, Duration::from_secs(10)).await)
            .into_owned();
        assert_eq!(status(&answer), 408, "{method}: {answer}");
        assert!(
            answer.contains("x-keel-reason: request-timeout"),
            "{answer}"
        );
        assert!(started.elapsed() >= Duration::from_millis(900));
    }
    // The breaker (one failure trips it) heard nothing.
    let r = keel.get("/").await;
    assert_eq!((r.status, r.reason()), (200, None));

    // A body that trickles, a byte well within the timeout each time,
    // goes through whole, however long it takes in all.
    let mut s = tokio::net::TcpStream::connect(keel.listen).await.unwrap();
    s.write_all(b"POST /trickle HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    for piece in [
        "3\r\nabc\r\n",
        "3\r\ndef\r\n",
        "3\r\nghi\r\n",
        "3\r\njkl\r\n",
        "0\r\n\r\n",
    ] {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(piece.as_bytes()).await.unwrap();
    }
    let answer =
        String::from_utf8_lossy(&read_to_close(&mut s, Duration::from_secs(10)).await).into_owned();
    assert_eq!(status(&answer), 200, "{answer}");
    let hit = stub.hits().pop().unwrap();
    assert_eq!(
        (hit.path.as_str(), &hit.body[..]),
        ("/trickle", &b"abcdefghijkl"[..])
    );
}

#[tokio::test]
async fn a_route_timeout_while_keel_waits_for_the_clients_body_is_the_clients() {
    use tokio::io::AsyncWriteExt;
    let stub = Stub::start().await;
    let keel = Keel::start(&format!(
        "{}{}",
        upstream("web", &[stub.addr]),
        route(
            "web",
            "/",
            "web",
            &format!("timeout = \"1s\"\n{BREAKER_OF_ONE}")
        )
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(keel.listen).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let answer =
        String::from_utf8_lossy(&read_to_close(&mut s, Duration::from_secs(10)).await).into_owned();
    assert_eq!(status(&answer), 408, "{answer}");
    let r = keel.get("/").await;
    assert_eq!(
        (r.status, r.reason()),
        (200, None),
        "the breaker did not trip"
    );
}

#[tokio::test]
async fn an_upstream_that_answers_early_and_closes_is_relayed_not_a_502() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // It reads the head, answers 413 at once and closes, with most of the
    // body unread (its kernel then resets the connection).
    let addr = raw_upstream(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large")
            .await;
    })
    .await;
    let keel = Keel::start(&format!(
        "[upstreams.web]\nendpoints = [\"{addr}\"]\noutlier_detection = {{ consecutive_failures = 0 }}\n{}",
        route("web", "/", "web", BREAKER_OF_ONE)
    ))
    .await;
    let body = vec![b'x'; 16 << 20];
    for round in 0..5 {
        let mut s = tokio::net::TcpStream::connect(keel.listen).await.unwrap();
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(
                format!(
                    "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .await?;
            w.write_all(&body).await
        };
        let mut answer = Vec::new();
        let receive = tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut answer));
        let (_, received) = tokio::join!(send, receive);
        received.expect("answered").unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status(&answer), 413, "round {round}: {answer}");
        assert!(answer.ends_with("too large"), "round {round}: {answer}");
    }
}

#[tokio::test]
async fn an_upstream_that_stalls_is_cut_at_its_read_timeout() {
    use tokio::io::AsyncWriteExt;
    // `/head`: never answers; else a head and 10 of 100 bytes, then
    // nothing, holding the connection open.
    let addr = raw_upstream(|mut s| async move {
        let head = read_head(&mut s).await;
        if !head.starts_with(b"GET /head ") {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                .await;
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let keel = Keel::start(&format!(
        "[upstreams.web]\nendpoints = [\"{addr}\"]\nread_timeout = \"1s\"\noutlier_detection = {{ consecutive_failures = 0 }}\n{}",
        route("web", "/", "web", "")
    ))
    .await;
    let started = std::time::Instant::now();
    let r = keel.get("/head").await;
    assert_eq!((r.status, r.reason()), (504, Some("timeout")));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "well before the route's 15 s"
    );

    let mut s = tokio::net::TcpStream::connect(keel.listen).await.unwrap();
    s.write_all(b"GET /body HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = read_to_close(&mut s, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(answer.ends_with("0123456789"), "the body is cut: {answer}");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_frees_its_upstream_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    let addr = raw_upstream(move |mut s| {
        let closed = closed_tx.clone();
        async move {
            read_head(&mut s).await;
            let _ = s
                .write_all(
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 256 << 20).as_bytes(),
                )
                .await;
            let block = vec![b'x'; 1 << 20];
            for _ in 0..256 {
                if s.write_all(&block).await.is_err() {
                    break;
                }
            }
            // Written whole, or cut: either way, wait for keel's close.
            let mut rest = [0u8; 16];
            while matches!(s.read(&mut rest).await, Ok(n) if n > 0) {}
            let _ = closed.send(());
        }
    })
    .await;
    let keel = Keel::start_with(
        "response_idle_timeout = \"1s\"",
        &format!(
            "[upstreams.web]\nendpoints = [\"{addr}\"]\n{}",
            route("web", "/", "web", "")
        ),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(keel.listen).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1024];
    let n = s.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    // The client reads no more: keel closes its connection, and the
    // upstream's with it.
    tokio::time::timeout(Duration::from_secs(20), closed.recv())
        .await
        .expect("the upstream connection is closed")
        .unwrap();
    let rest = read_to_close(&mut s, Duration::from_secs(20)).await;
    assert!(
        n + rest.len() < 256 << 20,
        "the response was cut ({} bytes read)",
        n + rest.len()
    );
}

#[tokio::test]
async fn an_upstream_that_answers_200_early_still_gets_the_whole_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An echo-like upstream: the head at once, then it reads the body and
    // ends its answer with the count of bytes it got.
    let addr = raw_upstream(|mut s| async move {
        let got = read_head(&mut s).await;
        let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let length: usize = head
            .split("content-length: ")
            .nth(1)
            .and_then(|v| v.split("\r\n").next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        let mut read = got.len() - end;
        let mut chunk = vec![0u8; 64 << 10];
        while read < length {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
        let count = read.to_string();
        let _ = s
            .write_all(format!("{:x}\r\n{count}\r\n0\r\n\r\n", count.len()).as_bytes())
            .await;
    })
    .await;
    let keel = Keel::start(&format!(
        "[upstreams.web]\nendpoints = [\"{addr}\"]\n{}",
        route("web", "/", "web", "")
    ))
    .await;
    let body = "x".repeat(4 << 20);
    let r = keel.request("POST", "/echo", &[], &body).await;
    assert_eq!((r.status, r.body.as_str()), (200, "4194304"));
}
