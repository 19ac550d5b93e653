//! The volume manager: for each pod, the desired volumes (from its spec) against the mounted
//! ones (on disk and in the mount table), and the code that brings one to the other. Handles
//! emptyDir, hostPath, configMap, secret, downwardAPI, projected (incl. serviceAccountToken),
//! persistentVolumeClaim → PV (hostPath, local dir or block device, CSI) and inline CSI.
//!
//! OWNER: volumes helper. Signatures here are the contract the pod worker codes against.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::runtime::{Device, Mount};
use crate::store::ObjectStore;

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
    /// A ReadWriteOnce/ReadWriteOncePod claim is in use by another pod on this node.
    #[error("volume {volume}: claim {claim:?} is in use by pod {other}")]
    InUse {
        volume: String,
        claim: String,
        other: String,
    },
    /// A hostPath type check failed, a subPath escapes, or the spec is invalid.
    #[error("volume {volume}: {detail}")]
    Invalid { volume: String, detail: String },
    /// A mount, CSI call or file write failed.
    #[error("volume {volume}: {detail}")]
    Failed { volume: String, detail: String },
}

impl VolumeError {
    /// The event reason: FailedMount for setup errors.
    pub fn reason(&self) -> &'static str {
        "FailedMount"
    }
}

pub struct VolumeManager {
    _todo: (),
}

impl VolumeManager {
    pub fn new(_config: VolumeConfig, _store: ObjectStore) -> Self {
        todo!()
    }

    /// Makes every volume of the pod ready (idempotent; re-adopts existing mounts).
    pub async fn setup(&self, _pod: &Pod) -> Result<PodVolumes, VolumeError> {
        todo!()
    }

    /// Re-projects configMap, secret, downwardAPI and projected volumes from the store.
    pub async fn refresh(&self, _pod: &Pod, _volumes: &PodVolumes) -> Result<(), VolumeError> {
        todo!()
    }

    /// The OCI mounts and devices for one container's volumeMounts/volumeDevices, with subPath
    /// and subPathExpr resolved safely beneath each volume.
    pub fn container_mounts(
        &self,
        _pod: &Pod,
        _container: &Container,
        _volumes: &PodVolumes,
    ) -> Result<(Vec<Mount>, Vec<Device>), VolumeError> {
        todo!()
    }

    /// Unmounts and removes every volume of the pod (CSI unpublish/unstage). Idempotent.
    pub async fn teardown(&self, _pod_uid: &str) -> Result<(), VolumeError> {
        todo!()
    }

    /// UIDs of pods with volume state on this host (for clean-up after a restart).
    pub fn list(&self) -> Vec<String> {
        todo!()
    }
}
