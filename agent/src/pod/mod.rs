//! Pods: one worker per pod UID drives that pod's lifecycle; nothing else decides a pod's state.
//! `machine` is the pure state machine, `status` the pure status computation, `worker` carries
//! out the machine's actions against the runtime, sandbox, volumes and prober, and `manager`
//! owns the workers, feeding each the latest desired pod (a newer spec replaces a pending one).
//! Workers and manager reach containerd and the host only through the `seam` traits
//! (`ContainerRuntime`, `PodHost`); `fake` holds their in-memory doubles for tests.
//!
//! OWNER: lifecycle helper (machine, status, backoff, worker, manager, hooks);
//! env.rs: volumes helper.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use crate::events::Recorder;
use crate::probe::Prober;
use crate::status::StatusManager;
use crate::store::ObjectStore;

pub use self::seam::{ContainerRuntime, NodeHost, PodHost};

pub mod api;
pub mod backoff;
pub mod cgroup;
pub mod checkpoint;
pub mod config;
pub mod env;
#[cfg(test)]
pub(crate) mod fake;
pub mod hooks;
pub mod logs;
pub mod machine;
pub mod manager;
pub mod resources;
pub mod seam;
pub mod status;
pub mod worker;

/// A pod as the kubelet names it in messages (its `format.Pod`): `name_namespace(uid)`.
pub fn format_pod(pod: &Pod) -> String {
    let m = &pod.metadata;
    format!(
        "{}_{}({})",
        m.name.as_deref().unwrap_or_default(),
        m.namespace.as_deref().unwrap_or_default(),
        m.uid.as_deref().unwrap_or_default()
    )
}

/// Node facts pods need.
#[derive(Clone, Debug)]
pub struct NodeFacts {
    pub name: String,
    /// The node's IP, reported as hostIP (and podIP for hostNetwork pods).
    pub ip: Option<std::net::IpAddr>,
    pub root_dir: PathBuf,
    /// Where container logs go (/var/log/pods).
    pub log_dir: PathBuf,
    /// What unset limits in `resourceFieldRef` env vars resolve to.
    pub allocatable: crate::volume::downward::NodeAllocatable,
}

/// Everything a pod worker drives. Built once in main; shared by all workers.
pub struct PodContext {
    pub node: NodeFacts,
    pub runtime: Arc<dyn ContainerRuntime>,
    /// Sandboxes, volumes and cgroups.
    pub host: Arc<dyn PodHost>,
    pub prober: Arc<Prober>,
    pub status: StatusManager,
    pub recorder: Recorder,
    pub store: ObjectStore,
}

impl PodContext {
    /// Forgets a pod that is gone for good: its reported status, and what correlates its
    /// events (a repeat of them can no longer come; the `/events` ring keeps the events).
    pub fn forget(&self, uid: &str) {
        self.status.forget(uid);
        self.recorder.forget(uid);
    }
}

/// A source's request to stop a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deletion {
    /// The grace the deletion asks for (it can only shrink what the pod already got).
    pub grace: Duration,
    /// The object is gone from its source (force delete, file removed): no status is wanted.
    /// A force delete is `gone` with a zero grace (no preStop, KILL 2 s after the stop signal).
    pub gone: bool,
}

/// What a source wants for one pod UID.
#[derive(Clone, Debug)]
pub struct Desired {
    /// Shared with the source that produced it, the manager and the status manager: one
    /// copy of the pod per UID, however many hold it.
    pub pod: Arc<Pod>,
    pub deletion: Option<Deletion>,
}
