//! One classifier decides what an outcome means, for every policy.
//!
//! A [`Classify`] looks at a call's `Result` and returns a [`Verdict`]: the
//! [`Outcome`] the circuit breaker records (and metrics count), whether retry
//! may try again, and a server hint of when (`Retry-After`).
//!
//! Closures work as classifiers; they may return an [`Outcome`] or a full
//! [`Verdict`]:
//!
//! ```
//! use keel::classify::{Classify, Outcome, Verdict};
//! use std::time::Duration;
//!
//! // A 404 is the caller's problem, not the dependency's: ignore it.
//! let c = |r: &Result<u16, std::io::Error>| match r {
//!     Ok(404) => Outcome::Ignore,
//!     Ok(s) if *s >= 500 => Outcome::Failure,
//!     Ok(_) => Outcome::Success,
//!     Err(_) => Outcome::Failure,
//! };
//! assert_eq!(c.classify(&Ok(404)).outcome, Outcome::Ignore);
//! assert!(c.classify(&Ok(503)).retryable);
//!
//! // A 429 asks to come back later: a failure with a hint.
//! let hinted = |r: &Result<u16, std::io::Error>| match r {
//!     Ok(429) => Verdict::failure().retry_after(Duration::from_secs(2)),
//!     Ok(_) => Verdict::success(),
//!     Err(_) => Verdict::failure(),
//! };
//! assert_eq!(hinted.classify(&Ok(429)).retry_after, Some(Duration::from_secs(2)));
//! ```

use std::time::Duration;

use crate::Error;

/// What a call's result means to the policies that watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The dependency did its job.
    Success,
    /// The dependency failed; it counts against it.
    Failure,
    /// Neither: not counted by the breaker (e.g. a client error, a cancelled call).
    Ignore,
}

/// A classifier's full decision about one result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// What the breaker records and metrics count.
    pub outcome: Outcome,
    /// Whether retry may try the call again.
    pub retryable: bool,
    /// The server's hint of when to try again, which replaces retry's backoff.
    pub retry_after: Option<Duration>,
}

impl Verdict {
    /// A success: recorded as such, not retried.
    pub const fn success() -> Self {
        Verdict {
            outcome: Outcome::Success,
            retryable: false,
            retry_after: None,
        }
    }

    /// A failure, retryable.
    pub const fn failure() -> Self {
        Verdict {
            outcome: Outcome::Failure,
            retryable: true,
            retry_after: None,
        }
    }

    /// Neither success nor failure; not retried.
    pub const fn ignore() -> Self {
        Verdict {
            outcome: Outcome::Ignore,
            retryable: false,
            retry_after: None,
        }
    }

    /// Sets whether retry may try again.
    pub const fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Adds a server hint of when to try again.
    pub const fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

impl From<Outcome> for Verdict {
    /// A failure is retryable; success and ignore are not.
    fn from(outcome: Outcome) -> Self {
        Verdict {
            outcome,
            retryable: outcome == Outcome::Failure,
            retry_after: None,
        }
    }
}

/// Decides what a `Result<T, E>` means.
pub trait Classify<T, E> {
    /// The verdict on one result.
    fn classify(&self, result: &Result<T, E>) -> Verdict;
}

impl<T, E, F, V> Classify<T, E> for F
where
    F: Fn(&Result<T, E>) -> V,
    V: Into<Verdict>,
{
    fn classify(&self, result: &Result<T, E>) -> Verdict {
        self(result).into()
    }
}

/// `Ok` is a success, `Err` a retryable failure.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl<T, E> Classify<T, E> for DefaultClassifier {
    fn classify(&self, result: &Result<T, E>) -> Verdict {
        match result {
            Ok(_) => Verdict::success(),
            Err(_) => Verdict::failure(),
        }
    }
}

/// Classifies a result whose error may be one of keel's own.
///
/// The operation's values and errors go to the user's classifier; keel's own
/// errors have fixed meanings: an inner timeout is a retryable failure, a
/// rejection by an inner breaker is ignored by outer breakers but retryable
/// after its `retry_after`, a full inner bulkhead is ignored and retryable,
/// shed work is ignored and not retried, and an exhausted inner retry is a failure that is
/// not retried again (retries must not multiply across layers).
///
/// Takes the result by value and gives it back, so the user's classifier can
/// see a `&Result<T, E>` without copying.
pub(crate) fn classify_lifted<T, E, C>(
    classifier: &C,
    result: Result<T, Error<E>>,
) -> (Verdict, Result<T, Error<E>>)
where
    C: Classify<T, E> + ?Sized,
{
    match result {
        Ok(v) => {
            let r = Ok(v);
            let verdict = classifier.classify(&r);
            (verdict, r.map_err(Error::Inner))
        }
        Err(Error::Inner(e)) => {
            let r = Err(e);
            let verdict = classifier.classify(&r);
            (verdict, r.map_err(Error::Inner))
        }
        Err(e) => (own_verdict(&e), Err(e)),
    }
}

fn own_verdict<E>(e: &Error<E>) -> Verdict {
    match e {
        Error::Inner(_) => Verdict::failure(),
        Error::CircuitOpen { retry_after } => Verdict {
            outcome: Outcome::Ignore,
            retryable: true,
            retry_after: Some(*retry_after),
        },
        Error::Timeout { .. } => Verdict::failure(),
        // Local overload says nothing about the dependency: not a failure
        // for an outer breaker, but worth another try later.
        Error::BulkheadFull => Verdict::ignore().with_retryable(true),
        Error::RateLimited { retry_after } => Verdict {
            outcome: Outcome::Ignore,
            retryable: true,
            retry_after: Some(*retry_after),
        },
        // Shedding is deliberate: retrying shed work feeds the overload.
        Error::Shed { .. } => Verdict::ignore(),
        // A rehearsal of a failing dependency: treated as one.
        Error::FaultInjected => Verdict::failure(),
        // The caller's mistake: the same again fails the same way.
        Error::KeyMismatch => Verdict::ignore(),
        // Keel's own store, not the dependency: worth another try later.
        Error::StoreUnavailable | Error::StoreFull => Verdict::ignore().with_retryable(true),
        // The first call is still running: ask again when told.
        Error::InProgress { retry_after } => Verdict {
            outcome: Outcome::Ignore,
            retryable: true,
            retry_after: Some(*retry_after),
        },
        // The operation ran (or may have): running it again could act
        // twice.
        Error::OutcomeUnknown | Error::NotReplayable => Verdict::ignore(),
        Error::RetriesExhausted { .. } => Verdict::failure().with_retryable(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_classifier_treats_err_as_retryable_failure() {
        let c = DefaultClassifier;
        assert_eq!(Classify::<u8, ()>::classify(&c, &Ok(1)), Verdict::success());
        assert_eq!(
            Classify::<u8, ()>::classify(&c, &Err(())),
            Verdict::failure()
        );
    }

    #[test]
    fn keel_errors_have_fixed_meanings() {
        let c = DefaultClassifier;
        let (v, _) = classify_lifted::<u8, (), _>(
            &c,
            Err(Error::Timeout {
                after: Duration::from_secs(1),
            }),
        );
        assert_eq!(v, Verdict::failure());
        let (v, _) = classify_lifted::<u8, (), _>(
            &c,
            Err(Error::CircuitOpen {
                retry_after: Duration::from_secs(4),
            }),
        );
        assert_eq!(v.outcome, Outcome::Ignore);
        assert!(v.retryable);
        assert_eq!(v.retry_after, Some(Duration::from_secs(4)));
        let (v, _) = classify_lifted::<u8, (), _>(
            &c,
            Err(Error::RetriesExhausted {
                attempts: 2,
                last: Box::new(Error::Inner(())),
            }),
        );
        assert_eq!(v.outcome, Outcome::Failure);
        assert!(!v.retryable);
    }

    #[test]
    fn user_classifier_sees_values_and_inner_errors() {
        let c = |r: &Result<u16, &'static str>| match r {
            Ok(s) if *s >= 500 => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Ignore,
        };
        let (v, r) = classify_lifted(&c, Ok(503));
        assert_eq!(v.outcome, Outcome::Failure);
        assert_eq!(r.unwrap(), 503);
        let (v, r) = classify_lifted(&c, Err(Error::Inner("no")));
        assert_eq!(v.outcome, Outcome::Ignore);
        assert!(matches!(r, Err(Error::Inner("no"))));
    }
}
