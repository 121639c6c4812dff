//! Containment policies beside their peers, in the same run. See
//! docs/BENCHMARKS.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

mod support;
use keel::bulkhead::{Bulkhead, BulkheadLayer};
use tokio::sync::Semaphore;

/// Acquire and release one seat with seats free: the cost every call pays.
fn bulkhead(c: &mut Criterion) {
    let rt = support::runtime();
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
    use tower::Layer;
    let inner = tower::service_fn(|()| async { Ok::<u64, std::io::Error>(black_box(7)) });
    let mut g = c.benchmark_group("bulkhead_tower_service");
    g.bench_function("no_limit", |b| {
        b.iter_custom(|n| support::service_calls(&rt, inner, n))
    });
    g.bench_function("tower_concurrency_limit", |b| {
        b.iter_custom(|n| {
            support::service_calls(&rt, tower::limit::ConcurrencyLimit::new(inner, 100), n)
        })
    });
    let layer = BulkheadLayer::new(keel.clone());
    g.bench_function("keel", |b| {
        b.iter_custom(|n| support::service_calls(&rt, layer.layer(inner), n))
    });
    g.finish();
}

/// GCRA checks with room to admit (a generous rate), keel beside governor.
fn rate_limiter(c: &mut Criterion) {
    use governor::{Quota, RateLimiter as Governor};
    use keel::rate_limit::RateLimiter;
    use std::num::NonZeroU32;

    let rate = 1_000_000_000.0; // one a nanosecond: never limits, so every check admits
    let keel = RateLimiter::builder("bench")
        .per_second(rate)
        .burst(1_000_000)
        .build()
        .unwrap();
    let quota = Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap())
        .allow_burst(NonZeroU32::new(1_000_000).unwrap());
    let governor = Governor::direct(quota);

    let mut g = c.benchmark_group("rate_limit_check");
    g.bench_function("keel", |b| b.iter(|| black_box(&keel).check().is_ok()));
    g.bench_function("governor", |b| {
        b.iter(|| black_box(&governor).check().is_ok())
    });
    g.finish();

    // Both cores checking one limiter; reported per check and thread.
    let mut g = c.benchmark_group("rate_limit_check_two_threads");
    g.bench_function("keel", |b| {
        b.iter_custom(|n| {
            support::on_two_threads(n, || {
                black_box(keel.check().is_ok());
            })
        })
    });
    g.bench_function("governor", |b| {
        b.iter_custom(|n| {
            support::on_two_threads(n, || {
                black_box(governor.check().is_ok());
            })
        })
    });
    g.finish();

    let keyed = RateLimiter::builder("bench")
        .per_second(rate)
        .burst(1_000_000)
        .build_keyed::<u32>(100_000)
        .unwrap();
    let governor_keyed = Governor::keyed(quota);
    let mut g = c.benchmark_group("rate_limit_check_keyed");
    let mut i = 0u32;
    g.bench_function("keel", |b| {
        b.iter(|| {
            i = (i + 1) % 1000;
            keyed.check_key(&i).is_ok()
        })
    });
    let mut i = 0u32;
    g.bench_function("governor", |b| {
        b.iter(|| {
            i = (i + 1) % 1000;
            governor_keyed.check_key(&i).is_ok()
        })
    });
    g.finish();
}

async fn op_ready() -> Result<u64, std::io::Error> {
    Ok(black_box(7))
}

async fn op_yielding() -> Result<u64, std::io::Error> {
    tokio::task::yield_now().await;
    Ok(black_box(7))
}

/// Hedging's cost when no hedge is needed: the answer comes before the
/// delay. Pending once, the hedge timer is armed (and then dropped).
fn hedging(c: &mut Criterion) {
    use keel::hedge::{Hedge, Idempotent};
    let rt = support::runtime();
    let hedge = Hedge::builder()
        .delay(std::time::Duration::from_millis(50))
        .build()
        .unwrap();
    let mut g = c.benchmark_group("hedge_success");
    g.bench_function("direct", |b| b.to_async(&rt).iter(op_ready));
    g.bench_function("keel", |b| {
        b.to_async(&rt).iter(|| hedge.call(Idempotent(op_ready)))
    });
    g.finish();
    let mut g = c.benchmark_group("hedge_success_pending_once");
    g.bench_function("direct", |b| b.to_async(&rt).iter(op_yielding));
    g.bench_function("keel", |b| {
        b.to_async(&rt).iter(|| hedge.call(Idempotent(op_yielding)))
    });
    g.finish();
}

criterion_group!(benches, bulkhead, rate_limiter, hedging);
criterion_main!(benches);
