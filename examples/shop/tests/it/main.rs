//! The `shop` binary as a process.

mod restart;
