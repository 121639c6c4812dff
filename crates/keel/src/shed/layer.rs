//! The load shedder as a tower middleware: each request's priority comes
//! from a function of the request; a shed request fails at once with
//! `Error::Shed`.

use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{LoadShedder, Permit, Priority};
use crate::admission::{Finish, ResponseFuture};
use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

impl Finish for Permit {
    fn finish(self, _: bool) {}
}

/// Applies a [`LoadShedder`] to a service; `priority` tells each request's
/// class (for example from a header or the route).
#[derive(Debug, Clone)]
pub struct LoadShedLayer<P> {
    shedder: LoadShedder,
    priority: P,
}

impl<P> LoadShedLayer<P> {
    /// A layer shedding through `shedder`, classing requests with
    /// `priority`.
    pub fn new(shedder: LoadShedder, priority: P) -> Self {
        LoadShedLayer { shedder, priority }
    }
}

impl<S, P: Clone> Layer<S> for LoadShedLayer<P> {
    type Service = LoadShedService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShedService {
            inner,
            shedder: self.shedder.clone(),
            priority: self.priority.clone(),
        }
    }
}

/// A service behind a load shedder. See [`LoadShedLayer`].
#[derive(Debug, Clone)]
pub struct LoadShedService<S, P> {
    inner: S,
    shedder: LoadShedder,
    priority: P,
}

impl<S, P, Req> Service<Req> for LoadShedService<S, P>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    P: Fn(&Req) -> Priority,
{
    type Response = S::Response;
    type Error = Error<ServiceError>;
    type Future = ResponseFuture<S::Future, Permit>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(lift_boxed)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.shedder.try_acquire((self.priority)(&req)) {
            Ok(permit) => ResponseFuture::admitted(self.inner.call(req), permit),
            Err(shed) => ResponseFuture::rejected(shed.into()),
        }
    }
}
