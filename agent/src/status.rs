//! The status manager: the one owner of every pod's reported status. Pod workers set it; the
//! read-only endpoint and the API sink read it. Each pod's status carries a version that only
//! grows, and a set that changes nothing is dropped, so sinks write only on change.
//! Nothing here is a copy: an entry holds the desired pod its worker has (one `Arc`) and the
//! status the worker computed (one `Arc`, the worker's own); reading the set (`all`, on every
//! change, by each sink) copies pointers, never pods.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use tokio::sync::watch;

/// One pod as last reported: the desired object and the status computed for it.
#[derive(Clone, Debug)]
pub struct Reported {
    /// The pod as its source handed it to its worker (shared). Its own `status` is the
    /// source's (the API's copy in cluster mode): the agent's is [`Reported::status`].
    pub desired: Arc<Pod>,
    pub status: Arc<PodStatus>,
    /// Grows by one on every change of `status`.
    pub version: u64,
    /// Set once the worker has finished the pod (terminated, resources released).
    pub finished: bool,
}

impl Reported {
    /// The pod with the agent's status, as `/pods` shows it (a copy).
    pub fn pod(&self) -> Pod {
        Pod {
            metadata: self.desired.metadata.clone(),
            spec: self.desired.spec.clone(),
            status: Some((*self.status).clone()),
        }
    }
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
    pub fn set(&self, pod: &Arc<Pod>, status: Arc<PodStatus>) -> bool {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut pods = self.pods.write().expect("status lock");
        match pods.get_mut(&uid) {
            Some(entry) => {
                let same_status = Arc::ptr_eq(&entry.status, &status) || *entry.status == *status;
                let same_pod = Arc::ptr_eq(&entry.desired, pod)
                    || (entry.desired.metadata == pod.metadata && entry.desired.spec == pod.spec);
                if same_status && same_pod {
                    return false;
                }
                // The newer pod object is kept either way: the older one goes with it.
                entry.desired = pod.clone();
                if !same_status {
                    entry.status = status;
                    entry.version += 1;
                }
            }
            None => {
                pods.insert(
                    uid,
                    Reported {
                        desired: pod.clone(),
                        status,
                        version: 1,
                        finished: false,
                    },
                );
            }
        }
        drop(pods);
        self.changed.send_modify(|g| *g += 1);
        true
    }

    /// Marks the pod's worker done; the pod stays listed until `forget`.
    pub fn finish(&self, uid: &str) {
        let changed = self
            .pods
            .write()
            .expect("status lock")
            .get_mut(uid)
            .is_some_and(|r| !std::mem::replace(&mut r.finished, true));
        if changed {
            self.changed.send_modify(|g| *g += 1);
        }
    }

    /// Drops a pod that no source wants any more.
    pub fn forget(&self, uid: &str) {
        let changed = self
            .pods
            .write()
            .expect("status lock")
            .remove(uid)
            .is_some();
        if changed {
            self.changed.send_modify(|g| *g += 1);
        }
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

    /// Wakes on every change, and only then (memory is given back once it is quiet).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_wake_on_changes_only() {
        let status = StatusManager::new();
        let mut changes = status.subscribe();
        let pod = Arc::new(Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                uid: Some("u".into()),
                ..Default::default()
            },
            ..Default::default()
        });
        let quiet = |changes: &mut watch::Receiver<u64>| !changes.has_changed().expect("sender");
        status.forget("u");
        status.finish("u");
        assert!(quiet(&mut changes), "nothing known: nothing changed");
        assert!(status.set(&pod, Arc::default()));
        assert!(changes.has_changed().expect("sender"));
        changes.mark_unchanged();
        assert!(!status.set(&pod, Arc::default()));
        assert!(quiet(&mut changes), "the same status again");
        status.finish("u");
        assert!(changes.has_changed().expect("sender"));
        changes.mark_unchanged();
        status.finish("u");
        assert!(quiet(&mut changes), "finished twice");
        status.forget("u");
        assert!(changes.has_changed().expect("sender"));
        changes.mark_unchanged();
        status.forget("u");
        assert!(quiet(&mut changes), "forgotten twice");
    }
}
