//! The node heartbeat: a Lease named after the node in `kube-node-lease`, 40 s long, renewed
//! every 10 s. The Lease is created once the Node is registered and is owned by the Node (it
//! goes when the Node is deleted; a Node registered again becomes its owner). Failed renewals are retried from 200 ms doubling to 7 s, and
//! re-read the Lease first (a conflict means someone else wrote it).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{sleep_or_cancel, ClusterError};
use crate::retry::Retry;

pub(super) const NAMESPACE: &str = "kube-node-lease";
pub(super) const DURATION_SECONDS: i32 = 40;
pub(super) const RENEW_INTERVAL: Duration = Duration::from_secs(10);

/// The Lease as this node wants it, renewed at `now`, keeping what the API already holds.
pub(super) fn renewed(
    current: Option<Lease>,
    node: &str,
    node_uid: &str,
    now: jiff::Timestamp,
) -> Lease {
    let mut lease = current.unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(node.to_string()),
            namespace: Some(NAMESPACE.to_string()),
            ..Default::default()
        },
        ..Default::default()
    });
    super::owned_by_node(&mut lease.metadata, node, node_uid);
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(node) {
        spec.holder_identity = Some(node.to_string());
        spec.acquire_time = Some(MicroTime(now));
    }
    spec.lease_duration_seconds = Some(DURATION_SECONDS);
    spec.renew_time = Some(MicroTime(now));
    lease
}

/// Renews the Lease until `token` is cancelled.
pub(super) async fn run(
    client: kube::Client,
    node: String,
    mut node_uid: watch::Receiver<Option<String>>,
    token: CancellationToken,
) {
    tokio::select! {
        _ = token.cancelled() => return,
        uid = node_uid.wait_for(|u| u.is_some()) => if uid.is_err() { return },
    }
    let api: Api<Lease> = Api::namespaced(client, NAMESPACE);
    let mut current: Option<Lease> = None;
    let mut backoff = Retry::new(Duration::from_millis(200), Duration::from_secs(7));
    loop {
        // The latest UID: a Node registered again (after it was deleted) owns the Lease anew.
        let uid = node_uid.borrow().clone().unwrap_or_default();
        let delay = match renew(&api, current.take(), &node, &uid).await {
            Ok(lease) => {
                current = Some(lease);
                backoff.reset();
                RENEW_INTERVAL
            }
            Err(e) => {
                let delay = backoff.fail();
                tracing::warn!(node, error = %e, ?delay, "renewing the node lease failed");
                delay
            }
        };
        if !sleep_or_cancel(delay, &token).await {
            return;
        }
    }
}

async fn renew(
    api: &Api<Lease>,
    current: Option<Lease>,
    node: &str,
    uid: &str,
) -> Result<Lease, ClusterError> {
    let object = format!("leases/{NAMESPACE}/{node}");
    let current = match current {
        Some(lease) => Some(lease),
        None => api
            .get_opt(node)
            .await
            .map_err(|e| ClusterError::api("get", &object, e))?,
    };
    let exists = current.is_some();
    let lease = renewed(current, node, uid, jiff::Timestamp::now());
    let pp = PostParams::default();
    if exists {
        api.replace(node, &pp, &lease)
            .await
            .map_err(|e| ClusterError::api("update", object, e))
    } else {
        api.create(&pp, &lease)
            .await
            .map_err(|e| ClusterError::api("create", object, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_lease_is_held_by_the_node_and_owned_by_it() {
        let now = jiff::Timestamp::from_second(1_000).unwrap();
        let l = renewed(None, "n1", "uid-1", now);
        assert_eq!(l.metadata.name.as_deref(), Some("n1"));
        assert_eq!(l.metadata.namespace.as_deref(), Some(NAMESPACE));
        let owners = l.metadata.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].uid.as_str()),
            ("Node", "uid-1")
        );
        let spec = l.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("n1"));
        assert_eq!(spec.lease_duration_seconds, Some(40));
        assert_eq!(spec.renew_time, Some(MicroTime(now)));
        assert_eq!(spec.acquire_time, Some(MicroTime(now)));
    }

    #[test]
    fn renewing_moves_only_the_renew_time() {
        let t1 = jiff::Timestamp::from_second(1_000).unwrap();
        let t2 = jiff::Timestamp::from_second(1_010).unwrap();
        let mut first = renewed(None, "n1", "uid-1", t1);
        first.metadata.resource_version = Some("42".into());
        let second = renewed(Some(first), "n1", "uid-1", t2);
        assert_eq!(second.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(second.metadata.owner_references.as_ref().unwrap().len(), 1);
        let spec = second.spec.unwrap();
        assert_eq!(spec.acquire_time, Some(MicroTime(t1)));
        assert_eq!(spec.renew_time, Some(MicroTime(t2)));
    }

    #[test]
    fn a_recreated_node_takes_the_lease_over() {
        let t = jiff::Timestamp::from_second(1_000).unwrap();
        let old = renewed(None, "n1", "old-uid", t);
        let new = renewed(Some(old), "n1", "new-uid", t);
        let owners = new.metadata.owner_references.unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, "new-uid");
    }

    use crate::cluster::fake_api::{until, FakeApi};

    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1";
    /// Catches a hang; paused time gets there at once.
    const HANG: Duration = Duration::from_secs(600);

    fn renewals(api: &FakeApi) -> usize {
        let puts = api.requests_to("PUT", LEASE);
        puts.iter().filter(|r| r.code == 200).count()
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_is_made_renewed_and_taken_back_after_a_conflict() {
        let api = FakeApi::new();
        let (uid_tx, uid) = watch::channel(None);
        let token = CancellationToken::new();
        let task = tokio::spawn(run(api.client(), "n1".into(), uid, token.clone()));
        // Nothing before the Node is registered (the owner reference needs its UID).
        tokio::time::sleep(RENEW_INTERVAL * 2).await;
        assert!(api.requests().is_empty());
        uid_tx.send_replace(Some("node-uid".into()));
        until("the lease", HANG, || api.get(LEASE).is_some()).await;
        let lease = api.get(LEASE).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "n1");
        assert_eq!(lease["spec"]["leaseDurationSeconds"], DURATION_SECONDS);
        assert_eq!(lease["metadata"]["ownerReferences"][0]["uid"], "node-uid");
        until("two renewals", HANG, || renewals(&api) >= 2).await;

        // Someone else writes the Lease: the renewal with the old resourceVersion is refused
        // (409), the Lease is read again and the node holds it again.
        api.edit(LEASE, |lease| {
            lease["spec"]["holderIdentity"] = "other".into()
        });
        until("a refused renewal", HANG, || {
            api.requests_to("PUT", LEASE).iter().any(|r| r.code == 409)
        })
        .await;
        until("the node holds the lease again", HANG, || {
            api.get(LEASE).unwrap()["spec"]["holderIdentity"] == "n1"
        })
        .await;
        let requests = api.requests();
        let refused = requests.iter().position(|r| r.code == 409).unwrap();
        assert_eq!(
            (
                requests[refused + 1].method.as_str(),
                requests[refused + 2].method.as_str()
            ),
            ("GET", "PUT"),
            "{requests:?}"
        );
        token.cancel();
        task.await.unwrap();
    }
}
