//! The timeout as a tower middleware.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::{Timed, Timeout};
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

/// Applies a [`Timeout`] to each call of a service; the service's error is
/// [`Error<ServiceError>`](crate::Error), `Error::Timeout` on expiry.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Timeout,
}

impl TimeoutLayer {
    /// Calls may take at most `after`.
    pub fn new(timeout: impl Into<Timeout>) -> Self {
        TimeoutLayer {
            timeout: timeout.into(),
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = TimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TimeoutService {
            inner,
            after: self.timeout.duration(),
        }
    }
}

/// A service whose calls time out. See [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct TimeoutService<S> {
    inner: S,
    after: Duration,
}

impl<S> TimeoutService<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, Req> Service<Req> for TimeoutService<S>
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
        ResponseFuture {
            timed: Timed::new(self.inner.call(req), self.after),
        }
    }
}

pin_project! {
    /// The future of [`TimeoutService`]; dropping it cancels the call.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        timed: Timed<F>,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, Error<ServiceError>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match std::task::ready!(self.project().timed.poll(cx)) {
            Ok(result) => Poll::Ready(result.map_err(lift_boxed)),
            Err(elapsed) => Poll::Ready(Err(elapsed.into_error())),
        }
    }
}
