//! The slow-client guard: a client connection with no request in flight
//! must deliver its next request head within `server.request_head_timeout`
//! of its accept or of the end of its previous response, or it is closed.
//! That covers slow heads (slowloris) and idle keep-alive connections alike.
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
}

impl Waiting {
    /// A connection accepted now: waiting for its first request.
    pub(crate) fn new() -> Arc<Waiting> {
        Arc::new(Waiting {
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            since: AtomicU64::new(0),
        })
    }

    /// A request head has arrived; the wait is over until the returned
    /// token (moved into the response's body) is dropped.
    pub(crate) fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// How long the connection has waited for a head; `None` while a
    /// request is in flight.
    fn waited(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_nanos(self.since.load(Ordering::Relaxed));
        Some(self.epoch.elapsed().saturating_sub(since))
    }
}

/// A request in flight on a connection; dropped when its response ends
/// (or never comes).
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Waiting>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let w = &self.0;
        let now = u64::try_from(w.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        w.since.store(now, Ordering::Relaxed);
        w.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// Runs `connection` to its end (`Some`), or until it has waited `timeout`
/// for a request head (`None`: it is dropped, which closes it).
///
/// The timer is polled (its waker registered) once per reset; on the
/// connection's other wake-ups only its elapsed flag is read.
pub(crate) async fn until_idle<F: Future>(
    connection: F,
    waiting: &Waiting,
    timeout: Duration,
) -> Option<F::Output> {
    let mut connection = std::pin::pin!(connection);
    let mut deadline = std::pin::pin!(tokio::time::sleep(timeout));
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
            let next = match waiting.waited() {
                None => timeout,
                Some(waited) if waited >= timeout => return Poll::Ready(None),
                Some(waited) => timeout - waited,
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
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
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
        let out = until_idle(std::future::pending::<()>(), &waiting, T).await;
        assert!(out.is_none());
        assert_eq!(start.elapsed(), T);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_holds_it_open_and_its_end_starts_the_wait_again() {
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
        assert!(until_idle(client, &waiting, T).await.is_none());
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
        assert!(until_idle(client, &waiting, T).await.is_none());
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
                until_idle(connection, &waiting, T),
            )
            .await;
            assert!(
                matches!(out, Ok(None)),
                "spent {spent}: the connection was not closed"
            );
            assert_eq!(start.elapsed(), T, "spent {spent}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_first_gives_its_output() {
        let waiting = Waiting::new();
        let ends = async {
            sleep(Duration::from_secs(5)).await;
            7
        };
        assert_eq!(until_idle(ends, &waiting, T).await, Some(7));
    }
}
