//! Benchmarks of micro.
