//! The resource metrics (`GET /metrics/resource`) of a [`Summary`], in the Prometheus text format.

use super::{ContainerStats, CpuStats, MemoryStats, PodStats, Summary, SwapStats};
use crate::probe::metrics::escape;

/// The resource metrics of a summary in the Prometheus text format, as the kubelet's
/// `/metrics/resource` writes them (metrics-server reads the names, the `container`, `pod` and
/// `namespace` labels and the sample times in milliseconds).
pub fn resource_metrics(summary: &Summary) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<String>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for s in samples {
            out.push_str(name);
            out.push_str(&s);
            out.push('\n');
        }
    };
    let node = &summary.node;
    family(
        "container_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the container in core-seconds",
        containers(summary, |c| c.cpu.as_ref().map(cpu_sample)),
    );
    family(
        "container_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the container in bytes",
        containers(summary, |c| c.memory.as_ref().map(memory_sample)),
    );
    family(
        "container_start_time_seconds",
        "gauge",
        "[STABLE] Start time of the container since unix epoch in seconds",
        containers(summary, |c| {
            let t = c.start_time.parse::<jiff::Timestamp>().ok()?;
            let seconds = t.as_nanosecond() as f64 / 1e9;
            (seconds > 0.0).then(|| format!(" {seconds}"))
        }),
    );
    family(
        "container_swap_limit_bytes",
        "gauge",
        "[ALPHA] Current amount of the container swap limit in bytes. Reported only on non-windows systems",
        containers(summary, |c| Some(format!(" {} {}", c.swap.limit, c.swap.millis))),
    );
    family(
        "container_swap_usage_bytes",
        "gauge",
        "[ALPHA] Current amount of the container swap usage in bytes. Reported only on non-windows systems",
        containers(summary, |c| Some(swap_sample(&c.swap))),
    );
    family(
        "node_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the node in core-seconds",
        node.cpu.as_ref().map(cpu_sample).into_iter().collect(),
    );
    family(
        "node_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the node in bytes",
        node.memory
            .as_ref()
            .map(memory_sample)
            .into_iter()
            .collect(),
    );
    family(
        "node_swap_usage_bytes",
        "gauge",
        "[ALPHA] Current swap usage of the node in bytes. Reported only on non-windows systems",
        vec![swap_sample(&node.swap)],
    );
    family(
        "pod_cpu_usage_seconds_total",
        "counter",
        "[STABLE] Cumulative cpu time consumed by the pod in core-seconds",
        pods(summary, |p| p.cpu.as_ref().map(cpu_sample)),
    );
    family(
        "pod_memory_working_set_bytes",
        "gauge",
        "[STABLE] Current working set of the pod in bytes",
        pods(summary, |p| p.memory.as_ref().map(memory_sample)),
    );
    family(
        "pod_swap_usage_bytes",
        "gauge",
        "[ALPHA] Current amount of the pod swap usage in bytes. Reported only on non-windows systems",
        pods(summary, |p| Some(swap_sample(&p.swap))),
    );
    family(
        "resource_scrape_error",
        "gauge",
        "[STABLE] 1 if there was an error while getting container metrics, 0 otherwise",
        vec![" 0".into()],
    );
    out
}

/// ` value time_ms` of a CPU sample, in core-seconds.
fn cpu_sample(c: &CpuStats) -> String {
    format!(" {} {}", c.usage_core_nano_seconds as f64 / 1e9, c.millis)
}

fn swap_sample(s: &SwapStats) -> String {
    format!(" {} {}", s.swap_usage_bytes, s.millis)
}

fn memory_sample(m: &MemoryStats) -> String {
    format!(" {} {}", m.working_set_bytes, m.millis)
}

/// `{container=…,namespace=…,pod=…} sample` for each container that has the sample.
fn containers(
    summary: &Summary,
    sample: impl Fn(&ContainerStats) -> Option<String>,
) -> Vec<String> {
    let mut lines = Vec::new();
    for p in &summary.pods {
        for c in &p.containers {
            if let Some(s) = sample(c) {
                lines.push(format!(
                    "{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}}{s}",
                    escape(&c.name),
                    escape(&p.pod_ref.namespace),
                    escape(&p.pod_ref.name)
                ));
            }
        }
    }
    lines
}

fn pods(summary: &Summary, sample: impl Fn(&PodStats) -> Option<String>) -> Vec<String> {
    summary
        .pods
        .iter()
        .filter_map(|p| {
            let s = sample(p)?;
            Some(format!(
                "{{namespace=\"{}\",pod=\"{}\"}}{s}",
                escape(&p.pod_ref.namespace),
                escape(&p.pod_ref.name)
            ))
        })
        .collect()
}
