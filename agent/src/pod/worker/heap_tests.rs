//! The heap one running pod costs: pod workers over the fakes on a current-thread runtime,
//! counted by the test build's allocator (`crate::heap`). Growth per pod is caught here
//! without timing anything.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tokio_util::sync::CancellationToken;

use super::tests::until;
use crate::heap;
use crate::pod::fake;
use crate::pod::manager::PodManager;
use crate::pod::Desired;

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

fn running(ctx: &crate::pod::PodContext, uid: &str) -> bool {
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
/// on every change, and the worker holding no second copy of what it reported.
const BOUND_PER_POD: isize = 42 * 1024;

#[tokio::test(start_paused = true)]
async fn a_running_pod_holds_a_bounded_heap() {
    const PODS: usize = 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let (ctx, _rt, _host) = fake::context(dir.path());
    let cancel = CancellationToken::new();
    let manager = PodManager::new(ctx.clone(), None, &cancel);
    manager.recover().await.expect("recover");
    // One pod run and removed first: what is made once (not per pod) is not counted.
    let warm = pod(PODS);
    manager
        .sync_all(vec![Desired {
            pod: warm.clone().into(),
            deletion: None,
        }])
        .await;
    until("the warm-up pod runs", || running(&ctx, "uid-20")).await;
    manager.sync_all(Vec::new()).await;
    until("the warm-up pod is gone", || {
        ctx.status.get("uid-20").is_none_or(|r| r.finished)
    })
    .await;
    manager.sync_all(Vec::new()).await;
    tokio::time::sleep(Duration::from_secs(60)).await;

    let before = heap::live();
    let pods: Vec<Desired> = (0..PODS)
        .map(|i| Desired {
            pod: pod(i).into(),
            deletion: None,
        })
        .collect();
    manager.sync_all(pods).await;
    until("every pod runs", || {
        (0..PODS).all(|i| running(&ctx, &format!("uid-{i}")))
    })
    .await;
    // Idle for a while: resyncs run, channels drain, nothing per step may pile up.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let per_pod = (heap::live() - before) / PODS as isize;
    eprintln!("live heap per running pod: {per_pod} bytes");
    assert!(
        per_pod < BOUND_PER_POD,
        "one running pod holds {per_pod} bytes of heap (bound {BOUND_PER_POD})"
    );
    cancel.cancel();
}
