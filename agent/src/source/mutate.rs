//! The bad-input generator: mutations of valid manifests (deleted fields, wrong types, huge and
//! negative numbers, unicode and path-like names, deep nesting, aliases, size), each run
//! through what a manifest meets in the agent — the parser, the validator, admission and the
//! pod → OCI spec conversion — by [`check`]. `cargo test` runs a bounded number of cases
//! (`scripts/test` runs the unit tier); `fuzz/` drives [`check`] with cargo-fuzz. The rules: no
//! panic, and every refusal carries a reason.
//!
//! The random source is a seeded xorshift so every failing case is reproducible by its number.

use serde_json::{json, Value};

use crate::runtime::spec::{build_spec, ResolvedUser, SpecInputs};
use crate::runtime::ContainerConfig;

/// The valid manifest the mutations start from.
pub const BASE: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: team
  labels: {app: web}
spec:
  restartPolicy: Always
  terminationGracePeriodSeconds: 5
  activeDeadlineSeconds: 600
  securityContext: {runAsUser: 1000, sysctls: [{name: net.ipv4.tcp_syncookies, value: "1"}]}
  initContainers:
  - name: init
    image: busybox
    command: [sh, -c, "true"]
  containers:
  - name: app
    image: busybox
    command: [sh, -c, "sleep 1000"]
    workingDir: /work
    env: [{name: A, value: "1"}]
    resources: {requests: {cpu: 100m, memory: 64Mi}, limits: {cpu: "1", memory: 128Mi}}
    volumeMounts: [{name: data, mountPath: /data, subPath: sub}]
    livenessProbe: {exec: {command: [cat, /tmp/ok]}, periodSeconds: 5}
  volumes:
  - name: data
    emptyDir: {}
  - name: cfg
    configMap: {name: cfg, defaultMode: 0644, items: [{key: k, path: dir/k}]}
"#;

/// A seeded xorshift64*.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

fn nasty_value(rng: &mut Rng) -> Value {
    let choices = [
        json!(true),
        json!(null),
        json!(-1),
        json!(0),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(1e300),
        json!(1.5),
        json!(""),
        json!("../../../../etc/passwd"),
        json!("/abs/path"),
        json!("a/b"),
        json!(".."),
        json!("ñame-💥-\u{202e}"),
        json!("UPPER"),
        json!("x".repeat(300)),
        json!("y".repeat(200 * 1024)),
        json!([]),
        json!({}),
        json!([1, "two", {"three": 3}]),
    ];
    choices[rng.below(choices.len())].clone()
}

/// Every path (as indexes into objects and arrays) of `v`.
fn paths(v: &Value, at: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                at.push(json!(k));
                paths(child, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                at.push(json!(i));
                paths(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node_at<'a>(v: &'a mut Value, path: &[Value]) -> Option<&'a mut Value> {
    let mut cur = v;
    for step in path {
        cur = match step {
            Value::String(k) => cur.get_mut(k.as_str())?,
            Value::Number(i) => cur.get_mut(i.as_u64()? as usize)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Case `n`: a mutated manifest text.
pub fn case(n: u64) -> String {
    let mut rng = Rng::new(n);
    let base: Value = crate::source::yaml::documents(BASE, crate::source::yaml::LIMITS)
        .ok()
        .and_then(|mut d| d.pop())
        .unwrap_or_default();
    let mut tree = base.clone();
    let mut all = Vec::new();
    paths(&base, &mut Vec::new(), &mut all);
    for _ in 0..=rng.below(3) {
        let path = all[rng.below(all.len())].clone();
        let Some((last, parent)) = path.split_last() else {
            continue;
        };
        match rng.below(3) {
            0 => {
                // Delete the field.
                if let (Some(Value::Object(m)), Value::String(k)) =
                    (node_at(&mut tree, parent), last)
                {
                    m.remove(k);
                }
            }
            _ => {
                if let Some(slot) = node_at(&mut tree, &path) {
                    *slot = nasty_value(&mut rng);
                }
            }
        }
    }
    let text = serde_json::to_string_pretty(&tree).unwrap_or_default();
    // JSON text starting with `{` is read as JSON; prefix a comment to go through YAML too.
    let text = if rng.below(2) == 0 {
        format!("# yaml\n{text}")
    } else {
        text
    };
    match rng.below(8) {
        0 => {
            let depth = 10 + rng.below(300);
            format!(
                "{text}\n---\nx: {}{}\n",
                "[".repeat(depth),
                "]".repeat(depth)
            )
        }
        1 => {
            let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
            for i in 1..(2 + rng.below(10)) {
                let p = i - 1;
                bomb.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
            }
            format!("{text}\n---\n{bomb}")
        }
        2 => {
            let cut = rng.below(text.len());
            let cut = (0..=cut)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            text[..cut].to_string()
        }
        3 => BASE
            .replace("0644", ["0999", "0x1FF", "yes", "-1", "1e99"][rng.below(5)])
            .replace(
                "name: web",
                ["name: ../x", "name: yes", "name: 0400", "name: ~"][rng.below(4)],
            ),
        _ => text,
    }
}

/// Runs one manifest text through the parser, the validator, admission and the pod → OCI spec
/// conversion. Ok: how many specs were built; Err: the reason it was refused (never empty).
pub fn check(text: &[u8]) -> Result<usize, String> {
    let content =
        crate::source::manifest::parse_file(std::path::Path::new("/m/case.yaml"), text, "node-1")
            .map_err(|e| e.to_string())?;
    let admission = crate::admission::NodeAdmission {
        max_pods: 110,
        allocatable: crate::volume::downward::NodeAllocatable {
            cpu_milli: 4000,
            memory: 8 << 30,
            ephemeral_storage: 0,
        },
        labels: crate::admission::node_labels("node-1", &Default::default()),
        allowed_unsafe_sysctls: Vec::new(),
    };
    let mut built = 0;
    for pod in &content.pods {
        if let Err(r) = admission.admit(pod, &[]) {
            return Err(format!("{}: {}", r.reason, r.message));
        }
        let spec = pod.spec.as_ref().ok_or("no spec")?;
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            let config = ContainerConfig {
                id: format!("{}-{}", pod.metadata.uid.as_deref().unwrap_or(""), c.name),
                args: c
                    .command
                    .iter()
                    .flatten()
                    .chain(c.args.iter().flatten())
                    .cloned()
                    .collect(),
                env: c
                    .env
                    .iter()
                    .flatten()
                    .map(|e| format!("{}={}", e.name, e.value.as_deref().unwrap_or("")))
                    .collect(),
                cwd: c.working_dir.clone().unwrap_or_else(|| "/".into()),
                resources: crate::pod::resources::container_resources(pod, c, 8 << 30),
                sysctls: spec
                    .security_context
                    .iter()
                    .flat_map(|s| s.sysctls.iter().flatten())
                    .map(|s| (s.name.clone(), s.value.clone()))
                    .collect(),
                ..Default::default()
            };
            let inputs = SpecInputs {
                user: ResolvedUser {
                    uid: 0,
                    gid: 0,
                    additional_gids: Vec::new(),
                },
                devices: Vec::new(),
                host_devices: Vec::new(),
                cgroup_v2: true,
                nofile: 0,
                bounding: None,
            };
            build_spec(&config, &inputs).map_err(|e| format!("container {}: {e}", c.name))?;
            built += 1;
        }
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_manifest_is_valid_and_converts() {
        assert_eq!(check(BASE.as_bytes()), Ok(2));
    }

    /// The bounded run `scripts/test` makes (through the unit tier): no panic, a reason for
    /// every refusal. `NODELET_MUTATION_CASES` raises the count.
    #[test]
    fn mutated_manifests_never_panic_and_every_refusal_has_a_reason() {
        let cases: u64 = std::env::var("NODELET_MUTATION_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(300);
        let (mut accepted, mut refused) = (0, 0);
        for n in 0..cases {
            let text = case(n);
            let result = std::panic::catch_unwind(|| check(text.as_bytes()));
            match result {
                Ok(Ok(_)) => accepted += 1,
                Ok(Err(reason)) => {
                    assert!(
                        !reason.trim().is_empty(),
                        "case {n}: a refusal without a reason"
                    );
                    refused += 1;
                }
                Err(_) => panic!(
                    "case {n} panicked:\n{}",
                    text.chars().take(2000).collect::<String>()
                ),
            }
        }
        assert!(
            refused > 0 && accepted > 0,
            "{accepted} accepted, {refused} refused"
        );
    }
}
