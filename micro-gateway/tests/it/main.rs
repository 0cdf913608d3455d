//! Integration tests of micro-gateway: one binary, a module per area.

mod proxy;
mod support;
