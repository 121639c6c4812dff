//! What the tower layers of admission policies share (rate limiter, load
//! shedder, adaptive limiter): a decision at `call` time, and a response
//! future that either runs the inner call holding the admission's permit, or
//! returns the rejection.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use crate::error::{lift_boxed, BoxError, ServiceError};
use crate::Error;

/// A permit that learns how the admitted call ended.
pub(crate) trait Finish {
    /// The call ended; `ok` when it returned a response.
    fn finish(self, ok: bool);
}

impl Finish for () {
    fn finish(self, _: bool) {}
}

pin_project! {
    /// The response future of an admission policy's service: the inner
    /// call holding the permit, or the rejection.
    pub struct ResponseFuture<F, P> {
        #[pin]
        state: State<F, P>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, P> {
        Admitted { #[pin] inner: F, permit: Option<P> },
        Rejected { error: Option<Error<ServiceError>> },
    }
}

impl<F, P> ResponseFuture<F, P> {
    pub(crate) fn admitted(inner: F, permit: P) -> Self {
        ResponseFuture {
            state: State::Admitted {
                inner,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn rejected(error: Error<ServiceError>) -> Self {
        ResponseFuture {
            state: State::Rejected { error: Some(error) },
        }
    }
}

impl<F, P> std::fmt::Debug for ResponseFuture<F, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[allow(private_bounds)] // `Finish` is how keel's own permits plug in
impl<F, P, T, E> Future for ResponseFuture<F, P>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    P: Finish,
{
    type Output = Result<T, Error<ServiceError>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Admitted { inner, permit } => {
                let result = std::task::ready!(inner.poll(cx));
                if let Some(permit) = permit.take() {
                    permit.finish(result.is_ok());
                }
                Poll::Ready(result.map_err(lift_boxed))
            }
            StateProj::Rejected { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
        }
    }
}
