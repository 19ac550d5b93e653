//! Container lifecycle over containerd: create (snapshot, container record, task with stdio
//! going to the log driver), start, signal, remove, inspect and list.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::container::Runtime as ContainerRuntime;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteTaskRequest, GetContainerRequest, GetRequest, KillRequest, ListContainersRequest,
    ListTasksRequest, StartRequest, UpdateContainerRequest, WaitRequest,
};
use containerd_client::types::v1::{Process, Status};
use containerd_client::types::Mount as CtrMount;

use super::spec::{bounding_set, build_spec, nofile_limit, SpecInputs, NOFILE_LIMIT};
use super::user::{device_node, host_devices, read_rootfs_users, resolve_user};
use super::{
    grpc, labels, leased, task_error, to_system_time, ContainerConfig, ContainerRecord,
    LogRotation, Result, Runtime, RuntimeError, TaskStage, TaskState, RUNC_RUNTIME, SNAPSHOTTER,
};

/// Type URL containerd registers for the OCI runtime spec.
pub(super) const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// How long `remove` waits for a killed task to exit.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// Percent-encodes everything but unreserved characters and `/` (for URI paths and values).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The stdio URI that makes the shim start `<driver> log-driver <log_path>` (and
/// `max-size <n> max-files <n>` with rotation) with the container's stdout on fd 3 and stderr
/// on fd 4. containerd passes each query key and its value as two arguments, in the order of
/// a Go map (none); the driver reads them as pairs.
pub fn log_uri(binary: &Path, log_path: &Path, rotation: Option<&LogRotation>) -> String {
    let mut uri = format!(
        "binary://{}?{}={}",
        percent_encode(&binary.to_string_lossy()),
        nodelet_log_driver::PATH_KEY,
        percent_encode(&log_path.to_string_lossy())
    );
    if let Some(r) = rotation {
        uri.push_str(&format!(
            "&{}={}&{}={}",
            nodelet_log_driver::MAX_SIZE_KEY,
            r.max_size,
            nodelet_log_driver::MAX_FILES_KEY,
            r.max_files
        ));
    }
    uri
}

/// The `oom_kill` counter from a cgroup's memory.events (v2) or memory.oom_control (v1).
pub fn parse_oom_kills(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Maps containerd's view of a task to TaskState.
pub fn task_state(
    process: Option<&Process>,
    started_at: Option<SystemTime>,
    created_at: Option<SystemTime>,
    oom_killed: impl FnOnce() -> bool,
) -> TaskState {
    let Some(p) = process else {
        return TaskState::NoTask;
    };
    match Status::try_from(p.status).unwrap_or(Status::Unknown) {
        Status::Created => TaskState::Created,
        Status::Running | Status::Paused | Status::Pausing => TaskState::Running {
            pid: p.pid,
            started_at: started_at.or(created_at).unwrap_or(SystemTime::UNIX_EPOCH),
        },
        Status::Stopped => TaskState::Exited {
            exit_code: p.exit_status as i32,
            started_at,
            finished_at: to_system_time(p.exited_at).unwrap_or_else(SystemTime::now),
            oom_killed: oom_killed(),
        },
        // The shim is gone: the task will never run again.
        Status::Unknown => TaskState::Exited {
            exit_code: if p.exit_status == 0 {
                255
            } else {
                p.exit_status as i32
            },
            started_at,
            finished_at: to_system_time(p.exited_at).unwrap_or_else(SystemTime::now),
            oom_killed: false,
        },
    }
}

fn not_found_ok(res: std::result::Result<(), tonic::Status>, op: &'static str) -> Result<()> {
    match res {
        Ok(()) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(s) => Err(RuntimeError::Grpc { op, status: s }),
    }
}

/// The cgroupsPath recorded in a container's spec.
fn cgroups_path(container: &Container) -> Option<String> {
    let any = container.spec.as_ref()?;
    let v: serde_json::Value = serde_json::from_slice(&any.value).ok()?;
    v["linux"]["cgroupsPath"].as_str().map(String::from)
}

impl Runtime {
    /// Creates the container, its rootfs snapshot and its (not yet started) task.
    pub async fn create(&self, config: &ContainerConfig) -> Result<()> {
        // An existing container is refused before anything is touched: the cleanup of a
        // failed create below must never remove someone else's container.
        match self
            .containers()
            .get(GetContainerRequest {
                id: config.id.clone(),
            })
            .await
        {
            Ok(_) => {
                return Err(RuntimeError::Grpc {
                    op: "containers.Create",
                    status: tonic::Status::already_exists(format!(
                        "container {} already exists",
                        config.id
                    )),
                })
            }
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(grpc("containers.Get")(s)),
        }
        let lease = self.create_lease("create").await?;
        let res = self.create_leased(config, &lease).await;
        if res.is_err() {
            if let Err(e) = self.remove(&config.id).await {
                tracing::warn!(container_id = config.id, error = %e, "cleaning up failed create");
            }
        }
        self.delete_lease(&lease).await;
        res
    }

    async fn create_leased(&self, config: &ContainerConfig, lease: &str) -> Result<()> {
        let id = &config.id;
        let spec_err = |detail: String| RuntimeError::Spec {
            id: id.clone(),
            detail,
        };
        let prepared = self
            .snapshots()
            .prepare(leased(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: id.clone(),
                    parent: config.image.config.chain_id.clone(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await;
        let mounts: Vec<CtrMount> = match prepared {
            Ok(r) => r.into_inner().mounts,
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                self.snapshots()
                    .mounts(MountsRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: id.clone(),
                    })
                    .await
                    .map_err(grpc("snapshots.Mounts"))?
                    .into_inner()
                    .mounts
            }
            Err(s) => return Err(grpc("snapshots.Prepare")(s)),
        };

        let view = self
            .inner
            .config
            .root_dir
            .join("tmp")
            .join(format!("rootfs-{id}"));
        let view_mounts = mounts.clone();
        let db = tokio::task::spawn_blocking(move || read_rootfs_users(&view_mounts, &view))
            .await
            .map_err(|e| spec_err(format!("user lookup task: {e}")))?
            .map_err(spec_err)?;
        let user = resolve_user(config.image.config.user.as_deref(), &config.user, &db)
            .map_err(spec_err)?;
        let devices = config
            .devices
            .iter()
            .map(|d| device_node(&d.host_path, &d.container_path))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(spec_err)?;
        let host = if config.security.privileged {
            tokio::task::spawn_blocking(host_devices)
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let spec = build_spec(
            config,
            &SpecInputs {
                user,
                devices,
                host_devices: host,
                cgroup_v2: self.inner.cgroup_v2,
                nofile: std::fs::read_to_string("/proc/self/limits")
                    .map_or(NOFILE_LIMIT, |l| nofile_limit(&l)),
                bounding: std::fs::read_to_string("/proc/self/status")
                    .ok()
                    .and_then(|s| bounding_set(&s)),
            },
        )
        .map_err(|e| spec_err(e.to_string()))?;
        let spec_json = serde_json::to_vec(&spec).map_err(|e| spec_err(e.to_string()))?;

        self.containers()
            .create(leased(
                CreateContainerRequest {
                    container: Some(Container {
                        id: id.clone(),
                        labels: config.labels.clone(),
                        image: config.image.reference.clone(),
                        runtime: Some(ContainerRuntime {
                            name: RUNC_RUNTIME.into(),
                            options: None,
                        }),
                        spec: Some(prost_types::Any {
                            type_url: SPEC_TYPE_URL.into(),
                            value: spec_json,
                        }),
                        snapshotter: SNAPSHOTTER.into(),
                        snapshot_key: id.clone(),
                        created_at: None,
                        updated_at: None,
                        extensions: HashMap::new(),
                        sandbox: String::new(),
                    }),
                },
                lease,
            ))
            .await
            .map_err(grpc("containers.Create"))?;

        if let Some(dir) = config.log_path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let stdio = log_uri(
            &self.inner.config.log_driver,
            &config.log_path,
            self.inner.config.log_rotation.as_ref(),
        );
        // A terminal gets a stdin FIFO for attach (see runtime::attach).
        let stdin = match config.tty {
            true => self
                .make_stdin_fifo(id)
                .await?
                .to_string_lossy()
                .into_owned(),
            false => String::new(),
        };
        self.tasks()
            .create(CreateTaskRequest {
                container_id: id.clone(),
                rootfs: mounts,
                stdin,
                stdout: stdio.clone(),
                stderr: stdio,
                terminal: config.tty,
                checkpoint: None,
                options: None,
                runtime_path: String::new(),
            })
            .await
            .map_err(|s| task_error(TaskStage::Create, s))?;
        tracing::debug!(container_id = id, "created container");
        Ok(())
    }

    /// Starts the created task; records STARTED_AT in the labels. Returns the pid.
    pub async fn start(&self, id: &str) -> Result<u32> {
        let pid = self
            .tasks()
            .start(StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => RuntimeError::NotFound { id: id.to_string() },
                _ => task_error(TaskStage::Start, s),
            })?
            .into_inner()
            .pid;
        let started = jiff::Timestamp::now().to_string();
        let key = labels::STARTED_AT.to_string();
        self.containers()
            .update(UpdateContainerRequest {
                container: Some(Container {
                    id: id.to_string(),
                    labels: HashMap::from([(key.clone(), started)]),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![format!("labels.{key}")],
                }),
            })
            .await
            .map_err(grpc("containers.Update"))?;
        Ok(pid)
    }

    /// Sends a signal to the task's init process (no error when it already exited).
    pub async fn signal(&self, id: &str, signal: i32) -> Result<()> {
        let res = self
            .tasks()
            .kill(KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal: signal as u32,
                all: false,
            })
            .await
            .map(|_| ());
        match res {
            Ok(()) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => {
                // Killing a process that just exited is not an error either.
                match self.task_process(id).await? {
                    Some(p) if p.status == Status::Stopped as i32 => Ok(()),
                    None => Ok(()),
                    _ => Err(grpc("tasks.Kill")(s)),
                }
            }
        }
    }

    /// Kills any task, then deletes task, container and snapshot. Idempotent.
    pub async fn remove(&self, id: &str) -> Result<()> {
        if let Some(p) = self.task_process(id).await? {
            if p.status != Status::Stopped as i32 {
                let killed = self
                    .tasks()
                    .kill(KillRequest {
                        container_id: id.to_string(),
                        exec_id: String::new(),
                        signal: libc::SIGKILL as u32,
                        all: true,
                    })
                    .await;
                if let Err(s) = killed {
                    if s.code() != tonic::Code::NotFound {
                        tracing::warn!(container_id = id, status = %s, "SIGKILL failed");
                    }
                }
                let mut tasks = self.tasks();
                let wait = tasks.wait(WaitRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                });
                match tokio::time::timeout(KILL_WAIT, wait).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(s)) if s.code() == tonic::Code::NotFound => {}
                    Ok(Err(s)) => return Err(grpc("tasks.Wait")(s)),
                    Err(_) => tracing::warn!(container_id = id, "task did not exit after SIGKILL"),
                }
            }
        }
        // Also when tasks.Get found nothing: a create cut short by a containerd restart leaves
        // a shim without a container behind (tasks.Get says not found, tasks.Create says
        // "already exists"), and only tasks.Delete removes it.
        let deleted = self
            .tasks()
            .delete(DeleteTaskRequest {
                container_id: id.to_string(),
            })
            .await
            .map(|_| ());
        not_found_ok(deleted, "tasks.Delete")?;
        self.remove_stdin_fifo(id).await;
        let deleted = self
            .containers()
            .delete(DeleteContainerRequest { id: id.to_string() })
            .await
            .map(|_| ());
        not_found_ok(deleted, "containers.Delete")?;
        let removed = self
            .snapshots()
            .remove(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: id.to_string(),
            })
            .await
            .map(|_| ());
        not_found_ok(removed, "snapshots.Remove")
    }

    /// The containerd record of container `id` (NotFound when there is none).
    pub(super) async fn container(&self, id: &str) -> Result<Container> {
        self.containers()
            .get(GetContainerRequest { id: id.to_string() })
            .await
            .map_err(|s| self.not_found_or(id, "containers.Get", s))?
            .into_inner()
            .container
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_string() })
    }

    /// The container and the state of its task.
    pub async fn inspect(&self, id: &str) -> Result<ContainerRecord> {
        let container = self.container(id).await?;
        let process = self.task_process(id).await?;
        Ok(self.record(container, process.as_ref()))
    }

    /// Every container in the agent's namespace.
    pub async fn list(&self) -> Result<Vec<ContainerRecord>> {
        let containers = self
            .containers()
            .list(ListContainersRequest { filters: vec![] })
            .await
            .map_err(grpc("containers.List"))?
            .into_inner()
            .containers;
        let tasks: HashMap<String, Process> = self
            .tasks()
            .list(ListTasksRequest {
                filter: String::new(),
            })
            .await
            .map_err(grpc("tasks.List"))?
            .into_inner()
            .tasks
            .into_iter()
            .map(|p| (p.id.clone(), p))
            .collect();
        Ok(containers
            .into_iter()
            .map(|c| {
                let p = tasks.get(&c.id);
                self.record(c, p)
            })
            .collect())
    }

    fn record(&self, container: Container, process: Option<&Process>) -> ContainerRecord {
        let started_at = container
            .labels
            .get(labels::STARTED_AT)
            .and_then(|s| s.parse::<jiff::Timestamp>().ok())
            .map(SystemTime::from);
        let created_at = to_system_time(container.created_at);
        let cgroup = cgroups_path(&container);
        let state = task_state(process, started_at, created_at, || {
            cgroup.is_some_and(|path| self.oom_killed(&path))
        });
        ContainerRecord {
            id: container.id,
            labels: container.labels,
            image: container.image,
            created_at,
            state,
        }
    }

    /// Whether the container's cgroup counted an OOM kill (readable until the task is deleted).
    fn oom_killed(&self, cgroups_path: &str) -> bool {
        let rel = cgroups_path.trim_start_matches('/');
        let file = if self.inner.cgroup_v2 {
            Path::new("/sys/fs/cgroup").join(rel).join("memory.events")
        } else {
            Path::new("/sys/fs/cgroup/memory")
                .join(rel)
                .join("memory.oom_control")
        };
        std::fs::read_to_string(file).is_ok_and(|t| parse_oom_kills(&t) > 0)
    }

    /// The init process of the container's task; None when there is no task.
    pub(super) async fn task_process(&self, id: &str) -> Result<Option<Process>> {
        match self
            .tasks()
            .get(GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            })
            .await
        {
            Ok(r) => Ok(r.into_inner().process),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(grpc("tasks.Get")(s)),
        }
    }

    pub(super) fn not_found_or(
        &self,
        id: &str,
        op: &'static str,
        status: tonic::Status,
    ) -> RuntimeError {
        if status.code() == tonic::Code::NotFound {
            RuntimeError::NotFound { id: id.to_string() }
        } else {
            RuntimeError::Grpc { op, status }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_uri_names_the_log_and_rotation_as_query_keys() {
        let driver = Path::new("/var/lib/nodelet/bin/nodelet-log-driver-1f");
        let log = Path::new("/var/log/pods/ns_p_u+1/c/0.log");
        assert_eq!(
            log_uri(driver, log, None),
            "binary:///var/lib/nodelet/bin/nodelet-log-driver-1f\
             ?log-driver=/var/log/pods/ns_p_u%2B1/c/0.log"
        );
        let rotation = LogRotation {
            max_size: 10 << 20,
            max_files: 5,
        };
        assert_eq!(
            log_uri(driver, log, Some(&rotation)),
            "binary:///var/lib/nodelet/bin/nodelet-log-driver-1f\
             ?log-driver=/var/log/pods/ns_p_u%2B1/c/0.log&max-size=10485760&max-files=5"
        );
        assert_eq!(percent_encode("a b&c=d"), "a%20b%26c%3Dd");
    }

    #[test]
    fn oom_counters() {
        assert_eq!(
            parse_oom_kills("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"),
            1
        );
        assert_eq!(
            parse_oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"),
            2
        );
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), 0);
    }

    #[test]
    fn task_states() {
        let t = |s: Status, code: u32| Process {
            status: s as i32,
            pid: 42,
            exit_status: code,
            exited_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        assert_eq!(task_state(None, None, None, || false), TaskState::NoTask);
        assert_eq!(
            task_state(Some(&t(Status::Created, 0)), None, None, || false),
            TaskState::Created
        );
        assert_eq!(
            task_state(Some(&t(Status::Running, 0)), Some(started), None, || false),
            TaskState::Running {
                pid: 42,
                started_at: started
            }
        );
        assert_eq!(
            task_state(Some(&t(Status::Stopped, 137)), Some(started), None, || true),
            TaskState::Exited {
                exit_code: 137,
                started_at: Some(started),
                finished_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                oom_killed: true
            }
        );
    }
}
