//! What the policies did, as typed events.
//!
//! Every policy publishes an [`Event`] when it decides something: a breaker
//! changed state, a call was rejected (and why), a retry was scheduled, a
//! call timed out, a hedge started, a fallback answered. Each event goes to
//!
//! - a `tracing` event (target `keel`, fields `policy`, `name`, `event`), in
//!   the caller's span, since it is emitted on the caller's task;
//! - the policy's ring of [recent](PolicyEvents::recent) events, for
//!   diagnostics;
//! - [subscriptions](Subscription): to one policy ([`PolicyEvents::subscribe`],
//!   from each policy's `events()`), or to every policy ([`subscribe`]).
//!
//! Publishing never waits for a subscriber: each subscription is a bounded
//! buffer; when it is full the oldest event is dropped and counted
//! ([`Subscription::dropped`], and the `keel_events_dropped_total` metric).
//! With no subscriber, publishing is a tracing call and a ring write.
//!
//! ```
//! use keel::bulkhead::Bulkhead;
//! use keel::events::{EventKind, Reason};
//!
//! let bulkhead = Bulkhead::builder("inventory").max_concurrent(1).build()?;
//! let mut events = bulkhead.events().subscribe(64);
//! let _seat = bulkhead.try_acquire()?;
//! assert!(bulkhead.try_acquire().is_err());
//! let event = events.try_recv().expect("the rejection was published");
//! assert_eq!(&*event.name, "inventory");
//! assert!(matches!(event.kind, EventKind::Rejected { reason: Reason::BulkheadFull, .. }));
//! assert_eq!(bulkhead.events().recent().len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::circuit_breaker::State;
use crate::fallback::Source;
use crate::shed::Priority;

/// Which kind of policy published an event (the `policy` label of metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Policy {
    /// [`crate::circuit_breaker`]
    CircuitBreaker,
    /// [`crate::retry`]
    Retry,
    /// [`crate::timeout`]
    Timeout,
    /// [`crate::bulkhead::Bulkhead`]
    Bulkhead,
    /// [`crate::bulkhead::ThreadPool`]
    ThreadPool,
    /// [`crate::rate_limit`]
    RateLimiter,
    /// [`crate::shed`]
    Shed,
    /// [`crate::adaptive`]
    AdaptiveLimit,
    /// [`crate::hedge`]
    Hedge,
    /// [`crate::fallback`]
    Fallback,
    /// [`crate::observe`]: a named call to a dependency.
    Call,
    /// [`crate::chaos`]
    Chaos,
}

impl Policy {
    /// Snake-case name, as in metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::CircuitBreaker => "circuit_breaker",
            Policy::Retry => "retry",
            Policy::Timeout => "timeout",
            Policy::Bulkhead => "bulkhead",
            Policy::ThreadPool => "thread_pool",
            Policy::RateLimiter => "rate_limiter",
            Policy::Shed => "shed",
            Policy::AdaptiveLimit => "adaptive_limit",
            Policy::Hedge => "hedge",
            Policy::Fallback => "fallback",
            Policy::Call => "call",
            Policy::Chaos => "chaos",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call was refused without running (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The circuit breaker is open (or half-open with its probes taken).
    CircuitOpen,
    /// Every bulkhead seat and queue place is taken.
    BulkheadFull,
    /// Over the rate limit.
    RateLimited,
    /// Shed under load, at this priority.
    Shed(Priority),
    /// The adaptive concurrency limit is reached.
    ConcurrencyLimit,
    /// A retry or hedge was due but the retry budget is spent.
    BudgetExhausted,
}

impl Reason {
    /// Snake-case name, as in metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::CircuitOpen => "circuit_open",
            Reason::BulkheadFull => "bulkhead_full",
            Reason::RateLimited => "rate_limited",
            Reason::Shed(_) => "shed",
            Reason::ConcurrencyLimit => "concurrency_limit",
            Reason::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EventKind {
    /// A circuit breaker moved from one state to another.
    StateChanged {
        /// The state it left.
        from: State,
        /// The state it entered.
        to: State,
    },
    /// A call (or a retry, or a hedge) was refused without running.
    Rejected {
        /// Why.
        reason: Reason,
        /// When trying again may succeed, if the policy knows.
        retry_after: Option<Duration>,
    },
    /// A failed attempt will be tried again after `delay`.
    RetryScheduled {
        /// The attempt about to run (2 for the first retry).
        attempt: u32,
        /// The wait before it.
        delay: Duration,
    },
    /// A call ran out of time and was cancelled.
    TimedOut {
        /// The timeout it had.
        after: Duration,
    },
    /// A hedged attempt started beside a slow one.
    HedgeStarted {
        /// The attempt started (2 for the first hedge).
        attempt: u32,
    },
    /// A fallback level answered instead of the call.
    FallbackUsed {
        /// Which level.
        source: Source,
    },
    /// A fault was injected.
    FaultInjected {
        /// Which fault.
        kind: crate::chaos::FaultKind,
    },
}

impl EventKind {
    fn level(&self) -> tracing::Level {
        match self {
            EventKind::StateChanged {
                to: State::Open | State::ForcedOpen,
                ..
            } => tracing::Level::WARN,
            EventKind::StateChanged { .. } => tracing::Level::INFO,
            _ => tracing::Level::DEBUG,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventKind::StateChanged { from, to } => {
                write!(f, "state changed from {} to {}", from.as_str(), to.as_str())
            }
            EventKind::Rejected {
                reason,
                retry_after,
            } => {
                write!(f, "rejected: {}", reason.as_str())?;
                if let Reason::Shed(priority) = reason {
                    write!(f, " ({priority} priority)")?;
                }
                match retry_after {
                    Some(after) => write!(f, ", retry after {after:?}"),
                    None => Ok(()),
                }
            }
            EventKind::RetryScheduled { attempt, delay } => {
                write!(f, "retry scheduled: attempt {attempt} after {delay:?}")
            }
            EventKind::TimedOut { after } => write!(f, "timed out after {after:?}"),
            EventKind::HedgeStarted { attempt } => write!(f, "hedge started: attempt {attempt}"),
            EventKind::FallbackUsed { source } => write!(f, "fallback used: {}", source.as_str()),
            EventKind::FaultInjected { kind } => write!(f, "fault injected: {}", kind.as_str()),
        }
    }
}

/// One decision of one policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The kind of policy.
    pub policy: Policy,
    /// The policy's name (the dependency it guards).
    pub name: Arc<str>,
    /// Wall-clock time of the decision.
    pub at: SystemTime,
    /// What happened.
    pub kind: EventKind,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}: {}", self.policy, self.name, self.kind)
    }
}

/// How many recent events each policy keeps for [`PolicyEvents::recent`].
pub const RECENT: usize = 32;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One subscription's buffer.
struct Queue {
    events: Mutex<VecDeque<Event>>,
    capacity: usize,
    dropped: AtomicU64,
    ready: Notify,
}

impl Queue {
    fn push(&self, event: Event) {
        let full = {
            let mut events = lock(&self.events);
            let full = events.len() == self.capacity;
            if full {
                events.pop_front();
            }
            events.push_back(event);
            full
        };
        if full {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::telemetry::EVENTS_DROPPED).increment(1);
        }
        self.ready.notify_one();
    }
}

/// A set of subscriptions to publish to.
#[derive(Default)]
struct Hub {
    queues: Mutex<Arc<Vec<Arc<Queue>>>>,
    /// Subscriptions alive, read before taking the lock.
    count: AtomicUsize,
}

impl Hub {
    fn subscribe(self: &Arc<Self>, capacity: usize) -> Subscription {
        let queue = Arc::new(Queue {
            events: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
            ready: Notify::new(),
        });
        let mut queues = lock(&self.queues);
        let mut next = Vec::clone(&queues);
        next.push(queue.clone());
        *queues = Arc::new(next);
        self.count.fetch_add(1, Ordering::Release);
        Subscription {
            queue,
            hub: self.clone(),
        }
    }

    fn unsubscribe(&self, queue: &Arc<Queue>) {
        let mut queues = lock(&self.queues);
        let next: Vec<_> = queues
            .iter()
            .filter(|q| !Arc::ptr_eq(q, queue))
            .cloned()
            .collect();
        *queues = Arc::new(next);
        self.count.fetch_sub(1, Ordering::Release);
    }

    fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    fn publish(&self, event: &Event) {
        let queues = lock(&self.queues).clone();
        for queue in queues.iter() {
            queue.push(event.clone());
        }
    }
}

static GLOBAL: LazyLock<Arc<Hub>> = LazyLock::new(Arc::default);

/// Subscribes to every policy's events, keeping at most `capacity` unread
/// (the oldest are dropped first).
pub fn subscribe(capacity: usize) -> Subscription {
    GLOBAL.subscribe(capacity)
}

/// Events for one subscriber. Dropping it unsubscribes.
pub struct Subscription {
    queue: Arc<Queue>,
    hub: Arc<Hub>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("unread", &lock(&self.queue.events).len())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Subscription {
    /// The next event, waiting for one.
    pub async fn recv(&mut self) -> Event {
        loop {
            if let Some(event) = self.try_recv() {
                return event;
            }
            self.queue.ready.notified().await;
        }
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        lock(&self.queue.events).pop_front()
    }

    /// Events dropped because this subscription's buffer was full.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.queue);
    }
}

/// One policy's events: its subscribers and its recent events. Each policy
/// hands out its own from `events()`.
pub struct PolicyEvents {
    policy: Policy,
    name: Arc<str>,
    hub: Arc<Hub>,
    recent: Mutex<VecDeque<Event>>,
}

impl fmt::Debug for PolicyEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyEvents")
            .field("policy", &self.policy)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PolicyEvents {
    pub(crate) fn new(policy: Policy, name: Arc<str>) -> Self {
        PolicyEvents {
            policy,
            name,
            hub: Arc::default(),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// The kind of policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The policy's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Subscribes to this policy's events, keeping at most `capacity`
    /// unread (the oldest are dropped first).
    pub fn subscribe(&self, capacity: usize) -> Subscription {
        self.hub.subscribe(capacity)
    }

    /// The last [`RECENT`] events, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// Publishes one decision: tracing, the recent ring, subscribers.
    #[cold]
    pub(crate) fn emit(&self, kind: EventKind) {
        let (policy, name) = (self.policy.as_str(), &*self.name);
        match kind.level() {
            tracing::Level::WARN => {
                tracing::warn!(target: "keel", policy, name, event = %kind, "{policy} {name}: {kind}")
            }
            tracing::Level::INFO => {
                tracing::info!(target: "keel", policy, name, event = %kind, "{policy} {name}: {kind}")
            }
            _ => {
                tracing::debug!(target: "keel", policy, name, event = %kind, "{policy} {name}: {kind}")
            }
        }
        let event = Event {
            policy: self.policy,
            name: self.name.clone(),
            at: SystemTime::now(),
            kind,
        };
        if !self.hub.is_empty() {
            self.hub.publish(&event);
        }
        if !GLOBAL.is_empty() {
            GLOBAL.publish(&event);
        }
        // The ring is for diagnostics: under contention an event may miss
        // it rather than make the caller wait.
        if let Ok(mut recent) = self.recent.try_lock() {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(event);
        }
    }
}

type Listener<E> = Arc<dyn Fn(&E) + Send + Sync>;

/// A list of callbacks for events of type `E`, called synchronously on the
/// thread that caused the event, outside of any lock the policy holds (so a
/// listener may call back into the policy). Keep them quick.
pub struct Listeners<E> {
    list: Mutex<Arc<Vec<Listener<E>>>>,
}

impl<E> Default for Listeners<E> {
    fn default() -> Self {
        Listeners {
            list: Mutex::new(Arc::new(Vec::new())),
        }
    }
}

impl<E> fmt::Debug for Listeners<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listeners")
            .field("count", &self.snapshot().len())
            .finish()
    }
}

impl<E> Listeners<E> {
    /// Adds a listener.
    pub fn add(&self, listener: impl Fn(&E) + Send + Sync + 'static) {
        let mut guard = lock(&self.list);
        let mut next: Vec<Listener<E>> = guard.as_ref().clone();
        next.push(Arc::new(listener));
        *guard = Arc::new(next);
    }

    fn snapshot(&self) -> Arc<Vec<Listener<E>>> {
        lock(&self.list).clone()
    }

    /// Calls every listener with `event`.
    pub fn emit(&self, event: &E) {
        for l in self.snapshot().iter() {
            l(event);
        }
    }
}
