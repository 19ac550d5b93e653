//! The API status sink: writes what the [`StatusManager`] reports to `pods/status`, and deletes
//! finished pods the API is deleting.
//!
//! One task owns the record of what it wrote (the status version per pod UID). [`plan`] is the
//! pure decision for one pod: patch when the version grew since the last write (so an older
//! status is never written after a newer one), else, for a finished pod with a
//! `deletionTimestamp`, the final DELETE with grace 0 and a UID precondition, then `forget`.
//! Failed writes are retried with a per-pod back-off; a pod that is gone from the API (404) or
//! was replaced by a same-name pod (409) is not written again.
//!
//! A static pod's status goes to its mirror pod (the one of its name and hash that is not being
//! deleted); the final DELETE is never the sink's for those: mirror pods are the mirror task's.
//!
//! Status is sent as a JSON merge patch of the whole status with `metadata.uid` in it (the API
//! refuses it if the name now belongs to another pod). Lists are replaced whole in a merge
//! patch, so a condition carries no stale reason or message from an earlier write; conditions of
//! types the agent does not report (DisruptionTarget from an eviction, readiness gates set by
//! other controllers) are copied from the API's pod so that they survive.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pods::ApiPods;
use super::ClusterError;
use crate::retry::Retry;
use crate::status::{Reported, StatusManager};

/// What the sink does next for one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Nothing,
    /// Write the reported status (its version is newer than the last one written).
    Patch,
    /// The final DELETE: the pod is finished and the API is deleting it.
    Delete,
    /// Drop the pod from the status manager: it was an API pod and is gone from the API.
    Forget,
}

/// The sink's memory of one pod.
#[derive(Clone, Debug, Default)]
pub(super) struct Written {
    /// The last version written (or abandoned because the API object is gone).
    pub version: u64,
    /// The final DELETE succeeded.
    pub deleted: bool,
}

/// Decides the next step for `reported`, given the API's copy of the pod (`None`: not in the
/// API's current set), what the sink did before (`None`: never seen as an API pod, or its
/// memory was dropped) and whether the API's pods have been listed at all.
///
/// A finished API pod missing from a listed set is gone, whatever the sink remembers: the worker
/// may report a last status after the sink forgot the pod (its update of the deletion races the
/// sink's final DELETE), and that entry must not stay listed for good.
pub(super) fn plan(
    reported: &Reported,
    api: Option<&Pod>,
    written: Option<&Written>,
    listed: bool,
) -> Action {
    match (api, written) {
        (None, None) => {
            let api_pod = super::mirror::static_hash(&reported.desired).is_none();
            if api_pod && listed && reported.finished {
                Action::Forget
            } else {
                // A static pod of the manifest folder, or not finished (its worker forgets it).
                Action::Nothing
            }
        }
        (None, Some(_)) => {
            if reported.finished {
                Action::Forget
            } else {
                Action::Nothing
            }
        }
        (Some(api), w) => {
            let w = w.cloned().unwrap_or_default();
            if w.deleted {
                return Action::Forget;
            }
            if reported.version > w.version {
                Action::Patch
            } else if reported.finished && api.metadata.deletion_timestamp.is_some() {
                Action::Delete
            } else {
                Action::Nothing
            }
        }
    }
}

/// The patch body: the whole status, with the API object's UID as precondition, keeping the API's
/// conditions of types the agent does not report.
pub(super) fn patch_body(reported: &Reported, api: Option<&Pod>) -> serde_json::Value {
    let mut status = (*reported.status).clone();
    let foreign: Vec<_> = api
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| {
            !status
                .conditions
                .iter()
                .flatten()
                .any(|own| own.type_ == c.type_)
        })
        .cloned()
        .collect();
    if !foreign.is_empty() {
        status
            .conditions
            .get_or_insert_with(Vec::new)
            .extend(foreign);
    }
    // The API object's own UID: a mirror pod's differs from its static pod's.
    let uid = api
        .and_then(|p| p.metadata.uid.as_ref())
        .or(reported.desired.metadata.uid.as_ref());
    serde_json::json!({
        "metadata": { "uid": uid },
        "status": status,
    })
}

/// A pod whose last attempt failed, and when to try again.
struct Retrying {
    backoff: Retry,
    at: Instant,
}

/// Runs until `token` is cancelled.
pub(super) async fn run(
    client: kube::Client,
    status: StatusManager,
    mut api_pods: watch::Receiver<ApiPods>,
    token: CancellationToken,
) {
    let mut changed = status.subscribe();
    let mut written: BTreeMap<String, Written> = BTreeMap::new();
    let mut retries: BTreeMap<String, Retrying> = BTreeMap::new();
    // The API's pods were listed (the channel starts with an empty set before the first list).
    let mut listed = false;
    loop {
        listed |= api_pods.has_changed().unwrap_or(false);
        let pods = api_pods.borrow_and_update().clone();
        changed.borrow_and_update();
        let all = status.all();
        let now = Instant::now();
        // A write that went through may enable the next step (the final DELETE after the
        // terminal status) without anything else changing: plan again before waiting.
        let mut progressed = false;
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for reported in &all {
            let Some(uid) = reported.desired.metadata.uid.clone() else {
                continue;
            };
            if retries.get(&uid).is_some_and(|r| r.at > now) {
                continue;
            }
            // An API pod is written to itself, a static pod to its mirror pod; the sink's
            // memory is kept per API object (a mirror made anew is written anew).
            let api = pods
                .get(&uid)
                .map(|p| &**p)
                .or_else(|| super::mirror::mirror_of(&reported.desired, &pods));
            let key = api
                .and_then(|p| p.metadata.uid.clone())
                .unwrap_or_else(|| uid.clone());
            if api.is_some() {
                written.entry(key.clone()).or_default();
            }
            seen.insert(key.clone());
            let result = match plan(reported, api, written.get(&key), listed) {
                Action::Nothing => Ok(None),
                Action::Forget => {
                    written.remove(&key);
                    retries.remove(&uid);
                    status.forget(&uid);
                    Ok(None)
                }
                Action::Patch => patch(&client, reported, api).await.map(Some),
                Action::Delete => delete(&client, reported).await.map(Some),
            };
            match result {
                Ok(None) => {}
                Ok(Some(Done { deleted })) => {
                    let w = written.entry(key).or_default();
                    w.version = w.version.max(reported.version);
                    w.deleted |= deleted;
                    retries.remove(&uid);
                    progressed = true;
                }
                Err(e) => {
                    let retry = retries.entry(uid.clone()).or_insert_with(|| Retrying {
                        backoff: Retry::new(Duration::from_millis(500), Duration::from_secs(30)),
                        at: now,
                    });
                    let delay = retry.backoff.fail();
                    retry.at = Instant::now() + delay;
                    tracing::warn!(pod = reported.desired.metadata.name.as_deref().unwrap_or(""), uid, error = %e, ?delay, "writing pod to the API failed; retrying");
                }
            }
        }
        // Forget the memory of pods the status manager dropped, and of replaced mirror pods.
        let known: BTreeSet<&str> = all
            .iter()
            .filter_map(|r| r.desired.metadata.uid.as_deref())
            .collect();
        written.retain(|key, _| seen.contains(key));
        retries.retain(|uid, _| known.contains(uid.as_str()));

        if progressed {
            continue;
        }
        let next_retry = retries.values().map(|r| r.at).min();
        tokio::select! {
            _ = token.cancelled() => return,
            c = changed.changed() => if c.is_err() { return },
            c = api_pods.changed() => if c.is_err() { return },
            _ = sleep_until(next_retry) => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A write that needs no retry: the status went through, or the pod is gone or replaced (then
/// nothing more is written for this version); `deleted` when the final DELETE is done.
struct Done {
    deleted: bool,
}

fn pod_api(client: &kube::Client, reported: &Reported) -> (Api<Pod>, String, String) {
    let ns = reported
        .desired
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = reported.desired.metadata.name.clone().unwrap_or_default();
    let object = format!("pods/{ns}/{name}");
    (Api::namespaced(client.clone(), &ns), name, object)
}

async fn patch(
    client: &kube::Client,
    reported: &Reported,
    api_pod: Option<&Pod>,
) -> Result<Done, ClusterError> {
    let (api, name, object) = pod_api(client, reported);
    match api
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(patch_body(reported, api_pod)),
        )
        .await
    {
        Ok(_) => {
            tracing::debug!(pod = name, version = reported.version, "pod status written");
            Ok(Done { deleted: false })
        }
        Err(e) => {
            let e = ClusterError::api("patch status", object, e);
            if e.is_not_found() || e.is_conflict() {
                tracing::info!(pod = name, error = %e, "pod gone or replaced; its status is not written");
                Ok(Done { deleted: false })
            } else {
                Err(e)
            }
        }
    }
}

async fn delete(client: &kube::Client, reported: &Reported) -> Result<Done, ClusterError> {
    let (api, name, object) = pod_api(client, reported);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: reported.desired.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {
            tracing::info!(
                pod = name,
                uid = reported.desired.metadata.uid.as_deref().unwrap_or(""),
                "pod deleted from the API"
            );
            Ok(Done { deleted: true })
        }
        Err(e) => {
            let e = ClusterError::api("delete", object, e);
            if e.is_not_found() || e.is_conflict() {
                Ok(Done { deleted: true })
            } else {
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use std::sync::Arc;

    fn reported(version: u64, finished: bool) -> Reported {
        Reported {
            desired: Arc::new(Pod {
                metadata: ObjectMeta {
                    uid: Some("u1".into()),
                    name: Some("p".into()),
                    ..Default::default()
                },
                ..Default::default()
            }),
            status: Arc::new(PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            }),
            version,
            finished,
        }
    }

    fn api_pod(deleting: bool) -> Pod {
        let mut p = reported(0, false).pod();
        if deleting {
            p.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        }
        p
    }

    fn w(version: u64) -> Written {
        Written {
            version,
            deleted: false,
        }
    }

    #[test]
    fn only_a_newer_version_is_written() {
        let api = api_pod(false);
        assert_eq!(
            plan(&reported(1, false), Some(&api), None, true),
            Action::Patch
        );
        assert_eq!(
            plan(&reported(3, false), Some(&api), Some(&w(2)), true),
            Action::Patch
        );
        assert_eq!(
            plan(&reported(2, false), Some(&api), Some(&w(2)), true),
            Action::Nothing
        );
        assert_eq!(
            plan(&reported(1, false), Some(&api), Some(&w(2)), true),
            Action::Nothing
        );
    }

    #[test]
    fn a_finished_deleting_pod_gets_its_final_status_then_the_delete() {
        let api = api_pod(true);
        assert_eq!(
            plan(&reported(5, true), Some(&api), Some(&w(4)), true),
            Action::Patch
        );
        assert_eq!(
            plan(&reported(5, true), Some(&api), Some(&w(5)), true),
            Action::Delete
        );
        let done = Written {
            version: 5,
            deleted: true,
        };
        assert_eq!(
            plan(&reported(5, true), Some(&api), Some(&done), true),
            Action::Forget
        );
        // Finished but not being deleted (a completed Job pod): status only, no delete.
        let alive = api_pod(false);
        assert_eq!(
            plan(&reported(5, true), Some(&alive), Some(&w(5)), true),
            Action::Nothing
        );
        // Deleting but still terminating: wait.
        assert_eq!(
            plan(&reported(5, false), Some(&api), Some(&w(5)), true),
            Action::Nothing
        );
    }

    #[test]
    fn a_vanished_api_pod_is_forgotten_once_finished_and_others_are_left_alone() {
        assert_eq!(
            plan(&reported(2, false), None, Some(&w(2)), true),
            Action::Nothing
        );
        assert_eq!(
            plan(&reported(2, true), None, Some(&w(2)), true),
            Action::Forget
        );
        // Never an API pod (a static pod): the sink does nothing at all.
        let mut static_pod = reported(2, true);
        Arc::make_mut(&mut static_pod.desired).metadata.annotations = Some(
            [(
                crate::source::manifest::CONFIG_HASH.to_string(),
                "0123456789abcdef0123456789abcdef".to_string(),
            )]
            .into(),
        );
        assert_eq!(plan(&static_pod, None, None, true), Action::Nothing);
    }

    #[test]
    fn a_finished_api_pod_reported_again_after_it_was_forgotten_is_forgotten_again() {
        // The worker's last status re-added a pod the sink had already deleted and forgotten:
        // once finished and absent from the listed API pods, it goes.
        assert_eq!(plan(&reported(1, true), None, None, true), Action::Forget);
        // Still finishing: its worker forgets it, or reports it finished first.
        assert_eq!(plan(&reported(1, false), None, None, true), Action::Nothing);
        // The API's pods not listed yet (an agent restart): nothing is known to be gone.
        assert_eq!(plan(&reported(1, true), None, None, false), Action::Nothing);
    }

    #[test]
    fn the_patch_carries_the_uid_precondition_and_the_whole_status() {
        let body = patch_body(&reported(1, false), None);
        assert_eq!(body["metadata"]["uid"], "u1");
        assert_eq!(body["status"]["phase"], "Running");
    }

    #[test]
    fn a_mirror_pod_is_patched_under_its_own_uid() {
        let mut mirror = api_pod(false);
        mirror.metadata.uid = Some("mirror-uid".into());
        let body = patch_body(&reported(1, false), Some(&mirror));
        assert_eq!(body["metadata"]["uid"], "mirror-uid");
        // A finished static pod never gets the final DELETE through its mirror.
        assert_eq!(
            plan(&reported(1, true), Some(&mirror), Some(&w(1)), true),
            Action::Nothing
        );
    }

    #[test]
    fn conditions_of_other_writers_survive_and_own_ones_are_replaced() {
        use k8s_openapi::api::core::v1::PodCondition;
        let cond = |t: &str, s: &str| PodCondition {
            type_: t.into(),
            status: s.into(),
            ..Default::default()
        };
        let mut r = reported(2, false);
        Arc::make_mut(&mut r.status).conditions = Some(vec![cond("Ready", "True")]);
        let mut api = api_pod(false);
        api.status = Some(PodStatus {
            conditions: Some(vec![
                PodCondition {
                    reason: Some("ContainersNotReady".into()),
                    ..cond("Ready", "False")
                },
                cond("DisruptionTarget", "True"),
            ]),
            ..Default::default()
        });
        let body = patch_body(&r, Some(&api));
        let conditions = body["status"]["conditions"].as_array().unwrap();
        assert_eq!(conditions.len(), 2);
        assert_eq!(conditions[0]["type"], "Ready");
        assert_eq!(conditions[0]["status"], "True");
        assert!(conditions[0].get("reason").is_none(), "no stale reason");
        assert_eq!(conditions[1]["type"], "DisruptionTarget");
    }

    use crate::cluster::fake_api::{until, FakeApi};
    use serde_json::json;

    const POD: &str = "/api/v1/namespaces/default/pods/web";
    const STATUS: &str = "/api/v1/namespaces/default/pods/web/status";
    /// Catches a hang; paused time gets there at once.
    const HANG: Duration = Duration::from_secs(600);

    /// Stores the API pod `web` (UID `uid`, being deleted when `deleting`) as the API has it.
    fn api_web(api: &FakeApi, uid: &str, deleting: bool) -> Pod {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "web", "namespace": "default", "uid": uid },
            "spec": { "nodeName": "n1", "containers": [{ "name": "c", "image": "i" }] },
            "status": { "phase": "Pending" },
        });
        if deleting {
            pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:30Z".into();
            pod["metadata"]["deletionGracePeriodSeconds"] = 30.into();
        }
        serde_json::from_value(api.put(POD, pod)).unwrap()
    }

    fn phase(phase: &str) -> PodStatus {
        PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        }
    }

    /// The sink running against `api`, the pod watch having listed `pods`.
    struct Sink {
        status: StatusManager,
        pods: watch::Sender<ApiPods>,
        token: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Sink {
        fn start(api: &FakeApi, pods: &[&Pod]) -> Self {
            let status = StatusManager::new();
            let (tx, rx) = watch::channel(ApiPods::default());
            let token = CancellationToken::new();
            let sink = Self {
                task: tokio::spawn(run(api.client(), status.clone(), rx, token.clone())),
                status,
                pods: tx,
                token,
            };
            sink.list(pods);
            sink
        }

        /// The pod watch publishes `pods` as the API's current set.
        fn list(&self, pods: &[&Pod]) {
            let set = pods
                .iter()
                .map(|p| (p.metadata.uid.clone().unwrap(), Arc::new((*p).clone())))
                .collect();
            self.pods.send_replace(Arc::new(set));
        }

        /// Waits until the sink dropped `uid` from the status manager.
        async fn forgotten(&self, uid: &str) {
            until("the status forgotten", HANG, || {
                self.status.get(uid).is_none()
            })
            .await;
        }

        async fn stop(self) {
            self.token.cancel();
            self.task.await.unwrap();
        }
    }

    /// The sink after it wrote the Running status of the API pod `web` (UID u1, being deleted
    /// when `deleting`), and that pod.
    async fn running(api: &FakeApi, deleting: bool) -> (Sink, Pod) {
        let pod = api_web(api, "u1", deleting);
        let sink = Sink::start(api, &[&pod]);
        sink.status
            .set(&Arc::new(pod.clone()), Arc::new(phase("Running")));
        until("the status patch", HANG, || {
            api.requests_to("PATCH", STATUS).len() == 1
        })
        .await;
        (sink, pod)
    }

    #[tokio::test(start_paused = true)]
    async fn pod_status_is_merge_patched_under_its_uid_and_a_failed_patch_is_retried() {
        let api = FakeApi::new();
        let (sink, pod) = running(&api, false).await;
        let sent = &api.requests_to("PATCH", STATUS)[0];
        assert_eq!(sent.content_type, "application/merge-patch+json");
        assert_eq!(
            sent.body["metadata"]["uid"], "u1",
            "the UID as precondition"
        );
        assert_eq!(sent.body["status"]["phase"], "Running");
        assert_eq!(api.get(POD).unwrap()["status"]["phase"], "Running");

        // The API server fails twice (an outage): the newer status still gets there.
        api.fail("PATCH", STATUS, 2, 503);
        sink.status
            .set(&Arc::new(pod.clone()), Arc::new(phase("Succeeded")));
        until("the status after two failures", HANG, || {
            api.get(POD).unwrap()["status"]["phase"] == "Succeeded"
        })
        .await;
        let patches = api.requests_to("PATCH", STATUS);
        assert_eq!(
            patches.len(),
            4,
            "the first, then two failed tries and one written"
        );
        assert!(patches[1..]
            .iter()
            .all(|p| p.body["status"]["phase"] == "Succeeded"));
        // Written once: no further request for the same version.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(api.requests_to("PATCH", STATUS).len(), 4);
        sink.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_deleted_in_the_api_is_neither_patched_again_nor_made_anew() {
        let api = FakeApi::new();
        let (sink, pod) = running(&api, false).await;
        // Deleted (force) in the API before the pod watch shows it: the next patch finds no
        // pod (404), which is not retried.
        api.remove(POD);
        sink.status
            .set(&Arc::new(pod.clone()), Arc::new(phase("Failed")));
        until("the patch of the gone pod", HANG, || {
            api.requests_to("PATCH", STATUS).len() == 2
        })
        .await;
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(
            api.requests_to("PATCH", STATUS).len(),
            2,
            "no retry of a 404"
        );
        // The watch shows it gone and the worker finishes: the sink forgets the pod.
        sink.list(&[]);
        sink.status.finish("u1");
        sink.forgotten("u1").await;
        let requests = api.requests();
        assert_eq!(
            requests.len(),
            2,
            "nothing but the two patches: {requests:?}"
        );
        assert!(api.get(POD).is_none(), "not made anew");
        sink.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_gracefully_deleted_pod_gets_its_final_status_then_one_delete_with_its_uid() {
        let api = FakeApi::new();
        let (sink, pod) = running(&api, true).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            api.get(POD).is_some(),
            "no delete while the pod is terminating"
        );
        sink.status
            .set(&Arc::new(pod.clone()), Arc::new(phase("Succeeded")));
        sink.status.finish("u1");
        until("the final delete", HANG, || api.get(POD).is_none()).await;
        sink.forgotten("u1").await;
        tokio::time::sleep(Duration::from_secs(300)).await;
        let requests = api.requests();
        let methods: Vec<&str> = requests.iter().map(|r| r.method.as_str()).collect();
        assert_eq!(methods, ["PATCH", "PATCH", "DELETE"], "{requests:?}");
        assert_eq!(requests[1].body["status"]["phase"], "Succeeded");
        let delete = &requests[2];
        assert_eq!(delete.path, POD);
        assert_eq!(delete.body["gracePeriodSeconds"], 0);
        assert_eq!(delete.body["preconditions"]["uid"], "u1");
        sink.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_same_name_pod_made_anew_is_not_deleted_for_the_old_one() {
        let api = FakeApi::new();
        let (sink, old) = running(&api, true).await;
        // The old pod went and a controller made a new one of the same name before the pod
        // watch showed either.
        api.remove(POD);
        api_web(&api, "u2", false);
        sink.status
            .set(&Arc::new(old.clone()), Arc::new(phase("Succeeded")));
        sink.status.finish("u1");
        sink.forgotten("u1").await;
        let new = api.get(POD).expect("the new pod stays");
        assert_eq!(new["metadata"]["uid"], "u2");
        assert_eq!(
            new["status"]["phase"], "Pending",
            "not the old pod's status"
        );
        let deletes = api.requests_to("DELETE", POD);
        assert_eq!(deletes.len(), 1);
        assert_eq!(deletes[0].body["preconditions"]["uid"], "u1");
        sink.stop().await;
    }
}
