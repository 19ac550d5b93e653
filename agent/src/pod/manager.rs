//! The pod manager: owns one worker per pod UID and feeds each the latest desired pod through a
//! watch channel (a newer update replaces a pending one). It recovers the agent's containers
//! from containerd's label checkpoint on start, cleans up pods no source wants after the first
//! full sync, keeps a same-name pod waiting until its predecessor's worker is done, and fans
//! containerd's exit stream out to the workers. Stopping it stops workers, never containers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

use super::worker::{remove_pod_dir, ExitRouter, Outcome, Worker};
use super::{checkpoint, Deletion, Desired, PodContext};
use crate::runtime::{labels, ContainerRecord, RuntimeError};

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// Listing the agent's containers failed during recovery.
    #[error("recovering containers: {0}")]
    Recover(#[from] RuntimeError),
}

/// Owns the pod workers. Cheap to clone.
#[derive(Clone)]
pub struct PodManager {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Arc<PodContext>,
    router: Arc<ExitRouter>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    finished: broadcast::Sender<String>,
    state: Mutex<State>,
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

struct Handle {
    tx: watch::Sender<Desired>,
    key: (String, String),
}

fn uid_of(d: &Desired) -> String {
    d.pod.metadata.uid.clone().unwrap_or_default()
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
    /// Starts the exit fan-out; `cancel` (a child of the agent's root token) stops everything.
    pub fn new(ctx: Arc<PodContext>, cancel: &CancellationToken) -> Self {
        let (finished, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            router: Arc::default(),
            cancel: cancel.child_token(),
            tracker: TaskTracker::new(),
            finished,
            state: Mutex::default(),
            ctx,
        });
        let mut exits = inner.ctx.runtime.exits();
        let router = inner.router.clone();
        let token = inner.cancel.clone();
        inner.tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    event = exits.recv() => match event {
                        Ok(ev) => router.route(ev),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            warn!(missed = n, "exit events lagged; workers resync by inspection");
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                }
            }
        });
        Self { inner }
    }

    /// Reads the agent's containers from containerd, grouped by pod UID, for workers to adopt.
    /// Call once before the first `sync_all`. Returns the number of pods found.
    pub async fn recover(&self) -> Result<usize, ManagerError> {
        let records = self.inner.ctx.runtime.list().await?;
        let mut groups: HashMap<String, Vec<ContainerRecord>> = HashMap::new();
        for r in records {
            if let Some(uid) = r.labels.get(labels::POD_UID).cloned() {
                groups.entry(uid).or_default().push(r);
            }
        }
        let pods_dir = self.inner.ctx.node.root_dir.join("pods");
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
        let mut st = self.inner.state.lock().expect("manager lock");
        st.recovered = groups;
        st.checkpointed = checkpointed;
        Ok(pods)
    }

    /// The static pods whose containers `recover` found, as checkpointed by their workers: a
    /// source that no longer lists one stops it with its own grace (see `checkpoint`).
    pub fn recovered_static_pods(&self) -> Vec<Pod> {
        let st = self.inner.state.lock().expect("manager lock");
        st.checkpointed.values().cloned().collect()
    }

    /// Hands one desired pod to its worker (spawning it if needed).
    pub fn update(&self, desired: Desired) {
        let mut st = self.inner.state.lock().expect("manager lock");
        self.inner.update_locked(&mut st, desired);
    }

    /// A full set of desired pods (all sources merged): UIDs missing from it are deleted as
    /// gone. The first call first kills and removes what containerd, the sandboxes and the
    /// volumes hold for pods not in the set.
    pub async fn sync_all(&self, all: Vec<Desired>) {
        let wanted: HashSet<String> = all.iter().map(uid_of).collect();
        let first = !self.inner.state.lock().expect("manager lock").synced;
        if first {
            self.clean_orphans(&wanted).await;
        }
        let mut st = self.inner.state.lock().expect("manager lock");
        st.synced = true;
        for d in all {
            self.inner.update_locked(&mut st, d);
        }
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
            self.inner.update_locked(&mut st, d);
        }
    }

    async fn clean_orphans(&self, wanted: &HashSet<String>) {
        let ctx = &self.inner.ctx;
        let orphans: Vec<(String, Vec<ContainerRecord>)> = {
            let mut st = self.inner.state.lock().expect("manager lock");
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
        let running: HashSet<String> = {
            let st = self.inner.state.lock().expect("manager lock");
            st.workers.keys().cloned().collect()
        };
        let pod_dirs = std::fs::read_dir(ctx.node.root_dir.join("pods"));
        let pod_dirs = pod_dirs.into_iter().flatten().flatten();
        uids.extend(pod_dirs.map(|e| e.file_name().to_string_lossy().into_owned()));
        uids.extend(ctx.volumes.list());
        uids.extend(ctx.sandboxes.list());
        for uid in uids {
            if wanted.contains(&uid) || running.contains(&uid) {
                continue;
            }
            if let Err(e) = ctx.volumes.teardown(&uid).await {
                warn!(pod = %uid, error = %e, "tearing down orphan volumes; retrying in the background");
                let (volumes, uid) = (ctx.volumes.clone(), uid.clone());
                let token = self.inner.cancel.clone();
                self.inner
                    .tracker
                    .spawn(async move { volumes.retry_orphan_teardown(uid, token).await });
            }
            if let Err(e) = ctx.sandboxes.teardown(&uid).await {
                warn!(pod = %uid, error = %e, "tearing down orphan sandbox");
            }
            remove_pod_dir(&ctx.node.root_dir.join("pods").join(&uid));
        }
    }

    /// UIDs of pods whose workers finished (deleted and released), for the API's final delete.
    pub fn subscribe_finished(&self) -> broadcast::Receiver<String> {
        self.inner.finished.subscribe()
    }

    /// UIDs with a live worker.
    pub fn uids(&self) -> Vec<String> {
        let st = self.inner.state.lock().expect("manager lock");
        let mut uids: Vec<String> = st.workers.keys().cloned().collect();
        uids.sort();
        uids
    }

    /// Stops every worker and waits for them; the pods' containers keep running.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}

impl Inner {
    fn update_locked(self: &Arc<Self>, st: &mut State, desired: Desired) {
        let uid = uid_of(&desired);
        if uid.is_empty() {
            warn!(pod = ?desired.pod.metadata.name, "pod without a UID ignored");
            return;
        }
        if let Some(h) = st.workers.get(&uid) {
            h.tx.send_replace(desired);
            return;
        }
        if let Some(slot) = st.waiting.get_mut(&uid) {
            if gone(&desired) {
                st.waiting.remove(&uid);
                self.ctx.status.forget(&uid);
            } else {
                *slot = desired;
            }
            return;
        }
        if st.done.contains(&uid) {
            if gone(&desired) {
                st.done.remove(&uid);
                self.ctx.status.forget(&uid);
            }
            return;
        }
        if gone(&desired) && !st.recovered.contains_key(&uid) {
            self.ctx.status.forget(&uid);
            return;
        }
        let key = key_of(&desired);
        if st.workers.values().any(|h| h.key == key) {
            info!(pod = %key.1, ns = %key.0, uid = %uid, "waiting for the same-name predecessor");
            st.waiting.insert(uid, desired);
            return;
        }
        self.spawn_locked(st, desired);
    }

    fn spawn_locked(self: &Arc<Self>, st: &mut State, desired: Desired) {
        let uid = uid_of(&desired);
        let key = key_of(&desired);
        let (tx, rx) = watch::channel(desired.clone());
        let recovered = st.recovered.remove(&uid).unwrap_or_default();
        let (worker, stale) =
            Worker::new(self.ctx.clone(), self.router.clone(), desired, recovered);
        st.workers.insert(
            uid.clone(),
            Handle {
                tx,
                key: key.clone(),
            },
        );
        let span = info_span!("pod", pod = %key.1, ns = %key.0, uid = %uid);
        let inner = self.clone();
        let token = self.cancel.child_token();
        self.tracker.spawn(
            async move {
                for id in stale {
                    if let Err(e) = inner.ctx.runtime.remove(&id).await {
                        warn!(container_id = %id, error = %e, "removing stale attempt");
                    }
                }
                let run = std::panic::AssertUnwindSafe(worker.run(rx, token));
                match run.catch_unwind().await {
                    Ok(outcome) => inner.ended(&uid, outcome),
                    Err(_) => {
                        error!("pod worker panicked; the pod is retried on its next update");
                        inner.ended(&uid, Outcome::Stopped);
                    }
                }
            }
            .instrument(span),
        );
    }

    fn ended(self: &Arc<Self>, uid: &str, outcome: Outcome) {
        let mut st = self.state.lock().expect("manager lock");
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
            self.spawn_locked(&mut st, d);
        }
    }
}
