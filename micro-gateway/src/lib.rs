//! micro-gateway
