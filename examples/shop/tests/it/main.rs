//! The `shop` binary as processes.

mod grpc;
mod manifests;
#[cfg(feature = "real-servers")]
mod multiprocess;
mod restart;
mod support;
