//! The object store: ConfigMaps, Secrets, PersistentVolumeClaims and PersistentVolumes that pods
//! refer to. Sources (the manifest folder, the API) write it; volumes and env resolution read it.
//! Every change bumps a generation on a watch channel so readers can refresh projected content.
//!
//! Two sources write it side by side: the manifest folder resyncs its whole set with `replace`,
//! the API source changes single objects with `update`. Each writes its own layer, so neither
//! wipes the other's objects; a lookup sees an `update`d object before a `replace`d one.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret, Service,
};
use tokio::sync::watch;

/// The objects one source holds, keyed by (namespace, name); PVs are cluster-scoped (namespace "").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub config_maps: BTreeMap<(String, String), ConfigMap>,
    pub secrets: BTreeMap<(String, String), Secret>,
    pub claims: BTreeMap<(String, String), PersistentVolumeClaim>,
    pub volumes: BTreeMap<String, PersistentVolume>,
    /// Every Service of the cluster (for the pods' service environment variables).
    pub services: BTreeMap<(String, String), Service>,
}

/// The two layers: what `replace` resyncs and what `update` changes.
#[derive(Debug, Default)]
struct Layers {
    replaced: Objects,
    updated: Objects,
}

impl Layers {
    fn find<T: Clone>(&self, pick: impl Fn(&Objects) -> Option<&T>) -> Option<T> {
        pick(&self.updated)
            .or_else(|| pick(&self.replaced))
            .cloned()
    }
}

/// Shared, cheaply clonable handle to the current objects.
#[derive(Clone)]
pub struct ObjectStore {
    inner: Arc<RwLock<Layers>>,
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

    /// Replaces the whole object set of the resyncing source (the manifest folder) and notifies
    /// readers on change. Objects written with `update` stay.
    pub fn replace(&self, objects: Objects) {
        let changed = {
            let mut guard = self.inner.write().expect("store lock");
            let changed = guard.replaced != objects;
            guard.replaced = objects;
            changed
        };
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Applies one change in place (an API watch event) and notifies readers.
    pub fn update(&self, f: impl FnOnce(&mut Objects)) {
        f(&mut self.inner.write().expect("store lock").updated);
        self.generation.send_modify(|g| *g += 1);
    }

    /// A receiver that wakes whenever the objects change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        let key = (namespace.to_string(), name.to_string());
        self.layers().find(|o| o.config_maps.get(&key))
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        let key = (namespace.to_string(), name.to_string());
        self.layers().find(|o| o.secrets.get(&key))
    }

    pub fn claim(&self, namespace: &str, name: &str) -> Option<PersistentVolumeClaim> {
        let key = (namespace.to_string(), name.to_string());
        self.layers().find(|o| o.claims.get(&key))
    }

    pub fn volume(&self, name: &str) -> Option<PersistentVolume> {
        self.layers().find(|o| o.volumes.get(name))
    }

    /// Every Service in the store (an `update`d one before a `replace`d one of the same key).
    pub fn services(&self) -> Vec<Service> {
        let layers = self.layers();
        let mut all = layers.replaced.services.clone();
        all.extend(layers.updated.services.clone());
        all.into_values().collect()
    }

    fn layers(&self) -> std::sync::RwLockReadGuard<'_, Layers> {
        self.inner.read().expect("store lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(value: &str) -> ConfigMap {
        ConfigMap {
            data: Some([("k".to_string(), value.to_string())].into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_resync_keeps_the_objects_written_one_by_one() {
        let store = ObjectStore::new();
        let key = ("ns".to_string(), "api".to_string());
        store.update(|o| {
            o.config_maps.insert(key.clone(), cm("from-api"));
        });
        let mut files = Objects::default();
        files
            .config_maps
            .insert(("ns".into(), "file".into()), cm("from-file"));
        store.replace(files);
        assert_eq!(store.config_map("ns", "api"), Some(cm("from-api")));
        assert_eq!(store.config_map("ns", "file"), Some(cm("from-file")));
        store.replace(Objects::default());
        assert_eq!(store.config_map("ns", "file"), None);
        assert_eq!(store.config_map("ns", "api"), Some(cm("from-api")));
        store.update(|o| {
            o.config_maps.remove(&key);
        });
        assert_eq!(store.config_map("ns", "api"), None);
    }
}
