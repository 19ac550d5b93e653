//! Shared helpers for the integration tests.

pub mod agent_support;
pub mod containerd_support;
pub mod csi_support;
pub mod leftovers;
pub mod runtime_support;
