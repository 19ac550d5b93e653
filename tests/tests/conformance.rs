//! Agent tier, upstream node conformance: pods written as the API server stores them (every
//! default filled in, e.g. `divisor: "0"` on each `resourceFieldRef`), run by the real
//! `nodelet` binary standalone, with the values upstream's `[NodeConformance]` specs expect.

use std::time::Duration;

use nodelet_tests::agent_support::{Agent, BUSYBOX};

const MINUTE: Duration = Duration::from_secs(60);

/// Runs a `restartPolicy: Never` pod to `Succeeded` and returns its container's log.
fn run_to_completion(agent: &Agent, name: &str, yaml: &str) -> String {
    agent.write_manifest(&format!("{name}.yaml"), yaml);
    agent.wait_phase(name, "Succeeded", MINUTE);
    agent
        .container_logs("default", name, "client-container", "")
        .expect("logs served")
}

/// The value after `key=` on its own line of `log`.
fn value<'a>(log: &'a str, key: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {log:?}"))
}

fn resource_env(name: &str, resource: &str) -> String {
    format!(
        "    - name: {name}\n      valueFrom:\n        resourceFieldRef:\n          containerName: client-container\n          divisor: \"0\"\n          resource: {resource}\n"
    )
}

fn resource_item(path: &str, resource: &str) -> String {
    format!(
        "      - path: {path}\n        resourceFieldRef:\n          containerName: client-container\n          divisor: \"0\"\n          resource: {resource}\n"
    )
}

/// Upstream's Downward API specs (env, volume, projected volume): requests 250m/32Mi, limits
/// 1250m/64Mi, every divisor stored as "0" → read as 1 and rounded up as the kubelet does.
#[test]
fn downward_api_resources_with_stored_zero_divisors() {
    let agent = Agent::start("conf-downward");
    let resources = [
        "limits.cpu",
        "limits.memory",
        "requests.cpu",
        "requests.memory",
    ];
    let names = ["CPU_LIMIT", "MEMORY_LIMIT", "CPU_REQUEST", "MEMORY_REQUEST"];
    let env: String = names
        .iter()
        .zip(resources)
        .map(|(n, r)| resource_env(n, r))
        .collect();
    let items: String = names
        .iter()
        .zip(resources)
        .map(|(n, r)| resource_item(n, r))
        .collect();
    let podname = "      - path: podname\n        fieldRef:\n          apiVersion: v1\n          fieldPath: metadata.name\n";
    let projected_items =
        items
            .replace("\n      ", "\n          ")
            .replacen("      ", "          ", 1);
    let projected_podname =
        podname
            .replace("\n      ", "\n          ")
            .replacen("      ", "          ", 1);
    let script = "env | grep -E '^(CPU|MEMORY)_' ; for d in /etc/podinfo /etc/projected; do for f in podname CPU_LIMIT MEMORY_LIMIT CPU_REQUEST MEMORY_REQUEST; do echo \"$d/$f=$(cat $d/$f)\"; done; done";
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: downward\n  namespace: default\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 30\n  enableServiceLinks: true\n  containers:\n  - name: client-container\n    image: {BUSYBOX}\n    imagePullPolicy: IfNotPresent\n    command:\n    - sh\n    - -c\n    - |\n      {script}\n    resources:\n      requests: {{cpu: 250m, memory: 32Mi}}\n      limits: {{cpu: 1250m, memory: 64Mi}}\n    env:\n{env}    volumeMounts:\n    - {{name: podinfo, mountPath: /etc/podinfo}}\n    - {{name: projected, mountPath: /etc/projected}}\n  volumes:\n  - name: podinfo\n    downwardAPI:\n      defaultMode: 420\n      items:\n{podname}{items}  - name: projected\n    projected:\n      defaultMode: 420\n      sources:\n      - downwardAPI:\n          items:\n{projected_podname}{projected_items}"
    );
    let log = run_to_completion(&agent, "downward", &yaml);
    let expected = [
        ("CPU_LIMIT", "2"),
        ("MEMORY_LIMIT", "67108864"),
        ("CPU_REQUEST", "1"),
        ("MEMORY_REQUEST", "33554432"),
    ];
    for (key, want) in expected {
        assert_eq!(value(&log, key), want, "env {key}: {log}");
        for dir in ["/etc/podinfo", "/etc/projected"] {
            assert_eq!(value(&log, &format!("{dir}/{key}")), want, "{log}");
        }
    }
    for dir in ["/etc/podinfo", "/etc/projected"] {
        assert_eq!(value(&log, &format!("{dir}/podname")), "downward", "{log}");
    }
}

/// Upstream's "should provide default limits.cpu/memory from node allocatable": no limits set,
/// divisor stored as "0".
#[test]
fn downward_api_limits_default_to_node_allocatable() {
    let agent = Agent::start("conf-allocatable");
    let env =
        resource_env("CPU_LIMIT", "limits.cpu") + &resource_env("MEMORY_LIMIT", "limits.memory");
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: allocatable\n  namespace: default\nspec:\n  restartPolicy: Never\n  containers:\n  - name: client-container\n    image: {BUSYBOX}\n    command: [sh, -c, \"env | grep _LIMIT=\"]\n    resources: {{}}\n    env:\n{env}"
    );
    let log = run_to_completion(&agent, "allocatable", &yaml);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    assert_eq!(value(&log, "CPU_LIMIT"), cpus.to_string(), "{log}");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(
        value(&log, "MEMORY_LIMIT"),
        (kib * 1024).to_string(),
        "{log}"
    );
}

/// A pod running `script` in busybox with `spec_extra` (indented two spaces) in its spec.
fn busybox_pod(name: &str, spec_extra: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  restartPolicy: Never\n{spec_extra}  containers:\n  - name: client-container\n    image: {BUSYBOX}\n    command:\n    - sh\n    - -c\n    - |\n      {script}\n"
    )
}

/// `spec.hostnameOverride` (beta, on by default): `hostname` and `hostname -f` print the
/// override with no domain, whatever hostname, subdomain and setHostnameAsFQDN say.
#[test]
fn hostname_override_wins_over_hostname_and_subdomain() {
    let agent = Agent::start("conf-hostname");
    let spec = "  hostnameOverride: override.example.com\n  hostname: busybox1\n  subdomain: busybox-subdomain\n";
    let script = "echo HOSTNAME=$(hostname); echo FQDN=$(hostname -f); echo HOSTS=$(grep -c busybox /etc/hosts)";
    let log = run_to_completion(&agent, "override", &busybox_pod("override", spec, script));
    assert_eq!(value(&log, "HOSTNAME"), "override.example.com", "{log}");
    assert_eq!(value(&log, "FQDN"), "override.example.com", "{log}");
    assert_eq!(
        value(&log, "HOSTS"),
        "0",
        "no line names hostname or subdomain: {log}"
    );
}

/// KubeletManagedEtcHosts: a hostNetwork container gets the kubelet's managed copy of the
/// node's hosts file with the pod's hostAliases, unless it mounts /etc/hosts itself.
#[test]
fn host_network_pods_get_the_managed_hosts_file() {
    let agent = Agent::start("conf-hosthosts");
    let spec = "  hostNetwork: true\n  hostAliases:\n  - ip: 123.45.67.89\n    hostnames: [foo.local, bar.local]\n";
    let log = run_to_completion(
        &agent,
        "hosthosts",
        &busybox_pod("hosthosts", spec, "cat /etc/hosts"),
    );
    let node_hosts = std::fs::read_to_string("/etc/hosts").unwrap();
    let mut want = format!("# Kubernetes-managed hosts file (host network).\n{node_hosts}");
    if !want.ends_with('\n') {
        want.push('\n');
    }
    want.push_str("\n# Entries added by HostAliases.\n123.45.67.89\tfoo.local\tbar.local\n");
    assert_eq!(log, want);

    // A hostPath volume at /etc/hosts is left alone: the node's own file.
    let spec = "  hostNetwork: true\n  volumes:\n  - name: hosts\n    hostPath: {path: /etc/hosts, type: File}\n";
    let yaml = busybox_pod("ownhosts", spec, "cat /etc/hosts")
        + "    volumeMounts:\n    - {name: hosts, mountPath: /etc/hosts}\n";
    let log = run_to_completion(&agent, "ownhosts", &yaml);
    assert_eq!(log, node_hosts);
}

/// The waiting state of the pod's container, once it has one with `reason`.
fn waiting_message(agent: &Agent, pod: &str, reason: &str) -> String {
    let waiting = |a: &Agent| {
        let status = a.pod(pod)?.status?;
        let state = status.container_statuses?.first()?.state.clone()?;
        state
            .waiting
            .filter(|w| w.reason.as_deref() == Some(reason))
    };
    agent.wait_until(&format!("{pod} waiting {reason}"), MINUTE, |a| {
        waiting(a).is_some()
    });
    waiting(agent).and_then(|w| w.message).unwrap_or_default()
}

/// runAsNonRoot with an effective uid 0 (the image's empty USER, or an explicit runAsUser 0):
/// never created, CreateContainerConfigError and a Warning event `Failed` with the kubelet's
/// message.
#[test]
fn run_as_non_root_refuses_root() {
    let agent = Agent::start("conf-nonroot");
    let cases = [
        (
            "image-root",
            "",
            "container has runAsNonRoot and image will run as root",
        ),
        (
            "explicit-root",
            "    runAsUser: 0\n",
            "container's runAsUser breaks non-root policy",
        ),
    ];
    for (name, extra, text) in cases {
        let spec = format!("  securityContext:\n    runAsNonRoot: true\n{extra}");
        agent.write_manifest(&format!("{name}.yaml"), &busybox_pod(name, &spec, "id"));
        let message = waiting_message(&agent, name, "CreateContainerConfigError");
        let uid = agent.pod(name).and_then(|p| p.metadata.uid).unwrap();
        let want = format!("{text} (pod: \"{name}_default({uid})\", container: client-container)");
        assert_eq!(message, want);
        let event = format!("Error: {want}");
        agent.wait_until("the Failed event", MINUTE, |a| {
            a.events().iter().any(|e| {
                e.reason.as_deref() == Some("Failed")
                    && e.type_.as_deref() == Some("Warning")
                    && e.message.as_deref() == Some(event.as_str())
            })
        });
    }
    assert_eq!(agent.containerd_containers(), Vec::<String>::new());
}

/// "nonexistent volume subPath should have the correct mode and owner using FSGroup": a new
/// subPath of a Memory emptyDir with fsGroup 123 is made with the volume root's mode,
/// drwxrwsrwt (3777), owned by 0:123, as is the tmpfs root itself.
#[test]
fn a_new_subpath_of_a_memory_empty_dir_has_the_root_mode_and_fs_group() {
    let agent = Agent::start("conf-subpath");
    let spec = "  securityContext:\n    fsGroup: 123\n    runAsUser: 1001\n  volumes:\n  - name: test-volume\n    emptyDir: {medium: Memory}\n";
    let script = "echo SUB=$(stat -c '%a %A %u %g' /test-volume); echo ROOT=$(stat -c '%a %A %u %g' /root-volume)";
    let yaml = busybox_pod("subpath", spec, script)
        + "    volumeMounts:\n    - {name: test-volume, mountPath: /test-volume, subPath: test-sub}\n    - {name: test-volume, mountPath: /root-volume}\n";
    let log = run_to_completion(&agent, "subpath", &yaml);
    assert_eq!(value(&log, "SUB"), "3777 drwxrwsrwt 0 123", "{log}");
    assert_eq!(value(&log, "ROOT"), "3777 drwxrwsrwt 0 123", "{log}");
}

/// PrivilegedPod: `ip link add` works in the privileged container and is refused in the other,
/// in the pod's own network namespace. This kernel may lack the `dummy` link type upstream's
/// spec adds, so a bridge shows the privilege, and dummy may fail only as unsupported (never
/// as not permitted). The privileged container also has every capability and a rw /sys.
#[test]
fn privileged_containers_may_add_links_and_others_may_not() {
    let agent = Agent::start("conf-privileged");
    let script = "ip link add t0 type bridge 2>&1; echo BRIDGE=$?; out=$(ip link add dummy1 type dummy 2>&1); echo \"DUMMY=$? $out\"; echo CAPS=$(grep CapEff /proc/self/status | cut -f2); echo SYS=$(grep ' /sys sysfs ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1)";
    let container = |name: &str, privileged: bool| {
        format!("  - name: {name}\n    image: {BUSYBOX}\n    securityContext: {{privileged: {privileged}}}\n    command:\n    - sh\n    - -c\n    - |\n      {script}\n")
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: privileged\n  namespace: default\nspec:\n  restartPolicy: Never\n  containers:\n{}{}",
        container("privileged-container", true),
        container("not-privileged-container", false)
    );
    agent.write_manifest("privileged.yaml", &yaml);
    agent.wait_phase("privileged", "Succeeded", MINUTE);
    let logs = |c: &str| {
        agent
            .container_logs("default", "privileged", c, "")
            .expect("logs served")
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let all_caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim();

    let log = logs("privileged-container");
    assert_eq!(value(&log, "BRIDGE"), "0", "{log}");
    let dummy = value(&log, "DUMMY");
    assert!(
        dummy == "0 " || dummy.contains("Operation not supported"),
        "dummy fails only for the kernel: {log}"
    );
    assert_eq!(value(&log, "CAPS"), all_caps, "{log}");
    assert_eq!(value(&log, "SYS"), "rw", "{log}");

    let log = logs("not-privileged-container");
    assert!(log.contains("Operation not permitted"), "{log}");
    assert_ne!(value(&log, "BRIDGE"), "0", "{log}");
    assert!(
        value(&log, "DUMMY").contains("Operation not permitted"),
        "{log}"
    );
    assert_ne!(value(&log, "CAPS"), all_caps, "{log}");
    assert_eq!(value(&log, "SYS"), "ro", "{log}");
}

/// The annotation keys of the stored-form corpus (tests/data/stored-pods/README.md).
const EXPECT: &str = "stored-pods.nodelet.dev/expect";
const EXPECT_LOG: &str = "stored-pods.nodelet.dev/log";
const EXPECT_MESSAGE: &str = "stored-pods.nodelet.dev/message";

/// Whether `pod` shows what its annotations expect: a phase (`Succeeded`, `Failed`), `Ready`
/// (Running with the Ready condition True), a pod-level reason of a Failed pod
/// (`DeadlineExceeded`, `SysctlForbidden`), or else a waiting reason of its container `main`
/// (an image pull failure may show as either of its two reasons); then the log of `main`
/// contains the expected text and its termination message is the expected one.
fn stored_pod_state(agent: &Agent, pod: &k8s_openapi::api::core::v1::Pod) -> Result<(), String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let annotation = |key: &str| {
        let annotations = pod.metadata.annotations.as_ref();
        annotations.and_then(|a| a.get(key)).cloned()
    };
    let expect = annotation(EXPECT).unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.clone().unwrap_or_default();
    let main = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == "main");
    let waiting = main
        .and_then(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
        .unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let reached = match expect.as_str() {
        "Succeeded" | "Failed" => phase == expect,
        "Ready" => phase == "Running" && ready,
        "DeadlineExceeded" | "SysctlForbidden" => {
            phase == "Failed" && status.reason.as_deref() == Some(&expect)
        }
        "ErrImagePull" => waiting == "ErrImagePull" || waiting == "ImagePullBackOff",
        _ => waiting == expect,
    };
    if !reached {
        let states: Vec<_> = status
            .init_container_statuses
            .iter()
            .chain(status.container_statuses.iter())
            .flatten()
            .map(|c| (&c.name, &c.state))
            .collect();
        let log = agent.container_logs("default", name, "main", "");
        return Err(format!(
            "{name}: expected {expect}, has phase {phase:?}, reason {:?}, ready {ready}, \
             containers {states:?}, log of main {log:?}",
            status.reason
        ));
    }
    if let Some(want) = annotation(EXPECT_LOG) {
        let log = agent
            .container_logs("default", name, "main", "")
            .unwrap_or_default();
        if !log.contains(&want) {
            return Err(format!("{name}: log {log:?} lacks {want:?}"));
        }
    }
    if let Some(want) = annotation(EXPECT_MESSAGE) {
        let terminated = main.and_then(|c| c.state.as_ref()?.terminated.clone());
        let message = terminated.and_then(|t| t.message).unwrap_or_default();
        if message != want {
            return Err(format!(
                "{name}: termination message {message:?}, not {want:?}"
            ));
        }
    }
    Ok(())
}

/// The stored-form corpus: every pod of tests/data/stored-pods (representative pods run through
/// a real API server with `kubectl create --dry-run=server -o yaml`, every default filled in) is
/// accepted standalone and reaches the state its annotations expect.
#[test]
fn stored_form_pods_reach_their_expected_state() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/stored-pods");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/data/stored-pods")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "the corpus holds {} pods", files.len());
    let agent = Agent::start("conf-stored");
    let mut names = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let pod: k8s_openapi::api::core::v1::Pod = serde_yaml_ng::from_str(&text).unwrap();
        let annotations = pod.metadata.annotations.unwrap_or_default();
        assert!(annotations.contains_key(EXPECT), "{}", file.display());
        names.push(pod.metadata.name.unwrap());
        let file_name = file.file_name().unwrap().to_str().unwrap();
        agent.write_manifest(file_name, &text);
    }
    let unmet = |agent: &Agent| -> Vec<String> {
        let pods = agent.pods();
        names
            .iter()
            .filter_map(|name| {
                let pod = pods
                    .iter()
                    .find(|p| p.metadata.name.as_deref() == Some(name));
                match pod {
                    Some(pod) => stored_pod_state(agent, pod).err(),
                    None => Some(format!("{name}: not listed")),
                }
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + 3 * MINUTE;
    let mut left = unmet(&agent);
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        left = unmet(&agent);
    }
    assert!(left.is_empty(), "unmet expectations:\n{}", left.join("\n"));
}
