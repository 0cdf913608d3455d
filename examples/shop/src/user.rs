//! The user service: register, log in (a signed JWT that the gateway verifies), and the
//! caller's profile.
//!
//! Passwords are kept as PBKDF2-HMAC-SHA256 hashes with a random salt per user. Tokens
//! are HS256 JWTs with `sub` (the user id), `iss`, `aud`, `iat`, `exp` and `scope`; the
//! gateway checks them and forwards `sub` as `x-user-id`, so no other service handles
//! tokens.

use std::num::NonZeroU32;
use std::time::Duration;

use aws_lc_rs::{pbkdf2, rand};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use micro_core::service::Service;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, Body, UserId};
use crate::store::Store;

const USERS: &str = "users";
const BY_EMAIL: &str = "users-by-email";
const ITERATIONS: u32 = 100_000;

/// The `iss` of the shop's tokens.
pub const ISSUER: &str = "shop-user-service";
/// The `aud` of the shop's tokens.
pub const AUDIENCE: &str = "shop";

/// A registered user, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The user id (`sub` of their tokens).
    pub id: String,
    /// Their email, lowercased.
    pub email: String,
    /// Their name.
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    profile: Profile,
    salt: String,
    hash: String,
}

/// `POST /users/register`.
#[derive(Debug, Deserialize)]
pub struct Register {
    /// Email.
    pub email: String,
    /// Password, 8 to 128 characters.
    pub password: String,
    /// Display name.
    pub name: String,
}

/// `POST /users/login`.
#[derive(Debug, Deserialize)]
pub struct Login {
    /// Email.
    pub email: String,
    /// Password.
    pub password: String,
}

/// A login's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Token {
    /// The JWT.
    pub token: String,
    /// `Bearer`.
    pub token_type: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    email: &'a str,
    scope: &'a str,
}

/// The user service.
#[derive(Clone)]
pub struct Users {
    store: Store,
    key: EncodingKey,
    lifetime: Duration,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn iterations() -> NonZeroU32 {
    NonZeroU32::new(ITERATIONS).unwrap_or(NonZeroU32::MIN)
}

impl Users {
    /// The service over `store`, signing tokens that live `lifetime` with `secret`.
    pub fn new(store: Store, secret: &str, lifetime: Duration) -> Self {
        Self {
            store,
            key: EncodingKey::from_secret(secret.as_bytes()),
            lifetime,
        }
    }

    /// Registers a user.
    pub fn register(&self, request: &Register) -> Result<Profile, ApiError> {
        let email = request.email.trim().to_lowercase();
        let valid_email = email.len() <= 254
            && email
                .split_once('@')
                .is_some_and(|(user, domain)| !user.is_empty() && domain.contains('.'));
        if !valid_email {
            return Err(ApiError::bad_request(
                "invalid_email",
                "the email is not valid",
            ));
        }
        if !(8..=128).contains(&request.password.chars().count()) {
            return Err(ApiError::bad_request(
                "weak_password",
                "a password has 8 to 128 characters",
            ));
        }
        let name = request.name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(ApiError::bad_request(
                "invalid_name",
                "a name has 1 to 100 characters",
            ));
        }
        let mut salt = [0u8; 16];
        rand::fill(&mut salt).map_err(|_| anyhow::anyhow!("no randomness"))?;
        let mut hash = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations(),
            &salt,
            request.password.as_bytes(),
            &mut hash,
        );
        let stored = Stored {
            profile: Profile {
                id: format!("usr-{}", uuid::Uuid::new_v4().simple()),
                email: email.clone(),
                name: name.to_owned(),
            },
            salt: hex(&salt),
            hash: hex(&hash),
        };
        self.store
            .write(|tx| {
                if tx.get::<String>(BY_EMAIL, &email)?.is_some() {
                    return Ok(Err(ApiError::conflict(
                        "email_taken",
                        "a user with this email exists",
                    )));
                }
                tx.put(USERS, &stored.profile.id, &stored)?;
                tx.put(BY_EMAIL, &email, &stored.profile.id)?;
                Ok(Ok(stored.profile.clone()))
            })
            .map_err(ApiError::from)?
    }

    /// Checks a password and issues a token.
    pub fn login(&self, request: &Login) -> Result<Token, ApiError> {
        let refused = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "the email or the password is wrong",
            )
        };
        let email = request.email.trim().to_lowercase();
        let Some(id) = self.store.get::<String>(BY_EMAIL, &email)? else {
            return Err(refused());
        };
        let Some(stored) = self.store.get::<Stored>(USERS, &id)? else {
            return Err(refused());
        };
        let (Some(salt), Some(hash)) = (unhex(&stored.salt), unhex(&stored.hash)) else {
            return Err(anyhow::anyhow!("a stored password hash is corrupt").into());
        };
        pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations(),
            &salt,
            request.password.as_bytes(),
            &hash,
        )
        .map_err(|_| refused())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| anyhow::anyhow!(e))?
            .as_secs();
        let claims = Claims {
            sub: &stored.profile.id,
            iss: ISSUER,
            aud: AUDIENCE,
            iat: now,
            exp: now + self.lifetime.as_secs(),
            email: &stored.profile.email,
            scope: "shop",
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(Token {
            token,
            token_type: "Bearer".to_owned(),
            expires_in: self.lifetime.as_secs(),
        })
    }

    /// The profile of a user.
    pub fn profile(&self, id: &str) -> Result<Profile, ApiError> {
        self.store
            .get::<Stored>(USERS, id)?
            .map(|s| s.profile)
            .ok_or_else(|| ApiError::not_found("user_not_found", "no such user"))
    }
}

async fn register(
    State(users): State<Users>,
    Body(request): Body<Register>,
) -> Result<(StatusCode, Json<Profile>), ApiError> {
    // Hashing takes milliseconds of CPU: keep it off the async workers.
    let profile = tokio::task::spawn_blocking(move || users.register(&request))
        .await
        .map_err(|e| anyhow::anyhow!(e))??;
    Ok((StatusCode::CREATED, Json(profile)))
}

async fn login(
    State(users): State<Users>,
    Body(request): Body<Login>,
) -> Result<Json<Token>, ApiError> {
    let token = tokio::task::spawn_blocking(move || users.login(&request))
        .await
        .map_err(|e| anyhow::anyhow!(e))??;
    Ok(Json(token))
}

async fn me(State(users): State<Users>, UserId(id): UserId) -> Result<Json<Profile>, ApiError> {
    users.profile(&id).map(Json)
}

impl Service for Users {
    fn name(&self) -> &str {
        "user-service"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/users/register", post(register))
            .route("/users/login", post(login))
            .route("/users/me", get(me))
            .with_state(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_user_logs_in_with_the_right_password_only() {
        let users = Users::new(
            Store::in_memory().unwrap(),
            "secret",
            Duration::from_secs(60),
        );
        let profile = users
            .register(&Register {
                email: " Alice@Example.com ".into(),
                password: "correct horse".into(),
                name: "Alice".into(),
            })
            .unwrap();
        assert_eq!(profile.email, "alice@example.com");
        let again = users.register(&Register {
            email: "alice@example.com".into(),
            password: "another one".into(),
            name: "A".into(),
        });
        assert_eq!(again.unwrap_err().code(), "email_taken");

        let wrong = users.login(&Login {
            email: "alice@example.com".into(),
            password: "wrong horse".into(),
        });
        assert_eq!(wrong.unwrap_err().code(), "invalid_credentials");
        let token = users
            .login(&Login {
                email: "ALICE@example.com".into(),
                password: "correct horse".into(),
            })
            .unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        let key = jsonwebtoken::DecodingKey::from_secret(b"secret");
        let decoded =
            jsonwebtoken::decode::<serde_json::Value>(&token.token, &key, &validation).unwrap();
        assert_eq!(decoded.claims["sub"], profile.id.as_str());
    }

    #[test]
    fn bad_registrations_are_refused_with_a_reason() {
        let users = Users::new(
            Store::in_memory().unwrap(),
            "secret",
            Duration::from_secs(60),
        );
        let try_register = |email: &str, password: &str, name: &str| {
            users
                .register(&Register {
                    email: email.into(),
                    password: password.into(),
                    name: name.into(),
                })
                .unwrap_err()
                .code()
        };
        assert_eq!(try_register("nobody", "long enough", "N"), "invalid_email");
        assert_eq!(try_register("n@example.com", "short", "N"), "weak_password");
        assert_eq!(
            try_register("n@example.com", "long enough", " "),
            "invalid_name"
        );
    }
}
