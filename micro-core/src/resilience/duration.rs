//! Durations in configuration, written the way people write them.
//!
//! A duration is a whole number of milliseconds (`250`), or a string holding a number and
//! a unit: `"250ms"`, `"2s"`, `"1.5s"`, `"5m"`, `"1h"`. A string without a unit counts
//! milliseconds.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Deserializes a [`Duration`] in the format of the module docs.
pub(crate) fn deserialize<'de, D>(deserializer: D) -> Result<Duration, D::Error>
where
    D: Deserializer<'de>,
{
    deserializer.deserialize_any(DurationVisitor)
}

/// Deserializes an optional [`Duration`]; `null` or a missing field mean none.
pub(crate) fn deserialize_option<'de, D>(deserializer: D) -> Result<Option<Duration>, D::Error>
where
    D: Deserializer<'de>,
{
    Ok(Option::<Human>::deserialize(deserializer)?.map(|human| human.0))
}

struct Human(Duration);

impl<'de> Deserialize<'de> for Human {
    fn deserialize<D>(deserializer: D) -> Result<Self, D::Error>
    where
        D: Deserializer<'de>,
    {
        deserialize(deserializer).map(Human)
    }
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("milliseconds or a string like \"250ms\", \"2s\", \"5m\" or \"1h\"")
    }

    fn visit_u64<E: de::Error>(self, millis: u64) -> Result<Duration, E> {
        Ok(Duration::from_millis(millis))
    }

    fn visit_i64<E: de::Error>(self, millis: i64) -> Result<Duration, E> {
        u64::try_from(millis)
            .map(Duration::from_millis)
            .map_err(|_| E::invalid_value(de::Unexpected::Signed(millis), &self))
    }

    fn visit_f64<E: de::Error>(self, millis: f64) -> Result<Duration, E> {
        Duration::try_from_secs_f64(millis / 1000.0)
            .map_err(|_| E::invalid_value(de::Unexpected::Float(millis), &self))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        parse(text).ok_or_else(|| E::invalid_value(de::Unexpected::Str(text), &self))
    }
}

fn parse(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    let unit_millis: u64 = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(unit_millis).map(Duration::from_millis);
    }
    let fraction = number.parse::<f64>().ok()?;
    Duration::try_from_secs_f64(fraction * unit_millis as f64 / 1000.0).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Config {
        #[serde(deserialize_with = "deserialize")]
        every: Duration,
        #[serde(default, deserialize_with = "deserialize_option")]
        maybe: Option<Duration>,
    }

    fn every(json: &str) -> Result<Duration, serde_json::Error> {
        serde_json::from_str::<Config>(&format!(r#"{{"every": {json}}}"#)).map(|c| c.every)
    }

    #[test]
    fn numbers_are_milliseconds() {
        assert_eq!(every("250").unwrap(), Duration::from_millis(250));
        assert_eq!(every("2.5").unwrap(), Duration::from_micros(2500));
        assert!(every("-1").is_err());
    }

    #[test]
    fn strings_carry_a_unit() {
        assert_eq!(every(r#""250ms""#).unwrap(), Duration::from_millis(250));
        assert_eq!(every(r#""250""#).unwrap(), Duration::from_millis(250));
        assert_eq!(every(r#""2s""#).unwrap(), Duration::from_secs(2));
        assert_eq!(every(r#""1.5s""#).unwrap(), Duration::from_millis(1500));
        assert_eq!(every(r#"" 3 m ""#).unwrap(), Duration::from_secs(180));
        assert_eq!(every(r#""1h""#).unwrap(), Duration::from_secs(3600));
    }

    #[test]
    fn nonsense_is_rejected_with_a_hint() {
        for bad in [r#""2 days""#, r#""fast""#, r#""""#, r#""1.2.3s""#, "true"] {
            let err = every(bad).unwrap_err().to_string();
            assert!(err.contains("\"2s\""), "{bad}: {err}");
        }
    }

    #[test]
    fn optional_durations_may_be_missing_or_null() {
        let config: Config = serde_json::from_str(r#"{"every": 1}"#).unwrap();
        assert_eq!(config.maybe, None);
        let config: Config = serde_json::from_str(r#"{"every": 1, "maybe": null}"#).unwrap();
        assert_eq!(config.maybe, None);
        let config: Config = serde_json::from_str(r#"{"every": 1, "maybe": "1s"}"#).unwrap();
        assert_eq!(config.maybe, Some(Duration::from_secs(1)));
    }
}
