//! # keel
//!
//! Fault-tolerance policies for services that call other services: circuit
//! breaker, retry (backoff, jitter, budgets, `Retry-After`), timeouts,
//! bulkheads, rate limiting, load shedding, adaptive concurrency, hedging and
//! fallback, as synchronous primitives, as an async [`Pipeline`] and as
//! `tower` layers; with metrics, typed events, traces and health checks that
//! show what they did.
//!
//! ```
//! use keel::{circuit_breaker::CircuitBreaker, retry::Retry, Pipeline};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let payment = CircuitBreaker::builder("payment").build()?;
//! let pipeline = Pipeline::builder()
//!     .timeout(Duration::from_secs(5))
//!     .retry(Retry::builder().max_attempts(3).build()?)
//!     .circuit_breaker(payment.clone())
//!     .timeout(Duration::from_secs(1))
//!     .build();
//!
//! let receipt = pipeline
//!     .call(|| async { Ok::<_, std::io::Error>("charged") })
//!     .await?;
//! assert_eq!(receipt, "charged");
//! assert_eq!(payment.metrics().successful_calls, 1);
//! # Ok(())
//! # }
//! ```
//!
//! | module | what |
//! |---|---|
//! | [`circuit_breaker`] | count and time windows, slow calls, half-open probes, consecutive-failure mode |
//! | [`retry`] | backoff, jitter, time budget, shared retry budget, server hints |
//! | [`timeout`] | fixed timeout that cancels the call; adaptive timeout from recent latencies |
//! | [`bulkhead`] | semaphore bulkhead (bounded FIFO queue); thread pool for blocking work |
//! | [`rate_limit`] | GCRA (lock-free), sliding log, sliding window, fixed window; keyed limiter |
//! | [`shed`] | load shedding by priority on in-flight load and queueing delay |
//! | [`adaptive`] | adaptive concurrency limit: AIMD, Gradient2 |
//! | [`hedge`] | a second attempt after a delay for idempotent calls |
//! | [`chaos`] | fault injection: latency, errors, your own behaviour, switchable, seeded |
//! | [`fallback`] | stale cache, alternate source, default value, graceful error |
//! | [`pipeline`] | composes the policies around a closure |
//! | [`observe`] | golden signals per dependency: calls by outcome, latency, in flight |
//! | [`events`] | typed events of every decision: subscriptions, recent events, tracing |
//! | [`health`] | liveness, readiness and startup checks, cached, for probes |
//! | [`classify`] | one classifier for every policy |
//! | [`clock`] | injected time: monotonic, manual, tokio |
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `tower` | yes | a `Layer` and `Service` for each policy |
//! | `axum` | no | the health probe routes for axum |
//!
//! Metrics go through the `metrics` facade; `docs/METRICS.md` lists them.

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

pub mod adaptive;
#[cfg(feature = "tower")]
mod admission;
pub mod bulkhead;
pub mod chaos;
pub mod circuit_breaker;
pub mod classify;
pub mod clock;
pub mod config;
mod error;
pub mod events;
pub mod fallback;
pub mod health;
pub mod hedge;
pub mod idempotency;
mod latency;
pub mod observe;
pub mod pipeline;
pub mod rate_limit;
pub mod retry;
pub mod shed;
pub mod store;
mod sync;
mod telemetry;
pub mod timeout;
mod window;

pub use error::{BoxError, ConfigError, Error, ServiceError};
pub use pipeline::Pipeline;
pub use telemetry::describe_metrics;

/// The README's examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
