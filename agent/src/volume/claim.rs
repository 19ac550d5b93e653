//! persistentVolumeClaim resolution: the claim must exist and be bound to a PV that exists.
//! Standalone mode has no binder, so a claim counts as bound when its `spec.volumeName` names a
//! PV whose `spec.claimRef` names this claim (namespace and name, and uid when both carry one),
//! or when its status phase is Bound (a binder did it) and the PV does not name another claim.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};

use super::VolumeError;
use crate::store::ObjectStore;

/// A claim resolved to its PV.
#[derive(Clone, Debug)]
pub struct BoundClaim {
    pub namespace: String,
    pub claim: String,
    pub pv: PersistentVolume,
    /// The claim's access modes (the PV's when the claim lists none).
    pub access_modes: Vec<String>,
    /// volumeMode: "Filesystem" (default) or "Block".
    pub block: bool,
}

pub const READ_WRITE_ONCE_POD: &str = "ReadWriteOncePod";

/// Resolves `claim_name` in `namespace` for pod volume `volume`.
pub fn resolve(
    store: &ObjectStore,
    namespace: &str,
    volume: &str,
    claim_name: &str,
) -> Result<BoundClaim, VolumeError> {
    let claim = store
        .claim(namespace, claim_name)
        .ok_or_else(|| VolumeError::Missing {
            volume: volume.to_string(),
            kind: "persistentvolumeclaim",
            name: format!("{namespace}/{claim_name}"),
        })?;
    let unbound = || VolumeError::Unbound {
        volume: volume.to_string(),
        claim: format!("{namespace}/{claim_name}"),
    };
    let spec = claim.spec.clone().unwrap_or_default();
    let pv_name = spec
        .volume_name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(unbound)?;
    let pv = store.volume(&pv_name).ok_or_else(|| VolumeError::Missing {
        volume: volume.to_string(),
        kind: "persistentvolume",
        name: pv_name.clone(),
    })?;
    if !is_bound(&claim, &pv, namespace, claim_name) {
        return Err(unbound());
    }
    let pv_spec = pv.spec.clone().unwrap_or_default();
    let access_modes = spec
        .access_modes
        .filter(|m| !m.is_empty())
        .or(pv_spec.access_modes.clone())
        .unwrap_or_default();
    let mode = spec.volume_mode.or(pv_spec.volume_mode.clone());
    Ok(BoundClaim {
        namespace: namespace.to_string(),
        claim: claim_name.to_string(),
        pv,
        access_modes,
        block: mode.as_deref() == Some("Block"),
    })
}

fn is_bound(claim: &PersistentVolumeClaim, pv: &PersistentVolume, ns: &str, name: &str) -> bool {
    let claim_ref = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    let phase_bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    match claim_ref {
        Some(r) => {
            let names_us = r.name.as_deref() == Some(name)
                && r.namespace.as_deref().unwrap_or("default") == ns;
            let uid_ok = match (&r.uid, &claim.metadata.uid) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
            names_us && uid_ok
        }
        None => phase_bound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Objects;
    use k8s_openapi::api::core::v1::{
        ObjectReference, PersistentVolumeClaimSpec, PersistentVolumeClaimStatus,
        PersistentVolumeSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn store(
        volume_name: Option<&str>,
        claim_ref: Option<(&str, &str)>,
        phase: Option<&str>,
    ) -> ObjectStore {
        let mut o = Objects::default();
        o.claims.insert(
            ("ns".into(), "data".into()),
            PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".into()),
                    namespace: Some("ns".into()),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    volume_name: volume_name.map(Into::into),
                    access_modes: Some(vec![READ_WRITE_ONCE_POD.into()]),
                    ..Default::default()
                }),
                status: phase.map(|p| PersistentVolumeClaimStatus {
                    phase: Some(p.into()),
                    ..Default::default()
                }),
            },
        );
        o.volumes.insert(
            "pv1".into(),
            PersistentVolume {
                metadata: ObjectMeta {
                    name: Some("pv1".into()),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeSpec {
                    claim_ref: claim_ref.map(|(ns, n)| ObjectReference {
                        namespace: Some(ns.into()),
                        name: Some(n.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                status: None,
            },
        );
        let s = ObjectStore::new();
        s.replace(o);
        s
    }

    #[test]
    fn binding_rules() {
        let ok = resolve(
            &store(Some("pv1"), Some(("ns", "data")), None),
            "ns",
            "v",
            "data",
        )
        .unwrap();
        assert_eq!(ok.access_modes, vec![READ_WRITE_ONCE_POD]);
        assert!(resolve(&store(Some("pv1"), None, Some("Bound")), "ns", "v", "data").is_ok());
        for s in [
            store(None, Some(("ns", "data")), None),
            store(Some("pv1"), None, None),
            store(Some("pv1"), Some(("other", "data")), Some("Bound")),
        ] {
            assert!(matches!(
                resolve(&s, "ns", "v", "data"),
                Err(VolumeError::Unbound { .. })
            ));
        }
        assert!(matches!(
            resolve(&store(Some("pv1"), None, None), "ns", "v", "nope"),
            Err(VolumeError::Missing {
                kind: "persistentvolumeclaim",
                ..
            })
        ));
        assert!(matches!(
            resolve(&store(Some("pv2"), None, None), "ns", "v", "data"),
            Err(VolumeError::Missing {
                kind: "persistentvolume",
                ..
            })
        ));
    }
}
