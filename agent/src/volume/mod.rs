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
//! This file holds the manager's entry points (setup, refresh, teardown) and its locking: one
//! lock per pod and one per CSI staging path (`locks`). The rest lives beside it: `records`
//! (what was done per pod), `local` (emptyDir, hostPath and the atomically written volumes),
//! `claim` (claims, PVs and CSI), `container` (a container's mounts), `tokens` (projected
//! service account tokens).
//!
//! OWNER: volumes helper. Signatures here are the contract the pod worker codes against.

pub mod atomic;
mod claim;
mod container;
pub mod csi;
pub mod downward;
mod host;
mod local;
mod locks;
mod mount;
mod projection;
mod records;
mod subpath;
mod tokens;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Pod, Volume};
use tokio_util::sync::CancellationToken;

use self::downward::NodeAllocatable;
use self::locks::KeyedLocks;
use self::records::PodRecord;
use self::tokens::TokenCache;
pub use self::tokens::{IssuedToken, TokenRequest, TokenSource};
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
    /// What unset limits in downward API volumes resolve to.
    pub allocatable: NodeAllocatable,
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
    /// A CSI plugin failed the volume (its gRPC code kept: see `CsiError::is_final`).
    #[error("volume {volume}: {source}")]
    Csi {
        volume: String,
        source: csi::CsiError,
    },
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

fn csi_failed(volume: &str) -> impl FnOnce(csi::CsiError) -> VolumeError + '_ {
    move |source| VolumeError::Csi {
        volume: volume.to_string(),
        source,
    }
}

fn failed(volume: &str, detail: impl std::fmt::Display) -> VolumeError {
    VolumeError::Failed {
        volume: volume.to_string(),
        detail: detail.to_string(),
    }
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
    tokens: TokenCache,
    /// Pods with serviceAccountToken projections, as last set up or refreshed: the token
    /// refresh task rewrites their volumes when a token is due.
    token_pods: Mutex<BTreeMap<String, Arc<Pod>>>,
    records: Mutex<BTreeMap<String, PodRecord>>,
    /// One lock per pod UID over its setup, refresh and teardown (one pod's slow volume work
    /// stalls no other pod).
    pod_locks: KeyedLocks<String>,
    /// One lock per CSI staging path over staging, and over the last user's unstage.
    staging_locks: KeyedLocks<PathBuf>,
    /// UIDs set up by this process and not torn down since: an orphan's retried teardown
    /// leaves them alone (a worker owns their volumes again).
    set_up: Mutex<BTreeSet<String>>,
    plugins: csi::Plugins,
}

/// Back-off of an orphan's retried teardown.
const ORPHAN_RETRY_FIRST: Duration = Duration::from_secs(1);
const ORPHAN_RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the token refresh task looks for tokens due (a token lives 10 minutes at least,
/// and is due 2 minutes before it expires).
const TOKEN_CHECK_PERIOD: Duration = Duration::from_secs(30);

/// The pod dir's subdir for raw block volumes' publish targets.
const VOLUME_DEVICES: &str = "volumeDevices";

impl VolumeManager {
    /// The manager of the node's volumes, re-adopting what a previous run recorded. `tokens`
    /// issues service account tokens for projected volumes (cluster mode's `ApiTokens`);
    /// without one (standalone) a serviceAccountToken projection is refused as Invalid. With
    /// one, a task refreshes projected tokens before they expire (it ends with the manager),
    /// so this must be called inside a Tokio runtime.
    pub fn new(
        config: VolumeConfig,
        store: ObjectStore,
        tokens: Option<Arc<dyn TokenSource>>,
    ) -> Arc<Self> {
        let node = config.allocatable;
        let refresh = tokens.is_some();
        let manager = Self {
            ctx: Ctx {
                root: config.root_dir.clone(),
                store,
                node,
            },
            tokens: TokenCache::new(tokens),
            token_pods: Mutex::new(BTreeMap::new()),
            records: Mutex::new(BTreeMap::new()),
            pod_locks: KeyedLocks::default(),
            staging_locks: KeyedLocks::default(),
            set_up: Mutex::new(BTreeSet::new()),
            plugins: csi::Plugins::new(config.plugins_registry),
        };
        // Re-adopt what a previous run recorded.
        let records = records::load(&manager.ctx, manager.list());
        *manager.records.lock().expect("records lock") = records;
        let manager = Arc::new(manager);
        if refresh {
            Self::refresh_tokens_periodically(Arc::downgrade(&manager));
        }
        manager
    }

    /// The CSI plugin registry (driver name → endpoint), fed by `<root>/plugins_registry`.
    pub fn plugins(&self) -> &csi::Plugins {
        &self.plugins
    }

    /// Makes every volume of the pod ready (idempotent; re-adopts existing mounts).
    /// `pod` is the worker's shared object: kept as it is for token refreshes, never copied.
    pub async fn setup(&self, pod: &Arc<Pod>) -> Result<PodVolumes, VolumeError> {
        let uid = pod_uid(pod)?;
        let _pod = self.pod_locks.lock(&uid).await;
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
        self.note_token_pod(&uid, pod);
        for vol in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let ready = self.setup_one(pod, &uid, vol).await?;
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
        let tokens = self.fetch_tokens(pod, vol, SystemTime::now()).await?;
        let (ctx, pod, vol) = (self.ctx.clone(), pod.clone(), vol.clone());
        let uid = uid.to_string();
        blocking(move || ctx.setup_local(&pod, &uid, &vol, &tokens)).await
    }

    /// Re-projects configMap, secret, downwardAPI and projected volumes from the store.
    pub async fn refresh(&self, pod: &Arc<Pod>, volumes: &PodVolumes) -> Result<(), VolumeError> {
        let uid = pod_uid(pod)?;
        let _pod = self.pod_locks.lock(&uid).await;
        self.note_token_pod(&uid, pod);
        self.reproject(pod, &uid, SystemTime::now(), |v| {
            volumes.volumes.contains_key(&v.name)
        })
        .await
    }

    /// Rewrites the pod's atomically written volumes that `which` selects (the caller holds the
    /// pod's volume lock).
    async fn reproject(
        &self,
        pod: &Arc<Pod>,
        uid: &str,
        now: SystemTime,
        which: impl Fn(&Volume) -> bool,
    ) -> Result<(), VolumeError> {
        for vol in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let atomic = vol.config_map.is_some()
                || vol.secret.is_some()
                || vol.downward_api.is_some()
                || vol.projected.is_some();
            if !atomic || !which(vol) {
                continue;
            }
            let tokens = self.fetch_tokens(pod, vol, now).await?;
            let (ctx, p, v, u) = (self.ctx.clone(), pod.clone(), vol.clone(), uid.to_string());
            blocking(move || ctx.setup_local(&p, &u, &v, &tokens).map(|_| ())).await?;
        }
        Ok(())
    }

    /// Unmounts and removes every volume of the pod (CSI unpublish/unstage). Idempotent.
    pub async fn teardown(&self, pod_uid: &str) -> Result<(), VolumeError> {
        let _pod = self.pod_locks.lock(&pod_uid.to_string()).await;
        self.teardown_locked(pod_uid).await
    }

    /// Retries the teardown of a pod no source wants (found on disk after a restart) whose
    /// first teardown failed, typically because its CSI driver has not registered again yet:
    /// with back-off (1 s doubling to 30 s, and at once when a driver registers) until it
    /// succeeds or `cancel` fires. A pod set up again meanwhile is left to its worker.
    pub async fn retry_orphan_teardown(&self, uid: String, cancel: CancellationToken) {
        let mut registered = self.plugins.subscribe();
        let mut retry = crate::retry::Retry::new(ORPHAN_RETRY_FIRST, ORPHAN_RETRY_MAX);
        loop {
            let delay = retry.fail();
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
                _ = registered.changed() => {}
            }
            let result = {
                let _pod = self.pod_locks.lock(&uid).await;
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
                    tracing::warn!(pod = %uid, error = %e, "tearing down orphan volumes")
                }
            }
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
                .map_err(csi_failed(name))?;
        }
        unmount_blocking(devices.clone()).await?;
        unmount_blocking(volumes.clone()).await?;
        for (name, rec) in &csi_records {
            let Some(staging) = &rec.staging_path else {
                continue;
            };
            let _staging = self.staging_locks.lock(staging).await;
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
                self.plugins.unstage(rec).await.map_err(csi_failed(name))?;
            }
            // This pod no longer uses the staging path: a teardown of another pod sharing it,
            // running right after, must not count it as a user and leave the path staged.
            if let Some(r) = self.records.lock().expect("records lock").get_mut(pod_uid) {
                if let Some(v) = r.volumes.get_mut(name) {
                    v.csi = None;
                }
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
        self.token_pods
            .lock()
            .expect("token pods lock")
            .remove(pod_uid);
        self.tokens.forget(pod_uid);
        Ok(())
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

impl Ctx {
    fn pod_dir(&self, uid: &str) -> PathBuf {
        crate::layout::pod_dir(&self.root, uid)
    }

    fn volumes_dir(&self, uid: &str) -> PathBuf {
        self.pod_dir(uid).join("volumes")
    }

    fn volume_dir(&self, uid: &str, plugin: &str, volume: &str) -> PathBuf {
        self.volumes_dir(uid).join(plugin).join(volume)
    }
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
