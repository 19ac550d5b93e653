//! The worker's behaviours on paused time over the fake runtime and host (no root): the
//! desired-pod merge, kill retry and clean-up across a containerd outage, cgroup and log
//! removal, and adoption instead of removal after a worker panic.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStateWaiting, ContainerStatus, Pod};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::merge;
use crate::pod::fake::{self, FakeHost, FakeRuntime};
use crate::pod::manager::PodManager;
use crate::pod::{Deletion, Desired, PodContext};
use std::sync::Arc;

#[test]
fn deletion_is_never_undone_and_only_shrinks() {
    let d = |deletion| Desired {
        pod: Arc::default(),
        deletion,
    };
    let del = |g, gone| {
        Some(Deletion {
            grace: Duration::from_secs(g),
            gone,
        })
    };
    assert_eq!(merge(&d(del(10, false)), &d(None)).deletion, del(10, false));
    assert_eq!(
        merge(&d(del(10, false)), &d(del(30, false))).deletion,
        del(10, false)
    );
    assert_eq!(
        merge(&d(del(10, false)), &d(del(5, true))).deletion,
        del(5, true)
    );
    assert_eq!(merge(&d(None), &d(del(5, false))).deletion, del(5, false));
}

/// A manager over the fakes, with its files in a temp dir.
pub(super) struct Node {
    dir: tempfile::TempDir,
    pub(super) ctx: Arc<PodContext>,
    pub(super) rt: Arc<FakeRuntime>,
    host: Arc<FakeHost>,
    pub(super) manager: PodManager,
    finished: broadcast::Receiver<String>,
    pub(super) cancel: CancellationToken,
}

impl Node {
    pub(super) async fn new() -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ctx, rt, host) = fake::context(dir.path());
        let cancel = CancellationToken::new();
        let manager = PodManager::new(ctx.clone(), None, &cancel);
        let finished = manager.subscribe_finished();
        manager.recover().await.expect("recover");
        Node {
            dir,
            ctx,
            rt,
            host,
            manager,
            finished,
            cancel,
        }
    }

    /// Runs `pod` and waits until its container runs; returns the container id.
    async fn run(&self, pod: &Pod) -> String {
        self.manager.sync_all(vec![desired(pod, None)]).await;
        until("the container runs", || self.rt.running().len() == 1).await;
        self.rt.running().remove(0)
    }

    /// Runs `pod` (restartPolicy Never) until its container exits 0 and the pod finished.
    async fn complete(&self, pod: &Pod) {
        let id = self.run(pod).await;
        self.rt.exit(&id, 0);
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        until("the pod completes", || {
            self.ctx.status.get(uid).is_some_and(|r| r.finished)
        })
        .await;
    }

    fn delete(&self, pod: &Pod, grace: u64, gone: bool) {
        let deletion = Deletion {
            grace: Duration::from_secs(grace),
            gone,
        };
        self.manager.update(desired(pod, Some(deletion)));
    }

    /// Whether the manager said the pod finished (deleted and released).
    fn finished(&mut self, uid: &str) -> bool {
        std::iter::from_fn(|| self.finished.try_recv().ok()).any(|u| u == uid)
    }

    /// Nothing of the pod is left in the runtime or on the host.
    fn assert_nothing_left(&self, uid: &str) {
        assert!(
            self.rt.containers().is_empty(),
            "containers left: {:?}",
            self.rt.containers()
        );
        assert!(!self.host.sandboxes().contains(uid), "sandbox left");
        assert!(!self.host.volumes().contains(uid), "volumes left");
        assert!(
            !crate::layout::pod_dir(&self.ctx.node.root_dir, uid).exists(),
            "pod dir left"
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cancel.cancel();
        let _ = &self.dir;
    }
}

fn pod(uid: &str, policy: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("p-{uid}"), "namespace": "default", "uid": uid},
        "spec": {
            "restartPolicy": policy,
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "c", "image": "busybox"}],
        },
    }))
    .expect("pod")
}

fn desired(pod: &Pod, deletion: Option<Deletion>) -> Desired {
    Desired {
        pod: Arc::new(pod.clone()),
        deletion,
    }
}

/// Waits (on paused time, so at once) until `done`; fails after an hour of paused time.
pub(super) async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let wait = async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(3600), wait)
        .await
        .is_err()
    {
        panic!("never happened: {what}");
    }
}

/// #14: a source handing over its whole set again wakes only the workers whose pod changed.
#[tokio::test(start_paused = true)]
async fn a_worker_is_handed_its_pod_only_when_it_changed() {
    let node = Node::new().await;
    let (a, b) = (pod("u1", "Always"), pod("u2", "Always"));
    let set = |a: &Pod, b: &Pod| vec![desired(a, None), desired(b, None)];
    node.manager.sync_all(set(&a, &b)).await;
    until("both containers run", || node.rt.running().len() == 2).await;
    let to_a = node
        .manager
        .worker_updates("u1")
        .await
        .expect("u1's worker");
    let mut to_b = node
        .manager
        .worker_updates("u2")
        .await
        .expect("u2's worker");
    // The same pods again, as new objects (an API relist): nobody is woken.
    node.manager.sync_all(set(&a, &b)).await;
    assert!(!to_a.has_changed().unwrap() && !to_b.has_changed().unwrap());
    let mut changed = b.clone();
    changed.metadata.labels = Some([("v".to_string(), "2".to_string())].into());
    node.manager.sync_all(set(&a, &changed)).await;
    assert!(!to_a.has_changed().unwrap(), "u1 did not change");
    assert!(to_b.has_changed().unwrap(), "u2 changed");
    assert_eq!(*to_b.borrow_and_update().pod, changed);
}

/// #14: a worker ending and a new plan arriving at the same time leave one worker per pod:
/// whichever the manager takes first, the deleted pod's same-name successor is started exactly
/// once, the deleted pod never again, and its end is said once.
#[tokio::test(start_paused = true)]
async fn a_worker_ending_as_a_new_plan_arrives_leaves_one_worker_per_pod() {
    let (mut plan_first, mut end_first) = (0, 0);
    for yields in 0..60 {
        let mut node = Node::new().await;
        let old = pod("u1", "Always");
        let mut new = pod("u2", "Always");
        new.metadata.name = old.metadata.name.clone();
        node.run(&old).await;
        let before = node.rt.calls().len();
        let deleted = Some(Deletion {
            grace: Duration::ZERO,
            gone: false,
        });
        node.manager.update(desired(&old, deleted));
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
        let ended = node.finished("u1");
        node.manager
            .sync_all(vec![desired(&old, deleted), desired(&new, None)])
            .await;
        match ended {
            true => end_first += 1,
            false => plan_first += 1,
        }
        until("the successor runs", || node.rt.running().len() == 1).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(node.manager.uids().await, ["u2"], "after {yields} yields");
        let calls = node.rt.calls();
        let created: Vec<&String> = calls[before..]
            .iter()
            .filter(|c| c.starts_with("create "))
            .collect();
        assert_eq!(created.len(), 1, "after {yields} yields: {created:?}");
        assert_eq!(
            node.rt.running(),
            [created[0]["create ".len()..].to_string()]
        );
        let ends = std::iter::from_fn(|| node.finished.try_recv().ok());
        let ends = ends.filter(|u| u == "u1").count();
        assert_eq!(ends, usize::from(!ended), "after {yields} yields");
    }
    assert!(
        plan_first > 0 && end_first > 0,
        "both orders taken: plan first {plan_first}, end first {end_first}"
    );
}

/// #14: a change in the object store refreshes (and steps) only the pods that watch the
/// changed object, not every pod of the node.
#[tokio::test(start_paused = true)]
async fn only_a_change_to_an_object_the_pod_watches_refreshes_its_volumes() {
    let node = Node::new().await;
    let mut p = pod("u1", "Always");
    p.spec.as_mut().unwrap().volumes = Some(vec![serde_json::from_value(
        serde_json::json!({"name": "v", "configMap": {"name": "watched"}}),
    )
    .expect("volume")]);
    node.run(&p).await;
    let before = node.host.refreshes("u1");
    let cm = k8s_openapi::api::core::v1::ConfigMap::default;
    node.ctx
        .store
        .set_config_map("default", "other", Some(cm()));
    node.ctx
        .store
        .set_config_map("elsewhere", "watched", Some(cm()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        node.host.refreshes("u1"),
        before,
        "objects the pod does not watch refreshed it"
    );
    node.ctx
        .store
        .set_config_map("default", "watched", Some(cm()));
    until("the pod's volumes are refreshed", || {
        node.host.refreshes("u1") > before
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_deleted_pod_is_stopped_and_leaves_nothing() {
    let mut node = Node::new().await;
    let pod = pod("u1", "Always");
    let id = node.run(&pod).await;
    node.delete(&pod, 5, false);
    until("the pod finishes", || node.finished("u1")).await;
    assert!(node.rt.calls().contains(&format!("signal {id} 15")));
    node.assert_nothing_left("u1");
}
/// #10.10: the stop signal and KILL fail while containerd is down; once it is back the kill is
/// carried out and the deletion finishes, without a new update or an agent restart.
#[tokio::test(start_paused = true)]
async fn a_kill_that_failed_while_containerd_was_down_is_retried() {
    let mut node = Node::new().await;
    let pod = pod("u1", "Always");
    let id = node.run(&pod).await;
    node.rt.set_down(true);
    node.delete(&pod, 5, false);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(node.rt.running(), vec![id.clone()], "containerd is down");
    assert!(!node.finished("u1"));
    node.rt.set_down(false);
    until("the pod finishes", || node.finished("u1")).await;
    let calls = node.rt.calls();
    let signalled = |s| calls.iter().any(|c| *c == format!("signal {id} {s}"));
    assert!(
        signalled(15) || signalled(9),
        "the kill was retried: {calls:?}"
    );
    node.assert_nothing_left("u1");
}

/// #10.11: a pod removed (gone) while containerd is down is not reported finished before its
/// containers are removed, and nothing of it is left once containerd is back.
#[tokio::test(start_paused = true)]
async fn a_pod_removed_while_containerd_is_down_is_cleaned_up_when_it_is_back() {
    let mut node = Node::new().await;
    let pod = pod("u1", "Never");
    node.complete(&pod).await;
    node.rt.set_down(true);
    node.delete(&pod, 0, true);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(!node.finished("u1"), "finished while its container is left");
    node.rt.set_down(false);
    until("the pod finishes", || node.finished("u1")).await;
    node.assert_nothing_left("u1");
}

/// #10.12: the cgroup of a completed pod goes once its containers are removed, when an exited
/// container held it (the fake holds it until the container is deleted) at the pod's release.
#[tokio::test(start_paused = true)]
async fn a_completed_pods_cgroup_is_removed_after_its_containers() {
    let mut node = Node::new().await;
    let pod = pod("u1", "Never");
    node.complete(&pod).await;
    assert!(
        node.rt.cgroups().contains("u1"),
        "the exited container holds it"
    );
    node.delete(&pod, 0, true);
    until("the pod finishes", || node.finished("u1")).await;
    assert!(
        node.rt.cgroups().is_empty(),
        "cgroup left: {:?}",
        node.rt.cgroups()
    );
}

/// #10.13: a deleted pod's log directory goes with it; a log directory of a pod no source
/// wants (found at start) goes at the first sync; a wanted pod's logs stay.
#[tokio::test(start_paused = true)]
async fn log_directories_of_gone_pods_are_removed() {
    let mut node = Node::new().await;
    let logs = node.ctx.node.log_dir.clone();
    let orphan = logs.join("default_old_u9/c");
    std::fs::create_dir_all(&orphan).expect("orphan log dir");
    std::fs::write(orphan.join("0.log"), b"old\n").expect("orphan log");
    let kept = pod("u2", "Always");
    let gone = pod("u1", "Always");
    node.manager
        .sync_all(vec![desired(&kept, None), desired(&gone, None)])
        .await;
    until("both run", || node.rt.running().len() == 2).await;
    assert!(
        !logs.join("default_old_u9").exists(),
        "an orphan's logs stay"
    );
    let dir = |uid: &str| logs.join(format!("default_p-{uid}_{uid}"));
    assert!(dir("u1").join("c").is_dir() && dir("u2").join("c").is_dir());
    node.delete(&gone, 0, true);
    until("the pod finishes", || node.finished("u1")).await;
    assert!(!dir("u1").exists(), "a deleted pod's logs stay");
    assert!(dir("u2").join("c").is_dir(), "a running pod's logs went");
}

/// #10.16: a worker that panics is made again at once from what the runtime shows: the
/// running attempt is adopted, never removed or signalled, and the pod keeps running.
#[tokio::test(start_paused = true)]
async fn a_worker_that_panics_adopts_its_running_container_again() {
    let node = Node::new().await;
    let pod = pod("u1", "Always");
    let id = node.run(&pod).await;
    let before = node.rt.calls().len();
    node.rt.panic_on("inspect");
    // The worker re-inspects running containers every 10 s: that call panics.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        node.manager.uids().await.contains(&"u1".to_string()),
        "no worker"
    );
    node.manager.update(desired(&pod, None));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(node.rt.running(), vec![id.clone()]);
    let touched: Vec<String> = (node.rt.calls().into_iter().skip(before))
        .filter(|c| c.starts_with(&format!("remove {id}")) || c.starts_with("signal"))
        .collect();
    assert!(
        touched.is_empty(),
        "the running attempt was touched: {touched:?}"
    );
    let status = node.ctx.status.get("u1").expect("status").status;
    let c = &status
        .container_statuses
        .as_ref()
        .expect("container status")[0];
    assert_eq!(c.restart_count, 0);
    assert!(c.state.as_ref().and_then(|s| s.running.as_ref()).is_some());
}

/// #10.16: a worker that finds its attempt running in the runtime (nothing recovered for it)
/// adopts it instead of removing it as a leftover of a failed start.
#[tokio::test(start_paused = true)]
async fn a_running_attempt_is_adopted_not_removed_as_a_leftover() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ctx, rt, _host) = fake::context(dir.path());
    let cancel = CancellationToken::new();
    let pod = pod("u1", "Always");
    let id = {
        let first = PodManager::new(ctx.clone(), None, &cancel);
        first.sync_all(vec![desired(&pod, None)]).await;
        until("the container runs", || rt.running().len() == 1).await;
        first.shutdown().await;
        rt.running().remove(0)
    };
    let before = rt.calls().len();
    // A manager that never recovered the container (a listing that failed at start).
    let second = PodManager::new(ctx.clone(), None, &CancellationToken::new());
    second.sync_all(vec![desired(&pod, None)]).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(rt.running(), vec![id.clone()]);
    let removed = rt.calls()[before..].contains(&format!("remove {id}"));
    assert!(!removed, "the running attempt was removed");
    second.shutdown().await;
}

/// A pod whose container has a postStart exec hook.
fn hooked_pod(uid: &str, grace: i64) -> Pod {
    let mut pod = pod(uid, "Always");
    let spec = pod.spec.as_mut().expect("spec");
    spec.termination_grace_period_seconds = Some(grace);
    spec.containers[0].lifecycle = serde_json::from_value(serde_json::json!({
        "postStart": {"exec": {"command": ["sh", "-c", "sleep 3600"]}},
    }))
    .expect("lifecycle");
    pod
}

fn container_status(node: &Node, uid: &str) -> Option<ContainerStatus> {
    let status = (*node.ctx.status.get(uid)?.status).clone();
    status.container_statuses?.into_iter().next()
}

fn waiting(node: &Node, uid: &str) -> Option<ContainerStateWaiting> {
    container_status(node, uid)?.state?.waiting
}

fn waiting_reason(node: &Node, uid: &str) -> Option<String> {
    waiting(node, uid)?.reason
}

/// #18.6: postStart has no timeout (the kubelet gives it none; it was cut at the grace), the
/// container shows ContainerCreating meanwhile (the kubelet writes no status while the hook
/// holds its sync), and a delete during the hook still stops the pod with its grace.
#[tokio::test(start_paused = true)]
async fn a_post_start_hook_has_no_timeout_and_a_delete_during_it_stops_the_pod() {
    let mut node = Node::new().await;
    node.rt.set_exec_exit(None);
    let pod = hooked_pod("u1", 5);
    let id = node.run(&pod).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(node.rt.running(), vec![id.clone()]);
    let calls = node.rt.calls().into_iter();
    let signals: Vec<String> = calls.filter(|c| c.starts_with("signal")).collect();
    assert!(signals.is_empty(), "the hook was cut off: {signals:?}");
    assert_eq!(
        waiting_reason(&node, "u1").as_deref(),
        Some("ContainerCreating")
    );
    node.delete(&pod, 5, false);
    until("the pod finishes", || node.finished("u1")).await;
    assert!(node.rt.calls().contains(&format!("signal {id} 15")));
    node.assert_nothing_left("u1");
}

/// #18.6: a container being killed for a failed postStart (it ignores TERM, so the kill waits
/// out the grace) when the agent restarts is killed by the new agent, not re-adopted as running.
#[tokio::test(start_paused = true)]
async fn a_kill_for_a_failed_post_start_survives_an_agent_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ctx, rt, _host) = fake::context(dir.path());
    rt.set_exec_exit(Some(1));
    rt.set_ignore_term(true);
    let pod = hooked_pod("u1", 30);
    let first = PodManager::new(ctx.clone(), None, &CancellationToken::new());
    first.recover().await.expect("recover");
    first.sync_all(vec![desired(&pod, None)]).await;
    until("the container runs", || rt.running().len() == 1).await;
    let id = rt.running().remove(0);
    let term = format!("signal {id} 15");
    until("TERM is sent", || rt.calls().contains(&term)).await;
    first.shutdown().await;
    assert_eq!(rt.running(), vec![id.clone()], "TERM is ignored");
    let second = PodManager::new(ctx.clone(), None, &CancellationToken::new());
    second.recover().await.expect("recover");
    second.sync_all(vec![desired(&pod, None)]).await;
    let kill = format!("signal {id} 9");
    until("the container is killed", || rt.calls().contains(&kill)).await;
    until("it runs again", || {
        rt.running().iter().any(|r| *r != id) && !rt.running().contains(&id)
    })
    .await;
    second.shutdown().await;
}

/// #18.8: a start the OCI runtime refuses shows RunContainerError with the runtime's message
/// (lastState StartError), as the kubelet's reason cache does, and CrashLoopBackOff once the
/// next sync (a relist later) finds the container in back-off; Created (CRI's CreateContainer
/// succeeded, its StartContainer makes the task) and Failed events.
#[tokio::test(start_paused = true)]
async fn a_refused_start_shows_run_container_error_before_crash_loop_back_off() {
    let node = Node::new().await;
    let refusal = "OCI runtime create failed: exec: \"/no/such\": no such file or directory";
    node.rt.refuse_start(refusal);
    let pod = pod("u1", "Always");
    node.manager.sync_all(vec![desired(&pod, None)]).await;
    until("a second attempt failed", || {
        container_status(&node, "u1").is_some_and(|c| c.restart_count >= 1)
    })
    .await;
    // CRI's wording of a task create that failed.
    let message = format!("failed to create containerd task: {refusal}");
    let w = waiting(&node, "u1").expect("waiting");
    assert_eq!(w.reason.as_deref(), Some("RunContainerError"));
    assert_eq!(w.message.as_deref(), Some(message.as_str()));
    let c = container_status(&node, "u1").expect("status");
    let last = c.last_state.and_then(|l| l.terminated).expect("lastState");
    assert_eq!(
        (last.exit_code, last.reason.as_deref()),
        (128, Some("StartError"))
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let w = waiting(&node, "u1").expect("waiting");
    assert_eq!(w.reason.as_deref(), Some("CrashLoopBackOff"));
    assert_eq!(
        w.message.as_deref(),
        Some("back-off 10s restarting failed container=c pod=p-u1_default(u1)")
    );
    let events = node.ctx.recorder.recent();
    let said = |reason: &str, message: &str| {
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some(reason) && e.message.as_deref() == Some(message))
    };
    assert!(said("Created", "Created container c"), "{events:?}");
    assert!(said("Failed", &format!("Error: {message}")), "{events:?}");
}

/// #16: an update of the pod itself that its downward API volumes show (an annotation)
/// rewrites its volumes at once, as the kubelet's does, without any object changing; an
/// update of its status alone does not.
#[tokio::test(start_paused = true)]
async fn a_pod_whose_annotations_change_has_its_volumes_refreshed() {
    let node = Node::new().await;
    let mut p = pod("u1", "Always");
    p.spec.as_mut().unwrap().volumes = Some(vec![serde_json::from_value(serde_json::json!(
        {"name": "info", "downwardAPI": {"items": [
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}
    ))
    .expect("volume")]);
    node.run(&p).await;
    let before = node.host.refreshes("u1");
    let mut status_only = p.clone();
    status_only.status = Some(k8s_openapi::api::core::v1::PodStatus {
        message: Some("written by the agent".into()),
        ..Default::default()
    });
    node.manager.update(desired(&status_only, None));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        node.host.refreshes("u1"),
        before,
        "a status change refreshed"
    );
    let mut annotated = status_only.clone();
    annotated.metadata.annotations = Some([("builder".to_string(), "foo".to_string())].into());
    node.manager.update(desired(&annotated, None));
    until("the pod's volumes are refreshed", || {
        node.host.refreshes("u1") > before
    })
    .await;
}
