//! The object store: ConfigMaps, Secrets, PersistentVolumeClaims and PersistentVolumes that pods
//! refer to. Sources (the manifest folder, the API) write it; volumes and env resolution read it.
//! Every change bumps a generation on a watch channel so readers can refresh projected content.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret};
use tokio::sync::watch;

/// The objects one source holds, keyed by (namespace, name); PVs are cluster-scoped (namespace "").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub config_maps: BTreeMap<(String, String), ConfigMap>,
    pub secrets: BTreeMap<(String, String), Secret>,
    pub claims: BTreeMap<(String, String), PersistentVolumeClaim>,
    pub volumes: BTreeMap<String, PersistentVolume>,
}

/// Shared, cheaply clonable handle to the current objects.
#[derive(Clone)]
pub struct ObjectStore {
    inner: Arc<RwLock<Objects>>,
    generation: watch::Sender<u64>,
}

impl Default for ObjectStore {
    fn default() -> Self {
        Self::new()
    }
}

impl ObjectStore {
    pub fn new() -> Self {
        let (generation, _) = watch::channel(0);
        Self {
            inner: Arc::default(),
            generation,
        }
    }

    /// Replaces the whole object set (a source's full resync) and notifies readers on change.
    pub fn replace(&self, objects: Objects) {
        let changed = {
            let mut guard = self.inner.write().expect("store lock");
            let changed = *guard != objects;
            *guard = objects;
            changed
        };
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Applies one change in place (an API watch event) and notifies readers.
    pub fn update(&self, f: impl FnOnce(&mut Objects)) {
        f(&mut self.inner.write().expect("store lock"));
        self.generation.send_modify(|g| *g += 1);
    }

    /// A receiver that wakes whenever the objects change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        let key = (namespace.to_string(), name.to_string());
        self.inner
            .read()
            .expect("store lock")
            .config_maps
            .get(&key)
            .cloned()
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        let key = (namespace.to_string(), name.to_string());
        self.inner
            .read()
            .expect("store lock")
            .secrets
            .get(&key)
            .cloned()
    }

    pub fn claim(&self, namespace: &str, name: &str) -> Option<PersistentVolumeClaim> {
        let key = (namespace.to_string(), name.to_string());
        self.inner
            .read()
            .expect("store lock")
            .claims
            .get(&key)
            .cloned()
    }

    pub fn volume(&self, name: &str) -> Option<PersistentVolume> {
        self.inner
            .read()
            .expect("store lock")
            .volumes
            .get(name)
            .cloned()
    }
}
