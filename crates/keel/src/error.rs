//! The one error type every keel policy returns, and configuration errors.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

/// A boxed error, as tower middleware passes errors around.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error of a service inside a keel tower layer, boxed.
///
/// keel's layers return `Error<ServiceError>`: keel's own variants stay
/// typed, the inner service's error is here. Downcast it to the concrete
/// type with [`downcast_ref`](Self::downcast_ref).
#[derive(Debug)]
pub struct ServiceError(BoxError);

impl ServiceError {
    /// Boxes `e`.
    pub fn new(e: impl Into<BoxError>) -> Self {
        ServiceError(e.into())
    }

    /// The inner service's error as `T`, if it is one.
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }

    /// The boxed error.
    pub fn into_inner(self) -> BoxError {
        self.0
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ServiceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Why a call through keel did not produce the operation's value.
///
/// `E` is the error of the protected operation. Every rejection says why and,
/// where keel knows, when to try again.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error<E> {
    /// The operation ran and failed with its own error.
    Inner(E),
    /// A circuit breaker is not letting calls through.
    CircuitOpen {
        /// How long until the breaker may admit a call again.
        retry_after: Duration,
    },
    /// The call took longer than its timeout and was cancelled.
    Timeout {
        /// How long keel waited before giving up.
        after: Duration,
    },
    /// A bulkhead had no free seat and no room (or no time left) to wait for
    /// one. Nothing about the dependency is known; try again later or with
    /// more capacity.
    BulkheadFull,
    /// A rate limiter did not admit the call.
    RateLimited {
        /// When the same call would be admitted, if nothing else is.
        retry_after: Duration,
    },
    /// A load shedder turned the call away: the service is overloaded and
    /// this priority is shed until load falls. Retrying at once adds to the
    /// overload.
    Shed {
        /// The priority that was shed.
        priority: crate::shed::Priority,
    },
    /// A fault injected by [`crate::chaos`]: the operation did not run.
    /// It counts as a failure of the dependency (that is what it rehearses)
    /// and is retryable.
    FaultInjected,
    /// An idempotency key came back with a different request (another
    /// fingerprint) than the one it was first used for. Nothing ran; the
    /// caller must use a new key for a new request.
    KeyMismatch,
    /// A state store (idempotency records, a shared rate limit) could not
    /// be reached or did not answer in time, and the policy fails closed:
    /// the operation did not run.
    StoreUnavailable,
    /// Another call with this idempotency key is still running and the
    /// duplicate waited as long as it may; nothing ran for it. Ask again
    /// after `retry_after` to get the first call's result.
    InProgress {
        /// When to ask again.
        retry_after: Duration,
    },
    /// The first call with this idempotency key reached the dependency and
    /// ended without a known outcome (a reset after the request was sent,
    /// its execution timeout). The key is kept until its record expires:
    /// running again could act twice. Nothing ran for this call.
    OutcomeUnknown,
    /// The first call with this idempotency key ran, but its result was
    /// too large to keep: it cannot be replayed, and the operation must
    /// not run again. Nothing ran for this call.
    NotReplayable,
    /// The idempotency store has no room: every byte is held by calls
    /// still running. Nothing ran; try again shortly.
    StoreFull,
    /// Retry stopped: attempts, time budget or retry budget ran out.
    RetriesExhausted {
        /// How many attempts were made (the first call included).
        attempts: u32,
        /// The error of the last attempt.
        last: Box<Error<E>>,
    },
}

impl<E> Error<E> {
    /// The operation's own error, if that is what this is.
    pub fn inner(&self) -> Option<&E> {
        match self {
            Error::Inner(e) => Some(e),
            _ => None,
        }
    }

    /// Consumes the error, returning the operation's own error, if any.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Error::Inner(e) => Some(e),
            _ => None,
        }
    }

    /// When keel advises trying again, if it knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::CircuitOpen { retry_after }
            | Error::RateLimited { retry_after }
            | Error::InProgress { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// True when keel rejected the call without running the operation.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            Error::CircuitOpen { .. }
                | Error::BulkheadFull
                | Error::RateLimited { .. }
                | Error::Shed { .. }
        )
    }

    /// The refusal that ended the call, if keel refused it: this error when
    /// it is a rejection, or the last attempt's when retries ended on one
    /// (for example an open breaker whose wait outlasts the time budget).
    /// Its [`retry_after`](Self::retry_after) says when to come back.
    pub fn rejection(&self) -> Option<&Error<E>> {
        match self {
            Error::RetriesExhausted { last, .. } => last.rejection(),
            e if e.is_rejection() => Some(e),
            _ => None,
        }
    }

    /// Maps the operation's error, keeping keel's own variants.
    pub fn map_inner<F, G: FnOnce(E) -> F>(self, f: G) -> Error<F> {
        match self {
            Error::Inner(e) => Error::Inner(f(e)),
            Error::CircuitOpen { retry_after } => Error::CircuitOpen { retry_after },
            Error::Timeout { after } => Error::Timeout { after },
            Error::BulkheadFull => Error::BulkheadFull,
            Error::RateLimited { retry_after } => Error::RateLimited { retry_after },
            Error::Shed { priority } => Error::Shed { priority },
            Error::FaultInjected => Error::FaultInjected,
            Error::KeyMismatch => Error::KeyMismatch,
            Error::StoreUnavailable => Error::StoreUnavailable,
            Error::InProgress { retry_after } => Error::InProgress { retry_after },
            Error::OutcomeUnknown => Error::OutcomeUnknown,
            Error::NotReplayable => Error::NotReplayable,
            Error::StoreFull => Error::StoreFull,
            Error::RetriesExhausted { attempts, last } => Error::RetriesExhausted {
                attempts,
                last: Box::new(last.map_inner(f)),
            },
        }
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Inner(e) => e.fmt(f),
            Error::CircuitOpen { retry_after } => write!(
                f,
                "circuit breaker is open: calls are rejected to let the dependency recover; retry after {retry_after:?}"
            ),
            Error::Timeout { after } => {
                write!(f, "timed out after {after:?}; the call was cancelled")
            }
            Error::BulkheadFull => f.write_str(
                "bulkhead full: every seat is taken and no place to wait was free in time; the call did not run",
            ),
            Error::RateLimited { retry_after } => write!(
                f,
                "rate limited: over the configured rate; retry after {retry_after:?}"
            ),
            Error::Shed { priority } => write!(
                f,
                "shed: the service is overloaded and {priority} priority work is turned away until load falls; the call did not run"
            ),
            Error::FaultInjected => {
                f.write_str("fault injected (chaos): the call did not run")
            }
            Error::KeyMismatch => f.write_str(
                "idempotency key reused with a different request; the call did not run (use a new key)",
            ),
            Error::StoreUnavailable => f.write_str(
                "state store unavailable and the policy fails closed; the call did not run",
            ),
            Error::InProgress { retry_after } => write!(
                f,
                "a call with this idempotency key is still running; this one did not run; ask again after {retry_after:?}"
            ),
            Error::OutcomeUnknown => f.write_str(
                "the first call with this idempotency key ended without a known outcome; the key is kept until it expires, and this call did not run",
            ),
            Error::NotReplayable => f.write_str(
                "the first call with this idempotency key ran, but its result was too large to keep; this call did not run",
            ),
            Error::StoreFull => f.write_str(
                "the idempotency store is full of calls still running; this call did not run",
            ),
            Error::RetriesExhausted { attempts, last } => {
                let noun = if *attempts == 1 { "attempt" } else { "attempts" };
                write!(f, "gave up after {attempts} {noun}; last error: {last}")
            }
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Error<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Inner(e) => Some(e),
            Error::RetriesExhausted { last, .. } => Some(&**last),
            _ => None,
        }
    }
}

impl<E> From<crate::circuit_breaker::Rejected> for Error<E> {
    fn from(r: crate::circuit_breaker::Rejected) -> Self {
        Error::CircuitOpen {
            retry_after: r.retry_after,
        }
    }
}

/// Turns a tower service's error into keel's error, flattening one that is
/// already keel's (a keel layer inside another).
#[cfg(feature = "tower")]
pub(crate) fn lift_boxed(e: impl Into<BoxError>) -> Error<ServiceError> {
    match e.into().downcast::<Error<ServiceError>>() {
        Ok(keel) => *keel,
        Err(other) => match other.downcast::<ServiceError>() {
            Ok(inner) => Error::Inner(*inner),
            Err(other) => Error::Inner(ServiceError(other)),
        },
    }
}

pin_project! {
    /// An operation's future with its error lifted into [`Error::Inner`]: how
    /// every policy's `call` turns the user's operation into a step's.
    pub(crate) struct LiftErr<Fut> {
        #[pin]
        fut: Fut,
    }
}

impl<Fut> LiftErr<Fut> {
    pub(crate) fn new(fut: Fut) -> Self {
        LiftErr { fut }
    }
}

impl<T, E, Fut: Future<Output = Result<T, E>>> Future for LiftErr<Fut> {
    type Output = Result<T, Error<E>>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().fut.poll(cx).map(|r| r.map_err(Error::Inner))
    }
}

/// A policy's configuration was invalid. Names the field and the reason.
///
/// ```
/// use keel::circuit_breaker::CircuitBreaker;
/// let err = CircuitBreaker::builder("payment")
///     .failure_rate_threshold(1.5)
///     .build()
///     .unwrap_err();
/// assert_eq!(err.field(), "failure_rate_threshold");
/// assert_eq!(
///     err.to_string(),
///     "failure_rate_threshold: must be a fraction in (0, 1], got 1.5"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: String,
    reason: String,
}

impl ConfigError {
    /// An error about `field`, for `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The path of the offending field, e.g. `retry.max_attempts`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Renames the field from a builder's name to a config struct's.
    pub(crate) fn renamed(mut self, names: &[(&str, &str)]) -> Self {
        if let Some((_, to)) = names.iter().find(|(from, _)| *from == self.field) {
            self.field = (*to).to_string();
        }
        self
    }

    /// Prefixes the field path, for configurations nested in others
    /// (`routes[0].retry` + `max_attempts`).
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Checks that `v` is a fraction in (0, 1].
pub(crate) fn check_fraction(field: &str, v: f64) -> Result<(), ConfigError> {
    if v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!("must be a fraction in (0, 1], got {v}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Boom;
    impl fmt::Display for Boom {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("boom")
        }
    }
    impl std::error::Error for Boom {}

    #[test]
    fn messages_say_what_and_when() {
        let e: Error<Boom> = Error::CircuitOpen {
            retry_after: Duration::from_secs(3),
        };
        assert!(e.to_string().contains("circuit breaker is open"));
        assert!(e.to_string().contains("retry after 3s"));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));

        let e: Error<Boom> = Error::Timeout {
            after: Duration::from_millis(250),
        };
        assert_eq!(
            e.to_string(),
            "timed out after 250ms; the call was cancelled"
        );
    }

    #[test]
    fn sources_chain_to_the_operation_error() {
        use std::error::Error as _;
        let e: Error<Boom> = Error::RetriesExhausted {
            attempts: 3,
            last: Box::new(Error::Inner(Boom)),
        };
        assert_eq!(e.to_string(), "gave up after 3 attempts; last error: boom");
        let last = e.source().unwrap();
        assert_eq!(last.to_string(), "boom");
        assert_eq!(last.source().unwrap().to_string(), "boom");
    }

    #[test]
    fn config_error_nests_field_paths() {
        let e = ConfigError::new("max_attempts", "must be at least 1").within("routes[0].retry");
        assert_eq!(
            e.to_string(),
            "routes[0].retry.max_attempts: must be at least 1"
        );
    }
}
