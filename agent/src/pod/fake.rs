//! In-memory doubles of the worker's seams, for fast tests on paused time without root:
//! `FakeRuntime` keeps containers and tasks in a map (a signal ends a running task, as a
//! process that obeys it would) and can be taken "down" like a stopped containerd, or told to
//! panic on one call; its execs (hooks) can be made to fail or never end, and its tasks to
//! ignore TERM; `FakeHost` keeps sandboxes, volumes and cgroups as sets, and a pod's
//! cgroup cannot go while the runtime still holds one of its containers (as runc's cgroups).
#![allow(dead_code)] // helpers the fault tests use one by one

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{ContainerRuntime, NodeFacts, PodContext, PodHost};
use crate::events::Recorder;
use crate::probe::{Exec, ExecError, Prober};
use crate::runtime::{
    labels, ContainerConfig, ContainerRecord, Device, ExecOutput, ExitEvent, ImageInfo, Mount,
    PullPolicy, RegistryAuth, Result, RuntimeError, TaskStage, TaskState,
};
use crate::sandbox::{Sandbox, SandboxError};
use crate::status::StatusManager;
use crate::store::ObjectStore;
use crate::volume::{PodVolumes, VolumeError};

#[derive(Clone, Debug)]
pub(crate) struct FakeContainer {
    pub labels: std::collections::HashMap<String, String>,
    pub image: String,
    pub created_at: SystemTime,
    pub task: TaskState,
}

#[derive(Default)]
struct RuntimeState {
    down: bool,
    containers: BTreeMap<String, FakeContainer>,
    /// Pods with a cgroup made by a container's task.
    cgroups: BTreeSet<String>,
    /// Calls that reached the runtime while it was up ("signal <id> <n>", "remove <id>", …).
    calls: Vec<String>,
    /// The next call of this operation panics.
    panic_on: Option<&'static str>,
    next_pid: u32,
    /// How an exec ends: None never, Some(code) with that exit code.
    exec_exit: Option<Option<i32>>,
    /// Tasks take TERM without ending (only KILL ends them).
    ignore_term: bool,
    /// Creates fail: the OCI runtime refuses the process with this message.
    refuse_start: Option<String>,
}

/// containerd in a map.
pub(crate) struct FakeRuntime {
    state: Mutex<RuntimeState>,
    exits: broadcast::Sender<ExitEvent>,
}

fn unavailable(op: &'static str) -> RuntimeError {
    RuntimeError::Grpc {
        op,
        status: tonic::Status::unavailable("connection refused (fake containerd is down)"),
    }
}

impl FakeRuntime {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            exits: broadcast::channel(1024).0,
        })
    }

    /// Takes containerd away (every call fails as unreachable) or brings it back.
    pub(crate) fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// The next call of `op` panics (in the caller's task).
    pub(crate) fn panic_on(&self, op: &'static str) {
        self.state.lock().unwrap().panic_on = Some(op);
    }

    /// Execs end with `code` (Some) or never end (None); by default they end with 0.
    pub(crate) fn set_exec_exit(&self, code: Option<i32>) {
        self.state.lock().unwrap().exec_exit = Some(code);
    }

    /// Starts fail as the OCI runtime refusing the process (a missing binary) with `message`,
    /// in tasks.Create as with containerd.
    pub(crate) fn refuse_start(&self, message: &str) {
        self.state.lock().unwrap().refuse_start = Some(message.to_string());
    }

    /// Tasks ignore TERM (as a process that traps it and goes on).
    pub(crate) fn set_ignore_term(&self, ignore: bool) {
        self.state.lock().unwrap().ignore_term = ignore;
    }

    pub(crate) fn containers(&self) -> BTreeMap<String, FakeContainer> {
        self.state.lock().unwrap().containers.clone()
    }

    /// Ids whose task runs.
    pub(crate) fn running(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        let running = st.containers.iter();
        let running = running.filter(|(_, c)| matches!(c.task, TaskState::Running { .. }));
        running.map(|(id, _)| id.clone()).collect()
    }

    pub(crate) fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// The calls made so far, forgotten here (a heap test counts only the agent's heap).
    pub(crate) fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().unwrap().calls)
    }

    pub(crate) fn cgroups(&self) -> BTreeSet<String> {
        self.state.lock().unwrap().cgroups.clone()
    }

    /// The task of `id` exits by itself with `code`.
    pub(crate) fn exit(&self, id: &str, code: i32) {
        let mut st = self.state.lock().unwrap();
        Self::end_task(&mut st, &self.exits, id, code);
    }

    fn end_task(st: &mut RuntimeState, exits: &broadcast::Sender<ExitEvent>, id: &str, code: i32) {
        let Some(c) = st.containers.get_mut(id) else {
            return;
        };
        if let TaskState::Running { started_at, .. } = c.task {
            let finished_at = SystemTime::now();
            c.task = TaskState::Exited {
                exit_code: code,
                started_at: Some(started_at),
                finished_at,
                oom_killed: false,
            };
            let _ = exits.send(ExitEvent {
                container_id: id.to_string(),
                exit_code: code,
                exited_at: finished_at,
            });
        }
    }

    /// Enters a call: panics when told to, fails while down, logs it otherwise.
    fn call(
        &self,
        op: &'static str,
        detail: String,
    ) -> Result<std::sync::MutexGuard<'_, RuntimeState>> {
        let mut st = self.state.lock().unwrap();
        if st.panic_on == Some(op) {
            st.panic_on = None;
            drop(st);
            panic!("injected panic in {op}");
        }
        if st.down {
            return Err(unavailable(op));
        }
        st.calls
            .push(format!("{op} {detail}").trim_end().to_string());
        Ok(st)
    }

    fn record(id: &str, c: &FakeContainer) -> ContainerRecord {
        ContainerRecord {
            id: id.to_string(),
            labels: c.labels.clone(),
            image: c.image.clone(),
            created_at: Some(c.created_at),
            state: c.task.clone(),
        }
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn ensure_image(
        &self,
        image: &str,
        _policy: PullPolicy,
        _auth: Option<&RegistryAuth>,
    ) -> Result<ImageInfo> {
        let _st = self.call("ensure_image", image.to_string())?;
        Ok(ImageInfo {
            reference: image.to_string(),
            repo_digest: format!("{image}@sha256:fake"),
            image_id: "sha256:fake".into(),
            config: Default::default(),
        })
    }

    async fn create(&self, config: &ContainerConfig) -> Result<()> {
        let mut st = self.call("create", config.id.clone())?;
        // As containerd: runc creates the process (and fails on a missing binary) in
        // tasks.Create, and a failed create leaves no container.
        if let Some(message) = st.refuse_start.clone() {
            return Err(RuntimeError::StartFailure {
                stage: TaskStage::Create,
                message,
            });
        }
        let container = FakeContainer {
            labels: config.labels.clone(),
            image: config.image.reference.clone(),
            created_at: SystemTime::now(),
            task: TaskState::NoTask,
        };
        st.containers.insert(config.id.clone(), container);
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<u32> {
        let mut st = self.call("start", id.to_string())?;
        st.next_pid += 1;
        let pid = 1000 + st.next_pid;
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound { id: id.into() })?;
        c.task = TaskState::Running {
            pid,
            started_at: SystemTime::now(),
        };
        if let Some(uid) = c.labels.get(labels::POD_UID).cloned() {
            st.cgroups.insert(uid);
        }
        Ok(pid)
    }

    async fn signal(&self, id: &str, signal: i32) -> Result<()> {
        let mut st = self.call("signal", format!("{id} {signal}"))?;
        if !(st.ignore_term && signal == libc::SIGTERM) {
            Self::end_task(&mut st, &self.exits, id, 128 + signal);
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let mut st = self.call("remove", id.to_string())?;
        Self::end_task(&mut st, &self.exits, id, 137);
        st.containers.remove(id);
        Ok(())
    }

    async fn inspect(&self, id: &str) -> Result<ContainerRecord> {
        let st = self.call("inspect", String::new())?;
        let c = st
            .containers
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound { id: id.into() })?;
        Ok(Self::record(id, c))
    }

    async fn list(&self) -> Result<Vec<ContainerRecord>> {
        let st = self.call("list", String::new())?;
        Ok(st
            .containers
            .iter()
            .map(|(id, c)| Self::record(id, c))
            .collect())
    }

    async fn exec(&self, id: &str, _args: &[String], _timeout: Duration) -> Result<ExecOutput> {
        let exit = self
            .call("exec", id.to_string())?
            .exec_exit
            .unwrap_or(Some(0));
        let Some(exit_code) = exit else {
            return std::future::pending().await;
        };
        Ok(ExecOutput {
            exit_code,
            ..Default::default()
        })
    }

    fn exits(&self) -> broadcast::Receiver<ExitEvent> {
        self.exits.subscribe()
    }
}

/// Probes through the fake always pass.
struct FakeExec;

impl Exec for FakeExec {
    fn exec(
        &self,
        _container_id: &str,
        _command: &[String],
        _timeout: Duration,
    ) -> BoxFuture<'static, Result<(i32, Vec<u8>), ExecError>> {
        Box::pin(async { Ok((0, Vec::new())) })
    }
}

#[derive(Default)]
struct HostState {
    sandboxes: BTreeSet<String>,
    volumes: BTreeSet<String>,
    /// The UID of every volume refresh, in order.
    refreshes: Vec<String>,
}

/// Sandboxes and volumes as sets; cgroups from the runtime.
pub(crate) struct FakeHost {
    runtime: Arc<FakeRuntime>,
    state: Mutex<HostState>,
}

impl FakeHost {
    pub(crate) fn sandboxes(&self) -> BTreeSet<String> {
        self.state.lock().unwrap().sandboxes.clone()
    }

    pub(crate) fn volumes(&self) -> BTreeSet<String> {
        self.state.lock().unwrap().volumes.clone()
    }

    /// How many times `uid`'s volumes were refreshed.
    pub(crate) fn refreshes(&self, uid: &str) -> usize {
        let state = self.state.lock().unwrap();
        state.refreshes.iter().filter(|u| *u == uid).count()
    }
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

#[async_trait]
impl PodHost for FakeHost {
    async fn setup_volumes(&self, pod: &Arc<Pod>) -> Result<PodVolumes, VolumeError> {
        self.state.lock().unwrap().volumes.insert(uid(pod));
        Ok(PodVolumes::default())
    }
    async fn refresh_volumes(
        &self,
        pod: &Arc<Pod>,
        _volumes: &PodVolumes,
    ) -> Result<(), VolumeError> {
        self.state.lock().unwrap().refreshes.push(uid(pod));
        Ok(())
    }
    fn container_mounts(
        &self,
        _pod: &Pod,
        _container: &Container,
        _volumes: &PodVolumes,
    ) -> Result<(Vec<Mount>, Vec<Device>), VolumeError> {
        Ok((Vec::new(), Vec::new()))
    }
    async fn teardown_volumes(&self, uid: &str) -> Result<(), VolumeError> {
        self.state.lock().unwrap().volumes.remove(uid);
        Ok(())
    }
    async fn retry_orphan_teardown(&self, uid: String, _cancel: CancellationToken) {
        self.state.lock().unwrap().volumes.remove(&uid);
    }
    fn volume_pods(&self) -> Vec<String> {
        self.volumes().into_iter().collect()
    }
    async fn ensure_sandbox(&self, pod: &Pod) -> Result<Sandbox, SandboxError> {
        let uid = uid(pod);
        self.state.lock().unwrap().sandboxes.insert(uid.clone());
        Ok(Sandbox {
            uid,
            namespaces: Default::default(),
            ip: Some("10.88.0.2".parse().expect("ip")),
            hostname: pod.metadata.name.clone().unwrap_or_default(),
            hosts_file: PathBuf::from("/fake/hosts"),
            resolv_file: PathBuf::from("/fake/resolv.conf"),
            hostname_file: PathBuf::from("/fake/hostname"),
            cluster_dns_missing: false,
        })
    }
    async fn teardown_sandbox(&self, uid: &str) -> Result<(), SandboxError> {
        self.state.lock().unwrap().sandboxes.remove(uid);
        Ok(())
    }
    fn sandbox_pods(&self) -> Vec<String> {
        self.sandboxes().into_iter().collect()
    }
    fn remove_pod_cgroups(&self, uid: &str) -> std::io::Result<()> {
        let mut st = self.runtime.state.lock().unwrap();
        let held = st.containers.values().any(|c| {
            c.labels.get(labels::POD_UID).map(String::as_str) == Some(uid)
                && !matches!(c.task, TaskState::NoTask)
        });
        if held {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        st.cgroups.remove(uid);
        Ok(())
    }
}

/// A pod context over the fakes, with its files under `root`.
pub(crate) fn context(root: &Path) -> (Arc<PodContext>, Arc<FakeRuntime>, Arc<FakeHost>) {
    let runtime = FakeRuntime::new();
    let host = Arc::new(FakeHost {
        runtime: runtime.clone(),
        state: Mutex::default(),
    });
    let recorder = Recorder::new("fake-node", None);
    let ctx = Arc::new(PodContext {
        node: NodeFacts {
            name: "fake-node".into(),
            ip: Some("127.0.0.1".parse().expect("ip")),
            root_dir: root.join("root"),
            log_dir: root.join("logs"),
            allocatable: crate::volume::downward::NodeAllocatable {
                cpu_milli: 2000,
                memory: 1 << 30,
                ephemeral_storage: 10 << 30,
            },
        },
        runtime: runtime.clone(),
        host: host.clone(),
        prober: Arc::new(Prober::new(Arc::new(FakeExec), recorder.clone())),
        status: StatusManager::new(),
        recorder,
        store: ObjectStore::new(),
    });
    (ctx, runtime, host)
}
