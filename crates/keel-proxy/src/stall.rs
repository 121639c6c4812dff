//! Timeouts on every byte of a body: a request body from a client that
//! goes `server.request_body_timeout` without a byte, and an upstream's
//! response body that goes `read_timeout` without one, are cut.
//!
//! A [`Stall`] timer costs nothing while its body's bytes are already read
//! when asked for, which is every small body: it is armed the first time a
//! poll would wait, and from then on each byte that arrives moves its
//! deadline with one clock read; the timer itself is reset only when it
//! fires early.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

/// A body's wait for its next bytes, bounded by `timeout`.
#[derive(Debug)]
pub(crate) struct Stall {
    timeout: Duration,
    /// Armed on the first wait: the timer, and the last progress since.
    armed: Option<(Pin<Box<Sleep>>, Instant)>,
}

impl Stall {
    pub(crate) fn new(timeout: Duration) -> Stall {
        Stall {
            timeout,
            armed: None,
        }
    }

    /// Bytes arrived.
    pub(crate) fn progress(&mut self) {
        if let Some((_, last)) = &mut self.armed {
            *last = Instant::now();
        }
    }

    /// The body's poll is waiting: `Ready` once it has waited `timeout`
    /// since its last progress (or since the first wait).
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let timeout = self.timeout;
        let (timer, last) = self.armed.get_or_insert_with(|| {
            let now = Instant::now();
            (Box::pin(tokio::time::sleep_until(now + timeout)), now)
        });
        loop {
            std::task::ready!(timer.as_mut().poll(cx));
            let due = *last + timeout;
            if Instant::now() >= due {
                return Poll::Ready(());
            }
            timer.as_mut().reset(due);
        }
    }
}

/// Why a client's request body did not arrive whole.
#[derive(Debug)]
pub(crate) enum ClientBodyError {
    /// No byte for `server.request_body_timeout`.
    Stalled,
    /// The client broke it (bad framing, a reset, a close before its end).
    Broken(hyper::Error),
    /// It ended before its announced length.
    Short,
}

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientBodyError::Stalled => f.write_str("no byte within server.request_body_timeout"),
            ClientBodyError::Broken(e) => e.fmt(f),
            ClientBodyError::Short => f.write_str("it ended before its length"),
        }
    }
}

impl std::error::Error for ClientBodyError {}

/// Where a client's body stands, for blaming the right side when a
/// timeout cuts its request.
#[derive(Debug, Default)]
pub(crate) struct Sending(AtomicU8);

const MOVING: u8 = 0;
/// The last poll of the body waited for the client.
const WAITING_FOR_CLIENT: u8 = 1;
const DONE: u8 = 2;

impl Sending {
    /// Whether the request is held up by its client: its body is not all
    /// here, and keel is waiting for the next bytes (not for the upstream
    /// to take the last ones).
    pub(crate) fn held_by_client(&self) -> bool {
        self.0.load(Ordering::Acquire) == WAITING_FOR_CLIENT
    }
}

/// A client's request body with its stall timer.
#[derive(Debug)]
pub(crate) struct ClientBody {
    inner: Incoming,
    stall: Stall,
    /// For a body still to come (none for an empty one: no allocation).
    sending: Option<Arc<Sending>>,
}

impl ClientBody {
    pub(crate) fn new(inner: Incoming, timeout: Duration) -> ClientBody {
        ClientBody {
            sending: (!inner.is_end_stream()).then(Arc::default),
            inner,
            stall: Stall::new(timeout),
        }
    }

    /// Its standing, to look at after a timeout took the body away.
    pub(crate) fn sending(&self) -> Option<Arc<Sending>> {
        self.sending.clone()
    }

    fn mark(&self, state: u8) {
        if let Some(sending) = &self.sending {
            sending.0.store(state, Ordering::Release);
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.stall.progress();
                this.mark(MOVING);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.mark(DONE);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.mark(DONE);
                Poll::Ready(Some(Err(ClientBodyError::Broken(e))))
            }
            Poll::Pending => {
                this.mark(WAITING_FOR_CLIENT);
                match this.stall.poll_expired(cx) {
                    Poll::Ready(()) => {
                        this.mark(DONE);
                        Poll::Ready(Some(Err(ClientBodyError::Stalled)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `stall` as a body's wait would, progress at the given times
    /// (from the start); when it expires.
    async fn expires_after(timeout: Duration, progress_at: &[u64]) -> Duration {
        let start = Instant::now();
        let mut stall = Stall::new(timeout);
        let mut progress = progress_at.iter().map(|&s| start + Duration::from_secs(s));
        let mut next = progress.next();
        std::future::poll_fn(|cx| loop {
            if let Some(at) = next {
                if Instant::now() >= at {
                    stall.progress();
                    next = progress.next();
                    continue;
                }
            }
            if stall.poll_expired(cx).is_ready() {
                return Poll::Ready(());
            }
            // Wake for the next progress too.
            if let Some(at) = next {
                let waker = cx.waker().clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    waker.wake();
                });
            }
            return Poll::Pending;
        })
        .await;
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_progresses_expires_at_the_timeout() {
        assert_eq!(
            expires_after(Duration::from_secs(30), &[]).await,
            Duration::from_secs(30)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_progress_moves_the_deadline() {
        // Bytes at 10 s and 35 s: due at 65 s.
        assert_eq!(
            expires_after(Duration::from_secs(30), &[10, 35]).await,
            Duration::from_secs(65)
        );
    }
}
