//! The timeout as a tower middleware.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::{AdaptiveTimeout, Timed, Timeout, Watch};
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

/// Applies a [`Timeout`] (or an [`AdaptiveTimeout`]) to each call of a
/// service; the service's error is [`Error<ServiceError>`](crate::Error),
/// `Error::Timeout` on expiry.
#[derive(Debug, Clone)]
pub struct TimeoutLayer {
    after: Duration,
    watch: Option<Watch>,
    adaptive: Option<AdaptiveTimeout>,
}

impl TimeoutLayer {
    /// Calls may take at most `after`.
    pub fn new(timeout: impl Into<Timeout>) -> Self {
        let timeout = timeout.into();
        TimeoutLayer {
            after: timeout.after,
            watch: timeout.watch,
            adaptive: None,
        }
    }

    /// Calls get the adaptive timeout's current value, and their latencies
    /// feed its window.
    pub fn adaptive(timeout: AdaptiveTimeout) -> Self {
        TimeoutLayer {
            after: Duration::ZERO,
            watch: Some(timeout.watch().clone()),
            adaptive: Some(timeout),
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = TimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TimeoutService {
            inner,
            after: self.after,
            watch: self.watch.clone(),
            adaptive: self.adaptive.clone(),
        }
    }
}

/// A service whose calls time out. See [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct TimeoutService<S> {
    inner: S,
    after: Duration,
    watch: Option<Watch>,
    adaptive: Option<AdaptiveTimeout>,
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
        let (after, meter) = match &self.adaptive {
            None => (self.after, None),
            Some(adaptive) => {
                let after = adaptive.current();
                (after, Some((adaptive.clone(), adaptive.now(), after)))
            }
        };
        ResponseFuture {
            timed: Timed::new(self.inner.call(req), after),
            watch: self.watch.clone(),
            meter,
        }
    }
}

pin_project! {
    /// The future of [`TimeoutService`]; dropping it cancels the call.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        timed: Timed<F>,
        watch: Option<Watch>,
        // An adaptive timeout, when the call started, its timeout.
        meter: Option<(AdaptiveTimeout, Duration, Duration)>,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, Error<ServiceError>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = std::task::ready!(this.timed.poll(cx));
        if let Some((adaptive, start, after)) = this.meter.take() {
            adaptive.record(match outcome {
                Ok(_) => adaptive.now().saturating_sub(start),
                Err(_) => after,
            });
        }
        match outcome {
            Ok(result) => Poll::Ready(result.map_err(lift_boxed)),
            Err(elapsed) => Poll::Ready(Err(elapsed.into_error(this.watch.as_ref()))),
        }
    }
}
