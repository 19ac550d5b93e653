//! The container runtime over containerd. This is the only module that speaks to containerd
//! (containerd-client, tonic). It pulls and unpacks images itself (containerd 1.6 has no
//! server-side pull), creates containers from OCI specs it builds as CRI does, and runs tasks
//! whose stdio goes to the log driver started by the shim, so logs outlive the agent.
//! Every container carries the label checkpoint (see `labels`) that the agent recovers from.
//!
//! Layout: `image` (pull, single-flight), `registry` (the `oci-client` registry client for a
//! pull, docker-style names), `content` (the content store and snapshotter writes), `spec` (the pure OCI spec builder), `user`
//! (image users, devices, the brief read-only rootfs view), `container` (create … remove,
//! inspect, list), `exec`, `eventstream` (the one `/tasks/exit` subscriber) and `logdriver`
//! (the binary side of the `binary://` stdio URI). Every request carries the
//! `containerd-namespace` header; pulls and creates run under a containerd lease (expiring
//! after an hour should the agent die) so GC never collects half-made objects.
//!
//! OWNER: runtime helper. Signatures here are the contract the pod worker codes against.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::namespaces_client::NamespacesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    CreateNamespaceRequest, CreateRequest as LeaseCreateRequest,
    DeleteRequest as LeaseDeleteRequest, Namespace,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::Request;

pub mod attach;
mod container;
mod eventstream;
mod exec;
pub use exec::{ExecControl, ExecStdio, ExecStreams};
mod content;
mod image;
pub mod logdriver;
pub mod registry;
pub mod spec;
mod user;

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
    /// The log driver the shim starts per container (runtime::logdriver::binary_for).
    pub log_driver: PathBuf,
    /// Size-based rotation of container logs, done by the driver; `None`: never rotated.
    pub log_rotation: Option<LogRotation>,
    /// Registry pulls that may run at once (`maxParallelImagePulls`; at least 1).
    pub max_parallel_image_pulls: usize,
}

/// When the log driver rotates a container's log (the kubelet's `containerLogMaxSize` and
/// `containerLogMaxFiles`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRotation {
    /// Bytes the live file may grow to before it is rotated.
    pub max_size: u64,
    /// Files kept, the live one included (the driver keeps at least 2).
    pub max_files: usize,
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

/// Namespaces a container joins: paths of pinned namespaces; None = the host's. The PID
/// namespace is said apart ([`PidNamespace`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespacePaths {
    pub net: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    pub pid: PidNamespace,
}

/// The PID namespace a container runs in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PidNamespace {
    /// A new one of the container's own.
    #[default]
    Own,
    /// The host's (`hostPID`): the spec lists no PID namespace, so the container stays in the
    /// one its runtime runs in, as containerd's CRI does it.
    Host,
    /// Another container's, by path (an ephemeral container's target).
    Join(PathBuf),
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
    /// The OCI runtime refused to run the container's process (a missing binary, a bad working
    /// dir…): CRI's StartContainer failing. Built by [`task_error`] alone.
    #[error("{}", .stage.words(.message))]
    StartFailure {
        /// The containerd call that met the refusal.
        stage: TaskStage,
        /// containerd's message (the shim's, quoting runc).
        message: String,
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
            RuntimeError::StartFailure { .. } => "RunContainerError",
            _ => "CreateContainerError",
        }
    }

    /// The message of a start the OCI runtime refused, as CRI's StartContainer words it
    /// (None for any other error).
    pub fn start_failure(&self) -> Option<String> {
        match self {
            RuntimeError::StartFailure { stage, message } => Some(stage.words(message)),
            _ => None,
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

/// A handle to containerd; cheap to clone. Dropping the last clone stops the exit-event task
/// and nothing else: containers keep running.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    config: RuntimeConfig,
    channel: Channel,
    ns: NamespaceInterceptor,
    exits: broadcast::Sender<ExitEvent>,
    pulls: image::PullGroup,
    cgroup_v2: bool,
    _events: tokio_util::sync::DropGuard,
}

/// Adds `containerd-namespace` to every request.
#[derive(Clone)]
struct NamespaceInterceptor(MetadataValue<Ascii>);

impl Interceptor for NamespaceInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, tonic::Status> {
        req.metadata_mut().insert(NAMESPACE_HEADER, self.0.clone());
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, NamespaceInterceptor>;

const NAMESPACE_HEADER: &str = "containerd-namespace";
const LEASE_HEADER: &str = "containerd-lease";
/// The snapshotter every image and container uses.
pub const SNAPSHOTTER: &str = "overlayfs";
/// The shim every task runs under.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

/// Wraps a message in a request carrying the lease id.
fn leased<T>(message: T, lease: &str) -> Request<T> {
    let mut req = Request::new(message);
    if let Ok(v) = lease.parse() {
        req.metadata_mut().insert(LEASE_HEADER, v);
    }
    req
}

/// Maps a gRPC status of operation `op` to a RuntimeError.
fn grpc(op: &'static str) -> impl FnOnce(tonic::Status) -> RuntimeError {
    move |status| RuntimeError::Grpc { op, status }
}

/// The containerd call that brings a container's task up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskStage {
    /// tasks.Create: the shim runs `runc create`, which execs nothing yet but fails on a
    /// missing binary or working dir.
    Create,
    /// tasks.Start.
    Start,
}

impl TaskStage {
    fn op(self) -> &'static str {
        match self {
            TaskStage::Create => "tasks.Create",
            TaskStage::Start => "tasks.Start",
        }
    }

    /// containerd's message of a refusal at this stage as CRI's StartContainer words it.
    fn words(self, message: &str) -> String {
        match self {
            TaskStage::Create => format!("failed to create containerd task: {message}"),
            TaskStage::Start => message.to_string(),
        }
    }
}

/// The typed error of a failed task create or start. containerd 1.6 says that the OCI
/// runtime refused the process only in its message (code Unknown, "… OCI runtime create
/// failed: …"), so that text is read here, once; everything else (containerd unreachable, a
/// missing container) stays a gRPC error of the call.
fn task_error(stage: TaskStage, status: tonic::Status) -> RuntimeError {
    if status.message().contains("OCI runtime") {
        RuntimeError::StartFailure {
            stage,
            message: status.message().to_string(),
        }
    } else {
        RuntimeError::Grpc {
            op: stage.op(),
            status,
        }
    }
}

/// prost timestamp to SystemTime (the epoch when absent or out of range).
fn to_system_time(ts: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    ts.and_then(|t| SystemTime::try_from(t).ok())
        .filter(|t| *t > SystemTime::UNIX_EPOCH)
}

impl Runtime {
    /// Connects, creates the namespace if missing and starts the exit-event stream.
    pub async fn connect(config: RuntimeConfig) -> Result<Self> {
        let path = config
            .endpoint
            .strip_prefix("unix://")
            .unwrap_or(&config.endpoint)
            .to_string();
        let channel =
            containerd_client::connect(&path)
                .await
                .map_err(|source| RuntimeError::Connect {
                    endpoint: config.endpoint.clone(),
                    source,
                })?;
        let ns_value: MetadataValue<Ascii> =
            config.namespace.parse().map_err(|_| RuntimeError::Spec {
                id: config.namespace.clone(),
                detail: "namespace is not a valid header value".into(),
            })?;
        let ns = NamespaceInterceptor(ns_value);
        let mut namespaces = NamespacesClient::with_interceptor(channel.clone(), ns.clone());
        let create = namespaces
            .create(CreateNamespaceRequest {
                namespace: Some(Namespace {
                    name: config.namespace.clone(),
                    labels: HashMap::new(),
                }),
            })
            .await;
        match create {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(status) => {
                return Err(RuntimeError::Grpc {
                    op: "namespaces.Create",
                    status,
                })
            }
        }
        let (exits, _) = broadcast::channel(1024);
        let token = CancellationToken::new();
        tokio::spawn(eventstream::exit_events(
            channel.clone(),
            config.namespace.clone(),
            exits.clone(),
            token.clone(),
        ));
        Ok(Runtime {
            inner: Arc::new(Inner {
                cgroup_v2: cgroup_v2(),
                pulls: image::PullGroup::new(config.max_parallel_image_pulls),
                config,
                channel,
                ns,
                exits,
                _events: token.drop_guard(),
            }),
        })
    }

    /// "containerd://<version>" for nodeInfo.containerRuntimeVersion (distribution suffixes
    /// such as Debian's `~ds1` are dropped).
    pub async fn version(&self) -> Result<String> {
        let v = VersionClient::with_interceptor(self.inner.channel.clone(), self.inner.ns.clone())
            .version(())
            .await
            .map_err(grpc("version"))?
            .into_inner();
        let version = v.version.split(['~', '+']).next().unwrap_or_default();
        Ok(format!("containerd://{version}"))
    }

    /// Task exit events of init processes for every container in the namespace. Events that
    /// happen while the stream to containerd is re-established are missed: callers relist.
    pub fn exits(&self) -> broadcast::Receiver<ExitEvent> {
        self.inner.exits.subscribe()
    }

    /// The configuration this runtime was connected with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    fn containers(&self) -> ContainersClient<Svc> {
        ContainersClient::with_interceptor(self.inner.channel.clone(), self.inner.ns.clone())
    }

    fn tasks(&self) -> TasksClient<Svc> {
        TasksClient::with_interceptor(self.inner.channel.clone(), self.inner.ns.clone())
    }

    fn content(&self) -> ContentClient<Svc> {
        ContentClient::with_interceptor(self.inner.channel.clone(), self.inner.ns.clone())
            .max_decoding_message_size(64 << 20)
    }

    fn images(&self) -> ImagesClient<Svc> {
        ImagesClient::with_interceptor(self.inner.channel.clone(), self.inner.ns.clone())
    }

    fn snapshots(&self) -> SnapshotsClient<Svc> {
        SnapshotsClient::with_interceptor(self.inner.channel.clone(), self.inner.ns.clone())
    }

    fn diff(&self) -> DiffClient<Svc> {
        DiffClient::with_interceptor(self.inner.channel.clone(), self.inner.ns.clone())
    }

    fn leases(&self) -> LeasesClient<Svc> {
        LeasesClient::with_interceptor(self.inner.channel.clone(), self.inner.ns.clone())
    }

    /// Creates a lease that expires on its own after an hour, should the agent die before
    /// deleting it.
    async fn create_lease(&self, purpose: &str) -> Result<String> {
        let expire = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_hours(1))
            .unwrap_or_else(|_| jiff::Timestamp::now());
        let id = format!("nodelet-{purpose}-{:016x}", rand::random::<u64>());
        let labels = HashMap::from([(
            "containerd.io/gc.expire".to_string(),
            expire.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        )]);
        self.leases()
            .create(LeaseCreateRequest {
                id: id.clone(),
                labels,
            })
            .await
            .map_err(grpc("leases.Create"))?;
        Ok(id)
    }

    /// Deletes a lease; what it held stays only if something else references it.
    async fn delete_lease(&self, id: &str) {
        let res = self
            .leases()
            .delete(LeaseDeleteRequest {
                id: id.to_string(),
                sync: false,
            })
            .await;
        if let Err(status) = res {
            if status.code() != tonic::Code::NotFound {
                tracing::warn!(lease = id, %status, "deleting lease failed");
            }
        }
    }
}

/// Whether the host runs the unified cgroup v2 hierarchy at /sys/fs/cgroup.
fn cgroup_v2() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_of_the_oci_runtime_is_a_run_container_error() {
        let refusal =
            "failed to create shim task: OCI runtime create failed: exec: \"/x\": not found";
        let refused = task_error(TaskStage::Create, tonic::Status::unknown(refusal));
        assert_eq!(refused.reason(), "RunContainerError");
        assert_eq!(
            refused.start_failure().as_deref(),
            Some(format!("failed to create containerd task: {refusal}").as_str())
        );
        assert_eq!(refused.to_string(), refused.start_failure().unwrap());
        let at_start = task_error(TaskStage::Start, tonic::Status::unknown(refusal));
        assert_eq!(at_start.start_failure().as_deref(), Some(refusal));
        let down = tonic::Status::unavailable("error trying to connect: connection refused");
        let down = task_error(TaskStage::Create, down);
        assert_eq!(down.reason(), "CreateContainerError");
        assert_eq!(down.start_failure(), None);
        let other = grpc("containers.Create")(tonic::Status::unknown("OCI runtime create failed"));
        assert_eq!(other.reason(), "CreateContainerError");
    }
}
