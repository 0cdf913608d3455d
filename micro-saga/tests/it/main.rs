//! Integration tests of micro-saga: one binary, one module per subject.

mod conformance;
mod orchestrator;
mod properties;
mod support;
mod testkit;
