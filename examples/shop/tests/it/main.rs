//! The `shop` binary as processes.

#[cfg(feature = "real-servers")]
mod multiprocess;
mod restart;
mod support;
