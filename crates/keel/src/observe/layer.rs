//! The golden signals as a tower middleware; put it outermost.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use std::sync::Arc;

use super::{InFlight, Inner, Observer};
use crate::classify::Outcome;
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

/// Measures each call of a service as calls to the observer's dependency:
/// a response is a success, an error a failure, keel's refusals (from
/// layers inside this one) `rejected`.
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    observer: Observer,
}

impl ObserveLayer {
    /// A layer measuring into `observer`.
    pub fn new(observer: Observer) -> Self {
        ObserveLayer { observer }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ObserveService {
            inner,
            observer: self.observer.clone(),
        }
    }
}

/// A measured service. See [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct ObserveService<S> {
    inner: S,
    observer: Observer,
}

impl<S, Req> Service<Req> for ObserveService<S>
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
            guard: Some(self.observer.start_owned()),
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The future of [`ObserveService`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight<Arc<Inner>>>,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
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
        let result = std::task::ready!(this.inner.poll(cx)).map_err(lift_boxed);
        if let Some(mut guard) = this.guard.take() {
            match &result {
                Ok(_) => guard.finish(Outcome::Success),
                Err(e) if e.rejection().is_some() => guard.rejected(),
                Err(_) => guard.finish(Outcome::Failure),
            }
        }
        Poll::Ready(result)
    }
}
