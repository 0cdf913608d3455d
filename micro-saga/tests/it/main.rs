//! Integration tests of micro-saga: one binary, one module per subject.

mod conformance;
mod continuous;
#[cfg(feature = "postgres")]
mod crash;
#[cfg(any(feature = "postgres", feature = "embedded"))]
mod durable;
#[cfg(feature = "postgres")]
mod lease;
mod orchestrator;
mod properties;
#[cfg(feature = "postgres")]
mod reconnect;
mod reply;
mod support;
mod testkit;
mod timers;
