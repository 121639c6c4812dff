//! The breaker as a tower middleware.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::{CircuitBreaker, OwnedPermit};
use crate::classify::{classify_lifted, Classify, DefaultClassifier};
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

/// Applies a [`CircuitBreaker`] to a service. Clones of the layer and of the
/// services it makes share the one breaker.
///
/// The service's error is [`Error<ServiceError>`](crate::Error): a rejection is
/// `Error::CircuitOpen`; the inner service's errors are `Error::Inner`
/// (errors of inner keel layers are passed through as they are).
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = DefaultClassifier> {
    breaker: CircuitBreaker,
    classifier: C,
}

impl CircuitBreakerLayer {
    /// A layer recording `Ok` as success and `Err` as failure.
    pub fn new(breaker: CircuitBreaker) -> Self {
        CircuitBreakerLayer {
            breaker,
            classifier: DefaultClassifier,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// Uses `classifier` (over `Result<Response, ServiceError>`) to decide outcomes.
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
        }
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// A service behind a circuit breaker. See [`CircuitBreakerLayer`].
#[derive(Debug, Clone)]
pub struct CircuitBreakerService<S, C = DefaultClassifier> {
    inner: S,
    breaker: CircuitBreaker,
    classifier: C,
}

impl<S, C> CircuitBreakerService<S, C> {
    /// The breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, C, Req> Service<Req> for CircuitBreakerService<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, ServiceError> + Clone,
{
    type Response = S::Response;
    type Error = Error<ServiceError>;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(lift_boxed)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.breaker.try_acquire_owned() {
            Ok(permit) => ResponseFuture {
                state: State::Running {
                    future: self.inner.call(req),
                    permit: Some(permit),
                    classifier: self.classifier.clone(),
                },
            },
            Err(rejected) => ResponseFuture {
                state: State::Rejected {
                    error: Some(rejected.into()),
                },
            },
        }
    }
}

pin_project! {
    /// The future of [`CircuitBreakerService`]. Dropping it before it
    /// completes releases the call's permit without recording an outcome.
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F, C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, C> {
        Running { #[pin] future: F, permit: Option<OwnedPermit>, classifier: C },
        Rejected { error: Option<Error<ServiceError>> },
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E, C> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, ServiceError>,
{
    type Output = Result<T, Error<ServiceError>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Rejected { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
            StateProj::Running {
                future,
                permit,
                classifier,
            } => {
                let result = std::task::ready!(future.poll(cx)).map_err(lift_boxed);
                let (verdict, result) = classify_lifted(classifier, result);
                if let Some(permit) = permit.take() {
                    permit.record(verdict.outcome);
                }
                Poll::Ready(result)
            }
        }
    }
}
