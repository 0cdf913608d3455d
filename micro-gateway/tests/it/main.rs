//! Integration tests of micro-gateway: one binary, a module per area.

mod binary;
mod compose;
mod config;
mod discovered;
mod gateway;
mod plugins;
mod proxy;
mod support;
