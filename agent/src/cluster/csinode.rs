//! The node's CSINode (storage.k8s.io/v1, named after the node and owned by its Node): one
//! `spec.drivers` entry per CSI driver registered on this node — its name, the nodeID and
//! topology keys from NodeGetInfo, and `allocatable.count` from max_volumes_per_node when the
//! driver sets a limit — kept in step with the volume manager's plugin registry. A driver whose
//! registration socket goes away loses its entry. The Node authorizer and NodeRestriction let
//! a node create and update its own CSINode and no other.
//!
//! The task owns nothing but the last write: it re-reads the object before each write, writes
//! only on a difference, and re-checks every minute (a CSINode garbage-collected with a Node
//! that was deleted and registered again is created anew, owned by the new Node).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::{CSINode, CSINodeDriver, CSINodeSpec, VolumeNodeResources};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ClusterError;
use crate::retry::Retry;
use crate::volume::csi::{Driver, Registered};

/// How often the CSINode is re-checked when nothing changed.
const RESYNC: Duration = Duration::from_secs(60);

/// The CSINode as this node wants it: `current` (when there is one) with the Node as its
/// owner and exactly `drivers` as its entries, sorted by name.
pub(super) fn desired(
    current: Option<CSINode>,
    node: &str,
    node_uid: &str,
    drivers: &BTreeMap<String, Driver>,
) -> CSINode {
    let mut csinode = current.unwrap_or_else(|| CSINode {
        metadata: ObjectMeta {
            name: Some(node.to_string()),
            ..Default::default()
        },
        ..Default::default()
    });
    super::owned_by_node(&mut csinode.metadata, node, node_uid);
    csinode.spec = CSINodeSpec {
        drivers: drivers.values().map(entry).collect(),
    };
    csinode
}

/// One driver's entry.
fn entry(driver: &Driver) -> CSINodeDriver {
    let info = &driver.node;
    CSINodeDriver {
        name: driver.name.clone(),
        node_id: info.node_id.clone(),
        topology_keys: (!info.topology_keys.is_empty()).then(|| info.topology_keys.clone()),
        allocatable: (info.max_volumes > 0).then(|| VolumeNodeResources {
            count: Some(i32::try_from(info.max_volumes).unwrap_or(i32::MAX)),
        }),
    }
}

/// Keeps the CSINode in step with `drivers` until `token` is cancelled. Nothing is written
/// before the registry's first full pass (an empty set before it would drop every entry).
pub(super) async fn run(
    client: kube::Client,
    node: String,
    mut drivers: watch::Receiver<Registered>,
    token: CancellationToken,
) {
    let csinodes: Api<CSINode> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client);
    let mut backoff = Retry::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let registered = drivers.borrow_and_update().clone();
        let delay = if !registered.listed {
            RESYNC
        } else {
            match sync(&csinodes, &nodes, &node, &registered.drivers).await {
                Ok(()) => {
                    backoff.reset();
                    RESYNC
                }
                Err(e) => {
                    let delay = backoff.fail();
                    tracing::warn!(node, error = %e, ?delay, "updating the CSINode failed");
                    delay
                }
            }
        };
        tokio::select! {
            _ = token.cancelled() => return,
            changed = drivers.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One read-compare-write of the CSINode.
async fn sync(
    csinodes: &Api<CSINode>,
    nodes: &Api<Node>,
    node: &str,
    drivers: &BTreeMap<String, Driver>,
) -> Result<(), ClusterError> {
    let object = format!("csinodes/{node}");
    let current = csinodes
        .get_opt(node)
        .await
        .map_err(|e| ClusterError::api("get", &object, e))?;
    let node_uid = nodes
        .get(node)
        .await
        .map_err(|e| ClusterError::api("get", format!("nodes/{node}"), e))?
        .metadata
        .uid
        .unwrap_or_default();
    let want = desired(current.clone(), node, &node_uid, drivers);
    let pp = PostParams::default();
    match current {
        Some(current) if current == want => return Ok(()),
        Some(_) => csinodes
            .replace(node, &pp, &want)
            .await
            .map_err(|e| ClusterError::api("replace", &object, e))?,
        None => csinodes
            .create(&pp, &want)
            .await
            .map_err(|e| ClusterError::api("create", &object, e))?,
    };
    let names: Vec<&str> = drivers.keys().map(String::as_str).collect();
    tracing::info!(node, drivers = ?names, "CSINode updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::csi::NodeInfo;

    fn driver(name: &str, node_id: &str, max: i64, keys: &[&str]) -> Driver {
        Driver {
            name: name.into(),
            endpoint: "/csi.sock".into(),
            registration: "/reg.sock".into(),
            versions: vec!["1.0.0".into()],
            node: NodeInfo {
                node_id: node_id.into(),
                max_volumes: max,
                topology_keys: keys.iter().map(|k| k.to_string()).collect(),
            },
        }
    }

    #[test]
    fn entries_follow_the_registered_drivers_and_the_node_owns_the_object() {
        let mut drivers = BTreeMap::new();
        drivers.insert("b.csi".into(), driver("b.csi", "n-b", 0, &[]));
        drivers.insert(
            "a.csi".into(),
            driver("a.csi", "n-a", 12, &["topology.a/zone"]),
        );
        let made = desired(None, "node-1", "uid-1", &drivers);
        assert_eq!(made.metadata.name.as_deref(), Some("node-1"));
        let owners = made.metadata.owner_references.clone().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].uid.as_str()),
            ("Node", "uid-1")
        );
        let d = &made.spec.drivers;
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].name.as_str(), d[0].node_id.as_str()),
            ("a.csi", "n-a")
        );
        assert_eq!(d[0].allocatable.as_ref().unwrap().count, Some(12));
        assert_eq!(
            d[0].topology_keys.as_deref(),
            Some(&["topology.a/zone".to_string()][..])
        );
        assert!(d[1].allocatable.is_none() && d[1].topology_keys.is_none());

        // A driver gone drops its entry; a Node registered again owns the object anew; what
        // the API set (resourceVersion) is kept for the update.
        let mut current = made;
        current.metadata.resource_version = Some("7".into());
        drivers.remove("a.csi");
        let next = desired(Some(current), "node-1", "uid-2", &drivers);
        assert_eq!(next.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(next.spec.drivers.len(), 1);
        assert_eq!(next.spec.drivers[0].name, "b.csi");
        let owners = next.metadata.owner_references.unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, "uid-2");
    }

    use crate::cluster::fake_api::{until, FakeApi};

    const CSINODE: &str = "/apis/storage.k8s.io/v1/csinodes/n1";
    const CSINODES: &str = "/apis/storage.k8s.io/v1/csinodes";
    /// Catches a hang; paused time gets there at once.
    const HANG: Duration = Duration::from_secs(600);

    fn entries(api: &FakeApi) -> Vec<(String, String)> {
        let csinode = api.get(CSINODE).unwrap_or_default();
        csinode["spec"]["drivers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let field = |k: &str| d[k].as_str().unwrap_or_default().to_string();
                (field("name"), field("nodeID"))
            })
            .collect()
    }

    fn registered(drivers: &[Driver]) -> Registered {
        Registered {
            listed: true,
            drivers: drivers
                .iter()
                .map(|d| (d.name.clone(), d.clone()))
                .collect(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn registered_drivers_are_written_to_the_csinode_made_when_absent() {
        let api = FakeApi::new();
        api.put(
            "/api/v1/nodes/n1",
            serde_json::json!({ "metadata": { "uid": "node-uid" } }),
        );
        let (tx, rx) = watch::channel(Registered::default());
        let token = CancellationToken::new();
        let task = tokio::spawn(run(api.client(), "n1".into(), rx, token.clone()));
        // Before the registry's first pass nothing is written.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(api.requests().is_empty(), "{:?}", api.requests());

        let a = driver("a.csi", "node-a", 8, &["topology.a/zone"]);
        tx.send_replace(registered(std::slice::from_ref(&a)));
        until("the CSINode created", HANG, || api.get(CSINODE).is_some()).await;
        assert_eq!(api.requests_to("POST", CSINODES).len(), 1);
        let made = api.get(CSINODE).unwrap();
        assert_eq!(made["spec"]["drivers"][0]["allocatable"]["count"], 8);
        assert_eq!(
            made["spec"]["drivers"][0]["topologyKeys"],
            serde_json::json!(["topology.a/zone"])
        );
        let owner = &made["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["uid"]),
            (&"Node".into(), &"node-uid".into())
        );

        // A second driver registers: the existing object is updated, not made again.
        let b = driver("b.csi", "node-b", 0, &[]);
        tx.send_replace(registered(&[a.clone(), b]));
        until("the second driver", HANG, || entries(&api).len() == 2).await;
        assert_eq!(
            entries(&api),
            [
                ("a.csi".to_string(), "node-a".to_string()),
                ("b.csi".to_string(), "node-b".to_string())
            ]
        );
        assert_eq!(api.requests_to("PUT", CSINODE).len(), 1);
        assert_eq!(api.requests_to("POST", CSINODES).len(), 1);
        // Nothing changes: the re-checks write nothing.
        tokio::time::sleep(RESYNC * 3).await;
        assert_eq!(api.requests_to("PUT", CSINODE).len(), 1);

        // Garbage-collected with a Node registered again: made anew at the next re-check,
        // owned by the new Node.
        api.remove(CSINODE);
        api.edit("/api/v1/nodes/n1", |node| {
            node["metadata"]["uid"] = "node-uid-2".into()
        });
        tokio::time::sleep(RESYNC).await;
        until("the CSINode made anew", HANG, || api.get(CSINODE).is_some()).await;
        let made = api.get(CSINODE).unwrap();
        assert_eq!(made["metadata"]["ownerReferences"][0]["uid"], "node-uid-2");
        assert_eq!(entries(&api).len(), 2);

        // The driver goes away: its entry goes.
        tx.send_replace(registered(&[a]));
        until("the entry dropped", HANG, || entries(&api).len() == 1).await;
        assert_eq!(entries(&api)[0].0, "a.csi");
        token.cancel();
        task.await.unwrap();
    }
}
