//! The merge of the pod sources into the one desired set the pod manager is given: the
//! manifest folder's pods (standalone pods, or static pods beside the API) and, in cluster
//! mode, the API's pods once it has listed. Pure: the wiring (`agent::sync_pods`) only waits
//! for the sources to change and hands the plan to the manager.
//!
//! Rules, as the kubelet's config merge has them:
//! - a file pod that disappears is stopped as gone (no status is wanted for it), before the
//!   pods that are present, so that a pod replaced under the same name stops before its
//!   successor may start; it is asked for again on every merge until its worker finishes;
//! - a static pod recovered from the last run whose manifest went while the agent was down
//!   stops as if removed now;
//! - an unchanged pod keeps the object its worker already holds (one copy per pod);
//! - until the API has listed (it may be unreachable), file pods run regardless, as the
//!   kubelet runs static pods (a control plane may be among them), and nothing is cleaned up.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::pod::{Deletion, Desired};

/// What the manager is to do with one merge.
#[derive(Debug)]
pub enum Plan {
    /// The whole desired set: every pod not in it stops.
    All(Vec<Desired>),
    /// These pods only; nothing else is touched.
    Each(Vec<Desired>),
}

/// The file pods last seen and the removed ones still stopping, by UID.
#[derive(Debug, Default)]
pub struct SourceMerge {
    previous: BTreeMap<String, Arc<Pod>>,
    removed: BTreeMap<String, Arc<Pod>>,
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

impl SourceMerge {
    /// `recovered_statics`: the static pods the last run had running.
    pub fn new(recovered_statics: Vec<Pod>) -> Self {
        Self {
            previous: BTreeMap::new(),
            removed: recovered_statics
                .into_iter()
                .map(|p| (uid(&p), Arc::new(p)))
                .collect(),
        }
    }

    /// The plan for the file pods `files` and the API's set, `None` while it has not listed
    /// (standalone passes an empty set: nothing but the files is wanted).
    pub fn merge(&mut self, files: &[Arc<Pod>], api: Option<Vec<Desired>>) -> Plan {
        let now: BTreeMap<String, Arc<Pod>> = files
            .iter()
            .map(|p| {
                let uid = uid(p);
                let pod = match self.previous.get(&uid) {
                    Some(old) if Arc::ptr_eq(old, p) || **old == **p => old.clone(),
                    _ => p.clone(),
                };
                (uid, pod)
            })
            .collect();
        for (uid, pod) in std::mem::take(&mut self.previous) {
            if !now.contains_key(&uid) {
                self.removed.insert(uid, pod);
            }
        }
        self.removed.retain(|uid, _| !now.contains_key(uid));
        let files = self
            .removed
            .values()
            .map(|pod| Desired {
                pod: pod.clone(),
                deletion: Some(Deletion {
                    grace: crate::pod::machine::grace(pod, None),
                    gone: true,
                }),
            })
            .chain(now.values().map(|pod| Desired {
                pod: pod.clone(),
                deletion: None,
            }))
            .collect::<Vec<_>>();
        self.previous = now;
        match api {
            Some(mut desired) => {
                desired.extend(files);
                Plan::All(desired)
            }
            None => Plan::Each(files),
        }
    }

    /// The worker of `uid` has finished: a removed pod is no longer asked to stop.
    pub fn finished(&mut self, uid: &str) {
        self.removed.remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::time::Duration;

    fn pod(uid: &str, grace: i64) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(format!("pod-{uid}")),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                termination_grace_period_seconds: Some(grace),
                ..Default::default()
            }),
            status: None,
        })
    }

    /// (uid, Some(grace) when asked to stop as gone) in plan order.
    fn shape(desired: &[Desired]) -> Vec<(String, Option<Duration>)> {
        desired
            .iter()
            .map(|d| {
                let stop = d.deletion.as_ref().map(|del| {
                    assert!(del.gone, "a file pod stops as gone");
                    del.grace
                });
                (uid(&d.pod), stop)
            })
            .collect()
    }

    fn each(plan: Plan) -> Vec<Desired> {
        match plan {
            Plan::Each(d) => d,
            Plan::All(d) => panic!("expected the file pods only, got the whole set {d:?}"),
        }
    }

    fn all(plan: Plan) -> Vec<Desired> {
        match plan {
            Plan::All(d) => d,
            Plan::Each(d) => panic!("expected the whole set, got the file pods only {d:?}"),
        }
    }

    #[test]
    fn a_removed_file_pod_stops_first_and_until_its_worker_finishes() {
        let mut m = SourceMerge::default();
        let (a, b) = (pod("a", 30), pod("b", 7));
        all(m.merge(&[a.clone(), b.clone()], Some(vec![])));
        let plan = shape(&all(m.merge(std::slice::from_ref(&a), Some(vec![]))));
        assert_eq!(
            plan,
            [
                ("b".into(), Some(Duration::from_secs(7))),
                ("a".into(), None)
            ]
        );
        // Still stopping: asked again on the next merge.
        let again = shape(&all(m.merge(std::slice::from_ref(&a), Some(vec![]))));
        assert_eq!(again, plan);
        m.finished("b");
        let after = shape(&all(m.merge(std::slice::from_ref(&a), Some(vec![]))));
        assert_eq!(after, [("a".to_string(), None)]);
    }

    #[test]
    fn a_removed_pod_put_back_runs_again() {
        let mut m = SourceMerge::default();
        let a = pod("a", 30);
        all(m.merge(std::slice::from_ref(&a), Some(vec![])));
        all(m.merge(&[], Some(vec![])));
        let back = shape(&all(m.merge(std::slice::from_ref(&a), Some(vec![]))));
        assert_eq!(back, [("a".to_string(), None)]);
    }

    #[test]
    fn a_recovered_static_pod_missing_from_the_files_stops_and_a_present_one_runs() {
        let mut m = SourceMerge::new(vec![
            Pod::clone(&pod("gone", 5)),
            Pod::clone(&pod("kept", 5)),
        ]);
        let plan = shape(&each(m.merge(&[pod("kept", 5)], None)));
        assert_eq!(
            plan,
            [
                ("gone".into(), Some(Duration::from_secs(5))),
                ("kept".into(), None)
            ]
        );
    }

    #[test]
    fn an_unchanged_pod_keeps_its_object_and_a_changed_one_gets_a_new_one() {
        let mut m = SourceMerge::default();
        let a = pod("a", 30);
        let first = each(m.merge(std::slice::from_ref(&a), None));
        let same = each(m.merge(std::slice::from_ref(&a), None));
        assert!(
            Arc::ptr_eq(&first[0].pod, &a),
            "the folder's own object is handed on"
        );
        assert!(Arc::ptr_eq(&first[0].pod, &same[0].pod));
        // The same content read again (a new object) keeps the object the worker holds.
        let reread = each(m.merge(&[pod("a", 30)], None));
        assert!(Arc::ptr_eq(&first[0].pod, &reread[0].pod));
        let edited = pod("a", 31);
        let changed = each(m.merge(std::slice::from_ref(&edited), None));
        assert!(Arc::ptr_eq(&changed[0].pod, &edited));
    }

    #[test]
    fn the_api_set_comes_first_and_only_a_listed_api_makes_a_whole_set() {
        let mut m = SourceMerge::default();
        let api = Desired {
            pod: pod("from-api", 30),
            deletion: None,
        };
        assert_eq!(
            shape(&each(m.merge(&[pod("file", 30)], None))),
            [("file".to_string(), None)]
        );
        assert_eq!(
            shape(&all(m.merge(&[pod("file", 30)], Some(vec![api])))),
            [("from-api".to_string(), None), ("file".to_string(), None)]
        );
    }
}
