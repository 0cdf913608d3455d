//! micro-discovery
