//! Integration tests of micro-discovery: one binary, a module per area.
//!
//! `conformance` is the suite every backend passes; the backend modules run it.

mod balance;
mod conformance;
mod consul;
mod consul_double;
mod etcd;
mod grpc;
mod host;
mod memory;
mod static_list;
mod support;
