//! The micro reference shop, as a library of services that the `shop` binary hosts.
//!
//! It grows service by service into the system of the reference architecture (user,
//! product, cart, order, payment, inventory, notification and a gateway). Today it holds
//! the product catalog.

pub mod catalog;
