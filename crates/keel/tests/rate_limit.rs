//! Behaviour of the GCRA rate limiters, on a manual clock or tokio's paused
//! clock.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel::clock::{ManualClock, TokioClock};
use keel::rate_limit::{Algorithm, RateLimitConfig, RateLimiter, StateStore};
use keel::Error;
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);

fn limiter(per_second: f64, burst: u32, clock: &ManualClock) -> RateLimiter {
    RateLimiter::builder("api")
        .per_second(per_second)
        .burst(burst)
        .clock(clock.clone())
        .build()
        .unwrap()
}

#[test]
fn a_burst_then_one_per_interval_with_exact_retry_after() {
    let clock = ManualClock::new();
    let l = limiter(10.0, 3, &clock);
    for _ in 0..3 {
        l.check().unwrap();
    }
    assert_eq!(l.check().unwrap_err().retry_after, 100 * MS);
    clock.advance(40 * MS);
    assert_eq!(l.check().unwrap_err().retry_after, 60 * MS);
    clock.advance(60 * MS);
    l.check().unwrap();
    assert!(l.check().is_err());
    // A quiet second refills the burst, no more.
    clock.advance(Duration::from_secs(1));
    for _ in 0..3 {
        l.check().unwrap();
    }
    assert!(l.check().is_err());
}

#[test]
fn check_n_takes_all_or_nothing() {
    let clock = ManualClock::new();
    let l = limiter(10.0, 5, &clock);
    l.check_n(3).unwrap();
    // Three more would need one interval more than the two left.
    assert_eq!(l.check_n(3).unwrap_err().retry_after, 100 * MS);
    l.check_n(2).unwrap();
    // More than the burst can never be admitted.
    assert_eq!(l.check_n(6).unwrap_err().retry_after, Duration::MAX);
}

#[test]
fn the_rate_changes_at_runtime() {
    let clock = ManualClock::new();
    let l = limiter(10.0, 1, &clock);
    l.check().unwrap();
    assert_eq!(l.check().unwrap_err().retry_after, 100 * MS);
    l.set_rate(1000.0, 1).unwrap();
    clock.advance(100 * MS);
    l.check().unwrap();
    assert_eq!(l.check().unwrap_err().retry_after, MS);
    assert_eq!(
        l.set_rate(0.0, 1).unwrap_err().field(),
        "requests_per_second"
    );
    assert_eq!(l.set_rate(5.0, 0).unwrap_err().field(), "burst");
}

#[tokio::test(start_paused = true)]
async fn until_ready_waits_exactly_as_long_as_needed() {
    let l = RateLimiter::builder("api")
        .per_second(4.0)
        .burst(1)
        .clock(TokioClock::new())
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    for _ in 0..4 {
        l.until_ready().await;
    }
    assert_eq!(start.elapsed(), 750 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_limited_call_is_an_error_with_retry_after() {
    let l = RateLimiter::builder("api")
        .per_second(2.0)
        .clock(TokioClock::new())
        .build()
        .unwrap();
    assert_eq!(l.call(|| async { Ok::<_, &str>(1) }).await, Ok(1));
    let err = l.call(|| async { Ok::<_, &str>(2) }).await.unwrap_err();
    assert_eq!(
        err,
        Error::RateLimited {
            retry_after: 500 * MS
        }
    );
    assert_eq!(err.retry_after(), Some(500 * MS));
    assert_eq!(
        err.to_string(),
        "rate limited: over the configured rate; retry after 500ms"
    );
}

#[test]
fn many_threads_share_one_limit() {
    let clock = ManualClock::new();
    let l = limiter(1.0, 50, &clock);
    let admitted = Arc::new(AtomicU32::new(0));
    std::thread::scope(|s| {
        for _ in 0..8 {
            let l = l.clone();
            let admitted = admitted.clone();
            s.spawn(move || {
                for _ in 0..1000 {
                    if l.check().is_ok() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    // The clock stood still: exactly the burst got through.
    assert_eq!(admitted.load(Ordering::Relaxed), 50);
}

#[test]
fn keys_are_limited_independently() {
    let clock = ManualClock::new();
    let l = RateLimiter::builder("per-user")
        .per_second(1.0)
        .burst(2)
        .clock(clock.clone())
        .build_keyed::<String>(100)
        .unwrap();
    let (alice, bob) = ("alice".to_string(), "bob".to_string());
    l.check_key(&alice).unwrap();
    l.check_key(&alice).unwrap();
    assert_eq!(
        l.check_key(&alice).unwrap_err().retry_after,
        Duration::from_secs(1)
    );
    l.check_key(&bob).unwrap();
    l.check_key(&bob).unwrap();
    assert!(l.check_key(&bob).is_err());
}

#[test]
fn a_million_distinct_keys_keep_memory_bounded() {
    let clock = ManualClock::new();
    let l = RateLimiter::builder("per-ip")
        .per_second(10.0)
        .burst(5)
        .clock(clock.clone())
        .build_keyed::<u64>(10_000)
        .unwrap();
    let hot = u64::MAX;
    let mut hot_admitted = 0;
    for key in 0..1_000_000u64 {
        l.check_key(&key).unwrap(); // a new key always has its burst
        if key % 1_000 == 0 {
            clock.advance(MS);
            if l.check_key(&hot).is_ok() {
                hot_admitted += 1;
            }
            assert!(l.store().len() <= 10_000, "{} keys held", l.store().len());
        }
    }
    assert!(l.store().len() <= 10_000);
    // The hot key, asked once a millisecond for a second at 10/s with a
    // burst of 5: the burst, then one every 100 ms. Churn of idle keys never
    // evicts it (it is never idle) so it is never let through early.
    assert_eq!(hot_admitted, 5 + 9);
}

#[test]
fn configuration_is_data_and_errors_name_the_field() {
    let config: RateLimitConfig = toml::from_str("requests_per_second = 100\nburst = 20").unwrap();
    let l = config.build("api").unwrap();
    for _ in 0..20 {
        l.check().unwrap();
    }
    let zero: RateLimitConfig = toml::from_str("requests_per_second = 0").unwrap();
    assert_eq!(
        zero.build("api").unwrap_err().field(),
        "requests_per_second"
    );
    let no_burst: RateLimitConfig = toml::from_str("requests_per_second = 1\nburst = 0").unwrap();
    assert_eq!(no_burst.build("api").unwrap_err().field(), "burst");
    assert!(toml::from_str::<RateLimitConfig>("rps = 1").is_err());
}

/// A store that counts its calls, to show the trait is the only seam.
#[derive(Default)]
struct CountingStore {
    inner: std::sync::Mutex<std::collections::HashMap<u32, u64>>,
    swaps: AtomicU32,
}

impl StateStore<u32> for CountingStore {
    fn load(&self, key: &u32) -> u64 {
        self.inner.lock().unwrap().get(key).copied().unwrap_or(0)
    }
    fn compare_and_swap(&self, key: &u32, current: u64, new: u64, _now: u64) -> Result<(), u64> {
        self.swaps.fetch_add(1, Ordering::Relaxed);
        let mut map = self.inner.lock().unwrap();
        let held = map.get(key).copied().unwrap_or(0);
        if held != current {
            return Err(held);
        }
        map.insert(*key, new);
        Ok(())
    }
}

#[test]
fn a_custom_store_holds_the_state() {
    let clock = ManualClock::new();
    let l = RateLimiter::builder("shared")
        .per_second(1.0)
        .burst(1)
        .clock(clock.clone())
        .build_keyed_with(CountingStore::default())
        .unwrap();
    l.check_key(&7).unwrap();
    assert!(l.check_key(&7).is_err());
    assert_eq!(l.store().swaps.load(Ordering::Relaxed), 1);
    assert_eq!(l.store().load(&7), 1_000_000_000);
}

// ---- property: never more than rate x elapsed + burst ------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Over every interval between two admissions, the admitted requests
    /// number at most burst + elapsed / interval; and a rejected request is
    /// admitted exactly when its retry_after has passed.
    #[test]
    fn never_more_than_rate_times_elapsed_plus_burst(
        per_second in prop_oneof![Just(1.0), Just(10.0), Just(33.0), Just(1000.0)],
        burst in 1u32..8,
        steps in proptest::collection::vec((0u64..200, 1u32..4), 1..150),
    ) {
        let clock = ManualClock::new();
        let l = limiter(per_second, burst, &clock);
        let interval = (1e9 / per_second).round() as u64;
        let mut admitted: Vec<u64> = Vec::new(); // nanos, one entry per request
        let mut now = 0u64;
        for (advance_ms, n) in steps {
            clock.advance(Duration::from_millis(advance_ms));
            now += advance_ms * 1_000_000;
            match l.check_n(n) {
                Ok(()) => admitted.extend(std::iter::repeat_n(now, n as usize)),
                Err(limited) if n <= burst => {
                    // retry_after is exact: one nanosecond sooner is still
                    // too soon (a rejection changes nothing), then it fits.
                    let wait = limited.retry_after.as_nanos() as u64;
                    prop_assert!(wait > 0);
                    clock.advance(Duration::from_nanos(wait - 1));
                    prop_assert!(l.check_n(n).is_err());
                    clock.advance(Duration::from_nanos(1));
                    now += wait;
                    prop_assert!(l.check_n(n).is_ok());
                    admitted.extend(std::iter::repeat_n(now, n as usize));
                }
                Err(limited) => prop_assert_eq!(limited.retry_after, Duration::MAX),
            }
        }
        for i in 0..admitted.len() {
            for j in i..admitted.len() {
                let count = (j - i + 1) as u64;
                let elapsed = admitted[j] - admitted[i];
                prop_assert!(
                    count <= u64::from(burst) + elapsed / interval,
                    "{} admitted within {} ns (interval {}, burst {})", count, elapsed, interval, burst
                );
            }
        }
    }
}

// ---- the window algorithms ------------------------------------------------

fn windowed(
    algorithm: Algorithm,
    limit: u32,
    window: Duration,
    clock: &ManualClock,
) -> RateLimiter {
    RateLimiter::builder("api")
        .algorithm(algorithm)
        .per_second(f64::from(limit) / window.as_secs_f64())
        .window(window)
        .clock(clock.clone())
        .build()
        .unwrap()
}

#[test]
fn the_sliding_log_counts_the_trailing_window_exactly() {
    let clock = ManualClock::new();
    let l = windowed(Algorithm::SlidingLog, 3, Duration::from_secs(1), &clock);
    l.check().unwrap(); // t = 0
    clock.advance(400 * MS);
    l.check_n(2).unwrap(); // t = 400ms
                           // Full until the admission at 0 leaves the window, at 1s.
    assert_eq!(l.check().unwrap_err().retry_after, 600 * MS);
    // Two need the ones at 400ms gone too.
    assert_eq!(l.check_n(2).unwrap_err().retry_after, 1000 * MS);
    clock.advance(600 * MS);
    l.check().unwrap();
    assert!(l.check().is_err());
    assert_eq!(l.check_n(4).unwrap_err().retry_after, Duration::MAX);
}

#[test]
fn the_fixed_window_resets_at_each_boundary() {
    let clock = ManualClock::new();
    let l = windowed(Algorithm::FixedWindow, 2, Duration::from_secs(1), &clock);
    clock.advance(900 * MS);
    l.check_n(2).unwrap();
    assert_eq!(l.check().unwrap_err().retry_after, 100 * MS);
    // The known weakness: twice the limit across a boundary.
    clock.advance(100 * MS);
    l.check_n(2).unwrap();
    assert_eq!(l.check().unwrap_err().retry_after, 1000 * MS);
}

#[test]
fn the_sliding_window_weighs_the_previous_window_by_its_overlap() {
    let clock = ManualClock::new();
    let l = windowed(Algorithm::SlidingWindow, 10, Duration::from_secs(1), &clock);
    l.check_n(10).unwrap(); // window 0 full
    clock.advance(1250 * MS); // 25% into window 1: estimate 10 x 0.75 = 7.5
    l.check_n(2).unwrap(); // 7.5 + 2 = 9.5
                           // A third needs 10 x (1 - into) + 2 + 1 <= 10: into >= 30%.
    assert_eq!(l.check().unwrap_err().retry_after, 50 * MS);
    clock.advance(50 * MS);
    l.check().unwrap();
    // Eight more do not fit before window 1 ends (3 + 8 > 10); in window 2
    // the 3 of window 1 weigh 3 x (1 - into): into >= 1 - 2/3.
    assert_eq!(
        l.check_n(8).unwrap_err().retry_after,
        700 * MS + Duration::from_nanos(333_333_334)
    );
}

#[test]
fn window_limits_follow_set_rate_and_configuration() {
    let clock = ManualClock::new();
    let l = windowed(Algorithm::FixedWindow, 1, Duration::from_secs(1), &clock);
    l.check().unwrap();
    assert!(l.check().is_err());
    l.set_rate(3.0, 1).unwrap(); // 3 a window now; the one counted stays
    l.check_n(2).unwrap();
    assert!(l.check().is_err());

    let config: RateLimitConfig = toml::from_str(
        "requests_per_second = 1\nalgorithm = \"sliding-window\"\nwindow = \"250ms\"",
    )
    .unwrap();
    assert_eq!(config.algorithm, Algorithm::SlidingWindow);
    let err = config.build("api").unwrap_err();
    assert_eq!(err.field(), "window");
    assert!(err.reason().contains("admits no request"), "{err}");
    assert!(
        toml::from_str::<RateLimitConfig>("requests_per_second = 1\nalgorithm = \"leaky\"")
            .is_err()
    );
    let keyed = RateLimiter::builder("api")
        .algorithm(Algorithm::SlidingLog)
        .build_keyed::<u32>(10)
        .unwrap_err();
    assert_eq!(keyed.field(), "algorithm");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Each window algorithm keeps its documented bound over every span
    /// between two admissions (`limit x t / window + limit` for the log,
    /// `+ 2 x limit` for the others), its own exact guarantee (the log's
    /// trailing window, the counters' aligned windows), and its retry_after
    /// is exact to the nanosecond.
    #[test]
    fn window_algorithms_keep_their_bounds(
        algorithm in prop_oneof![
            Just(Algorithm::SlidingLog),
            Just(Algorithm::SlidingWindow),
            Just(Algorithm::FixedWindow),
        ],
        limit in 1u32..8,
        window_ms in prop_oneof![Just(250u64), Just(1000)],
        steps in proptest::collection::vec((0u64..200, 1u32..4), 1..150),
    ) {
        let clock = ManualClock::new();
        let w = window_ms * 1_000_000;
        let l = windowed(algorithm, limit, Duration::from_millis(window_ms), &clock);
        let limit = u64::from(limit);
        let mut admitted: Vec<u64> = Vec::new();
        let mut now = 0u64;
        for (advance_ms, n) in steps {
            clock.advance(Duration::from_millis(advance_ms));
            now += advance_ms * 1_000_000;
            match l.check_n(n) {
                Ok(()) => admitted.extend(std::iter::repeat_n(now, n as usize)),
                Err(limited) if u64::from(n) <= limit => {
                    let wait = limited.retry_after.as_nanos() as u64;
                    prop_assert!(wait > 0);
                    clock.advance(Duration::from_nanos(wait - 1));
                    prop_assert!(l.check_n(n).is_err(), "admitted 1 ns before retry_after");
                    clock.advance(Duration::from_nanos(1));
                    now += wait;
                    prop_assert!(l.check_n(n).is_ok(), "rejected at retry_after");
                    admitted.extend(std::iter::repeat_n(now, n as usize));
                }
                Err(limited) => prop_assert_eq!(limited.retry_after, Duration::MAX),
            }
        }
        let slack = if algorithm == Algorithm::SlidingLog { limit } else { 2 * limit };
        for i in 0..admitted.len() {
            for j in i..admitted.len() {
                let count = (j - i + 1) as u64;
                let span = admitted[j] - admitted[i];
                prop_assert!(
                    u128::from(count) * u128::from(w)
                        <= u128::from(limit) * u128::from(span) + u128::from(slack * w),
                    "{:?}: {} admitted within {} ns", algorithm, count, span
                );
                if algorithm == Algorithm::SlidingLog && span < w {
                    prop_assert!(count <= limit, "{} in a trailing window", count);
                }
                if algorithm != Algorithm::SlidingLog && admitted[i] / w == admitted[j] / w {
                    prop_assert!(count <= limit, "{} in one aligned window", count);
                }
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_pipeline_step_and_tower_layer_share_the_limit() {
    use keel::rate_limit::RateLimitLayer;
    use keel::Pipeline;
    use tower::{Service, ServiceExt};

    let l = RateLimiter::builder("api")
        .per_second(1.0)
        .burst(2)
        .clock(TokioClock::new())
        .build()
        .unwrap();
    let pipeline = Pipeline::builder().rate_limit(l.clone()).build();
    let mut svc = tower::ServiceBuilder::new()
        .layer(RateLimitLayer::new(l.clone()))
        .service_fn(|()| async { Ok::<_, std::io::Error>("ok") });

    assert_eq!(pipeline.call(|| async { Ok::<_, ()>(1) }).await, Ok(1));
    assert_eq!(svc.ready().await.unwrap().call(()).await.unwrap(), "ok");
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(
        matches!(err, Error::RateLimited { retry_after } if retry_after == Duration::from_secs(1))
    );
    assert_eq!(
        pipeline.call(|| async { Ok::<_, ()>(2) }).await,
        Err(Error::RateLimited {
            retry_after: Duration::from_secs(1)
        })
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(pipeline.call(|| async { Ok::<_, ()>(3) }).await, Ok(3));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// `available()` is exactly how many single requests would be admitted
    /// now, for every algorithm, after any history.
    #[test]
    fn available_counts_what_would_be_admitted(
        algorithm in prop_oneof![
            Just(Algorithm::Gcra),
            Just(Algorithm::SlidingLog),
            Just(Algorithm::SlidingWindow),
            Just(Algorithm::FixedWindow),
        ],
        limit in 1u32..6,
        steps in proptest::collection::vec((0u64..400, 0u32..5), 1..40),
    ) {
        let clock = ManualClock::new();
        let l = RateLimiter::builder("api")
            .algorithm(algorithm)
            .per_second(f64::from(limit) * 4.0)
            .window(Duration::from_millis(250))
            .burst(limit)
            .clock(clock.clone())
            .build()
            .unwrap();
        for (advance_ms, asks) in steps {
            clock.advance(Duration::from_millis(advance_ms));
            for _ in 0..asks {
                let _ = l.check();
            }
            let available = l.available();
            let mut admitted = 0;
            while l.check().is_ok() {
                admitted += 1;
                prop_assert!(admitted <= 64, "unbounded admissions");
            }
            prop_assert_eq!(available, admitted, "{:?}", algorithm);
            prop_assert_eq!(l.available(), 0);
        }
    }
}
