//! The manifest-folder source: every `*.yaml`, `*.yml` and `*.json` file in a folder, each
//! holding one or more documents (YAML `---` separated, or a `List`). Pods become desired pods;
//! ConfigMaps, Secrets, PersistentVolumeClaims and PersistentVolumes go to the object store so
//! pods' references resolve against them, as `podman kube play` does.
//!
//! The folder is re-read when inotify reports a change, and on a fixed period as a fallback; a file that fails to parse is reported once per
//! change and keeps its last good content, so one bad edit never stops running pods.
//! A pod's UID is derived from its file, its content and the node name (as the kubelet does for
//! static pods), so editing a manifest replaces the pod and re-reading it changes nothing.
//!
//! Each file is read bounded (`yaml::LIMITS`: its size is checked before it is read, nesting and
//! alias expansion while it is parsed) and every object is validated as the API server would
//! (`validation`), so one hostile file costs little and is refused with a reason. Two pods with
//! the same namespace/name are resolved as the kubelet's config resolves them: the one from the
//! first file (in name order) is kept, the other is refused with a `FailedValidation` reason.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::validation;
use super::yaml::{self, typed};
use crate::store::Objects;

/// Annotation keys the kubelet sets on static pods.
pub const CONFIG_SOURCE: &str = "kubernetes.io/config.source";
pub const CONFIG_HASH: &str = "kubernetes.io/config.hash";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// A document is not valid YAML/JSON.
    #[error("{file}: document {index}: {detail}")]
    Syntax {
        file: PathBuf,
        index: usize,
        detail: String,
    },
    /// A document parses but is not a valid object of its kind.
    #[error("{file}: document {index} ({kind} {name:?}): {detail}")]
    Invalid {
        file: PathBuf,
        index: usize,
        kind: String,
        name: String,
        detail: String,
    },
    /// A pod whose namespace/name an earlier file's pod already has (the kubelet's message).
    #[error("Error validating pod {}_{}({}) from file due to duplicate pod name {:?}, ignoring ({} is kept, {} is not)",
        .pod.metadata.name.as_deref().unwrap_or(""), .pod.metadata.namespace.as_deref().unwrap_or(""),
        .pod.metadata.uid.as_deref().unwrap_or(""), .pod.metadata.name.as_deref().unwrap_or(""),
        .kept.display(), .file.display())]
    Duplicate {
        file: PathBuf,
        kept: PathBuf,
        pod: Box<Pod>,
    },
}

impl ManifestError {
    /// The event reason: upstream's for a duplicate, ours for a file that cannot be used.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Duplicate { .. } => "FailedValidation",
            _ => "FailedManifest",
        }
    }

    /// The pod the error is about, when it is about one pod.
    pub fn pod(&self) -> Option<&Pod> {
        match self {
            Self::Duplicate { pod, .. } => Some(pod),
            _ => None,
        }
    }
}

/// What one file contributed. Its pods are the objects every later holder shares (the
/// snapshot, the merge, the pod workers, the status manager): none of them copies a pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileContent {
    pub pods: Vec<Arc<Pod>>,
    pub objects: Objects,
}

/// The folder's pods as its readers are handed them (the pod sync, cluster mode's static pods):
/// `None` until the folder has been read once; shared objects, never copies.
pub type FilePods = Option<Vec<Arc<Pod>>>;

/// The whole folder as last read.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub pods: Vec<Arc<Pod>>,
    pub objects: Objects,
    /// Files that failed this round (their last good content is still in `pods`/`objects`).
    pub errors: Vec<String>,
}

/// Reads a manifest folder, remembering each file's last good content.
pub struct ManifestSource {
    dir: PathBuf,
    node_name: String,
    files: BTreeMap<PathBuf, (Vec<u8>, FileContent)>,
    /// Files whose current content failed, by fingerprint, so each bad version is reported once.
    failed: BTreeMap<PathBuf, Vec<u8>>,
    /// Pods refused as duplicates last scan (file, UID), so each is reported once.
    duplicates: BTreeSet<(PathBuf, String)>,
}

impl ManifestSource {
    pub fn new(dir: PathBuf, node_name: &str) -> Self {
        Self {
            dir,
            node_name: node_name.to_string(),
            files: BTreeMap::new(),
            failed: BTreeMap::new(),
            duplicates: BTreeSet::new(),
        }
    }

    /// The folder this source reads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the folder. Returns the merged content and the errors new since the last scan.
    pub fn scan(&mut self) -> (Snapshot, Vec<ManifestError>) {
        let mut fresh_errors = Vec::new();
        let present = list_manifests(&self.dir);
        self.files.retain(|path, _| present.contains(path));
        self.failed.retain(|path, _| present.contains(path));
        for path in &present {
            let bytes = match read_bounded(path, yaml::LIMITS.max_bytes) {
                Ok(Ok(b)) => b,
                Ok(Err(too_large)) => {
                    // Remembered by size and time, never read.
                    if self.failed.get(path) != Some(&too_large.0) {
                        self.failed.insert(path.clone(), too_large.0);
                        fresh_errors.push(ManifestError::Syntax {
                            file: path.clone(),
                            index: 0,
                            detail: too_large.1,
                        });
                    }
                    self.files.remove(path);
                    continue;
                }
                Err(source) => {
                    fresh_errors.push(ManifestError::Read {
                        file: path.clone(),
                        source,
                    });
                    continue;
                }
            };
            if self.files.get(path).is_some_and(|(b, _)| *b == bytes) {
                self.failed.remove(path);
                continue;
            }
            if self.failed.get(path) == Some(&bytes) {
                continue;
            }
            match parse_file(path, &bytes, &self.node_name) {
                Ok(content) => {
                    self.failed.remove(path);
                    self.files.insert(path.clone(), (bytes, content));
                }
                Err(e) => {
                    self.failed.insert(path.clone(), bytes);
                    fresh_errors.push(e);
                }
            }
        }
        let (snapshot, duplicates) = self.snapshot();
        let reported: BTreeSet<(PathBuf, String)> = duplicates
            .iter()
            .map(|d| match d {
                ManifestError::Duplicate { file, pod, .. } => {
                    (file.clone(), pod.metadata.uid.clone().unwrap_or_default())
                }
                _ => Default::default(),
            })
            .collect();
        for (d, key) in duplicates.into_iter().zip(&reported) {
            if !self.duplicates.contains(key) {
                fresh_errors.push(d);
            }
        }
        self.duplicates = reported;
        (snapshot, fresh_errors)
    }

    /// The folder's content, the first file's pod winning a namespace/name, and the pods refused
    /// as duplicates.
    fn snapshot(&self) -> (Snapshot, Vec<ManifestError>) {
        let mut snap = Snapshot::default();
        let mut owners: BTreeMap<(String, String), &PathBuf> = BTreeMap::new();
        let mut duplicates = Vec::new();
        for (path, (_, content)) in &self.files {
            for pod in &content.pods {
                let m = &pod.metadata;
                let key = (
                    m.namespace.clone().unwrap_or_default(),
                    m.name.clone().unwrap_or_default(),
                );
                if let Some(kept) = owners.get(&key) {
                    duplicates.push(ManifestError::Duplicate {
                        file: path.clone(),
                        kept: (*kept).clone(),
                        pod: Box::new((**pod).clone()),
                    });
                    continue;
                }
                owners.insert(key, path);
                snap.pods.push(pod.clone());
            }
            let o = &content.objects;
            snap.objects.config_maps.extend(o.config_maps.clone());
            snap.objects.secrets.extend(o.secrets.clone());
            snap.objects.claims.extend(o.claims.clone());
            snap.objects.volumes.extend(o.volumes.clone());
        }
        snap.errors = self
            .failed
            .keys()
            .map(|p| p.display().to_string())
            .collect();
        (snap, duplicates)
    }
}

/// A file too large to read: what identifies this version of it, and the reason.
struct TooLarge(Vec<u8>, String);

/// A file's bytes, or (without reading it) why it is too large.
fn read_bounded(path: &Path, max: u64) -> std::io::Result<Result<Vec<u8>, TooLarge>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let too_large = |size: u64| {
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let fingerprint = format!("too large: {size} {}", mtime.as_nanos()).into_bytes();
        let reason = yaml::YamlError::TooLarge { size, limit: max }.to_string();
        Ok(Err(TooLarge(fingerprint, reason)))
    };
    if meta.len() > max {
        return too_large(meta.len());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return too_large(bytes.len() as u64);
    }
    Ok(Ok(bytes))
}

fn list_manifests(dir: &Path) -> BTreeSet<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            !name.starts_with('.') && matches!(ext, "yaml" | "yml" | "json") && p.is_file()
        })
        .collect()
}

/// Parses one file's documents; any bad document fails the whole file.
pub fn parse_file(
    path: &Path,
    bytes: &[u8],
    node_name: &str,
) -> Result<FileContent, ManifestError> {
    let text = String::from_utf8_lossy(bytes);
    let mut content = FileContent::default();
    let documents = yaml::documents(&text, yaml::LIMITS).map_err(|e| ManifestError::Syntax {
        file: path.to_path_buf(),
        index: 0,
        detail: e.to_string(),
    })?;
    for (index, value) in documents.into_iter().enumerate() {
        if !value.is_null() {
            add_document(path, index, value, node_name, &mut content)?;
        }
    }
    Ok(content)
}

fn add_document(
    path: &Path,
    index: usize,
    value: Value,
    node_name: &str,
    content: &mut FileContent,
) -> Result<(), ManifestError> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    let kind = text(value.get("kind"));
    let name = text(value.get("metadata").and_then(|m| m.get("name")));
    let invalid = |detail: String| ManifestError::Invalid {
        file: path.to_path_buf(),
        index,
        kind: kind.chars().take(64).collect(),
        name: name.chars().take(64).collect(),
        detail,
    };
    if !value.is_object() {
        return Err(invalid("a document must be an object".into()));
    }
    if name.is_empty() && kind != "List" {
        return Err(invalid("metadata.name: Required value".into()));
    }
    match kind.as_str() {
        "List" => {
            let items = value.get("items").cloned().unwrap_or_default();
            let Value::Array(items) = items else {
                return Err(invalid("items must be a list".into()));
            };
            for item in items {
                add_document(path, index, item, node_name, content)?;
            }
        }
        "Pod" => {
            let pod: Pod = typed(value).map_err(invalid)?;
            validation::pod(&pod).map_err(invalid)?;
            content
                .pods
                .push(Arc::new(static_pod(pod, path, node_name)));
        }
        "ConfigMap" => {
            let cm: ConfigMap = typed(value).map_err(invalid)?;
            validation::object_meta(&cm.metadata, true).map_err(invalid)?;
            let keys = cm.data.iter().flat_map(|d| d.keys());
            validation::config_keys(keys.chain(cm.binary_data.iter().flat_map(|d| d.keys())))
                .map_err(invalid)?;
            content.objects.config_maps.insert(key_of(&cm.metadata), cm);
        }
        "Secret" => {
            let mut secret: Secret = typed(value).map_err(invalid)?;
            validation::object_meta(&secret.metadata, true).map_err(invalid)?;
            // stringData is write-only in the API: fold it into data as the API server does.
            if let Some(strings) = secret.string_data.take() {
                let data = secret.data.get_or_insert_with(Default::default);
                for (k, v) in strings {
                    data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
                }
            }
            validation::config_keys(secret.data.iter().flat_map(|d| d.keys())).map_err(invalid)?;
            content
                .objects
                .secrets
                .insert(key_of(&secret.metadata), secret);
        }
        "PersistentVolumeClaim" => {
            let claim: PersistentVolumeClaim = typed(value).map_err(invalid)?;
            validation::object_meta(&claim.metadata, true).map_err(invalid)?;
            content
                .objects
                .claims
                .insert(key_of(&claim.metadata), claim);
        }
        "PersistentVolume" => {
            let pv: PersistentVolume = typed(value).map_err(invalid)?;
            validation::object_meta(&pv.metadata, false).map_err(invalid)?;
            content.objects.volumes.insert(name.clone(), pv);
        }
        "" => return Err(invalid("kind: Required value".into())),
        other => {
            let other: String = other.chars().take(64).collect();
            return Err(invalid(format!("kind {other} is not supported here")));
        }
    }
    Ok(())
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Fills in what the API server and scheduler would: namespace, UID, node name, source
/// annotations, defaults the worker relies on.
fn static_pod(mut pod: Pod, path: &Path, node_name: &str) -> Pod {
    let spec_json = serde_json::to_vec(&pod).unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(path.display().to_string().as_bytes());
    hasher.update([0]);
    hasher.update(node_name.as_bytes());
    hasher.update([0]);
    hasher.update(&spec_json);
    let hash = hex::encode(&hasher.finalize()[..16]);
    let meta = &mut pod.metadata;
    meta.namespace.get_or_insert_with(|| "default".into());
    meta.uid = Some(uid_of_hash(&hash));
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations.insert(CONFIG_SOURCE.into(), "file".into());
    annotations.insert(CONFIG_HASH.into(), hash);
    if meta.creation_timestamp.is_none() {
        meta.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        ));
    }
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = Some(node_name.to_string());
    }
    pod.status = None;
    pod
}

/// A static pod's UID from its hash (`kubernetes.io/config.hash`, 32 hex digits): the same
/// digits in the 8-4-4-4-12 form.
pub fn uid_of_hash(hash: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &hash[0..8],
        &hash[8..12],
        &hash[12..16],
        &hash[16..20],
        &hash[20..32]
    )
}

/// Wakes `notify` whenever a file in `dir` is closed after writing, moved in or out, or removed
/// (not on create: a file being written is read once it is closed), so a scan
/// follows a change at once instead of at the next period (the period stays the fallback, and
/// covers a folder that does not exist yet). Runs on a thread of its own, blocked in read(2).
pub fn watch_dir(dir: PathBuf, notify: std::sync::Arc<tokio::sync::Notify>) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let flags = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF;
    let spawned = std::thread::Builder::new()
        .name("manifest-watch".into())
        .spawn(move || loop {
            let watched = Inotify::init(InitFlags::IN_CLOEXEC).and_then(|ino| {
                ino.add_watch(&dir, flags)?;
                Ok(ino)
            });
            match watched {
                Ok(ino) => {
                    // Until the folder itself goes (IN_IGNORED ends the watch) or reads fail.
                    while let Ok(events) = ino.read_events() {
                        notify.notify_one();
                        if events
                            .iter()
                            .any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED))
                        {
                            break;
                        }
                    }
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_secs(1)),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no inotify watch of the manifest folder; polling only");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: app\n    image: busybox\n";

    fn parse(text: &str) -> Result<FileContent, ManifestError> {
        parse_file(Path::new("/m/a.yaml"), text.as_bytes(), "node-1")
    }

    #[test]
    fn a_pod_gets_namespace_node_uid_and_source_annotations() {
        let c = parse(POD).unwrap();
        let pod = &c.pods[0];
        assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(
            pod.spec.as_ref().unwrap().node_name.as_deref(),
            Some("node-1")
        );
        assert_eq!(pod.metadata.uid.as_ref().unwrap().len(), 36);
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[CONFIG_SOURCE],
            "file"
        );
    }

    #[test]
    fn the_uid_is_stable_for_the_same_content_and_changes_with_it() {
        let a = parse(POD).unwrap().pods[0].metadata.uid.clone();
        let b = parse(POD).unwrap().pods[0].metadata.uid.clone();
        let changed = parse(&POD.replace("busybox", "busybox:1")).unwrap().pods[0]
            .metadata
            .uid
            .clone();
        assert_eq!(a, b);
        assert_ne!(a, changed);
    }

    #[test]
    fn multi_document_files_carry_objects_and_lists() {
        let text = format!(
            "{POD}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\n  namespace: ns\ndata:\n  k: v\n\
             ---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  pw: hunter2\n\
             ---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: PersistentVolume\n  metadata:\n    name: pv1\n  spec:\n    capacity: {{storage: 1Gi}}\n    accessModes: [ReadWriteOnce]\n    hostPath: {{path: /tmp}}\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.pods.len(), 1);
        assert!(c
            .objects
            .config_maps
            .contains_key(&("ns".into(), "cfg".into())));
        let secret = &c.objects.secrets[&("default".into(), "s".into())];
        assert_eq!(secret.data.as_ref().unwrap()["pw"].0, b"hunter2");
        assert!(c.objects.volumes.contains_key("pv1"));
    }

    #[test]
    fn json_documents_parse() {
        let json = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"j"},"spec":{"containers":[{"name":"c","image":"i"}]}}"#;
        assert_eq!(parse(json).unwrap().pods.len(), 1);
    }

    #[test]
    fn invalid_documents_are_reported_with_file_index_and_reason() {
        let cases = [
            ("kind: Pod\nmetadata: {name: x}\nspec: {containers: []}\n", "spec.containers: Required value"),
            ("kind: Pod\nmetadata: {name: x}\nspec:\n  containers:\n  - {name: A, image: i}\n", "RFC 1123 label"),
            ("kind: Pod\nmetadata: {name: x}\nspec:\n  containers:\n  - {name: a}\n", "spec.containers[0].image: Required value"),
            ("kind: Deployment\nmetadata: {name: x}\n", "not supported"),
            ("kind: Pod\nspec: {}\n", "metadata.name"),
            ("kind: Pod\nmetadata: {name: x}\nspec:\n  containers:\n  - name: a\n    image: i\n    volumeMounts: [{name: v, mountPath: /v}]\n", "names no volume"),
            ("kind: Pod\nmetadata: {name: x\n", "document 0"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
            assert!(err.contains("/m/a.yaml"), "{err:?} names the file");
        }
    }

    #[test]
    fn manifests_read_as_kubectl_reads_them() {
        let text = "kind: Pod\nmetadata: {name: x}\nspec:\n  hostNetwork: yes\n  containers:\n  - {name: a, image: i}\n  volumes:\n  - name: s\n    secret: {secretName: s, defaultMode: 0400}\n";
        let pod = &parse(text).unwrap().pods[0];
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.host_network, Some(true));
        let mode = spec.volumes.as_ref().unwrap()[0]
            .secret
            .as_ref()
            .unwrap()
            .default_mode;
        assert_eq!(mode, Some(256));
        let err = parse(&text.replace("image: i", "image: yes"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.containers[0].image: invalid type: boolean `true`"),
            "{err}"
        );
    }

    #[test]
    fn hostile_names_and_huge_files_are_refused_with_a_reason() {
        let err = parse(&POD.replace("name: web", "name: ../../x"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("metadata.name: Invalid value: \"../../x\""),
            "{err}"
        );
        let err = parse(&format!("{}{}", "[".repeat(100), "]".repeat(100)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nesting deeper than 64 levels"), "{err}");
        let err = parse("kind: ConfigMap\nmetadata: {name: c}\ndata: {../x: v}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("data[\"../x\"]"), "{err}");
    }

    #[test]
    fn the_first_file_wins_a_pod_name_and_the_other_is_refused_once() {
        let dir = std::env::temp_dir().join(format!("nodelet-dup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("b.yaml"), POD).unwrap();
        std::fs::write(dir.join("a.yaml"), POD.replace("busybox", "busybox:2")).unwrap();
        for _restart in 0..2 {
            let mut source = ManifestSource::new(dir.clone(), "n");
            let (snap, errors) = source.scan();
            assert_eq!(snap.pods.len(), 1);
            let image = snap.pods[0].spec.as_ref().unwrap().containers[0]
                .image
                .clone();
            assert_eq!(image.as_deref(), Some("busybox:2"), "a.yaml comes first");
            assert_eq!(errors.len(), 1);
            assert_eq!(errors[0].reason(), "FailedValidation");
            let text = errors[0].to_string();
            assert!(
                text.starts_with("Error validating pod web_default("),
                "{text}"
            );
            assert!(
                text.contains("from file due to duplicate pod name \"web\", ignoring"),
                "{text}"
            );
            let (_, errors) = source.scan();
            assert!(errors.is_empty(), "reported once");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_oversized_file_is_refused_unread_and_reported_once() {
        let dir = std::env::temp_dir().join(format!("nodelet-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("big.yaml"), "[".repeat(5 * 1024 * 1024)).unwrap();
        std::fs::write(dir.join("web.yaml"), POD).unwrap();
        let mut source = ManifestSource::new(dir.clone(), "n");
        let (snap, errors) = source.scan();
        assert_eq!(snap.pods.len(), 1);
        let text = errors[0].to_string();
        assert!(
            text.contains("the file is 5242880 bytes, more than the limit of 3145728"),
            "{text}"
        );
        assert!(source.scan().1.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_edit_keeps_the_last_good_content_and_is_reported_once() {
        let dir = std::env::temp_dir().join(format!("nodelet-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("web.yaml");
        std::fs::write(&file, POD).unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let mut source = ManifestSource::new(dir.clone(), "n");
        let (snap, errors) = source.scan();
        assert_eq!((snap.pods.len(), errors.len()), (1, 0));
        let uid = snap.pods[0].metadata.uid.clone();

        std::fs::write(&file, "kind: Pod\nmetadata: [").unwrap();
        let (snap, errors) = source.scan();
        assert_eq!(errors.len(), 1);
        assert_eq!(snap.pods[0].metadata.uid, uid, "last good content kept");
        assert_eq!(snap.errors.len(), 1);
        let (_, errors) = source.scan();
        assert!(errors.is_empty(), "the same bad bytes are reported once");

        std::fs::remove_file(&file).unwrap();
        let (snap, _) = source.scan();
        assert!(snap.pods.is_empty() && snap.errors.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_write_into_the_folder_wakes_the_watcher() {
        let dir = std::env::temp_dir().join(format!("nodelet-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let notify = std::sync::Arc::new(tokio::sync::Notify::new());
        watch_dir(dir.clone(), notify.clone());
        // The watch is set up on its own thread: keep writing until it reports.
        let woke = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            for i in 0.. {
                std::fs::write(dir.join(format!("p{i}.yaml")), POD).unwrap();
                let wait = tokio::time::sleep(std::time::Duration::from_millis(200));
                tokio::select! {
                    _ = notify.notified() => return,
                    _ = wait => {}
                }
            }
        })
        .await;
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            woke.is_ok(),
            "no inotify wake-up for writes into the folder"
        );
    }
}
