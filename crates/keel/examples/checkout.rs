//! The checkout design challenge: a checkout calls three dependencies and
//! must keep working while they misbehave.
//!
//! - **payment** (critical, slow, sometimes hangs): total timeout, retry
//!   with backoff and a retry budget, circuit breaker, bulkhead, timeout
//!   per attempt.
//! - **inventory** (critical, fast): a bulkhead and a timeout.
//! - **recommendations** (optional, flaky): a short timeout, then fallback
//!   to popular items, then to an empty list.
//!
//! Three bursts of concurrent checkouts run against simulated dependencies
//! (in process, real time, a seeded random source): all healthy; then
//! recommendations down and payment slow and hanging; then payment down.
//! After each, the example prints what every policy did and the checkout
//! success rate.
//!
//! ```text
//! cargo run --example checkout
//! ```

use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel::bulkhead::Bulkhead;
use keel::circuit_breaker::{CircuitBreaker, Window};
use keel::fallback::{Fallback, FallbackMetrics, Source};
use keel::retry::{Backoff, Jitter, Retry, RetryBudget};
use keel::{Error, Pipeline};
use tokio::task::JoinSet;

const MS: Duration = Duration::from_millis(1);

/// How a simulated dependency behaves in a phase.
#[derive(Debug, Clone, Copy)]
struct Behaviour {
    /// Latency of a normal answer, uniformly in this range (ms).
    latency: (u64, u64),
    /// Share of requests that never answer.
    hang: f64,
    /// Share of requests answered with an error.
    error: f64,
}

const HEALTHY_SLOW: Behaviour = Behaviour {
    latency: (40, 120),
    hang: 0.0,
    error: 0.0,
};

/// A dependency on the other end of a network, simulated in process.
#[derive(Debug)]
struct Dependency {
    name: &'static str,
    behaviour: Mutex<Behaviour>,
    rng: AtomicU64,
    requests: AtomicU32,
    /// Requests cancelled before they answered (timed out or abandoned).
    cancelled: Arc<AtomicU32>,
}

#[derive(Debug)]
struct Failed(&'static str);
impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} answered 503", self.0)
    }
}
impl std::error::Error for Failed {}

/// Counts a request as cancelled if it is dropped before it answers.
struct Unanswered(Option<Arc<AtomicU32>>);
impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Dependency {
    fn new(name: &'static str, seed: u64, behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Dependency {
            name,
            behaviour: Mutex::new(behaviour),
            rng: AtomicU64::new(seed),
            requests: AtomicU32::new(0),
            cancelled: Arc::default(),
        })
    }

    fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    /// A uniform number in [0, 1) from a shared xorshift generator.
    fn random(&self) -> f64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn request(&self) -> Result<(), Failed> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let b = *self.behaviour.lock().unwrap();
        let roll = self.random();
        let (lo, hi) = b.latency;
        let latency = lo + ((hi - lo) as f64 * self.random()) as u64;
        let mut guard = Unanswered(Some(self.cancelled.clone()));
        if roll < b.hang {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(latency)).await;
        guard.0 = None;
        if roll < b.hang + b.error {
            Err(Failed(self.name))
        } else {
            Ok(())
        }
    }
}

/// What one checkout saw.
#[derive(Debug)]
struct Checkout {
    ok: bool,
    payment: Result<(), String>,
    recommendations: Source,
    took: Duration,
}

struct Shop {
    payment: Arc<Dependency>,
    inventory: Arc<Dependency>,
    recommendations: Arc<Dependency>,
    popular: Arc<Dependency>,
    payment_breaker: CircuitBreaker,
    payment_bulkhead: Bulkhead,
    /// Payment requests that were a retry of the same payment.
    payment_retries: Arc<AtomicU32>,
    inventory_bulkhead: Bulkhead,
    pay: Box<dyn Fn() -> PayFuture>,
    reserve: Box<dyn Fn() -> PayFuture>,
    recommend: Fallback<Vec<&'static str>, Failed>,
}

// Not `Send`: a `Pipeline` call's future cannot yet be proven `Send` (see
// docs/ARCHITECTURE.md), so checkouts run as local tasks on one thread.
type PayFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error<Failed>>>>>;

impl Shop {
    fn new() -> Result<Rc<Self>, keel::ConfigError> {
        let payment = Dependency::new("payment", 0x9E37_79B9_7F4A_7C15, HEALTHY_SLOW);
        let inventory = Dependency::new(
            "inventory",
            0xD1B5_4A32_D192_ED03,
            Behaviour {
                latency: (2, 8),
                hang: 0.0,
                error: 0.0,
            },
        );
        let recommendations = Dependency::new(
            "recommendations",
            0x94D0_49BB_1331_11EB,
            Behaviour {
                latency: (5, 30),
                hang: 0.0,
                error: 0.0,
            },
        );
        let popular = Dependency::new(
            "popular",
            0xBF58_476D_1CE4_E5B9,
            Behaviour {
                latency: (1, 4),
                hang: 0.0,
                error: 0.3,
            },
        );

        // payment: total timeout 2 s > retry (3 attempts, budget) > breaker
        // > bulkhead (40 in flight, 40 waiting up to 300 ms) > 300 ms per try.
        let payment_breaker = CircuitBreaker::builder("payment")
            .failure_rate_threshold(0.5)
            .window(Window::Count(20))
            .minimum_calls(10)
            .wait_in_open(Duration::from_millis(1000))
            .half_open_max_calls(3)
            .build()?;
        let payment_bulkhead = Bulkhead::builder("payment")
            .max_concurrent(40)
            .max_queue(40)
            .queue_timeout(300 * MS)
            .build()?;
        let retry = Retry::builder()
            .max_attempts(3)
            .backoff(Backoff::exponential(50 * MS).max_delay(400 * MS))
            .jitter(Jitter::Full)
            // A retry that could not finish within 600 ms is not started:
            // with the breaker open for a second, payment fails fast.
            .time_budget(600 * MS)
            .budget(
                RetryBudget::builder()
                    .ratio(0.5)
                    .min_per_second(10)
                    .build()?,
            )
            .build()?;
        let pay_pipeline = Arc::new(
            Pipeline::builder()
                .timeout(2000 * MS)
                .retry(retry)
                .circuit_breaker(payment_breaker.clone())
                .bulkhead(payment_bulkhead.clone())
                .timeout(300 * MS)
                .build(),
        );
        let payment_retries = Arc::new(AtomicU32::new(0));
        let pay = {
            let (dep, retries) = (payment.clone(), payment_retries.clone());
            move || -> PayFuture {
                let (pipeline, dep) = (pay_pipeline.clone(), dep.clone());
                let retries = retries.clone();
                Box::pin(async move {
                    let attempts = AtomicU32::new(0);
                    pipeline
                        .call(|| {
                            if attempts.fetch_add(1, Ordering::Relaxed) > 0 {
                                retries.fetch_add(1, Ordering::Relaxed);
                            }
                            let dep = dep.clone();
                            async move { dep.request().await }
                        })
                        .await
                })
            }
        };

        // inventory: a 100 ms timeout over everything, a bulkhead of 32.
        let inventory_bulkhead = Bulkhead::builder("inventory")
            .max_concurrent(32)
            .max_queue(64)
            .queue_timeout(50 * MS)
            .build()?;
        let inv_pipeline = Arc::new(
            Pipeline::builder()
                .timeout(100 * MS)
                .bulkhead(inventory_bulkhead.clone())
                .build(),
        );
        let reserve = {
            let dep = inventory.clone();
            move || -> PayFuture {
                let (pipeline, dep) = (inv_pipeline.clone(), dep.clone());
                Box::pin(async move {
                    pipeline
                        .call(|| {
                            let dep = dep.clone();
                            async move { dep.request().await }
                        })
                        .await
                })
            }
        };

        // recommendations: 50 ms, then popular items, then nothing.
        let popular_dep = popular.clone();
        let recommend = Fallback::builder()
            .alternate(move |_: &()| {
                let dep = popular_dep.clone();
                async move {
                    dep.request().await?;
                    Ok(vec!["bestseller", "gift card"])
                }
            })
            .value(Vec::new)
            .build();

        Ok(Rc::new(Shop {
            payment,
            inventory,
            recommendations,
            popular,
            payment_breaker,
            payment_bulkhead,
            payment_retries,
            inventory_bulkhead,
            pay: Box::new(pay),
            reserve: Box::new(reserve),
            recommend,
        }))
    }

    async fn checkout(self: Rc<Self>) -> Checkout {
        let start = Instant::now();
        let recs = Pipeline::builder().timeout(50 * MS).build();
        let recommend = async {
            let dep = self.recommendations.clone();
            self.recommend
                .call(|| async {
                    recs.call(|| async {
                        dep.request().await?;
                        Ok(vec!["for you"])
                    })
                    .await
                })
                .await
        };
        let (reserved, recommended) = tokio::join!((self.reserve)(), recommend);
        // Recommendations never fail a checkout: the chain ends in a value.
        let recommendations = recommended.map_or(Source::Default, |s| s.source);
        // Pay only for what is in stock.
        let payment = match reserved {
            Ok(()) => (self.pay)().await.map_err(|e| describe(&e)),
            Err(e) => Err(format!("not attempted (inventory {})", describe(&e))),
        };
        Checkout {
            ok: payment.is_ok(),
            payment,
            recommendations,
            took: start.elapsed(),
        }
    }
}

fn describe(e: &Error<Failed>) -> String {
    match e {
        Error::RetriesExhausted { attempts: 1, last } => describe(last),
        Error::RetriesExhausted { attempts, last } => {
            format!("{} after {attempts} attempts", describe(last))
        }
        Error::Timeout { .. } => "timed out".into(),
        Error::CircuitOpen { .. } => "circuit open".into(),
        Error::BulkheadFull => "bulkhead full".into(),
        Error::Inner(_) => "503".into(),
        other => other.to_string(),
    }
}

/// Counters at the start of a phase, to print what the phase added.
#[derive(Clone, Copy, Default)]
struct Before {
    requests: [u32; 4],
    cancelled: [u32; 4],
    retries: u32,
    payment_full: u64,
    inventory_full: u64,
    recs: FallbackMetrics,
}

impl Shop {
    fn deps(&self) -> [&Dependency; 4] {
        [
            &self.payment,
            &self.inventory,
            &self.recommendations,
            &self.popular,
        ]
    }

    fn snapshot(&self) -> Before {
        let d = self.deps();
        Before {
            requests: d.map(|d| d.requests.load(Ordering::Relaxed)),
            cancelled: d.map(|d| d.cancelled.load(Ordering::Relaxed)),
            retries: self.payment_retries.load(Ordering::Relaxed),
            payment_full: self.payment_bulkhead.metrics().rejected,
            inventory_full: self.inventory_bulkhead.metrics().rejected,
            recs: self.recommend.metrics(),
        }
    }
}

async fn burst(shop: &Rc<Shop>, checkouts: u32, concurrency: usize) -> Vec<Checkout> {
    let mut set = JoinSet::new();
    let mut done = Vec::new();
    for _ in 0..checkouts {
        if set.len() >= concurrency {
            done.push(set.join_next().await.expect("a task").expect("no panic"));
        }
        set.spawn_local(shop.clone().checkout());
        // Arrivals spread over time (about 170 a second), not all at once.
        tokio::time::sleep(6 * MS).await;
    }
    while let Some(c) = set.join_next().await {
        done.push(c.expect("no panic"));
    }
    done
}

fn report(shop: &Shop, before: Before, results: &[Checkout], transitions: &Mutex<Vec<String>>) {
    let now = shop.snapshot();
    let ok = results.iter().filter(|c| c.ok).count();
    let mut took: Vec<Duration> = results.iter().map(|c| c.took).collect();
    took.sort();
    let pct = |q: f64| took[((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1];
    let d = |i: usize| {
        (
            now.requests[i] - before.requests[i],
            now.cancelled[i] - before.cancelled[i],
        )
    };

    let (pay_req, pay_cancelled) = d(0);
    let pay_calls = results
        .iter()
        .filter(|c| {
            !c.payment
                .as_ref()
                .is_err_and(|e| e.starts_with("not attempted"))
        })
        .count();
    let mut failures: std::collections::BTreeMap<&str, u32> = Default::default();
    for c in results {
        if let Err(e) = &c.payment {
            *failures.entry(e.as_str()).or_default() += 1;
        }
    }
    println!(
        "  checkout:        {ok}/{} succeeded ({:.1}%); latency p50 {} ms, p99 {} ms, max {} ms",
        results.len(),
        100.0 * ok as f64 / results.len() as f64,
        pct(0.5).as_millis(),
        pct(0.99).as_millis(),
        pct(1.0).as_millis()
    );
    println!(
        "  payment:         {pay_calls} payments sent {pay_req} requests ({} of them retries); \
         {pay_cancelled} attempts cut off by the 300 ms timeout",
        now.retries - before.retries
    );
    println!(
        "                   breaker {} now; bulkhead turned away {}",
        shop.payment_breaker.state(),
        now.payment_full - before.payment_full
    );
    for t in transitions.lock().unwrap().drain(..) {
        println!("                   {t}");
    }
    for (why, n) in failures {
        println!("                   {n} checkouts failed at payment: {why}");
    }
    let (inv_req, inv_cancelled) = d(1);
    println!(
        "  inventory:       {inv_req} requests; {inv_cancelled} timed out; bulkhead turned away {}",
        now.inventory_full - before.inventory_full
    );
    let (rec_req, rec_cancelled) = d(2);
    let (pop_req, _) = d(3);
    let r = |f: fn(&FallbackMetrics) -> u64| f(&now.recs) - f(&before.recs);
    println!(
        "  recommendations: {rec_req} requests, {rec_cancelled} cut off by the 50 ms timeout; \
         answered by: recommendations {}, popular items {} (of {pop_req} asked), empty list {}",
        r(|m| m.primary),
        r(|m| m.alternate),
        r(|m| m.default)
    );
    let personal = results
        .iter()
        .filter(|c| c.ok && c.recommendations != Source::Primary)
        .count();
    println!(
        "                   {personal} successful checkouts showed fallback recommendations\n"
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tokio::task::LocalSet::new().run_until(run()).await
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let shop = Shop::new()?;
    let started = Instant::now();
    let transitions = Arc::new(Mutex::new(Vec::new()));
    {
        let transitions = transitions.clone();
        shop.payment_breaker.on_state_transition(move |t| {
            transitions.lock().unwrap().push(format!(
                "[{:>5} ms] breaker {} -> {}",
                started.elapsed().as_millis(),
                t.from,
                t.to
            ));
        });
    }

    let phases: [(&str, Behaviour, Behaviour, u32); 3] = [
        (
            "all dependencies healthy",
            HEALTHY_SLOW,
            Behaviour {
                latency: (5, 30),
                hang: 0.0,
                error: 0.0,
            },
            200,
        ),
        (
            "recommendations down; payment slow (100-200 ms), 15% of its requests hang, 10% fail",
            Behaviour {
                latency: (100, 200),
                hang: 0.15,
                error: 0.10,
            },
            Behaviour {
                latency: (1, 2),
                hang: 0.0,
                error: 1.0,
            },
            400,
        ),
        (
            "payment down (every request fails); recommendations hang",
            Behaviour {
                latency: (5, 10),
                hang: 0.0,
                error: 1.0,
            },
            Behaviour {
                latency: (5, 10),
                hang: 1.0,
                error: 0.0,
            },
            200,
        ),
    ];
    println!("keel checkout: bursts of concurrent checkouts (up to 64 at once) against simulated payment, inventory and recommendations\n");
    for (name, payment, recommendations, checkouts) in phases {
        shop.payment.set(payment);
        shop.recommendations.set(recommendations);
        let before = shop.snapshot();
        println!("phase: {name} ({checkouts} checkouts)");
        let results = burst(&shop, checkouts, 64).await;
        report(&shop, before, &results, &transitions);
        // A quiet second between bursts, as between waves of traffic.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}
