//! Layered configuration with figment: defaults < TOML file < environment.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use micro_core::config::ConfigLoader;
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! struct Settings {
//!     port: u16,
//!     database: Database,
//! }
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! struct Database {
//!     url: String,
//!     pool_size: u32,
//! }
//!
//! let defaults = Settings {
//!     port: 8080,
//!     database: Database { url: "postgres://localhost/shop".into(), pool_size: 5 },
//! };
//! // A binary adds `.file("micro.toml").env_prefix("MICRO_")`; with those,
//! // MICRO_DATABASE__POOL_SIZE=20 would override `database.pool_size`.
//! let settings: Settings = ConfigLoader::new()
//!     .defaults(&defaults)
//!     .toml_str("port = 9000")
//!     .load()
//!     .unwrap();
//! assert_eq!(settings.port, 9000);
//! assert_eq!(settings.database.pool_size, 5);
//! ```
//!
//! A bad value fails the load with every offending key, the reason and where the value
//! came from:
//!
//! ```
//! # use serde::Deserialize;
//! # use micro_core::config::ConfigLoader;
//! #[derive(Debug, Deserialize)]
//! struct Settings { port: u16 }
//!
//! let error = ConfigLoader::new().toml_str("port = \"eighty\"").load::<Settings>().unwrap_err();
//! assert_eq!(error.issues()[0].key, "port");
//! assert!(error.to_string().contains("port"));
//! ```
//!
//! Durations in configuration are written as text with a unit (`"250ms"`, `"30s"`,
//! `"5m"`, `"1h"`) and read with [`duration`] through `#[serde(with = ...)]`.

use std::fmt;
use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Builds a configuration from layers, later layers overriding earlier ones.
///
/// Reading the environment is opt-in ([`env_prefix`](Self::env_prefix)): library code
/// never reads it on its own.
#[derive(Debug, Clone, Default)]
pub struct ConfigLoader {
    figment: Figment,
}

impl ConfigLoader {
    /// An empty loader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the serialized `defaults` as a layer.
    pub fn defaults<T: Serialize>(mut self, defaults: &T) -> Self {
        self.figment = self.figment.merge(Serialized::defaults(defaults));
        self
    }

    /// Adds a TOML file as a layer. A missing file adds nothing; see
    /// [`required_file`](Self::required_file).
    pub fn file(mut self, path: impl AsRef<Path>) -> Self {
        self.figment = self.figment.merge(Toml::file(path.as_ref()));
        self
    }

    /// Adds a TOML file that must exist.
    pub fn required_file(mut self, path: impl AsRef<Path>) -> Self {
        self.figment = self.figment.merge(Toml::file_exact(path.as_ref()));
        self
    }

    /// Adds TOML text as a layer.
    pub fn toml_str(mut self, toml: &str) -> Self {
        self.figment = self.figment.merge(Toml::string(toml));
        self
    }

    /// Adds the environment variables that start with `prefix` as a layer, with `__` for
    /// nesting: `MICRO_DATABASE__POOL_SIZE` sets `database.pool_size`.
    pub fn env_prefix(mut self, prefix: &str) -> Self {
        self.figment = self.figment.merge(PrefixedEnv {
            prefix: prefix.to_owned(),
            env: Env::prefixed(prefix).split("__"),
        });
        self
    }

    /// Adds any figment provider as a layer.
    pub fn merge(mut self, provider: impl figment::Provider) -> Self {
        self.figment = self.figment.merge(provider);
        self
    }

    /// Deserializes the merged layers into `T`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming every key that is missing or has a bad value, and why.
    pub fn load<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        self.figment.extract().map_err(ConfigError::from_figment)
    }

    /// Deserializes the table under `key` into `T` (`load_at("gateway")`).
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load).
    pub fn load_at<T: DeserializeOwned>(&self, key: &str) -> Result<T, ConfigError> {
        self.figment
            .extract_inner(key)
            .map_err(ConfigError::from_figment)
    }
}

/// The environment provider, with error messages that name the variable as it is
/// written (`MICRO_DATABASE__POOL_SIZE`), not as figment's default dotted form.
struct PrefixedEnv {
    prefix: String,
    env: Env,
}

impl figment::Provider for PrefixedEnv {
    fn metadata(&self) -> figment::Metadata {
        let prefix = self.prefix.clone();
        figment::Metadata::named(format!("environment variable(s) `{}*`", self.prefix))
            .interpolater(move |_profile, keys| {
                format!("{prefix}{}", keys.join("__").to_uppercase())
            })
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        self.env.data()
    }
}

/// One key that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The dotted key (`database.pool_size`); empty for the whole document.
    pub key: String,
    /// Why the value was rejected.
    pub reason: String,
    /// Where the value came from (a file, an environment variable), when known.
    pub origin: Option<String>,
}

/// The configuration could not be loaded.
#[derive(Debug)]
pub struct ConfigError {
    issues: Vec<ConfigIssue>,
    source: Box<figment::Error>,
}

impl ConfigError {
    fn from_figment(error: figment::Error) -> Self {
        let issues = error
            .clone()
            .into_iter()
            .map(|e| {
                let origin = e.metadata.as_ref().map(|meta| {
                    let mut origin = meta.name.to_string();
                    if let Some(source) = &meta.source {
                        origin = format!("{origin} {source}");
                    }
                    if e.path.is_empty() {
                        return origin;
                    }
                    let profile = e.profile.clone().unwrap_or_default();
                    format!("{origin}, as `{}`", meta.interpolate(&profile, &e.path))
                });
                ConfigIssue {
                    key: e.path.join("."),
                    reason: e.kind.to_string(),
                    origin,
                }
            })
            .collect();
        Self {
            issues,
            source: Box::new(error),
        }
    }

    /// Every key that could not be read.
    pub fn issues(&self) -> &[ConfigIssue] {
        &self.issues
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration")?;
        for (i, issue) in self.issues.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            if issue.key.is_empty() {
                write!(f, "{}", issue.reason)?;
            } else {
                write!(f, "key `{}`: {}", issue.key, issue.reason)?;
            }
            if let Some(origin) = &issue.origin {
                write!(f, " (from {origin})")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Serde helpers for durations in configuration: a whole number of milliseconds (`250`),
/// or text with a unit: `"250ms"`, `"1.5s"`, `"5m"` (or `"5min"`), `"1h"`, `"1d"`. Text
/// without a unit is rejected, so `"30"` cannot be read as 30 seconds by one reader and 30
/// milliseconds by another.
///
/// ```
/// use std::time::Duration;
/// #[derive(serde::Deserialize)]
/// struct Timeouts {
///     #[serde(with = "micro_core::config::duration")]
///     request: Duration,
///     #[serde(default, with = "micro_core::config::duration::option")]
///     idle: Option<Duration>,
/// }
/// let t: Timeouts = serde_json::from_str(r#"{"request": "1500ms"}"#).unwrap();
/// assert_eq!(t.request, Duration::from_millis(1500));
/// assert_eq!(t.idle, None);
/// ```
pub mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    /// Parses text with a unit: `"250ms"`, `"30s"`, `"5m"`, `"5min"`, `"1h"`, `"1d"`,
    /// `"1.5s"`.
    ///
    /// # Errors
    ///
    /// A message saying what was expected.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{text}` has no unit: write e.g. `500ms`, `30s`, `5m`"))?;
        let (number, unit) = text.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` does not start with a number"))?;
        let seconds = match unit.trim() {
            "ms" => number / 1000.0,
            "s" => number,
            "m" | "min" => number * 60.0,
            "h" => number * 3600.0,
            "d" => number * 86400.0,
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{text}`: use ms, s, m, h or d"
                ))
            }
        };
        Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{text}` is out of range"))
    }

    /// Writes a duration as milliseconds with a unit (`"1500ms"`).
    ///
    /// # Errors
    ///
    /// Whatever the serializer returns.
    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{}ms", value.as_millis()))
    }

    /// Reads a duration from text with a unit, or from a number of milliseconds.
    ///
    /// # Errors
    ///
    /// When the text has no known unit or no number, or the number is negative.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }

    /// The same format for an `Option<Duration>`; `null` is `None`. Add
    /// `#[serde(default)]` for a field that may be missing.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes `Some` as [`serialize`](super::serialize) does, `None` as `null`.
        ///
        /// # Errors
        ///
        /// Whatever the serializer returns.
        pub fn serialize<S: Serializer>(
            value: &Option<Duration>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match value {
                Some(value) => super::serialize(value, serializer),
                None => serializer.serialize_none(),
            }
        }

        /// Reads `null` as `None`, anything else as [`deserialize`](super::deserialize)
        /// does.
        ///
        /// # Errors
        ///
        /// As [`deserialize`](super::deserialize).
        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            struct Human(Duration);
            impl<'de> Deserialize<'de> for Human {
                fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                    super::deserialize(deserializer).map(Human)
                }
            }
            Ok(Option::<Human>::deserialize(deserializer)?.map(|human| human.0))
        }
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(
                "milliseconds or text with a unit such as \"250ms\", \"2s\", \"5m\" or \"1h\"",
            )
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
            parse(text).map_err(E::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::time::Duration;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Settings {
        port: u16,
        #[serde(with = "duration")]
        timeout: Duration,
        database: Database,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Database {
        pool_size: u32,
    }

    fn defaults() -> Settings {
        Settings {
            port: 80,
            timeout: Duration::from_secs(1),
            database: Database { pool_size: 5 },
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API
    fn environment_beats_file_beats_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("micro.toml", "port = 9000\n[database]\npool_size = 7\n")?;
            jail.set_env("TESTAPP_DATABASE__POOL_SIZE", "20");
            let settings: Settings = ConfigLoader::new()
                .defaults(&defaults())
                .file("micro.toml")
                .env_prefix("TESTAPP_")
                .load()
                .unwrap();
            assert_eq!(settings.port, 9000);
            assert_eq!(settings.database.pool_size, 20);
            assert_eq!(settings.timeout, Duration::from_secs(1));
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API
    fn a_bad_environment_value_names_the_key_the_reason_and_the_variable() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TESTAPP_DATABASE__POOL_SIZE", "many");
            let error = ConfigLoader::new()
                .defaults(&defaults())
                .env_prefix("TESTAPP_")
                .load::<Settings>()
                .unwrap_err();
            let issue = &error.issues()[0];
            assert_eq!(issue.key, "database.pool_size");
            assert!(issue.reason.contains("many"), "{}", issue.reason);
            let message = error.to_string();
            assert!(message.contains("database.pool_size"), "{message}");
            assert!(message.contains("TESTAPP_DATABASE__POOL_SIZE"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn a_missing_required_key_is_named() {
        let error = ConfigLoader::new()
            .toml_str("port = 1\ntimeout = \"2s\"")
            .load::<Settings>()
            .unwrap_err();
        assert!(error.to_string().contains("database"), "{error}");
    }

    #[test]
    fn a_bad_duration_says_what_is_expected() {
        let error = ConfigLoader::new()
            .defaults(&defaults())
            .toml_str("timeout = \"5 parsecs\"")
            .load::<Settings>()
            .unwrap_err();
        assert_eq!(error.issues()[0].key, "timeout");
        assert!(error.issues()[0].reason.contains("unknown unit"), "{error}");
    }

    #[derive(Debug, Deserialize)]
    struct Durations {
        #[serde(with = "duration")]
        every: Duration,
        #[serde(default, with = "duration::option")]
        maybe: Option<Duration>,
    }

    fn every(json: &str) -> Result<Duration, serde_json::Error> {
        serde_json::from_str::<Durations>(&format!(r#"{{"every": {json}}}"#)).map(|d| d.every)
    }

    #[test]
    fn numbers_are_milliseconds_and_text_needs_a_unit() {
        assert_eq!(every("250").unwrap(), Duration::from_millis(250));
        assert_eq!(every("2.5").unwrap(), Duration::from_micros(2500));
        assert_eq!(every(r#"" 3 m ""#).unwrap(), Duration::from_secs(180));
        assert_eq!(every(r#""5min""#).unwrap(), Duration::from_secs(300));
        for bad in [
            "-1",
            r#""250""#,
            r#""2 days""#,
            r#""fast""#,
            r#""""#,
            r#""1.2.3s""#,
            "true",
        ] {
            assert!(every(bad).is_err(), "{bad} was accepted");
        }
        assert!(every("true").unwrap_err().to_string().contains("\"2s\""));
    }

    #[test]
    fn optional_durations_may_be_missing_or_null() {
        let parsed: Durations = serde_json::from_str(r#"{"every": 1}"#).unwrap();
        assert_eq!(parsed.maybe, None);
        let parsed: Durations = serde_json::from_str(r#"{"every": 1, "maybe": null}"#).unwrap();
        assert_eq!(parsed.maybe, None);
        let parsed: Durations = serde_json::from_str(r#"{"every": 1, "maybe": "1s"}"#).unwrap();
        assert_eq!(parsed.maybe, Some(Duration::from_secs(1)));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration::parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration::parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration::parse("1h"), Ok(Duration::from_secs(3600)));
        assert!(duration::parse("10").is_err());
        assert!(duration::parse("ms").is_err());
    }
}
