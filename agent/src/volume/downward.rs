//! Downward API field resolution, shared by the downwardAPI/projected volumes and by container
//! env (`pod::env`): `fieldRef` paths, `resourceFieldRef` with divisors, the kubelet's
//! `key="value"` map format, and the node capacity used as the default limit.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{Container, ObjectFieldSelector, Pod, ResourceFieldSelector};

/// Why a field could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// The field path is not one the downward API supports.
    #[error("unsupported field path {0:?}")]
    UnsupportedField(String),
    /// The resource name is not one the downward API supports.
    #[error("unsupported resource {0:?}")]
    UnsupportedResource(String),
    /// resourceFieldRef names a container the pod does not have.
    #[error("container {0:?} not found in pod")]
    NoContainer(String),
    /// A quantity (divisor or resource value) could not be parsed.
    #[error("invalid quantity {0:?}")]
    BadQuantity(String),
}

/// Resolves a `fieldRef` against the pod. Supports metadata.name, namespace, uid, labels,
/// annotations (whole map in the kubelet's `key="value"` format, or one key with
/// `metadata.labels['k']`), spec.nodeName, spec.serviceAccountName, status.hostIP(s) and
/// status.podIP(s). Upstream API validation allows the spec/status paths for env only; the
/// resolution itself is shared, so a volume asking for them gets the same value.
pub fn field_value(pod: &Pod, selector: &ObjectFieldSelector) -> Result<String, FieldError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let path = selector.field_path.as_str();
    if let Some((map, key)) = subscript(path) {
        let source = match map {
            "metadata.labels" => meta.labels.as_ref(),
            "metadata.annotations" => meta.annotations.as_ref(),
            _ => return Err(FieldError::UnsupportedField(path.to_string())),
        };
        return Ok(source.and_then(|m| m.get(key)).cloned().unwrap_or_default());
    }
    let empty = BTreeMap::new();
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(meta.labels.as_ref().unwrap_or(&empty)),
        "metadata.annotations" => format_map(meta.annotations.as_ref().unwrap_or(&empty)),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.hostIPs" => status
            .and_then(|s| s.host_ips.as_ref())
            .map(|ips| join_ips(ips.iter().map(|i| i.ip.as_str())))
            .unwrap_or_default(),
        "status.podIPs" => status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| join_ips(ips.iter().map(|i| i.ip.as_str())))
            .unwrap_or_default(),
        _ => return Err(FieldError::UnsupportedField(path.to_string())),
    };
    Ok(value)
}

fn join_ips<'a>(ips: impl Iterator<Item = &'a str>) -> String {
    ips.collect::<Vec<_>>().join(",")
}

/// Splits `metadata.labels['key']` into ("metadata.labels", "key").
fn subscript(path: &str) -> Option<(&str, &str)> {
    let open = path.find("['")?;
    let rest = path[open + 2..].strip_suffix("']")?;
    Some((&path[..open], rest))
}

/// The kubelet's map format: `key="value"` lines sorted by key, values quoted as Go's `%q`,
/// no trailing newline.
pub fn format_map(map: &BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Quotes like Go's `strconv.Quote`: printable characters as they are, the usual short
/// escapes, `\xNN` for other control bytes below 0x80 and `\uNNNN`/`\UNNNNNNNN` beyond.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => {
                if (c as u32) <= 0xffff {
                    out.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    out.push_str(&format!("\\U{:08x}", c as u32));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The node's allocatable resources, the default for unset limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeAllocatable {
    /// CPU in millicores.
    pub cpu_milli: i128,
    /// Memory in bytes.
    pub memory: i128,
    /// Ephemeral storage in bytes (the filesystem holding the agent's root dir).
    pub ephemeral_storage: i128,
}

impl NodeAllocatable {
    /// Reads CPU count and MemTotal (`crate::host`) and the size of the filesystem at `root`.
    pub fn from_host(root: &Path) -> Self {
        let cpus = crate::host::cpus();
        let memory = i128::from(crate::host::memory_total());
        Self {
            cpu_milli: cpus as i128 * 1000,
            memory,
            ephemeral_storage: i128::from(crate::host::filesystem(root).0),
        }
    }
}

/// Resolves a `resourceFieldRef` for `default_container` (the env's own container) or the
/// container the selector names, as the kubelet does: unset limits default to the node's
/// allocatable, unset requests to the limit the user gave (API defaulting) or 0; the value is
/// divided by the divisor (default 1) and rounded up.
pub fn resource_value(
    pod: &Pod,
    default_container: Option<&Container>,
    selector: &ResourceFieldSelector,
    node: &NodeAllocatable,
) -> Result<String, FieldError> {
    let container = match selector.container_name.as_deref().filter(|n| !n.is_empty()) {
        Some(name) => find_container(pod, name).ok_or(FieldError::NoContainer(name.into()))?,
        None => default_container.ok_or_else(|| FieldError::NoContainer(String::new()))?,
    };
    let (kind, resource) = selector
        .resource
        .split_once('.')
        .ok_or_else(|| FieldError::UnsupportedResource(selector.resource.clone()))?;
    let cpu = resource == "cpu";
    if !matches!(kind, "limits" | "requests")
        || !(cpu
            || resource == "memory"
            || resource == "ephemeral-storage"
            || resource.starts_with("hugepages-"))
    {
        return Err(FieldError::UnsupportedResource(selector.resource.clone()));
    }
    let res = container.resources.as_ref();
    let get = |m: Option<
        &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >| {
        m.and_then(|m| m.get(resource))
            .map(|q| parse_quantity_milli(&q.0).ok_or_else(|| FieldError::BadQuantity(q.0.clone())))
            .transpose()
    };
    let limit = get(res.and_then(|r| r.limits.as_ref()))?;
    let value = if kind == "limits" {
        match limit {
            Some(v) => v,
            None => match resource {
                "cpu" => node.cpu_milli,
                "memory" => node.memory * 1000,
                "ephemeral-storage" => node.ephemeral_storage * 1000,
                _ => 0,
            },
        }
    } else {
        get(res.and_then(|r| r.requests.as_ref()))?
            .or(limit)
            .unwrap_or(0)
    };
    // `divisor` is a non-pointer Quantity, so the API server stores "0" when none was given;
    // the kubelet reads any zero divisor as 1.
    let divisor = match selector.divisor.as_ref() {
        Some(q) => match parse_quantity_milli(&q.0) {
            Some(0) => 1000,
            Some(d) if d > 0 => d,
            _ => return Err(FieldError::BadQuantity(q.0.clone())),
        },
        None => 1000,
    };
    let result = if cpu {
        // CPU divides the milli-values and rounds up.
        div_ceil(value, divisor)
    } else {
        // Memory-like resources divide whole units (bytes), each rounded up first.
        div_ceil(div_ceil(value, 1000), div_ceil(divisor, 1000).max(1))
    };
    Ok(result.to_string())
}

fn find_container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
}

fn div_ceil(a: i128, b: i128) -> i128 {
    let q = a / b;
    if (a % b != 0) && ((a < 0) == (b < 0)) {
        q + 1
    } else {
        q
    }
}

/// Parses a Kubernetes quantity ("100m", "1.5Gi", "2e3", "64Mi") into thousandths of the base
/// unit, rounded up. None for a malformed quantity.
pub fn parse_quantity_milli(s: &str) -> Option<i128> {
    let s = s.trim();
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(num_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return None;
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let digits = format!("{int_part}{frac_part}");
    if digits.len() > 30 {
        return None;
    }
    let mantissa: i128 = digits.parse().ok()?;
    // value = mantissa * 10^(exp10 - frac_len) * 2^exp2
    let (exp10, exp2): (i32, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        s if s.starts_with(['e', 'E']) => (s[1..].parse().ok()?, 0),
        _ => return None,
    };
    // milli: multiply by 10^3.
    let exp = exp10 + 3 - frac_part.len() as i32;
    let scaled = mantissa.checked_mul(1i128.checked_shl(exp2)?)?;
    let value = if exp >= 0 {
        scaled.checked_mul(10i128.checked_pow(exp as u32)?)?
    } else {
        div_ceil(scaled, 10i128.checked_pow((-exp) as u32)?)
    };
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("u-1".into()),
                labels: Some(BTreeMap::from([
                    ("app".into(), "web".into()),
                    ("tier".into(), "a \"b\"\n".into()),
                ])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                containers: vec![Container {
                    name: "c".into(),
                    resources: Some(ResourceRequirements {
                        limits: Some(BTreeMap::from([
                            ("cpu".into(), Quantity("500m".into())),
                            ("memory".into(), Quantity("64Mi".into())),
                        ])),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some("10.233.0.5".into()),
                ..Default::default()
            }),
        }
    }

    fn field(path: &str) -> ObjectFieldSelector {
        ObjectFieldSelector {
            field_path: path.into(),
            api_version: None,
        }
    }

    #[test]
    fn labels_in_kubelet_format() {
        let v = field_value(&pod(), &field("metadata.labels")).unwrap();
        assert_eq!(v, "app=\"web\"\ntier=\"a \\\"b\\\"\\n\"");
        assert_eq!(
            field_value(&pod(), &field("metadata.labels['app']")).unwrap(),
            "web"
        );
        assert_eq!(
            field_value(&pod(), &field("metadata.annotations")).unwrap(),
            ""
        );
    }

    #[test]
    fn scalar_fields() {
        let p = pod();
        assert_eq!(field_value(&p, &field("metadata.name")).unwrap(), "web");
        assert_eq!(field_value(&p, &field("metadata.uid")).unwrap(), "u-1");
        assert_eq!(field_value(&p, &field("spec.nodeName")).unwrap(), "node-1");
        assert_eq!(
            field_value(&p, &field("status.podIP")).unwrap(),
            "10.233.0.5"
        );
        assert!(matches!(
            field_value(&p, &field("spec.bogus")),
            Err(FieldError::UnsupportedField(_))
        ));
    }

    #[test]
    fn go_quote_escapes() {
        assert_eq!(go_quote("a\tb\u{1}é"), "\"a\\tb\\x01é\"");
        assert_eq!(go_quote("\\"), "\"\\\\\"");
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity_milli("100m"), Some(100));
        assert_eq!(parse_quantity_milli("1"), Some(1000));
        assert_eq!(parse_quantity_milli("1.5"), Some(1500));
        assert_eq!(parse_quantity_milli("1Ki"), Some(1_024_000));
        assert_eq!(parse_quantity_milli("2e3"), Some(2_000_000));
        assert_eq!(parse_quantity_milli("1n"), Some(1));
        assert_eq!(parse_quantity_milli("1Ei"), Some((1i128 << 60) * 1000));
        assert_eq!(parse_quantity_milli("abc"), None);
        assert_eq!(parse_quantity_milli("1Zi"), None);
    }

    fn res(resource: &str, divisor: Option<&str>) -> ResourceFieldSelector {
        ResourceFieldSelector {
            container_name: None,
            divisor: divisor.map(|d| Quantity(d.into())),
            resource: resource.into(),
        }
    }

    #[test]
    fn resources_with_divisors_and_defaults() {
        let p = pod();
        let c = &p.spec.as_ref().unwrap().containers[0];
        let node = NodeAllocatable {
            cpu_milli: 2000,
            memory: 8 << 30,
            ephemeral_storage: 1 << 40,
        };
        let get = |r, d| resource_value(&p, Some(c), &res(r, d), &node).unwrap();
        assert_eq!(get("limits.cpu", None), "1"); // 500m rounds up
        assert_eq!(get("limits.cpu", Some("1m")), "500");
        assert_eq!(get("limits.memory", None), (64u64 << 20).to_string());
        assert_eq!(get("limits.memory", Some("1Mi")), "64");
        assert_eq!(get("requests.memory", Some("1Mi")), "64"); // defaulted to the limit
        assert_eq!(get("requests.cpu", Some("1m")), "500");
        assert_eq!(get("limits.ephemeral-storage", Some("1Gi")), "1024");
        assert_eq!(get("requests.ephemeral-storage", None), "0");
        let mut p2 = p.clone();
        p2.spec.as_mut().unwrap().containers[0].resources = None;
        let c2 = &p2.spec.as_ref().unwrap().containers[0];
        let v = resource_value(&p2, Some(c2), &res("limits.cpu", None), &node).unwrap();
        assert_eq!(v, "2"); // node allocatable
        assert!(resource_value(&p, Some(c), &res("limits.gpu", None), &node).is_err());
    }

    fn cpu_memory(cpu: &str, memory: &str) -> Option<BTreeMap<String, Quantity>> {
        Some(BTreeMap::from([
            ("cpu".into(), Quantity(cpu.into())),
            ("memory".into(), Quantity(memory.into())),
        ]))
    }

    /// The upstream Downward API specs' container: requests 250m/32Mi, limits 1250m/64Mi.
    fn conformance_pod(limits: bool) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "client-container".into(),
                    resources: Some(ResourceRequirements {
                        requests: cpu_memory("250m", "32Mi"),
                        limits: if limits {
                            cpu_memory("1250m", "64Mi")
                        } else {
                            None
                        },
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn stored(resource: &str, divisor: &str) -> ResourceFieldSelector {
        ResourceFieldSelector {
            container_name: Some("client-container".into()),
            divisor: Some(Quantity(divisor.into())),
            resource: resource.into(),
        }
    }

    #[test]
    fn zero_divisor_reads_as_one_with_kubelet_rounding() {
        let node = NodeAllocatable {
            cpu_milli: 4000,
            memory: 8 << 30,
            ephemeral_storage: 1 << 40,
        };
        let pod = conformance_pod(true);
        let c = &pod.spec.as_ref().unwrap().containers[0];
        for zero in ["0", "0m", "0Mi"] {
            let get = |r| resource_value(&pod, Some(c), &stored(r, zero), &node).unwrap();
            assert_eq!(get("limits.cpu"), "2", "divisor {zero}");
            assert_eq!(get("limits.memory"), "67108864");
            assert_eq!(get("requests.cpu"), "1");
            assert_eq!(get("requests.memory"), "33554432");
        }
        // The volume form names the container and has no default one.
        let v = resource_value(&pod, None, &stored("limits.memory", "0"), &node).unwrap();
        assert_eq!(v, "67108864");
        // No limits: node allocatable, still divided by one.
        let pod = conformance_pod(false);
        let get = |r| resource_value(&pod, None, &stored(r, "0"), &node).unwrap();
        assert_eq!(get("limits.cpu"), "4");
        assert_eq!(get("limits.memory"), (8u64 << 30).to_string());
        // A negative divisor is still refused.
        assert!(resource_value(&pod, None, &stored("limits.cpu", "-1"), &node).is_err());
    }
}
