use micro_core::error::{BoxError, Retryable};

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong talking to a registry or choosing an instance.
///
/// [`is_retryable`](Error::is_retryable) tells whether trying again may succeed:
/// an unreachable registry or a service with no healthy instance may recover, an invalid
/// registration or a refused token will not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry could not be reached, or failed to answer. Retryable.
    #[error("the {backend} registry is unreachable")]
    Unavailable {
        /// Which backend failed (`"etcd"`, `"consul"`, ...).
        backend: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The registry refused the request, for instance an ACL token without the right
    /// permission. Not retryable.
    #[error("the {backend} registry refused the request")]
    Refused {
        /// Which backend refused.
        backend: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The registry answered something this crate cannot read. Not retryable.
    #[error("the {backend} registry sent an answer that cannot be decoded")]
    Decode {
        /// Which backend answered.
        backend: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The instance is not registered (never was, was deregistered, or its TTL lapsed).
    /// Not retryable as such: register it again.
    #[error("instance `{id}` of service `{service}` is not registered")]
    NotRegistered {
        /// The service name.
        service: String,
        /// The instance id.
        id: String,
    },
    /// A registration is invalid (an empty name, a character a backend cannot store, a
    /// zero TTL). Not retryable.
    #[error("invalid registration: {reason}")]
    InvalidRegistration {
        /// What is wrong.
        reason: String,
    },
    /// The service has no healthy instance, or none answered within the resolve timeout.
    /// Retryable: instances may come up.
    #[error("no healthy instance of service `{service}`")]
    NoInstances {
        /// The service name.
        service: String,
    },
    /// The backend cannot do what was asked, such as reporting health for an instance
    /// registered without a TTL on Consul. Not retryable.
    #[error("the {backend} registry does not support {operation}")]
    Unsupported {
        /// Which backend.
        backend: &'static str,
        /// What was asked.
        operation: &'static str,
    },
}

impl Error {
    /// Whether the same call may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::NoInstances { .. })
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        Self::InvalidRegistration {
            reason: reason.into(),
        }
    }

    pub(crate) fn not_registered(service: &str, id: &str) -> Self {
        Self::NotRegistered {
            service: service.to_owned(),
            id: id.to_owned(),
        }
    }

    /// Boxes the error for a client stack, marked so that micro-core's
    /// [`is_retryable`](micro_core::error::is_retryable) sees the verdict.
    pub(crate) fn into_stack_error(self) -> BoxError {
        if self.is_retryable() {
            micro_core::error::retryable(self)
        } else {
            micro_core::error::permanent(self)
        }
    }
}

impl Retryable for Error {
    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_errors_survive_boxing_for_the_client_stack() {
        let err = Error::NoInstances {
            service: "product-service".into(),
        };
        assert!(err.is_retryable());
        assert_eq!(
            err.to_string(),
            "no healthy instance of service `product-service`"
        );
        assert!(micro_core::error::is_retryable(&*err.into_stack_error()));
        let err = Error::invalid("empty id");
        assert!(!micro_core::error::is_retryable(&*err.into_stack_error()));
    }
}
