//! Payloads of the atomically written volumes: configMap, secret, downwardAPI and projected
//! (configMap, secret, downwardAPI and serviceAccountToken sources), built from the object
//! store as the kubelet builds them (items with key → path and mode, defaultMode, optional).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, ProjectedVolumeSource, Secret,
};

use super::atomic::{validate_path, FileProjection, Payload};
use super::downward::{self, NodeAllocatable};
use super::VolumeError;
use crate::store::ObjectStore;

/// The upstream default file mode of these volumes.
pub const DEFAULT_MODE: i32 = 0o644;

/// A ConfigMap's keys and values (data and binaryData).
pub fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (k, v) in cm.data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

/// A Secret's keys and values; stringData (which the API server would merge) wins over data.
pub fn secret_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (k, v) in secret.data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// Where a key/value source comes from, for errors.
pub struct KeySource<'a> {
    pub volume: &'a str,
    /// "configmap" or "secret".
    pub kind: &'static str,
    pub name: &'a str,
    pub optional: bool,
}

fn invalid(volume: &str, detail: impl Into<String>) -> VolumeError {
    VolumeError::Invalid {
        volume: volume.to_string(),
        detail: detail.into(),
    }
}

/// Adds a key/value source to `payload`: every key (no items) or the listed items, each with its
/// mode or `default_mode`. `data` None means the object is missing.
pub fn add_keys(
    payload: &mut Payload,
    src: &KeySource<'_>,
    data: Option<BTreeMap<String, Vec<u8>>>,
    items: Option<&[KeyToPath]>,
    default_mode: i32,
) -> Result<(), VolumeError> {
    let Some(data) = data else {
        if src.optional {
            return Ok(());
        }
        return Err(VolumeError::Missing {
            volume: src.volume.to_string(),
            kind: src.kind,
            name: src.name.to_string(),
        });
    };
    let mode = |m: Option<i32>| (m.unwrap_or(default_mode) as u32) & 0o7777;
    match items {
        None | Some([]) => {
            for (k, v) in data {
                validate_path(&k).map_err(|e| invalid(src.volume, e.to_string()))?;
                payload.insert(
                    k,
                    FileProjection {
                        data: v,
                        mode: mode(None),
                    },
                );
            }
        }
        Some(items) => {
            for item in items {
                validate_path(&item.path).map_err(|e| invalid(src.volume, e.to_string()))?;
                match data.get(&item.key) {
                    Some(v) => {
                        payload.insert(
                            item.path.clone(),
                            FileProjection {
                                data: v.clone(),
                                mode: mode(item.mode),
                            },
                        );
                    }
                    None if src.optional => {}
                    None => {
                        return Err(invalid(
                            src.volume,
                            format!(
                                "{} {:?} references non-existent key {:?}",
                                src.kind, src.name, item.key
                            ),
                        ))
                    }
                }
            }
        }
    }
    Ok(())
}

/// Adds downwardAPI items to `payload`.
pub fn add_downward(
    payload: &mut Payload,
    volume: &str,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: i32,
    node: &NodeAllocatable,
) -> Result<(), VolumeError> {
    for item in items {
        validate_path(&item.path).map_err(|e| invalid(volume, e.to_string()))?;
        let value = match (&item.field_ref, &item.resource_field_ref) {
            (Some(f), None) => downward::field_value(pod, f),
            (None, Some(r)) => downward::resource_value(pod, None, r, node),
            _ => {
                return Err(invalid(
                    volume,
                    format!(
                        "item {:?}: exactly one of fieldRef, resourceFieldRef",
                        item.path
                    ),
                ))
            }
        }
        .map_err(|e| invalid(volume, format!("item {:?}: {e}", item.path)))?;
        payload.insert(
            item.path.clone(),
            FileProjection {
                data: value.into_bytes(),
                mode: (item.mode.unwrap_or(default_mode) as u32) & 0o7777,
            },
        );
    }
    Ok(())
}

/// The payload of a projected volume. `tokens[i]` is the token fetched for source `i` when it
/// is a serviceAccountToken source.
pub fn projected_payload(
    volume: &str,
    pod: &Pod,
    src: &ProjectedVolumeSource,
    store: &ObjectStore,
    node: &NodeAllocatable,
    tokens: &BTreeMap<usize, String>,
) -> Result<Payload, VolumeError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let default_mode = src.default_mode.unwrap_or(DEFAULT_MODE);
    let mut payload = Payload::new();
    for (i, s) in src.sources.iter().flatten().enumerate() {
        if let Some(cm) = &s.config_map {
            let key = KeySource {
                volume,
                kind: "configmap",
                name: &cm.name,
                optional: cm.optional.unwrap_or(false),
            };
            let data = store
                .config_map(namespace, &cm.name)
                .map(|c| config_map_data(&c));
            add_keys(&mut payload, &key, data, cm.items.as_deref(), default_mode)?;
        } else if let Some(sec) = &s.secret {
            let key = KeySource {
                volume,
                kind: "secret",
                name: &sec.name,
                optional: sec.optional.unwrap_or(false),
            };
            let data = store.secret(namespace, &sec.name).map(|c| secret_data(&c));
            add_keys(&mut payload, &key, data, sec.items.as_deref(), default_mode)?;
        } else if let Some(d) = &s.downward_api {
            add_downward(
                &mut payload,
                volume,
                pod,
                d.items.as_deref().unwrap_or_default(),
                default_mode,
                node,
            )?;
        } else if let Some(t) = &s.service_account_token {
            validate_path(&t.path).map_err(|e| invalid(volume, e.to_string()))?;
            let token = tokens.get(&i).ok_or_else(|| {
                invalid(
                    volume,
                    "serviceAccountToken: no token was fetched for this source",
                )
            })?;
            // Upstream: the projected defaultMode, but 0600 when the pod sets an fsGroup
            // (the file then belongs to that group and must not be world-readable).
            let has_fs_group = pod
                .spec
                .as_ref()
                .and_then(|s| s.security_context.as_ref())
                .is_some_and(|c| c.fs_group.is_some());
            let mode = if has_fs_group {
                0o600
            } else {
                default_mode as u32 & 0o7777
            };
            payload.insert(
                t.path.clone(),
                FileProjection {
                    data: token.clone().into_bytes(),
                    mode,
                },
            );
        } else if s.cluster_trust_bundle.is_some() || s.pod_certificate.is_some() {
            return Err(invalid(
                volume,
                "clusterTrustBundle and podCertificate projections are not supported",
            ));
        }
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn cm() -> ConfigMap {
        ConfigMap {
            data: Some(BTreeMap::from([
                ("a".into(), "1".into()),
                ("b".into(), "2".into()),
            ])),
            binary_data: Some(BTreeMap::from([("bin".into(), ByteString(vec![0, 1]))])),
            ..Default::default()
        }
    }

    fn src(optional: bool) -> KeySource<'static> {
        KeySource {
            volume: "v",
            kind: "configmap",
            name: "cm",
            optional,
        }
    }

    #[test]
    fn all_keys_with_default_mode() {
        let mut p = Payload::new();
        add_keys(
            &mut p,
            &src(false),
            Some(config_map_data(&cm())),
            None,
            0o640,
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p["bin"].data, vec![0, 1]);
        assert!(p.values().all(|f| f.mode == 0o640));
    }

    #[test]
    fn items_and_modes() {
        let items = vec![KeyToPath {
            key: "a".into(),
            path: "dir/a.txt".into(),
            mode: Some(0o400),
        }];
        let mut p = Payload::new();
        add_keys(
            &mut p,
            &src(false),
            Some(config_map_data(&cm())),
            Some(&items),
            0o644,
        )
        .unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p["dir/a.txt"].mode, 0o400);
        let missing = vec![KeyToPath {
            key: "zz".into(),
            path: "zz".into(),
            mode: None,
        }];
        let mut p = Payload::new();
        assert!(add_keys(
            &mut p,
            &src(false),
            Some(config_map_data(&cm())),
            Some(&missing),
            0o644
        )
        .is_err());
        assert!(add_keys(
            &mut p,
            &src(true),
            Some(config_map_data(&cm())),
            Some(&missing),
            0o644
        )
        .is_ok());
        assert!(p.is_empty());
        let escape = vec![KeyToPath {
            key: "a".into(),
            path: "../a".into(),
            mode: None,
        }];
        assert!(add_keys(
            &mut p,
            &src(false),
            Some(config_map_data(&cm())),
            Some(&escape),
            0o644
        )
        .is_err());
    }

    #[test]
    fn missing_object() {
        let mut p = Payload::new();
        assert!(matches!(
            add_keys(&mut p, &src(false), None, None, 0o644),
            Err(VolumeError::Missing { .. })
        ));
        add_keys(&mut p, &src(true), None, None, 0o644).unwrap();
        assert!(p.is_empty());
    }

    #[test]
    fn secret_string_data_wins() {
        let s = Secret {
            data: Some(BTreeMap::from([("k".into(), ByteString(b"old".to_vec()))])),
            string_data: Some(BTreeMap::from([("k".into(), "new".into())])),
            ..Default::default()
        };
        assert_eq!(secret_data(&s)["k"], b"new");
    }
}
