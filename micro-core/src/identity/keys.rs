//! Secrets, key sets and the shared, swappable key ring.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind as JwtKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{Caller, Error, ErrorKind};

/// Secret bytes: a signing key or a shared secret. Its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

/// Values shipped as examples or defaults somewhere, refused as secrets.
const PLACEHOLDERS: &[&str] = &["change-me", "changeme", "change_me", "placeholder"];

impl Secret {
    /// The shortest secret accepted: 32 bytes (256 bits, the size of HS256's hash).
    pub const MIN_LEN: usize = 32;

    /// A secret, refused ([`ErrorKind::WeakSecret`]) when shorter than
    /// [`MIN_LEN`](Self::MIN_LEN) bytes or containing a known placeholder such as
    /// `change-me`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let bytes = bytes.into();
        if bytes.len() < Self::MIN_LEN || is_placeholder(&bytes) {
            return Err(Error::new(ErrorKind::WeakSecret));
        }
        Ok(Self(bytes.into()))
    }

    /// A secret without the strength check, for loopback-only development set-ups and
    /// tests. Never use it for a secret that comes from configuration.
    pub fn new_unchecked(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into().into())
    }

    /// The secret's bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

fn is_placeholder(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    PLACEHOLDERS.iter().any(|p| text.contains(p)) || bytes.iter().all(|b| *b == bytes[0])
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret([redacted; {} bytes])", self.0.len())
    }
}

#[derive(Clone)]
struct Key {
    id: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Key {
    fn new(id: &str, secret: &Secret) -> Self {
        Self {
            id: id.to_owned(),
            encoding: EncodingKey::from_secret(secret.expose()),
            decoding: DecodingKey::from_secret(secret.expose()),
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// One signing key and the keys accepted for verification, each with a key id.
///
/// The signing key is always accepted for verification too.
#[derive(Clone, Debug)]
pub struct KeySet {
    signing: Key,
    verifying: Vec<Key>,
}

impl KeySet {
    /// A key set that signs (and verifies) with `secret` under key id `id`.
    pub fn new(id: &str, secret: Secret) -> Self {
        Self {
            signing: Key::new(id, &secret),
            verifying: Vec::new(),
        }
    }

    /// Also accepts tokens signed with `secret` under key id `id` (a key being rotated
    /// in or out). A later key with the same id replaces an earlier one.
    pub fn verify_with(mut self, id: &str, secret: Secret) -> Self {
        self.verifying.retain(|k| k.id != id);
        self.verifying.push(Key::new(id, &secret));
        self
    }

    /// The id of the signing key.
    pub fn signing_key_id(&self) -> &str {
        &self.signing.id
    }

    fn decoding(&self, id: &str) -> Option<&DecodingKey> {
        if self.signing.id == id {
            return Some(&self.signing.decoding);
        }
        self.verifying
            .iter()
            .find(|k| k.id == id)
            .map(|k| &k.decoding)
    }
}

#[derive(Serialize, Deserialize)]
struct Claims {
    /// The calling service.
    iss: String,
    /// The end user, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usr: Option<String>,
    aud: String,
    iat: u64,
    exp: u64,
}

/// The shared key ring: signs and verifies identity tokens with the current
/// [`KeySet`], which [`rotate`](Self::rotate) swaps at runtime for every clone.
///
/// Cheap to clone; clones share the key set.
#[derive(Clone)]
pub struct KeyRing {
    keys: Arc<RwLock<Arc<KeySet>>>,
    ttl: Duration,
    leeway: Duration,
}

impl KeyRing {
    /// How long a token lives by default: 60 seconds.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
    /// The clock skew tolerated by default: 5 seconds.
    pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(5);

    /// A key ring holding `keys`, with the default lifetime and leeway.
    pub fn new(keys: KeySet) -> Self {
        Self {
            keys: Arc::new(RwLock::new(Arc::new(keys))),
            ttl: Self::DEFAULT_TTL,
            leeway: Self::DEFAULT_LEEWAY,
        }
    }

    /// Sets how long the tokens this ring signs live.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the clock skew tolerated when checking expiry.
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Replaces the key set, for this ring and every clone of it.
    pub fn rotate(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }

    /// The current key set.
    pub fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Signs a token saying `caller` calls `audience` (the target service's name),
    /// valid from now for the ring's lifetime.
    pub fn sign(&self, caller: &Caller, audience: &str) -> Result<String, Error> {
        self.sign_at(caller, audience, SystemTime::now())
    }

    /// Signs a token as [`sign`](Self::sign) does, issued at `issued_at` (for tests and
    /// tools that need a token from another time).
    pub fn sign_at(
        &self,
        caller: &Caller,
        audience: &str,
        issued_at: SystemTime,
    ) -> Result<String, Error> {
        let keys = self.current();
        let iat = issued_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            iss: caller.service.clone(),
            usr: caller.user.clone(),
            aud: audience.to_owned(),
            iat,
            exp: iat + self.ttl.as_secs(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(keys.signing.id.clone());
        jsonwebtoken::encode(&header, &claims, &keys.signing.encoding)
            .map_err(|e| Error::with_source(ErrorKind::Sign, e))
    }

    /// Verifies `token` as one made for `audience` and returns its caller.
    pub fn verify(&self, token: &str, audience: &str) -> Result<Caller, Error> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Error::with_source(ErrorKind::Malformed, e))?;
        if header.alg != Algorithm::HS256 {
            return Err(Error::new(ErrorKind::Malformed));
        }
        let kid = header.kid.ok_or_else(|| Error::new(ErrorKind::Malformed))?;
        let keys = self.current();
        let key = keys
            .decoding(&kid)
            .ok_or_else(|| Error::new(ErrorKind::UnknownKey))?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = self.leeway.as_secs();
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            let kind = match e.kind() {
                JwtKind::ExpiredSignature => ErrorKind::Expired,
                JwtKind::InvalidSignature => ErrorKind::BadSignature,
                JwtKind::InvalidAudience => ErrorKind::WrongAudience,
                _ => ErrorKind::Malformed,
            };
            Error::with_source(kind, e)
        })?;
        Ok(Caller {
            service: data.claims.iss,
            user: data.claims.usr,
        })
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("signing_key_id", &self.current().signing.id)
            .field("ttl", &self.ttl)
            .field("leeway", &self.leeway)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> Secret {
        Secret::new((0..32).map(|i| byte.wrapping_add(i)).collect::<Vec<u8>>()).unwrap()
    }

    fn ring() -> KeyRing {
        KeyRing::new(KeySet::new("k1", secret(1)))
    }

    #[test]
    fn round_trip_carries_service_and_user() {
        let ring = ring();
        let token = ring
            .sign(&Caller::for_user("gateway", "u-1"), "order-service")
            .unwrap();
        let caller = ring.verify(&token, "order-service").unwrap();
        assert_eq!(caller, Caller::for_user("gateway", "u-1"));
    }

    #[test]
    fn refuses_expired_wrong_audience_unknown_and_bad_keys() {
        let ring = ring();
        let caller = Caller::service("order-service");
        let old = SystemTime::now() - Duration::from_secs(120);
        let expired = ring.sign_at(&caller, "payment", old).unwrap();
        assert_eq!(
            ring.verify(&expired, "payment").unwrap_err().kind(),
            &ErrorKind::Expired
        );

        let token = ring.sign(&caller, "payment").unwrap();
        assert_eq!(
            ring.verify(&token, "inventory").unwrap_err().kind(),
            &ErrorKind::WrongAudience
        );

        let other = KeyRing::new(KeySet::new("k2", secret(2)));
        assert_eq!(
            other.verify(&token, "payment").unwrap_err().kind(),
            &ErrorKind::UnknownKey
        );
        let same_id = KeyRing::new(KeySet::new("k1", secret(3)));
        assert_eq!(
            same_id.verify(&token, "payment").unwrap_err().kind(),
            &ErrorKind::BadSignature
        );
        assert_eq!(
            ring.verify("not.a.token", "payment").unwrap_err().kind(),
            &ErrorKind::Malformed
        );
    }

    #[test]
    fn leeway_accepts_a_token_just_past_expiry() {
        let ring = ring().with_ttl(Duration::from_secs(60));
        let caller = Caller::service("a");
        let issued = SystemTime::now() - Duration::from_secs(62);
        let token = ring.sign_at(&caller, "b", issued).unwrap();
        assert!(ring.verify(&token, "b").is_ok());
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_while_the_old_key_verifies() {
        let ring = ring();
        let before = ring.sign(&Caller::service("a"), "b").unwrap();
        ring.rotate(KeySet::new("k2", secret(2)).verify_with("k1", secret(1)));
        let after = ring.sign(&Caller::service("a"), "b").unwrap();
        assert!(ring.verify(&before, "b").is_ok());
        assert!(ring.verify(&after, "b").is_ok());
        ring.rotate(KeySet::new("k2", secret(2)));
        assert_eq!(
            ring.verify(&before, "b").unwrap_err().kind(),
            &ErrorKind::UnknownKey
        );
        assert!(ring.verify(&after, "b").is_ok());
    }

    #[test]
    fn weak_secrets_are_refused_and_debug_is_redacted() {
        assert!(Secret::new("short").is_err());
        assert!(Secret::new("shop-dev-jwt-secret-change-me").is_err());
        assert!(Secret::new(vec![b'a'; 40]).is_err());
        let s = secret(9);
        let shown = format!("{s:?}");
        assert!(!shown.contains('9') || shown.contains("redacted"));
        assert_eq!(shown, "Secret([redacted; 32 bytes])");
    }
}
