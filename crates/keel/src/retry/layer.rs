//! Retry as a tower middleware.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::Retry;
use crate::classify::{Classify, DefaultClassifier};
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

/// Retries calls of a service. Requests must be `Clone` (each attempt sends a
/// clone) and so must the service (each attempt waits for a clone to be
/// ready). The service's error is [`Error<ServiceError>`](crate::Error).
#[derive(Debug, Clone)]
pub struct RetryLayer<C = DefaultClassifier> {
    retry: Retry,
    classifier: C,
}

impl RetryLayer {
    /// Retries `Err`s under `retry`.
    pub fn new(retry: Retry) -> Self {
        RetryLayer {
            retry,
            classifier: DefaultClassifier,
        }
    }
}

impl<C> RetryLayer<C> {
    /// Uses `classifier` (over `Result<Response, ServiceError>`) to decide what
    /// is retried.
    pub fn classifier<C2>(self, classifier: C2) -> RetryLayer<C2> {
        RetryLayer {
            retry: self.retry,
            classifier,
        }
    }
}

impl<S, C: Clone> Layer<S> for RetryLayer<C> {
    type Service = RetryService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            inner,
            retry: self.retry.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// A service whose calls are retried. See [`RetryLayer`].
#[derive(Debug, Clone)]
pub struct RetryService<S, C = DefaultClassifier> {
    inner: S,
    retry: Retry,
    classifier: C,
}

impl<S, C> RetryService<S, C> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, C, Req> Service<Req> for RetryService<S, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Into<BoxError>,
    Req: Clone + Send + Sync + 'static,
    C: Classify<S::Response, ServiceError> + Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = Error<ServiceError>;
    type Future = BoxFuture<Result<S::Response, Error<ServiceError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(lift_boxed)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The ready service serves the first attempt; a fresh clone stays.
        let ready = self.inner.clone();
        let first = std::sync::Mutex::new(Some(std::mem::replace(&mut self.inner, ready)));
        let template = std::sync::Mutex::new(self.inner.clone());
        let retry = self.retry.clone();
        let classifier = self.classifier.clone();
        Box::pin(async move {
            retry
                .run(&classifier, || {
                    let taken = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let req = req.clone();
                    let mut template = template.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    async move {
                        let response = match taken {
                            Some(mut svc) => svc.call(req).await,
                            None => {
                                poll_fn(|cx| template.poll_ready(cx))
                                    .await
                                    .map_err(lift_boxed)?;
                                template.call(req).await
                            }
                        };
                        response.map_err(lift_boxed)
                    }
                })
                .await
        })
    }
}
