//! Mirror pods: the API's read-only copy of each static pod (a pod of the manifest folder), as
//! the kubelet makes them, so that `kubectl get pods` shows static pods and their status.
//!
//! In cluster mode a static pod is named `<name>-<node>` (the kubelet's rule, which keeps the
//! names of different nodes' static pods apart in one namespace); [`rename`] does that to the
//! manifest folder's pods before the pod manager sees them. Its mirror pod is the same pod with
//! the annotation `kubernetes.io/config.mirror` set to the static pod's hash
//! (`kubernetes.io/config.hash`), `spec.nodeName` this node, and one controller owner reference
//! to the Node (NodeRestriction admits from a node only pods like that, and no pod that refers
//! to other API objects: Secrets, ConfigMaps, claims, service accounts).
//!
//! One task owns the work: [`plan`] compares the static pods with the mirror pods the pod watch
//! sees and says what to create and delete. A mirror pod is created for every static pod that
//! has none; a mirror pod that someone is deleting, or whose hash is not that of the static pod
//! of its name (the manifest changed), is deleted with grace 0 and its UID as precondition, and
//! created anew; a mirror pod whose static pod is gone is deleted once that pod has stopped (its
//! worker no longer reports it, or reports it finished), as the kubelet keeps the mirror of a
//! terminating static pod. The pods' status goes to the mirror pods through the status sink
//! ([`mirror_of`]).
//!
//! [`StaticDefaults`] gives the manifest folder's pods what the kubelet's file source gives them
//! in cluster mode: the `<name>-<node>` name, the catch-all `NoExecute` toleration (the taint
//! manager never evicts a static pod) and `kubernetes.io/config.seen`, the time the agent first
//! saw the pod (RFC 3339 with nanoseconds), kept while the agent runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::pods::ApiPods;
use super::{sleep_or_cancel, ClusterError};
use crate::retry::Retry;
use crate::source::manifest::{FilePods, CONFIG_HASH};
use crate::status::StatusManager;

/// The annotation that marks a mirror pod; its value is the static pod's hash.
pub const CONFIG_MIRROR: &str = "kubernetes.io/config.mirror";
/// When the agent first saw a pod (the kubelet's `ConfigFirstSeenAnnotationKey`).
pub const CONFIG_SEEN: &str = "kubernetes.io/config.seen";

/// Whether `pod` (an API pod) is a mirror pod.
pub fn is_mirror(pod: &Pod) -> bool {
    annotation(pod, CONFIG_MIRROR).is_some()
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// The static pod's hash (`kubernetes.io/config.hash`); `None` for a pod not from a file.
pub(super) fn static_hash(pod: &Pod) -> Option<&str> {
    annotation(pod, CONFIG_HASH)
}

fn key(pod: &Pod) -> (String, String) {
    (
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// Names the manifest folder's pods as the kubelet names static pods: `<name>-<node>`.
pub fn rename(pods: &mut [Pod], node: &str) {
    let suffix = format!("-{}", node.to_lowercase());
    for pod in pods {
        if let Some(name) = pod.metadata.name.as_mut() {
            if !name.ends_with(&suffix) {
                name.push_str(&suffix);
            }
        }
    }
}

/// The kubelet's defaults for the manifest folder's pods in cluster mode; remembers when each
/// pod (by UID) was first seen.
#[derive(Default)]
pub struct StaticDefaults {
    seen: BTreeMap<String, String>,
}

impl StaticDefaults {
    /// Names `pods` as the kubelet names static pods, adds the catch-all `NoExecute`
    /// toleration where it is missing and the first-seen annotation. Pods no longer given are
    /// forgotten (one put back is seen anew, as by the kubelet).
    pub fn apply(&mut self, pods: &mut [Pod], node: &str, now: jiff::Timestamp) {
        rename(pods, node);
        let mut seen = BTreeMap::new();
        for pod in pods {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let at = self.seen.remove(&uid).unwrap_or_else(|| now.to_string());
            pod.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(CONFIG_SEEN.into(), at.clone());
            seen.insert(uid, at);
            let all = Toleration {
                operator: Some("Exists".into()),
                effect: Some("NoExecute".into()),
                ..Default::default()
            };
            let tolerations = pod
                .spec
                .get_or_insert_with(Default::default)
                .tolerations
                .get_or_insert_with(Vec::new);
            if !tolerations.contains(&all) {
                tolerations.push(all);
            }
        }
        self.seen = seen;
    }
}

/// The mirror pod of `static_pod` for creation: the same pod, without what the API assigns,
/// with the mirror annotation and the Node as its controller owner.
pub(super) fn mirror_pod(static_pod: &Pod, node: &str, node_uid: &str) -> Pod {
    let hash = static_hash(static_pod).unwrap_or_default().to_string();
    let meta = &static_pod.metadata;
    let mut annotations = meta.annotations.clone().unwrap_or_default();
    annotations.insert(CONFIG_MIRROR.into(), hash);
    let mut spec = static_pod.spec.clone().unwrap_or_default();
    spec.node_name = Some(node.to_string());
    Pod {
        metadata: ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            labels: meta.labels.clone(),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.to_string(),
                uid: node_uid.to_string(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The API's mirror pod of `static_pod`: same namespace and name, its hash, not being deleted.
/// `api` is the pods bound to this node.
pub(super) fn mirror_of<'a>(static_pod: &Pod, api: &'a ApiPods) -> Option<&'a Pod> {
    let hash = static_hash(static_pod)?;
    let want = key(static_pod);
    api.values().map(|p| &**p).find(|p| {
        annotation(p, CONFIG_MIRROR) == Some(hash)
            && p.metadata.deletion_timestamp.is_none()
            && key(p) == want
    })
}

/// One step of keeping the mirror pods.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Action {
    /// Create this mirror pod.
    Create(Box<Pod>),
    /// Delete this mirror pod (grace 0, its UID as precondition).
    Delete {
        namespace: String,
        name: String,
        uid: String,
        why: &'static str,
    },
}

/// The static pods (namespace, name) whose workers still report them unfinished: removed from
/// the manifest folder, they may still be stopping.
pub(super) fn stopping(status: &StatusManager) -> BTreeSet<(String, String)> {
    status
        .all()
        .into_iter()
        .filter(|r| !r.finished && static_hash(&r.desired).is_some())
        .map(|r| key(&r.desired))
        .collect()
}

/// What to do so that every static pod has exactly its mirror pod and no other mirror pod of
/// this node is left; the mirror of a removed static pod stays while it is in `stopping`.
/// Deletions of a name come before its creation.
pub(super) fn plan(
    statics: &[Arc<Pod>],
    api: &ApiPods,
    stopping: &BTreeSet<(String, String)>,
    node: &str,
    node_uid: &str,
) -> Vec<Action> {
    let wanted: BTreeMap<(String, String), &Pod> = statics
        .iter()
        .map(|p| &**p)
        .filter(|p| static_hash(p).is_some())
        .map(|p| (key(p), p))
        .collect();
    let mut actions = Vec::new();
    let mut present: BTreeSet<(String, String)> = BTreeSet::new();
    for mirror in api.values().filter(|p| is_mirror(p)) {
        let k = key(mirror);
        let why = match wanted.get(&k) {
            None if stopping.contains(&k) => None,
            None => Some("its static pod is gone"),
            Some(_) if mirror.metadata.deletion_timestamp.is_some() => Some("it is being deleted"),
            Some(s) if annotation(mirror, CONFIG_MIRROR) != static_hash(s) => {
                Some("its static pod changed")
            }
            Some(_) => None,
        };
        match why {
            Some(why) => actions.push(Action::Delete {
                namespace: k.0.clone(),
                name: k.1.clone(),
                uid: mirror.metadata.uid.clone().unwrap_or_default(),
                why,
            }),
            None => {
                present.insert(k);
            }
        }
    }
    for (k, pod) in &wanted {
        if !present.contains(k) {
            actions.push(Action::Create(Box::new(mirror_pod(pod, node, node_uid))));
        }
    }
    actions
}

/// What the mirror task follows.
pub(super) struct Inputs {
    /// The manifest folder's pods, named and defaulted for cluster mode.
    pub statics: watch::Receiver<FilePods>,
    pub api_pods: watch::Receiver<ApiPods>,
    pub synced: watch::Receiver<bool>,
    pub node_uid: watch::Receiver<Option<String>>,
    /// Whether a removed static pod is still stopping.
    pub status: StatusManager,
}

/// Keeps the mirror pods of `statics` until `token` is cancelled. Waits for the Node's UID (the
/// owner reference needs it) and for the first complete list of this node's pods.
pub(super) async fn run(
    client: kube::Client,
    node: String,
    inputs: Inputs,
    token: CancellationToken,
) {
    let Inputs {
        mut statics,
        mut api_pods,
        mut synced,
        mut node_uid,
        status,
    } = inputs;
    let mut status_changed = status.subscribe();
    tokio::select! {
        _ = token.cancelled() => return,
        r = synced.wait_for(|s| *s) => if r.is_err() { return },
    }
    let mut backoff = Retry::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut retry: Option<Duration> = None;
    loop {
        let uid = node_uid.borrow_and_update().clone();
        let pods = statics.borrow_and_update().clone();
        let api = api_pods.borrow_and_update().clone();
        status_changed.borrow_and_update();
        let still = stopping(&status);
        if let (Some(uid), Some(pods)) = (uid, pods) {
            let mut failed = false;
            for action in plan(&pods, &api, &still, &node, &uid) {
                if let Err(e) = apply(&client, &action).await {
                    tracing::warn!(error = %e, "keeping a mirror pod failed; retrying");
                    failed = true;
                }
            }
            retry = if failed {
                Some(backoff.fail())
            } else {
                backoff.reset();
                None
            };
        }
        let after_retry = async {
            match retry {
                Some(delay) => {
                    sleep_or_cancel(delay, &token).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = token.cancelled() => return,
            r = statics.changed() => if r.is_err() { return },
            r = api_pods.changed() => if r.is_err() { return },
            r = node_uid.changed() => if r.is_err() { return },
            // Only a change of the stopping static pods matters here.
            r = async {
                loop {
                    status_changed.changed().await?;
                    if stopping(&status) != still {
                        return Ok::<(), watch::error::RecvError>(());
                    }
                }
            } => if r.is_err() { return },
            _ = after_retry => {}
        }
    }
}

async fn apply(client: &kube::Client, action: &Action) -> Result<(), ClusterError> {
    match action {
        Action::Create(pod) => {
            let (ns, name) = key(pod);
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            match api.create(&PostParams::default(), pod).await {
                Ok(created) => {
                    tracing::info!(
                        pod = name,
                        ns,
                        uid = created.metadata.uid.as_deref().unwrap_or(""),
                        "mirror pod created"
                    );
                    Ok(())
                }
                // The watch has not shown it yet, or a pod that is no mirror holds the name:
                // the next change of the watch settles which.
                Err(kube::Error::Api(s)) if s.is_already_exists() => {
                    tracing::debug!(pod = name, ns, "mirror pod exists already");
                    Ok(())
                }
                Err(e) => Err(ClusterError::api("create", format!("pods/{ns}/{name}"), e)),
            }
        }
        Action::Delete {
            namespace,
            name,
            uid,
            why,
        } => {
            let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(name, &params).await {
                Ok(_) => {
                    tracing::info!(pod = name, ns = namespace, uid, why, "mirror pod deleted");
                    Ok(())
                }
                Err(e) => {
                    let e = ClusterError::api("delete", format!("pods/{namespace}/{name}"), e);
                    if e.is_not_found() || e.is_conflict() {
                        Ok(())
                    } else {
                        Err(e)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::sync::Arc;

    fn static_pod(name: &str, hash: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(format!("static-{hash}")),
                annotations: Some(
                    [
                        (
                            "kubernetes.io/config.source".to_string(),
                            "file".to_string(),
                        ),
                        (CONFIG_HASH.to_string(), hash.to_string()),
                    ]
                    .into(),
                ),
                creation_timestamp: Some(Time(jiff::Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            spec: Some(Default::default()),
            status: Some(Default::default()),
        }
    }

    fn mirror(name: &str, hash: &str, uid: &str) -> Pod {
        let mut p = mirror_pod(&static_pod(name, hash), "n1", "node-uid");
        p.metadata.uid = Some(uid.into());
        p
    }

    fn api(pods: Vec<Pod>) -> ApiPods {
        Arc::new(
            pods.into_iter()
                .map(|p| (p.metadata.uid.clone().unwrap(), Arc::new(p)))
                .collect(),
        )
    }

    fn none_stopping() -> BTreeSet<(String, String)> {
        BTreeSet::new()
    }

    #[test]
    fn the_mirror_of_a_removed_static_pod_stays_until_the_pod_has_stopped() {
        let there = api(vec![mirror("web-n1", "h1", "m1")]);
        let status = StatusManager::new();
        let mut running = static_pod("web-n1", "h1");
        running.metadata.uid = Some("static-h1".into());
        status.set(&Arc::new(running), Default::default());
        // The manifest is gone but the pod's containers are still stopping.
        assert!(plan(&[], &there, &stopping(&status), "n1", "node-uid").is_empty());
        // Stopped (its worker finished it, or forgot it): the mirror goes.
        status.finish("static-h1");
        assert!(matches!(
            &plan(&[], &there, &stopping(&status), "n1", "node-uid")[..],
            [Action::Delete { uid, why: "its static pod is gone", .. }] if uid == "m1"
        ));
        status.forget("static-h1");
        assert!(stopping(&status).is_empty());
        // API pods never hold a mirror back.
        let mut api_pod = static_pod("web-n1", "h1");
        api_pod.metadata.annotations = None;
        status.set(&Arc::new(api_pod), Default::default());
        assert!(stopping(&status).is_empty());
    }

    #[test]
    fn static_pods_get_the_kubelets_toleration_and_first_seen_time() {
        let mut defaults = StaticDefaults::default();
        let t1 = jiff::Timestamp::from_second(1_000).unwrap();
        let t2 = jiff::Timestamp::from_second(2_000).unwrap();
        let mut pods = vec![static_pod("etcd", "h")];
        defaults.apply(&mut pods, "n1", t1);
        let p = &pods[0];
        assert_eq!(p.metadata.name.as_deref(), Some("etcd-n1"));
        assert_eq!(
            p.metadata.annotations.as_ref().unwrap()[CONFIG_SEEN],
            "1970-01-01T00:16:40Z"
        );
        let all = Toleration {
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            ..Default::default()
        };
        assert_eq!(
            p.spec.as_ref().unwrap().tolerations,
            Some(vec![all.clone()])
        );
        // Seen again (the folder is read anew): the same time, one toleration.
        let mut again = vec![static_pod("etcd", "h")];
        again[0].spec.as_mut().unwrap().tolerations = Some(vec![all.clone()]);
        defaults.apply(&mut again, "n1", t2);
        assert_eq!(again[0], pods[0]);
        // Gone and back: seen anew.
        defaults.apply(&mut [], "n1", t2);
        let mut back = vec![static_pod("etcd", "h")];
        defaults.apply(&mut back, "n1", t2);
        assert_eq!(
            back[0].metadata.annotations.as_ref().unwrap()[CONFIG_SEEN],
            "1970-01-01T00:33:20Z"
        );
    }

    #[test]
    fn static_pods_are_named_after_the_node_once() {
        let mut pods = vec![static_pod("etcd", "h")];
        rename(&mut pods, "Nodelet-1");
        assert_eq!(pods[0].metadata.name.as_deref(), Some("etcd-nodelet-1"));
        rename(&mut pods, "nodelet-1");
        assert_eq!(pods[0].metadata.name.as_deref(), Some("etcd-nodelet-1"));
    }

    #[test]
    fn a_mirror_pod_is_what_node_restriction_admits() {
        let m = mirror_pod(&static_pod("web-n1", "abc"), "n1", "node-uid");
        let a = m.metadata.annotations.as_ref().unwrap();
        assert_eq!(a[CONFIG_MIRROR], "abc");
        assert_eq!(a[CONFIG_HASH], "abc");
        assert_eq!(a["kubernetes.io/config.source"], "file");
        assert_eq!(m.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
        let owners = m.metadata.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        let o = &owners[0];
        assert_eq!(
            (o.api_version.as_str(), o.kind.as_str(), o.name.as_str()),
            ("v1", "Node", "n1")
        );
        assert_eq!(o.uid, "node-uid");
        assert_eq!(o.controller, Some(true));
        assert_eq!(o.block_owner_deletion, None);
        // What the API assigns is left to it.
        assert!(m.metadata.uid.is_none());
        assert!(m.metadata.creation_timestamp.is_none());
        assert!(m.status.is_none());
        assert_eq!(m.metadata.name.as_deref(), Some("web-n1"));
    }

    #[test]
    fn a_missing_mirror_is_created_and_a_matching_one_left_alone() {
        let statics = [Arc::new(static_pod("web-n1", "h1"))];
        let none = api(vec![]);
        let actions = plan(&statics, &none, &none_stopping(), "n1", "node-uid");
        assert_eq!(
            actions,
            [Action::Create(Box::new(mirror_pod(
                &statics[0],
                "n1",
                "node-uid"
            )))]
        );
        let there = api(vec![mirror("web-n1", "h1", "m1")]);
        assert!(plan(&statics, &there, &none_stopping(), "n1", "node-uid").is_empty());
        assert_eq!(
            mirror_of(&statics[0], &there).and_then(|p| p.metadata.uid.as_deref()),
            Some("m1")
        );
    }

    #[test]
    fn stale_deleted_and_orphaned_mirrors_go_and_are_replaced() {
        let statics = [Arc::new(static_pod("web-n1", "h2"))];
        // The manifest changed: the old mirror is deleted, the new one created after it.
        let stale = api(vec![mirror("web-n1", "h1", "m1")]);
        let actions = plan(&statics, &stale, &none_stopping(), "n1", "node-uid");
        assert!(matches!(
            &actions[0],
            Action::Delete { uid, why: "its static pod changed", .. } if uid == "m1"
        ));
        assert!(matches!(&actions[1], Action::Create(_)));
        assert_eq!(actions.len(), 2);
        assert!(mirror_of(&statics[0], &stale).is_none(), "no status to it");

        // Someone deletes the mirror: it is finished off and made again.
        let mut deleting = mirror("web-n1", "h2", "m2");
        deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        let actions = plan(
            &statics,
            &api(vec![deleting]),
            &none_stopping(),
            "n1",
            "node-uid",
        );
        assert!(matches!(
            &actions[0],
            Action::Delete { uid, why: "it is being deleted", .. } if uid == "m2"
        ));
        assert!(matches!(&actions[1], Action::Create(_)));

        // The static pod is gone: its mirror goes; pods that are no mirrors are not touched.
        let mut other = static_pod("api-pod", "x");
        other.metadata.uid = Some("a1".into());
        let orphan = api(vec![mirror("old-n1", "h9", "m9"), other]);
        let actions = plan(&[], &orphan, &none_stopping(), "n1", "node-uid");
        assert_eq!(
            actions,
            [Action::Delete {
                namespace: "default".into(),
                name: "old-n1".into(),
                uid: "m9".into(),
                why: "its static pod is gone",
            }]
        );
    }

    use crate::cluster::fake_api::{until, FakeApi};
    use crate::cluster::pods;

    const MIRROR: &str = "/api/v1/namespaces/default/pods/web-n1";
    /// Catches a hang; paused time gets there at once.
    const HANG: Duration = Duration::from_secs(600);

    fn uid_of(pod: &serde_json::Value) -> String {
        pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The pod watch and the mirror task against `api`, as the cluster agent wires them, for
    /// the static pods sent on the first sender returned (the second holds the Node's UID).
    fn start(
        api: &FakeApi,
        token: &CancellationToken,
    ) -> (watch::Sender<FilePods>, watch::Sender<Option<String>>) {
        let (desired, _) = watch::channel(Vec::new());
        let (synced, synced_rx) = watch::channel(false);
        let (api_pods, api_pods_rx) = watch::channel(ApiPods::default());
        let out = pods::Outputs {
            desired,
            synced,
            api_pods,
        };
        tokio::spawn(pods::run(api.client(), "n1".into(), out, token.clone()));
        let (statics, statics_rx) = watch::channel(None);
        let (node_uid_tx, node_uid) = watch::channel(Some("node-uid".to_string()));
        let inputs = Inputs {
            statics: statics_rx,
            api_pods: api_pods_rx,
            synced: synced_rx,
            node_uid,
            status: StatusManager::new(),
        };
        tokio::spawn(run(api.client(), "n1".into(), inputs, token.clone()));
        (statics, node_uid_tx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_static_pod_keeps_a_mirror_pod_that_goes_with_it() {
        let api = FakeApi::new();
        let token = CancellationToken::new();
        let (statics, _node_uid) = start(&api, &token);
        statics.send_replace(Some(vec![Arc::new(static_pod("web-n1", "h1"))]));
        until("the mirror pod", HANG, || api.get(MIRROR).is_some()).await;
        let made = api.get(MIRROR).unwrap();
        assert_eq!(made["metadata"]["annotations"][CONFIG_MIRROR], "h1");
        assert_eq!(made["spec"]["nodeName"], "n1");
        let owner = &made["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["uid"], &owner["controller"]),
            (&"Node".into(), &"node-uid".into(), &true.into())
        );

        // Someone deletes the mirror pod (gracefully: the API marks it): the agent finishes
        // the deletion (grace 0, its UID) and makes it anew.
        let first = uid_of(&made);
        api.edit(MIRROR, |pod| {
            pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:30Z".into()
        });
        until("a new mirror pod", HANG, || {
            api.get(MIRROR).is_some_and(|p| uid_of(&p) != first)
        })
        .await;
        let deletes = api.requests_to("DELETE", MIRROR);
        assert_eq!(deletes.len(), 1);
        assert_eq!(deletes[0].body["gracePeriodSeconds"], 0);
        assert_eq!(deletes[0].body["preconditions"]["uid"], first.as_str());
        let second = api.get(MIRROR).unwrap();
        assert!(second["metadata"].get("deletionTimestamp").is_none());

        // The manifest changed: the mirror of the old hash is replaced.
        statics.send_replace(Some(vec![Arc::new(static_pod("web-n1", "h2"))]));
        until("the mirror of the new hash", HANG, || {
            api.get(MIRROR)
                .is_some_and(|p| p["metadata"]["annotations"][CONFIG_MIRROR] == "h2")
        })
        .await;
        let third = uid_of(&api.get(MIRROR).unwrap());
        let deletes = api.requests_to("DELETE", MIRROR);
        assert_eq!(deletes.len(), 2);
        assert_eq!(
            deletes[1].body["preconditions"]["uid"],
            uid_of(&second).as_str()
        );

        // The static pod goes (its worker reports nothing): so does its mirror, for good.
        statics.send_replace(Some(vec![]));
        until("the mirror pod gone", HANG, || api.get(MIRROR).is_none()).await;
        let deletes = api.requests_to("DELETE", MIRROR);
        assert_eq!(deletes.len(), 3);
        assert_eq!(deletes[2].body["preconditions"]["uid"], third.as_str());
        let creates = || api.requests_to("POST", "/api/v1/namespaces/default/pods");
        let made: Vec<u16> = creates()
            .iter()
            .map(|r| r.code)
            .filter(|c| *c == 201)
            .collect();
        assert_eq!(made.len(), 3, "one per mirror made");
        // A create before the watch showed the last one is refused (409), nothing more.
        assert!(creates().iter().all(|r| r.code == 201 || r.code == 409));
        let before = creates().len();
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(creates().len(), before, "no mirror without its static pod");
        assert!(api.get(MIRROR).is_none());
        token.cancel();
    }
}
