//! Hedging as a tower middleware. A request is hedged only when the layer's
//! `idempotent` predicate says so (for HTTP, typically `GET`, `HEAD`,
//! `OPTIONS`, `PUT`, `DELETE`, or a request carrying an idempotency key);
//! each attempt calls a clone of the service with a clone of the request.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::Hedge;
use crate::classify::DefaultClassifier;
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

/// Applies a [`Hedge`] to a service.
#[derive(Debug, Clone)]
pub struct HedgeLayer<P> {
    hedge: Hedge,
    idempotent: P,
}

impl<P> HedgeLayer<P> {
    /// Hedges the requests for which `idempotent` returns true.
    pub fn new(hedge: Hedge, idempotent: P) -> Self {
        HedgeLayer { hedge, idempotent }
    }
}

impl<S, P: Clone> Layer<S> for HedgeLayer<P> {
    type Service = HedgeService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        HedgeService {
            inner,
            hedge: self.hedge.clone(),
            idempotent: self.idempotent.clone(),
        }
    }
}

/// A hedged service. See [`HedgeLayer`].
#[derive(Debug, Clone)]
pub struct HedgeService<S, P> {
    inner: S,
    hedge: Hedge,
    idempotent: P,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, P, Req> Service<Req> for HedgeService<S, P>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
    P: Fn(&Req) -> bool,
    Req: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = Error<ServiceError>;
    type Future = BoxFuture<Result<S::Response, Error<ServiceError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(lift_boxed)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let idempotent = (self.idempotent)(&req);
        // The first attempt uses the service that was made ready; hedges
        // use clones, each made ready before it is called.
        let first = self.inner.call(req.clone());
        let first = std::sync::Mutex::new(Some(first));
        // Behind mutexes so that the future is `Send` without asking the
        // service or the request to be `Sync`.
        let shared = std::sync::Mutex::new((self.inner.clone(), req));
        let hedge = self.hedge.clone();
        Box::pin(async move {
            let attempt = || {
                let ready = first.lock().map(|mut f| f.take()).unwrap_or(None);
                let (mut service, req) = match shared.lock() {
                    Ok(g) => g.clone(),
                    Err(poisoned) => poisoned.into_inner().clone(),
                };
                async move {
                    let call = match ready {
                        Some(call) => call,
                        None => {
                            poll_fn(|cx| service.poll_ready(cx))
                                .await
                                .map_err(lift_boxed)?;
                            service.call(req)
                        }
                    };
                    call.await.map_err(lift_boxed)
                }
            };
            hedge.run(&DefaultClassifier, idempotent, attempt).await
        })
    }
}
