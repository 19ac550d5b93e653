//! nodelet: a node agent that does the kubelet's job over containerd.
//!
//! Data flows one way: sources (manifest folder, API watch) produce desired pods; the pod
//! manager hands each pod UID to its own worker; workers alone drive the runtime, the sandbox,
//! the volumes and the prober, and report status to the status manager, which feeds the sinks.
#![deny(unsafe_code)]

pub mod admission;
pub mod agent;
pub mod cluster;
pub mod config;
pub mod events;
pub mod features;
#[cfg(test)]
mod heap;
pub mod host;
pub mod layout;
pub mod lock;
pub mod memory;
pub mod pod;
pub mod probe;
pub mod retry;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod source;
pub mod stats;
pub mod status;
pub mod store;
pub mod volume;
