//! The Redis store against a real `redis-server` (started per test on a free
//! loopback port): idempotency records and the shared GCRA limiter, across
//! two store instances standing in for two processes, through a Redis
//! outage and back.
//!
//! Redis keeps its own time, so these tests run on real time; every wait is
//! a bounded poll for a state, never a sleep that hopes.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel::idempotency::{Begin, FailMode, Idempotency, IdempotencyStore};
use keel::rate_limit::{RateLimiter, Refused, SharedRateLimiter};
use keel::store::{RedisStore, StoreError};
use keel::Error;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use redis_server::RedisServer;

fn store(server: &RedisServer) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::open(&server.url())
            .unwrap()
            .connect_timeout(Duration::from_millis(500)),
    )
}

fn executor(store: Arc<RedisStore>, fail: FailMode) -> Idempotency {
    Idempotency::builder("payments")
        .shared_store(store)
        .ttl(Duration::from_secs(60))
        .lock_timeout(Duration::from_secs(5))
        .store_timeout(Duration::from_secs(1))
        .on_store_error(fail)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_duplicates_across_two_instances_run_once_and_share_the_result() {
    let server = RedisServer::start();
    // Two stores, two executors: two processes as far as Redis can tell.
    let a = executor(store(&server), FailMode::FailClosed);
    let b = executor(store(&server), FailMode::FailClosed);
    let runs = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let idem = if i % 2 == 0 { a.clone() } else { b.clone() };
            let runs = runs.clone();
            tokio::spawn(async move {
                idem.call("order-7", b"POST /pay 42", || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, String>(format!("paid by call {i}"))
                })
                .await
                .unwrap()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the payment ran once");
    let first = &answers.iter().find(|a| !a.replayed).unwrap().value;
    assert!(answers.iter().all(|a| &a.value == first), "{answers:?}");
    // A later duplicate is replayed from Redis; another request under the
    // key is refused.
    let again = a
        .call("order-7", b"POST /pay 42", || async {
            Ok::<_, String>("again".to_owned())
        })
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(&again.value, first);
    let other = b
        .call("order-7", b"POST /pay 43", || async {
            Ok::<_, String>("other".to_owned())
        })
        .await;
    assert!(matches!(other, Err(Error::KeyMismatch)), "{other:?}");
}

#[tokio::test]
async fn a_retryable_failure_releases_the_key_and_a_final_result_is_stored() {
    let server = RedisServer::start();
    let idem = executor(store(&server), FailMode::FailClosed);
    let failed = idem
        .call("k", b"fp", || async {
            Err::<String, _>("connection reset".to_owned())
        })
        .await;
    assert!(matches!(failed, Err(Error::Inner(_))), "{failed:?}");
    let ran = idem
        .call("k", b"fp", || async {
            Ok::<_, String>("second try".to_owned())
        })
        .await
        .unwrap();
    assert_eq!((ran.value.as_str(), ran.replayed), ("second try", false));
}

#[tokio::test]
async fn a_dead_holders_key_is_free_after_its_lock_timeout_and_not_before() {
    let server = RedisServer::start();
    let (dead, other) = (store(&server), store(&server));
    let lock = Duration::from_millis(300);
    let started = Instant::now();
    // The holder claims the key and dies: it never completes or releases.
    let Begin::Acquired(_) = dead.begin("k", b"fp", lock).await.unwrap() else {
        panic!("a fresh key is free");
    };
    assert!(matches!(
        other.begin("k", b"fp", lock).await.unwrap(),
        Begin::InFlight { .. }
    ));
    let deadline = started + Duration::from_secs(5);
    loop {
        match other.begin("k", b"fp", lock).await.unwrap() {
            Begin::Acquired(_) => break,
            Begin::InFlight { .. } => {}
            done => panic!("{done:?}"),
        }
        assert!(Instant::now() < deadline, "the lock never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() >= lock,
        "taken after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn only_the_holder_completes_releases_or_extends() {
    let server = RedisServer::start();
    let s = store(&server);
    let lock = Duration::from_secs(5);
    let Begin::Acquired(token) = s.begin("k", b"fp", lock).await.unwrap() else {
        panic!("free key");
    };
    let stranger = keel::idempotency::Token::random();
    assert!(!s.extend("k", stranger, lock).await.unwrap());
    assert!(!s.complete("k", stranger, b"v", lock).await.unwrap());
    s.release("k", stranger).await.unwrap();
    assert!(matches!(
        s.begin("k", b"fp", lock).await.unwrap(),
        Begin::InFlight { .. }
    ));
    assert!(s.extend("k", token, lock).await.unwrap());
    assert!(s
        .complete("k", token, b"\x00binary\xff", lock)
        .await
        .unwrap());
    assert_eq!(
        s.begin("k", b"fp", lock).await.unwrap(),
        Begin::Done {
            fingerprint: b"fp".to_vec(),
            value: b"\x00binary\xff".to_vec()
        }
    );
    // Keys live under the prefix.
    assert!(server.command("EXISTS keel:idem:k").contains(":1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_or_open_as_configured_and_recovers() {
    let mut server = RedisServer::start();
    let s = store(&server);
    let closed = executor(s.clone(), FailMode::FailClosed);
    let open = executor(s.clone(), FailMode::FailOpen);
    let limiter = |fail| {
        RateLimiter::builder("api")
            .per_second(1.0 / 3600.0)
            .burst(1)
            .store_timeout(Duration::from_secs(1))
            .on_store_error(fail)
            .build_shared(s.clone())
            .unwrap()
    };
    let (limit_open, limit_closed) = (limiter(FailMode::FailOpen), limiter(FailMode::FailClosed));
    let run = || async { Ok::<_, String>("ran".to_owned()) };
    closed.call("before", b"fp", run).await.unwrap();
    limit_open.check_key(b"user-1").await.unwrap();

    server.kill();
    let started = Instant::now();
    let refused = closed.call("during", b"fp", run).await;
    assert!(
        matches!(refused, Err(Error::StoreUnavailable)),
        "{refused:?}"
    );
    let ran = open.call("during", b"fp", run).await.unwrap();
    assert_eq!((ran.value.as_str(), ran.replayed), ("ran", false));
    // The limit's one request is spent, but with Redis down the open limiter
    // admits and the closed one refuses.
    limit_open.check_key(b"user-1").await.unwrap();
    let refused = limit_closed.check_key(b"user-1").await;
    assert!(
        matches!(refused, Err(Refused::StoreUnavailable(_))),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "each failure is bounded by the store timeout: {:?}",
        started.elapsed()
    );

    // Redis returns (empty: nothing was persisted) and both work again.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match closed.call("after", b"fp", run).await {
            Ok(done) => {
                assert!(!done.replayed);
                break;
            }
            Err(Error::StoreUnavailable) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no recovery: {e:?}"),
        }
    }
    limit_closed.check_key(b"user-2").await.unwrap();
    let limited = limit_closed.check_key(b"user-2").await;
    assert!(
        matches!(limited, Err(Refused::RateLimited(_))),
        "{limited:?}"
    );
}

#[tokio::test]
async fn an_unreachable_redis_fails_each_call_quickly() {
    // A port nobody listens on.
    let server = RedisServer::start();
    let url = server.url();
    drop(server);
    let s = Arc::new(RedisStore::open(&url).unwrap());
    let started = Instant::now();
    let err = s
        .begin("k", b"fp", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_bad_url_names_the_field() {
    let err = RedisStore::open("http://nope").unwrap_err();
    assert_eq!(err.field(), "url");
}

fn shared(
    server_store: &Arc<RedisStore>,
    name: &str,
    per_second: f64,
    burst: u32,
) -> SharedRateLimiter {
    RateLimiter::builder(name)
        .per_second(per_second)
        .burst(burst)
        .on_store_error(FailMode::FailClosed)
        .build_shared(server_store.clone())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_limit_per_key() {
    let server = RedisServer::start();
    // One request an hour, burst 5: whatever the instances, 5 get through.
    let a = Arc::new(shared(&store(&server), "api", 1.0 / 3600.0, 5));
    let b = Arc::new(shared(&store(&server), "api", 1.0 / 3600.0, 5));
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let limiter = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { limiter.check_key(b"user-1").await })
        })
        .collect();
    let mut admitted = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(()) => admitted += 1,
            Err(Refused::RateLimited(r)) => {
                // The next slot is about an hour away.
                let wait = r.retry_after.as_secs();
                assert!((3590..=3600).contains(&wait), "{:?}", r.retry_after);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(admitted, 5);
    // Other keys and other limiter names are counted apart.
    a.check_key(b"user-2").await.unwrap();
    shared(&store(&server), "other", 1.0 / 3600.0, 1)
        .check_key(b"user-1")
        .await
        .unwrap();
    // More than the burst at once can never be admitted.
    let never = a.check_key_n(b"user-3", 6).await.unwrap_err();
    assert!(matches!(never, Refused::RateLimited(r) if r.retry_after == Duration::MAX));
}

#[tokio::test]
async fn the_rate_refills_in_redis_time() {
    let server = RedisServer::start();
    // 20 a second, burst 1: a refused request is admitted after its wait.
    let limiter = shared(&store(&server), "fast", 20.0, 1);
    limiter.check_key(b"k").await.unwrap();
    let Err(Refused::RateLimited(r)) = limiter.check_key(b"k").await else {
        panic!("the burst is one");
    };
    assert!(
        r.retry_after <= Duration::from_millis(50),
        "{:?}",
        r.retry_after
    );
    tokio::time::sleep(r.retry_after + Duration::from_millis(2)).await;
    limiter.check_key(b"k").await.unwrap();
    // The key expires in Redis once idle.
    let ttl = server.command("PTTL keel:rl:fast:k");
    let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
    assert!((0..=100).contains(&ttl), "{ttl}");
}

/// At one request an hour, time passing during a case is negligible, so
/// the limiter must match the model exactly: admit while the burst lasts,
/// then refuse with a wait of the overdraft times the interval.
#[test]
fn the_redis_gcra_matches_the_model() {
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let case = AtomicUsize::new(0);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    let strategy = (1u32..8, prop::collection::vec(1u32..4, 1..12));
    runner
        .run(&strategy, |(burst, asks)| {
            let name = format!("model-{}", case.fetch_add(1, Ordering::Relaxed));
            let limiter = shared(&store(&server), &name, 1.0 / 3600.0, burst);
            let mut used = 0u32;
            for n in asks {
                let got = runtime.block_on(limiter.check_key_n(b"k", n));
                if n > burst {
                    prop_assert!(
                        matches!(got, Err(Refused::RateLimited(r)) if r.retry_after == Duration::MAX)
                    );
                } else if used + n <= burst {
                    prop_assert!(got.is_ok(), "{:?} with {} used of {}", got, used, burst);
                    used += n;
                } else {
                    let Err(Refused::RateLimited(r)) = got else {
                        return Err(TestCaseError::fail(format!(
                            "admitted past the burst: {got:?}"
                        )));
                    };
                    let expected = f64::from(used + n - burst) * 3600.0;
                    let wait = r.retry_after.as_secs_f64();
                    prop_assert!((wait - expected).abs() < 5.0, "{} vs {}", wait, expected);
                }
            }
            Ok(())
        })
        .unwrap();
}
