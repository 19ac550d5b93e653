//! persistentVolumeClaim resolution: the claim must exist and be bound to a PV that exists.
//! Standalone mode has no binder, so a claim counts as bound when its `spec.volumeName` names a
//! PV whose `spec.claimRef` names this claim (namespace and name, and uid when both carry one),
//! or when its status phase is Bound (a binder did it) and the PV does not name another claim.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};

use super::local::fs_group;
use super::records::ClaimUse;
use super::{
    blocking, csi, csi_failed, failed, host, invalid, mount, namespace, plugin, projection, Ctx,
    ReadyVolume, VolumeError, VolumeManager,
};
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

impl VolumeManager {
    pub(super) async fn setup_claim(
        &self,
        pod: &Arc<Pod>,
        uid: &str,
        volume: &str,
        claim_name: &str,
        pod_read_only: bool,
    ) -> Result<ReadyVolume, VolumeError> {
        let bound = resolve(&self.ctx.store, namespace(pod), volume, claim_name)?;
        let pv_name = bound.pv.metadata.name.clone().unwrap_or_default();
        // Access modes, as upstream: ReadWriteOnce means one *node* (several pods on this node
        // may share the volume), so it is never refused here; ReadWriteOncePod means one pod,
        // which upstream enforces in the scheduler and again in the kubelet at mount time
        // (KEP-2485: a claim already in use by another pod fails the mount).
        let use_ = ClaimUse {
            namespace: bound.namespace.clone(),
            name: bound.claim.clone(),
            pv: pv_name.clone(),
            access_modes: bound.access_modes.clone(),
        };
        // Checked and recorded under one hold of the records: two pods set up at once cannot
        // both take a ReadWriteOncePod claim.
        {
            let mut records = self.records.lock().expect("records lock");
            if bound.access_modes.iter().any(|m| m == READ_WRITE_ONCE_POD) {
                let other = records.iter().find(|(other_uid, rec)| {
                    other_uid.as_str() != uid
                        && rec.volumes.values().any(|v| {
                            v.claim.as_ref().is_some_and(|c| {
                                c.namespace == bound.namespace && c.name == bound.claim
                            })
                        })
                });
                if let Some((other_uid, rec)) = other {
                    return Err(VolumeError::InUse {
                        volume: volume.to_string(),
                        claim: format!("{}/{}", bound.namespace, bound.claim),
                        other: format!("{}/{} ({other_uid})", rec.namespace, rec.name),
                    });
                }
            }
            let rec = records.entry(uid.to_string()).or_default();
            rec.volumes.entry(volume.to_string()).or_default().claim = Some(use_);
        }
        self.save(uid)?;
        let spec = bound.pv.spec.clone().unwrap_or_default();
        if let Some(src) = &spec.csi {
            let read_only = pod_read_only || src.read_only.unwrap_or(false);
            let mut rec = csi::pv_record(
                &self.ctx.root,
                uid,
                &pv_name,
                src,
                read_only,
                &bound.access_modes,
                bound.block,
            );
            rec.mount_flags = spec.mount_options.clone().unwrap_or_default();
            let context = csi::pod_context(pod, false, src.volume_attributes.clone());
            // A SecretReference without a namespace means the claim's, as upstream.
            let refs = [&src.node_stage_secret_ref, &src.node_publish_secret_ref].map(|r| {
                r.as_ref().map(|r| {
                    let ns = r.namespace.as_deref().unwrap_or(&bound.namespace);
                    (ns.to_string(), r.name.clone().unwrap_or_default())
                })
            });
            let mut secrets = csi::CsiSecrets::default();
            for (to, r) in [&mut secrets.stage, &mut secrets.publish]
                .into_iter()
                .zip(refs)
            {
                if let Some((ns, name)) = r {
                    *to = self.csi_secret(volume, &ns, &name)?;
                }
            }
            return self
                .setup_csi(pod, uid, volume, rec, context, &secrets)
                .await;
        }
        let (ctx, pod, volume) = (self.ctx.clone(), pod.clone(), volume.to_string());
        let uid = uid.to_string();
        blocking(move || ctx.setup_pv(&pod, &uid, &volume, &bound, pod_read_only)).await
    }

    /// Records a CSI volume, then stages and publishes it (see `csi::Plugins::setup`).
    pub(super) async fn setup_csi(
        &self,
        pod: &Arc<Pod>,
        uid: &str,
        volume: &str,
        rec: csi::CsiRecord,
        context: BTreeMap<String, String>,
        secrets: &csi::CsiSecrets,
    ) -> Result<ReadyVolume, VolumeError> {
        // Recorded before staging: a teardown sharing the staging path then sees this pod.
        self.record(uid, volume, |r| r.csi = Some(rec.clone()))?;
        let _staging = match &rec.staging_path {
            Some(path) => Some(self.staging_locks.lock(path).await),
            None => None,
        };
        let ready = self
            .plugins
            .setup(&rec, context, secrets)
            .await
            .map_err(csi_failed(volume))?;
        self.apply_fs_group_async(pod, volume, &ready, !rec.fs_type.is_empty())
            .await?;
        Ok(ready)
    }

    /// The values of a Secret a CSI volume references (drivers take them as text).
    pub(super) fn csi_secret(
        &self,
        volume: &str,
        namespace: &str,
        name: &str,
    ) -> Result<std::collections::HashMap<String, String>, VolumeError> {
        let shown = format!("{namespace}/{name}");
        let secret =
            self.ctx
                .store
                .secret(namespace, name)
                .ok_or_else(|| VolumeError::Missing {
                    volume: volume.to_string(),
                    kind: "secret",
                    name: shown.clone(),
                })?;
        projection::secret_data(&secret)
            .into_iter()
            .map(|(k, v)| match String::from_utf8(v) {
                Ok(v) => Ok((k, v)),
                Err(_) => Err(invalid(
                    volume,
                    format!("secret {shown:?} key {k:?} is not UTF-8 text"),
                )),
            })
            .collect()
    }

    async fn apply_fs_group_async(
        &self,
        pod: &Arc<Pod>,
        volume: &str,
        ready: &ReadyVolume,
        has_fs_type: bool,
    ) -> Result<(), VolumeError> {
        // CSI drivers default to fsGroupPolicy ReadWriteOnceWithFSType: ownership is changed
        // only when the volume has an fsType and is writable.
        if !has_fs_type || ready.read_only || ready.block {
            return Ok(());
        }
        let (pod, volume, dir) = (pod.clone(), volume.to_string(), ready.host_path.clone());
        blocking(move || fs_group(&pod, &volume, &dir, false)).await
    }
}

impl Ctx {
    /// A PV's hostPath or local source.
    fn setup_pv(
        &self,
        pod: &Pod,
        uid: &str,
        volume: &str,
        bound: &BoundClaim,
        pod_read_only: bool,
    ) -> Result<ReadyVolume, VolumeError> {
        let spec = bound.pv.spec.clone().unwrap_or_default();
        let pv_name = bound.pv.metadata.name.clone().unwrap_or_default();
        if let Some(hp) = &spec.host_path {
            let path = PathBuf::from(&hp.path);
            host::check_host_path(&path, hp.type_.as_deref()).map_err(|e| invalid(volume, e))?;
            return Ok(ReadyVolume {
                block: bound.block,
                host_path: path,
                read_only: pod_read_only,
            });
        }
        let Some(local) = &spec.local else {
            return Err(invalid(
                volume,
                format!("persistentvolume {pv_name:?} has an unsupported source"),
            ));
        };
        let path = PathBuf::from(&local.path);
        let meta = fs::metadata(&path)
            .map_err(|e| invalid(volume, format!("local path {}: {e}", path.display())))?;
        if mount::is_block_device(&path) && bound.block {
            return Ok(ReadyVolume {
                host_path: path,
                read_only: pod_read_only,
                block: true,
            });
        }
        if bound.block {
            return Err(invalid(
                volume,
                format!(
                    "volumeMode Block needs a block device, {} is not one",
                    path.display()
                ),
            ));
        }
        let target = self.volume_dir(uid, plugin::LOCAL, &pv_name);
        fs::create_dir_all(&target)
            .map_err(|e| failed(volume, format!("mkdir {}: {e}", target.display())))?;
        if !mount::is_mounted(&target).map_err(|e| failed(volume, e))? {
            if mount::is_block_device(&path) {
                let fs_type = local
                    .fs_type
                    .clone()
                    .filter(|f| !f.is_empty())
                    .unwrap_or_else(|| "ext4".into());
                mount::format_if_blank(&path, &fs_type).map_err(|e| failed(volume, e))?;
                mount::mount_device(&path, &target, &fs_type, pod_read_only)
                    .map_err(|e| failed(volume, format!("mounting {}: {e}", path.display())))?;
            } else if meta.is_dir() {
                mount::bind(&path, &target, pod_read_only)
                    .map_err(|e| failed(volume, format!("bind {}: {e}", path.display())))?;
            } else {
                return Err(invalid(
                    volume,
                    format!(
                        "local path {} is neither a directory nor a block device",
                        path.display()
                    ),
                ));
            }
        }
        if !pod_read_only {
            fs_group(pod, volume, &target, false)?;
        }
        Ok(ReadyVolume {
            host_path: target,
            read_only: pod_read_only,
            block: false,
        })
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
