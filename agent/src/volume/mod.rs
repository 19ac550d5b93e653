//! The volume manager: for each pod, the desired volumes (from its spec) against the mounted
//! ones (on disk and in the mount table), and the code that brings one to the other. Handles
//! emptyDir, hostPath, configMap, secret, downwardAPI, projected (incl. serviceAccountToken),
//! persistentVolumeClaim → PV (hostPath, local dir or block device, CSI) and inline CSI.
//!
//! Layout (the kubelet's): `<root>/pods/<uid>/volumes/<plugin>/<volume>` with plugin dirs such
//! as `kubernetes.io~empty-dir`; PV-backed volumes are named by the PV; CSI volumes publish to
//! `kubernetes.io~csi/<volume>/mount` and stage once per node under
//! `<root>/plugins/kubernetes.io/csi/<driver>/<sha256(handle)>/globalmount`; CSI raw block
//! volumes publish to the file `<root>/pods/<uid>/volumeDevices/kubernetes.io~csi/<pv>` and
//! stage under `<root>/plugins/kubernetes.io/csi/volumeDevices/<driver>/<sha256(handle)>`.
//! subPath binds live under `<root>/pods/<uid>/volume-subpaths/<volume>/<container>/<index>`.
//!
//! What the manager did for a pod (claims it uses, CSI publications) is recorded in
//! `<root>/pods/<uid>/volumes/.state.json` before each mount, so teardown needs only the UID and
//! works after an agent restart; setup is idempotent and re-adopts mounts it finds in place.
//!
//! OWNER: volumes helper. Signatures here are the contract the pod worker codes against.

pub mod atomic;
mod claim;
pub mod csi;
pub mod downward;
mod host;
mod mount;
mod projection;
mod subpath;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use self::atomic::Payload;
use self::downward::NodeAllocatable;
use self::host::ChangePolicy;
use self::projection::{KeySource, DEFAULT_MODE};
use crate::runtime::{Device, Mount};
use crate::store::ObjectStore;

/// Plugin directory names under `<pod>/volumes`.
pub mod plugin {
    pub const EMPTY_DIR: &str = "kubernetes.io~empty-dir";
    pub const CONFIG_MAP: &str = "kubernetes.io~configmap";
    pub const SECRET: &str = "kubernetes.io~secret";
    pub const DOWNWARD_API: &str = "kubernetes.io~downward-api";
    pub const PROJECTED: &str = "kubernetes.io~projected";
    pub const LOCAL: &str = "kubernetes.io~local-volume";
    pub const CSI: &str = "kubernetes.io~csi";
}

#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// The agent's root dir; pod volumes live under <root>/pods/<uid>/volumes.
    pub root_dir: PathBuf,
    /// Where CSI node plugins register (<root>/plugins_registry).
    pub plugins_registry: PathBuf,
}

/// One of a pod's volumes, ready on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyVolume {
    /// Host path to bind (a directory, a file, or a block device node).
    pub host_path: PathBuf,
    pub read_only: bool,
    /// A raw block device (volumeMode Block): goes to volumeDevices, not volumeMounts.
    pub block: bool,
}

/// A pod's volumes by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodVolumes {
    pub volumes: BTreeMap<String, ReadyVolume>,
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A referenced ConfigMap/Secret/claim/PV does not exist (and is not optional).
    #[error("volume {volume}: {kind} {name:?} not found")]
    Missing {
        volume: String,
        kind: &'static str,
        name: String,
    },
    /// A claim exists but is not bound to a PV.
    #[error("volume {volume}: persistentvolumeclaim {claim:?} is not bound")]
    Unbound { volume: String, claim: String },
    /// A ReadWriteOncePod claim is in use by another pod on this node (ReadWriteOnce allows
    /// several pods on one node, as upstream).
    #[error("volume {volume}: claim {claim:?} is in use by pod {other}")]
    InUse {
        volume: String,
        claim: String,
        other: String,
    },
    /// A hostPath type check failed, a subPath escapes, or the spec is invalid (`volume` is
    /// empty when the error is about the pod, not one volume).
    #[error("{}{detail}", volume_prefix(.volume))]
    Invalid { volume: String, detail: String },
    /// A mount, CSI call or file write failed (`volume` is empty for pod-wide steps such as
    /// writing the pod's volume state).
    #[error("{}{detail}", volume_prefix(.volume))]
    Failed { volume: String, detail: String },
}

/// "volume NAME: " before a volume's error; nothing before a pod-wide one.
fn volume_prefix(volume: &str) -> String {
    if volume.is_empty() {
        String::new()
    } else {
        format!("volume {volume}: ")
    }
}

impl VolumeError {
    /// The event reason: FailedMount for setup errors.
    pub fn reason(&self) -> &'static str {
        "FailedMount"
    }
}

fn invalid(volume: &str, detail: impl Into<String>) -> VolumeError {
    VolumeError::Invalid {
        volume: volume.to_string(),
        detail: detail.into(),
    }
}

fn failed(volume: &str, detail: impl std::fmt::Display) -> VolumeError {
    VolumeError::Failed {
        volume: volume.to_string(),
        detail: detail.to_string(),
    }
}

/// A service account token request for a projected serviceAccountToken source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    pub service_account: String,
    pub audience: Option<String>,
    pub expiration_seconds: i64,
}

/// Issues service account tokens (the cluster mode's TokenRequest). Standalone mode has none,
/// and a serviceAccountToken projection is then refused as Invalid.
pub trait TokenSource: Send + Sync {
    fn token<'a>(
        &'a self,
        pod: &'a Pod,
        request: TokenRequest,
    ) -> BoxFuture<'a, Result<String, String>>;
}

/// A claim a pod uses, recorded for the ReadWriteOncePod check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ClaimUse {
    namespace: String,
    name: String,
    pv: String,
    access_modes: Vec<String>,
}

/// What the manager did for one pod volume.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct VolumeRecord {
    claim: Option<ClaimUse>,
    csi: Option<csi::CsiRecord>,
}

/// What the manager did for one pod, persisted beside its volumes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PodRecord {
    namespace: String,
    name: String,
    volumes: BTreeMap<String, VolumeRecord>,
}

/// The plain data the blocking setup code needs (cheap to clone into a blocking task).
#[derive(Clone)]
struct Ctx {
    root: PathBuf,
    store: ObjectStore,
    node: NodeAllocatable,
}

pub struct VolumeManager {
    ctx: Ctx,
    tokens: RwLock<Option<Arc<dyn TokenSource>>>,
    records: Mutex<BTreeMap<String, PodRecord>>,
    /// Serialises setup/refresh/teardown so staging and claim checks see a consistent state.
    op: tokio::sync::Mutex<()>,
    /// UIDs set up by this process and not torn down since: an orphan's retried teardown
    /// leaves them alone (a worker owns their volumes again).
    set_up: Mutex<BTreeSet<String>>,
    plugins: csi::Plugins,
}

/// Back-off of an orphan's retried teardown.
const ORPHAN_RETRY_FIRST: Duration = Duration::from_secs(1);
const ORPHAN_RETRY_MAX: Duration = Duration::from_secs(30);

const STATE_FILE: &str = ".state.json";
/// The pod dir's subdir for raw block volumes' publish targets.
const VOLUME_DEVICES: &str = "volumeDevices";

impl VolumeManager {
    pub fn new(config: VolumeConfig, store: ObjectStore) -> Self {
        let node = NodeAllocatable::from_host(&config.root_dir);
        let manager = Self {
            ctx: Ctx {
                root: config.root_dir.clone(),
                store,
                node,
            },
            tokens: RwLock::new(None),
            records: Mutex::new(BTreeMap::new()),
            op: tokio::sync::Mutex::new(()),
            set_up: Mutex::new(BTreeSet::new()),
            plugins: csi::Plugins::new(config.plugins_registry),
        };
        // Re-adopt what a previous run recorded.
        let mut records = BTreeMap::new();
        for uid in manager.list() {
            if let Ok(text) = fs::read(manager.ctx.volumes_dir(&uid).join(STATE_FILE)) {
                if let Ok(rec) = serde_json::from_slice::<PodRecord>(&text) {
                    records.insert(uid, rec);
                }
            }
        }
        *manager.records.lock().expect("records lock") = records;
        manager
    }

    /// Plugs in the service account token issuer (cluster mode).
    pub fn set_token_source(&self, source: Arc<dyn TokenSource>) {
        *self.tokens.write().expect("token lock") = Some(source);
    }

    /// The CSI plugin registry (driver name → endpoint), fed by `<root>/plugins_registry`.
    pub fn plugins(&self) -> &csi::Plugins {
        &self.plugins
    }

    /// Makes every volume of the pod ready (idempotent; re-adopts existing mounts).
    pub async fn setup(&self, pod: &Pod) -> Result<PodVolumes, VolumeError> {
        let _op = self.op.lock().await;
        let uid = pod_uid(pod)?;
        self.set_up.lock().expect("set_up lock").insert(uid.clone());
        let dir = self.ctx.volumes_dir(&uid);
        fs::create_dir_all(&dir)
            .map_err(|e| failed("", format!("mkdir {}: {e}", dir.display())))?;
        {
            let mut records = self.records.lock().expect("records lock");
            let rec = records.entry(uid.clone()).or_default();
            rec.namespace = namespace(pod).to_string();
            rec.name = pod.metadata.name.clone().unwrap_or_default();
        }
        let mut out = PodVolumes::default();
        let pod = Arc::new(pod.clone());
        for vol in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let ready = self.setup_one(&pod, &uid, vol).await?;
            out.volumes.insert(vol.name.clone(), ready);
        }
        self.save(&uid)?;
        Ok(out)
    }

    async fn setup_one(
        &self,
        pod: &Arc<Pod>,
        uid: &str,
        vol: &Volume,
    ) -> Result<ReadyVolume, VolumeError> {
        let name = vol.name.as_str();
        if let Some(pvc) = &vol.persistent_volume_claim {
            return self
                .setup_claim(
                    pod,
                    uid,
                    name,
                    &pvc.claim_name,
                    pvc.read_only.unwrap_or(false),
                )
                .await;
        }
        if vol.ephemeral.is_some() {
            // A generic ephemeral volume's claim is named <pod>-<volume>.
            let claim = format!(
                "{}-{name}",
                pod.metadata.name.as_deref().unwrap_or_default()
            );
            return self.setup_claim(pod, uid, name, &claim, false).await;
        }
        if let Some(src) = &vol.csi {
            let rec = csi::inline_record(&self.ctx.root, uid, name, src);
            let context = csi::pod_context(pod, true, src.volume_attributes.clone());
            let mut secrets = csi::CsiSecrets::default();
            if let Some(r) = &src.node_publish_secret_ref {
                secrets.publish = self.csi_secret(name, namespace(pod), &r.name)?;
            }
            return self.setup_csi(pod, uid, name, rec, context, &secrets).await;
        }
        let tokens = self.fetch_tokens(pod, vol).await?;
        let (ctx, pod, vol) = (self.ctx.clone(), pod.clone(), vol.clone());
        let uid = uid.to_string();
        blocking(move || ctx.setup_local(&pod, &uid, &vol, &tokens)).await
    }

    async fn setup_claim(
        &self,
        pod: &Arc<Pod>,
        uid: &str,
        volume: &str,
        claim_name: &str,
        pod_read_only: bool,
    ) -> Result<ReadyVolume, VolumeError> {
        let bound = claim::resolve(&self.ctx.store, namespace(pod), volume, claim_name)?;
        let pv_name = bound.pv.metadata.name.clone().unwrap_or_default();
        // Access modes, as upstream: ReadWriteOnce means one *node* (several pods on this node
        // may share the volume), so it is never refused here; ReadWriteOncePod means one pod,
        // which upstream enforces in the scheduler and again in the kubelet at mount time
        // (KEP-2485: a claim already in use by another pod fails the mount).
        if bound
            .access_modes
            .iter()
            .any(|m| m == claim::READ_WRITE_ONCE_POD)
        {
            let records = self.records.lock().expect("records lock");
            let other = records.iter().find(|(other_uid, rec)| {
                other_uid.as_str() != uid
                    && rec.volumes.values().any(|v| {
                        v.claim.as_ref().is_some_and(|c| {
                            c.namespace == bound.namespace && c.name == bound.claim
                        })
                    })
            });
            if let Some((other_uid, rec)) = other {
                return Err(VolumeError::InUse {
                    volume: volume.to_string(),
                    claim: format!("{}/{}", bound.namespace, bound.claim),
                    other: format!("{}/{} ({other_uid})", rec.namespace, rec.name),
                });
            }
        }
        let use_ = ClaimUse {
            namespace: bound.namespace.clone(),
            name: bound.claim.clone(),
            pv: pv_name.clone(),
            access_modes: bound.access_modes.clone(),
        };
        self.record(uid, volume, |r| r.claim = Some(use_.clone()))?;
        let spec = bound.pv.spec.clone().unwrap_or_default();
        if let Some(src) = &spec.csi {
            let read_only = pod_read_only || src.read_only.unwrap_or(false);
            let mut rec = csi::pv_record(
                &self.ctx.root,
                uid,
                &pv_name,
                src,
                read_only,
                &bound.access_modes,
                bound.block,
            );
            rec.mount_flags = spec.mount_options.clone().unwrap_or_default();
            let context = csi::pod_context(pod, false, src.volume_attributes.clone());
            // A SecretReference without a namespace means the claim's, as upstream.
            let refs = [&src.node_stage_secret_ref, &src.node_publish_secret_ref].map(|r| {
                r.as_ref().map(|r| {
                    let ns = r.namespace.as_deref().unwrap_or(&bound.namespace);
                    (ns.to_string(), r.name.clone().unwrap_or_default())
                })
            });
            let mut secrets = csi::CsiSecrets::default();
            for (to, r) in [&mut secrets.stage, &mut secrets.publish]
                .into_iter()
                .zip(refs)
            {
                if let Some((ns, name)) = r {
                    *to = self.csi_secret(volume, &ns, &name)?;
                }
            }
            return self
                .setup_csi(pod, uid, volume, rec, context, &secrets)
                .await;
        }
        let (ctx, pod, volume) = (self.ctx.clone(), pod.clone(), volume.to_string());
        let uid = uid.to_string();
        blocking(move || ctx.setup_pv(&pod, &uid, &volume, &bound, pod_read_only)).await
    }

    /// Records a CSI volume, then stages and publishes it (see `csi::Plugins::setup`).
    async fn setup_csi(
        &self,
        pod: &Arc<Pod>,
        uid: &str,
        volume: &str,
        rec: csi::CsiRecord,
        context: BTreeMap<String, String>,
        secrets: &csi::CsiSecrets,
    ) -> Result<ReadyVolume, VolumeError> {
        self.record(uid, volume, |r| r.csi = Some(rec.clone()))?;
        let ready = self
            .plugins
            .setup(&rec, context, secrets)
            .await
            .map_err(|e| failed(volume, e))?;
        self.apply_fs_group_async(pod, volume, &ready, !rec.fs_type.is_empty())
            .await?;
        Ok(ready)
    }

    /// The values of a Secret a CSI volume references (drivers take them as text).
    fn csi_secret(
        &self,
        volume: &str,
        namespace: &str,
        name: &str,
    ) -> Result<std::collections::HashMap<String, String>, VolumeError> {
        let shown = format!("{namespace}/{name}");
        let secret =
            self.ctx
                .store
                .secret(namespace, name)
                .ok_or_else(|| VolumeError::Missing {
                    volume: volume.to_string(),
                    kind: "secret",
                    name: shown.clone(),
                })?;
        projection::secret_data(&secret)
            .into_iter()
            .map(|(k, v)| match String::from_utf8(v) {
                Ok(v) => Ok((k, v)),
                Err(_) => Err(invalid(
                    volume,
                    format!("secret {shown:?} key {k:?} is not UTF-8 text"),
                )),
            })
            .collect()
    }

    async fn apply_fs_group_async(
        &self,
        pod: &Arc<Pod>,
        volume: &str,
        ready: &ReadyVolume,
        has_fs_type: bool,
    ) -> Result<(), VolumeError> {
        // CSI drivers default to fsGroupPolicy ReadWriteOnceWithFSType: ownership is changed
        // only when the volume has an fsType and is writable.
        if !has_fs_type || ready.read_only || ready.block {
            return Ok(());
        }
        let (pod, volume, dir) = (pod.clone(), volume.to_string(), ready.host_path.clone());
        blocking(move || fs_group(&pod, &volume, &dir, false)).await
    }

    async fn fetch_tokens(
        &self,
        pod: &Pod,
        vol: &Volume,
    ) -> Result<BTreeMap<usize, String>, VolumeError> {
        let mut tokens = BTreeMap::new();
        let Some(projected) = &vol.projected else {
            return Ok(tokens);
        };
        for (i, s) in projected.sources.iter().flatten().enumerate() {
            let Some(t) = &s.service_account_token else {
                continue;
            };
            let source = self.tokens.read().expect("token lock").clone();
            let Some(source) = source else {
                return Err(invalid(
                    &vol.name,
                    "serviceAccountToken projection needs a token issuer, and standalone mode \
                     has none (no TokenRequest API)",
                ));
            };
            let request = TokenRequest {
                service_account: pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into()),
                audience: t.audience.clone(),
                expiration_seconds: t.expiration_seconds.unwrap_or(3600),
            };
            let token = source
                .token(pod, request)
                .await
                .map_err(|e| failed(&vol.name, format!("serviceAccountToken: {e}")))?;
            tokens.insert(i, token);
        }
        Ok(tokens)
    }

    /// Re-projects configMap, secret, downwardAPI and projected volumes from the store.
    pub async fn refresh(&self, pod: &Pod, volumes: &PodVolumes) -> Result<(), VolumeError> {
        let _op = self.op.lock().await;
        let uid = pod_uid(pod)?;
        let pod = Arc::new(pod.clone());
        for vol in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let atomic = vol.config_map.is_some()
                || vol.secret.is_some()
                || vol.downward_api.is_some()
                || vol.projected.is_some();
            if !atomic || !volumes.volumes.contains_key(&vol.name) {
                continue;
            }
            let tokens = self.fetch_tokens(&pod, vol).await?;
            let (ctx, p, v, u) = (self.ctx.clone(), pod.clone(), vol.clone(), uid.clone());
            blocking(move || ctx.setup_local(&p, &u, &v, &tokens).map(|_| ())).await?;
        }
        Ok(())
    }

    /// The OCI mounts and devices for one container's volumeMounts/volumeDevices, with subPath
    /// and subPathExpr resolved safely beneath each volume.
    pub fn container_mounts(
        &self,
        pod: &Pod,
        container: &Container,
        volumes: &PodVolumes,
    ) -> Result<(Vec<Mount>, Vec<Device>), VolumeError> {
        let uid = pod_uid(pod)?;
        let privileged = container
            .security_context
            .as_ref()
            .and_then(|s| s.privileged)
            .unwrap_or(false);
        let mut env: Option<Vec<(String, String)>> = None;
        let mut mounts = Vec::new();
        for (index, vm) in container.volume_mounts.iter().flatten().enumerate() {
            let vol = volumes.volumes.get(&vm.name).ok_or_else(|| {
                invalid(&vm.name, "volumeMount names a volume that is not set up")
            })?;
            if vol.block {
                return Err(invalid(
                    &vm.name,
                    "a block volume must be used in volumeDevices",
                ));
            }
            let sub = match (vm.sub_path.as_deref(), vm.sub_path_expr.as_deref()) {
                (Some(s), _) if !s.is_empty() => Some(s.to_string()),
                (_, Some(expr)) if !expr.is_empty() => {
                    if env.is_none() {
                        env = Some(
                            crate::pod::env::container_env(pod, container, &self.ctx.store)
                                .map_err(|e| invalid(&vm.name, format!("subPathExpr: {e}")))?,
                        );
                    }
                    Some(crate::pod::env::expand(
                        expr,
                        env.as_deref().unwrap_or_default(),
                    ))
                }
                _ => None,
            };
            let source = match sub {
                Some(sub) => {
                    subpath::validate(&sub).map_err(|e| invalid(&vm.name, e.to_string()))?;
                    let target = self
                        .ctx
                        .pod_dir(&uid)
                        .join("volume-subpaths")
                        .join(&vm.name)
                        .join(&container.name)
                        .join(index.to_string());
                    subpath::bind_beneath(&vol.host_path, &sub, &target).map_err(|e| match e {
                        subpath::SubPathError::Escapes(_) => invalid(&vm.name, e.to_string()),
                        other => failed(&vm.name, other),
                    })?;
                    target
                }
                None => vol.host_path.clone(),
            };
            let mut options = vec!["rbind".to_string()];
            options.push(
                propagation(vm.mount_propagation.as_deref(), privileged, &vm.name)?.to_string(),
            );
            if vm.read_only.unwrap_or(false) || vol.read_only {
                options.push("ro".into());
            }
            mounts.push(Mount {
                destination: vm.mount_path.clone(),
                source: source.display().to_string(),
                kind: "bind".into(),
                options,
            });
        }
        let mut devices = Vec::new();
        for vd in container.volume_devices.iter().flatten() {
            let vol = volumes.volumes.get(&vd.name).ok_or_else(|| {
                invalid(&vd.name, "volumeDevice names a volume that is not set up")
            })?;
            if !vol.block {
                return Err(invalid(
                    &vd.name,
                    "volumeDevices needs a volume with volumeMode Block",
                ));
            }
            devices.push(Device {
                host_path: vol.host_path.clone(),
                container_path: vd.device_path.clone(),
            });
        }
        Ok((mounts, devices))
    }

    /// Unmounts and removes every volume of the pod (CSI unpublish/unstage). Idempotent.
    pub async fn teardown(&self, pod_uid: &str) -> Result<(), VolumeError> {
        let _op = self.op.lock().await;
        self.teardown_locked(pod_uid).await
    }

    /// Retries the teardown of a pod no source wants (found on disk after a restart) whose
    /// first teardown failed, typically because its CSI driver has not registered again yet:
    /// with back-off (1 s doubling to 30 s, and at once when a driver registers) until it
    /// succeeds or `cancel` fires. A pod set up again meanwhile is left to its worker.
    pub async fn retry_orphan_teardown(&self, uid: String, cancel: CancellationToken) {
        let mut registered = self.plugins.subscribe();
        let mut delay = ORPHAN_RETRY_FIRST;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
                _ = registered.changed() => {}
            }
            let result = {
                let _op = self.op.lock().await;
                if self.set_up.lock().expect("set_up lock").contains(&uid) {
                    tracing::info!(pod = %uid, "orphan set up again; its worker owns its volumes");
                    return;
                }
                self.teardown_locked(&uid).await
            };
            match result {
                Ok(()) => {
                    tracing::info!(pod = %uid, "orphan volumes torn down");
                    return;
                }
                Err(e) => {
                    tracing::warn!(pod = %uid, error = %e, retry_in = ?delay, "tearing down orphan volumes")
                }
            }
            delay = (delay * 2).min(ORPHAN_RETRY_MAX);
        }
    }

    async fn teardown_locked(&self, pod_uid: &str) -> Result<(), VolumeError> {
        if pod_uid.is_empty() || pod_uid.contains('/') || pod_uid.starts_with('.') {
            return Err(invalid("", format!("bad pod uid {pod_uid:?}")));
        }
        let pod_dir = self.ctx.pod_dir(pod_uid);
        let subpaths = pod_dir.join("volume-subpaths");
        let devices = pod_dir.join(VOLUME_DEVICES);
        let volumes = self.ctx.volumes_dir(pod_uid);
        unmount_blocking(subpaths.clone()).await?;
        let record = self
            .records
            .lock()
            .expect("records lock")
            .get(pod_uid)
            .cloned();
        let csi_records: Vec<(String, csi::CsiRecord)> = record
            .iter()
            .flat_map(|r| r.volumes.iter())
            .filter_map(|(n, v)| v.csi.clone().map(|c| (n.clone(), c)))
            .collect();
        for (name, rec) in &csi_records {
            self.plugins
                .unpublish(rec)
                .await
                .map_err(|e| failed(name, e))?;
        }
        unmount_blocking(devices.clone()).await?;
        unmount_blocking(volumes.clone()).await?;
        for (name, rec) in &csi_records {
            let Some(staging) = &rec.staging_path else {
                continue;
            };
            let shared = self
                .records
                .lock()
                .expect("records lock")
                .iter()
                .any(|(uid, r)| {
                    uid != pod_uid
                        && r.volumes.values().any(|v| {
                            v.csi.as_ref().and_then(|c| c.staging_path.as_ref()) == Some(staging)
                        })
                });
            if !shared {
                self.plugins
                    .unstage(rec)
                    .await
                    .map_err(|e| failed(name, e))?;
            }
        }
        let pod_dir2 = pod_dir.clone();
        blocking(move || {
            // The volumes dir (with the pod's record) goes last.
            for dir in [&subpaths, &devices, &volumes] {
                remove_tree(dir)
                    .map_err(|e| failed("", format!("removing {}: {e}", dir.display())))?;
            }
            // The pod dir goes too when nothing else (another module's files) is left in it.
            let _ = fs::remove_dir(&pod_dir2);
            Ok(())
        })
        .await?;
        self.records.lock().expect("records lock").remove(pod_uid);
        self.set_up.lock().expect("set_up lock").remove(pod_uid);
        Ok(())
    }

    /// UIDs of pods with volume state on this host (for clean-up after a restart).
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.ctx.root.join("pods")) else {
            return Vec::new();
        };
        let mut uids: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().join("volumes").is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        uids.sort();
        uids
    }

    fn record(
        &self,
        uid: &str,
        volume: &str,
        f: impl FnOnce(&mut VolumeRecord),
    ) -> Result<(), VolumeError> {
        {
            let mut records = self.records.lock().expect("records lock");
            let rec = records.entry(uid.to_string()).or_default();
            f(rec.volumes.entry(volume.to_string()).or_default());
        }
        self.save(uid)
    }

    fn save(&self, uid: &str) -> Result<(), VolumeError> {
        let rec = self
            .records
            .lock()
            .expect("records lock")
            .get(uid)
            .cloned()
            .unwrap_or_default();
        let dir = self.ctx.volumes_dir(uid);
        let text = serde_json::to_vec_pretty(&rec).map_err(|e| failed("", e))?;
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        fs::create_dir_all(&dir)
            .and_then(|()| fs::write(&tmp, text))
            .and_then(|()| fs::rename(&tmp, dir.join(STATE_FILE)))
            .map_err(|e| failed("", format!("writing volume state of pod {uid}: {e}")))
    }
}

/// Removes a directory tree that must hold no mounts any more; refuses to cross into one.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let left = mount::mounts_under(dir)?;
    if !left.is_empty() {
        return Err(std::io::Error::other(format!("still mounted: {left:?}")));
    }
    fs::remove_dir_all(dir)
}

async fn unmount_blocking(dir: PathBuf) -> Result<(), VolumeError> {
    blocking(move || {
        mount::unmount_all_under(&dir)
            .map_err(|e| failed("", format!("unmounting under {}: {e}", dir.display())))
    })
    .await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> Result<T, VolumeError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(failed("", format!("volume task failed: {e}"))))
}

/// A Secret's values (data, with stringData merged over it as the API server would).
pub fn secret_values(secret: &k8s_openapi::api::core::v1::Secret) -> BTreeMap<String, Vec<u8>> {
    projection::secret_data(secret)
}

fn pod_uid(pod: &Pod) -> Result<String, VolumeError> {
    pod.metadata
        .uid
        .clone()
        .filter(|u| !u.is_empty() && !u.contains('/') && !u.starts_with('.'))
        .ok_or_else(|| invalid("", "pod has no usable metadata.uid"))
}

fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

/// OCI propagation option for a volumeMount's mountPropagation.
fn propagation(
    mode: Option<&str>,
    privileged: bool,
    volume: &str,
) -> Result<&'static str, VolumeError> {
    match mode.unwrap_or("None") {
        "None" => Ok("rprivate"),
        "HostToContainer" => Ok("rslave"),
        "Bidirectional" if privileged => Ok("rshared"),
        "Bidirectional" => Err(invalid(
            volume,
            "Bidirectional mount propagation needs a privileged container",
        )),
        other => Err(invalid(
            volume,
            format!("invalid mountPropagation {other:?}"),
        )),
    }
}

/// Applies the pod's fsGroup to `dir` per fsGroupChangePolicy.
fn fs_group(pod: &Pod, volume: &str, dir: &Path, read_only: bool) -> Result<(), VolumeError> {
    let sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let Some(gid) = sc.and_then(|s| s.fs_group) else {
        return Ok(());
    };
    let policy = ChangePolicy::parse(sc.and_then(|s| s.fs_group_change_policy.as_deref()));
    host::apply_fs_group(dir, gid as u32, policy, read_only)
        .map_err(|e| failed(volume, format!("applying fsGroup {gid}: {e}")))
}

impl Ctx {
    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root.join("pods").join(uid)
    }

    fn volumes_dir(&self, uid: &str) -> PathBuf {
        self.pod_dir(uid).join("volumes")
    }

    fn volume_dir(&self, uid: &str, plugin: &str, volume: &str) -> PathBuf {
        self.volumes_dir(uid).join(plugin).join(volume)
    }

    /// emptyDir, hostPath, configMap, secret, downwardAPI and projected volumes.
    fn setup_local(
        &self,
        pod: &Pod,
        uid: &str,
        vol: &Volume,
        tokens: &BTreeMap<usize, String>,
    ) -> Result<ReadyVolume, VolumeError> {
        let name = vol.name.as_str();
        let ns = namespace(pod);
        if let Some(hp) = &vol.host_path {
            host::check_host_path(Path::new(&hp.path), hp.type_.as_deref())
                .map_err(|e| invalid(name, e))?;
            return Ok(ReadyVolume {
                host_path: PathBuf::from(&hp.path),
                read_only: false,
                block: false,
            });
        }
        if let Some(ed) = &vol.empty_dir {
            let dir = self.volume_dir(uid, plugin::EMPTY_DIR, name);
            match ed.medium.as_deref().unwrap_or("") {
                "" => self.make_dir(&dir, name, None)?,
                "Memory" => {
                    let size = match &ed.size_limit {
                        Some(q) => Some(
                            downward::parse_quantity_milli(&q.0)
                                .filter(|v| *v > 0)
                                .ok_or_else(|| invalid(name, format!("bad sizeLimit {:?}", q.0)))?,
                        ),
                        None => pod_memory_limit(pod),
                    }
                    .map(|milli| ((milli + 999) / 1000) as u64);
                    self.make_dir(&dir, name, Some(size))?;
                }
                other => {
                    return Err(invalid(
                        name,
                        format!("emptyDir medium {other:?} is not supported"),
                    ))
                }
            }
            fs_group(pod, name, &dir, false)?;
            return Ok(ReadyVolume {
                host_path: dir,
                read_only: false,
                block: false,
            });
        }
        let (plugin_dir, tmpfs, payload) = if let Some(cm) = &vol.config_map {
            let src = KeySource {
                volume: name,
                kind: "configmap",
                name: &cm.name,
                optional: cm.optional.unwrap_or(false),
            };
            let data = self
                .store
                .config_map(ns, &cm.name)
                .map(|c| projection::config_map_data(&c));
            let mut payload = Payload::new();
            projection::add_keys(
                &mut payload,
                &src,
                data,
                cm.items.as_deref(),
                cm.default_mode.unwrap_or(DEFAULT_MODE),
            )?;
            (plugin::CONFIG_MAP, false, payload)
        } else if let Some(sec) = &vol.secret {
            let secret_name = sec.secret_name.clone().unwrap_or_default();
            let src = KeySource {
                volume: name,
                kind: "secret",
                name: &secret_name,
                optional: sec.optional.unwrap_or(false),
            };
            let data = self
                .store
                .secret(ns, &secret_name)
                .map(|c| projection::secret_data(&c));
            let mut payload = Payload::new();
            projection::add_keys(
                &mut payload,
                &src,
                data,
                sec.items.as_deref(),
                sec.default_mode.unwrap_or(DEFAULT_MODE),
            )?;
            (plugin::SECRET, true, payload)
        } else if let Some(d) = &vol.downward_api {
            let mut payload = Payload::new();
            projection::add_downward(
                &mut payload,
                name,
                pod,
                d.items.as_deref().unwrap_or_default(),
                d.default_mode.unwrap_or(DEFAULT_MODE),
                &self.node,
            )?;
            (plugin::DOWNWARD_API, false, payload)
        } else if let Some(p) = &vol.projected {
            let payload =
                projection::projected_payload(name, pod, p, &self.store, &self.node, tokens)?;
            (plugin::PROJECTED, true, payload)
        } else {
            return Err(invalid(name, "unsupported volume type"));
        };
        let dir = self.volume_dir(uid, plugin_dir, name);
        self.make_dir(&dir, name, tmpfs.then_some(None))?;
        let changed = atomic::write(&dir, &payload).map_err(|e| match e {
            atomic::AtomicError::InvalidPath(_) => invalid(name, e.to_string()),
            other => failed(name, other),
        })?;
        if changed {
            fs_group(pod, name, &dir, true)?;
        }
        Ok(ReadyVolume {
            host_path: dir,
            read_only: true,
            block: false,
        })
    }

    /// Creates a volume dir (0777); with `tmpfs` Some, mounts a tmpfs (of that size) on it
    /// unless one is already there.
    fn make_dir(
        &self,
        dir: &Path,
        volume: &str,
        tmpfs: Option<Option<u64>>,
    ) -> Result<(), VolumeError> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(dir)
            .map_err(|e| failed(volume, format!("mkdir {}: {e}", dir.display())))?;
        if let Some(size) = tmpfs {
            if !mount::is_mounted(dir).map_err(|e| failed(volume, e))? {
                mount::tmpfs(dir, size)
                    .map_err(|e| failed(volume, format!("mounting tmpfs: {e}")))?;
            }
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777))
            .map_err(|e| failed(volume, format!("chmod {}: {e}", dir.display())))
    }

    /// A PV's hostPath or local source.
    fn setup_pv(
        &self,
        pod: &Pod,
        uid: &str,
        volume: &str,
        bound: &claim::BoundClaim,
        pod_read_only: bool,
    ) -> Result<ReadyVolume, VolumeError> {
        let spec = bound.pv.spec.clone().unwrap_or_default();
        let pv_name = bound.pv.metadata.name.clone().unwrap_or_default();
        if let Some(hp) = &spec.host_path {
            let path = PathBuf::from(&hp.path);
            host::check_host_path(&path, hp.type_.as_deref()).map_err(|e| invalid(volume, e))?;
            return Ok(ReadyVolume {
                block: bound.block,
                host_path: path,
                read_only: pod_read_only,
            });
        }
        let Some(local) = &spec.local else {
            return Err(invalid(
                volume,
                format!("persistentvolume {pv_name:?} has an unsupported source"),
            ));
        };
        let path = PathBuf::from(&local.path);
        let meta = fs::metadata(&path)
            .map_err(|e| invalid(volume, format!("local path {}: {e}", path.display())))?;
        if mount::is_block_device(&path) && bound.block {
            return Ok(ReadyVolume {
                host_path: path,
                read_only: pod_read_only,
                block: true,
            });
        }
        if bound.block {
            return Err(invalid(
                volume,
                format!(
                    "volumeMode Block needs a block device, {} is not one",
                    path.display()
                ),
            ));
        }
        let target = self.volume_dir(uid, plugin::LOCAL, &pv_name);
        fs::create_dir_all(&target)
            .map_err(|e| failed(volume, format!("mkdir {}: {e}", target.display())))?;
        if !mount::is_mounted(&target).map_err(|e| failed(volume, e))? {
            if mount::is_block_device(&path) {
                let fs_type = local
                    .fs_type
                    .clone()
                    .filter(|f| !f.is_empty())
                    .unwrap_or_else(|| "ext4".into());
                mount::format_if_blank(&path, &fs_type).map_err(|e| failed(volume, e))?;
                mount::mount_device(&path, &target, &fs_type, pod_read_only)
                    .map_err(|e| failed(volume, format!("mounting {}: {e}", path.display())))?;
            } else if meta.is_dir() {
                mount::bind(&path, &target, pod_read_only)
                    .map_err(|e| failed(volume, format!("bind {}: {e}", path.display())))?;
            } else {
                return Err(invalid(
                    volume,
                    format!(
                        "local path {} is neither a directory nor a block device",
                        path.display()
                    ),
                ));
            }
        }
        if !pod_read_only {
            fs_group(pod, volume, &target, false)?;
        }
        Ok(ReadyVolume {
            host_path: target,
            read_only: pod_read_only,
            block: false,
        })
    }
}

/// The pod's memory limit (sum of app containers' limits, when every one has a limit): the
/// default size of a memory-backed emptyDir, as upstream.
fn pod_memory_limit(pod: &Pod) -> Option<i128> {
    let spec = pod.spec.as_ref()?;
    let mut total = 0;
    for c in &spec.containers {
        let q = c.resources.as_ref()?.limits.as_ref()?.get("memory")?;
        total += downward::parse_quantity_milli(&q.0)?;
    }
    (total > 0).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_their_volume_and_pod_wide_ones_do_not_pretend_to() {
        assert_eq!(
            failed("cache", "mkdir: denied").to_string(),
            "volume cache: mkdir: denied"
        );
        assert_eq!(
            failed("", "writing volume state of pod u1: full").to_string(),
            "writing volume state of pod u1: full"
        );
        assert_eq!(invalid("", "bad pod uid").to_string(), "bad pod uid");
    }
}
