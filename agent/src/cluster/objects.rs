//! The objects this node's pods reference: ConfigMaps, Secrets, PersistentVolumeClaims and the
//! PersistentVolumes bound to those claims, read through the API with the node's identity.
//!
//! The Node authorizer lets a node read only objects a pod bound to it references, and only one
//! by one: ConfigMaps and Secrets are followed with a per-object watch (`metadata.name` field
//! selector), claims and volumes (GET only) are polled. One task per referenced object; it is
//! started when the first pod refers to the object and stopped (and the object dropped from the
//! store) when the last one goes; what a pod references is `store::refs`. The Secrets a bound
//! CSI volume references (nodeStageSecretRef, nodePublishSecretRef) are followed too, once the
//! claim and its volume are in the store. Services, which the Node
//! authorizer lets a node list and watch, are followed as a whole ([`follow_services`]) for
//! the pods' service environment variables.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret, Service,
};
use kube::runtime::watcher::{self, Event};
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::pods::ApiPods;
use super::sleep_or_cancel;
use crate::retry::Retry;
use crate::store::refs::{references, volume_secrets};
use crate::store::{ObjectRef, ObjectStore};

/// How often a bound claim (and its volume) is re-read.
const CLAIM_POLL: Duration = Duration::from_secs(30);
/// How often a claim that is not bound yet is re-read.
const UNBOUND_POLL: Duration = Duration::from_secs(2);

/// Keeps one follower task per object the current pods reference, until `token` is cancelled.
pub(super) async fn run(
    client: kube::Client,
    store: ObjectStore,
    mut pods: watch::Receiver<ApiPods>,
    token: CancellationToken,
) {
    let mut followers: BTreeMap<ObjectRef, CancellationToken> = BTreeMap::new();
    // Store changes bring claims' volumes, whose CSI Secrets are wanted too.
    let mut stored = store.subscribe();
    loop {
        stored.borrow_and_update();
        let mut wanted: BTreeSet<ObjectRef> = pods
            .borrow_and_update()
            .values()
            .flat_map(|p| references(p))
            .collect();
        let secrets = volume_secrets(&store, &wanted);
        wanted.extend(secrets);
        followers.retain(|r, t| {
            let keep = wanted.contains(r);
            if !keep {
                t.cancel();
            }
            keep
        });
        for r in wanted {
            if followers.contains_key(&r) {
                continue;
            }
            let child = token.child_token();
            followers.insert(r.clone(), child.clone());
            tokio::spawn(follow(client.clone(), store.clone(), r, child));
        }
        tokio::select! {
            _ = token.cancelled() => return,
            changed = pods.changed() => if changed.is_err() { return },
            changed = stored.changed() => if changed.is_err() { return },
        }
    }
}

/// Every Service of the cluster, keyed by (namespace, name).
type Services = BTreeMap<(String, String), Service>;

fn service_key(svc: &Service) -> (String, String) {
    let meta = &svc.metadata;
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Applies one watcher event to the known Services (a relist is collected in `relist` and
/// replaces them only once complete); returns true when the known set changed.
fn apply_service_event(
    known: &mut Services,
    relist: &mut Option<Services>,
    e: Event<Service>,
) -> bool {
    match e {
        Event::Init => {
            *relist = Some(Services::new());
            false
        }
        Event::InitApply(svc) => {
            if let Some(list) = relist.as_mut() {
                list.insert(service_key(&svc), svc);
            }
            false
        }
        Event::InitDone => match relist.take() {
            Some(list) if list != *known => {
                *known = list;
                true
            }
            _ => false,
        },
        Event::Apply(svc) => known.insert(service_key(&svc), svc.clone()) != Some(svc),
        Event::Delete(svc) => known.remove(&service_key(&svc)).is_some(),
    }
}

/// Follows every Service into the store until `token` is cancelled (relisting after an error).
pub(super) async fn follow_services(
    client: kube::Client,
    store: ObjectStore,
    token: CancellationToken,
) {
    let api: Api<Service> = Api::all(client);
    let mut known = Services::new();
    // A new watch starts with Init, which starts a new relist.
    let mut relist = None;
    rewatch(
        || watcher::watcher(api.clone(), watcher::Config::default()),
        |event| {
            let done = matches!(event, Event::InitDone);
            if apply_service_event(&mut known, &mut relist, event) {
                store.set_services(known.clone());
            }
            done
        },
        |e| tracing::warn!(error = %e, "service watch failed; relisting after back-off"),
        &token,
    )
    .await;
}

/// The shape of every watch loop here: a stream made by `watch` is followed until `token` is
/// cancelled, each item handed to `apply` (true when the watch made progress: the back-off
/// starts over); after an error (handed to `failed`) or the stream's end, a new stream is made
/// after a back-off of 200 ms doubling to 30 s.
pub(super) async fn rewatch<S, T, E>(
    mut watch: impl FnMut() -> S,
    mut apply: impl FnMut(T) -> bool,
    failed: impl Fn(&E),
    token: &CancellationToken,
) where
    S: futures::Stream<Item = Result<T, E>>,
{
    let mut backoff = Retry::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let mut stream = std::pin::pin!(watch());
        loop {
            let next = tokio::select! {
                _ = token.cancelled() => return,
                next = stream.next() => next,
            };
            match next {
                Some(Ok(item)) => {
                    if apply(item) {
                        backoff.reset();
                    }
                }
                Some(Err(e)) => {
                    failed(&e);
                    break;
                }
                None => break,
            }
        }
        if !sleep_or_cancel(backoff.fail(), token).await {
            return;
        }
    }
}

/// Follows one object into the store until cancelled; then drops it from the store.
async fn follow(client: kube::Client, store: ObjectStore, r: ObjectRef, token: CancellationToken) {
    match &r {
        ObjectRef::ConfigMap { namespace, name } => {
            let api: Api<ConfigMap> = Api::namespaced(client, namespace);
            let put = |cm| store.set_config_map(namespace, name, cm);
            watch_one(api, name, put, &token).await;
            store.set_config_map(namespace, name, None);
        }
        ObjectRef::Secret { namespace, name } => {
            let api: Api<Secret> = Api::namespaced(client, namespace);
            let put = |secret| store.set_secret(namespace, name, secret);
            watch_one(api, name, put, &token).await;
            store.set_secret(namespace, name, None);
        }
        ObjectRef::Claim { namespace, name } => {
            let volume = poll_claim(client, &store, namespace, name, &token).await;
            store.set_claim(namespace, name, None);
            if let Some(pv) = volume {
                store.set_volume(&pv, None);
            }
        }
        // Never referenced by a pod itself: read with their claim, or followed as a whole.
        ObjectRef::Volume { .. } | ObjectRef::Services => {}
    }
}

/// Watches one named object, handing every state (None: it does not exist) to `put`.
async fn watch_one<K>(api: Api<K>, name: &str, put: impl Fn(Option<K>), token: &CancellationToken)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    rewatch(
        || kube::runtime::watcher::watch_object(api.clone(), name),
        |object| {
            put(object);
            true
        },
        // Right after a pod is bound the Node authorizer may not know it yet (403).
        |e| tracing::warn!(object = name, error = %e, "watching a referenced object failed; retrying"),
        token,
    )
    .await;
}

/// Polls a claim and the volume bound to it; returns the last volume it stored.
async fn poll_claim(
    client: kube::Client,
    store: &ObjectStore,
    namespace: &str,
    name: &str,
    token: &CancellationToken,
) -> Option<String> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let volumes: Api<PersistentVolume> = Api::all(client);
    let mut stored_pv: Option<String> = None;
    let mut backoff = Retry::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let result = async {
            let claim = claims.get_opt(name).await?;
            let pv_name = claim
                .as_ref()
                .and_then(|c| c.spec.as_ref())
                .and_then(|s| s.volume_name.clone())
                .filter(|n| !n.is_empty());
            let pv = match &pv_name {
                Some(pv) => volumes.get_opt(pv).await?,
                None => None,
            };
            Ok::<_, kube::Error>((claim, pv_name, pv))
        }
        .await;
        let delay = match result {
            Ok((claim, pv_name, pv)) => {
                backoff.reset();
                let bound = pv.is_some();
                // The volume first: a reader that sees the claim finds the volume it names.
                if let Some(n) = &pv_name {
                    store.set_volume(n, pv);
                }
                store.set_claim(namespace, name, claim);
                if let Some(old) = stored_pv.filter(|old| Some(old) != pv_name.as_ref()) {
                    store.set_volume(&old, None);
                }
                stored_pv = pv_name;
                if bound {
                    CLAIM_POLL
                } else {
                    UNBOUND_POLL
                }
            }
            Err(e) => {
                tracing::warn!(ns = namespace, claim = name, error = %e, "reading a claim failed; retrying");
                backoff.fail()
            }
        };
        if !sleep_or_cancel(delay, token).await {
            return stored_pv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, ip: &str) -> Service {
        Service {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
                cluster_ip: Some(ip.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn services_relist_replaces_only_when_complete() {
        let mut known = Services::new();
        let mut relist = None;
        let mut apply = |e| apply_service_event(&mut known, &mut relist, e);
        assert!(apply(Event::Apply(svc("ns", "a", "10.0.0.1"))));
        assert!(
            !apply(Event::Apply(svc("ns", "a", "10.0.0.1"))),
            "unchanged"
        );
        assert!(!apply(Event::Init));
        assert!(!apply(Event::InitApply(svc("ns", "b", "10.0.0.2"))));
        assert!(apply(Event::InitDone), "the relist replaced a with b");
        assert!(apply(Event::Delete(svc("ns", "b", "10.0.0.2"))));
        assert!(!apply(Event::Delete(svc("ns", "b", "10.0.0.2"))));
        assert!(known.is_empty());
    }

    use crate::cluster::fake_api::{until, FakeApi};
    use k8s_openapi::api::core::v1::Pod;
    use std::sync::Arc;

    const CFG: &str = "/api/v1/namespaces/default/configmaps/cfg";
    /// Catches a hang; paused time gets there at once.
    const HANG: Duration = Duration::from_secs(600);

    /// A pod of this node whose volumes come from the ConfigMaps `names`.
    fn pod_using(uid: &str, names: &[&str]) -> Pod {
        let volumes: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({ "name": n, "configMap": { "name": n } }))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": uid, "namespace": "default", "uid": uid },
            "spec": { "containers": [{ "name": "c", "image": "i" }], "volumes": volumes },
        }))
        .unwrap()
    }

    fn api_pods(pods: &[Pod]) -> ApiPods {
        Arc::new(
            pods.iter()
                .map(|p| (p.metadata.uid.clone().unwrap(), Arc::new(p.clone())))
                .collect(),
        )
    }

    fn value(store: &ObjectStore, name: &str) -> Option<String> {
        let cm = store.config_map("default", name)?;
        cm.data?.get("k").cloned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_referenced_config_map_is_followed_into_the_store_until_no_pod_uses_it() {
        let api = FakeApi::new();
        api.put(CFG, serde_json::json!({ "data": { "k": "1" } }));
        let store = ObjectStore::new();
        let (pods, rx) = watch::channel(ApiPods::default());
        let token = CancellationToken::new();
        let task = tokio::spawn(run(api.client(), store.clone(), rx, token.clone()));
        pods.send_replace(api_pods(&[pod_using("p1", &["cfg", "later"])]));
        until("the ConfigMap in the store", HANG, || {
            value(&store, "cfg").as_deref() == Some("1")
        })
        .await;
        // Followed one by one, by name: all the Node authorizer lets a node read.
        let watches: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|r| r.query.contains("watch=true"))
            .collect();
        assert!(watches.iter().any(|r| {
            r.path == "/api/v1/namespaces/default/configmaps"
                && r.query.contains("fieldSelector=metadata.name%3Dcfg")
        }));
        assert!(watches
            .iter()
            .all(|r| r.query.contains("fieldSelector=metadata.name")));

        // A change reaches the store; so does an object made after the pod.
        api.edit(CFG, |cm| cm["data"]["k"] = "2".into());
        until("the change", HANG, || {
            value(&store, "cfg").as_deref() == Some("2")
        })
        .await;
        assert_eq!(value(&store, "later"), None);
        api.put(
            "/api/v1/namespaces/default/configmaps/later",
            serde_json::json!({ "data": { "k": "3" } }),
        );
        until("the late object", HANG, || {
            value(&store, "later").as_deref() == Some("3")
        })
        .await;

        // Another pod keeps `cfg` wanted after the first one goes; then it goes too.
        pods.send_replace(api_pods(&[pod_using("p2", &["cfg"])]));
        until("`later` dropped", HANG, || value(&store, "later").is_none()).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(value(&store, "cfg").as_deref(), Some("2"));
        pods.send_replace(api_pods(&[]));
        until("`cfg` dropped", HANG, || value(&store, "cfg").is_none()).await;
        // Not followed any more: no request for it, and a change does not come back.
        let asked = api.requests().len();
        api.edit(CFG, |cm| cm["data"]["k"] = "4".into());
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(api.requests().len(), asked);
        assert_eq!(value(&store, "cfg"), None);
        token.cancel();
        task.await.unwrap();
    }
}
