//! Fallback as a tower middleware: the response becomes a [`Served`] that
//! says where the answer came from.

use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{Fallback, Served};
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

/// Applies a [`Fallback`] chain to a service; `key` picks each request's
/// key for the stale cache and the alternate source.
pub struct FallbackLayer<T, K, KF> {
    fallback: Fallback<T, ServiceError, K>,
    key: KF,
}

impl<T, K, KF: Clone> Clone for FallbackLayer<T, K, KF> {
    fn clone(&self) -> Self {
        FallbackLayer {
            fallback: self.fallback.clone(),
            key: self.key.clone(),
        }
    }
}

impl<T, K, KF> std::fmt::Debug for FallbackLayer<T, K, KF> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl<T, K, KF> FallbackLayer<T, K, KF> {
    /// Falls back down `fallback` when the service fails; `key` gives the
    /// request's key (for example its path).
    pub fn new(fallback: Fallback<T, ServiceError, K>, key: KF) -> Self {
        FallbackLayer { fallback, key }
    }
}

impl<S, T, K, KF: Clone> Layer<S> for FallbackLayer<T, K, KF> {
    type Service = FallbackService<S, T, K, KF>;

    fn layer(&self, inner: S) -> Self::Service {
        FallbackService {
            inner,
            fallback: self.fallback.clone(),
            key: self.key.clone(),
        }
    }
}

/// A service with a fallback chain. See [`FallbackLayer`].
pub struct FallbackService<S, T, K, KF> {
    inner: S,
    fallback: Fallback<T, ServiceError, K>,
    key: KF,
}

impl<S: Clone, T, K, KF: Clone> Clone for FallbackService<S, T, K, KF> {
    fn clone(&self) -> Self {
        FallbackService {
            inner: self.inner.clone(),
            fallback: self.fallback.clone(),
            key: self.key.clone(),
        }
    }
}

impl<S: std::fmt::Debug, T, K, KF> std::fmt::Debug for FallbackService<S, T, K, KF> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackService")
            .field("inner", &self.inner)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, K, KF, Req> Service<Req> for FallbackService<S, S::Response, K, KF>
where
    S: Service<Req>,
    S::Future: Send + 'static,
    S::Response: Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    KF: Fn(&Req) -> K,
{
    type Response = Served<S::Response>;
    type Error = Error<ServiceError>;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // keel's admission layers (the bulkhead too) stay ready and reject
        // in `call`, where the chain sees it; an error here means the
        // service is broken, not busy.
        self.inner.poll_ready(cx).map_err(lift_boxed)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = (self.key)(&req);
        let call = self.inner.call(req);
        let fallback = self.fallback.clone();
        Box::pin(async move {
            fallback
                .call_keyed(&key, || async move { call.await.map_err(lift_boxed) })
                .await
        })
    }
}
