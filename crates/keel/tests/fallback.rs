//! Behaviour of the fallback chain and the stale cache, on a manual clock.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel::clock::ManualClock;
use keel::fallback::{
    ErrorKind, Fallback, FallbackConfig, FallbackMetrics, Served, Source, StaleCache,
};
use keel::Error;
use proptest::prelude::*;

const SEC: Duration = Duration::from_secs(1);

fn timeout() -> Error<&'static str> {
    Error::Timeout {
        after: Duration::from_millis(100),
    }
}

fn cache(clock: &ManualClock, max_staleness: Duration) -> StaleCache<&'static str, u32> {
    StaleCache::builder()
        .max_staleness(max_staleness)
        .clock(clock.clone())
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_chain_is_tried_in_order_until_a_level_answers() {
    let clock = ManualClock::new();
    let alternate_up = Arc::new(AtomicU32::new(1));
    let up = alternate_up.clone();
    let prices = Fallback::builder()
        .stale(cache(&clock, 60 * SEC))
        .alternate(move |_sku: &&str| {
            let up = up.load(Ordering::SeqCst) == 1;
            async move {
                if up {
                    Ok(500)
                } else {
                    Err("alternate down")
                }
            }
        })
        .value(|| 0)
        .build();

    // The primary answers and fills the stale cache.
    let served = prices.call_keyed(&"sku-1", || async { Ok(1999) }).await;
    assert_eq!(
        served.unwrap(),
        Served {
            value: 1999,
            source: Source::Primary
        }
    );

    // It fails: the last good value, marked stale with its age.
    clock.advance(45 * SEC);
    let served = prices
        .call_keyed(&"sku-1", || async { Err(timeout()) })
        .await;
    assert_eq!(served.unwrap().source, Source::Stale { age: 45 * SEC });

    // Too old to serve: the alternate source answers.
    clock.advance(16 * SEC);
    let served = prices
        .call_keyed(&"sku-1", || async { Err(timeout()) })
        .await;
    assert_eq!(
        served.unwrap(),
        Served {
            value: 500,
            source: Source::Alternate
        }
    );

    // A key never seen, with the alternate down: the default value.
    alternate_up.store(0, Ordering::SeqCst);
    let served = prices
        .call_keyed(&"sku-2", || async { Err(timeout()) })
        .await;
    assert_eq!(
        served.unwrap(),
        Served {
            value: 0,
            source: Source::Default
        }
    );

    assert_eq!(
        prices.metrics(),
        FallbackMetrics {
            primary: 1,
            stale: 1,
            alternate: 1,
            default: 1,
            graceful: 0,
            failed: 0,
        }
    );
}

#[tokio::test]
async fn a_graceful_error_ends_the_chain() {
    let payments = Fallback::builder()
        .graceful(|err: &Error<String>| format!("payments are paused ({err}); try again shortly"))
        .value(|| "never reached")
        .build();
    let result = payments
        .call(|| async {
            Err(Error::CircuitOpen {
                retry_after: 30 * SEC,
            })
        })
        .await;
    let Err(Error::Inner(message)) = result else {
        panic!("{result:?}")
    };
    assert!(message.starts_with("payments are paused"), "{message}");
    assert_eq!(payments.metrics().graceful, 1);
}

#[tokio::test]
async fn errors_that_do_not_trigger_the_chain_are_returned_as_they_are() {
    // A bad request is the caller's fault: no answer from elsewhere.
    let fallback = Fallback::builder()
        .value(|| 0)
        .on(|err: &Error<&str>| !matches!(err, Error::Inner("bad request")))
        .build();
    let result = fallback
        .call(|| async { Err(Error::Inner("bad request")) })
        .await;
    assert!(matches!(result, Err(Error::Inner("bad request"))));
    let served = fallback.call(|| async { Err(Error::Inner("reset")) }).await;
    assert_eq!(served.unwrap().source, Source::Default);
    assert_eq!(fallback.metrics().failed, 1);
}

#[tokio::test]
async fn when_no_level_answers_the_primary_error_is_returned() {
    let clock = ManualClock::new();
    let fallback = Fallback::builder()
        .stale(cache(&clock, 60 * SEC))
        .alternate(|_: &&str| async { Err("also down") })
        .build();
    let result = fallback.call_keyed(&"k", || async { Err(timeout()) }).await;
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    assert_eq!(fallback.metrics().failed, 1);
}

#[tokio::test]
async fn configuration_names_the_triggering_error_kinds() {
    let config: FallbackConfig = toml::from_str(
        r#"
        on = ["timeout", "circuit_open"]
        stale = { max_staleness = "1m", capacity = 10 }
        "#,
    )
    .unwrap();
    assert_eq!(config.on, vec![ErrorKind::Timeout, ErrorKind::CircuitOpen]);
    let fallback = config
        .builder::<u32, &str, &str>()
        .unwrap()
        .value(|| 7)
        .build();
    let served = fallback.call_keyed(&"k", || async { Err(timeout()) }).await;
    assert_eq!(served.unwrap().value, 7);
    let result = fallback
        .call_keyed(&"k", || async { Err(Error::BulkheadFull) })
        .await;
    assert!(matches!(result, Err(Error::BulkheadFull)));

    let bad: FallbackConfig = toml::from_str(r#"stale = { max_staleness = "0s" }"#).unwrap();
    let err = bad.builder::<u32, &str, &str>().unwrap_err();
    assert_eq!(err.field(), "stale.max_staleness");
    let unknown = toml::from_str::<FallbackConfig>(r#"on = ["timeouts"]"#).unwrap_err();
    assert!(unknown.to_string().contains("timeouts"), "{unknown}");
}

#[test]
fn a_stale_cache_holds_at_most_its_capacity_dropping_the_least_recently_stored() {
    let clock = ManualClock::new();
    let cache: StaleCache<u32, u32> = StaleCache::builder()
        .capacity(100)
        .clock(clock.clone())
        .build()
        .unwrap();
    for key in 0..100_000 {
        cache.put(key, key);
        // One hot key is stored again and again; it stays.
        cache.put(7, key);
    }
    assert_eq!(cache.len(), 100);
    assert_eq!(cache.get(&7).unwrap().value, 99_999);
    assert!(cache.get(&99_999).is_some());
    assert!(
        cache.get(&99_900).is_none(),
        "among the least recently stored"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u32),
    Get(u8),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..12u8, any::<u32>()).prop_map(|(k, v)| Op::Put(k, v)),
        (0..12u8).prop_map(Op::Get),
        (0..40u64).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// The cache against a model: a list of (key, value, stored) in the
    /// order stored, trimmed from the front to the capacity.
    #[test]
    fn stale_cache_matches_a_reference_model(ops in prop::collection::vec(op(), 1..200)) {
        const CAPACITY: usize = 5;
        const MAX_STALENESS: u64 = 100;
        let clock = ManualClock::new();
        let cache: StaleCache<u8, u32> = StaleCache::builder()
            .capacity(CAPACITY)
            .max_staleness(Duration::from_secs(MAX_STALENESS))
            .clock(clock.clone())
            .build()
            .unwrap();
        let mut model: Vec<(u8, u32, u64)> = Vec::new();
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    cache.put(k, v);
                    model.retain(|e| e.0 != k);
                    model.push((k, v, now));
                    if model.len() > CAPACITY {
                        model.remove(0);
                    }
                }
                Op::Get(k) => {
                    let want = model.iter().find(|e| e.0 == k).and_then(|&(_, v, at)| {
                        (now - at <= MAX_STALENESS).then_some((v, Duration::from_secs(now - at)))
                    });
                    if want.is_none() {
                        model.retain(|e| e.0 != k); // forgotten when too old
                    }
                    let got = cache.get(&k).map(|s| (s.value, s.age));
                    prop_assert_eq!(got, want);
                }
                Op::Advance(s) => {
                    clock.advance(Duration::from_secs(s));
                    now += s;
                }
            }
            prop_assert_eq!(cache.len(), model.len());
        }
    }
}

#[cfg(feature = "tower")]
mod tower_layer {
    use super::*;
    use keel::fallback::FallbackLayer;
    use keel::ServiceError;
    use tower::{Service, ServiceExt};

    #[tokio::test]
    async fn the_layer_serves_the_last_good_response_per_key() {
        let clock = ManualClock::new();
        let up = Arc::new(AtomicU32::new(1));
        let service = {
            let up = up.clone();
            tower::service_fn(move |path: String| {
                let up = up.load(Ordering::SeqCst) == 1;
                async move {
                    if up {
                        Ok(format!("fresh {path}"))
                    } else {
                        Err(std::io::Error::other("connection refused"))
                    }
                }
            })
        };
        let fallback = Fallback::builder()
            .stale(
                StaleCache::builder()
                    .max_staleness(60 * SEC)
                    .clock(clock.clone())
                    .build()
                    .unwrap(),
            )
            .value(|| "default".to_string())
            .build();
        let layer = FallbackLayer::new(fallback, |path: &String| path.clone());
        let mut svc = tower::Layer::layer(&layer, service);

        let mut get = async |path: &str| -> Result<Served<String>, Error<ServiceError>> {
            svc.ready().await?.call(path.to_string()).await
        };
        assert!(get("/a").await.unwrap().is_primary());
        up.store(0, Ordering::SeqCst);
        clock.advance(5 * SEC);
        let a = get("/a").await.unwrap();
        assert_eq!(a.value, "fresh /a");
        assert_eq!(a.source, Source::Stale { age: 5 * SEC });
        let b = get("/b").await.unwrap();
        assert_eq!((b.value.as_str(), b.source), ("default", Source::Default));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bulkhead_under_the_layer_is_answered_by_the_chain() {
        let bulkhead = keel::bulkhead::Bulkhead::builder("one")
            .max_concurrent(1)
            .build()
            .unwrap();
        let held = bulkhead.try_acquire_owned().unwrap();
        let service = tower::ServiceBuilder::new()
            .layer(keel::bulkhead::BulkheadLayer::new(bulkhead))
            .service_fn(|path: String| async move { Ok::<_, std::io::Error>(path) });
        let fallback = Fallback::builder().value(|| "busy".to_string()).build();
        let layer = FallbackLayer::new(fallback, |path: &String| path.clone());
        let mut svc = tower::Layer::layer(&layer, service);

        let served = svc.ready().await.unwrap().call("/a".into()).await.unwrap();
        assert_eq!(
            (served.value.as_str(), served.source),
            ("busy", Source::Default)
        );
        drop(held);
        let served = svc.ready().await.unwrap().call("/a".into()).await.unwrap();
        assert_eq!(
            (served.value.as_str(), served.source),
            ("/a", Source::Primary)
        );
    }
}
