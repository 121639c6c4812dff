//! Behaviour of retry, on tokio's paused clock: delays are exact, and no test
//! waits in real time.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::classify::Verdict;
use keel::clock::ManualClock;
use keel::retry::{Backoff, Jitter, Retry, RetryBudget, Rng, SplitMix};
use keel::Error;
use proptest::prelude::*;
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// Runs `retry` (deciding with `classifier`) over an operation that fails
/// `failures` times, returning the result and the offsets (from the start) at
/// which each attempt began.
async fn attempts_classified<C>(
    retry: &Retry,
    classifier: &C,
    failures: u32,
) -> (Result<u32, Error<&'static str>>, Vec<Duration>)
where
    C: keel::classify::Classify<u32, &'static str>,
{
    let start = Instant::now();
    let times = Mutex::new(Vec::new());
    let result = retry
        .call_classified(classifier, || {
            let n = {
                let mut t = times.lock().unwrap();
                t.push(start.elapsed());
                t.len() as u32
            };
            async move {
                if n <= failures {
                    Err("unavailable")
                } else {
                    Ok(n)
                }
            }
        })
        .await;
    (result, times.into_inner().unwrap())
}

/// [`attempts_classified`] with the default classifier.
async fn attempts_at(
    retry: &Retry,
    failures: u32,
) -> (Result<u32, Error<&'static str>>, Vec<Duration>) {
    attempts_classified(retry, &keel::classify::DefaultClassifier, failures).await
}

fn gaps(times: &[Duration]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

fn no_jitter(backoff: Backoff, max_attempts: u32) -> Retry {
    Retry::builder()
        .max_attempts(max_attempts)
        .backoff(backoff)
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn exponential_delays_are_exact_and_capped() {
    let retry = no_jitter(Backoff::exponential(100 * MS).factor(2.0).max_delay(SEC), 6);
    let (result, times) = attempts_at(&retry, 5).await;
    assert_eq!(result, Ok(6));
    assert_eq!(gaps(&times), [100 * MS, 200 * MS, 400 * MS, 800 * MS, SEC]);
}

#[tokio::test(start_paused = true)]
async fn constant_and_linear_delays_are_exact() {
    let (_, times) = attempts_at(&no_jitter(Backoff::constant(50 * MS), 4), 3).await;
    assert_eq!(gaps(&times), [50 * MS, 50 * MS, 50 * MS]);

    let linear = Backoff::linear(100 * MS, 50 * MS).max_delay(180 * MS);
    let (_, times) = attempts_at(&no_jitter(linear, 4), 3).await;
    assert_eq!(gaps(&times), [100 * MS, 150 * MS, 180 * MS]);
}

#[tokio::test(start_paused = true)]
async fn max_attempts_counts_the_first_call_and_gives_up_with_the_last_error() {
    let retry = no_jitter(Backoff::constant(10 * MS), 3);
    let (result, times) = attempts_at(&retry, u32::MAX).await;
    assert_eq!(times.len(), 3);
    match result {
        Err(Error::RetriesExhausted { attempts, last }) => {
            assert_eq!(attempts, 3);
            assert!(matches!(*last, Error::Inner("unavailable")));
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    let err = attempts_at(&retry, u32::MAX).await.0.unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 3 attempts; last error: unavailable"
    );
}

#[tokio::test(start_paused = true)]
async fn a_single_attempt_returns_the_error_itself() {
    let retry = no_jitter(Backoff::constant(10 * MS), 1);
    let (result, times) = attempts_at(&retry, u32::MAX).await;
    assert_eq!(times.len(), 1);
    assert!(matches!(result, Err(Error::Inner("unavailable"))));
}

#[tokio::test(start_paused = true)]
async fn only_what_the_classifier_calls_retryable_is_retried() {
    let retry = no_jitter(Backoff::constant(10 * MS), 5);
    let calls = AtomicU32::new(0);
    // 4xx-like errors are failures but not worth retrying.
    let classifier = |r: &Result<u32, u16>| match r {
        Ok(_) => Verdict::success(),
        Err(code) if *code >= 500 => Verdict::failure(),
        Err(_) => Verdict::failure().with_retryable(false),
    };
    let result = retry
        .call_classified(&classifier, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<u32, u16>(404) }
        })
        .await;
    assert!(matches!(result, Err(Error::Inner(404))));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retryable_value_is_retried_and_the_last_one_returned() {
    let retry = no_jitter(Backoff::constant(10 * MS), 3);
    let calls = AtomicU32::new(0);
    // An HTTP-like 503 response is a value, not an error.
    let classifier = |r: &Result<u16, ()>| match r {
        Ok(503) => Verdict::failure(),
        _ => Verdict::success(),
    };
    let result = retry
        .call_classified(&classifier, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<u16, ()>(503) }
        })
        .await;
    assert_eq!(result, Ok(503));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// An operation whose failures carry a server hint (`Retry-After`).
async fn with_hint(
    retry: &Retry,
    hint: Duration,
    failures: u32,
) -> (Result<u32, Error<&'static str>>, Vec<Duration>) {
    let classifier = move |r: &Result<u32, &'static str>| match r {
        Ok(_) => Verdict::success(),
        Err(_) => Verdict::failure().retry_after(hint),
    };
    attempts_classified(retry, &classifier, failures).await
}

#[tokio::test(start_paused = true)]
async fn the_server_hint_replaces_the_computed_delay() {
    let retry = no_jitter(Backoff::constant(10 * MS), 3);
    let (result, times) = with_hint(&retry, 3 * SEC, 2).await;
    assert_eq!(result, Ok(3));
    assert_eq!(gaps(&times), [3 * SEC, 3 * SEC]);
}

#[tokio::test(start_paused = true)]
async fn the_server_hint_is_capped_by_max_retry_after() {
    let retry = Retry::builder()
        .max_attempts(2)
        .jitter(Jitter::None)
        .max_retry_after(5 * SEC)
        .build()
        .unwrap();
    let (_, times) = with_hint(&retry, 3600 * SEC, 1).await;
    assert_eq!(gaps(&times), [5 * SEC]);

    // The default cap is 60 s.
    let retry = Retry::builder().max_attempts(2).build().unwrap();
    let (_, times) = with_hint(&retry, 3600 * SEC, 1).await;
    assert_eq!(gaps(&times), [60 * SEC]);
}

#[tokio::test(start_paused = true)]
async fn a_hint_past_the_time_budget_gives_up_at_once() {
    let retry = Retry::builder()
        .max_attempts(5)
        .time_budget(5 * SEC)
        .build()
        .unwrap();
    let start = Instant::now();
    let (result, times) = with_hint(&retry, 10 * SEC, 1).await;
    assert_eq!(times.len(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO, "it must not sleep first");
    assert!(matches!(
        result,
        Err(Error::RetriesExhausted { attempts: 1, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn the_time_budget_stops_attempts_that_would_start_past_it() {
    let retry = Retry::builder()
        .max_attempts(10)
        .backoff(Backoff::constant(2 * SEC))
        .jitter(Jitter::None)
        .time_budget(5 * SEC)
        .build()
        .unwrap();
    let (result, times) = attempts_at(&retry, u32::MAX).await;
    // Attempts at 0, 2 s and 4 s; one at 6 s would be past the budget.
    assert_eq!(times, [Duration::ZERO, 2 * SEC, 4 * SEC]);
    assert!(matches!(
        result,
        Err(Error::RetriesExhausted { attempts: 3, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_retry_budget_stops_a_retry_storm() {
    let budget = RetryBudget::builder()
        .ratio(0.2)
        .min_per_second(1)
        .ttl(Duration::from_secs(10))
        .clock(ManualClock::new())
        .build()
        .unwrap();
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(MS))
        .jitter(Jitter::None)
        .budget(budget.clone())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    // 100 callers against a dependency that always fails. Without a budget
    // that is 300 attempts; with it, 100 + 20% of 100 + the reserve of 10.
    for _ in 0..100 {
        let calls = calls.clone();
        let _ = retry
            .call(|| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>("down") }
            })
            .await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 100 + 20 + 10);
    assert_eq!(budget.balance(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn seeded_jitter_is_deterministic() {
    let run = |seed| async move {
        let retry = Retry::builder()
            .max_attempts(5)
            .backoff(Backoff::exponential(100 * MS))
            .jitter(Jitter::Full)
            .rng(SplitMix::seeded(seed))
            .build()
            .unwrap();
        gaps(&attempts_at(&retry, 4).await.1)
    };
    let a = run(7).await;
    assert_eq!(a, run(7).await);
    assert_ne!(a, run(8).await);
}

#[test]
fn invalid_retry_configuration_names_the_field() {
    let field = |b: keel::retry::Builder| b.build().unwrap_err().field().to_string();
    assert_eq!(field(Retry::builder().max_attempts(0)), "max_attempts");
    assert_eq!(
        field(Retry::builder().backoff(Backoff::exponential(MS).factor(0.5))),
        "backoff.factor"
    );
    assert_eq!(
        field(Retry::builder().jitter(Jitter::Proportional(1.5))),
        "jitter"
    );
    assert_eq!(
        field(Retry::builder().time_budget(Duration::ZERO)),
        "time_budget"
    );
}

// ---- jitter bounds, by property ---------------------------------------------

#[derive(Debug)]
struct Fixed(u64);
impl Rng for Fixed {
    fn next_u64(&self) -> u64 {
        self.0
    }
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn backoff() -> impl Strategy<Value = Backoff> {
    let ms = 1u64..10_000;
    prop_oneof![
        ms.clone().prop_map(|b| Backoff::constant(millis(b))),
        (ms.clone(), ms.clone()).prop_map(|(i, s)| Backoff::linear(millis(i), millis(s))),
        (ms.clone(), 1.0f64..4.0).prop_map(|(b, f)| Backoff::exponential(millis(b)).factor(f)),
    ]
    .prop_flat_map(|b| {
        proptest::option::of(1u64..100_000).prop_map(move |cap| match cap {
            Some(c) => b.max_delay(millis(c)),
            None => b,
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn jitter_stays_within_its_bounds(
        backoff in backoff(),
        retry in 1u32..20,
        previous_ms in 0u64..100_000,
        bits in any::<u64>(),
        fraction in 0.0f64..=1.0,
    ) {
        let rng = Fixed(bits);
        let d = backoff.delay(retry);
        let cap = backoff.cap().unwrap_or(Duration::MAX);
        let previous = millis(previous_ms);

        prop_assert_eq!(Jitter::None.apply(&backoff, retry, previous, &rng), d);

        let full = Jitter::Full.apply(&backoff, retry, previous, &rng);
        prop_assert!(full <= d);

        let equal = Jitter::Equal.apply(&backoff, retry, previous, &rng);
        prop_assert!(equal >= d / 2 && equal <= d, "{:?} not in [{:?}, {:?}]", equal, d / 2, d);

        let base = backoff.base();
        let decorrelated = Jitter::Decorrelated.apply(&backoff, retry, previous, &rng);
        let hi = previous.max(base).saturating_mul(3).min(cap);
        prop_assert!(decorrelated <= hi, "{:?} above {:?}", decorrelated, hi);
        prop_assert!(decorrelated >= base.min(cap), "{:?} below {:?}", decorrelated, base);

        let p = Jitter::Proportional(fraction).apply(&backoff, retry, previous, &rng);
        let lo = d.mul_f64(1.0 - fraction);
        let hi = d.saturating_add(d.mul_f64(fraction)).min(cap);
        prop_assert!(p >= lo.min(cap) && p <= hi, "{:?} not in [{:?}, {:?}]", p, lo, hi);
    }

    #[test]
    fn delays_never_decrease_and_respect_the_cap(backoff in backoff(), retry in 1u32..60) {
        prop_assert!(backoff.delay(retry + 1) >= backoff.delay(retry));
        if let Some(cap) = backoff.cap() {
            prop_assert!(backoff.delay(retry) <= cap);
        }
    }
}

/// Full jitter spreads delays over the whole range (a check that the
/// bounds test is not passing on a constant).
#[test]
fn full_jitter_uses_the_whole_range() {
    let backoff = Backoff::constant(SEC);
    let rng = SplitMix::seeded(1);
    let delays: Vec<_> = (0..1000)
        .map(|_| Jitter::Full.apply(&backoff, 1, Duration::ZERO, &rng))
        .collect();
    let below_tenth = delays.iter().filter(|d| **d < SEC / 10).count();
    let above_nine_tenths = delays.iter().filter(|d| **d > SEC * 9 / 10).count();
    assert!(
        below_tenth > 50 && above_nine_tenths > 50,
        "{below_tenth} {above_nine_tenths}"
    );
}

#[test]
fn configuration_is_data_with_the_sidecars_names() {
    use keel::retry::{JitterKind, RetryConfig};
    let config: RetryConfig = toml::from_str(
        r#"
        max_attempts = 4
        backoff = { base = "10ms", max = "80ms", jitter = "none" }
        budget = { ratio = 0.5 }
        "#,
    )
    .unwrap();
    assert_eq!(config.backoff.jitter, JitterKind::None);
    assert_eq!(config.budget.unwrap().min_per_second, 10, "the default");
    let retry = config.build("payment").unwrap();
    assert_eq!((retry.name(), retry.max_attempts()), ("payment", 4));
    let defaults: RetryConfig = toml::from_str("").unwrap();
    assert_eq!(defaults.backoff.jitter, JitterKind::Full);

    let err = |text: &str| {
        toml::from_str::<RetryConfig>(text)
            .unwrap()
            .build("x")
            .unwrap_err()
            .to_string()
    };
    assert_eq!(err("max_attempts = 0"), "max_attempts: must be at least 1");
    assert!(err("backoff = { base = \"1s\", max = \"10ms\" }").starts_with("backoff.max:"));
    assert!(err("budget = { ratio = -1.0 }").starts_with("budget.ratio:"));
    let unknown = toml::from_str::<RetryConfig>("backoff = { bsae = \"1s\" }").unwrap_err();
    assert!(unknown.to_string().contains("bsae"), "{unknown}");
}
