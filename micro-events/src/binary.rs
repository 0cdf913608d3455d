//! Binary mode: attributes as message headers, data as the message body.
//!
//! The mapping is the one of the CloudEvents Kafka protocol binding: every
//! attribute and extension `name` travels as a header `ce_name` with its value
//! in UTF-8, except `datacontenttype`, which travels as `content-type`. It is
//! independent of any Kafka client, so the memory bus and the Kafka backend
//! share it.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::attr;
use crate::error::{Error, Result};
use crate::event::{Event, DATA_CONTENT_TYPE, SPEC_VERSION};
use crate::raw::{data_from_nothing, RawAttributes};

/// The prefix of the header that carries each attribute in binary mode.
pub const HEADER_PREFIX: &str = "ce_";

/// The header that carries `datacontenttype` in binary mode.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

impl<T> Event<T> {
    /// The attributes of the event as binary-mode headers: `ce_specversion`,
    /// `ce_id`, `ce_source`, `ce_type`, `content-type`, then each optional
    /// attribute that is present (`ce_time`, `ce_subject`, `ce_traceparent`,
    /// ...), every value in UTF-8.
    ///
    /// The body to send with them is [`to_binary_data`](Self::to_binary_data).
    pub fn to_binary_headers(&self) -> Vec<(String, Vec<u8>)> {
        let a = &self.attributes;
        let schema_version = a.schema_version.map(|v| v.to_string());
        let required = [
            (attr::SPECVERSION, SPEC_VERSION),
            (attr::ID, a.id.as_str()),
            (attr::SOURCE, a.source.as_str()),
            (attr::TYPE, a.ty.as_str()),
        ];
        let optional = [
            (attr::DATASCHEMA, a.dataschema.as_deref()),
            (attr::SUBJECT, a.subject.as_deref()),
            (attr::TIME, a.time.as_ref().map(|t| t.text.as_str())),
            (attr::TRACEPARENT, a.traceparent.as_deref()),
            (attr::TRACESTATE, a.tracestate.as_deref()),
            (attr::CORRELATIONID, a.correlation_id.as_deref()),
            (attr::CAUSATIONID, a.causation_id.as_deref()),
            (attr::SCHEMAVERSION, schema_version.as_deref()),
        ];
        let ce =
            |name: &str, value: &str| (format!("{HEADER_PREFIX}{name}"), value.as_bytes().to_vec());
        let mut headers: Vec<_> = required
            .into_iter()
            .map(|(name, value)| ce(name, value))
            .collect();
        headers.push((
            CONTENT_TYPE_HEADER.to_owned(),
            DATA_CONTENT_TYPE.as_bytes().to_vec(),
        ));
        headers.extend(
            optional
                .into_iter()
                .filter_map(|(name, value)| Some(ce(name, value?))),
        );
        headers
    }
}

impl<T: Serialize> Event<T> {
    /// The binary-mode body: the payload encoded as JSON.
    ///
    /// # Errors
    ///
    /// Fails when the payload cannot be encoded as JSON.
    pub fn to_binary_data(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(&self.data).map_err(Error::Encode)
    }
}

impl<T: DeserializeOwned> Event<T> {
    /// Decodes a binary-mode message: attributes from `headers`, payload from
    /// the JSON in `data`.
    ///
    /// Header names are matched without regard to ASCII case; headers that are
    /// not attributes this crate knows are ignored, so a message may carry
    /// other headers too. An empty body means the event has no data.
    ///
    /// # Errors
    ///
    /// Fails with an error naming the attribute when a required attribute is
    /// missing or empty, appears twice or is not UTF-8, when `ce_specversion`
    /// is not `1.0`, when `content-type` is not JSON or an attribute is
    /// malformed; with [`Error::Decode`] when `data` does not decode into `T`,
    /// and with [`Error::MissingData`] when `data` is empty and `T` needs a
    /// value.
    ///
    /// # Examples
    ///
    /// ```
    /// use micro_events::Event;
    ///
    /// let headers = [
    ///     ("ce_specversion", "1.0"),
    ///     ("ce_id", "42"),
    ///     ("ce_source", "/order-service"),
    ///     ("ce_type", "shop.order.created"),
    ///     ("content-type", "application/json"),
    /// ];
    /// let event = Event::<Vec<u32>>::from_binary(headers, b"[1,2]")?;
    /// assert_eq!(event.id(), "42");
    /// assert_eq!(event.data(), &[1, 2]);
    /// # Ok::<(), micro_events::Error>(())
    /// ```
    pub fn from_binary<I, K, V>(headers: I, data: &[u8]) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<[u8]>,
    {
        let mut raw = RawAttributes::default();
        for (name, value) in headers {
            let Some((attribute, slot)) = slot(&mut raw, name.as_ref()) else {
                continue;
            };
            if slot.is_some() {
                return Err(Error::DuplicateAttribute { attribute });
            }
            let value = std::str::from_utf8(value.as_ref())
                .map_err(|_| Error::invalid(attribute, "not valid utf-8"))?;
            *slot = Some(value.to_owned());
        }
        let attributes = raw.validate()?;
        let data = if data.is_empty() {
            data_from_nothing()?
        } else {
            serde_json::from_slice(data).map_err(Error::Decode)?
        };
        Ok(Event { attributes, data })
    }
}

/// The attribute a header carries and where to store it, or `None` for a
/// header that is no attribute this crate knows.
fn slot<'a>(
    raw: &'a mut RawAttributes,
    header: &str,
) -> Option<(&'static str, &'a mut Option<String>)> {
    if header.eq_ignore_ascii_case(CONTENT_TYPE_HEADER) {
        return Some((attr::DATACONTENTTYPE, &mut raw.datacontenttype));
    }
    let prefix = header.get(..HEADER_PREFIX.len())?;
    if !prefix.eq_ignore_ascii_case(HEADER_PREFIX) {
        return None;
    }
    let name = header[HEADER_PREFIX.len()..].to_ascii_lowercase();
    Some(match name.as_str() {
        attr::SPECVERSION => (attr::SPECVERSION, &mut raw.specversion),
        attr::ID => (attr::ID, &mut raw.id),
        attr::SOURCE => (attr::SOURCE, &mut raw.source),
        attr::TYPE => (attr::TYPE, &mut raw.ty),
        attr::DATASCHEMA => (attr::DATASCHEMA, &mut raw.dataschema),
        attr::SUBJECT => (attr::SUBJECT, &mut raw.subject),
        attr::TIME => (attr::TIME, &mut raw.time),
        attr::TRACEPARENT => (attr::TRACEPARENT, &mut raw.traceparent),
        attr::TRACESTATE => (attr::TRACESTATE, &mut raw.tracestate),
        attr::CORRELATIONID => (attr::CORRELATIONID, &mut raw.correlationid),
        attr::CAUSATIONID => (attr::CAUSATIONID, &mut raw.causationid),
        attr::SCHEMAVERSION => (attr::SCHEMAVERSION, &mut raw.schemaversion),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;
    use crate::test_support::{arb_event, Payload};

    fn header_value<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    fn base() -> Vec<(String, Vec<u8>)> {
        [
            ("ce_specversion", "1.0"),
            ("ce_id", "1"),
            ("ce_source", "/s"),
            ("ce_type", "t"),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.as_bytes().to_vec()))
        .collect()
    }

    fn decode(headers: Vec<(String, Vec<u8>)>) -> Result<Event<Value>> {
        Event::from_binary(headers, b"{}")
    }

    #[test]
    fn headers_follow_the_kafka_binding() {
        let cause = Event::builder("/order-service", "shop.order.created", ())
            .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .build()
            .unwrap();
        let event = Event::builder(
            "/payment-service",
            "shop.payment.processed",
            json!({"a": 1}),
        )
        .id("p-1")
        .subject("order-1")
        .time(time::macros::datetime!(2024-01-02 03:04:05 UTC))
        .schema_version(3)
        .caused_by(&cause)
        .build()
        .unwrap();
        let headers = event.to_binary_headers();
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "content-type",
                "ce_subject",
                "ce_time",
                "ce_traceparent",
                "ce_correlationid",
                "ce_causationid",
                "ce_schemaversion",
            ]
        );
        assert_eq!(header_value(&headers, "ce_specversion"), Some("1.0"));
        assert_eq!(header_value(&headers, "ce_id"), Some("p-1"));
        assert_eq!(
            header_value(&headers, "content-type"),
            Some("application/json")
        );
        assert_eq!(
            header_value(&headers, "ce_time"),
            Some("2024-01-02T03:04:05Z")
        );
        assert_eq!(header_value(&headers, "ce_causationid"), Some(cause.id()));
        assert_eq!(header_value(&headers, "ce_schemaversion"), Some("3"));
        assert_eq!(event.to_binary_data().unwrap(), br#"{"a":1}"#);
    }

    #[test]
    fn ignores_unknown_headers_and_case() {
        let mut headers = base();
        headers[1].0 = "CE_ID".into();
        headers.push(("traceparent-of-something-else".into(), vec![0xff]));
        headers.push(("ce_comexampleextension".into(), b"x".to_vec()));
        headers.push(("Content-Type".into(), b"application/json".to_vec()));
        let event = decode(headers).unwrap();
        assert_eq!(event.id(), "1");
    }

    #[test]
    fn rejects_missing_required_attributes() {
        for (index, attribute) in ["specversion", "id", "source", "type"].iter().enumerate() {
            let mut headers = base();
            headers.remove(index);
            match decode(headers) {
                Err(Error::MissingAttribute { attribute: a }) => assert_eq!(a, *attribute),
                other => panic!("{attribute}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_empty_duplicate_and_non_utf8_attributes() {
        let mut headers = base();
        headers[2].1.clear();
        let err = decode(headers).unwrap_err();
        assert!(
            matches!(
                err,
                Error::EmptyAttribute {
                    attribute: "source"
                }
            ),
            "{err:?}"
        );

        let mut headers = base();
        headers.push(("ce_id".into(), b"2".to_vec()));
        let err = decode(headers).unwrap_err();
        assert!(
            matches!(err, Error::DuplicateAttribute { attribute: "id" }),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "attribute `id` appears more than once");

        let mut headers = base();
        headers.push(("ce_subject".into(), vec![0xc3, 0x28]));
        let err = decode(headers).unwrap_err();
        assert_eq!(err.attribute(), Some("subject"));
        assert!(matches!(err, Error::InvalidAttribute { .. }), "{err:?}");
    }

    #[test]
    fn rejects_wrong_spec_version_and_content_type() {
        let mut headers = base();
        headers[0].1 = b"0.3".to_vec();
        let err = decode(headers).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedSpecVersion { .. }),
            "{err:?}"
        );

        let mut headers = base();
        headers.push((
            "content-type".into(),
            b"application/cloudevents+json".to_vec(),
        ));
        let err = decode(headers).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedContentType { .. }),
            "{err:?}"
        );
        assert_eq!(err.attribute(), Some("datacontenttype"));
    }

    #[test]
    fn empty_body_means_no_data() {
        assert_eq!(
            *Event::<Option<u8>>::from_binary(base(), b"")
                .unwrap()
                .data(),
            None
        );
        assert!(matches!(
            Event::<u8>::from_binary(base(), b""),
            Err(Error::MissingData)
        ));
        assert!(matches!(
            Event::<u8>::from_binary(base(), b"\"x\""),
            Err(Error::Decode(_))
        ));
    }

    proptest! {
        #[test]
        fn binary_round_trip(event in arb_event()) {
            let headers = event.to_binary_headers();
            let data = event.to_binary_data().unwrap();
            let decoded = Event::<Payload>::from_binary(headers, &data).unwrap();
            prop_assert_eq!(decoded, event);
        }

        #[test]
        fn binary_and_structured_agree(event in arb_event()) {
            let via_binary = Event::<Payload>::from_binary(
                event.to_binary_headers(),
                &event.to_binary_data().unwrap(),
            )
            .unwrap();
            let via_json = Event::<Payload>::from_json(&via_binary.to_json().unwrap()).unwrap();
            prop_assert_eq!(via_json, event);
        }
    }
}
