//! Shared helpers for the integration tests.

pub mod runtime_support;
