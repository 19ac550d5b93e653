//! Removes what an agent run leaves on the host once its process is gone: the containers, the
//! pods' network sandboxes (a CNI DEL releases their IP reservations), their cgroups, the mounts
//! under the test's dir, and the containerd namespace with its images and snapshots. Test
//! harnesses call [`remove`] when they drop an agent, so that `scripts/test`'s census finds
//! nothing left.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nodelet::sandbox::{SandboxConfig, SandboxManager};

use crate::agent_support::unmount_below;
use crate::runtime_support::{ctr, ctr_with, gc};

/// Where one agent kept its state.
pub struct AgentDirs {
    /// The test's own dir (mounts below it are removed).
    pub dir: PathBuf,
    pub root_dir: PathBuf,
    pub run_dir: PathBuf,
    pub containerd_namespace: String,
    /// The socket of the test's own containerd (None: the machine's). That containerd removes
    /// its namespaces itself when the test drops it.
    pub containerd: Option<PathBuf>,
}

/// Removes everything the agent of `dirs` left; call it once the agent process has exited.
pub fn remove(dirs: &AgentDirs) {
    let ns = dirs.containerd_namespace.as_str();
    let global: Vec<&OsStr> = match &dirs.containerd {
        Some(socket) => vec![OsStr::new("--address"), socket.as_os_str()],
        None => Vec::new(),
    };
    let ctr = |ns: &str, args: &[&str]| ctr_with(&global, ns, args);
    let containers = || -> Vec<String> {
        ctr(ns, &["containers", "list", "-q"])
            .lines()
            .map(str::to_string)
            .collect()
    };
    for id in containers() {
        ctr(ns, &["tasks", "kill", "-s", "SIGKILL", &id]);
    }
    for id in containers() {
        ctr(ns, &["tasks", "delete", "-f", &id]);
        ctr(ns, &["containers", "delete", &id]);
    }
    let uids = remove_sandboxes(dirs);
    for uid in &uids {
        remove_pod_cgroup(uid);
    }
    unmount_below(&dirs.dir);
    if dirs.containerd.is_none() {
        remove_namespace(ns);
    }
}

/// Tears down every sandbox still pinned under the agent's run dir (CNI DEL, unpin); returns
/// the UIDs of every pod the agent had (sandboxes and pod dirs).
fn remove_sandboxes(dirs: &AgentDirs) -> Vec<String> {
    let manager = SandboxManager::new(SandboxConfig {
        run_dir: dirs.run_dir.join("sandboxes"),
        root_dir: dirs.root_dir.clone(),
        cni_conf_dir: "/etc/cni/net.d".into(),
        cni_bin_dirs: vec!["/usr/lib/cni".into(), "/opt/cni/bin".into()],
        cluster_dns: Vec::new(),
        cluster_domain: "cluster.local".into(),
    });
    let pinned = manager.list();
    // Its own runtime on its own thread: a Drop may run inside a test's runtime.
    let torn = pinned.clone();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            for uid in &torn {
                if let Err(e) = manager.teardown(uid).await {
                    eprintln!("clean-up: tearing down the sandbox of pod {uid}: {e}");
                }
            }
        });
    })
    .join();
    let pod_dirs = std::fs::read_dir(dirs.root_dir.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok());
    let mut uids: Vec<String> = pinned.into_iter().chain(pod_dirs).collect();
    uids.sort();
    uids.dedup();
    uids
}

/// Removes the pod's cgroup (`nodelet/pod<uid>`, children first) in every hierarchy.
pub fn remove_pod_cgroup(uid: &str) {
    fn remove_tree(dir: &Path) {
        for child in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&child.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let root = Path::new("/sys/fs/cgroup");
    let pod = format!("nodelet/pod{uid}");
    let hierarchies = std::fs::read_dir(root).into_iter().flatten().flatten();
    for dir in hierarchies.map(|e| e.path()).chain([root.to_path_buf()]) {
        let path = dir.join(&pod);
        if path.is_dir() {
            remove_tree(&path);
        }
    }
}

/// Removes a containerd namespace with its images, leases and (through the garbage collection)
/// snapshots and content.
pub fn remove_namespace(ns: &str) {
    let images: Vec<String> = ctr(ns, &["images", "list", "-q"])
        .lines()
        .map(str::to_string)
        .collect();
    for image in &images {
        ctr(ns, &["images", "remove", "--sync", image]);
    }
    for lease in ctr(ns, &["leases", "list", "-q"]).lines() {
        ctr(ns, &["leases", "delete", lease]);
    }
    for _ in 0..40 {
        gc(ns);
        let removed = Command::new("ctr")
            .args(["namespaces", "remove", ns])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let listed = ctr("default", &["namespaces", "list", "-q"])
            .lines()
            .any(|l| l == ns);
        if removed || !listed {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("clean-up: containerd namespace {ns} could not be removed");
}
