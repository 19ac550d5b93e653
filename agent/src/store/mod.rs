//! The object store: ConfigMaps, Secrets, PersistentVolumeClaims and PersistentVolumes that pods
//! refer to. Sources (the manifest folder, the API) write it; volumes and env resolution read it.
//! Every change bumps a generation on a watch channel and is logged by key, so that a reader
//! (a pod worker) can ask what changed since it last looked and act only on the objects its pod
//! refers to (`refs`).
//!
//! Two sources write it side by side: the manifest folder resyncs its whole set with `replace`,
//! the API source changes single objects with the `set_*` calls. Each writes its own layer, so
//! neither wipes the other's objects; a lookup sees a `set` object before a `replace`d one.

pub mod refs;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, RwLock};

pub use refs::ObjectRef;

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

/// How many changed keys the store remembers; a reader further behind sees "anything changed".
const CHANGE_LOG: usize = 4096;

/// The two layers: what `replace` resyncs and what `set_*` changes, and the change log.
#[derive(Debug, Default)]
struct Layers {
    replaced: Objects,
    updated: Objects,
    /// The generation: how many changes were made.
    generation: u64,
    /// (generation, key) of the last `CHANGE_LOG` changes, oldest first.
    log: VecDeque<(u64, ObjectRef)>,
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
    /// readers of what changed. Objects written with `set_*` stay.
    pub fn replace(&self, objects: Objects) {
        let mut changed = BTreeSet::new();
        let mut guard = self.inner.write().expect("store lock");
        let old = &guard.replaced;
        diff(
            &old.config_maps,
            &objects.config_maps,
            &mut changed,
            ObjectRef::config_map,
        );
        diff(
            &old.secrets,
            &objects.secrets,
            &mut changed,
            ObjectRef::secret,
        );
        diff(&old.claims, &objects.claims, &mut changed, ObjectRef::claim);
        diff(&old.volumes, &objects.volumes, &mut changed, |n| {
            ObjectRef::volume(n)
        });
        if old.services != objects.services {
            changed.insert(ObjectRef::Services);
        }
        guard.replaced = objects;
        self.log(guard, changed);
    }

    /// Sets (Some) or removes (None) the API's copy of a ConfigMap.
    pub fn set_config_map(&self, namespace: &str, name: &str, value: Option<ConfigMap>) {
        let key = (namespace.to_string(), name.to_string());
        self.set(|o| &mut o.config_maps, key, value, ObjectRef::config_map);
    }

    /// Sets (Some) or removes (None) the API's copy of a Secret.
    pub fn set_secret(&self, namespace: &str, name: &str, value: Option<Secret>) {
        let key = (namespace.to_string(), name.to_string());
        self.set(|o| &mut o.secrets, key, value, ObjectRef::secret);
    }

    /// Sets (Some) or removes (None) the API's copy of a PersistentVolumeClaim.
    pub fn set_claim(&self, namespace: &str, name: &str, value: Option<PersistentVolumeClaim>) {
        let key = (namespace.to_string(), name.to_string());
        self.set(|o| &mut o.claims, key, value, ObjectRef::claim);
    }

    /// Sets (Some) or removes (None) the API's copy of a PersistentVolume.
    pub fn set_volume(&self, name: &str, value: Option<PersistentVolume>) {
        self.set(
            |o| &mut o.volumes,
            name.to_string(),
            value,
            |n| ObjectRef::volume(n),
        );
    }

    /// Replaces the API's Services (all of the cluster's).
    pub fn set_services(&self, services: BTreeMap<(String, String), Service>) {
        let mut guard = self.inner.write().expect("store lock");
        if guard.updated.services == services {
            return;
        }
        guard.updated.services = services;
        self.log(guard, [ObjectRef::Services].into());
    }

    /// The current generation and the keys changed after generation `seen`: `None` when the
    /// log no longer reaches back that far (treat everything as changed).
    pub fn changes_since(&self, seen: u64) -> (u64, Option<BTreeSet<ObjectRef>>) {
        let layers = self.layers();
        let reaches = match layers.log.front() {
            Some((first, _)) => *first <= seen + 1,
            None => true,
        };
        let keys = reaches.then(|| {
            layers
                .log
                .iter()
                .filter(|(g, _)| *g > seen)
                .map(|(_, k)| k.clone())
                .collect()
        });
        (layers.generation, keys)
    }

    /// The current generation (see `changes_since`).
    pub fn generation(&self) -> u64 {
        self.layers().generation
    }

    fn set<K: Ord, V: PartialEq>(
        &self,
        map: impl FnOnce(&mut Objects) -> &mut BTreeMap<K, V>,
        key: K,
        value: Option<V>,
        changed: impl FnOnce(&K) -> ObjectRef,
    ) {
        let mut guard = self.inner.write().expect("store lock");
        let map = map(&mut guard.updated);
        if map.get(&key) == value.as_ref() {
            return;
        }
        let changed = changed(&key);
        match value {
            Some(v) => map.insert(key, v),
            None => map.remove(&key),
        };
        self.log(guard, [changed].into());
    }

    /// Logs `changed` under a new generation each and wakes the readers.
    fn log(
        &self,
        mut guard: std::sync::RwLockWriteGuard<'_, Layers>,
        changed: BTreeSet<ObjectRef>,
    ) {
        if changed.is_empty() {
            return;
        }
        for key in changed {
            guard.generation += 1;
            let generation = guard.generation;
            guard.log.push_back((generation, key));
            if guard.log.len() > CHANGE_LOG {
                guard.log.pop_front();
            }
        }
        let generation = guard.generation;
        drop(guard);
        self.generation.send_modify(|g| *g = (*g).max(generation));
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

    /// Every Service in the store (a `set` one before a `replace`d one of the same key).
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

/// The keys of the store's maps as the references the change log records.
impl ObjectRef {
    fn config_map((namespace, name): &(String, String)) -> Self {
        let (namespace, name) = (namespace.clone(), name.clone());
        ObjectRef::ConfigMap { namespace, name }
    }

    fn secret((namespace, name): &(String, String)) -> Self {
        let (namespace, name) = (namespace.clone(), name.clone());
        ObjectRef::Secret { namespace, name }
    }

    fn claim((namespace, name): &(String, String)) -> Self {
        let (namespace, name) = (namespace.clone(), name.clone());
        ObjectRef::Claim { namespace, name }
    }

    fn volume(name: &str) -> Self {
        ObjectRef::Volume { name: name.into() }
    }
}

/// Adds `key(k)` to `changed` for every key added, removed or changed from `old` to `new`.
fn diff<K: Ord, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    changed: &mut BTreeSet<ObjectRef>,
    key: impl Fn(&K) -> ObjectRef,
) {
    for (k, v) in old {
        if new.get(k) != Some(v) {
            changed.insert(key(k));
        }
    }
    for k in new.keys().filter(|k| !old.contains_key(k)) {
        changed.insert(key(k));
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
        store.set_config_map("ns", "api", Some(cm("from-api")));
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
        store.set_config_map("ns", "api", None);
        assert_eq!(store.config_map("ns", "api"), None);
    }

    fn config_map(name: &str) -> ObjectRef {
        ObjectRef::ConfigMap {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    #[test]
    fn readers_learn_which_objects_changed_and_a_rewrite_of_the_same_value_is_no_change() {
        let store = ObjectStore::new();
        let start = store.generation();
        store.set_config_map("ns", "a", Some(cm("1")));
        store.set_config_map("ns", "a", Some(cm("1")));
        let (after_a, changed) = store.changes_since(start);
        assert_eq!(changed, Some([config_map("a")].into()));
        let mut files = Objects::default();
        files.config_maps.insert(("ns".into(), "b".into()), cm("2"));
        store.replace(files.clone());
        store.replace(files);
        store.set_volume("pv", Some(PersistentVolume::default()));
        let (now, changed) = store.changes_since(after_a);
        let volume = ObjectRef::Volume { name: "pv".into() };
        assert_eq!(changed, Some([config_map("b"), volume].into()));
        assert_eq!(store.changes_since(now), (now, Some(BTreeSet::new())));
        store.set_services(BTreeMap::new());
        assert_eq!(store.changes_since(now).1, Some(BTreeSet::new()));
    }

    #[test]
    fn a_reader_behind_the_log_is_told_that_anything_may_have_changed() {
        let store = ObjectStore::new();
        let start = store.generation();
        for i in 0..=CHANGE_LOG {
            store.set_config_map("ns", "a", Some(cm(&i.to_string())));
        }
        assert_eq!(store.changes_since(start).1, None);
        let recent = store.generation() - 1;
        assert_eq!(
            store.changes_since(recent).1,
            Some([config_map("a")].into())
        );
    }
}
