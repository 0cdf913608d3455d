//! The identity error.

use std::fmt;

use axum::response::{IntoResponse, Response};
use http::StatusCode;

/// Why a caller was not accepted, or a token not made.
///
/// As a response it is `401` (no or bad credential) or `403` (a valid caller that the
/// route does not accept) with `{"error": {"code", "message"}}`; the message never
/// contains the token.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    source: Option<jsonwebtoken::errors::Error>,
}

/// What went wrong; see [`Error::kind`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request carried no identity token.
    Missing,
    /// The token is not a well-formed token of ours.
    Malformed,
    /// The token names a key id the key ring does not hold.
    UnknownKey,
    /// The signature does not match the key.
    BadSignature,
    /// The token has expired (beyond the leeway).
    Expired,
    /// The token was made for another service.
    WrongAudience,
    /// The call acts for no end user, and the route needs one.
    NoUser,
    /// The calling service may not call this route.
    Forbidden {
        /// The calling service.
        service: String,
    },
    /// A secret is too short (fewer than [`Secret::MIN_LEN`](super::Secret::MIN_LEN)
    /// bytes) or a known placeholder.
    WeakSecret,
    /// Signing failed.
    Sign,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Self {
        Self { kind, source: None }
    }

    pub(crate) fn with_source(kind: ErrorKind, source: jsonwebtoken::errors::Error) -> Self {
        Self {
            kind,
            source: Some(source),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The HTTP status this error answers with: `403` for [`ErrorKind::Forbidden`],
    /// `500` for a failure to sign or a weak secret, `401` otherwise.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::Forbidden { .. } => StatusCode::FORBIDDEN,
            ErrorKind::Sign | ErrorKind::WeakSecret => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Missing => f.write_str("missing caller identity"),
            ErrorKind::Malformed => f.write_str("malformed caller identity"),
            ErrorKind::UnknownKey => f.write_str("caller identity signed with an unknown key"),
            ErrorKind::BadSignature => f.write_str("caller identity has a bad signature"),
            ErrorKind::Expired => f.write_str("caller identity has expired"),
            ErrorKind::WrongAudience => f.write_str("caller identity is for another service"),
            ErrorKind::NoUser => f.write_str("call acts for no user"),
            ErrorKind::Forbidden { service } => {
                write!(f, "service `{service}` may not call this route")
            }
            ErrorKind::WeakSecret => {
                f.write_str("secret is too short (at least 32 bytes) or a known placeholder")
            }
            ErrorKind::Sign => f.write_str("could not sign caller identity"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let code = match status {
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::UNAUTHORIZED => "unauthenticated",
            _ => "internal",
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "identity failure");
        } else {
            tracing::debug!(error = %self, "caller refused");
        }
        let body = serde_json::json!({ "error": { "code": code, "message": self.to_string() } });
        (status, axum::Json(body)).into_response()
    }
}
