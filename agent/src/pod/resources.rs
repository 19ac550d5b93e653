//! What follows from resource quantities: QoS class, cgroup CPU shares/quota, memory
//! limit and OOM score, computed as the kubelet does. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::machine;
use crate::runtime::Resources;
use crate::volume::downward::parse_quantity_milli as milli;

type Quantities = BTreeMap<String, Quantity>;

/// (requests, limits) of cpu (millicores) and memory (bytes), requests defaulting to limits.
fn cpu_mem(c: &Container) -> [(Option<i128>, Option<i128>); 2] {
    let r = c.resources.as_ref();
    let requests = r.and_then(|r| r.requests.as_ref());
    let limits = r.and_then(|r| r.limits.as_ref());
    let read = |m: Option<&Quantities>, key: &str, div: i128| {
        m.and_then(|m| m.get(key))
            .and_then(|q| milli(&q.0))
            .map(|v| v / div)
    };
    let pick = |key: &str, div: i128| {
        let limit = read(limits, key, div);
        (read(requests, key, div).or(limit), limit)
    };
    [pick("cpu", 1), pick("memory", 1000)]
}

/// BestEffort, Burstable or Guaranteed.
pub fn qos_class(pod: &Pod) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for (_, c) in machine::containers(pod) {
        for (request, limit) in cpu_mem(c) {
            let request = request.filter(|v| *v != 0);
            let limit = limit.filter(|v| *v != 0);
            any |= request.is_some() || limit.is_some();
            guaranteed &= limit.is_some() && request == limit;
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// The cgroup resources of one container; `node_memory` (bytes) scales the Burstable OOM score.
pub fn container_resources(pod: &Pod, c: &Container, node_memory: u64) -> Resources {
    let [(cpu_req, cpu_lim), (mem_req, mem_lim)] = cpu_mem(c);
    const PERIOD: u64 = 100_000;
    let oom_score_adj = match qos_class(pod) {
        "Guaranteed" => -997,
        "BestEffort" => 1000,
        _ => {
            let req = mem_req.unwrap_or(0).max(0) as u64;
            let score = 1000 - (1000 * req / node_memory.max(1)) as i64;
            score.clamp(2, 999) as i32
        }
    };
    Resources {
        cpu_shares: Some(cpu_req.map_or(2, |m| (m * 1024 / 1000).max(2) as u64)),
        cpu_quota: cpu_lim.map(|m| ((m * PERIOD as i128) / 1000).max(1000) as i64),
        cpu_period: cpu_lim.map(|_| PERIOD),
        memory_limit: mem_lim.map(|b| b as i64),
        oom_score_adj: oom_score_adj.max(0),
    }
}

/// The pod's requests (or limits) as the kubelet's PodRequests/PodLimits aggregate them for
/// `status.allocatedResources` and `status.resources`: app containers and sidecars summed, each
/// init container with the sidecars started before it, the larger of the two, the overhead
/// added (to limits only where one is set), pod-level `spec.resources` taking precedence.
pub fn pod_aggregate(pod: &Pod, limits: bool) -> Quantities {
    let Some(spec) = pod.spec.as_ref() else {
        return Quantities::new();
    };
    let list = |c: &Container| -> Quantities {
        let r = c.resources.as_ref();
        let (req, lim) = (
            r.and_then(|r| r.requests.clone()),
            r.and_then(|r| r.limits.clone()),
        );
        match limits {
            true => lim.unwrap_or_default(),
            // Requests default to limits (API defaulting; manifest pods are not defaulted).
            false => lim
                .into_iter()
                .flatten()
                .chain(req.into_iter().flatten())
                .collect(),
        }
    };
    // name -> (milli value, binary format)
    let mut total: BTreeMap<String, (i128, bool)> = BTreeMap::new();
    let mut sidecars: BTreeMap<String, (i128, bool)> = BTreeMap::new();
    let mut init_peak: BTreeMap<String, (i128, bool)> = BTreeMap::new();
    let add = |into: &mut BTreeMap<String, (i128, bool)>, k: &str, v: i128, bin: bool| {
        let e = into.entry(k.to_string()).or_insert((0, bin));
        e.0 = e.0.saturating_add(v);
    };
    let value = |q: &Quantity| (milli(&q.0).unwrap_or(0).max(0), q.0.contains('i'));
    for c in spec.init_containers.iter().flatten() {
        let sidecar = machine::is_sidecar(c);
        for (k, q) in list(c) {
            let (v, bin) = value(&q);
            if sidecar {
                add(&mut sidecars, &k, v, bin);
            }
            let before = sidecars.get(&k).map_or(0, |s| s.0);
            let here = if sidecar {
                before
            } else {
                before.saturating_add(v)
            };
            let e = init_peak.entry(k).or_insert((0, bin));
            e.0 = e.0.max(here);
        }
    }
    for c in &spec.containers {
        for (k, q) in list(c) {
            let (v, bin) = value(&q);
            add(&mut total, &k, v, bin);
        }
    }
    for (k, (v, bin)) in sidecars {
        add(&mut total, &k, v, bin);
    }
    for (k, (v, bin)) in init_peak {
        let e = total.entry(k).or_insert((0, bin));
        e.0 = e.0.max(v);
    }
    for (k, q) in spec.overhead.iter().flatten() {
        let (v, bin) = value(q);
        match total.get_mut(k) {
            Some(e) if !limits || e.0 > 0 => e.0 = e.0.saturating_add(v),
            None if !limits => add(&mut total, k, v, bin),
            _ => {}
        }
    }
    let mut out: Quantities = total
        .into_iter()
        .map(|(k, (v, bin))| (k, Quantity(canonical(v, bin))))
        .collect();
    let pod_level = spec.resources.as_ref();
    let pod_level = pod_level.and_then(|r| {
        if limits {
            r.limits.as_ref()
        } else {
            r.requests.as_ref()
        }
    });
    for (k, q) in pod_level.into_iter().flatten() {
        if k == "cpu" || k == "memory" || k.starts_with("hugepages-") {
            out.insert(k.clone(), q.clone());
        }
    }
    out
}

/// A milli-unit value as Go's resource.Quantity prints it in canonical form: binary (Ki, Mi,
/// Gi, …) when the quantities it came from were binary and it is a whole multiple of 1024,
/// decimal (m, k, M, G, …) otherwise.
pub fn canonical(milli: i128, binary: bool) -> String {
    if milli % 1000 != 0 {
        return format!("{milli}m");
    }
    let mut n = milli / 1000;
    if n == 0 {
        return "0".into();
    }
    if binary && n % 1024 == 0 {
        let mut suffix = "";
        for s in ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"] {
            if n % 1024 != 0 {
                break;
            }
            n /= 1024;
            suffix = s;
        }
        return format!("{n}{suffix}");
    }
    let mut suffix = "";
    for s in ["k", "M", "G", "T", "P", "E"] {
        if n % 1000 != 0 {
            break;
        }
        n /= 1000;
        suffix = s;
    }
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements};

    fn q(pairs: &[(&str, &str)]) -> Option<Quantities> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect(),
        )
    }

    fn container(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> Container {
        Container {
            name: "c".into(),
            resources: Some(ResourceRequirements {
                requests: q(requests),
                limits: q(limits),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(cs: Vec<Container>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: cs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn best_effort_without_resources() {
        assert_eq!(qos_class(&pod(vec![Container::default()])), "BestEffort");
    }

    #[test]
    fn guaranteed_when_limits_equal_requests() {
        let c = container(
            &[("cpu", "100m"), ("memory", "64Mi")],
            &[("cpu", "0.1"), ("memory", "64Mi")],
        );
        assert_eq!(qos_class(&pod(vec![c])), "Guaranteed");
        let limits_only = container(&[], &[("cpu", "1"), ("memory", "1Gi")]);
        assert_eq!(qos_class(&pod(vec![limits_only])), "Guaranteed");
    }

    #[test]
    fn burstable_otherwise() {
        let c = container(&[("cpu", "100m")], &[]);
        assert_eq!(qos_class(&pod(vec![c])), "Burstable");
        let missing_cpu = container(&[], &[("memory", "1Gi")]);
        assert_eq!(qos_class(&pod(vec![missing_cpu])), "Burstable");
        let g = container(&[], &[("cpu", "1"), ("memory", "1Gi")]);
        assert_eq!(qos_class(&pod(vec![g, Container::default()])), "Burstable");
    }

    #[test]
    fn cgroup_values() {
        let c = container(
            &[("cpu", "250m"), ("memory", "1Gi")],
            &[("cpu", "500m"), ("memory", "2Gi")],
        );
        let p = pod(vec![c.clone()]);
        let r = container_resources(&p, &c, 8 << 30);
        assert_eq!(r.cpu_shares, Some(256));
        assert_eq!(r.cpu_quota, Some(50_000));
        assert_eq!(r.cpu_period, Some(100_000));
        assert_eq!(r.memory_limit, Some(2 << 30));
        assert_eq!(r.oom_score_adj, 875);
        let none = Container::default();
        let r = container_resources(&pod(vec![none.clone()]), &none, 8 << 30);
        assert_eq!(
            (r.cpu_shares, r.cpu_quota, r.memory_limit),
            (Some(2), None, None)
        );
        assert_eq!(r.oom_score_adj, 1000);
    }

    #[test]
    fn guaranteed_oom_score_is_clamped_to_zero() {
        let c = container(&[], &[("cpu", "1"), ("memory", "1Gi")]);
        let r = container_resources(&pod(vec![c.clone()]), &c, 8 << 30);
        assert_eq!(r.oom_score_adj, 0);
    }

    #[test]
    fn quantities_print_in_go_canonical_form() {
        let table = [
            (250, false, "250m"),
            (1000, false, "1"),
            (1_500_000, false, "1500"),
            (128_000_000_000, false, "128M"),
            (64 * 1024 * 1024 * 1000, true, "64Mi"),
            (1000 * 1000, true, "1k"),
            (0, true, "0"),
        ];
        for (milli, binary, text) in table {
            assert_eq!(canonical(milli, binary), text, "{milli} {binary}");
        }
    }

    #[test]
    fn pod_requests_and_limits_aggregate_as_the_kubelets() {
        let mut p = pod(vec![
            container(&[("cpu", "250m")], &[("memory", "64Mi")]),
            container(&[("cpu", "250m"), ("memory", "32Mi")], &[]),
        ]);
        let mut init = container(&[("cpu", "2")], &[]);
        init.name = "init".into();
        p.spec.as_mut().unwrap().init_containers = Some(vec![init]);
        // Requests: the apps summed (limits standing in for unset requests), the init
        // container's cpu larger; limits: only the container that sets one.
        assert_eq!(
            pod_aggregate(&p, false),
            q(&[("cpu", "2"), ("memory", "96Mi")]).unwrap()
        );
        assert_eq!(pod_aggregate(&p, true), q(&[("memory", "64Mi")]).unwrap());
        assert!(pod_aggregate(&pod(vec![Container::default()]), false).is_empty());
    }
}
