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
}
