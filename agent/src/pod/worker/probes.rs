//! Probes: starting a running container's probes on the shared prober, and their results
//! turned into started, ready, or a kill request.

use super::*;

impl Worker {
    pub(super) fn on_probe(&mut self, update: ProbeUpdate) {
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
                .map(machine::spec_secs)
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
    pub(super) fn start_pending_probes(&mut self) {
        if self.sandbox.is_none() {
            return;
        }
        let pod_ip = self.pod_ip();
        let terminating = self.obs.state >= PodState::Terminating;
        let hooked = self.hook.as_ref().map(|h| h.name.clone());
        let names: Vec<String> = self.live.keys().cloned().collect();
        // Probes of a container start once its postStart hook has ended.
        for name in names.into_iter().filter(|n| Some(n) != hooked.as_ref()) {
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

    pub(super) fn stop_probes(&self, name: &str, kinds: &[ProbeKind]) {
        for kind in kinds {
            self.ctx.prober.stop(&ProbeKey {
                pod_uid: self.uid.clone(),
                container: name.to_string(),
                kind: *kind,
            });
        }
    }

    /// While terminating only readiness keeps running.
    pub(super) fn stop_liveness_probes(&self) {
        for name in self.live.keys() {
            self.stop_probes(name, &[ProbeKind::Liveness, ProbeKind::Startup]);
        }
    }
}
