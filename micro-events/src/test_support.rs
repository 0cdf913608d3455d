//! Strategies shared by the property tests of both modes.

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::event::{Attributes, Event, Time};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Payload {
    name: String,
    amount_minor: i64,
    tags: Vec<String>,
    note: Option<String>,
}

fn arb_payload() -> impl Strategy<Value = Payload> {
    (
        "\\PC{0,12}",
        any::<i64>(),
        prop::collection::vec("\\PC{0,6}", 0..4),
        prop::option::of("\\PC{0,12}"),
    )
        .prop_map(|(name, amount_minor, tags, note)| Payload {
            name,
            amount_minor,
            tags,
            note,
        })
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{1,24}"
}

fn uri_reference() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._~:/?#\\[\\]@!$&'()*+,;=%-]{1,32}"
}

/// Any time RFC 3339 can express in UTC, to the nanosecond.
fn arb_time() -> impl Strategy<Value = Time> {
    (-62_167_219_200..=253_402_300_799i64, 0..1_000_000_000u32).prop_map(|(seconds, nanos)| {
        let value = OffsetDateTime::from_unix_timestamp(seconds)
            .unwrap()
            .replace_nanosecond(nanos)
            .unwrap();
        Time::new(value).unwrap()
    })
}

pub(crate) fn arb_event() -> impl Strategy<Value = Event<Payload>> {
    let required = (text(), uri_reference(), text());
    let optional = (
        prop::option::of(arb_time()),
        prop::option::of(text()),
        prop::option::of(uri_reference()),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of(any::<u16>()),
    );
    (required, optional, arb_payload()).prop_map(
        |(
            (id, source, ty),
            (
                time,
                subject,
                dataschema,
                traceparent,
                tracestate,
                correlation_id,
                causation_id,
                schema_version,
            ),
            data,
        )| {
            let attributes = Attributes {
                id,
                source,
                ty,
                time,
                subject,
                dataschema,
                traceparent,
                tracestate,
                correlation_id,
                causation_id,
                schema_version,
            };
            attributes
                .validate()
                .expect("strategies make valid attributes");
            Event { attributes, data }
        },
    )
}
