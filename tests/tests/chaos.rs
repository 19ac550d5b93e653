//! Chaos tier: the real `nodelet` binary in standalone mode while its world breaks: containerd
//! killed and restarted under it, the agent killed in the middle of a termination, containerd
//! down when the agent starts, a full root disk, and many bad inputs at once.
//!
//! A test that kills containerd runs its own (`OwnContainerd`: own socket, root and state dirs,
//! started by the test and killed by its PID), never the machine's or another test's. The
//! tests here still run one at a time (one global lock), so that one's load does not disturb
//! another's timing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ContainerStatus, Event, Pod};
use nodelet_tests::agent_support::{container_id, phase_of, Agent, BUSYBOX};
use nodelet_tests::containerd_support::OwnContainerd;
use nodelet_tests::runtime_support::pod_cgroups;

const MINUTE: Duration = Duration::from_secs(60);

/// One resync period of a pod worker (10 s) and a little more: long enough for the agent to
/// act on anything it saw wrongly.
const RESYNC_AND_MORE: Duration = Duration::from_secs(12);

static LOCK: Mutex<()> = Mutex::new(());

/// Serialises the tests of this binary; a panicked test does not poison the others.
fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_for(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

fn status_of<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == container)
}

fn restarts(pod: Option<&Pod>, container: &str) -> Option<i32> {
    status_of(pod?, container).map(|s| s.restart_count)
}

fn running(pod: Option<&Pod>, container: &str) -> bool {
    pod.and_then(|p| status_of(p, container))
        .and_then(|s| s.state.as_ref())
        .is_some_and(|s| s.running.is_some())
}

/// The CRI log file of a container's attempt.
fn log_file(agent: &Agent, pod: &Pod, container: &str, attempt: u32) -> PathBuf {
    let m = &pod.metadata;
    agent
        .log_dir()
        .join(format!(
            "{}_{}_{}",
            m.namespace.as_deref().unwrap_or("default"),
            m.name.as_deref().unwrap(),
            m.uid.as_deref().unwrap()
        ))
        .join(container)
        .join(format!("{attempt}.log"))
}

fn log_has(path: &Path, text: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains(text))
}

fn ticker(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'while true; do echo tick; sleep 0.5; done']\n"
    )
}

/// Warning events about the named pod, as "reason: message" lines.
fn warnings_for(events: &[Event], pod: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .filter(|e| e.involved_object.name.as_deref() == Some(pod))
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.as_deref().unwrap_or(""),
                e.message.as_deref().unwrap_or("")
            )
        })
        .collect()
}

fn assert_no_panic(agent: &Agent) {
    let log = agent.agent_log();
    assert!(
        !log.contains("panicked"),
        "the agent panicked:\n{}",
        log.lines()
            .filter(|l| l.contains("panicked"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A pod that runs until the host creates `<flags>/exit`, then fails once (OnFailure restarts
/// it, and the restarted container runs on since the flag is gone).
fn flag_waiter(name: &str, flags: &Path) -> String {
    std::fs::create_dir_all(flags).unwrap();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  restartPolicy: OnFailure\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'echo up; while [ ! -e /flags/exit ]; do sleep 0.2; done; rm /flags/exit; echo failing; exit 1']\n    volumeMounts: [{{name: flags, mountPath: /flags}}]\n  volumes:\n  - name: flags\n    hostPath: {{path: {}, type: Directory}}\n",
        flags.display()
    )
}

#[test]
fn a_containerd_restart_leaves_pods_running_and_exits_are_still_seen() {
    let _serial = serial();
    let mut containerd = OwnContainerd::start("restart");
    let mut agent = Agent::unstarted_on("chaos-containerd", &containerd);
    agent.spawn();
    let flags = agent.dir.path().join("flags");
    let down_flags = agent.dir.path().join("down-flags");
    agent.write_manifest("waiter.yaml", &flag_waiter("waiter", &flags));
    agent.write_manifest("downexit.yaml", &flag_waiter("downexit", &down_flags));
    let down = agent.wait_phase("downexit", "Running", MINUTE);
    let down_pid = agent
        .task_pid(&container_id(&down, "main").unwrap())
        .expect("a running task");
    let pod = agent.wait_phase("waiter", "Running", MINUTE);
    let id = container_id(&pod, "main").unwrap();
    let pid = agent.task_pid(&id).expect("a running task");
    // One exit before the restart, so the event stream is established when containerd dies.
    agent.write_manifest(
        "blip.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: blip}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'exit 0']\n"),
    );
    agent.wait_phase("blip", "Succeeded", MINUTE);
    agent.wait_until("the blip's exit event", MINUTE, |a| {
        a.agent_log().contains("exit event")
    });

    containerd.kill9();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the container's process outlives containerd (its shim keeps it)"
    );
    // Another container exits while containerd is down: nobody is there to see the event.
    std::fs::write(down_flags.join("exit"), "").unwrap();
    wait_for("downexit's process to end", MINUTE, || {
        !Path::new(&format!("/proc/{down_pid}")).exists()
    });
    // Stay down over a worker resync: failed inspections must not be taken for exits.
    std::thread::sleep(RESYNC_AND_MORE);
    assert!(agent.alive(), "the agent rides out containerd's absence");
    let pod = agent.pod("waiter").unwrap();
    assert_eq!(restarts(Some(&pod), "main"), Some(0));
    assert!(running(Some(&pod), "main"), "still reported running");
    containerd.spawn();
    assert_eq!(
        agent.task_pid(&id),
        Some(pid),
        "containerd re-attached the same task after its restart"
    );
    assert!(agent.alive(), "the agent survived containerd's restart");

    // Give the agent a full resync with containerd back: it must not restart the container.
    std::thread::sleep(RESYNC_AND_MORE);
    let pod = agent.pod("waiter").unwrap();
    assert_eq!(restarts(Some(&pod), "main"), Some(0), "not restarted");
    assert!(running(Some(&pod), "main"));
    assert_eq!(container_id(&pod, "main").as_deref(), Some(id.as_str()));
    assert_eq!(
        agent.task_pid(&id),
        Some(pid),
        "the same process throughout"
    );

    // The exit during the outage is found once containerd is back (by re-inspection).
    agent.wait_until("downexit restarted once and running", MINUTE, |a| {
        let p = a.pod("downexit");
        restarts(p.as_ref(), "main") == Some(1) && running(p.as_ref(), "main")
    });

    // An exit after the restart is still seen: OnFailure restarts the container once.
    std::fs::write(flags.join("exit"), "").unwrap();
    agent.wait_until("waiter restarted once and running", MINUTE, |a| {
        let p = a.pod("waiter");
        restarts(p.as_ref(), "main") == Some(1) && running(p.as_ref(), "main")
    });
    let pod = agent.pod("waiter").unwrap();
    let last = status_of(&pod, "main")
        .and_then(|s| s.last_state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .expect("the failed attempt as lastState");
    assert_eq!(last.exit_code, 1);
    // The exit came through the exit event stream, subscribed again after the break (not
    // only through the worker's periodic re-inspection).
    let log = agent.agent_log();
    let lines: Vec<&str> = log.lines().collect();
    let broke = lines
        .iter()
        .position(|l| l.contains("nodelet::runtime::eventstream") && l.contains("WARN"))
        .unwrap_or_else(|| panic!("the agent saw the event stream break:\n{log}"));
    assert!(
        lines[broke..]
            .iter()
            .any(|l| l.contains("exit event") && l.contains(&format!("container_id={id}"))),
        "the exit arrived as an event after the stream broke:\n{}",
        lines[broke..].join("\n")
    );

    // A pod written after the restart starts normally.
    agent.write_manifest("after.yaml", &ticker("after"));
    let after = agent.wait_phase("after", "Running", MINUTE);
    assert_eq!(restarts(Some(&after), "main"), Some(0));
    assert_no_panic(&agent);
}

#[test]
fn an_agent_killed_mid_termination_still_kills_the_container_after_its_term() {
    let _serial = serial();
    let mut agent = Agent::start("chaos-midterm");
    // Ignores TERM (logs it) so only a KILL ends it.
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: stubborn}}\nspec:\n  terminationGracePeriodSeconds: 20\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'trap \"echo got TERM\" TERM; echo started; while true; do sleep 0.2; done']\n"
    );
    agent.write_manifest("stubborn.yaml", &yaml);
    let pod = agent.wait_phase("stubborn", "Running", MINUTE);
    let id = container_id(&pod, "main").unwrap();
    let pid = agent.task_pid(&id).expect("a running task");
    let log = log_file(&agent, &pod, "main", 0);
    agent.wait_until("the container's trap is set", MINUTE, |_| {
        log_has(&log, "started")
    });

    agent.remove_manifest("stubborn.yaml");
    agent.wait_until("the container got TERM", MINUTE, |_| {
        log_has(&log, "got TERM")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        agent.task_pid(&id),
        Some(pid),
        "TERM is ignored: the container runs on within its grace"
    );
    agent.kill9();
    assert_eq!(
        agent.task_pid(&id),
        Some(pid),
        "the agent's death does not end the container"
    );

    // The restarted agent finishes the termination from the pod's checkpoint, as upstream
    // resumes it: the container is killed (after a grace period again) and removed.
    let restarted = Instant::now();
    agent.spawn();
    agent.wait_until("the container is killed and removed", MINUTE, |a| {
        a.task_pid(&id).is_none() && !a.containerd_containers().contains(&id)
    });
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "its process is gone"
    );
    println!(
        "stubborn killed {:?} after the agent's restart",
        restarted.elapsed()
    );
    agent.wait_until("the pod is gone", MINUTE, |a| a.pod("stubborn").is_none());
    // TERM came before the KILL (seen above); the pod's logs went with the pod.
    agent.wait_until("the pod's log directory is removed", MINUTE, |_| {
        !log.parent().is_some_and(Path::exists)
    });
    assert_no_panic(&agent);
}

#[test]
fn the_agent_waits_for_containerd_at_start_and_then_runs_pods() {
    let _serial = serial();
    let mut containerd = OwnContainerd::start("late");
    let mut agent = Agent::unstarted_on("chaos-late", &containerd);
    containerd.kill9();
    agent.spawn_without_waiting();
    agent.wait_until("the agent says containerd is not answering", MINUTE, |a| {
        a.agent_log().matches("containerd is not answering").count() >= 2
    });
    assert!(agent.alive(), "the agent retries instead of exiting");
    assert!(!agent.healthy(), "no /healthz before the runtime connected");

    containerd.spawn();
    agent.wait_until("the agent serves /healthz", MINUTE, Agent::healthy);
    assert!(agent.alive());
    agent.write_manifest("ticker.yaml", &ticker("ticker"));
    let pod = agent.wait_phase("ticker", "Running", MINUTE);
    assert_eq!(restarts(Some(&pod), "main"), Some(0));
    assert_no_panic(&agent);
}

#[test]
fn an_agent_restarted_while_containerd_is_down_readopts_its_pods_once_it_answers() {
    let _serial = serial();
    let mut containerd = OwnContainerd::start("both");
    let mut agent = Agent::unstarted_on("chaos-both", &containerd);
    agent.spawn();
    agent.write_manifest("ticker.yaml", &ticker("ticker"));
    let pod = agent.wait_phase("ticker", "Running", MINUTE);
    let id = container_id(&pod, "main").unwrap();
    let pid = agent.task_pid(&id).expect("a running task");

    // Both die; the agent comes back first.
    agent.kill9();
    containerd.kill9();
    agent.spawn_without_waiting();
    agent.wait_until("the agent says containerd is not answering", MINUTE, |a| {
        a.agent_log().matches("containerd is not answering").count() >= 2
    });
    assert!(agent.alive(), "the agent retries instead of exiting");
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the pod runs on with neither agent nor containerd"
    );

    containerd.spawn();
    agent.wait_until("the agent serves /healthz", MINUTE, Agent::healthy);
    let again = agent.wait_phase("ticker", "Running", MINUTE);
    assert_eq!(container_id(&again, "main").as_deref(), Some(id.as_str()));
    assert_eq!(agent.task_pid(&id), Some(pid), "re-adopted, same process");
    // A resync later it is still the same container, never restarted.
    std::thread::sleep(RESYNC_AND_MORE);
    let again = agent.pod("ticker").unwrap();
    assert_eq!(restarts(Some(&again), "main"), Some(0));
    assert_eq!(agent.task_pid(&id), Some(pid));
    assert_no_panic(&agent);
}

/// containerd is killed while the agent creates a container; where exactly the kill lands
/// varies from run to run. The worst case (often hit): tasks.Create cut short leaves a shim
/// without a container that tasks.Get does not see and tasks.Create refuses as "already
/// exists" — before the fix in `Runtime::remove` the pod never started.
#[test]
fn a_containerd_restart_during_a_pod_start_is_retried_without_leaks() {
    let _serial = serial();
    let mut containerd = OwnContainerd::start("midstart");
    let mut agent = Agent::unstarted_on("chaos-midstart", &containerd);
    agent.spawn();
    // The image is present, so the pod's start is quick: kill containerd right in it.
    agent.write_manifest("first.yaml", &ticker("first"));
    agent.wait_phase("first", "Running", MINUTE);
    agent.write_manifest("midstart.yaml", &ticker("midstart"));
    agent.wait_until("the agent started on midstart", MINUTE, |a| {
        a.agent_log().contains("pod=midstart")
    });
    containerd.kill9();
    std::thread::sleep(Duration::from_secs(2));
    containerd.spawn();
    // Its container runs (a start the kill cut short may have needed another attempt).
    let current = |a: &Agent| a.pod("midstart").and_then(|p| container_id(&p, "main"));
    agent.wait_until("midstart's container runs", MINUTE, |a| {
        current(a).is_some_and(|id| a.task_pid(&id).is_some())
    });
    let id = current(&agent).unwrap();
    // Exactly one container per pod: nothing half-made is left behind.
    std::thread::sleep(RESYNC_AND_MORE);
    let containers = agent.containerd_containers();
    assert_eq!(
        containers.len(),
        2,
        "{containers:?}; pods: {:?}",
        agent
            .pods()
            .iter()
            .map(|p| serde_json::to_string(&p.status).unwrap())
            .collect::<Vec<_>>()
    );
    assert!(containers.contains(&id));
    assert_no_panic(&agent);
}

/// Issue 10 (10, 11, 12, 13): pods deleted while containerd is down. A TERM-ignoring pod and
/// a plain one are removed, and a completed one too, while the test's own containerd is dead;
/// the kills and removals fail meanwhile. Once containerd is back every removal finishes
/// without an agent restart: no container, task, container snapshot, rootfs mount, pod cgroup
/// or log directory of them is left, their processes are gone, and the pod that stays runs on
/// untouched.
#[test]
fn pods_removed_while_containerd_is_down_leave_nothing_once_it_is_back() {
    let _serial = serial();
    let mut containerd = OwnContainerd::start("deletes");
    let mut agent = Agent::unstarted_on("chaos-deletes", &containerd);
    agent.spawn();
    let stubborn = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: stubborn}}\nspec:\n  terminationGracePeriodSeconds: 3\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'trap \"echo got TERM\" TERM; while true; do sleep 0.2; done']\n"
    );
    let done = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: done}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'echo done']\n"
    );
    agent.write_manifest("keep.yaml", &ticker("keep"));
    agent.write_manifest("plain.yaml", &ticker("plain"));
    agent.write_manifest("stubborn.yaml", &stubborn);
    agent.write_manifest("done.yaml", &done);
    let keep = agent.wait_phase("keep", "Running", MINUTE);
    let keep_id = container_id(&keep, "main").unwrap();
    let keep_pid = agent.task_pid(&keep_id).expect("keep runs");
    let mut removed = Vec::new();
    for name in ["plain", "stubborn", "done"] {
        let phase = if name == "done" {
            "Succeeded"
        } else {
            "Running"
        };
        let pod = agent.wait_phase(name, phase, MINUTE);
        let id = container_id(&pod, "main").unwrap();
        let pid = agent.task_pid(&id);
        removed.push((name, pod, id, pid));
    }

    containerd.kill9();
    for (name, ..) in &removed {
        agent.remove_manifest(&format!("{name}.yaml"));
    }
    // Over a worker resync and past the grace: every kill and removal fails meanwhile.
    std::thread::sleep(RESYNC_AND_MORE);
    assert!(agent.alive(), "the agent rides out containerd's absence");
    containerd.spawn();

    agent.wait_until("only keep's container is left", MINUTE, |a| {
        a.containerd_containers() == vec![keep_id.clone()]
    });
    agent.wait_until("only keep is listed", MINUTE, |a| {
        a.pods().len() == 1 && a.pod("keep").is_some()
    });
    let snapshots = agent.ctr(&["snapshots", "ls"]);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for (name, pod, id, pid) in &removed {
        if let Some(pid) = pid {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "{name}'s process still runs"
            );
        }
        assert!(
            !snapshots.contains(id.as_str()),
            "{name}'s snapshot is left:\n{snapshots}"
        );
        assert!(
            !mountinfo.contains(id.as_str()),
            "{name}'s rootfs is still mounted"
        );
        let uid = pod.metadata.uid.as_deref().unwrap();
        let cgroups = pod_cgroups(uid);
        assert!(cgroups.is_empty(), "{name}'s cgroups are left: {cgroups:?}");
        let logs = log_file(&agent, pod, "main", 0);
        let pod_logs = logs.parent().and_then(Path::parent).unwrap();
        assert!(
            !pod_logs.exists(),
            "{name}'s logs are left: {}",
            pod_logs.display()
        );
    }
    let keep = agent.pod("keep").unwrap();
    assert_eq!(restarts(Some(&keep), "main"), Some(0));
    assert_eq!(
        agent.task_pid(&keep_id),
        Some(keep_pid),
        "keep runs on untouched"
    );
    assert_no_panic(&agent);
}

/// Fills the filesystem holding `dir` by writing `dir/fill` until it is full.
fn fill_up(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("fill")).expect("create the fill file");
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    // Byte by byte, so not even a partial page is left.
    while f.write_all(&[0]).is_ok() {}
}

#[test]
fn a_full_root_disk_fails_the_writing_pod_clearly_and_spares_the_others() {
    let _serial = serial();
    let mut agent = Agent::unstarted("chaos-disk");
    let root = agent.root_dir();
    std::fs::create_dir_all(&root).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "chaos-disk"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a 2 MiB tmpfs on the root dir");
    agent.spawn();

    agent.write_manifest("steady.yaml", &ticker("steady"));
    let steady = agent.wait_phase("steady", "Running", MINUTE);
    let steady_id = container_id(&steady, "main").unwrap();
    let steady_pid = agent.task_pid(&steady_id).unwrap();

    fill_up(&root);
    let writer = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: writer}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'echo data > /cache/file']\n    terminationMessagePolicy: FallbackToLogsOnError\n    volumeMounts: [{{name: cache, mountPath: /cache}}]\n  volumes:\n  - name: cache\n    emptyDir: {{}}\n"
    );
    agent.write_manifest("writer.yaml", &writer);
    // Either the agent cannot prepare the pod (a Warning event) or the container's write
    // fails (it terminates with the error as its message): both must name the cause.
    let reported = |a: &Agent| {
        let pod = a.pod("writer");
        let failed = pod
            .as_ref()
            .and_then(|p| status_of(p, "main"))
            .and_then(|s| s.state.as_ref()?.terminated.clone())
            .is_some_and(|t| {
                t.exit_code != 0
                    && t.message
                        .as_deref()
                        .unwrap_or("")
                        .contains("No space left on device")
            });
        failed
            || warnings_for(&a.events(), "writer")
                .iter()
                .any(|w| w.contains("No space left on device"))
    };
    agent.wait_until(
        "the writer's failure reported with its cause",
        MINUTE,
        reported,
    );
    let warnings = warnings_for(&agent.events(), "writer");
    assert!(
        !warnings.iter().any(|w| w.contains("volume : ")),
        "a pod-wide volume error names no empty volume: {warnings:#?}"
    );
    println!(
        "writer: phase {:?}, warnings {:#?}, status {}",
        phase_of(agent.pod("writer").as_ref()),
        warnings_for(&agent.events(), "writer"),
        serde_json::to_string(&agent.pod("writer").and_then(|p| p.status)).unwrap()
    );

    assert!(agent.alive(), "the agent keeps running on a full disk");
    assert!(agent.healthy());
    let steady = agent.pod("steady").unwrap();
    assert_eq!(phase_of(Some(&steady)), Some("Running"));
    assert_eq!(restarts(Some(&steady), "main"), Some(0));
    assert_eq!(agent.task_pid(&steady_id), Some(steady_pid));

    // Space freed: a new pod with an emptyDir works again.
    std::fs::remove_file(root.join("fill")).unwrap();
    agent.write_manifest(
        "later.yaml",
        &writer.replace("name: writer", "name: later").replace(
            "echo data",
            "echo data > /cache/file && cat /cache/file && echo",
        ),
    );
    agent.wait_phase("later", "Succeeded", MINUTE);
    // The writer was only waiting for its volume: it is retried and succeeds too.
    agent.wait_phase("writer", "Succeeded", MINUTE);
    assert_no_panic(&agent);
}

#[test]
fn many_bad_inputs_at_once_each_get_a_reason_and_the_good_pod_keeps_running() {
    let _serial = serial();
    let agent = Agent::start("chaos-bad");
    let not_a_dir = agent.dir.path().join("plain-file");
    std::fs::write(&not_a_dir, "not a directory").unwrap();
    let pod = |name: &str, body: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: main\n    image: {BUSYBOX}\n{body}"
        )
    };
    let sleep = "    command: [sh, -c, 'while true; do sleep 1; done']\n";
    agent.write_manifest("good.yaml", &ticker("good"));
    agent.write_manifest("garbage.yaml", "{{{ this is : not : yaml\n\t- [\n");
    agent.write_manifest(
        "oddvolume.yaml",
        &pod(
            "oddvolume",
            &format!("{sleep}    volumeMounts: [{{name: v, mountPath: /v}}]\n  volumes:\n  - name: v\n    fancyNewVolume: {{size: 1}}\n"),
        ),
    );
    agent.write_manifest(
        "noport.yaml",
        &pod(
            "noport",
            &format!("{sleep}    readinessProbe:\n      tcpSocket: {{port: 9}}\n      periodSeconds: 1\n"),
        ),
    );
    agent.write_manifest(
        "nocommand.yaml",
        &pod("nocommand", "    command: [/no/such/binary]\n"),
    );
    agent.write_manifest(
        "wrongtype.yaml",
        &pod(
            "wrongtype",
            &format!(
                "{sleep}    volumeMounts: [{{name: h, mountPath: /h}}]\n  volumes:\n  - name: h\n    hostPath: {{path: {}, type: Directory}}\n",
                not_a_dir.display()
            ),
        ),
    );

    agent.wait_phase("good", "Running", MINUTE);
    agent.wait_until("a FailedManifest event naming garbage.yaml", MINUTE, |a| {
        a.events().iter().any(|e| {
            e.reason.as_deref() == Some("FailedManifest")
                && e.message.as_deref().unwrap_or("").contains("garbage.yaml")
        })
    });
    // The volume without a known source: refused at parse time or at mount time, by name.
    agent.wait_until("the odd volume is reported", MINUTE, |a| {
        let at_parse = a.events().iter().any(|e| {
            e.reason.as_deref() == Some("FailedManifest")
                && e.message
                    .as_deref()
                    .unwrap_or("")
                    .contains("oddvolume.yaml")
        });
        let at_mount = warnings_for(&a.events(), "oddvolume")
            .iter()
            .any(|w| w.starts_with("FailedMount") && w.contains("volume v: unsupported"));
        at_parse || at_mount
    });
    agent.wait_until("the closed port's readiness failure", MINUTE, |a| {
        warnings_for(&a.events(), "noport")
            .iter()
            .any(|w| w.starts_with("Unhealthy") && w.contains("Readiness probe failed"))
    });
    // The missing binary is named both in the container's status (the failed start's
    // terminated state, or lastState once it waits in back-off) and in a Warning event.
    agent.wait_until("the missing command's reason", MINUTE, |a| {
        let pod = a.pod("nocommand");
        let status = pod.as_ref().and_then(|p| status_of(p, "main"));
        let in_status = status.is_some_and(|s| {
            let (state, last) = (
                s.state.clone().unwrap_or_default(),
                s.last_state.clone().unwrap_or_default(),
            );
            let waiting = state.waiting.and_then(|w| w.message);
            let terminated = state.terminated.and_then(|t| t.message);
            let last = last.terminated.and_then(|t| t.message);
            [waiting, terminated, last]
                .into_iter()
                .flatten()
                .any(|m| m.contains("/no/such/binary"))
        });
        in_status
            && warnings_for(&a.events(), "nocommand")
                .iter()
                .any(|w| w.contains("/no/such/binary"))
    });
    agent.wait_until("the hostPath type mismatch", MINUTE, |a| {
        warnings_for(&a.events(), "wrongtype")
            .iter()
            .any(|w| w.starts_with("FailedMount") && w.contains("plain-file"))
    });
    let bad = ["oddvolume", "noport", "nocommand", "wrongtype"];
    for name in bad {
        println!("{name}: {:#?}", warnings_for(&agent.events(), name));
    }
    assert_ne!(
        phase_of(agent.pod("wrongtype").as_ref()),
        Some("Running"),
        "a pod whose volume failed does not run"
    );

    // The good pod ran through all of it untouched, and nothing panicked.
    std::thread::sleep(RESYNC_AND_MORE);
    let good = agent.pod("good").unwrap();
    assert_eq!(phase_of(Some(&good)), Some("Running"));
    assert_eq!(restarts(Some(&good), "main"), Some(0));
    // The agent runs without cluster DNS, which it says of every ClusterFirst pod as the
    // kubelet does (MissingClusterDNS); nothing else is said of the good pod.
    let warnings: Vec<_> = warnings_for(&agent.events(), "good")
        .into_iter()
        .filter(|w| !w.starts_with("MissingClusterDNS: "))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    assert_no_panic(&agent);
}

/// The texts of a CRI log's records, partial records joined to the line they begin.
fn log_lines(cri_log: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut partial = String::new();
    for record in cri_log.lines() {
        let mut fields = record.splitn(4, ' ');
        let (_time, _stream) = (fields.next(), fields.next());
        let (tag, text) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        partial.push_str(text);
        if tag == "F" {
            lines.push(std::mem::take(&mut partial));
        }
    }
    lines
}

#[test]
fn a_container_logging_fast_loses_and_repeats_no_line_while_the_agent_is_killed() {
    let _serial = serial();
    let mut agent = Agent::start("chaos-logs");
    let flags = agent.dir.path().join("log-flags");
    std::fs::create_dir_all(&flags).unwrap();
    // Numbered lines as fast as busybox's shell writes them (a pause every 100 lines keeps the
    // file small) until the host creates /flags/stop.
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: chatty}}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'i=0; while [ ! -e /flags/stop ]; do echo line $i; i=$((i+1)); [ $((i % 100)) = 0 ] && usleep 2000; done; echo done $i; exec sleep 3600']\n    volumeMounts: [{{name: flags, mountPath: /flags}}]\n  volumes:\n  - name: flags\n    hostPath: {{path: {}, type: Directory}}\n",
        flags.display()
    );
    agent.write_manifest("chatty.yaml", &yaml);
    let pod = agent.wait_phase("chatty", "Running", MINUTE);
    // The agent installed its small driver (not the fallback of running itself).
    let driver = nodelet::runtime::logdriver::file_name();
    assert!(agent.root_dir().join("bin").join(driver).exists());
    let log = log_file(&agent, &pod, "main", 0);
    let size = || std::fs::metadata(&log).map_or(0, |m| m.len());
    for round in 0..2 {
        let before = size();
        wait_for("the log to grow", MINUTE, || size() > before + 100_000);
        agent.kill9();
        // Nobody runs the agent now: the container's output still reaches the file.
        let dead = size();
        wait_for("the log to grow with the agent dead", MINUTE, || {
            size() > dead + 100_000
        });
        agent.spawn();
        let back = agent.wait_phase("chatty", "Running", MINUTE);
        assert_eq!(restarts(Some(&back), "main"), Some(0), "round {round}");
    }
    std::fs::write(flags.join("stop"), "").unwrap();
    wait_for("the container's last line", MINUTE, || {
        log_has(&log, "F done ")
    });

    let text = std::fs::read_to_string(&log).unwrap();
    let lines = log_lines(&text);
    let (last, numbered) = lines.split_last().unwrap();
    let count: usize = last.strip_prefix("done ").unwrap().parse().unwrap();
    assert!(count > 0, "{last}");
    assert_eq!(numbered.len(), count, "every line once, none repeated");
    for (i, line) in numbered.iter().enumerate() {
        assert_eq!(line, &format!("line {i}"), "line {i} of {count}");
    }
    println!(
        "{count} lines, {} bytes of log, through two kills",
        text.len()
    );
    agent.remove_manifest("chatty.yaml");
    agent.wait_until("the pod is gone", MINUTE, |a| a.pod("chatty").is_none());
    assert_no_panic(&agent);
}
