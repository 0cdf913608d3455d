//! The error type of this crate.

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an event could not be built, encoded or decoded.
///
/// Every variant describes a malformed event or payload, so none of them is
/// cured by retrying: a consumer should send such a message to its dead-letter
/// topic instead (see [`Error::is_retryable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A required attribute (`id`, `source`, `specversion` or `type`) is absent.
    #[error("missing required attribute `{attribute}`")]
    #[non_exhaustive]
    MissingAttribute {
        /// The CloudEvents name of the attribute.
        attribute: &'static str,
    },

    /// An attribute is present but empty; CloudEvents requires every present
    /// string attribute to be non-empty.
    #[error("attribute `{attribute}` is empty")]
    #[non_exhaustive]
    EmptyAttribute {
        /// The CloudEvents name of the attribute.
        attribute: &'static str,
    },

    /// An attribute is present but its value is not valid for it.
    #[error("attribute `{attribute}` is invalid: {reason}")]
    #[non_exhaustive]
    InvalidAttribute {
        /// The CloudEvents name of the attribute.
        attribute: &'static str,
        /// What is wrong with the value.
        reason: String,
    },

    /// A binary-mode message carries the same attribute twice.
    #[error("attribute `{attribute}` appears more than once")]
    #[non_exhaustive]
    DuplicateAttribute {
        /// The CloudEvents name of the attribute.
        attribute: &'static str,
    },

    /// The `specversion` attribute names a version other than `1.0`.
    #[error("unsupported specversion `{found}`, expected `1.0`")]
    #[non_exhaustive]
    UnsupportedSpecVersion {
        /// The specversion that was found.
        found: String,
    },

    /// The data content type is not JSON.
    #[error("unsupported data content type `{found}`, expected json")]
    #[non_exhaustive]
    UnsupportedContentType {
        /// The content type that was found.
        found: String,
    },

    /// A structured-mode document carries `data_base64`; only JSON data is
    /// supported.
    #[error("event carries `data_base64`, only json data is supported")]
    Base64Data,

    /// The event has no data, and the payload type cannot be made from nothing.
    #[error("event has no data")]
    MissingData,

    /// The document or the data could not be decoded as JSON into the payload
    /// type.
    #[error("failed to decode event json")]
    Decode(#[source] serde_json::Error),

    /// The payload could not be encoded as JSON.
    #[error("failed to encode event data as json")]
    Encode(#[source] serde_json::Error),
}

impl Error {
    /// The CloudEvents name of the attribute this error is about, if any.
    pub fn attribute(&self) -> Option<&'static str> {
        match self {
            Error::MissingAttribute { attribute }
            | Error::EmptyAttribute { attribute }
            | Error::InvalidAttribute { attribute, .. }
            | Error::DuplicateAttribute { attribute } => Some(attribute),
            Error::UnsupportedSpecVersion { .. } => Some(crate::attr::SPECVERSION),
            Error::UnsupportedContentType { .. } => Some(crate::attr::DATACONTENTTYPE),
            Error::Base64Data | Error::MissingData | Error::Decode(_) | Error::Encode(_) => None,
        }
    }

    /// Whether trying the same operation again could succeed.
    ///
    /// Always `false` today: every error is about the event itself, which does
    /// not change between attempts.
    pub fn is_retryable(&self) -> bool {
        false
    }

    pub(crate) fn invalid(attribute: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidAttribute {
            attribute,
            reason: reason.into(),
        }
    }
}
