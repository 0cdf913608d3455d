//! Integration tests of micro-gateway: one binary, a module per area.

mod gateway;
mod plugins;
mod proxy;
mod support;
