//! The pod worker's seams: `ContainerRuntime`, the containerd calls the worker and the manager
//! make, and `PodHost`, the node-side work for one pod (sandbox, volumes, cgroups). The real
//! implementations are `crate::runtime::Runtime` and [`NodeHost`]; `fake` holds in-memory
//! doubles so that the worker's rules are tested on paused time without root.
//!
//! The traits are object safe (`async-trait` boxes the futures) so `PodContext` holds them as
//! `Arc<dyn …>` and nothing above this module names a concrete runtime.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::runtime::{
    ContainerConfig, ContainerRecord, Device, ExecOutput, ExitEvent, ImageInfo, Mount, PullPolicy,
    RegistryAuth, Result, Runtime,
};
use crate::sandbox::{Sandbox, SandboxError, SandboxManager};
use crate::volume::{PodVolumes, VolumeError, VolumeManager};

/// The containerd calls of the pod worker and manager. Every call can fail (containerd may be
/// away); callers retry until what they observe matches what they want.
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Makes the image present per `policy` and returns its facts.
    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        auth: Option<&RegistryAuth>,
    ) -> Result<ImageInfo>;
    /// Creates the container (not its task).
    async fn create(&self, config: &ContainerConfig) -> Result<()>;
    /// Creates and starts the container's task; returns its pid.
    async fn start(&self, id: &str) -> Result<u32>;
    /// Signals the task's init process (Ok when it already exited or has no task).
    async fn signal(&self, id: &str, signal: i32) -> Result<()>;
    /// Kills any task, deletes task, container and snapshot (Ok when already gone).
    async fn remove(&self, id: &str) -> Result<()>;
    /// One container and its task's state.
    async fn inspect(&self, id: &str) -> Result<ContainerRecord>;
    /// Every container of the agent.
    async fn list(&self) -> Result<Vec<ContainerRecord>>;
    /// Runs a command in the container, killed after `timeout`.
    async fn exec(&self, id: &str, args: &[String], timeout: Duration) -> Result<ExecOutput>;
    /// Exit events of the containers' init processes.
    fn exits(&self) -> broadcast::Receiver<ExitEvent>;
}

#[async_trait]
impl ContainerRuntime for Runtime {
    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        auth: Option<&RegistryAuth>,
    ) -> Result<ImageInfo> {
        Runtime::ensure_image(self, image, policy, auth).await
    }
    async fn create(&self, config: &ContainerConfig) -> Result<()> {
        Runtime::create(self, config).await
    }
    async fn start(&self, id: &str) -> Result<u32> {
        Runtime::start(self, id).await
    }
    async fn signal(&self, id: &str, signal: i32) -> Result<()> {
        Runtime::signal(self, id, signal).await
    }
    async fn remove(&self, id: &str) -> Result<()> {
        Runtime::remove(self, id).await
    }
    async fn inspect(&self, id: &str) -> Result<ContainerRecord> {
        Runtime::inspect(self, id).await
    }
    async fn list(&self) -> Result<Vec<ContainerRecord>> {
        Runtime::list(self).await
    }
    async fn exec(&self, id: &str, args: &[String], timeout: Duration) -> Result<ExecOutput> {
        Runtime::exec(self, id, args, timeout).await
    }
    fn exits(&self) -> broadcast::Receiver<ExitEvent> {
        Runtime::exits(self)
    }
}

/// The node-side work for a pod: its volumes, its sandbox and its cgroups.
#[async_trait]
pub trait PodHost: Send + Sync + 'static {
    /// Mounts the pod's volumes (idempotent).
    async fn setup_volumes(&self, pod: &Arc<Pod>) -> Result<PodVolumes, VolumeError>;
    /// Rewrites the pod's projected volumes from the object store.
    async fn refresh_volumes(
        &self,
        pod: &Arc<Pod>,
        volumes: &PodVolumes,
    ) -> Result<(), VolumeError>;
    /// The mounts and devices of one container.
    fn container_mounts(
        &self,
        pod: &Pod,
        container: &Container,
        volumes: &PodVolumes,
    ) -> Result<(Vec<Mount>, Vec<Device>), VolumeError>;
    /// Unmounts and removes every volume of the pod (idempotent).
    async fn teardown_volumes(&self, uid: &str) -> Result<(), VolumeError>;
    /// Retries the teardown of an orphan's volumes in the background until it is done.
    async fn retry_orphan_teardown(&self, uid: String, cancel: CancellationToken);
    /// UIDs with volume state on the host.
    fn volume_pods(&self) -> Vec<String>;
    /// Makes the pod's sandbox (namespaces, network, files).
    async fn ensure_sandbox(&self, pod: &Pod) -> Result<Sandbox, SandboxError>;
    /// Removes the pod's sandbox (idempotent).
    async fn teardown_sandbox(&self, uid: &str) -> Result<(), SandboxError>;
    /// UIDs with a sandbox on the host.
    fn sandbox_pods(&self) -> Vec<String>;
    /// Removes the pod's cgroup directories in every hierarchy (Ok when none is left).
    fn remove_pod_cgroups(&self, uid: &str) -> std::io::Result<()>;
}

/// The real host: the sandbox and volume managers, and the cgroup file system.
pub struct NodeHost {
    pub sandboxes: Arc<SandboxManager>,
    pub volumes: Arc<VolumeManager>,
    /// The cgroup file system's root (/sys/fs/cgroup).
    pub cgroup_root: PathBuf,
}

impl NodeHost {
    pub fn new(sandboxes: Arc<SandboxManager>, volumes: Arc<VolumeManager>) -> Self {
        Self {
            sandboxes,
            volumes,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        }
    }
}

#[async_trait]
impl PodHost for NodeHost {
    async fn setup_volumes(&self, pod: &Arc<Pod>) -> Result<PodVolumes, VolumeError> {
        self.volumes.setup(pod).await
    }
    async fn refresh_volumes(
        &self,
        pod: &Arc<Pod>,
        volumes: &PodVolumes,
    ) -> Result<(), VolumeError> {
        self.volumes.refresh(pod, volumes).await
    }
    fn container_mounts(
        &self,
        pod: &Pod,
        container: &Container,
        volumes: &PodVolumes,
    ) -> Result<(Vec<Mount>, Vec<Device>), VolumeError> {
        self.volumes.container_mounts(pod, container, volumes)
    }
    async fn teardown_volumes(&self, uid: &str) -> Result<(), VolumeError> {
        self.volumes.teardown(uid).await
    }
    async fn retry_orphan_teardown(&self, uid: String, cancel: CancellationToken) {
        self.volumes.retry_orphan_teardown(uid, cancel).await
    }
    fn volume_pods(&self) -> Vec<String> {
        self.volumes.list()
    }
    async fn ensure_sandbox(&self, pod: &Pod) -> Result<Sandbox, SandboxError> {
        self.sandboxes.ensure(pod).await
    }
    async fn teardown_sandbox(&self, uid: &str) -> Result<(), SandboxError> {
        self.sandboxes.teardown(uid).await
    }
    fn sandbox_pods(&self) -> Vec<String> {
        self.sandboxes.list()
    }
    fn remove_pod_cgroups(&self, uid: &str) -> std::io::Result<()> {
        super::cgroup::remove_pod(&self.cgroup_root, uid)
    }
}
