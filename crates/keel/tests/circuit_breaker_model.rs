//! Model-based test of the circuit breaker: random sequences of acquire,
//! success, failure, ignore, drop, clock advances and manual transitions are
//! run against the breaker and against a small reference model written from
//! the specification, and every observable (admission, `retry_after`, state,
//! metrics) must agree after every step. Both trip modes and both window
//! kinds are covered.

use std::collections::VecDeque;
use std::time::Duration;

use keel::circuit_breaker::{CircuitBreaker, OwnedPermit, State, Window};
use keel::clock::ManualClock;
use proptest::prelude::*;

const MS: u64 = 1_000_000;

#[derive(Debug, Clone, Copy)]
enum Trip {
    /// Failure-rate threshold, and slow-call detection (duration ms, rate).
    Rate {
        failure: f64,
        slow: Option<(u64, f64)>,
    },
    Consecutive(u32),
}

#[derive(Debug, Clone, Copy)]
enum Win {
    Count(u32),
    Seconds(u64),
}

#[derive(Debug, Clone, Copy)]
struct Setup {
    trip: Trip,
    window: Win,
    minimum_calls: u32,
    half_open_max: u32,
    wait_ms: u64,
    /// Multiplier and cap (ms) for consecutive reopens.
    backoff: Option<(f64, u64)>,
}

impl Setup {
    fn build(&self, clock: &ManualClock) -> CircuitBreaker {
        let mut b = CircuitBreaker::builder("model")
            .window(match self.window {
                Win::Count(n) => Window::Count(n),
                Win::Seconds(s) => Window::Time(Duration::from_secs(s)),
            })
            .minimum_calls(self.minimum_calls)
            .half_open_max_calls(self.half_open_max)
            .wait_in_open(Duration::from_millis(self.wait_ms))
            .clock(clock.clone());
        match self.trip {
            Trip::Rate { failure, slow } => {
                b = b.failure_rate_threshold(failure);
                b = match slow {
                    Some((ms, rate)) => b
                        .slow_call_duration(Duration::from_millis(ms))
                        .slow_call_rate_threshold(rate),
                    None => b.disable_slow_call_detection(),
                };
            }
            Trip::Consecutive(n) => b = b.consecutive_failures(n),
        }
        if let Some((multiplier, max)) = self.backoff {
            b = b.open_backoff(multiplier, Duration::from_millis(max));
        }
        b.build().expect("valid setup")
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Acquire,
    Success(usize),
    Failure(usize),
    Ignore(usize),
    Drop(usize),
    Advance(u64),
    ForceOpen,
    Disable,
    Reset,
}

// ---- the reference model ----------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum MState {
    Closed,
    /// `probe_metrics`: it reopened from HalfOpen, so metrics show the probes.
    Open {
        probe_metrics: bool,
    },
    HalfOpen,
    ForcedOpen,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Closed,
    Probe,
    Disabled,
}

#[derive(Debug, Clone, Copy)]
struct MPermit {
    kind: Kind,
    epoch: u64,
    start_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    calls: u64,
    failed: u64,
    slow: u64,
}

#[derive(Debug)]
struct Model {
    setup: Setup,
    state: MState,
    epoch: u64,
    now_ms: u64,
    open_until_nanos: u64,
    opens_since_close: u32,
    /// (second recorded in, failed, slow), oldest first.
    window: VecDeque<(u64, bool, bool)>,
    consecutive: u32,
    probes_out: u32,
    probes: Counts,
    not_permitted: u64,
}

impl Model {
    fn new(setup: Setup) -> Self {
        Model {
            setup,
            state: MState::Closed,
            epoch: 0,
            now_ms: 0,
            open_until_nanos: 0,
            opens_since_close: 0,
            window: VecDeque::new(),
            consecutive: 0,
            probes_out: 0,
            probes: Counts::default(),
            not_permitted: 0,
        }
    }

    fn minimum_calls(&self) -> u64 {
        match self.setup.window {
            Win::Count(n) => u64::from(self.setup.minimum_calls.min(n)),
            Win::Seconds(_) => u64::from(self.setup.minimum_calls),
        }
    }

    fn window_counts(&self) -> Counts {
        let now_sec = self.now_ms / 1000;
        let mut c = Counts::default();
        for &(sec, failed, slow) in &self.window {
            let live = match self.setup.window {
                Win::Count(_) => true,
                Win::Seconds(len) => sec + len > now_sec,
            };
            if live {
                c.calls += 1;
                c.failed += u64::from(failed);
                c.slow += u64::from(slow);
            }
        }
        c
    }

    fn reached(&self, c: Counts, minimum: u64) -> bool {
        let Trip::Rate { failure, slow } = self.setup.trip else {
            unreachable!("rates trip only in rate mode")
        };
        let slow_rate = slow.map_or(1.0, |(_, r)| r);
        c.calls >= minimum
            && c.calls > 0
            && (c.failed as f64 / c.calls as f64 >= failure
                || c.slow as f64 / c.calls as f64 >= slow_rate)
    }

    fn is_slow(&self, permit: &MPermit) -> bool {
        match self.setup.trip {
            Trip::Rate {
                slow: Some((ms, _)),
                ..
            } => self.now_ms - permit.start_ms > ms,
            _ => false,
        }
    }

    fn open_wait_nanos(&self) -> u64 {
        match self.setup.backoff {
            Some((multiplier, max)) => {
                let secs = Duration::from_millis(self.setup.wait_ms).as_secs_f64()
                    * multiplier.powi(self.opens_since_close as i32);
                if secs < Duration::from_millis(max).as_secs_f64() {
                    Duration::from_secs_f64(secs).as_nanos() as u64
                } else {
                    max * MS
                }
            }
            None => self.setup.wait_ms * MS,
        }
    }

    fn open(&mut self, probe_metrics: bool) {
        let wait = self.open_wait_nanos();
        self.opens_since_close += 1;
        self.open_until_nanos = self.now_ms * MS + wait;
        self.epoch += 1;
        self.state = MState::Open { probe_metrics };
    }

    fn close(&mut self) {
        self.epoch += 1;
        self.state = MState::Closed;
        self.window.clear();
        self.consecutive = 0;
        self.not_permitted = 0;
        self.opens_since_close = 0;
    }

    /// Admission: the permit, or the `retry_after` of the rejection.
    fn acquire(&mut self) -> Result<MPermit, Duration> {
        let permit = |kind, epoch, start_ms| MPermit {
            kind,
            epoch,
            start_ms,
        };
        match self.state {
            MState::Closed => Ok(permit(Kind::Closed, self.epoch, self.now_ms)),
            MState::Disabled => Ok(permit(Kind::Disabled, self.epoch, self.now_ms)),
            MState::ForcedOpen => {
                self.not_permitted += 1;
                Err(Duration::from_millis(self.setup.wait_ms))
            }
            MState::Open { .. } => {
                let now = self.now_ms * MS;
                if now < self.open_until_nanos {
                    self.not_permitted += 1;
                    return Err(Duration::from_nanos(self.open_until_nanos - now));
                }
                self.epoch += 1;
                self.state = MState::HalfOpen;
                self.probes_out = 1;
                self.probes = Counts::default();
                self.not_permitted = 0;
                Ok(permit(Kind::Probe, self.epoch, self.now_ms))
            }
            MState::HalfOpen => {
                if u64::from(self.probes_out) + self.probes.calls
                    >= u64::from(self.setup.half_open_max)
                {
                    self.not_permitted += 1;
                    return Err(Duration::from_millis(self.setup.wait_ms));
                }
                self.probes_out += 1;
                Ok(permit(Kind::Probe, self.epoch, self.now_ms))
            }
        }
    }

    /// Records an outcome: `Some(failed)`, or `None` for ignore / drop.
    fn record(&mut self, permit: MPermit, outcome: Option<bool>) {
        match permit.kind {
            Kind::Disabled => {}
            Kind::Closed => {
                if self.state != MState::Closed || permit.epoch != self.epoch {
                    return;
                }
                let Some(failed) = outcome else { return };
                let slow = self.is_slow(&permit);
                self.window.push_back((self.now_ms / 1000, failed, slow));
                if let Win::Count(n) = self.setup.window {
                    while self.window.len() > n as usize {
                        self.window.pop_front();
                    }
                }
                match self.setup.trip {
                    Trip::Rate { .. } => {
                        if self.reached(self.window_counts(), self.minimum_calls()) {
                            self.open(false);
                        }
                    }
                    Trip::Consecutive(n) => {
                        if failed {
                            self.consecutive += 1;
                            if self.consecutive >= n {
                                self.open(false);
                            }
                        } else {
                            self.consecutive = 0;
                        }
                    }
                }
            }
            Kind::Probe => {
                if self.state != MState::HalfOpen || permit.epoch != self.epoch {
                    return;
                }
                self.probes_out -= 1;
                let Some(failed) = outcome else { return };
                let slow = self.is_slow(&permit);
                self.probes.calls += 1;
                self.probes.failed += u64::from(failed);
                self.probes.slow += u64::from(slow);
                let max = u64::from(self.setup.half_open_max);
                match self.setup.trip {
                    Trip::Consecutive(_) if failed => self.open(true),
                    Trip::Consecutive(_) if self.probes.calls >= max => self.close(),
                    Trip::Rate { .. } if self.probes.calls >= max => {
                        if self.reached(self.probes, max) {
                            self.open(true);
                        } else {
                            self.close();
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn force(&mut self, state: MState) {
        if state == MState::Closed {
            self.close();
        } else {
            self.epoch += 1;
            self.state = state;
        }
    }

    fn state(&self) -> State {
        match self.state {
            MState::Closed => State::Closed,
            MState::Open { .. } => State::Open,
            MState::HalfOpen => State::HalfOpen,
            MState::ForcedOpen => State::ForcedOpen,
            MState::Disabled => State::Disabled,
        }
    }

    fn expected_metrics(&self) -> (Counts, Option<f64>, Option<f64>, u64) {
        let probing = matches!(
            self.state,
            MState::HalfOpen
                | MState::Open {
                    probe_metrics: true
                }
        );
        let (c, minimum) = if probing {
            (self.probes, u64::from(self.setup.half_open_max))
        } else {
            (self.window_counts(), self.minimum_calls())
        };
        let enough = c.calls >= minimum && c.calls > 0;
        (
            c,
            enough.then(|| c.failed as f64 / c.calls as f64),
            enough.then(|| c.slow as f64 / c.calls as f64),
            self.not_permitted,
        )
    }
}

// ---- running both side by side ----------------------------------------------

/// Runs `ops` on both; returns the states the breaker went through.
fn run(setup: Setup, ops: &[Op]) -> Result<Vec<State>, TestCaseError> {
    let clock = ManualClock::new();
    let cb = setup.build(&clock);
    let mut model = Model::new(setup);
    let mut permits: Vec<(OwnedPermit, MPermit)> = Vec::new();
    let mut seen = vec![State::Closed];

    for (step, &op) in ops.iter().enumerate() {
        match op {
            Op::Acquire => match (cb.try_acquire_owned(), model.acquire()) {
                (Ok(real), Ok(expected)) => permits.push((real, expected)),
                (Err(rejected), Err(retry_after)) => {
                    prop_assert_eq!(
                        rejected.retry_after,
                        retry_after,
                        "step {}: retry_after",
                        step
                    )
                }
                (real, expected) => prop_assert!(
                    false,
                    "step {}: breaker admitted: {}, model admitted: {}",
                    step,
                    real.is_ok(),
                    expected.is_ok()
                ),
            },
            Op::Success(i) | Op::Failure(i) | Op::Ignore(i) | Op::Drop(i) => {
                if permits.is_empty() {
                    continue;
                }
                let (real, expected) = permits.swap_remove(i % permits.len());
                let outcome = match op {
                    Op::Success(_) => Some(false),
                    Op::Failure(_) => Some(true),
                    _ => None,
                };
                match op {
                    Op::Success(_) => real.success(),
                    Op::Failure(_) => real.failure(),
                    Op::Ignore(_) => real.ignore(),
                    _ => drop(real),
                }
                model.record(expected, outcome);
            }
            Op::Advance(ms) => {
                clock.advance(Duration::from_millis(ms));
                model.now_ms += ms;
            }
            Op::ForceOpen => {
                cb.force_open();
                model.force(MState::ForcedOpen);
            }
            Op::Disable => {
                cb.disable();
                model.force(MState::Disabled);
            }
            Op::Reset => {
                cb.reset();
                model.force(MState::Closed);
            }
        }
        prop_assert_eq!(cb.state(), model.state(), "step {}: {:?}", step, op);
        if seen.last() != Some(&cb.state()) {
            seen.push(cb.state());
        }
        let m = cb.metrics();
        let (c, failure_rate, slow_rate, not_permitted) = model.expected_metrics();
        prop_assert_eq!(
            (m.calls, m.failed_calls, m.successful_calls, m.slow_calls),
            (c.calls, c.failed, c.calls - c.failed, c.slow),
            "step {}: counts after {:?}",
            step,
            op
        );
        prop_assert_eq!(m.failure_rate, failure_rate, "step {}: failure_rate", step);
        prop_assert_eq!(m.slow_call_rate, slow_rate, "step {}: slow_call_rate", step);
        prop_assert_eq!(
            m.not_permitted_calls,
            not_permitted,
            "step {}: not_permitted",
            step
        );
    }
    Ok(seen)
}

// ---- strategies ---------------------------------------------------------------

fn threshold() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.25), Just(0.5), Just(0.75), Just(1.0)]
}

fn trip() -> impl Strategy<Value = Trip> {
    prop_oneof![
        3 => (
            threshold(),
            proptest::option::of((prop_oneof![Just(500u64), Just(1000)], threshold()))
        )
            .prop_map(|(failure, slow)| Trip::Rate { failure, slow }),
        2 => (1u32..=4).prop_map(Trip::Consecutive),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        trip(),
        prop_oneof![
            (1u32..=8).prop_map(Win::Count),
            (1u64..=3).prop_map(Win::Seconds)
        ],
        1u32..=8,
        1u32..=3,
        prop_oneof![Just(1000u64), Just(2500)],
        proptest::option::of((prop_oneof![Just(1.5f64), Just(2.0)], Just(6000u64))),
    )
        .prop_map(
            |(trip, window, minimum_calls, half_open_max, wait_ms, backoff)| Setup {
                trip,
                window,
                minimum_calls,
                half_open_max,
                wait_ms,
                backoff,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Acquire),
        4 => any::<usize>().prop_map(Op::Success),
        4 => any::<usize>().prop_map(Op::Failure),
        1 => any::<usize>().prop_map(Op::Ignore),
        1 => any::<usize>().prop_map(Op::Drop),
        3 => prop_oneof![Just(500u64), Just(1000), Just(1001), 0u64..3000].prop_map(Op::Advance),
        1 => prop_oneof![
            8 => Just(Op::Reset),
            1 => Just(Op::ForceOpen),
            1 => Just(Op::Disable),
        ],
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn breaker_follows_the_reference_model(
        setup in setup(),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        run(setup, &ops)?;
    }
}

/// The harness itself sees every state (a check that it is not vacuous).
#[test]
fn the_model_reaches_every_state() {
    let setup = Setup {
        trip: Trip::Consecutive(1),
        window: Win::Count(2),
        minimum_calls: 1,
        half_open_max: 1,
        wait_ms: 1000,
        backoff: None,
    };
    let ops = [
        Op::Acquire,
        Op::Failure(0),
        Op::Acquire,
        Op::Advance(1000),
        Op::Acquire,
        Op::Acquire,
        Op::Success(0),
        Op::ForceOpen,
        Op::Disable,
        Op::Reset,
    ];
    let seen = run(setup, &ops).unwrap();
    assert_eq!(
        seen,
        [
            State::Closed,
            State::Open,
            State::HalfOpen,
            State::Closed,
            State::ForcedOpen,
            State::Disabled,
            State::Closed
        ]
    );
}
