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

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, Service, ServiceSpec};

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
    node: &NodeAllocatable,
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

    // The Services' variables: looked up by `$(VAR)` after the container's own, and added
    // last where the container does not define them, as the kubelet does.
    let links = pod.spec.as_ref().and_then(|s| s.enable_service_links);
    let services: Vec<(String, String)> =
        service_env(&store.services(), namespace, links.unwrap_or(true))
            .into_iter()
            .collect();
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => {
                let known = [services.as_slice(), env.vars.as_slice()].concat();
                expand(var.value.as_deref().unwrap_or(""), &known)
            }
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
    for (name, value) in services {
        if !env.vars.iter().any(|(n, _)| *n == name) {
            env.vars.push((name, value));
        }
    }
    Ok(env.vars)
}

/// The Services every pod gets variables for whatever enableServiceLinks says (in `default`).
const MASTER_SERVICES: &[&str] = &["kubernetes"];

/// The Service environment variables the kubelet gives a pod of `namespace` (its
/// `pkg/kubelet/envvars`): `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT` (the first port),
/// `<NAME>_SERVICE_PORT_<PORTNAME>` per named port, and the docker-links `<NAME>_PORT`,
/// `<NAME>_PORT_<port>_<PROTO>{,_PROTO,_PORT,_ADDR}`; for the master service `kubernetes` of
/// `default` always, for the namespace's own Services when enableServiceLinks. Services
/// without a cluster IP (headless) give none. A Service of the pod's namespace named like a
/// master service does not replace the master one.
pub fn service_env(
    services: &[Service],
    namespace: &str,
    enable_service_links: bool,
) -> BTreeMap<String, String> {
    let mut chosen: BTreeMap<&str, &ServiceSpec> = BTreeMap::new();
    for svc in services {
        let (Some(name), Some(spec)) = (svc.metadata.name.as_deref(), svc.spec.as_ref()) else {
            continue;
        };
        let ip = spec.cluster_ip.as_deref().unwrap_or_default();
        if ip.is_empty() || ip == "None" || spec.ports.as_ref().is_none_or(|p| p.is_empty()) {
            continue;
        }
        let svc_ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        if svc_ns == "default" && MASTER_SERVICES.contains(&name) {
            chosen.entry(name).or_insert(spec);
        } else if svc_ns == namespace && enable_service_links {
            chosen.insert(name, spec);
        }
    }
    let var_name = |s: &str| s.replace('-', "_").to_uppercase();
    let mut env = BTreeMap::new();
    for (name, spec) in chosen {
        let ip = spec.cluster_ip.clone().unwrap_or_default();
        let ports = spec.ports.as_deref().unwrap_or_default();
        let prefix = var_name(name);
        env.insert(format!("{prefix}_SERVICE_HOST"), ip.clone());
        env.insert(format!("{prefix}_SERVICE_PORT"), ports[0].port.to_string());
        for p in ports {
            if let Some(port_name) = p.name.as_deref().filter(|n| !n.is_empty()) {
                let key = format!("{prefix}_SERVICE_PORT_{}", var_name(port_name));
                env.insert(key, p.port.to_string());
            }
        }
        let host = match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(_)) => format!("[{ip}]"),
            _ => ip.clone(),
        };
        for (i, p) in ports.iter().enumerate() {
            let protocol = p
                .protocol
                .as_deref()
                .filter(|p| !p.is_empty())
                .unwrap_or("TCP");
            let (lower, upper) = (protocol.to_lowercase(), protocol.to_uppercase());
            let url = format!("{lower}://{host}:{}", p.port);
            if i == 0 {
                env.insert(format!("{prefix}_PORT"), url.clone());
            }
            let port_prefix = format!("{prefix}_PORT_{}_{upper}", p.port);
            env.insert(format!("{port_prefix}_PROTO"), lower);
            env.insert(format!("{port_prefix}_PORT"), p.port.to_string());
            env.insert(format!("{port_prefix}_ADDR"), ip.clone());
            env.insert(port_prefix, url);
        }
    }
    env
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
        ObjectFieldSelector, PodSpec, Secret, SecretEnvSource, SecretKeySelector, ServicePort,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    /// A node unlike the machine running the tests, so a value read from the host shows.
    const NODE: NodeAllocatable = NodeAllocatable {
        cpu_milli: 3000,
        memory: 5 << 30,
        ephemeral_storage: 7 << 30,
    };

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn service(ns: &str, name: &str, ip: &str, ports: &[(&str, i32, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, port, proto)| ServicePort {
                            name: (!n.is_empty()).then(|| n.to_string()),
                            port: *port,
                            protocol: (!proto.is_empty()).then(|| proto.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The master service (one named port) and `fooservice` of `ns` (one unnamed port).
    fn master_and_foo() -> [Service; 2] {
        [
            service(
                "default",
                "kubernetes",
                "10.96.0.1",
                &[("https", 443, "TCP")],
            ),
            service("ns", "fooservice", "10.0.0.11", &[("", 8765, "")]),
        ]
    }

    #[test]
    fn service_links_as_the_kubelet_builds_them() {
        let [master, foo] = master_and_foo();
        let services = [
            master,
            foo,
            service(
                "ns",
                "multi-port",
                "fd00::5",
                &[("", 80, ""), ("dns", 53, "UDP")],
            ),
            service("ns", "headless", "None", &[("", 80, "")]),
            service("other", "elsewhere", "10.0.0.9", &[("", 80, "")]),
        ];
        let env = service_env(&services, "ns", true);
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("10.96.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("443"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT_HTTPS"), Some("443"));
        assert_eq!(get("KUBERNETES_PORT"), Some("tcp://10.96.0.1:443"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP"), Some("tcp://10.96.0.1:443"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP_PROTO"), Some("tcp"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP_PORT"), Some("443"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP_ADDR"), Some("10.96.0.1"));
        assert_eq!(get("FOOSERVICE_SERVICE_HOST"), Some("10.0.0.11"));
        assert_eq!(get("FOOSERVICE_SERVICE_PORT"), Some("8765"));
        assert_eq!(get("FOOSERVICE_PORT"), Some("tcp://10.0.0.11:8765"));
        assert_eq!(get("FOOSERVICE_PORT_8765_TCP_ADDR"), Some("10.0.0.11"));
        assert_eq!(get("MULTI_PORT_SERVICE_PORT_DNS"), Some("53"));
        assert_eq!(get("MULTI_PORT_PORT"), Some("tcp://[fd00::5]:80"));
        assert_eq!(get("MULTI_PORT_PORT_53_UDP"), Some("udp://[fd00::5]:53"));
        assert_eq!(get("MULTI_PORT_PORT_53_UDP_PROTO"), Some("udp"));
        assert!(!env.keys().any(|k| k.starts_with("HEADLESS_")));
        assert!(!env.keys().any(|k| k.starts_with("ELSEWHERE_")));
        assert_eq!(env.len(), 8 + 7 + 12);
        // enableServiceLinks: false keeps only the master service.
        let env = service_env(&services, "ns", false);
        assert_eq!(env.len(), 8);
        assert!(env.keys().all(|k| k.starts_with("KUBERNETES_")));
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

    #[test]
    fn unset_limits_resolve_to_the_nodes_allocatable_as_given() {
        let limit = |resource: &str, name: &str| {
            from(
                EnvVarSource {
                    resource_field_ref: Some(k8s_openapi::api::core::v1::ResourceFieldSelector {
                        resource: resource.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                name,
            )
        };
        let c = Container {
            name: "c".into(),
            env: Some(vec![
                limit("limits.cpu", "CPU"),
                limit("limits.memory", "MEM"),
                limit("limits.ephemeral-storage", "DISK"),
            ]),
            ..Default::default()
        };
        let env = container_env(&pod(c.clone()), &c, &store(), &NODE).unwrap();
        let gib = 1u64 << 30;
        assert_eq!(
            env,
            vars(&[
                ("CPU", "3"),
                ("MEM", &(5 * gib).to_string()),
                ("DISK", &(7 * gib).to_string()),
            ])
        );
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
    fn service_variables_expand_and_come_last() {
        let store = store();
        store.set_services(
            master_and_foo()
                .into_iter()
                .map(|svc| {
                    let key = (
                        svc.metadata.namespace.clone().unwrap(),
                        svc.metadata.name.clone().unwrap(),
                    );
                    (key, svc)
                })
                .collect(),
        );
        let c = Container {
            name: "c".into(),
            env: Some(vec![
                var(
                    "URL",
                    "$(FOOSERVICE_SERVICE_HOST):$(FOOSERVICE_SERVICE_PORT)",
                ),
                var("KUBERNETES_SERVICE_HOST", "mine"),
            ]),
            ..Default::default()
        };
        let mut p = pod(c.clone());
        let env = container_env(&p, &c, &store, &NODE).unwrap();
        assert_eq!(env[0], ("URL".to_string(), "10.0.0.11:8765".to_string()));
        assert_eq!(env[1].1, "mine");
        let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names
                .iter()
                .filter(|n| **n == "KUBERNETES_SERVICE_HOST")
                .count(),
            1
        );
        assert!(names.contains(&"FOOSERVICE_PORT_8765_TCP_ADDR"));
        assert_eq!(env.len(), 2 + 7 + 7);
        p.spec.as_mut().unwrap().enable_service_links = Some(false);
        let env = container_env(&p, &c, &store, &NODE).unwrap();
        assert_eq!(
            env[0].1,
            "$(FOOSERVICE_SERVICE_HOST):$(FOOSERVICE_SERVICE_PORT)"
        );
        assert!(env.iter().all(|(n, _)| !n.starts_with("FOOSERVICE")));
        assert_eq!(env.len(), 2 + 7);
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
        let env = container_env(&p, &c, &store(), &NODE).unwrap();
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
            container_env(&p, &c, &store(), &NODE),
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
            container_env(&p, &c, &store(), &NODE),
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
            container_env(&p, &c, &store(), &NODE),
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
