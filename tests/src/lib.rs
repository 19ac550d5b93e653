//! Shared helpers for the integration tests.

pub mod agent_support;
pub mod csi_support;
pub mod runtime_support;
