//! Integration tests of micro-core: one binary, a module per area.

mod host;
mod support;
