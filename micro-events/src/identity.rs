//! Which service published an event, verified: the publisher signs each record, the
//! consumer checks it.
//!
//! A consumer that acts on events (sends a notification, ships an order) trusts the
//! publisher as much as a service trusts its caller. [`SignedPublisher`] wraps any
//! [`Publisher`] and adds to every record a token ([`IDENTITY_HEADER`]) signed with the
//! services' [`KeyRing`] (micro-core's [`identity`](micro_core::identity)), naming the
//! publishing service and bound to the topic and the event's `ce_type` and `ce_id`. On
//! the consuming side [`publisher`] verifies it and answers the publishing service as a
//! [`Caller`]; [`require_publisher`] does it for a handler, failing the delivery for good
//! ([`Permanent`], so it is dead-lettered, never retried) when the token is missing,
//! invalid or from a service not allowed.
//!
//! The token binds the event's id, not its bytes: copied onto a forged body it names an
//! id the consumer has already handled, so pair it with an inbox that drops events seen
//! before (as every at-least-once consumer should have).
//!
//! ```
//! use micro_core::identity::{KeyRing, KeySet, Secret};
//! use micro_events::identity::SignedPublisher;
//! use micro_events::MemoryBus;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = KeyRing::new(KeySet::new("k1", Secret::new(*b"0123456789abcdef0123456789abcdef")?));
//! let publisher = SignedPublisher::new(MemoryBus::new(), keys, "order-service");
//! # let _ = publisher;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use micro_core::error::{BoxError, Permanent};
use micro_core::identity::{Caller, KeyRing};
use micro_core::service::BoxFuture;

use crate::error::{Error, Result};

use crate::publish::Publisher;
use crate::record::{Delivery, Headers, Record};
use crate::subscribe::Received;

/// The record header that carries the publisher's token.
pub const IDENTITY_HEADER: &str = "micro-identity";

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// What a token binds: the topic, the event's type and id.
fn audience(topic: &str, event_type: &str, id: &str) -> String {
    format!("event:{topic}:{event_type}:{id}")
}

/// A [`Publisher`] that signs every record as `service`.
#[derive(Clone)]
pub struct SignedPublisher<P> {
    inner: P,
    keys: KeyRing,
    service: Arc<str>,
}

impl<P> SignedPublisher<P> {
    /// How long an event's token holds by default: seven days, Kafka's default
    /// retention. An event is read when its consumer gets to it, which may be long after
    /// it was published (a consumer that was down, a replay), so its token must not lapse
    /// like a call's (the key ring's lifetime is a minute).
    pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

    /// Publishes through `inner`, signing as `service` with `keys`, each token valid
    /// for [`DEFAULT_TOKEN_LIFETIME`](Self::DEFAULT_TOKEN_LIFETIME).
    pub fn new(inner: P, keys: KeyRing, service: impl Into<Arc<str>>) -> Self {
        Self {
            inner,
            keys: keys.with_ttl(Self::DEFAULT_TOKEN_LIFETIME),
            service: service.into(),
        }
    }

    /// Sets how long each event's token holds: at least as long as the events stay in
    /// the broker, or a consumer that reads them later dead-letters them.
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.keys = self.keys.with_ttl(lifetime);
        self
    }

    /// The wrapped publisher.
    pub fn get_ref(&self) -> &P {
        &self.inner
    }
}

impl<P: fmt::Debug> fmt::Debug for SignedPublisher<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedPublisher")
            .field("inner", &self.inner)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl<P: Publisher> Publisher for SignedPublisher<P> {
    fn publish_records<'a>(
        &'a self,
        topic: &'a str,
        mut records: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        let caller = Caller::service(self.service.to_string());
        for record in &mut records {
            let id = header(&record.headers, "ce_id").unwrap_or_default();
            let event_type = header(&record.headers, "ce_type").unwrap_or_default();
            let token = match self.keys.sign(&caller, &audience(topic, event_type, id)) {
                Ok(token) => token,
                Err(error) => {
                    return Box::pin(async move { Err(Error::Identity(error)) });
                }
            };
            record
                .headers
                .retain(|(name, _)| !name.eq_ignore_ascii_case(IDENTITY_HEADER));
            record
                .headers
                .push((IDENTITY_HEADER.to_owned(), token.into_bytes()));
        }
        self.inner.publish_records(topic, records)
    }
}

/// Why an event's publisher could not be verified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublisherError {
    /// The record carries no publisher token.
    #[error("the event carries no publisher identity")]
    Missing,
    /// The token is invalid, expired, signed with a key the ring doesn't hold, or made
    /// for another topic or event.
    #[error("the event's publisher identity does not hold: {0}")]
    Invalid(#[source] micro_core::identity::Error),
}

/// The service that published `received`, verified with `keys`.
///
/// # Errors
///
/// [`PublisherError`] says why it could not be verified.
pub fn publisher<T>(received: &Received<T>, keys: &KeyRing) -> Result<Caller, PublisherError> {
    let token = header(received.headers(), IDENTITY_HEADER).ok_or(PublisherError::Missing)?;
    let event = received.event();
    keys.verify(
        token,
        &audience(received.topic(), event.event_type(), event.id()),
    )
    .map_err(PublisherError::Invalid)
}

/// Checks that one of `services` published `received`: an error that fails the
/// delivery for good ([`Permanent`]: dead-lettered, not retried) otherwise.
///
/// # Errors
///
/// A [`Permanent`] error naming why.
pub fn require_publisher<T>(
    received: &Received<T>,
    keys: &KeyRing,
    services: &[&str],
) -> Result<Caller, BoxError> {
    let caller = publisher(received, keys).map_err(|error| {
        BoxError::from(Permanent::new(format!(
            "event {} has no valid publisher identity: {error}",
            received.event().id()
        )))
    })?;
    if !services.contains(&caller.service.as_str()) {
        return Err(BoxError::from(Permanent::new(format!(
            "event {} was published by `{}`, which may not publish it",
            received.event().id(),
            caller.service
        ))));
    }
    Ok(caller)
}
