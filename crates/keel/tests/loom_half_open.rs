//! loom models of the breaker's lock-free paths: every interleaving of the
//! real code (its atomics and its transition lock come from loom under
//! `--cfg keel_loom`) is explored.
//!
//! ```text
//! RUSTFLAGS="--cfg keel_loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p keel --release --test loom_half_open
//! ```
#![cfg(keel_loom)]

use std::time::Duration;

use keel::circuit_breaker::{CircuitBreaker, State, Window};
use keel::clock::ManualClock;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

const WAIT: Duration = Duration::from_secs(1);

/// Explores interleavings with at most two preemptions per execution (bugs
/// need few to show, and the bound keeps the run to seconds); set
/// `LOOM_MAX_PREEMPTIONS` to search deeper.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    builder.check(f);
}

/// A breaker that is Open with its wait over: the next call is the first probe.
fn open_and_elapsed(half_open_max_calls: u32) -> CircuitBreaker {
    let clock = ManualClock::new();
    let cb = CircuitBreaker::builder("loom")
        .consecutive_failures(1)
        .wait_in_open(WAIT)
        .half_open_max_calls(half_open_max_calls)
        .clock(clock.clone())
        .build()
        .unwrap();
    cb.try_acquire().unwrap().failure();
    assert_eq!(cb.state(), State::Open);
    clock.advance(WAIT);
    cb
}

/// Two callers race to move Open to HalfOpen: exactly one becomes the probe,
/// and the other is rejected because that probe is out.
#[test]
fn one_caller_wins_the_first_probe() {
    model(|| {
        let cb = open_and_elapsed(1);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let cb = cb.clone();
                thread::spawn(move || cb.try_acquire_owned().ok())
            })
            .collect();
        let permits: Vec<_> = threads
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(permits.len(), 1);
        assert_eq!(cb.state(), State::HalfOpen);
        assert_eq!(cb.metrics().not_permitted_calls, 1);
    });
}

/// Callers acquiring and releasing probes concurrently never hold more than
/// `half_open_max_calls` at once, and released slots are all given back.
#[test]
fn probes_out_never_exceed_the_maximum() {
    model(|| {
        let cb = open_and_elapsed(2);
        let holding = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let cb = cb.clone();
                let holding = holding.clone();
                thread::spawn(move || {
                    if let Ok(permit) = cb.try_acquire_owned() {
                        let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                        assert!(now <= 2, "{now} probes out");
                        holding.fetch_sub(1, Ordering::SeqCst);
                        drop(permit); // a cancelled probe: frees its slot
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(cb.state(), State::HalfOpen);
        // Every slot came back: two probes can be taken again.
        let a = cb.try_acquire().expect("first slot free");
        let b = cb.try_acquire().expect("second slot free");
        assert!(cb.try_acquire().is_err());
        drop((a, b));
    });
}

/// A probe's failure races another probe's admission and success: whatever
/// the interleaving, the round is decided on every outcome recorded in it, so
/// the breaker ends Open. (This model found a lost decision when transitions
/// stored the state word instead of swapping it.)
#[test]
fn a_failing_probe_reopens_whatever_the_interleaving() {
    model(|| {
        let cb = open_and_elapsed(2);
        let first = cb.try_acquire_owned().unwrap();
        let other = {
            let cb = cb.clone();
            thread::spawn(move || {
                if let Ok(permit) = cb.try_acquire_owned() {
                    permit.success();
                }
            })
        };
        first.failure();
        other.join().unwrap();
        assert_eq!(cb.state(), State::Open);
    });
}

/// Concurrent outcomes in Closed are all counted in a count window.
#[test]
fn closed_outcomes_are_counted_exactly() {
    model(|| {
        let cb = CircuitBreaker::builder("loom")
            .failure_rate_threshold(0.75)
            .window(Window::Count(2))
            .minimum_calls(3)
            .disable_slow_call_detection()
            .clock(ManualClock::new())
            .build()
            .unwrap();
        let threads: Vec<_> = [true, false]
            .into_iter()
            .map(|fail| {
                let cb = cb.clone();
                thread::spawn(move || {
                    let permit = cb.try_acquire().unwrap();
                    if fail {
                        permit.failure()
                    } else {
                        permit.success()
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let m = cb.metrics();
        assert_eq!((m.calls, m.failed_calls, m.successful_calls), (2, 1, 1));
        assert_eq!(cb.state(), State::Closed);
    });
}
