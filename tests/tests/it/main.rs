//! End-to-end tests across micro's crates and the shop: one binary, a module per area.

mod deploy;
mod loadgen;
mod shop;
mod tracing_across_services;
