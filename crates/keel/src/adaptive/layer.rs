//! The adaptive limiter as a tower middleware: a request over the limit
//! fails at once with `Error::BulkheadFull`; a response is a success sample,
//! an error a drop.

use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{AdaptiveLimiter, Permit};
use crate::admission::{Finish, ResponseFuture};
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

impl Finish for Permit {
    fn finish(self, ok: bool) {
        if ok {
            self.success();
        } else {
            self.dropped();
        }
    }
}

/// Applies an [`AdaptiveLimiter`] to a service; services made by clones of
/// the layer share the limit.
#[derive(Debug, Clone)]
pub struct AdaptiveLimitLayer {
    limiter: AdaptiveLimiter,
}

impl AdaptiveLimitLayer {
    /// A layer admitting requests through `limiter`.
    pub fn new(limiter: AdaptiveLimiter) -> Self {
        AdaptiveLimitLayer { limiter }
    }
}

impl<S> Layer<S> for AdaptiveLimitLayer {
    type Service = AdaptiveLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdaptiveLimitService {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// A service behind an adaptive limiter. See [`AdaptiveLimitLayer`].
#[derive(Debug, Clone)]
pub struct AdaptiveLimitService<S> {
    inner: S,
    limiter: AdaptiveLimiter,
}

impl<S, Req> Service<Req> for AdaptiveLimitService<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Error<ServiceError>;
    type Future = ResponseFuture<S::Future, Permit>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(lift_boxed)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.limiter.try_acquire() {
            Ok(permit) => ResponseFuture::admitted(self.inner.call(req), permit),
            Err(full) => ResponseFuture::rejected(full.into()),
        }
    }
}
