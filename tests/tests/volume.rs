//! Volume manager against the real host: real mounts (bind, tmpfs, ext4 on loop devices), the
//! mount table, and the atomic writer on disk. Needs root. Each test gets its own root dir and
//! cleans up its mounts and loop devices even when it fails.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
};
use nodelet::store::{ObjectStore, Objects};
use nodelet::volume::csi::Driver;
use nodelet::volume::downward::NodeAllocatable;
use nodelet::volume::{
    IssuedToken, PodVolumes, TokenRequest, TokenSource, VolumeConfig, VolumeError, VolumeManager,
};
use nodelet_tests::csi_support::{loops_backed_under, LoopPlugin, LOOP_DRIVER};
use serde_json::{json, Value};

/// A temp root, its manager and store; unmounts and detaches everything on drop.
struct Host {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: ObjectStore,
    /// The objects the test wrote, as the store's file layer holds them.
    objects: std::sync::Mutex<Objects>,
    vm: Arc<VolumeManager>,
    loops: Vec<String>,
}

/// A volume manager over `root` and `store`, with an optional token issuer.
fn manager(
    root: &Path,
    store: &ObjectStore,
    tokens: Option<Arc<dyn TokenSource>>,
) -> Arc<VolumeManager> {
    VolumeManager::new(
        VolumeConfig {
            root_dir: root.to_path_buf(),
            plugins_registry: root.join("plugins_registry"),
            allocatable: NodeAllocatable::from_host(root),
        },
        store.clone(),
        tokens,
    )
}

impl Host {
    /// Sets the pod's volumes up, as a worker hands its shared pod to the manager.
    async fn setup(&self, pod: &Pod) -> Result<PodVolumes, VolumeError> {
        self.vm.setup(&Arc::new(pod.clone())).await
    }

    /// Re-projects the pod's volumes, as a worker does.
    async fn refresh(&self, pod: &Pod, volumes: &PodVolumes) -> Result<(), VolumeError> {
        self.vm.refresh(&Arc::new(pod.clone()), volumes).await
    }

    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nodelet-vol-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        let store = ObjectStore::new();
        let vm = manager(&root, &store, None);
        Self {
            _dir: dir,
            root,
            store,
            objects: Default::default(),
            vm,
            loops: Vec::new(),
        }
    }

    /// A fresh manager over the same root and store (an agent restart).
    fn restart(&mut self) {
        self.vm = manager(&self.root, &self.store, None);
    }

    /// A fresh manager over the same root and store whose projected tokens come from
    /// `tokens` (an agent restarted in cluster mode).
    fn restart_with_tokens(&mut self, tokens: Arc<dyn TokenSource>) {
        self.vm = manager(&self.root, &self.store, Some(tokens));
    }

    /// Changes the test's objects; the store learns which ones changed, as from a resync.
    fn objects(&self, f: impl FnOnce(&mut Objects)) {
        let mut objects = self.objects.lock().unwrap();
        f(&mut objects);
        self.store.replace(objects.clone());
    }

    /// A sparse file attached to a loop device.
    fn loop_device(&mut self, size_mb: u64) -> PathBuf {
        let file = self.root.join(format!("backing-{}.img", self.loops.len()));
        fs::File::create(&file)
            .unwrap()
            .set_len(size_mb << 20)
            .unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        self.loops.push(dev.clone());
        PathBuf::from(dev)
    }

    fn mounts(&self) -> Vec<Mounted> {
        mounts_under(&self.root)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for _ in 0..8 {
            let found = mounts_under(&self.root);
            if found.is_empty() {
                break;
            }
            for m in found {
                let _ = Command::new("umount").arg("-l").arg(&m.point).status();
            }
        }
        for dev in &self.loops {
            let _ = Command::new("losetup").arg("-d").arg(dev).status();
        }
        // Loop devices a CSI plugin attached to backing files under this root.
        for dev in loops_backed_under(&self.root) {
            let _ = Command::new("losetup").arg("-d").arg(dev).status();
        }
    }
}

#[derive(Debug, Clone)]
struct Mounted {
    point: PathBuf,
    fs_type: String,
    super_opts: String,
    opts: String,
}

fn mounts_under(root: &Path) -> Vec<Mounted> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut out: Vec<Mounted> = text
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(Mounted {
                point: PathBuf::from(left[4].replace("\\040", " ")),
                opts: left[5].to_string(),
                fs_type: right[0].to_string(),
                super_opts: right.get(2).unwrap_or(&"").to_string(),
            })
        })
        .filter(|m| m.point.starts_with(root))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.point.components().count()));
    out
}

fn mount_at(host: &Host, path: &Path) -> Option<Mounted> {
    host.mounts().into_iter().find(|m| m.point == path)
}

fn pod(uid: &str, volumes: Value, mounts: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": format!("pod-{uid}"), "namespace": "default", "uid": uid,
                     "labels": {"app": "web", "tier": "front"}},
        "spec": {
            "nodeName": "node-1",
            "volumes": volumes,
            "containers": [{"name": "c", "image": "busybox", "volumeMounts": mounts}]
        }
    }))
    .unwrap()
}

fn container(p: &Pod) -> Container {
    p.spec.as_ref().unwrap().containers[0].clone()
}

fn config_map(name: &str, data: Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": "default"}, "data": data}),
    )
    .unwrap()
}

fn key(name: &str) -> (String, String) {
    ("default".to_string(), name.to_string())
}

fn claim(name: &str, volume_name: Option<&str>, modes: &[&str]) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"accessModes": modes, "volumeName": volume_name}
    }))
    .unwrap()
}

fn pv(name: &str, claim: Option<&str>, source: Value) -> PersistentVolume {
    let mut spec = json!({"capacity": {"storage": "1Gi"}});
    for (k, v) in source.as_object().unwrap() {
        spec[k] = v.clone();
    }
    if let Some(c) = claim {
        spec["claimRef"] = json!({"namespace": "default", "name": c});
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

fn host_path(v: &PodVolumes, name: &str) -> PathBuf {
    v.volumes[name].host_path.clone()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn is_erofs(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(30)
}

#[tokio::test]
async fn empty_dir_on_disk_and_tmpfs_with_size_limit() {
    let host = Host::new();
    let p = pod(
        "ed-1",
        json!([
            {"name": "disk", "emptyDir": {}},
            {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}
        ]),
        json!([]),
    );
    let v = host.setup(&p).await.unwrap();
    let disk = host_path(&v, "disk");
    assert_eq!(
        disk,
        host.root
            .join("pods/ed-1/volumes/kubernetes.io~empty-dir/disk")
    );
    assert!(disk.is_dir());
    assert_eq!(mode(&disk), 0o777);
    assert!(
        mount_at(&host, &disk).is_none(),
        "disk emptyDir is not a mount"
    );
    let mem = host_path(&v, "mem");
    let m = mount_at(&host, &mem).expect("tmpfs mounted");
    assert_eq!(m.fs_type, "tmpfs");
    assert!(m.super_opts.contains("size=16384k"), "{m:?}");
    // Idempotent: a second setup re-adopts the mount instead of stacking another.
    host.setup(&p).await.unwrap();
    assert_eq!(host.mounts().len(), 1);
    assert_eq!(host.vm.list(), vec!["ed-1".to_string()]);
    host.vm.teardown("ed-1").await.unwrap();
    assert!(host.mounts().is_empty());
    assert!(!host.root.join("pods/ed-1").exists());
    assert!(host.vm.list().is_empty());
    // Idempotent teardown.
    host.vm.teardown("ed-1").await.unwrap();
}

#[tokio::test]
async fn host_path_type_checks() {
    let host = Host::new();
    let base = host.root.join("hp");
    fs::create_dir_all(&base).unwrap();
    fs::write(base.join("file"), "x").unwrap();
    let sock = base.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let b = |p: &str| base.join(p).display().to_string();
    let cases: Vec<(Value, bool)> = vec![
        (
            json!({"path": b("newdir/sub"), "type": "DirectoryOrCreate"}),
            true,
        ),
        (
            json!({"path": b("file"), "type": "DirectoryOrCreate"}),
            false,
        ),
        (json!({"path": b("newdir"), "type": "Directory"}), true),
        (json!({"path": b("missing"), "type": "Directory"}), false),
        (json!({"path": b("newfile"), "type": "FileOrCreate"}), true),
        (
            json!({"path": b("nodir/newfile"), "type": "FileOrCreate"}),
            false,
        ),
        (json!({"path": b("file"), "type": "File"}), true),
        (json!({"path": b("newdir"), "type": "File"}), false),
        (json!({"path": b("sock"), "type": "Socket"}), true),
        (json!({"path": b("file"), "type": "Socket"}), false),
        (json!({"path": "/dev/null", "type": "CharDevice"}), true),
        (json!({"path": b("file"), "type": "CharDevice"}), false),
        (json!({"path": "/dev/null", "type": "BlockDevice"}), false),
        (json!({"path": b("missing-any")}), true),
        (json!({"path": b("file"), "type": "Bogus"}), false),
    ];
    for (i, (src, ok)) in cases.into_iter().enumerate() {
        let p = pod(
            &format!("hp-{i}"),
            json!([{"name": "h", "hostPath": src}]),
            json!([]),
        );
        let r = host.setup(&p).await;
        match (ok, &r) {
            (true, Ok(v)) => assert_eq!(
                host_path(v, "h"),
                PathBuf::from(src["path"].as_str().unwrap())
            ),
            (false, Err(VolumeError::Invalid { .. })) => {}
            _ => panic!("case {i} {src}: {r:?}"),
        }
        host.vm.teardown(&format!("hp-{i}")).await.unwrap();
    }
    assert_eq!(mode(&base.join("newdir/sub")), 0o755);
    assert_eq!(mode(&base.join("newfile")), 0o644);
    assert!(fs::metadata(base.join("newfile")).unwrap().is_file());
    assert!(!base.join("nodir").exists());
}

#[tokio::test]
async fn config_map_update_reaches_the_pod_on_refresh() {
    let host = Host::new();
    host.objects(|o| {
        o.config_maps
            .insert(key("cfg"), config_map("cfg", json!({"a": "1", "b": "2"})));
    });
    let p = pod(
        "cm-1",
        json!([
            {"name": "all", "configMap": {"name": "cfg"}},
            {"name": "some", "configMap": {"name": "cfg", "defaultMode": 0o600,
                "items": [{"key": "a", "path": "dir/a.txt", "mode": 0o640}]}},
            {"name": "opt", "configMap": {"name": "absent", "optional": true}}
        ]),
        json!([]),
    );
    let v = host.setup(&p).await.unwrap();
    assert!(v.volumes["all"].read_only);
    let all = host_path(&v, "all");
    assert_eq!(fs::read_to_string(all.join("a")).unwrap(), "1");
    assert_eq!(
        fs::read_link(all.join("a")).unwrap(),
        PathBuf::from("..data/a")
    );
    assert_eq!(mode(&all.join("b")), 0o644);
    let some = host_path(&v, "some");
    assert_eq!(fs::read_to_string(some.join("dir/a.txt")).unwrap(), "1");
    assert_eq!(mode(&some.join("dir/a.txt")), 0o640);
    assert!(!some.join("b").exists());
    let opt = host_path(&v, "opt");
    assert_eq!(
        fs::read_dir(&opt).unwrap().count(),
        2,
        "only ..data and its dir"
    );
    let first = fs::read_link(all.join("..data")).unwrap();

    // Unchanged: refresh is a no-op.
    host.refresh(&p, &v).await.unwrap();
    assert_eq!(fs::read_link(all.join("..data")).unwrap(), first);

    host.objects(|o| {
        o.config_maps
            .insert(key("cfg"), config_map("cfg", json!({"a": "new", "c": "3"})));
    });
    host.refresh(&p, &v).await.unwrap();
    let second = fs::read_link(all.join("..data")).unwrap();
    assert_ne!(first, second);
    assert_eq!(fs::read_to_string(all.join("a")).unwrap(), "new");
    assert_eq!(fs::read_to_string(all.join("c")).unwrap(), "3");
    assert!(
        fs::symlink_metadata(all.join("b")).is_err(),
        "removed key is gone"
    );
    assert!(!all.join(&first).exists(), "old payload dir removed");
    assert_eq!(fs::read_to_string(some.join("dir/a.txt")).unwrap(), "new");

    // Missing and not optional.
    let bad = pod(
        "cm-2",
        json!([{"name": "x", "configMap": {"name": "absent"}}]),
        json!([]),
    );
    assert!(matches!(
        host.setup(&bad).await,
        Err(VolumeError::Missing {
            kind: "configmap",
            ..
        })
    ));
    host.vm.teardown("cm-1").await.unwrap();
    host.vm.teardown("cm-2").await.unwrap();
    assert!(host.mounts().is_empty());
}

#[tokio::test]
async fn secret_on_tmpfs_with_modes() {
    let host = Host::new();
    host.objects(|o| {
        let s: Secret = serde_json::from_value(json!({
            "metadata": {"name": "creds", "namespace": "default"},
            "data": {"user": "YWRtaW4=", "pass": "aHVudGVyMg=="},
            "stringData": {"token": "t0k"}
        }))
        .unwrap();
        o.secrets.insert(key("creds"), s);
    });
    let p = pod(
        "sec-1",
        json!([{"name": "s", "secret": {"secretName": "creds", "defaultMode": 0o400,
                 "items": [{"key": "user", "path": "user"}, {"key": "pass", "path": "pw", "mode": 0o600},
                           {"key": "token", "path": "token"}]}}]),
        json!([]),
    );
    let v = host.setup(&p).await.unwrap();
    let dir = host_path(&v, "s");
    assert_eq!(
        dir,
        host.root.join("pods/sec-1/volumes/kubernetes.io~secret/s")
    );
    assert_eq!(mount_at(&host, &dir).expect("tmpfs").fs_type, "tmpfs");
    assert_eq!(fs::read_to_string(dir.join("user")).unwrap(), "admin");
    assert_eq!(fs::read_to_string(dir.join("pw")).unwrap(), "hunter2");
    assert_eq!(fs::read_to_string(dir.join("token")).unwrap(), "t0k");
    assert_eq!(mode(&dir.join("user")), 0o400);
    assert_eq!(mode(&dir.join("pw")), 0o600);
    host.vm.teardown("sec-1").await.unwrap();
    assert!(host.mounts().is_empty());
}

#[tokio::test]
async fn downward_api_files() {
    let host = Host::new();
    let mut p = pod(
        "dw-1",
        json!([{"name": "d", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
            {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}},
            {"path": "mem", "resourceFieldRef": {"containerName": "c", "resource": "limits.memory", "divisor": "1Mi"}}
        ]}}]),
        json!([]),
    );
    p.spec.as_mut().unwrap().containers[0].resources =
        Some(serde_json::from_value(json!({"limits": {"memory": "64Mi"}})).unwrap());
    let v = host.setup(&p).await.unwrap();
    let dir = host_path(&v, "d");
    assert_eq!(
        fs::read_to_string(dir.join("labels")).unwrap(),
        "app=\"web\"\ntier=\"front\""
    );
    assert_eq!(fs::read_to_string(dir.join("name")).unwrap(), "pod-dw-1");
    assert_eq!(fs::read_to_string(dir.join("app")).unwrap(), "web");
    assert_eq!(fs::read_to_string(dir.join("mem")).unwrap(), "64");
    // A label change reaches the file on refresh.
    p.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("app".into(), "api".into());
    host.refresh(&p, &v).await.unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("labels")).unwrap(),
        "app=\"api\"\ntier=\"front\""
    );
    host.vm.teardown("dw-1").await.unwrap();
}

/// Issues `token-N-for-ACCOUNT-AUDIENCE` (N counting its requests), valid for the requested
/// seconds; fails while `down` is set. `pod_at` is the address of the pod object it was last
/// asked for.
#[derive(Default)]
struct CountingTokens {
    calls: AtomicUsize,
    down: AtomicBool,
    pod_at: AtomicUsize,
}

impl TokenSource for CountingTokens {
    fn token<'a>(
        &'a self,
        pod: &'a Pod,
        request: TokenRequest,
    ) -> BoxFuture<'a, Result<IssuedToken, String>> {
        self.pod_at
            .store(std::ptr::from_ref(pod) as usize, Ordering::SeqCst);
        Box::pin(async move {
            if self.down.load(Ordering::SeqCst) {
                return Err("the API server is down".into());
            }
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let now = SystemTime::now();
            let audience = request.audience.unwrap_or_default();
            Ok(IssuedToken {
                token: format!("token-{n}-for-{}-{audience}", request.service_account),
                issued: now,
                expires: now + Duration::from_secs(request.expiration_seconds as u64),
            })
        })
    }
}

#[tokio::test]
async fn projected_token_is_cached_and_rewritten_before_it_expires() {
    let mut host = host_with_config_map();
    let vols = json!([{"name": "proj", "projected": {"sources": [
        {"configMap": {"name": "cfg"}},
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}
    ]}}]);
    let p = pod("tk-1", vols, json!([]));
    let tokens = Arc::new(CountingTokens::default());
    host.restart_with_tokens(tokens.clone());
    let shared = Arc::new(p.clone());
    let v = host.vm.setup(&shared).await.unwrap();
    // The manager keeps the pod it was given for the refreshes, not a copy of it.
    assert_eq!(
        Arc::strong_count(&shared),
        2,
        "the volume manager copied the pod"
    );
    let dir = host_path(&v, "proj");
    assert_eq!(
        fs::read_to_string(dir.join("token")).unwrap(),
        "token-1-for-default-"
    );

    // A store change re-projects the volume from the cache: no new request.
    host.objects(|o| {
        o.config_maps
            .insert(key("cfg"), config_map("cfg", json!({"a": "2"})));
    });
    host.vm.refresh(&shared, &v).await.unwrap();
    assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "2");
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 1);

    // Before 80 % of its life nothing is due; past it the file is rewritten with a new token.
    let now = SystemTime::now();
    host.vm.refresh_tokens(now + Duration::from_secs(60)).await;
    assert_eq!(
        fs::read_to_string(dir.join("token")).unwrap(),
        "token-1-for-default-"
    );
    host.vm
        .refresh_tokens(now + Duration::from_secs(2900))
        .await;
    assert_eq!(
        fs::read_to_string(dir.join("token")).unwrap(),
        "token-2-for-default-"
    );
    assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "2");
    // The refresh asked for the worker's own pod object: the manager kept it, not a copy.
    assert_eq!(
        tokens.pod_at.load(Ordering::SeqCst),
        Arc::as_ptr(&shared) as usize,
        "the token refresh used a copy of the pod"
    );

    // An API outage keeps the volume as it is, even once its token has expired.
    tokens.down.store(true, Ordering::SeqCst);
    for later in [5800, 8000] {
        host.vm
            .refresh_tokens(now + Duration::from_secs(later))
            .await;
        assert_eq!(
            fs::read_to_string(dir.join("token")).unwrap(),
            "token-2-for-default-"
        );
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "2");
    }
    host.vm.teardown("tk-1").await.unwrap();
    assert!(host.mounts().is_empty());
}

/// A host whose store holds ConfigMap default/cfg with `a: 1`.
fn host_with_config_map() -> Host {
    let host = Host::new();
    host.objects(|o| {
        o.config_maps
            .insert(key("cfg"), config_map("cfg", json!({"a": "1"})));
    });
    host
}

#[tokio::test]
async fn projected_sources_and_token_source() {
    let mut host = host_with_config_map();
    let vols = json!([{"name": "proj", "projected": {"sources": [
        {"configMap": {"name": "cfg"}},
        {"downwardAPI": {"items": [{"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
        {"serviceAccountToken": {"path": "token", "audience": "api"}}
    ]}}]);
    let p = pod("pr-1", vols, json!([]));
    match host.setup(&p).await {
        Err(VolumeError::Invalid { detail, .. }) => assert!(detail.contains("token"), "{detail}"),
        other => panic!("expected Invalid without a token source: {other:?}"),
    }
    // The same node in cluster mode: the manager is made with the API's token issuer.
    host.restart_with_tokens(Arc::new(CountingTokens::default()));
    let v = host.setup(&p).await.unwrap();
    let dir = host_path(&v, "proj");
    assert_eq!(mount_at(&host, &dir).expect("tmpfs").fs_type, "tmpfs");
    assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "1");
    assert_eq!(fs::read_to_string(dir.join("ns")).unwrap(), "default");
    assert_eq!(
        fs::read_to_string(dir.join("token")).unwrap(),
        "token-1-for-default-api"
    );
    host.vm.teardown("pr-1").await.unwrap();
    assert!(host.mounts().is_empty());
}

#[tokio::test]
async fn sub_path_is_resolved_beneath_the_volume() {
    let host = Host::new();
    let mut p = pod(
        "sp-1",
        json!([{"name": "data", "emptyDir": {}}]),
        json!([
            {"name": "data", "mountPath": "/inner", "subPath": "a/b"},
            {"name": "data", "mountPath": "/expr", "subPathExpr": "$(POD)/x"},
            {"name": "data", "mountPath": "/ro", "readOnly": true, "mountPropagation": "HostToContainer"}
        ]),
    );
    p.spec.as_mut().unwrap().containers[0].env = Some(
        serde_json::from_value(
            json!([{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]),
        )
        .unwrap(),
    );
    let v = host.setup(&p).await.unwrap();
    let vol = host_path(&v, "data");
    let (mounts, devices) = host.vm.container_mounts(&p, &container(&p), &v).unwrap();
    assert!(devices.is_empty());
    assert_eq!(mounts.len(), 3);
    let inner = &mounts[0];
    assert_eq!(inner.destination, "/inner");
    assert_eq!(inner.kind, "bind");
    assert_eq!(inner.options, vec!["rbind", "rprivate"]);
    assert!(vol.join("a/b").is_dir(), "missing subPath dirs are created");
    let src = PathBuf::from(&inner.source);
    assert!(src.starts_with(host.root.join("pods/sp-1/volume-subpaths/data/c/0")));
    assert!(
        mount_at(&host, &src).is_some(),
        "the subPath is pinned by a bind mount"
    );
    fs::write(src.join("f"), "through the bind").unwrap();
    assert_eq!(
        fs::read_to_string(vol.join("a/b/f")).unwrap(),
        "through the bind"
    );
    assert!(
        vol.join("pod-sp-1/x").is_dir(),
        "subPathExpr expanded from env"
    );
    assert_eq!(mounts[2].options, vec!["rbind", "rslave", "ro"]);
    assert_eq!(PathBuf::from(&mounts[2].source), vol);

    // A symlink out of the volume is refused.
    std::os::unix::fs::symlink("/etc", vol.join("evil")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc", vol.join("rel")).unwrap();
    for sub in ["evil/passwd", "rel/passwd", "../x", "/etc"] {
        let mut c = container(&p);
        c.volume_mounts = Some(
            serde_json::from_value(json!([{"name": "data", "mountPath": "/x", "subPath": sub}]))
                .unwrap(),
        );
        match host.vm.container_mounts(&p, &c, &v) {
            Err(VolumeError::Invalid { .. }) => {}
            other => panic!("subPath {sub}: {other:?}"),
        }
    }
    // Bidirectional needs privileged.
    let mut c = container(&p);
    c.volume_mounts = Some(
        serde_json::from_value(
            json!([{"name": "data", "mountPath": "/x", "mountPropagation": "Bidirectional"}]),
        )
        .unwrap(),
    );
    assert!(host.vm.container_mounts(&p, &c, &v).is_err());
    c.security_context = Some(serde_json::from_value(json!({"privileged": true})).unwrap());
    let (m, _) = host.vm.container_mounts(&p, &c, &v).unwrap();
    assert_eq!(m[0].options, vec!["rbind", "rshared"]);

    host.vm.teardown("sp-1").await.unwrap();
    assert!(host.mounts().is_empty());
    assert!(!host.root.join("pods/sp-1").exists());
}

#[tokio::test]
async fn claims_resolve_to_host_path_and_local_pvs() {
    let host = Host::new();
    let hp_dir = host.root.join("pv-hostpath");
    let local_dir = host.root.join("pv-local");
    fs::create_dir_all(&hp_dir).unwrap();
    fs::create_dir_all(&local_dir).unwrap();
    fs::write(local_dir.join("seed"), "seed").unwrap();
    host.objects(|o| {
        o.claims
            .insert(key("hp"), claim("hp", Some("pv-hp"), &["ReadWriteOnce"]));
        o.claims
            .insert(key("loc"), claim("loc", Some("pv-loc"), &["ReadWriteOnce"]));
        o.volumes.insert(
            "pv-hp".into(),
            pv(
                "pv-hp",
                Some("hp"),
                json!({"hostPath": {"path": hp_dir, "type": "Directory"}}),
            ),
        );
        o.volumes.insert(
            "pv-loc".into(),
            pv("pv-loc", Some("loc"), json!({"local": {"path": local_dir}})),
        );
    });
    let p = pod(
        "pvc-1",
        json!([
            {"name": "a", "persistentVolumeClaim": {"claimName": "hp"}},
            {"name": "b", "persistentVolumeClaim": {"claimName": "loc"}},
            {"name": "c", "persistentVolumeClaim": {"claimName": "loc", "readOnly": true}}
        ]),
        json!([{"name": "a", "mountPath": "/a"}, {"name": "c", "mountPath": "/c"}]),
    );
    let v = host.setup(&p).await.unwrap();
    assert_eq!(host_path(&v, "a"), hp_dir);
    let b = host_path(&v, "b");
    assert_eq!(
        b,
        host.root
            .join("pods/pvc-1/volumes/kubernetes.io~local-volume/pv-loc")
    );
    assert_eq!(fs::read_to_string(b.join("seed")).unwrap(), "seed");
    fs::write(b.join("written"), "via pod").unwrap();
    assert_eq!(
        fs::read_to_string(local_dir.join("written")).unwrap(),
        "via pod"
    );
    assert!(v.volumes["c"].read_only);
    // RWO: a second pod on the same node may use the claim (upstream semantics).
    let p2 = pod(
        "pvc-2",
        json!([{"name": "b", "persistentVolumeClaim": {"claimName": "loc"}}]),
        json!([]),
    );
    host.setup(&p2).await.unwrap();
    let (mounts, _) = host.vm.container_mounts(&p, &container(&p), &v).unwrap();
    assert!(mounts[1].options.contains(&"ro".to_string()));
    host.vm.teardown("pvc-1").await.unwrap();
    host.vm.teardown("pvc-2").await.unwrap();
    assert!(host.mounts().is_empty());
    assert!(
        local_dir.join("written").exists(),
        "PV data survives teardown"
    );
}

#[tokio::test]
async fn read_only_claim_is_enforced_by_the_mount() {
    let host = Host::new();
    let local_dir = host.root.join("pv-local");
    fs::create_dir_all(&local_dir).unwrap();
    host.objects(|o| {
        o.claims
            .insert(key("loc"), claim("loc", Some("pv-loc"), &["ReadOnlyMany"]));
        o.volumes.insert(
            "pv-loc".into(),
            pv("pv-loc", Some("loc"), json!({"local": {"path": local_dir}})),
        );
    });
    let p = pod(
        "ro-1",
        json!([{"name": "r", "persistentVolumeClaim": {"claimName": "loc", "readOnly": true}}]),
        json!([]),
    );
    let v = host.setup(&p).await.unwrap();
    let r = host_path(&v, "r");
    let m = mount_at(&host, &r).expect("bind mount");
    assert!(m.opts.split(',').any(|o| o == "ro"), "{m:?}");
    let err = fs::write(r.join("x"), "nope").unwrap_err();
    assert!(is_erofs(&err), "{err}");
    host.vm.teardown("ro-1").await.unwrap();
}

#[tokio::test]
async fn unbound_missing_and_read_write_once_pod_claims() {
    let host = Host::new();
    let dir = host.root.join("pv");
    fs::create_dir_all(&dir).unwrap();
    host.objects(|o| {
        o.claims
            .insert(key("unbound"), claim("unbound", None, &["ReadWriteOnce"]));
        o.claims.insert(
            key("stolen"),
            claim("stolen", Some("pv-other"), &["ReadWriteOnce"]),
        );
        o.claims.insert(
            key("rwop"),
            claim("rwop", Some("pv-rwop"), &["ReadWriteOncePod"]),
        );
        o.volumes.insert(
            "pv-other".into(),
            pv(
                "pv-other",
                Some("someone-else"),
                json!({"hostPath": {"path": dir}}),
            ),
        );
        o.volumes.insert(
            "pv-rwop".into(),
            pv("pv-rwop", Some("rwop"), json!({"hostPath": {"path": dir}})),
        );
    });
    let use_claim = |uid: &str, name: &str| {
        pod(
            uid,
            json!([{"name": "v", "persistentVolumeClaim": {"claimName": name}}]),
            json!([]),
        )
    };
    assert!(matches!(
        host.setup(&use_claim("u-1", "unbound")).await,
        Err(VolumeError::Unbound { .. })
    ));
    assert!(matches!(
        host.setup(&use_claim("u-2", "stolen")).await,
        Err(VolumeError::Unbound { .. })
    ));
    assert!(matches!(
        host.setup(&use_claim("u-3", "absent")).await,
        Err(VolumeError::Missing {
            kind: "persistentvolumeclaim",
            ..
        })
    ));
    host.vm
        .setup(&Arc::new(use_claim("u-4", "rwop")))
        .await
        .unwrap();
    // Setup again for the same pod is fine.
    host.vm
        .setup(&Arc::new(use_claim("u-4", "rwop")))
        .await
        .unwrap();
    match host.setup(&use_claim("u-5", "rwop")).await {
        Err(VolumeError::InUse { other, .. }) => assert!(other.contains("u-4"), "{other}"),
        other => panic!("expected InUse: {other:?}"),
    }
    // The claim use survives an agent restart.
    let mut host = host;
    host.restart();
    assert!(matches!(
        host.setup(&use_claim("u-5", "rwop")).await,
        Err(VolumeError::InUse { .. })
    ));
    host.vm.teardown("u-4").await.unwrap();
    host.vm
        .setup(&Arc::new(use_claim("u-5", "rwop")))
        .await
        .unwrap();
    for uid in ["u-1", "u-2", "u-3", "u-5"] {
        host.vm.teardown(uid).await.unwrap();
    }
    assert!(host.vm.list().is_empty());
}

#[tokio::test]
async fn block_device_pvs_raw_and_formatted() {
    let mut host = Host::new();
    let raw = host.loop_device(16);
    let fsdev = host.loop_device(32);
    host.objects(|o| {
        o.claims.insert(key("raw"), {
            let mut c = claim("raw", Some("pv-raw"), &["ReadWriteOnce"]);
            c.spec.as_mut().unwrap().volume_mode = Some("Block".into());
            c
        });
        o.claims
            .insert(key("fs"), claim("fs", Some("pv-fs"), &["ReadWriteOnce"]));
        o.volumes.insert(
            "pv-raw".into(),
            pv(
                "pv-raw",
                Some("raw"),
                json!({"local": {"path": raw}, "volumeMode": "Block"}),
            ),
        );
        o.volumes.insert(
            "pv-fs".into(),
            pv(
                "pv-fs",
                Some("fs"),
                json!({"local": {"path": fsdev, "fsType": "ext4"}}),
            ),
        );
    });
    let mut p = pod(
        "blk-1",
        json!([
            {"name": "raw", "persistentVolumeClaim": {"claimName": "raw"}},
            {"name": "fs", "persistentVolumeClaim": {"claimName": "fs"}}
        ]),
        json!([{"name": "fs", "mountPath": "/data"}]),
    );
    p.spec.as_mut().unwrap().containers[0].volume_devices =
        Some(serde_json::from_value(json!([{"name": "raw", "devicePath": "/dev/xvda"}])).unwrap());
    let v = host.setup(&p).await.unwrap();
    assert!(v.volumes["raw"].block);
    assert_eq!(host_path(&v, "raw"), raw);
    let (mounts, devices) = host.vm.container_mounts(&p, &container(&p), &v).unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].host_path, raw);
    assert_eq!(devices[0].container_path, "/dev/xvda");
    assert_eq!(mounts.len(), 1);
    let fs_dir = host_path(&v, "fs");
    assert_eq!(
        mount_at(&host, &fs_dir).expect("ext4 mounted").fs_type,
        "ext4"
    );
    fs::write(fs_dir.join("keep"), "persisted").unwrap();
    host.vm.teardown("blk-1").await.unwrap();
    assert!(host.mounts().is_empty());
    // The filesystem (not reformatted) carries the data to the next pod.
    let v = host.setup(&p).await.unwrap();
    assert_eq!(
        fs::read_to_string(host_path(&v, "fs").join("keep")).unwrap(),
        "persisted"
    );
    host.vm.teardown("blk-1").await.unwrap();
    assert!(host.mounts().is_empty());
}

#[tokio::test]
async fn fs_group_owns_writable_volumes() {
    let host = Host::new();
    let mut p = pod("fsg-1", json!([{"name": "d", "emptyDir": {}}]), json!([]));
    p.spec.as_mut().unwrap().security_context = Some(
        serde_json::from_value(json!({"fsGroup": 2345, "fsGroupChangePolicy": "OnRootMismatch"}))
            .unwrap(),
    );
    let v = host.setup(&p).await.unwrap();
    let d = host_path(&v, "d");
    let meta = fs::metadata(&d).unwrap();
    assert_eq!(meta.gid(), 2345);
    assert_eq!(meta.mode() & 0o2000, 0o2000, "setgid dir");
    host.vm.teardown("fsg-1").await.unwrap();
}

#[tokio::test]
async fn hundred_setup_teardown_cycles_leave_nothing() {
    let host = Host::new();
    let local_dir = host.root.join("pv-local");
    fs::create_dir_all(&local_dir).unwrap();
    host.objects(|o| {
        o.config_maps
            .insert(key("cfg"), config_map("cfg", json!({"a": "1"})));
        o.secrets.insert(
            key("sec"),
            serde_json::from_value(json!({"metadata": {"name": "sec", "namespace": "default"},
                                          "data": {"k": "dg=="}}))
            .unwrap(),
        );
        o.claims
            .insert(key("loc"), claim("loc", Some("pv-loc"), &["ReadWriteOnce"]));
        o.volumes.insert(
            "pv-loc".into(),
            pv("pv-loc", Some("loc"), json!({"local": {"path": local_dir}})),
        );
    });
    let p = pod(
        "mix-1",
        json!([
            {"name": "disk", "emptyDir": {}},
            {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "sec", "secret": {"secretName": "sec"}},
            {"name": "dw", "downwardAPI": {"items": [{"path": "l", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
            {"name": "pr", "projected": {"sources": [{"configMap": {"name": "cfg"}}]}},
            {"name": "pvc", "persistentVolumeClaim": {"claimName": "loc"}}
        ]),
        json!([
            {"name": "disk", "mountPath": "/d", "subPath": "x"},
            {"name": "pvc", "mountPath": "/p", "subPath": "y"},
            {"name": "cfg", "mountPath": "/c"}
        ]),
    );
    for _ in 0..100 {
        let v = host.setup(&p).await.unwrap();
        host.vm.container_mounts(&p, &container(&p), &v).unwrap();
        assert!(!host.mounts().is_empty());
        host.vm.teardown("mix-1").await.unwrap();
        assert!(host.mounts().is_empty(), "{:?}", host.mounts());
    }
    assert!(!host.root.join("pods/mix-1").exists());
    assert_eq!(
        fs::read_dir(host.root.join("pods")).unwrap().count(),
        0,
        "no pod dirs left"
    );
}

#[tokio::test]
async fn restart_re_adopts_mounts_and_tears_down_by_uid() {
    let mut host = Host::new();
    let p = pod(
        "ra-1",
        json!([{"name": "mem", "emptyDir": {"medium": "Memory"}}]),
        json!([]),
    );
    let v = host.setup(&p).await.unwrap();
    fs::write(host_path(&v, "mem").join("f"), "kept").unwrap();
    host.restart();
    assert_eq!(host.vm.list(), vec!["ra-1".to_string()]);
    let v2 = host.setup(&p).await.unwrap();
    assert_eq!(v, v2);
    assert_eq!(
        fs::read_to_string(host_path(&v2, "mem").join("f")).unwrap(),
        "kept",
        "the existing tmpfs is re-adopted, not replaced"
    );
    assert_eq!(host.mounts().len(), 1);
    host.restart();
    host.vm.teardown("ra-1").await.unwrap();
    assert!(host.mounts().is_empty());
}

const DRIVER: &str = LOOP_DRIVER;

/// Waits until discovery (registration socket → GetInfo → NodeGetInfo →
/// NotifyRegistrationStatus) knows a driver that passes `check`, and returns it.
async fn registered(host: &Host, check: impl Fn(&Driver) -> bool) -> Driver {
    for _ in 0..200 {
        host.vm.plugins().discover().await;
        if let Some(d) = host.vm.plugins().drivers().into_iter().find(|d| check(d)) {
            return d;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("plugin never registered as expected");
}

/// Starts the loop plugin with its state under the root and waits until discovery knows it.
async fn start_plugin(host: &Host) -> LoopPlugin {
    let plugin = LoopPlugin::start(
        &host.root.join("csi-state"),
        &host.root.join("plugins_registry"),
        "node-1",
    );
    registered(host, |d| d.name == DRIVER).await;
    plugin
}

#[tokio::test]
async fn a_plugin_registering_anew_replaces_its_driver_and_a_removed_one_is_dropped() {
    let host = Host::new();
    let mut plugin = start_plugin(&host).await;
    let subscription = host.vm.plugins().subscribe();
    assert!(subscription.borrow().listed, "a full pass was made");
    let first = registered(&host, |d| d.name == DRIVER).await;
    assert_eq!(first.node.node_id, "node-1");
    assert_eq!(
        (first.node.max_volumes, first.node.topology_keys.len()),
        (0, 0)
    );

    // The plugin restarts (a new socket at the same path) with other node info.
    plugin.node_id = "node-2".into();
    plugin.args = ["--max-volumes", "3", "--topology", "topology.loop/zone=a"]
        .map(String::from)
        .to_vec();
    plugin.spawn();
    let again = registered(&host, |d| d.node.node_id == "node-2").await;
    assert_eq!(again.node.max_volumes, 3);
    assert_eq!(again.node.topology_keys, ["topology.loop/zone"]);
    assert_eq!(host.vm.plugins().drivers().len(), 1);

    plugin.unregister();
    host.vm.plugins().discover().await;
    assert!(host.vm.plugins().drivers().is_empty());
    assert!(subscription.has_changed().unwrap(), "watchers were told");
}

#[tokio::test]
async fn inline_csi_volume_is_published_without_staging() {
    let host = Host::new();
    let _plugin = start_plugin(&host).await;
    let p = pod(
        "inl-1",
        json!([{"name": "scratch", "csi": {"driver": DRIVER, "volumeAttributes": {"size": "16777216"}}}]),
        json!([{"name": "scratch", "mountPath": "/scratch"}]),
    );
    let v = host.setup(&p).await.unwrap();
    let target = host_path(&v, "scratch");
    assert_eq!(
        target,
        host.root
            .join("pods/inl-1/volumes/kubernetes.io~csi/scratch/mount")
    );
    assert_eq!(mount_at(&host, &target).expect("published").fs_type, "ext4");
    assert!(
        !host.root.join("plugins/kubernetes.io/csi").exists(),
        "no node-global staging for inline volumes"
    );
    fs::write(target.join("f"), "ephemeral").unwrap();
    host.vm.teardown("inl-1").await.unwrap();
    assert!(host.mounts().is_empty(), "{:?}", host.mounts());
    let leftovers = fs::read_dir(host.root.join("csi-state/volumes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        leftovers, 0,
        "the ephemeral backing file is deleted with the pod"
    );
}

fn attached_loops(file: &Path) -> String {
    let out = Command::new("losetup")
        .arg("-j")
        .arg(file)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn csi_loop_volume_is_staged_once_and_published_per_pod() {
    let host = Host::new();
    let state = host.root.join("csi-state");
    // Discovery: the registration socket appears, GetInfo names the driver and its endpoint.
    let _plugin = start_plugin(&host).await;
    let driver = host
        .vm
        .plugins()
        .drivers()
        .into_iter()
        .find(|d| d.name == DRIVER)
        .unwrap();
    assert_eq!(driver.endpoint, state.join("csi.sock"));
    assert_eq!(driver.versions, vec!["1.0.0".to_string()]);

    host.objects(|o| {
        o.claims.insert(
            key("data"),
            claim("data", Some("pv-csi"), &["ReadWriteOnce"]),
        );
        o.volumes.insert(
            "pv-csi".into(),
            pv(
                "pv-csi",
                Some("data"),
                json!({"csi": {"driver": DRIVER, "volumeHandle": "vol-1", "fsType": "ext4",
                               "volumeAttributes": {"size": "33554432"}}}),
            ),
        );
    });
    let user = |uid: &str, read_only: bool| {
        pod(
            uid,
            json!([{"name": "v", "persistentVolumeClaim": {"claimName": "data", "readOnly": read_only}}]),
            json!([{"name": "v", "mountPath": "/data"}]),
        )
    };
    let staging = nodelet::volume::csi::staging_path(&host.root, DRIVER, "vol-1");
    let backing = state.join("volumes/vol-1.img");

    let v1 = host
        .vm
        .setup(&Arc::new(user("csi-1", false)))
        .await
        .unwrap();
    let t1 = host_path(&v1, "v");
    assert_eq!(
        t1,
        host.root
            .join("pods/csi-1/volumes/kubernetes.io~csi/pv-csi/mount")
    );
    assert_eq!(mount_at(&host, &staging).expect("staged").fs_type, "ext4");
    assert_eq!(mount_at(&host, &t1).expect("published").fs_type, "ext4");
    assert!(!attached_loops(&backing).is_empty());
    fs::write(t1.join("hello"), "from pod 1").unwrap();

    let v2 = host
        .vm
        .setup(&Arc::new(user("csi-2", false)))
        .await
        .unwrap();
    let t2 = host_path(&v2, "v");
    assert_eq!(fs::read_to_string(t2.join("hello")).unwrap(), "from pod 1");
    let staged_mounts = host.mounts().iter().filter(|m| m.point == staging).count();
    assert_eq!(staged_mounts, 1, "staged once for both pods");

    host.vm.teardown("csi-1").await.unwrap();
    assert!(mount_at(&host, &t1).is_none());
    assert!(
        mount_at(&host, &staging).is_some(),
        "still staged for pod 2"
    );
    assert_eq!(fs::read_to_string(t2.join("hello")).unwrap(), "from pod 1");

    host.vm.teardown("csi-2").await.unwrap();
    assert!(host.mounts().is_empty(), "{:?}", host.mounts());
    assert!(
        attached_loops(&backing).is_empty(),
        "loop device detached on unstage"
    );
    assert!(!staging.exists());

    // The data persists into the next pod, here read-only.
    let v3 = host.setup(&user("csi-3", true)).await.unwrap();
    let t3 = host_path(&v3, "v");
    assert!(v3.volumes["v"].read_only);
    assert_eq!(fs::read_to_string(t3.join("hello")).unwrap(), "from pod 1");
    let err = fs::write(t3.join("x"), "no").unwrap_err();
    assert!(is_erofs(&err), "{err}");
    host.vm.teardown("csi-3").await.unwrap();
    assert!(host.mounts().is_empty());
    assert!(attached_loops(&backing).is_empty());
}

#[tokio::test]
async fn csi_calls_carry_the_pvs_secrets_and_mount_options() {
    let host = Host::new();
    let _plugin = start_plugin(&host).await;
    let secret = |name: &str, key: &str| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default"},
                                      "stringData": {key: "s3cret"}}))
        .unwrap()
    };
    // The plugin refuses NodeStage without the stage secret's key and NodePublish without the
    // publish secret's.
    let source = json!({"csi": {"driver": DRIVER, "volumeHandle": "vol-s", "fsType": "ext4",
        "volumeAttributes": {"size": "16777216", "requireStageSecret": "password",
                             "requirePublishSecret": "token"},
        "nodeStageSecretRef": {"name": "stage-creds", "namespace": "default"},
        "nodePublishSecretRef": {"name": "publish-creds"}},
        "mountOptions": ["noatime"]});
    host.objects(|o| {
        o.claims.insert(
            key("sec-data"),
            claim("sec-data", Some("pv-sec"), &["ReadWriteOnce"]),
        );
        o.volumes
            .insert("pv-sec".into(), pv("pv-sec", Some("sec-data"), source));
        o.secrets
            .insert(key("stage-creds"), secret("stage-creds", "password"));
    });
    let user = pod(
        "sec-csi-1",
        json!([{"name": "v", "persistentVolumeClaim": {"claimName": "sec-data"}}]),
        json!([{"name": "v", "mountPath": "/data"}]),
    );
    // The publish secret (its namespace is the claim's) does not exist yet: a clear error.
    let err = host.setup(&user).await.unwrap_err();
    assert!(
        matches!(&err, VolumeError::Missing { kind: "secret", name, .. } if name == "default/publish-creds"),
        "{err}"
    );
    host.objects(|o| {
        o.secrets
            .insert(key("publish-creds"), secret("publish-creds", "token"));
    });
    let v = host.setup(&user).await.unwrap();
    let staging = nodelet::volume::csi::staging_path(&host.root, DRIVER, "vol-s");
    let staged = mount_at(&host, &staging).expect("staged");
    assert!(
        staged.opts.split(',').any(|o| o == "noatime"),
        "the PV's mountOptions reach the staging mount: {staged:?}"
    );
    assert!(mount_at(&host, &host_path(&v, "v")).is_some(), "published");
    // Nothing secret is written to the pod's volume record.
    let record = fs::read_to_string(host.root.join("pods/sec-csi-1/volumes/.state.json")).unwrap();
    assert!(!record.contains("s3cret"), "{record}");
    host.vm.teardown("sec-csi-1").await.unwrap();
    assert!(host.mounts().is_empty(), "{:?}", host.mounts());
}

/// A NodeStage the driver refuses for good (Unauthenticated: not one of the codes after which
/// the kubelet's CSI client counts the call as possibly under way) fails with the code kept,
/// and the staging dir the agent made for it goes, as the kubelet's removeMountDir.
#[tokio::test]
async fn a_csi_call_refused_for_good_keeps_its_code_and_leaves_no_staging_dir() {
    let host = Host::new();
    let _plugin = start_plugin(&host).await;
    let source = json!({"csi": {"driver": DRIVER, "volumeHandle": "vol-r", "fsType": "ext4",
        "volumeAttributes": {"size": "16777216", "requireStageSecret": "password"}}});
    host.objects(|o| {
        o.claims.insert(
            key("ref-data"),
            claim("ref-data", Some("pv-ref"), &["ReadWriteOnce"]),
        );
        o.volumes
            .insert("pv-ref".into(), pv("pv-ref", Some("ref-data"), source));
    });
    let user = pod(
        "ref-csi-1",
        json!([{"name": "v", "persistentVolumeClaim": {"claimName": "ref-data"}}]),
        json!([{"name": "v", "mountPath": "/data"}]),
    );
    let err = host.setup(&user).await.unwrap_err();
    let VolumeError::Csi { source, .. } = &err else {
        panic!("not a CSI error: {err}");
    };
    assert_eq!(source.code(), Some(tonic::Code::Unauthenticated), "{err}");
    assert!(source.is_final(), "{err}");
    assert!(
        err.to_string().starts_with("volume v: NodeStageVolume: "),
        "{err}"
    );
    let staging = nodelet::volume::csi::staging_path(&host.root, DRIVER, "vol-r");
    assert!(!staging.exists(), "{} is left", staging.display());
    host.vm.teardown("ref-csi-1").await.unwrap();
    assert!(host.mounts().is_empty(), "{:?}", host.mounts());
}

#[tokio::test]
async fn a_csi_stage_in_flight_stalls_only_the_pods_that_share_it() {
    let host = Host::new();
    let plugin = start_plugin(&host).await;
    let gate = host.root.join("stage-gate");
    host.objects(|o| {
        o.claims.insert(
            key("slow"),
            claim("slow", Some("pv-slow"), &["ReadWriteOnce"]),
        );
        o.volumes.insert(
            "pv-slow".into(),
            pv(
                "pv-slow",
                Some("slow"),
                json!({"csi": {"driver": DRIVER, "volumeHandle": "vol-slow", "fsType": "ext4",
                               "volumeAttributes": {"size": "33554432",
                                                    "stageGate": gate.display().to_string()}}}),
            ),
        );
    });
    let user = |uid: &str| {
        pod(
            uid,
            json!([{"name": "v", "persistentVolumeClaim": {"claimName": "slow"}}]),
            json!([{"name": "v", "mountPath": "/data"}]),
        )
    };
    let spawn_setup = |p: Pod| {
        let vm = host.vm.clone();
        tokio::spawn(async move { vm.setup(&Arc::new(p)).await })
    };
    let first = spawn_setup(user("slow-1"));
    let second = spawn_setup(user("slow-2"));
    let waiting = host.root.join("stage-gate.waiting");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !waiting.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "NodeStage never began"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // While NodeStage hangs, another pod's volumes are set up and torn down.
    let other = pod(
        "quick-1",
        json!([{"name": "scratch", "emptyDir": {}}]),
        json!([]),
    );
    let bound = Duration::from_secs(30);
    let v = tokio::time::timeout(bound, host.setup(&other))
        .await
        .expect("another pod's setup waited for a stage it does not use")
        .unwrap();
    assert!(host_path(&v, "scratch").is_dir());
    tokio::time::timeout(bound, host.vm.teardown("quick-1"))
        .await
        .expect("another pod's teardown waited for a stage it does not use")
        .unwrap();
    assert!(!first.is_finished() && !second.is_finished());

    // Both users of the staging path get it once it is staged, staged once.
    fs::write(&gate, "").unwrap();
    let v1 = first.await.unwrap().unwrap();
    let v2 = second.await.unwrap().unwrap();
    fs::write(host_path(&v1, "v").join("hello"), "one").unwrap();
    assert_eq!(
        fs::read_to_string(host_path(&v2, "v").join("hello")).unwrap(),
        "one"
    );
    let stages = plugin.rpcs();
    let stages = stages.iter().filter(|r| *r == "NodeStageVolume").count();
    assert_eq!(stages, 1, "{:?}", plugin.calls());

    // Torn down at once, the staging path is unstaged by whichever goes last.
    let (a, b) = tokio::join!(host.vm.teardown("slow-1"), host.vm.teardown("slow-2"));
    a.unwrap();
    b.unwrap();
    let unstages = plugin.rpcs();
    let unstages = unstages
        .iter()
        .filter(|r| *r == "NodeUnstageVolume")
        .count();
    assert_eq!(unstages, 1, "{:?}", plugin.calls());
    assert!(host.mounts().is_empty(), "{:?}", host.mounts());
}
