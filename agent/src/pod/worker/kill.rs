//! Stopping: kill tasks (preStop, the stop signal, KILL after the grace), removal of the
//! pod's containers, and the release of its volumes, sandbox, cgroups and files.

use super::*;
use crate::pod::logs;

/// First and longest wait before a signal containerd did not take is sent again.
const SIGNAL_RETRY_FIRST: Duration = Duration::from_secs(1);
const SIGNAL_RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the removal of a pod's cgroups is tried (every RETRY) before they are left.
const CGROUP_TRIES: u32 = 12;

impl Worker {
    pub(super) fn kill_container(
        &mut self,
        name: &str,
        grace: Duration,
        pre_stop: bool,
        reason: KillReason,
    ) {
        let Some((_, c)) = self.spec(name) else {
            return;
        };
        self.end_hook(name);
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
        let kill_at = machine::later(self.obs.now, grace);
        self.obs_mut(name).killing = Some(kill_at);
    }

    /// Removes every container of the pod, then its cgroups (an existing container keeps its
    /// cgroup, so they go after it). False while something is left (containerd away, a cgroup
    /// still busy): the step is retried and the pod is not done before.
    pub(super) async fn remove_containers(&mut self) -> bool {
        self.ctx.prober.stop_pod(&self.uid);
        let ctx = self.ctx.clone();
        let mut left = false;
        for (_, live) in self.live.iter_mut() {
            for slot in [&mut live.id, &mut live.previous] {
                let Some(id) = slot.clone() else {
                    continue;
                };
                self.router.unregister(&id);
                match ctx.runtime.remove(&id).await {
                    Ok(()) => *slot = None,
                    Err(e) => {
                        warn!(pod = %self.uid, container_id = %id, error = %e, "removing container; retrying");
                        left = true;
                    }
                }
            }
        }
        if left {
            return false;
        }
        // Nothing of the pod holds a cgroup any more: try again in full.
        self.cgroup_tries = 0;
        self.remove_cgroups()
    }

    /// Removes the pod's cgroups (at release, and again once its containers are removed,
    /// since an exited container can hold its cgroup until then). False to retry; true once
    /// they are gone or after CGROUP_TRIES failures (left with a warning).
    fn remove_cgroups(&mut self) -> bool {
        if self.cgroups_removed {
            return true;
        }
        match self.ctx.host.remove_pod_cgroups(&self.uid) {
            Ok(()) => {
                self.cgroups_removed = true;
                true
            }
            Err(e) if self.cgroup_tries < CGROUP_TRIES => {
                self.cgroup_tries += 1;
                debug!(pod = %self.uid, error = %e, "removing the pod's cgroups; retrying");
                false
            }
            Err(e) => {
                warn!(pod = %self.uid, error = %e, "leaving the pod's cgroups for now");
                true
            }
        }
    }

    pub(super) async fn teardown_volumes(&mut self) -> bool {
        match self.ctx.host.teardown_volumes(&self.uid).await {
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

    pub(super) async fn teardown_sandbox(&mut self) -> bool {
        match self.ctx.host.teardown_sandbox(&self.uid).await {
            Ok(()) => {
                self.obs.sandbox_ready = false;
                self.remove_cgroups()
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
    pub(super) async fn finish_pod(&mut self, done: bool) {
        self.report();
        self.obs.released = true;
        if done {
            remove_pod_dir(&self.pod_dir());
            let logs = logs::pod_dir(&self.ctx.node.log_dir, self.pod());
            if let Err(e) = std::fs::remove_dir_all(&logs) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(pod = %self.uid, error = %e, "removing the pod's logs");
                }
            }
        }
        if self.gone() {
            self.ctx.forget(&self.uid);
        } else {
            self.ctx.status.finish(&self.uid);
        }
        info!(pod = %self.uid, done, "pod finished");
    }

    pub(super) fn abort_kills(&mut self) {
        if let Some(hook) = self.hook.take() {
            hook.task.abort();
        }
        for (_, live) in self.live.iter_mut() {
            if let Some(k) = live.kill.take() {
                k.abort();
            }
        }
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

/// preStop (within the grace), the stop signal, KILL once the grace is over.
struct KillTask {
    ctx: Arc<PodContext>,
    pod: Arc<Pod>,
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
                runtime: &*self.ctx.runtime,
                container: &self.container,
                container_id: &self.id,
                pod_ip: self.pod_ip,
            };
            if let Err(e) = hooks::run(&target, handler, Some(self.grace)).await {
                warn!(container_id = %self.id, error = %e, "preStop hook failed");
                let field = format!("spec.containers{{{}}}", self.container.name);
                // The kubelet's fixed text: nothing a hook prints reaches events.
                let msg = "PreStopHook failed";
                let object = pod_ref(&self.pod, Some(field));
                self.ctx
                    .recorder
                    .record(object, EventType::Warning, "FailedPreStopHook", msg);
            }
        }
        let kill_at = deadline.max(tokio::time::Instant::now() + machine::MIN_KILL_GRACE);
        self.deliver(self.signal, Some(kill_at)).await;
        tokio::time::sleep_until(kill_at).await;
        info!(container_id = %self.id, "grace period over, sending KILL");
        self.deliver(libc::SIGKILL, None).await;
    }

    /// Sends `signal` until containerd takes it (a task already gone counts); a failure, such
    /// as containerd being away, is retried (until `until` when given), so a kill asked for
    /// during an outage is carried out once containerd is back.
    async fn deliver(&self, signal: i32, until: Option<tokio::time::Instant>) {
        let mut retry = crate::retry::Retry::new(SIGNAL_RETRY_FIRST, SIGNAL_RETRY_MAX);
        let mut failures = 0u32;
        loop {
            let error = match self.ctx.runtime.signal(&self.id, signal).await {
                Ok(()) => return,
                Err(e) if e.is_not_found() => return,
                Err(e) => e,
            };
            failures += 1;
            if failures == 1 {
                warn!(container_id = %self.id, signal, %error, "signal failed; retrying until it is taken");
            } else {
                debug!(container_id = %self.id, signal, %error, "signal failed again");
            }
            let next = tokio::time::Instant::now() + retry.fail();
            if until.is_some_and(|u| next >= u) {
                return;
            }
            tokio::time::sleep_until(next).await;
        }
    }
}
