//! Status parity with the upstream kubelet: the pod shapes of
//! `tests/data/status-parity/shapes.yaml` run on a nodelet agent, and each shape's pod status
//! and event reasons, normalized, must equal what the kubelet v1.36.2 wrote for the same shape
//! (recorded once, normalized the same way, as `tests/data/status-parity/<shape>.json`).
//!
//! Recording: with `NODELET_RECORD_PARITY=<node>` (a Ready node run by the upstream kubelet,
//! tainted `nodelet.io/reference-kubelet:NoSchedule`, and the usual cluster variables for the
//! admin client) the same test runs the shapes on that node and writes the records instead of
//! comparing; no agent is started then.

use super::*;

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Event;
use kube::api::{ApiResource, DynamicObject, ListParams};
use serde_json::{json, Value};

/// Where the shapes and the kubelet's records live.
fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/status-parity")
}

/// The taint of the reference kubelet's node (so that no other pod lands there).
const REFERENCE_TAINT: &str = "nodelet.io/reference-kubelet";

#[derive(serde::Deserialize)]
struct Shape {
    name: String,
    settled: Settled,
    spec: Value,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Settled {
    phase: Option<String>,
    ready: Option<bool>,
    waiting: Option<Waiting>,
    running_for: Option<i64>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Waiting {
    container: String,
    reason: String,
    restarts: i64,
}

/// A difference from the kubelet that is known and accepted: at `path` of `shape` both values
/// are strings that start with `same_prefix` (that part must still agree) and differ after it.
/// The test fails if one of them is no longer different, so that the list only shrinks.
struct Known {
    shape: &'static str,
    path: &'static str,
    same_prefix: &'static str,
}

const KNOWN_DIFFERENCES: &[Known] = &[
    // The pull error's own text is the runtime's: the kubelet quotes what containerd's CRI
    // plugin answered through gRPC ("rpc error: code = NotFound desc = failed to pull and
    // unpack image …: failed to resolve reference …: not found"), nodelet what its own
    // resolver met ("image … not found: http://…/manifests/latest: manifest unknown"). The
    // kubelet's part of the message agrees.
    Known {
        shape: "missing-image",
        path: ".status.containerStatuses.app.state.waiting.message",
        same_prefix: "Back-off pulling image \"127.0.0.1:5000/nodelet/no-such-image:latest\": \
                      ErrImagePull: ",
    },
];

impl Known {
    fn covers(&self, shape: &str, path: &str, kubelet: &Value, ours: &Value) -> bool {
        let prefixed = |v: &Value| v.as_str().is_some_and(|s| s.starts_with(self.same_prefix));
        self.shape == shape && self.path == path && prefixed(kubelet) && prefixed(ours)
    }
}

fn shapes() -> Vec<Shape> {
    let path = data_dir().join("shapes.yaml");
    let text = std::fs::read_to_string(&path).expect("read shapes.yaml");
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The shape's pod for `node`.
fn shape_pod(shape: &Shape, node: &str) -> Pod {
    let mut spec = shape.spec.clone();
    spec["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    spec["tolerations"] =
        json!([{"key": REFERENCE_TAINT, "operator": "Exists", "effect": "NoSchedule"}]);
    spec["automountServiceAccountToken"] = json!(false);
    if spec.get("terminationGracePeriodSeconds").is_none() {
        spec["terminationGracePeriodSeconds"] = json!(2);
    }
    serde_json::from_value(json!({"metadata": {"name": shape.name}, "spec": spec}))
        .unwrap_or_else(|e| panic!("shape {}: {e}", shape.name))
}

/// Every status of the pod's containers (init and regular), by name.
fn container_statuses(status: &Value) -> impl Iterator<Item = &Value> {
    ["initContainerStatuses", "containerStatuses"]
        .into_iter()
        .flat_map(|k| status[k].as_array().into_iter().flatten())
}

fn is_settled(settled: &Settled, status: &Value) -> bool {
    if let Some(phase) = &settled.phase {
        return status["phase"] == phase.as_str();
    }
    if settled.ready.is_some() {
        return status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
    }
    if let Some(w) = &settled.waiting {
        return container_statuses(status).any(|c| {
            c["name"] == w.container.as_str()
                && c["state"]["waiting"]["reason"] == w.reason.as_str()
                && c["restartCount"].as_i64().unwrap_or(0) >= w.restarts
        });
    }
    if let Some(seconds) = settled.running_for {
        let now = jiff::Timestamp::now();
        let mut all = container_statuses(status).peekable();
        return all.peek().is_some()
            && all.all(|c| {
                c["state"]["running"]["startedAt"]
                    .as_str()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .is_some_and(|t| now.duration_since(t).as_secs() >= seconds)
            });
    }
    panic!("a shape's `settled` names no condition")
}

/// What a run of the pod looks like once normalized: the values that differ from run to run
/// or node to node (times, ids, addresses, names) become placeholders, lists of named items
/// become maps by name, restart counts are capped where a loop races.
struct Normalizer<'a> {
    uid: String,
    namespace: String,
    node: &'a str,
    restart_cap: Option<i64>,
}

/// The memory limit a pod cgroup without one reads back as on cgroup v1 (the page-rounded
/// largest int64): the kubelet reports `status.resources.limits` of a pod without limits as
/// that only when the pod cgroup happened to exist as it wrote the status (not in every run of
/// a shape), so such a `limits` is dropped.
const CGROUP_V1_NO_LIMIT: &str = "9007199254740988Ki";

const TIME_FIELDS: &[&str] = &[
    "startTime",
    "startedAt",
    "finishedAt",
    "lastTransitionTime",
    "lastProbeTime",
];

impl Normalizer<'_> {
    fn value(&self, key: &str, v: &Value) -> Value {
        match v {
            Value::String(_) if TIME_FIELDS.contains(&key) => json!("<time>"),
            Value::String(_) if key == "hostIP" => json!("<host-ip>"),
            Value::String(_) if key == "podIP" => json!("<pod-ip>"),
            // Runtime ids are opaque: only the runtime's name is compared.
            Value::String(s) if key == "containerID" => match s.split_once("://") {
                Some((runtime, _)) => json!(format!("{runtime}://<id>")),
                None => v.clone(),
            },
            Value::String(s) => json!(self.text(s)),
            Value::Number(n) if key == "restartCount" => match (n.as_i64(), self.restart_cap) {
                (Some(count), Some(cap)) => json!(count.min(cap)),
                _ => v.clone(),
            },
            Value::Array(items) if key == "hostIPs" || key == "podIPs" => {
                let placeholder = if key == "hostIPs" {
                    "<host-ip>"
                } else {
                    "<pod-ip>"
                };
                Value::Array(items.iter().map(|_| json!({"ip": placeholder})).collect())
            }
            Value::Array(items) => {
                let by = |k: &'static str| items.iter().all(|i| i[k].is_string()).then_some(k);
                let key_field = match key {
                    "conditions" => by("type"),
                    _ if key.ends_with("ContainerStatuses") || key == "containerStatuses" => {
                        by("name")
                    }
                    _ => None,
                };
                match key_field {
                    Some(k) => Value::Object(
                        items
                            .iter()
                            .map(|i| (i[k].as_str().unwrap().to_string(), self.value("", i)))
                            .collect(),
                    ),
                    None => Value::Array(items.iter().map(|i| self.value("", i)).collect()),
                }
            }
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(k, v)| {
                        !(key == "resources"
                            && k.as_str() == "limits"
                            && **v == json!({"memory": CGROUP_V1_NO_LIMIT}))
                    })
                    .map(|(k, v)| (k.clone(), self.value(k, v)))
                    .collect(),
            ),
            _ => v.clone(),
        }
    }

    /// A message or id with the pod's uid, namespace and node, 64-hex ids and digests, and
    /// durations replaced.
    fn text(&self, s: &str) -> String {
        let s = s
            .replace(&self.uid, "<pod-uid>")
            .replace(&self.namespace, "<namespace>")
            .replace(self.node, "<node>");
        let s = hex_ids(&s);
        s.split(' ')
            .map(|word| {
                if is_duration(word) {
                    "<duration>"
                } else {
                    word
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Runs of exactly 64 hex digits (container ids, digests) become `<hex>`.
fn hex_ids(s: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() == 64 {
            out.push_str("<hex>");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for ch in s.chars() {
        if ch.is_ascii_hexdigit() {
            run.push(ch);
        } else {
            flush(&mut run, &mut out);
            out.push(ch);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// A duration as Go prints one (`40s`, `1m20s`, `2h0m0s`, `1.5s`): a non-canonical form such
/// as `160s` stays as it is, so that it shows as a difference.
fn is_duration(word: &str) -> bool {
    let Some(rest) = word.strip_suffix('s') else {
        return false;
    };
    let (hours, rest) = match rest.split_once('h') {
        Some((h, r)) => (Some(h), r),
        None => (None, rest),
    };
    let (minutes, seconds) = match rest.split_once('m') {
        Some((m, s)) => (Some(m), s),
        None => (None, rest),
    };
    let int = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let below_60 = |s: &str| s.parse::<f64>().is_ok_and(|v| v < 60.0);
    let seconds_ok = match seconds.split_once('.') {
        Some((a, b)) => int(a) && int(b),
        None => int(seconds),
    } && below_60(seconds);
    seconds_ok
        && hours.is_none_or(int)
        && minutes.is_none_or(|m| int(m) && below_60(m))
        && (hours.is_none() || minutes.is_some())
}

/// Where the shapes run: the test namespace's pods and events, and the node.
struct Run<'a> {
    pods: Api<DynamicObject>,
    events: Api<Event>,
    node: &'a str,
    namespace: &'a str,
}

impl Run<'_> {
    /// The pod's status and the reasons of the events about it, normalized, and whether it has
    /// settled.
    async fn snapshot(&self, shape: &Shape) -> Option<(Value, bool)> {
        let (node, namespace) = (self.node, self.namespace);
        let pod = self.pods.get_opt(&shape.name).await.ok().flatten()?;
        let uid = pod.metadata.uid.clone()?;
        let status = pod.data.get("status").cloned().unwrap_or(Value::Null);
        let settled = is_settled(&shape.settled, &status);
        let normalizer = Normalizer {
            uid: uid.clone(),
            namespace: namespace.to_string(),
            node,
            restart_cap: shape.settled.waiting.as_ref().map(|w| w.restarts),
        };
        let list = self
            .events
            .list(&ListParams::default().fields(&format!("involvedObject.uid={uid}")))
            .await
            .ok()?;
        let mut reasons: Vec<String> = list
            .items
            .iter()
            // Those the node wrote (not the scheduler's, for one).
            .filter(|e| {
                e.reporting_instance.as_deref() == Some(node)
                    || e.source.as_ref().and_then(|s| s.host.as_deref()) == Some(node)
            })
            .map(|e| {
                let path = e.involved_object.field_path.as_deref().unwrap_or("");
                format!(
                    "{} {} {}",
                    e.type_.as_deref().unwrap_or(""),
                    e.reason.as_deref().unwrap_or(""),
                    path
                )
                .trim_end()
                .to_string()
            })
            .collect();
        reasons.sort();
        reasons.dedup();
        Some((
            json!({"status": normalizer.value("status", &status), "events": reasons}),
            settled,
        ))
    }

    /// The shape's normalized record once it has settled and stayed the same for 5 s.
    async fn settled_record(&self, shape: &Shape) -> Value {
        let until = std::time::Instant::now() + Duration::from_secs(300);
        let mut last: Option<(Value, bool)> = None;
        loop {
            let now = self.snapshot(shape).await;
            match (&now, &last) {
                (Some((record, true)), Some((before, true))) if record == before => {
                    return record.clone();
                }
                (Some((_, true)), _) => tokio::time::sleep(Duration::from_secs(5)).await,
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
            // A pod that never gets here (unschedulable, a node under pressure…) says why.
            assert!(
                std::time::Instant::now() < until,
                "shape {} did not settle within 300 s; its last status and events: {:#}",
                shape.name,
                now.map_or(Value::Null, |(record, _)| record)
            );
            last = now;
        }
    }
}

/// Every difference between `kubelet` and `ours` as (path, kubelet's value, ours); the event
/// list is a set, each event present on one side only is a difference of its own.
fn differences(path: &str, kubelet: &Value, ours: &Value, out: &mut Vec<(String, Value, Value)>) {
    match (kubelet, ours) {
        (Value::Array(a), Value::Array(b)) if path == ".events" => {
            for e in a.iter().filter(|e| !b.contains(e)) {
                out.push((format!("{path}[{e}]"), json!("present"), json!("<absent>")));
            }
            for e in b.iter().filter(|e| !a.contains(e)) {
                out.push((format!("{path}[{e}]"), json!("<absent>"), json!("present")));
            }
        }
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let sub = format!("{path}.{k}");
                let absent = Value::String("<absent>".into());
                differences(
                    &sub,
                    a.get(k).unwrap_or(&absent),
                    b.get(k).unwrap_or(&absent),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), x, y, out);
            }
        }
        _ if kubelet != ours => out.push((path.to_string(), kubelet.clone(), ours.clone())),
        _ => {}
    }
}

#[tokio::test]
#[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
async fn pod_statuses_and_events_match_the_kubelets() {
    let Some(mut c) = cluster("pod_statuses_and_events_match_the_kubelets").await else {
        return;
    };
    let record_on = std::env::var("NODELET_RECORD_PARITY")
        .ok()
        .filter(|s| !s.is_empty());
    let _agent = match &record_on {
        Some(node) => {
            c.node = node.clone();
            None
        }
        None => Some(Agent::start(&c)),
    };
    wait_node_ready(&c).await;
    let ns = TestNamespace::create(&c, "parity").await;
    let shapes = shapes();
    for shape in &shapes {
        ns.pods()
            .create(&PostParams::default(), &shape_pod(shape, &c.node))
            .await
            .unwrap_or_else(|e| panic!("create shape {}: {e}", shape.name));
    }
    let run = Run {
        pods: Api::namespaced_with(c.admin.clone(), &ns.name, &ApiResource::erase::<Pod>(&())),
        events: Api::namespaced(c.admin.clone(), &ns.name),
        node: &c.node,
        namespace: &ns.name,
    };
    let records: Vec<Value> =
        futures::future::join_all(shapes.iter().map(|s| run.settled_record(s))).await;

    if record_on.is_some() {
        for (shape, record) in shapes.iter().zip(&records) {
            let path = data_dir().join(format!("{}.json", shape.name));
            let text = serde_json::to_string_pretty(record).unwrap() + "\n";
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            eprintln!("recorded {}", path.display());
        }
        return;
    }

    let mut unexpected = Vec::new();
    let mut found = BTreeSet::new();
    for (shape, ours) in shapes.iter().zip(&records) {
        let path = data_dir().join(format!("{}.json", shape.name));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (record it with NODELET_RECORD_PARITY=<kubelet node>)",
                path.display()
            )
        });
        let kubelet: Value = serde_json::from_str(&text).expect("record JSON");
        let mut diffs = Vec::new();
        differences("", &kubelet, ours, &mut diffs);
        for (p, theirs, mine) in diffs {
            let known = KNOWN_DIFFERENCES
                .iter()
                .find(|k| k.covers(&shape.name, &p, &theirs, &mine));
            eprintln!(
                "{} {}{p}: kubelet {theirs} / nodelet {mine}",
                if known.is_some() {
                    "known"
                } else {
                    "DIFFERENT"
                },
                shape.name
            );
            match known {
                Some(k) => {
                    found.insert((k.shape, k.path));
                }
                None => unexpected.push(format!("{}{p}", shape.name)),
            }
        }
    }
    let gone: Vec<_> = KNOWN_DIFFERENCES
        .iter()
        .filter(|k| !found.contains(&(k.shape, k.path)))
        .map(|k| format!("{}{}", k.shape, k.path))
        .collect();
    assert!(
        gone.is_empty(),
        "known differences that are gone (remove them from KNOWN_DIFFERENCES): {gone:?}"
    );
    assert!(
        unexpected.is_empty(),
        "{} differences from the kubelet: {unexpected:#?}",
        unexpected.len()
    );
}
