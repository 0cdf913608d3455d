//! Registrations that prove which service made them, so that a rogue registration
//! can't draw a service's traffic.
//!
//! Anything that can write to the registry can register an instance under any service's
//! name: without a check, a balancer would send that service's logins and card numbers
//! to it. Here an instance carries a **proof** in its metadata ([`PROOF_METADATA`]): a
//! token signed with the services' [`KeyRing`] (micro-core's
//! [`identity`](micro_core::identity)) that names the service and binds the instance's id,
//! address and port. [`ProvenOnly`] wraps a [`Discover`] and lets through only the
//! instances whose proof verifies; the rest are left out, logged once and counted in
//! `micro_discovery_unproven_instances_total{service}`.
//!
//! A proof is made at registration ([`prove`]) and lives [`DEFAULT_PROOF_TTL`]: an
//! instance that outlives it (or whose signing key was rotated away) drops out of
//! discovery until it registers again, so keep a rotated-out key among the verification
//! keys for that long, or restart the services after a rotation.
//!
//! ```
//! use micro_core::identity::{KeyRing, KeySet, Secret};
//! use micro_discovery::identity::{prove, verify};
//! use micro_discovery::Instance;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = KeyRing::new(KeySet::new("k1", Secret::new(*b"0123456789abcdef0123456789abcdef")?));
//! let instance = prove(Instance::new("payment-service", "p-1", "10.0.0.7", 8005), &keys)?;
//! assert!(verify(&instance, &keys).is_ok());
//!
//! // The same proof on another address proves nothing.
//! let mut moved = instance.clone();
//! moved.port = 9999;
//! assert!(verify(&moved, &keys).is_err());
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use micro_core::identity::{Caller, KeyRing};
use micro_core::service::BoxFuture;

use crate::discover::{Discover, Watch};
use crate::error::Result;
use crate::instance::Instance;

/// The metadata key that holds an instance's proof.
pub const PROOF_METADATA: &str = "micro-identity";

/// How long a proof made by [`prove`] lives: a day.
pub const DEFAULT_PROOF_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Why an instance's proof does not hold.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// The instance has no proof.
    #[error("the instance carries no proof of identity")]
    Missing,
    /// The proof is not valid for this instance: signed with an unknown key, expired,
    /// or made for another service, id, address or port.
    #[error("the instance's proof of identity does not hold: {0}")]
    Invalid(#[source] micro_core::identity::Error),
    /// The proof was signed by another service.
    #[error("the proof was made by `{proved}`, not by `{service}`")]
    OtherService {
        /// The service the instance is registered as.
        service: String,
        /// The service the proof names.
        proved: String,
    },
}

/// What a proof binds: the service, the instance id, its address and port.
fn audience(instance: &Instance) -> String {
    format!(
        "registry:{}:{}@{}:{}",
        instance.service, instance.id, instance.address, instance.port
    )
}

/// `instance` with a proof that lives [`DEFAULT_PROOF_TTL`], signed with `keys`.
///
/// # Errors
///
/// When the ring cannot sign.
pub fn prove(instance: Instance, keys: &KeyRing) -> Result<Instance, micro_core::identity::Error> {
    prove_for(instance, keys, DEFAULT_PROOF_TTL)
}

/// `instance` with a proof that lives `ttl`, signed with `keys`.
///
/// # Errors
///
/// When the ring cannot sign.
pub fn prove_for(
    mut instance: Instance,
    keys: &KeyRing,
    ttl: Duration,
) -> Result<Instance, micro_core::identity::Error> {
    let token = keys.clone().with_ttl(ttl).sign(
        &Caller::service(instance.service.clone()),
        &audience(&instance),
    )?;
    instance.metadata.insert(PROOF_METADATA.to_owned(), token);
    Ok(instance)
}

/// Whether `instance`'s proof holds under `keys`.
///
/// # Errors
///
/// [`ProofError`] says why it does not.
pub fn verify(instance: &Instance, keys: &KeyRing) -> Result<(), ProofError> {
    let token = instance
        .metadata
        .get(PROOF_METADATA)
        .ok_or(ProofError::Missing)?;
    let caller = keys
        .verify(token, &audience(instance))
        .map_err(ProofError::Invalid)?;
    if caller.service != instance.service {
        return Err(ProofError::OtherService {
            service: instance.service.clone(),
            proved: caller.service,
        });
    }
    Ok(())
}

/// A [`Discover`] that finds only the instances whose [proof](self) holds.
#[derive(Clone)]
pub struct ProvenOnly<D> {
    inner: D,
    keys: KeyRing,
    /// The instances already logged as unproven, so the log says it once.
    reported: Arc<Mutex<HashSet<(String, String)>>>,
}

impl<D> ProvenOnly<D> {
    /// `inner`, keeping the instances whose proof verifies with `keys`.
    pub fn new(inner: D, keys: KeyRing) -> Self {
        Self {
            inner,
            keys,
            reported: Arc::default(),
        }
    }

    /// The wrapped discovery.
    pub fn get_ref(&self) -> &D {
        &self.inner
    }
}

impl<D: fmt::Debug> fmt::Debug for ProvenOnly<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvenOnly")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Keeps the proven instances of `instances`, reporting the others.
fn keep_proven(
    instances: Vec<Instance>,
    keys: &KeyRing,
    reported: &Mutex<HashSet<(String, String)>>,
) -> Vec<Instance> {
    instances
        .into_iter()
        .filter(|instance| match verify(instance, keys) {
            Ok(()) => true,
            Err(error) => {
                metrics::counter!(
                    "micro_discovery_unproven_instances_total",
                    "service" => instance.service.clone(),
                )
                .increment(1);
                let first = reported
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((instance.service.clone(), instance.id.clone()));
                if first {
                    tracing::warn!(
                        service = %instance.service,
                        id = %instance.id,
                        address = %instance.address,
                        port = instance.port,
                        %error,
                        "ignoring an instance that cannot prove its identity"
                    );
                }
                false
            }
        })
        .collect()
}

impl<D: Discover> Discover for ProvenOnly<D> {
    fn instances<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(async move {
            let found = self.inner.instances(service).await?;
            Ok(keep_proven(found, &self.keys, &self.reported))
        })
    }

    fn watch(&self, service: &str) -> Watch {
        let keys = self.keys.clone();
        let reported = self.reported.clone();
        self.inner
            .watch(service)
            .map(move |update| update.map(|found| keep_proven(found, &keys, &reported)))
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use micro_core::identity::{KeySet, Secret};

    use super::*;
    use crate::memory::MemoryRegistry;
    use crate::{Registration, Registry};

    fn keys(secret: &[u8; 32]) -> KeyRing {
        KeyRing::new(KeySet::new("k1", Secret::new(*secret).unwrap()))
    }

    #[tokio::test]
    async fn only_instances_that_prove_their_identity_are_found() {
        let ours = keys(b"the services' key 0123456789abcd");
        let theirs = keys(b"somebody else's key 0123456789ab");
        let registry = MemoryRegistry::new();
        let good = prove(
            Instance::new("payment-service", "p-1", "10.0.0.1", 8005),
            &ours,
        )
        .unwrap();
        let mut moved = prove(
            Instance::new("payment-service", "p-2", "10.0.0.2", 8005),
            &ours,
        )
        .unwrap();
        moved.address = "10.6.6.6".to_owned();
        let as_another = prove(
            Instance::new("cart-service", "p-3", "10.0.0.3", 8005),
            &ours,
        )
        .unwrap();
        let mut renamed = as_another.clone();
        renamed.service = "payment-service".to_owned();
        let rogue = [
            Instance::new("payment-service", "p-0", "10.6.6.6", 8005),
            prove(
                Instance::new("payment-service", "p-4", "10.0.0.4", 8005),
                &theirs,
            )
            .unwrap(),
            moved,
            renamed,
        ];
        for instance in rogue.iter().chain([&good]) {
            registry
                .register(&Registration::new(instance.clone()))
                .await
                .unwrap();
        }
        assert_eq!(
            registry.instances("payment-service").await.unwrap().len(),
            5
        );

        let proven = ProvenOnly::new(registry.clone(), ours.clone());
        assert_eq!(
            proven.instances("payment-service").await.unwrap(),
            std::slice::from_ref(&good)
        );
        let mut watch = proven.watch("payment-service");
        assert_eq!(watch.next().await.unwrap().unwrap(), [good]);
        assert!(matches!(verify(&rogue[0], &ours), Err(ProofError::Missing)));
    }
}
