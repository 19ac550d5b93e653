//! Runs the real `nodelet` binary in standalone mode for agent-level tests: its own manifest
//! folder, root dir, run dir, log dir, containerd namespace and read-only port, so tests can
//! run side by side on one containerd. Dropping an `Agent` kills the process and removes what
//! it created (containers, sandboxes, mounts), so a failed test leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Pod};
use serde::Deserialize;

use crate::containerd_support::{ctr_at, OwnContainerd};

pub use crate::runtime_support::ctr;

/// The test images scripts/setup pushes.
pub const BUSYBOX: &str = "127.0.0.1:5000/nodelet/busybox:latest";
pub const HTTPD: &str = "127.0.0.1:5000/nodelet/httpd:latest";

#[derive(Deserialize)]
struct List<T> {
    items: Vec<T>,
}

pub struct Agent {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The secure (HTTPS) port.
    pub secure_port: u16,
    /// Flags about the ports, replaceable before `spawn`: by default both ports on loopback,
    /// a client CA made for the test and AlwaysAllow, so `https` is allowed.
    pub port_args: Vec<String>,
    child: Option<Child>,
    /// The socket of the test's own containerd (None: the machine's).
    runtime_socket: Option<PathBuf>,
}

/// The nodelet binary built by `cargo build` (scripts/test builds all targets first).
pub fn nodelet_binary() -> PathBuf {
    built_binary("nodelet")
}

/// A workspace binary built by `cargo build --all-targets` (scripts/test does that first).
pub fn built_binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --all-targets` first (scripts/test does)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Agent {
    /// Starts a fresh agent; `name` makes its containerd namespace unique.
    pub fn start(name: &str) -> Agent {
        let mut agent = Agent::unstarted(name);
        agent.spawn();
        agent
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    pub fn root_dir(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    pub fn namespace(&self) -> String {
        format!("nodelet-test-{}", self.name)
    }

    /// (Re)starts the agent process on the same state, as systemd would after a crash.
    pub fn spawn(&mut self) {
        self.spawn_without_waiting();
        self.wait_until(
            "the agent serves /healthz",
            Duration::from_secs(60),
            Agent::healthy,
        );
    }

    /// SIGKILL: the agent dies without any clean-up, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: the agent's orderly shutdown (pods must keep running).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// GET on the agent's local socket (pods, events, logs, metrics).
    fn get(&self, path: &str) -> Option<String> {
        self.local_get(path)
    }

    /// The agent's root-only unix socket (`<run dir>/nodelet.sock`).
    pub fn local_socket(&self) -> PathBuf {
        self.dir.path().join("run/nodelet.sock")
    }

    /// GET on the local socket, which serves logs and events to root.
    pub fn local_get(&self, path: &str) -> Option<String> {
        let socket = self.local_socket();
        let url = format!("http://localhost{path}");
        curl_ok(&[
            "-fsS",
            "--max-time",
            "5",
            "--unix-socket",
            socket.to_str()?,
            &url,
        ])
    }

    /// The process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Writes one manifest file (atomically, so the agent never reads half a file).
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.manifests().join(file)).unwrap();
    }

    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.manifests().join(file)).unwrap();
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.get("/pods")
            .and_then(|body| serde_json::from_str::<List<Pod>>(&body).ok())
            .map(|l| l.items)
            .unwrap_or_default()
    }

    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.pods()
            .into_iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
    }

    pub fn events(&self) -> Vec<Event> {
        self.get("/events")
            .and_then(|body| serde_json::from_str::<List<Event>>(&body).ok())
            .map(|l| l.items)
            .unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").unwrap_or_default()
    }

    /// Polls `check` until it holds; panics with the agent's log tail after `timeout`.
    pub fn wait_until(&self, what: &str, timeout: Duration, check: impl Fn(&Agent) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if check(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let log = self.agent_log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let pods: Vec<String> = self
            .pods()
            .iter()
            .map(|p| serde_json::to_string(&p.status).unwrap_or_default())
            .collect();
        panic!(
            "timed out after {timeout:?} waiting for {what}\npods: {pods:#?}\nagent log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    /// Waits for the pod to report `phase`, returning it.
    pub fn wait_phase(&self, name: &str, phase: &str, timeout: Duration) -> Pod {
        self.wait_until(&format!("pod {name} phase {phase}"), timeout, |a| {
            phase_of(a.pod(name).as_ref()) == Some(phase)
        });
        self.pod(name).unwrap()
    }

    /// Containers in the agent's containerd namespace (`ctr containers list -q`).
    pub fn containerd_containers(&self) -> Vec<String> {
        self.ctr(&["containers", "list", "-q"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The pid of a container's task (`ctr tasks list`), if running.
    pub fn task_pid(&self, container_id: &str) -> Option<u32> {
        self.ctr(&["tasks", "list"])
            .lines()
            .filter(|l| l.starts_with(container_id))
            .find(|l| l.contains("RUNNING"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
    }
}

fn curl_ok(args: &[&str]) -> Option<String> {
    let out = Command::new("curl").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn phase_of(pod: Option<&Pod>) -> Option<&str> {
    pod?.status.as_ref()?.phase.as_deref()
}

/// The containerd id of a container from its status (`containerd://<id>`).
pub fn container_id(pod: &Pod, container: &str) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let s = statuses.iter().find(|s| s.name == container)?;
    s.container_id
        .as_deref()
        .map(|id| id.trim_start_matches("containerd://").to_string())
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        // Remove whatever the agent left: tasks, containers, sandboxes (their IPs), cgroups,
        // mounts under the temp dir, and the namespace with its images.
        crate::leftovers::remove(&crate::leftovers::AgentDirs {
            dir: self.dir.path().to_path_buf(),
            root_dir: self.root_dir(),
            run_dir: self.dir.path().join("run"),
            containerd_namespace: self.namespace(),
            containerd: self.runtime_socket.clone(),
        });
    }
}

/// Unmounts every mount point at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", &p]).status();
    }
}

impl Agent {
    /// An agent with its dirs made but no process yet: prepare the dirs (e.g. mount a small
    /// tmpfs on `root_dir()`), then call `spawn` or `spawn_without_waiting`.
    pub fn unstarted(name: &str) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix(&format!("nodelet-agent-{name}-"))
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        let pki = ClientPki::make(&dir.path().join("client-pki"), "test-admin");
        let (port, secure_port) = (free_port(), free_port());
        let port_args = vec![
            "--read-only-port".into(),
            port.to_string(),
            "--port".into(),
            secure_port.to_string(),
            "--address".into(),
            "127.0.0.1".into(),
            "--client-ca-file".into(),
            pki.ca.to_string_lossy().into_owned(),
            "--authorization-mode".into(),
            "AlwaysAllow".into(),
        ];
        Agent {
            name: name.to_string(),
            dir,
            port,
            secure_port,
            port_args,
            child: None,
            runtime_socket: None,
        }
    }

    /// An agent (not started yet) on the test's own containerd.
    pub fn unstarted_on(name: &str, containerd: &OwnContainerd) -> Agent {
        let mut agent = Agent::unstarted(name);
        agent.runtime_socket = Some(containerd.socket());
        agent
    }

    /// `ctr` in the agent's namespace of the containerd it uses.
    pub fn ctr(&self, args: &[&str]) -> String {
        match &self.runtime_socket {
            Some(socket) => ctr_at(socket, &self.namespace(), args),
            None => ctr(&self.namespace(), args),
        }
    }

    /// Starts the process like `spawn` but returns at once, without waiting for /healthz (the
    /// agent only serves once containerd answered).
    pub fn spawn_without_waiting(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let child = Command::new(nodelet_binary())
            .arg("--pod-manifest-path")
            .arg(self.manifests())
            .arg("--root-dir")
            .arg(self.root_dir())
            .arg("--run-dir")
            .arg(self.dir.path().join("run"))
            .arg("--pod-logs-dir")
            .arg(self.log_dir())
            .args(["--containerd-namespace", &self.namespace()])
            .args(self.runtime_socket.iter().flat_map(|s| {
                [
                    "--container-runtime-endpoint".to_string(),
                    format!("unix://{}", s.display()),
                ]
            }))
            .args(["--node-ip", "127.0.0.1", "-v", "1"])
            .args(&self.port_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start nodelet");
        self.child = Some(child);
    }

    /// Whether the agent process is still running (false once it exited or was killed).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Whether /healthz answers (on the local socket, which every agent serves).
    pub fn healthy(&self) -> bool {
        self.get("/healthz").is_some()
    }
}

impl Agent {
    /// curl on the secure port, trusting the agent's self-signed certificate: (exit code,
    /// HTTP status, body). `--max-time` bounds a followed stream.
    /// The client is the test's `test-admin` certificate.
    pub fn https(&self, path: &str, max_time: u64) -> (i32, u16, String) {
        let pki = self.dir.path().join("client-pki");
        self.https_as(
            path,
            max_time,
            Some((&pki.join("client.crt"), &pki.join("client.key"))),
        )
    }

    /// As `https`, presenting the client certificate and key given (none when None).
    pub fn https_as(
        &self,
        path: &str,
        max_time: u64,
        client: Option<(&Path, &Path)>,
    ) -> (i32, u16, String) {
        let url = format!("https://127.0.0.1:{}{}", self.secure_port, path);
        let cert = self.root_dir().join("pki/nodelet.crt");
        let mut curl = Command::new("curl");
        curl.args(["-sS", "-N", "--max-time", &max_time.to_string()])
            .arg("--cacert")
            .arg(cert);
        if let Some((cert, key)) = client {
            curl.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let out = curl
            .args(["-w", "\n%{http_code}", &url])
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code.trim().parse().unwrap_or(0);
        (out.status.code().unwrap_or(-1), code, body.to_string())
    }

    /// `GET /containerLogs/<ns>/<pod>/<container>?<query>`, None on an error status.
    pub fn container_logs(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        query: &str,
    ) -> Option<String> {
        self.get(&format!("/containerLogs/{ns}/{pod}/{container}?{query}"))
    }
}

/// A client CA and certificates it signed, made with openssl in `dir`: `ca.crt`, and
/// `client.crt`/`client.key` for the user given.
pub struct ClientPki {
    pub ca: PathBuf,
    dir: PathBuf,
}

impl ClientPki {
    pub fn make(dir: &Path, user: &str) -> ClientPki {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("client.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        let pki = ClientPki {
            ca: dir.join("ca.crt"),
            dir: dir.to_path_buf(),
        };
        pki.request(&[
            "-x509",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=nodelet-test-ca",
        ]);
        pki.issue("client", user, None);
        pki
    }

    /// Issues `<name>.crt`/`<name>.key` for `user` (CN) in `group` (O); returns their paths.
    pub fn issue(&self, name: &str, user: &str, group: Option<&str>) -> (PathBuf, PathBuf) {
        let subject = match group {
            Some(g) => format!("/O={g}/CN={user}"),
            None => format!("/CN={user}"),
        };
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        self.request(&["-keyout", &key, "-out", &csr, "-subj", &subject]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            "client.ext",
        ]);
        (self.dir.join(crt), self.dir.join(key))
    }

    /// `openssl req` making a new P-256 key, with `args`.
    fn request(&self, args: &[&str]) {
        let new_key = [
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        self.openssl(&[&new_key[..], args].concat());
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    }
}

/// A nodelet process's open fds, its threads outside tokio's pool (whose idle threads linger
/// while the agent's own periodic blocking work keeps them warm), and its alive async tasks
/// as its `metrics` text reports them: what a session must not leave behind.
pub fn fds_threads_and_tasks(pid: u32, metrics: &str) -> (usize, usize, usize) {
    let entries = |what: &str| std::fs::read_dir(format!("/proc/{pid}/{what}")).unwrap();
    let threads = entries("task")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .filter(|name| name.trim() != "tokio-rt-worker")
        .count();
    let tasks = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nodelet_runtime_tasks "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the agent reports its tasks");
    (entries("fd").count(), threads, tasks)
}
