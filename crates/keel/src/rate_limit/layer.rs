//! The rate limiter as a tower middleware: a request over the rate fails at
//! once with `Error::RateLimited { retry_after }` (the caller, or a proxy,
//! decides whether to wait), unlike `tower::limit::RateLimit`, which holds
//! back `poll_ready`.

use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::RateLimiter;
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

/// Applies a [`RateLimiter`] to a service; services made by clones of the
/// layer share the limit.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: RateLimiter,
}

impl RateLimitLayer {
    /// A layer admitting requests through `limiter`.
    pub fn new(limiter: RateLimiter) -> Self {
        RateLimitLayer { limiter }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// A service behind a rate limiter. See [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimitService<S> {
    inner: S,
    limiter: RateLimiter,
}

impl<S> RateLimitService<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, Req> Service<Req> for RateLimitService<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Error<ServiceError>;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(lift_boxed)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.limiter.check() {
            Ok(()) => ResponseFuture::admitted(self.inner.call(req), ()),
            Err(limited) => ResponseFuture::rejected(limited.into()),
        }
    }
}

/// The future of [`RateLimitService`].
pub type ResponseFuture<F> = crate::admission::ResponseFuture<F, ()>;
