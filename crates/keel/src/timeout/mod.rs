//! Timeout: give up on a call that takes too long, and cancel it.
//!
//! ```
//! use keel::timeout::Timeout;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let timeout = Timeout::new(Duration::from_millis(100));
//! let result = timeout
//!     .call(|| async {
//!         tokio::time::sleep(Duration::from_secs(5)).await;
//!         Ok::<_, std::io::Error>(())
//!     })
//!     .await;
//! assert!(matches!(result, Err(keel::Error::Timeout { after }) if after == Duration::from_millis(100)));
//! # }
//! ```
//!
//! Timeouts run on tokio's timer (so they follow `tokio::time::pause`) and
//! need a tokio runtime with time enabled. The timer is armed only if the
//! call does not finish on its first poll, so a call that completes at once
//! costs no clock read and no timer entry; the time is counted from that
//! first poll.
//!
//! [`AdaptiveTimeout`] sets the timeout from the dependency's recent
//! latencies (the classic "p99 x 2", clamped).

mod adaptive;
#[cfg(feature = "tower")]
mod layer;
pub use adaptive::{AdaptiveTimeout, AdaptiveTimeoutBuilder, AdaptiveTimeoutConfig};
#[cfg(feature = "tower")]
pub use layer::{ResponseFuture, TimeoutLayer, TimeoutService};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::error::LiftErr;
use crate::events::{EventKind, Policy, PolicyEvents};
use crate::telemetry;
use crate::Error;

/// A fixed timeout per call. A named timeout ([`Timeout::named`]) also
/// publishes an event and counts `keel_timeouts_total` when it fires; an
/// unnamed one only traces.
#[derive(Debug, Clone)]
pub struct Timeout {
    after: Duration,
    watch: Option<Watch>,
}

impl PartialEq for Timeout {
    fn eq(&self, other: &Self) -> bool {
        self.after == other.after
            && self.watch.as_ref().map(|w| w.0.events.name())
                == other.watch.as_ref().map(|w| w.0.events.name())
    }
}

/// A timeout's events and metric.
#[derive(Clone)]
pub(crate) struct Watch(Arc<WatchInner>);

struct WatchInner {
    events: PolicyEvents,
    timeouts: metrics::Counter,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.events.name())
    }
}

impl Watch {
    pub(crate) fn new(name: Arc<str>) -> Self {
        Watch(Arc::new(WatchInner {
            timeouts: telemetry::counter(telemetry::TIMEOUTS, &name),
            events: PolicyEvents::new(Policy::Timeout, name),
        }))
    }

    pub(crate) fn events(&self) -> &PolicyEvents {
        &self.0.events
    }
}

impl Timeout {
    /// A timeout of `after`.
    pub const fn new(after: Duration) -> Self {
        Timeout { after, watch: None }
    }

    /// A timeout of `after` for the dependency `name`, with events and
    /// metrics.
    pub fn named(name: impl Into<Arc<str>>, after: Duration) -> Self {
        Timeout {
            after,
            watch: Some(Watch::new(name.into())),
        }
    }

    /// The timeout's events (a named timeout's), when it fires.
    pub fn events(&self) -> Option<&PolicyEvents> {
        self.watch.as_ref().map(Watch::events)
    }

    /// How long calls may take.
    pub const fn duration(&self) -> Duration {
        self.after
    }

    /// Runs `op`; if it has not finished after the timeout, drops its future
    /// and returns [`Error::Timeout`].
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run(|| LiftErr::new(op())).await
    }

    pub(crate) async fn run<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Error<E>>>,
    {
        match Timed::new(op(), self.after).await {
            Ok(result) => result,
            Err(elapsed) => Err(elapsed.into_error(self.watch.as_ref())),
        }
    }
}

impl From<Duration> for Timeout {
    fn from(after: Duration) -> Self {
        Timeout::new(after)
    }
}

/// The timeout elapsed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Elapsed(Duration);

impl Elapsed {
    #[cold]
    pub(crate) fn into_error<E>(self, watch: Option<&Watch>) -> Error<E> {
        match watch {
            Some(watch) => {
                watch.0.timeouts.increment(1);
                watch.0.events.emit(EventKind::TimedOut { after: self.0 });
            }
            None => {
                tracing::debug!(target: "keel", policy = "timeout", after = ?self.0, "call timed out")
            }
        }
        Error::Timeout { after: self.0 }
    }
}

pin_project! {
    /// Races a future against a lazily armed timer. On expiry the inner
    /// future is dropped at once, not when `Timed` is, so whatever it holds
    /// (a connection, a permit) is released even if the caller keeps `Timed`.
    #[derive(Debug)]
    pub(crate) struct Timed<F> {
        #[pin]
        inner: Option<F>,
        #[pin]
        sleep: Option<Sleep>,
        after: Duration,
    }
}

impl<F> Timed<F> {
    pub(crate) fn new(inner: F, after: Duration) -> Self {
        Timed {
            inner: Some(inner),
            sleep: None,
            after,
        }
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            panic!("`Timed` polled after completion");
        };
        if let Poll::Ready(v) = inner.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep(*this.after)));
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => {
                std::task::ready!(sleep.poll(cx));
                this.inner.set(None);
                Poll::Ready(Err(Elapsed(*this.after)))
            }
            None => Poll::Pending,
        }
    }
}
