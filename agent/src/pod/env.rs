//! Container environment: env and envFrom resolved against the object store (ConfigMaps,
//! Secrets) and the downward API (fieldRef, resourceFieldRef), and `$(VAR)` expansion for
//! command, args and env values, as the kubelet does.
//!
//! Order and precedence as upstream: envFrom sources first, then env; a later definition of a
//! name replaces the earlier value (the name keeps its first position); each env value is
//! expanded against the variables defined before it. envFrom keys that are not valid variable
//! names (with Kubernetes 1.34's relaxed rule: printable ASCII except '=') are skipped.
//!
//! OWNER: volumes helper (shares field resolution with the downwardAPI volume).

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::store::ObjectStore;
use crate::volume::downward::{self, NodeAllocatable};

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A non-optional ConfigMap/Secret or key is missing: CreateContainerConfigError.
    #[error("{kind} {name:?} {detail}")]
    Missing {
        kind: &'static str,
        name: String,
        detail: String,
    },
    /// An unsupported or malformed field path.
    #[error("{0}")]
    Invalid(String),
}

/// Relaxed env var name validation (RelaxedEnvironmentVariableValidation, on by default since
/// 1.32): non-empty, printable ASCII, no '='.
pub fn is_valid_env_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (32..=126).contains(&b) && b != b'=')
}

/// An ordered environment where a redefinition replaces the value in place.
#[derive(Default)]
struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    fn set(&mut self, name: String, value: String) {
        match self.vars.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name, value)),
        }
    }
}

/// The container's environment in order (envFrom first, then env), values expanded.
pub fn container_env(
    pod: &Pod,
    container: &Container,
    store: &ObjectStore,
) -> Result<Vec<(String, String)>, EnvError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut env = Env::default();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        let (kind, name, optional, data) = if let Some(r) = &from.config_map_ref {
            let data = store
                .config_map(namespace, &r.name)
                .map(|cm| cm.data.unwrap_or_default().into_iter().collect::<Vec<_>>());
            (
                "configmap",
                r.name.clone(),
                r.optional.unwrap_or(false),
                data,
            )
        } else if let Some(r) = &from.secret_ref {
            let data = store.secret(namespace, &r.name).map(|s| {
                crate::volume::secret_values(&s)
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                    .collect::<Vec<_>>()
            });
            ("secret", r.name.clone(), r.optional.unwrap_or(false), data)
        } else {
            continue;
        };
        let Some(data) = data else {
            if optional {
                continue;
            }
            return Err(EnvError::Missing {
                kind,
                name,
                detail: "not found".into(),
            });
        };
        let mut invalid = Vec::new();
        for (k, v) in data {
            let key = format!("{prefix}{k}");
            if is_valid_env_name(&key) {
                env.set(key, v);
            } else {
                invalid.push(key);
            }
        }
        if !invalid.is_empty() {
            tracing::warn!(
                pod = pod.metadata.name.as_deref().unwrap_or_default(),
                container = %container.name,
                %kind,
                source = %name,
                keys = ?invalid,
                "skipped invalid environment variable names"
            );
        }
    }

    let mut node: Option<NodeAllocatable> = None;
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => expand(var.value.as_deref().unwrap_or(""), &env.vars),
            Some(src) => {
                if let Some(r) = &src.config_map_key_ref {
                    let value = store
                        .config_map(namespace, &r.name)
                        .ok_or("not found")
                        .and_then(|cm| {
                            cm.data
                                .and_then(|d| d.get(&r.key).cloned())
                                .ok_or("has no such key")
                        });
                    match value {
                        Ok(v) => v,
                        Err(_) if r.optional.unwrap_or(false) => continue,
                        Err(why) => {
                            return Err(EnvError::Missing {
                                kind: "configmap",
                                name: r.name.clone(),
                                detail: format!("{why} (key {:?})", r.key),
                            })
                        }
                    }
                } else if let Some(r) = &src.secret_key_ref {
                    let value = store
                        .secret(namespace, &r.name)
                        .ok_or("not found")
                        .and_then(|s| {
                            crate::volume::secret_values(&s)
                                .remove(&r.key)
                                .ok_or("has no such key")
                        });
                    match value {
                        Ok(v) => String::from_utf8_lossy(&v).into_owned(),
                        Err(_) if r.optional.unwrap_or(false) => continue,
                        Err(why) => {
                            return Err(EnvError::Missing {
                                kind: "secret",
                                name: r.name.clone(),
                                detail: format!("{why} (key {:?})", r.key),
                            })
                        }
                    }
                } else if let Some(f) = &src.field_ref {
                    downward::field_value(pod, f)
                        .map_err(|e| EnvError::Invalid(format!("env {}: {e}", var.name)))?
                } else if let Some(r) = &src.resource_field_ref {
                    let root = std::path::Path::new("/");
                    let node = node.get_or_insert_with(|| NodeAllocatable::from_host(root));
                    downward::resource_value(pod, Some(container), r, node)
                        .map_err(|e| EnvError::Invalid(format!("env {}: {e}", var.name)))?
                } else {
                    return Err(EnvError::Invalid(format!(
                        "env {}: unsupported valueFrom source",
                        var.name
                    )));
                }
            }
        };
        env.set(var.name.clone(), value);
    }
    Ok(env.vars)
}

/// `$(VAR)` expansion with `$$` escaping, for command and args. Unknown variables and
/// unterminated references stay as written; `$` before anything else stays too.
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        match after.chars().next() {
            // A lone '$' at the end.
            None => {
                out.push('$');
                rest = after;
            }
            Some('$') => {
                out.push('$');
                rest = &after[1..];
            }
            Some('(') => match after.find(')') {
                Some(close) => {
                    let name = &after[1..close];
                    match lookup(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &after[close + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = &after[1..];
                }
            },
            Some(c) => {
                out.push('$');
                out.push(c);
                rest = &after[c.len_utf8()..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Objects;
    use k8s_openapi::api::core::v1::{
        ConfigMap, ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource,
        ObjectFieldSelector, PodSpec, Secret, SecretEnvSource, SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn expansion_semantics() {
        let env = vars(&[("A", "1"), ("B", "two")]);
        assert_eq!(expand("$(A)-$(B)", &env), "1-two");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$$$(A)", &env), "$1");
        assert_eq!(expand("$(UNKNOWN)", &env), "$(UNKNOWN)");
        assert_eq!(expand("$(A", &env), "$(A");
        assert_eq!(expand("$A $", &env), "$A $");
        assert_eq!(expand("x$(A)y$(A)z", &env), "x1y1z");
        assert_eq!(expand("$()", &env), "$()");
        assert_eq!(expand("é$(B)é", &env), "étwoé");
    }

    fn store() -> ObjectStore {
        let mut o = Objects::default();
        o.config_maps.insert(
            ("ns".into(), "cm".into()),
            ConfigMap {
                data: Some(BTreeMap::from([
                    ("HOST".into(), "db".into()),
                    ("bad=key".into(), "x".into()),
                    ("PORT".into(), "5432".into()),
                ])),
                ..Default::default()
            },
        );
        o.secrets.insert(
            ("ns".into(), "sec".into()),
            Secret {
                data: Some(BTreeMap::from([(
                    "PASS".into(),
                    ByteString(b"hunter2".to_vec()),
                )])),
                ..Default::default()
            },
        );
        let s = ObjectStore::new();
        s.replace(o);
        s
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn from(src: EnvVarSource, name: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(src),
        }
    }

    fn pod(container: Container) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![container],
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn full_resolution() {
        let c = Container {
            name: "c".into(),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cm".into(),
                    optional: None,
                }),
                prefix: Some("DB_".into()),
                secret_ref: None,
            }]),
            env: Some(vec![
                var("URL", "$(DB_HOST):$(DB_PORT)"),
                var("DB_HOST", "override"),
                from(
                    EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "sec".into(),
                            key: "PASS".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    },
                    "PW",
                ),
                from(
                    EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            api_version: None,
                            field_path: "metadata.namespace".into(),
                        }),
                        ..Default::default()
                    },
                    "NS",
                ),
                from(
                    EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "cm".into(),
                            key: "nope".into(),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    },
                    "SKIPPED",
                ),
            ]),
            ..Default::default()
        };
        let p = pod(c.clone());
        let env = container_env(&p, &c, &store()).unwrap();
        assert_eq!(
            env,
            vars(&[
                ("DB_HOST", "override"),
                ("DB_PORT", "5432"),
                ("URL", "db:5432"),
                ("PW", "hunter2"),
                ("NS", "ns"),
            ])
        );
    }

    #[test]
    fn missing_sources() {
        let mut c = Container {
            name: "c".into(),
            env: Some(vec![from(
                EnvVarSource {
                    config_map_key_ref: Some(ConfigMapKeySelector {
                        name: "cm".into(),
                        key: "nope".into(),
                        optional: None,
                    }),
                    ..Default::default()
                },
                "X",
            )]),
            ..Default::default()
        };
        let p = pod(c.clone());
        assert!(matches!(
            container_env(&p, &c, &store()),
            Err(EnvError::Missing {
                kind: "configmap",
                ..
            })
        ));
        c.env = None;
        c.env_from = Some(vec![EnvFromSource {
            config_map_ref: None,
            prefix: None,
            secret_ref: Some(SecretEnvSource {
                name: "absent".into(),
                optional: None,
            }),
        }]);
        assert!(matches!(
            container_env(&p, &c, &store()),
            Err(EnvError::Missing { kind: "secret", .. })
        ));
        c.env_from = None;
        c.env = Some(vec![from(
            EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    api_version: None,
                    field_path: "spec.bogus".into(),
                }),
                ..Default::default()
            },
            "X",
        )]);
        assert!(matches!(
            container_env(&p, &c, &store()),
            Err(EnvError::Invalid(_))
        ));
    }

    #[test]
    fn env_names() {
        assert!(is_valid_env_name("Logging:LogLevel"));
        assert!(is_valid_env_name("a.b-c"));
        assert!(!is_valid_env_name("a=b"));
        assert!(!is_valid_env_name(""));
        assert!(!is_valid_env_name("tab\there"));
    }
}
