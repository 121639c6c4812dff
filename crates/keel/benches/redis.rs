//! The shared GCRA limiter on Redis: one check's latency and the
//! throughput of many checks in flight on one connection (redis-rs
//! pipelines concurrent commands on its multiplexed connection). Measured
//! beside the floor (a PING: one round trip doing nothing) and the limiter
//! people write by hand (a fixed window: INCR, then PEXPIRE, pipelined in
//! one round trip). See docs/BENCHMARKS.md.
//!
//! Needs `--features redis` and `redis-server` on PATH; the bench starts
//! its own on a free loopback port.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel::rate_limit::RateLimiter;
use keel::store::RedisStore;

#[path = "../tests/support/redis_server.rs"]
mod redis_server;
#[allow(dead_code)]
mod support;

/// Checks in flight at once for the throughput runs.
const IN_FLIGHT: [usize; 2] = [16, 128];

fn gcra(c: &mut Criterion) {
    let server = redis_server::RedisServer::start();
    let rt = support::runtime_with_io();
    // A rate no bench reaches: every check is admitted and writes.
    let limiter = Arc::new(
        RateLimiter::builder("bench")
            .per_second(1e8)
            .burst(1000)
            .build_shared(Arc::new(RedisStore::open(&server.url()).unwrap()))
            .unwrap(),
    );
    let client = redis::Client::open(server.url()).unwrap();
    let conn = rt
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();

    let mut g = c.benchmark_group("redis_latency");
    g.bench_function("ping_floor", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = conn.clone();
            async move {
                let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
                black_box(pong);
            }
        })
    });
    g.bench_function("keel_gcra_check", |b| {
        b.to_async(&rt).iter(|| async {
            limiter.check_key(black_box(b"user-1")).await.unwrap();
        })
    });
    g.bench_function("fixed_window_incr_pexpire", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = conn.clone();
            async move {
                let (count,): (u64,) = redis::pipe()
                    .atomic()
                    .incr("fw:user-1", 1)
                    .cmd("PEXPIRE")
                    .arg("fw:user-1")
                    .arg(1000)
                    .ignore()
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                black_box(count);
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("redis_throughput");
    for n in IN_FLIGHT {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("keel_gcra_check", n), &n, |b, &n| {
            b.to_async(&rt).iter(|| {
                let limiter = limiter.clone();
                async move {
                    let checks = (0..n).map(|i| {
                        let limiter = limiter.clone();
                        async move {
                            let key = [b'k', (i % 251) as u8];
                            limiter.check_key(&key).await.unwrap();
                        }
                    });
                    join_all(checks).await;
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("ping_floor", n), &n, |b, &n| {
            b.to_async(&rt).iter(|| {
                let conn = conn.clone();
                async move {
                    let pings = (0..n).map(|_| {
                        let mut conn = conn.clone();
                        async move {
                            let _: String =
                                redis::cmd("PING").query_async(&mut conn).await.unwrap();
                        }
                    });
                    join_all(pings).await;
                }
            })
        });
    }
    g.finish();
}

/// Runs the futures concurrently on this task (no spawns: the runtime is
/// current-thread, as a proxy worker is).
async fn join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut pending: Vec<_> = futures.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

criterion_group!(benches, gcra);
criterion_main!(benches);
