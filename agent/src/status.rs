//! The status manager: the one owner of every pod's reported status. Pod workers set it; the
//! read-only endpoint and the API sink read it. Each pod's status carries a version that only
//! grows, and a set that changes nothing is dropped, so sinks write only on change.
//! Each entry is one shared object: reading the set (`all`, on every change, by each sink)
//! copies pointers, never pods.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use tokio::sync::watch;

/// One pod as last reported: the desired object with the status computed for it.
#[derive(Clone, Debug)]
pub struct Reported {
    pub pod: Arc<Pod>,
    /// Grows by one on every change of `pod.status`.
    pub version: u64,
    /// Set once the worker has finished the pod (terminated, resources released).
    pub finished: bool,
}

#[derive(Clone, Default)]
pub struct StatusManager {
    pods: Arc<RwLock<BTreeMap<String, Reported>>>,
    changed: Arc<watch::Sender<u64>>,
}

impl StatusManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `status` for `pod` (keyed by UID). Returns false when nothing changed.
    pub fn set(&self, pod: &Pod, status: PodStatus) -> bool {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut pods = self.pods.write().expect("status lock");
        let entry = pods.entry(uid).or_insert_with(|| Reported {
            pod: Arc::default(),
            version: 0,
            finished: false,
        });
        let same_status = entry.pod.status.as_ref() == Some(&status);
        let same_meta = entry.pod.metadata == pod.metadata && entry.pod.spec == pod.spec;
        if same_status && same_meta {
            return false;
        }
        entry.pod = Arc::new(Pod {
            metadata: pod.metadata.clone(),
            spec: pod.spec.clone(),
            status: Some(status),
        });
        if !same_status {
            entry.version += 1;
        }
        drop(pods);
        self.changed.send_modify(|g| *g += 1);
        true
    }

    /// Marks the pod's worker done; the pod stays listed until `forget`.
    pub fn finish(&self, uid: &str) {
        if let Some(r) = self.pods.write().expect("status lock").get_mut(uid) {
            r.finished = true;
        }
        self.changed.send_modify(|g| *g += 1);
    }

    /// Drops a pod that no source wants any more.
    pub fn forget(&self, uid: &str) {
        self.pods.write().expect("status lock").remove(uid);
        self.changed.send_modify(|g| *g += 1);
    }

    pub fn get(&self, uid: &str) -> Option<Reported> {
        self.pods.read().expect("status lock").get(uid).cloned()
    }

    /// Every pod, ordered by UID.
    pub fn all(&self) -> Vec<Reported> {
        self.pods
            .read()
            .expect("status lock")
            .values()
            .cloned()
            .collect()
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
