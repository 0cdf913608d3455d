//! Attributes as read from the wire, before validation; shared by the
//! structured and binary modes so that both reject the same events in the same
//! words.

use serde::de::value::UnitDeserializer;
use serde::Deserialize;

use crate::attr;
use crate::error::{Error, Result};
use crate::event::{Attributes, Time, SPEC_VERSION};

#[derive(Debug, Default)]
pub(crate) struct RawAttributes {
    pub(crate) specversion: Option<String>,
    pub(crate) id: Option<String>,
    pub(crate) source: Option<String>,
    pub(crate) ty: Option<String>,
    pub(crate) datacontenttype: Option<String>,
    pub(crate) dataschema: Option<String>,
    pub(crate) subject: Option<String>,
    pub(crate) time: Option<String>,
    pub(crate) traceparent: Option<String>,
    pub(crate) tracestate: Option<String>,
    pub(crate) correlationid: Option<String>,
    pub(crate) causationid: Option<String>,
    pub(crate) schemaversion: Option<String>,
}

impl RawAttributes {
    /// Checks the attributes in the order the CloudEvents spec suggests:
    /// `specversion` first, then the other required attributes, then the rest.
    pub(crate) fn validate(self) -> Result<Attributes> {
        match self.specversion.as_deref() {
            None => return Err(missing(attr::SPECVERSION)),
            Some(SPEC_VERSION) => {}
            Some(other) => {
                return Err(Error::UnsupportedSpecVersion {
                    found: other.to_owned(),
                })
            }
        }
        let id = self.id.ok_or_else(|| missing(attr::ID))?;
        let source = self.source.ok_or_else(|| missing(attr::SOURCE))?;
        let ty = self.ty.ok_or_else(|| missing(attr::TYPE))?;
        if let Some(content_type) = self.datacontenttype {
            if !is_json(&content_type) {
                return Err(Error::UnsupportedContentType {
                    found: content_type,
                });
            }
        }
        let time = self.time.as_deref().map(Time::parse).transpose()?;
        let schema_version = self
            .schemaversion
            .map(|v| {
                v.parse::<u16>().map_err(|_| {
                    Error::invalid(
                        attr::SCHEMAVERSION,
                        format!("`{v}` is not an integer from 0 to 65535"),
                    )
                })
            })
            .transpose()?;
        let attributes = Attributes {
            id,
            source,
            ty,
            time,
            subject: self.subject,
            dataschema: self.dataschema,
            traceparent: self.traceparent,
            tracestate: self.tracestate,
            correlation_id: self.correlationid,
            causation_id: self.causationid,
            schema_version,
        };
        attributes.validate()?;
        Ok(attributes)
    }
}

fn missing(attribute: &'static str) -> Error {
    Error::MissingAttribute { attribute }
}

/// Whether a media type denotes JSON data: `application/json`, `text/json` or
/// any `+json` suffix, parameters ignored. The CloudEvents formats themselves
/// (`application/cloudevents+json`) describe a whole event, not data.
pub(crate) fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence.starts_with("application/cloudevents") {
        return false;
    }
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// The payload of an event without data: works for `()`, `Option<_>` and
/// `serde_json::Value` (JSON `null`), fails for everything else.
pub(crate) fn data_from_nothing<'de, T: Deserialize<'de>>() -> Result<T> {
    T::deserialize(UnitDeserializer::<serde::de::value::Error>::new())
        .map_err(|_| Error::MissingData)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types() {
        for yes in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "text/json",
            "application/problem+json",
        ] {
            assert!(is_json(yes), "{yes}");
        }
        for no in [
            "",
            "text/plain",
            "application/xml",
            "application/jsonx",
            "application/cloudevents+json",
            "application/cloudevents-batch+json",
        ] {
            assert!(!is_json(no), "{no}");
        }
    }

    #[test]
    fn nothing_makes_unit_option_and_null() {
        data_from_nothing::<()>().unwrap();
        assert_eq!(data_from_nothing::<Option<String>>().unwrap(), None);
        assert_eq!(
            data_from_nothing::<serde_json::Value>().unwrap(),
            serde_json::Value::Null
        );
        assert!(matches!(
            data_from_nothing::<String>(),
            Err(Error::MissingData)
        ));
    }
}
