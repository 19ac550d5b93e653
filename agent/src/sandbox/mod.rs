//! Pod sandboxes without a pause container: per pod, network, IPC and UTS namespaces are
//! created once and pinned by bind mounts under the agent's run dir; CNI (from the distribution's
//! plugins) wires the pinned netns; the pod's /etc/hosts, /etc/resolv.conf and /etc/hostname
//! are written in the pod dir. Containers join the pinned namespaces by path.
//!
//! OWNER: sandbox helper. Signatures here are the contract the pod worker codes against.

use std::net::IpAddr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;

use crate::runtime::NamespacePaths;

#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Where namespaces are pinned (e.g. /run/nodelet/sandboxes).
    pub run_dir: PathBuf,
    /// The agent's root dir; pod files go under <root>/pods/<uid>.
    pub root_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub cluster_dns: Vec<String>,
    pub cluster_domain: String,
}

/// A pod's live sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub uid: String,
    pub namespaces: NamespacePaths,
    /// The pod IP (None for hostNetwork pods, which report the node's IP).
    pub ip: Option<IpAddr>,
    pub hostname: String,
    /// Files to bind into every container at /etc/hosts, /etc/resolv.conf, /etc/hostname.
    pub hosts_file: PathBuf,
    pub resolv_file: PathBuf,
    pub hostname_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Creating or pinning a namespace failed.
    #[error("pod {uid}: namespaces: {detail}")]
    Namespace { uid: String, detail: String },
    /// A CNI plugin failed.
    #[error("pod {uid}: CNI {plugin} {command}: {detail}")]
    Cni {
        uid: String,
        plugin: String,
        command: &'static str,
        detail: String,
    },
    #[error("pod {uid}: {source}")]
    Io { uid: String, source: std::io::Error },
}

pub struct SandboxManager {
    _todo: (),
}

impl SandboxManager {
    pub fn new(_config: SandboxConfig) -> Self {
        todo!()
    }

    /// Creates the sandbox, or returns the existing one (after an agent restart) unchanged.
    pub async fn ensure(&self, _pod: &Pod) -> Result<Sandbox, SandboxError> {
        todo!()
    }

    /// CNI DEL, unpins the namespaces and removes the pod's sandbox files. Idempotent.
    pub async fn teardown(&self, _uid: &str) -> Result<(), SandboxError> {
        todo!()
    }

    /// UIDs of pods with a pinned sandbox on this host (for clean-up after a restart).
    pub fn list(&self) -> Vec<String> {
        todo!()
    }
}
