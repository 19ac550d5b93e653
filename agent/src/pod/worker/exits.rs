//! Exits: containerd's exit events routed to the owning worker, the recorded exit of an
//! attempt (termination message, restart back-off), and the periodic re-inspection that
//! catches an exit event missed while containerd was away.

use tokio::sync::broadcast;
use tokio_util::task::TaskTracker;

use super::*;

impl Worker {
    pub(super) async fn on_exit(&mut self, ev: ExitEvent) {
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

    pub(super) fn container_exited(
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
        self.end_hook(name);
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
    pub(super) fn record_exit(&mut self, name: &str, exit: Exit) {
        let spec_changed = self
            .obs
            .containers
            .get(name)
            .is_some_and(|o| o.spec_changed);
        let restarts = self.obs.state < PodState::Terminating
            && !spec_changed
            && self.spec(name).is_some_and(|(kind, _)| {
                machine::wants_restart(api::RestartPolicy::of(self.pod()), kind, &exit)
            });
        let o = self.obs.containers.entry(name.to_string()).or_default();
        let window = machine::record_exit(o, exit, restarts, &mut self.crash, name);
        if let Some(w) = window {
            let pod = crate::pod::format_pod(&self.desired.pod);
            debug!(pod = %self.uid, container = %name, delay = ?w.delay, "restart back-off");
            let msg = format!("Back-off restarting failed container {name} in pod {pod}");
            self.container_event(name, EventType::Warning, "BackOff", &msg);
        }
        if let Some(live) = self.live.get_mut(name) {
            live.probing = false;
        }
        self.dirty = true;
    }

    /// The termination message of an attempt, per terminationMessagePolicy.
    pub(super) fn termination_message(
        &self,
        name: &str,
        attempt: u32,
        code: i32,
    ) -> Option<String> {
        let mut text = termination_file(&self.message_file(name, attempt));
        let fallback = self
            .spec(name)
            .and_then(|(_, c)| c.termination_message_policy)
            .is_some_and(|p| p == "FallbackToLogsOnError");
        if text.is_empty() && fallback && code != 0 {
            text = log_tail(&self.log_path(name, attempt));
        }
        (!text.is_empty()).then_some(text)
    }

    /// Re-inspects running containers, in case an exit event was missed.
    pub(super) async fn resync(&mut self) {
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

/// Where a worker's exits go: futures' unbounded channel allocates per message; tokio's
/// allocated a block of 32 events (2 KiB with the channel) for every pod worker up front.
pub(super) type ExitsTo = futures::channel::mpsc::UnboundedSender<ExitEvent>;

/// What a worker asks of the exit router.
enum Route {
    /// Exits of container `id` go to `to` (replacing an earlier route of that id).
    Register { id: String, to: ExitsTo },
    /// Exits of container `id` go nowhere.
    Unregister { id: String },
    /// The container ids it routes, sorted.
    #[cfg(test)]
    Routed(tokio::sync::oneshot::Sender<Vec<String>>),
}

/// A handle on the task that routes containerd's exit events to the worker owning the
/// container id (`route`); cheap to clone, one per worker. The task alone owns the routes:
/// workers register and unregister through it, by channel.
#[derive(Clone)]
pub(crate) struct ExitRouter {
    routes: mpsc::UnboundedSender<Route>,
}

impl ExitRouter {
    /// Spawns the routing task on `tracker`: it reads `exits` until `cancel` fires or the
    /// stream ends.
    pub(crate) fn spawn(
        exits: broadcast::Receiver<ExitEvent>,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Self {
        let (routes, commands) = mpsc::unbounded_channel();
        tracker.spawn(route(exits, commands, cancel));
        Self { routes }
    }

    /// Exits of container `id` go to `to` from now on: call it before the container is
    /// created, so that its exit cannot come first.
    pub(super) fn register(&self, id: &str, to: &ExitsTo) {
        let _ = self.routes.send(Route::Register {
            id: id.to_string(),
            to: to.clone(),
        });
    }

    pub(super) fn unregister(&self, id: &str) {
        let _ = self.routes.send(Route::Unregister { id: id.to_string() });
    }

    #[cfg(test)]
    async fn routed(&self) -> Vec<String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let _ = self.routes.send(Route::Routed(reply));
        answer.await.unwrap_or_default()
    }
}

/// The routing task. A route asked for before an exit was published is in place when that
/// exit is routed (the routes are read first). An exit for a worker that is gone (its
/// receiver dropped: the pod finished, or the worker was made again after a panic) is dropped
/// with its route, and routes to gone workers are pruned on every registration.
async fn route(
    mut exits: broadcast::Receiver<ExitEvent>,
    mut commands: mpsc::UnboundedReceiver<Route>,
    cancel: CancellationToken,
) {
    let mut routes: HashMap<String, ExitsTo> = HashMap::new();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(command) = commands.recv() => match command {
                Route::Register { id, to } => {
                    routes.retain(|_, to| !to.is_closed());
                    routes.insert(id, to);
                }
                Route::Unregister { id } => {
                    routes.remove(&id);
                    crate::memory::shrink_spare(&mut routes);
                }
                #[cfg(test)]
                Route::Routed(reply) => {
                    let mut ids: Vec<String> = routes.keys().cloned().collect();
                    ids.sort();
                    let _ = reply.send(ids);
                }
            },
            event = exits.recv() => match event {
                Ok(event) => {
                    let id = event.container_id.clone();
                    if routes.get(&id).is_some_and(|to| to.unbounded_send(event).is_err()) {
                        routes.remove(&id);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "exit events lagged; workers resync by inspection");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(id: &str) -> ExitEvent {
        ExitEvent {
            container_id: id.to_string(),
            exit_code: 0,
            exited_at: SystemTime::UNIX_EPOCH,
        }
    }

    fn received(rx: &mut futures::channel::mpsc::UnboundedReceiver<ExitEvent>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.container_id)
            .collect()
    }

    /// Lets the routing task catch up (paused time moves only once every task waits).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// #14: an exit reaches exactly the worker of its container, also when it is published
    /// right after the route was asked for; an exit of a container nobody owns goes nowhere.
    #[tokio::test(start_paused = true)]
    async fn an_exit_reaches_exactly_the_worker_of_its_container() {
        let (exits, _) = broadcast::channel(16);
        let tracker = TaskTracker::new();
        let router = ExitRouter::spawn(exits.subscribe(), CancellationToken::new(), &tracker);
        let (a, mut from_a) = futures::channel::mpsc::unbounded();
        let (b, mut from_b) = futures::channel::mpsc::unbounded();
        router.register("a1", &a);
        router.register("b1", &b);
        // Published before the routing task ran at all: the routes come first.
        for id in ["a1", "b1", "nobody", "a1"] {
            exits.send(exit(id)).expect("subscribed");
        }
        settle().await;
        assert_eq!(received(&mut from_a), ["a1", "a1"]);
        assert_eq!(received(&mut from_b), ["b1"]);
        router.unregister("b1");
        router.register("b2", &b);
        exits.send(exit("b1")).expect("subscribed");
        exits.send(exit("b2")).expect("subscribed");
        settle().await;
        assert_eq!(received(&mut from_b), ["b2"], "b1 was unregistered");
        assert!(received(&mut from_a).is_empty());
    }

    /// #14: a late exit for a worker that is gone is dropped, and the route with it: the router
    /// keeps no sender of a gone worker.
    #[tokio::test(start_paused = true)]
    async fn a_late_exit_for_a_gone_worker_is_dropped_without_leaking() {
        let (exits, _) = broadcast::channel(16);
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let router = ExitRouter::spawn(exits.subscribe(), cancel.clone(), &tracker);
        let (gone, from_gone) = futures::channel::mpsc::unbounded();
        let (other, mut from_other) = futures::channel::mpsc::unbounded();
        router.register("g1", &gone);
        router.register("g2", &gone);
        router.register("o1", &other);
        settle().await;
        drop((gone, from_gone));
        assert_eq!(
            router.routed().await,
            ["g1", "g2", "o1"],
            "the router holds the gone worker's routes"
        );
        exits.send(exit("g1")).expect("subscribed");
        // Another registration prunes what is left of the gone worker (g2).
        router.register("o2", &other);
        settle().await;
        assert_eq!(
            router.routed().await,
            ["o1", "o2"],
            "a route to a gone worker leaked"
        );
        exits.send(exit("o2")).expect("subscribed");
        settle().await;
        assert_eq!(received(&mut from_other), ["o2"]);
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
