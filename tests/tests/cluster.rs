//! Cluster tier: the `nodelet` binary joined to a real control plane.
//!
//! Every test is `#[ignore]`d: `scripts/test` runs them with `--ignored --test-threads=1` only
//! when `KUBECONFIG` is set. They read:
//! - `KUBECONFIG`: an admin kubeconfig (the test creates and inspects objects with it);
//! - `NODELET_NODE_KUBECONFIG`: the node's own credential (`system:node:<name>`), given to the
//!   agent as `--kubeconfig`;
//! - `NODELET_NODE_NAME`: the node name that credential is for.
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

const CONTAINERD_NS: &str = "k8s.nodelet.cluster-test";
const IMAGE: &str = "127.0.0.1:5000/nodelet/busybox:latest";

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
}

impl Agent {
    fn start(c: &Cluster) -> Agent {
        let mut agent = Agent {
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            node: c.node.clone(),
            kubeconfig: c.node_kubeconfig.clone(),
        };
        agent.restart();
        agent
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
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
        let bin = agent_binary();
        let child = Command::new(&bin)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--hostname-override", &self.node])
            .arg("--root-dir")
            .arg(d.join("root"))
            .arg("--run-dir")
            .arg(d.join("run"))
            .arg("--pod-logs-dir")
            .arg(d.join("logs"))
            .args(["--containerd-namespace", CONTAINERD_NS])
            .args(["--read-only-port", "0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e} (cargo build first)", bin.display()));
        self.child = Some(child);
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
        // their containers, then delete the namespace. A client of its own: the test's client
        // lives on the runtime this drop is blocking.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(client) = kube::Client::try_default().await else {
                    return;
                };
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
        })
        .join();
    }
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
    pods.create(&PostParams::default(), &pod(name, &c.node, grace))
        .await
        .expect("create pod");
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
    assert!(
        info.container_runtime_version.starts_with("containerd://"),
        "{info:?}"
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
    pods.delete("gone", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        running_containers(&uid(&gone)) >= 1,
        "nothing kills the pod while the agent is down"
    );
    agent.restart();
    let took = wait_containers_gone(&uid(&gone), 60).await;
    eprintln!("restart: the deleted pod's containers were gone after {took:?}");
    assert!(
        running_containers(&uid(&kept)) >= 1,
        "the pod that still exists was re-adopted, not restarted away"
    );
    let d = Deadline::new("the kept pod to be Ready after the restart", 60);
    while pod_ready(&pods, "kept").await.is_none() {
        d.tick().await;
    }
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
