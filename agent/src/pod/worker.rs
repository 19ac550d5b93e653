//! One pod worker: a task per pod UID that steps the state machine and carries out its actions
//! against the runtime, sandbox, volumes and prober, then reports the computed status. It
//! alone decides the pod's lifecycle; its inputs are the latest desired pod (watch channel),
//! the exits of its containers (routed by the manager), probe results and object-store changes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::config::{
    argv, bind, container_id, log_tail, merge_env, parse_signal, pull_policy, registry_auth,
    security, spec_hash, sysctls, user,
};
use super::machine::{
    self, Action, Attempt, ContainerObs, Exit, KillReason, KillRequest, Kind, Observed, PodState,
    Waiting,
};
use super::{checkpoint, env, hooks, resources, status, Desired, PodContext};
use crate::events::{pod_ref, EventType};
use crate::probe::{ProbeKey, ProbeKind, ProbeResult, ProbeTarget, ProbeUpdate};
use crate::runtime::{
    labels, ContainerConfig, ContainerRecord, ExitEvent, ImageInfo, Mount, PullPolicy,
    RuntimeError, TaskState,
};
use crate::sandbox::Sandbox;
use crate::volume::PodVolumes;

/// How often running containers are re-inspected (an exit event may be missed).
const RESYNC: Duration = Duration::from_secs(10);
/// Wait before retrying a failed sandbox or volume step.
const RETRY: Duration = Duration::from_secs(5);
/// The most of a termination message kept.
const MESSAGE_MAX: usize = 4096;

/// Routes containerd exit events to the worker owning the container id.
#[derive(Default)]
pub(crate) struct ExitRouter {
    routes: Mutex<HashMap<String, mpsc::UnboundedSender<ExitEvent>>>,
}

impl ExitRouter {
    fn register(&self, id: &str, tx: &mpsc::UnboundedSender<ExitEvent>) {
        let mut routes = self.routes.lock().expect("exit routes lock");
        routes.insert(id.to_string(), tx.clone());
    }

    fn unregister(&self, id: &str) {
        self.routes.lock().expect("exit routes lock").remove(id);
    }

    pub(crate) fn route(&self, event: ExitEvent) {
        let routes = self.routes.lock().expect("exit routes lock");
        if let Some(tx) = routes.get(&event.container_id) {
            let _ = tx.send(event);
        }
    }
}

/// How a worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The pod is deleted and released.
    Done,
    /// The agent is stopping; the pod's containers keep running.
    Stopped,
}

/// Worker-only facts about one container.
#[derive(Default)]
struct Live {
    /// containerd id of the latest attempt.
    id: Option<String>,
    /// containerd id of the attempt before, kept (exited) for lastState after a restart.
    previous: Option<String>,
    /// The image's STOPSIGNAL.
    stop_signal: Option<String>,
    /// Probes run for the current attempt.
    probing: bool,
    /// SPEC_HASH of the latest attempt.
    hash: Option<String>,
    kill: Option<AbortHandle>,
}

pub(crate) struct Worker {
    ctx: Arc<PodContext>,
    router: Arc<ExitRouter>,
    uid: String,
    desired: Desired,
    obs: Observed,
    live: BTreeMap<String, Live>,
    crash: Backoff,
    failures: Backoff,
    sandbox: Option<Sandbox>,
    volumes: Option<PodVolumes>,
    reported: Option<PodStatus>,
    exit_tx: mpsc::UnboundedSender<ExitEvent>,
    exit_rx: mpsc::UnboundedReceiver<ExitEvent>,
    probe_tx: mpsc::UnboundedSender<ProbeUpdate>,
    probe_rx: mpsc::UnboundedReceiver<ProbeUpdate>,
    /// Something changed: step again at once.
    dirty: bool,
}

fn node_memory() -> u64 {
    static MEM: OnceLock<u64> = OnceLock::new();
    *MEM.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(1 << 30, |kb| kb * 1024)
    })
}

fn field_path(kind: Kind, name: &str) -> String {
    match kind {
        Kind::App => format!("spec.containers{{{name}}}"),
        _ => format!("spec.initContainers{{{name}}}"),
    }
}

impl Worker {
    pub(crate) fn new(
        ctx: Arc<PodContext>,
        router: Arc<ExitRouter>,
        desired: Desired,
        recovered: Vec<ContainerRecord>,
    ) -> (Self, Vec<String>) {
        let uid = desired.pod.metadata.uid.clone().unwrap_or_default();
        let (exit_tx, exit_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let api_start = desired
            .pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| SystemTime::from(t.0));
        let first_created = recovered.iter().filter_map(|r| r.created_at).min();
        // A re-adopted pod's status goes on from what the API holds (written by the agent
        // before its restart): conditions keep their lastTransitionTime, nothing flaps.
        let reported = desired.pod.status.clone().filter(|_| !recovered.is_empty());
        let mut worker = Worker {
            ctx,
            router,
            uid,
            obs: Observed {
                start_time: api_start.or(first_created),
                ..Default::default()
            },
            desired,
            live: BTreeMap::new(),
            crash: Backoff::default(),
            failures: Backoff::default(),
            sandbox: None,
            volumes: None,
            reported,
            exit_tx,
            exit_rx,
            probe_tx,
            probe_rx,
            dirty: false,
        };
        let stale = worker.adopt(recovered);
        (worker, stale)
    }

    /// Takes over the latest attempt of each container, and the one before it (lastState);
    /// returns ids of older attempts to remove.
    fn adopt(&mut self, records: Vec<ContainerRecord>) -> Vec<String> {
        let mut by_name: BTreeMap<String, Vec<(u32, ContainerRecord)>> = BTreeMap::new();
        for r in records {
            let name = r
                .labels
                .get(labels::CONTAINER_NAME)
                .cloned()
                .unwrap_or_default();
            let attempt = r
                .labels
                .get(labels::ATTEMPT)
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            by_name.entry(name).or_default().push((attempt, r));
        }
        let mut stale = Vec::new();
        let mut latest = BTreeMap::new();
        for (name, mut attempts) in by_name {
            attempts.sort_by_key(|(attempt, _)| std::cmp::Reverse(*attempt));
            let mut attempts = attempts.into_iter();
            let Some(newest) = attempts.next() else {
                continue;
            };
            if let Some((attempt, r)) = attempts.next() {
                match self.exit_of(&name, attempt, &r.state) {
                    Some(exit) if attempt < newest.0 => {
                        let live = self.live.entry(name.clone()).or_default();
                        live.previous = Some(r.id.clone());
                        self.obs_mut(&name).last_exit = Some(exit);
                    }
                    _ => stale.push(r.id),
                }
            }
            stale.extend(attempts.map(|(_, r)| r.id));
            latest.insert(name, newest);
        }
        let names: Vec<String> = machine::containers(&self.desired.pod)
            .iter()
            .map(|(_, c)| c.name.clone())
            .collect();
        let ready_before = self.api_ready_containers();
        for (name, (attempt, r)) in latest {
            if !names.contains(&name) {
                stale.push(r.id);
                continue;
            }
            let state = match (&r.state, self.exit_of(&name, attempt, &r.state)) {
                (TaskState::Running { started_at, .. }, _) => Attempt::Running {
                    started_at: *started_at,
                },
                (_, Some(exit)) => Attempt::Exited(exit),
                (_, None) => {
                    stale.push(r.id.clone());
                    Attempt::None
                }
            };
            let running = matches!(state, Attempt::Running { .. });
            let adopted = state != Attempt::None;
            if adopted {
                self.router.register(&r.id, &self.exit_tx);
                let live = self.live.entry(name.clone()).or_default();
                live.id = Some(r.id.clone());
                live.hash = r.labels.get(labels::SPEC_HASH).cloned();
            }
            info!(pod = %self.uid, container = %name, attempt, running, "re-adopted container");
            let o = self.obs_mut(&name);
            o.attempt = attempt;
            o.state = state;
            o.started = running;
            o.ready = running && ready_before.contains(&name);
            o.container_id = adopted.then(|| r.id.clone());
            o.image = adopted.then(|| r.image.clone());
        }
        stale
    }

    /// The exit of a recovered attempt that ran and ended.
    fn exit_of(&self, name: &str, attempt: u32, state: &TaskState) -> Option<Exit> {
        let TaskState::Exited {
            exit_code,
            started_at,
            finished_at,
            oom_killed,
        } = *state
        else {
            return None;
        };
        Some(Exit {
            code: exit_code,
            oom_killed,
            start_error: false,
            started_at,
            finished_at,
            message: self.termination_message(name, attempt, exit_code),
        })
    }

    /// Image facts of re-adopted containers (imageID, STOPSIGNAL), from the local image store.
    async fn restore_images(&mut self) {
        let adopted: Vec<String> = self.live.keys().cloned().collect();
        for name in adopted {
            let Some(image) = self.spec(&name).and_then(|(_, c)| c.image) else {
                continue;
            };
            let info = self
                .ctx
                .runtime
                .ensure_image(&image, PullPolicy::Never, None)
                .await;
            match info {
                Ok(info) => {
                    self.obs_mut(&name).image_id = Some(info.repo_digest.clone());
                    if let Some(live) = self.live.get_mut(&name) {
                        live.stop_signal = info.config.stop_signal;
                    }
                }
                Err(e) => {
                    debug!(pod = %self.uid, container = %name, error = %e, "image of adopted container")
                }
            }
        }
    }

    /// Marks running app containers whose image changed in the desired spec.
    fn note_spec_changes(&mut self) {
        for (kind, c) in machine::containers(&self.desired.pod) {
            let old = self.live.get(&c.name).and_then(|l| l.hash.as_deref());
            let changed = kind == Kind::App && old.is_some_and(|h| h != spec_hash(c));
            if let Some(o) = self.obs.containers.get_mut(&c.name) {
                if changed && o.running() && !o.spec_changed {
                    info!(pod = %self.uid, container = %c.name, "container spec changed");
                    o.spec_changed = true;
                }
            }
        }
    }

    fn api_ready_containers(&self) -> Vec<String> {
        let status = self.desired.pod.status.as_ref();
        let lists = status.into_iter().flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
        });
        lists.filter(|c| c.ready).map(|c| c.name.clone()).collect()
    }

    fn pod(&self) -> &Pod {
        &self.desired.pod
    }

    fn pod_dir(&self) -> PathBuf {
        self.ctx.node.root_dir.join("pods").join(&self.uid)
    }

    fn message_file(&self, name: &str, attempt: u32) -> PathBuf {
        self.pod_dir()
            .join("containers")
            .join(name)
            .join(format!("termination-{attempt}"))
    }

    fn log_path(&self, name: &str, attempt: u32) -> PathBuf {
        super::logs::log_path(&self.ctx.node.log_dir, self.pod(), name, attempt)
    }

    fn spec(&self, name: &str) -> Option<(Kind, Container)> {
        machine::containers(self.pod())
            .into_iter()
            .find(|(_, c)| c.name == name)
            .map(|(k, c)| (k, c.clone()))
    }

    fn event(&self, kind: EventType, field: Option<String>, reason: &str, message: &str) {
        let object = pod_ref(self.pod(), field);
        self.ctx.recorder.record(object, kind, reason, message);
    }

    fn container_event(&self, name: &str, kind: EventType, reason: &str, message: &str) {
        let field = self.spec(name).map(|(k, _)| field_path(k, name));
        self.event(kind, field, reason, message);
    }

    fn gone(&self) -> bool {
        self.desired.deletion.is_some_and(|d| d.gone)
    }

    /// Runs the worker until the pod is done or `cancel` fires.
    pub(crate) async fn run(
        mut self,
        mut desired: watch::Receiver<Desired>,
        cancel: CancellationToken,
    ) -> Outcome {
        let mut store = self.ctx.store.subscribe();
        if checkpoint::is_static(self.pod()) {
            if let Err(e) = checkpoint::write(&self.pod_dir(), self.pod()) {
                warn!(pod = %self.uid, error = %e, "writing the static pod checkpoint");
            }
        }
        self.restore_images().await;
        loop {
            self.desired = merge(&self.desired, &desired.borrow_and_update());
            self.note_spec_changes();
            self.obs.now = SystemTime::now();
            let mut wake = None;
            let mut done = false;
            self.step(&mut wake, &mut done).await;
            self.report();
            if done {
                self.finish_pod(true).await;
                return Outcome::Done;
            }
            if std::mem::take(&mut self.dirty) {
                continue;
            }
            let now = SystemTime::now();
            let sleep = wake
                .map(|w: SystemTime| w.duration_since(now).unwrap_or_default())
                .unwrap_or(RESYNC)
                .min(RESYNC);
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.abort_kills();
                    return Outcome::Stopped;
                }
                changed = desired.changed() => if changed.is_err() {
                    self.abort_kills();
                    return Outcome::Stopped;
                },
                Some(ev) = self.exit_rx.recv() => self.on_exit(ev).await,
                Some(update) = self.probe_rx.recv() => self.on_probe(update),
                Ok(()) = store.changed() => self.on_store_change().await,
                _ = tokio::time::sleep(sleep) => self.resync().await,
            }
        }
    }

    async fn step(&mut self, wake: &mut Option<SystemTime>, done: &mut bool) {
        if self.obs.start_time.is_none() {
            self.obs.start_time = Some(self.obs.now);
        }
        let step = machine::step(&self.desired, &self.obs);
        if let Some(why) = step.why {
            if self.obs.terminating.is_none() {
                info!(pod = %self.uid, ?why, "pod terminating");
                self.obs.terminating = Some((self.obs.now, why));
                self.stop_liveness_probes();
            }
        }
        if step.state != self.obs.state {
            debug!(pod = %self.uid, from = ?self.obs.state, to = ?step.state, "pod state");
            self.obs.state = step.state;
        }
        for action in step.actions {
            let until = |t: SystemTime, wake: &mut Option<SystemTime>| {
                *wake = Some(wake.map_or(t, |w: SystemTime| w.min(t)));
            };
            match action {
                Action::WaitUntil(t) => until(t, wake),
                Action::Done => {
                    *done = true;
                    return;
                }
                other => {
                    if let Err(retry_at) = self.execute(other).await {
                        until(retry_at, wake);
                        return;
                    }
                }
            }
        }
    }

    /// Carries out one action; Err(t) stops this step and retries at `t`.
    async fn execute(&mut self, action: Action) -> Result<(), SystemTime> {
        let retry = SystemTime::now() + RETRY;
        match action {
            Action::SetupVolumes => self.setup_volumes().await.then_some(()).ok_or(retry),
            Action::EnsureSandbox => self.ensure_sandbox().await.then_some(()).ok_or(retry),
            Action::StartContainer { name, attempt } => {
                self.start_container(&name, attempt).await;
                Ok(())
            }
            Action::KillContainer {
                name,
                grace,
                pre_stop,
                reason,
            } => {
                self.kill_container(&name, grace, pre_stop, reason);
                Ok(())
            }
            Action::RemoveContainers => {
                self.remove_containers().await;
                Ok(())
            }
            Action::TeardownVolumes => self.teardown_volumes().await.then_some(()).ok_or(retry),
            Action::TeardownSandbox => self.teardown_sandbox().await.then_some(()).ok_or(retry),
            Action::Finish => {
                self.finish_pod(false).await;
                Ok(())
            }
            Action::Done | Action::WaitUntil(_) => Ok(()),
        }
    }

    async fn setup_volumes(&mut self) -> bool {
        match self.ctx.volumes.setup(&self.desired.pod).await {
            Ok(v) => {
                self.volumes = Some(v);
                self.obs.volumes_ready = true;
                self.dirty = true;
                true
            }
            Err(e) => {
                warn!(pod = %self.uid, error = %e, "volume setup failed");
                let msg = format!("MountVolume.SetUp failed: {e}");
                self.event(EventType::Warning, None, e.reason(), &msg);
                false
            }
        }
    }

    async fn ensure_sandbox(&mut self) -> bool {
        match self.ctx.sandboxes.ensure(&self.desired.pod).await {
            Ok(s) => {
                self.sandbox = Some(s);
                self.obs.sandbox_ready = true;
                self.dirty = true;
                self.start_pending_probes();
                true
            }
            Err(e) => {
                warn!(pod = %self.uid, error = %e, "sandbox failed");
                let msg = format!("Failed to create pod sandbox: {e}");
                self.event(EventType::Warning, None, "FailedCreatePodSandBox", &msg);
                false
            }
        }
    }

    fn obs_mut(&mut self, name: &str) -> &mut ContainerObs {
        self.obs.containers.entry(name.to_string()).or_default()
    }

    /// Records a start failure: waiting reason, Warning event, back-off.
    fn start_failed(&mut self, name: &str, reason: &str, message: String, pull: Option<&str>) {
        let now = SystemTime::now();
        warn!(pod = %self.uid, container = %name, reason, "{message}");
        let key = pull.map_or_else(|| format!("create/{name}"), |i| format!("pull/{i}"));
        let window = self.failures.failed(&key, now, None);
        let (reason, message) = match (pull, window) {
            (Some(image), Some(_)) => {
                let m = format!("Back-off pulling image \"{image}\": {message}");
                self.container_event(name, EventType::Normal, "BackOff", &m);
                ("ImagePullBackOff".to_string(), m)
            }
            _ => (reason.to_string(), message),
        };
        // A pull failure has its own event with the cause; other failures name it here.
        let detail = if pull.is_some() { &reason } else { &message };
        self.container_event(
            name,
            EventType::Warning,
            "Failed",
            &format!("Error: {detail}"),
        );
        let o = self.obs_mut(name);
        o.waiting = Some(Waiting { reason, message });
        if window.is_some() {
            o.backoff = window;
        }
    }

    async fn start_container(&mut self, name: &str, attempt: u32) {
        let Some((kind, c)) = self.spec(name) else {
            return;
        };
        let Some(config) = self.container_config(kind, &c, attempt).await else {
            return;
        };
        // The latest attempt stays (exited) as the previous one; the one before it goes.
        let live = self.live.entry(name.to_string()).or_default();
        let older = live
            .id
            .take()
            .and_then(|latest| live.previous.replace(latest));
        if let Some(old) = older.filter(|old| *old != config.id) {
            self.router.unregister(&old);
            if let Err(e) = self.ctx.runtime.remove(&old).await {
                warn!(pod = %self.uid, container = %name, error = %e, "removing old attempt");
            }
        }
        // A leftover of a failed start with the same id.
        let _ = self.ctx.runtime.remove(&config.id).await;
        self.router.register(&config.id, &self.exit_tx);
        if let Err(e) = self.ctx.runtime.create(&config).await {
            self.router.unregister(&config.id);
            self.not_started(name, attempt, &config, &e, "CreateContainerError");
            return;
        }
        self.container_event(
            name,
            EventType::Normal,
            "Created",
            &format!("Created container {name}"),
        );
        if let Err(e) = self.ctx.runtime.start(&config.id).await {
            self.router.unregister(&config.id);
            let _ = self.ctx.runtime.remove(&config.id).await;
            self.not_started(name, attempt, &config, &e, "RunContainerError");
            return;
        }
        self.container_event(
            name,
            EventType::Normal,
            "Started",
            &format!("Started container {name}"),
        );
        self.failures.reset(&format!("create/{name}"));
        let started_at = match self.ctx.runtime.inspect(&config.id).await.map(|r| r.state) {
            Ok(TaskState::Running { started_at, .. }) => started_at,
            _ => SystemTime::now(),
        };
        let has_startup = c.startup_probe.is_some();
        let has_readiness = c.readiness_probe.is_some();
        let o = self.begin_attempt(name, attempt, &config);
        o.state = Attempt::Running { started_at };
        o.started = !has_startup;
        o.ready = !has_startup && !has_readiness;
        o.waiting = None;
        o.backoff = None;
        o.spec_changed = false;
        o.kill = None;
        o.killing = None;
        let live = self.live.entry(name.to_string()).or_default();
        live.id = Some(config.id.clone());
        live.stop_signal = config.image.config.stop_signal.clone();
        live.probing = false;
        live.hash = config.labels.get(labels::SPEC_HASH).cloned();
        self.dirty = true;
        self.post_start(name, &c, &config.id).await;
        self.start_pending_probes();
    }

    /// Attempt `attempt` of `name` was made: the previous one's exit becomes lastState.
    fn begin_attempt(
        &mut self,
        name: &str,
        attempt: u32,
        config: &ContainerConfig,
    ) -> &mut ContainerObs {
        let image = self.spec(name).and_then(|(_, c)| c.image);
        let o = self.obs_mut(name);
        if let Attempt::Exited(e) = std::mem::take(&mut o.state) {
            o.last_exit = Some(e);
        }
        o.attempt = attempt;
        o.container_id = Some(config.id.clone());
        o.image_id = Some(config.image.repo_digest.clone());
        o.image = image;
        o
    }

    /// A create or start that failed. The OCI runtime refusing the process is a StartError
    /// attempt; anything else (a bad spec, containerd gone mid-call) leaves the same attempt
    /// to be tried again, waiting with `reason`.
    fn not_started(
        &mut self,
        name: &str,
        attempt: u32,
        config: &ContainerConfig,
        e: &RuntimeError,
        reason: &str,
    ) {
        match e.reason() {
            "RunContainerError" => self.start_error(name, attempt, config, e.to_string()),
            "CreateContainerConfigError" => {
                self.start_failed(name, "CreateContainerConfigError", e.to_string(), None)
            }
            _ => self.start_failed(name, reason, e.to_string(), None),
        }
    }

    /// The task of a created attempt would not start: as the kubelet's StartError, the
    /// attempt counts (restartCount, back-off) and ends with exit code 128.
    fn start_error(&mut self, name: &str, attempt: u32, config: &ContainerConfig, error: String) {
        warn!(pod = %self.uid, container = %name, attempt, %error, "container did not start");
        let detail = format!("Error: {error}");
        self.container_event(name, EventType::Warning, "Failed", &detail);
        self.begin_attempt(name, attempt, config);
        let exit = Exit {
            code: 128,
            oom_killed: false,
            start_error: true,
            started_at: None,
            finished_at: self.obs.now,
            message: Some(error.clone()),
        };
        self.record_exit(name, exit);
        let o = self.obs_mut(name);
        if o.backoff.is_none() {
            o.waiting = Some(Waiting {
                reason: "RunContainerError".into(),
                message: error,
            });
        }
    }

    async fn post_start(&mut self, name: &str, c: &Container, id: &str) {
        let Some(handler) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()) else {
            return;
        };
        let target = hooks::HookTarget {
            runtime: &self.ctx.runtime,
            container: c,
            container_id: id,
            pod_ip: self.pod_ip(),
        };
        let timeout = machine::grace(self.pod(), None).max(machine::MIN_KILL_GRACE);
        if let Err(e) = hooks::run(&target, handler, timeout).await {
            let msg = format!("PostStartHook failed: {e}");
            self.container_event(name, EventType::Warning, "FailedPostStartHook", &msg);
            self.obs_mut(name).kill = Some(KillRequest {
                reason: KillReason::PostStartHookFailed,
                grace: None,
            });
        }
    }

    fn pod_ip(&self) -> Option<std::net::IpAddr> {
        let host_network = self.pod().spec.as_ref().and_then(|s| s.host_network) == Some(true);
        match host_network {
            true => self.ctx.node.ip,
            false => self.sandbox.as_ref().and_then(|s| s.ip),
        }
    }

    /// The desired pod with the addresses the downward API reads (status.podIP, status.hostIP)
    /// filled in from the sandbox and the node, as env and subPathExpr see them upstream.
    fn pod_with_ips(&self) -> Pod {
        let mut pod = self.desired.pod.clone();
        let status = pod.status.get_or_insert_with(Default::default);
        if let Some(ip) = self.pod_ip() {
            status.pod_ip = Some(ip.to_string());
            status.pod_ips = Some(vec![k8s_openapi::api::core::v1::PodIP {
                ip: ip.to_string(),
            }]);
        }
        if let Some(ip) = self.ctx.node.ip {
            status.host_ip = Some(ip.to_string());
            status.host_ips = Some(vec![k8s_openapi::api::core::v1::HostIP {
                ip: ip.to_string(),
            }]);
        }
        pod
    }

    /// Everything create needs; None after recording why it cannot be built.
    async fn container_config(
        &mut self,
        kind: Kind,
        c: &Container,
        attempt: u32,
    ) -> Option<ContainerConfig> {
        let pod = self.pod_with_ips();
        let name = c.name.as_str();
        let image_ref = c.image.clone().unwrap_or_default();
        if image_ref.is_empty() {
            let msg = format!("container {name} has no image");
            self.start_failed(name, "InvalidImageName", msg, None);
            return None;
        }
        let env_vars = match env::container_env(&pod, c, &self.ctx.store) {
            Ok(e) => e,
            Err(e) => {
                self.start_failed(name, "CreateContainerConfigError", e.to_string(), None);
                return None;
            }
        };
        let image = self.ensure_image(name, c, &image_ref).await?;
        let volumes = self.volumes.clone().unwrap_or_default();
        let (vol_mounts, devices) = match self.ctx.volumes.container_mounts(&pod, c, &volumes) {
            Ok(m) => m,
            Err(e) => {
                self.start_failed(name, "CreateContainerConfigError", e.to_string(), None);
                return None;
            }
        };
        let sandbox = self.sandbox.clone()?;
        let files = match self.prepare_files(c, attempt) {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("preparing files: {e}");
                self.start_failed(name, "CreateContainerError", msg, None);
                return None;
            }
        };
        let mut mounts = self.sandbox_mounts(&pod, &sandbox, &vol_mounts);
        mounts.extend(vol_mounts);
        let message_path = c
            .termination_message_path
            .clone()
            .unwrap_or_else(|| "/dev/termination-log".into());
        mounts.push(bind(&message_path, &files.message, false));
        Some(ContainerConfig {
            id: container_id(&self.uid, name, attempt),
            labels: self.labels(kind, c, attempt),
            args: argv(c, &image, &env_vars),
            env: merge_env(&image.config.env, &env_vars),
            cwd: c
                .working_dir
                .clone()
                .or_else(|| image.config.working_dir.clone())
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/".into()),
            user: user(&pod, c),
            hostname: sandbox.hostname.clone(),
            mounts,
            devices,
            namespaces: sandbox.namespaces.clone(),
            resources: resources::container_resources(&pod, c, node_memory()),
            cgroup_parent: format!("/nodelet/pod{}", self.uid),
            security: security(c),
            sysctls: sysctls(&pod),
            log_path: files.log,
            tty: c.tty.unwrap_or(false),
            image,
        })
    }

    async fn ensure_image(&mut self, name: &str, c: &Container, image: &str) -> Option<ImageInfo> {
        let key = format!("pull/{image}");
        if let Some(w) = self.failures.window(&key, SystemTime::now()) {
            self.obs_mut(name).backoff = Some(w);
            return None;
        }
        let policy = pull_policy(c);
        let field = self.spec(name).map(|(k, _)| field_path(k, name));
        let runtime = &self.ctx.runtime;
        if policy != PullPolicy::Always {
            if let Ok(info) = runtime.ensure_image(image, PullPolicy::Never, None).await {
                let msg = format!("Container image \"{image}\" already present on machine");
                self.event(EventType::Normal, field, "Pulled", &msg);
                return Some(info);
            }
        }
        let result = match policy {
            PullPolicy::Never => runtime.ensure_image(image, policy, None).await,
            _ => {
                let msg = format!("Pulling image \"{image}\"");
                self.event(EventType::Normal, field.clone(), "Pulling", &msg);
                let auth = registry_auth(self.pod(), &self.ctx.store, image);
                let began = std::time::Instant::now();
                let pulled = runtime.ensure_image(image, policy, auth.as_ref()).await;
                if pulled.is_ok() {
                    let secs = began.elapsed().as_secs_f64();
                    let msg = format!("Successfully pulled image \"{image}\" in {secs:.3}s");
                    self.event(EventType::Normal, field.clone(), "Pulled", &msg);
                }
                pulled
            }
        };
        match result {
            Ok(info) => {
                self.failures.reset(&key);
                Some(info)
            }
            Err(e) => {
                let msg = format!("Failed to pull image \"{image}\": {e}");
                self.event(EventType::Warning, field, "Failed", &msg);
                self.start_failed(name, e.reason(), e.to_string(), Some(image));
                None
            }
        }
    }

    fn labels(&self, kind: Kind, c: &Container, attempt: u32) -> HashMap<String, String> {
        let m = &self.pod().metadata;
        let pairs = [
            (labels::POD_UID, self.uid.clone()),
            (labels::POD_NAME, m.name.clone().unwrap_or_default()),
            (
                labels::POD_NAMESPACE,
                m.namespace.clone().unwrap_or_default(),
            ),
            (labels::CONTAINER_NAME, c.name.clone()),
            (labels::CONTAINER_KIND, kind.as_str().to_string()),
            (labels::ATTEMPT, attempt.to_string()),
            (labels::SPEC_HASH, spec_hash(c)),
        ];
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    fn prepare_files(&self, c: &Container, attempt: u32) -> std::io::Result<Files> {
        use std::os::unix::fs::PermissionsExt;
        let message = self.message_file(&c.name, attempt);
        if let Some(dir) = message.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&message, b"")?;
        std::fs::set_permissions(&message, std::fs::Permissions::from_mode(0o666))?;
        let log = self.log_path(&c.name, attempt);
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Files { message, log })
    }

    /// /etc/hosts (unless hostNetwork), /etc/resolv.conf, /etc/hostname, unless a volume
    /// mount takes the path.
    fn sandbox_mounts(&self, pod: &Pod, sandbox: &Sandbox, volume_mounts: &[Mount]) -> Vec<Mount> {
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        let mut files = vec![];
        if !host_network {
            files.push(("/etc/hosts", &sandbox.hosts_file));
        }
        files.push(("/etc/resolv.conf", &sandbox.resolv_file));
        files.push(("/etc/hostname", &sandbox.hostname_file));
        files
            .into_iter()
            .filter(|(dest, _)| !volume_mounts.iter().any(|m| m.destination == *dest))
            .map(|(dest, src)| bind(dest, src, false))
            .collect()
    }

    fn kill_container(&mut self, name: &str, grace: Duration, pre_stop: bool, reason: KillReason) {
        let Some((_, c)) = self.spec(name) else {
            return;
        };
        let Some(live) = self.live.get_mut(name) else {
            return;
        };
        let Some(id) = live.id.clone() else {
            return;
        };
        if let Some(old) = live.kill.take() {
            old.abort();
        }
        let signal = c
            .lifecycle
            .as_ref()
            .and_then(|l| l.stop_signal.clone())
            .or_else(|| live.stop_signal.clone())
            .and_then(|s| parse_signal(&s))
            .unwrap_or(libc::SIGTERM);
        let message = match reason {
            KillReason::PodTerminating => format!("Stopping container {name}"),
            KillReason::Unhealthy => {
                format!("Container {name} failed a liveness or startup probe, will be restarted")
            }
            KillReason::PostStartHookFailed => {
                format!("Container {name} failed its postStart hook, will be killed")
            }
            KillReason::SpecChanged => {
                format!("Container {name} definition changed, will be restarted")
            }
        };
        self.container_event(name, EventType::Normal, "Killing", &message);
        let task = KillTask {
            ctx: self.ctx.clone(),
            pod: self.desired.pod.clone(),
            container: c,
            id,
            grace,
            pre_stop,
            signal,
            pod_ip: self.pod_ip(),
        };
        let handle = tokio::spawn(task.run());
        if let Some(live) = self.live.get_mut(name) {
            live.kill = Some(handle.abort_handle());
        }
        let kill_at = self.obs.now + grace;
        self.obs_mut(name).killing = Some(kill_at);
    }

    async fn remove_containers(&mut self) {
        self.ctx.prober.stop_pod(&self.uid);
        let ids: Vec<String> = self
            .live
            .values()
            .flat_map(|l| l.id.iter().chain(&l.previous).cloned())
            .collect();
        for id in ids {
            self.router.unregister(&id);
            if let Err(e) = self.ctx.runtime.remove(&id).await {
                warn!(pod = %self.uid, container_id = %id, error = %e, "removing container");
            }
        }
    }

    async fn teardown_volumes(&mut self) -> bool {
        match self.ctx.volumes.teardown(&self.uid).await {
            Ok(()) => {
                self.obs.volumes_ready = false;
                self.volumes = None;
                true
            }
            Err(e) => {
                warn!(pod = %self.uid, error = %e, "volume teardown failed");
                let msg = format!("UnmountVolume.TearDown failed: {e}");
                self.event(EventType::Warning, None, "FailedUnmount", &msg);
                false
            }
        }
    }

    async fn teardown_sandbox(&mut self) -> bool {
        match self.ctx.sandboxes.teardown(&self.uid).await {
            Ok(()) => {
                self.obs.sandbox_ready = false;
                remove_pod_cgroups(&self.uid);
                true
            }
            Err(e) => {
                warn!(pod = %self.uid, error = %e, "sandbox teardown failed");
                let msg = format!("Failed to tear down pod sandbox: {e}");
                self.event(EventType::Warning, None, "FailedKillPod", &msg);
                false
            }
        }
    }

    /// Final status; `done`: the worker ends (files removed, status forgotten when gone).
    async fn finish_pod(&mut self, done: bool) {
        self.report();
        self.obs.released = true;
        if done {
            remove_pod_dir(&self.pod_dir());
        }
        if self.gone() {
            self.ctx.status.forget(&self.uid);
        } else {
            self.ctx.status.finish(&self.uid);
        }
        info!(pod = %self.uid, done, "pod finished");
    }

    fn report(&mut self) {
        if self.gone() {
            return;
        }
        let input = status::Input {
            pod: self.pod(),
            previous: self.reported.as_ref(),
            obs: &self.obs,
            state: self.obs.state,
            node_ip: self.ctx.node.ip,
            pod_ip: self.sandbox.as_ref().and_then(|s| s.ip),
        };
        let computed = status::compute(&input);
        if self.reported.as_ref() != Some(&computed) {
            self.ctx.status.set(&self.desired.pod, computed.clone());
            self.reported = Some(computed);
        }
    }

    fn abort_kills(&mut self) {
        for live in self.live.values_mut() {
            if let Some(k) = live.kill.take() {
                k.abort();
            }
        }
    }

    async fn on_exit(&mut self, ev: ExitEvent) {
        let Some(name) = self
            .live
            .iter()
            .find(|(_, l)| l.id.as_deref() == Some(ev.container_id.as_str()))
            .map(|(n, _)| n.clone())
        else {
            return;
        };
        let record = self.ctx.runtime.inspect(&ev.container_id).await.ok();
        let exit = match record.map(|r| r.state) {
            Some(TaskState::Exited {
                exit_code,
                started_at,
                finished_at,
                oom_killed,
            }) => (exit_code, started_at, finished_at, oom_killed),
            Some(TaskState::Running { .. }) => return,
            _ => (ev.exit_code, None, ev.exited_at, false),
        };
        self.container_exited(&name, exit.0, exit.1, exit.2, exit.3);
    }

    fn container_exited(
        &mut self,
        name: &str,
        code: i32,
        started_at: Option<SystemTime>,
        finished_at: SystemTime,
        oom_killed: bool,
    ) {
        let Some(o) = self.obs.containers.get(name) else {
            return;
        };
        let (attempt, previous_start) = match &o.state {
            Attempt::Running { started_at } => (o.attempt, *started_at),
            _ => return,
        };
        info!(pod = %self.uid, container = %name, attempt, code, oom_killed, "container exited");
        if let Some(kill) = self.live.get_mut(name).and_then(|l| l.kill.take()) {
            kill.abort();
        }
        self.stop_probes(
            name,
            &[
                ProbeKind::Liveness,
                ProbeKind::Readiness,
                ProbeKind::Startup,
            ],
        );
        let exit = Exit {
            code,
            oom_killed,
            start_error: false,
            started_at: started_at.or(Some(previous_start)),
            finished_at,
            message: self.termination_message(name, attempt, code),
        };
        self.record_exit(name, exit);
    }

    /// The latest attempt ended (or never started): decides on the restart back-off.
    fn record_exit(&mut self, name: &str, exit: Exit) {
        let spec_changed = self
            .obs
            .containers
            .get(name)
            .is_some_and(|o| o.spec_changed);
        let restarts = self.obs.state < PodState::Terminating
            && !spec_changed
            && self.spec(name).is_some_and(|(kind, _)| {
                machine::wants_restart(machine::restart_policy(self.pod()), kind, &exit)
            });
        let o = self.obs.containers.entry(name.to_string()).or_default();
        let window = machine::record_exit(o, exit, restarts, &mut self.crash, name);
        if let Some(w) = window {
            let msg = format!(
                "Back-off {}s restarting failed container {name}",
                w.delay.as_secs()
            );
            self.container_event(name, EventType::Warning, "BackOff", &msg);
        }
        if let Some(live) = self.live.get_mut(name) {
            live.probing = false;
        }
        self.dirty = true;
    }

    /// The termination message of an attempt, per terminationMessagePolicy.
    fn termination_message(&self, name: &str, attempt: u32, code: i32) -> Option<String> {
        let mut text = read_prefix(&self.message_file(name, attempt), MESSAGE_MAX);
        let fallback = self
            .spec(name)
            .and_then(|(_, c)| c.termination_message_policy)
            .is_some_and(|p| p == "FallbackToLogsOnError");
        if text.is_empty() && fallback && code != 0 {
            let log = std::fs::read_to_string(self.log_path(name, attempt)).unwrap_or_default();
            text = log_tail(&log);
        }
        (!text.is_empty()).then_some(text)
    }

    fn on_probe(&mut self, update: ProbeUpdate) {
        let name = update.key.container.clone();
        let current = self.live.get(&name).and_then(|l| l.id.as_deref());
        if current != Some(update.container_id.as_str()) {
            return;
        }
        let Some((_, c)) = self.spec(&name) else {
            return;
        };
        let Some(o) = self.obs.containers.get_mut(&name).filter(|o| o.running()) else {
            return;
        };
        let before = o.clone();
        let override_grace = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            p.as_ref()
                .and_then(|p| p.termination_grace_period_seconds)
                .map(|s| Duration::from_secs(s.max(0) as u64))
        };
        match (update.key.kind, update.result) {
            (ProbeKind::Startup, ProbeResult::Success) => {
                o.started = true;
                if c.readiness_probe.is_none() {
                    o.ready = true;
                }
            }
            (ProbeKind::Readiness, result) => o.ready = result == ProbeResult::Success,
            (ProbeKind::Startup, ProbeResult::Failure) => {
                o.kill = Some(KillRequest {
                    reason: KillReason::Unhealthy,
                    grace: override_grace(&c.startup_probe),
                })
            }
            (ProbeKind::Liveness, ProbeResult::Failure) => {
                o.kill = Some(KillRequest {
                    reason: KillReason::Unhealthy,
                    grace: override_grace(&c.liveness_probe),
                })
            }
            _ => {}
        }
        if *o != before {
            debug!(pod = %self.uid, container = %name, kind = ?update.key.kind, result = ?update.result, "probe");
            self.dirty = true;
        }
    }

    /// Starts the probes of running containers that have none yet (needs the pod IP).
    fn start_pending_probes(&mut self) {
        if self.sandbox.is_none() {
            return;
        }
        let pod_ip = self.pod_ip();
        let terminating = self.obs.state >= PodState::Terminating;
        let names: Vec<String> = self.live.keys().cloned().collect();
        for name in names {
            let Some((_, c)) = self.spec(&name) else {
                continue;
            };
            let running = self
                .obs
                .containers
                .get(&name)
                .is_some_and(ContainerObs::running);
            let Some(live) = self.live.get_mut(&name) else {
                continue;
            };
            let Some(id) = live.id.clone().filter(|_| running && !live.probing) else {
                continue;
            };
            live.probing = true;
            let started = self.obs.containers.get(&name).is_some_and(|o| o.started);
            let ready = self.obs.containers.get(&name).is_some_and(|o| o.ready);
            let probes = [
                (ProbeKind::Startup, &c.startup_probe),
                (ProbeKind::Liveness, &c.liveness_probe),
                (ProbeKind::Readiness, &c.readiness_probe),
            ];
            for (kind, probe) in probes {
                let Some(probe) = probe.clone() else {
                    continue;
                };
                if terminating && kind != ProbeKind::Readiness {
                    continue;
                }
                let resumed = match kind {
                    ProbeKind::Startup if started => Some(ProbeResult::Success),
                    ProbeKind::Readiness if ready => Some(ProbeResult::Success),
                    _ => None,
                };
                let key = ProbeKey {
                    pod_uid: self.uid.clone(),
                    container: name.clone(),
                    kind,
                };
                let target = ProbeTarget {
                    pod: self.desired.pod.clone(),
                    container: c.clone(),
                    container_id: id.clone(),
                    pod_ip,
                    probe,
                    resumed,
                };
                self.ctx.prober.start(key, target, self.probe_tx.clone());
            }
        }
    }

    fn stop_probes(&self, name: &str, kinds: &[ProbeKind]) {
        for kind in kinds {
            self.ctx.prober.stop(&ProbeKey {
                pod_uid: self.uid.clone(),
                container: name.to_string(),
                kind: *kind,
            });
        }
    }

    /// While terminating only readiness keeps running.
    fn stop_liveness_probes(&self) {
        for name in self.live.keys() {
            self.stop_probes(name, &[ProbeKind::Liveness, ProbeKind::Startup]);
        }
    }

    async fn on_store_change(&mut self) {
        if let Some(volumes) = self.volumes.clone() {
            if let Err(e) = self.ctx.volumes.refresh(&self.desired.pod, &volumes).await {
                warn!(pod = %self.uid, error = %e, "volume refresh failed");
            }
        }
        self.dirty = true;
    }

    /// Re-inspects running containers, in case an exit event was missed.
    async fn resync(&mut self) {
        let running: Vec<(String, String)> = self
            .live
            .iter()
            .filter(|(n, _)| {
                self.obs
                    .containers
                    .get(*n)
                    .is_some_and(ContainerObs::running)
            })
            .filter_map(|(n, l)| l.id.clone().map(|id| (n.clone(), id)))
            .collect();
        for (name, id) in running {
            match self.ctx.runtime.inspect(&id).await.map(|r| r.state) {
                Ok(TaskState::Exited {
                    exit_code,
                    started_at,
                    finished_at,
                    oom_killed,
                }) => self.container_exited(&name, exit_code, started_at, finished_at, oom_killed),
                Ok(TaskState::NoTask) => {
                    self.container_exited(&name, 137, None, SystemTime::now(), false)
                }
                Err(e) if e.is_not_found() => {
                    self.container_exited(&name, 137, None, SystemTime::now(), false)
                }
                _ => {}
            }
        }
    }
}

/// A newer desired pod replaces the older, but a deletion is never undone and only shrinks.
fn merge(old: &Desired, new: &Desired) -> Desired {
    let deletion = match (old.deletion, new.deletion) {
        (Some(a), Some(b)) => Some(super::Deletion {
            grace: a.grace.min(b.grace),
            gone: a.gone || b.gone,
        }),
        (a, b) => a.or(b),
    };
    Desired {
        pod: new.pod.clone(),
        deletion,
    }
}

/// Removes a released pod's directory: its container files and checkpoint. Volumes and
/// sandbox files are gone by now; remove_dir (not _all) never reaches through a mount that
/// failed to go.
pub(crate) fn remove_pod_dir(dir: &std::path::Path) {
    let _ = std::fs::remove_dir_all(dir.join("containers"));
    checkpoint::remove(dir);
    let _ = std::fs::remove_dir(dir);
}

/// Removes the pod's cgroup directories (cgroup v2, and each v1 hierarchy); best effort.
fn remove_pod_cgroups(uid: &str) {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let pod = format!("nodelet/pod{uid}");
    let hierarchies = std::fs::read_dir(root).into_iter().flatten().flatten();
    for dir in hierarchies.map(|e| e.path()).chain([root.to_path_buf()]) {
        let _ = std::fs::remove_dir(dir.join(&pod));
    }
}

fn read_prefix(path: &std::path::Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let bytes = &bytes[..bytes.len().min(max)];
    String::from_utf8_lossy(bytes).into_owned()
}

struct Files {
    message: PathBuf,
    log: PathBuf,
}

/// preStop (within the grace), the stop signal, KILL once the grace is over.
struct KillTask {
    ctx: Arc<PodContext>,
    pod: Pod,
    container: Container,
    id: String,
    grace: Duration,
    pre_stop: bool,
    signal: i32,
    pod_ip: Option<std::net::IpAddr>,
}

impl KillTask {
    async fn run(self) {
        let start = tokio::time::Instant::now();
        let deadline = start + self.grace;
        let handler = self
            .container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref());
        if let (true, Some(handler)) = (self.pre_stop, handler) {
            let target = hooks::HookTarget {
                runtime: &self.ctx.runtime,
                container: &self.container,
                container_id: &self.id,
                pod_ip: self.pod_ip,
            };
            if let Err(e) = hooks::run(&target, handler, self.grace).await {
                let field = format!("spec.containers{{{}}}", self.container.name);
                let msg = format!("PreStopHook failed: {e}");
                let object = pod_ref(&self.pod, Some(field));
                self.ctx
                    .recorder
                    .record(object, EventType::Warning, "FailedPreStopHook", &msg);
            }
        }
        if let Err(e) = self.ctx.runtime.signal(&self.id, self.signal).await {
            warn!(container_id = %self.id, error = %e, "stop signal failed");
        }
        let kill_at = deadline.max(tokio::time::Instant::now() + machine::MIN_KILL_GRACE);
        tokio::time::sleep_until(kill_at).await;
        info!(container_id = %self.id, "grace period over, sending KILL");
        if let Err(e) = self.ctx.runtime.signal(&self.id, libc::SIGKILL).await {
            warn!(container_id = %self.id, error = %e, "KILL failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_is_never_undone_and_only_shrinks() {
        let d = |deletion| Desired {
            pod: Pod::default(),
            deletion,
        };
        let del = |g, gone| {
            Some(super::super::Deletion {
                grace: Duration::from_secs(g),
                gone,
            })
        };
        assert_eq!(merge(&d(del(10, false)), &d(None)).deletion, del(10, false));
        assert_eq!(
            merge(&d(del(10, false)), &d(del(30, false))).deletion,
            del(10, false)
        );
        assert_eq!(
            merge(&d(del(10, false)), &d(del(5, true))).deletion,
            del(5, true)
        );
        assert_eq!(merge(&d(None), &d(del(5, false))).deletion, del(5, false));
    }
}
