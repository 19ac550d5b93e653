//! The container runtime over containerd. This is the only module that speaks to containerd
//! (containerd-client, tonic). It pulls and unpacks images itself (containerd 1.6 has no
//! server-side pull), creates containers from OCI specs it builds as CRI does, and runs tasks
//! whose stdio goes to `nodelet log-driver` started by the shim, so logs outlive the agent.
//! Every container carries the label checkpoint (see `labels`) that the agent recovers from.
//!
//! OWNER: runtime helper. Signatures here are the contract the pod worker codes against.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

/// Label keys of the checkpoint every container carries.
pub mod labels {
    pub const POD_UID: &str = "io.nodelet.pod.uid";
    pub const POD_NAME: &str = "io.nodelet.pod.name";
    pub const POD_NAMESPACE: &str = "io.nodelet.pod.namespace";
    pub const CONTAINER_NAME: &str = "io.nodelet.container.name";
    /// "init", "sidecar" or "app".
    pub const CONTAINER_KIND: &str = "io.nodelet.container.kind";
    pub const ATTEMPT: &str = "io.nodelet.container.attempt";
    /// Hash of the container's spec, to notice a changed spec.
    pub const SPEC_HASH: &str = "io.nodelet.container.hash";
    /// RFC 3339 time the task was started; set by `Runtime::start`.
    pub const STARTED_AT: &str = "io.nodelet.container.started-at";
}

#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// e.g. unix:///run/containerd/containerd.sock
    pub endpoint: String,
    /// containerd namespace holding all agent objects, e.g. k8s.nodelet
    pub namespace: String,
    /// The agent's root dir (/var/lib/nodelet).
    pub root_dir: PathBuf,
    /// The nodelet binary, started by the shim as `nodelet log-driver`.
    pub log_driver: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// Credentials for one registry, from an imagePullSecret (dockerconfigjson).
#[derive(Clone, Debug, Default)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

/// An image present in containerd, unpacked.
#[derive(Clone, Debug, Default)]
pub struct ImageInfo {
    /// The reference as normalised (e.g. 127.0.0.1:5000/busybox:latest).
    pub reference: String,
    /// `name@sha256:<manifest digest>`, for imageID in container status.
    pub repo_digest: String,
    /// Config digest (sha256:…).
    pub image_id: String,
    pub config: ImageConfig,
}

/// The parts of the OCI image config that shape a container.
#[derive(Clone, Debug, Default)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub stop_signal: Option<String>,
    /// Chain ID of the top layer: the snapshot parent.
    pub chain_id: String,
}

/// One mount in the container's OCI spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub destination: String,
    pub source: String,
    /// "bind", "tmpfs", …
    pub kind: String,
    pub options: Vec<String>,
}

/// A host device node passed into the container (volumeDevices, block PVs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub host_path: PathBuf,
    pub container_path: String,
}

/// Namespaces a container joins: paths of pinned namespaces; None = the host's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespacePaths {
    pub net: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
}

/// Who the process runs as. `uid`/`gid` from securityContext win over the image's user;
/// a named image user is resolved against the image's /etc/passwd and /etc/group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub supplemental_groups: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_shares: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub memory_limit: Option<i64>,
    /// Clamped to >= 0 here (negative values are refused on these hosts).
    pub oom_score_adj: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Security {
    pub privileged: bool,
    pub read_only_rootfs: bool,
    pub no_new_privileges: bool,
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
}

/// Everything needed to create one container.
#[derive(Clone, Debug, Default)]
pub struct ContainerConfig {
    /// containerd container id (also the snapshot key).
    pub id: String,
    pub labels: HashMap<String, String>,
    pub image: ImageInfo,
    /// Final argv after command/args/entrypoint/cmd resolution.
    pub args: Vec<String>,
    /// KEY=VALUE, image env first then the container's.
    pub env: Vec<String>,
    pub cwd: String,
    pub user: User,
    pub hostname: String,
    pub mounts: Vec<Mount>,
    pub devices: Vec<Device>,
    pub namespaces: NamespacePaths,
    pub resources: Resources,
    /// cgroupfs path of the pod, e.g. /nodelet/pod<uid>.
    pub cgroup_parent: String,
    pub security: Security,
    pub sysctls: HashMap<String, String>,
    /// CRI-format log file for this attempt.
    pub log_path: PathBuf,
    pub tty: bool,
}

/// The state of a container's task as containerd reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskState {
    /// Container exists but has no task (never created, or deleted).
    NoTask,
    Created,
    Running {
        pid: u32,
        started_at: SystemTime,
    },
    Exited {
        exit_code: i32,
        started_at: Option<SystemTime>,
        finished_at: SystemTime,
        /// The container's cgroup recorded an OOM kill.
        oom_killed: bool,
    },
}

/// A container the runtime knows, with its checkpoint labels.
#[derive(Clone, Debug)]
pub struct ContainerRecord {
    pub id: String,
    pub labels: HashMap<String, String>,
    pub image: String,
    pub created_at: Option<SystemTime>,
    pub state: TaskState,
}

#[derive(Clone, Debug)]
pub struct ExitEvent {
    pub container_id: String,
    pub exit_code: i32,
    pub exited_at: SystemTime,
}

#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The containerd socket could not be reached.
    #[error("cannot reach containerd at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    /// A containerd call failed.
    #[error("containerd {op} failed: {status}")]
    Grpc {
        op: &'static str,
        status: tonic::Status,
    },
    /// The image does not exist in the registry (or locally under pull policy Never).
    #[error("image {image} not found: {detail}")]
    ImageNotFound { image: String, detail: String },
    /// Pull policy Never and the image is not present.
    #[error("image {image} is not present with pull policy Never")]
    NeverPull { image: String },
    /// The registry refused or failed the pull.
    #[error("pulling {image}: {detail}")]
    Pull { image: String, detail: String },
    /// The image reference could not be parsed.
    #[error("invalid image reference {image:?}: {detail}")]
    InvalidReference { image: String, detail: String },
    /// No container with this id.
    #[error("container {id} not found")]
    NotFound { id: String },
    /// The OCI spec could not be built (bad user, bad mount, …).
    #[error("container {id}: {detail}")]
    Spec { id: String, detail: String },
    /// An exec did not finish within its timeout; the process was killed.
    #[error("exec in {id} timed out after {timeout:?}")]
    ExecTimeout { id: String, timeout: Duration },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl RuntimeError {
    /// The container waiting reason this error maps to (ErrImagePull, CreateContainerError…).
    pub fn reason(&self) -> &'static str {
        match self {
            RuntimeError::ImageNotFound { .. } | RuntimeError::Pull { .. } => "ErrImagePull",
            RuntimeError::NeverPull { .. } => "ErrImageNeverPull",
            RuntimeError::InvalidReference { .. } => "InvalidImageName",
            RuntimeError::Spec { .. } => "CreateContainerConfigError",
            _ => "CreateContainerError",
        }
    }

    pub fn is_not_found(&self) -> bool {
        match self {
            RuntimeError::NotFound { .. } => true,
            RuntimeError::Grpc { status, .. } => status.code() == tonic::Code::NotFound,
            _ => false,
        }
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// A handle to containerd; cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    _todo: (),
}

impl Runtime {
    /// Connects, creates the namespace if missing and starts the exit-event stream.
    pub async fn connect(_config: RuntimeConfig) -> Result<Self> {
        todo!()
    }

    /// "containerd://<version>" for nodeInfo.containerRuntimeVersion.
    pub async fn version(&self) -> Result<String> {
        todo!()
    }

    /// Makes the image present and unpacked per `policy`; concurrent calls for the same image
    /// share one pull.
    pub async fn ensure_image(
        &self,
        _image: &str,
        _policy: PullPolicy,
        _auth: Option<&RegistryAuth>,
    ) -> Result<ImageInfo> {
        todo!()
    }

    /// Creates the container, its rootfs snapshot and its (not yet started) task.
    pub async fn create(&self, _config: &ContainerConfig) -> Result<()> {
        todo!()
    }

    /// Starts the created task; records STARTED_AT in the labels. Returns the pid.
    pub async fn start(&self, _id: &str) -> Result<u32> {
        todo!()
    }

    /// Sends a signal to the task's init process (no error when it already exited).
    pub async fn signal(&self, _id: &str, _signal: i32) -> Result<()> {
        todo!()
    }

    /// Kills any task, then deletes task, container and snapshot. Idempotent.
    pub async fn remove(&self, _id: &str) -> Result<()> {
        todo!()
    }

    pub async fn inspect(&self, _id: &str) -> Result<ContainerRecord> {
        todo!()
    }

    /// Every container in the agent's namespace.
    pub async fn list(&self) -> Result<Vec<ContainerRecord>> {
        todo!()
    }

    /// Runs `args` in the container; past `timeout` the process is killed and ExecTimeout returned.
    pub async fn exec(
        &self,
        _id: &str,
        _args: &[String],
        _timeout: Duration,
    ) -> Result<ExecOutput> {
        todo!()
    }

    /// Task exit events for every container in the namespace.
    pub fn exits(&self) -> broadcast::Receiver<ExitEvent> {
        todo!()
    }
}
