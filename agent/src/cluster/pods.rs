//! The API pod source: list+watch of the pods bound to this node (`spec.nodeName=<node>`).
//!
//! [`PodSet`] is the pure state: watcher events in, the published set out. A relist (the
//! watcher's Init … InitDone) is buffered and replaces the set only once complete, so a partial
//! list never makes running pods look deleted. The task in [`run`] owns the watcher; on any
//! error it drops it and starts a new one, so every reconnect relists before anything else.
//! A deletion whose deadline (`deletionTimestamp`) passed while the agent was away is given no
//! grace: the pod is killed at once.
//!
//! Each pod is kept once, trimmed on receipt (managedFields, half of an API pod's memory, is
//! dropped), behind an `Arc` that the published set, the desired pods, the workers and the
//! status manager share. The published map is copied on write: an event copies it only while
//! a reader still holds the previous one, and then only the map's nodes, never the pods.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::pod::{Deletion, Desired};

/// The grace a pod gets when neither the deletion nor the spec says (the API's default).
const DEFAULT_GRACE_SECONDS: i64 = 30;

/// The API's pods bound to this node, keyed by UID, as last completely known.
pub(super) type ApiPods = Arc<BTreeMap<String, Arc<Pod>>>;

/// The source's output channels.
pub(super) struct Outputs {
    pub desired: watch::Sender<Vec<Desired>>,
    pub synced: watch::Sender<bool>,
    /// The same pods as raw objects, for the object tracker and the status sink.
    pub api_pods: watch::Sender<ApiPods>,
}

/// The pods known from the watch, plus a relist being collected.
#[derive(Debug, Default)]
pub(super) struct PodSet {
    pods: ApiPods,
    relisting: Option<BTreeMap<String, Arc<Pod>>>,
    synced: bool,
}

impl PodSet {
    /// Applies one watcher event; returns true when the published set changed.
    pub fn apply(&mut self, event: Event<Pod>) -> bool {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(pod) => {
                if let (Some(list), Some(uid)) = (self.relisting.as_mut(), uid(&pod)) {
                    list.insert(uid, trimmed(pod));
                }
                false
            }
            Event::InitDone => {
                if let Some(list) = self.relisting.take() {
                    self.pods = Arc::new(list);
                }
                self.synced = true;
                true
            }
            Event::Apply(pod) => {
                let Some(uid) = uid(&pod) else { return false };
                let pod = trimmed(pod);
                if let Some(list) = self.relisting.as_mut() {
                    list.insert(uid.clone(), pod.clone());
                }
                Arc::make_mut(&mut self.pods).insert(uid, pod);
                true
            }
            Event::Delete(pod) => {
                let Some(uid) = uid(&pod) else { return false };
                if let Some(list) = self.relisting.as_mut() {
                    list.remove(&uid);
                }
                if !self.pods.contains_key(&uid) {
                    return false;
                }
                Arc::make_mut(&mut self.pods).remove(&uid);
                true
            }
        }
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn pods(&self) -> &ApiPods {
        &self.pods
    }

    /// The desired set: every known pod but mirror pods (the API's copies of static pods,
    /// which run from the manifest folder), with a deletion for those the API is deleting.
    pub fn desired(&self, now: jiff::Timestamp) -> Vec<Desired> {
        self.pods
            .values()
            .filter(|p| !super::mirror::is_mirror(p))
            .map(|p| desired(p, now))
            .collect()
    }
}

fn uid(pod: &Pod) -> Option<String> {
    pod.metadata.uid.clone().filter(|u| !u.is_empty())
}

/// The pod as the agent keeps it: without managedFields, which nothing on the node reads.
fn trimmed(mut pod: Pod) -> Arc<Pod> {
    pod.metadata.managed_fields = None;
    Arc::new(pod)
}

/// One API pod as a desired pod at `now`: `deletionTimestamp` set means a graceful deletion
/// with the grace the API recorded (or the spec's, or 30 s). The API sets `deletionTimestamp`
/// to the deletion's time plus its grace; once that is past (the agent was down meanwhile, as
/// when the control plane evicts the pods of an unreachable node) no grace is left: the pod is
/// killed at once.
pub(super) fn desired(pod: &Arc<Pod>, now: jiff::Timestamp) -> Desired {
    let deletion = pod.metadata.deletion_timestamp.as_ref().map(|at| {
        if at.0 <= now {
            return Deletion {
                grace: Duration::ZERO,
                gone: false,
            };
        }
        let seconds = pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                pod.spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(DEFAULT_GRACE_SECONDS);
        Deletion {
            grace: Duration::from_secs(seconds.max(0) as u64),
            gone: false,
        }
    });
    Desired {
        pod: pod.clone(),
        deletion,
    }
}

/// Watches this node's pods until `token` is cancelled, publishing every complete change.
pub(super) async fn run(
    client: kube::Client,
    node: String,
    out: Outputs,
    token: CancellationToken,
) {
    let api: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let mut set = PodSet::default();
    super::objects::rewatch(
        || watcher::watcher(api.clone(), watcher::Config::default().fields(&selector)),
        |event| {
            let done = matches!(event, Event::InitDone);
            if set.apply(event) {
                publish(&set, &out);
            }
            if done {
                tracing::info!(node, pods = set.pods().len(), "pods of this node listed");
            }
            done
        },
        |e| tracing::warn!(node, error = %e, "pod watch failed; relisting after back-off"),
        &token,
    )
    .await;
}

/// Publishes the set, then `synced`: whoever sees `synced` true (and reads `desired` after)
/// gets the complete first list, never the empty set from before it.
fn publish(set: &PodSet, out: &Outputs) {
    out.api_pods.send_replace(set.pods().clone());
    out.desired
        .send_replace(set.desired(jiff::Timestamp::now()));
    if set.synced() {
        out.synced.send_if_modified(|s| !std::mem::replace(s, true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(uid: &str, name: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn uids(set: &PodSet) -> Vec<String> {
        set.desired(jiff::Timestamp::UNIX_EPOCH)
            .into_iter()
            .map(|d| d.pod.metadata.uid.clone().unwrap())
            .collect()
    }

    #[test]
    fn a_relist_is_published_only_when_complete() {
        let mut set = PodSet::default();
        assert!(!set.apply(Event::Init));
        assert!(!set.apply(Event::InitApply(pod("a", "a"))));
        assert!(!set.synced());
        assert!(set.desired(jiff::Timestamp::UNIX_EPOCH).is_empty());
        assert!(set.apply(Event::InitDone));
        assert!(set.synced());
        assert_eq!(uids(&set), ["a"]);

        // A reconnect relists: the old set stays until the new list is complete.
        assert!(!set.apply(Event::Init));
        assert!(!set.apply(Event::InitApply(pod("b", "b"))));
        assert_eq!(uids(&set), ["a"]);
        assert!(set.apply(Event::InitDone));
        assert_eq!(uids(&set), ["b"], "a pod deleted meanwhile is absent");
    }

    #[test]
    fn watch_events_add_replace_and_remove_by_uid() {
        let mut set = PodSet::default();
        set.apply(Event::Init);
        set.apply(Event::InitDone);
        assert!(set.apply(Event::Apply(pod("a", "web-0"))));
        // A same-name pod with a new UID is another pod.
        assert!(set.apply(Event::Apply(pod("b", "web-0"))));
        assert_eq!(uids(&set), ["a", "b"]);
        assert!(set.apply(Event::Delete(pod("a", "web-0"))));
        assert_eq!(uids(&set), ["b"]);
        assert!(!set.apply(Event::Delete(pod("zz", "gone"))));
        assert!(!set.apply(Event::Apply(Pod::default())), "no UID, ignored");
    }

    #[test]
    fn mirror_pods_are_listed_but_never_desired() {
        let mut set = PodSet::default();
        set.apply(Event::Init);
        set.apply(Event::InitApply(pod("a", "web")));
        let mut m = pod("m", "etcd-node");
        m.metadata.annotations = Some(
            [(
                super::super::mirror::CONFIG_MIRROR.to_string(),
                "h".to_string(),
            )]
            .into(),
        );
        set.apply(Event::InitApply(m));
        set.apply(Event::InitDone);
        assert_eq!(
            set.pods().len(),
            2,
            "the status sink and mirror keeper see it"
        );
        assert_eq!(uids(&set), ["a"], "the pod manager does not run it");
    }

    #[test]
    fn a_deletion_timestamp_becomes_a_graceful_deletion() {
        let mut p = pod("a", "a");
        let before = jiff::Timestamp::UNIX_EPOCH;
        let desired = |p: &Pod| desired(&Arc::new(p.clone()), before);
        assert!(desired(&p).deletion.is_none());
        p.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::from_second(60).unwrap()));
        p.metadata.deletion_grace_period_seconds = Some(7);
        let d = desired(&p).deletion.unwrap();
        assert_eq!(d.grace, Duration::from_secs(7));
        assert!(!d.gone);

        p.metadata.deletion_grace_period_seconds = None;
        p.spec = Some(PodSpec {
            termination_grace_period_seconds: Some(12),
            ..Default::default()
        });
        assert_eq!(desired(&p).deletion.unwrap().grace, Duration::from_secs(12));
        p.spec = None;
        assert_eq!(desired(&p).deletion.unwrap().grace, Duration::from_secs(30));
        p.metadata.deletion_grace_period_seconds = Some(-1);
        assert_eq!(desired(&p).deletion.unwrap().grace, Duration::ZERO);
    }

    #[test]
    fn a_deletion_whose_deadline_passed_leaves_no_grace() {
        let mut p = pod("a", "a");
        p.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::from_second(60).unwrap()));
        p.metadata.deletion_grace_period_seconds = Some(30);
        let p = Arc::new(p);
        let at = |s| desired(&p, jiff::Timestamp::from_second(s).unwrap());
        assert_eq!(at(30).deletion.unwrap().grace, Duration::from_secs(30));
        assert_eq!(at(59).deletion.unwrap().grace, Duration::from_secs(30));
        let late = at(60).deletion.unwrap();
        assert_eq!(late.grace, Duration::ZERO);
        assert!(
            !late.gone,
            "still the API's to finish with the final DELETE"
        );
        assert_eq!(at(600).deletion.unwrap().grace, Duration::ZERO);
    }
}
