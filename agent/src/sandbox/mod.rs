//! Pod sandboxes without a pause container: per pod, network, IPC and UTS namespaces are
//! created once and pinned by bind mounts under the agent's run dir (a shared PID namespace
//! needs a process: its PID 1, see [`pidns`]); CNI (from the distribution's
//! plugins) wires the pinned netns; the pod's /etc/hosts, /etc/resolv.conf and /etc/hostname
//! are written in the pod dir. Containers join the pinned namespaces by path.
//!
//! On-disk layout (the run dir is the checkpoint an agent restart recovers from):
//! - `<run_dir>/<uid>/{net,ipc,uts}`: namespace pins (a pin is absent when the pod uses the
//!   host's namespace: hostNetwork → no net and no uts; hostIPC → no ipc).
//! - `<run_dir>/<uid>/pid`, `pause.json` and the empty dir `pause`: the shared PID namespace
//!   of a `shareProcessNamespace` pod, its PID 1 and that one's root ([`pidns`]). Other pods
//!   have none: each container gets a PID namespace of its own (or the host's, hostPID).
//! - `<root_dir>/pods/<uid>/cni.json`: the network list, the invocation and the ADD result
//!   (written before ADD with no result, so an interrupted ADD is still undone by DEL). It is
//!   on disk, not in the run dir: after a reboot the IPAM reservations outlive the netns, and
//!   only this cache can release them.
//! - `<run_dir>/<uid>/sandbox.json`: the finished sandbox, written last; a run dir without it
//!   is a half-made sandbox that `ensure` tears down and makes again.
//! - `<root_dir>/pods/<uid>/{etc-hosts,resolv.conf,hostname}`: the files bound into containers.
//!
//! The pod's `lo` is brought up with `ip link set lo up` inside the new netns right after it
//! is made, instead of running the CNI loopback plugin: the conflist (scripts/cni) then only
//! needs the pod network itself (bridge + host-local + portmap), and hostNetwork pods never
//! touch CNI.
//!
//! Calls for one UID must not overlap (the pod worker is the only caller for its UID);
//! calls for different UIDs may run concurrently.

pub mod cni;
pub mod files;
pub mod ns;
pub mod pidns;

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use crate::runtime::{NamespacePaths, PidNamespace};
use cni::{Cni, CniError, Command, Invocation, NetworkList};

/// The interface name of the pod's network inside its netns.
pub const POD_IFNAME: &str = "eth0";
/// The node files read for Default DNS and hostNetwork pods.
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
const HOST_HOSTS: &str = "/etc/hosts";
/// The PID 1 of the pod's shared PID namespace, in its run dir.
const PAUSE_RECORD: &str = "pause.json";
/// The CNI cache's file name in the pod dir.
const CNI_CACHE: &str = "cni.json";

#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Where namespaces are pinned (e.g. /run/nodelet/sandboxes).
    pub run_dir: PathBuf,
    /// The agent's root dir; pod files go under <root>/pods/<uid>.
    pub root_dir: PathBuf,
    /// The first `*.conflist`/`*.conf`/`*.json` here (by name) is the pod network.
    pub cni_conf_dir: PathBuf,
    /// Where plugin binaries are looked up, in order (also passed as CNI_PATH).
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Nameservers for ClusterFirst pods; empty = pods get the node's resolver.
    pub cluster_dns: Vec<String>,
    /// e.g. cluster.local.
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
    /// The pod asked for the cluster's DNS and none is configured: it has the node's resolver.
    pub cluster_dns_missing: bool,
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
    /// A file or mount operation on the sandbox's files failed.
    #[error("pod {uid}: {source}")]
    Io { uid: String, source: std::io::Error },
    /// The pod cannot be given a sandbox (no usable UID or hostname).
    #[error("pod {uid}: invalid for a sandbox: {detail}")]
    InvalidPod { uid: String, detail: String },
    /// The pod has no sandbox on this host.
    #[error("pod {uid}: no sandbox")]
    NotFound { uid: String },
}

impl SandboxError {
    fn io(uid: &str) -> impl FnOnce(io::Error) -> SandboxError + '_ {
        move |source| SandboxError::Io {
            uid: uid.to_string(),
            source,
        }
    }

    fn cni(uid: &str, command: Command) -> impl FnOnce(CniError) -> SandboxError + '_ {
        move |e| SandboxError::Cni {
            uid: uid.to_string(),
            plugin: e.plugin(),
            command: command.as_str(),
            detail: e.to_string(),
        }
    }
}

/// What `sandbox.json` holds: enough to answer `ensure` after a restart without redoing it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    uid: String,
    net: Option<PathBuf>,
    ipc: Option<PathBuf>,
    uts: Option<PathBuf>,
    /// The shared PID namespace (`shareProcessNamespace`).
    #[serde(default)]
    pid: Option<pidns::PidPin>,
    ips: Vec<IpAddr>,
    hostname: String,
    hosts: String,
    resolv: String,
}

impl State {
    fn pins_valid(&self) -> bool {
        [&self.net, &self.ipc, &self.uts]
            .into_iter()
            .flatten()
            .all(|p| ns::is_pinned(p))
            && self.pid.as_ref().is_none_or(pidns::PidPin::alive)
    }
}

/// What `cni.json` holds: the exact inputs of ADD, for DEL and CHECK after a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CniCache {
    network: NetworkList,
    invocation: Invocation,
    /// None while ADD has not finished.
    result: Option<Value>,
}

/// Makes, finds again and removes pod sandboxes; shared by all pod workers.
pub struct SandboxManager {
    config: SandboxConfig,
    cni: Cni,
    /// Serialises making the run dir a shared mount point.
    mount_lock: Mutex<()>,
}

impl SandboxManager {
    pub fn new(config: SandboxConfig) -> Self {
        let cni = Cni {
            bin_dirs: config.cni_bin_dirs.clone(),
        };
        SandboxManager {
            config,
            cni,
            mount_lock: Mutex::new(()),
        }
    }

    /// Creates the sandbox, or returns the existing one (after an agent restart) unchanged.
    pub async fn ensure(&self, pod: &Pod) -> Result<Sandbox, SandboxError> {
        let uid = pod_uid(pod)?;
        if let Some(state) = self.load_state(&uid) {
            if state.pins_valid() {
                self.write_pod_files(&state, false)?;
                return Ok(self.sandbox(pod, &state));
            }
            warn!(uid = %uid, "sandbox pins are gone; making the sandbox again");
        }
        // Leftovers of an earlier sandbox: a half-made one, or one a reboot took the run dir
        // (and the netns) of while the CNI cache kept its IP reserved. DEL before the new ADD.
        if self.pod_run_dir(&uid).exists() || self.pod_file(&uid, CNI_CACHE).exists() {
            self.cleanup(&uid, true).await?;
        }
        match self.create(pod, &uid).await {
            Ok(state) => {
                info!(uid = %uid, ip = ?state.ips.first(), "sandbox ready");
                Ok(self.sandbox(pod, &state))
            }
            Err(e) => {
                if let Err(undo) = self.cleanup(&uid, true).await {
                    warn!(uid = %uid, error = %undo, "undoing a failed sandbox");
                }
                Err(e)
            }
        }
    }

    /// CNI DEL, unpins the namespaces and removes the pod's sandbox files. Idempotent.
    pub async fn teardown(&self, uid: &str) -> Result<(), SandboxError> {
        check_uid(uid)?;
        self.cleanup(uid, false).await?;
        info!(uid = %uid, "sandbox removed");
        Ok(())
    }

    /// UIDs of pods with a pinned sandbox on this host (for clean-up after a restart).
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.config.run_dir) else {
            return Vec::new();
        };
        let mut uids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        uids.sort();
        uids
    }

    /// CNI CHECK of the pod's network with its cached ADD result. Ok for pods without a
    /// network namespace of their own.
    pub async fn check(&self, uid: &str) -> Result<(), SandboxError> {
        check_uid(uid)?;
        let state = self.load_state(uid).ok_or_else(|| SandboxError::NotFound {
            uid: uid.to_string(),
        })?;
        if state.net.is_none() {
            return Ok(());
        }
        let cache = self.load_cni_cache(uid)?;
        let Some((cache, result)) = cache.and_then(|c| c.result.clone().map(|r| (c, r))) else {
            return Err(SandboxError::NotFound {
                uid: uid.to_string(),
            });
        };
        self.cni
            .check(&cache.network, &cache.invocation, &result)
            .await
            .map_err(SandboxError::cni(uid, Command::Check))
    }

    fn pod_run_dir(&self, uid: &str) -> PathBuf {
        self.config.run_dir.join(uid)
    }

    fn pod_file(&self, uid: &str, name: &str) -> PathBuf {
        crate::layout::pod_dir(&self.config.root_dir, uid).join(name)
    }

    fn sandbox(&self, pod: &Pod, state: &State) -> Sandbox {
        Sandbox {
            uid: state.uid.clone(),
            namespaces: NamespacePaths {
                net: state.net.clone(),
                ipc: state.ipc.clone(),
                uts: state.uts.clone(),
                pid: match &state.pid {
                    Some(pin) => PidNamespace::Join(pin.path.clone()),
                    None => PidNamespace::Own,
                },
            },
            ip: state.ips.first().copied(),
            hostname: state.hostname.clone(),
            hosts_file: self.pod_file(&state.uid, "etc-hosts"),
            resolv_file: self.pod_file(&state.uid, "resolv.conf"),
            hostname_file: self.pod_file(&state.uid, "hostname"),
            cluster_dns_missing: files::cluster_dns_missing(pod, &self.config.cluster_dns),
        }
    }

    async fn create(&self, pod: &Pod, uid: &str) -> Result<State, SandboxError> {
        let spec = pod.spec.clone().unwrap_or_default();
        let host_network = spec.host_network.unwrap_or(false);
        let host_ipc = spec.host_ipc.unwrap_or(false);
        let invalid = |detail: String| SandboxError::InvalidPod {
            uid: uid.to_string(),
            detail,
        };
        let names = if host_network {
            let node = nix::unistd::gethostname().map_err(|e| invalid(e.to_string()))?;
            let node = node.to_string_lossy().into_owned();
            files::PodNames {
                hostname: node.clone(),
                domain: None,
                kernel_hostname: node,
            }
        } else {
            files::pod_names(pod, &self.config.cluster_domain)
                .map_err(|e| invalid(e.to_string()))?
        };

        self.prepare_run_dir().map_err(SandboxError::io(uid))?;
        let dir = self.pod_run_dir(uid);
        std::fs::create_dir_all(&dir).map_err(SandboxError::io(uid))?;
        let req = ns::PinRequest {
            net: (!host_network).then(|| dir.join("net")),
            ipc: (!host_ipc).then(|| dir.join("ipc")),
            uts: (!host_network).then(|| dir.join("uts")),
            hostname: Some(names.kernel_hostname.clone()),
        };
        ns::create(&req)
            .await
            .map_err(|detail| SandboxError::Namespace {
                uid: uid.to_string(),
                detail,
            })?;

        let pid = match spec.share_process_namespace == Some(true) && spec.host_pid != Some(true) {
            true => Some(self.pid_namespace(uid, &dir).await?),
            false => None,
        };

        let ips = match &req.net {
            Some(net) => self.cni_add(pod, uid, net).await?,
            None => Vec::new(),
        };

        let aliases = spec.host_aliases.clone().unwrap_or_default();
        let hosts = if host_network {
            let node_hosts = std::fs::read_to_string(HOST_HOSTS).unwrap_or_default();
            files::host_network_hosts(&node_hosts, &aliases)
        } else {
            files::managed_hosts(&ips, &names, &aliases)
        };
        let host_dns = files::parse_resolv_conf(
            &std::fs::read_to_string(HOST_RESOLV_CONF).unwrap_or_default(),
        );
        let dns = files::pod_dns(
            pod,
            &self.config.cluster_dns,
            &self.config.cluster_domain,
            &host_dns,
        );
        let state = State {
            uid: uid.to_string(),
            net: req.net,
            ipc: req.ipc,
            uts: req.uts,
            pid,
            ips,
            hostname: names.kernel_hostname,
            hosts,
            resolv: files::format_resolv_conf(&dns),
        };
        self.write_pod_files(&state, true)?;
        let text = serde_json::to_vec_pretty(&state).map_err(|e| invalid(e.to_string()))?;
        write_atomic(&dir.join("sandbox.json"), &text).map_err(SandboxError::io(uid))?;
        Ok(state)
    }

    /// Starts the pod's PID 1 (this agent's executable as `/pause`) in a new PID namespace
    /// pinned in the pod's run dir.
    async fn pid_namespace(&self, uid: &str, dir: &Path) -> Result<pidns::PidPin, SandboxError> {
        let failed = |detail: String| SandboxError::Namespace {
            uid: uid.to_string(),
            detail,
        };
        let agent = std::env::current_exe().map_err(|e| failed(format!("own executable: {e}")))?;
        let pin = pidns::PidPin::create(&agent, &dir.join("pid"), &dir.join("pause"))
            .await
            .map_err(failed)?;
        // Recorded at once: a sandbox that fails later is undone before its state is written.
        let text = serde_json::to_vec(&pin).map_err(|e| failed(e.to_string()));
        if let Err(e) = text.and_then(|t| {
            write_atomic(&dir.join(PAUSE_RECORD), &t).map_err(|e| failed(e.to_string()))
        }) {
            pin.kill();
            return Err(e);
        }
        Ok(pin)
    }

    /// Makes the run dir a shared mount point (once; later calls find it done).
    fn prepare_run_dir(&self) -> io::Result<()> {
        let _guard = self
            .mount_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ns::ensure_shared_mount_point(&self.config.run_dir)
    }

    async fn cni_add(
        &self,
        pod: &Pod,
        uid: &str,
        netns: &Path,
    ) -> Result<Vec<IpAddr>, SandboxError> {
        let network = NetworkList::load_dir(&self.config.cni_conf_dir)
            .map_err(SandboxError::cni(uid, Command::Add))?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let mut runtime_config = Map::new();
        let ports = port_mappings(pod);
        if !ports.is_empty() {
            runtime_config.insert("portMappings".into(), Value::Array(ports));
        }
        let invocation = Invocation {
            container_id: uid.to_string(),
            netns: netns.display().to_string(),
            ifname: POD_IFNAME.to_string(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), namespace),
                ("K8S_POD_NAME".into(), name),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), uid.to_string()),
                ("K8S_POD_UID".into(), uid.to_string()),
            ],
            runtime_config,
        };
        let mut cache = CniCache {
            network,
            invocation,
            result: None,
        };
        self.save_cni_cache(uid, &cache)?;
        let result = self
            .cni
            .add(&cache.network, &cache.invocation)
            .await
            .map_err(SandboxError::cni(uid, Command::Add))?;
        let ips = cni::result_ips(&result, Some(POD_IFNAME));
        cache.result = Some(result);
        self.save_cni_cache(uid, &cache)?;
        if ips.is_empty() {
            return Err(SandboxError::Cni {
                uid: uid.to_string(),
                plugin: cache.network.name.clone(),
                command: Command::Add.as_str(),
                detail: "the result has no IP for eth0".into(),
            });
        }
        Ok(ips)
    }

    fn save_cni_cache(&self, uid: &str, cache: &CniCache) -> Result<(), SandboxError> {
        let text = serde_json::to_vec_pretty(cache).map_err(|e| SandboxError::Io {
            uid: uid.to_string(),
            source: io::Error::other(e),
        })?;
        let path = self.pod_file(uid, CNI_CACHE);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(SandboxError::io(uid))?;
        }
        write_atomic(&path, &text).map_err(SandboxError::io(uid))
    }

    /// The cached CNI inputs and result. An unreadable cache cannot be used for DEL however
    /// often it is retried, so it counts as absent (with a warning).
    fn load_cni_cache(&self, uid: &str) -> Result<Option<CniCache>, SandboxError> {
        let path = self.pod_file(uid, CNI_CACHE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SandboxError::io(uid)(e)),
        };
        match serde_json::from_slice(&text) {
            Ok(cache) => Ok(Some(cache)),
            Err(e) => {
                let path = path.display();
                warn!(uid = %uid, path = %path, error = %e, "unreadable CNI cache; no DEL");
                Ok(None)
            }
        }
    }

    fn load_state(&self, uid: &str) -> Option<State> {
        let path = self.pod_run_dir(uid).join("sandbox.json");
        let text = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<State>(&text) {
            Ok(state) if state.uid == uid => Some(state),
            Ok(_) | Err(_) => {
                warn!(uid = %uid, path = %path.display(), "unreadable sandbox state");
                None
            }
        }
    }

    /// Writes the pod's hosts, resolv.conf and hostname files; with `overwrite` false only
    /// the missing ones (existing files may be bound into running containers).
    fn write_pod_files(&self, state: &State, overwrite: bool) -> Result<(), SandboxError> {
        let uid = state.uid.as_str();
        let dir = crate::layout::pod_dir(&self.config.root_dir, uid);
        std::fs::create_dir_all(&dir).map_err(SandboxError::io(uid))?;
        for (name, content) in [
            ("etc-hosts", state.hosts.clone()),
            ("resolv.conf", state.resolv.clone()),
            ("hostname", files::hostname_file(&state.hostname)),
        ] {
            let path = dir.join(name);
            if overwrite || !path.exists() {
                std::fs::write(&path, content).map_err(SandboxError::io(uid))?;
            }
        }
        Ok(())
    }

    /// Undoes whatever exists of a sandbox: CNI DEL from the cache (with the netns if it is
    /// still pinned), the pins, the pod files, the run dir. With `best_effort` a failed DEL is
    /// logged and clean-up goes on; otherwise it stops there so the caller can retry.
    async fn cleanup(&self, uid: &str, best_effort: bool) -> Result<(), SandboxError> {
        let dir = self.pod_run_dir(uid);
        if let Some(cache) = self.load_cni_cache(uid)? {
            let mut invocation = cache.invocation.clone();
            if !ns::is_pinned(Path::new(&invocation.netns)) {
                invocation.netns = String::new();
            }
            let del = self
                .cni
                .del(
                    &cache.network,
                    &invocation,
                    cache.result.as_ref(),
                    best_effort,
                )
                .await
                .map_err(SandboxError::cni(uid, Command::Del));
            match del {
                Err(e) if !best_effort => return Err(e),
                Err(e) => warn!(uid = %uid, error = %e, "CNI DEL failed; going on"),
                Ok(()) => {}
            }
        }
        // Gone after DEL, or unreadable (no DEL could ever use it).
        remove_if_exists(&self.pod_file(uid, CNI_CACHE)).map_err(SandboxError::io(uid))?;
        let record = std::fs::read(dir.join(PAUSE_RECORD)).ok();
        if let Some(pin) = record.and_then(|t| serde_json::from_slice::<pidns::PidPin>(&t).ok()) {
            pin.kill();
        }
        for pin in ["net", "ipc", "uts", "pid"] {
            ns::remove_pin(&dir.join(pin)).map_err(SandboxError::io(uid))?;
        }
        for name in ["etc-hosts", "resolv.conf", "hostname"] {
            remove_if_exists(&self.pod_file(uid, name)).map_err(SandboxError::io(uid))?;
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(SandboxError::io(uid)(e)),
            _ => Ok(()),
        }
    }
}

/// The pod's UID, checked to be usable as a directory name.
fn pod_uid(pod: &Pod) -> Result<String, SandboxError> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    check_uid(&uid)?;
    Ok(uid)
}

fn check_uid(uid: &str) -> Result<(), SandboxError> {
    let ok = !uid.is_empty()
        && uid != "."
        && uid != ".."
        && uid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        return Ok(());
    }
    Err(SandboxError::InvalidPod {
        uid: uid.to_string(),
        detail: "UID must be a non-empty name of [A-Za-z0-9._-]".into(),
    })
}

/// The portmap plugin's runtimeConfig entries: one per container port with a hostPort.
pub fn port_mappings(pod: &Pod) -> Vec<Value> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let host_port = p.host_port.filter(|hp| *hp > 0)?;
            Some(json!({
                "hostPort": host_port,
                "containerPort": p.container_port,
                "protocol": p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase(),
                "hostIP": p.host_ip.clone().unwrap_or_default(),
            }))
        })
        .collect()
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes a file a container reads (hosts, resolv.conf, hostname): old or new after a crash.
fn write_atomic(path: &Path, content: &[u8]) -> io::Result<()> {
    crate::layout::write_atomic(path, content, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn uids_must_be_plain_names() {
        for ok in ["0d6c6f0e-1234-4c1b-9d3a-1a2b3c4d5e6f", "abc", "a_b.c"] {
            assert!(check_uid(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b"] {
            assert!(
                matches!(check_uid(bad), Err(SandboxError::InvalidPod { .. })),
                "{bad}"
            );
        }
        let pod = Pod {
            metadata: ObjectMeta::default(),
            ..Default::default()
        };
        assert!(matches!(
            pod_uid(&pod),
            Err(SandboxError::InvalidPod { .. })
        ));
    }

    #[test]
    fn port_mappings_from_host_ports() {
        let port = |container_port, host_port, protocol: Option<&str>| ContainerPort {
            container_port,
            host_port,
            protocol: protocol.map(str::to_string),
            ..Default::default()
        };
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![
                        port(80, Some(8080), None),
                        port(53, Some(5353), Some("UDP")),
                        port(9000, None, None),
                        port(9001, Some(0), None),
                    ]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            port_mappings(&pod),
            vec![
                json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}),
                json!({"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": ""}),
            ]
        );
        assert!(port_mappings(&Pod::default()).is_empty());
    }

    fn manager(run_dir: &Path, root_dir: &Path) -> SandboxManager {
        SandboxManager::new(SandboxConfig {
            run_dir: run_dir.to_path_buf(),
            root_dir: root_dir.to_path_buf(),
            cni_conf_dir: PathBuf::new(),
            cni_bin_dirs: vec![],
            cluster_dns: vec![],
            cluster_domain: "cluster.local".into(),
        })
    }

    #[test]
    fn list_is_empty_without_run_dir() {
        let mgr = manager(
            Path::new("/nonexistent/nodelet-run"),
            Path::new("/nonexistent/nodelet-root"),
        );
        assert!(mgr.list().is_empty());
    }

    #[tokio::test]
    async fn teardown_clears_leftovers_without_pins_and_is_idempotent() {
        let base = std::env::temp_dir().join(format!("nodelet-sbx-unit-{}", std::process::id()));
        let (run, root) = (base.join("run"), base.join("root"));
        let mgr = manager(&run, &root);
        // A half-made sandbox: no pins, a corrupt CNI cache, a stale state, pod files.
        std::fs::create_dir_all(run.join("u1")).unwrap();
        std::fs::create_dir_all(run.join("u2")).unwrap();
        std::fs::write(run.join("u1/sandbox.json"), "{}").unwrap();
        std::fs::write(run.join("u1/net"), "").unwrap();
        std::fs::create_dir_all(root.join("pods/u1")).unwrap();
        std::fs::write(root.join("pods/u1/cni.json"), "{ not json").unwrap();
        std::fs::write(root.join("pods/u1/etc-hosts"), "x").unwrap();
        std::fs::write(root.join("pods/u1/keep-me"), "x").unwrap();
        assert_eq!(mgr.list(), ["u1", "u2"]);
        assert!(matches!(
            mgr.check("u1").await,
            Err(SandboxError::NotFound { .. })
        ));

        mgr.teardown("u1").await.unwrap();
        assert!(!run.join("u1").exists());
        assert!(!root.join("pods/u1/etc-hosts").exists());
        assert!(!root.join("pods/u1/cni.json").exists());
        assert!(
            root.join("pods/u1/keep-me").exists(),
            "other modules' files stay"
        );
        assert_eq!(mgr.list(), ["u2"]);
        mgr.teardown("u1").await.unwrap();
        assert!(matches!(
            mgr.teardown("../u2").await,
            Err(SandboxError::InvalidPod { .. })
        ));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
