//! End to end: idempotency keys and shared rate limits on each `[store]`
//! backend, with real `keel` processes, a real `redis-server` (started per
//! test on a free loopback port) and stub upstreams.

#[path = "../../keel/tests/support/redis_server.rs"]
mod redis_server;
mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_server::RedisServer;
use support::{eventually, raw, upstream, Answer, Keel, Reply, Stub};

const KEY: &str = "idempotency-key";

/// An upstream `pay` on `stub`, and a route `/pay` with idempotency keys
/// (and `extra` in its idempotency table).
fn paying(stub: &Stub, store: &str, extra: &str) -> String {
    format!(
        "{store}\n{}[[routes]]\nname = \"pay\"\npath_prefix = \"/pay\"\nupstream = \"pay\"\ntimeout = \"10s\"\n[routes.idempotency]\n{extra}\n",
        upstream("pay", &[stub.addr])
    )
}

fn redis_store(server: &RedisServer) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\ntimeout = \"500ms\"\n",
        server.url()
    )
}

fn embedded_store(dir: &std::path::Path) -> String {
    format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"\n",
        dir.join("state.redb").display()
    )
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The stub charges: each hit is a new charge, after `delay`.
fn charging(stub: &Stub, delay: Duration) {
    stub.behave(move |_, n| {
        Reply::ok(&format!("charge #{n}\n"))
            .header("x-charge", &n.to_string())
            .after(delay)
    });
}

async fn pay(keel: &Keel, key: &str, body: &str) -> Answer {
    keel.request("POST", "/pay/order-7", &[(KEY, key)], body)
        .await
}

/// 20 requests with one key, at once, spread over `keels`.
async fn twenty_at_once(keels: &[Arc<Keel>], key: &str) -> Vec<Answer> {
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let keel = keels[i % keels.len()].clone();
            let key = key.to_owned();
            tokio::spawn(async move { pay(&keel, &key, "{\"amount\":42}").await })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    answers
}

fn assert_one_charge(answers: &[Answer]) {
    for a in answers {
        assert_eq!(
            (a.status, a.body.as_str(), a.header("x-charge")),
            (200, "charge #1\n", Some("1")),
            "{a:?}"
        );
    }
    let replayed = answers
        .iter()
        .filter(|a| a.header("x-keel-idempotent-replay") == Some("true"))
        .count();
    assert_eq!(replayed, answers.len() - 1, "all but the first are replays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_duplicates_reach_the_upstream_once_on_every_store() {
    let redis = RedisServer::start();
    let dir = temp_dir("dup");
    for store in ["", &embedded_store(&dir), &redis_store(&redis)] {
        let stub = Stub::start().await;
        charging(&stub, Duration::from_millis(300));
        let keel = Arc::new(Keel::start(&paying(&stub, store, "")).await);
        let answers = twenty_at_once(std::slice::from_ref(&keel), "order-7-attempt-1").await;
        assert_eq!(
            stub.count(),
            1,
            "store {store:?}: the upstream was charged once"
        );
        assert_one_charge(&answers);

        // The same key for another request is refused.
        let other = pay(&keel, "order-7-attempt-1", "{\"amount\":43}").await;
        assert_eq!(
            (other.status, other.reason()),
            (422, Some("idempotency-key-mismatch")),
            "{store:?}"
        );
        // A 5xx is not stored: the key is released and the retry runs.
        stub.behave(|_, n| {
            if n == 2 {
                Reply::status(503)
            } else {
                Reply::ok(&format!("charge #{n}\n"))
            }
        });
        assert_eq!(pay(&keel, "k2", "{}").await.status, 503);
        let retried = pay(&keel, "k2", "{}").await;
        assert_eq!(
            (retried.status, retried.body.as_str()),
            (200, "charge #3\n")
        );
        assert_eq!(stub.count(), 3);
        // Requests without the key pass as before.
        assert_eq!(keel.request("POST", "/pay/x", &[], "{}").await.status, 200);
        assert_eq!(stub.count(), 4);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// keel answers 413 without reading the body and closes while the client
/// is still sending it: the close lingers (drains what the client sends),
/// so the client sees the 413, not a reset. It raced about one run in six
/// before; fifty in a row hold.
#[tokio::test]
async fn a_large_keyed_body_gets_its_413_every_time() {
    let stub = Stub::start().await;
    let keel = Keel::start(&paying(&stub, "", "max_body = \"1KiB\"")).await;
    let big_body = "x".repeat(2 << 20);
    for round in 0..50 {
        let too_large = keel
            .request("POST", "/pay/1", &[(KEY, "big")], &big_body)
            .await;
        assert_eq!(
            (too_large.status, too_large.reason()),
            (413, Some("body-too-large")),
            "round {round}"
        );
        // The body was not read, so the connection closes; the client is
        // told not to reuse it (else its next request races the close).
        assert_eq!(too_large.header("connection"), Some("close"));
    }
    assert_eq!(stub.count(), 0, "none reached the upstream");
}

#[tokio::test]
async fn bad_keys_and_large_bodies_get_4xx_and_large_responses_pass_unstored() {
    let stub = Stub::start().await;
    let keel = Keel::start(&paying(&stub, "", "max_body = \"1KiB\"")).await;
    let long_key = "k".repeat(300);
    let bad = keel
        .request("POST", "/pay/1", &[(KEY, long_key.as_str())], "{}")
        .await;
    assert_eq!((bad.status, bad.reason()), (400, Some("bad-request")));
    assert_eq!(stub.count(), 0, "it did not reach the upstream");
    // A small body sent chunked (its length unannounced) is read whole and
    // fingerprinted like any other.
    let chunked = raw(
        keel.listen,
        b"POST /pay/1 HTTP/1.1\r\nhost: x\r\nidempotency-key: chunked\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 200"), "{chunked}");
    assert_eq!(stub.count(), 1);

    // A response over max_body is passed through whole, and not stored;
    // it ran, so the duplicate does not run again: 409.
    let big_answer = "y".repeat(4096);
    let answer = big_answer.clone();
    stub.behave(move |_, _| Reply::ok(&answer));
    let a = pay(&keel, "large", "{}").await;
    assert_eq!((a.status, a.body.len()), (200, big_answer.len()));
    assert_eq!(a.header("x-keel-idempotent-replay"), None);
    let dup = pay(&keel, "large", "{}").await;
    assert_eq!(
        (dup.status, dup.reason()),
        (409, Some("idempotency-not-replayable"))
    );
    assert_eq!(stub.count(), 2);
}

#[tokio::test]
async fn the_embedded_store_replays_after_a_restart() {
    let stub = Stub::start().await;
    charging(&stub, Duration::ZERO);
    let dir = temp_dir("restart");
    let config = paying(&stub, &embedded_store(&dir), "");
    let mut first = Keel::start(&config).await;
    assert_eq!(pay(&first, "order-1", "{}").await.body, "charge #1\n");
    first.signal("TERM");
    let exit = tokio::time::timeout(Duration::from_secs(10), first.child.wait())
        .await
        .expect("keel exits on SIGTERM")
        .unwrap();
    assert!(exit.success());

    let second = Keel::start(&config).await;
    let again = pay(&second, "order-1", "{}").await;
    assert_eq!(
        (
            again.status,
            again.body.as_str(),
            again.header("x-keel-idempotent-replay")
        ),
        (200, "charge #1\n", Some("true"))
    );
    assert_eq!(stub.count(), 1, "the restart did not charge again");
    drop(second);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_redis_deduplicate_and_share_one_rate_limit() {
    let redis = RedisServer::start();
    let stub = Stub::start().await;
    charging(&stub, Duration::from_millis(300));
    // Burst 5 at one request every 100 s: whatever the two instances do
    // within this test, at most 5 (+1 if it ran 100 s) are admitted.
    let config = format!(
        "{}[[routes]]\nname = \"search\"\npath_prefix = \"/search\"\nupstream = \"pay\"\n[routes.rate_limit]\nrequests_per_second = 0.01\nburst = 5\nshared = true\n",
        paying(&stub, &redis_store(&redis), "")
    );
    let a = Arc::new(Keel::start(&config).await);
    let b = Arc::new(Keel::start(&config).await);
    let answers = twenty_at_once(&[a.clone(), b.clone()], "order-9").await;
    assert_eq!(stub.count(), 1, "one charge across both proxies");
    assert_one_charge(&answers);

    let started = Instant::now();
    let mut admitted = 0;
    for i in 0..20 {
        let keel = if i % 2 == 0 { &a } else { &b };
        let r = keel.get("/search").await;
        match r.status {
            200 => admitted += 1,
            429 => assert_eq!(r.reason(), Some("rate-limited")),
            s => panic!("{s}: {r:?}"),
        }
    }
    let allowed = 5 + (started.elapsed().as_secs_f64() * 0.01).ceil() as usize;
    assert!(
        (5..=allowed).contains(&admitted),
        "{admitted} admitted, limit + burst allow {allowed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_or_open_as_configured_and_recovers() {
    let mut redis = RedisServer::start();
    let stub = Stub::start().await;
    let limited = |name: &str, mode: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"pay\"\n[routes.rate_limit]\nrequests_per_second = 100\nburst = 100\nshared = true\non_store_error = \"{mode}\"\n"
        )
    };
    let keel = Keel::start(&format!(
        "{}{}{}",
        paying(&stub, &redis_store(&redis), ""),
        limited("open", "fail_open"),
        limited("closed", "fail_closed"),
    ))
    .await;
    assert_eq!(pay(&keel, "before", "{}").await.status, 200);
    assert_eq!(keel.get("/open").await.status, 200);
    assert_eq!(keel.get("/closed").await.status, 200);

    redis.kill();
    let refused = pay(&keel, "during", "{}").await;
    assert_eq!(
        (refused.status, refused.reason()),
        (503, Some("store-unavailable"))
    );
    assert_eq!(keel.get("/open").await.status, 200, "fail_open admits");
    let closed = keel.get("/closed").await;
    assert_eq!(
        (closed.status, closed.reason()),
        (503, Some("store-unavailable"))
    );
    let hits_before = stub.count();
    assert_eq!(
        hits_before, 4,
        "only the fail-open request reached the upstream"
    );
    for (policy, name, mode) in [
        ("idempotency", "pay", "fail_closed"),
        ("rate_limiter", "open", "fail_open"),
        ("rate_limiter", "closed", "fail_closed"),
    ] {
        let series = format!(
            "keel_store_unavailable_total{{policy=\"{policy}\",route=\"{name}\",mode=\"{mode}\"}}"
        );
        assert!(
            keel.metric(&series).await >= Some(1.0),
            "{series} in\n{}",
            keel.admin_get("/metrics").await.unwrap().body
        );
    }

    // Redis comes back (empty) and everything works again.
    redis.restart();
    let recovered = eventually(Duration::from_secs(10), || async {
        let a = pay(&keel, "after", "{}").await;
        (a.status == 200).then_some(a)
    })
    .await;
    assert!(
        recovered.is_some(),
        "no recovery; log:\n{}",
        keel.log_text()
    );
    assert_eq!(keel.get("/closed").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_holding_a_key_lets_another_take_it_after_lock_timeout() {
    let redis = RedisServer::start();
    let stub = Stub::start().await;
    // The first charge hangs (its proxy dies meanwhile); later ones answer.
    stub.behave(|_, n| {
        let reply = Reply::ok(&format!("charge #{n}\n"));
        if n == 1 {
            reply.after(Duration::from_secs(30))
        } else {
            reply
        }
    });
    let config = paying(&stub, &redis_store(&redis), "lock_timeout = \"1s\"");
    let mut a = Keel::start(&config).await;
    let b = Keel::start(&config).await;
    let a_listen = a.listen;
    let client = a.client.clone();
    let doomed = tokio::spawn(async move {
        let request = http::Request::post(format!("http://{a_listen}/pay/order-7"))
            .header(KEY, "held")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        client.request(request).await
    });
    let reached = eventually(Duration::from_secs(5), || async {
        (stub.count() == 1).then_some(())
    })
    .await;
    assert!(reached.is_some(), "the first request reached the upstream");
    // Taken before the kill, which returns only once the holder is dead
    // (a load can stretch that): the bound below counts from no later
    // than its last renewal.
    let killed_at = Instant::now();
    a.child.kill().await.unwrap();
    assert!(
        doomed.await.unwrap().is_err(),
        "its client lost the connection"
    );

    // The other instance waits out the dead holder's lock, then runs.
    let taken = pay(&b, "held", "{}").await;
    assert_eq!((taken.status, taken.body.as_str()), (200, "charge #2\n"));
    assert_eq!(taken.header("x-keel-idempotent-replay"), None);
    // The dead holder last renewed at most a third of the lock before it
    // died, so its key was held for at least two thirds of a second more.
    let waited = killed_at.elapsed();
    assert!(
        (Duration::from_millis(600)..Duration::from_secs(8)).contains(&waited),
        "taken over after {waited:?}, with a 1 s lock"
    );
    // And from then on it is stored.
    let again = pay(&b, "held", "{}").await;
    assert_eq!(again.header("x-keel-idempotent-replay"), Some("true"));
    assert_eq!(stub.count(), 2);
}
