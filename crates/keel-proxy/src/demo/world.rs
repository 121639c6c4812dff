//! The demo's simulated dependencies, HTTP servers on loopback whose
//! latency and failures the fault timeline changes, and the timeline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// One simulated service.
pub(crate) struct Dependency {
    pub(crate) addr: SocketAddr,
    /// Its normal latency; each answer takes 80% to 120% of it.
    base: Duration,
    /// Answer every request with 500 (after the normal latency).
    failing: AtomicBool,
    /// Answer after this many milliseconds instead (0: normal).
    slow_ms: AtomicU64,
    /// Requests received.
    hits: AtomicU64,
    serving: tokio::task::JoinHandle<()>,
}

impl Dependency {
    pub(crate) async fn start(base: Duration) -> std::io::Result<Arc<Dependency>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        Ok(Arc::new_cyclic(|me: &std::sync::Weak<Dependency>| {
            let me = me.clone();
            let serving = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let Some(dep) = me.upgrade() else { return };
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let service = service_fn(move |_request| {
                            let dep = dep.clone();
                            async move { Ok::<_, Infallible>(dep.answer().await) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Dependency {
                addr,
                base,
                failing: AtomicBool::new(false),
                slow_ms: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                serving,
            }
        }))
    }

    async fn answer(&self) -> Response<Full<Bytes>> {
        let n = self.hits.fetch_add(1, Ordering::Relaxed);
        // 0 to 40, spread evenly (a multiplicative hash of the count).
        let spread = (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) * 41 / 64;
        let slow = self.slow_ms.load(Ordering::Relaxed);
        let delay = if slow > 0 {
            Duration::from_millis(slow)
        } else {
            // 80% to 120% of the base latency.
            self.base * (80 + spread as u32) / 100
        };
        tokio::time::sleep(delay).await;
        let (status, body) = if self.failing.load(Ordering::Relaxed) {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "{\"error\":\"internal\"}",
            )
        } else {
            (StatusCode::OK, "{\"ok\":true}")
        };
        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = status;
        response
    }

    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    fn set(&self, fault: Fault) {
        match fault {
            Fault::Fail(on) => self.failing.store(on, Ordering::Relaxed),
            Fault::Slow(d) => self.slow_ms.store(d.as_millis() as u64, Ordering::Relaxed),
        }
    }
}

impl Drop for Dependency {
    fn drop(&mut self) {
        self.serving.abort();
    }
}

/// payment, inventory and recommendations, as the checkout sees them.
pub(crate) struct World {
    pub(crate) payment: Arc<Dependency>,
    pub(crate) inventory: Arc<Dependency>,
    pub(crate) recommendations: Arc<Dependency>,
}

impl World {
    pub(crate) async fn start() -> std::io::Result<World> {
        Ok(World {
            payment: Dependency::start(Duration::from_millis(50)).await?,
            inventory: Dependency::start(Duration::from_millis(5)).await?,
            recommendations: Dependency::start(Duration::from_millis(20)).await?,
        })
    }

    fn dependency(&self, which: Which) -> &Dependency {
        match which {
            Which::Payment => &self.payment,
            Which::Recommendations => &self.recommendations,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Which {
    Payment,
    Recommendations,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Fail(bool),
    Slow(Duration),
}

/// One change of the timeline, at a fraction of the run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Change {
    pub(crate) at: f64,
    pub(crate) says: &'static str,
    which: Which,
    fault: Fault,
}

/// The default timeline: recommendations fail, then payment is slow, then
/// everything recovers. The faults end at [`FAULTS_END`] of the run.
pub(crate) const TIMELINE: [Change; 4] = [
    Change {
        at: 0.15,
        says: "recommendations fail 100%",
        which: Which::Recommendations,
        fault: Fault::Fail(true),
    },
    Change {
        at: 0.40,
        says: "recommendations recover",
        which: Which::Recommendations,
        fault: Fault::Fail(false),
    },
    Change {
        at: 0.45,
        says: "payment becomes 3 s slow",
        which: Which::Payment,
        fault: Fault::Slow(Duration::from_secs(3)),
    },
    Change {
        at: FAULTS_END,
        says: "payment recovers: every fault has ended",
        which: Which::Payment,
        fault: Fault::Slow(Duration::ZERO),
    },
];

/// When the last fault ends, as a fraction of the run.
pub(crate) const FAULTS_END: f64 = 0.70;

impl Change {
    /// Applies the change to every world (each run has its own).
    pub(crate) fn apply(&self, worlds: &[&World]) {
        for world in worlds {
            world.dependency(self.which).set(self.fault);
        }
    }
}
