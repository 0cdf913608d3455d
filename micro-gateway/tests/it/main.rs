//! Integration tests of micro-gateway: one binary, a module per area.

mod binary;
mod compose;
mod config;
mod config_auth;
mod discovered;
mod edge;
mod gateway;
mod identity;
mod jwt;
mod plugins;
mod proxy;
mod rate_limit;
mod rate_limit_redis;
mod release;
mod support;
mod transform;
