//! micro-core: the service host, health, metrics, config, telemetry and resilience
//! layers that every micro service stands on.

pub mod client;
pub mod config;
pub mod error;
pub mod health;
pub mod host;
pub mod metrics;
pub mod middleware;
pub mod resilience;
mod serve;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod trace;
