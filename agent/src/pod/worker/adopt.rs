//! Recovery: a worker made after an agent restart (or after a worker panic) takes over the
//! attempts containerd still holds, from their checkpoint labels, instead of starting anew.

use std::collections::BTreeMap;

use super::*;

impl Worker {
    /// Takes over the latest attempt of each container, and the one before it (lastState);
    /// returns ids of older attempts to remove.
    pub(super) fn adopt(&mut self, records: Vec<ContainerRecord>) -> Vec<String> {
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
            .chain(
                machine::ephemeral(&self.desired.pod)
                    .into_iter()
                    .map(|c| c.name),
            )
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
            let ready = self.spec(&name).is_some_and(|(_, c)| {
                machine::adopted_ready(&c, running, ready_before.contains(&name))
            });
            // A kill for a failed postStart, begun before a restart, is carried out.
            let killed = running && checkpoint::kill_recorded(&self.pod_dir(), &name, attempt);
            let o = self.obs_mut(&name);
            o.attempt = attempt;
            if killed {
                o.kill = Some(KillRequest {
                    reason: KillReason::PostStartHookFailed,
                    grace: None,
                });
            }
            o.state = state;
            o.started = running;
            o.ready = ready;
            o.container_id = adopted.then(|| r.id.clone());
            o.image = adopted.then(|| r.image.clone());
        }
        stale
    }

    /// The exit of a recovered attempt that ran and ended.
    pub(super) fn exit_of(&self, name: &str, attempt: u32, state: &TaskState) -> Option<Exit> {
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
    pub(super) async fn restore_images(&mut self) {
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
    pub(super) fn note_spec_changes(&mut self) {
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

    pub(super) fn api_ready_containers(&self) -> Vec<String> {
        let status = self.desired.pod.status.as_ref();
        let lists = status.into_iter().flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
        });
        lists.filter(|c| c.ready).map(|c| c.name.clone()).collect()
    }
}
