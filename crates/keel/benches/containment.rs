//! Containment policies beside their peers, in the same run. See
//! docs/BENCHMARKS.md.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use keel::bulkhead::{Bulkhead, BulkheadLayer};
use tokio::sync::Semaphore;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Acquire and release one seat with seats free: the cost every call pays.
fn bulkhead(c: &mut Criterion) {
    let rt = runtime();
    let keel = Bulkhead::builder("bench")
        .max_concurrent(100)
        .build()
        .unwrap();
    let tokio_sem = Semaphore::new(100);

    let mut g = c.benchmark_group("bulkhead_try_acquire_release");
    g.bench_function("tokio_semaphore", |b| {
        b.iter(|| drop(black_box(&tokio_sem).try_acquire().unwrap()))
    });
    g.bench_function("keel", |b| {
        b.iter(|| drop(black_box(&keel).try_acquire().unwrap()))
    });
    g.finish();

    let mut g = c.benchmark_group("bulkhead_acquire_release_async");
    g.bench_function("tokio_semaphore", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(tokio_sem.acquire().await.unwrap()) })
    });
    g.bench_function("keel", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(keel.acquire().await.unwrap()) })
    });
    g.finish();

    // As tower middleware around a service that answers at once.
    use tower::{Layer, Service, ServiceExt};
    fn measure<S>(rt: &tokio::runtime::Runtime, mut svc: S, iters: u64) -> Duration
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
    let inner = tower::service_fn(|()| async { Ok::<u64, std::io::Error>(black_box(7)) });
    let mut g = c.benchmark_group("bulkhead_tower_service");
    g.bench_function("no_limit", |b| b.iter_custom(|n| measure(&rt, inner, n)));
    g.bench_function("tower_concurrency_limit", |b| {
        b.iter_custom(|n| measure(&rt, tower::limit::ConcurrencyLimit::new(inner, 100), n))
    });
    let layer = BulkheadLayer::new(keel.clone());
    g.bench_function("keel", |b| {
        b.iter_custom(|n| measure(&rt, layer.layer(inner), n))
    });
    g.finish();
}

criterion_group!(benches, bulkhead);
criterion_main!(benches);
