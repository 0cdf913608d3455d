//! Service identity: who is calling, verified, never read from a bare header.
//!
//! Inside a system of services, "the caller" is two things: the **service** that made
//! the call and, when the call acts for someone, the **end user**. A service that takes
//! either from a plain header (`x-user-id`) lets anything that reaches its port act as
//! any user. This module carries both as a short-lived signed token instead:
//!
//! - The calling side signs each outgoing request as its own service, for the target
//!   service (the token's audience), and carries the end user along:
//!   [`SignCallerLayer`] on an [`HttpClient`](crate::client::HttpClient).
//! - The receiving side verifies the token and turns it into a typed [`Caller`] in the
//!   request's extensions: [`VerifyCallerLayer`]. A missing or invalid token is a `401`
//!   with a JSON body; a handler takes the [`Caller`] as an axum extractor.
//! - A route states which services may call it: [`AllowCallersLayer`] answers `403`
//!   to any other.
//!
//! Tokens are HS256 JWTs in the [`IDENTITY_HEADER`] (`x-micro-identity`), with a key id
//! (`kid`) naming the key that signed them. A [`KeyRing`] holds one signing key and any
//! number of verification keys and can be swapped at runtime, so keys rotate without a
//! restart: add the new key for verification everywhere, then make it the signing key,
//! then drop the old one. Tokens live [60 seconds](KeyRing::DEFAULT_TTL) and are
//! checked with [5 seconds of leeway](KeyRing::DEFAULT_LEEWAY) for clock skew.
//!
//! ```
//! use axum::{routing::post, Router};
//! use micro_core::identity::{
//!     AllowCallersLayer, Caller, KeyRing, KeySet, Secret, VerifyCallerLayer,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = KeyRing::new(KeySet::new("k1", Secret::new(*b"0123456789abcdef0123456789abcdef")?));
//!
//! // payment-service: refunds only from the order service, anything else from any
//! // verified service.
//! let router: Router = Router::new()
//!     .route(
//!         "/refunds",
//!         post(|caller: Caller| async move { format!("refund for {:?}", caller.user) })
//!             .route_layer(AllowCallersLayer::new(["order-service"])),
//!     )
//!     .layer(VerifyCallerLayer::new(keys.clone(), "payment-service"));
//!
//! // order-service signs its calls to payment-service, as itself.
//! let token = keys.sign(&Caller::service("order-service"), "payment-service")?;
//! let caller = keys.verify(&token, "payment-service")?;
//! assert_eq!(caller.service, "order-service");
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
mod keys;
mod layer;

pub use self::client::{OnBehalfOf, SignCaller, SignCallerLayer};
pub use self::error::{Error, ErrorKind};
pub use self::keys::{KeyRing, KeySet, Secret};
pub use self::layer::{
    current_caller, AllowCallers, AllowCallersLayer, VerifyCaller, VerifyCallerLayer,
};

use http::HeaderName;
use serde::{Deserialize, Serialize};

/// The header that carries the signed identity token between services.
pub const IDENTITY_HEADER: HeaderName = HeaderName::from_static("x-micro-identity");

/// A verified caller: the service that made the call and the end user it acts for.
///
/// [`VerifyCallerLayer`] puts one in every request's extensions; a handler takes it as
/// an extractor (a request without one is answered `401`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Caller {
    /// The calling service's name, such as `order-service` or `gateway`.
    pub service: String,
    /// The end user the call acts for (the subject of their sign-in), if any.
    pub user: Option<String>,
}

impl Caller {
    /// A service calling on its own behalf.
    pub fn service(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            user: None,
        }
    }

    /// A service calling for `user`.
    pub fn for_user(service: impl Into<String>, user: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            user: Some(user.into()),
        }
    }

    /// The end user, or an [`ErrorKind::NoUser`] error (answered `401`) when the call
    /// acts for nobody.
    pub fn require_user(&self) -> Result<&str, Error> {
        self.user
            .as_deref()
            .ok_or_else(|| Error::new(ErrorKind::NoUser))
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::Missing))
    }
}
