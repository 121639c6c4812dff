//! End to end: a keyed request runs once whatever its client, the route's
//! timeout or the upstream does (issue 17's numbered points), against the
//! real binary, on each `[store]` backend; and the memory a client can make
//! keel hold stays bounded.

#[path = "../../keel/tests/support/redis_server.rs"]
mod redis_server;
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_server::RedisServer;
use support::{eventually, raw, upstream, Answer, Keel, Reply, Stub};

const KEY: &str = "idempotency-key";

/// The stub's behaviour by the key's prefix; each key's runs counted.
fn behave(stub: &Stub) {
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    stub.behave(move |hit, _| {
        let key = hit
            .headers
            .get(KEY)
            .or_else(|| hit.headers.get("x-request-key"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let run = {
            let mut runs = runs.lock().unwrap();
            let n = runs.entry(key.clone()).or_default();
            *n += 1;
            *n
        };
        let auth = hit
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("nobody")
            .to_owned();
        let charge = format!("charge {run} for {key} by {auth}\n");
        match key.split('-').next().unwrap_or("") {
            "slow" => Reply::ok(&charge).after(Duration::from_millis(800)),
            "slower" => Reply::ok(&charge).after(Duration::from_secs(2)),
            // Resets once after reading the request, then says 503.
            "wobbly" if run == 1 => Reply::Reset,
            "wobbly" => Reply::status(503),
            "e500" => Reply::status(500),
            "e503" => Reply::status(503),
            "e429" => Reply::status(429),
            "reset" => Reply::Reset,
            "big" => Reply::ok(&"y".repeat(4096)),
            // Fails once, then charges: for the route that retries.
            "flaky" if run == 1 => Reply::status(500),
            _ => Reply::ok(&charge).header("set-cookie", &format!("session={auth}")),
        }
    });
}

/// How often `key` reached the upstream.
fn runs(stub: &Stub, key: &str) -> usize {
    stub.hits()
        .iter()
        .filter(|h| {
            h.headers
                .get(KEY)
                .or_else(|| h.headers.get("x-request-key"))
                == Some(&key.parse().unwrap())
        })
        .count()
}

fn route(name: &str, upstream: &str, timeout: &str, idempotency: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{upstream}\"\ntimeout = \"{timeout}\"\n{extra}[routes.idempotency]\nmax_body = \"1KiB\"\n{idempotency}\n"
    )
}

fn config(stub: &Stub, store: &str) -> String {
    // Port 1: privileged, never an ephemeral port another test could take.
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
    [
        store.to_owned(),
        upstream("pay", &[stub.addr]),
        upstream("dead", &[dead]),
        route("pay", "pay", "5s", "", ""),
        route("short", "pay", "300ms", "execution_timeout = \"10s\"", ""),
        route("lenient", "pay", "5s", "on_unknown = \"release\"", ""),
        route("dead", "dead", "2s", "", ""),
        route(
            "retry",
            "pay",
            "5s",
            "header = \"X-Request-Key\"",
            "[routes.retry]\nmax_attempts = 3\non = [\"5xx\", \"reset\"]\nbackoff = { base = \"1ms\", max = \"5ms\" }\n",
        ),
    ]
    .join("\n")
}

async fn post(keel: &Keel, path: &str, key: &str) -> Answer {
    keel.request("POST", path, &[(KEY, key)], "{\"amount\":42}")
        .await
}

fn replayed(a: &Answer) -> bool {
    a.header("x-keel-idempotent-replay") == Some("true")
}

/// Sends a keyed request and leaves (closes the connection) once the
/// upstream has it, before any answer.
async fn leave_mid_request(keel: &Keel, stub: &Stub, path: &str, key: &str) {
    use tokio::io::AsyncWriteExt;
    let mut client = tokio::net::TcpStream::connect(keel.listen).await.unwrap();
    let body = "{\"amount\":42}";
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: shop\r\n{KEY}: {key}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    eventually(Duration::from_secs(5), || async {
        (runs(stub, key) == 1).then_some(())
    })
    .await
    .expect("the request reached the upstream");
    drop(client);
}

/// Points 1 to 5, on the store `store` describes.
async fn the_first_five_points_hold(store: &str) {
    let stub = Stub::start().await;
    behave(&stub);
    let keel = Keel::start(&config(&stub, store)).await;

    // 1. The client leaves mid-charge: the charge runs to its end, once,
    // and its duplicate gets it.
    leave_mid_request(&keel, &stub, "/pay/1", "slow-leave").await;
    let dup = post(&keel, "/pay/1", "slow-leave").await;
    assert_eq!(dup.status, 200, "{}", dup.body);
    assert!(replayed(&dup));
    assert!(
        dup.body.starts_with("charge 1 for slow-leave"),
        "{}",
        dup.body
    );
    assert_eq!(runs(&stub, "slow-leave"), 1);

    // 1 and 2. The route's timeout answers first (504); the execution goes
    // on; a duplicate while it runs waits its own timeout, then 409 with
    // retry-after; once it ends, duplicates get its response.
    let first = post(&keel, "/short/1", "slower-timeout").await;
    assert_eq!((first.status, first.reason()), (504, Some("timeout")));
    let dup = post(&keel, "/short/1", "slower-timeout").await;
    assert_eq!(
        (dup.status, dup.reason()),
        (409, Some("idempotency-in-progress")),
        "{}",
        dup.body
    );
    assert!(dup.header("retry-after").is_some());
    let later = eventually(Duration::from_secs(5), || async {
        let a = post(&keel, "/short/1", "slower-timeout").await;
        (a.status == 200).then_some(a)
    })
    .await
    .expect("the execution ended and was stored");
    assert!(replayed(&later));
    assert!(later.body.starts_with("charge 1 for slower-timeout"));
    assert_eq!(runs(&stub, "slower-timeout"), 1);

    // 3. A 500 is stored and replayed; 503 and 429 release the key.
    let first = post(&keel, "/pay/1", "e500-a").await;
    let dup = post(&keel, "/pay/1", "e500-a").await;
    assert_eq!((first.status, replayed(&first)), (500, false));
    assert_eq!((dup.status, replayed(&dup)), (500, true));
    assert_eq!(runs(&stub, "e500-a"), 1);
    for (key, status) in [("e503-a", 503), ("e429-a", 429)] {
        for _ in 0..2 {
            let a = post(&keel, "/pay/1", key).await;
            assert_eq!((a.status, replayed(&a)), (status, false), "{key}");
        }
        assert_eq!(runs(&stub, key), 2, "{key}: released, so run again");
    }
    // But a 503 after an earlier attempt was written (and reset) does not
    // release: that attempt may have acted.
    let first = keel
        .request("POST", "/retry/3", &[("x-request-key", "wobbly-3")], "{}")
        .await;
    assert_eq!(first.status, 503);
    assert_eq!(runs(&stub, "wobbly-3"), 3, "a reset, then retried 503s");
    let dup = keel
        .request("POST", "/retry/3", &[("x-request-key", "wobbly-3")], "{}")
        .await;
    assert_eq!(
        (dup.status, dup.reason()),
        (409, Some("idempotency-outcome-unknown"))
    );
    // keel's refusal before any write (no connection) releases it too:
    // the duplicate tries again rather than getting a 409.
    for _ in 0..2 {
        let a = post(&keel, "/dead/1", "dead-a").await;
        assert_eq!((a.status, a.reason()), (502, Some("upstream-unavailable")));
    }

    // 4. A reset after the request was written: unknown. Kept by
    // default; freed with on_unknown = "release".
    let first = post(&keel, "/pay/1", "reset-a").await;
    assert_eq!(first.status, 502);
    let dup = post(&keel, "/pay/1", "reset-a").await;
    assert_eq!(
        (dup.status, dup.reason()),
        (409, Some("idempotency-outcome-unknown"))
    );
    assert_eq!(runs(&stub, "reset-a"), 1);
    for _ in 0..2 {
        assert_eq!(post(&keel, "/lenient/1", "reset-b").await.status, 502);
    }
    assert_eq!(runs(&stub, "reset-b"), 2);

    // 5. A response over max_body is passed through; the key is kept.
    let first = post(&keel, "/pay/1", "big-a").await;
    assert_eq!((first.status, first.body.len()), (200, 4096));
    let dup = post(&keel, "/pay/1", "big-a").await;
    assert_eq!(
        (dup.status, dup.reason()),
        (409, Some("idempotency-not-replayable"))
    );
    assert_eq!(runs(&stub, "big-a"), 1);
}

#[tokio::test]
async fn the_first_five_points_hold_on_the_memory_store() {
    the_first_five_points_hold("").await;
}

#[tokio::test]
async fn the_first_five_points_hold_on_the_embedded_store() {
    let dir = std::env::temp_dir().join(format!("keel-e2e-once-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"\n",
        dir.join("state.redb").display()
    );
    the_first_five_points_hold(&store).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_first_five_points_hold_on_the_redis_store() {
    let redis = RedisServer::start();
    let store = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\ntimeout = \"500ms\"\n",
        redis.url()
    );
    the_first_five_points_hold(&store).await;
}

/// Points 6 to 9: the key goes upstream, records are scoped to their
/// principal, `Connection` cannot strip keel's headers, and retries go by
/// the route's key header.
#[tokio::test]
async fn keys_are_forwarded_scoped_kept_and_retried_by_the_routes_header() {
    let stub = Stub::start().await;
    behave(&stub);
    let keel = Keel::start(&config(&stub, "")).await;

    // 6. Forwarded unchanged.
    post(&keel, "/pay/6", "plain-6").await;
    let hit = stub.hits().pop().unwrap();
    assert_eq!(hit.headers.get(KEY).unwrap(), "plain-6");

    // 7. The same key under another Authorization is another record: it
    // runs, and never gets the other principal's response or cookie.
    let as_user = |auth: &'static str| {
        let keel = &keel;
        async move {
            keel.request(
                "POST",
                "/pay/7",
                &[(KEY, "shared-7"), ("authorization", auth)],
                "{}",
            )
            .await
        }
    };
    let alice = as_user("Bearer alice").await;
    let bob = as_user("Bearer bob").await;
    let alice_again = as_user("Bearer alice").await;
    assert_eq!(runs(&stub, "shared-7"), 2);
    assert!(!replayed(&bob));
    assert!(bob.body.ends_with("by Bearer bob\n"), "{}", bob.body);
    assert_eq!(bob.header("set-cookie"), Some("session=Bearer bob"));
    assert!(replayed(&alice_again));
    assert_eq!(alice_again.body, alice.body);
    assert_eq!(
        alice_again.header("set-cookie"),
        Some("session=Bearer alice")
    );

    // 8. Connection naming the key, Host and X-Forwarded-For strips none
    // of them: the duplicate is still recognised.
    let request = format!(
        "POST /pay/8 HTTP/1.1\r\nhost: shop.example\r\nconnection: close, {KEY}, host, x-forwarded-for\r\nx-forwarded-for: 10.0.0.1\r\n{KEY}: conn-8\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    let first = raw(keel.listen, request.as_bytes()).await;
    let again = raw(keel.listen, request.as_bytes()).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(again.contains("x-keel-idempotent-replay: true"), "{again}");
    assert_eq!(runs(&stub, "conn-8"), 1);
    let hit = stub
        .hits()
        .into_iter()
        .find(|h| h.headers.get(KEY).is_some_and(|v| v == "conn-8"))
        .unwrap();
    assert_eq!(hit.headers.get("host").unwrap(), "shop.example");
    assert_eq!(
        hit.headers.get("x-forwarded-for").unwrap(),
        "10.0.0.1, 127.0.0.1"
    );

    // 9. A POST keyed by the route's own header is retried (on 5xx here);
    // the final response is what is stored.
    let first = keel
        .request("POST", "/retry/9", &[("x-request-key", "flaky-9")], "{}")
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(runs(&stub, "flaky-9"), 2, "one retry");
    let dup = keel
        .request("POST", "/retry/9", &[("x-request-key", "flaky-9")], "{}")
        .await;
    assert!(replayed(&dup));
    assert_eq!(runs(&stub, "flaky-9"), 2);
}

/// keel's resident memory, from /proc.
fn rss_bytes(keel: &Keel) -> u64 {
    let pid = keel.child.id().expect("keel runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// A request's path and headers.
type Built = (String, Vec<(String, String)>);

/// Sends `count` requests, eight at a time; each is built by `request(i)`
/// and must get 200.
async fn load(keel: &Arc<Keel>, count: usize, request: fn(usize) -> Built) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (keel, next) = (keel.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let (path, headers) = request(i);
                    let headers: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let a = keel.request("POST", &path, &headers, "{}").await;
                    assert_eq!(a.status, 200, "request {i}: {}", a.body);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
}

/// Point 10: 1,500 keys with 100 KB responses through a 16 MiB memory
/// store, and 2,500 rate-limit keys of 30 KB each, leave keel's resident
/// memory within a stated bound (unbounded, they would hold 150 MB and
/// 75 MB); new keys are still served afterwards.
#[tokio::test]
async fn clients_cannot_grow_keels_memory_without_bound() {
    const MIB: u64 = 1 << 20;
    let stub = Stub::start().await;
    let body = "z".repeat(100_000);
    stub.behave(move |_, _| Reply::ok(&body));
    let config = format!(
        "[store]\nmax_bytes = \"16MiB\"\n{}[[routes]]\nname = \"pay\"\npath_prefix = \"/pay\"\nupstream = \"pay\"\ntimeout = \"10s\"\n[routes.idempotency]\nmax_body = \"1MiB\"\n[[routes]]\nname = \"limited\"\npath_prefix = \"/limited\"\nupstream = \"pay\"\ntimeout = \"10s\"\n[routes.rate_limit]\nrequests_per_second = 1000\nburst = 1000\nkey = \"header:x-client\"\n",
        upstream("pay", &[stub.addr])
    );
    let keel = Arc::new(Keel::start(&config).await);
    // A baseline once the paths have run (buffers, pools, allocator arenas).
    load(&keel, 40, |i| {
        (format!("/pay/{i}"), vec![(KEY.into(), format!("warm-{i}"))])
    })
    .await;
    let baseline = rss_bytes(&keel);

    load(&keel, 1500, |i| {
        (
            format!("/pay/{i}"),
            vec![(KEY.into(), format!("order-{i}"))],
        )
    })
    .await;
    let after_keys = rss_bytes(&keel);
    // The store's 16 MiB, and room for the allocator's slack and the
    // requests in flight; an unbounded store would add 150 MB.
    let bound = baseline + 16 * MIB + 24 * MIB;
    assert!(
        after_keys < bound,
        "RSS {} MiB after 1,500 keys of 100 KB (baseline {} MiB, bound {} MiB)",
        after_keys / MIB,
        baseline / MIB,
        bound / MIB
    );
    // New keys are still served (old results made room), and a recent one
    // is replayed.
    let fresh = keel
        .request("POST", "/pay/new", &[(KEY, "fresh")], "{}")
        .await;
    assert_eq!((fresh.status, fresh.body.len()), (200, 100_000));
    let recent = keel
        .request("POST", "/pay/1499", &[(KEY, "order-1499")], "{}")
        .await;
    assert_eq!(recent.header("x-keel-idempotent-replay"), Some("true"));

    let before_limits = rss_bytes(&keel);
    load(&keel, 2500, |i| {
        let client = format!("{i:05}{}", "c".repeat(30_000));
        ("/limited/x".into(), vec![("x-client".into(), client)])
    })
    .await;
    let after_limits = rss_bytes(&keel);
    // 2,500 keys of 16 bytes; raw, the values alone would be 75 MB.
    let bound = before_limits + 16 * MIB;
    assert!(
        after_limits < bound,
        "RSS {} MiB after 2,500 rate-limit keys of 30 KB (before {} MiB, bound {} MiB)",
        after_limits / MIB,
        before_limits / MIB,
        bound / MIB
    );
    let state = keel.admin_get("/state").await.unwrap().json();
    let keys = state.to_string();
    assert!(keys.contains("\"keys\":2500"), "{keys}");
    let served = keel
        .request("POST", "/limited/x", &[("x-client", "another")], "{}")
        .await;
    assert_eq!(served.status, 200);
    eprintln!(
        "RSS: baseline {} KiB, after 1,500 keys {} KiB, after 2,500 rate keys {} KiB",
        baseline / 1024,
        after_keys / 1024,
        after_limits / 1024
    );
}
