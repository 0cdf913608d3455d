//! Integration tests of micro-core: one binary, a module per area.

mod client_policy;
mod grpc;
mod host;
mod identity;
mod limits;
mod support;
#[cfg(feature = "tls")]
mod tls;
