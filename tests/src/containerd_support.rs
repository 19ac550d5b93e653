//! A containerd of the test's own, for the chaos tier: its own socket, root and state dirs in a
//! temp dir, started by the test and killed by the PID the test holds, so a test that kills
//! containerd never touches the machine's (or another test's) containerd. The CRI plugin is
//! off, as in scripts/containerd.toml. Dropping it removes every task and container it holds,
//! stops it, unmounts what is left below its dirs and removes them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent_support::unmount_below;
use crate::runtime_support::ctr_with;

pub struct OwnContainerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnContainerd {
    /// Starts a containerd of its own and waits until it answers.
    pub fn start(name: &str) -> OwnContainerd {
        // Under /tmp with a short name: a unix socket path holds at most 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix(&format!("ctd-{name}-"))
            .tempdir_in("/tmp")
            .expect("containerd temp dir");
        let d = dir.path().display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
             [grpc]\n  address = \"{d}/c.sock\"\n\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\n\
             [debug]\n  address = \"{d}/debug.sock\"\n\n[metrics]\n  address = \"\"\n"
        );
        std::fs::write(dir.path().join("config.toml"), config).expect("containerd config");
        let mut own = OwnContainerd { dir, child: None };
        own.spawn();
        own
    }

    /// The gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// The endpoint for `--container-runtime-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The PID of the running containerd (None while it is down).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process again (after `kill9`) and waits until it answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "containerd is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))
            .expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        self.child = Some(child);
        self.wait_for("containerd to answer", true);
    }

    /// SIGKILLs the containerd this test started (by its PID) and waits until it is gone.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("containerd is running");
        let _ = child.kill();
        let _ = child.wait();
        self.wait_for("containerd to stop answering", false);
    }

    /// Whether containerd answers on its socket.
    pub fn answers(&self) -> bool {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs `ctr` against this containerd in `namespace`; returns its stdout.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> String {
        ctr_at(&self.socket(), namespace, args)
    }

    fn wait_for(&self, what: &str, answering: bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.answers() != answering {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `ctr --address <socket> -n <namespace> <args>`; its stdout.
pub fn ctr_at(socket: &Path, namespace: &str, args: &[&str]) -> String {
    ctr_with(&["--address".as_ref(), socket.as_os_str()], namespace, args)
}

impl Drop for OwnContainerd {
    fn drop(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
        let namespaces = ctr_at(&self.socket(), "default", &["namespaces", "list", "-q"]);
        for ns in namespaces.lines().map(str::trim).filter(|n| !n.is_empty()) {
            let ids = self.ctr(ns, &["containers", "list", "-q"]);
            for id in ids.lines() {
                self.ctr(ns, &["tasks", "kill", "-s", "SIGKILL", id]);
            }
            std::thread::sleep(Duration::from_millis(300));
            for id in ids.lines() {
                self.ctr(ns, &["tasks", "delete", "-f", id]);
                self.ctr(ns, &["containers", "delete", id]);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        unmount_below(self.dir.path());
    }
}
