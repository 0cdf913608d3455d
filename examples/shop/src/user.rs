//! The user service: register, log in (a signed JWT that the gateway verifies), and the
//! caller's profile.
//!
//! Passwords are kept as PBKDF2-HMAC-SHA256 hashes with a random salt per user, at
//! OWASP's [600,000 iterations](OWASP_ITERATIONS) by default; a hash made with fewer is
//! made again at the user's next login. A login for an unknown email spends the same
//! work on a hash as one for a wrong password, so its timing doesn't tell whether the
//! email is registered. Tokens are HS256 JWTs with `sub` (the user id), `iss`, `aud`,
//! `iat`, `exp` and `scope`; the gateway checks them and vouches for `sub` in the
//! identity it signs for the services, so no other service handles tokens.

use std::num::NonZeroU32;
use std::time::Duration;

use aws_lc_rs::{pbkdf2, rand};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use micro_core::health::HealthCheck;
use micro_core::service::Service;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, Body, UserId};
use crate::store::Store;

const USERS: &str = "users";
const BY_EMAIL: &str = "users-by-email";
/// The iterations of hashes stored before the count was kept with each hash.
const LEGACY_ITERATIONS: u32 = 100_000;

/// OWASP's Password Storage Cheat Sheet's PBKDF2-HMAC-SHA256 work factor.
pub const OWASP_ITERATIONS: u32 = 600_000;

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
    /// The PBKDF2 iterations the hash was made with.
    #[serde(default = "legacy_iterations")]
    iterations: u32,
}

fn legacy_iterations() -> u32 {
    LEGACY_ITERATIONS
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

/// Where users are kept: the service's embedded store, or PostgreSQL.
#[derive(Clone)]
pub enum UserStore {
    /// The service's own embedded store.
    Embedded(Store),
    /// A `users` table in PostgreSQL (feature `real-servers`).
    #[cfg(feature = "real-servers")]
    Postgres {
        /// The pool of connections.
        pool: micro_events::postgres::Pool,
        /// The schema of the table.
        schema: String,
    },
}

impl std::fmt::Debug for UserStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded(store) => f.debug_tuple("Embedded").field(store).finish(),
            #[cfg(feature = "real-servers")]
            Self::Postgres { schema, .. } => {
                f.debug_struct("Postgres").field("schema", schema).finish()
            }
        }
    }
}

impl UserStore {
    /// Users in PostgreSQL at `url`, in `schema` (created if missing).
    ///
    /// # Errors
    ///
    /// When PostgreSQL cannot be reached or the schema is not a plain name.
    #[cfg(feature = "real-servers")]
    pub async fn postgres(url: &str, schema: &str) -> anyhow::Result<Self> {
        let pool = crate::store::postgres::pool_with_schema(url, schema, "user-service").await?;
        pool.get()
            .await?
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {schema}.users (
                     id text PRIMARY KEY,
                     email text NOT NULL UNIQUE,
                     doc jsonb NOT NULL
                 )"
            ))
            .await?;
        Ok(Self::Postgres {
            pool,
            schema: schema.to_owned(),
        })
    }

    /// What readiness checks: that PostgreSQL can be reached, for users kept there.
    fn health_checks(&self) -> Vec<HealthCheck> {
        match self {
            Self::Embedded(_) => Vec::new(),
            #[cfg(feature = "real-servers")]
            Self::Postgres { pool, .. } => vec![crate::store::postgres::health_check(pool)],
        }
    }

    /// Adds a user unless the email is taken; whether it was added.
    async fn insert(&self, stored: &Stored) -> anyhow::Result<bool> {
        match self {
            Self::Embedded(store) => store.write(|tx| {
                if tx.get::<String>(BY_EMAIL, &stored.profile.email)?.is_some() {
                    return Ok(false);
                }
                tx.put(USERS, &stored.profile.id, stored)?;
                tx.put(BY_EMAIL, &stored.profile.email, &stored.profile.id)?;
                Ok(true)
            }),
            #[cfg(feature = "real-servers")]
            Self::Postgres { pool, schema } => Ok(pool
                .get()
                .await?
                .execute(
                    &format!(
                        "INSERT INTO {schema}.users (id, email, doc) VALUES ($1, $2, $3)
                         ON CONFLICT (email) DO NOTHING"
                    ),
                    &[
                        &stored.profile.id,
                        &stored.profile.email,
                        &serde_json::to_value(stored)?,
                    ],
                )
                .await?
                == 1),
        }
    }

    /// Writes a user that exists again (a new password hash).
    async fn replace(&self, stored: &Stored) -> anyhow::Result<()> {
        match self {
            Self::Embedded(store) => store.write(|tx| tx.put(USERS, &stored.profile.id, stored)),
            #[cfg(feature = "real-servers")]
            Self::Postgres { pool, schema } => {
                pool.get()
                    .await?
                    .execute(
                        &format!("UPDATE {schema}.users SET doc = $2 WHERE id = $1"),
                        &[&stored.profile.id, &serde_json::to_value(stored)?],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    async fn find(&self, by_email: bool, value: &str) -> anyhow::Result<Option<Stored>> {
        match self {
            Self::Embedded(store) => {
                let id = if by_email {
                    match store.get::<String>(BY_EMAIL, value)? {
                        Some(id) => id,
                        None => return Ok(None),
                    }
                } else {
                    value.to_owned()
                };
                store.get(USERS, &id)
            }
            #[cfg(feature = "real-servers")]
            Self::Postgres { pool, schema } => {
                let column = if by_email { "email" } else { "id" };
                let row = pool
                    .get()
                    .await?
                    .query_opt(
                        &format!("SELECT doc FROM {schema}.users WHERE {column} = $1"),
                        &[&value],
                    )
                    .await?;
                row.map(|r| Ok(serde_json::from_value(r.get(0))?))
                    .transpose()
            }
        }
    }
}

/// The user service.
#[derive(Clone)]
pub struct Users {
    store: UserStore,
    key: EncodingKey,
    lifetime: Duration,
    iterations: u32,
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

/// A PBKDF2-HMAC-SHA256 hash of `password`, off the async workers (it takes
/// milliseconds of CPU).
async fn derive(password: &str, salt: [u8; 16], iterations: u32) -> anyhow::Result<[u8; 32]> {
    let password = password.to_owned();
    let iterations = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    tokio::task::spawn_blocking(move || {
        let mut hash = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            password.as_bytes(),
            &mut hash,
        );
        hash
    })
    .await
    .map_err(|e| anyhow::anyhow!(e))
}

/// Whether `password` matches `hash`, in constant time.
async fn verify(
    password: &str,
    salt: Vec<u8>,
    hash: Vec<u8>,
    iterations: u32,
) -> anyhow::Result<bool> {
    let password = password.to_owned();
    let iterations = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    tokio::task::spawn_blocking(move || {
        pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            password.as_bytes(),
            &hash,
        )
        .is_ok()
    })
    .await
    .map_err(|e| anyhow::anyhow!(e))
}

fn new_salt() -> anyhow::Result<[u8; 16]> {
    let mut salt = [0u8; 16];
    rand::fill(&mut salt).map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(salt)
}

impl Users {
    /// The service over `store`, signing tokens that live `lifetime` with `secret`.
    pub fn new(store: UserStore, secret: &str, lifetime: Duration) -> Self {
        Self {
            store,
            key: EncodingKey::from_secret(secret.as_bytes()),
            lifetime,
            iterations: OWASP_ITERATIONS,
        }
    }

    /// Hashes new passwords with `iterations` of PBKDF2 (and upgrades weaker hashes at
    /// login); [`OWASP_ITERATIONS`] by default. Fewer is for tests only.
    pub fn password_iterations(mut self, iterations: u32) -> Self {
        self.iterations = iterations.max(1);
        self
    }

    /// Registers a user.
    pub async fn register(&self, request: &Register) -> Result<Profile, ApiError> {
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
        let salt = new_salt()?;
        let hash = derive(&request.password, salt, self.iterations).await?;
        let stored = Stored {
            profile: Profile {
                id: format!("usr-{}", uuid::Uuid::new_v4().simple()),
                email: email.clone(),
                name: name.to_owned(),
            },
            salt: hex(&salt),
            hash: hex(&hash),
            iterations: self.iterations,
        };
        if !self.store.insert(&stored).await? {
            return Err(ApiError::conflict(
                "email_taken",
                "a user with this email exists",
            ));
        }
        Ok(stored.profile)
    }

    /// Checks a password and issues a token.
    pub async fn login(&self, request: &Login) -> Result<Token, ApiError> {
        let refused = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "the email or the password is wrong",
            )
        };
        let email = request.email.trim().to_lowercase();
        let Some(stored) = self.store.find(true, &email).await? else {
            // The same work as a wrong password, so that timing doesn't reveal whether
            // the email is registered.
            let _ = derive(&request.password, [0; 16], self.iterations).await?;
            return Err(refused());
        };
        let (Some(salt), Some(hash)) = (unhex(&stored.salt), unhex(&stored.hash)) else {
            return Err(anyhow::anyhow!("a stored password hash is corrupt").into());
        };
        if !verify(&request.password, salt, hash, stored.iterations).await? {
            return Err(refused());
        }
        if stored.iterations < self.iterations {
            let salt = new_salt()?;
            let hash = derive(&request.password, salt, self.iterations).await?;
            let upgraded = Stored {
                salt: hex(&salt),
                hash: hex(&hash),
                iterations: self.iterations,
                ..stored.clone()
            };
            self.store.replace(&upgraded).await?;
            tracing::info!(user = %stored.profile.id, from = stored.iterations, to = self.iterations, "password hash upgraded");
        }
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
    pub async fn profile(&self, id: &str) -> Result<Profile, ApiError> {
        self.store
            .find(false, id)
            .await?
            .map(|s| s.profile)
            .ok_or_else(|| ApiError::not_found("user_not_found", "no such user"))
    }
}

async fn register(
    State(users): State<Users>,
    Body(request): Body<Register>,
) -> Result<(StatusCode, Json<Profile>), ApiError> {
    let profile = users.register(&request).await?;
    Ok((StatusCode::CREATED, Json(profile)))
}

async fn login(
    State(users): State<Users>,
    Body(request): Body<Login>,
) -> Result<Json<Token>, ApiError> {
    users.login(&request).await.map(Json)
}

async fn me(State(users): State<Users>, UserId(id): UserId) -> Result<Json<Profile>, ApiError> {
    users.profile(&id).await.map(Json)
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

    fn health_checks(&self) -> Vec<HealthCheck> {
        self.store.health_checks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(email: &str, password: &str, name: &str) -> Register {
        Register {
            email: email.into(),
            password: password.into(),
            name: name.into(),
        }
    }

    fn login(email: &str, password: &str) -> Login {
        Login {
            email: email.into(),
            password: password.into(),
        }
    }

    async fn a_registered_user_logs_in_with_the_right_password_only(store: UserStore) {
        let users =
            Users::new(store.clone(), "secret", Duration::from_secs(60)).password_iterations(1_000);
        let profile = users
            .register(&register(" Alice@Example.com ", "correct horse", "Alice"))
            .await
            .unwrap();
        assert_eq!(profile.email, "alice@example.com");
        let again = users
            .register(&register("alice@example.com", "another one", "A"))
            .await;
        assert_eq!(again.unwrap_err().code(), "email_taken");

        let wrong = users
            .login(&login("alice@example.com", "wrong horse"))
            .await;
        assert_eq!(wrong.unwrap_err().code(), "invalid_credentials");
        let nobody = users
            .login(&login("bob@example.com", "correct horse"))
            .await;
        assert_eq!(nobody.unwrap_err().code(), "invalid_credentials");
        let token = users
            .login(&login("ALICE@example.com", "correct horse"))
            .await
            .unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        let key = jsonwebtoken::DecodingKey::from_secret(b"secret");
        let decoded =
            jsonwebtoken::decode::<serde_json::Value>(&token.token, &key, &validation).unwrap();
        assert_eq!(decoded.claims["sub"], profile.id.as_str());
        assert_eq!(users.profile(&profile.id).await.unwrap(), profile);

        // A hash made with fewer iterations than asked is made again at login.
        let stronger =
            Users::new(store.clone(), "secret", Duration::from_secs(60)).password_iterations(2_000);
        stronger
            .login(&login("alice@example.com", "correct horse"))
            .await
            .unwrap();
        let stored = store
            .find(true, "alice@example.com")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.iterations, 2_000);
        assert_ne!(stored.hash, "");
        stronger
            .login(&login("alice@example.com", "correct horse"))
            .await
            .unwrap();
        let wrong = stronger
            .login(&login("alice@example.com", "wrong horse"))
            .await;
        assert_eq!(wrong.unwrap_err().code(), "invalid_credentials");
    }

    #[tokio::test]
    async fn users_in_the_embedded_store() {
        let store = UserStore::Embedded(Store::in_memory().unwrap());
        a_registered_user_logs_in_with_the_right_password_only(store).await;
    }

    #[cfg(feature = "real-servers")]
    #[tokio::test]
    async fn users_in_postgres() {
        let url = std::env::var("MICRO_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let schema = format!("shop_users_test_{}", uuid::Uuid::new_v4().simple());
        let store = UserStore::postgres(&url, &schema)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} is unreachable: {e:#}"));
        a_registered_user_logs_in_with_the_right_password_only(store.clone()).await;
        if let UserStore::Postgres { pool, schema } = store {
            pool.get()
                .await
                .unwrap()
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn bad_registrations_are_refused_with_a_reason() {
        let store = UserStore::Embedded(Store::in_memory().unwrap());
        let users = Users::new(store, "secret", Duration::from_secs(60));
        for (email, password, name, code) in [
            ("nobody", "long enough", "N", "invalid_email"),
            ("n@example.com", "short", "N", "weak_password"),
            ("n@example.com", "long enough", " ", "invalid_name"),
        ] {
            let refused = users.register(&register(email, password, name)).await;
            assert_eq!(refused.unwrap_err().code(), code);
        }
    }
}
