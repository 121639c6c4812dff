//! Behaviour of hedging, on tokio's paused clock: when the next attempt
//! starts, which result wins, what is cancelled, and what limits hedges.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::hedge::{Hedge, HedgeConfig, HedgeLayer, Idempotent};
use keel::retry::RetryBudget;
use keel::{Error, Pipeline};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);

/// A scripted dependency: attempt `n` takes `script[n].0` and returns
/// `script[n].1`. It records when each attempt started and which attempts
/// were dropped before they finished.
#[derive(Clone)]
struct Scripted {
    script: Arc<Vec<(u64, Result<u32, &'static str>)>>,
    started: Arc<Mutex<Vec<Duration>>>,
    cancelled: Arc<Mutex<Vec<usize>>>,
    epoch: Instant,
}

struct CancelGuard {
    attempt: usize,
    done: bool,
    cancelled: Arc<Mutex<Vec<usize>>>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            self.cancelled.lock().unwrap().push(self.attempt);
        }
    }
}

impl Scripted {
    fn new(script: Vec<(u64, Result<u32, &'static str>)>) -> Self {
        Scripted {
            script: Arc::new(script),
            started: Arc::default(),
            cancelled: Arc::default(),
            epoch: Instant::now(),
        }
    }

    fn attempt(&self) -> impl std::future::Future<Output = Result<u32, &'static str>> {
        let mut started = self.started.lock().unwrap();
        let n = started.len();
        started.push(self.epoch.elapsed());
        let (took, result) = self.script[n];
        let guard = CancelGuard {
            attempt: n,
            done: false,
            cancelled: self.cancelled.clone(),
        };
        async move {
            let mut guard = guard;
            tokio::time::sleep(Duration::from_millis(took)).await;
            guard.done = true;
            result
        }
    }

    fn started(&self) -> Vec<Duration> {
        self.started.lock().unwrap().clone()
    }

    fn cancelled(&self) -> Vec<usize> {
        self.cancelled.lock().unwrap().clone()
    }
}

fn hedge(delay_ms: u64, max: u32) -> Hedge {
    Hedge::builder()
        .delay(Duration::from_millis(delay_ms))
        .max_hedged_attempts(max)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_slow_attempt_is_hedged_after_the_delay_and_the_first_answer_wins() {
    let dep = Scripted::new(vec![(1000, Ok(1)), (30, Ok(2))]);
    let hedge = hedge(50, 1);
    let start = Instant::now();
    let result = hedge.call(Idempotent(|| dep.attempt())).await;
    assert_eq!(result.unwrap(), 2);
    assert_eq!(start.elapsed(), 80 * MS, "hedge started at 50ms, took 30ms");
    assert_eq!(dep.started(), vec![Duration::ZERO, 50 * MS]);
    assert_eq!(dep.cancelled(), vec![0], "the slow primary is cancelled");
    assert_eq!(hedge.hedges_started(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_fast_attempt_is_not_hedged() {
    let dep = Scripted::new(vec![(49, Ok(1))]);
    let hedge = hedge(50, 1);
    assert_eq!(hedge.call(Idempotent(|| dep.attempt())).await.unwrap(), 1);
    assert_eq!(dep.started().len(), 1);
    assert_eq!(hedge.hedges_started(), 0);
    // And no timer is left behind to fire a hedge later.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(dep.started().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_primary_still_wins_when_it_answers_before_the_hedge() {
    let dep = Scripted::new(vec![(70, Ok(1)), (100, Ok(2))]);
    let hedge = hedge(50, 1);
    assert_eq!(hedge.call(Idempotent(|| dep.attempt())).await.unwrap(), 1);
    assert_eq!(dep.started().len(), 2);
    assert_eq!(dep.cancelled(), vec![1], "the losing hedge is cancelled");
}

#[tokio::test(start_paused = true)]
async fn hedges_stop_at_max_hedged_attempts_and_are_spaced_by_the_delay() {
    let dep = Scripted::new(vec![
        (1000, Ok(1)),
        (1000, Ok(2)),
        (1000, Ok(3)),
        (1000, Ok(4)),
    ]);
    let hedge = hedge(50, 2);
    let start = Instant::now();
    assert_eq!(hedge.call(Idempotent(|| dep.attempt())).await.unwrap(), 1);
    assert_eq!(start.elapsed(), 1000 * MS);
    assert_eq!(dep.started(), vec![Duration::ZERO, 50 * MS, 100 * MS]);
    assert_eq!(dep.cancelled(), vec![1, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_retryable_failure_starts_the_next_hedge_at_once() {
    let dep = Scripted::new(vec![(10, Err("reset")), (20, Ok(2))]);
    let hedge = hedge(50, 1);
    let start = Instant::now();
    assert_eq!(hedge.call(Idempotent(|| dep.attempt())).await.unwrap(), 2);
    assert_eq!(dep.started(), vec![Duration::ZERO, 10 * MS]);
    assert_eq!(start.elapsed(), 30 * MS);
}

#[tokio::test(start_paused = true)]
async fn when_every_attempt_fails_the_last_failure_is_returned() {
    let dep = Scripted::new(vec![(10, Err("first")), (20, Err("second"))]);
    let result = hedge(50, 1).call(Idempotent(|| dep.attempt())).await;
    assert!(matches!(result, Err(Error::Inner("second"))), "{result:?}");
    assert_eq!(dep.started().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_final_failure_wins_like_a_success() {
    // The classifier calls "invalid" final (not retryable): there is no
    // point asking again, so it is the answer and the hedge is cancelled.
    let dep = Scripted::new(vec![(1000, Ok(1)), (10, Err("invalid"))]);
    let pipeline = Pipeline::builder()
        .hedge(hedge(50, 1))
        .classifier(|r: &Result<u32, &str>| match r {
            Err("invalid") => keel::classify::Verdict::failure().with_retryable(false),
            Err(_) => keel::classify::Verdict::failure(),
            Ok(_) => keel::classify::Verdict::success(),
        })
        .build();
    let result = pipeline.call_idempotent(|| dep.attempt()).await;
    assert!(matches!(result, Err(Error::Inner("invalid"))), "{result:?}");
    assert_eq!(dep.cancelled(), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn only_idempotent_calls_are_hedged_in_a_pipeline() {
    let pipeline = Pipeline::builder().hedge(hedge(50, 1)).build();

    let dep = Scripted::new(vec![(1000, Ok(1)), (10, Ok(2))]);
    assert_eq!(pipeline.call(|| dep.attempt()).await.unwrap(), 1);
    assert_eq!(dep.started().len(), 1, "a plain call runs once");

    let dep = Scripted::new(vec![(1000, Ok(1)), (10, Ok(2))]);
    assert_eq!(pipeline.call_idempotent(|| dep.attempt()).await.unwrap(), 2);
    assert_eq!(dep.started().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn hedges_draw_on_the_retry_budget() {
    // No reserve, 50% of calls: two calls deposit enough for one hedge.
    let budget = RetryBudget::builder()
        .ratio(0.5)
        .min_per_second(0)
        .clock(keel::clock::TokioClock::new())
        .build()
        .unwrap();
    let hedge = Hedge::builder()
        .delay(50 * MS)
        .budget(budget.clone())
        .build()
        .unwrap();
    let hedged = |dep: &Scripted| dep.started().len() == 2;

    let first = Scripted::new(vec![(1000, Ok(1)), (10, Ok(2))]);
    assert_eq!(hedge.call(Idempotent(|| first.attempt())).await.unwrap(), 1);
    assert!(!hedged(&first), "one deposit buys half a hedge");

    let second = Scripted::new(vec![(1000, Ok(1)), (10, Ok(2))]);
    assert_eq!(
        hedge.call(Idempotent(|| second.attempt())).await.unwrap(),
        2
    );
    assert!(hedged(&second), "two deposits buy one");

    let third = Scripted::new(vec![(1000, Ok(1)), (10, Ok(2))]);
    assert_eq!(hedge.call(Idempotent(|| third.attempt())).await.unwrap(), 1);
    assert!(!hedged(&third), "the budget is spent");
    assert_eq!(hedge.hedges_started(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_delay_follows_a_quantile_of_recent_latencies_once_measured() {
    let hedge = Hedge::builder()
        .quantile_delay(0.9, 500 * MS, 100, 10)
        .build()
        .unwrap();
    assert_eq!(hedge.delay(), 500 * MS, "the initial delay until measured");
    // Ten calls of 10, 20, .. 100ms: p90 (nearest rank) is 90ms.
    for i in 1..=10 {
        let dep = Scripted::new(vec![(i * 10, Ok(1))]);
        hedge.call(Idempotent(|| dep.attempt())).await.unwrap();
    }
    assert_eq!(hedge.delay(), 90 * MS);
    assert_eq!(hedge.hedges_started(), 0);

    let dep = Scripted::new(vec![(1000, Ok(1)), (5, Ok(2))]);
    assert_eq!(hedge.call(Idempotent(|| dep.attempt())).await.unwrap(), 2);
    assert_eq!(dep.started(), vec![Duration::ZERO, 90 * MS]);
}

#[test]
fn config_errors_name_the_field() {
    let err = |toml: &str| {
        toml::from_str::<HedgeConfig>(toml)
            .unwrap()
            .build()
            .unwrap_err()
            .to_string()
    };
    assert!(err("max_hedged_attempts = 0").contains("max_hedged_attempts"));
    assert!(err("quantile = 1.5").contains("quantile"));
    assert!(err("quantile = 0.9\nwindow = 10\nmin_samples = 20").contains("min_samples"));
    let unknown = toml::from_str::<HedgeConfig>("delays = \"1s\"").unwrap_err();
    assert!(unknown.to_string().contains("delays"), "{unknown}");
}

#[tokio::test(start_paused = true)]
async fn the_tower_layer_hedges_requests_its_predicate_marks_idempotent() {
    let calls = Arc::new(AtomicU32::new(0));
    let service = {
        let calls = calls.clone();
        tower::service_fn(move |req: &'static str| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                // The first attempt of each request is slow.
                let took = if n % 2 == 0 { 1000 } else { 10 };
                tokio::time::sleep(Duration::from_millis(took)).await;
                Ok::<_, std::io::Error>(format!("{req}#{n}"))
            }
        })
    };
    let layer = HedgeLayer::new(hedge(50, 1), |req: &&str| req.starts_with("GET"));
    let mut svc = tower::Layer::layer(&layer, service);

    let start = Instant::now();
    let got = svc.ready().await.unwrap().call("GET /price").await.unwrap();
    assert_eq!(got, "GET /price#1", "the hedge answered");
    assert_eq!(start.elapsed(), 60 * MS);

    calls.store(0, Ordering::SeqCst);
    let start = Instant::now();
    let got = svc.ready().await.unwrap().call("POST /pay").await.unwrap();
    assert_eq!(got, "POST /pay#0", "a POST is never hedged");
    assert_eq!(start.elapsed(), 1000 * MS);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_refused_by_an_inner_bulkhead_does_not_cancel_the_running_attempt() {
    // One seat: the primary holds it, the hedge is refused at once. The
    // refusal is no answer; the primary's result is the call's.
    let pipeline = Pipeline::builder()
        .hedge(hedge(50, 1))
        .bulkhead(
            keel::bulkhead::Bulkhead::builder("one")
                .max_concurrent(1)
                .build()
                .unwrap(),
        )
        .build();
    let dep = Scripted::new(vec![(200, Ok(1)), (10, Ok(2))]);
    let start = Instant::now();
    let got = pipeline.call_idempotent(|| dep.attempt()).await;
    assert_eq!(got.unwrap(), 1);
    assert_eq!(start.elapsed(), 200 * MS);
    assert_eq!(dep.started().len(), 1, "the refused hedge never ran");
    assert!(dep.cancelled().is_empty(), "the primary was not cancelled");
}

#[tokio::test(start_paused = true)]
async fn a_hedge_refused_by_an_inner_rate_limit_or_open_breaker_waits_for_the_primary() {
    // Burst 1: the primary takes the only token and the hedge is limited.
    let limiter = keel::rate_limit::RateLimiter::builder("one")
        .per_second(0.001)
        .burst(1)
        .clock(keel::clock::TokioClock::new())
        .build()
        .unwrap();
    let hedging = hedge(50, 2);
    let pipeline = Pipeline::builder()
        .hedge(hedging.clone())
        .rate_limit(limiter)
        .build();
    let dep = Scripted::new(vec![(300, Ok(1)), (10, Ok(2)), (10, Ok(3))]);
    assert_eq!(pipeline.call_idempotent(|| dep.attempt()).await.unwrap(), 1);
    assert_eq!(dep.started().len(), 1);
    assert!(dep.cancelled().is_empty());
    assert_eq!(hedging.hedges_started(), 2, "both hedges were refused");
}

#[tokio::test(start_paused = true)]
async fn when_every_attempt_is_refused_the_refusal_is_returned() {
    let bulkhead = keel::bulkhead::Bulkhead::builder("none")
        .max_concurrent(1)
        .build()
        .unwrap();
    let _held = bulkhead.try_acquire_owned().unwrap();
    let pipeline = Pipeline::builder()
        .hedge(hedge(50, 1))
        .bulkhead(bulkhead.clone())
        .build();
    let dep = Scripted::new(vec![(10, Ok(1))]);
    let start = Instant::now();
    let got = pipeline.call_idempotent(|| dep.attempt()).await;
    assert!(matches!(got, Err(Error::BulkheadFull)), "{got:?}");
    assert_eq!(start.elapsed(), Duration::ZERO, "no attempt left: at once");
    assert!(dep.started().is_empty());
}

#[tokio::test(start_paused = true)]
async fn dropping_a_hedged_call_cancels_every_attempt_in_flight() {
    let dep = Scripted::new(vec![(1000, Ok(1)), (1000, Ok(2)), (1000, Ok(3))]);
    let hedge = hedge(50, 2);
    let call = hedge.call(Idempotent(|| dep.attempt()));
    let outcome = tokio::time::timeout(120 * MS, call).await;
    assert!(outcome.is_err(), "still running at 120ms");
    assert_eq!(dep.started().len(), 3);
    let mut cancelled = dep.cancelled();
    cancelled.sort_unstable();
    assert_eq!(cancelled, vec![0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn only_answers_move_the_quantile_delay() {
    let hedge = Hedge::builder()
        .quantile_delay(0.5, 500 * MS, 100, 4)
        .build()
        .unwrap();
    for _ in 0..4 {
        let dep = Scripted::new(vec![(100, Ok(1))]);
        hedge.call(Idempotent(|| dep.attempt())).await.unwrap();
    }
    assert_eq!(hedge.delay(), 100 * MS);
    // A dependency failing at once: its failures are not latencies.
    for _ in 0..20 {
        let dep = Scripted::new(vec![(0, Err("down")), (0, Err("down"))]);
        hedge.call(Idempotent(|| dep.attempt())).await.unwrap_err();
    }
    assert_eq!(hedge.delay(), 100 * MS);
}

#[tokio::test(start_paused = true)]
async fn the_tower_layer_over_a_full_bulkhead_keeps_the_primary() {
    // The bulkhead's seat is taken in poll_ready: the primary holds it and
    // the hedge's clone is refused there.
    let calls = Arc::new(AtomicU32::new(0));
    let service = {
        let calls = calls.clone();
        tower::service_fn(move |req: &'static str| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(200 * MS).await;
                Ok::<_, std::io::Error>(format!("{req}#{n}"))
            }
        })
    };
    let bulkhead = keel::bulkhead::Bulkhead::builder("one")
        .max_concurrent(1)
        .build()
        .unwrap();
    let svc = tower::Layer::layer(&keel::bulkhead::BulkheadLayer::new(bulkhead), service);
    let layer = HedgeLayer::new(hedge(50, 1), |_: &&str| true);
    let mut svc = tower::Layer::layer(&layer, svc);
    let start = Instant::now();
    let got = svc.ready().await.unwrap().call("GET /stock").await.unwrap();
    assert_eq!(got, "GET /stock#0");
    assert_eq!(start.elapsed(), 200 * MS);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
