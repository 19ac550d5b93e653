//! Shared helpers for the runtime tests: a `Runtime` in a namespace of its own
//! (`nodelet-test-<name>`), busybox container configs, log-file polling and cleanup through
//! `ctr` (images, namespace, cgroups).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nodelet::runtime::{
    labels, ContainerConfig, ImageInfo, PullPolicy, Runtime, RuntimeConfig, TaskState,
};

pub const SOCKET: &str = "unix:///run/containerd/containerd.sock";
pub const REGISTRY: &str = "127.0.0.1:5000";

pub fn busybox() -> String {
    format!("{REGISTRY}/nodelet/busybox:latest")
}

pub fn multilayer() -> String {
    format!("{REGISTRY}/nodelet/multilayer:latest")
}

/// The logging binary the shim starts: the agent's embedded log driver, installed as the
/// agent installs it, beside the built `nodelet` (the name is per build; `cargo clean`
/// removes it with the rest of the build).
pub fn log_driver_binary() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug");
    nodelet::runtime::logdriver::install(&dir).expect("install the log driver")
}

/// One test's runtime, namespace and scratch directory.
pub struct TestRuntime {
    pub rt: Runtime,
    pub namespace: String,
    pub dir: tempfile::TempDir,
}

impl TestRuntime {
    /// Connects in `nodelet-test-<name>` after removing whatever an earlier run left there.
    pub async fn new(name: &str) -> TestRuntime {
        let namespace = format!("nodelet-test-{name}");
        let dir = tempfile::Builder::new()
            .prefix(&format!("nodelet-rt-{name}-"))
            .tempdir()
            .expect("tempdir");
        let rt = Runtime::connect(Self::config(&namespace, dir.path()))
            .await
            .expect(
                "containerd must be running on /run/containerd/containerd.sock (scripts/setup)",
            );
        let t = TestRuntime { rt, namespace, dir };
        t.cleanup().await;
        t
    }

    pub fn config(namespace: &str, root: &Path) -> RuntimeConfig {
        RuntimeConfig {
            endpoint: SOCKET.into(),
            namespace: namespace.into(),
            root_dir: root.to_path_buf(),
            log_driver: log_driver_binary(),
            log_rotation: None,
            max_parallel_image_pulls: nodelet::config::DEFAULT_PARALLEL_IMAGE_PULLS,
        }
    }

    /// A second, independent connection to the same namespace.
    pub async fn reconnect(&self) -> Runtime {
        Runtime::connect(Self::config(&self.namespace, self.dir.path()))
            .await
            .expect("reconnect")
    }

    pub async fn pull_busybox(&self) -> ImageInfo {
        self.rt
            .ensure_image(&busybox(), PullPolicy::IfNotPresent, None)
            .await
            .expect("pull busybox")
    }

    /// A container config running `args` in `image`, logging under the scratch dir.
    pub fn container(&self, id: &str, image: &ImageInfo, args: &[&str]) -> ContainerConfig {
        let mut labels = HashMap::new();
        labels.insert(labels::POD_UID.to_string(), format!("uid-{id}"));
        labels.insert(labels::POD_NAME.to_string(), "pod".to_string());
        labels.insert(labels::POD_NAMESPACE.to_string(), "default".to_string());
        labels.insert(labels::CONTAINER_NAME.to_string(), id.to_string());
        labels.insert(labels::ATTEMPT.to_string(), "0".to_string());
        ContainerConfig {
            id: id.to_string(),
            labels,
            image: image.clone(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: image.config.env.clone(),
            cwd: "/".into(),
            hostname: "test".into(),
            cgroup_parent: format!("/{}", self.namespace),
            log_path: self.log_path(id),
            ..Default::default()
        }
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.dir.path().join("logs").join(id).join("0.log")
    }

    /// Removes every container, image and the namespace itself, and the test cgroups.
    pub async fn cleanup(&self) {
        let mut pods = Vec::new();
        if let Ok(list) = self.rt.list().await {
            for c in list {
                self.rt.remove(&c.id).await.expect("remove container");
                pods.extend(c.labels.get(nodelet::runtime::labels::POD_UID).cloned());
            }
        }
        // A pod's cgroup outlives its sandbox while exited containers are left in it.
        pods.sort();
        pods.dedup();
        for uid in &pods {
            crate::leftovers::remove_pod_cgroup(uid);
        }
        let images = ctr(&self.namespace, &["images", "ls", "-q"]);
        for image in images.lines().filter(|l| !l.is_empty()) {
            ctr(&self.namespace, &["images", "rm", image]);
        }
        gc(&self.namespace);
        for entry in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = entry.path().join(&self.namespace);
            if dir.is_dir() {
                let _ = std::fs::remove_dir(&dir);
            }
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&self.namespace));
        // Only succeeds once nothing is left in it.
        ctr("default", &["namespaces", "rm", &self.namespace]);
    }
}

/// Runs `ctr -n <namespace> <args>` and returns its stdout.
pub fn ctr(namespace: &str, args: &[&str]) -> String {
    ctr_with(&[], namespace, args)
}

/// `ctr <global> -n <namespace> <args>` (e.g. `--address <socket>`); its stdout.
pub fn ctr_with(global: &[&std::ffi::OsStr], namespace: &str, args: &[&str]) -> String {
    let out = Command::new("ctr")
        .args(global)
        .arg("-n")
        .arg(namespace)
        .args(args)
        .output()
        .expect("run ctr");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs containerd's garbage collection synchronously (delete a fresh lease with --sync).
pub fn gc(namespace: &str) {
    let id = format!("nodelet-test-gc-{}", std::process::id());
    ctr(namespace, &["leases", "create", "--id", &id]);
    ctr(namespace, &["leases", "delete", "--sync", &id]);
}

/// Polls the file until it contains `needle` (panics after a minute) and returns its text.
pub async fn wait_for_text(path: &Path, needle: &str) -> String {
    for _ in 0..600 {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.contains(needle) {
                return text;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{} never contained {needle:?}; it holds {:?}",
        path.display(),
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

/// Polls `inspect` until the task has exited (panics after a minute).
pub async fn wait_exited(rt: &Runtime, id: &str) -> TaskState {
    for _ in 0..600 {
        let state = rt.inspect(id).await.expect("inspect").state;
        if matches!(state, TaskState::Exited { .. }) {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id} did not exit");
}

/// What a fake registry answers itself: status, content type, body, extra header lines.
pub type Answer = (u16, String, Vec<u8>, String);

/// A registry on a loopback port that answers what `answer` answers for a request (its path
/// and a header lookup) and forwards every other request to the test registry.
pub async fn start_fake_registry(
    answer: impl Fn(std::net::SocketAddr, &str, &dyn Fn(&str) -> String) -> Option<Answer>
        + Send
        + Sync
        + 'static,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        let upstream = reqwest::Client::new();
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let (upstream, answer) = (upstream.clone(), answer.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                        .unwrap_or_default()
                };
                let (status, content_type, body, extra) = match answer(addr, &path, &header) {
                    Some(answered) => answered,
                    None => {
                        let resp = upstream
                            .get(format!("http://{REGISTRY}{path}"))
                            .header("accept", header("accept"))
                            .send()
                            .await
                            .unwrap();
                        let status = resp.status().as_u16();
                        let ct = resp
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("application/octet-stream")
                            .to_string();
                        (
                            status,
                            ct,
                            resp.bytes().await.unwrap().to_vec(),
                            String::new(),
                        )
                    }
                };
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}

/// A registry on a loopback port that demands a bearer token (obtained from its own token
/// endpoint with basic auth `user`/`password`) and forwards authorised requests to the test
/// registry. Returns its address and the Authorization headers its token endpoint saw.
pub async fn start_token_registry(
    user: &str,
    password: &str,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let expected_basic = reqwest::Client::new()
        .get("http://127.0.0.1/")
        .basic_auth(user, Some(password))
        .build()
        .unwrap()
        .headers()["authorization"]
        .to_str()
        .unwrap()
        .to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen_by_server = seen.clone();
    let addr = start_fake_registry(move |addr, path, header| {
        if path.starts_with("/token") {
            let auth = header("authorization");
            seen_by_server.lock().unwrap().push(auth.clone());
            let (status, body) = if auth == expected_basic {
                (200, br#"{"token":"t0k3n"}"#.to_vec())
            } else {
                (401, b"bad credentials".to_vec())
            };
            Some((status, "application/json".into(), body, String::new()))
        } else if header("authorization") != "Bearer t0k3n" {
            let challenge = format!(
                "WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"test\",scope=\"repository:nodelet/busybox:pull\"\r\n"
            );
            Some((401, "text/plain".into(), b"auth required".to_vec(), challenge))
        } else {
            None
        }
    })
    .await;
    (addr, seen)
}

/// A unix-socket proxy in front of containerd whose connections can be cut, to break the
/// runtime's streams the way a containerd restart does.
pub struct SocketProxy {
    pub path: PathBuf,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl SocketProxy {
    pub async fn start(path: PathBuf) -> SocketProxy {
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> =
            Default::default();
        let tracked = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    let upstream = SOCKET.trim_start_matches("unix://");
                    if let Ok(mut server) = tokio::net::UnixStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tracked.lock().unwrap().push(task);
            }
        });
        SocketProxy {
            path,
            conns,
            accept,
        }
    }

    /// Closes every proxied connection (new ones are still accepted).
    pub fn cut(&self) {
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.path.display())
    }
}

impl Drop for SocketProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The existing `nodelet/pod<uid>` cgroup directories of a pod (the cgroup v2 root and each
/// v1 hierarchy under /sys/fs/cgroup).
pub fn pod_cgroups(uid: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies = std::fs::read_dir(root).into_iter().flatten().flatten();
    let dir = format!("nodelet/pod{uid}");
    hierarchies
        .map(|e| e.path())
        .chain([root.to_path_buf()])
        .map(|h| h.join(&dir))
        .filter(|p| p.is_dir())
        .collect()
}
