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
    let a = send(b"GET http://payments.test:8080/abs?q=1 HTTP/1.1\r\nhost: other.test\r\nconnection: close\r\n\r\n").await;
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
