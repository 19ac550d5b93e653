//! The heap one running pod costs: pod workers over the fakes on a current-thread runtime,
//! counted by the test build's allocator (`crate::heap`). Growth per pod is caught here
//! without timing anything.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use super::tests::{until, Node};
use crate::heap;
use crate::pod::{Desired, PodContext};

/// A pod as a user writes one: labels, an annotation, env, resources, a port, an emptyDir.
fn pod(i: usize) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("web-{i}"), "namespace": "default", "uid": format!("uid-{i}"),
            "labels": {"app": "web", "tier": "frontend", "release": "stable"},
            "annotations": {"example.com/owner": "team-a"},
        },
        "spec": {
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 5,
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [{
                "name": "app", "image": "registry.example.com/web:1.2.3",
                "command": ["/bin/web"], "args": ["--port", "8080", "--verbose"],
                "env": [{"name": "MODE", "value": "prod"}, {"name": "LEVEL", "value": "info"},
                        {"name": "REGION", "value": "eu-west-1"}],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                              "limits": {"cpu": "500m", "memory": "128Mi"}},
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            }],
        },
    }))
    .expect("pod")
}

fn running(ctx: &PodContext, uid: &str) -> bool {
    ctx.status
        .get(uid)
        .is_some_and(|r| r.status.phase.as_deref() == Some("Running"))
}

/// Live heap per running pod (its worker, its channel, its status, its events and what the
/// manager keeps for it; the fake runtime's record of its container, under 1 KiB, is counted
/// too). 84 KiB when the worker's channel, the worker and the status manager each held a copy
/// of the pod and its status; 67 KiB with one shared pod object; 76 KiB once container statuses
/// carry their resources and volume mounts and the pod its allocated resources, as the
/// kubelet's do; 70 KiB once the event correlator keeps, per event, only what a repeat takes
/// over instead of a whole Event (72.3 KiB measured at the start of #17's heap work). Then:
/// 65.9 KiB once the start of a container (a 6.5 KiB future, most of the worker's) is boxed
/// while it runs instead of sizing every worker's waiting future; 63.4 KiB with the worker
/// boxed once instead of held both in its task's future and in its run's; 55.7 KiB with probe
/// results and hook ends on futures' channels, which allocate per message (tokio's allocated
/// 32 slots of each up front); 37.9 KiB with the status manager holding the worker's own
/// desired pod and computed status (shared) instead of a new pod of metadata, spec and status
/// on every change, and the worker holding no second copy of what it reported; 33.2 KiB with
/// the worker's per-container maps sorted vectors sized for the spec's containers (a B-tree's
/// first node has room for eleven: 3.9 KiB for one container's observations); 30.5 KiB with
/// the status's lists of container statuses and conditions made to their length (a list
/// collected from a filter starts at room for four: 2.8 KiB for one container's status);
/// 28.6 KiB with exits on futures' channel too (tokio's block and channel were 2 KiB); 27.7
/// KiB with the event correlator keeping 64-bit hashes of its keys and messages instead of the
/// joined fields; 25.7 KiB with the event ring keeping what varies between events instead of
/// whole Events (the ring is bounded; a pod's events are counted here while it holds them).
const BOUND_PER_POD: isize = 28 * 1024;

/// The heap a burst of 200 pods may leave once they are gone, in all: 16.5 KiB measured with
/// the manager's, the event correlator's and the exit router's tables giving back the room the
/// burst grew (50.8 KiB without), so about 80 bytes kept per gone pod fail it.
const BOUND_AFTER_BURST: isize = 32 * 1024;

/// A manager over the fakes that has run one pod and removed it, so that what is made once
/// (not per pod) is not counted.
async fn warm() -> Node {
    let node = Node::new().await;
    run(&node, usize::MAX..=usize::MAX).await;
    remove(&node, usize::MAX..=usize::MAX).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    node
}

/// Hands the manager `pods` (as the only ones) and waits until every one runs.
async fn run(node: &Node, pods: impl Iterator<Item = usize> + Clone) {
    let desired = pods.clone().map(|i| Desired {
        pod: pod(i).into(),
        deletion: None,
    });
    node.manager.sync_all(desired.collect()).await;
    until("every pod runs", || {
        pods.clone()
            .all(|i| running(&node.ctx, &format!("uid-{i}")))
    })
    .await;
}

/// Removes every pod and waits until `pods` are done and forgotten.
async fn remove(node: &Node, pods: impl Iterator<Item = usize> + Clone) {
    node.manager.sync_all(Vec::new()).await;
    until("every pod is done", || {
        pods.clone().all(|i| {
            let uid = format!("uid-{i}");
            node.ctx.status.get(&uid).is_none_or(|r| r.finished)
        })
    })
    .await;
    // No source lists them: they are forgotten.
    node.manager.sync_all(Vec::new()).await;
}

#[tokio::test(start_paused = true)]
async fn a_running_pod_holds_a_bounded_heap() {
    const PODS: usize = 20;
    let node = warm().await;

    let before = heap::live();
    run(&node, 0..PODS).await;
    // Idle for a while: resyncs run, channels drain, nothing per step may pile up.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let per_pod = (heap::live() - before) / PODS as isize;
    eprintln!("live heap per running pod: {per_pod} bytes");
    assert!(
        per_pod < BOUND_PER_POD,
        "one running pod holds {per_pod} bytes of heap (bound {BOUND_PER_POD})"
    );
    node.cancel.cancel();
}

/// The event ring full of the same events, whatever it held (it keeps the latest events of
/// gone pods too, up to its bound), and nothing kept to correlate them.
fn fill_the_event_ring(ctx: &PodContext) {
    let filler = pod(usize::MAX - 1);
    let object = crate::events::pod_ref(&filler, None);
    // Each of its own reason: similar events would be combined into one.
    for i in 0..crate::events::RING {
        let reason = format!("Filler{i:04}");
        let message = "an event of a typical length for the ring";
        ctx.recorder.record(
            object.clone(),
            crate::events::EventType::Normal,
            &reason,
            message,
        );
    }
    ctx.recorder
        .forget(filler.metadata.uid.as_deref().expect("uid"));
}

/// #17: once a burst of pods is gone (ended, and forgotten as no source lists them), the heap
/// is back where it was: nothing is kept per gone pod, and the manager's tables give back the
/// room the burst grew. The event ring is filled before and after, so the burst's events in it
/// are not counted.
#[tokio::test(start_paused = true)]
async fn a_burst_of_pods_once_gone_leaves_the_heap_as_it_was() {
    const PODS: usize = 200;
    let node = warm().await;
    fill_the_event_ring(&node.ctx);
    drop(node.rt.take_calls());

    let before = heap::live();
    run(&node, 0..PODS).await;
    remove(&node, 0..PODS).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    fill_the_event_ring(&node.ctx);
    drop(node.rt.take_calls());
    let left = heap::live() - before;
    eprintln!("heap left after a burst of {PODS} pods: {left} bytes");
    assert!(
        left < BOUND_AFTER_BURST,
        "a burst of {PODS} pods left {left} bytes of heap (bound {BOUND_AFTER_BURST})"
    );
    node.cancel.cancel();
}
