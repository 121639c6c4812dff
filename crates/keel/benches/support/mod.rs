//! Measuring helpers shared by the bench files.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tower::{Service, ServiceExt};

/// A current-thread runtime with time enabled.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// A current-thread runtime with time and network I/O (for Redis).
#[allow(dead_code)] // only the Redis benches talk to a network
pub fn runtime_with_io() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `iters` calls through `svc` inside one runtime entry.
pub fn service_calls<S>(rt: &tokio::runtime::Runtime, mut svc: S, iters: u64) -> Duration
where
    S: Service<()>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let r = svc.ready().await.unwrap().call(()).await;
            black_box(r.is_ok());
        }
        start.elapsed()
    })
}

/// Runs `op` `iters` times on each of two threads started together; the
/// slower thread's time, so a result is per operation and thread.
pub fn on_two_threads(iters: u64, op: impl Fn() + Sync) -> Duration {
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}
