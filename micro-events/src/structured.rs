//! Structured mode: the CloudEvents JSON event format.
//!
//! Attributes and extensions are top-level members with their lowercase
//! CloudEvents names, and the payload is the `data` member.

use std::fmt;

use serde::de::{self, DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::attr;
use crate::error::{Error, Result};
use crate::event::{Event, DATA_CONTENT_TYPE, SPEC_VERSION};
use crate::raw::RawAttributes;

/// The media type of a whole event in the CloudEvents JSON format, as used for
/// the `content-type` of a structured-mode message.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

impl<T: Serialize> Event<T> {
    /// Encodes the event in the CloudEvents JSON format (structured mode).
    ///
    /// # Errors
    ///
    /// Fails when the payload cannot be encoded as JSON.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(Error::Encode)
    }
}

impl<T: DeserializeOwned> Event<T> {
    /// Decodes an event from the CloudEvents JSON format (structured mode).
    ///
    /// # Errors
    ///
    /// Fails with an error naming the attribute when a required attribute is
    /// missing or empty, when `specversion` is not `1.0`, when the data content
    /// type is not JSON or an attribute is malformed; with
    /// [`Error::Decode`] when the document is not JSON or its data does not
    /// fit `T`.
    pub fn from_json(json: &[u8]) -> Result<Self> {
        serde_json::from_slice::<Wire<T>>(json)
            .map_err(Error::Decode)?
            .into_event()
    }
}

/// The wire form written by `Serialize`, borrowing from the event.
#[derive(Serialize)]
struct WireRef<'a, T> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    datacontenttype: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dataschema: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schemaversion: Option<u16>,
    data: &'a T,
}

impl<T: Serialize> Serialize for Event<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let a = &self.attributes;
        WireRef {
            specversion: SPEC_VERSION,
            id: &a.id,
            source: &a.source,
            ty: &a.ty,
            datacontenttype: DATA_CONTENT_TYPE,
            dataschema: a.dataschema.as_deref(),
            subject: a.subject.as_deref(),
            time: a.time.as_ref().map(|t| t.text.as_str()),
            traceparent: a.traceparent.as_deref(),
            tracestate: a.tracestate.as_deref(),
            correlationid: a.correlation_id.as_deref(),
            causationid: a.causation_id.as_deref(),
            schemaversion: a.schema_version,
            data: &self.data,
        }
        .serialize(serializer)
    }
}

/// The wire form read by `Deserialize`: everything optional, so that missing
/// attributes are reported by name rather than by serde.
#[derive(Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
struct Wire<T> {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    #[serde(rename = "type")]
    ty: Option<String>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    correlationid: Option<String>,
    causationid: Option<String>,
    #[serde(default, deserialize_with = "integer_or_string")]
    schemaversion: Option<String>,
    #[serde(default)]
    data: Option<T>,
    #[serde(default)]
    data_base64: Option<IgnoredAny>,
}

impl<T> Wire<T> {
    fn into_event<'de>(self) -> Result<Event<T>>
    where
        T: Deserialize<'de>,
    {
        let attributes = RawAttributes {
            specversion: self.specversion,
            id: self.id,
            source: self.source,
            ty: self.ty,
            datacontenttype: self.datacontenttype,
            dataschema: self.dataschema,
            subject: self.subject,
            time: self.time,
            traceparent: self.traceparent,
            tracestate: self.tracestate,
            correlationid: self.correlationid,
            causationid: self.causationid,
            schemaversion: self.schemaversion,
        }
        .validate()?;
        if self.data_base64.is_some() {
            return Err(Error::Base64Data);
        }
        let data = match self.data {
            Some(data) => data,
            None => crate::raw::data_from_nothing()?,
        };
        Ok(Event { attributes, data })
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Event<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Wire::<T>::deserialize(deserializer)?
            .into_event()
            .map_err(de::Error::custom)
    }
}

/// Reads `schemaversion` as a JSON integer (its CloudEvents type) or as a
/// string, which is how bindings without typed values carry it.
fn integer_or_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    struct Visitor;

    impl<'de> de::Visitor<'de> for Visitor {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "the `{}` extension as an integer", attr::SCHEMAVERSION)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }

    deserializer.deserialize_any(Visitor)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;
    use crate::test_support::{arb_event, Payload};

    /// The example event of the CloudEvents JSON format specification,
    /// section 5.1 (with its `comexampleextension` members, which this crate
    /// ignores, and XML data replaced by JSON).
    const SPEC_EXAMPLE: &str = r#"{
        "specversion" : "1.0",
        "type" : "com.github.pull_request.opened",
        "source" : "https://github.com/cloudevents/spec/pull",
        "subject" : "123",
        "id" : "A234-1234-1234",
        "time" : "2018-04-05T17:31:00Z",
        "comexampleextension1" : "value",
        "comexampleothervalue" : 5,
        "datacontenttype" : "application/json",
        "data" : {"appinfoA": "abc", "appinfoB": 123, "appinfoC": true}
    }"#;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct AppInfo {
        appinfo_a: String,
        appinfo_b: u32,
        appinfo_c: bool,
    }

    #[test]
    fn decodes_the_spec_example() {
        let event = Event::<AppInfo>::from_json(SPEC_EXAMPLE.as_bytes()).unwrap();
        assert_eq!(event.id(), "A234-1234-1234");
        assert_eq!(event.source(), "https://github.com/cloudevents/spec/pull");
        assert_eq!(event.event_type(), "com.github.pull_request.opened");
        assert_eq!(event.subject(), Some("123"));
        assert_eq!(
            event.time(),
            Some(time::macros::datetime!(2018-04-05 17:31:00 UTC))
        );
        assert_eq!(event.correlation_id(), None);
        assert_eq!(
            event.data(),
            &AppInfo {
                appinfo_a: "abc".into(),
                appinfo_b: 123,
                appinfo_c: true
            }
        );
    }

    #[test]
    fn decodes_the_spec_example_through_serde() {
        let event: Event<Value> = serde_json::from_str(SPEC_EXAMPLE).unwrap();
        assert_eq!(event.data()["appinfoB"], 123);
    }

    #[test]
    fn encodes_attributes_at_the_top_level() {
        let event = Event::builder("/order-service", "shop.order.created", json!({"n": 1}))
            .id("e-1")
            .subject("order-1")
            .time(time::macros::datetime!(2024-01-02 03:04:05.5 UTC))
            .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .correlation_id("c-1")
            .schema_version(2)
            .build()
            .unwrap();
        let value: Value = serde_json::from_slice(&event.to_json().unwrap()).unwrap();
        assert_eq!(
            value,
            json!({
                "specversion": "1.0",
                "id": "e-1",
                "source": "/order-service",
                "type": "shop.order.created",
                "datacontenttype": "application/json",
                "subject": "order-1",
                "time": "2024-01-02T03:04:05.5Z",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "correlationid": "c-1",
                "schemaversion": 2,
                "data": {"n": 1}
            })
        );
    }

    fn decode(value: Value) -> Result<Event<Value>> {
        Event::from_json(&serde_json::to_vec(&value).unwrap())
    }

    fn minimal() -> Value {
        json!({"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": 1})
    }

    fn without(member: &str) -> Value {
        let mut value = minimal();
        value.as_object_mut().unwrap().remove(member);
        value
    }

    fn with(member: &str, v: Value) -> Value {
        let mut value = minimal();
        value[member] = v;
        value
    }

    #[test]
    fn accepts_the_minimal_event() {
        let event = decode(minimal()).unwrap();
        assert_eq!(event.time(), None);
        assert_eq!(event.data(), &json!(1));
    }

    #[test]
    fn rejects_missing_required_attributes() {
        for attribute in ["specversion", "id", "source", "type"] {
            match decode(without(attribute)) {
                Err(Error::MissingAttribute { attribute: a }) => assert_eq!(a, attribute),
                other => panic!("{attribute}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_empty_attributes() {
        for attribute in ["id", "source", "type", "subject", "causationid"] {
            match decode(with(attribute, json!(""))) {
                Err(Error::EmptyAttribute { attribute: a }) => assert_eq!(a, attribute),
                other => panic!("{attribute}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_other_spec_versions() {
        let err = decode(with("specversion", json!("0.3"))).unwrap_err();
        assert!(matches!(&err, Error::UnsupportedSpecVersion { found } if found == "0.3"));
        assert_eq!(
            err.to_string(),
            "unsupported specversion `0.3`, expected `1.0`"
        );
    }

    #[test]
    fn rejects_non_json_data() {
        let err = decode(with("datacontenttype", json!("application/xml"))).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedContentType { .. }),
            "{err:?}"
        );
        let err = decode(with("data_base64", json!("AAE="))).unwrap_err();
        assert!(matches!(err, Error::Base64Data), "{err:?}");
        assert!(decode(with(
            "datacontenttype",
            json!("application/json; charset=utf-8")
        ))
        .is_ok());
        assert!(decode(with("datacontenttype", json!("application/vnd.shop+json"))).is_ok());
    }

    #[test]
    fn rejects_bad_time_and_schema_version() {
        let err = decode(with("time", json!("yesterday"))).unwrap_err();
        assert_eq!(err.attribute(), Some("time"));
        let err = decode(with("schemaversion", json!(70000))).unwrap_err();
        assert_eq!(err.attribute(), Some("schemaversion"));
        assert_eq!(
            decode(with("schemaversion", json!("3")))
                .unwrap()
                .schema_version(),
            Some(3)
        );
    }

    #[test]
    fn missing_data_fits_only_types_made_from_nothing() {
        let json = serde_json::to_vec(&without("data")).unwrap();
        assert_eq!(
            *Event::<Option<u32>>::from_json(&json).unwrap().data(),
            None
        );
        Event::<()>::from_json(&json).unwrap();
        assert!(matches!(
            Event::<u32>::from_json(&json),
            Err(Error::MissingData)
        ));
    }

    #[test]
    fn wrong_data_type_is_a_decode_error() {
        let json = serde_json::to_vec(&with("data", json!("text"))).unwrap();
        let err = Event::<u32>::from_json(&json).unwrap_err();
        assert!(matches!(err, Error::Decode(_)), "{err:?}");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn serde_errors_name_the_attribute() {
        let err = serde_json::from_value::<Event<Value>>(without("id")).unwrap_err();
        assert!(err.to_string().contains("`id`"), "{err}");
    }

    proptest! {
        #[test]
        fn structured_round_trip(event in arb_event()) {
            let json = event.to_json().unwrap();
            let decoded = Event::<Payload>::from_json(&json).unwrap();
            prop_assert_eq!(decoded, event);
        }
    }
}
