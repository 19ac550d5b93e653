//! What a pod refers to in the object store: the ConfigMaps, Secrets and claims of its spec
//! ([`references`]), the Secrets of the CSI volumes bound to its claims ([`volume_secrets`]),
//! and with the bound volumes themselves, everything whose change can change what the pod sees
//! ([`watched_by`]). Pure functions over the pod and the store: the API source follows what
//! the node's pods reference, and a pod worker acts only on changes to what its pod watches.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;

use super::ObjectStore;

/// One object a pod refers to (in the pod's namespace; a CSI volume's Secret in its own).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectRef {
    ConfigMap {
        namespace: String,
        name: String,
    },
    Secret {
        namespace: String,
        name: String,
    },
    Claim {
        namespace: String,
        name: String,
    },
    /// A PersistentVolume (cluster-scoped): read with the claim bound to it.
    Volume {
        name: String,
    },
    /// The cluster's Services as a whole (followed as a set, for service environment variables).
    Services,
}

/// Every ConfigMap, Secret and claim `pod` refers to: volumes (also projected sources, CSI
/// publish secrets and generic ephemeral volumes' claims `<pod>-<volume>`), env and envFrom of
/// every container kind, and image pull secrets.
pub fn references(pod: &Pod) -> BTreeSet<ObjectRef> {
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
        | ObjectRef::Claim { name, .. }
        | ObjectRef::Volume { name } => !name.is_empty(),
        ObjectRef::Services => true,
    });
    refs
}

/// The Secrets the CSI volumes bound to the claims among `refs` reference, as far as the
/// store holds those claims and volumes. A reference without a namespace means the claim's.
pub fn volume_secrets(store: &ObjectStore, refs: &BTreeSet<ObjectRef>) -> BTreeSet<ObjectRef> {
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

/// Everything whose change can change what `pod` sees: its references, the volumes bound to
/// its claims and those volumes' CSI Secrets (as far as the store holds the claims).
pub fn watched_by(pod: &Pod, store: &ObjectStore) -> BTreeSet<ObjectRef> {
    let mut refs = references(pod);
    let volumes: Vec<ObjectRef> = refs
        .iter()
        .filter_map(|r| match r {
            ObjectRef::Claim { namespace, name } => store
                .claim(namespace, name)
                .and_then(|c| c.spec)
                .and_then(|s| s.volume_name)
                .filter(|n| !n.is_empty())
                .map(|name| ObjectRef::Volume { name }),
            _ => None,
        })
        .collect();
    let secrets = volume_secrets(store, &refs);
    refs.extend(volumes);
    refs.extend(secrets);
    refs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).unwrap()
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
        store.set_claim(
            "shop",
            "data",
            serde_yaml_ng::from_str(
                "metadata: {name: data, namespace: shop}
spec: {volumeName: pv-1}
",
            )
            .unwrap(),
        );
        store.set_volume(
            "pv-1",
            serde_yaml_ng::from_str(
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
