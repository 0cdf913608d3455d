//! The event envelope and its builder.

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::attr;
use crate::error::{Error, Result};

/// The CloudEvents specification version this crate reads and writes.
pub const SPEC_VERSION: &str = "1.0";

/// The data content type of every event this crate writes: the payload is JSON.
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// An event: CloudEvents 1.0 context attributes, a few extensions, and a typed
/// payload.
///
/// The attributes are those of the [CloudEvents 1.0 specification]: `id`,
/// `source` (a URI-reference), `type`, `specversion` (always `1.0`), `time`
/// (RFC 3339, kept in UTC), `subject`, `dataschema` and `datacontenttype`
/// (always `application/json`), plus these extension attributes:
///
/// | extension | meaning |
/// |---|---|
/// | `traceparent`, `tracestate` | W3C Trace Context, as in the CloudEvents distributed tracing extension, so one trace runs from producer to consumer |
/// | `correlationid` | the conversation (an order, a saga) the event belongs to; shared by every event that follows from the first |
/// | `causationid` | the `id` of the event that directly caused this one |
/// | `schemaversion` | the version of the payload's schema, an integer |
///
/// Why an integer `schemaversion` extension as well as `dataschema`: the `type`
/// stays stable while its payload evolves, and a consumer needs to know which
/// revision it holds to upcast old payloads. `dataschema` is a URI that names a
/// schema document; comparing versions through it would mean agreeing on a URI
/// layout and parsing it. An integer is compared directly (`match
/// event.schema_version()`), travels as one Kafka header, and fits the
/// CloudEvents `Integer` type. Producers that publish schema documents may set
/// both.
///
/// An `Event` is always valid: it is made by [`EventBuilder::build`] or by
/// decoding ([`Event::from_json`], [`Event::from_binary`]), which check every
/// attribute, so encoding an event never fails because of its attributes.
///
/// Structured mode (the CloudEvents JSON format) is this type's `Serialize`
/// and `Deserialize` implementation; binary mode (attributes as `ce_` headers,
/// as the Kafka protocol binding does) is [`Event::to_binary_headers`] and
/// [`Event::from_binary`]. Extension attributes other than the ones above are
/// ignored when decoding.
///
/// [CloudEvents 1.0 specification]: https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md
///
/// # Examples
///
/// ```
/// use micro_events::Event;
///
/// let created = Event::new("/order-service", "shop.order.created", 42)?;
/// let paid = Event::builder("/payment-service", "shop.payment.processed", "ok")
///     .subject("order-42")
///     .caused_by(&created)
///     .build()?;
///
/// assert_eq!(paid.causation_id(), Some(created.id()));
/// assert_eq!(paid.correlation_id(), Some(created.id()));
/// # Ok::<(), micro_events::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<T> {
    pub(crate) attributes: Attributes,
    pub(crate) data: T,
}

/// The validated context attributes of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attributes {
    pub(crate) id: String,
    pub(crate) source: String,
    pub(crate) ty: String,
    pub(crate) time: Option<Time>,
    pub(crate) subject: Option<String>,
    pub(crate) dataschema: Option<String>,
    pub(crate) traceparent: Option<String>,
    pub(crate) tracestate: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) causation_id: Option<String>,
    pub(crate) schema_version: Option<u16>,
}

/// A point in time in UTC together with its RFC 3339 text, so that encoding
/// needs no fallible formatting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Time {
    pub(crate) value: OffsetDateTime,
    pub(crate) text: String,
}

impl Time {
    pub(crate) fn new(value: OffsetDateTime) -> Result<Self> {
        let value = value.to_offset(UtcOffset::UTC);
        let text = value.format(&Rfc3339).map_err(|e| {
            Error::invalid(attr::TIME, format!("cannot be written as rfc 3339: {e}"))
        })?;
        Ok(Time { value, text })
    }

    pub(crate) fn parse(text: &str) -> Result<Self> {
        let value = OffsetDateTime::parse(text, &Rfc3339)
            .map_err(|e| Error::invalid(attr::TIME, format!("not an rfc 3339 timestamp: {e}")))?;
        Time::new(value)
    }
}

impl Attributes {
    pub(crate) fn validate(&self) -> Result<()> {
        non_empty(attr::ID, &self.id)?;
        non_empty(attr::SOURCE, &self.source)?;
        uri_reference(attr::SOURCE, &self.source)?;
        non_empty(attr::TYPE, &self.ty)?;
        if let Some(schema) = &self.dataschema {
            non_empty(attr::DATASCHEMA, schema)?;
            uri_reference(attr::DATASCHEMA, schema)?;
        }
        for (name, value) in [
            (attr::SUBJECT, &self.subject),
            (attr::TRACEPARENT, &self.traceparent),
            (attr::TRACESTATE, &self.tracestate),
            (attr::CORRELATIONID, &self.correlation_id),
            (attr::CAUSATIONID, &self.causation_id),
        ] {
            if let Some(value) = value {
                non_empty(name, value)?;
            }
        }
        Ok(())
    }
}

fn non_empty(attribute: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::EmptyAttribute { attribute });
    }
    Ok(())
}

/// Checks that `value` uses only the characters RFC 3986 allows in a
/// URI-reference. Percent-encoding and the grammar are not checked: the goal is
/// to catch spaces and stray characters, not to parse.
fn uri_reference(attribute: &'static str, value: &str) -> Result<()> {
    const ALLOWED: &str = "-._~:/?#[]@!$&'()*+,;=%";
    match value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ALLOWED.contains(*c)))
    {
        Some(c) => Err(Error::invalid(
            attribute,
            format!("not a uri-reference: character {c:?} is not allowed"),
        )),
        None => Ok(()),
    }
}

impl<T> Event<T> {
    /// Makes an event with a fresh id and the current time.
    ///
    /// A shorthand for [`Event::builder`] followed by [`EventBuilder::build`].
    ///
    /// # Errors
    ///
    /// Fails when `source` or `event_type` is empty, or `source` is not a
    /// URI-reference.
    pub fn new(source: impl Into<String>, event_type: impl Into<String>, data: T) -> Result<Self> {
        Self::builder(source, event_type, data).build()
    }

    /// Starts building an event with a fresh random id (a UUID v4) and the
    /// current time.
    pub fn builder(
        source: impl Into<String>,
        event_type: impl Into<String>,
        data: T,
    ) -> EventBuilder<T> {
        EventBuilder {
            attributes: Attributes {
                id: uuid::Uuid::new_v4().to_string(),
                source: source.into(),
                ty: event_type.into(),
                time: None,
                subject: None,
                dataschema: None,
                traceparent: None,
                tracestate: None,
                correlation_id: None,
                causation_id: None,
                schema_version: None,
            },
            time: Some(OffsetDateTime::now_utc()),
            data,
        }
    }

    /// The event's id; together with [`source`](Self::source) it identifies
    /// the event, and consumers use it to suppress duplicates.
    pub fn id(&self) -> &str {
        &self.attributes.id
    }

    /// The context in which the event happened, a URI-reference such as
    /// `/order-service`.
    pub fn source(&self) -> &str {
        &self.attributes.source
    }

    /// The event type, such as `shop.order.created` (the CloudEvents `type`).
    pub fn event_type(&self) -> &str {
        &self.attributes.ty
    }

    /// The CloudEvents version, always [`SPEC_VERSION`].
    pub fn spec_version(&self) -> &'static str {
        SPEC_VERSION
    }

    /// The content type of the data, always [`DATA_CONTENT_TYPE`].
    pub fn data_content_type(&self) -> &'static str {
        DATA_CONTENT_TYPE
    }

    /// A URI naming the schema the data adheres to (the CloudEvents
    /// `dataschema`).
    pub fn data_schema(&self) -> Option<&str> {
        self.attributes.dataschema.as_deref()
    }

    /// The subject of the event within its source, such as an order id.
    pub fn subject(&self) -> Option<&str> {
        self.attributes.subject.as_deref()
    }

    /// When the event happened, in UTC.
    pub fn time(&self) -> Option<OffsetDateTime> {
        self.attributes.time.as_ref().map(|t| t.value)
    }

    /// The W3C `traceparent` of the trace the event belongs to.
    pub fn traceparent(&self) -> Option<&str> {
        self.attributes.traceparent.as_deref()
    }

    /// The W3C `tracestate` that goes with [`traceparent`](Self::traceparent).
    pub fn tracestate(&self) -> Option<&str> {
        self.attributes.tracestate.as_deref()
    }

    /// The id of the conversation the event belongs to.
    pub fn correlation_id(&self) -> Option<&str> {
        self.attributes.correlation_id.as_deref()
    }

    /// The id of the event that directly caused this one.
    pub fn causation_id(&self) -> Option<&str> {
        self.attributes.causation_id.as_deref()
    }

    /// The version of the payload's schema.
    pub fn schema_version(&self) -> Option<u16> {
        self.attributes.schema_version
    }

    /// The payload.
    pub fn data(&self) -> &T {
        &self.data
    }

    /// The payload, mutably.
    pub fn data_mut(&mut self) -> &mut T {
        &mut self.data
    }

    /// Consumes the event and returns its payload.
    pub fn into_data(self) -> T {
        self.data
    }

    /// Replaces the payload by `f(payload)`, keeping every attribute.
    pub fn map_data<U>(self, f: impl FnOnce(T) -> U) -> Event<U> {
        Event {
            attributes: self.attributes,
            data: f(self.data),
        }
    }
}

/// Builds an [`Event`]; made by [`Event::builder`].
///
/// Setters take any string; [`build`](Self::build) checks them all at once.
#[derive(Debug, Clone)]
pub struct EventBuilder<T> {
    attributes: Attributes,
    time: Option<OffsetDateTime>,
    data: T,
}

impl<T> EventBuilder<T> {
    /// Replaces the generated id, for producers whose ids derive from their
    /// own records (an outbox row, say) so that a retried publish keeps its id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.attributes.id = id.into();
        self
    }

    /// Sets when the event happened; the default is the moment the builder
    /// was made. The time is kept in UTC.
    pub fn time(mut self, time: OffsetDateTime) -> Self {
        self.time = Some(time);
        self
    }

    /// Leaves the `time` attribute out.
    pub fn without_time(mut self) -> Self {
        self.time = None;
        self
    }

    /// Sets the subject of the event within its source, such as an order id.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.attributes.subject = Some(subject.into());
        self
    }

    /// Sets the URI of the schema the data adheres to.
    pub fn data_schema(mut self, uri: impl Into<String>) -> Self {
        self.attributes.dataschema = Some(uri.into());
        self
    }

    /// Sets the version of the payload's schema.
    pub fn schema_version(mut self, version: u16) -> Self {
        self.attributes.schema_version = Some(version);
        self
    }

    /// Sets the id of the conversation the event belongs to.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.attributes.correlation_id = Some(id.into());
        self
    }

    /// Sets the W3C `traceparent`, overriding one inherited through
    /// [`caused_by`](Self::caused_by).
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.attributes.traceparent = Some(traceparent.into());
        self
    }

    /// Sets the W3C `tracestate`.
    pub fn tracestate(mut self, tracestate: impl Into<String>) -> Self {
        self.attributes.tracestate = Some(tracestate.into());
        self
    }

    /// Marks this event as caused by `cause`.
    ///
    /// The causation id becomes `cause`'s id; the correlation id becomes
    /// `cause`'s correlation id, or `cause`'s own id when it has none (it
    /// started the conversation); `traceparent` and `tracestate` are inherited
    /// when `cause` has them. Setters called afterwards override what was
    /// inherited.
    pub fn caused_by<U>(mut self, cause: &Event<U>) -> Self {
        let cause = &cause.attributes;
        self.attributes.causation_id = Some(cause.id.clone());
        self.attributes.correlation_id = Some(
            cause
                .correlation_id
                .clone()
                .unwrap_or_else(|| cause.id.clone()),
        );
        if cause.traceparent.is_some() {
            self.attributes.traceparent.clone_from(&cause.traceparent);
            self.attributes.tracestate.clone_from(&cause.tracestate);
        }
        self
    }

    /// Checks every attribute and makes the event.
    ///
    /// # Errors
    ///
    /// Fails, naming the attribute, when a string attribute is empty, when
    /// `source` or `dataschema` is not a URI-reference, or when the time cannot
    /// be written in RFC 3339 (a year outside 0000–9999 in UTC).
    pub fn build(self) -> Result<Event<T>> {
        let mut attributes = self.attributes;
        attributes.time = self.time.map(Time::new).transpose()?;
        attributes.validate()?;
        Ok(Event {
            attributes,
            data: self.data,
        })
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn root() -> Event<u32> {
        Event::builder("/order-service", "shop.order.created", 7)
            .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .tracestate("vendor=1")
            .build()
            .unwrap()
    }

    #[test]
    fn new_fills_required_attributes() {
        let event = Event::new("/order-service", "shop.order.created", "x").unwrap();
        assert_eq!(event.source(), "/order-service");
        assert_eq!(event.event_type(), "shop.order.created");
        assert_eq!(event.spec_version(), "1.0");
        assert_eq!(event.data_content_type(), "application/json");
        assert!(event.time().is_some());
        assert_eq!(*event.data(), "x");
        assert!(uuid::Uuid::parse_str(event.id()).is_ok(), "{}", event.id());
    }

    #[test]
    fn ids_are_unique() {
        let a = Event::new("/s", "t", ()).unwrap();
        let b = Event::new("/s", "t", ()).unwrap();
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn caused_by_inherits_correlation_and_trace() {
        let first = root();
        let second = Event::builder("/payment-service", "shop.payment.processed", ())
            .caused_by(&first)
            .build()
            .unwrap();
        assert_eq!(second.causation_id(), Some(first.id()));
        assert_eq!(second.correlation_id(), Some(first.id()));
        assert_eq!(second.traceparent(), first.traceparent());
        assert_eq!(second.tracestate(), Some("vendor=1"));

        let third = Event::builder("/inventory-service", "shop.inventory.reserved", ())
            .caused_by(&second)
            .build()
            .unwrap();
        assert_eq!(third.causation_id(), Some(second.id()));
        assert_eq!(third.correlation_id(), Some(first.id()));
    }

    #[test]
    fn caused_by_keeps_own_trace_when_cause_has_none() {
        let cause = Event::new("/a", "t", ()).unwrap();
        let event = Event::builder("/b", "t", ())
            .traceparent("tp")
            .caused_by(&cause)
            .build()
            .unwrap();
        assert_eq!(event.traceparent(), Some("tp"));
    }

    #[test]
    fn setters_after_caused_by_override() {
        let event = Event::builder("/b", "t", ())
            .caused_by(&root())
            .traceparent("other")
            .correlation_id("c-1")
            .build()
            .unwrap();
        assert_eq!(event.traceparent(), Some("other"));
        assert_eq!(event.correlation_id(), Some("c-1"));
    }

    #[test]
    fn time_is_kept_in_utc() {
        let event = Event::builder("/s", "t", ())
            .time(datetime!(2024-05-01 12:00 +02:00))
            .build()
            .unwrap();
        assert_eq!(event.time(), Some(datetime!(2024-05-01 10:00 UTC)));
        assert_eq!(event.time().unwrap().offset(), UtcOffset::UTC);
        assert!(Event::builder("/s", "t", ())
            .without_time()
            .build()
            .unwrap()
            .time()
            .is_none());
    }

    #[test]
    fn build_rejects_empty_attributes() {
        let cases: Vec<(EventBuilder<()>, &str)> = vec![
            (Event::builder("", "t", ()), "source"),
            (Event::builder("/s", "", ()), "type"),
            (Event::builder("/s", "t", ()).id(""), "id"),
            (Event::builder("/s", "t", ()).subject(""), "subject"),
            (
                Event::builder("/s", "t", ()).correlation_id(""),
                "correlationid",
            ),
            (Event::builder("/s", "t", ()).traceparent(""), "traceparent"),
            (Event::builder("/s", "t", ()).data_schema(""), "dataschema"),
        ];
        for (builder, attribute) in cases {
            match builder.build() {
                Err(Error::EmptyAttribute { attribute: a }) => assert_eq!(a, attribute),
                other => panic!("{attribute}: expected an empty attribute error, got {other:?}"),
            }
        }
    }

    #[test]
    fn build_rejects_source_that_is_not_a_uri_reference() {
        let err = Event::new("order service", "t", ()).unwrap_err();
        assert_eq!(err.attribute(), Some("source"));
        assert!(err.to_string().contains("not a uri-reference"), "{err}");
        assert!(Event::new("urn:shop:order-service", "t", ()).is_ok());
        assert!(Event::new("https://shop.example/orders?x=1#f", "t", ()).is_ok());
    }

    #[test]
    fn build_rejects_time_outside_rfc3339() {
        let err = Event::builder("/s", "t", ())
            .time(datetime!(-0001-06-01 0:00 UTC))
            .build()
            .unwrap_err();
        assert_eq!(err.attribute(), Some("time"));
    }

    #[test]
    fn map_data_keeps_attributes() {
        let event = root();
        let id = event.id().to_owned();
        let mapped = event.map_data(|n| n.to_string());
        assert_eq!(mapped.id(), id);
        assert_eq!(mapped.into_data(), "7");
    }
}
