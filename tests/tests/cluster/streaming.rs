//! Streaming into pods with the upstream `kubectl` through the real API server: exec (stdout,
//! stderr, stdin to EOF, exit codes, a TTY and its resize), `run -it --rm` (attach), port-forward
//! carrying HTTP, `cp` both ways, `debug --target` and `debug node/…`, and what is left after
//! many sessions.
//!
//! Every test runs twice, once per path the API server may take to the node ([`Path`]): the agent
//! declares `ExtendWebSocketsToKubelet` in `node.status.declaredFeatures` (the API server then
//! passes kubectl's WebSocket straight through), or, with the gate off, declares nothing (the API
//! server translates to SPDY). Each test ends by checking in the agent's log that its sessions
//! came the way the path says. A TTY is a pseudo-terminal the test opens ([`Terminal`]), since
//! kubectl only asks for one when its stdin is a terminal.

use super::*;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

const HTTPD: &str = nodelet_tests::agent_support::HTTPD;
/// Bounds every kubectl run: catches a hang, never a slow run.
const HANG: Duration = Duration::from_secs(120);

/// The tolerations of the tests' pods: the machine's disk is shared with other work, and these
/// tests are about streaming, not about scheduling under disk pressure.
fn tolerations() -> serde_json::Value {
    serde_json::json!([{
        "key": "node.kubernetes.io/disk-pressure",
        "operator": "Exists",
        "effect": "NoSchedule",
    }])
}

/// How the API server reaches the node for exec, attach and port-forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// The node declares nothing: the API server speaks SPDY to it.
    Spdy,
    /// The node declares `ExtendWebSocketsToKubelet`: the client's WebSocket goes through.
    WebSocket,
}

impl Path {
    fn agent_flags(self) -> Vec<String> {
        match self {
            Path::Spdy => vec!["--feature-gates=ExtendWebSocketsToKubelet=false".into()],
            Path::WebSocket => vec![],
        }
    }

    fn declared(self) -> Vec<String> {
        match self {
            Path::Spdy => vec![],
            Path::WebSocket => vec!["ExtendWebSocketsToKubelet".into()],
        }
    }

    /// The agent logs each session with its transport.
    fn transport(self) -> &'static str {
        match self {
            Path::Spdy => "transport=\"spdy\"",
            Path::WebSocket => "transport=\"websocket\"",
        }
    }
}

/// Each body once per path: `name::over_spdy` and `name::over_websocket`.
macro_rules! over_both_paths {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::Path;

            #[tokio::test]
            #[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
            async fn over_spdy() {
                super::$name(Path::Spdy).await
            }

            #[tokio::test]
            #[ignore = "cluster tier: needs KUBECONFIG, NODELET_NODE_KUBECONFIG, NODELET_NODE_NAME"]
            async fn over_websocket() {
                super::$name(Path::WebSocket).await
            }
        }
    )*};
}

over_both_paths!(
    exec,
    attach,
    port_forward,
    cp,
    debug,
    sessions_leave_nothing_behind
);

/// A test's agent and namespace (the namespace goes first, while the agent still runs).
struct Setup {
    ns: TestNamespace,
    agent: Agent,
    path: Path,
    node: String,
}

impl Setup {
    /// The agent on the path, its Node Ready and declaring what the path needs; `None` without
    /// a cluster.
    async fn start(test: &str, path: Path) -> Option<Setup> {
        let c = cluster(&format!("{test} over {path:?}")).await?;
        let agent = Agent::start_as(
            &c.node,
            &c.node_kubeconfig,
            CONTAINERD_NS,
            &path.agent_flags(),
        );
        wait_node_ready(&c).await;
        let nodes: Api<Node> = Api::all(c.admin.clone());
        let d = Deadline::new(format!("declaredFeatures {:?}", path.declared()), 60);
        loop {
            let node = nodes.get(&c.node).await.expect("get node");
            let declared = node.status.and_then(|s| s.declared_features);
            if declared.unwrap_or_default() == path.declared() {
                break;
            }
            d.tick().await;
        }
        let ns = TestNamespace::create(&c, test).await;
        Some(Setup {
            ns,
            agent,
            path,
            node: c.node.clone(),
        })
    }

    /// `kubectl -n <ns> ARGS…`, not yet run.
    fn kubectl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.args(["-n", &self.ns.name]).args(args);
        cmd
    }

    /// A pod `name` on this node, its container `app` running `image` (with `command`, and
    /// then the harness's readiness probe, else the image's own command), Ready.
    async fn pod(&self, name: &str, image: &str, command: Option<&[&str]>) -> Pod {
        let mut p = pod(name, &self.node, 1);
        let container = &mut p.spec.as_mut().unwrap().containers[0];
        container.image = Some(image.into());
        container.command = command.map(|c| c.iter().map(|s| s.to_string()).collect());
        if command.is_none() {
            container.readiness_probe = None;
        }
        let spec = p.spec.as_mut().unwrap();
        spec.tolerations = Some(serde_json::from_value(tolerations()).unwrap());
        let pods = self.ns.pods();
        pods.create(&PostParams::default(), &p)
            .await
            .expect("create pod");
        let d = Deadline::new(format!("pod {name} Ready"), 180);
        loop {
            if let Some(p) = pod_ready(&pods, name).await {
                return p;
            }
            d.tick().await;
        }
    }

    /// Checks that the agent served this test's sessions on its path, and only on it.
    fn assert_sessions_took_the_path(&self) {
        let log = std::fs::read_to_string(self.agent.log()).unwrap_or_default();
        let sessions: Vec<&str> = log.lines().filter(|l| l.contains("transport=")).collect();
        assert!(
            !sessions.is_empty(),
            "no streaming session reached the agent"
        );
        let astray: Vec<_> = sessions
            .iter()
            .filter(|l| !l.contains(self.path.transport()))
            .collect();
        assert!(
            astray.is_empty(),
            "sessions came another way than {:?}: {astray:#?}",
            self.path
        );
    }
}

/// Runs `cmd` with `stdin` written to it (then closed) and waits, at most [`HANG`].
fn run(mut cmd: Command, stdin: &[u8]) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kubectl (PATH from /opt/nodelet-cluster/env)");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = rx.recv_timeout(HANG).unwrap_or_else(|_| {
        // SAFETY: `pid` is the child started above, not yet reaped (its wait never returned).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("{cmd:?} did not end within {HANG:?}")
    });
    let _ = writer.join();
    output.expect("kubectl output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A process on a pseudo-terminal of its own (its controlling terminal, so that it is sent
/// SIGWINCH when the terminal is resized), its output collected as it comes.
struct Terminal {
    master: std::fs::File,
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
}

fn window(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl Terminal {
    fn spawn(mut cmd: Command, rows: u16, cols: u16) -> Terminal {
        use std::os::unix::process::CommandExt;
        let (mut master, mut slave) = (-1, -1);
        let size = window(rows, cols);
        // SAFETY: openpty writes two fds into the locals; no name buffer, a valid winsize.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just opened and are owned here alone.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let stdio = || Stdio::from(slave.try_clone().expect("dup the pty"));
        cmd.stdin(stdio()).stdout(stdio()).stderr(stdio());
        // SAFETY: between fork and exec, only async-signal-safe calls: a new session, and the
        // pty (its stdin) as its controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start kubectl on a terminal");
        drop(slave);
        let master = std::fs::File::from(master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().expect("dup the master");
        let collected = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the terminal's last other end is closed.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                collected.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            master,
            child,
            output,
        }
    }

    fn output(&self) -> String {
        text(&self.output.lock().unwrap())
    }

    fn type_line(&mut self, line: &str) {
        self.master
            .write_all(format!("{line}\r").as_bytes())
            .expect("write to the terminal");
    }

    /// Waits until the output holds `needle`.
    fn wait_for(&self, needle: &str) {
        let until = std::time::Instant::now() + HANG;
        while !self.output().contains(needle) {
            assert!(
                std::time::Instant::now() < until,
                "the terminal never showed {needle:?}; it shows:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        let size = window(rows, cols);
        // SAFETY: a valid fd of ours and a valid winsize for TIOCSWINSZ.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    /// Waits for the process to exit, at most [`HANG`].
    fn wait(&mut self) -> std::process::ExitStatus {
        let until = std::time::Instant::now() + HANG;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < until,
                "the terminal's process did not exit; it shows:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// exec: stdout and stderr apart, stdin to its EOF, the exit code, and a TTY with its size
/// set at the start and changed mid-session.
async fn exec(path: Path) {
    let Some(s) = Setup::start("exec", path).await else {
        return;
    };
    s.pod("p", IMAGE, Some(&["sleep", "3600"])).await;

    let out = run(
        s.kubectl(&["exec", "p", "--", "sh", "-c", "echo out; echo err >&2"]),
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    let input = "hi\n".repeat(5000);
    let out = run(
        s.kubectl(&["exec", "-i", "p", "--", "cat"]),
        input.as_bytes(),
    );
    assert!(out.status.success(), "stdin's EOF ends cat: {out:?}");
    assert_eq!(text(&out.stdout), input);

    let out = run(s.kubectl(&["exec", "p", "--", "sh", "-c", "exit 3"]), b"");
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let mut tty = Terminal::spawn(s.kubectl(&["exec", "-it", "p", "--", "sh"]), 31, 97);
    tty.type_line("stty size; echo tty-$((6*7))");
    tty.wait_for("31 97");
    tty.wait_for("tty-42");
    tty.resize(41, 123);
    // The resize reaches the container's terminal shortly after: ask until it shows.
    let until = std::time::Instant::now() + HANG;
    while !tty.output().contains("41 123") {
        assert!(std::time::Instant::now() < until, "{}", tty.output());
        tty.type_line("stty size");
        std::thread::sleep(Duration::from_millis(500));
    }
    tty.type_line("exit 4");
    assert_eq!(tty.wait().code(), Some(4), "{}", tty.output());
    s.assert_sessions_took_the_path();
}

/// `kubectl run -it --rm`: kubectl attaches to the new pod's shell on a TTY; what it prints is in
/// `kubectl logs` meanwhile; leaving the shell ends the pod, which kubectl then deletes.
async fn attach(path: Path) {
    let Some(s) = Setup::start("attach", path).await else {
        return;
    };
    let overrides = serde_json::json!({"spec": {
        "nodeSelector": {"kubernetes.io/hostname": s.node},
        "automountServiceAccountToken": false,
        "tolerations": tolerations(),
    }})
    .to_string();
    let run_it = s.kubectl(&[
        "run",
        "-it",
        "--rm",
        "--restart=Never",
        "--image",
        IMAGE,
        "--overrides",
        &overrides,
        "t",
        "--",
        "sh",
    ]);
    let mut tty = Terminal::spawn(run_it, 24, 80);
    tty.wait_for("If you don't see a command prompt");
    tty.type_line("echo attached-$((6*7))");
    tty.wait_for("attached-42");
    let d = Deadline::new("the attached output in kubectl logs", 60);
    loop {
        let logs = run(s.kubectl(&["logs", "t"]), b"");
        if text(&logs.stdout).contains("attached-42") {
            break;
        }
        d.tick().await;
    }
    tty.type_line("exit");
    assert!(tty.wait().success(), "{}", tty.output());
    let pods = s.ns.pods();
    let d = Deadline::new("kubectl run --rm deleting the pod", 120);
    while pods.get_opt("t").await.expect("get").is_some() {
        d.tick().await;
    }
    s.assert_sessions_took_the_path();
}

/// The local port `kubectl port-forward` reports it listens on for `remote`.
fn forwarding_port(child: &mut Child, remote: u16) -> u16 {
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            // "Forwarding from 127.0.0.1:41234 -> 8080"
            let port = line
                .strip_prefix("Forwarding from 127.0.0.1:")
                .and_then(|rest| rest.strip_suffix(&format!(" -> {remote}")))
                .and_then(|p| p.parse::<u16>().ok());
            if let Some(port) = port {
                let _ = tx.send(port);
            }
        }
    });
    rx.recv_timeout(HANG)
        .expect("kubectl port-forward reports its local port")
}

/// One HTTP/1.0 GET of `path` on local port `port`: the whole response.
fn http_get(port: u16, path: &str) -> String {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(HANG)).unwrap();
    write!(tcp, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).expect("read the response");
    text(&response)
}

/// `kubectl port-forward pod/web :8080`, the forwarder and its local port.
fn forward_web(s: &Setup) -> (Child, u16) {
    let mut child = s
        .kubectl(&["port-forward", "pod/web", ":8080"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kubectl port-forward");
    let port = forwarding_port(&mut child, 8080);
    (child, port)
}

/// port-forward carries HTTP to the pod's httpd: many connections, at once and one after the
/// other, through one forwarder; a second forwarder after the first has gone.
async fn port_forward(path: Path) {
    let Some(s) = Setup::start("portforward", path).await else {
        return;
    };
    s.pod("web", HTTPD, None).await;
    let (mut forwarder, port) = forward_web(&s);
    let at_once: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || http_get(port, "/")))
        .collect();
    for response in at_once {
        let response = response.join().unwrap();
        assert!(
            response.starts_with("HTTP/1.") && response.contains(" 200 "),
            "{response}"
        );
        assert!(response.ends_with("hello from nodelet\n"), "{response}");
    }
    for _ in 0..8 {
        let response = http_get(port, "/healthz");
        assert!(response.ends_with("\r\n\r\nok\n"), "{response}");
    }
    let _ = forwarder.kill();
    let _ = forwarder.wait();
    let (mut again, port) = forward_web(&s);
    assert!(http_get(port, "/").ends_with("hello from nodelet\n"));
    let _ = again.kill();
    let _ = again.wait();
    s.assert_sessions_took_the_path();
}

/// `bytes` pseudo-random bytes (xorshift), different for each `seed`.
fn noise(bytes: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    let out = run(
        {
            let mut cmd = Command::new("sha256sum");
            cmd.arg("-");
            cmd
        },
        bytes,
    );
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `kubectl cp` of 10 MB into the pod and back, each way checked by its SHA-256.
async fn cp(path: Path) {
    let Some(s) = Setup::start("cp", path).await else {
        return;
    };
    s.pod("p", IMAGE, Some(&["sleep", "3600"])).await;
    let dir = tempfile::tempdir().unwrap();
    let original = noise(10 << 20, 0x5eed);
    let want = sha256(&original);
    let local = dir.path().join("big");
    std::fs::write(&local, &original).unwrap();
    let local_arg = local.display().to_string();
    let out = run(s.kubectl(&["cp", &local_arg, "p:/tmp/big"]), b"");
    assert!(out.status.success(), "{out:?}");
    let inside = run(
        s.kubectl(&["exec", "p", "--", "sha256sum", "/tmp/big"]),
        b"",
    );
    assert_eq!(
        text(&inside.stdout).split_whitespace().next(),
        Some(want.as_str()),
        "the copy in the pod"
    );
    // Back, after a change in the pod, so the copy out is not the file the test wrote.
    let out = run(
        s.kubectl(&[
            "exec",
            "p",
            "--",
            "sh",
            "-c",
            "cat /tmp/big /tmp/big > /tmp/twice",
        ]),
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    let back = dir.path().join("twice");
    let back_arg = back.display().to_string();
    let out = run(s.kubectl(&["cp", "p:/tmp/twice", &back_arg]), b"");
    assert!(out.status.success(), "{out:?}");
    let copied = std::fs::read(&back).expect("the copy out");
    assert_eq!(copied.len(), 20 << 20);
    assert_eq!(
        sha256(&copied),
        sha256(&[&original[..], &original[..]].concat())
    );
    s.assert_sessions_took_the_path();
}

/// `kubectl debug --target`: an ephemeral container attached on a TTY, in the target's PID
/// namespace (it sees the target's `sleep 3600`), reported terminated with its exit code once
/// left, its log served. Then `kubectl debug node/…`: a pod on the node with the host's
/// filesystem at /host and the host's PID namespace, attached on a TTY.
async fn debug(path: Path) {
    let Some(s) = Setup::start("debug", path).await else {
        return;
    };
    s.pod("p", IMAGE, Some(&["sleep", "3600"])).await;
    let debug_it = s.kubectl(&[
        "debug", "p", "-it", "--image", IMAGE, "--target", "app", "-c", "dbg", "--", "sh",
    ]);
    let mut tty = Terminal::spawn(debug_it, 24, 80);
    tty.wait_for("If you don't see a command prompt");
    tty.type_line("echo dbg-$((6*7)); ps -o pid,args");
    tty.wait_for("dbg-42");
    tty.wait_for("sleep 3600");
    tty.type_line("exit 6");
    tty.wait();
    let pods = s.ns.pods();
    let d = Deadline::new("the ephemeral container terminated", 90);
    let terminated = loop {
        let p = pods.get("p").await.expect("get pod");
        let status = p.status.unwrap_or_default();
        let dbg = status
            .ephemeral_container_statuses
            .into_iter()
            .flatten()
            .find(|s| s.name == "dbg");
        if let Some(t) = dbg.and_then(|s| s.state).and_then(|st| st.terminated) {
            break t;
        }
        d.tick().await;
    };
    assert_eq!(terminated.exit_code, 6, "{terminated:?}");
    let logs = run(s.kubectl(&["logs", "p", "-c", "dbg"]), b"");
    assert!(text(&logs.stdout).contains("dbg-42"), "{logs:?}");
    assert!(text(&logs.stdout).contains("sleep 3600"), "{logs:?}");

    let node = format!("node/{}", s.node);
    let debug_node = s.kubectl(&["debug", &node, "-it", "--image", IMAGE, "--", "sh"]);
    let mut tty = Terminal::spawn(debug_node, 24, 80);
    tty.wait_for("If you don't see a command prompt");
    // The host's root is at /host; the host's PID 1 is this machine's init.
    let init = std::fs::read_to_string("/proc/1/comm").unwrap();
    tty.type_line("echo node-$((6*7)) $(cat /proc/1/comm) $(test -d /host/proc && echo host-root)");
    tty.wait_for(&format!("node-42 {} host-root", init.trim()));
    tty.type_line("exit");
    assert!(tty.wait().success(), "{}", tty.output());
    s.assert_sessions_took_the_path();
}

/// The agent's open fds, its threads outside tokio's pool and its alive async tasks (its
/// metrics read on its local socket).
fn agent_resources(agent: &Agent) -> (usize, usize, usize) {
    let pid = agent.child.as_ref().expect("the agent runs").id();
    let socket = agent.dir.path().join("run/nodelet.sock");
    let metrics = Command::new("curl")
        .args(["-s", "--max-time", "10", "--unix-socket"])
        .arg(&socket)
        .arg("http://localhost/metrics")
        .output()
        .expect("curl the agent's socket");
    nodelet_tests::agent_support::fds_threads_and_tasks(pid, &text(&metrics.stdout))
}

/// The processes of a container's task, as containerd lists them.
fn task_processes(container_id: &str) -> usize {
    let out = Command::new("ctr")
        .args(["-n", CONTAINERD_NS, "tasks", "ps", container_id])
        .output()
        .expect("ctr tasks ps");
    text(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// 100 execs and 10 port-forwards through kubectl leave no exec process in the container, and
/// the agent's fds, threads and tasks come back to where they were before them.
async fn sessions_leave_nothing_behind(path: Path) {
    let Some(s) = Setup::start("leaks", path).await else {
        return;
    };
    let p = s.pod("p", IMAGE, Some(&["sleep", "3600"])).await;
    let container = p.status.unwrap().container_statuses.unwrap()[0]
        .container_id
        .clone()
        .unwrap()
        .trim_start_matches("containerd://")
        .to_string();
    s.pod("web", HTTPD, None).await;
    // Warm up: the first session of each kind makes what the agent keeps (TLS, clients).
    assert!(run(s.kubectl(&["exec", "p", "--", "true"]), b"")
        .status
        .success());
    let (mut forwarder, port) = forward_web(&s);
    assert!(http_get(port, "/").contains("hello from nodelet"));
    let _ = forwarder.kill();
    let _ = forwarder.wait();
    let settled = |what: &str| {
        let d = std::time::Instant::now() + Duration::from_secs(60);
        let mut last = agent_resources(&s.agent);
        loop {
            std::thread::sleep(Duration::from_secs(2));
            let now = agent_resources(&s.agent);
            if now == last || std::time::Instant::now() > d {
                eprintln!("{what}: fds, threads, tasks = {now:?}");
                return now;
            }
            last = now;
        }
    };
    let before = settled("before");

    for i in 0..100 {
        let out = run(
            s.kubectl(&["exec", "p", "--", "sh", "-c", "echo $0", &i.to_string()]),
            b"",
        );
        assert_eq!(text(&out.stdout), format!("{i}\n"), "{out:?}");
    }
    for _ in 0..10 {
        let (mut forwarder, port) = forward_web(&s);
        for _ in 0..3 {
            assert!(http_get(port, "/").contains("hello from nodelet"));
        }
        let _ = forwarder.kill();
        let _ = forwarder.wait();
    }

    // Nothing of the execs in the container (its own process alone; a readiness probe's exec
    // comes and goes, so wait for the count to settle at one).
    let d = Deadline::new("the container left with its own process alone", 60);
    while task_processes(&container) != 1 {
        d.tick().await;
    }
    let exec_dir = s.agent.dir.path().join("root/exec");
    let d = Deadline::new("the agent's exec FIFO dirs removed", 60);
    while std::fs::read_dir(&exec_dir).map_or(0, |d| d.count()) > 0 {
        d.tick().await;
    }
    // Back to the baseline, give or take what the runtime keeps warm for a while: a few fds
    // (pooled connections), a few blocking threads (tokio lets idle ones go after 10 s).
    let d = Deadline::new(
        "the agent's fds, threads and tasks back to the baseline",
        90,
    );
    loop {
        let after = agent_resources(&s.agent);
        let (fds, threads, tasks) = after;
        if fds <= before.0 + 4 && threads <= before.1 + 2 && tasks <= before.2 + 4 {
            eprintln!("after: fds, threads, tasks = {after:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < d.until,
            "fds, threads, tasks {after:?} against {before:?} before 110 sessions"
        );
        d.tick().await;
    }
    s.assert_sessions_took_the_path();
}
