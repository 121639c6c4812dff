//! The bulkhead as a tower middleware.
//!
//! A seat is taken in `poll_ready` (waiting in the queue as configured), as
//! `tower::limit::ConcurrencyLimit` does, and held by the response future
//! until it completes or is dropped. A full bulkhead (no queue, a full
//! queue, or `queue_timeout` passed) does not fail `poll_ready`: the service
//! is ready, and the call's future resolves at once to
//! `Error::BulkheadFull`, as every keel admission layer rejects. So outer
//! layers (fallback, retry, hedge, metrics) see the rejection as the call's
//! result, and a tower `Buffer` or balancer is never told the service broke.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{Bulkhead, BulkheadFull, OwnedPermit};
use crate::admission::Finish;
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

/// Applies a [`Bulkhead`] to a service. Services made by clones of the layer
/// share its seats.
#[derive(Debug, Clone)]
pub struct BulkheadLayer {
    bulkhead: Bulkhead,
}

impl BulkheadLayer {
    /// A layer taking seats from `bulkhead`.
    pub fn new(bulkhead: Bulkhead) -> Self {
        BulkheadLayer { bulkhead }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = BulkheadService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BulkheadService {
            inner,
            bulkhead: self.bulkhead.clone(),
            waiting: None,
            seat: None,
        }
    }
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedPermit, BulkheadFull>> + Send + Sync>>;

/// A service behind a bulkhead. See [`BulkheadLayer`].
pub struct BulkheadService<S> {
    inner: S,
    bulkhead: Bulkhead,
    waiting: Option<Acquire>,
    /// What `poll_ready` decided for the next call: a seat, or a refusal.
    seat: Option<Result<OwnedPermit, BulkheadFull>>,
}

impl<S: Clone> Clone for BulkheadService<S> {
    /// A clone has no seat of its own yet.
    fn clone(&self) -> Self {
        BulkheadService {
            inner: self.inner.clone(),
            bulkhead: self.bulkhead.clone(),
            waiting: None,
            seat: None,
        }
    }
}

impl<S> std::fmt::Debug for BulkheadService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkheadService")
            .field("bulkhead", &self.bulkhead)
            .field("has_seat", &matches!(self.seat, Some(Ok(_))))
            .finish_non_exhaustive()
    }
}

impl<S> BulkheadService<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, Req> Service<Req> for BulkheadService<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Error<ServiceError>;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if matches!(self.seat, Some(Err(_))) {
            self.seat = None; // a refusal is not sticky: ask again
        }
        if self.seat.is_none() {
            let seat = match self.waiting.as_mut() {
                Some(waiting) => ready!(waiting.as_mut().poll(cx)),
                None => match self.bulkhead.try_acquire_owned() {
                    Err(_) if self.bulkhead.inner.max_queue > 0 => {
                        self.waiting = Some(Box::pin(self.bulkhead.acquire_owned()));
                        return self.poll_ready(cx);
                    }
                    decided => decided,
                },
            };
            self.waiting = None;
            self.seat = Some(seat);
        }
        match self.seat {
            Some(Ok(_)) => self.inner.poll_ready(cx).map_err(lift_boxed),
            // Refused: `call` answers without the inner service.
            _ => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self
            .seat
            .take()
            .expect("BulkheadService::call without a successful poll_ready")
        {
            Ok(seat) => ResponseFuture::admitted(self.inner.call(req), seat),
            Err(full) => ResponseFuture::rejected(full.into()),
        }
    }
}

/// The future of [`BulkheadService`]: holds the call's seat until it
/// completes or is dropped, or answers `Error::BulkheadFull`.
pub type ResponseFuture<F> = crate::admission::ResponseFuture<F, OwnedPermit>;

impl Finish for OwnedPermit {
    fn finish(self, _: bool) {}
}
