//! Agent tier: the real `nodelet` binary in standalone mode against the real containerd,
//! registry and CNI. Each test runs its own agent (own namespace, dirs and port).

use std::time::Duration;

use nodelet_tests::agent_support::{container_id, phase_of, Agent, BUSYBOX, HTTPD};
use nodelet_tests::csi_support::{loop_mounts_below, mounts_below, LoopPlugin, LOOP_DRIVER};

const MINUTE: Duration = Duration::from_secs(60);

fn sleeper(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done']\n"
    )
}

/// Messages of the agent's Unhealthy events that start with `prefix`.
fn unhealthy(agent: &Agent, prefix: &str) -> Vec<String> {
    agent
        .events()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Unhealthy"))
        // One per occurrence: the agent counts repeats of one Event.
        .flat_map(|e| {
            std::iter::repeat_n(
                e.message.unwrap_or_default(),
                e.count.unwrap_or(1).max(1) as usize,
            )
        })
        .filter(|m| m.starts_with(prefix))
        .collect()
}

/// Whether the pod's first container reports `started`.
fn started(agent: &Agent, pod: &str) -> bool {
    agent.pod(pod).is_some_and(|p| {
        let cs = p
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default();
        cs.first().is_some_and(|c| c.started == Some(true))
    })
}

fn ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[test]
fn a_manifest_pod_runs_logs_and_is_removed_with_its_file() {
    let agent = Agent::start("basic");
    agent.write_manifest("ticker.yaml", &sleeper("ticker"));
    let pod = agent.wait_phase("ticker", "Running", MINUTE);
    let status = pod.status.as_ref().unwrap();
    assert!(status.pod_ip.is_some(), "a pod IP from CNI");
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    let cs = &status.container_statuses.as_ref().unwrap()[0];
    assert!(cs.state.as_ref().unwrap().running.is_some());
    assert!(cs
        .image_id
        .starts_with("127.0.0.1:5000/nodelet/busybox@sha256:"));
    let id = container_id(&pod, "main").unwrap();
    assert!(agent.containerd_containers().contains(&id));

    // The container's output reaches its CRI log file.
    let uid = pod.metadata.uid.clone().unwrap();
    let log = agent
        .log_dir()
        .join(format!("default_ticker_{uid}"))
        .join("main/0.log");
    agent.wait_until("log lines in the CRI file", MINUTE, |_| {
        std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() >= 3)
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let first = text.lines().next().unwrap();
    let fields: Vec<&str> = first.splitn(4, ' ').collect();
    assert_eq!(fields[1], "stdout", "{first}");
    assert_eq!(fields[2], "F", "{first}");
    assert!(fields[3].starts_with("tick "), "{first}");
    // The same output through /containerLogs, as `kubectl logs --tail=2` asks for it.
    let tail = agent
        .container_logs("default", "ticker", "main", "tailLines=2")
        .expect("logs served");
    assert_eq!(tail.lines().count(), 2, "{tail:?}");
    assert!(tail.lines().all(|l| l.starts_with("tick ")), "{tail:?}");
    assert!(agent
        .container_logs("default", "ticker", "main", "previous=true")
        .is_none());
    assert!(agent
        .container_logs("default", "ticker", "nope", "")
        .is_none());

    // Removing the file deletes the pod: containers and the pod go away.
    agent.remove_manifest("ticker.yaml");
    agent.wait_until("the pod is gone", MINUTE, |a| a.pod("ticker").is_none());
    agent.wait_until("its container is removed", MINUTE, |a| {
        !a.containerd_containers().contains(&id)
    });
    // …and its sandbox: pinned namespaces and the CNI address are released.
    let ip = status.pod_ip.clone().unwrap();
    let reserved = std::path::Path::new("/var/lib/nodelet/cni/networks/nodelet").join(&ip);
    agent.wait_until("the pod IP is released", MINUTE, |_| !reserved.exists());
    let pins = agent.dir.path().join("run/sandboxes").join(&uid);
    assert!(!pins.exists(), "{} is gone", pins.display());
    let pod_dir = agent.root_dir().join("pods").join(&uid);
    let left: Vec<_> = walk(&pod_dir);
    assert!(left.is_empty(), "pod dir left behind: {left:?}");
}

#[test]
fn a_changed_manifest_replaces_the_pod() {
    let agent = Agent::start("replace");
    agent.write_manifest("ticker.yaml", &sleeper("ticker"));
    let old = agent.wait_phase("ticker", "Running", MINUTE);
    let old_id = container_id(&old, "main").unwrap();
    let old_uid = old.metadata.uid.clone().unwrap();

    agent.write_manifest(
        "ticker.yaml",
        &sleeper("ticker").replace("sleep 0.2", "sleep 0.3"),
    );
    agent.wait_until("a new pod with a new UID runs", MINUTE, |a| {
        a.pod("ticker").is_some_and(|p| {
            p.metadata.uid.as_deref() != Some(old_uid.as_str())
                && phase_of(Some(&p)) == Some("Running")
        })
    });
    agent.wait_until("the old container is removed", MINUTE, |a| {
        !a.containerd_containers().contains(&old_id)
    });
    let pods: Vec<_> = agent
        .pods()
        .into_iter()
        .filter(|p| p.metadata.name.as_deref() == Some("ticker"))
        .collect();
    assert_eq!(
        pods.len(),
        1,
        "one pod of that name once the old one is gone"
    );
}

#[test]
fn a_run_to_completion_pod_succeeds_with_downward_env() {
    let agent = Agent::start("complete");
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: once\n  namespace: team\nspec:\n  restartPolicy: Never\n  containers:\n  - name: c\n    image: {BUSYBOX}\n    command: [sh, -c, 'echo $(NAME) in $(NS) at $(IP); test \"$NS\" = team && test -n \"$IP\" && ip addr | grep -q \"inet $IP/\"']\n    env:\n    - name: IP\n      valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}\n    - name: NAME\n      valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}\n    - name: NS\n      valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}\n"
    );
    agent.write_manifest("once.yaml", &yaml);
    let pod = agent.wait_phase("once", "Succeeded", MINUTE);
    let cs = &pod.status.unwrap().container_statuses.unwrap()[0];
    let term = cs.state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(term.exit_code, 0);
    assert_eq!(term.reason.as_deref(), Some("Completed"));
    assert_eq!(cs.restart_count, 0);
}

#[test]
fn bad_manifests_and_missing_images_are_reported_without_disturbing_other_pods() {
    let agent = Agent::start("badinput");
    agent.write_manifest("good.yaml", &sleeper("good"));
    agent.write_manifest("broken.yaml", "kind: Pod\nmetadata: {name: [\n");
    agent.write_manifest(
        "invalid.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: noimage}\nspec:\n  containers:\n  - name: c\n",
    );
    let missing = "apiVersion: v1\nkind: Pod\nmetadata: {name: missing}\nspec:\n  containers:\n  - name: c\n    image: 127.0.0.1:5000/nodelet/does-not-exist:v1\n";
    agent.write_manifest("missing.yaml", missing);

    agent.wait_phase("good", "Running", MINUTE);
    agent.wait_until(
        "ErrImagePull or ImagePullBackOff for the missing image",
        MINUTE,
        |a| {
            a.pod("missing").is_some_and(|p| {
                let cs = p
                    .status
                    .and_then(|s| s.container_statuses)
                    .unwrap_or_default();
                cs.iter().any(|c| {
                    let w = c.state.as_ref().and_then(|s| s.waiting.as_ref());
                    w.is_some_and(|w| {
                        matches!(
                            w.reason.as_deref(),
                            Some("ErrImagePull" | "ImagePullBackOff")
                        ) && w
                            .message
                            .as_deref()
                            .unwrap_or("")
                            .contains("does-not-exist")
                    })
                })
            })
        },
    );
    let events = agent.events();
    let manifest_errors: Vec<String> = events
        .iter()
        .filter(|e| e.reason.as_deref() == Some("FailedManifest"))
        .filter_map(|e| e.message.clone())
        .collect();
    assert!(
        manifest_errors.iter().any(|m| m.contains("broken.yaml")),
        "{manifest_errors:?}"
    );
    assert!(
        manifest_errors.iter().any(|m| m.contains("invalid.yaml")
            && m.contains("spec.containers[0].image: Required value")),
        "{manifest_errors:?}"
    );
    assert!(agent.pod("noimage").is_none());
    assert!(events.iter().any(|e| e.reason.as_deref() == Some("Failed")
        && e.message
            .as_deref()
            .unwrap_or("")
            .contains("does-not-exist")));
    // The good pod never restarted through all of this.
    let good = agent.pod("good").unwrap();
    assert_eq!(phase_of(Some(&good)), Some("Running"));
    assert_eq!(
        good.status.unwrap().container_statuses.unwrap()[0].restart_count,
        0
    );
}

#[test]
fn the_agent_dying_leaves_pods_running_and_a_restart_readopts_them() {
    let mut agent = Agent::start("restart");
    agent.write_manifest("ticker.yaml", &sleeper("ticker"));
    let pod = agent.wait_phase("ticker", "Running", MINUTE);
    let id = container_id(&pod, "main").unwrap();
    let pid = agent.task_pid(&id).expect("running task");
    let uid = pod.metadata.uid.clone().unwrap();
    let log = agent
        .log_dir()
        .join(format!("default_ticker_{uid}"))
        .join("main/0.log");

    agent.kill9();
    let before = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count();
    std::thread::sleep(Duration::from_secs(2));
    let after = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        after > before,
        "logs keep flowing with the agent down ({before} → {after})"
    );
    assert_eq!(
        agent.task_pid(&id),
        Some(pid),
        "same process with the agent down"
    );

    agent.spawn();
    agent.wait_phase("ticker", "Running", MINUTE);
    let again = agent.pod("ticker").unwrap();
    let cs = &again
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    assert_eq!(cs.restart_count, 0, "re-adopted, not restarted");
    assert_eq!(container_id(&again, "main").as_deref(), Some(id.as_str()));
    assert_eq!(agent.task_pid(&id), Some(pid));

    // An orderly stop (SIGTERM) does not stop pods either.
    agent.stop();
    assert_eq!(
        agent.task_pid(&id),
        Some(pid),
        "SIGTERM of the agent leaves the pod"
    );
    agent.spawn();
    agent.wait_phase("ticker", "Running", MINUTE);
    assert_eq!(agent.task_pid(&id), Some(pid));
}

#[test]
fn a_pod_removed_while_the_agent_was_down_is_cleaned_up_on_start() {
    let mut agent = Agent::start("orphan");
    agent.write_manifest("ticker.yaml", &sleeper("ticker"));
    let pod = agent.wait_phase("ticker", "Running", MINUTE);
    let id = container_id(&pod, "main").unwrap();
    agent.kill9();
    agent.remove_manifest("ticker.yaml");
    agent.spawn();
    agent.wait_until("the orphan container is removed", MINUTE, |a| {
        !a.containerd_containers().contains(&id)
    });
    assert!(agent.pod("ticker").is_none());
    let pod_dir = agent
        .root_dir()
        .join("pods")
        .join(pod.metadata.uid.as_deref().unwrap());
    agent.wait_until("the pod directory is removed", MINUTE, |_| {
        !pod_dir.exists()
    });
}

#[test]
fn an_agent_restart_during_termination_stops_the_pod_gracefully_again() {
    let mut agent = Agent::start("regrace");
    let out = agent.dir.path().join("out");
    let log = out.join("log");
    agent.write_manifest(
        "stubborn.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: stubborn\nspec:\n  terminationGracePeriodSeconds: 20\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, \"trap 'echo term >> /out/log' TERM; while true; do sleep 1; done\"]\n    volumeMounts: [{{name: out, mountPath: /out}}]\n  volumes:\n  - name: out\n    hostPath: {{path: {}, type: DirectoryOrCreate}}\n",
            out.display()
        ),
    );
    let pod = agent.wait_phase("stubborn", "Running", MINUTE);
    let id = container_id(&pod, "main").unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    let terms = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().filter(|l| *l == "term").count()
    };
    agent.remove_manifest("stubborn.yaml");
    agent.wait_until("the stop signal", MINUTE, |_| terms() == 1);
    agent.kill9();
    assert!(agent.task_pid(&id).is_some(), "still in its grace");

    agent.spawn();
    agent.wait_until("the stop signal again after the restart", MINUTE, |_| {
        terms() == 2
    });
    assert!(
        agent.task_pid(&id).is_some(),
        "the restarted agent gives the pod its grace, it does not kill it at once"
    );
    agent.wait_until("the container is gone after the grace", MINUTE, |a| {
        !a.containerd_containers().contains(&id)
    });
    assert_eq!(terms(), 2);
    let pod_dir = agent.root_dir().join("pods").join(&uid);
    agent.wait_until("the pod directory is removed", MINUTE, |_| {
        !pod_dir.exists()
    });
}

/// The highest `tick N` in a log text.
fn last_tick(text: &str) -> Option<u64> {
    let ticks = text.lines().filter_map(|l| l.strip_prefix("tick "));
    ticks.filter_map(|n| n.trim().parse().ok()).max()
}

#[test]
fn the_secure_port_follows_logs_over_tls_and_refuses_exec() {
    let agent = Agent::start("secure");
    agent.write_manifest("ticker.yaml", &sleeper("ticker"));
    agent.write_manifest(
        "counter.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: counter\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'sleep 2; for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.2; done']\n"
        ),
    );
    agent.wait_phase("ticker", "Running", MINUTE);
    agent.wait_phase("counter", "Running", MINUTE);

    // The self-signed certificate covers 127.0.0.1: curl verifies it with --cacert.
    let (rc, code, body) = agent.https("/healthz", 10);
    assert_eq!((rc, code, body.as_str()), (0, 200, "ok"));

    let (_, code, before) = agent.https("/containerLogs/default/ticker/main", 10);
    assert_eq!(code, 200);
    let seen = last_tick(&before).expect("ticks so far");
    // follow streams until curl gives up (exit 28: the stream was still open).
    let (rc, _, followed) = agent.https("/containerLogs/default/ticker/main?follow=true", 3);
    assert_eq!(rc, 28, "a followed log of a running container stays open");
    let reached = last_tick(&followed).expect("followed ticks");
    assert!(reached > seen + 3, "new lines arrive: {seen} → {reached}");

    // A followed log ends by itself when the container exits.
    let (rc, code, all) = agent.https("/containerLogs/default/counter/main?follow=true", 60);
    assert_eq!(
        (rc, code),
        (0, 200),
        "the stream ends with the container: {all}"
    );
    let expected: String = (1..=10).map(|i| format!("line {i}\n")).collect();
    assert_eq!(all, expected);

    let (_, code, body) = agent.https(
        "/containerLogs/default/counter/main?tailLines=2&timestamps=true",
        10,
    );
    assert_eq!(code, 200);
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 2, "{body}");
    assert!(
        lines[1].ends_with(" line 10") && lines[1].len() > "line 10".len() + 20,
        "{body}"
    );

    // exec is served, but only as an upgrade to a stream (tests/tests/streaming.rs).
    let (_, code, body) = agent.https("/exec/default/ticker/main?command=sh&stdout=1", 10);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("unable to upgrade"), "{body}");
}

/// `containerLogMaxSize` and `containerLogMaxFiles` (the kubelet's names): the log driver rotates
/// a container's log at the size and keeps that many files, and a followed log reads on across
/// every rotation without losing or repeating a line.
#[test]
fn container_logs_rotate_by_size_and_a_followed_log_reads_on_across_rotations() {
    let mut agent = Agent::unstarted("rotate");
    agent.port_args.extend(
        [
            "--container-log-max-size",
            "4Ki",
            "--container-log-max-files",
            "3",
        ]
        .map(String::from),
    );
    agent.spawn();
    const LINES: usize = 400;
    agent.write_manifest(
        "talker.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: talker\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'sleep 3; i=1; while [ $i -le {LINES} ]; do echo \"line $i of the talker, padded to fill the log\"; i=$((i+1)); usleep 15000; done']\n"
        ),
    );
    agent.wait_phase("talker", "Running", MINUTE);
    let (rc, code, followed) = agent.https("/containerLogs/default/talker/main?follow=true", 120);
    assert_eq!(
        (rc, code),
        (0, 200),
        "the followed log ends with the container"
    );
    let expected: String = (1..=LINES)
        .map(|i| format!("line {i} of the talker, padded to fill the log\n"))
        .collect();
    assert!(
        followed == expected,
        "every line once and in order across rotations; got {} lines, first differing: {:?}",
        followed.lines().count(),
        followed.lines().zip(expected.lines()).find(|(a, b)| a != b)
    );

    let dir = std::fs::read_dir(agent.log_dir())
        .expect("log dir")
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("default_talker_")
        })
        .expect("the pod's log dir")
        .path()
        .join("main");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("container log dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        3,
        "the live file and two rotated ones: {files:?}"
    );
    assert!(files.contains(&"0.log".to_string()), "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| f == "0.log" || f.starts_with("0.log.")),
        "{files:?}"
    );
    for f in &files {
        let len = std::fs::metadata(dir.join(f)).expect("size").len();
        assert!(len <= 4096, "{f} is {len} bytes, over the 4Ki limit");
    }
    // Without follow, the current file is served, as the kubelet serves it.
    let (_, code, current) = agent.https("/containerLogs/default/talker/main", 10);
    assert_eq!(code, 200);
    assert!(
        current.ends_with(&format!(
            "line {LINES} of the talker, padded to fill the log\n"
        )),
        "{current}"
    );
    assert!(
        current.len() < expected.len() / 4,
        "only the live file: {}",
        current.len()
    );
}

#[test]
fn a_web_pod_turns_ready_through_its_readiness_probe_and_serves_a_config_map() {
    let agent = Agent::start("web");
    let yaml = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: site}}\ndata:\n  index.html: version-one\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: web}}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: server\n    image: {HTTPD}\n    ports: [{{name: http, containerPort: 8080}}]\n    readinessProbe:\n      httpGet: {{path: /site/index.html, port: http}}\n      periodSeconds: 1\n    volumeMounts: [{{name: site, mountPath: /www/site}}]\n  volumes:\n  - name: site\n    configMap: {{name: site}}\n"
    );
    agent.write_manifest("web.yaml", &yaml);
    agent.wait_until("pod web Ready", MINUTE, |a| {
        a.pod("web").is_some_and(|p| ready(&p))
    });
    let ip = agent.pod("web").unwrap().status.unwrap().pod_ip.unwrap();
    let fetch = |path: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-fsS",
                "--max-time",
                "5",
                &format!("http://{ip}:8080{path}"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(fetch("/site/index.html").trim(), "version-one");

    // An update to the ConfigMap reaches the running pod.
    agent.write_manifest("web.yaml", &yaml.replace("version-one", "version-two"));
    agent.wait_until("the new ConfigMap content is served", MINUTE, |_| {
        fetch("/site/index.html").trim() == "version-two"
    });
}

fn claim_manifests(dir: &std::path::Path) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: data-pv}}\nspec:\n  capacity: {{storage: 1Gi}}\n  accessModes: [ReadWriteOncePod]\n  persistentVolumeReclaimPolicy: Retain\n  claimRef: {{namespace: default, name: data}}\n  local: {{path: {}}}\n  nodeAffinity:\n    required:\n      nodeSelectorTerms:\n      - matchExpressions: [{{key: kubernetes.io/hostname, operator: Exists}}]\n---\n\
         apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: data}}\nspec:\n  accessModes: [ReadWriteOncePod]\n  volumeName: data-pv\n  resources: {{requests: {{storage: 1Gi}}}}\n",
        dir.display()
    )
}

fn claim_pod(name: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: c\n    image: {BUSYBOX}\n    command: [sh, -c, '{script}']\n    volumeMounts: [{{name: data, mountPath: /data}}]\n  volumes:\n  - name: data\n    persistentVolumeClaim: {{claimName: data}}\n"
    )
}

#[test]
fn a_local_pv_claims_data_outlives_its_pod_and_an_unbound_claim_is_reported() {
    let agent = Agent::start("claims");
    let backing = agent.dir.path().join("pv-data");
    std::fs::create_dir_all(&backing).unwrap();
    agent.write_manifest("claims.yaml", &claim_manifests(&backing));
    agent.write_manifest(
        "writer.yaml",
        &claim_pod("writer", "echo kept > /data/file"),
    );
    agent.wait_phase("writer", "Succeeded", MINUTE);
    assert_eq!(
        std::fs::read_to_string(backing.join("file")).unwrap(),
        "kept\n"
    );
    agent.remove_manifest("writer.yaml");
    agent.wait_until("writer gone", MINUTE, |a| a.pod("writer").is_none());

    agent.write_manifest(
        "reader.yaml",
        &claim_pod("reader", "grep -q kept /data/file"),
    );
    agent.wait_phase("reader", "Succeeded", MINUTE);

    // A claim with no bound volume: a clear reason, the pod waits, nothing crashes.
    let unbound = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: nobody}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {requests: {storage: 1Gi}}\n";
    agent.write_manifest("nobody.yaml", unbound);
    agent.write_manifest(
        "waiter.yaml",
        &claim_pod("waiter", "true").replace("claimName: data", "claimName: nobody"),
    );
    agent.wait_until(
        "a FailedMount event naming the unbound claim",
        MINUTE,
        |a| {
            a.events().iter().any(|e| {
                e.reason.as_deref() == Some("FailedMount")
                    && e.message
                        .as_deref()
                        .unwrap_or("")
                        .contains("nobody\" is not bound")
            })
        },
    );
    assert_eq!(phase_of(agent.pod("waiter").as_ref()), Some("Pending"));
    assert_eq!(phase_of(agent.pod("reader").as_ref()), Some("Succeeded"));
}

/// Every path at or below `dir` (empty when it does not exist).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        out.push(dir.to_path_buf());
        for e in entries.flatten() {
            out.extend(walk(&e.path()));
            out.push(e.path());
        }
    } else if dir.exists() {
        out.push(dir.to_path_buf());
    }
    out
}

#[test]
fn a_startup_probe_protects_a_slow_starter_from_its_liveness_probe() {
    let agent = Agent::start("startup");
    // Liveness alone would kill this container at its first probe: it is not "alive" for 5 s.
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: slow}}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c, 'sleep 5; touch /tmp/up; exec sleep 3600']\n    startupProbe:\n      exec: {{command: [test, -f, /tmp/up]}}\n      periodSeconds: 1\n      failureThreshold: 30\n    livenessProbe:\n      exec: {{command: [test, -f, /tmp/up]}}\n      periodSeconds: 1\n      failureThreshold: 1\n    readinessProbe:\n      tcpSocket: {{port: 8080}}\n      periodSeconds: 1\n"
    );
    agent.write_manifest("slow.yaml", &yaml);
    agent.wait_until("the container is started", MINUTE, |a| started(a, "slow"));
    let pod = agent.pod("slow").unwrap();
    let cs = &pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    assert_eq!(cs.restart_count, 0, "liveness waited for the startup probe");
    assert!(!cs.ready, "readiness (a TCP port nobody opens) still fails");
    let startup_failures = unhealthy(&agent, "Startup probe failed").len();
    assert!(
        startup_failures >= 2,
        "the startup probe failed while the app slept"
    );
}

#[test]
fn liveness_stops_when_the_pod_is_deleted() {
    let agent = Agent::start("dying");
    // On TERM the container marks itself unhealthy and lingers through its grace: a liveness
    // probe still running would report failures during termination.
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: dying}}\nspec:\n  terminationGracePeriodSeconds: 6\n  containers:\n  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c, 'trap \"touch /tmp/sick; echo got TERM\" TERM; while true; do sleep 0.2; done']\n    livenessProbe:\n      exec: {{command: [sh, -c, 'test ! -f /tmp/sick']}}\n      periodSeconds: 1\n      failureThreshold: 1\n"
    );
    agent.write_manifest("dying.yaml", &yaml);
    agent.wait_until("the container is started", MINUTE, |a| started(a, "dying"));
    std::thread::sleep(Duration::from_secs(2));
    agent.remove_manifest("dying.yaml");
    agent.wait_until("the pod is gone", MINUTE, |a| a.pod("dying").is_none());
    let liveness_failures = unhealthy(&agent, "Liveness probe failed");
    assert!(liveness_failures.is_empty(), "{liveness_failures:?}");
    let log = agent.agent_log();
    assert!(
        log.contains("Killing"),
        "the container was stopped gracefully"
    );
}

/// A CSI PV on the loop plugin (ext4, 32 MiB) and a claim bound to it.
fn csi_claim_manifests(handle: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: csi-pv}}\nspec:\n  capacity: {{storage: 32Mi}}\n  accessModes: [ReadWriteOnce]\n  claimRef: {{namespace: default, name: csi-data}}\n  csi:\n    driver: {LOOP_DRIVER}\n    volumeHandle: {handle}\n    fsType: ext4\n    volumeAttributes: {{size: \"33554432\"}}\n---\n\
         apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: csi-data}}\nspec:\n  accessModes: [ReadWriteOnce]\n  volumeName: csi-pv\n  resources: {{requests: {{storage: 32Mi}}}}\n"
    )
}

/// A long-running pod that writes `word` into the CSI claim and keeps running.
fn csi_pod(name: &str, word: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: c\n    image: {BUSYBOX}\n    command: [sh, -c, 'echo {word} >> /data/words; exec sleep 3600']\n    volumeMounts: [{{name: data, mountPath: /data}}]\n  volumes:\n  - name: data\n    persistentVolumeClaim: {{claimName: csi-data}}\n"
    )
}

/// Loop device mounts below the agent's dir, sorted: the CSI staging and publish mounts (the
/// container's own bind of the volume lives in its mount namespace, not here).
fn loop_mounts(agent: &Agent) -> Vec<std::path::PathBuf> {
    let mut mounts = loop_mounts_below(agent.dir.path());
    mounts.sort();
    mounts
}

/// An agent and the loop plugin registered in its plugins_registry, its state beside the
/// agent's dirs.
fn csi_agent(name: &str) -> (Agent, LoopPlugin) {
    let agent = Agent::start(name);
    let plugin = LoopPlugin::start(
        &agent.dir.path().join("csi-state"),
        &agent.root_dir().join("plugins_registry"),
        "node-1",
    );
    (agent, plugin)
}

/// No loop device mount below the agent's dir and no loop device of the plugin's is left.
fn assert_nothing_left(agent: &Agent, plugin: &LoopPlugin) {
    assert!(loop_mounts(agent).is_empty(), "{:?}", loop_mounts(agent));
    let loops = plugin.attached_loops();
    assert!(loops.is_empty(), "{loops:?}");
}

const STAGE: &str = "NodeStageVolume";
const PUBLISH: &str = "NodePublishVolume";
const UNPUBLISH: &str = "NodeUnpublishVolume";
const UNSTAGE: &str = "NodeUnstageVolume";

#[test]
fn a_csi_volume_is_neither_staged_nor_published_again_after_an_agent_restart() {
    let (mut agent, plugin) = csi_agent("csi-restart");
    agent.write_manifest("claim.yaml", &csi_claim_manifests("vol-r"));
    agent.write_manifest("user.yaml", &csi_pod("user", "one"));
    let pod = agent.wait_phase("user", "Running", MINUTE);
    let id = container_id(&pod, "c").unwrap();
    let pid = agent.task_pid(&id).expect("running task");
    let uid = pod.metadata.uid.clone().unwrap();
    let staging = nodelet::volume::csi::staging_path(&agent.root_dir(), LOOP_DRIVER, "vol-r");
    let target = agent
        .root_dir()
        .join("pods")
        .join(&uid)
        .join("volumes/kubernetes.io~csi/csi-pv/mount");
    assert_eq!(plugin.rpcs(), [STAGE, PUBLISH]);
    let mut both = vec![staging.clone(), target.clone()];
    both.sort();
    assert_eq!(
        loop_mounts(&agent),
        both,
        "one staging and one publish mount"
    );

    agent.kill9();
    agent.spawn();
    // The restarted agent has synced the pod once it reports it Running again.
    agent.wait_phase("user", "Running", MINUTE);
    agent.wait_until("the restarted agent reports the container", MINUTE, |a| {
        a.pod("user")
            .is_some_and(|p| container_id(&p, "c").as_deref() == Some(id.as_str()))
    });
    assert_eq!(agent.task_pid(&id), Some(pid), "the pod kept running");
    assert_eq!(
        plugin.rpcs(),
        [STAGE, PUBLISH],
        "nothing staged or published a second time"
    );
    let mut mounted = loop_mounts(&agent);
    mounted.sort();
    assert_eq!(
        mounted, both,
        "still exactly one staging and one publish mount"
    );

    agent.remove_manifest("user.yaml");
    agent.wait_until("the pod is gone", MINUTE, |a| a.pod("user").is_none());
    agent.wait_until("the volume is unstaged", MINUTE, |_| {
        plugin.rpcs().len() == 4
    });
    assert_eq!(plugin.rpcs(), [STAGE, PUBLISH, UNPUBLISH, UNSTAGE]);
    let calls = plugin.calls();
    assert_eq!(calls[2].2, target.display().to_string());
    assert_eq!(calls[3].2, staging.display().to_string());
    assert_nothing_left(&agent, &plugin);
}

#[test]
fn a_pod_deleted_while_the_agent_was_down_has_its_csi_volume_released_after_the_restart() {
    let (mut agent, plugin) = csi_agent("csi-orphan");
    agent.write_manifest("claim.yaml", &csi_claim_manifests("vol-o"));
    agent.write_manifest("user.yaml", &csi_pod("user", "one"));
    let pod = agent.wait_phase("user", "Running", MINUTE);
    let id = container_id(&pod, "c").unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    assert_eq!(plugin.rpcs(), [STAGE, PUBLISH]);
    assert_eq!(loop_mounts(&agent).len(), 2);

    agent.kill9();
    agent.remove_manifest("user.yaml");
    agent.spawn();
    agent.wait_until("the orphan container is removed", MINUTE, |a| {
        !a.containerd_containers().contains(&id)
    });
    agent.wait_until("the orphan's volume is unstaged", MINUTE, |_| {
        plugin.rpcs().len() == 4
    });
    assert_eq!(plugin.rpcs(), [STAGE, PUBLISH, UNPUBLISH, UNSTAGE]);
    assert_nothing_left(&agent, &plugin);
    let staging = nodelet::volume::csi::staging_path(&agent.root_dir(), LOOP_DRIVER, "vol-o");
    assert!(!staging.exists(), "{} is removed", staging.display());
    let volumes = agent.root_dir().join("pods").join(&uid).join("volumes");
    assert!(walk(&volumes).is_empty(), "{:?}", walk(&volumes));

    // The data is still on the volume: a new pod sees it.
    agent.write_manifest("again.yaml", &csi_pod("again", "two"));
    agent.wait_phase("again", "Running", MINUTE);
    assert_eq!(plugin.rpcs().len(), 6, "{:?}", plugin.rpcs());
    let again = agent.pod("again").unwrap();
    let target = agent
        .root_dir()
        .join("pods")
        .join(again.metadata.uid.as_deref().unwrap())
        .join("volumes/kubernetes.io~csi/csi-pv/mount");
    agent.wait_until("the new pod appended its word", MINUTE, |_| {
        std::fs::read_to_string(target.join("words")).is_ok_and(|w| w == "one\ntwo\n")
    });
}

#[test]
fn a_csi_plugin_down_across_an_agent_restart_neither_stops_a_running_pod_nor_strands_an_orphans_volume(
) {
    let (mut agent, mut plugin) = csi_agent("csi-plugin-down");
    let two_claims = csi_claim_manifests("vol-keep")
        + "---\n"
        + &csi_claim_manifests("vol-gone")
            .replace("csi-pv", "gone-pv")
            .replace("csi-data", "gone-data");
    agent.write_manifest("claims.yaml", &two_claims);
    agent.write_manifest("keep.yaml", &csi_pod("keep", "k"));
    agent.write_manifest(
        "gone.yaml",
        &csi_pod("gone", "g").replace("claimName: csi-data", "claimName: gone-data"),
    );
    let keep = agent.wait_phase("keep", "Running", MINUTE);
    let gone = agent.wait_phase("gone", "Running", MINUTE);
    let keep_id = container_id(&keep, "c").unwrap();
    let keep_pid = agent.task_pid(&keep_id).expect("running task");
    let gone_id = container_id(&gone, "c").unwrap();
    assert_eq!(loop_mounts(&agent).len(), 4, "{:?}", loop_mounts(&agent));

    // The node's CSI plugin and the agent both die; the agent comes back first, as on a node
    // whose plugin runs in a pod the agent itself has to start.
    agent.kill9();
    plugin.kill();
    agent.remove_manifest("gone.yaml");
    agent.spawn();
    agent.wait_until("the orphan container is removed", MINUTE, |a| {
        !a.containerd_containers().contains(&gone_id)
    });
    agent.wait_until("the restarted agent reports the kept pod", MINUTE, |a| {
        a.pod("keep").is_some_and(|p| {
            phase_of(Some(&p)) == Some("Running")
                && container_id(&p, "c").as_deref() == Some(keep_id.as_str())
        })
    });
    assert_eq!(
        agent.task_pid(&keep_id),
        Some(keep_pid),
        "the pod kept running"
    );
    let failed: Vec<_> = agent
        .events()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("FailedMount"))
        .filter_map(|e| e.message)
        .collect();
    assert!(
        failed.is_empty(),
        "a published volume is re-adopted from the mount table without asking the plugin: \
         {failed:?}"
    );
    assert_eq!(plugin.rpcs().len(), 4, "{:?}", plugin.rpcs());

    // Once the plugin is back, the orphan's volume is unpublished, then unstaged.
    plugin.spawn();
    agent.wait_until("the orphan's volume is unstaged", MINUTE, |_| {
        plugin.rpcs().len() == 6
    });
    let released: Vec<(String, String)> = plugin.calls()[4..]
        .iter()
        .map(|(rpc, id, _)| (rpc.clone(), id.clone()))
        .collect();
    assert_eq!(
        released,
        [
            (UNPUBLISH.to_string(), "vol-gone".to_string()),
            (UNSTAGE.to_string(), "vol-gone".to_string())
        ]
    );
    assert_eq!(loop_mounts(&agent).len(), 2, "{:?}", loop_mounts(&agent));

    agent.remove_manifest("keep.yaml");
    agent.wait_until("the kept pod's volume is unstaged", MINUTE, |_| {
        plugin.rpcs().len() == 8
    });
    assert_eq!(plugin.rpcs()[6..], [UNPUBLISH, UNSTAGE]);
    assert_nothing_left(&agent, &plugin);
}

#[test]
fn a_csi_block_volume_is_a_device_in_the_container_and_survives_an_agent_restart() {
    let (mut agent, plugin) = csi_agent("csi-block");
    let manifests = format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: raw-pv}}\nspec:\n  capacity: {{storage: 16Mi}}\n  accessModes: [ReadWriteOnce]\n  volumeMode: Block\n  claimRef: {{namespace: default, name: raw-data}}\n  csi:\n    driver: {LOOP_DRIVER}\n    volumeHandle: vol-b\n    volumeAttributes: {{size: \"16777216\"}}\n---\n\
         apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: raw-data}}\nspec:\n  accessModes: [ReadWriteOnce]\n  volumeMode: Block\n  volumeName: raw-pv\n  resources: {{requests: {{storage: 16Mi}}}}\n"
    );
    agent.write_manifest("claim.yaml", &manifests);
    // Writes a pattern 1 MiB into the device, syncs, reads it back through the device, and
    // keeps running.
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: raw}}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: c\n    image: {BUSYBOX}\n    command: [sh, -c, 'test -b /dev/xvda && printf nodelet-block | dd of=/dev/xvda bs=512 seek=2048 conv=notrunc,fsync && test \"$(dd if=/dev/xvda bs=512 skip=2048 count=1 2>/dev/null | head -c 13)\" = nodelet-block && echo pattern read back && exec sleep 3600']\n    volumeDevices: [{{name: raw, devicePath: /dev/xvda}}]\n  volumes:\n  - name: raw\n    persistentVolumeClaim: {{claimName: raw-data}}\n"
    );
    agent.write_manifest("raw.yaml", &pod);
    let running = agent.wait_phase("raw", "Running", MINUTE);
    agent.wait_until("the pattern read back in the container", MINUTE, |a| {
        a.container_logs("default", "raw", "c", "")
            .is_some_and(|l| l.contains("pattern read back"))
    });
    let uid = running.metadata.uid.clone().unwrap();
    let id = container_id(&running, "c").unwrap();
    let staging = nodelet::volume::csi::block_staging_path(&agent.root_dir(), LOOP_DRIVER, "vol-b");
    let target = nodelet::volume::csi::block_target_path(&agent.root_dir(), &uid, "raw-pv");
    let calls = plugin.calls();
    assert_eq!(plugin.rpcs(), [STAGE, PUBLISH], "{calls:?}");
    assert_eq!(calls[0].2, staging.display().to_string());
    assert_eq!(calls[1].2, target.display().to_string());
    // Published by the device node bound onto the target file; nothing mounted at staging.
    let published = |a: &Agent| -> Vec<std::path::PathBuf> {
        mounts_below(a.dir.path())
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| p.starts_with(a.root_dir()))
            .collect()
    };
    assert_eq!(published(&agent), std::slice::from_ref(&target));
    // The pattern reached the volume's backing file through the loop device.
    let mut data = vec![0u8; 13];
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(plugin.backing_file("vol-b")).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.read_exact(&mut data).unwrap();
    }
    assert_eq!(data, b"nodelet-block");

    // Across a restart of the agent the block volume is neither staged nor published again.
    agent.kill9();
    agent.spawn();
    agent.wait_until("the restarted agent reports the container", MINUTE, |a| {
        a.pod("raw").is_some_and(|p| {
            phase_of(Some(&p)) == Some("Running")
                && container_id(&p, "c").as_deref() == Some(id.as_str())
        })
    });
    assert_eq!(plugin.rpcs(), [STAGE, PUBLISH]);
    assert_eq!(published(&agent), std::slice::from_ref(&target));

    agent.remove_manifest("raw.yaml");
    agent.wait_until("the pod is gone", MINUTE, |a| a.pod("raw").is_none());
    agent.wait_until("the block volume is unstaged", MINUTE, |_| {
        plugin.rpcs().len() == 4
    });
    assert_eq!(plugin.rpcs()[2..], [UNPUBLISH, UNSTAGE]);
    assert_nothing_left(&agent, &plugin);
    assert!(!target.exists() && !staging.exists());
    let pod_dir = agent.root_dir().join("pods").join(&uid);
    assert!(!pod_dir.join("volumeDevices").exists());
}

/// Warning events whose reason is `reason`, as (object name, message).
fn warnings(agent: &Agent, reason: &str) -> Vec<(String, String)> {
    agent
        .events()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| {
            (
                e.involved_object.name.unwrap_or_default(),
                e.message.unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn two_manifests_with_one_pod_name_run_one_pod_and_refuse_the_other_across_restarts() {
    let mut agent = Agent::start("twins");
    agent.write_manifest("b.yaml", &sleeper("twin"));
    agent.write_manifest("a.yaml", &sleeper("twin").replace("sleep 0.2", "sleep 0.3"));
    let pod = agent.wait_phase("twin", "Running", MINUTE);
    let id = container_id(&pod, "main").unwrap();
    agent.wait_until("the duplicate is refused with a reason", MINUTE, |a| {
        warnings(a, "FailedValidation").iter().any(|(name, m)| {
            name == "twin" && m.contains("from file due to duplicate pod name \"twin\", ignoring")
        })
    });
    assert!(agent.agent_log().contains("duplicate pod name"));
    assert_eq!(agent.containerd_containers(), std::slice::from_ref(&id));
    let command = pod.spec.as_ref().unwrap().containers[0].command.clone();
    assert!(format!("{command:?}").contains("sleep 0.3"), "a.yaml wins");

    for _ in 0..2 {
        agent.kill9();
        agent.spawn();
        agent.wait_until("the same pod is re-adopted", MINUTE, |a| {
            a.pod("twin").is_some_and(|p| {
                phase_of(Some(&p)) == Some("Running")
                    && container_id(&p, "main").as_deref() == Some(id.as_str())
            })
        });
        agent.wait_until("the duplicate is refused again", MINUTE, |a| {
            !warnings(a, "FailedValidation").is_empty()
        });
        assert_eq!(
            agent.containerd_containers(),
            std::slice::from_ref(&id),
            "never both"
        );
        assert_eq!(agent.pods().len(), 1);
    }
}

#[test]
fn a_manifest_removed_and_put_back_unchanged_runs_again() {
    let agent = Agent::start("putback");
    agent.write_manifest("ticker.yaml", &sleeper("ticker"));
    let pod = agent.wait_phase("ticker", "Running", MINUTE);
    let id = container_id(&pod, "main").unwrap();
    agent.remove_manifest("ticker.yaml");
    agent.wait_until("the pod is gone", MINUTE, |a| {
        a.pod("ticker").is_none() && !a.containerd_containers().contains(&id)
    });
    agent.write_manifest("ticker.yaml", &sleeper("ticker"));
    let again = agent.wait_phase("ticker", "Running", MINUTE);
    assert_eq!(
        again.metadata.uid, pod.metadata.uid,
        "same content, same UID"
    );
    let id = container_id(&again, "main").unwrap();
    assert!(agent.task_pid(&id).is_some(), "its container runs again");
}

#[test]
fn a_manifest_edited_while_the_agent_is_down_runs_only_the_new_pod_after_the_restart() {
    let mut agent = Agent::start("editdown");
    agent.write_manifest("ticker.yaml", &sleeper("ticker"));
    let old = agent.wait_phase("ticker", "Running", MINUTE);
    let old_id = container_id(&old, "main").unwrap();
    agent.kill9();
    agent.write_manifest(
        "ticker.yaml",
        &sleeper("ticker").replace("sleep 0.2", "sleep 0.3"),
    );
    agent.spawn();
    agent.wait_until("the old container is removed", MINUTE, |a| {
        !a.containerd_containers().contains(&old_id)
    });
    agent.wait_until("the new pod runs", MINUTE, |a| {
        a.pod("ticker").is_some_and(|p| {
            p.metadata.uid != old.metadata.uid && phase_of(Some(&p)) == Some("Running")
        })
    });
    assert_eq!(agent.containerd_containers().len(), 1);
    assert_eq!(agent.pods().len(), 1);
}

#[test]
fn hostile_names_are_refused_and_create_nothing_outside_the_agents_dirs() {
    let agent = Agent::start("hostile");
    let escape = format!("nodelet-escape-{}", std::process::id());
    let up = "../".repeat(12);
    let bad = [
        ("name.yaml", sleeper("ticker").replace("name: ticker", &format!("name: {up}tmp/{escape}"))),
        ("ns.yaml", sleeper("ticker").replace("name: ticker", &format!("name: x\n  namespace: {up}tmp/{escape}"))),
        ("vol.yaml", format!("{}    volumeMounts: [{{name: \"{up}tmp/{escape}\", mountPath: /v}}]\n  volumes:\n  - name: \"{up}tmp/{escape}\"\n    emptyDir: {{}}\n", sleeper("vol"))),
        ("ctr.yaml", sleeper("ctr").replace("- name: main", &format!("- name: \"{up}tmp/{escape}\""))),
    ];
    for (file, yaml) in &bad {
        agent.write_manifest(file, yaml);
    }
    agent.write_manifest("good.yaml", &sleeper("good"));
    agent.wait_phase("good", "Running", MINUTE);
    agent.wait_until(
        "every hostile manifest refused with a reason",
        MINUTE,
        |a| {
            let refused = warnings(a, "FailedManifest");
            bad.iter().all(|(file, _)| {
                refused
                    .iter()
                    .any(|(_, m)| m.contains(file) && m.contains("Invalid value"))
            })
        },
    );
    let log = agent.agent_log();
    assert!(
        log.contains("metadata.name: Invalid value"),
        "the log says why"
    );
    assert_eq!(agent.pods().len(), 1, "only the good pod");
    let escaped: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(&escape))
        .map(|e| e.path())
        .collect();
    assert!(escaped.is_empty(), "created outside the root: {escaped:?}");
    let top: Vec<String> = std::fs::read_dir(agent.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("escape") || n.contains(".."))
        .collect();
    assert!(top.is_empty(), "{top:?}");
}

#[test]
fn a_second_agent_sharing_a_root_run_dir_or_namespace_refuses_to_start_naming_the_first() {
    let first = Agent::start("locked");
    let pid = first.agent_log();
    assert!(!pid.is_empty());
    let other = tempfile::tempdir().unwrap();
    let own = |n: &str| other.path().join(n);
    let variants = [
        // Its own dirs, the first agent's containerd namespace.
        (own("root"), own("run"), first.namespace()),
        (
            first.root_dir(),
            own("run"),
            "nodelet-test-locked-2".to_string(),
        ),
        (
            own("root"),
            first.dir.path().join("run"),
            "nodelet-test-locked-3".to_string(),
        ),
    ];
    for (root, run, ns) in variants {
        let mut child = std::process::Command::new(nodelet_tests::agent_support::nodelet_binary())
            .args(["--root-dir", &root.display().to_string()])
            .args(["--run-dir", &run.display().to_string()])
            .args(["--pod-logs-dir", &own("logs").display().to_string()])
            .args(["--containerd-namespace", &ns])
            .args(["--read-only-port", "0", "--port", "0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + MINUTE;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            status.is_some_and(|s| !s.success()),
            "the second agent must refuse to start: {text}"
        );
        assert!(text.contains("another nodelet holds"), "{text}");
        assert!(
            text.contains(&format!("root {}", first.root_dir().display())),
            "names the first agent: {text}"
        );
        assert!(text.contains("pid "), "{text}");
    }
    assert!(first.healthy(), "the first agent is undisturbed");
}

#[test]
fn pods_the_node_cannot_admit_fail_with_the_kubelets_reason_and_never_start() {
    let agent = Agent::start("admission");
    agent.write_manifest(
        "sysctl.yaml",
        &sleeper("sysctl").replace(
            "spec:\n",
            "spec:\n  securityContext:\n    sysctls: [{name: kernel.msgmax, value: '10000000'}]\n",
        ),
    );
    agent.write_manifest(
        "windows.yaml",
        &sleeper("windows").replace("spec:\n", "spec:\n  os: {name: windows}\n"),
    );
    agent.write_manifest(
        "selector.yaml",
        &sleeper("selector").replace("spec:\n", "spec:\n  nodeSelector: {disk: none}\n"),
    );
    agent.write_manifest(
        "huge.yaml",
        &sleeper("huge").replace(
            "    command:",
            "    resources: {requests: {cpu: '100000'}}\n    command:",
        ),
    );
    let expected = [
        ("sysctl", "SysctlForbidden", "Pod was rejected: forbidden sysctl: \"kernel.msgmax\" not allowlisted"),
        ("windows", "PodOSNotSupported", "Pod was rejected: Failed to admit pod as the OS field doesn't match node OS"),
        ("selector", "NodeAffinity", "Pod was rejected: Predicate NodeAffinity failed: node(s) didn't match Pod's node affinity/selector"),
        ("huge", "OutOfcpu", "Pod was rejected: Node didn't have enough resource: cpu, requested: 100000000"),
    ];
    for (name, reason, message) in expected {
        let pod = agent.wait_phase(name, "Failed", MINUTE);
        let status = pod.status.unwrap();
        assert_eq!(status.reason.as_deref(), Some(reason), "{name}");
        let text = status.message.unwrap_or_default();
        assert!(text.starts_with(message), "{name}: {text}");
        assert!(
            warnings(&agent, reason).iter().any(|(n, _)| n == name),
            "a Warning event {reason} on {name}"
        );
    }
    assert!(
        agent.containerd_containers().is_empty(),
        "nothing started: {:?}",
        agent.containerd_containers()
    );
}

/// The agent installs its log driver by running itself as `nodelet install-log-driver <dir>`
/// (so the pages of the embedded copy are paged in by a child that exits, not by the agent):
/// the result is this build's static driver, executable.
#[test]
fn the_agent_binary_installs_its_log_driver_when_run_as_installer() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let out = std::process::Command::new(nodelet_tests::agent_support::nodelet_binary())
        .arg(nodelet::runtime::logdriver::INSTALL_SUBCOMMAND)
        .arg(&bin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let driver = bin.join(nodelet::runtime::logdriver::file_name());
    let usage = std::process::Command::new(&driver).output().unwrap();
    assert!(
        String::from_utf8_lossy(&usage.stderr).starts_with("nodelet-log-driver: usage:"),
        "{usage:?}"
    );
}
