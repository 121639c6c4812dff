//! Thread-pool bulkhead: blocking work for one dependency runs on that
//! dependency's own OS threads, so a dependency whose calls block for long
//! ties up its pool and nothing else.
//!
//! ```text
//!   pool.run(f) ──▶ a thread idle, or room in the queue? ──no──▶ Err(BulkheadFull)
//!                        │ yes
//!                        ▼
//!                   queued (FIFO) ──▶ a worker runs f ──▶ the future resolves
//! ```
//!
//! ```
//! use keel::bulkhead::ThreadPool;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ledger = ThreadPool::builder("ledger").threads(2).max_queue(8).build()?;
//! let balance = ledger.run(|| {
//!     // a blocking driver call, a file read, a CPU-heavy computation
//!     40 + 2
//! });
//! assert_eq!(balance.await?, 42);
//! # Ok(())
//! # }
//! ```
//!
//! A caller that stops waiting (drops the future) before its job starts
//! takes the job out of the queue, and its place is free at once. A job
//! that has started runs to the end (a thread cannot be cancelled). A job
//! that panics resumes the panic in the caller that awaits it; the worker
//! survives, whatever panics (the job, or dropping what it left behind).
//!
//! The workers finish the queued jobs and exit when the last handle to the
//! pool is dropped.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::thread;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::BulkheadFull;
use crate::events::{Policy, PolicyEvents, Reason};
use crate::telemetry::{self, Refusals};
use crate::ConfigError;

/// A thread pool's configuration, as data.
///
/// ```
/// use keel::bulkhead::ThreadPoolConfig;
/// let config: ThreadPoolConfig = toml::from_str("threads = 4\nmax_queue = 16")?;
/// let pool = config.build("reports")?;
/// assert_eq!(pool.metrics().threads, 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThreadPoolConfig {
    /// Worker threads, each running one job at a time.
    pub threads: u32,
    /// Jobs that may wait for a worker; more are rejected at once.
    pub max_queue: u32,
}

impl Default for ThreadPoolConfig {
    fn default() -> Self {
        ThreadPoolConfig {
            threads: 4,
            max_queue: 16,
        }
    }
}

impl ThreadPoolConfig {
    /// Starts the pool, or says which field is wrong.
    pub fn build(&self, name: impl Into<Arc<str>>) -> Result<ThreadPool, ConfigError> {
        ThreadPool::builder(name)
            .threads(self.threads)
            .max_queue(self.max_queue)
            .build()
    }
}

/// Builds a [`ThreadPool`]; defaults are [`ThreadPoolConfig`]'s.
#[derive(Debug, Clone)]
pub struct ThreadPoolBuilder {
    name: Arc<str>,
    config: ThreadPoolConfig,
}

/// The most threads a pool may have.
pub const MAX_THREADS: u32 = 1024;

impl ThreadPoolBuilder {
    /// Worker threads (default 4).
    pub fn threads(mut self, n: u32) -> Self {
        self.config.threads = n;
        self
    }

    /// Jobs that may wait for a worker (default 16).
    pub fn max_queue(mut self, n: u32) -> Self {
        self.config.max_queue = n;
        self
    }

    /// Starts the worker threads (named `<name>-<i>`), or says which field
    /// is wrong.
    pub fn build(self) -> Result<ThreadPool, ConfigError> {
        let c = self.config;
        if c.threads == 0 || c.threads > MAX_THREADS {
            return Err(ConfigError::new(
                "threads",
                format!("must be between 1 and {MAX_THREADS}, got {}", c.threads),
            ));
        }
        let shared = Arc::new(Shared {
            refusals: Refusals::new(Policy::ThreadPool, &self.name, Reason::BulkheadFull),
            busy_gauge: telemetry::gauge(telemetry::BULKHEAD_IN_USE, &self.name),
            queued_gauge: telemetry::gauge(telemetry::BULKHEAD_QUEUED, &self.name),
            name: self.name,
            threads: c.threads,
            max_queue: c.max_queue,
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                next_id: 0,
                busy: 0,
                rejected: 0,
                closing: false,
            }),
            work: Condvar::new(),
        });
        shared.show(&lock(&shared.state));
        for i in 0..c.threads {
            let worker = shared.clone();
            thread::Builder::new()
                .name(format!("{}-{i}", shared.name))
                .spawn(move || worker.work())
                .map_err(|e| {
                    shared.close();
                    ConfigError::new("threads", format!("could not start thread {i}: {e}"))
                })?;
        }
        Ok(ThreadPool {
            handle: Arc::new(Handle(shared)),
        })
    }
}

/// A queued job; it calls `Shared::finished` before its caller can see the
/// result, so the metrics never show a delivered job as busy.
struct Job {
    /// Finds the job in the queue when its caller withdraws it.
    id: u64,
    run: Box<dyn FnOnce(&Shared) + Send>,
}

struct Shared {
    name: Arc<str>,
    refusals: Refusals,
    busy_gauge: metrics::Gauge,
    queued_gauge: metrics::Gauge,
    threads: u32,
    max_queue: u32,
    state: Mutex<State>,
    work: Condvar,
}

struct State {
    jobs: VecDeque<Job>,
    next_id: u64,
    busy: u32,
    rejected: u64,
    closing: bool,
}

impl Shared {
    fn work(&self) {
        loop {
            let job = {
                let mut state = lock(&self.state);
                loop {
                    if let Some(job) = state.jobs.pop_front() {
                        state.busy += 1;
                        self.show(&state);
                        break job;
                    }
                    if state.closing {
                        return;
                    }
                    state = match self.work.wait(state) {
                        Ok(g) => g,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                }
            };
            // The job catches its own panic and reports it to its caller
            // (see `ThreadPool::run`); this catches what it cannot: a panic
            // while dropping a withdrawn closure or an undelivered result,
            // after the job has counted itself finished. The worker lives.
            let _ = panic::catch_unwind(AssertUnwindSafe(|| (job.run)(self)));
        }
    }

    fn finished(&self) {
        let mut state = lock(&self.state);
        state.busy -= 1;
        self.show(&state);
    }

    /// Sets the gauges (callers hold the state lock, so they are in order).
    fn show(&self, state: &State) {
        self.busy_gauge.set(f64::from(state.busy));
        self.queued_gauge.set(state.jobs.len() as f64);
    }

    fn close(&self) {
        lock(&self.state).closing = true;
        self.work.notify_all();
    }
}

/// Locks the pool's state, ignoring poisoning: jobs run outside the lock,
/// so a panic never leaves the state half-changed. The pool's threads are
/// real OS threads, outside loom's models: std's lock, not `crate::sync`'s.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closes the pool when the last `ThreadPool` handle goes; the workers hold
/// `Shared`, not this.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A named pool of OS threads with a bounded queue. A cheap, cloneable
/// handle; clones share the pool.
#[derive(Clone)]
pub struct ThreadPool {
    handle: Arc<Handle>,
}

/// A snapshot of a thread pool's use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolMetrics {
    /// Worker threads.
    pub threads: u32,
    /// Workers running a job.
    pub busy: u32,
    /// Jobs waiting for a worker.
    pub queued: u32,
    /// Jobs rejected since the pool started.
    pub rejected: u64,
}

impl fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadPool")
            .field("name", &self.handle.0.name)
            .field("metrics", &self.metrics())
            .finish()
    }
}

impl ThreadPool {
    /// A builder for a pool called `name`: 4 threads, 16 queued jobs.
    pub fn builder(name: impl Into<Arc<str>>) -> ThreadPoolBuilder {
        ThreadPoolBuilder {
            name: name.into(),
            config: ThreadPoolConfig::default(),
        }
    }

    /// The pool's events: rejected jobs.
    pub fn events(&self) -> &PolicyEvents {
        self.handle.0.refusals.events()
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.handle.0.name
    }

    /// Runs `f` on one of the pool's threads; the future resolves to its
    /// result. When every thread is busy and the queue is full the future
    /// resolves at once to [`BulkheadFull`] and `f` never runs.
    ///
    /// The job is queued when `run` is called, not when the future is first
    /// polled. Works with any executor (the result comes back on a
    /// `tokio::sync::oneshot`, which needs no runtime).
    pub fn run<R, F>(&self, f: F) -> Run<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let shared = &self.handle.0;
        let (tx, rx) = oneshot::channel();
        let run = Box::new(move |shared: &Shared| {
            if tx.is_closed() {
                // The caller stopped waiting as a worker took the job.
                shared.finished();
                drop(f);
                return;
            }
            let result = panic::catch_unwind(AssertUnwindSafe(f));
            shared.finished();
            let _ = tx.send(result);
        });
        let mut state = lock(&shared.state);
        let held = state.jobs.len() as u64 + u64::from(state.busy);
        if held >= u64::from(shared.threads) + u64::from(shared.max_queue) {
            state.rejected += 1;
            drop(state);
            shared.refusals.refuse(None);
            return Run(Err(Some(BulkheadFull {
                name: shared.name.clone(),
            })));
        }
        let id = state.next_id;
        state.next_id += 1;
        state.jobs.push_back(Job { id, run });
        shared.show(&state);
        drop(state);
        shared.work.notify_one();
        Run(Ok(Queued {
            rx,
            id,
            pool: shared.clone(),
        }))
    }

    /// A snapshot of threads and queue.
    pub fn metrics(&self) -> PoolMetrics {
        let shared = &self.handle.0;
        let state = lock(&shared.state);
        PoolMetrics {
            threads: shared.threads,
            busy: state.busy,
            queued: state.jobs.len() as u32,
            rejected: state.rejected,
        }
    }
}

/// The result of a job run on a [`ThreadPool`]. Dropping it before the job
/// starts withdraws the job and frees its place in the queue.
#[must_use = "the job is withdrawn if this is dropped before it starts"]
pub struct Run<R>(Result<Queued<R>, Option<BulkheadFull>>);

struct Queued<R> {
    rx: oneshot::Receiver<thread::Result<R>>,
    id: u64,
    pool: Arc<Shared>,
}

impl<R> Drop for Queued<R> {
    fn drop(&mut self) {
        // Still queued? Take it out (and drop it outside the lock: its
        // closure's captures are the caller's). Started or done: nothing.
        let withdrawn = {
            let mut state = lock(&self.pool.state);
            let at = state.jobs.iter().position(|job| job.id == self.id);
            let withdrawn = at.and_then(|at| state.jobs.remove(at));
            self.pool.show(&state);
            withdrawn
        };
        drop(withdrawn);
    }
}

impl<R> fmt::Debug for Run<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Ok(_) => "Run(queued)",
            Err(_) => "Run(rejected)",
        })
    }
}

impl<R> Future for Run<R> {
    type Output = Result<R, BulkheadFull>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Err(full) => Poll::Ready(Err(full.take().expect("`Run` polled after completion"))),
            Ok(queued) => match std::task::ready!(Pin::new(&mut queued.rx).poll(cx)) {
                Ok(Ok(value)) => Poll::Ready(Ok(value)),
                Ok(Err(payload)) => panic::resume_unwind(payload),
                // A queued job is always run (workers drain the queue before
                // they exit) and its sender is dropped only after sending.
                Err(_) => unreachable!("a queued job was dropped without running"),
            },
        }
    }
}
