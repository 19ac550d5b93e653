//! Pod admission, as the kubelet admits a pod before it starts anything: sysctls (the safe set
//! plus `allowedUnsafeSysctls`), then the predicates — the pod's OS (label and `spec.os`), the
//! pod count against `maxPods`, CPU and memory requests against allocatable, and the node
//! selector and required node affinity against the node's labels. A pod that fails gets phase
//! Failed with the kubelet's reason and message (`Pod was rejected: …`) and no worker; the pod
//! manager calls [`NodeAdmission::admit`] once per new pod, in one place.
//!
//! Pure: the node's facts are given, the pods already admitted are passed in.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, NodeSelectorRequirement, NodeSelectorTerm, Pod};

use crate::volume::downward::{parse_quantity_milli, NodeAllocatable};

/// The sysctls the kubelet allows every pod (`SafeSysctlAllowlist`).
pub const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];

/// Why a pod was not admitted: the kubelet's reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    pub message: String,
}

fn reject(reason: &str, message: String) -> Result<(), Rejection> {
    Err(Rejection {
        reason: reason.to_string(),
        message,
    })
}

/// What admission knows about the node.
#[derive(Clone, Debug)]
pub struct NodeAdmission {
    pub max_pods: usize,
    pub allocatable: NodeAllocatable,
    pub labels: BTreeMap<String, String>,
    pub allowed_unsafe_sysctls: Vec<String>,
}

/// The labels the kubelet gives its node, plus the configured ones.
pub fn node_labels(
    node_name: &str,
    configured: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), node_name.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), arch.to_string()),
        ("beta.kubernetes.io/os".to_string(), "linux".to_string()),
        ("beta.kubernetes.io/arch".to_string(), arch.to_string()),
    ]);
    labels.extend(configured.clone());
    labels
}

/// A container's request of `resource` in milli-units (the limit when no request is set, as
/// API defaulting fills it).
fn request(c: &Container, resource: &str) -> i128 {
    let r = c.resources.as_ref();
    let get =
        |m: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| {
            m.and_then(|m| m.get(resource))
                .and_then(|q| parse_quantity_milli(&q.0))
        };
    get(r.and_then(|r| r.requests.as_ref()))
        .or_else(|| get(r.and_then(|r| r.limits.as_ref())))
        .unwrap_or(0)
        .max(0)
}

/// The pod's effective request of `resource` (milli-units), as the scheduler computes it:
/// app containers and sidecars summed, each init container with the sidecars started before
/// it, the larger of the two, plus the overhead.
pub fn pod_request(pod: &Pod, resource: &str) -> i128 {
    let Some(spec) = pod.spec.as_ref() else {
        return 0;
    };
    let mut sidecars: i128 = 0;
    let mut init_peak: i128 = 0;
    for c in spec.init_containers.iter().flatten() {
        let r = request(c, resource);
        if crate::pod::machine::is_sidecar(c) {
            sidecars = sidecars.saturating_add(r);
            init_peak = init_peak.max(sidecars);
        } else {
            init_peak = init_peak.max(sidecars.saturating_add(r));
        }
    }
    let apps: i128 = spec
        .containers
        .iter()
        .map(|c| request(c, resource))
        .fold(0i128, i128::saturating_add);
    let overhead = spec
        .overhead
        .as_ref()
        .and_then(|o| o.get(resource))
        .and_then(|q| parse_quantity_milli(&q.0))
        .unwrap_or(0)
        .max(0);
    apps.saturating_add(sidecars)
        .max(init_peak)
        .saturating_add(overhead)
}

fn sysctl_allowed(name: &str, allowed: &[String]) -> bool {
    SAFE_SYSCTLS.contains(&name)
        || allowed.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => a == name,
        })
}

fn ipc_sysctl(name: &str) -> bool {
    name.starts_with("kernel.shm")
        || name.starts_with("kernel.msg")
        || name == "kernel.sem"
        || name.starts_with("fs.mqueue.")
}

fn requirement_matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.as_deref().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if req.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

fn term_matches(
    term: &NodeSelectorTerm,
    node_name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(node_name)))
}

impl NodeAdmission {
    /// Admits `pod` beside `admitted` (the pods already running here), or says why not.
    pub fn admit(&self, pod: &Pod, admitted: &[&Pod]) -> Result<(), Rejection> {
        let Some(spec) = pod.spec.as_ref() else {
            return Ok(());
        };
        // Sysctls (the kubelet's sysctl admit handler comes before the predicates).
        let security = spec.security_context.as_ref();
        for s in security
            .and_then(|s| s.sysctls.as_ref())
            .into_iter()
            .flatten()
        {
            let name = s.name.replace('/', ".");
            if !sysctl_allowed(&name, &self.allowed_unsafe_sysctls) {
                return reject(
                    "SysctlForbidden",
                    format!("forbidden sysctl: {name:?} not allowlisted"),
                );
            }
            if spec.host_network == Some(true) && name.starts_with("net.") {
                return reject(
                    "SysctlForbidden",
                    format!("forbidden sysctl: {name:?} not allowed with host net enabled"),
                );
            }
            if spec.host_ipc == Some(true) && ipc_sysctl(&name) {
                return reject(
                    "SysctlForbidden",
                    format!("forbidden sysctl: {name:?} not allowed with host ipc enabled"),
                );
            }
        }
        let node_os = self
            .labels
            .get("kubernetes.io/os")
            .map_or("linux", String::as_str);
        if let Some(os) = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/os"))
        {
            if os != node_os {
                return reject(
                    "PodOSSelectorNodeLabelDoesNotMatch",
                    "Failed to admit pod as the `kubernetes.io/os` label doesn't match node label"
                        .into(),
                );
            }
        }
        if spec.os.as_ref().is_some_and(|os| os.name != "linux") {
            return reject(
                "PodOSNotSupported",
                "Failed to admit pod as the OS field doesn't match node OS".into(),
            );
        }
        // Resources: the pod count first, then CPU and memory.
        let insufficient = |name: &str, requested: i128, used: i128, capacity: i128| {
            format!(
                "Node didn't have enough resource: {name}, requested: {requested}, used: {used}, capacity: {capacity}"
            )
        };
        if admitted.len() + 1 > self.max_pods {
            return reject(
                "OutOfpods",
                insufficient("pods", 1, admitted.len() as i128, self.max_pods as i128),
            );
        }
        let cpu = pod_request(pod, "cpu");
        let used_cpu: i128 = admitted.iter().map(|p| pod_request(p, "cpu")).sum();
        let cap_cpu = self.allocatable.cpu_milli;
        if cpu > 0 && cpu > cap_cpu - used_cpu {
            return reject("OutOfcpu", insufficient("cpu", cpu, used_cpu, cap_cpu));
        }
        // Memory in bytes (the quantities are parsed in milli-units).
        let memory = pod_request(pod, "memory") / 1000;
        let used_memory: i128 = admitted
            .iter()
            .map(|p| pod_request(p, "memory") / 1000)
            .sum();
        let cap_memory = self.allocatable.memory;
        if memory > 0 && memory > cap_memory - used_memory {
            return reject(
                "OutOfmemory",
                insufficient("memory", memory, used_memory, cap_memory),
            );
        }
        // Node selector and required node affinity.
        let node_name = self
            .labels
            .get("kubernetes.io/hostname")
            .map_or("", String::as_str);
        let selector_ok = spec
            .node_selector
            .iter()
            .flatten()
            .all(|(k, v)| self.labels.get(k) == Some(v));
        let required = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            });
        let affinity_ok = required.is_none_or(|r| {
            r.node_selector_terms
                .iter()
                .any(|t| term_matches(t, node_name, &self.labels))
        });
        if !selector_ok || !affinity_ok {
            return reject(
                "NodeAffinity",
                "Predicate NodeAffinity failed: node(s) didn't match Pod's node affinity/selector"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(max_pods: usize) -> NodeAdmission {
        NodeAdmission {
            max_pods,
            allocatable: NodeAllocatable {
                cpu_milli: 2000,
                memory: 4 << 30,
                ephemeral_storage: 0,
            },
            labels: node_labels("node-1", &BTreeMap::from([("disk".into(), "ssd".into())])),
            allowed_unsafe_sysctls: vec!["kernel.msgmnb".into(), "net.core.*".into()],
        }
    }

    fn pod(extra_spec: &str) -> Pod {
        let text = format!(
            "metadata: {{name: p}}\nspec:\n  containers:\n  - name: c\n    image: i\n{extra_spec}"
        );
        let v = crate::source::yaml::documents(&text, crate::source::yaml::LIMITS)
            .unwrap()
            .remove(0);
        crate::source::yaml::typed(v).unwrap()
    }

    fn rejected(p: &Pod, admitted: &[&Pod], n: &NodeAdmission) -> (String, String) {
        let r = n.admit(p, admitted).unwrap_err();
        (r.reason, r.message)
    }

    #[test]
    fn sysctls_outside_the_safe_set_need_the_allowlist() {
        let n = node(110);
        let sysctl = |name: &str| {
            pod(&format!(
                "  securityContext:\n    sysctls: [{{name: {name}, value: '1'}}]\n"
            ))
        };
        assert_eq!(
            rejected(&sysctl("kernel.msgmax"), &[], &n),
            (
                "SysctlForbidden".into(),
                "forbidden sysctl: \"kernel.msgmax\" not allowlisted".into()
            )
        );
        for ok in [
            "kernel.shm_rmid_forced",
            "kernel.msgmnb",
            "net.core.somaxconn",
        ] {
            assert_eq!(n.admit(&sysctl(ok), &[]), Ok(()), "{ok}");
        }
        let host_net = pod("  hostNetwork: true\n  securityContext:\n    sysctls: [{name: net.ipv4.tcp_syncookies, value: '1'}]\n");
        assert!(rejected(&host_net, &[], &n)
            .1
            .contains("not allowed with host net enabled"));
    }

    #[test]
    fn a_pod_for_another_os_is_refused() {
        let n = node(110);
        assert_eq!(
            rejected(&pod("  os: {name: windows}\n"), &[], &n),
            (
                "PodOSNotSupported".into(),
                "Failed to admit pod as the OS field doesn't match node OS".into()
            )
        );
        assert_eq!(n.admit(&pod("  os: {name: linux}\n"), &[]), Ok(()));
    }

    #[test]
    fn pods_past_max_pods_and_requests_past_allocatable_are_refused() {
        let n = node(2);
        let small = pod("");
        assert_eq!(n.admit(&small, &[&small]), Ok(()));
        assert_eq!(
            rejected(&small, &[&small, &small], &n),
            (
                "OutOfpods".into(),
                "Node didn't have enough resource: pods, requested: 1, used: 2, capacity: 2".into()
            )
        );
        let n = node(110);
        let cpu = pod("    resources: {requests: {cpu: 1500m}}\n");
        assert_eq!(n.admit(&cpu, &[]), Ok(()));
        assert_eq!(
            rejected(&cpu, &[&cpu], &n),
            (
                "OutOfcpu".into(),
                "Node didn't have enough resource: cpu, requested: 1500, used: 1500, capacity: 2000"
                    .into()
            )
        );
        let limit_only = pod("    resources: {limits: {memory: 5Gi}}\n");
        let (reason, message) = rejected(&limit_only, &[], &n);
        assert_eq!(reason, "OutOfmemory");
        assert!(
            message.contains("requested: 5368709120, used: 0, capacity: 4294967296"),
            "{message}"
        );
        let init = pod(
            "  initContainers:\n  - name: i\n    image: i\n    resources: {requests: {cpu: '3'}}\n",
        );
        assert_eq!(rejected(&init, &[], &n).0, "OutOfcpu");
    }

    #[test]
    fn node_selector_and_required_affinity_must_match_the_node() {
        let n = node(110);
        assert_eq!(n.admit(&pod("  nodeSelector: {disk: ssd}\n"), &[]), Ok(()));
        assert_eq!(
            rejected(&pod("  nodeSelector: {disk: hdd}\n"), &[], &n),
            (
                "NodeAffinity".into(),
                "Predicate NodeAffinity failed: node(s) didn't match Pod's node affinity/selector"
                    .into()
            )
        );
        let affinity = |op: &str, values: &str| {
            pod(&format!(
                "  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n        - matchExpressions: [{{key: kubernetes.io/hostname, operator: {op}, values: {values}}}]\n"
            ))
        };
        assert_eq!(n.admit(&affinity("In", "[node-1]"), &[]), Ok(()));
        assert_eq!(n.admit(&affinity("NotIn", "[node-2]"), &[]), Ok(()));
        assert_eq!(
            rejected(&affinity("In", "[node-2]"), &[], &n).0,
            "NodeAffinity"
        );
        assert_eq!(
            rejected(&affinity("DoesNotExist", "[]"), &[], &n).0,
            "NodeAffinity"
        );
    }
}
