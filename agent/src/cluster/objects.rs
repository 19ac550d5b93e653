//! The objects this node's pods reference: ConfigMaps, Secrets, PersistentVolumeClaims and the
//! PersistentVolumes bound to those claims, read through the API with the node's identity.
//!
//! The Node authorizer lets a node read only objects a pod bound to it references, and only one
//! by one: ConfigMaps and Secrets are followed with a per-object watch (`metadata.name` field
//! selector), claims and volumes (GET only) are polled. One task per referenced object; it is
//! started when the first pod refers to the object and stopped (and the object dropped from the
//! store) when the last one goes. [`references`] is the pure part. The Secrets a bound CSI
//! volume references (nodeStageSecretRef, nodePublishSecretRef) are followed too, once the
//! claim and its volume are in the store ([`volume_secrets`]). Services, which the Node
//! authorizer lets a node list and watch, are followed as a whole ([`follow_services`]) for
//! the pods' service environment variables.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service,
};
use kube::runtime::watcher::{self, Event};
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::pods::ApiPods;
use super::{sleep_or_cancel, Backoff};
use crate::store::ObjectStore;

/// How often a bound claim (and its volume) is re-read.
const CLAIM_POLL: Duration = Duration::from_secs(30);
/// How often a claim that is not bound yet is re-read.
const UNBOUND_POLL: Duration = Duration::from_secs(2);

/// One object a pod refers to (in the pod's namespace; a CSI volume's Secret in its own).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum ObjectRef {
    ConfigMap { namespace: String, name: String },
    Secret { namespace: String, name: String },
    Claim { namespace: String, name: String },
}

/// Every ConfigMap, Secret and claim `pod` refers to: volumes (also projected sources, CSI
/// publish secrets and generic ephemeral volumes' claims `<pod>-<volume>`), env and envFrom of
/// every container kind, and image pull secrets.
pub(super) fn references(pod: &Pod) -> BTreeSet<ObjectRef> {
    let mut refs = BTreeSet::new();
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let Some(spec) = &pod.spec else { return refs };
    let cm = |name: &str| ObjectRef::ConfigMap {
        namespace: namespace.clone(),
        name: name.to_string(),
    };
    let secret = |name: &str| ObjectRef::Secret {
        namespace: namespace.clone(),
        name: name.to_string(),
    };
    let claim = |name: &str| ObjectRef::Claim {
        namespace: namespace.clone(),
        name: name.to_string(),
    };
    for v in spec.volumes.iter().flatten() {
        if let Some(c) = &v.config_map {
            refs.insert(cm(&c.name));
        }
        if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) {
            refs.insert(secret(name));
        }
        if let Some(c) = &v.persistent_volume_claim {
            refs.insert(claim(&c.claim_name));
        }
        if v.ephemeral.is_some() {
            refs.insert(claim(&format!("{pod_name}-{}", v.name)));
        }
        if let Some(s) = v
            .csi
            .as_ref()
            .and_then(|c| c.node_publish_secret_ref.as_ref())
        {
            refs.insert(secret(&s.name));
        }
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &source.config_map {
                refs.insert(cm(&c.name));
            }
            if let Some(s) = &source.secret {
                refs.insert(secret(&s.name));
            }
        }
    }
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let env_sets = containers
        .map(|c| (c.env.as_deref(), c.env_from.as_deref()))
        .chain(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .map(|c| (c.env.as_deref(), c.env_from.as_deref())),
        );
    for (env, env_from) in env_sets {
        for from in env
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.value_from.as_ref())
        {
            if let Some(k) = &from.config_map_key_ref {
                refs.insert(cm(&k.name));
            }
            if let Some(k) = &from.secret_key_ref {
                refs.insert(secret(&k.name));
            }
        }
        for from in env_from.unwrap_or_default() {
            if let Some(r) = &from.config_map_ref {
                refs.insert(cm(&r.name));
            }
            if let Some(r) = &from.secret_ref {
                refs.insert(secret(&r.name));
            }
        }
    }
    for s in spec.image_pull_secrets.iter().flatten() {
        refs.insert(secret(&s.name));
    }
    refs.retain(|r| match r {
        ObjectRef::ConfigMap { name, .. }
        | ObjectRef::Secret { name, .. }
        | ObjectRef::Claim { name, .. } => !name.is_empty(),
    });
    refs
}

/// The Secrets the CSI volumes bound to the claims among `refs` reference, as far as the
/// store holds those claims and volumes. A reference without a namespace means the claim's.
pub(super) fn volume_secrets(
    store: &ObjectStore,
    refs: &BTreeSet<ObjectRef>,
) -> BTreeSet<ObjectRef> {
    let mut out = BTreeSet::new();
    for r in refs {
        let ObjectRef::Claim { namespace, name } = r else {
            continue;
        };
        let Some(pv_name) = store
            .claim(namespace, name)
            .and_then(|c| c.spec)
            .and_then(|s| s.volume_name)
        else {
            continue;
        };
        let Some(csi) = store
            .volume(&pv_name)
            .and_then(|pv| pv.spec)
            .and_then(|s| s.csi)
        else {
            continue;
        };
        for secret in [csi.node_stage_secret_ref, csi.node_publish_secret_ref]
            .into_iter()
            .flatten()
        {
            if let Some(secret_name) = secret.name.filter(|n| !n.is_empty()) {
                out.insert(ObjectRef::Secret {
                    namespace: secret.namespace.unwrap_or_else(|| namespace.clone()),
                    name: secret_name,
                });
            }
        }
    }
    out
}

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
                store.update(|o| o.services = known.clone());
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
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
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
            let key = (namespace.clone(), name.clone());
            let put = |cm: Option<ConfigMap>| {
                if store.config_map(namespace, name) != cm {
                    store.update(|o| set(&mut o.config_maps, key.clone(), cm));
                }
            };
            watch_one(api, name, put, &token).await;
            store.update(|o| {
                o.config_maps.remove(&key);
            });
        }
        ObjectRef::Secret { namespace, name } => {
            let api: Api<Secret> = Api::namespaced(client, namespace);
            let key = (namespace.clone(), name.clone());
            let put = |s: Option<Secret>| {
                if store.secret(namespace, name) != s {
                    store.update(|o| set(&mut o.secrets, key.clone(), s));
                }
            };
            watch_one(api, name, put, &token).await;
            store.update(|o| {
                o.secrets.remove(&key);
            });
        }
        ObjectRef::Claim { namespace, name } => {
            let volume = poll_claim(client, &store, namespace, name, &token).await;
            store.update(|o| {
                o.claims.remove(&(namespace.clone(), name.clone()));
                if let Some(pv) = volume {
                    o.volumes.remove(&pv);
                }
            });
        }
    }
}

fn set<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
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
    let key = (namespace.to_string(), name.to_string());
    let mut stored_pv: Option<String> = None;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
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
                let old_pv = stored_pv.clone();
                if store.claim(namespace, name) != claim
                    || old_pv != pv_name
                    || pv_name.as_deref().and_then(|n| store.volume(n)) != pv
                {
                    store.update(|o| {
                        set(&mut o.claims, key.clone(), claim);
                        if let Some(old) = old_pv.filter(|o| Some(o) != pv_name.as_ref()) {
                            o.volumes.remove(&old);
                        }
                        if let Some(n) = &pv_name {
                            set(&mut o.volumes, n.clone(), pv);
                        }
                    });
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

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_bound_csi_volumes_secrets_are_wanted_once_it_is_stored() {
        let store = ObjectStore::new();
        let claim = |ns: &str, name: &str| ObjectRef::Claim {
            namespace: ns.into(),
            name: name.into(),
        };
        let refs: BTreeSet<ObjectRef> = [claim("shop", "data"), claim("shop", "other")].into();
        assert!(
            volume_secrets(&store, &refs).is_empty(),
            "nothing stored yet"
        );
        store.update(|o| {
            o.claims.insert(
                ("shop".into(), "data".into()),
                serde_yaml::from_str(
                    "metadata: {name: data, namespace: shop}
spec: {volumeName: pv-1}
",
                )
                .unwrap(),
            );
            o.volumes.insert(
                "pv-1".into(),
                serde_yaml::from_str(
                    "metadata: {name: pv-1}
spec:
  csi:
    driver: x
    volumeHandle: h
    nodeStageSecretRef: {name: stage, namespace: storage}
    nodePublishSecretRef: {name: publish}
",
                )
                .unwrap(),
            );
        });
        let secret = |ns: &str, name: &str| ObjectRef::Secret {
            namespace: ns.into(),
            name: name.into(),
        };
        assert_eq!(
            volume_secrets(&store, &refs),
            [secret("storage", "stage"), secret("shop", "publish")].into()
        );
    }

    #[test]
    fn every_kind_of_reference_is_found() {
        let p = pod(r#"
metadata: {name: web-0, namespace: shop}
spec:
  imagePullSecrets: [{name: pull}]
  volumes:
  - {name: a, configMap: {name: cm-vol}}
  - {name: b, secret: {secretName: sec-vol}}
  - {name: c, persistentVolumeClaim: {claimName: data-web-0}}
  - name: d
    projected:
      sources:
      - configMap: {name: cm-proj}
      - secret: {name: sec-proj}
      - serviceAccountToken: {path: token}
  - name: scratch
    ephemeral: {volumeClaimTemplate: {spec: {accessModes: [ReadWriteOnce]}}}
  - name: e
    csi: {driver: x, nodePublishSecretRef: {name: csi-sec}}
  initContainers:
  - name: init
    envFrom: [{secretRef: {name: sec-envfrom}}]
  containers:
  - name: app
    env:
    - name: A
      valueFrom: {configMapKeyRef: {name: cm-env, key: k}}
    - name: B
      valueFrom: {secretKeyRef: {name: sec-env, key: k}}
    - {name: C, value: plain}
    envFrom: [{configMapRef: {name: cm-envfrom}}]
"#);
        let cm = |n: &str| ObjectRef::ConfigMap {
            namespace: "shop".into(),
            name: n.into(),
        };
        let sec = |n: &str| ObjectRef::Secret {
            namespace: "shop".into(),
            name: n.into(),
        };
        let claim = |n: &str| ObjectRef::Claim {
            namespace: "shop".into(),
            name: n.into(),
        };
        let want: BTreeSet<_> = [
            cm("cm-vol"),
            cm("cm-proj"),
            cm("cm-env"),
            cm("cm-envfrom"),
            sec("pull"),
            sec("sec-vol"),
            sec("sec-proj"),
            sec("csi-sec"),
            sec("sec-envfrom"),
            sec("sec-env"),
            claim("data-web-0"),
            claim("web-0-scratch"),
        ]
        .into_iter()
        .collect();
        assert_eq!(references(&p), want);
    }

    #[test]
    fn a_pod_without_references_has_none() {
        let p = pod("metadata: {name: a}\nspec:\n  containers: [{name: app}]\n");
        assert!(references(&p).is_empty());
        assert!(references(&Pod::default()).is_empty());
    }
}
