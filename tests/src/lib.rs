//! Cross-crate tests of micro.
