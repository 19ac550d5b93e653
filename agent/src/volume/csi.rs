//! CSI on the node: plugin discovery through the kubelet plugin registration API (sockets in
//! `<root>/plugins_registry`, GetInfo, NotifyRegistrationStatus, a driver → endpoint map) and
//! the Node service calls (NodeStage once per volume per node at the global staging path,
//! NodePublish per pod, and the reverse on teardown). Raw block volumes (volumeMode Block) are
//! staged with the Block access type at a staging dir of their own and published to a per-pod
//! target file (`<pod>/volumeDevices/kubernetes.io~csi/<pv>`) that becomes the container's
//! device; since a driver need not mount anything to stage a block volume, the agent records
//! the staging in a marker file beside the staging dir.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{CSIPersistentVolumeSource, CSIVolumeSource};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{mount, ReadyVolume};

/// Generated CSI v1 messages and services (Identity, Node).
#[allow(clippy::all)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

/// Generated kubelet plugin registration API v1.
#[allow(clippy::all)]
pub mod registration {
    tonic::include_proto!("pluginregistration");
}

use proto::node_client::NodeClient;
use proto::volume_capability::access_mode::Mode;
use proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use proto::VolumeCapability;

/// The plugin type a CSI driver registers as.
pub const CSI_PLUGIN_TYPE: &str = "CSIPlugin";
/// How long one CSI call may take before the operation fails (and is retried by the worker).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What went wrong talking to a CSI plugin, keeping a failed call's gRPC code so that whether
/// the operation surely ended ([`CsiError::is_final`]) is read from the code, never the text.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// No registered driver has this name.
    #[error("CSI driver {driver:?} is not registered")]
    NotRegistered { driver: String },
    /// The plugin's socket did not answer.
    #[error("connecting to {}: {source}", .socket.display())]
    Connect {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    /// A call answered with an error status.
    #[error("{call}: {} {}", .status.code(), .status.message())]
    Call {
        call: &'static str,
        status: tonic::Status,
    },
    /// A call did not answer within [`CALL_TIMEOUT`].
    #[error("{call}: timed out after {CALL_TIMEOUT:?}")]
    Timeout { call: &'static str },
    /// A call answered something the agent cannot use.
    #[error("{call}: {detail}")]
    Answer { call: &'static str, detail: String },
    /// The agent's own work around the calls: the staging and target dirs, the block staging
    /// marker, the mount table.
    #[error("{what}: {source}")]
    Local {
        what: String,
        source: std::io::Error,
    },
    /// NodeUnstageVolume answered OK, yet the staging path is still mounted.
    #[error("{} is still mounted after NodeUnstageVolume", .0.display())]
    StillMounted(PathBuf),
}

impl CsiError {
    /// The gRPC code a call failed with (a timeout is DeadlineExceeded, as a call's deadline
    /// passing is for the kubelet's CSI client); None when no call answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CsiError::Call { status, .. } => Some(status.code()),
            CsiError::Timeout { .. } => Some(tonic::Code::DeadlineExceeded),
            _ => None,
        }
    }

    /// Whether the operation surely ended, so nothing of it can still be under way in the
    /// driver: the kubelet CSI client's `isFinalError`. A call that failed with any code but
    /// Canceled, DeadlineExceeded, Unavailable, ResourceExhausted or Aborted (the driver may
    /// still be working on it) is final; an error before any call answered is not (a previous
    /// operation may be under way).
    pub fn is_final(&self) -> bool {
        use tonic::Code;
        !matches!(
            self.code(),
            None | Some(
                Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::Unavailable
                    | Code::ResourceExhausted
                    | Code::Aborted
            )
        )
    }
}

/// An I/O error of the agent's own work on `path`.
fn local(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> CsiError {
    let what = format!("{what} {}", path.display());
    move |source| CsiError::Local { what, source }
}

/// Whether `path` is a mount point (the mount table could not be read: an error).
fn is_mounted(path: &Path) -> Result<bool, CsiError> {
    mount::is_mounted(path).map_err(local("reading the mount table for", path))
}

/// After a NodeStage or NodePublish that surely ended in failure, the dir the driver was to
/// mount at goes if it is empty and not mounted (the kubelet's `removeMountDir`); after one
/// that may still be under way it stays, and teardown asks the driver to undo it.
fn remove_failed_dir(dir: &Path, error: &CsiError) {
    if error.is_final() && !is_mounted(dir).unwrap_or(true) {
        let _ = std::fs::remove_dir(dir);
    }
}

/// What a pod's CSI volume was published with; persisted so teardown needs no spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsiRecord {
    pub driver: String,
    pub volume_handle: String,
    /// `<pod>/volumes/kubernetes.io~csi/<volume>/mount`.
    pub target_path: PathBuf,
    /// The node-global staging path (PV volumes; None for inline ephemeral volumes).
    pub staging_path: Option<PathBuf>,
    pub read_only: bool,
    pub fs_type: String,
    /// Kubernetes access modes of the claim.
    pub access_modes: Vec<String>,
    /// A raw block volume (volumeMode Block): the target is a file that becomes a device.
    #[serde(default)]
    pub block: bool,
    /// The PV's mountOptions, passed as the mount capability's mount_flags.
    #[serde(default)]
    pub mount_flags: Vec<String>,
}

/// The secrets a driver gets with NodeStage and NodePublish (from the PV's
/// nodeStageSecretRef/nodePublishSecretRef, or an inline volume's nodePublishSecretRef). Never
/// persisted and never printed.
#[derive(Clone, Default)]
pub struct CsiSecrets {
    pub stage: std::collections::HashMap<String, String>,
    pub publish: std::collections::HashMap<String, String>,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn target_path(root: &Path, uid: &str, volume: &str) -> PathBuf {
    crate::layout::pod_dir(root, uid)
        .join("volumes")
        .join(super::plugin::CSI)
        .join(volume)
        .join("mount")
}

/// The staging path of a PV's volume handle (one per volume per node).
pub fn staging_path(root: &Path, driver: &str, handle: &str) -> PathBuf {
    root.join("plugins/kubernetes.io/csi")
        .join(driver)
        .join(sha256_hex(handle))
        .join("globalmount")
}

/// The staging dir of a raw block volume's handle (one per volume per node).
pub fn block_staging_path(root: &Path, driver: &str, handle: &str) -> PathBuf {
    root.join("plugins/kubernetes.io/csi/volumeDevices")
        .join(driver)
        .join(sha256_hex(handle))
        .join("staging")
}

/// The per-pod publish target of a raw block volume: a file the driver puts the device on.
pub fn block_target_path(root: &Path, uid: &str, pv: &str) -> PathBuf {
    crate::layout::pod_dir(root, uid)
        .join(super::VOLUME_DEVICES)
        .join(super::plugin::CSI)
        .join(pv)
}

/// The agent's record that a block volume is staged (drivers mount nothing for those).
fn staged_marker(staging: &Path) -> PathBuf {
    staging.with_file_name("staged")
}

/// Whether the volume is staged at `staging`: mounted there, or for a block volume, marked.
fn is_staged(rec: &CsiRecord, staging: &Path) -> Result<bool, CsiError> {
    if rec.block {
        Ok(staged_marker(staging).exists())
    } else {
        is_mounted(staging)
    }
}

/// The record of an inline (ephemeral) CSI volume: published without staging, with a handle
/// derived from the pod UID and volume name as upstream does.
pub fn inline_record(root: &Path, uid: &str, volume: &str, src: &CSIVolumeSource) -> CsiRecord {
    CsiRecord {
        driver: src.driver.clone(),
        volume_handle: format!("csi-{}", sha256_hex(&format!("{uid}{volume}"))),
        target_path: target_path(root, uid, volume),
        staging_path: None,
        read_only: src.read_only.unwrap_or(false),
        fs_type: src.fs_type.clone().unwrap_or_default(),
        access_modes: Vec::new(),
        block: false,
        mount_flags: Vec::new(),
    }
}

/// The record of a CSI PV (`block`: its volumeMode is Block).
pub fn pv_record(
    root: &Path,
    uid: &str,
    pv: &str,
    src: &CSIPersistentVolumeSource,
    read_only: bool,
    access_modes: &[String],
    block: bool,
) -> CsiRecord {
    let (driver, handle) = (&src.driver, &src.volume_handle);
    let (target_path, staging) = if block {
        (
            block_target_path(root, uid, pv),
            block_staging_path(root, driver, handle),
        )
    } else {
        (
            target_path(root, uid, pv),
            staging_path(root, driver, handle),
        )
    };
    CsiRecord {
        driver: driver.clone(),
        volume_handle: handle.clone(),
        target_path,
        staging_path: Some(staging),
        read_only,
        fs_type: src.fs_type.clone().unwrap_or_default(),
        access_modes: access_modes.to_vec(),
        block,
        mount_flags: Vec::new(),
    }
}

/// The volume context sent to the driver: the volume's attributes plus the pod info keys the
/// kubelet adds for drivers with podInfoOnMount (standalone mode has no CSIDriver objects to
/// ask, so they are always sent) and whether the volume is an inline ephemeral one.
pub fn pod_context(
    pod: &k8s_openapi::api::core::v1::Pod,
    ephemeral: bool,
    attributes: Option<BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let mut context = attributes.unwrap_or_default();
    let meta = &pod.metadata;
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    for (k, v) in [
        (
            "csi.storage.k8s.io/pod.name",
            meta.name.clone().unwrap_or_default(),
        ),
        (
            "csi.storage.k8s.io/pod.namespace",
            meta.namespace.clone().unwrap_or_default(),
        ),
        (
            "csi.storage.k8s.io/pod.uid",
            meta.uid.clone().unwrap_or_default(),
        ),
        ("csi.storage.k8s.io/serviceAccount.name", sa),
        ("csi.storage.k8s.io/ephemeral", ephemeral.to_string()),
    ] {
        context.insert(k.to_string(), v);
    }
    context
}

/// The CSI access mode for Kubernetes access modes, as upstream maps them; `multi_writer` is
/// the driver's SINGLE_NODE_MULTI_WRITER capability.
fn access_mode(modes: &[String], multi_writer: bool) -> Mode {
    let has = |m: &str| modes.iter().any(|x| x == m);
    if has("ReadWriteMany") {
        Mode::MultiNodeMultiWriter
    } else if has("ReadOnlyMany") && !has("ReadWriteOnce") && !has("ReadWriteOncePod") {
        Mode::MultiNodeReaderOnly
    } else if has("ReadWriteOncePod") && multi_writer {
        Mode::SingleNodeSingleWriter
    } else if multi_writer {
        Mode::SingleNodeMultiWriter
    } else {
        Mode::SingleNodeWriter
    }
}

/// Connects a gRPC channel to a unix socket.
pub async fn connect(socket: &Path) -> Result<Channel, CsiError> {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://[::1]:1")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| CsiError::Connect {
            socket: socket.to_path_buf(),
            source,
        })
}

async fn timed<T>(
    call: &'static str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CsiError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(CsiError::Call { call, status }),
        Err(_) => Err(CsiError::Timeout { call }),
    }
}

/// A registered driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Driver {
    pub name: String,
    /// The CSI socket.
    pub endpoint: PathBuf,
    /// The registration socket it came from.
    pub registration: PathBuf,
    pub versions: Vec<String>,
    /// NodeGetInfo's answer, asked at registration (what the CSINode object records).
    pub node: NodeInfo,
}

/// What a driver says of this node (NodeGetInfo).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The driver's id of this node.
    pub node_id: String,
    /// The most volumes of this driver the node can take; 0 when the driver sets no limit.
    pub max_volumes: i64,
    /// The keys of the driver's accessible topology segments, sorted.
    pub topology_keys: Vec<String>,
}

/// The drivers registered on this node, as watchers see them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registered {
    /// A first full pass over the registration dir is done: `drivers` is the whole set (before
    /// it, an empty set means only "not looked yet").
    pub listed: bool,
    pub drivers: BTreeMap<String, Driver>,
}

/// A socket file's identity: inode and change time (seconds, nanoseconds).
type SocketId = (u64, i64, i64);

/// The CSI drivers known on this node, discovered from the registration dir.
pub struct Plugins {
    registry: PathBuf,
    /// The registered drivers; every change (a driver registered or gone) wakes subscribers.
    registered: tokio::sync::watch::Sender<Registered>,
    /// Registration sockets already handled (registered or refused), with their identity: a
    /// socket made anew (a restarted plugin) is a new registration.
    seen: Mutex<BTreeMap<PathBuf, SocketId>>,
    /// Serialises discovery passes.
    discovering: tokio::sync::Mutex<()>,
}

impl Plugins {
    pub fn new(registry: PathBuf) -> Self {
        Self {
            registry,
            registered: tokio::sync::watch::Sender::new(Registered::default()),
            seen: Mutex::new(BTreeMap::new()),
            discovering: tokio::sync::Mutex::new(()),
        }
    }

    /// The registered drivers, now and on every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Registered> {
        self.registered.subscribe()
    }

    /// The drivers registered now.
    pub fn drivers(&self) -> Vec<Driver> {
        self.registered.borrow().drivers.values().cloned().collect()
    }

    /// One pass over the registration dir: new sockets (or sockets made anew) are asked
    /// GetInfo (and the driver NodeGetInfo) and told the outcome; drivers whose registration
    /// socket is gone are dropped.
    pub async fn discover(&self) {
        use std::os::unix::fs::MetadataExt;
        let _pass = self.discovering.lock().await;
        let mut sockets = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&self.registry) {
            for entry in entries.flatten() {
                if let Ok(meta) = entry.metadata() {
                    if meta.file_type().is_socket() {
                        // A new file may get the inode number of the one it replaces; its
                        // change time tells them apart.
                        let id = (meta.ino(), meta.ctime(), meta.ctime_nsec());
                        sockets.insert(entry.path(), id);
                    }
                }
            }
        }
        self.seen
            .lock()
            .expect("seen lock")
            .retain(|s, id| sockets.get(s) == Some(id));
        self.registered.send_if_modified(|r| {
            let before = r.drivers.len();
            r.drivers.retain(|name, d| {
                let kept = sockets.contains_key(&d.registration);
                if !kept {
                    tracing::info!(driver = %name, "CSI driver gone (its registration socket was removed)");
                }
                kept
            });
            r.drivers.len() != before
        });
        for (socket, id) in sockets {
            if self.seen.lock().expect("seen lock").contains_key(&socket) {
                continue;
            }
            match register(&socket).await {
                Ok(Some(driver)) => {
                    tracing::info!(driver = %driver.name, endpoint = %driver.endpoint.display(), node_id = %driver.node.node_id, "CSI driver registered");
                    self.seen
                        .lock()
                        .expect("seen lock")
                        .insert(socket.clone(), id);
                    self.registered.send_modify(|r| {
                        // What this socket registered before gives way to what it says now.
                        r.drivers.retain(|_, d| d.registration != socket);
                        r.drivers.insert(driver.name.clone(), driver);
                    });
                }
                Ok(None) => {
                    self.seen.lock().expect("seen lock").insert(socket, id);
                }
                // Not answering yet (still starting): try again on the next pass.
                Err(e) => {
                    tracing::debug!(socket = %socket.display(), error = %e, "plugin registration")
                }
            }
        }
        self.registered
            .send_if_modified(|r| !std::mem::replace(&mut r.listed, true));
    }

    /// Watches the registration dir until cancelled.
    pub async fn watch(&self, cancel: CancellationToken) {
        loop {
            self.discover().await;
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// The endpoint of `driver`, discovering once more when it is not known yet.
    pub async fn endpoint(&self, driver: &str) -> Option<PathBuf> {
        let known = |p: &Self| {
            p.registered
                .borrow()
                .drivers
                .get(driver)
                .map(|d| d.endpoint.clone())
        };
        if let Some(endpoint) = known(self) {
            return Some(endpoint);
        }
        self.discover().await;
        known(self)
    }

    async fn client(&self, driver: &str) -> Result<NodeClient<Channel>, CsiError> {
        let endpoint = self
            .endpoint(driver)
            .await
            .ok_or_else(|| CsiError::NotRegistered {
                driver: driver.to_string(),
            })?;
        Ok(NodeClient::new(connect(&endpoint).await?))
    }

    /// NodeStage (when the driver stages and the staging path is not mounted yet) and
    /// NodePublish, unless the target is mounted already: a published volume found in the
    /// mount table (after an agent restart) is re-adopted without a call, so a pod keeps its
    /// volume while its driver is not back yet.
    pub async fn setup(
        &self,
        rec: &CsiRecord,
        context: BTreeMap<String, String>,
        secrets: &CsiSecrets,
    ) -> Result<ReadyVolume, CsiError> {
        let ready = ReadyVolume {
            host_path: rec.target_path.clone(),
            read_only: rec.read_only,
            block: rec.block,
        };
        if is_mounted(&rec.target_path)? {
            return Ok(ready);
        }
        let mut client = self.client(&rec.driver).await?;
        let caps = timed(
            "NodeGetCapabilities",
            client.node_get_capabilities(proto::NodeGetCapabilitiesRequest {}),
        )
        .await?;
        let has = |t: proto::node_service_capability::rpc::Type| {
            caps.capabilities.iter().any(|c| {
                matches!(&c.r#type, Some(proto::node_service_capability::Type::Rpc(r)) if r.r#type == t as i32)
            })
        };
        use proto::node_service_capability::rpc::Type as Cap;
        let capability = VolumeCapability {
            access_mode: Some(AccessMode {
                mode: access_mode(&rec.access_modes, has(Cap::SingleNodeMultiWriter)) as i32,
            }),
            access_type: Some(if rec.block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: rec.fs_type.clone(),
                    mount_flags: rec.mount_flags.clone(),
                    volume_mount_group: String::new(),
                })
            }),
        };
        let context: std::collections::HashMap<String, String> = context.into_iter().collect();
        let staging = match &rec.staging_path {
            Some(p) if has(Cap::StageUnstageVolume) => Some(p.clone()),
            _ => None,
        };
        if let Some(staging) = &staging {
            std::fs::create_dir_all(staging).map_err(local("mkdir", staging))?;
            if !is_staged(rec, staging)? {
                let staged = timed(
                    "NodeStageVolume",
                    client.node_stage_volume(proto::NodeStageVolumeRequest {
                        volume_id: rec.volume_handle.clone(),
                        publish_context: Default::default(),
                        staging_target_path: staging.display().to_string(),
                        volume_capability: Some(capability.clone()),
                        secrets: secrets.stage.clone(),
                        volume_context: context.clone(),
                    }),
                )
                .await;
                if let Err(e) = &staged {
                    remove_failed_dir(staging, e);
                }
                staged?;
                if rec.block {
                    let marker = staged_marker(staging);
                    std::fs::write(&marker, rec.volume_handle.as_bytes())
                        .map_err(local("writing", &marker))?;
                }
            }
        }
        if let Some(parent) = rec.target_path.parent() {
            std::fs::create_dir_all(parent).map_err(local("mkdir", parent))?;
        }
        let published = timed(
            "NodePublishVolume",
            client.node_publish_volume(proto::NodePublishVolumeRequest {
                volume_id: rec.volume_handle.clone(),
                publish_context: Default::default(),
                staging_target_path: staging
                    .as_ref()
                    .map(|s| s.display().to_string())
                    .unwrap_or_default(),
                target_path: rec.target_path.display().to_string(),
                volume_capability: Some(capability),
                readonly: rec.read_only,
                secrets: secrets.publish.clone(),
                volume_context: context,
            }),
        )
        .await;
        if let (Err(e), false) = (&published, rec.block) {
            remove_failed_dir(&rec.target_path, e);
        }
        published?;
        Ok(ready)
    }

    /// NodeUnpublish of the pod's target (skipped when nothing is there).
    pub async fn unpublish(&self, rec: &CsiRecord) -> Result<(), CsiError> {
        if !rec.target_path.exists() {
            return Ok(());
        }
        let mounted = is_mounted(&rec.target_path)?;
        let mut client = match self.client(&rec.driver).await {
            Ok(c) => c,
            // Nothing was published (setup failed before): nothing for the driver to undo.
            Err(_) if !mounted => return Ok(()),
            Err(e) => return Err(e),
        };
        timed(
            "NodeUnpublishVolume",
            client.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                volume_id: rec.volume_handle.clone(),
                target_path: rec.target_path.display().to_string(),
            }),
        )
        .await?;
        Ok(())
    }

    /// NodeUnstage of the staging path (call only when no other pod uses it) and removal of
    /// the staging dirs.
    pub async fn unstage(&self, rec: &CsiRecord) -> Result<(), CsiError> {
        let Some(staging) = &rec.staging_path else {
            return Ok(());
        };
        if !staging.exists() {
            return Ok(());
        }
        let staged = is_staged(rec, staging)?;
        match self.client(&rec.driver).await {
            Ok(mut client) => {
                timed(
                    "NodeUnstageVolume",
                    client.node_unstage_volume(proto::NodeUnstageVolumeRequest {
                        volume_id: rec.volume_handle.clone(),
                        staging_target_path: staging.display().to_string(),
                    }),
                )
                .await?;
            }
            Err(_) if !staged => {}
            Err(e) => return Err(e),
        }
        if rec.block {
            let marker = staged_marker(staging);
            if let Err(e) = std::fs::remove_file(&marker) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(local("removing", &marker)(e));
                }
            }
        }
        if is_mounted(staging)? {
            return Err(CsiError::StillMounted(staging.clone()));
        }
        let _ = std::fs::remove_dir(staging);
        if let Some(parent) = staging.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        Ok(())
    }
}

/// Asks one registration socket for its plugin info, the driver for its node info, and tells
/// the plugin the outcome. Ok(None) for a plugin that is not a usable CSI driver (it is told
/// why); Err when either does not answer (it is told too, and asked again on a later pass).
async fn register(socket: &Path) -> Result<Option<Driver>, CsiError> {
    use registration::registration_client::RegistrationClient;
    let mut client = RegistrationClient::new(connect(socket).await?);
    let info = timed("GetInfo", client.get_info(registration::InfoRequest {})).await?;
    let refusal = if info.r#type != CSI_PLUGIN_TYPE {
        Some(format!("plugin type {:?} is not supported", info.r#type))
    } else if info.name.is_empty() {
        Some("plugin has no name".to_string())
    } else if !info
        .supported_versions
        .iter()
        .any(|v| v.trim_start_matches('v').starts_with("1."))
    {
        Some(format!(
            "no supported CSI version in {:?}",
            info.supported_versions
        ))
    } else {
        None
    };
    if let Some(reason) = refusal {
        notify(&mut client, Some(reason.clone())).await?;
        tracing::warn!(socket = %socket.display(), %reason, "plugin registration refused");
        return Ok(None);
    }
    let endpoint = if info.endpoint.is_empty() {
        socket.to_path_buf()
    } else {
        PathBuf::from(info.endpoint.trim_start_matches("unix://"))
    };
    let node = match node_info(&endpoint).await {
        Ok(node) => node,
        Err(e) => {
            notify(&mut client, Some(e.to_string())).await?;
            return Err(e);
        }
    };
    notify(&mut client, None).await?;
    Ok(Some(Driver {
        name: info.name,
        endpoint,
        registration: socket.to_path_buf(),
        versions: info.supported_versions,
        node,
    }))
}

/// Tells a plugin whether it is registered (`error` None) or why not.
async fn notify(
    client: &mut registration::registration_client::RegistrationClient<Channel>,
    error: Option<String>,
) -> Result<(), CsiError> {
    let status = registration::RegistrationStatus {
        plugin_registered: error.is_none(),
        error: error.unwrap_or_default(),
    };
    timed(
        "NotifyRegistrationStatus",
        client.notify_registration_status(status),
    )
    .await
    .map(drop)
}

/// NodeGetInfo of the driver at `endpoint`.
async fn node_info(endpoint: &Path) -> Result<NodeInfo, CsiError> {
    let mut client = NodeClient::new(connect(endpoint).await?);
    let info = timed(
        "NodeGetInfo",
        client.node_get_info(proto::NodeGetInfoRequest {}),
    )
    .await?;
    if info.node_id.is_empty() {
        return Err(CsiError::Answer {
            call: "NodeGetInfo",
            detail: "the driver returned no node_id".into(),
        });
    }
    let mut topology_keys: Vec<String> = info
        .accessible_topology
        .map(|t| t.segments.into_keys().collect())
        .unwrap_or_default();
    topology_keys.sort();
    Ok(NodeInfo {
        node_id: info.node_id,
        max_volumes: info.max_volumes_per_node.max(0),
        topology_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_modes_map_as_upstream() {
        let m =
            |v: &[&str], mw| access_mode(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), mw);
        assert_eq!(m(&["ReadWriteOnce"], false), Mode::SingleNodeWriter);
        assert_eq!(m(&["ReadWriteOnce"], true), Mode::SingleNodeMultiWriter);
        assert_eq!(m(&["ReadWriteOncePod"], true), Mode::SingleNodeSingleWriter);
        assert_eq!(m(&["ReadWriteOncePod"], false), Mode::SingleNodeWriter);
        assert_eq!(m(&["ReadOnlyMany"], false), Mode::MultiNodeReaderOnly);
        assert_eq!(m(&["ReadWriteMany"], false), Mode::MultiNodeMultiWriter);
    }

    #[test]
    fn block_volumes_stage_and_publish_apart_from_filesystem_ones() {
        let src = CSIPersistentVolumeSource {
            driver: "loop.csi".into(),
            volume_handle: "vol-1".into(),
            ..Default::default()
        };
        let root = Path::new("/r");
        let fs = pv_record(root, "u1", "pv1", &src, false, &[], false);
        let block = pv_record(root, "u1", "pv1", &src, false, &[], true);
        assert!(!fs.block && block.block);
        assert_eq!(
            block.target_path,
            Path::new("/r/pods/u1/volumeDevices/kubernetes.io~csi/pv1")
        );
        assert_eq!(
            fs.target_path,
            Path::new("/r/pods/u1/volumes/kubernetes.io~csi/pv1/mount")
        );
        let staging = block.staging_path.unwrap();
        assert_ne!(Some(&staging), fs.staging_path.as_ref());
        assert!(staging.starts_with("/r/plugins/kubernetes.io/csi/volumeDevices/loop.csi"));
        assert_eq!(
            staged_marker(&staging).parent(),
            staging.parent(),
            "the marker sits beside the staging dir, not in the driver's"
        );
    }

    #[test]
    fn only_a_call_that_surely_ended_is_final_as_for_the_kubelet() {
        use tonic::{Code, Status};
        let call = |code| CsiError::Call {
            call: "NodePublishVolume",
            status: Status::new(code, "x"),
        };
        for code in [
            Code::Unknown,
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::Unauthenticated,
            Code::Internal,
        ] {
            assert!(call(code).is_final(), "{code:?}");
            assert_eq!(call(code).code(), Some(code));
        }
        for code in [
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::Aborted,
        ] {
            assert!(!call(code).is_final(), "{code:?}");
        }
        let timeout = CsiError::Timeout {
            call: "NodeStageVolume",
        };
        assert_eq!(timeout.code(), Some(Code::DeadlineExceeded));
        assert!(!timeout.is_final());
        let before = CsiError::NotRegistered { driver: "d".into() };
        assert!(!before.is_final(), "no call answered: maybe under way");
        assert_eq!(
            call(Code::Unauthenticated).to_string(),
            format!("NodePublishVolume: {} x", Code::Unauthenticated),
            "the message the worker's event and log show"
        );
    }

    #[test]
    fn staging_path_is_per_handle() {
        let p = staging_path(Path::new("/r"), "loop.csi", "vol-1");
        assert!(p.starts_with("/r/plugins/kubernetes.io/csi/loop.csi"));
        assert!(p.ends_with("globalmount"));
        assert_eq!(p.parent().unwrap().file_name().unwrap().len(), 64);
    }
}
