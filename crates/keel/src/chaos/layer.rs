//! Fault injection as a tower middleware; put it innermost.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::Chaos;
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

/// Injects a [`Chaos`] policy's faults into each call of a service.
#[derive(Debug, Clone)]
pub struct ChaosLayer {
    chaos: Chaos,
}

impl ChaosLayer {
    /// A layer injecting `chaos`'s faults.
    pub fn new(chaos: Chaos) -> Self {
        ChaosLayer { chaos }
    }
}

impl<S> Layer<S> for ChaosLayer {
    type Service = ChaosService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ChaosService {
            inner,
            chaos: self.chaos.clone(),
        }
    }
}

/// A service with injected faults. See [`ChaosLayer`].
#[derive(Debug, Clone)]
pub struct ChaosService<S> {
    inner: S,
    chaos: Chaos,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, Req> Service<Req> for ChaosService<S>
where
    S: Service<Req>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Error<ServiceError>;
    type Future = BoxFuture<Result<S::Response, Error<ServiceError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(lift_boxed)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let injection = self.chaos.decide();
        // An injected error never reaches the service; the request is
        // dropped here.
        let call = (!injection.error).then(|| self.inner.call(req));
        Box::pin(async move {
            if let Some(delay) = injection.delay {
                tokio::time::sleep(delay).await;
            }
            match call {
                Some(call) => call.await.map_err(lift_boxed),
                None => Err(Error::FaultInjected),
            }
        })
    }
}
