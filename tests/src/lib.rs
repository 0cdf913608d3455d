//! Cross-crate tests of micro, and the guide's examples compiled and run as doctests.

/// The chapters of the guide in `docs/`, whose Rust examples run as doctests here.
#[cfg(doctest)]
pub mod guide {
    #[doc = include_str!("../../docs/src/writing-a-service.md")]
    pub struct WritingAService;

    #[doc = include_str!("../../docs/src/calling-services.md")]
    pub struct CallingServices;
}
