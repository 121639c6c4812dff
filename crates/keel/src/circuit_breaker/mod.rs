//! Circuit breaker: stop calling a dependency that is failing, let it recover,
//! probe it, and resume.
//!
//! ```text
//!              failure or slow-call rate >= threshold
//!              (or n consecutive failures)
//!   ┌────────┐ ─────────────────────────────────────▶ ┌──────┐
//!   │ Closed │                                        │ Open │ rejects with retry_after
//!   └────────┘ ◀──────┐                      ┌──────▶ └──────┘
//!    traffic flows    │ probes healthy       │ probes unhealthy  │ wait_in_open elapsed:
//!                     │                      │                   │ the next call is a probe
//!                   ┌──────────────────────────┐                 │
//!                   │ HalfOpen                 │ ◀───────────────┘
//!                   │ at most half_open_max    │
//!                   │ probes out               │
//!                   └──────────────────────────┘
//!   ForcedOpen (rejects all) and Disabled (admits all, records nothing)
//!   are entered by force_open() / disable() and left by reset().
//! ```
//!
//! Closed means traffic flows. The semantics follow resilience4j's where peers
//! disagree.
//!
//! ```
//! use keel::circuit_breaker::{CircuitBreaker, State, Window};
//! use keel::clock::ManualClock;
//! use std::time::Duration;
//!
//! let clock = ManualClock::new();
//! let cb = CircuitBreaker::builder("payment")
//!     .failure_rate_threshold(0.5)
//!     .window(Window::Count(4))
//!     .minimum_calls(4)
//!     .wait_in_open(Duration::from_secs(30))
//!     .half_open_max_calls(1)
//!     .clock(clock.clone())
//!     .build()?;
//!
//! for ok in [true, false, true, false] {
//!     let permit = cb.try_acquire()?;
//!     if ok { permit.success() } else { permit.failure() }
//! }
//! assert_eq!(cb.state(), State::Open);
//! let rejected = cb.try_acquire().unwrap_err();
//! assert_eq!(rejected.retry_after, Duration::from_secs(30));
//!
//! clock.advance(Duration::from_secs(30));
//! cb.try_acquire()?.success(); // the probe
//! assert_eq!(cb.state(), State::Closed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # How it is built
//!
//! All of a breaker's state that admission needs lives in one `AtomicU64`: the
//! state, an epoch that changes on every transition, and in HalfOpen the
//! probes out, recorded, failed and slow. Admission in Closed is one atomic
//! load. Recording in Closed goes to a lock-free window (see `window.rs`);
//! HalfOpen admission and recording are compare-and-swap loops on the state
//! word, so no more than `half_open_max_calls` probes can ever be out.
//! Transitions, which are rare, take a mutex so that they and their events
//! happen one at a time. A permit remembers the epoch it was issued in; an
//! outcome recorded after the breaker moved on is about an older state and is
//! dropped.

mod config;
mod window;

#[cfg(feature = "tower")]
mod layer;
#[cfg(feature = "tower")]
pub use layer::{CircuitBreakerLayer, CircuitBreakerService, ResponseFuture};

pub use config::{CircuitBreakerConfig, WindowConfig};
pub use window::Window;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::classify::{classify_lifted, Classify, Outcome};
use crate::clock::{duration_nanos, Clock, ClockSource, SharedClock};
use crate::error::{check_fraction, ConfigError};
use crate::events::{EventKind, Listeners, Policy, PolicyEvents, Reason};
use crate::sync::{lock, AtomicU64, Mutex, Ordering};
use crate::telemetry;
use crate::Error;
use window::{Calls, Counts, FAILED, SLOW};

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls flow; outcomes are recorded.
    Closed,
    /// Calls are rejected until `wait_in_open` has passed.
    Open,
    /// A limited number of probe calls decide whether to close or reopen.
    HalfOpen,
    /// Calls are rejected until [`CircuitBreaker::reset`].
    ForcedOpen,
    /// Calls flow and nothing is recorded until [`CircuitBreaker::reset`].
    Disabled,
}

impl State {
    /// Lower-case name, as used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A call the breaker did not admit.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rejected {
    /// How long until the breaker may admit a call. For `Open`, the time left
    /// in the open state; for `HalfOpen` (all probes out) and `ForcedOpen`,
    /// `wait_in_open` as a hint.
    pub retry_after: Duration,
    /// The state that rejected the call.
    pub state: State,
    /// The breaker's name.
    pub name: Arc<str>,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit breaker `{}` is {}: call not permitted; retry after {:?}",
            self.name, self.state, self.retry_after
        )
    }
}

impl std::error::Error for Rejected {}

/// A state change, as delivered to [`CircuitBreaker::on_state_transition`]
/// listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateTransition {
    /// The breaker's name.
    pub name: Arc<str>,
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
}

/// A snapshot of a breaker's window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    /// Failed calls / calls, or `None` below the minimum number of calls
    /// (`minimum_calls` when closed, `half_open_max_calls` when probing).
    pub failure_rate: Option<f64>,
    /// Slow calls / calls, with the same minimum.
    pub slow_call_rate: Option<f64>,
    /// Calls in the window (successes and failures; ignored calls are not).
    pub calls: u64,
    /// Failed calls in the window.
    pub failed_calls: u64,
    /// Successful calls in the window.
    pub successful_calls: u64,
    /// Slow calls in the window (successful or failed).
    pub slow_calls: u64,
    /// Calls rejected since the metrics last restarted (entering Closed or
    /// HalfOpen, or `reset`).
    pub not_permitted_calls: u64,
}

// ---- the state word -------------------------------------------------------

const STATE_MASK: u64 = 0b111;
const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const FORCED_OPEN: u64 = 3;
const DISABLED: u64 = 4;
/// Set in Open when its metrics are the probes' (it reopened from HalfOpen).
const PROBE_METRICS: u64 = 1 << 3;
const OUT: u32 = 4;
const RECORDED: u32 = 14;
const FAILED_PROBES: u32 = 24;
const SLOW_PROBES: u32 = 34;
const EPOCH: u32 = 44;
const FIELD: u64 = 0x3ff;
const EPOCH_MASK: u64 = (1 << (64 - EPOCH)) - 1;
/// The largest `half_open_max_calls` the state word can count.
pub const MAX_HALF_OPEN_CALLS: u32 = FIELD as u32;

fn state_of(word: u64) -> State {
    match word & STATE_MASK {
        CLOSED => State::Closed,
        OPEN => State::Open,
        HALF_OPEN => State::HalfOpen,
        FORCED_OPEN => State::ForcedOpen,
        _ => State::Disabled,
    }
}

fn epoch_of(word: u64) -> u64 {
    word >> EPOCH
}

fn field(word: u64, shift: u32) -> u64 {
    (word >> shift) & FIELD
}

/// The word for `state` in the epoch after `word`'s.
fn next_word(word: u64, state: u64) -> u64 {
    state | (((epoch_of(word) + 1) & EPOCH_MASK) << EPOCH)
}

// ---- configuration --------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Trip {
    Rate,
    Consecutive(u64),
}

#[derive(Debug)]
struct Config {
    failure_rate: f64,
    slow_rate: f64,
    /// Calls strictly longer than this are slow; `None`: no slow-call detection.
    slow_nanos: Option<u64>,
    minimum_calls: u64,
    half_open_max: u64,
    wait_in_open: Duration,
    open_backoff: Option<(f64, Duration)>,
    trip: Trip,
}

impl Config {
    fn rates_reached(&self, c: Counts, minimum: u64) -> bool {
        c.calls >= minimum
            && c.calls > 0
            && (rate(c.failed, c.calls) >= self.failure_rate
                || rate(c.slow, c.calls) >= self.slow_rate)
    }

    /// Whether permits need a start time: only slow-call detection uses it.
    fn times_calls(&self) -> bool {
        self.slow_nanos.is_some() && self.trip == Trip::Rate
    }
}

fn rate(n: u64, calls: u64) -> f64 {
    n as f64 / calls as f64
}

/// Builds a [`CircuitBreaker`]. Defaults are resilience4j's.
#[derive(Debug, Clone)]
pub struct Builder {
    name: Arc<str>,
    failure_rate_threshold: f64,
    window: Window,
    minimum_calls: u32,
    slow_call_duration: Option<Duration>,
    slow_call_rate_threshold: f64,
    wait_in_open: Duration,
    half_open_max_calls: u32,
    open_backoff: Option<(f64, Duration)>,
    consecutive_failures: Option<u32>,
    clock: Option<SharedClock>,
}

impl Builder {
    /// Open when this fraction of the window's calls failed (in (0, 1];
    /// default 0.5).
    pub fn failure_rate_threshold(mut self, threshold: f64) -> Self {
        self.failure_rate_threshold = threshold;
        self
    }

    /// The window the rates are computed over (default `Window::Count(100)`).
    pub fn window(mut self, window: Window) -> Self {
        self.window = window;
        self
    }

    /// No rate is computed below this many calls in the window (default 100;
    /// for a count window, capped at its size).
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.minimum_calls = n;
        self
    }

    /// A call that takes strictly longer than this is slow (default 60 s).
    pub fn slow_call_duration(mut self, d: Duration) -> Self {
        self.slow_call_duration = Some(d);
        self
    }

    /// Turns slow-call detection off: calls are not timed, which spares two
    /// clock reads per call.
    pub fn disable_slow_call_detection(mut self) -> Self {
        self.slow_call_duration = None;
        self
    }

    /// Open when this fraction of the window's calls were slow (in (0, 1];
    /// default 1.0).
    pub fn slow_call_rate_threshold(mut self, threshold: f64) -> Self {
        self.slow_call_rate_threshold = threshold;
        self
    }

    /// How long to stay open before probing (default 60 s).
    pub fn wait_in_open(mut self, d: Duration) -> Self {
        self.wait_in_open = d;
        self
    }

    /// How many probes HalfOpen admits and waits for (default 10, at most
    /// [`MAX_HALF_OPEN_CALLS`]).
    pub fn half_open_max_calls(mut self, n: u32) -> Self {
        self.half_open_max_calls = n;
        self
    }

    /// Each consecutive reopen waits `multiplier` times longer than the last,
    /// up to `max`; the wait returns to `wait_in_open` once the breaker closes.
    pub fn open_backoff(mut self, multiplier: f64, max: Duration) -> Self {
        self.open_backoff = Some((multiplier, max));
        self
    }

    /// Trip after `n` consecutive failures instead of on rates. In HalfOpen
    /// any failure reopens and `half_open_max_calls` successes close. Slow
    /// calls are not considered in this mode.
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = Some(n);
        self
    }

    /// The clock calls are timed and open states are measured with
    /// (default [`MonotonicClock`](crate::clock::MonotonicClock)).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Validates the configuration and builds the breaker.
    pub fn build(self) -> Result<CircuitBreaker, ConfigError> {
        check_fraction("failure_rate_threshold", self.failure_rate_threshold)?;
        check_fraction("slow_call_rate_threshold", self.slow_call_rate_threshold)?;
        match self.window {
            Window::Count(n) if n == 0 || n > 1 << 24 => {
                return Err(ConfigError::new(
                    "window",
                    format!("a count window holds 1 to 16777216 calls, got {n}"),
                ))
            }
            Window::Time(d) if d < Duration::from_secs(1) || d > Duration::from_secs(86_400) => {
                return Err(ConfigError::new(
                    "window",
                    format!("a time window spans 1 s to 24 h, got {d:?}"),
                ))
            }
            _ => {}
        }
        if self.minimum_calls == 0 {
            return Err(ConfigError::new("minimum_calls", "must be at least 1"));
        }
        if self.wait_in_open.is_zero() {
            return Err(ConfigError::new("wait_in_open", "must be longer than zero"));
        }
        if self.half_open_max_calls == 0 || self.half_open_max_calls > MAX_HALF_OPEN_CALLS {
            return Err(ConfigError::new(
                "half_open_max_calls",
                format!(
                    "must be between 1 and {MAX_HALF_OPEN_CALLS}, got {}",
                    self.half_open_max_calls
                ),
            ));
        }
        if let Some((multiplier, max)) = self.open_backoff {
            if !(multiplier >= 1.0 && multiplier.is_finite()) {
                return Err(ConfigError::new(
                    "open_backoff.multiplier",
                    format!("must be a finite number of at least 1, got {multiplier}"),
                ));
            }
            if max < self.wait_in_open {
                return Err(ConfigError::new(
                    "open_backoff.max",
                    format!(
                        "must be at least wait_in_open ({:?}), got {max:?}",
                        self.wait_in_open
                    ),
                ));
            }
        }
        let trip = match self.consecutive_failures {
            Some(0) => {
                return Err(ConfigError::new(
                    "consecutive_failures",
                    "must be at least 1",
                ))
            }
            Some(n) => Trip::Consecutive(u64::from(n)),
            None => Trip::Rate,
        };
        let minimum_calls = match self.window {
            Window::Count(n) => self.minimum_calls.min(n),
            Window::Time(_) => self.minimum_calls,
        };
        let config = Config {
            failure_rate: self.failure_rate_threshold,
            slow_rate: self.slow_call_rate_threshold,
            slow_nanos: self.slow_call_duration.map(duration_nanos),
            minimum_calls: u64::from(minimum_calls),
            half_open_max: u64::from(self.half_open_max_calls),
            wait_in_open: self.wait_in_open,
            open_backoff: self.open_backoff,
            trip,
        };
        let telemetry = Telemetry::new(&self.name);
        telemetry.show_state(State::Closed);
        Ok(CircuitBreaker {
            shared: Arc::new(Shared {
                events: PolicyEvents::new(Policy::CircuitBreaker, self.name.clone()),
                telemetry,
                name: self.name,
                clock: ClockSource::new(self.clock),
                state: AtomicU64::new(CLOSED),
                open_until: AtomicU64::new(0),
                calls: Calls::new(self.window),
                consecutive: AtomicU64::new(0),
                not_permitted: AtomicU64::new(0),
                opens_since_close: Mutex::new(0),
                listeners: Listeners::default(),
                config,
            }),
        })
    }
}

// ---- the breaker ----------------------------------------------------------

/// A circuit breaker: a cheap, cloneable handle; clones share one breaker.
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

struct Shared {
    name: Arc<str>,
    config: Config,
    clock: ClockSource,
    state: AtomicU64,
    /// Clock time (ns) at which Open may move to HalfOpen.
    open_until: AtomicU64,
    calls: Calls,
    /// Consecutive failures while Closed (consecutive trip mode).
    consecutive: AtomicU64,
    not_permitted: AtomicU64,
    /// Serializes transitions; counts opens since the last close (for
    /// `open_backoff`).
    opens_since_close: Mutex<u32>,
    listeners: Listeners<StateTransition>,
    events: PolicyEvents,
    telemetry: Telemetry,
}

/// The breaker's metric handles. Calls are counted where the caller names
/// the dependency (`observe`), not here: the closed path stays a load, a
/// window update and no metric call.
struct Telemetry {
    rejected: metrics::Counter,
    /// One gauge per state, in `STATES` order.
    states: Vec<(State, metrics::Gauge)>,
    failure_rate: metrics::Gauge,
}

const STATES: [State; 5] = [
    State::Closed,
    State::Open,
    State::HalfOpen,
    State::ForcedOpen,
    State::Disabled,
];

impl Telemetry {
    fn new(name: &Arc<str>) -> Self {
        let policy = Policy::CircuitBreaker;
        Telemetry {
            rejected: telemetry::rejections(policy, name, Reason::CircuitOpen),
            states: STATES
                .iter()
                .map(|&state| {
                    let gauge = metrics::gauge!(
                        telemetry::BREAKER_STATE,
                        "name" => name.to_string(),
                        "state" => state.as_str()
                    );
                    (state, gauge)
                })
                .collect(),
            failure_rate: telemetry::gauge(telemetry::BREAKER_FAILURE_RATE, name),
        }
    }

    fn show_state(&self, now: State) {
        for (state, gauge) in &self.states {
            gauge.set(if *state == now { 1.0 } else { 0.0 });
        }
        if now == State::Closed {
            self.failure_rate.set(0.0);
        }
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// What a permit needs to record its outcome: the state it was admitted in
/// (CLOSED, HALF_OPEN or DISABLED; DONE once recorded) with that state's
/// epoch, packed like the state word, and the call's start time.
///
/// Two plain `u64`s: a permit is built and moved on every call, and mixing a
/// byte-sized field with word-sized copies stalls store forwarding.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    word: u64,
    start: u64,
}

/// A ticket's state once its outcome is recorded (not a breaker state).
const DONE: u64 = STATE_MASK;

/// For `Debug`: the state a permit was admitted in, or that it is recorded.
fn ticket_state(ticket: Ticket) -> &'static str {
    match ticket.state() {
        DONE => "recorded",
        state => state_of(state).as_str(),
    }
}

impl Ticket {
    fn new(state: u64, word: u64, start: u64) -> Self {
        Ticket {
            word: state | (word & (EPOCH_MASK << EPOCH)),
            start,
        }
    }

    fn state(&self) -> u64 {
        self.word & STATE_MASK
    }

    fn epoch(&self) -> u64 {
        epoch_of(self.word)
    }
}

impl CircuitBreaker {
    /// A builder for a breaker called `name` (used in errors, events, metrics).
    pub fn builder(name: impl Into<Arc<str>>) -> Builder {
        Builder {
            name: name.into(),
            failure_rate_threshold: 0.5,
            window: Window::Count(100),
            minimum_calls: 100,
            slow_call_duration: Some(Duration::from_secs(60)),
            slow_call_rate_threshold: 1.0,
            wait_in_open: Duration::from_secs(60),
            half_open_max_calls: 10,
            open_backoff: None,
            consecutive_failures: None,
            clock: None,
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The breaker's events: state changes and rejected calls.
    pub fn events(&self) -> &PolicyEvents {
        &self.shared.events
    }

    /// Asks to make a call. The permit records the call's outcome; dropping
    /// it unrecorded counts as [`Outcome::Ignore`].
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit<'_>, Rejected> {
        self.shared.acquire().map(|ticket| Permit {
            shared: &self.shared,
            ticket,
        })
    }

    /// Like [`try_acquire`](Self::try_acquire), with a permit that owns a
    /// handle to the breaker (for futures that must be `'static`).
    pub fn try_acquire_owned(&self) -> Result<OwnedPermit, Rejected> {
        self.shared.acquire().map(|ticket| OwnedPermit {
            breaker: self.clone(),
            ticket,
        })
    }

    /// The current state. An Open breaker whose wait has elapsed reports
    /// Open until the next call moves it to HalfOpen.
    pub fn state(&self) -> State {
        state_of(self.shared.state.load(Ordering::Acquire))
    }

    /// A snapshot of the window's counts and rates.
    pub fn metrics(&self) -> Metrics {
        self.shared.metrics()
    }

    /// Rejects every call until [`reset`](Self::reset).
    pub fn force_open(&self) {
        self.shared.transition_to(FORCED_OPEN);
    }

    /// Admits every call and records nothing until [`reset`](Self::reset).
    pub fn disable(&self) {
        self.shared.transition_to(DISABLED);
    }

    /// Back to Closed with empty metrics, from any state.
    pub fn reset(&self) {
        self.shared.transition_to(CLOSED);
    }

    /// Calls `listener` on every state transition, on the thread that caused
    /// it. Transitions are also [events](Self::events) (and so `tracing`
    /// events, target `keel`).
    pub fn on_state_transition(&self, listener: impl Fn(&StateTransition) + Send + Sync + 'static) {
        self.shared.listeners.add(listener);
    }

    /// Runs `op` if the breaker admits it and records its outcome (`Ok` is a
    /// success, `Err` a failure).
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_classified(&crate::classify::DefaultClassifier, op)
            .await
    }

    /// Like [`call`](Self::call), with a classifier deciding the outcome.
    pub async fn call_classified<T, E, C, F, Fut>(
        &self,
        classifier: &C,
        op: F,
    ) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire()?;
        let result = op().await.map_err(Error::Inner);
        let (verdict, result) = classify_lifted(classifier, result);
        permit.record(verdict.outcome);
        result
    }
}

impl Shared {
    #[inline]
    fn start_time(&self) -> u64 {
        if self.config.times_calls() {
            self.clock.now_nanos()
        } else {
            0
        }
    }

    #[inline]
    fn acquire(&self) -> Result<Ticket, Rejected> {
        let word = self.state.load(Ordering::Acquire);
        if word & STATE_MASK == CLOSED {
            return Ok(Ticket::new(CLOSED, word, self.start_time()));
        }
        self.acquire_slow(word)
    }

    #[cold]
    fn acquire_slow(&self, mut word: u64) -> Result<Ticket, Rejected> {
        loop {
            match word & STATE_MASK {
                CLOSED => return Ok(Ticket::new(CLOSED, word, self.start_time())),
                DISABLED => return Ok(Ticket::new(DISABLED, word, 0)),
                FORCED_OPEN => return Err(self.reject(State::ForcedOpen, self.config.wait_in_open)),
                OPEN => {
                    let now = self.clock.now_nanos();
                    let until = self.open_until.load(Ordering::Acquire);
                    if now < until {
                        return Err(self.reject(State::Open, Duration::from_nanos(until - now)));
                    }
                    let guard = lock(&self.opens_since_close);
                    let current = self.state.load(Ordering::Acquire);
                    if current != word {
                        drop(guard);
                        word = current;
                        continue;
                    }
                    // The wait is over: this call is the first probe.
                    let probing = next_word(word, HALF_OPEN) | (1 << OUT);
                    self.not_permitted.store(0, Ordering::Relaxed);
                    self.state.store(probing, Ordering::Release);
                    drop(guard);
                    self.announce(State::Open, State::HalfOpen);
                    return Ok(Ticket::new(HALF_OPEN, probing, self.start_time()));
                }
                _ => {
                    // HalfOpen: admit while probes out + recorded < max.
                    if field(word, OUT) + field(word, RECORDED) >= self.config.half_open_max {
                        return Err(self.reject(State::HalfOpen, self.config.wait_in_open));
                    }
                    match self.state.compare_exchange_weak(
                        word,
                        word + (1 << OUT),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return Ok(Ticket::new(HALF_OPEN, word, self.start_time())),
                        Err(actual) => word = actual,
                    }
                }
            }
        }
    }

    #[cold]
    fn reject(&self, state: State, retry_after: Duration) -> Rejected {
        self.not_permitted.fetch_add(1, Ordering::Relaxed);
        self.telemetry.rejected.increment(1);
        self.events.emit(EventKind::Rejected {
            reason: Reason::CircuitOpen,
            retry_after: Some(retry_after),
        });
        Rejected {
            retry_after,
            state,
            name: self.name.clone(),
        }
    }

    #[inline]
    fn record(&self, ticket: Ticket, outcome: Outcome) {
        match ticket.state() {
            CLOSED if outcome != Outcome::Ignore => {
                self.record_closed(ticket, outcome == Outcome::Failure)
            }
            HALF_OPEN => self.record_probe(ticket, outcome),
            _ => {} // ignored in Closed, Disabled, or already recorded
        }
    }

    /// Whether the call that started at `start` was slow, reading the clock
    /// only if slow-call detection is on. Also returns the time read.
    #[inline]
    fn finish(&self, start: u64) -> (bool, u64) {
        match self.config.slow_nanos {
            Some(limit) if self.config.trip == Trip::Rate => {
                let now = self.clock.now_nanos();
                (now.saturating_sub(start) > limit, now)
            }
            _ if self.calls.is_time() => (false, self.clock.now_nanos()),
            _ => (false, 0),
        }
    }

    #[inline]
    fn record_closed(&self, ticket: Ticket, failed: bool) {
        let (slow, now) = self.finish(ticket.start);
        let word = self.state.load(Ordering::Acquire);
        if word & STATE_MASK != CLOSED || epoch_of(word) != ticket.epoch() {
            return; // the breaker moved on; this outcome is about an older state
        }
        let bits = if failed { FAILED } else { 0 } | if slow { SLOW } else { 0 };
        let counts = self.calls.record(now, bits);
        match self.config.trip {
            Trip::Rate => {
                if let Some(c) = counts {
                    self.show_failure_rate(c);
                    if self.config.rates_reached(c, self.config.minimum_calls) {
                        self.trip_closed(word);
                    }
                }
            }
            Trip::Consecutive(n) => {
                if failed {
                    if self.consecutive.fetch_add(1, Ordering::Relaxed) + 1 >= n {
                        self.trip_closed(word);
                    }
                } else if self.consecutive.load(Ordering::Relaxed) != 0 {
                    self.consecutive.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// Publishes the window's failure rate. Out of line: a count window
    /// whose outcomes did not change does not get here, and the rest of the
    /// recording path stays small.
    #[inline(never)]
    fn show_failure_rate(&self, c: Counts) {
        if c.calls > 0 {
            self.telemetry.failure_rate.set(rate(c.failed, c.calls));
        }
    }

    #[cold]
    fn trip_closed(&self, seen: u64) {
        let mut opens = lock(&self.opens_since_close);
        let word = self.state.load(Ordering::Acquire);
        if word & STATE_MASK != CLOSED || epoch_of(word) != epoch_of(seen) {
            return;
        }
        // Only transitions (under the lock) change a Closed word: a store is enough.
        let open = self.open_word(*opens, word, 0);
        self.state.store(open, Ordering::Release);
        *opens = opens.saturating_add(1);
        drop(opens);
        self.announce(State::Closed, State::Open);
    }

    /// Prepares the Open word after `word`, keeping `probe_fields` as metrics:
    /// stores when the wait ends (readers load it after seeing Open) and
    /// returns the word for the caller to publish. `opens` is the number of
    /// opens since the breaker last closed (for `open_backoff`). Callers hold
    /// the transition lock.
    fn open_word(&self, opens: u32, word: u64, probe_fields: u64) -> u64 {
        let wait = match self.config.open_backoff {
            Some((multiplier, max)) => {
                let factor = multiplier.powi(opens.min(1024) as i32);
                let secs = self.config.wait_in_open.as_secs_f64() * factor;
                if secs.is_finite() && secs < max.as_secs_f64() {
                    Duration::from_secs_f64(secs)
                } else {
                    max
                }
            }
            None => self.config.wait_in_open,
        };
        let until = self.clock.now_nanos().saturating_add(duration_nanos(wait));
        self.open_until.store(until, Ordering::Release);
        next_word(word, OPEN) | probe_fields
    }

    #[inline(never)]
    fn record_probe(&self, ticket: Ticket, outcome: Outcome) {
        let (slow, _) = if outcome == Outcome::Ignore {
            (false, 0)
        } else {
            self.finish(ticket.start)
        };
        let mut word = self.state.load(Ordering::Acquire);
        loop {
            if word & STATE_MASK != HALF_OPEN || epoch_of(word) != ticket.epoch() {
                return;
            }
            let mut next = word - (1 << OUT);
            if outcome != Outcome::Ignore {
                next += 1 << RECORDED;
                if outcome == Outcome::Failure {
                    next += 1 << FAILED_PROBES;
                }
                if slow {
                    next += 1 << SLOW_PROBES;
                }
            }
            match self
                .state
                .compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    word = next;
                    break;
                }
                Err(actual) => word = actual,
            }
        }
        if outcome != Outcome::Ignore && self.probes_decide(word) {
            self.settle_probes(ticket.epoch());
        }
    }

    /// Whether the probes recorded in `word` decide the half-open round: in
    /// consecutive-failures mode any failure does; otherwise all
    /// `half_open_max_calls` outcomes must be in.
    fn probes_decide(&self, word: u64) -> bool {
        let c = probe_counts(word);
        c.calls >= self.config.half_open_max
            || (c.failed > 0 && matches!(self.config.trip, Trip::Consecutive(_)))
    }

    /// Ends the half-open round of `epoch` if its recorded probes decide it.
    ///
    /// Probes are admitted and recorded with compare-and-swap outside the
    /// lock, so the decision is taken from the word that is replaced, in a
    /// compare-and-swap loop: an outcome that lands meanwhile is part of it.
    #[cold]
    fn settle_probes(&self, epoch: u64) {
        let mut opens = lock(&self.opens_since_close);
        let mut word = self.state.load(Ordering::Acquire);
        let healthy = loop {
            if word & STATE_MASK != HALF_OPEN
                || epoch_of(word) != epoch
                || !self.probes_decide(word)
            {
                return;
            }
            let counts = probe_counts(word);
            let healthy = match self.config.trip {
                Trip::Consecutive(_) => counts.failed == 0,
                Trip::Rate => !self.config.rates_reached(counts, self.config.half_open_max),
            };
            let next = if healthy {
                next_word(word, CLOSED)
            } else {
                let fields = word
                    & ((FIELD << RECORDED) | (FIELD << FAILED_PROBES) | (FIELD << SLOW_PROBES));
                self.open_word(*opens, word, fields | PROBE_METRICS)
            };
            if healthy {
                // No Closed outcome is recorded while HalfOpen (permits carry
                // their epoch), so the window can be emptied before publishing.
                self.clear();
            }
            match self
                .state
                .compare_exchange(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break healthy,
                Err(actual) => word = actual,
            }
        };
        *opens = if healthy { 0 } else { opens.saturating_add(1) };
        drop(opens);
        if healthy {
            self.announce(State::HalfOpen, State::Closed);
        } else {
            self.announce(State::HalfOpen, State::Open);
        }
    }

    /// Empties the window and counters (callers hold the transition lock).
    fn clear(&self) {
        self.calls.reset();
        self.consecutive.store(0, Ordering::Relaxed);
        self.not_permitted.store(0, Ordering::Relaxed);
    }

    fn transition_to(&self, state: u64) {
        let mut opens = lock(&self.opens_since_close);
        if state == CLOSED {
            *opens = 0;
            self.clear();
        }
        // A compare-and-swap loop, as probes change HalfOpen words unlocked.
        let mut word = self.state.load(Ordering::Acquire);
        while let Err(actual) = self.state.compare_exchange_weak(
            word,
            next_word(word, state),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            word = actual;
        }
        drop(opens);
        let from = state_of(word);
        let to = state_of(state);
        if from != to {
            self.announce(from, to);
        }
    }

    fn announce(&self, from: State, to: State) {
        self.telemetry.show_state(to);
        self.events.emit(EventKind::StateChanged { from, to });
        self.listeners.emit(&StateTransition {
            name: self.name.clone(),
            from,
            to,
        });
    }

    fn metrics(&self) -> Metrics {
        let word = self.state.load(Ordering::Acquire);
        let probing = word & STATE_MASK == HALF_OPEN
            || (word & STATE_MASK == OPEN && word & PROBE_METRICS != 0);
        let (counts, minimum) = if probing {
            (probe_counts(word), self.config.half_open_max)
        } else {
            let now = if self.calls.is_time() {
                self.clock.now_nanos()
            } else {
                0
            };
            (self.calls.snapshot(now), self.config.minimum_calls)
        };
        let enough = counts.calls >= minimum && counts.calls > 0;
        Metrics {
            failure_rate: enough.then(|| rate(counts.failed, counts.calls)),
            slow_call_rate: enough.then(|| rate(counts.slow, counts.calls)),
            calls: counts.calls,
            failed_calls: counts.failed,
            successful_calls: counts.calls - counts.failed,
            slow_calls: counts.slow,
            not_permitted_calls: self.not_permitted.load(Ordering::Relaxed),
        }
    }
}

fn probe_counts(word: u64) -> Counts {
    Counts {
        calls: field(word, RECORDED),
        failed: field(word, FAILED_PROBES),
        slow: field(word, SLOW_PROBES),
    }
}

// ---- permits --------------------------------------------------------------

/// Permission for one call; record its outcome with [`success`](Self::success),
/// [`failure`](Self::failure) or [`ignore`](Self::ignore). Dropping it
/// unrecorded is an ignore: a cancelled call never holds a probe slot.
#[must_use = "a permit records the call's outcome; dropping it records nothing"]
pub struct Permit<'a> {
    shared: &'a Shared,
    ticket: Ticket,
}

impl Permit<'_> {
    /// The call succeeded.
    #[inline]
    pub fn success(self) {
        self.record(Outcome::Success)
    }

    /// The call failed.
    #[inline]
    pub fn failure(self) {
        self.record(Outcome::Failure)
    }

    /// The call neither succeeded nor failed; nothing is recorded.
    #[inline]
    pub fn ignore(self) {
        self.record(Outcome::Ignore)
    }

    /// Records `outcome`.
    #[inline]
    pub fn record(self, outcome: Outcome) {
        // Consumed without running Drop (which would record an ignore).
        let this = std::mem::ManuallyDrop::new(self);
        this.shared.record(this.ticket, outcome);
    }
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.ticket.state() == HALF_OPEN {
            self.shared.record(self.ticket, Outcome::Ignore);
        }
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("breaker", &self.shared.name)
            .field("admitted_in", &ticket_state(self.ticket))
            .finish()
    }
}

/// A [`Permit`] that owns a handle to its breaker.
#[must_use = "a permit records the call's outcome; dropping it records nothing"]
pub struct OwnedPermit {
    breaker: CircuitBreaker,
    ticket: Ticket,
}

impl OwnedPermit {
    /// The call succeeded.
    pub fn success(self) {
        self.record(Outcome::Success)
    }

    /// The call failed.
    pub fn failure(self) {
        self.record(Outcome::Failure)
    }

    /// The call neither succeeded nor failed; nothing is recorded.
    pub fn ignore(self) {
        self.record(Outcome::Ignore)
    }

    /// Records `outcome`.
    pub fn record(mut self, outcome: Outcome) {
        let ticket = self.ticket;
        self.ticket.word |= DONE; // so that Drop does not record again
        self.breaker.shared.record(ticket, outcome);
    }
}

impl Drop for OwnedPermit {
    fn drop(&mut self) {
        if self.ticket.state() == HALF_OPEN {
            self.breaker.shared.record(self.ticket, Outcome::Ignore);
        }
    }
}

impl fmt::Debug for OwnedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedPermit")
            .field("breaker", &self.breaker.shared.name)
            .field("admitted_in", &ticket_state(self.ticket))
            .finish()
    }
}
