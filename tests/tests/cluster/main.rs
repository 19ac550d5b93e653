//! Cluster tier: the `nodelet` binary joined to a real control plane. Tests of one theme live in
//! a submodule of this test binary and share its harness (`use super::*`).
//!
//! Every test is `#[ignore]`d: `scripts/test` runs them with `--ignored --test-threads=1` only
//! when `KUBECONFIG` is set. They read:
//! - `KUBECONFIG`: an admin kubeconfig (the test creates and inspects objects with it);
//! - `NODELET_NODE_KUBECONFIG`: the node's own credential (`system:node:<name>`), given to the
//!   agent as `--kubeconfig`;
//! - `NODELET_NODE_NAME`: the node name that credential is for;
//! - `NODELET_NODE2_KUBECONFIG` and `NODELET_NODE2_NAME`: a second node's credential, only for
//!   the taint-eviction test (the control plane evicts from an unreachable node only while
//!   another node is Ready); without them that test fails, saying they are missing.
//!
//! With none of them set a test prints a loud SKIPPED line and returns; with only some set it
//! fails, since that is a broken setup rather than an absent cluster. Each test runs its own
//! agent (root, run and log dirs under a fresh temporary dir, containerd namespace
//! `k8s.nodelet.cluster-test`) against real containerd, the loopback registry and CNI, and its
//! pods in a namespace of its own. Timing bounds are generous: they catch hangs, not slowness.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
};
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::{DeleteParams, EvictParams, PostParams};
use kube::Api;
use nodelet_tests::csi_support::{LoopPlugin, LOOP_DRIVER};

mod parity;
mod ports;
mod streaming;

const CONTAINERD_NS: &str = "k8s.nodelet.cluster-test";
const IMAGE: &str = "127.0.0.1:5000/nodelet/busybox:latest";
/// The gateway address of the nodelet CNI bridge (`scripts/cni/10-nodelet.conflist`).
const NODE_IP: &str = "10.233.0.1";

struct Cluster {
    admin: kube::Client,
    node: String,
    node_kubeconfig: PathBuf,
}

/// The cluster under test, or `None` (after a loud message) when no cluster is configured.
async fn cluster(test: &str) -> Option<Cluster> {
    let vars = ["KUBECONFIG", "NODELET_NODE_KUBECONFIG", "NODELET_NODE_NAME"];
    let values: Vec<Option<String>> = vars
        .iter()
        .map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .collect();
    if values.iter().all(Option::is_none) {
        eprintln!(
            "SKIPPED cluster test {test}: set KUBECONFIG (admin), NODELET_NODE_KUBECONFIG and \
             NODELET_NODE_NAME to run it against a real control plane"
        );
        return None;
    }
    let missing: Vec<_> = vars
        .iter()
        .zip(&values)
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| *k)
        .collect();
    assert!(
        missing.is_empty(),
        "cluster test {test}: {missing:?} not set (all of {vars:?} are needed)"
    );
    let admin = kube::Client::try_default()
        .await
        .expect("admin client from KUBECONFIG");
    Some(Cluster {
        admin,
        node: values[2].clone().unwrap(),
        node_kubeconfig: values[1].clone().unwrap().into(),
    })
}

fn agent_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("NODELET_BIN") {
        return bin.into();
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug/nodelet")
}

/// One `nodelet` process in cluster mode; its dirs survive restarts within a test.
struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    node: String,
    kubeconfig: PathBuf,
    containerd_ns: String,
    extra: Vec<String>,
    /// The network namespace it runs in (a path under /run/netns); `None`: the test's own.
    netns: Option<PathBuf>,
}

impl Agent {
    fn start(c: &Cluster) -> Agent {
        Agent::start_as(&c.node, &c.node_kubeconfig, CONTAINERD_NS, &[])
    }

    /// An agent for node `node` with that node's credential, a containerd namespace of its
    /// own (a second node on this machine) and `extra` flags.
    fn start_as(
        node: &str,
        kubeconfig: &std::path::Path,
        containerd_ns: &str,
        extra: &[String],
    ) -> Agent {
        let mut agent = Agent::unstarted(node, kubeconfig, containerd_ns, extra);
        agent.restart();
        agent
    }

    /// As `start_as`, not started yet: set `netns` first, then `restart`.
    fn unstarted(
        node: &str,
        kubeconfig: &std::path::Path,
        containerd_ns: &str,
        extra: &[String],
    ) -> Agent {
        Agent {
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            node: node.to_string(),
            kubeconfig: kubeconfig.to_path_buf(),
            containerd_ns: containerd_ns.to_string(),
            extra: extra.to_vec(),
            netns: None,
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// The agent's manifest folder (static pods).
    fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// Starts the agent (again) with the same dirs.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("agent log");
        std::fs::create_dir_all(self.manifests()).expect("manifest folder");
        let bin = agent_binary();
        // In a network namespace of the test's: nsenter joins it and execs the agent (the
        // child is the agent itself), the mount namespace stays the host's, which containerd
        // shares.
        let mut command = match &self.netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", netns.display()))
                    .arg("--")
                    .arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--hostname-override", &self.node])
            .arg("--root-dir")
            .arg(d.join("root"))
            .arg("--run-dir")
            .arg(d.join("run"))
            .arg("--pod-logs-dir")
            .arg(d.join("logs"))
            .arg("--pod-manifest-path")
            .arg(self.manifests())
            .args(["--containerd-namespace", &self.containerd_ns])
            // No read-only port unless the test asks for one.
            .args(
                (!self.extra.iter().any(|a| a == "--read-only-port"))
                    .then_some(["--read-only-port", "0"])
                    .into_iter()
                    .flatten(),
            )
            .arg("--client-ca-file")
            .arg(credential_files(&self.kubeconfig, d).0)
            // The node's address is the CNI bridge's (scripts/setup), never the host's uplink;
            // in a namespace of the test's, the agent finds its own.
            .args(
                (self.netns.is_none() && !self.extra.iter().any(|a| a == "--node-ip"))
                    .then_some(["--node-ip", NODE_IP])
                    .into_iter()
                    .flatten(),
            )
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e} (cargo build first)", bin.display()));
        self.child = Some(child);
    }

    /// Kills the agent with SIGKILL (a crash: no shutdown at all) and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the agent with SIGTERM (its pods keep running) and waits for it to exit.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        for _ in 0..100 {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        // Its pods keep running when it stops: remove them, their sandboxes and the namespace.
        nodelet_tests::leftovers::remove(&nodelet_tests::leftovers::AgentDirs {
            dir: self.dir.path().to_path_buf(),
            root_dir: self.dir.path().join("root"),
            run_dir: self.dir.path().join("run"),
            containerd_namespace: self.containerd_ns.clone(),
            containerd: None,
        });
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            let tail: Vec<_> = log.lines().rev().take(60).collect();
            eprintln!("---- agent log (last lines)");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// The CA, client certificate and key of a kubeconfig with inline data, written to files in
/// `dir`: the agent trusts that CA for clients of its secure port (the API server's kubelet
/// client certificate is signed by the cluster CA, as kubeadm sets it up).
fn credential_files(
    kubeconfig: &std::path::Path,
    dir: &std::path::Path,
) -> (PathBuf, PathBuf, PathBuf) {
    let text = std::fs::read_to_string(kubeconfig).expect("read kubeconfig");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("kubeconfig YAML");
    let field = |list: &str, item: &str, key: &str| {
        let value = &doc[list][0][item][key];
        let data = value.as_str().unwrap_or_else(|| {
            panic!(
                "{}: {list}[0].{item}.{key} (inline data) is needed",
                kubeconfig.display()
            )
        });
        let decoded = Command::new("base64")
            .arg("-d")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(data.as_bytes())?;
                child.wait_with_output()
            })
            .expect("base64 -d");
        let path = dir.join(key);
        std::fs::write(&path, decoded.stdout).unwrap();
        path
    };
    (
        field("clusters", "cluster", "certificate-authority-data"),
        field("users", "user", "client-certificate-data"),
        field("users", "user", "client-key-data"),
    )
}

/// A namespace of the test's own, deleted at the end with its pods (declare it after the
/// `Agent`, so that the agent outlives it and kills their containers).
struct TestNamespace {
    client: kube::Client,
    name: String,
}

impl TestNamespace {
    async fn create(c: &Cluster, test: &str) -> TestNamespace {
        let name = format!(
            "nodelet-{test}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                % 1_000_000
        );
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(c.admin.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        // Pods are admitted only once the namespace's default ServiceAccount exists.
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(c.admin.clone(), &name);
        let d = Deadline::new("the default service account", 60);
        while sa.get_opt("default").await.ok().flatten().is_none() {
            d.tick().await;
        }
        TestNamespace {
            client: c.admin.clone(),
            name,
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Best effort: force-delete the pods, give the agent (dropped after this) 30 s to kill
        // their containers, then delete the namespace.
        let name = self.name.clone();
        with_own_client(move |client| async move {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &name);
            let uids: Vec<String> = match pods.list(&Default::default()).await {
                Ok(list) => list.items.iter().map(uid).collect(),
                Err(_) => Vec::new(),
            };
            let _ = pods
                .delete_collection(
                    &DeleteParams::default().grace_period(0),
                    &Default::default(),
                )
                .await;
            for _ in 0..120 {
                if uids.iter().all(|u| running_containers(u) == 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let _ = Api::<Namespace>::all(client)
                .delete(&name, &DeleteParams::default())
                .await;
        });
    }
}

/// Runs `work` with an admin client of its own on a runtime of its own, on another thread, and
/// waits for it: for clean-up in `Drop` (the test's client lives on the runtime a drop blocks).
fn with_own_client<F, Fut>(work: F)
where
    F: FnOnce(kube::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            if let Ok(client) = kube::Client::try_default().await {
                work(client).await;
            }
        });
    })
    .join();
}

/// A bound for a polling loop: `tick` sleeps 250 ms and panics once `seconds` have passed.
struct Deadline {
    what: String,
    seconds: u64,
    until: std::time::Instant,
}

impl Deadline {
    fn new(what: impl Into<String>, seconds: u64) -> Self {
        Deadline {
            what: what.into(),
            seconds,
            until: std::time::Instant::now() + Duration::from_secs(seconds),
        }
    }

    async fn tick(&self) {
        assert!(
            std::time::Instant::now() < self.until,
            "timed out after {}s waiting for {}",
            self.seconds,
            self.what
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn node_ready(c: &Cluster) -> bool {
    let nodes: Api<Node> = Api::all(c.admin.clone());
    let Ok(Some(node)) = nodes.get_opt(&c.node).await else {
        return false;
    };
    condition(
        node.status.and_then(|s| s.conditions).unwrap_or_default(),
        "Ready",
    )
}

fn condition<T: serde::Serialize>(conditions: Vec<T>, kind: &str) -> bool {
    conditions.iter().any(|c| {
        let v = serde_json::to_value(c).unwrap();
        v["type"] == kind && v["status"] == "True"
    })
}

async fn wait_node_ready(c: &Cluster) {
    let d = Deadline::new("the Node to be Ready", 90);
    while !node_ready(c).await {
        d.tick().await;
    }
}

/// A pod for this node: busybox sleeping, ready once `/tmp` exists (an exec probe).
fn pod(name: &str, node: &str, grace: i64) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": grace,
            "containers": [{
                "name": "app",
                "image": IMAGE,
                "command": ["sleep", "3600"],
                "readinessProbe": {"exec": {"command": ["test", "-d", "/tmp"]}, "periodSeconds": 1},
            }],
        },
    }))
    .unwrap()
}

async fn pod_ready(pods: &Api<Pod>, name: &str) -> Option<Pod> {
    let p = pods.get_opt(name).await.ok().flatten()?;
    let status = p.status.clone()?;
    let ready = status.phase.as_deref() == Some("Running")
        && condition(status.conditions.unwrap_or_default(), "Ready");
    ready.then_some(p)
}

async fn create_ready_pod(pods: &Api<Pod>, c: &Cluster, name: &str, grace: i64) -> Pod {
    create_until_ready(pods, &pod(name, &c.node, grace)).await
}

/// Creates `p` and waits for it to be Running and Ready.
async fn create_until_ready(pods: &Api<Pod>, p: &Pod) -> Pod {
    pods.create(&PostParams::default(), p)
        .await
        .expect("create pod");
    let name = p.metadata.name.as_deref().expect("a pod name");
    let d = Deadline::new(format!("pod {name} Running and Ready"), 180);
    loop {
        if let Some(p) = pod_ready(pods, name).await {
            return p;
        }
        d.tick().await;
    }
}

/// How many of the pod's containers have a running task in containerd.
fn running_containers(uid: &str) -> usize {
    let filter = format!("labels.\"{}\"=={uid}", nodelet::runtime::labels::POD_UID);
    let out = Command::new("ctr")
        .args(["-n", CONTAINERD_NS, "containers", "ls", "-q", &filter])
        .output()
        .expect("ctr containers ls");
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let tasks = Command::new("ctr")
        .args(["-n", CONTAINERD_NS, "tasks", "ls"])
        .output()
        .expect("ctr tasks ls");
    String::from_utf8_lossy(&tasks.stdout)
        .lines()
        .filter(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            f.len() >= 3 && ids.iter().any(|id| id == f[0]) && f[2] == "RUNNING"
        })
        .count()
}

async fn wait_containers_gone(uid: &str, seconds: u64) -> Duration {
    let start = std::time::Instant::now();
    let d = Deadline::new(format!("the containers of pod {uid} to stop"), seconds);
    while running_containers(uid) > 0 {
        d.tick().await;
    }
    start.elapsed()
}

async fn wait_pod_gone(pods: &Api<Pod>, name: &str, uid: &str, seconds: u64) {
    let d = Deadline::new(format!("pod {name} to be gone from the API"), seconds);
    loop {
        match pods.get_opt(name).await {
            Ok(None) => return,
            Ok(Some(p)) if p.metadata.uid.as_deref() != Some(uid) => return,
            _ => d.tick().await,
        }
    }
}

async fn renew_time(
    leases: &Api<Lease>,
    node: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime> {
    leases
        .get_opt(node)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.renew_time)
}

fn uid(p: &Pod) -> String {
    p.metadata.uid.clone().expect("pod uid")
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn node_registers_becomes_ready_and_its_lease_renews() {
    let Some(c) = cluster("node_registers_becomes_ready_and_its_lease_renews").await else {
        return;
    };
    let mut agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let nodes: Api<Node> = Api::all(c.admin.clone());
    let node = nodes.get(&c.node).await.unwrap();
    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels["kubernetes.io/hostname"], c.node);
    assert_eq!(labels["kubernetes.io/os"], "linux");
    let status = node.status.clone().unwrap();
    let info = status.node_info.unwrap();
    let version = info
        .container_runtime_version
        .strip_prefix("containerd://")
        .unwrap_or_default();
    assert!(
        version.starts_with(|c: char| c.is_ascii_digit()),
        "containerd://<version>: {info:?}"
    );
    assert!(info.kubelet_version.starts_with("v1.34"), "{info:?}");
    let capacity = status.capacity.unwrap();
    for r in ["cpu", "memory", "pods", "ephemeral-storage"] {
        assert!(capacity.contains_key(r), "capacity lacks {r}: {capacity:?}");
    }
    let addresses = status.addresses.unwrap();
    assert!(addresses
        .iter()
        .any(|a| a.type_ == "Hostname" && a.address == c.node));
    assert_eq!(
        status
            .daemon_endpoints
            .unwrap()
            .kubelet_endpoint
            .unwrap()
            .port,
        10250
    );
    let types: Vec<_> = status
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| (c.type_, c.status))
        .collect();
    for t in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
        assert!(
            types.iter().any(|(k, _)| k == t),
            "no {t} condition: {types:?}"
        );
    }

    let leases: Api<Lease> = Api::namespaced(c.admin.clone(), "kube-node-lease");
    let d = Deadline::new("the node lease", 60);
    let first = loop {
        if let Some(t) = renew_time(&leases, &c.node).await {
            break t;
        }
        d.tick().await;
    };
    let lease = leases.get(&c.node).await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some(c.node.as_str()));
    assert_eq!(lease.lease_duration_seconds, Some(40));
    let d = Deadline::new("the lease to be renewed", 60);
    while renew_time(&leases, &c.node).await <= Some(first.clone()) {
        d.tick().await;
    }

    // A restart registers again and keeps the same Node.
    agent.stop();
    let before = renew_time(&leases, &c.node).await;
    agent.restart();
    let d = Deadline::new("the lease to be renewed after a restart", 60);
    while renew_time(&leases, &c.node).await <= before {
        d.tick().await;
    }
    let again = nodes.get(&c.node).await.unwrap();
    assert_eq!(
        again.metadata.uid, node.metadata.uid,
        "re-registration kept the Node"
    );
}

/// The entry of `driver` in the node's CSINode, once the CSINode exists.
async fn csinode_driver(
    csinodes: &Api<CSINode>,
    node: &str,
    driver: &str,
) -> Option<Option<k8s_openapi::api::storage::v1::CSINodeDriver>> {
    let csinode = csinodes.get_opt(node).await.ok().flatten()?;
    Some(csinode.spec.drivers.into_iter().find(|d| d.name == driver))
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn a_registered_csi_driver_is_recorded_in_the_nodes_csinode() {
    let Some(c) = cluster("a_registered_csi_driver_is_recorded_in_the_nodes_csinode").await else {
        return;
    };
    let agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let node_uid = Api::<Node>::all(c.admin.clone())
        .get(&c.node)
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let csinodes: Api<CSINode> = Api::all(c.admin.clone());
    let mut plugin = LoopPlugin::start_with(
        &agent.dir.path().join("csi-state"),
        &agent.dir.path().join("root/plugins_registry"),
        "loop-node-7",
        &[
            "--max-volumes",
            "5",
            "--topology",
            "topology.loop.csi/zone=z1",
        ],
    );

    // Registration: GetInfo, NodeGetInfo, then the driver's entry in the CSINode.
    let d = Deadline::new("the loop driver in the CSINode", 60);
    let entry = loop {
        if let Some(Some(entry)) = csinode_driver(&csinodes, &c.node, LOOP_DRIVER).await {
            break entry;
        }
        d.tick().await;
    };
    assert_eq!(entry.node_id, "loop-node-7");
    assert_eq!(
        entry.topology_keys,
        Some(vec!["topology.loop.csi/zone".to_string()])
    );
    assert_eq!(entry.allocatable.and_then(|a| a.count), Some(5));
    let csinode = csinodes.get(&c.node).await.unwrap();
    let owners = csinode.metadata.owner_references.unwrap_or_default();
    assert!(
        owners
            .iter()
            .any(|o| o.kind == "Node" && o.name == c.node && o.uid == node_uid),
        "owned by the Node: {owners:?}"
    );

    // The plugin's registration socket goes away: so does its entry, not the CSINode.
    plugin.unregister();
    let d = Deadline::new("the loop driver's entry to be removed", 60);
    while csinode_driver(&csinodes, &c.node, LOOP_DRIVER).await != Some(None) {
        d.tick().await;
    }
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn a_csi_pv_is_staged_with_its_secret_read_through_the_node_identity() {
    let Some(c) =
        cluster("a_csi_pv_is_staged_with_its_secret_read_through_the_node_identity").await
    else {
        return;
    };
    let agent = Agent::start(&c);
    // Declared before the namespace, so that it outlives the pods' teardown.
    let plugin = LoopPlugin::start(
        &agent.dir.path().join("csi-state"),
        &agent.dir.path().join("root/plugins_registry"),
        "loop-node",
    );
    let ns = TestNamespace::create(&c, "csi").await;
    wait_node_ready(&c).await;
    let admin = c.admin.clone();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "stage-creds"}, "stringData": {"password": "s3cret"}
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), &ns.name)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // The Secret lives in the test namespace, referenced by the PV (cluster-scoped, named after
    // the namespace so runs never collide); the plugin refuses NodeStage without it.
    let pv_name = ns.name.clone();
    let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "32Mi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "claimRef": {"namespace": ns.name, "name": "data"},
            "csi": {
                "driver": LOOP_DRIVER,
                "volumeHandle": pv_name,
                "fsType": "ext4",
                "volumeAttributes": {"size": "33554432", "requireStageSecret": "password"},
                "nodeStageSecretRef": {"name": "stage-creds", "namespace": ns.name},
            },
        },
    }))
    .unwrap();
    let pvs: Api<PersistentVolume> = Api::all(admin.clone());
    pvs.create(&PostParams::default(), &pv).await.unwrap();
    let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "data"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "volumeName": pv_name,
            "resources": {"requests": {"storage": "32Mi"}},
        },
    }))
    .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(admin.clone(), &ns.name)
        .create(&PostParams::default(), &claim)
        .await
        .unwrap();
    let mut user = pod("user", &c.node, 2);
    let spec = user.spec.as_mut().unwrap();
    spec.volumes = Some(vec![serde_json::from_value(serde_json::json!(
        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}
    ))
    .unwrap()]);
    spec.containers[0].volume_mounts = Some(vec![serde_json::from_value(
        serde_json::json!({"name": "data", "mountPath": "/data"}),
    )
    .unwrap()]);
    let pods = ns.pods();
    pods.create(&PostParams::default(), &user).await.unwrap();
    let d = Deadline::new("the CSI pod Running and Ready", 180);
    let running = loop {
        if let Some(p) = pod_ready(&pods, "user").await {
            break p;
        }
        d.tick().await;
    };
    assert_eq!(plugin.rpcs(), ["NodeStageVolume", "NodePublishVolume"]);

    // Deleting the pod releases the volume before the final delete.
    pods.delete("user", &DeleteParams::default()).await.unwrap();
    wait_pod_gone(&pods, "user", &uid(&running), 120).await;
    assert_eq!(
        plugin.rpcs(),
        [
            "NodeStageVolume",
            "NodePublishVolume",
            "NodeUnpublishVolume",
            "NodeUnstageVolume"
        ]
    );
    let _ = pvs.delete(&pv_name, &DeleteParams::default()).await;
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn a_scheduled_pod_runs_and_becomes_ready() {
    let Some(c) = cluster("a_scheduled_pod_runs_and_becomes_ready").await else {
        return;
    };
    let _agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "ready").await;
    let pods = ns.pods();
    let p = create_ready_pod(&pods, &c, "web", 5).await;
    assert_eq!(
        p.spec.as_ref().unwrap().node_name.as_deref(),
        Some(c.node.as_str()),
        "the scheduler bound it to this node"
    );
    let status = p.status.clone().unwrap();
    let conditions = status.conditions.clone().unwrap();
    for t in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert!(
            condition(conditions.clone(), t),
            "{t} not True: {conditions:?}"
        );
    }
    let cs = &status.container_statuses.clone().unwrap()[0];
    assert!(cs.ready, "{cs:?}");
    assert!(cs.state.as_ref().unwrap().running.is_some(), "{cs:?}");
    assert!(status.start_time.is_some());
    assert!(running_containers(&uid(&p)) >= 1);
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn graceful_delete_ends_with_the_final_delete() {
    let Some(c) = cluster("graceful_delete_ends_with_the_final_delete").await else {
        return;
    };
    let _agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "graceful").await;
    let pods = ns.pods();
    let p = create_ready_pod(&pods, &c, "web", 5).await;
    let uid = uid(&p);
    pods.delete("web", &DeleteParams::default().grace_period(5))
        .await
        .expect("graceful delete");
    let terminating = pods.get("web").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    // The object stays until the agent's final DELETE (grace 0, UID precondition).
    wait_pod_gone(&pods, "web", &uid, 90).await;
    assert_eq!(
        running_containers(&uid),
        0,
        "containers stopped before the final delete"
    );
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn the_final_delete_never_removes_a_same_name_successor() {
    let Some(c) = cluster("the_final_delete_never_removes_a_same_name_successor").await else {
        return;
    };
    let _agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "successor").await;
    let pods = ns.pods();
    let first = create_ready_pod(&pods, &c, "web", 5).await;
    pods.delete("web", &DeleteParams::default().grace_period(5))
        .await
        .unwrap();
    wait_pod_gone(&pods, "web", &uid(&first), 90).await;
    let second = create_ready_pod(&pods, &c, "web", 5).await;
    assert_ne!(uid(&first), uid(&second));
    // The successor keeps running: nothing meant for its predecessor touches it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = pod_ready(&pods, "web")
        .await
        .expect("successor still Ready");
    assert_eq!(uid(&still), uid(&second));
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn force_delete_kills_the_containers() {
    let Some(c) = cluster("force_delete_kills_the_containers").await else {
        return;
    };
    let _agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "force").await;
    let pods = ns.pods();
    let p = create_ready_pod(&pods, &c, "web", 30).await;
    let uid = uid(&p);
    assert!(running_containers(&uid) >= 1);
    pods.delete("web", &DeleteParams::default().grace_period(0))
        .await
        .expect("force delete");
    assert!(pods.get_opt("web").await.unwrap().is_none(), "gone at once");
    let took = wait_containers_gone(&uid, 30).await;
    eprintln!("force delete: containers gone after {took:?}");
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn api_eviction_ends_like_a_graceful_delete() {
    let Some(c) = cluster("api_eviction_ends_like_a_graceful_delete").await else {
        return;
    };
    let _agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "evict").await;
    let pods = ns.pods();
    let p = create_ready_pod(&pods, &c, "web", 5).await;
    let uid = uid(&p);
    pods.evict("web", &EvictParams::default())
        .await
        .expect("eviction accepted");
    wait_pod_gone(&pods, "web", &uid, 90).await;
    assert_eq!(running_containers(&uid), 0);
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn pods_deleted_while_the_agent_was_down_are_killed_on_restart() {
    let Some(c) = cluster("pods_deleted_while_the_agent_was_down_are_killed_on_restart").await
    else {
        return;
    };
    let mut agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "partition").await;
    let pods = ns.pods();
    let gone = create_ready_pod(&pods, &c, "gone", 30).await;
    let kept = create_ready_pod(&pods, &c, "kept", 30).await;
    agent.stop();
    assert!(
        running_containers(&uid(&gone)) >= 1,
        "stopping the agent leaves its pods running"
    );
    force_delete_unseen(&pods, &gone, &kept, "the agent is down").await;
    agent.restart();
    gone_is_stopped_kept_stays(&pods, &gone, &kept, "the restart").await;
}

/// Force-deletes pod `gone` while the agent cannot see it (`why`): both pods keep running.
async fn force_delete_unseen(pods: &Api<Pod>, gone: &Pod, kept: &Pod, why: &str) {
    pods.delete("gone", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        running_containers(&uid(gone)) >= 1 && running_containers(&uid(kept)) >= 1,
        "nothing is stopped while {why}"
    );
}

/// Once the agent sees the API again (after `what`): the deleted pod's containers are killed,
/// the pod that still exists runs on (re-adopted, not restarted away) and is Ready.
async fn gone_is_stopped_kept_stays(pods: &Api<Pod>, gone: &Pod, kept: &Pod, what: &str) {
    let took = wait_containers_gone(&uid(gone), 120).await;
    eprintln!("{what}: the deleted pod's containers were gone after {took:?}");
    assert!(
        running_containers(&uid(kept)) >= 1,
        "the kept pod runs on after {what}"
    );
    let d = Deadline::new(format!("the kept pod Ready after {what}"), 60);
    while pod_ready(pods, "kept").await.is_none() {
        d.tick().await;
    }
    // Its status never flapped: Ready did not change since before, and nothing restarted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = pods.get("kept").await.expect("the kept pod");
    assert_eq!(uid(&now), uid(kept));
    let ready_since = |p: &Pod| {
        let conditions = p.status.as_ref().and_then(|s| s.conditions.clone());
        let ready = conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Ready");
        ready.map(|c| (c.status, c.last_transition_time))
    };
    assert_eq!(
        ready_since(&now),
        ready_since(kept),
        "Ready flapped after {what}"
    );
    let restarts = |p: &Pod| {
        let statuses = p.status.as_ref().and_then(|s| s.container_statuses.clone());
        statuses
            .unwrap_or_default()
            .iter()
            .map(|c| c.restart_count)
            .sum::<i32>()
    };
    assert_eq!(
        restarts(&now),
        restarts(kept),
        "a container restarted after {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn a_partition_keeps_pods_running_and_the_relist_stops_deleted_ones() {
    let Some(c) = cluster("a_partition_keeps_pods_running_and_the_relist_stops_deleted_ones").await
    else {
        return;
    };
    // The agent reaches the API server only through a proxy the test can cut.
    let (mut proxy, kubeconfig, _dir) = api_proxy(&c);
    let _agent = Agent::start_as(&c.node, &kubeconfig, CONTAINERD_NS, &[]);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "cut").await;
    let pods = ns.pods();
    let gone = create_ready_pod(&pods, &c, "gone", 30).await;
    let kept = create_ready_pod(&pods, &c, "kept", 30).await;

    // The API is unreachable: the agent keeps its pods (the API decides, not the agent).
    proxy.stop();
    force_delete_unseen(&pods, &gone, &kept, "the API is unreachable").await;
    // Back: the relist finds the force-deleted pod gone and stops it; the other stays.
    proxy.start();
    gone_is_stopped_kept_stays(&pods, &gone, &kept, "the partition").await;
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn a_statefulset_of_three_comes_up_in_order() {
    let Some(c) = cluster("a_statefulset_of_three_comes_up_in_order").await else {
        return;
    };
    let _agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "sts").await;
    let sts: StatefulSet = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "serviceName": "web",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": pod("x", &c.node, 5).spec,
            },
        },
    }))
    .unwrap();
    Api::<StatefulSet>::namespaced(c.admin.clone(), &ns.name)
        .create(&PostParams::default(), &sts)
        .await
        .expect("create statefulset");
    let pods = ns.pods();
    // Ordered: web-N exists only once web-0 … web-(N-1) are Ready.
    let mut ready = [false; 3];
    let d = Deadline::new("web-0, web-1 and web-2 Ready", 300);
    while !ready.iter().all(|r| *r) {
        d.tick().await;
        for i in 0..3 {
            let name = format!("web-{i}");
            let exists = pods.get_opt(&name).await.ok().flatten().is_some();
            if exists {
                assert!(
                    ready[..i].iter().all(|r| *r),
                    "{name} was created before its predecessors were Ready: {ready:?}"
                );
            }
            if let Some(p) = pod_ready(&pods, &name).await {
                assert_eq!(p.spec.unwrap().hostname.as_deref(), Some(name.as_str()));
                ready[i] = true;
            }
        }
    }
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn config_maps_secrets_and_tokens_are_read_with_the_node_identity() {
    let Some(c) = cluster("config_maps_secrets_and_tokens_are_read_with_the_node_identity").await
    else {
        return;
    };
    let _agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "objects").await;
    let cm: ConfigMap = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "cfg"}, "data": {"greeting": "hello"}}),
    )
    .unwrap();
    Api::<ConfigMap>::namespaced(c.admin.clone(), &ns.name)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let secret: Secret = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(c.admin.clone(), &ns.name)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // Ready only if the env var, the secret file and the service account token (with the
    // kube-root-ca.crt ConfigMap beside it) all reached the container.
    let check = "test \"$GREETING\" = hello && test \"$(cat /creds/password)\" = s3cret \
                 && test -s /var/run/secrets/kubernetes.io/serviceaccount/token \
                 && test -s /var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
    let p: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "reader"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": c.node},
            "terminationGracePeriodSeconds": 2,
            "volumes": [{"name": "creds", "secret": {"secretName": "creds"}}],
            "containers": [{
                "name": "app",
                "image": IMAGE,
                "command": ["sleep", "3600"],
                "env": [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}}],
                "volumeMounts": [{"name": "creds", "mountPath": "/creds"}],
                "readinessProbe": {"exec": {"command": ["sh", "-c", check]}, "periodSeconds": 1},
            }],
        },
    }))
    .unwrap();
    let pods = ns.pods();
    pods.create(&PostParams::default(), &p).await.unwrap();
    let d = Deadline::new("pod reader Ready with its ConfigMap, Secret and token", 180);
    while pod_ready(&pods, "reader").await.is_none() {
        d.tick().await;
    }
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn kubectl_logs_reach_the_secure_port_and_others_are_refused() {
    let Some(c) = cluster("kubectl_logs_reach_the_secure_port").await else {
        return;
    };
    let agent = Agent::start(&c);
    let ns = TestNamespace::create(&c, "logs").await;
    wait_node_ready(&c).await;
    let pods = ns.pods();
    let mut p = pod("talker", &c.node, 2);
    p.spec.as_mut().unwrap().containers[0].command = Some(vec![
        "sh".into(),
        "-c".into(),
        "echo hello; touch /tmp; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"
            .into(),
    ]);
    create_until_ready(&pods, &p).await;

    // Through the API server (its kubelet client certificate, authorized by a
    // SubjectAccessReview the agent makes with the node's identity).
    let logs = pods
        .logs("talker", &kube::api::LogParams::default())
        .await
        .expect("logs through the API server");
    assert!(logs.starts_with("hello\n"), "{logs}");
    let params = kube::api::LogParams {
        follow: true,
        tail_lines: Some(1),
        ..Default::default()
    };
    let stream = pods.log_stream("talker", &params).await.expect("follow");
    use futures::AsyncBufReadExt;
    let mut lines = stream.lines();
    let mut followed = Vec::new();
    while followed.len() < 6 {
        let next = tokio::time::timeout(
            Duration::from_secs(20),
            futures::StreamExt::next(&mut lines),
        );
        let line = next
            .await
            .expect("a followed line in time")
            .expect("stream open");
        followed.push(line.expect("line"));
    }
    assert!(
        followed.iter().all(|l| l.starts_with("tick ")),
        "{followed:?}"
    );

    // Straight to the port: the node's own credential and anonymous clients are refused.
    let (_, cert, key) = credential_files(&c.node_kubeconfig, agent.dir.path());
    let url = format!(
        "https://127.0.0.1:10250/containerLogs/{}/talker/app",
        ns.name
    );
    let curl = |extra: &[&std::ffi::OsStr]| {
        let mut curl = Command::new("curl");
        curl.args(extra);
        https_status(curl, &url)
    };
    assert_eq!(curl(&[]), "401", "anonymous requests are not authenticated");
    let with_cert = [
        "--cert".as_ref(),
        cert.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
    ];
    assert_eq!(
        curl(&with_cert),
        "403",
        "a node may not read pod logs on a node"
    );
}

/// The HTTP status of a GET of `url` (its server certificate not checked) by `curl`: a command
/// that runs curl with the arguments it has and these (e.g. a client certificate, or `nsenter`
/// into a network namespace first).
fn https_status(mut curl: Command, url: &str) -> String {
    let out = curl
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            url,
        ])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Ephemeral containers (`kubectl debug --target`, upstream's Ephemeral Containers specs): one
/// added through `pods/ephemeralcontainers` runs with its TTY in its target's PID namespace
/// (it sees the target's `sleep 3600`), is reported under `ephemeralContainerStatuses` (never
/// ready) and its log is served through the API server; the pod stays Ready with its one
/// container status.
#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn an_ephemeral_container_runs_and_serves_its_log() {
    let Some(c) = cluster("an_ephemeral_container_runs_and_serves_its_log").await else {
        return;
    };
    let _agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "ephemeral").await;
    let pods = ns.pods();
    create_ready_pod(&pods, &c, "target", 2).await;
    let patch = serde_json::json!({"spec": {"ephemeralContainers": [{
        "name": "debugger",
        "image": IMAGE,
        "command": ["sh", "-c", "while true; do echo polo; ps; sleep 1; done"],
        "stdin": true,
        "tty": true,
        "targetContainerName": "app",
    }]}});
    let params = kube::api::PatchParams::default();
    pods.patch_subresource(
        "ephemeralcontainers",
        "target",
        &params,
        &kube::api::Patch::Strategic(patch),
    )
    .await
    .expect("add the ephemeral container");
    let d = Deadline::new("the ephemeral container running", 90);
    let status = loop {
        let p = pods.get("target").await.expect("get pod");
        let status = p.status.unwrap_or_default();
        let running = status
            .ephemeral_container_statuses
            .iter()
            .flatten()
            .find(|s| s.name == "debugger")
            .filter(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()))
            .cloned();
        if let Some(s) = running {
            let pod_ready = condition(status.conditions.clone().unwrap_or_default(), "Ready");
            assert!(pod_ready, "the pod stays Ready: {:?}", status.conditions);
            assert_eq!(status.container_statuses.unwrap_or_default().len(), 1);
            break s;
        }
        d.tick().await;
    };
    assert!(
        !status.ready,
        "ephemeral containers are never ready: {status:?}"
    );
    assert_eq!(status.restart_count, 0);
    let params = kube::api::LogParams {
        container: Some("debugger".into()),
        ..Default::default()
    };
    let d = Deadline::new("the ephemeral container's log", 60);
    loop {
        let log = pods
            .logs("target", &params)
            .await
            .expect("logs of debugger");
        if log.contains("polo") && log.contains("sleep 3600") {
            break;
        }
        d.tick().await;
    }
}

/// The mirror pods in `pods` (annotation `kubernetes.io/config.mirror`).
async fn mirror_pods(pods: &Api<Pod>) -> Vec<Pod> {
    pods.list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| {
            p.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
        })
        .collect()
}

/// Waits for the one mirror pod of `name` that satisfies `want`, and for it to be Ready.
async fn wait_mirror(pods: &Api<Pod>, name: &str, what: &str, want: impl Fn(&Pod) -> bool) -> Pod {
    let d = Deadline::new(format!("mirror pod {name}: {what}"), 120);
    loop {
        let mirrors = mirror_pods(pods).await;
        if let [m] = mirrors.as_slice() {
            if m.metadata.name.as_deref() == Some(name) && want(m) {
                if let Some(ready) = pod_ready(pods, name).await {
                    if ready.metadata.uid == m.metadata.uid {
                        return ready;
                    }
                }
            }
        }
        d.tick().await;
    }
}

fn annotation(p: &Pod, key: &str) -> String {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .cloned()
        .unwrap_or_default()
}

/// The static pod's UID as nodelet derives it from its hash.
fn static_uid(hash: &str) -> String {
    assert_eq!(hash.len(), 32, "config.hash {hash:?}");
    nodelet::source::manifest::uid_of_hash(hash)
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn static_pods_get_mirror_pods_that_follow_them() {
    let Some(c) = cluster("static_pods_get_mirror_pods_that_follow_them").await else {
        return;
    };
    let agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "mirror").await;
    let pods = ns.pods();
    let manifest = |version: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: {}\n  labels: {{version: {version}}}\n\
             spec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: app\n    image: {IMAGE}\n    \
             command: [sleep, '3600']\n    readinessProbe:\n      exec: {{command: [test, -d, /tmp]}}\n      periodSeconds: 1\n",
            ns.name
        )
    };
    let file = agent.manifests().join("web.yaml");
    std::fs::write(&file, manifest("one")).unwrap();
    let name = format!("web-{}", c.node.to_lowercase());
    let node_uid = Api::<Node>::all(c.admin.clone())
        .get(&c.node)
        .await
        .unwrap()
        .metadata
        .uid;

    // The mirror pod: the kubelet's annotations, bound here, owned by the Node; its status is
    // the static pod's (Running and Ready through the static pod's probe).
    let first = wait_mirror(&pods, &name, "created", |_| true).await;
    let hash = annotation(&first, "kubernetes.io/config.hash");
    assert_eq!(annotation(&first, "kubernetes.io/config.mirror"), hash);
    assert_eq!(annotation(&first, "kubernetes.io/config.source"), "file");
    assert_eq!(
        first.spec.as_ref().unwrap().node_name.as_deref(),
        Some(c.node.as_str())
    );
    let owners = first.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(owners[0].kind, "Node");
    assert_eq!(owners[0].name, c.node);
    assert_eq!(Some(owners[0].uid.clone()), node_uid);
    assert_eq!(owners[0].controller, Some(true));
    let first_uid = static_uid(&hash);
    assert!(running_containers(&first_uid) >= 1, "the static pod runs");

    // Deleted by someone: made again, and the static pod is not disturbed.
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    let again = wait_mirror(&pods, &name, "created again", |m| {
        m.metadata.uid != first.metadata.uid
    })
    .await;
    assert_eq!(annotation(&again, "kubernetes.io/config.mirror"), hash);
    assert!(
        running_containers(&first_uid) >= 1,
        "deleting the mirror pod leaves the static pod running"
    );

    // The manifest changes: the mirror pod is replaced by the new static pod's.
    std::fs::write(&file, manifest("two")).unwrap();
    let changed = wait_mirror(&pods, &name, "replaced after the manifest changed", |m| {
        annotation(m, "kubernetes.io/config.mirror") != hash
    })
    .await;
    assert_eq!(
        changed.metadata.labels.clone().unwrap_or_default()["version"],
        "two"
    );
    let new_uid = static_uid(&annotation(&changed, "kubernetes.io/config.hash"));
    wait_containers_gone(&first_uid, 60).await;
    assert!(running_containers(&new_uid) >= 1);

    // The manifest is removed: the mirror pod goes with the static pod.
    std::fs::remove_file(&file).unwrap();
    let d = Deadline::new("the mirror pod to be deleted", 60);
    while !mirror_pods(&pods).await.is_empty() {
        d.tick().await;
    }
    wait_containers_gone(&new_uid, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn static_pods_run_while_the_api_is_unreachable() {
    let Some(c) = cluster("static_pods_run_while_the_api_is_unreachable").await else {
        return;
    };
    let ns = TestNamespace::create(&c, "offline").await;
    let (mut proxy, kubeconfig, _dir) = api_proxy(&c);
    proxy.stop();
    let read_only = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let agent = Agent::start_as(
        &c.node,
        &kubeconfig,
        CONTAINERD_NS,
        &["--read-only-port".into(), read_only.to_string()],
    );
    std::fs::write(
        agent.manifests().join("boot.yaml"),
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: boot\n  namespace: {}\nspec:\n  \
             terminationGracePeriodSeconds: 2\n  containers:\n  - name: app\n    image: {IMAGE}\n    \
             command: [sleep, '3600']\n",
            ns.name
        ),
    )
    .unwrap();
    let name = format!("boot-{}", c.node.to_lowercase());

    // No API server: the static pod runs all the same (the agent's own view of it).
    let url = format!("http://127.0.0.1:{read_only}/pods");
    let d = Deadline::new("the static pod Running with no API server", 120);
    loop {
        let out = Command::new("curl")
            .args(["-fsS", "--max-time", "5", &url])
            .output();
        let list: serde_json::Value = out
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default();
        let items = list["items"].as_array().cloned().unwrap_or_default();
        if items
            .iter()
            .any(|p| p["metadata"]["name"] == name.as_str() && p["status"]["phase"] == "Running")
        {
            break;
        }
        d.tick().await;
    }
    // The API comes back: the mirror pod follows.
    proxy.start();
    wait_mirror(&ns.pods(), &name, "created once the API answers", |_| true).await;
    std::fs::remove_file(agent.manifests().join("boot.yaml")).unwrap();
    let d = Deadline::new("the mirror pod deleted with its manifest", 60);
    while !mirror_pods(&ns.pods()).await.is_empty() {
        d.tick().await;
    }
}

/// A proxy to the API server and a copy of the node's kubeconfig that goes through it (in the
/// returned temp dir): cutting the proxy makes the API unreachable for that agent only.
fn api_proxy(c: &Cluster) -> (Proxy, PathBuf, tempfile::TempDir) {
    api_proxy_on(&c.node_kubeconfig, "127.0.0.1:0".parse().unwrap(), |_| {})
}

/// A proxy to the API server of `kubeconfig` listening on `listen` (port 0: any), and a copy
/// of `kubeconfig` that goes through it, changed further by `edit` (in the returned temp dir).
fn api_proxy_on(
    kubeconfig: &std::path::Path,
    listen: std::net::SocketAddr,
    edit: impl FnOnce(&mut serde_yaml_ng::Value),
) -> (Proxy, PathBuf, tempfile::TempDir) {
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let server = doc["clusters"][0]["cluster"]["server"]
        .as_str()
        .unwrap()
        .to_string();
    let api: std::net::SocketAddr = server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .expect("a server address of the form https://<ip>:<port>");
    let proxy = Proxy::new(Endpoint::Tcp(listen), Endpoint::Tcp(api));
    let Endpoint::Tcp(through) = proxy.listen else {
        unreachable!()
    };
    doc["clusters"][0]["cluster"]["server"] = format!("https://{through}").into();
    edit(&mut doc);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, serde_yaml_ng::to_string(&doc).unwrap()).unwrap();
    (proxy, kubeconfig, dir)
}

/// The second node's credential (`NODELET_NODE2_KUBECONFIG`, `NODELET_NODE2_NAME`); a test that
/// needs it fails without it (an #[ignore]d test asked for by --ignored must not pass unrun).
fn second_node(test: &str) -> (String, PathBuf) {
    let var = |v: &str| std::env::var(v).ok().filter(|s| !s.is_empty());
    match (var("NODELET_NODE2_NAME"), var("NODELET_NODE2_KUBECONFIG")) {
        (Some(name), Some(kubeconfig)) => (name, kubeconfig.into()),
        _ => panic!(
            "cluster test {test} needs a second node: set NODELET_NODE2_NAME and \
             NODELET_NODE2_KUBECONFIG (that node's system:node:<name> credential, group \
             system:nodes) — the control plane evicts from an unreachable node only while \
             another node is Ready"
        ),
    }
}

/// Deletes a cluster-scoped object at the end of a test, also when it fails (a Node: its
/// Lease goes with it).
struct DeleteAtEnd<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    name: String,
    kind: std::marker::PhantomData<K>,
}

impl<K> DeleteAtEnd<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    fn new(name: &str) -> Self {
        DeleteAtEnd {
            name: name.to_string(),
            kind: std::marker::PhantomData,
        }
    }
}

impl<K> Drop for DeleteAtEnd<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    fn drop(&mut self) {
        let name = self.name.clone();
        with_own_client(move |client| async move {
            let _ = Api::<K>::all(client)
                .delete(&name, &DeleteParams::default())
                .await;
        });
    }
}

fn has_taint(node: &Node, key: &str, effect: &str) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == key && t.effect == effect))
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME, NODELET_NODE2_KUBECONFIG, NODELET_NODE2_NAME"]
async fn an_unreachable_node_is_tainted_its_pod_evicted_and_killed_on_restart() {
    let test = "an_unreachable_node_is_tainted_its_pod_evicted_and_killed_on_restart";
    let Some(c) = cluster(test).await else {
        return;
    };
    let (node2, node2_kubeconfig) = second_node(test);
    assert_ne!(node2, c.node, "the second node must be another node");
    let _node2_cleanup = DeleteAtEnd::<Node>::new(&node2);
    let _other = Agent::start_as(
        &node2,
        &node2_kubeconfig,
        &format!("{CONTAINERD_NS}-{node2}"),
        // The first node's agent has :10250.
        &["--port".into(), "10251".into()],
    );
    let mut agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let other = Cluster {
        admin: c.admin.clone(),
        node: node2.clone(),
        node_kubeconfig: node2_kubeconfig.clone(),
    };
    wait_node_ready(&other).await;

    let ns = TestNamespace::create(&c, "taint").await;
    let pods = ns.pods();
    // Tolerates the node being unreachable or not ready for 2 s only. Its process ignores TERM,
    // so its containers stop before the grace is over only if the agent gives none.
    let grace = 30;
    let mut p = pod("web", &c.node, grace);
    p.spec.as_mut().unwrap().tolerations = Some(
        [
            "node.kubernetes.io/unreachable",
            "node.kubernetes.io/not-ready",
        ]
        .map(|key| {
            serde_json::from_value(serde_json::json!({
                "key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2,
            }))
            .unwrap()
        })
        .to_vec(),
    );
    pods.create(&PostParams::default(), &p).await.unwrap();
    let d = Deadline::new("pod web Running and Ready", 180);
    let web = loop {
        if let Some(p) = pod_ready(&pods, "web").await {
            break p;
        }
        d.tick().await;
    };
    let uid = uid(&web);

    // The agent crashes; past the node-monitor grace the control plane taints the node
    // unreachable and evicts the pod (a graceful delete: Terminating).
    agent.kill();
    let nodes: Api<Node> = Api::all(c.admin.clone());
    let d = Deadline::new("the unreachable NoExecute taint on the node", 150);
    while !nodes
        .get(&c.node)
        .await
        .is_ok_and(|n| has_taint(&n, "node.kubernetes.io/unreachable", "NoExecute"))
    {
        d.tick().await;
    }
    let d = Deadline::new("the taint eviction of pod web (deletionTimestamp)", 60);
    let deadline = loop {
        let p = pods
            .get("web")
            .await
            .expect("the evicted pod stays until the final delete");
        if let Some(at) = p.metadata.deletion_timestamp.clone() {
            assert_eq!(self::uid(&p), uid);
            let conditions = p.status.and_then(|s| s.conditions).unwrap_or_default();
            assert!(
                condition(conditions.clone(), "DisruptionTarget"),
                "the taint manager marks its evictions: {conditions:?}"
            );
            break at.0;
        }
        d.tick().await;
    };
    // The agent stays down past the deletion's deadline (deletionTimestamp: the eviction plus
    // the grace); the pod keeps running meanwhile.
    while jiff::Timestamp::now() < deadline + jiff::SignedDuration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        running_containers(&uid) >= 1,
        "nothing stops the pod while its agent is down"
    );
    // Restarted, the agent kills the containers at once: no fresh grace (30 s) is given.
    agent.restart();
    let start = std::time::Instant::now();
    while running_containers(&uid) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(grace as u64 - 5),
            "the evicted pod's containers still run {:?} after the restart: the agent gave a \
             grace that was already over",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "taint eviction: the evicted pod's containers were gone {:?} after the restart",
        start.elapsed()
    );
    wait_pod_gone(&pods, "web", &uid, 60).await;
    let d = Deadline::new("the node Ready and untainted again", 120);
    while !nodes.get(&c.node).await.is_ok_and(|n| {
        !has_taint(&n, "node.kubernetes.io/unreachable", "NoExecute")
            && condition(
                n.status.and_then(|s| s.conditions).unwrap_or_default(),
                "Ready",
            )
    }) {
        d.tick().await;
    }
}

/// One end of a proxied connection.
trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Duplex for T {}

/// Where a proxy listens or forwards to.
#[derive(Clone)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl Endpoint {
    async fn connect(&self) -> std::io::Result<Box<dyn Duplex>> {
        Ok(match self {
            Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
            Endpoint::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a).await?),
        })
    }

    /// Binds (a Unix socket path is replaced); a TCP port 0 becomes the bound port. A TCP
    /// address is bound in network namespace `netns` if given (a path is in no namespace).
    fn bind(&mut self, netns: Option<&std::path::Path>) -> Listener {
        match self {
            Endpoint::Unix(p) => {
                let _ = std::fs::remove_file(&*p);
                Listener::Unix(tokio::net::UnixListener::bind(&*p).expect("proxy socket"))
            }
            Endpoint::Tcp(a) => {
                let addr = *a;
                let bind = move || std::net::TcpListener::bind(addr);
                let std = match netns {
                    Some(netns) => in_netns(netns, bind),
                    None => bind(),
                }
                .expect("proxy port");
                *a = std.local_addr().unwrap();
                std.set_nonblocking(true).unwrap();
                Listener::Tcp(tokio::net::TcpListener::from_std(std).unwrap())
            }
        }
    }
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Box<dyn Duplex>> {
        Ok(match self {
            Listener::Unix(l) => Box::new(l.accept().await?.0),
            Listener::Tcp(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// Runs `work` on a thread of its own that joined the network namespace at `netns` (setns
/// changes the calling thread only); a socket made there stays in that namespace.
fn in_netns<T: Send + 'static>(
    netns: &std::path::Path,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(netns)
        .unwrap_or_else(|e| panic!("network namespace {}: {e}", netns.display()));
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace file this thread holds open; it affects this thread only.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        work()
    })
    .join()
    .expect("the thread in the network namespace")
}

/// A stand-in for a socket the agent uses (containerd's, the API server's, the registry's):
/// forwards every connection to the real one while up; taking it down closes the listener and
/// every forwarded connection. The agent loses its runtime or its API server and gets it back
/// without the shared one being touched. It may listen in another network namespace (then
/// it relays between that namespace and the test's).
struct Proxy {
    listen: Endpoint,
    target: Endpoint,
    netns: Option<PathBuf>,
    up: Option<tokio_util::sync::CancellationToken>,
}

impl Proxy {
    fn new(listen: Endpoint, target: Endpoint) -> Self {
        Proxy::in_netns(None, listen, target)
    }

    /// A proxy that listens in network namespace `netns` (`None`: the test's).
    fn in_netns(netns: Option<PathBuf>, listen: Endpoint, target: Endpoint) -> Self {
        let mut proxy = Proxy {
            listen,
            target,
            netns,
            up: None,
        };
        proxy.start();
        proxy
    }

    fn start(&mut self) {
        let listener = self.listen.bind(self.netns.as_deref());
        let target = self.target.clone();
        let token = tokio_util::sync::CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok(mut client) = accepted else {
                    continue;
                };
                let (stop, target) = (stop.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = target.connect().await else {
                        return;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        self.up = Some(token);
    }

    fn stop(&mut self) {
        if let Some(token) = self.up.take() {
            token.cancel();
        }
        if let Endpoint::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Node's Ready condition as (status, reason, message, lastHeartbeatTime).
async fn ready_condition(c: &Cluster) -> Option<(String, String, String, jiff::Timestamp)> {
    let node = Api::<Node>::all(c.admin.clone())
        .get_opt(&c.node)
        .await
        .ok()
        .flatten()?;
    let conditions = node.status?.conditions?;
    let ready = conditions.into_iter().find(|c| c.type_ == "Ready")?;
    Some((
        ready.status,
        ready.reason.unwrap_or_default(),
        ready.message.unwrap_or_default(),
        ready
            .last_heartbeat_time
            .map(|t| t.0)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
    ))
}

/// Waits for the Ready condition to be `status` in a heartbeat from `since` on; its (reason,
/// message).
async fn wait_ready_condition(
    c: &Cluster,
    status: &str,
    since: jiff::Timestamp,
    what: &str,
) -> (String, String) {
    let d = Deadline::new(what, 120);
    loop {
        if let Some((s, reason, message, beat)) = ready_condition(c).await {
            if s == status && beat >= since {
                return (reason, message);
            }
        }
        d.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn the_node_is_not_ready_while_its_container_runtime_is_down() {
    let Some(c) = cluster("the_node_is_not_ready_while_its_container_runtime_is_down").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("containerd.sock");
    let mut proxy = Proxy::new(
        Endpoint::Unix(socket.clone()),
        Endpoint::Unix("/run/containerd/containerd.sock".into()),
    );
    // The API keeps whole seconds.
    let started = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).unwrap();
    let _agent = Agent::start_as(
        &c.node,
        &c.node_kubeconfig,
        CONTAINERD_NS,
        &[
            "--container-runtime-endpoint".into(),
            format!("unix://{}", socket.display()),
        ],
    );
    // Ready as this agent posted it (not a stale Ready of an earlier agent): its runtime answered.
    wait_ready_condition(&c, "True", started, "Ready True posted by this agent").await;

    proxy.stop();
    let (reason, message) =
        wait_ready_condition(&c, "False", started, "Ready False: the runtime is down").await;
    assert_eq!(reason, "KubeletNotReady");
    assert!(message.contains("container runtime is down"), "{message}");

    proxy.start();
    let (reason, _) =
        wait_ready_condition(&c, "True", started, "Ready True once the runtime answers").await;
    assert_eq!(reason, "KubeletReady");
}

/// The agent's read-only endpoint at `path` (`/pods`, `/metrics`), as text.
fn read_only_get(port: u16, path: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-fsS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{port}{path}"),
        ])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn deleted_terminal_pods_leave_the_agents_pod_list_and_count() {
    let Some(c) = cluster("deleted_terminal_pods_leave_the_agents_pod_list_and_count").await else {
        return;
    };
    let port = free_port();
    let _agent = Agent::start_as(
        &c.node,
        &c.node_kubeconfig,
        CONTAINERD_NS,
        &["--read-only-port".into(), port.to_string()],
    );
    let ns = TestNamespace::create(&c, "terminal").await;
    wait_node_ready(&c).await;
    let pods = ns.pods();
    let names: Vec<String> = (0..4).map(|i| format!("done-{i}")).collect();
    for name in &names {
        let mut p = pod(name, &c.node, 2);
        let spec = p.spec.as_mut().unwrap();
        spec.restart_policy = Some("Never".into());
        spec.containers[0].command = Some(vec!["true".into()]);
        spec.containers[0].readiness_probe = None;
        pods.create(&PostParams::default(), &p)
            .await
            .expect("create");
    }
    let mut uids = Vec::new();
    for name in &names {
        let d = Deadline::new(format!("pod {name} Succeeded"), 180);
        let p = loop {
            let p = pods.get(name).await.expect("get");
            if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded") {
                break p;
            }
            d.tick().await;
        };
        uids.push(uid(&p));
    }
    let listed = read_only_get(port, "/pods");
    assert!(
        uids.iter().all(|u| listed.contains(u.as_str())),
        "the finished pods are listed while they exist: {listed}"
    );
    for name in &names {
        pods.delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    for (name, uid) in names.iter().zip(&uids) {
        wait_pod_gone(&pods, name, uid, 60).await;
    }
    // Gone from the API: gone from the agent's list and its pod count too (the kubelet's status
    // manager drops a pod that no source has any more).
    let d = Deadline::new("the deleted pods to leave /pods", 60);
    loop {
        let listed = read_only_get(port, "/pods");
        let left: Vec<_> = uids
            .iter()
            .filter(|u| listed.contains(u.as_str()))
            .collect();
        if left.is_empty() {
            break;
        }
        d.tick().await;
    }
    // The count is of the same pods (the node may still have other tests' pods, whose
    // namespaces are being deleted).
    let listed: serde_json::Value = serde_json::from_str(&read_only_get(port, "/pods")).unwrap();
    let succeeded = listed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["status"]["phase"] == "Succeeded")
        .count();
    let metrics = read_only_get(port, "/metrics");
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nodelet_pods{phase=\"Succeeded\"} "))
        .map_or(0, |n| n.trim().parse::<usize>().unwrap());
    assert_eq!(
        counted, succeeded,
        "the pod count holds the listed pods only: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn the_node_is_ready_again_soon_after_an_api_outage() {
    let Some(c) = cluster("the_node_is_ready_again_soon_after_an_api_outage").await else {
        return;
    };
    // The agent reaches the API server through a proxy: cutting it is an outage for this agent.
    let (mut proxy, kubeconfig, _dir) = api_proxy(&c);
    let _agent = Agent::start_as(&c.node, &kubeconfig, CONTAINERD_NS, &[]);
    wait_node_ready(&c).await;
    proxy.stop();
    // Past the node-monitor grace period the node controller sets Ready to Unknown.
    let d = Deadline::new("the node controller to set Ready to Unknown", 180);
    while ready_condition(&c).await.map(|r| r.0).as_deref() != Some("Unknown") {
        d.tick().await;
    }
    proxy.start();
    // The agent sees that the Node differs from what it reports and posts at its next status
    // interval (10 s), as the kubelet does, not when its 5-minute report interval runs out.
    let d = Deadline::new(
        "Ready=True within a few status intervals of the API's return",
        45,
    );
    while !node_ready(&c).await {
        d.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn a_mirror_pod_stays_until_its_static_pod_has_stopped() {
    let Some(c) = cluster("a_mirror_pod_stays_until_its_static_pod_has_stopped").await else {
        return;
    };
    let agent = Agent::start(&c);
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "mirrorstop").await;
    let pods = ns.pods();
    // The container ignores TERM: it stops only when the grace period (5 s) is over.
    let file = agent.manifests().join("slow.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: slow\n  namespace: {}\nspec:\n  \
             terminationGracePeriodSeconds: 5\n  containers:\n  - name: app\n    image: {IMAGE}\n    \
             command: [sh, -c, \"trap '' TERM; while true; do sleep 1; done\"]\n",
            ns.name
        ),
    )
    .unwrap();
    let name = format!("slow-{}", c.node.to_lowercase());
    let mirror = wait_mirror(&pods, &name, "created", |m| {
        m.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await;
    let uid = static_uid(&annotation(&mirror, "kubernetes.io/config.hash"));
    assert!(running_containers(&uid) >= 1, "the static pod runs");

    // The manifest goes: the mirror pod stays while the containers stop, then goes.
    std::fs::remove_file(&file).unwrap();
    let d = Deadline::new("the static pod's containers to stop", 60);
    loop {
        // The mirror first, then the containers: a mirror missing while a container still
        // runs after it was looked up went too early.
        let mirrored = !mirror_pods(&pods).await.is_empty();
        if running_containers(&uid) == 0 {
            break;
        }
        assert!(
            mirrored,
            "the mirror pod was deleted while the static pod's containers still ran"
        );
        d.tick().await;
    }
    let d = Deadline::new("the mirror pod deleted once its pod stopped", 60);
    while !mirror_pods(&pods).await.is_empty() {
        d.tick().await;
    }

    // What the kubelet's file source gives a static pod: the first-seen time and the catch-all
    // NoExecute toleration.
    let seen = annotation(&mirror, "kubernetes.io/config.seen");
    assert!(
        seen.parse::<jiff::Timestamp>().is_ok(),
        "kubernetes.io/config.seen is a time: {seen:?}"
    );
    let tolerations = mirror
        .spec
        .as_ref()
        .unwrap()
        .tolerations
        .clone()
        .unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.as_deref() == Some("NoExecute")
                && t.toleration_seconds.is_none()),
        "the catch-all NoExecute toleration: {tolerations:?}"
    );
}
