//! What the volume manager did for each pod (the claims it uses, its CSI publications),
//! recorded in `<root>/pods/<uid>/volumes/.state.json` before each mount so that teardown
//! needs only the UID and works after an agent restart. The manager holds the records of every
//! pod in one map; a pod's entry is changed only under that pod's lock (see `locks`), and
//! checks across pods (ReadWriteOncePod, a shared staging path) read the map in one hold.

use std::collections::BTreeMap;
use std::fs;

use serde::{Deserialize, Serialize};

use super::{csi, failed, Ctx, VolumeError, VolumeManager};

const STATE_FILE: &str = ".state.json";

/// A claim a pod uses, recorded for the ReadWriteOncePod check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ClaimUse {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) pv: String,
    pub(super) access_modes: Vec<String>,
}

/// What the manager did for one pod volume.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct VolumeRecord {
    pub(super) claim: Option<ClaimUse>,
    pub(super) csi: Option<csi::CsiRecord>,
}

/// What the manager did for one pod, persisted beside its volumes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PodRecord {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) volumes: BTreeMap<String, VolumeRecord>,
}

/// The records a previous run left for `uids`.
pub(super) fn load(ctx: &Ctx, uids: Vec<String>) -> BTreeMap<String, PodRecord> {
    let mut records = BTreeMap::new();
    for uid in uids {
        if let Ok(text) = fs::read(ctx.volumes_dir(&uid).join(STATE_FILE)) {
            if let Ok(rec) = serde_json::from_slice::<PodRecord>(&text) {
                records.insert(uid, rec);
            }
        }
    }
    records
}

impl VolumeManager {
    /// UIDs of pods with volume state on this host (for clean-up after a restart).
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(crate::layout::pods_dir(&self.ctx.root)) else {
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

    pub(super) fn record(
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

    pub(super) fn save(&self, uid: &str) -> Result<(), VolumeError> {
        let rec = self
            .records
            .lock()
            .expect("records lock")
            .get(uid)
            .cloned()
            .unwrap_or_default();
        let dir = self.ctx.volumes_dir(uid);
        let text = serde_json::to_vec_pretty(&rec).map_err(|e| failed("", e))?;
        fs::create_dir_all(&dir)
            .and_then(|()| crate::layout::write_atomic(&dir.join(STATE_FILE), &text, 0o600))
            .map_err(|e| failed("", format!("writing volume state of pod {uid}: {e}")))
    }
}
