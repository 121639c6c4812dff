//! Behaviour of the circuit breaker, on a manual clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::circuit_breaker::{CircuitBreaker, State, StateTransition, Window};
use keel::clock::ManualClock;

const SEC: Duration = Duration::from_secs(1);

/// The contract API, as the issue writes it.
#[test]
fn contract_api_compiles_as_written() -> Result<(), Box<dyn std::error::Error>> {
    use keel::circuit_breaker::{CircuitBreaker, State, Window};
    use keel::clock::ManualClock;
    let clock = ManualClock::new();
    let cb = CircuitBreaker::builder("payment")
        .failure_rate_threshold(0.5) // fraction in (0, 1]
        .window(Window::Count(100)) // or Window::Time(Duration)
        .minimum_calls(100)
        .slow_call_duration(Duration::from_secs(60)) // strictly longer than this = slow
        .slow_call_rate_threshold(1.0) // fraction in (0, 1]
        .wait_in_open(Duration::from_secs(60))
        .half_open_max_calls(10)
        .clock(clock.clone())
        .build()?; // Result<CircuitBreaker, keel::ConfigError>
    let permit = cb.try_acquire()?; // Err(keel::circuit_breaker::Rejected { retry_after: Duration, .. })
    permit.success(); // or permit.failure(), permit.ignore(); dropping a permit = ignore
    assert_eq!(cb.state(), State::Closed);
    let m = cb.metrics();
    let _: (Option<f64>, Option<f64>) = (m.failure_rate, m.slow_call_rate);
    let _: [u64; 5] = [
        m.calls,
        m.failed_calls,
        m.successful_calls,
        m.slow_calls,
        m.not_permitted_calls,
    ];
    cb.force_open();
    cb.disable();
    cb.reset();
    let _: Result<(), keel::ConfigError> = Ok(());
    if let Err(keel::circuit_breaker::Rejected { retry_after, .. }) = cb.try_acquire() {
        let _: Duration = retry_after;
    }
    fn assert_handle<T: Clone + Send + Sync + 'static>() {}
    assert_handle::<CircuitBreaker>();
    Ok(())
}

fn builder(clock: &ManualClock) -> keel::circuit_breaker::Builder {
    CircuitBreaker::builder("dep")
        .failure_rate_threshold(0.5)
        .window(Window::Count(10))
        .minimum_calls(4)
        .wait_in_open(10 * SEC)
        .half_open_max_calls(2)
        .clock(clock.clone())
}

fn record(cb: &CircuitBreaker, outcomes: &str) {
    for c in outcomes.chars() {
        let p = cb.try_acquire().expect("admitted");
        match c {
            's' => p.success(),
            'f' => p.failure(),
            'i' => p.ignore(),
            _ => drop(p),
        }
    }
}

fn transitions(cb: &CircuitBreaker) -> Arc<Mutex<Vec<(State, State)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    cb.on_state_transition(move |t: &StateTransition| s.lock().unwrap().push((t.from, t.to)));
    seen
}

#[test]
fn defaults_are_resilience4j_s() {
    let clock = ManualClock::new();
    let cb = CircuitBreaker::builder("d")
        .clock(clock.clone())
        .build()
        .unwrap();
    // 99 failures: below minimum_calls (100), no rate yet.
    for _ in 0..99 {
        cb.try_acquire().unwrap().failure();
    }
    assert_eq!(cb.metrics().failure_rate, None);
    assert_eq!(cb.state(), State::Closed);
    cb.try_acquire().unwrap().failure();
    assert_eq!(cb.state(), State::Open);
    // Open for 60 s.
    assert_eq!(cb.try_acquire().unwrap_err().retry_after, 60 * SEC);
    clock.advance(60 * SEC);
    // Ten probes.
    let probes: Vec<_> = (0..10).map(|_| cb.try_acquire().unwrap()).collect();
    assert_eq!(cb.state(), State::HalfOpen);
    assert!(cb.try_acquire().is_err());
    probes.into_iter().for_each(|p| p.success());
    assert_eq!(cb.state(), State::Closed);
}

#[test]
fn opens_when_the_failure_rate_reaches_the_threshold() {
    let clock = ManualClock::new();
    let cb = builder(&clock).build().unwrap();
    let seen = transitions(&cb);
    record(&cb, "sfs");
    assert_eq!(cb.metrics().failure_rate, None, "below minimum_calls");
    record(&cb, "s"); // 1/4 failed
    assert_eq!(cb.metrics().failure_rate, Some(0.25));
    record(&cb, "f"); // 2/5
    assert_eq!(cb.state(), State::Closed);
    record(&cb, "f"); // 3/6 = 0.5 >= 0.5
    assert_eq!(cb.state(), State::Open);
    assert_eq!(*seen.lock().unwrap(), [(State::Closed, State::Open)]);
    let m = cb.metrics();
    assert_eq!(
        (m.calls, m.failed_calls, m.successful_calls),
        (6, 3, 3),
        "Open keeps the metrics that tripped it"
    );
}

#[test]
fn a_success_can_open_the_breaker() {
    // Failures before minimum_calls do not trip; the success that reaches
    // minimum_calls does, if the rate is over the threshold.
    let clock = ManualClock::new();
    let cb = builder(&clock).build().unwrap();
    record(&cb, "fff");
    assert_eq!(cb.state(), State::Closed);
    record(&cb, "s"); // 3/4 = 0.75
    assert_eq!(cb.state(), State::Open);
}

#[test]
fn minimum_calls_is_capped_at_a_count_window_s_size() {
    let clock = ManualClock::new();
    let cb = builder(&clock)
        .window(Window::Count(3))
        .minimum_calls(100)
        .build()
        .unwrap();
    record(&cb, "sf");
    assert_eq!(cb.state(), State::Closed);
    record(&cb, "f"); // 2/3 with minimum capped at 3
    assert_eq!(cb.state(), State::Open);
}

#[test]
fn a_count_window_forgets_old_calls() {
    let clock = ManualClock::new();
    let cb = builder(&clock)
        .window(Window::Count(4))
        .minimum_calls(4)
        .build()
        .unwrap();
    record(&cb, "fsss"); // 1/4
    record(&cb, "s"); // the failure leaves: 0/4
    assert_eq!(cb.metrics().failed_calls, 0);
    assert_eq!(cb.metrics().calls, 4);
    record(&cb, "f"); // 1/4
    assert_eq!(cb.metrics().failure_rate, Some(0.25));
}

#[test]
fn ignored_and_dropped_calls_are_not_counted() {
    let clock = ManualClock::new();
    let cb = builder(&clock).build().unwrap();
    record(&cb, "iiddff");
    let m = cb.metrics();
    assert_eq!((m.calls, m.failed_calls), (2, 2));
    assert_eq!(cb.state(), State::Closed);
}

#[test]
fn a_time_window_keeps_the_calls_of_the_last_seconds() {
    let clock = ManualClock::new();
    let cb = builder(&clock)
        .window(Window::Time(3 * SEC))
        .minimum_calls(4)
        .build()
        .unwrap();
    record(&cb, "ff"); // second 0
    clock.advance(SEC);
    record(&cb, "s"); // second 1
    clock.advance(SEC);
    assert_eq!(cb.metrics().calls, 3);
    clock.advance(SEC); // second 3: second 0 has left the window
    let m = cb.metrics();
    assert_eq!((m.calls, m.failed_calls), (1, 0));
    record(&cb, "sf"); // 1/3, below minimum
    record(&cb, "s"); // 1/4
    assert_eq!(cb.state(), State::Closed);
    record(&cb, "ff"); // 3/6
    assert_eq!(cb.state(), State::Open);
}

#[test]
fn a_time_window_does_not_cap_minimum_calls() {
    let clock = ManualClock::new();
    let cb = builder(&clock)
        .window(Window::Time(SEC))
        .minimum_calls(5)
        .build()
        .unwrap();
    record(&cb, "ffff");
    assert_eq!(cb.state(), State::Closed);
    record(&cb, "f");
    assert_eq!(cb.state(), State::Open);
}

#[test]
fn slow_calls_open_the_breaker_and_the_limit_is_strict() {
    let clock = ManualClock::new();
    let cb = builder(&clock)
        .slow_call_duration(2 * SEC)
        .slow_call_rate_threshold(0.5)
        .build()
        .unwrap();
    for _ in 0..3 {
        let p = cb.try_acquire().unwrap();
        clock.advance(2 * SEC); // exactly the limit: not slow
        p.success();
    }
    assert_eq!(cb.metrics().slow_calls, 0);
    for _ in 0..2 {
        let p = cb.try_acquire().unwrap();
        clock.advance(2 * SEC + Duration::from_nanos(1));
        p.success();
    }
    // 2/5 slow
    assert_eq!(cb.state(), State::Closed);
    let p = cb.try_acquire().unwrap();
    clock.advance(3 * SEC);
    p.failure(); // slow and failed: 3/6 slow
    assert_eq!(cb.state(), State::Open);
    let m = cb.metrics();
    assert_eq!((m.slow_calls, m.failed_calls), (3, 1));
    assert_eq!(m.slow_call_rate, Some(0.5));
}

#[test]
fn open_rejects_with_the_time_left_and_counts_rejections() {
    let clock = ManualClock::new();
    let cb = builder(&clock).build().unwrap();
    record(&cb, "ffff");
    clock.advance(4 * SEC);
    let r = cb.try_acquire().unwrap_err();
    assert_eq!(r.retry_after, 6 * SEC);
    assert_eq!(r.state, State::Open);
    assert_eq!(&*r.name, "dep");
    assert!(cb.try_acquire().is_err());
    assert_eq!(cb.metrics().not_permitted_calls, 2);
    let err: keel::Error<()> = r.into();
    assert!(matches!(err, keel::Error::CircuitOpen { retry_after } if retry_after == 6 * SEC));
}

#[test]
fn half_open_is_entered_lazily_by_the_next_call() {
    let clock = ManualClock::new();
    let cb = builder(&clock).build().unwrap();
    let seen = transitions(&cb);
    record(&cb, "ffff");
    clock.advance(10 * SEC);
    assert_eq!(cb.state(), State::Open, "no background task moves it");
    let probe = cb.try_acquire().unwrap();
    assert_eq!(cb.state(), State::HalfOpen);
    assert_eq!(cb.metrics().calls, 0, "metrics restart on entry");
    probe.success();
    assert_eq!(
        *seen.lock().unwrap(),
        [(State::Closed, State::Open), (State::Open, State::HalfOpen)]
    );
}

#[test]
fn half_open_admits_at_most_max_calls_and_decides_on_them() {
    let clock = ManualClock::new();
    let cb = builder(&clock).half_open_max_calls(3).build().unwrap();
    record(&cb, "ffff");
    clock.advance(10 * SEC);
    let a = cb.try_acquire().unwrap();
    let b = cb.try_acquire().unwrap();
    let c = cb.try_acquire().unwrap();
    let r = cb.try_acquire().unwrap_err();
    assert_eq!(r.state, State::HalfOpen);
    a.success();
    // A recorded probe does not free its slot: three probes in all.
    assert!(cb.try_acquire().is_err());
    b.failure();
    assert_eq!(cb.state(), State::HalfOpen);
    assert_eq!(cb.metrics().failure_rate, None);
    c.success(); // 1/3 failed < 0.5
    assert_eq!(cb.state(), State::Closed);
    assert_eq!(cb.metrics().calls, 0, "closed with fresh metrics");
}

#[test]
fn unhealthy_probes_reopen() {
    let clock = ManualClock::new();
    let cb = builder(&clock).build().unwrap();
    record(&cb, "ffff");
    clock.advance(10 * SEC);
    record(&cb, "sf"); // 1/2 >= 0.5
    assert_eq!(cb.state(), State::Open);
    assert_eq!(cb.try_acquire().unwrap_err().retry_after, 10 * SEC);
    let m = cb.metrics();
    assert_eq!((m.calls, m.failed_calls, m.failure_rate), (2, 1, Some(0.5)));
}

#[test]
fn a_dropped_or_ignored_probe_frees_its_slot() {
    let clock = ManualClock::new();
    let cb = builder(&clock).half_open_max_calls(1).build().unwrap();
    record(&cb, "ffff");
    clock.advance(10 * SEC);
    let probe = cb.try_acquire().unwrap();
    assert!(cb.try_acquire().is_err());
    drop(probe); // a cancelled call
    let probe = cb.try_acquire().expect("slot freed");
    probe.ignore();
    let probe = cb.try_acquire().expect("slot freed");
    assert_eq!(cb.state(), State::HalfOpen);
    probe.success();
    assert_eq!(cb.state(), State::Closed);
}

#[test]
fn slow_probes_reopen() {
    let clock = ManualClock::new();
    let cb = builder(&clock)
        .slow_call_duration(SEC)
        .slow_call_rate_threshold(1.0)
        .half_open_max_calls(1)
        .build()
        .unwrap();
    record(&cb, "ffff");
    clock.advance(10 * SEC);
    let p = cb.try_acquire().unwrap();
    clock.advance(2 * SEC);
    p.success();
    assert_eq!(cb.state(), State::Open);
    assert_eq!(cb.metrics().slow_calls, 1);
}

#[test]
fn open_backoff_lengthens_consecutive_reopens_until_close() {
    let clock = ManualClock::new();
    let cb = builder(&clock)
        .half_open_max_calls(1)
        .open_backoff(2.0, 35 * SEC)
        .build()
        .unwrap();
    record(&cb, "ffff");
    let mut waits = Vec::new();
    for _ in 0..4 {
        let wait = cb.try_acquire().unwrap_err().retry_after;
        waits.push(wait.as_secs());
        clock.advance(wait);
        record(&cb, "f");
    }
    assert_eq!(waits, [10, 20, 35, 35]);
    let wait = cb.try_acquire().unwrap_err().retry_after;
    clock.advance(wait);
    record(&cb, "s"); // closes: the wait returns to wait_in_open
    assert_eq!(cb.state(), State::Closed);
    record(&cb, "ffff");
    assert_eq!(cb.try_acquire().unwrap_err().retry_after, 10 * SEC);
}

#[test]
fn consecutive_failures_mode() {
    let clock = ManualClock::new();
    let cb = CircuitBreaker::builder("classic")
        .consecutive_failures(3)
        .half_open_max_calls(2)
        .wait_in_open(5 * SEC)
        .clock(clock.clone())
        .build()
        .unwrap();
    record(&cb, "ffsff"); // a success resets the count
    assert_eq!(cb.state(), State::Closed);
    record(&cb, "ii"); // ignored calls neither count nor reset
    record(&cb, "f");
    assert_eq!(cb.state(), State::Open);
    clock.advance(5 * SEC);
    record(&cb, "sf"); // any failure in HalfOpen reopens
    assert_eq!(cb.state(), State::Open);
    clock.advance(5 * SEC);
    record(&cb, "s");
    assert_eq!(cb.state(), State::HalfOpen);
    record(&cb, "s"); // half_open_max_calls successes close
    assert_eq!(cb.state(), State::Closed);
    record(&cb, "ff");
    assert_eq!(cb.state(), State::Closed, "the count restarted on close");
}

#[test]
fn forced_open_rejects_until_reset_and_disabled_records_nothing() {
    let clock = ManualClock::new();
    let cb = builder(&clock).build().unwrap();
    let seen = transitions(&cb);
    cb.force_open();
    clock.advance(3600 * SEC);
    let r = cb.try_acquire().unwrap_err();
    assert_eq!(r.state, State::ForcedOpen);
    assert_eq!(cb.metrics().not_permitted_calls, 1);
    cb.disable();
    record(&cb, "ffffffffff");
    assert_eq!(cb.state(), State::Disabled);
    assert_eq!(cb.metrics().failed_calls, 0);
    cb.reset();
    assert_eq!(cb.state(), State::Closed);
    assert_eq!(cb.metrics().not_permitted_calls, 0);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (State::Closed, State::ForcedOpen),
            (State::ForcedOpen, State::Disabled),
            (State::Disabled, State::Closed)
        ]
    );
}

#[test]
fn reset_empties_the_metrics() {
    let clock = ManualClock::new();
    let cb = builder(&clock).build().unwrap();
    record(&cb, "ffss");
    assert_eq!(cb.state(), State::Open);
    cb.reset();
    assert_eq!(cb.state(), State::Closed);
    assert_eq!(cb.metrics().calls, 0);
}

#[test]
fn outcomes_of_an_earlier_state_are_dropped() {
    let clock = ManualClock::new();
    let cb = builder(&clock).build().unwrap();
    let slow_call = cb.try_acquire().unwrap();
    record(&cb, "ffff");
    clock.advance(10 * SEC);
    record(&cb, "ss");
    assert_eq!(cb.state(), State::Closed);
    // The call admitted before the breaker opened ends now: not counted.
    slow_call.failure();
    assert_eq!(cb.metrics().calls, 0);
}

#[test]
fn clones_and_owned_permits_share_one_breaker() {
    let clock = ManualClock::new();
    let cb = builder(&clock).build().unwrap();
    let other = cb.clone();
    for _ in 0..4 {
        other.try_acquire_owned().unwrap().failure();
    }
    assert_eq!(cb.state(), State::Open);
}

#[test]
fn invalid_configuration_names_the_field() {
    let cases: Vec<(keel::circuit_breaker::Builder, &str)> = vec![
        (
            CircuitBreaker::builder("x").failure_rate_threshold(0.0),
            "failure_rate_threshold",
        ),
        (
            CircuitBreaker::builder("x").failure_rate_threshold(f64::NAN),
            "failure_rate_threshold",
        ),
        (
            CircuitBreaker::builder("x").slow_call_rate_threshold(2.0),
            "slow_call_rate_threshold",
        ),
        (
            CircuitBreaker::builder("x").window(Window::Count(0)),
            "window",
        ),
        (
            CircuitBreaker::builder("x").window(Window::Time(Duration::from_millis(500))),
            "window",
        ),
        (
            CircuitBreaker::builder("x").minimum_calls(0),
            "minimum_calls",
        ),
        (
            CircuitBreaker::builder("x").wait_in_open(Duration::ZERO),
            "wait_in_open",
        ),
        (
            CircuitBreaker::builder("x").half_open_max_calls(0),
            "half_open_max_calls",
        ),
        (
            CircuitBreaker::builder("x").half_open_max_calls(5000),
            "half_open_max_calls",
        ),
        (
            CircuitBreaker::builder("x").open_backoff(0.5, 100 * SEC),
            "open_backoff.multiplier",
        ),
        (
            CircuitBreaker::builder("x").open_backoff(2.0, SEC),
            "open_backoff.max",
        ),
        (
            CircuitBreaker::builder("x").consecutive_failures(0),
            "consecutive_failures",
        ),
    ];
    for (builder, field) in cases {
        let err = builder.build().unwrap_err();
        assert_eq!(err.field(), field, "{err}");
        assert!(err.to_string().starts_with(field));
    }
}

#[test]
fn many_threads_never_get_more_than_max_probes() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Barrier;
    for round in 0..50 {
        let clock = ManualClock::new();
        let cb = builder(&clock).half_open_max_calls(3).build().unwrap();
        record(&cb, "ffff");
        clock.advance(10 * SEC);
        let out = Arc::new(AtomicU32::new(0));
        let max_seen = Arc::new(AtomicU32::new(0));
        let admitted = Arc::new(AtomicU32::new(0));
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (cb, out, max_seen, admitted, barrier) = (
                    cb.clone(),
                    out.clone(),
                    max_seen.clone(),
                    admitted.clone(),
                    barrier.clone(),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    for i in 0..200 {
                        if let Ok(p) = cb.try_acquire() {
                            let now = out.fetch_add(1, Ordering::SeqCst) + 1;
                            max_seen.fetch_max(now, Ordering::SeqCst);
                            admitted.fetch_add(1, Ordering::SeqCst);
                            out.fetch_sub(1, Ordering::SeqCst);
                            // Drop most probes (cancelled calls), fail some.
                            if (i + t + round) % 7 == 0 {
                                p.failure();
                            } else {
                                drop(p);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(max_seen.load(Ordering::SeqCst) <= 3);
        assert!(admitted.load(Ordering::SeqCst) >= 1);
        // Nothing leaked: the breaker is open, or half-open with free slots.
        if cb.state() == State::HalfOpen {
            let probes: Vec<_> = (0..3).map(|_| cb.try_acquire()).collect();
            let got = probes.iter().filter(|p| p.is_ok()).count();
            let recorded = cb.metrics().calls as usize;
            assert_eq!(got + recorded, 3, "slots leaked");
        }
    }
}

#[test]
fn many_threads_recording_in_closed_keep_exact_counts() {
    let clock = ManualClock::new();
    let cb = CircuitBreaker::builder("busy")
        .window(Window::Count(1000))
        .failure_rate_threshold(1.0)
        .clock(clock.clone())
        .build()
        .unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let cb = cb.clone();
            std::thread::spawn(move || {
                for i in 0..10_000 {
                    let p = cb.try_acquire().unwrap();
                    if i % 10 == 0 {
                        p.failure()
                    } else {
                        p.success()
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let m = cb.metrics();
    assert_eq!(m.calls, 1000);
    assert!(m.failed_calls > 0 && m.failed_calls < 1000);
    assert_eq!(cb.state(), State::Closed);
}

#[test]
fn configuration_is_data_with_the_sidecars_names() {
    use keel::circuit_breaker::{CircuitBreakerConfig, WindowConfig};
    let config: CircuitBreakerConfig = toml::from_str(
        r#"
        failure_rate = 0.5
        window = { kind = "count", size = 4 }
        minimum_calls = 4
        open_duration = "30s"
        half_open_max_calls = 1
        "#,
    )
    .unwrap();
    assert_eq!(config.window, WindowConfig::Count { size: 4 });
    let cb = config.build("payment").unwrap();
    for _ in 0..4 {
        cb.try_acquire().unwrap().failure();
    }
    // Opened for open_duration (on the real clock: a moment has passed).
    let rejected = cb.try_acquire().unwrap_err();
    assert!(rejected.retry_after <= Duration::from_secs(30));
    assert!(rejected.retry_after > Duration::from_secs(20));

    let consecutive: CircuitBreakerConfig =
        toml::from_str("consecutive_failures = 2\nopen_duration = \"5s\"").unwrap();
    let cb = consecutive.build("inventory").unwrap();
    cb.try_acquire().unwrap().failure();
    cb.try_acquire().unwrap().failure();
    assert!(cb.try_acquire().is_err());

    let time: CircuitBreakerConfig =
        toml::from_str(r#"window = { kind = "time", duration = "10s" }"#).unwrap();
    assert_eq!(
        time.window,
        WindowConfig::Time {
            duration: Duration::from_secs(10)
        }
    );
    time.build("t").unwrap();

    let err = |text: &str| {
        toml::from_str::<CircuitBreakerConfig>(text)
            .unwrap()
            .build("x")
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err("failure_rate = 1.5"),
        "failure_rate: must be a fraction in (0, 1], got 1.5"
    );
    assert!(err("open_duration = \"0s\"").starts_with("open_duration:"));
    assert!(err("window = { kind = \"count\", size = 0 }").starts_with("window:"));
    let unknown = toml::from_str::<CircuitBreakerConfig>("failure_rat = 0.5").unwrap_err();
    assert!(unknown.to_string().contains("failure_rat"), "{unknown}");
}
