//! Pod lifecycle end to end: a `PodManager` over the real containerd (a test namespace of its
//! own), runc, the CNI bridge and the loopback registry. Each test runs pods through the
//! workers and checks what the containers did (files in a hostPath dir) and the reported status.
//! Must run as root with `scripts/setup` done.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use nodelet::events::Recorder;
use nodelet::pod::manager::PodManager;
use nodelet::pod::{Deletion, Desired, NodeFacts, NodeHost, PodContext};
use nodelet::probe::Prober;
use nodelet::runtime::{labels, TaskState};
use nodelet::sandbox::{SandboxConfig, SandboxManager};
use nodelet::status::StatusManager;
use nodelet::store::ObjectStore;
use nodelet::volume::downward::NodeAllocatable;
use nodelet::volume::{VolumeConfig, VolumeManager};
use nodelet_tests::runtime_support::{busybox, pod_cgroups, TestRuntime};
use tokio_util::sync::CancellationToken;

const RUN_DIR: &str = "/run/nodelet-tests/lifecycle";
const WAIT: Duration = Duration::from_secs(90);

fn require_root() {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "lifecycle tests must run as root (containers, mounts, network namespaces)"
    );
}

/// One test's agent pieces: runtime namespace, dirs, context and manager.
struct Harness {
    t: TestRuntime,
    conf: tempfile::TempDir,
    /// This test's own sandbox run dir (orphan clean-up must not see other tests' pods).
    run_dir: PathBuf,
    /// The hostPath dir the test pods write to.
    work: tempfile::TempDir,
    ctx: Arc<PodContext>,
    manager: PodManager,
    cancel: CancellationToken,
}

fn root_of(t: &TestRuntime) -> PathBuf {
    t.dir.path().join("root")
}

fn context(t: &TestRuntime, conf: &Path, run_dir: &Path) -> Arc<PodContext> {
    let root = root_of(t);
    let store = ObjectStore::new();
    let recorder = Recorder::new("lifecycle-node", None);
    let prober = Arc::new(Prober::new(Arc::new(t.rt.clone()), recorder.clone()));
    Arc::new(PodContext {
        node: NodeFacts {
            name: "lifecycle-node".into(),
            ip: Some("127.0.0.1".parse().unwrap()),
            root_dir: root.clone(),
            log_dir: root.join("logs"),
            allocatable: NodeAllocatable::from_host(&root),
        },
        runtime: Arc::new(t.rt.clone()),
        host: Arc::new(NodeHost::new(
            Arc::new(SandboxManager::new(SandboxConfig {
                run_dir: run_dir.to_path_buf(),
                root_dir: root.clone(),
                cni_conf_dir: conf.to_path_buf(),
                cni_bin_dirs: vec![PathBuf::from("/usr/lib/cni")],
                cluster_dns: vec!["10.96.0.10".into()],
                cluster_domain: "cluster.local".into(),
            })),
            VolumeManager::new(
                VolumeConfig {
                    root_dir: root.clone(),
                    plugins_registry: root.join("plugins_registry"),
                    allocatable: NodeAllocatable::from_host(&root),
                },
                store.clone(),
                None,
            ),
        )),
        prober,
        status: StatusManager::new(),
        recorder,
        store,
    })
}

impl Harness {
    async fn new(name: &str) -> Harness {
        require_root();
        let t = TestRuntime::new(&format!("lifecycle-{name}")).await;
        let conf = tempfile::tempdir().unwrap();
        let template =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cni/10-nodelet.conflist");
        std::fs::copy(template, conf.path().join("10-nodelet.conflist")).unwrap();
        let work = tempfile::tempdir().unwrap();
        let run_dir = PathBuf::from(format!("{RUN_DIR}-{name}"));
        let ctx = context(&t, conf.path(), &run_dir);
        let cancel = CancellationToken::new();
        let manager = PodManager::new(ctx.clone(), None, &cancel);
        manager.recover().await.expect("recover");
        manager.sync_all(Vec::new()).await;
        Harness {
            t,
            conf,
            run_dir,
            work,
            ctx,
            manager,
            cancel,
        }
    }

    /// A pod from a YAML spec (indented two spaces), with a fresh UID and a hostPath /work.
    fn pod(&self, name: &str, spec: &str) -> Pod {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let uid = format!("lc-{name}-{}-{nanos}", std::process::id());
        let yaml = format!(
            "metadata:\n  name: {name}\n  namespace: default\n  uid: {uid}\nspec:\n  volumes:\n  - name: work\n    hostPath:\n      path: {}\n      type: DirectoryOrCreate\n{spec}",
            self.work.path().display()
        );
        serde_yaml_ng::from_str(&yaml)
            .unwrap_or_else(|e| panic!("bad test pod {name}: {e}\n{yaml}"))
    }

    fn run(&self, pod: &Pod) {
        self.manager.update(Desired {
            pod: pod.clone().into(),
            deletion: None,
        });
    }

    fn work_file(&self, file: &str) -> String {
        std::fs::read_to_string(self.work.path().join(file)).unwrap_or_default()
    }

    /// How many recorded events have `reason`.
    /// How many times an event of `reason` happened (a repeat is counted in its Event).
    fn events(&self, reason: &str) -> usize {
        let recent = self.ctx.recorder.recent();
        recent
            .iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| e.count.unwrap_or(1).max(1) as usize)
            .sum()
    }

    async fn wait_status(
        &self,
        pod: &Pod,
        what: &str,
        check: impl Fn(&PodStatus) -> bool,
    ) -> PodStatus {
        let uid = uid(pod);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let status = self.ctx.status.get(&uid).map(|r| (*r.status).clone());
            if let Some(s) = status.as_ref().filter(|s| check(s)) {
                return s.clone();
            }
            if tokio::time::Instant::now() > deadline {
                panic!("pod {uid}: never {what}; last status {status:#?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Deletes the pod and waits until its worker has finished.
    async fn delete(&self, pod: &Pod, grace: u64, gone: bool) {
        let mut finished = self.manager.subscribe_finished();
        self.manager.update(Desired {
            pod: pod.clone().into(),
            deletion: Some(Deletion {
                grace: Duration::from_secs(grace),
                gone,
            }),
        });
        let uid = uid(pod);
        tokio::time::timeout(WAIT, async {
            while finished.recv().await.expect("finished channel") != uid {}
        })
        .await
        .unwrap_or_else(|_| panic!("pod {uid} never finished after deletion"));
    }

    async fn containers_of(&self, pod: &Pod) -> Vec<nodelet::runtime::ContainerRecord> {
        let uid = uid(pod);
        let all = self.t.rt.list().await.expect("list");
        all.into_iter()
            .filter(|r| r.labels.get(labels::POD_UID) == Some(&uid))
            .collect()
    }

    async fn stop(self) {
        self.manager.shutdown().await;
        self.cancel.cancel();
        self.t.cleanup().await;
        drop(self.conf);
    }
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap()
}

fn phase(s: &PodStatus) -> &str {
    s.phase.as_deref().unwrap_or_default()
}

fn container<'a>(s: &'a PodStatus, name: &str) -> &'a ContainerStatus {
    s.container_statuses
        .iter()
        .flatten()
        .chain(s.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no status for container {name}: {s:#?}"))
}

fn terminated(c: &ContainerStatus) -> Option<(i32, String)> {
    let t = c.state.as_ref()?.terminated.as_ref()?;
    Some((t.exit_code, t.reason.clone().unwrap_or_default()))
}

fn waiting_reason(c: &ContainerStatus) -> Option<String> {
    c.state.as_ref()?.waiting.as_ref()?.reason.clone()
}

fn condition(s: &PodStatus, kind: &str) -> String {
    s.conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
        .unwrap_or_default()
}

fn running(s: &PodStatus, name: &str) -> bool {
    let c = container(s, name);
    c.state.as_ref().is_some_and(|st| st.running.is_some())
}

fn image() -> String {
    busybox()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_run_in_order_before_the_app() {
    let h = Harness::new("init-order").await;
    let img = image();
    let pod = h.pod(
        "init-order",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  initContainers:
  - name: first
    image: {img}
    command: ["sh", "-c", "echo first >> /work/order"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  - name: second
    image: {img}
    command: ["sh", "-c", "echo second >> /work/order"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "cat /work/order > /work/seen; echo app >> /work/order; exec sleep 3600"]
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.run(&pod);
    let s = h
        .wait_status(&pod, "running", |s| {
            phase(s) == "Running" && running(s, "app")
        })
        .await;
    assert_eq!(h.work_file("seen"), "first\nsecond\n");
    assert_eq!(
        terminated(container(&s, "first")),
        Some((0, "Completed".into()))
    );
    assert_eq!(
        terminated(container(&s, "second")),
        Some((0, "Completed".into()))
    );
    assert_eq!(condition(&s, "Initialized"), "True");
    assert_eq!(condition(&s, "Ready"), "True");
    assert_eq!(condition(&s, "PodReadyToStartContainers"), "True");
    let app = container(&s, "app");
    assert!(app
        .container_id
        .as_deref()
        .unwrap()
        .starts_with("containerd://"));
    assert!(
        app.image_id.contains("@sha256:"),
        "imageID {:?}",
        app.image_id
    );
    assert!(s.pod_ip.as_deref().unwrap().starts_with("10.233."));
    h.delete(&pod, 0, true).await;
    assert!(h.containers_of(&pod).await.is_empty());
    assert!(
        h.ctx.status.get(&uid(&pod)).is_none(),
        "a gone pod's status is forgotten"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_starts_before_the_next_init_container_and_stops_last() {
    let h = Harness::new("sidecar").await;
    let img = image();
    let pod = h.pod(
        "sidecar",
        &format!(
            r#"  terminationGracePeriodSeconds: 20
  initContainers:
  - name: side
    image: {img}
    restartPolicy: Always
    command: ["sh", "-c", "trap 'echo side-term >> /work/order; exit 0' TERM; echo side >> /work/order; touch /work/side-ready; while true; do sleep 1; done"]
    startupProbe:
      exec: {{command: ["cat", "/work/side-ready"]}}
      periodSeconds: 1
    volumeMounts: [{{name: work, mountPath: /work}}]
  - name: init
    image: {img}
    command: ["sh", "-c", "echo init >> /work/order"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "trap 'echo app-term >> /work/order; exit 0' TERM; echo app >> /work/order; while true; do sleep 1; done"]
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.run(&pod);
    let s = h
        .wait_status(&pod, "running", |s| {
            phase(s) == "Running" && running(s, "app") && h.work_file("order").contains("app")
        })
        .await;
    assert_eq!(h.work_file("order"), "side\ninit\napp\n");
    assert_eq!(container(&s, "side").started, Some(true));
    h.delete(&pod, 20, false).await;
    assert_eq!(
        h.work_file("order"),
        "side\ninit\napp\napp-term\nside-term\n"
    );
    let last = h.ctx.status.get(&uid(&pod)).expect("final status");
    assert!(last.finished);
    let s = (*last.status).clone();
    assert_eq!(
        terminated(container(&s, "app")),
        Some((0, "Completed".into()))
    );
    assert_eq!(phase(&s), "Succeeded");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_init_container_under_never_fails_the_pod() {
    let h = Harness::new("init-fail").await;
    let img = image();
    let pod = h.pod(
        "init-fail",
        &format!(
            r#"  restartPolicy: Never
  initContainers:
  - name: broken
    image: {img}
    command: ["sh", "-c", "echo init broke > /dev/termination-log; exit 3"]
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "touch /work/app-ran; sleep 3600"]
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.run(&pod);
    let s = h
        .wait_status(&pod, "Failed", |s| phase(s) == "Failed")
        .await;
    assert_eq!(
        terminated(container(&s, "broken")),
        Some((3, "Error".into()))
    );
    assert_eq!(container(&s, "broken").restart_count, 0);
    let broken = container(&s, "broken")
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(broken.message.as_deref(), Some("init broke\n"));
    assert_eq!(
        waiting_reason(container(&s, "app")).as_deref(),
        Some("PodInitializing")
    );
    assert!(!h.work.path().join("app-ran").exists());
    let reported = h.ctx.status.get(&uid(&pod)).unwrap();
    assert!(
        reported.finished,
        "a terminal pod's worker reports finished"
    );
    h.delete(&pod, 0, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_under_never_run_the_app_to_completion() {
    let h = Harness::new("init-never").await;
    let img = image();
    let pod = h.pod(
        "init-never",
        &format!(
            r#"  restartPolicy: Never
  initContainers:
  - name: init1
    image: {img}
    command: ["sh", "-c", "echo init1 >> /work/order"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  - name: init2
    image: {img}
    command: ["sh", "-c", "echo init2 >> /work/order"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "echo app >> /work/order"]
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.run(&pod);
    let s = h
        .wait_status(&pod, "Succeeded", |s| phase(s) == "Succeeded")
        .await;
    assert_eq!(h.work_file("order"), "init1\ninit2\napp\n");
    for name in ["init1", "init2", "app"] {
        assert_eq!(
            terminated(container(&s, name)),
            Some((0, "Completed".into())),
            "{name}"
        );
    }
    assert!(container(&s, "init1").ready && container(&s, "init2").ready);
    assert_eq!(condition(&s, "Initialized"), "True");
    h.delete(&pod, 0, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_to_logs_on_error_reads_an_unterminated_last_line() {
    let h = Harness::new("fallback-logs").await;
    let img = image();
    let pod = h.pod(
        "fallback-logs",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: term
    image: {img}
    command: ["sh", "-c", "echo -n DONE; /bin/false"]
    terminationMessagePolicy: FallbackToLogsOnError
"#
        ),
    );
    h.run(&pod);
    let s = h
        .wait_status(&pod, "Failed", |s| phase(s) == "Failed")
        .await;
    let term = container(&s, "term")
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(term.exit_code, 1);
    assert_eq!(term.message.as_deref(), Some("DONE"));
    let log = nodelet::pod::logs::log_path(&h.ctx.node.log_dir, &pod, "term", 0);
    let cri = std::fs::read_to_string(&log).unwrap();
    assert_eq!(nodelet::pod::logs::output(&cri, None, false), "DONE");
    h.delete(&pod, 0, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_restarts_a_failing_container_with_back_off() {
    let h = Harness::new("crashloop").await;
    let img = image();
    let pod = h.pod(
        "crashloop",
        &format!(
            r#"  restartPolicy: OnFailure
  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "echo run >> /work/runs; exit 1"]
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.run(&pod);
    let s = h
        .wait_status(&pod, "in CrashLoopBackOff", |s| {
            waiting_reason(container(s, "app")).as_deref() == Some("CrashLoopBackOff")
        })
        .await;
    let app = container(&s, "app");
    assert!(app.restart_count >= 1);
    let last = app
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!(last.exit_code, 1);
    let message = app
        .state
        .as_ref()
        .unwrap()
        .waiting
        .as_ref()
        .unwrap()
        .message
        .clone();
    assert!(message
        .unwrap()
        .starts_with("back-off 10s restarting failed container=app"));
    assert_eq!(phase(&s), "Running");
    h.wait_status(&pod, "restarted twice", |s| {
        container(s, "app").restart_count >= 2
    })
    .await;
    assert!(h.work_file("runs").lines().count() >= 3);
    let events = h.ctx.recorder.recent();
    assert!(events
        .iter()
        .any(|e| e.reason.as_deref() == Some("BackOff")));
    h.delete(&pod, 0, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_cannot_start_counts_restarts_and_backs_off() {
    let h = Harness::new("start-error").await;
    let img = image();
    let pod = h.pod(
        "start-error",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {img}
    command: ["/no/such/binary"]
  - name: fine
    image: {img}
    command: ["sleep", "3600"]
"#
        ),
    );
    h.run(&pod);
    let s = h
        .wait_status(&pod, "in CrashLoopBackOff after a StartError", |s| {
            waiting_reason(container(s, "app")).as_deref() == Some("CrashLoopBackOff")
        })
        .await;
    let app = container(&s, "app");
    assert!(app.restart_count >= 1, "a failed start counts: {app:?}");
    let last = app.last_state.as_ref().and_then(|l| l.terminated.as_ref());
    let last = last.expect("lastState terminated");
    assert_eq!(last.exit_code, 128);
    assert_eq!(last.reason.as_deref(), Some("StartError"));
    // As the kubelet writes a start that never ran (the CRI's started_at 0).
    assert_eq!(
        last.started_at.as_ref().map(|t| t.0.to_string()).as_deref(),
        Some("1970-01-01T00:00:00Z")
    );
    assert!(h.events("Created") >= 1, "the attempt was created");
    assert!(
        last.message
            .as_deref()
            .unwrap_or_default()
            .contains("/no/such/binary"),
        "the cause is named: {last:?}"
    );
    assert!(running(&s, "fine"), "the other container is not disturbed");
    assert!(h.events("Failed") >= 2 && h.events("BackOff") >= 1);
    h.delete(&pod, 0, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_delete_runs_pre_stop_then_sends_term() {
    let h = Harness::new("prestop").await;
    let img = image();
    let pod = h.pod(
        "prestop",
        &format!(
            r#"  terminationGracePeriodSeconds: 30
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "trap 'echo term >> /work/log; exit 0' TERM; while true; do sleep 1; done"]
    lifecycle:
      preStop:
        exec: {{command: ["sh", "-c", "echo prestop >> /work/log"]}}
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.run(&pod);
    h.wait_status(&pod, "running", |s| running(s, "app")).await;
    h.delete(&pod, 10, false).await;
    assert_eq!(h.work_file("log"), "prestop\nterm\n");
    let s = h.ctx.status.get(&uid(&pod)).unwrap().status;
    assert_eq!(
        terminated(container(&s, "app")),
        Some((0, "Completed".into()))
    );
    assert!(h.containers_of(&pod).await.is_empty());
    assert_eq!(h.events("Killing"), 1, "one Killing event per stop");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_ignoring_term_is_killed_after_the_grace() {
    let h = Harness::new("ignore-term").await;
    let img = image();
    let pod = h.pod(
        "ignore-term",
        &format!(
            r#"  terminationGracePeriodSeconds: 3
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "trap 'echo got-term >> /work/log' TERM; while true; do sleep 1; done"]
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.run(&pod);
    h.wait_status(&pod, "running", |s| running(s, "app")).await;
    h.delete(&pod, 30, false).await;
    let log = h.work_file("log");
    assert_eq!(
        log.matches("got-term").count(),
        1,
        "TERM once, then KILL: {log}"
    );
    assert_eq!(h.events("Killing"), 1, "one Killing event per stop");
    let s = h.ctx.status.get(&uid(&pod)).unwrap().status;
    assert_eq!(
        terminated(container(&s, "app")),
        Some((137, "Error".into()))
    );
    assert_eq!(phase(&s), "Failed");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_deadline_fails_the_pod() {
    let h = Harness::new("deadline").await;
    let img = image();
    let pod = h.pod(
        "deadline",
        &format!(
            r#"  activeDeadlineSeconds: 3
  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {img}
    command: ["sleep", "3600"]
"#
        ),
    );
    h.run(&pod);
    let s = h
        .wait_status(&pod, "Failed", |s| phase(s) == "Failed")
        .await;
    assert_eq!(s.reason.as_deref(), Some("DeadlineExceeded"));
    assert!(terminated(container(&s, "app")).is_some());
    let events = h.ctx.recorder.recent();
    let deadline: Vec<_> = events
        .iter()
        .filter(|e| e.reason.as_deref() == Some("DeadlineExceeded"))
        .collect();
    assert_eq!(deadline.len(), 1);
    assert_eq!(deadline[0].type_.as_deref(), Some("Normal"));
    assert_eq!(
        deadline[0].message.as_deref(),
        Some("Pod was active on the node longer than the specified deadline")
    );
    assert_eq!(condition(&s, "Ready"), "False");
    h.delete(&pod, 0, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_oom_kills_the_container() {
    let h = Harness::new("oom").await;
    let img = image();
    let pod = h.pod(
        "oom",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "tail /dev/zero"]
    resources:
      limits: {{memory: 16Mi}}
"#
        ),
    );
    h.run(&pod);
    let s = h
        .wait_status(&pod, "Failed", |s| phase(s) == "Failed")
        .await;
    assert_eq!(
        terminated(container(&s, "app")),
        Some((137, "OOMKilled".into()))
    );
    assert_eq!(s.qos_class.as_deref(), Some("Burstable"));
    h.delete(&pod, 0, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_manager_re_adopts_running_containers() {
    let h = Harness::new("readopt").await;
    let img = image();
    let pod = h.pod(
        "readopt",
        &format!(
            r#"  restartPolicy: OnFailure
  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "if [ -f /work/once ]; then exec sleep 3600; fi; touch /work/once; exit 1"]
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.run(&pod);
    let before = h
        .wait_status(&pod, "running after one restart", |s| {
            running(s, "app") && container(s, "app").restart_count == 1
        })
        .await;
    let id_before = container(&before, "app").container_id.clone().unwrap();
    let last_exit = |s: &PodStatus| {
        let last = container(s, "app").last_state.clone();
        last.and_then(|l| l.terminated)
            .map(|t| (t.exit_code, t.finished_at))
    };
    assert_eq!(last_exit(&before).map(|e| e.0), Some(1));
    let running_pid = |records: &[nodelet::runtime::ContainerRecord]| {
        let pids: Vec<u32> = records
            .iter()
            .filter_map(|r| match r.state {
                TaskState::Running { pid, .. } => Some(pid),
                _ => None,
            })
            .collect();
        assert_eq!(
            records.len(),
            2,
            "the latest and the previous attempt: {records:?}"
        );
        assert_eq!(pids.len(), 1, "one attempt runs: {records:?}");
        pids[0]
    };
    let pid_before = running_pid(&h.containers_of(&pod).await);

    // Simulated agent restart: the old manager stops, a new one over a fresh context recovers.
    h.manager.shutdown().await;
    let ctx = context(&h.t, h.conf.path(), &h.run_dir);
    let cancel = CancellationToken::new();
    let manager = PodManager::new(ctx.clone(), None, &cancel);
    assert_eq!(manager.recover().await.expect("recover"), 1);
    manager
        .sync_all(vec![Desired {
            pod: pod.clone().into(),
            deletion: None,
        }])
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let after = loop {
        let s = ctx.status.get(&uid(&pod)).map(|r| (*r.status).clone());
        if let Some(s) = s.filter(|s| running(s, "app")) {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "never re-adopted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let app = container(&after, "app");
    assert_eq!(app.restart_count, 1);
    assert_eq!(app.container_id.as_deref(), Some(id_before.as_str()));
    assert_eq!(
        app.image_id,
        container(&before, "app").image_id,
        "imageID restored"
    );
    assert_eq!(last_exit(&after), last_exit(&before), "lastState kept");
    // A manifest pod has no API status to take readiness from: with no readiness probe, a
    // running container is ready.
    assert!(
        app.ready,
        "re-adopted container without readiness probe is ready"
    );
    assert_eq!(condition(&after, "Ready"), "True");
    assert_eq!(running_pid(&h.containers_of(&pod).await), pid_before);

    let mut finished = manager.subscribe_finished();
    manager.update(Desired {
        pod: pod.clone().into(),
        deletion: Some(Deletion {
            grace: Duration::ZERO,
            gone: true,
        }),
    });
    tokio::time::timeout(WAIT, async {
        while finished.recv().await.unwrap() != uid(&pod) {}
    })
    .await
    .expect("deleted after re-adoption");
    assert!(h.containers_of(&pod).await.is_empty());
    manager.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_of_pods_no_source_wants_are_removed_on_first_sync() {
    let h = Harness::new("orphans").await;
    let img = image();
    let pod = h.pod(
        "orphan",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {img}
    command: ["sleep", "3600"]
"#
        ),
    );
    h.run(&pod);
    h.wait_status(&pod, "running", |s| running(s, "app")).await;
    h.manager.shutdown().await;
    assert_eq!(
        h.containers_of(&pod).await.len(),
        1,
        "shutdown keeps containers"
    );

    let ctx = context(&h.t, h.conf.path(), &h.run_dir);
    let cancel = CancellationToken::new();
    let manager = PodManager::new(ctx.clone(), None, &cancel);
    manager.recover().await.expect("recover");
    manager.sync_all(Vec::new()).await;
    assert!(h.containers_of(&pod).await.is_empty());
    assert!(!ctx.host.sandbox_pods().contains(&uid(&pod)));
    manager.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_reported_and_retried_without_affecting_other_pods() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let h = Harness::new("bad-input").await;
    let img = image();
    let missing_image = h.pod(
        "missing-image",
        "  containers:\n  - name: app\n    image: 127.0.0.1:5000/nodelet/does-not-exist:latest\n",
    );
    let missing_config = h.pod(
        "missing-config",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "echo $VALUE > /work/value; exec sleep 3600"]
    env:
    - name: VALUE
      valueFrom: {{configMapKeyRef: {{name: settings, key: value}}}}
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    let good = h.pod(
        "good",
        &format!("  terminationGracePeriodSeconds: 2\n  containers:\n  - name: app\n    image: {img}\n    command: [sleep, '3600']\n"),
    );
    h.run(&missing_image);
    h.run(&missing_config);
    h.run(&good);
    h.wait_status(&good, "running", |s| running(s, "app")).await;
    let s = h
        .wait_status(&missing_config, "CreateContainerConfigError", |s| {
            waiting_reason(container(s, "app")).as_deref() == Some("CreateContainerConfigError")
        })
        .await;
    assert_eq!(phase(&s), "Pending");
    h.wait_status(&missing_image, "ImagePullBackOff", |s| {
        waiting_reason(container(s, "app")).as_deref() == Some("ImagePullBackOff")
    })
    .await;
    let events = h.ctx.recorder.recent();
    let failed = |name: &str| {
        events.iter().any(|e| {
            e.involved_object.name.as_deref() == Some(name)
                && e.reason.as_deref() == Some("Failed")
                && e.type_.as_deref() == Some("Warning")
        })
    };
    assert!(failed("missing-image") && failed("missing-config"));

    let cm = ConfigMap {
        data: Some([("value".to_string(), "hello".to_string())].into()),
        ..Default::default()
    };
    h.ctx.store.set_config_map("default", "settings", Some(cm));
    h.wait_status(&missing_config, "running once the ConfigMap exists", |s| {
        running(s, "app")
    })
    .await;
    assert_eq!(h.work_file("value"), "hello\n");
    let s = h
        .wait_status(&good, "still running", |s| running(s, "app"))
        .await;
    assert_eq!(container(&s, "app").restart_count, 0);
    for pod in [&missing_image, &missing_config, &good] {
        h.delete(pod, 0, true).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_failure_restarts_the_container() {
    let h = Harness::new("liveness").await;
    let img = image();
    let pod = h.pod(
        "liveness",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {img}
    command: ["sleep", "3600"]
    livenessProbe:
      exec: {{command: ["cat", "/work/alive"]}}
      periodSeconds: 1
      failureThreshold: 1
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.run(&pod);
    let s = h
        .wait_status(&pod, "restarted by liveness", |s| {
            container(s, "app").restart_count >= 1
        })
        .await;
    let app = container(&s, "app");
    let last = app.last_state.as_ref().and_then(|l| l.terminated.as_ref());
    let state = app.state.as_ref().and_then(|l| l.terminated.as_ref());
    assert_eq!(last.or(state).map(|t| t.exit_code), Some(137));
    let events = h.ctx.recorder.recent();
    assert!(events
        .iter()
        .any(|e| e.reason.as_deref() == Some("Unhealthy")));
    assert!(events
        .iter()
        .any(|e| e.reason.as_deref() == Some("Killing")));
    h.delete(&pod, 0, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_probe_drives_ready() {
    let h = Harness::new("readiness").await;
    let img = image();
    let pod = h.pod(
        "readiness",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {img}
    command: ["sleep", "3600"]
    readinessProbe:
      exec: {{command: ["cat", "/work/ready"]}}
      periodSeconds: 1
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.run(&pod);
    let s = h.wait_status(&pod, "running", |s| running(s, "app")).await;
    assert_eq!(condition(&s, "Ready"), "False");
    assert!(!container(&s, "app").ready);
    std::fs::write(h.work.path().join("ready"), "yes").unwrap();
    let s = h
        .wait_status(&pod, "ready", |s| condition(s, "Ready") == "True")
        .await;
    assert_eq!(condition(&s, "ContainersReady"), "True");
    assert!(container(&s, "app").ready);
    std::fs::remove_file(h.work.path().join("ready")).unwrap();
    h.wait_status(&pod, "unready again", |s| condition(s, "Ready") == "False")
        .await;
    h.delete(&pod, 0, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_post_start_hook_kills_the_container() {
    let h = Harness::new("poststart").await;
    let img = image();
    let pod = h.pod(
        "poststart",
        &format!(
            r#"  restartPolicy: Never
  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {img}
    command: ["sleep", "3600"]
    lifecycle:
      postStart:
        exec: {{command: ["sh", "-c", "echo secret-token; exit 7"]}}
"#
        ),
    );
    h.run(&pod);
    let s = h
        .wait_status(&pod, "Failed", |s| phase(s) == "Failed")
        .await;
    assert!(terminated(container(&s, "app")).is_some());
    let events = h.ctx.recorder.recent();
    let hook = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("FailedPostStartHook"))
        .expect("a FailedPostStartHook event");
    // The kubelet's fixed text: the hook's output never reaches an event.
    assert_eq!(hook.message.as_deref(), Some("PostStartHook failed"));
    h.delete(&pod, 0, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_name_pod_waits_for_its_predecessor() {
    let h = Harness::new("same-name").await;
    let img = image();
    let old = h.pod(
        "web",
        &format!(
            r#"  terminationGracePeriodSeconds: 10
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "trap 'echo old-term >> /work/order; exit 0' TERM; while true; do sleep 1; done"]
    lifecycle:
      preStop:
        sleep: {{seconds: 2}}
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.run(&old);
    h.wait_status(&old, "running", |s| running(s, "app")).await;
    let new = h.pod(
        "web",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "echo new-start >> /work/order; exec sleep 3600"]
    volumeMounts: [{{name: work, mountPath: /work}}]
"#
        ),
    );
    h.manager.update(Desired {
        pod: old.clone().into(),
        deletion: Some(Deletion {
            grace: Duration::from_secs(10),
            gone: false,
        }),
    });
    h.run(&new);
    h.wait_status(&new, "running", |s| running(s, "app")).await;
    assert_eq!(h.work_file("order"), "old-term\nnew-start\n");
    assert!(h.ctx.status.get(&uid(&old)).unwrap().finished);
    h.delete(&new, 0, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_pre_stop_hooks_reach_the_pod() {
    let h = Harness::new("http-hook").await;
    let httpd = "127.0.0.1:5000/nodelet/httpd:latest";
    let spec = |path: &str, port: &str| {
        format!(
            r#"  terminationGracePeriodSeconds: 5
  containers:
  - name: web
    image: {httpd}
    ports: [{{name: http, containerPort: 8080}}]
    lifecycle:
      preStop:
        httpGet: {{path: "{path}", port: {port}}}
"#
        )
    };
    // The kubelet's hook runner takes any answer as success, a 404 too; only a request that
    // cannot be made fails the hook.
    let good = h.pod("hook-404", &spec("/no-such-page", "http"));
    let bad = h.pod("hook-closed", &spec("/", "9999"));
    h.run(&good);
    h.run(&bad);
    for pod in [&good, &bad] {
        h.wait_status(pod, "running", |s| running(s, "web")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.delete(pod, 5, false).await;
    }
    let failed_hook = |name: &str| {
        h.ctx.recorder.recent().iter().any(|e| {
            e.involved_object.name.as_deref() == Some(name)
                && e.reason.as_deref() == Some("FailedPreStopHook")
        })
    };
    assert!(
        !failed_hook("hook-404"),
        "a 404 answer is a successful hook"
    );
    assert!(failed_hook("hook-closed"), "no answer is a failed hook");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_image_restarts_the_container_even_under_never() {
    let h = Harness::new("image-change").await;
    let img = image();
    let mut pod = h.pod(
        "image-change",
        &format!(
            r#"  restartPolicy: Never
  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {img}
    command: ["sleep", "3600"]
"#
        ),
    );
    h.run(&pod);
    h.wait_status(&pod, "running", |s| running(s, "app")).await;
    let httpd = "127.0.0.1:5000/nodelet/httpd:latest";
    pod.spec.as_mut().unwrap().containers[0].image = Some(httpd.into());
    h.run(&pod);
    let s = h
        .wait_status(&pod, "running the new image", |s| {
            running(s, "app") && container(s, "app").image == httpd
        })
        .await;
    assert_eq!(container(&s, "app").restart_count, 1);
    assert_eq!(phase(&s), "Running");
    let records = h.containers_of(&pod).await;
    assert_eq!(
        records.len(),
        2,
        "the new attempt and the previous: {records:?}"
    );
    let (running, exited): (Vec<_>, Vec<_>) = records
        .iter()
        .partition(|r| matches!(r.state, TaskState::Running { .. }));
    assert!(running[0].image.contains("httpd"), "{}", running[0].image);
    assert!(exited[0].image.contains("busybox"), "{}", exited[0].image);
    h.delete(&pod, 0, true).await;
    h.stop().await;
}

/// Issue 10.12 and 10.13: a completed pod keeps its exited container and its logs; once
/// deleted, the container goes, the pod's cgroup in every hierarchy, and its log directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_pod_once_deleted_leaves_no_cgroup_or_logs() {
    let h = Harness::new("cgroups").await;
    let img = image();
    let pod = h.pod(
        "done",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: app
    image: {img}
    command: ["sh", "-c", "echo done"]
"#
        ),
    );
    h.run(&pod);
    h.wait_status(&pod, "Succeeded", |s| phase(s) == "Succeeded")
        .await;
    let log = nodelet::pod::logs::log_path(&h.ctx.node.log_dir, &pod, "app", 0);
    let pod_logs = log.parent().and_then(Path::parent).unwrap().to_path_buf();
    assert!(log.exists(), "a completed pod keeps its logs");
    h.delete(&pod, 0, true).await;
    assert!(h.containers_of(&pod).await.is_empty());
    assert_eq!(
        pod_cgroups(&uid(&pod)),
        Vec::<PathBuf>::new(),
        "cgroups left"
    );
    assert!(!pod_logs.exists(), "logs left at {}", pod_logs.display());
    h.stop().await;
}
