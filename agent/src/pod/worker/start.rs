//! Starting: volumes and sandbox, then each attempt: image pull per policy, the container's
//! config (env, mounts, files), create and start, postStart, and the classification of a
//! failed start (StartError attempt, or the same attempt retried with a waiting reason).

use super::*;
use crate::runtime::{NamespacePaths, PidNamespace};

impl Worker {
    pub(super) async fn setup_volumes(&mut self) -> bool {
        match self.ctx.host.setup_volumes(&self.desired.pod).await {
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

    pub(super) async fn ensure_sandbox(&mut self) -> bool {
        match self.ctx.host.ensure_sandbox(&self.desired.pod).await {
            Ok(s) => {
                if s.cluster_dns_missing {
                    let msg = format!(
                        "pod: {}. kubelet does not have ClusterDNS IP configured and cannot \
                         create Pod using \"ClusterFirst\" policy. Falling back to \"Default\" policy.",
                        crate::volume::downward::go_quote(&crate::pod::format_pod(self.pod()))
                    );
                    self.event(EventType::Warning, None, "MissingClusterDNS", &msg);
                }
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

    fn created_event(&self, name: &str) {
        let msg = format!("Created container {name}");
        self.container_event(name, EventType::Normal, "Created", &msg);
    }

    /// Records a start failure: waiting reason, Warning event, back-off.
    pub(super) fn start_failed(
        &mut self,
        name: &str,
        reason: &str,
        message: String,
        pull: Option<&str>,
    ) {
        let now = SystemTime::now();
        warn!(pod = %self.uid, container = %name, reason, "{message}");
        let key = pull.map_or_else(|| format!("create/{name}"), |i| format!("pull/{i}"));
        let window = self.failures.failed(&key, now, None);
        let (reason, message) = match (pull, window) {
            (Some(image), Some(_)) => {
                let m = format!("Back-off pulling image \"{image}\": {reason}: {message}");
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

    pub(super) async fn start_container(&mut self, name: &str, attempt: u32) {
        let Some((kind, c)) = self.spec(name) else {
            return;
        };
        if self.adopt_running(name, attempt).await {
            return;
        }
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
            // CRI makes the OCI runtime's task in StartContainer: a task refused is a created
            // container that failed to start, as the kubelet reports it.
            if matches!(e, RuntimeError::StartFailure { .. }) {
                self.created_event(name);
            }
            self.not_started(name, attempt, &config, &e, "CreateContainerError");
            return;
        }
        self.created_event(name);
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
        if !self.post_start(name, &c, &config.id) {
            self.start_pending_probes();
        }
    }

    /// An attempt to start that already runs (a worker made again after a panic, a listing
    /// that failed at start) is adopted, never removed as a leftover: an agent fault must
    /// never stop a pod.
    async fn adopt_running(&mut self, name: &str, attempt: u32) -> bool {
        let id = container_id(&self.uid, name, attempt);
        let Ok(record) = self.ctx.runtime.inspect(&id).await else {
            return false;
        };
        if !matches!(record.state, TaskState::Running { .. }) {
            return false;
        }
        warn!(pod = %self.uid, container = %name, attempt, "attempt found running; adopting it");
        let stale = self.adopt(vec![record]);
        debug_assert!(stale.is_empty());
        self.restore_images().await;
        self.dirty = true;
        self.start_pending_probes();
        true
    }

    /// Attempt `attempt` of `name` was made: the previous one's exit becomes lastState.
    pub(super) fn begin_attempt(
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
    pub(super) fn not_started(
        &mut self,
        name: &str,
        attempt: u32,
        config: &ContainerConfig,
        e: &RuntimeError,
        reason: &str,
    ) {
        match (e.start_failure(), e) {
            (Some(message), _) => self.start_error(name, attempt, config, message),
            (None, RuntimeError::Spec { .. }) => {
                self.start_failed(name, e.reason(), e.to_string(), None)
            }
            (None, _) => self.start_failed(name, reason, e.to_string(), None),
        }
    }

    /// The task of a created attempt would not start: as the kubelet's StartError, the
    /// attempt counts (restartCount, back-off) and ends with exit code 128.
    pub(super) fn start_error(
        &mut self,
        name: &str,
        attempt: u32,
        config: &ContainerConfig,
        error: String,
    ) {
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
        // As the kubelet's reason cache: RunContainerError with the runtime's message until
        // the next sync (its relist, RELIST later) finds the container in back-off.
        let o = self.obs_mut(name);
        o.waiting = Some(Waiting {
            reason: "RunContainerError".into(),
            message: error,
        });
        if o.backoff.is_some() {
            self.settle = Some(tokio::time::Instant::now() + RELIST);
        }
    }

    /// Once the relist after a failed start has passed, containers in back-off show
    /// CrashLoopBackOff instead of RunContainerError.
    pub(super) fn settle_start_errors(&mut self) {
        if self.settle.is_none_or(|t| t > tokio::time::Instant::now()) {
            return;
        }
        self.settle = None;
        for (_, o) in self.obs.containers.iter_mut() {
            let start_error =
                o.waiting.as_ref().map(|w| w.reason.as_str()) == Some("RunContainerError");
            if start_error && o.backoff.is_some() && matches!(o.state, Attempt::Exited(_)) {
                o.waiting = None;
            }
        }
    }

    /// Runs the container's postStart hook, if it has one, in a task of its own with no
    /// timeout (as the kubelet's); its end comes back through `on_hook_done`. True if one runs.
    fn post_start(&mut self, name: &str, c: &Container, id: &str) -> bool {
        let Some(handler) = c.lifecycle.as_ref().and_then(|l| l.post_start.clone()) else {
            return false;
        };
        let (ctx, container, pod_ip) = (self.ctx.clone(), c.clone(), self.pod_ip());
        let done = HookDone {
            name: name.to_string(),
            id: id.to_string(),
            result: Ok(()),
        };
        let tx = self.hook_tx.clone();
        let task = tokio::spawn(async move {
            let target = hooks::HookTarget {
                runtime: &*ctx.runtime,
                container: &container,
                container_id: &done.id,
                pod_ip,
            };
            let result = hooks::run(&target, &handler, None).await;
            let _ = tx.unbounded_send(HookDone { result, ..done });
        });
        self.hook = Some(PendingHook {
            name: name.to_string(),
            id: id.to_string(),
            task: task.abort_handle(),
        });
        true
    }

    /// A postStart hook ended: a failure kills its container (the intent is recorded in the
    /// pod directory, so an agent restart meanwhile does not re-adopt it as running).
    pub(super) fn on_hook_done(&mut self, done: HookDone) {
        if self.hook.as_ref().map(|h| &h.id) != Some(&done.id) {
            return;
        }
        self.hook = None;
        self.dirty = true;
        let name = done.name.as_str();
        let o = self.obs.containers.get(name);
        let current = o.filter(|o| o.running() && o.container_id.as_ref() == Some(&done.id));
        if let (Err(e), Some(o)) = (done.result, current) {
            // The kubelet's fixed text: nothing a hook prints (tokens, secrets) reaches events.
            warn!(pod = %self.uid, container = %name, error = %e, "postStart hook failed");
            let attempt = o.attempt;
            if let Err(e) = checkpoint::write_kill(&self.pod_dir(), name, attempt) {
                warn!(pod = %self.uid, container = %name, error = %e, "recording the kill");
            }
            let msg = "PostStartHook failed";
            self.container_event(name, EventType::Warning, "FailedPostStartHook", msg);
            self.obs_mut(name).kill = Some(KillRequest {
                reason: KillReason::PostStartHookFailed,
                grace: None,
            });
        }
        self.start_pending_probes();
    }

    /// Ends the postStart hook of `name`, if one runs (its container is killed or exited).
    pub(super) fn end_hook(&mut self, name: &str) {
        if let Some(hook) = self.hook.take_if(|h| h.name == name) {
            hook.task.abort();
            self.dirty = true;
        }
    }

    pub(super) fn pod_ip(&self) -> Option<std::net::IpAddr> {
        let host_network = self.pod().spec.as_ref().and_then(|s| s.host_network) == Some(true);
        match host_network {
            true => self.ctx.node.ip,
            false => self.sandbox.as_ref().and_then(|s| s.ip),
        }
    }

    /// The desired pod with the addresses the downward API reads (status.podIP, status.hostIP)
    /// filled in from the sandbox and the node, as env and subPathExpr see them upstream.
    pub(super) fn pod_with_ips(&self) -> Pod {
        let mut pod = (*self.desired.pod).clone();
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

    /// The PID namespace a container runs in: an ephemeral container's running target's
    /// (`targetContainerName`, as the kubelet has it join for `kubectl debug --target`), else
    /// the host's for a `hostPID` pod, else the pod's (`shareProcessNamespace`, the sandbox's),
    /// else one of its own.
    async fn pid_namespace(&self, kind: Kind, name: &str, pod: &PidNamespace) -> PidNamespace {
        let spec = self.pod().spec.as_ref();
        let own = match spec.and_then(|s| s.host_pid).unwrap_or(false) {
            true => PidNamespace::Host,
            false => pod.clone(),
        };
        if kind != Kind::Ephemeral {
            return own;
        }
        let ephemeral = spec
            .into_iter()
            .flat_map(|s| s.ephemeral_containers.iter().flatten());
        let Some(target) = ephemeral
            .filter(|e| e.name == name)
            .find_map(|e| e.target_container_name.clone())
        else {
            return own;
        };
        let Some(id) = self.live.get(&target).and_then(|c| c.id.clone()) else {
            return own;
        };
        match self.ctx.runtime.inspect(&id).await.map(|r| r.state) {
            Ok(TaskState::Running { pid, .. }) => {
                PidNamespace::Join(format!("/proc/{pid}/ns/pid").into())
            }
            _ => {
                warn!(pod = %self.uid, container = %name, %target, "target not running; own PID namespace");
                own
            }
        }
    }

    /// Everything create needs; None after recording why it cannot be built.
    pub(super) async fn container_config(
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
        let env_vars =
            match env::container_env(&pod, c, &self.ctx.store, &self.ctx.node.allocatable) {
                Ok(e) => e,
                Err(e) => {
                    self.start_failed(name, "CreateContainerConfigError", e.to_string(), None);
                    return None;
                }
            };
        let image = self.ensure_image(name, c, &image_ref).await?;
        let image_user = image.config.user.as_deref();
        if let Err(msg) = super::super::config::verify_run_as_non_root(&pod, c, image_user) {
            self.start_failed(name, "CreateContainerConfigError", msg, None);
            return None;
        }
        let volumes = self.volumes.clone().unwrap_or_default();
        let (vol_mounts, devices) = match self.ctx.host.container_mounts(&pod, c, &volumes) {
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
        let mut mounts = self.sandbox_mounts(&sandbox, &vol_mounts);
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
            namespaces: NamespacePaths {
                pid: self
                    .pid_namespace(kind, name, &sandbox.namespaces.pid)
                    .await,
                ..sandbox.namespaces.clone()
            },
            resources: resources::container_resources(&pod, c, node_memory()),
            cgroup_parent: format!("/{}", crate::pod::cgroup::pod_path(&self.uid)),
            security: security(c),
            sysctls: sysctls(&pod),
            log_path: files.log,
            tty: c.tty.unwrap_or(false),
            image,
        })
    }

    pub(super) async fn ensure_image(
        &mut self,
        name: &str,
        c: &Container,
        image: &str,
    ) -> Option<ImageInfo> {
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

    pub(super) fn labels(
        &self,
        kind: Kind,
        c: &Container,
        attempt: u32,
    ) -> HashMap<String, String> {
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

    /// The sandbox's files, hostNetwork pods included (their /etc/hosts is the kubelet's
    /// managed copy of the node's), unless a volume is mounted there.
    pub(super) fn sandbox_mounts(&self, sandbox: &Sandbox, volume_mounts: &[Mount]) -> Vec<Mount> {
        let files = [
            ("/etc/hosts", &sandbox.hosts_file),
            ("/etc/resolv.conf", &sandbox.resolv_file),
            ("/etc/hostname", &sandbox.hostname_file),
        ];
        files
            .into_iter()
            .filter(|(dest, _)| !volume_mounts.iter().any(|m| m.destination == *dest))
            .map(|(dest, src)| bind(dest, src, false))
            .collect()
    }
}

/// The node's memory for OOM scores, read once; 1 GiB if /proc cannot tell.
fn node_memory() -> u64 {
    static MEM: OnceLock<u64> = OnceLock::new();
    *MEM.get_or_init(|| match crate::host::memory_total() {
        0 => 1 << 30,
        bytes => bytes,
    })
}

struct Files {
    message: PathBuf,
    log: PathBuf,
}

/// A postStart hook under way.
pub(super) struct PendingHook {
    pub(super) name: String,
    /// The attempt it runs for.
    id: String,
    pub(super) task: AbortHandle,
}

/// A postStart hook that ended.
pub(super) struct HookDone {
    name: String,
    id: String,
    result: Result<(), hooks::HookError>,
}
