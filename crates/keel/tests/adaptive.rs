//! Adaptive concurrency: the algorithms' arithmetic pinned, admission against
//! a reference model, and the adapters.

use std::time::Duration;

use keel::adaptive::{AdaptiveConfig, AdaptiveLimiter, Aimd, Gradient2, LimitAlgorithm, Sample};
use keel::clock::ManualClock;
use keel::{Error, Pipeline};
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);

fn sample(rtt: Duration, in_flight: u32, dropped: bool) -> Sample {
    Sample {
        rtt,
        in_flight,
        dropped,
    }
}

#[test]
fn aimd_adds_one_on_success_and_multiplies_on_a_drop() {
    let mut aimd = Aimd::default(); // initial 20, min 20, max 200, 0.9, 5s
    assert_eq!(LimitAlgorithm::initial_limit(&aimd), 20);
    assert_eq!(aimd.update(&sample(10 * MS, 20, false)), 21);
    let mut aimd = Aimd::default().initial_limit(30);
    assert_eq!(aimd.update(&sample(10 * MS, 30, true)), 27);
    // Slower than the timeout counts as a drop: 27 x 0.9 = 24.3.
    assert_eq!(aimd.update(&sample(Duration::from_secs(6), 27, false)), 24);
    // App-limited (fewer than half the limit in use): no growth.
    assert_eq!(aimd.update(&sample(10 * MS, 11, false)), 24);
    assert_eq!(aimd.update(&sample(10 * MS, 12, false)), 25);
    // Clamped to [min, max].
    let mut aimd = Aimd::default().initial_limit(21);
    assert_eq!(aimd.update(&sample(MS, 1, true)), 20);
    let mut aimd = Aimd::default().initial_limit(200);
    assert_eq!(aimd.update(&sample(MS, 200, false)), 200);
}

#[test]
fn gradient2_grows_by_the_queue_size_smoothed_and_shrinks_with_latency() {
    let mut g = Gradient2::default().min_limit(1);
    // Steady latency: gradient 1, each sample adds smoothing x queue_size
    // (0.2 x 4) to the estimate 20: 20.8, 21.6, 22.4.
    assert_eq!(g.update(&sample(10 * MS, 20, false)), 20);
    assert_eq!(g.update(&sample(10 * MS, 20, false)), 21);
    assert_eq!(g.update(&sample(10 * MS, 20, false)), 22);
    // A slow call: long = mean(10, 10, 10, 40) = 17.5ms, short = 40ms,
    // gradient = max(0.4375, 0.5) = 0.5: new = 22.4 x 0.5 + 4 = 15.2,
    // smoothed = 22.4 x 0.8 + 15.2 x 0.2 = 20.96.
    assert_eq!(g.update(&sample(40 * MS, 20, false)), 20);
    // App-limited: 5 < 20.96 / 2, the limit holds.
    assert_eq!(g.update(&sample(40 * MS, 5, false)), 20);
    // Drops do not enter the arithmetic; latency does.
    let mut a = Gradient2::default().min_limit(1);
    let mut b = Gradient2::default().min_limit(1);
    for _ in 0..5 {
        assert_eq!(
            a.update(&sample(10 * MS, 20, true)),
            b.update(&sample(10 * MS, 20, false))
        );
    }
}

#[test]
fn gradient2_recovers_when_latency_returns_to_normal() {
    let mut g = Gradient2::default().min_limit(1).long_window(10);
    for _ in 0..50 {
        g.update(&sample(100 * MS, 40, false));
    }
    let loaded = g.update(&sample(100 * MS, 40, false));
    // Latency back to 10ms: long/short > 2 cuts the long average, and the
    // limit climbs again by up to queue_size x smoothing per sample.
    let mut limit = loaded;
    for _ in 0..20 {
        limit = g.update(&sample(10 * MS, 200, false));
    }
    assert!(limit > loaded, "{limit} after recovery, {loaded} before");
}

#[test]
fn admission_follows_the_moving_limit() {
    let clock = ManualClock::new();
    let limiter = AdaptiveLimiter::builder("payment")
        .algorithm(Aimd::default().initial_limit(4).min_limit(1).max_limit(10))
        .clock(clock.clone())
        .build()
        .unwrap();
    let permits: Vec<_> = (0..4).map(|_| limiter.try_acquire().unwrap()).collect();
    assert!(limiter.try_acquire().is_err());
    assert_eq!(limiter.rejected(), 1);
    let mut permits = permits.into_iter();
    permits.next().unwrap().dropped(); // 4 x 0.9 = 3
    assert_eq!(limiter.limit(), 3);
    assert_eq!(limiter.in_flight(), 3);
    assert!(limiter.try_acquire().is_err(), "3 in flight, limit 3");
    clock.advance(5 * MS);
    permits.next().unwrap().success(); // 4 were in flight at admission: grows
    assert_eq!(limiter.limit(), 4);
    permits.next().unwrap().ignore(); // no sample
    drop(permits); // no sample
    assert_eq!(limiter.limit(), 4);
    assert_eq!(limiter.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_pipeline_step_samples_what_the_classifier_says() {
    let limiter = AdaptiveLimiter::builder("inventory")
        .algorithm(Aimd::default().initial_limit(10).min_limit(1))
        .build()
        .unwrap();
    let pipeline = Pipeline::builder()
        .classifier(|r: &Result<u16, std::io::Error>| match r {
            Ok(404) => keel::classify::Outcome::Ignore,
            Ok(s) if *s >= 500 => keel::classify::Outcome::Failure,
            Ok(_) => keel::classify::Outcome::Success,
            Err(_) => keel::classify::Outcome::Failure,
        })
        .adaptive_limit(limiter.clone())
        .build();
    let _ = pipeline.call(|| async { Ok(404) }).await;
    assert_eq!(limiter.limit(), 10);
    let _ = pipeline.call(|| async { Ok(503) }).await;
    assert_eq!(limiter.limit(), 9);
    assert_eq!(limiter.in_flight(), 0);

    // Full: rejected without running.
    let full = AdaptiveLimiter::builder("x")
        .algorithm(Aimd::default().initial_limit(1).min_limit(1))
        .build()
        .unwrap();
    let _held = full.try_acquire().unwrap();
    let r: Result<(), Error<std::io::Error>> = full.call(|| async { unreachable!() }).await;
    assert!(matches!(r, Err(Error::BulkheadFull)));
}

#[tokio::test]
async fn the_tower_layer_samples_responses_and_errors() {
    use tower::{service_fn, Layer, ServiceExt};
    let limiter = AdaptiveLimiter::builder("api")
        .algorithm(Aimd::default().initial_limit(10).min_limit(1))
        .build()
        .unwrap();
    let svc = keel::adaptive::AdaptiveLimitLayer::new(limiter.clone()).layer(service_fn(
        |fail: bool| async move {
            if fail {
                Err(std::io::Error::other("overloaded"))
            } else {
                Ok(())
            }
        },
    ));
    svc.clone().oneshot(true).await.unwrap_err();
    assert_eq!(limiter.limit(), 9);
    svc.clone().oneshot(false).await.unwrap();
    assert_eq!(limiter.in_flight(), 0);
}

#[test]
fn many_threads_never_exceed_the_limit() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let limiter = AdaptiveLimiter::builder("api")
        .algorithm(Aimd::default().initial_limit(4).min_limit(4).max_limit(4))
        .build()
        .unwrap();
    let most = AtomicU32::new(0);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (limiter, most) = (&limiter, &most);
            s.spawn(move || {
                for i in 0..20_000u32 {
                    if let Ok(p) = limiter.try_acquire() {
                        most.fetch_max(limiter.in_flight(), Ordering::Relaxed);
                        if (i + t) % 2 == 0 {
                            p.success()
                        } else {
                            p.dropped()
                        }
                    }
                }
            });
        }
    });
    assert!(most.into_inner() <= 4);
    assert_eq!(limiter.in_flight(), 0);
}

#[test]
fn configuration_names_the_field() {
    let config: AdaptiveConfig = toml::from_str(
        "algorithm = \"gradient2\"\nmin_limit = 5\ninitial_limit = 8\nsmoothing = 0.5",
    )
    .unwrap();
    assert_eq!(config.build("api").unwrap().limit(), 8);
    let bad: AdaptiveConfig = toml::from_str("algorithm = \"aimd\"\nbackoff_ratio = 1.5").unwrap();
    assert_eq!(
        bad.build("api").unwrap_err().to_string(),
        "backoff_ratio: must be in (0, 1), got 1.5"
    );
    let bad: AdaptiveConfig = toml::from_str("algorithm = \"aimd\"\ninitial_limit = 5").unwrap();
    assert_eq!(
        bad.build("api").unwrap_err().to_string(),
        "initial_limit: must be between min_limit (20) and max_limit (200), got 5"
    );
    assert!(toml::from_str::<AdaptiveConfig>("algorithm = \"vegas\"").is_err());
    assert!(toml::from_str::<AdaptiveConfig>("algorithm = \"aimd\"\nbackof_ratio = 0.5").is_err());
}

// ---- model: admission and AIMD arithmetic against a reference -----------------

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    Success(usize, u64),
    Dropped(usize),
    Ignore(usize),
    Cancel(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Acquire),
        2 => (any::<usize>(), 0u64..8_000).prop_map(|(i, ms)| Op::Success(i, ms)),
        1 => any::<usize>().prop_map(Op::Dropped),
        1 => any::<usize>().prop_map(Op::Ignore),
        1 => any::<usize>().prop_map(Op::Cancel),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// No sequence of acquire / success / drop / ignore / cancel leaks a seat
    /// or admits past the limit, and the limit follows a reference AIMD
    /// written from the definition.
    #[test]
    fn admission_and_limit_follow_the_reference(
        initial in 1u32..12,
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let clock = ManualClock::new();
        let limiter = AdaptiveLimiter::builder("model")
            .algorithm(Aimd::default().initial_limit(initial).min_limit(1).max_limit(12).backoff_ratio(0.5))
            .clock(clock.clone())
            .build()
            .unwrap();
        let mut model_limit = initial;
        // permit, in flight at admission, admitted at (ms)
        let mut held: Vec<(keel::adaptive::Permit, u32, u64)> = Vec::new();
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Acquire => {
                    let admit = (held.len() as u32) < model_limit;
                    match limiter.try_acquire() {
                        Ok(p) => {
                            prop_assert!(admit, "admitted {} in flight at limit {}", held.len(), model_limit);
                            held.push((p, held.len() as u32 + 1, now));
                        }
                        Err(_) => prop_assert!(!admit, "rejected below the limit"),
                    }
                }
                Op::Success(i, ms) if !held.is_empty() => {
                    let (p, in_flight, start) = held.remove(i % held.len());
                    clock.advance(Duration::from_millis(ms));
                    now += ms;
                    p.success();
                    model_limit = if now - start > 5_000 {
                        (model_limit / 2).max(1)
                    } else if in_flight * 2 >= model_limit {
                        (model_limit + 1).min(12)
                    } else {
                        model_limit
                    };
                }
                Op::Dropped(i) if !held.is_empty() => {
                    held.remove(i % held.len()).0.dropped();
                    model_limit = (model_limit / 2).max(1);
                }
                Op::Ignore(i) if !held.is_empty() => held.remove(i % held.len()).0.ignore(),
                Op::Cancel(i) if !held.is_empty() => drop(held.remove(i % held.len())),
                _ => {}
            }
            prop_assert_eq!(limiter.in_flight(), held.len() as u32);
            prop_assert_eq!(limiter.limit(), model_limit);
        }
        held.clear();
        prop_assert_eq!(limiter.in_flight(), 0);
    }
}
