//! Retry, timeout and the pipeline on their success path, beside a direct
//! call and the peer crates in the same run. See docs/BENCHMARKS.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keel::circuit_breaker::CircuitBreaker;
use keel::retry::Retry;
use keel::timeout::Timeout;
use keel::Pipeline;
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// The dependency: answers at once.
async fn op() -> Result<u64, std::io::Error> {
    Ok(black_box(7))
}

/// Answers on the second poll, so a timeout has to arm its timer.
async fn op_yielding() -> Result<u64, std::io::Error> {
    tokio::task::yield_now().await;
    Ok(black_box(7))
}

/// Retry on calls that succeed: against an operation that is ready at once
/// (the pure overhead) and one that is pending once, as any real I/O is.
fn retry(c: &mut Criterion) {
    let rt = runtime();
    let retry = Retry::builder().build().unwrap();

    let mut g = c.benchmark_group("retry_success");
    g.bench_function("direct", |b| b.to_async(&rt).iter(op));
    g.bench_function("keel", |b| b.to_async(&rt).iter(|| retry.call(op)));
    peers::retry(&mut g, &rt, op);
    g.finish();

    let mut g = c.benchmark_group("retry_success_pending_once");
    g.bench_function("direct", |b| b.to_async(&rt).iter(op_yielding));
    g.bench_function("keel", |b| b.to_async(&rt).iter(|| retry.call(op_yielding)));
    peers::retry(&mut g, &rt, op_yielding);
    g.finish();
}

fn timeout(c: &mut Criterion) {
    let rt = runtime();
    let after = Duration::from_secs(1);
    for (name, yielding) in [("timeout_ready", false), ("timeout_pending_once", true)] {
        let mut g = c.benchmark_group(name);
        let call = move || async move {
            if yielding {
                op_yielding().await
            } else {
                op().await
            }
        };
        g.bench_function("direct", |b| b.to_async(&rt).iter(call));
        let t = Timeout::new(after);
        g.bench_function("keel", |b| b.to_async(&rt).iter(|| t.call(call)));
        g.bench_function("tokio_time_timeout", |b| {
            b.to_async(&rt).iter(|| tokio::time::timeout(after, call()))
        });
        g.bench_function("tower_timeout", |b| {
            use tower::{Service, ServiceExt};
            let svc = tower::timeout::Timeout::new(tower::service_fn(move |()| call()), after);
            b.to_async(&rt).iter(|| {
                let mut svc = svc.clone();
                async move { svc.ready().await?.call(()).await }
            });
        });
        g.finish();
    }
}

fn pipeline(c: &mut Criterion) {
    let rt = runtime();
    let cb = CircuitBreaker::builder("bench")
        .disable_slow_call_detection()
        .build()
        .unwrap();
    let p = Pipeline::builder()
        .timeout(Duration::from_secs(1))
        .retry(Retry::builder().build().unwrap())
        .circuit_breaker(cb)
        .build();
    let mut g = c.benchmark_group("pipeline_success");
    g.bench_function("direct", |b| b.to_async(&rt).iter(op));
    g.bench_function("keel_timeout_retry_breaker", |b| {
        b.to_async(&rt).iter(|| p.call(op))
    });
    g.finish();

    let mut g = c.benchmark_group("pipeline_success_pending_once");
    g.bench_function("direct", |b| b.to_async(&rt).iter(op_yielding));
    g.bench_function("keel_timeout_retry_breaker", |b| {
        b.to_async(&rt).iter(|| p.call(op_yielding))
    });
    g.finish();
}

mod peers {
    use backon::{ExponentialBuilder, Retryable};
    use criterion::{measurement::WallTime, BenchmarkGroup};
    use tokio::runtime::Runtime;

    pub(super) fn retry<F, Fut>(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, op: F)
    where
        F: FnMut() -> Fut + Copy,
        Fut: std::future::Future<Output = Result<u64, std::io::Error>>,
    {
        g.bench_function("backon", |b| {
            b.to_async(rt)
                .iter(|| op.retry(ExponentialBuilder::default()))
        });
    }
}

criterion_group!(benches, retry, timeout, pipeline);
criterion_main!(benches);
