//! The slow-client guard: a client connection with no request in flight
//! must deliver its next request head within `server.request_head_timeout`
//! of its accept or of the end of its previous response, or it is closed.
//! That covers slow heads (slowloris) and idle keep-alive connections alike.
//! While a response is being written, a client that takes none of it for
//! `server.response_idle_timeout` is closed too (which frees the upstream
//! connection its response came on): hyper asks the response body for more
//! only when the client has taken what it had, so a body that gave a frame
//! and has not been asked since is waiting for the client.
//!
//! hyper's own `header_read_timeout` does the same with a timer armed and
//! dropped for every request (an allocation, a clock read, a timer-wheel
//! insert and removal each time): about a tenth of keel's CPU per proxied
//! request on one core, measured. This guard arms one timer per connection
//! and moves it only when it fires; per request it costs two atomic
//! updates and, at the response's end, one clock read.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// One connection's wait for a request head.
#[derive(Debug)]
pub(crate) struct Waiting {
    epoch: Instant,
    /// Requests whose responses have not ended.
    in_flight: AtomicU32,
    /// Nanoseconds from `epoch` to when the last response ended (0: the
    /// accept).
    since: AtomicU64,
    /// Nanoseconds from `epoch` (at least 1) to when the response being
    /// written last gave a frame that the client has not taken since; 0
    /// when it waits for nothing from the client.
    frame_at: AtomicU64,
}

impl Waiting {
    /// A connection accepted now: waiting for its first request.
    pub(crate) fn new() -> Arc<Waiting> {
        Arc::new(Waiting {
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            since: AtomicU64::new(0),
            frame_at: AtomicU64::new(0),
        })
    }

    /// A request head has arrived; the wait is over until the returned
    /// token (moved into the response's body) is dropped.
    pub(crate) fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn nanos(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// When to look again (`None`: the connection has waited too long):
    /// for a request head, or, while a response is written, for the client
    /// to take it. Never later than either wait could end.
    fn next_check(&self, head: Duration, response: Duration) -> Option<Duration> {
        let now = Duration::from_nanos(self.nanos());
        let (waited, timeout) = if self.in_flight.load(Ordering::Acquire) > 0 {
            match self.frame_at.load(Ordering::Acquire) {
                0 => (Duration::ZERO, response),
                at => (now.saturating_sub(Duration::from_nanos(at)), response),
            }
        } else {
            let since = Duration::from_nanos(self.since.load(Ordering::Relaxed));
            (now.saturating_sub(since), head)
        };
        // Never later than either wait could end from now: the timer moves
        // only when it fires, and meanwhile a response may end (the head
        // wait starts) or give a frame its client does not take.
        timeout
            .checked_sub(waited)
            .filter(|left| !left.is_zero())
            .map(|left| left.min(head).min(response))
    }
}

/// A request in flight on a connection; dropped when its response ends
/// (or never comes).
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Waiting>);

impl InFlight {
    /// The response gave a frame (`true`: the client is to take it) or
    /// waits for its source (`false`).
    fn gave(&self, frame: bool) {
        let w = &self.0;
        w.frame_at
            .store(if frame { w.nanos() } else { 0 }, Ordering::Release);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let w = &self.0;
        w.since.store(w.nanos(), Ordering::Relaxed);
        w.frame_at.store(0, Ordering::Release);
        w.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// Runs `connection` to its end (`Some`), or until it has waited `timeout`
/// for a request head or `response_timeout` for its client to take more of
/// a response (`None`: it is dropped, which closes it).
///
/// The timer is polled (its waker registered) once per reset; on the
/// connection's other wake-ups only its elapsed flag is read.
pub(crate) async fn until_idle<F: Future>(
    connection: F,
    waiting: &Waiting,
    timeout: Duration,
    response_timeout: Duration,
) -> Option<F::Output> {
    let mut connection = std::pin::pin!(connection);
    let mut deadline = std::pin::pin!(tokio::time::sleep(timeout.min(response_timeout)));
    let mut armed = false;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = connection.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        loop {
            if armed && !deadline.is_elapsed() {
                return Poll::Pending;
            }
            // Outside the task's cooperative budget: a poll the budget
            // turned away would register no waker, and the deadline would
            // then pass unheard.
            let polled = std::pin::pin!(tokio::task::unconstrained(deadline.as_mut())).poll(cx);
            if polled.is_pending() {
                armed = true;
                return Poll::Pending;
            }
            let Some(next) = waiting.next_check(timeout, response_timeout) else {
                return Poll::Ready(None);
            };
            deadline.as_mut().reset(Instant::now() + next);
            armed = false;
        }
    })
    .await
}

/// A response body that ends its request's [`InFlight`] when it is dropped
/// (hyper drops it once written, or unpolled when it is empty).
pub(crate) struct Tracked<B> {
    inner: B,
    in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, in_flight: InFlight) -> Tracked<B> {
        Tracked { inner, in_flight }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let frame = matches!(polled, Poll::Ready(Some(Ok(_))));
        // The last frame needs no record: the body ends with it.
        if !frame || !self.inner.is_end_stream() {
            self.in_flight.gave(frame);
        }
        polled
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
    use tokio::time::sleep;

    const T: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_closed_at_the_timeout() {
        let waiting = Waiting::new();
        let start = Instant::now();
        let out = until_idle(std::future::pending::<()>(), &waiting, T, T).await;
        assert!(out.is_none());
        assert_eq!(start.elapsed(), T);
    }

    #[tokio::test(start_paused = true)]
    async fn a_requestin_flight_holds_it_open_and_its_end_starts_the_wait_again() {
        let waiting = Waiting::new();
        let start = Instant::now();
        let w = waiting.clone();
        let client = async move {
            sleep(Duration::from_secs(10)).await;
            let first = w.request();
            // A response longer than the timeout.
            sleep(Duration::from_secs(100)).await;
            drop(first);
            sleep(Duration::from_secs(29)).await;
            let second = w.request();
            sleep(Duration::from_secs(1)).await;
            drop(second);
            std::future::pending::<()>().await
        };
        assert!(until_idle(client, &waiting, T, T).await.is_none());
        // The second response ended at 140 s.
        assert_eq!(start.elapsed(), Duration::from_secs(170));
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_requests_all_end_before_the_wait_starts() {
        let waiting = Waiting::new();
        let start = Instant::now();
        let w = waiting.clone();
        let client = async move {
            let a = w.request();
            let b = w.request();
            sleep(Duration::from_secs(40)).await;
            drop(a);
            sleep(Duration::from_secs(40)).await;
            drop(b);
            std::future::pending::<()>().await
        };
        assert!(until_idle(client, &waiting, T, T).await.is_none());
        assert_eq!(start.elapsed(), Duration::from_secs(110));
    }

    /// The connection spends its task's cooperative budget (128 units a
    /// poll) down to nothing, or nearly, on its first poll: the deadline
    /// must be registered all the same (a budget-limited poll of a new
    /// timer registers nothing, and it would never fire).
    #[tokio::test(start_paused = true)]
    async fn a_deadline_first_polled_with_the_budget_spent_still_fires() {
        for spent in 120..=128 {
            let waiting = Waiting::new();
            let start = Instant::now();
            let mut first = true;
            let connection = std::future::poll_fn(move |cx| {
                if std::mem::take(&mut first) {
                    for _ in 0..spent {
                        let _ = std::pin::pin!(tokio::task::consume_budget()).poll(cx);
                    }
                }
                Poll::<()>::Pending
            });
            let out = tokio::time::timeout(
                Duration::from_secs(1000),
                until_idle(connection, &waiting, T, T),
            )
            .await;
            assert!(
                matches!(out, Ok(None)),
                "spent {spent}: the connection was not closed"
            );
            assert_eq!(start.elapsed(), T, "spent {spent}");
        }
    }

    /// With a response timeout longer than the head timeout, a response's
    /// end still starts the head wait on time.
    #[tokio::test(start_paused = true)]
    async fn a_longer_response_timeout_does_not_delay_the_head_wait() {
        let waiting = Waiting::new();
        let start = Instant::now();
        let w = waiting.clone();
        let client = async move {
            let first = w.request();
            sleep(Duration::from_secs(100)).await;
            drop(first);
            std::future::pending::<()>().await
        };
        let out = until_idle(client, &waiting, T, Duration::from_secs(60)).await;
        assert!(out.is_none());
        assert_eq!(start.elapsed(), Duration::from_secs(130));
    }

    /// A body of two frames whose client takes the first and then nothing.
    struct TwoFrames(u8);

    impl Body for TwoFrames {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, Self::Error>>> {
            self.0 += 1;
            Poll::Ready((self.0 <= 2).then(|| Ok(Frame::data(bytes::Bytes::from_static(b"x")))))
        }

        fn is_end_stream(&self) -> bool {
            self.0 >= 2
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_taking_its_response_is_closed_at_the_response_timeout() {
        let waiting = Waiting::new();
        let start = Instant::now();
        let w = waiting.clone();
        let client = async move {
            sleep(Duration::from_secs(5)).await;
            let mut body = Tracked::new(TwoFrames(0), w.request());
            // The first frame is taken at 5 s; the second never asked for.
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            assert!(frame.is_some());
            std::future::pending::<()>().await
        };
        let out = until_idle(client, &waiting, T, Duration::from_secs(60)).await;
        assert!(out.is_none());
        assert_eq!(start.elapsed(), Duration::from_secs(65));
    }

    /// A body whose source never gives a frame.
    struct Waits;

    impl Body for Waits {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_waiting_for_its_upstream_is_not_the_clients_stall() {
        let waiting = Waiting::new();
        let w = waiting.clone();
        let client = async move {
            let mut body = Tracked::new(Waits, w.request());
            // Asked for, and waiting on its source: not the client's doing.
            std::future::poll_fn(|cx| {
                assert!(Pin::new(&mut body).poll_frame(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            sleep(Duration::from_secs(300)).await;
            drop(body);
            7
        };
        assert_eq!(
            until_idle(client, &waiting, T, Duration::from_secs(60)).await,
            Some(7)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_first_gives_its_output() {
        let waiting = Waiting::new();
        let ends = async {
            sleep(Duration::from_secs(5)).await;
            7
        };
        assert_eq!(until_idle(ends, &waiting, T, T).await, Some(7));
    }
}
