//! The circuit breaker's costs, beside the peer crates' breakers in the same
//! run. See docs/BENCHMARKS.md for results and how to read them.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

mod support;
use keel::circuit_breaker::{CircuitBreaker, Window};
use keel::clock::ManualClock;

fn keel_breaker(window: Window, slow_calls: bool) -> CircuitBreaker {
    let b = CircuitBreaker::builder("bench").window(window);
    let b = if slow_calls {
        b
    } else {
        b.disable_slow_call_detection()
    };
    b.build().unwrap()
}

/// Admission plus recording a success, in Closed: the cost every call pays.
fn closed_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker_closed_acquire_record");

    let cb = keel_breaker(Window::Count(100), false);
    g.bench_function("keel_count_window", |b| {
        b.iter(|| black_box(&cb).try_acquire().unwrap().success())
    });
    let cb = keel_breaker(Window::Count(100), true);
    g.bench_function("keel_count_window_slow_call_detection", |b| {
        b.iter(|| black_box(&cb).try_acquire().unwrap().success())
    });
    let cb = keel_breaker(Window::Time(Duration::from_secs(10)), false);
    g.bench_function("keel_time_window", |b| {
        b.iter(|| black_box(&cb).try_acquire().unwrap().success())
    });
    peers::closed_path(&mut g);
    g.finish();
}

/// Recording into a time window holding 10 or 100,000 calls: the cost must
/// not grow with the calls in the window. The clock stands still (a manual
/// clock) so every call stays in the window.
fn time_window_size(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker_time_window_record");
    for held in [10u64, 100_000] {
        let clock = ManualClock::new();
        let cb = CircuitBreaker::builder("bench")
            .window(Window::Time(Duration::from_secs(10)))
            .minimum_calls(1)
            .disable_slow_call_detection()
            .clock(clock.clone())
            .build()
            .unwrap();
        for i in 0..held {
            // Spread over the window's seconds, ending at the current one.
            if i == held / 2 {
                clock.advance(Duration::from_secs(5));
            }
            cb.try_acquire().unwrap().success();
        }
        assert_eq!(cb.metrics().calls, held);
        g.bench_with_input(BenchmarkId::new("calls_in_window", held), &cb, |b, cb| {
            b.iter(|| cb.try_acquire().unwrap().success())
        });
    }
    g.finish();
}

/// Two threads calling through one breaker (this machine has two cores).
/// Reported per call and thread.
fn two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker_two_threads");
    let count = keel_breaker(Window::Count(100), false);
    g.bench_function("keel_count_window", |b| {
        b.iter_custom(|n| support::on_two_threads(n, || count.try_acquire().unwrap().success()))
    });
    let time = keel_breaker(Window::Time(Duration::from_secs(10)), false);
    g.bench_function("keel_time_window", |b| {
        b.iter_custom(|n| support::on_two_threads(n, || time.try_acquire().unwrap().success()))
    });
    g.finish();
}

/// The closed path through each crate's own call wrapper: admission, the
/// operation (returns `Ok` at once), recording.
mod peers {
    use std::hint::black_box;

    use criterion::{measurement::WallTime, BenchmarkGroup};
    use failsafe::CircuitBreaker as _;

    fn op() -> Result<u64, ()> {
        Ok(black_box(7))
    }

    pub(super) fn closed_path(g: &mut BenchmarkGroup<'_, WallTime>) {
        // keel's synchronous equivalent of the peers' `call(f)`.
        let cb = super::keel_breaker(keel::circuit_breaker::Window::Count(100), false);
        g.bench_function("keel_count_window_wrapping_op", |b| {
            b.iter(|| {
                let permit = cb.try_acquire().unwrap();
                let r = op();
                if r.is_ok() {
                    permit.success()
                } else {
                    permit.failure()
                }
                r
            })
        });
        // recloser's defaults: a ring of 100 calls, error rate 0.5.
        let recloser = recloser::Recloser::default();
        g.bench_function("recloser", |b| b.iter(|| recloser.call(op)));
        // failsafe's defaults: success rate over a time window, or
        // consecutive failures.
        let failsafe = failsafe::Config::new().build();
        g.bench_function("failsafe", |b| b.iter(|| failsafe.call(op)));
    }
}

/// The breaker as tower middleware: keel's layer against
/// tower-resilience's, over a service that answers at once.
fn tower_service(c: &mut Criterion) {
    use tower::Layer;

    let rt = support::runtime();

    let inner = tower::service_fn(|()| async { Ok::<u64, std::io::Error>(black_box(7)) });
    let mut g = c.benchmark_group("breaker_tower_service");
    g.bench_function("no_breaker", |b| {
        b.iter_custom(|n| support::service_calls(&rt, inner, n))
    });
    let keel =
        keel::circuit_breaker::CircuitBreakerLayer::new(keel_breaker(Window::Count(100), false));
    g.bench_function("keel", |b| {
        b.iter_custom(|n| support::service_calls(&rt, keel.layer(inner), n))
    });
    let peer = tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .build()
        .unwrap();
    g.bench_function("tower_resilience", |b| {
        b.iter_custom(|n| support::service_calls(&rt, peer.layer(inner), n))
    });
    g.finish();
}

/// What metrics and events add to the breaker: the closed path with no
/// metrics recorder, with the Prometheus exporter's recorder, and with an
/// event subscriber attached (the closed path publishes no events); and the
/// rejecting path, which publishes one event per call, with and without a
/// subscriber.
fn observability(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker_observability");
    let cb = keel_breaker(Window::Count(100), false);
    g.bench_function("closed_no_recorder", |b| {
        b.iter(|| black_box(&cb).try_acquire().unwrap().success())
    });
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let recorded =
        metrics::with_local_recorder(&recorder, || keel_breaker(Window::Count(100), false));
    g.bench_function("closed_prometheus_recorder", |b| {
        b.iter(|| black_box(&recorded).try_acquire().unwrap().success())
    });
    assert!(handle.render().contains("keel_circuit_breaker_state"));
    let subscription = cb.events().subscribe(1024);
    g.bench_function("closed_event_subscriber", |b| {
        b.iter(|| black_box(&cb).try_acquire().unwrap().success())
    });
    drop(subscription);

    let open = keel_breaker(Window::Count(100), false);
    open.force_open();
    g.bench_function("rejected_no_subscriber", |b| {
        b.iter(|| black_box(&open).try_acquire().is_err())
    });
    let _subscription = open.events().subscribe(1024);
    g.bench_function("rejected_event_subscriber", |b| {
        b.iter(|| black_box(&open).try_acquire().is_err())
    });
    g.finish();
}

criterion_group!(
    benches,
    closed_path,
    observability,
    time_window_size,
    two_threads,
    tower_service
);
criterion_main!(benches);
