//! The `shop` binary as processes.

#[cfg(feature = "real-servers")]
mod faults;
mod grpc;
mod manifests;
#[cfg(feature = "real-servers")]
mod multiprocess;
#[cfg(feature = "real-servers")]
mod postgres_outage;
mod restart;
mod support;
