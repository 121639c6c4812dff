//! The checkout service, in its two versions, and the load that drives it.
//!
//! Both versions run the same checkout: reserve the items (inventory), take
//! the payment, then fetch recommendations for the confirmation page, one
//! after another, on a shared pool of workers. They differ only in how
//! they call:
//!
//! - **naive**: straight to the services, no timeouts, up to three tries
//!   back to back on any error, and any failure fails the checkout;
//! - **protected**: through the keel proxy (`examples/checkout.toml`),
//!   which bounds every call, retries with jitter within a budget, breaks
//!   the circuit to payment, keeps each dependency in its own bulkhead and
//!   answers for recommendations when they fail.
//!
//! The load is open loop: a checkout starts every `1 / rate` seconds
//! whatever the state of the previous ones, and a customer waits at most
//! [`PATIENCE`] for theirs (a checkout still running then is a failure,
//! though it keeps its worker until it ends: the service does not know).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use super::world::World;

/// How long a customer waits for a checkout.
pub(crate) const PATIENCE: Duration = Duration::from_secs(5);

/// Workers of the checkout service, shared by every checkout.
const WORKERS: usize = 32;

/// Tries of the naive client per call.
const NAIVE_TRIES: u32 = 3;

/// How a checkout reaches its dependencies.
pub(crate) enum Calls {
    Naive {
        payment: SocketAddr,
        inventory: SocketAddr,
        recommendations: SocketAddr,
    },
    Protected {
        proxy: SocketAddr,
    },
}

/// The checkout service.
pub(crate) struct Shop {
    calls: Calls,
    client: Client<HttpConnector, Full<Bytes>>,
    workers: Semaphore,
    next_order: AtomicU64,
    pub(crate) stats: Stats,
}

/// What one call came to.
enum Call {
    Ok,
    /// keel answered in place of the dependency (the fallback).
    Fallback,
    /// keel refused or gave up, with its reason.
    Keel(String),
    Failed,
}

impl Shop {
    pub(crate) fn new(calls: Calls, started: Instant) -> Shop {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Shop {
            calls,
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(256)
                .build(connector),
            workers: Semaphore::new(WORKERS),
            next_order: AtomicU64::new(0),
            stats: Stats::new(started),
        }
    }

    /// For a naive shop: where its dependencies are.
    pub(crate) fn naive(world: &World, started: Instant) -> Shop {
        Shop::new(
            Calls::Naive {
                payment: world.payment.addr,
                inventory: world.inventory.addr,
                recommendations: world.recommendations.addr,
            },
            started,
        )
    }

    /// One checkout: true if the customer gets a confirmation.
    async fn checkout(&self) -> bool {
        let Ok(_worker) = self.workers.acquire().await else {
            return false;
        };
        let order = self.next_order.fetch_add(1, Ordering::Relaxed);
        for step in [Step::Inventory, Step::Payment, Step::Recommendations] {
            match self.call(step, order).await {
                Call::Ok => {}
                Call::Fallback => self.stats.count(&self.stats.fallbacks),
                Call::Keel(reason) => {
                    if matches!(
                        reason.as_str(),
                        "circuit-open" | "bulkhead-full" | "rate-limited" | "shed"
                    ) {
                        self.stats.count(&self.stats.rejections);
                    }
                    return false;
                }
                Call::Failed => return false,
            }
        }
        true
    }

    async fn call(&self, step: Step, order: u64) -> Call {
        match &self.calls {
            Calls::Naive {
                payment,
                inventory,
                recommendations,
            } => {
                let to = match step {
                    Step::Inventory => inventory,
                    Step::Payment => payment,
                    Step::Recommendations => recommendations,
                };
                for _ in 0..NAIVE_TRIES {
                    if let Some((200, _)) = self.send(*to, step, order).await {
                        return Call::Ok;
                    }
                }
                Call::Failed
            }
            Calls::Protected { proxy } => match self.send(*proxy, step, order).await {
                Some((200, None)) => Call::Ok,
                Some((200, Some(_))) => Call::Fallback,
                Some((_, Some(reason))) => Call::Keel(reason),
                _ => Call::Failed,
            },
        }
    }

    /// One request: the status and keel's `x-keel-reason`, or `None` if
    /// no response came.
    async fn send(&self, to: SocketAddr, step: Step, order: u64) -> Option<(u16, Option<String>)> {
        let request = match step {
            Step::Inventory => Request::post(format!("http://{to}/inventory/reserve")),
            Step::Payment => Request::post(format!("http://{to}/pay/order-{order}"))
                .header("idempotency-key", format!("order-{order}")),
            Step::Recommendations => Request::get(format!("http://{to}/recommendations/for-order")),
        }
        .body(Full::new(Bytes::from_static(b"{}")))
        .ok()?;
        let response = self.client.request(request).await.ok()?;
        let status = response.status().as_u16();
        let reason = response
            .headers()
            .get("x-keel-reason")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        response.into_body().collect().await.ok()?;
        Some((status, reason))
    }

    /// Starts checkouts at `rate` a second for `duration`, open loop, then
    /// waits for the last customer (at most [`PATIENCE`]).
    pub(crate) async fn drive(self: &Arc<Self>, rate: f64, duration: Duration) {
        let every = Duration::from_secs_f64(1.0 / rate);
        let count = (duration.as_secs_f64() * rate).round() as u64;
        let start = tokio::time::Instant::now();
        let mut customers = tokio::task::JoinSet::new();
        for i in 0..count {
            let at = start + every * i as u32;
            tokio::time::sleep_until(at).await;
            let shop = self.clone();
            customers.spawn(async move {
                let intended = Instant::now();
                let checkout = tokio::spawn({
                    let shop = shop.clone();
                    async move { shop.checkout().await }
                });
                let ok = matches!(tokio::time::timeout(PATIENCE, checkout).await, Ok(Ok(true)));
                shop.stats.record(ok, intended.elapsed().min(PATIENCE));
            });
        }
        while customers.join_next().await.is_some() {}
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Inventory,
    Payment,
    Recommendations,
}

/// Checkouts by the second they ended in.
pub(crate) struct Stats {
    started: Instant,
    seconds: Mutex<Vec<Second>>,
    pub(crate) fallbacks: AtomicU64,
    pub(crate) rejections: AtomicU64,
}

/// One second's checkouts.
#[derive(Debug, Clone, Default)]
pub(crate) struct Second {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    /// Latencies in milliseconds, failed checkouts included.
    pub(crate) latencies: Vec<f64>,
}

impl Second {
    pub(crate) fn total(&self) -> u64 {
        self.ok + self.failed
    }

    /// Checkouts that succeeded, in percent (100 with none).
    pub(crate) fn success(&self) -> f64 {
        if self.total() == 0 {
            100.0
        } else {
            100.0 * self.ok as f64 / self.total() as f64
        }
    }
}

impl Stats {
    fn new(started: Instant) -> Stats {
        Stats {
            started,
            seconds: Mutex::new(Vec::new()),
            fallbacks: AtomicU64::new(0),
            rejections: AtomicU64::new(0),
        }
    }

    fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn record(&self, ok: bool, latency: Duration) {
        let second = self.started.elapsed().as_secs() as usize;
        let mut seconds = self.seconds.lock().unwrap_or_else(|p| p.into_inner());
        if seconds.len() <= second {
            seconds.resize(second + 1, Second::default());
        }
        let s = &mut seconds[second];
        if ok {
            s.ok += 1;
        } else {
            s.failed += 1;
        }
        s.latencies.push(latency.as_secs_f64() * 1000.0);
    }

    /// Second `i` (empty if nothing ended in it).
    pub(crate) fn second(&self, i: usize) -> Second {
        let seconds = self.seconds.lock().unwrap_or_else(|p| p.into_inner());
        seconds.get(i).cloned().unwrap_or_default()
    }

    /// Every second so far.
    pub(crate) fn seconds(&self) -> Vec<Second> {
        self.seconds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The `q` quantile (0 to 1) of `values`, nearest rank; 0 for none.
pub(crate) fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
