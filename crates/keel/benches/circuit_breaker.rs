//! The circuit breaker's costs, beside the peer crates' breakers in the same
//! run. See docs/BENCHMARKS.md for results and how to read them.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
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
    let run = |cb: CircuitBreaker| {
        move |iters: u64| {
            let barrier = Barrier::new(2);
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|_| {
                        let cb = cb.clone();
                        let barrier = &barrier;
                        s.spawn(move || {
                            barrier.wait();
                            let start = Instant::now();
                            for _ in 0..iters {
                                black_box(&cb).try_acquire().unwrap().success();
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
    };
    g.bench_function("keel_count_window", |b| {
        b.iter_custom(run(keel_breaker(Window::Count(100), false)))
    });
    g.bench_function("keel_time_window", |b| {
        b.iter_custom(run(keel_breaker(
            Window::Time(Duration::from_secs(10)),
            false,
        )))
    });
    g.finish();
}

mod peers {
    use criterion::{measurement::WallTime, BenchmarkGroup};

    pub(super) fn closed_path(_g: &mut BenchmarkGroup<'_, WallTime>) {}
}

criterion_group!(benches, closed_path, time_window_size, two_threads);
criterion_main!(benches);
