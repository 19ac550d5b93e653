//! The pod manager: owns one worker per pod UID and feeds each the latest desired pod through a
//! watch channel (a newer update replaces a pending one). It recovers the agent's containers
//! from containerd's label checkpoint on start, cleans up pods no source wants after the first
//! full sync, keeps a same-name pod waiting until its predecessor's worker is done, forgets a
//! finished pod once no source lists it (so the same UID listed again runs again), and starts
//! the task that routes containerd's exits to the workers (`ExitRouter`). Stopping it stops
//! workers, never containers.
//! A worker that panics is made again (after a back-off) from what containerd shows of its
//! pod, so it adopts the running attempts instead of starting (and removing) them anew.
//!
//! One task (`Manager::run`) owns the manager's state; `PodManager` is a handle that sends it
//! commands, and a worker that ends tells it by the same channel, so the sources' plans and the
//! workers' ends are taken one at a time, in the order they came.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

use super::worker::{remove_pod_dir, ExitRouter, Outcome, Worker};
use super::{checkpoint, logs, Deletion, Desired, PodContext};
use crate::runtime::{labels, ContainerRecord, RuntimeError};

/// First and longest wait before a panicked worker is made again.
const RESPAWN_FIRST: Duration = Duration::from_secs(1);
const RESPAWN_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// Listing the agent's containers failed during recovery.
    #[error("recovering containers: {0}")]
    Recover(#[from] RuntimeError),
    /// The manager was stopped before it answered.
    #[error("the pod manager has stopped")]
    Stopped,
}

/// A handle on the pod manager's task, which owns the workers. Cheap to clone.
#[derive(Clone)]
pub struct PodManager {
    commands: mpsc::UnboundedSender<Command>,
    finished: broadcast::Sender<String>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// What the manager's task is asked, by the handle and by the workers that end.
enum Command {
    Recover(oneshot::Sender<Result<usize, ManagerError>>),
    RecoveredStaticPods(oneshot::Sender<Vec<Pod>>),
    Update(Desired),
    SyncAll(Vec<Desired>, oneshot::Sender<()>),
    /// A worker ended (sent by its task).
    Ended {
        uid: String,
        outcome: Outcome,
    },
    Uids(oneshot::Sender<Vec<String>>),
    #[cfg(test)]
    WorkerUpdates(String, oneshot::Sender<Option<watch::Receiver<Desired>>>),
}

/// The manager's task: it alone holds `State`.
struct Manager {
    ctx: Arc<PodContext>,
    router: ExitRouter,
    cancel: CancellationToken,
    tracker: TaskTracker,
    finished: broadcast::Sender<String>,
    /// Admission of new pods (none: every pod is admitted).
    admission: Option<crate::admission::NodeAdmission>,
    /// For the workers to say that they ended (weak: the handles keep the channel open).
    commands: mpsc::WeakUnboundedSender<Command>,
    state: State,
}

#[derive(Default)]
struct State {
    workers: HashMap<String, Handle>,
    /// Pods waiting for a same-name predecessor's worker to finish.
    waiting: BTreeMap<String, Desired>,
    /// UIDs whose workers are done (a source may still list them until the object is gone).
    done: HashSet<String>,
    /// Containers found in containerd at start, by pod UID, until a worker adopts them.
    recovered: HashMap<String, Vec<ContainerRecord>>,
    /// Checkpointed static pods among the recovered, by UID.
    checkpointed: HashMap<String, Pod>,
    /// The first full sync has happened (orphans were cleaned up).
    synced: bool,
}

impl State {
    /// After a burst of pods is gone, the tables give back the room it grew.
    fn give_back(&mut self) {
        crate::memory::shrink_spare(&mut self.workers);
        crate::memory::shrink_spare(&mut self.done);
        crate::memory::shrink_spare(&mut self.recovered);
        crate::memory::shrink_spare(&mut self.checkpointed);
    }
}

struct Handle {
    tx: watch::Sender<Desired>,
    key: (String, String),
}

fn uid_of(d: &Desired) -> String {
    d.pod.metadata.uid.clone().unwrap_or_default()
}

fn uid_of_pod(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

fn key_of(d: &Desired) -> (String, String) {
    let m = &d.pod.metadata;
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

fn gone(d: &Desired) -> bool {
    d.deletion.is_some_and(|d| d.gone)
}

impl PodManager {
    /// Starts the manager's task and the exit router (`ExitRouter`); `cancel` (a child of the
    /// agent's root token) stops everything. With `admission`, every new pod (not one
    /// recovered from containerd) is admitted as the kubelet does before its worker is made; a
    /// refused pod is Failed with the kubelet's reason and never runs. Without, every pod is
    /// admitted.
    pub fn new(
        ctx: Arc<PodContext>,
        admission: Option<crate::admission::NodeAdmission>,
        cancel: &CancellationToken,
    ) -> Self {
        let (finished, _) = broadcast::channel(1024);
        let cancel = cancel.child_token();
        let tracker = TaskTracker::new();
        let router = ExitRouter::spawn(ctx.runtime.exits(), cancel.clone(), &tracker);
        let (commands, receiver) = mpsc::unbounded_channel();
        let manager = Manager {
            ctx,
            router,
            cancel: cancel.clone(),
            tracker: tracker.clone(),
            finished: finished.clone(),
            admission,
            commands: commands.downgrade(),
            state: State::default(),
        };
        tracker.spawn(manager.run(receiver));
        Self {
            commands,
            finished,
            cancel,
            tracker,
        }
    }

    /// Asks the manager's task; None once it has stopped.
    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).ok()?;
        answer.await.ok()
    }

    /// Reads the agent's containers from containerd, grouped by pod UID, for workers to adopt.
    /// Call once before the first `sync_all`. Returns the number of pods found.
    pub async fn recover(&self) -> Result<usize, ManagerError> {
        self.ask(Command::Recover)
            .await
            .unwrap_or(Err(ManagerError::Stopped))
    }

    /// The static pods whose containers `recover` found, as checkpointed by their workers: a
    /// source that no longer lists one stops it with its own grace (see `checkpoint`).
    pub async fn recovered_static_pods(&self) -> Vec<Pod> {
        self.ask(Command::RecoveredStaticPods)
            .await
            .unwrap_or_default()
    }

    /// Hands one desired pod to its worker (spawning it if needed).
    pub fn update(&self, desired: Desired) {
        let _ = self.commands.send(Command::Update(desired));
    }

    /// A full set of desired pods (all sources merged): UIDs missing from it are deleted as
    /// gone. The first call first kills and removes what containerd, the sandboxes and the
    /// volumes hold for pods not in the set. Returns once the manager has taken it.
    pub async fn sync_all(&self, all: Vec<Desired>) {
        self.ask(|done| Command::SyncAll(all, done)).await;
    }

    /// UIDs of pods whose workers finished (deleted and released), for the API's final delete.
    pub fn subscribe_finished(&self) -> broadcast::Receiver<String> {
        self.finished.subscribe()
    }

    /// A receiver of what the worker of `uid` is handed, if it runs.
    #[cfg(test)]
    pub(crate) async fn worker_updates(&self, uid: &str) -> Option<watch::Receiver<Desired>> {
        self.ask(|reply| Command::WorkerUpdates(uid.to_string(), reply))
            .await
            .flatten()
    }

    /// UIDs with a live worker.
    pub async fn uids(&self) -> Vec<String> {
        self.ask(Command::Uids).await.unwrap_or_default()
    }

    /// Stops every worker and waits for them; the pods' containers keep running.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Manager {
    /// Takes the commands one at a time until cancelled or every handle is gone.
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            let command = tokio::select! {
                _ = self.cancel.cancelled() => return,
                command = commands.recv() => match command {
                    Some(command) => command,
                    None => return,
                },
            };
            match command {
                Command::Recover(reply) => {
                    let _ = reply.send(self.recover().await);
                }
                Command::RecoveredStaticPods(reply) => {
                    let _ = reply.send(self.state.checkpointed.values().cloned().collect());
                }
                Command::Update(desired) => self.update(desired),
                Command::SyncAll(all, done) => {
                    self.sync_all(all).await;
                    let _ = done.send(());
                }
                Command::Ended { uid, outcome } => self.ended(&uid, outcome),
                Command::Uids(reply) => {
                    let mut uids: Vec<String> = self.state.workers.keys().cloned().collect();
                    uids.sort();
                    let _ = reply.send(uids);
                }
                #[cfg(test)]
                Command::WorkerUpdates(uid, reply) => {
                    let _ = reply.send(self.state.workers.get(&uid).map(|h| h.tx.subscribe()));
                }
            }
        }
    }

    async fn recover(&mut self) -> Result<usize, ManagerError> {
        let records = self.ctx.runtime.list().await?;
        let mut groups: HashMap<String, Vec<ContainerRecord>> = HashMap::new();
        for r in records {
            if let Some(uid) = r.labels.get(labels::POD_UID).cloned() {
                groups.entry(uid).or_default().push(r);
            }
        }
        let pods_dir = crate::layout::pods_dir(&self.ctx.node.root_dir);
        let checkpointed: HashMap<String, Pod> = groups
            .keys()
            .filter_map(|uid| checkpoint::read(&pods_dir.join(uid)).map(|p| (uid.clone(), p)))
            .collect();
        let pods = groups.len();
        info!(
            pods,
            static_pods = checkpointed.len(),
            "recovered containers from containerd"
        );
        self.state.recovered = groups;
        self.state.checkpointed = checkpointed;
        Ok(pods)
    }

    async fn sync_all(&mut self, mut all: Vec<Desired>) {
        // Pods that are gone first: a same-name successor then waits for them, never the
        // other way round (a pod replaced while the agent was down must stop first).
        all.sort_by_key(|d| !gone(d));
        let wanted: HashSet<String> = all.iter().map(uid_of).collect();
        if !self.state.synced {
            self.clean_orphans(&wanted).await;
        }
        let st = &mut self.state;
        st.synced = true;
        // A finished pod no source lists any more is forgotten: if it comes back (a manifest
        // put back unchanged has the same UID), it is a new run.
        let forgotten: Vec<String> = st
            .done
            .iter()
            .filter(|u| !wanted.contains(*u))
            .cloned()
            .collect();
        for uid in forgotten {
            st.done.remove(&uid);
            self.ctx.forget(&uid);
        }
        for d in all {
            self.update(d);
        }
        let st = &self.state;
        let missing: Vec<Desired> = st
            .workers
            .iter()
            .filter(|(uid, _)| !wanted.contains(*uid))
            .map(|(_, h)| h.tx.borrow().clone())
            .chain(
                st.waiting
                    .iter()
                    .filter(|(uid, _)| !wanted.contains(*uid))
                    .map(|(_, d)| d.clone()),
            )
            .collect();
        for mut d in missing {
            d.deletion = Some(Deletion {
                grace: std::time::Duration::ZERO,
                gone: true,
            });
            self.update(d);
        }
        self.state.give_back();
    }

    async fn clean_orphans(&mut self, wanted: &HashSet<String>) {
        let ctx = self.ctx.clone();
        let orphans: Vec<(String, Vec<ContainerRecord>)> = {
            let st = &mut self.state;
            let uids: Vec<String> = st
                .recovered
                .keys()
                .filter(|u| !wanted.contains(*u))
                .cloned()
                .collect();
            uids.into_iter()
                .filter_map(|u| st.recovered.remove_entry(&u))
                .collect()
        };
        let mut uids: HashSet<String> = orphans.iter().map(|(u, _)| u.clone()).collect();
        for (uid, records) in orphans {
            for r in records {
                info!(pod = %uid, container_id = %r.id, "removing container of an unwanted pod");
                if let Err(e) = ctx.runtime.remove(&r.id).await {
                    warn!(pod = %uid, container_id = %r.id, error = %e, "removing orphan");
                }
            }
        }
        let running: HashSet<String> = self.state.workers.keys().cloned().collect();
        let pod_dirs = std::fs::read_dir(crate::layout::pods_dir(&ctx.node.root_dir));
        let pod_dirs = pod_dirs.into_iter().flatten().flatten();
        uids.extend(pod_dirs.map(|e| e.file_name().to_string_lossy().into_owned()));
        uids.extend(ctx.host.volume_pods());
        uids.extend(ctx.host.sandbox_pods());
        for uid in uids {
            if wanted.contains(&uid) || running.contains(&uid) {
                continue;
            }
            if let Err(e) = ctx.host.teardown_volumes(&uid).await {
                warn!(pod = %uid, error = %e, "tearing down orphan volumes; retrying in the background");
                let (host, uid) = (ctx.host.clone(), uid.clone());
                let token = self.cancel.clone();
                self.tracker
                    .spawn(async move { host.retry_orphan_teardown(uid, token).await });
            }
            if let Err(e) = ctx.host.teardown_sandbox(&uid).await {
                warn!(pod = %uid, error = %e, "tearing down orphan sandbox");
            }
            remove_pod_dir(&crate::layout::pod_dir(&ctx.node.root_dir, &uid));
            if let Err(e) = ctx.host.remove_pod_cgroups(&uid) {
                warn!(pod = %uid, error = %e, "removing an orphan's cgroups");
            }
        }
        let log_dirs = std::fs::read_dir(&ctx.node.log_dir)
            .into_iter()
            .flatten()
            .flatten();
        for entry in log_dirs {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(uid) = logs::uid_of_dir(&name) else {
                continue;
            };
            if wanted.contains(uid) || running.contains(uid) {
                continue;
            }
            info!(pod = %uid, "removing the logs of a pod that is gone");
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                warn!(pod = %uid, error = %e, "removing an orphan's logs");
            }
        }
    }

    fn update(&mut self, desired: Desired) {
        let st = &mut self.state;
        let uid = uid_of(&desired);
        if uid.is_empty() {
            warn!(pod = ?desired.pod.metadata.name, "pod without a UID ignored");
            return;
        }
        if let Some(h) = st.workers.get(&uid) {
            // A worker wakes only when its pod or its deletion changed, not for every set
            // a source hands over.
            h.tx.send_if_modified(|current| {
                let same = current.deletion == desired.deletion
                    && (Arc::ptr_eq(&current.pod, &desired.pod) || current.pod == desired.pod);
                if !same {
                    *current = desired;
                }
                !same
            });
            return;
        }
        if let Some(slot) = st.waiting.get_mut(&uid) {
            if gone(&desired) {
                st.waiting.remove(&uid);
                self.ctx.forget(&uid);
            } else {
                *slot = desired;
            }
            return;
        }
        if st.done.contains(&uid) {
            if gone(&desired) {
                st.done.remove(&uid);
                self.ctx.forget(&uid);
            }
            return;
        }
        if gone(&desired) && !st.recovered.contains_key(&uid) {
            self.ctx.forget(&uid);
            return;
        }
        if desired.deletion.is_none() && !st.recovered.contains_key(&uid) {
            if let Err(r) = self.admit(&desired.pod) {
                self.reject(&desired.pod, r);
                return;
            }
        }
        let key = key_of(&desired);
        if self.state.workers.values().any(|h| h.key == key) {
            info!(pod = %key.1, ns = %key.0, uid = %uid, "waiting for the same-name predecessor");
            self.state.waiting.insert(uid, desired);
            return;
        }
        self.spawn(desired);
    }

    fn admit(&self, pod: &Pod) -> Result<(), crate::admission::Rejection> {
        let Some(admission) = self.admission.as_ref() else {
            return Ok(());
        };
        let running: Vec<Arc<Pod>> = self
            .state
            .workers
            .values()
            .map(|h| h.tx.borrow().clone())
            .filter(|d| d.deletion.is_none())
            .map(|d| d.pod)
            .collect();
        let running: Vec<&Pod> = running.iter().map(|p| &**p).collect();
        admission.admit(pod, &running)
    }

    /// The kubelet's `rejectPod`: a Warning event, phase Failed with the reason, no worker.
    fn reject(&mut self, pod: &Arc<Pod>, r: crate::admission::Rejection) {
        let status = k8s_openapi::api::core::v1::PodStatus {
            phase: Some(super::api::Phase::Failed.as_str().into()),
            reason: Some(r.reason.clone()),
            message: Some(format!("Pod was rejected: {}", r.message)),
            qos_class: Some(super::resources::qos_class(pod).to_string()),
            ..Default::default()
        };
        self.ctx.recorder.record(
            crate::events::pod_ref(pod, None),
            crate::events::EventType::Warning,
            &r.reason,
            &r.message,
        );
        self.ctx.status.set(pod, Arc::new(status));
        self.state.done.insert(uid_of_pod(pod));
    }

    fn spawn(&mut self, desired: Desired) {
        let uid = uid_of(&desired);
        let key = key_of(&desired);
        let (tx, rx) = watch::channel(desired.clone());
        let recovered = self.state.recovered.remove(&uid).unwrap_or_default();
        let (worker, stale) =
            Worker::new(self.ctx.clone(), self.router.clone(), desired, recovered);
        self.state.workers.insert(
            uid.clone(),
            Handle {
                tx,
                key: key.clone(),
            },
        );
        let span = info_span!("pod", pod = %key.1, ns = %key.0, uid = %uid);
        let (ctx, router) = (self.ctx.clone(), self.router.clone());
        let manager = self.commands.clone();
        let token = self.cancel.child_token();
        self.tracker.spawn(
            async move {
                remove_stale(&ctx, stale).await;
                let (mut worker, mut rx) = (worker, rx);
                let mut retry = crate::retry::Retry::new(RESPAWN_FIRST, RESPAWN_MAX);
                let outcome = loop {
                    let run = std::panic::AssertUnwindSafe(worker.run(&mut rx, token.clone()));
                    if let Ok(outcome) = run.catch_unwind().await {
                        break outcome;
                    }
                    let delay = retry.fail();
                    error!(
                        ?delay,
                        "pod worker panicked; making it again from what containerd shows"
                    );
                    match respawn(&ctx, &router, &uid, &rx, &token, delay).await {
                        Some(again) => worker = again,
                        None => break Outcome::Stopped,
                    }
                };
                if let Some(manager) = manager.upgrade() {
                    let _ = manager.send(Command::Ended { uid, outcome });
                }
            }
            .instrument(span),
        );
    }

    fn ended(&mut self, uid: &str, outcome: Outcome) {
        let st = &mut self.state;
        let Some(handle) = st.workers.remove(uid) else {
            return;
        };
        if outcome == Outcome::Stopped {
            return;
        }
        st.done.insert(uid.to_string());
        let _ = self.finished.send(uid.to_string());
        let next = st
            .waiting
            .iter()
            .find(|(_, d)| key_of(d) == handle.key)
            .map(|(u, _)| u.clone());
        if let Some(d) = next.and_then(|u| st.waiting.remove(&u)) {
            self.spawn(d);
        }
        self.state.give_back();
    }
}

async fn remove_stale(ctx: &PodContext, stale: Vec<String>) {
    for id in stale {
        if let Err(e) = ctx.runtime.remove(&id).await {
            warn!(container_id = %id, error = %e, "removing stale attempt");
        }
    }
}

/// After `delay`, a new worker for `uid` that adopts the pod's containers as containerd
/// lists them (retried while containerd cannot list); None once cancelled.
async fn respawn(
    ctx: &Arc<PodContext>,
    router: &ExitRouter,
    uid: &str,
    rx: &watch::Receiver<Desired>,
    token: &CancellationToken,
    delay: Duration,
) -> Option<Box<Worker>> {
    loop {
        tokio::select! {
            _ = token.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        let records = match ctx.runtime.list().await {
            Ok(all) => all,
            Err(e) => {
                warn!(error = %e, "listing containers to adopt after a panic; retrying");
                continue;
            }
        };
        let records = records
            .into_iter()
            .filter(|r| r.labels.get(labels::POD_UID).map(String::as_str) == Some(uid))
            .collect();
        let desired = rx.borrow().clone();
        let (worker, stale) = Worker::new(ctx.clone(), router.clone(), desired, records);
        remove_stale(ctx, stale).await;
        return Some(worker);
    }
}
