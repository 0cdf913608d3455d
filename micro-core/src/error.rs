//! Error plumbing shared by every micro crate: the boxed error that generic middleware
//! speaks, and the answer to "is it safe to try this again?".
//!
//! Retries, sagas and event consumers all make the same decision, so it lives here in one
//! place: [`is_retryable`] walks an error's [`source`](std::error::Error::source) chain
//! and the nearest error it recognises decides. It knows:
//!
//! | error | retryable |
//! | --- | --- |
//! | [`Transient`] (made by [`retryable`]) | yes |
//! | [`Permanent`] (made by [`permanent`]) | no |
//! | [`Elapsed`] (a timeout fired) | yes |
//! | [`CircuitOpen`] | no |
//! | [`BulkheadFull`] | yes |
//! | [`std::io::Error`] of kind `ConnectionRefused`, `ConnectionReset`, `ConnectionAborted`, `TimedOut`, `BrokenPipe` or `UnexpectedEof` | yes |
//! | any other [`std::io::Error`] | no |
//! | [`client::Error`](crate::client::Error) | as [its kind says](crate::client::Error::is_retryable) |
//! | `tonic::Status`, `grpc::CallError` (with the `grpc` feature) | `UNAVAILABLE`, and `RESOURCE_EXHAUSTED` with a retry pushback (see the `grpc` module) |
//!
//! An error nobody recognises is not retryable: retrying is opt-in, because repeating a
//! request that is not idempotent or that failed for a lasting reason does harm.
//!
//! ```
//! use micro_core::error::{is_retryable, permanent, retryable};
//! use std::io;
//!
//! let reset = io::Error::from(io::ErrorKind::ConnectionReset);
//! assert!(is_retryable(&reset));
//!
//! let marked = retryable("the ledger is busy");
//! assert!(is_retryable(&*marked));
//!
//! let vetoed = permanent(io::Error::from(io::ErrorKind::ConnectionReset));
//! assert!(!is_retryable(&*vetoed));
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::io;

use crate::resilience::{BulkheadFull, CircuitOpen, Elapsed};

/// A type-erased error, what generic middleware returns when the inner service's error
/// type is not known.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Shows an error with its causes, joined by `: ` (`connecting: connection refused`), for
/// logs and messages: `tracing::warn!(error = %Chain(&error), "...")`.
///
/// ```
/// use micro_core::error::Chain;
/// use std::{error::Error, fmt, io};
///
/// #[derive(Debug)]
/// struct Connecting(io::Error);
///
/// impl fmt::Display for Connecting {
///     fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
///         f.write_str("connecting")
///     }
/// }
///
/// impl Error for Connecting {
///     fn source(&self) -> Option<&(dyn Error + 'static)> {
///         Some(&self.0)
///     }
/// }
///
/// let error = Connecting(io::Error::from(io::ErrorKind::ConnectionRefused));
/// assert_eq!(Chain(&error).to_string(), "connecting: connection refused");
/// ```
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a dyn StdError);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An error that knows whether the operation that produced it may safely be tried again.
///
/// Implementing this trait on your own error type lets code that holds the concrete type
/// ask it directly. [`is_retryable`] works on type-erased errors and only recognises the
/// kinds listed in the [module docs](self); wrap your error with [`retryable`] or
/// [`permanent`] to make the verdict visible there.
pub trait Retryable {
    /// Returns `true` if the failed operation may be tried again.
    fn is_retryable(&self) -> bool;
}

/// Tells whether `err` may be retried, by walking its `source()` chain from the outside in.
///
/// The first error in the chain whose kind is known decides, so an outer [`Permanent`]
/// overrides a retryable cause beneath it, and an outer [`Transient`] overrides a
/// permanent one. If no error in the chain is known, the answer is `false`.
pub fn is_retryable(err: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(verdict) = known_verdict(err) {
            return verdict;
        }
        next = err.source();
    }
    false
}

/// Marks `err` as safe to retry; [`is_retryable`] answers `true` for the result.
pub fn retryable(err: impl Into<BoxError>) -> BoxError {
    Box::new(Transient::new(err))
}

/// Marks `err` as not to be retried, whatever its cause; [`is_retryable`] answers `false`
/// for the result.
pub fn permanent(err: impl Into<BoxError>) -> BoxError {
    Box::new(Permanent::new(err))
}

/// The kinds [`is_retryable`] recognises, nearest first. To teach it another error type,
/// implement [`Retryable`] for that type and add one line here.
fn known_verdict(err: &(dyn StdError + 'static)) -> Option<bool> {
    const KNOWN: &[fn(&(dyn StdError + 'static)) -> Option<bool>] = &[
        verdict::<Transient>,
        verdict::<Permanent>,
        verdict::<Elapsed>,
        verdict::<CircuitOpen>,
        verdict::<BulkheadFull>,
        verdict::<io::Error>,
        verdict::<crate::client::Error>,
        #[cfg(feature = "grpc")]
        verdict::<tonic::Status>,
        #[cfg(feature = "grpc")]
        verdict::<crate::grpc::CallError>,
    ];
    KNOWN.iter().find_map(|verdict| verdict(err))
}

fn verdict<E>(err: &(dyn StdError + 'static)) -> Option<bool>
where
    E: StdError + Retryable + 'static,
{
    err.downcast_ref::<E>().map(Retryable::is_retryable)
}

/// An error marked safe to retry, made by [`retryable`] or [`Transient::new`].
///
/// It displays as the error it wraps; the wrapped error is reachable with
/// [`get_ref`](Transient::get_ref) and [`into_inner`](Transient::into_inner).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Transient(BoxError);

impl Transient {
    /// Wraps `err`, marking it retryable.
    pub fn new(err: impl Into<BoxError>) -> Self {
        Self(err.into())
    }

    /// Returns the wrapped error.
    pub fn get_ref(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.0
    }

    /// Consumes the marker, returning the wrapped error.
    pub fn into_inner(self) -> BoxError {
        self.0
    }
}

impl Retryable for Transient {
    fn is_retryable(&self) -> bool {
        true
    }
}

/// An error marked not to be retried, made by [`permanent`] or [`Permanent::new`].
///
/// It displays as the error it wraps; the wrapped error is reachable with
/// [`get_ref`](Permanent::get_ref) and [`into_inner`](Permanent::into_inner).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Permanent(BoxError);

impl Permanent {
    /// Wraps `err`, marking it not retryable.
    pub fn new(err: impl Into<BoxError>) -> Self {
        Self(err.into())
    }

    /// Returns the wrapped error.
    pub fn get_ref(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.0
    }

    /// Consumes the marker, returning the wrapped error.
    pub fn into_inner(self) -> BoxError {
        self.0
    }
}

impl Retryable for Permanent {
    fn is_retryable(&self) -> bool {
        false
    }
}

/// Connection-level failures are worth another try; an `io::Error` built around a custom
/// error defers to that error, which `source()` would otherwise skip.
impl Retryable for io::Error {
    fn is_retryable(&self) -> bool {
        use io::ErrorKind::*;
        matches!(
            self.kind(),
            ConnectionRefused
                | ConnectionReset
                | ConnectionAborted
                | TimedOut
                | BrokenPipe
                | UnexpectedEof
        ) || self.get_ref().is_some_and(|inner| is_retryable(inner))
    }
}

impl Retryable for BoxError {
    fn is_retryable(&self) -> bool {
        is_retryable(&**self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug, thiserror::Error)]
    #[error("calling the ledger failed")]
    struct Wrapper(#[source] io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("validation failed")]
    struct Unknown;

    #[test]
    fn io_errors_are_retryable_by_kind() {
        use io::ErrorKind::*;
        for kind in [
            ConnectionRefused,
            ConnectionReset,
            ConnectionAborted,
            TimedOut,
            BrokenPipe,
            UnexpectedEof,
        ] {
            assert!(is_retryable(&io::Error::from(kind)), "{kind:?}");
        }
        for kind in [NotFound, PermissionDenied, InvalidData, Other] {
            assert!(!is_retryable(&io::Error::from(kind)), "{kind:?}");
        }
    }

    #[test]
    fn the_source_chain_is_walked() {
        let err = Wrapper(io::ErrorKind::ConnectionReset.into());
        assert!(is_retryable(&err));
        let err = Wrapper(io::ErrorKind::NotFound.into());
        assert!(!is_retryable(&err));
    }

    #[test]
    fn unknown_errors_are_not_retryable() {
        assert!(!is_retryable(&Unknown));
        let boxed: BoxError = "plain message".into();
        assert!(!boxed.is_retryable());
    }

    #[test]
    fn markers_decide_over_their_causes() {
        assert!(is_retryable(&*retryable(Unknown)));
        assert!(!is_retryable(&*permanent(io::Error::from(
            io::ErrorKind::ConnectionReset
        ))));
        let reset = Wrapper(io::ErrorKind::ConnectionReset.into());
        assert!(!is_retryable(&*permanent(reset)));
        assert!(is_retryable(&*retryable(permanent(Unknown))));
        let outer = Wrapper(io::Error::other(Transient::new(Unknown)));
        assert!(is_retryable(&outer));
    }

    #[test]
    fn markers_display_and_keep_the_wrapped_error() {
        let err = Transient::new(Unknown);
        assert_eq!(err.to_string(), "validation failed");
        assert!(err.get_ref().is::<Unknown>());
        assert!(err.into_inner().downcast::<Unknown>().is_ok());
        let err = Permanent::new("stop");
        assert_eq!(err.to_string(), "stop");
    }

    #[test]
    fn resilience_errors_say_whether_to_retry() {
        assert!(is_retryable(&Elapsed::new(Duration::from_secs(1))));
        assert!(!is_retryable(&CircuitOpen::new(None)));
        assert!(is_retryable(&BulkheadFull::new()));
        let wrapped = io::Error::other(Elapsed::new(Duration::from_secs(1)));
        assert!(is_retryable(&wrapped));
    }
}
