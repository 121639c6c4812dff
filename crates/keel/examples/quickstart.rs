//! keel's quick start: a checkout calls a payment dependency that is healthy,
//! then fails, then hangs, then recovers. The calls go through a pipeline of
//! timeout, retry, circuit breaker and per-attempt timeout; the example
//! prints what each policy did in each phase.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel::circuit_breaker::{CircuitBreaker, Window};
use keel::retry::{Backoff, Jitter, Retry, RetryBudget};
use keel::{Error, Pipeline};

/// How the simulated payment service behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Answers in 10 ms.
    Healthy = 0,
    /// Answers "503 Service Unavailable" in 5 ms.
    Failing = 1,
    /// Never answers.
    Hanging = 2,
}

/// A payment service on the other end of a network, simulated in process.
#[derive(Debug, Default)]
struct Payment {
    mode: AtomicU8,
    requests: AtomicU32,
}

#[derive(Debug)]
struct Unavailable;
impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("payment answered 503 Service Unavailable")
    }
}
impl std::error::Error for Unavailable {}

impl Payment {
    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    async fn charge(&self, cents: u64) -> Result<String, Unavailable> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        match self.mode.load(Ordering::SeqCst) {
            0 => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(format!("charged {cents} cents"))
            }
            1 => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Err(Unavailable)
            }
            _ => std::future::pending().await,
        }
    }
}

/// What happened to one checkout, for the phase summary.
fn describe(result: &Result<String, Error<Unavailable>>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => kind(e),
    }
}

fn kind(e: &Error<Unavailable>) -> String {
    match e {
        Error::RetriesExhausted { last, .. } => {
            format!("gave up after retries (last: {})", kind(last))
        }
        Error::CircuitOpen { .. } => "rejected: circuit open".into(),
        Error::Timeout { .. } => "timed out".into(),
        Error::Inner(_) => "failed: 503".into(),
        other => other.to_string(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let payment = Arc::new(Payment::default());
    let started = Instant::now();

    let breaker = CircuitBreaker::builder("payment")
        .failure_rate_threshold(0.5)
        .window(Window::Count(10))
        .minimum_calls(5)
        .wait_in_open(Duration::from_millis(500))
        .half_open_max_calls(2)
        .build()?;
    breaker.on_state_transition(move |t| {
        println!(
            "    [{:>5} ms] breaker {}: {} -> {}",
            started.elapsed().as_millis(),
            t.name,
            t.from,
            t.to
        );
    });
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(
            Backoff::exponential(Duration::from_millis(20)).max_delay(Duration::from_millis(200)),
        )
        .jitter(Jitter::Full)
        .budget(
            RetryBudget::builder()
                .ratio(0.2)
                .min_per_second(5)
                .build()?,
        )
        .time_budget(Duration::from_millis(400))
        .build()?;

    // The recommended order: total timeout, retry, breaker, per-attempt timeout.
    let pipeline = Pipeline::builder()
        .timeout(Duration::from_millis(500))
        .retry(retry)
        .circuit_breaker(breaker.clone())
        .timeout(Duration::from_millis(100))
        .build();

    let phases = [
        ("healthy", Mode::Healthy, 20),
        ("failing with 503s", Mode::Failing, 30),
        ("hanging", Mode::Hanging, 20),
        ("recovered", Mode::Healthy, 30),
    ];
    println!("keel quick start: 100 checkouts against a payment service that fails, hangs and recovers\n");
    let mut slowest_overall = Duration::ZERO;
    let mut total_requests = 0;
    for (name, mode, checkouts) in phases {
        payment.set(mode);
        let before = payment.requests.load(Ordering::SeqCst);
        let phase_start = Instant::now();
        println!("phase: payment {name} ({checkouts} checkouts)");
        let mut outcomes: BTreeMap<String, u32> = BTreeMap::new();
        let mut slowest = Duration::ZERO;
        for i in 0..checkouts {
            let call_start = Instant::now();
            let payment = payment.clone();
            let result = pipeline
                .call(|| {
                    let payment = payment.clone();
                    async move { payment.charge(1999 + i).await }
                })
                .await;
            slowest = slowest.max(call_start.elapsed());
            *outcomes.entry(describe(&result)).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let m = breaker.metrics();
        let requests = payment.requests.load(Ordering::SeqCst) - before;
        total_requests += requests;
        slowest_overall = slowest_overall.max(slowest);
        println!(
            "    checkouts: {}",
            outcomes
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "    requests that reached payment: {}; slowest checkout: {} ms; phase took {} ms",
            requests,
            slowest.as_millis(),
            phase_start.elapsed().as_millis()
        );
        println!(
            "    breaker now {} (window: {} calls, {} failed; {} rejected)\n",
            breaker.state(),
            m.calls,
            m.failed_calls,
            m.not_permitted_calls
        );
        if mode == Mode::Hanging {
            // Let the breaker's open wait pass, as a dependency's recovery would.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    println!(
        "100 checkouts sent {total_requests} requests to payment (retries included); \
         the slowest checkout took {} ms against a total timeout of 500 ms.",
        slowest_overall.as_millis()
    );
    Ok(())
}
