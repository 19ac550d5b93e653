//! The test CSI plugin (`csi-loop-plugin`) as a child process for agent- and cluster-tier
//! tests: started with its state under a test's dir and its registration socket in an agent's
//! plugins_registry, with a call log to read back. Dropping it kills the process and detaches
//! every loop device backed by a file under its state dir, so a failed test leaves none.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::agent_support::built_binary;

/// The driver name the tests register the plugin as.
pub const LOOP_DRIVER: &str = "loop.csi.nodelet.io";

/// One call the plugin received: `(rpc, volume id, path)`.
pub type Call = (String, String, String);

pub struct LoopPlugin {
    child: Option<Child>,
    pub state_dir: PathBuf,
    pub registry: PathBuf,
    pub node_id: String,
    pub call_log: PathBuf,
    /// More flags for the plugin (`--max-volumes`, `--topology`).
    pub args: Vec<String>,
}

impl LoopPlugin {
    /// Starts the plugin and waits until its registration socket exists in `registry`.
    pub fn start(state_dir: &Path, registry: &Path, node_id: &str) -> LoopPlugin {
        LoopPlugin::start_with(state_dir, registry, node_id, &[])
    }

    /// `start` with more flags for the plugin.
    pub fn start_with(
        state_dir: &Path,
        registry: &Path,
        node_id: &str,
        args: &[&str],
    ) -> LoopPlugin {
        std::fs::create_dir_all(state_dir).unwrap();
        let mut plugin = LoopPlugin {
            child: None,
            state_dir: state_dir.to_path_buf(),
            registry: registry.to_path_buf(),
            node_id: node_id.to_string(),
            call_log: state_dir.join("calls.log"),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        plugin.spawn();
        plugin
    }

    /// (Re)starts the process on the same state and call log, and waits for its sockets.
    pub fn spawn(&mut self) {
        self.kill();
        let socket = self.registration_socket();
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(built_binary("csi-loop-plugin"))
            .args(["--driver", LOOP_DRIVER, "--node-id", &self.node_id])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--registry")
            .arg(&self.registry)
            .arg("--call-log")
            .arg(&self.call_log)
            .args(&self.args)
            .spawn()
            .expect("start csi-loop-plugin");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where the plugin serves the registration API.
    pub fn registration_socket(&self) -> PathBuf {
        self.registry.join(format!("{LOOP_DRIVER}-reg.sock"))
    }

    /// The stage/publish calls received so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        std::fs::read_to_string(&self.call_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ' ');
                Some((
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                ))
            })
            .collect()
    }

    /// Just the RPC names of `calls()`.
    pub fn rpcs(&self) -> Vec<String> {
        self.calls().into_iter().map(|(rpc, _, _)| rpc).collect()
    }

    /// The backing file of a volume.
    pub fn backing_file(&self, volume_id: &str) -> PathBuf {
        self.state_dir
            .join("volumes")
            .join(format!("{volume_id}.img"))
    }

    /// Loop devices attached to backing files under the state dir.
    pub fn attached_loops(&self) -> Vec<String> {
        loops_backed_under(&self.state_dir)
    }

    /// Kills the plugin and removes its registration socket, as when a plugin is uninstalled.
    pub fn unregister(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.registration_socket());
    }

    /// Kills the plugin process (its mounts, loop devices and stale sockets stay, as after a
    /// crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LoopPlugin {
    fn drop(&mut self) {
        self.kill();
        for dev in self.attached_loops() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }
}

/// Loop devices whose backing file lies under `dir`.
pub fn loops_backed_under(dir: &Path) -> Vec<String> {
    let Ok(out) = Command::new("losetup")
        .args(["-l", "-n", "-O", "NAME,BACK-FILE"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let (dev, file) = (cols.next()?, cols.next()?);
            Path::new(file).starts_with(dir).then(|| dev.to_string())
        })
        .collect()
}

/// `(mount point, source)` of every mount at or below `dir` in /proc/self/mountinfo, in mount
/// table order.
pub fn mounts_below(dir: &Path) -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = PathBuf::from(left.split(' ').nth(4)?);
            let source = right.split(' ').nth(1)?.to_string();
            point.starts_with(dir).then_some((point, source))
        })
        .collect()
}

/// Mount points at or below `dir` whose source is a loop device (what the plugin staged and
/// published as filesystems), in mount table order.
pub fn loop_mounts_below(dir: &Path) -> Vec<PathBuf> {
    mounts_below(dir)
        .into_iter()
        .filter(|(_, source)| source.starts_with("/dev/loop"))
        .map(|(point, _)| point)
        .collect()
}
