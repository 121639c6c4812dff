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
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::error::LiftErr;
use crate::Error;

/// A fixed timeout per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout {
    after: Duration,
}

impl Timeout {
    /// A timeout of `after`.
    pub const fn new(after: Duration) -> Self {
        Timeout { after }
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
            Err(elapsed) => Err(elapsed.into_error()),
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
    pub(crate) fn into_error<E>(self) -> Error<E> {
        tracing::debug!(target: "keel::timeout", after = ?self.0, "call timed out");
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
