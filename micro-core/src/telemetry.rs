//! Log output for binaries: installs the global `tracing` subscriber.
//!
//! Library code never calls [`init`]; a service's `main` does, once, with a
//! [`TelemetryConfig`] it loaded from its configuration. This module reads no
//! environment variables itself: to honour `RUST_LOG`, the binary reads it and puts it
//! in [`TelemetryConfig::filter`].
//!
//! ```no_run
//! use micro_core::telemetry::{self, LogFormat, TelemetryConfig};
//!
//! let cfg = TelemetryConfig {
//!     filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "info,micro_core=debug".into()),
//!     format: LogFormat::Json,
//! };
//! telemetry::init(&cfg)?;
//! # Ok::<_, telemetry::TelemetryError>(())
//! ```

use std::io::IsTerminal;

use serde::{Deserialize, Serialize};
use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::EnvFilter;

/// How log lines are written to standard output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogFormat {
    /// Compact lines for people, coloured when standard output is a terminal.
    #[default]
    Human,
    /// One JSON object per line, event fields at the top level, for log collectors.
    Json,
}

/// Settings for [`init`]. Missing fields take their [`Default`] values when
/// deserialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TelemetryConfig {
    /// Which events to record, in [`EnvFilter`] directive syntax, such as
    /// `"info,micro_core=debug"`. Defaults to `"info"`.
    pub filter: String,
    /// The output format. Defaults to [`LogFormat::Human`].
    pub format: LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            filter: "info".to_owned(),
            format: LogFormat::default(),
        }
    }
}

/// Why [`init`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The filter string has an invalid directive.
    #[error("invalid log filter `{filter}`")]
    InvalidFilter {
        /// The filter string as given.
        filter: String,
        /// What is wrong with it.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was installed before.
    #[error("a global tracing subscriber is already installed")]
    AlreadyInitialized(#[source] tracing::subscriber::SetGlobalDefaultError),
}

/// Installs the global tracing subscriber described by `cfg`, writing to standard
/// output.
///
/// Fails instead of panicking when the filter is invalid or a global subscriber is
/// already installed; in both cases nothing is changed.
pub fn init(cfg: &TelemetryConfig) -> Result<(), TelemetryError> {
    let ansi = std::io::stdout().is_terminal();
    let subscriber = subscriber(cfg, std::io::stdout, ansi)?;
    tracing::subscriber::set_global_default(subscriber).map_err(TelemetryError::AlreadyInitialized)
}

fn subscriber<W>(
    cfg: &TelemetryConfig,
    writer: W,
    ansi: bool,
) -> Result<impl Subscriber + Send + Sync + 'static, TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::builder().parse(&cfg.filter).map_err(|source| {
        TelemetryError::InvalidFilter {
            filter: cfg.filter.clone(),
            source,
        }
    })?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let output = match cfg.format {
        LogFormat::Human => fmt.compact().with_ansi(ansi).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    Ok(tracing_subscriber::registry().with(filter).with(output))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap();
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    fn capture(cfg: &TelemetryConfig, emit: impl FnOnce()) -> Vec<String> {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = subscriber(cfg, move || writer.clone(), false).unwrap();
        tracing::subscriber::with_default(subscriber, emit);
        buffer.lines()
    }

    #[test]
    fn config_deserializes_with_defaults() {
        let cfg: TelemetryConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, TelemetryConfig::default());
        assert_eq!(cfg.filter, "info");

        let cfg: TelemetryConfig =
            serde_json::from_str(r#"{"format": "json", "filter": "warn"}"#).unwrap();
        assert_eq!(cfg.format, LogFormat::Json);
        assert_eq!(cfg.filter, "warn");
        assert!(serde_json::from_str::<LogFormat>(r#""Json""#).is_err());
    }

    #[test]
    fn invalid_filter_is_a_clear_error() {
        let cfg = TelemetryConfig {
            filter: "info,micro_core=loud".into(),
            ..Default::default()
        };
        let err = init(&cfg).unwrap_err();
        assert!(matches!(err, TelemetryError::InvalidFilter { .. }));
        assert_eq!(err.to_string(), "invalid log filter `info,micro_core=loud`");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn json_lines_respect_the_filter() {
        let cfg = TelemetryConfig {
            filter: "warn,telemetry_test=debug".into(),
            format: LogFormat::Json,
        };
        let lines = capture(&cfg, || {
            tracing::debug!(target: "telemetry_test", order = 7, "kept");
            tracing::trace!(target: "telemetry_test", "dropped");
            tracing::info!(target: "other", "dropped");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(line["message"], "kept");
        assert_eq!(line["order"], 7);
        assert_eq!(line["level"], "DEBUG");
    }

    #[test]
    fn human_lines_are_plain_text() {
        let lines = capture(&TelemetryConfig::default(), || {
            tracing::info!(order = 7, "hello");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("hello"), "{lines:?}");
        assert!(lines[0].contains("order=7"), "{lines:?}");
        assert!(!lines[0].contains('\u{1b}'), "no ansi codes: {lines:?}");
    }
}
