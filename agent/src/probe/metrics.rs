//! Probe metrics, owned by the scheduler and read by `/metrics`: a counter per (probe, result)
//! like upstream's `prober_probe_total`, and a histogram of how late each run started
//! (`nodelet_probe_start_delay_seconds`, scheduled time → started), for the benchmark.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use super::{ProbeKey, ProbeKind};

/// Upper bounds of the start-delay histogram's buckets, in seconds.
const BUCKETS: [f64; 15] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The labels of one counter series.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    kind: ProbeKind,
    result: &'static str,
    namespace: String,
    pod: String,
    pod_uid: String,
    container: String,
}

/// Who a probe belongs to, for its metric labels.
#[derive(Clone, Debug)]
pub(super) struct Labels {
    pub namespace: String,
    pub pod: String,
}

#[derive(Debug, Default)]
pub(super) struct Metrics {
    counters: BTreeMap<Series, u64>,
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Metrics {
    /// Counts one run; `result` is "successful", "failed" or "unknown" (an error).
    pub fn count(&mut self, key: &ProbeKey, labels: &Labels, result: &'static str) {
        let series = Series {
            kind: key.kind,
            result,
            namespace: labels.namespace.clone(),
            pod: labels.pod.clone(),
            pod_uid: key.pod_uid.clone(),
            container: key.container.clone(),
        };
        *self.counters.entry(series).or_default() += 1;
    }

    pub fn observe_delay(&mut self, delay: Duration) {
        let seconds = delay.as_secs_f64();
        for (bucket, bound) in self.buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    /// Drops the series of a stopped probe, so that cardinality follows the running pods.
    pub fn forget(&mut self, key: &ProbeKey) {
        self.counters.retain(|s, _| {
            !(s.kind == key.kind && s.pod_uid == key.pod_uid && s.container == key.container)
        });
    }

    /// Drops the series of every probe of a pod.
    pub fn forget_pod(&mut self, pod_uid: &str) {
        self.counters.retain(|s, _| s.pod_uid != pod_uid);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP prober_probe_total Cumulative number of a liveness, readiness or startup \
             probe for a container by result.\n# TYPE prober_probe_total counter\n",
        );
        for (s, value) in &self.counters {
            let _ = writeln!(
                out,
                "prober_probe_total{{probe_type=\"{}\",result=\"{}\",container=\"{}\",pod=\"{}\",\
                 namespace=\"{}\",pod_uid=\"{}\"}} {value}",
                s.kind.as_str(),
                s.result,
                escape(&s.container),
                escape(&s.pod),
                escape(&s.namespace),
                escape(&s.pod_uid),
            );
        }
        out.push_str(
            "# HELP nodelet_probe_start_delay_seconds Delay between a probe run's scheduled \
             time and its start.\n# TYPE nodelet_probe_start_delay_seconds histogram\n",
        );
        for (bound, count) in BUCKETS.iter().zip(self.buckets) {
            let _ = writeln!(
                out,
                "nodelet_probe_start_delay_seconds_bucket{{le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "nodelet_probe_start_delay_seconds_bucket{{le=\"+Inf\"}} {}\n\
             nodelet_probe_start_delay_seconds_sum {}\n\
             nodelet_probe_start_delay_seconds_count {}",
            self.count, self.sum, self.count
        );
        out
    }
}

/// Escapes a label value per the text exposition format (the resource metrics use it too).
pub(crate) fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: ProbeKind) -> ProbeKey {
        ProbeKey {
            pod_uid: "u1".into(),
            container: "app".into(),
            kind,
        }
    }

    #[test]
    fn counters_and_histogram_render() {
        let mut m = Metrics::default();
        let labels = Labels {
            namespace: "ns".into(),
            pod: "p\"1".into(),
        };
        m.count(&key(ProbeKind::Liveness), &labels, "successful");
        m.count(&key(ProbeKind::Liveness), &labels, "successful");
        m.count(&key(ProbeKind::Readiness), &labels, "failed");
        m.observe_delay(Duration::from_micros(700));
        m.observe_delay(Duration::from_secs(20));
        let text = m.render();
        assert!(text.contains(
            "prober_probe_total{probe_type=\"Liveness\",result=\"successful\",container=\"app\",\
             pod=\"p\\\"1\",namespace=\"ns\",pod_uid=\"u1\"} 2"
        ));
        assert!(text.contains("probe_type=\"Readiness\",result=\"failed\""));
        assert!(text.contains("nodelet_probe_start_delay_seconds_bucket{le=\"0.0005\"} 0\n"));
        assert!(text.contains("nodelet_probe_start_delay_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("nodelet_probe_start_delay_seconds_bucket{le=\"10\"} 1\n"));
        assert!(text.contains("nodelet_probe_start_delay_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("nodelet_probe_start_delay_seconds_count 2\n"));
        m.forget(&key(ProbeKind::Liveness));
        assert!(!m.render().contains("Liveness"));
        m.forget_pod("u1");
        assert!(!m.render().contains("Readiness"));
    }
}
