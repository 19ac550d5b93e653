//! One pod worker: a task per pod UID that steps the state machine and carries out its actions
//! against the runtime, sandbox, volumes and prober, then reports the computed status. It
//! alone decides the pod's lifecycle; its inputs are the latest desired pod (watch channel),
//! the exits of its containers (through the manager's `ExitRouter` task), probe results and object-store changes.
//!
//! Split along its seams: `adopt` (recovery), `start`, `kill` (and release), `exits`, `probes`;
//! this file holds the loop and the step. It reaches the outside only through `PodContext`'s
//! `ContainerRuntime` and `PodHost`, so `tests` drives it with the in-memory fakes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use litemap::LiteMap;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::config::{
    argv, bind, container_id, log_tail, merge_env, parse_signal, pull_policy, registry_auth,
    security, spec_hash, sysctls, termination_file, user,
};
use super::machine::{
    self, Action, Attempt, ContainerObs, Exit, KillReason, KillRequest, Kind, Observed, PodState,
    Waiting,
};
use super::{api, checkpoint, env, hooks, resources, status, Desired, PodContext};

mod adopt;
mod exits;
mod kill;
mod probes;
mod start;

use crate::events::{pod_ref, EventType};
use crate::probe::{ProbeKey, ProbeKind, ProbeResult, ProbeTarget, ProbeUpdate};
use crate::runtime::{
    labels, ContainerConfig, ContainerRecord, ExitEvent, ImageInfo, Mount, PullPolicy,
    RuntimeError, TaskState,
};
use crate::sandbox::Sandbox;
use crate::store::refs::watched_by;
use crate::volume::PodVolumes;
pub(crate) use exits::ExitRouter;
pub(crate) use kill::remove_pod_dir;

/// How often running containers are re-inspected (an exit event may be missed).
const RESYNC: Duration = Duration::from_secs(10);
/// The kubelet's relist period: how long a failed start shows RunContainerError before the
/// next sync finds the container in back-off.
const RELIST: Duration = Duration::from_secs(1);
/// Wait before retrying a failed sandbox or volume step.
const RETRY: Duration = Duration::from_secs(5);
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
    router: ExitRouter,
    uid: String,
    desired: Desired,
    obs: Observed,
    live: LiteMap<String, Live>,
    crash: Backoff,
    failures: Backoff,
    sandbox: Option<Sandbox>,
    volumes: Option<PodVolumes>,
    /// The status last reported, shared with the status manager.
    reported: Option<Arc<PodStatus>>,
    exit_tx: exits::ExitsTo,
    exit_rx: futures::channel::mpsc::UnboundedReceiver<ExitEvent>,
    /// Probe results and postStart hook ends come through futures' unbounded channels, as
    /// exits do, which allocate per message: tokio's allocate a block of 32 slots up front
    /// (3.5 KiB each, for what most pods never send).
    probe_tx: crate::probe::Results,
    probe_rx: futures::channel::mpsc::UnboundedReceiver<ProbeUpdate>,
    /// Something changed: step again at once.
    dirty: bool,
    /// Failed removals of the pod's cgroups since the last full try.
    cgroup_tries: u32,
    cgroups_removed: bool,
    /// The postStart hook under way, if any: as in the kubelet, whose start of the next
    /// container waits for it, nothing else of the pod starts (and no status is written)
    /// meanwhile; a kill of its container ends it.
    hook: Option<start::PendingHook>,
    hook_tx: futures::channel::mpsc::UnboundedSender<start::HookDone>,
    hook_rx: futures::channel::mpsc::UnboundedReceiver<start::HookDone>,
    /// When containers whose start failed turn from RunContainerError to CrashLoopBackOff.
    settle: Option<tokio::time::Instant>,
    /// The object store's generation this worker has looked at.
    store_seen: u64,
}

fn field_path(kind: Kind, name: &str) -> String {
    match kind {
        Kind::App => format!("spec.containers{{{name}}}"),
        Kind::Ephemeral => format!("spec.ephemeralContainers{{{name}}}"),
        _ => format!("spec.initContainers{{{name}}}"),
    }
}

impl Worker {
    pub(crate) fn new(
        ctx: Arc<PodContext>,
        router: ExitRouter,
        desired: Desired,
        recovered: Vec<ContainerRecord>,
    ) -> (Box<Self>, Vec<String>) {
        let uid = desired.pod.metadata.uid.clone().unwrap_or_default();
        let (exit_tx, exit_rx) = futures::channel::mpsc::unbounded();
        let (probe_tx, probe_rx) = futures::channel::mpsc::unbounded();
        let (hook_tx, hook_rx) = futures::channel::mpsc::unbounded();
        let api_start = desired
            .pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| SystemTime::from(t.0));
        let first_created = recovered.iter().filter_map(|r| r.created_at).min();
        // A re-adopted pod's status goes on from what the API holds (written by the agent
        // before its restart): conditions keep their lastTransitionTime, nothing flaps.
        let reported = (desired.pod.status.clone())
            .filter(|_| !recovered.is_empty())
            .map(Arc::new);
        let store_seen = ctx.store.generation();
        // Room for the containers the spec lists (the maps grow for ephemeral ones).
        let containers = machine::containers(&desired.pod).len();
        let mut worker = Box::new(Worker {
            ctx,
            router,
            uid,
            obs: Observed {
                start_time: api_start.or(first_created),
                containers: LiteMap::with_capacity(containers),
                ..Default::default()
            },
            desired,
            live: LiteMap::with_capacity(containers),
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
            cgroup_tries: 0,
            cgroups_removed: false,
            hook: None,
            hook_tx,
            hook_rx,
            settle: None,
            store_seen,
        });
        let stale = worker.adopt(recovered);
        (worker, stale)
    }

    fn pod(&self) -> &Pod {
        &self.desired.pod
    }

    fn pod_dir(&self) -> PathBuf {
        crate::layout::pod_dir(&self.ctx.node.root_dir, &self.uid)
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
            .or_else(|| {
                let mut ephemeral = machine::ephemeral(self.pod()).into_iter();
                ephemeral
                    .find(|c| c.name == name)
                    .map(|c| (Kind::Ephemeral, c))
            })
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

    /// Runs the worker until the pod is done or `cancel` fires. Boxed: the worker is on the
    /// heap once, not both in its task's future and in this one's.
    pub(crate) async fn run(
        mut self: Box<Self>,
        desired: &mut watch::Receiver<Desired>,
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
            let next = merge(&self.desired, &desired.borrow_and_update());
            let previous = std::mem::replace(&mut self.desired, next);
            if downward_inputs_changed(&previous.pod, &self.desired.pod) {
                self.refresh_volumes().await;
            }
            self.note_spec_changes();
            self.obs.now = SystemTime::now();
            self.settle_start_errors();
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
            let settle = self.settle.map(|t| t - tokio::time::Instant::now());
            let sleep = wake
                .map(|w: SystemTime| w.duration_since(now).unwrap_or_default())
                .into_iter()
                .chain(settle)
                .fold(RESYNC, Duration::min);
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.abort_kills();
                    return Outcome::Stopped;
                }
                changed = desired.changed() => if changed.is_err() {
                    self.abort_kills();
                    return Outcome::Stopped;
                },
                Ok(ev) = self.exit_rx.recv() => self.on_exit(ev).await,
                Ok(update) = self.probe_rx.recv() => self.on_probe(update),
                Ok(done) = self.hook_rx.recv() => self.on_hook_done(done),
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
                if why == machine::Why::DeadlineExceeded {
                    let msg = "Pod was active on the node longer than the specified deadline";
                    self.event(EventType::Normal, None, "DeadlineExceeded", msg);
                }
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
                // Started once the postStart hook under way has ended.
                Action::StartContainer { .. } if self.hook.is_some() => {}
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
                // Boxed while it runs: its future is most of a worker's (6.5 KiB), and every
                // waiting worker's future would be sized for it.
                Box::pin(self.start_container(&name, attempt)).await;
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
            Action::RemoveContainers => self.remove_containers().await.then_some(()).ok_or(retry),
            Action::TeardownVolumes => self.teardown_volumes().await.then_some(()).ok_or(retry),
            Action::TeardownSandbox => self.teardown_sandbox().await.then_some(()).ok_or(retry),
            Action::Finish => {
                self.finish_pod(false).await;
                Ok(())
            }
            Action::Done | Action::WaitUntil(_) => Ok(()),
        }
    }

    fn obs_mut(&mut self, name: &str) -> &mut ContainerObs {
        self.obs.containers.entry(name.to_string()).or_default()
    }

    fn report(&mut self) {
        // The kubelet writes no status while a postStart hook holds its pod's sync.
        if self.gone() || self.hook.is_some() {
            return;
        }
        let input = status::Input {
            pod: self.pod(),
            previous: self.reported.as_deref(),
            obs: &self.obs,
            state: self.obs.state,
            node_ip: self.ctx.node.ip,
            pod_ip: self.sandbox.as_ref().and_then(|s| s.ip),
        };
        let computed = status::compute(&input);
        if self.reported.as_deref() != Some(&computed) {
            let computed = Arc::new(computed);
            self.ctx.status.set(&self.desired.pod, computed.clone());
            self.reported = Some(computed);
        }
    }

    /// Objects changed: only a change to one this pod watches (or one the store no longer
    /// remembers) refreshes its volumes and steps it again.
    async fn on_store_change(&mut self) {
        let (now, changed) = self.ctx.store.changes_since(self.store_seen);
        self.store_seen = now;
        if let Some(keys) = changed {
            if keys.is_empty() || keys.is_disjoint(&watched_by(&self.desired.pod, &self.ctx.store))
            {
                return;
            }
        }
        self.refresh_volumes().await;
        self.dirty = true;
    }

    /// Writes the pod's volumes again from the objects and the pod as they are now.
    async fn refresh_volumes(&self) {
        if let Some(volumes) = self.volumes.as_ref() {
            if let Err(e) = self
                .ctx
                .host
                .refresh_volumes(&self.desired.pod, volumes)
                .await
            {
                warn!(pod = %self.uid, error = %e, "volume refresh failed");
            }
        }
    }
}

/// Whether the pod changed in what its downward API volumes show (labels, annotations, the
/// spec's resources): as the kubelet, an update of the pod itself rewrites them. A change
/// of status alone (the agent's own writes coming back) does not.
fn downward_inputs_changed(old: &Pod, new: &Pod) -> bool {
    old.metadata.labels != new.metadata.labels
        || old.metadata.annotations != new.metadata.annotations
        || old.spec != new.spec
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

#[cfg(test)]
mod heap_tests;
#[cfg(test)]
mod tests;
