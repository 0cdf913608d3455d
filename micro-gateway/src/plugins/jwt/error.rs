//! Why a token was refused, and why a configuration cannot be used.

/// Why a request's token was refused. Every variant but [`MissingToken`] answers `401`
/// with `error="invalid_token"`; the message goes to the client as the
/// `error_description`, so it says what is wrong without echoing the token.
///
/// [`MissingToken`]: JwtError::MissingToken
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The request carries no token where the plugin looks for one.
    #[error("a bearer token is required")]
    MissingToken,
    /// The token is longer than the configured bound; it is not decoded.
    #[error("the token is larger than {0} bytes")]
    TooLarge(usize),
    /// The token is not three base64url parts with a JSON header, or its header names an
    /// algorithm this gateway does not accept (`none` included).
    #[error("the token is malformed")]
    Malformed(#[source] jsonwebtoken::errors::Error),
    /// No configured or published key matches the token's `kid` or key claim.
    #[error("no key matches the token")]
    UnknownKey,
    /// A key matches, but it is pinned to another algorithm than the token's.
    #[error("the token's algorithm is not the one its key is pinned to")]
    Algorithm,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    Signature,
    /// `exp` is past, leeway included.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is ahead, leeway included.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is not one of the accepted issuers.
    #[error("the token's issuer is not accepted")]
    Issuer,
    /// `aud` names none of the accepted audiences.
    #[error("the token's audience is not accepted")]
    Audience,
    /// A claim the configuration requires is absent.
    #[error("the token lacks the `{0}` claim")]
    MissingClaim(String),
    /// `exp` lies further ahead than the configured `maximum_expiration`.
    #[error("the token's lifetime exceeds {0} seconds")]
    LifetimeTooLong(u64),
    /// Any other defect found while verifying.
    #[error("the token is invalid")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    /// The JWKS could not be fetched and no cached key matches.
    #[error("the signing keys cannot be fetched")]
    Jwks(#[source] JwksError),
}

impl JwtError {
    pub(crate) fn from_jsonwebtoken(error: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind;
        match error.kind() {
            ErrorKind::InvalidSignature => Self::Signature,
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidIssuer => Self::Issuer,
            ErrorKind::InvalidAudience => Self::Audience,
            ErrorKind::InvalidAlgorithm => Self::Algorithm,
            ErrorKind::MissingRequiredClaim(claim) => Self::MissingClaim(claim.clone()),
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_)
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::MissingAlgorithm => Self::Malformed(error),
            _ => Self::Invalid(error),
        }
    }
}

/// The JWKS endpoint could not give keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The request failed: connection refused, reset, or timed out.
    #[error("request to the jwks url failed")]
    Request(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The endpoint answered with a status other than `200`.
    #[error("the jwks url answered {0}")]
    Status(http::StatusCode),
    /// The body is not a JSON Web Key Set (or is larger than 1 MiB).
    #[error("the jwks url did not answer a json web key set")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No attempt made: the last one was too recent.
    #[error("the jwks was fetched too recently to fetch it again")]
    RateLimited,
}

/// A JWT plugin configuration that cannot be used: which field, and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct JwtConfigError {
    field: String,
    reason: String,
}

impl JwtConfigError {
    pub(crate) fn new(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// The field at fault, relative to the plugin's configuration (`keys[1].secret`).
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}
