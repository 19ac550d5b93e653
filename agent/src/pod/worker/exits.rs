//! Exits: containerd's exit events routed to the owning worker, the recorded exit of an
//! attempt (termination message, restart back-off), and the periodic re-inspection that
//! catches an exit event missed while containerd was away.

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

/// Routes containerd exit events to the worker owning the container id.
#[derive(Default)]
pub(crate) struct ExitRouter {
    routes: Mutex<HashMap<String, mpsc::UnboundedSender<ExitEvent>>>,
}

impl ExitRouter {
    pub(super) fn register(&self, id: &str, tx: &mpsc::UnboundedSender<ExitEvent>) {
        let mut routes = self.routes.lock().expect("exit routes lock");
        routes.insert(id.to_string(), tx.clone());
    }

    pub(super) fn unregister(&self, id: &str) {
        self.routes.lock().expect("exit routes lock").remove(id);
    }

    pub(crate) fn route(&self, event: ExitEvent) {
        let routes = self.routes.lock().expect("exit routes lock");
        if let Some(tx) = routes.get(&event.container_id) {
            let _ = tx.send(event);
        }
    }
}
