//! micro-events
