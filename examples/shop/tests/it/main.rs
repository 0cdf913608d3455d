//! The `shop` binary as processes.

#[cfg(feature = "real-servers")]
mod faults;
mod manifests;
#[cfg(feature = "real-servers")]
mod multiprocess;
mod restart;
mod support;
