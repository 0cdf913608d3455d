//! Integration tests of micro-events: one binary, a module per area.
//!
//! `conformance` is the publish/subscribe suite every bus passes; the backend
//! modules (`memory`, `kafka`) run it.

mod conformance;
mod health;
mod host;
mod identity;
#[cfg(feature = "kafka")]
mod kafka;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod support;
#[cfg(all(feature = "kafka", feature = "postgres"))]
mod tansu;
mod trace;
