//! Who may call whom in the shop, and how each call proves who made it.
//!
//! Every call between the shop's services carries a short-lived token signed by the
//! calling service (micro-core's [`identity`](micro_core::identity)): the gateway signs
//! the calls it forwards, for the user whose login token it checked; the order service
//! signs its calls to the cart, payment and inventory services, for the user of the
//! order. Each service verifies the token ([`Verified`]) and lets only the services of
//! [`CALLERS`] in; routes that move money or stock narrow that further (payment's
//! charge and refunds, inventory's reservations: the order service only). No header is
//! believed on its own: a bare `x-user-id` is ignored everywhere.
//!
//! The services share one HMAC key ring. In the one-process mode it is made at random
//! when the shop starts; `shop serve` needs it configured (`identity_secret`, or
//! `identity_keys_file` to rotate keys without a restart: see [`KeysFile`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::Router;
use micro_core::error::BoxError;
use micro_core::health::HealthCheck;
use micro_core::identity::{AllowCallersLayer, KeyRing, KeySet, Secret, VerifyCallerLayer};
use micro_core::service::Service;

/// The gateway's service name, as it signs the requests it forwards.
pub const GATEWAY: &str = "gateway";
/// The order service's name.
pub const ORDER_SERVICE: &str = "order-service";

/// Which services may call each service at all, by the callee's name. A route may
/// narrow it further ([`only`]). The multi-process deployment's network policies follow
/// the same table.
pub const CALLERS: &[(&str, &[&str])] = &[
    ("user-service", &[GATEWAY]),
    ("product-service", &[GATEWAY, "cart-service"]),
    ("cart-service", &[GATEWAY, ORDER_SERVICE]),
    ("order-service", &[GATEWAY]),
    ("payment-service", &[GATEWAY, ORDER_SERVICE]),
    ("inventory-service", &[GATEWAY, ORDER_SERVICE]),
    ("notification-service", &[GATEWAY]),
];

/// The services allowed to call `service`; none for a service the table doesn't name.
pub fn callers_of(service: &str) -> &'static [&'static str] {
    CALLERS
        .iter()
        .find(|(callee, _)| *callee == service)
        .map_or(&[], |(_, callers)| callers)
}

/// A route policy: only `services` may call the routes it wraps (`403` for others).
pub fn only<const N: usize>(services: [&str; N]) -> AllowCallersLayer {
    AllowCallersLayer::new(services)
}

/// A service whose every route needs a verified caller of [`callers_of`] its name; the
/// host's health and metrics endpoints stay open, as probes need them.
#[derive(Debug)]
pub struct Verified<S> {
    inner: S,
    keys: KeyRing,
}

impl<S: Service> Verified<S> {
    /// `inner`, checking its callers' tokens with `keys`.
    pub fn new(inner: S, keys: KeyRing) -> Self {
        Self { inner, keys }
    }
}

impl<S: Service> Service for Verified<S> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn version(&self) -> &str {
        self.inner.version()
    }

    fn router(&self) -> Router {
        let name = self.inner.name().to_owned();
        self.inner
            .router()
            .layer(AllowCallersLayer::new(callers_of(&name).iter().copied()))
            .layer(VerifyCallerLayer::new(self.keys.clone(), name))
    }

    /// The inner service's gRPC services, behind the same caller checks; the host's gRPC
    /// health and reflection stay open, as its HTTP probes do.
    fn grpc(&self) -> Option<micro_core::grpc::GrpcServices> {
        let name = self.inner.name().to_owned();
        self.inner.grpc().map(|services| {
            services
                .layer(AllowCallersLayer::new(callers_of(&name).iter().copied()))
                .layer(VerifyCallerLayer::new(self.keys.clone(), name))
        })
    }

    fn health_checks(&self) -> Vec<HealthCheck> {
        self.inner.health_checks()
    }

    fn start(&self) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.inner.start()
    }

    fn stop(&self) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.inner.stop()
    }
}

/// A secret setting (a key, a password): read from configuration like a string, but
/// never shown by `Debug`, so a logged configuration doesn't leak it.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps `secret`.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for the code that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

/// A key ring made at random, for the one-process mode: every service is in this
/// process, so nothing else needs the key.
pub fn random_keys() -> anyhow::Result<KeyRing> {
    let mut secret = [0u8; 48];
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(KeyRing::new(KeySet::new("local", Secret::new(secret)?)))
}

/// One key from the `identity_secret` setting, refused when short or a placeholder.
pub fn keys_from_secret(secret: &str) -> anyhow::Result<KeyRing> {
    let secret = secret_setting("identity_secret", "SHOP_IDENTITY_SECRET", "", secret)?;
    Ok(KeyRing::new(KeySet::new("shop", secret)))
}

/// The secret setting `name` (from the variable `variable`), refused with an error naming
/// both when it is short or a known placeholder; `when` says where it is refused (`""`
/// for everywhere).
pub fn secret_setting(
    name: &str,
    variable: &str,
    when: &str,
    value: &str,
) -> anyhow::Result<Secret> {
    Secret::new(value.as_bytes()).map_err(|error| {
        anyhow::anyhow!(
            "the setting `{name}` ({variable}) is unusable{when}: {error}; it must be at \
             least 32 random bytes, e.g. `openssl rand -base64 48`"
        )
    })
}

/// The service keys in a file, one key per line: `<key id> <secret>`. The first line's
/// key signs; every key verifies. Blank lines and lines starting with `#` are skipped.
///
/// To rotate without a restart: add the new key on a second line everywhere (it then
/// verifies), move it to the first line everywhere (it then signs), and after a token's
/// lifetime remove the old one. [`KeysFile::watch`] applies each change of the file.
#[derive(Debug, Clone)]
pub struct KeysFile {
    path: PathBuf,
}

impl KeysFile {
    /// The file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Reads the file into a key set, naming the line of any mistake.
    pub fn read(&self) -> anyhow::Result<KeySet> {
        parse_keys(&self.path)
    }

    /// Rereads the file whenever it changes (checked every `interval`) and rotates
    /// `keys` to what it holds; a file that can't be read or parsed keeps the keys as they
    /// were and is logged.
    ///
    /// A change is a new modification time, size or file (inode) behind the path, links
    /// followed: a Kubernetes Secret volume replaces its files by swapping a symbolic
    /// link to a new directory, and that is seen even when the new file's time is the
    /// old one's.
    pub async fn watch(self, keys: KeyRing, interval: Duration) {
        let mut seen = version(&self.path);
        loop {
            tokio::time::sleep(interval).await;
            let now = version(&self.path);
            if now == seen {
                continue;
            }
            seen = now;
            match self.read() {
                Ok(set) => {
                    tracing::info!(path = %self.path.display(), signing = set.signing_key_id(), "service keys rotated");
                    keys.rotate(set);
                }
                Err(error) => {
                    tracing::error!(path = %self.path.display(), error = format!("{error:#}"), "service keys not rotated")
                }
            }
        }
    }
}

/// What tells one content of the file at `path` from the next.
fn version(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len(), metadata.ino()))
}

fn parse_keys(path: &Path) -> anyhow::Result<KeySet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the service keys in {}", path.display()))?;
    let mut set: Option<KeySet> = None;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let place = format!("{}:{}", path.display(), number + 1);
        let Some((id, secret)) = line.split_once(char::is_whitespace) else {
            anyhow::bail!("{place}: a key line is `<key id> <secret>`");
        };
        let secret = Secret::new(secret.trim().as_bytes())
            .map_err(|error| anyhow::anyhow!("{place}: key `{id}` is unusable: {error}"))?;
        set = Some(match set {
            None => KeySet::new(id, secret),
            Some(set) => set.verify_with(id, secret),
        });
    }
    set.ok_or_else(|| anyhow::anyhow!("{} holds no key", path.display()))
}

#[cfg(test)]
mod tests {
    use micro_core::identity::Caller;

    use super::*;

    #[test]
    fn a_secret_setting_is_not_shown() {
        let secret = SecretString::new("hunter2-hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2-hunter2");
    }

    #[test]
    fn every_caller_in_the_table_is_a_service_of_the_shop() {
        let names: Vec<&str> = CALLERS.iter().map(|(callee, _)| *callee).collect();
        for (callee, callers) in CALLERS {
            for caller in *callers {
                assert!(
                    *caller == GATEWAY || names.contains(caller),
                    "{callee} names an unknown caller {caller}"
                );
            }
        }
        assert!(callers_of("nobody").is_empty());
    }

    #[test]
    fn a_keys_file_signs_with_its_first_key_and_verifies_with_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let old = "old key, 0123456789abcdef0123456789";
        let new = "new key, fedcba9876543210fedcba9876";
        std::fs::write(&path, format!("# rotation\nk2 {new}\n\nk1 {old}\n")).unwrap();
        let set = KeysFile::new(&path).read().unwrap();
        assert_eq!(set.signing_key_id(), "k2");
        let ring = KeyRing::new(set);
        let by_old = KeyRing::new(KeySet::new("k1", Secret::new(old.as_bytes()).unwrap()));
        let token = by_old.sign(&Caller::service("a"), "b").unwrap();
        assert_eq!(ring.verify(&token, "b").unwrap().service, "a");

        std::fs::write(&path, "k1 short\n").unwrap();
        let error = format!("{:#}", KeysFile::new(&path).read().unwrap_err());
        assert!(error.contains("keys:1: key `k1` is unusable"), "{error}");
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(KeysFile::new(&path).read().is_err());
    }

    #[tokio::test]
    async fn a_changed_keys_file_rotates_the_running_ring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let old = "old key, 0123456789abcdef0123456789";
        let new = "new key, fedcba9876543210fedcba9876";
        std::fs::write(&path, format!("k1 {old}\n")).unwrap();
        let file = KeysFile::new(&path);
        let ring = KeyRing::new(file.read().unwrap());
        let task = tokio::spawn(file.watch(ring.clone(), Duration::from_millis(20)));
        // A broken file keeps the keys as they were.
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(&path, "k2 short\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(ring.current().signing_key_id(), "k1");
        std::fs::write(&path, format!("k2 {new}\nk1 {old}\n")).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ring.current().signing_key_id() != "k2" {
            assert!(
                std::time::Instant::now() < deadline,
                "the file was not followed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Tokens of the old key still verify until it leaves the file.
        let by_old = KeyRing::new(KeySet::new("k1", Secret::new(old.as_bytes()).unwrap()));
        let token = by_old.sign(&Caller::service("a"), "b").unwrap();
        assert!(ring.verify(&token, "b").is_ok());
        task.abort();
    }

    /// What the kubelet does to a Secret volume when the Secret changes: the files live in
    /// a timestamped directory that `..data` links to, each file is a link through
    /// `..data`, and an update writes a new directory and renames a new `..data` link over
    /// the old one.
    #[tokio::test]
    async fn a_secret_volume_swapped_as_the_kubelet_does_rotates_the_ring() {
        use std::os::unix::fs::symlink;
        let volume = tempfile::tempdir().unwrap();
        let old = "old key, 0123456789abcdef0123456789";
        let new = "new key, fedcba9876543210fedcba9876";
        let write_generation = |name: &str, text: &str| {
            let generation = volume.path().join(name);
            std::fs::create_dir(&generation).unwrap();
            std::fs::write(generation.join("keys"), text).unwrap();
            generation.join("keys")
        };
        let first = write_generation("..2026_12_06_01", &format!("k1 {old}\n"));
        symlink("..2026_12_06_01", volume.path().join("..data")).unwrap();
        symlink("..data/keys", volume.path().join("keys")).unwrap();
        let file = KeysFile::new(volume.path().join("keys"));
        let ring = KeyRing::new(file.read().unwrap());
        let task = tokio::spawn(file.watch(ring.clone(), Duration::from_millis(20)));
        tokio::time::sleep(Duration::from_millis(50)).await;

        // The same length and modification time as before: only the file is new.
        let second = write_generation("..2026_12_06_02", &format!("k2 {new}\n"));
        let time = std::fs::metadata(&first).unwrap().modified().unwrap();
        let handle = std::fs::File::options().write(true).open(&second).unwrap();
        handle.set_modified(time).unwrap();
        symlink("..2026_12_06_02", volume.path().join("..data_tmp")).unwrap();
        std::fs::rename(
            volume.path().join("..data_tmp"),
            volume.path().join("..data"),
        )
        .unwrap();
        std::fs::remove_dir_all(volume.path().join("..2026_12_06_01")).unwrap();

        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ring.current().signing_key_id() != "k2" {
            assert!(
                std::time::Instant::now() < deadline,
                "the swapped volume was not followed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let by_new = KeyRing::new(KeySet::new("k2", Secret::new(new.as_bytes()).unwrap()));
        let token = by_new.sign(&Caller::service("a"), "b").unwrap();
        assert!(ring.verify(&token, "b").is_ok());
        task.abort();
    }
}
