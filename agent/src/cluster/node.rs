//! The node object: registration and NodeStatus.
//!
//! Registration is virtual-kubelet style: create the Node; if it exists (a restart), keep it and
//! bring back only the labels this agent sets (NodeRestriction forbids a node to change its
//! taints, so an existing Node keeps its own). Then, every 10 s, the task measures memory, the
//! root dir's filesystem and the PID table, computes the conditions, and patches `nodes/status`
//! when anything but the heartbeat changed, or every 5 minutes. It reads its Node at each
//! interval, and a Node deleted under it is registered again. As the kubelet does, it compares
//! with the Node it read as well as with what it last posted: conditions someone else changed
//! (the node controller sets Ready to Unknown while the agent cannot reach the API server) are
//! corrected at the next interval, and their lastTransitionTime follows the Node's.
//!
//! Ready follows the container runtime: the runtime's health check runs every interval, and
//! once it has not answered for [`RUNTIME_DOWN_AFTER`] Ready turns False (KubeletNotReady,
//! "container runtime is down"), and True again at the first answer.
//!
//! Everything but the reads of /proc, /etc, /sys and statvfs and the runtime check is pure:
//! [`node_object`], [`runtime_error`], [`conditions`] and [`needs_post`] are unit tested.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, ObjectReference,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{sleep_or_cancel, ClusterConfig, ClusterError};
use crate::events::{EventType, Recorder};
use crate::retry::Retry;

/// The kubelet version the Node reports (the control plane checks version skew against it).
pub(super) const KUBELET_VERSION: &str = "v1.34.0-nodelet";
pub(super) const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// NodeStatus is posted at least this often even when nothing changed.
pub(super) const REPORT_INTERVAL: Duration = Duration::from_secs(300);
/// The kubelet's default hard eviction threshold for memory.available.
const MEMORY_THRESHOLD: u64 = 100 * 1024 * 1024;

/// The node is not Ready once the container runtime has not answered for this long (the
/// kubelet's runtime sync threshold).
pub const RUNTIME_DOWN_AFTER: Duration = Duration::from_secs(30);
/// How long one runtime health check may take before it counts as failed.
const RUNTIME_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the node task is given.
pub(super) struct Host {
    pub config: ClusterConfig,
    pub runtime_version: String,
    pub runtime_check: super::RuntimeCheck,
}

/// Why the runtime keeps the node from being Ready, from when it last answered (`None`: never),
/// as the kubelet words it; `None` when it is healthy.
pub(super) fn runtime_error(last_ok: Option<Instant>, now: Instant) -> Option<&'static str> {
    match last_ok {
        None => Some("container runtime status check may not have completed yet"),
        Some(at) if now.duration_since(at) >= RUNTIME_DOWN_AFTER => {
            Some("container runtime is down")
        }
        Some(_) => None,
    }
}

/// `containerd://<version>` for the runtime version the agent was given (bare or prefixed).
fn runtime_version(version: &str) -> String {
    if version.contains("://") {
        version.to_string()
    } else {
        format!("containerd://{version}")
    }
}

/// Facts about the machine that do not change while the agent runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Machine {
    pub cpus: u32,
    pub memory_bytes: u64,
    /// The root dir's filesystem size (ephemeral-storage capacity).
    pub fs_bytes: u64,
    pub kernel: String,
    pub os_image: String,
    pub machine_id: String,
    pub system_uuid: String,
    pub boot_id: String,
}

/// What is measured every status interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Usage {
    pub memory_available: u64,
    pub fs_total: u64,
    pub fs_available: u64,
    pub pid_max: u64,
    pub pids: u64,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| {
            tracing::debug!(path, error = %e, "host fact not readable");
            String::new()
        })
}

impl Machine {
    fn read(root_dir: &Path) -> Self {
        let machine_id = read("/etc/machine-id");
        let uuid = read("/sys/class/dmi/id/product_uuid");
        Machine {
            cpus: crate::host::cpus() as u32,
            memory_bytes: crate::host::memory_total(),
            fs_bytes: crate::host::filesystem(root_dir).0,
            kernel: read("/proc/sys/kernel/osrelease"),
            os_image: os_image(&read("/etc/os-release")),
            system_uuid: if uuid.is_empty() {
                machine_id.clone()
            } else {
                uuid
            },
            machine_id,
            boot_id: read("/proc/sys/kernel/random/boot_id"),
        }
    }
}

impl Usage {
    fn read(root_dir: &Path) -> Self {
        let (fs_total, fs_available) = crate::host::filesystem(root_dir);
        Usage {
            memory_available: crate::host::memory_available(),
            fs_total,
            fs_available,
            pid_max: crate::host::pid_max(),
            pids: crate::host::threads(),
        }
    }
}

/// PRETTY_NAME from /etc/os-release, unquoted.
pub(super) fn os_image(os_release: &str) -> String {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

/// Rust's architecture name as Kubernetes (Go) spells it.
pub(super) fn go_arch(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn kib(bytes: u64) -> Quantity {
    Quantity(format!("{}Ki", bytes / 1024))
}

/// The Node as this agent registers it, status without conditions.
pub(super) fn node_object(host: &Host, machine: &Machine) -> Node {
    let c = &host.config;
    let arch = go_arch(std::env::consts::ARCH);
    let mut labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", c.node_name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", arch),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    labels.extend(c.labels.clone());
    let capacity: BTreeMap<String, Quantity> = [
        ("cpu", Quantity(machine.cpus.to_string())),
        ("memory", kib(machine.memory_bytes)),
        ("pods", Quantity(c.max_pods.to_string())),
        ("ephemeral-storage", kib(machine.fs_bytes)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // Allocatable keeps the hard eviction thresholds back (memory 100Mi, nodefs 10%).
    let mut allocatable = capacity.clone();
    allocatable.insert(
        "memory".into(),
        kib(machine.memory_bytes.saturating_sub(MEMORY_THRESHOLD)),
    );
    allocatable.insert(
        "ephemeral-storage".into(),
        kib(machine.fs_bytes - machine.fs_bytes / 10),
    );
    let mut addresses = Vec::new();
    if let Some(ip) = c.node_ip {
        addresses.push(NodeAddress {
            type_: "InternalIP".into(),
            address: ip.to_string(),
        });
    }
    addresses.push(NodeAddress {
        type_: "Hostname".into(),
        address: c.node_name.clone(),
    });
    Node {
        metadata: ObjectMeta {
            name: Some(c.node_name.clone()),
            labels: Some(labels),
            annotations: Some(
                [(
                    "volumes.kubernetes.io/controller-managed-attach-detach".to_string(),
                    "true".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: (!c.taints.is_empty()).then(|| c.taints.clone()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            capacity: Some(capacity),
            allocatable: Some(allocatable),
            addresses: Some(addresses),
            daemon_endpoints: Some(NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint {
                    port: c.kubelet_port as i32,
                }),
            }),
            node_info: Some(NodeSystemInfo {
                architecture: arch.to_string(),
                boot_id: machine.boot_id.clone(),
                container_runtime_version: runtime_version(&host.runtime_version),
                kernel_version: machine.kernel.clone(),
                kubelet_version: KUBELET_VERSION.into(),
                machine_id: machine.machine_id.clone(),
                operating_system: "linux".into(),
                os_image: machine.os_image.clone(),
                system_uuid: machine.system_uuid.clone(),
                ..Default::default()
            }),
            // Always sent, empty too: a feature declared by an earlier run is withdrawn.
            declared_features: Some(c.declared_features.clone()),
            ..Default::default()
        }),
    }
}

/// The four conditions for `usage` and the runtime's error (see [`runtime_error`]), heartbeat
/// `now`; a condition keeps its previous lastTransitionTime while its status stays the same.
/// Ready is False (KubeletNotReady, the error as message) while the runtime is not healthy.
pub(super) fn conditions(
    usage: &Usage,
    runtime: Option<&str>,
    previous: &[NodeCondition],
    now: jiff::Timestamp,
) -> Vec<NodeCondition> {
    let memory = usage.memory_available < MEMORY_THRESHOLD;
    let disk = usage.fs_total > 0 && usage.fs_available.saturating_mul(10) < usage.fs_total;
    let pid = usage.pid_max > 0
        && usage.pid_max.saturating_sub(usage.pids).saturating_mul(20) < usage.pid_max;
    let pressure = |kind: &str, on: bool, yes: (&str, &str), no: (&str, &str)| {
        let (reason, message) = if on { yes } else { no };
        (
            kind.to_string(),
            on,
            reason.to_string(),
            message.to_string(),
        )
    };
    let list = [
        pressure(
            "MemoryPressure",
            memory,
            (
                "KubeletHasInsufficientMemory",
                "node has insufficient memory available",
            ),
            (
                "KubeletHasSufficientMemory",
                "node has sufficient memory available",
            ),
        ),
        pressure(
            "DiskPressure",
            disk,
            ("KubeletHasDiskPressure", "node has disk pressure"),
            ("KubeletHasNoDiskPressure", "node has no disk pressure"),
        ),
        pressure(
            "PIDPressure",
            pid,
            (
                "KubeletHasInsufficientPID",
                "node has insufficient PID available",
            ),
            (
                "KubeletHasSufficientPID",
                "node has sufficient PID available",
            ),
        ),
        match runtime {
            None => (
                "Ready".to_string(),
                true,
                "KubeletReady".to_string(),
                "nodelet is posting ready status".to_string(),
            ),
            Some(error) => (
                "Ready".to_string(),
                false,
                "KubeletNotReady".to_string(),
                error.to_string(),
            ),
        },
    ];
    list.into_iter()
        .map(|(type_, on, reason, message)| {
            let status = if on { "True" } else { "False" }.to_string();
            let since = previous
                .iter()
                .find(|p| p.type_ == type_ && p.status == status)
                .and_then(|p| p.last_transition_time.clone())
                .unwrap_or(Time(now));
            NodeCondition {
                type_,
                status,
                reason: Some(reason),
                message: Some(message),
                last_heartbeat_time: Some(Time(now)),
                last_transition_time: Some(since),
            }
        })
        .collect()
}

/// Whether the status must be posted: it differs from the last posted one in anything but the
/// heartbeat times, the Node read from the server (`server`, when it could be read) shows
/// conditions other than the ones to report, or the last post is `REPORT_INTERVAL` old.
pub(super) fn needs_post(
    last: Option<&NodeStatus>,
    server: Option<&NodeStatus>,
    next: &NodeStatus,
    last_post: Option<Instant>,
    now: Instant,
) -> bool {
    let (Some(last), Some(at)) = (last, last_post) else {
        return true;
    };
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
        }
        s
    };
    strip(last) != strip(next)
        || server.is_some_and(|s| !same_conditions(s, next))
        || now.duration_since(at) >= REPORT_INTERVAL
}

/// Whether `server` has each condition of `next` with the same status, reason, message and
/// transition time (heartbeats aside; conditions only others set do not count).
fn same_conditions(server: &NodeStatus, next: &NodeStatus) -> bool {
    let have = server.conditions.as_deref().unwrap_or_default();
    next.conditions.iter().flatten().all(|want| {
        have.iter().any(|c| {
            c.type_ == want.type_
                && c.status == want.status
                && c.reason == want.reason
                && c.message == want.message
                && c.last_transition_time == want.last_transition_time
        })
    })
}

/// Registers the Node, then keeps its status until `token` is cancelled. Sends the Node's UID
/// on `uid` after each registration.
pub(super) async fn run(
    client: kube::Client,
    host: Host,
    recorder: Recorder,
    uid: watch::Sender<Option<String>>,
    token: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(client);
    let name = host.config.node_name.clone();
    let machine = Machine::read(&host.config.root_dir);
    let mut backoff = Retry::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut runtime_ok: Option<Instant> = None;
    'register: loop {
        let node = loop {
            match register(&nodes, &host, &machine).await {
                Ok(node) => break node,
                Err(e) => {
                    let delay = backoff.fail();
                    tracing::warn!(node = name, error = %e, ?delay, "registering the node failed");
                    if !sleep_or_cancel(delay, &token).await {
                        return;
                    }
                }
            }
        };
        backoff.reset();
        tracing::info!(
            node = name,
            uid = node.metadata.uid.as_deref().unwrap_or(""),
            "node registered"
        );
        uid.send_replace(node.metadata.uid.clone());
        recorder.record(
            ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name.clone()),
                uid: node.metadata.uid.clone(),
                ..Default::default()
            },
            EventType::Normal,
            "RegisteredNode",
            &format!("Node {name} registered by nodelet"),
        );
        let mut posted: Option<NodeStatus> = None;
        let mut previous = node.status.and_then(|s| s.conditions).unwrap_or_default();
        let mut last_post: Option<Instant> = None;
        loop {
            // Read the Node every interval (a GET of its own object): one deleted under the
            // agent is registered again, whether or not a status is due.
            let server = match nodes.get_opt(&name).await {
                Ok(None) => {
                    tracing::warn!(node = name, "the Node was deleted; registering it again");
                    continue 'register;
                }
                Ok(Some(node)) => Some(node.status.unwrap_or_default()),
                Err(e) => {
                    tracing::warn!(node = name, error = %e, "reading the Node failed");
                    None
                }
            };
            // Transition times follow the Node as the server has it (the node controller may
            // have changed a condition), else what was last posted.
            if let Some(conditions) = server.as_ref().and_then(|s| s.conditions.clone()) {
                previous = conditions;
            }
            match tokio::time::timeout(RUNTIME_CHECK_TIMEOUT, (host.runtime_check)()).await {
                Ok(Ok(())) => runtime_ok = Some(Instant::now()),
                Ok(Err(e)) => {
                    tracing::warn!(
                        node = name,
                        error = e,
                        "the container runtime is not answering"
                    )
                }
                Err(_) => tracing::warn!(
                    node = name,
                    after = ?RUNTIME_CHECK_TIMEOUT,
                    "the container runtime did not answer in time"
                ),
            }
            let runtime = runtime_error(runtime_ok, Instant::now());
            let usage = Usage::read(&host.config.root_dir);
            let mut status = node_object(&host, &machine).status.unwrap_or_default();
            // Whole seconds, as the API keeps them (a posted time then reads back equal).
            let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
                .unwrap_or_else(|_| jiff::Timestamp::now());
            status.conditions = Some(conditions(&usage, runtime, &previous, now));
            if needs_post(
                posted.as_ref(),
                server.as_ref(),
                &status,
                last_post,
                Instant::now(),
            ) {
                let body = serde_json::json!({ "status": status });
                match nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Strategic(body))
                    .await
                {
                    Ok(_) => {
                        previous = status.conditions.clone().unwrap_or_default();
                        posted = Some(status);
                        last_post = Some(Instant::now());
                    }
                    Err(e) => {
                        let e = ClusterError::api("patch status", format!("nodes/{name}"), e);
                        tracing::warn!(node = name, error = %e, "posting node status failed");
                        if e.is_not_found() {
                            continue 'register;
                        }
                    }
                }
            }
            if !sleep_or_cancel(STATUS_INTERVAL, &token).await {
                return;
            }
        }
    }
}

/// Creates the Node, or adopts the existing one and restores this agent's labels on it.
async fn register(nodes: &Api<Node>, host: &Host, machine: &Machine) -> Result<Node, ClusterError> {
    let want = node_object(host, machine);
    let name = host.config.node_name.clone();
    let object = format!("nodes/{name}");
    match nodes.create(&PostParams::default(), &want).await {
        Ok(node) => return Ok(node),
        Err(kube::Error::Api(s)) if s.is_already_exists() => {}
        Err(e) => return Err(ClusterError::api("create", object, e)),
    }
    let existing = nodes
        .get(&name)
        .await
        .map_err(|e| ClusterError::api("get", &object, e))?;
    let labels = want.metadata.labels.unwrap_or_default();
    let have = existing.metadata.labels.clone().unwrap_or_default();
    if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
        return Ok(existing);
    }
    let body = serde_json::json!({ "metadata": { "labels": labels } });
    nodes
        .patch(&name, &PatchParams::default(), &Patch::Strategic(body))
        .await
        .map_err(|e| ClusterError::api("patch", object, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::fake_api::{until, FakeApi};

    fn host() -> Host {
        Host {
            config: ClusterConfig {
                kubeconfig: "/k".into(),
                node_name: "nodelet-1".into(),
                node_ip: Some("10.1.2.3".parse().unwrap()),
                labels: [("zone".to_string(), "a".to_string())].into(),
                taints: vec![k8s_openapi::api::core::v1::Taint {
                    key: "dedicated".into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                }],
                max_pods: 20,
                root_dir: "/var/lib/nodelet".into(),
                kubelet_port: 10250,
                declared_features: vec!["ExtendWebSocketsToKubelet".into()],
            },
            runtime_version: "1.6.20".into(),
            runtime_check: std::sync::Arc::new(|| Box::pin(async { Ok(()) })),
        }
    }

    fn machine() -> Machine {
        Machine {
            cpus: 2,
            memory_bytes: 4 << 30,
            fs_bytes: 100 << 30,
            kernel: "6.1.0".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            machine_id: "m".into(),
            system_uuid: "s".into(),
            boot_id: "b".into(),
        }
    }

    #[test]
    fn host_files_parse() {
        assert_eq!(
            os_image("NAME=\"Debian\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"),
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(os_image(""), "Linux");
        assert_eq!(go_arch("x86_64"), "amd64");
        assert_eq!(go_arch("aarch64"), "arm64");
    }

    #[test]
    fn the_node_object_says_what_the_control_plane_reads() {
        let n = node_object(&host(), &machine());
        let labels = n.metadata.labels.unwrap();
        assert_eq!(labels["kubernetes.io/hostname"], "nodelet-1");
        assert_eq!(labels["kubernetes.io/os"], "linux");
        assert_eq!(labels["zone"], "a");
        assert!(labels.contains_key("kubernetes.io/arch"));
        assert_eq!(n.spec.unwrap().taints.unwrap()[0].key, "dedicated");
        let s = n.status.unwrap();
        let cap = s.capacity.unwrap();
        assert_eq!(cap["cpu"].0, "2");
        assert_eq!(cap["pods"].0, "20");
        assert_eq!(cap["memory"].0, format!("{}Ki", 4u64 << 20));
        let alloc = s.allocatable.unwrap();
        assert_eq!(
            alloc["memory"].0,
            format!("{}Ki", (4u64 << 20) - 100 * 1024)
        );
        assert_eq!(
            alloc["ephemeral-storage"].0,
            format!("{}Ki", (90u64 << 30) / 1024)
        );
        let addrs = s.addresses.unwrap();
        assert_eq!(addrs[0].type_, "InternalIP");
        assert_eq!(addrs[0].address, "10.1.2.3");
        assert_eq!(addrs[1].type_, "Hostname");
        assert_eq!(addrs[1].address, "nodelet-1");
        let info = s.node_info.unwrap();
        assert_eq!(info.container_runtime_version, "containerd://1.6.20");
        assert_eq!(info.kubelet_version, KUBELET_VERSION);
        assert_eq!(info.operating_system, "linux");
        assert_eq!(
            s.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port,
            10250
        );
        assert_eq!(s.declared_features.unwrap(), ["ExtendWebSocketsToKubelet"]);
        let mut none = host();
        none.config.declared_features.clear();
        let s = node_object(&none, &machine()).status.unwrap();
        assert_eq!(s.declared_features, Some(vec![]), "sent empty, to withdraw");
    }

    fn healthy() -> Usage {
        Usage {
            memory_available: 1 << 30,
            fs_total: 100,
            fs_available: 50,
            pid_max: 1000,
            pids: 100,
        }
    }

    fn status_of<'a>(c: &'a [NodeCondition], t: &str) -> &'a str {
        &c.iter().find(|c| c.type_ == t).unwrap().status
    }

    #[test]
    fn pressure_conditions_follow_the_thresholds() {
        let now = jiff::Timestamp::from_second(100).unwrap();
        let c = conditions(&healthy(), None, &[], now);
        let types: Vec<_> = c.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]
        );
        assert_eq!(status_of(&c, "Ready"), "True");
        for t in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
            assert_eq!(status_of(&c, t), "False", "{t}");
        }
        let low = Usage {
            memory_available: 99 << 20,
            fs_available: 9,
            pids: 960,
            ..healthy()
        };
        let c = conditions(&low, None, &[], now);
        for t in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
            assert_eq!(status_of(&c, t), "True", "{t}");
        }
        let edge = Usage {
            fs_available: 10,
            ..healthy()
        };
        assert_eq!(
            status_of(&conditions(&edge, None, &[], now), "DiskPressure"),
            "False"
        );
    }

    #[test]
    fn transition_time_moves_only_on_change() {
        let t1 = jiff::Timestamp::from_second(100).unwrap();
        let t2 = jiff::Timestamp::from_second(110).unwrap();
        let first = conditions(&healthy(), None, &[], t1);
        let second = conditions(&healthy(), None, &first, t2);
        for c in &second {
            assert_eq!(c.last_transition_time, Some(Time(t1)));
            assert_eq!(c.last_heartbeat_time, Some(Time(t2)));
        }
        let full = Usage {
            fs_available: 1,
            ..healthy()
        };
        let third = conditions(&full, None, &second, t2);
        let disk = third.iter().find(|c| c.type_ == "DiskPressure").unwrap();
        assert_eq!(disk.last_transition_time, Some(Time(t2)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_runtime_is_down_after_the_threshold_without_an_answer() {
        let start = Instant::now();
        assert_eq!(
            runtime_error(None, start),
            Some("container runtime status check may not have completed yet")
        );
        assert_eq!(runtime_error(Some(start), start), None);
        tokio::time::advance(RUNTIME_DOWN_AFTER - Duration::from_secs(1)).await;
        assert_eq!(runtime_error(Some(start), Instant::now()), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            runtime_error(Some(start), Instant::now()),
            Some("container runtime is down")
        );
    }

    #[test]
    fn ready_follows_the_runtime_and_only_ready_changes() {
        let t1 = jiff::Timestamp::from_second(100).unwrap();
        let t2 = jiff::Timestamp::from_second(110).unwrap();
        let t3 = jiff::Timestamp::from_second(120).unwrap();
        let up = conditions(&healthy(), None, &[], t1);
        let down = conditions(&healthy(), Some("container runtime is down"), &up, t2);
        let ready = down.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason.as_deref(), Some("KubeletNotReady"));
        assert_eq!(ready.message.as_deref(), Some("container runtime is down"));
        assert_eq!(ready.last_transition_time, Some(Time(t2)));
        for t in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
            let c = down.iter().find(|c| c.type_ == t).unwrap();
            assert_eq!(c.status, "False", "{t}");
            assert_eq!(c.last_transition_time, Some(Time(t1)), "{t}");
        }
        let back = conditions(&healthy(), None, &down, t3);
        let ready = back.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(ready.reason.as_deref(), Some("KubeletReady"));
        assert_eq!(ready.last_transition_time, Some(Time(t3)));
    }

    #[test]
    fn the_runtime_version_is_prefixed_once() {
        assert_eq!(runtime_version("1.6.20"), "containerd://1.6.20");
        assert_eq!(
            runtime_version("containerd://1.6.20"),
            "containerd://1.6.20"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn status_is_posted_on_change_or_every_five_minutes() {
        let t1 = jiff::Timestamp::from_second(100).unwrap();
        let t2 = jiff::Timestamp::from_second(110).unwrap();
        let status = |usage: &Usage, previous: &NodeStatus, now| NodeStatus {
            conditions: Some(conditions(
                usage,
                None,
                previous.conditions.as_deref().unwrap_or_default(),
                now,
            )),
            ..Default::default()
        };
        let first = status(&healthy(), &NodeStatus::default(), t1);
        let start = Instant::now();
        assert!(needs_post(None, None, &first, None, start));
        let beat = status(&healthy(), &first, t2);
        tokio::time::advance(STATUS_INTERVAL).await;
        assert!(!needs_post(
            Some(&first),
            Some(&first),
            &beat,
            Some(start),
            Instant::now()
        ));
        // The node controller set Ready to Unknown on the server: post now, not in 5 minutes.
        let mut unknown = first.clone();
        for c in unknown.conditions.iter_mut().flatten() {
            if c.type_ == "Ready" {
                c.status = "Unknown".into();
                c.reason = Some("NodeStatusUnknown".into());
            }
        }
        assert!(needs_post(
            Some(&first),
            Some(&unknown),
            &beat,
            Some(start),
            Instant::now()
        ));
        // A Node that could not be read does not force a post.
        assert!(!needs_post(
            Some(&first),
            None,
            &beat,
            Some(start),
            Instant::now()
        ));
        let changed = status(
            &Usage {
                memory_available: 0,
                ..healthy()
            },
            &first,
            t2,
        );
        assert!(needs_post(
            Some(&first),
            Some(&first),
            &changed,
            Some(start),
            Instant::now()
        ));
        tokio::time::advance(REPORT_INTERVAL).await;
        assert!(needs_post(
            Some(&first),
            Some(&first),
            &beat,
            Some(start),
            Instant::now()
        ));
    }

    const NODE: &str = "/api/v1/nodes/nodelet-1";

    fn ready_status(api: &FakeApi) -> String {
        let node = api.get(NODE).unwrap_or_default();
        node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready")
            .map(|c| c["status"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    }

    fn status_patches(api: &FakeApi) -> usize {
        api.requests_to("PATCH", &format!("{NODE}/status")).len()
    }

    #[tokio::test(start_paused = true)]
    async fn a_ready_condition_the_controller_changed_is_corrected_at_the_next_interval() {
        let api = FakeApi::new();
        let root = std::env::temp_dir();
        let mut host = host();
        host.config.root_dir = root;
        let token = CancellationToken::new();
        let (uid, _) = watch::channel(None);
        let task = tokio::spawn(run(
            api.client(),
            host,
            Recorder::new("nodelet-1", None),
            uid,
            token.clone(),
        ));
        until("the first status", Duration::from_secs(60), || {
            status_patches(&api) > 0
        })
        .await;
        assert_eq!(ready_status(&api), "True");
        // The node controller marks the node Unknown (as after an API-server outage).
        api.edit(NODE, |node| {
            for c in node["status"]["conditions"].as_array_mut().unwrap() {
                if c["type"] == "Ready" {
                    c["status"] = "Unknown".into();
                    c["reason"] = "NodeStatusUnknown".into();
                    c["message"] = "Kubelet stopped posting node status.".into();
                }
            }
        });
        tokio::time::sleep(STATUS_INTERVAL * 2).await;
        assert_eq!(
            (ready_status(&api), status_patches(&api)),
            ("True".to_string(), 2),
            "Ready posted again within two intervals, not after {REPORT_INTERVAL:?}"
        );
        token.cancel();
        task.await.unwrap();
    }
}
