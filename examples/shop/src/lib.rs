//! The micro reference shop, as a library of services that the `shop` binary hosts.
//!
//! The services of the reference architecture, each owning its data in its own
//! [`store`]: [`catalog`] (product-service), [`cart`], [`order`] (driving the order saga),
//! [`payment`], [`inventory`] and [`notification`], fed by the order [`events`].

pub mod api;
pub mod app;
pub mod cart;
pub mod catalog;
pub mod events;
pub mod inventory;
pub mod loadgen;
pub mod notification;
pub mod order;
pub mod payment;
pub mod product_grpc;
pub mod store;
pub mod trust;
pub mod user;
