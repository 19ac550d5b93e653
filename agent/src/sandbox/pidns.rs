//! The pod's PID namespace for `shareProcessNamespace`, as the kubelet's sandbox has it: one
//! namespace for every container of the pod, whose PID 1 is the pod's own `/pause` process,
//! visible to the containers (`ps`, `/proc`) and reaping the orphans they leave.
//!
//! A PID namespace lives only as long as its PID 1, so unlike the network, IPC and UTS pins it
//! needs a process: the agent runs its own executable as `/pause pod-init` in an empty
//! directory. That process makes the namespace (`unshare(CLONE_NEWPID)`), confines itself (the
//! directory as its root, uid and gid 65535 as the kubelet's pause image runs, no
//! supplementary groups, not dumpable, no new privileges), forks the namespace's PID 1, prints
//! that child's PID and exits. The child detaches (own session, stdio on /dev/null) and only
//! reaps children; it outlives agent restarts. The agent pins the namespace on a file in the
//! pod's run dir (containers join it by that path) and keeps the PID in the sandbox state to
//! kill it, after checking that the PID still names this namespace.
//!
//! `unsafe` here is the one `fork` of the subcommand, in a process that has no other thread.
#![allow(unsafe_code)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::prctl;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{chdir, chroot, dup2_stderr, dup2_stdin, dup2_stdout, fork, setgid, setgroups};
use nix::unistd::{setsid, setuid, ForkResult};
use nix::unistd::{Gid, Pid, Uid};

/// `<agent> pod-init`, run with `/pause` as its argv[0] (what `ps` in the pod shows as PID 1).
pub const SUBCOMMAND: &str = "pod-init";
/// The name PID 1 shows in the pod.
const ARGV0: &str = "/pause";
/// Who PID 1 runs as: the kubelet's pause image's user and group.
const PAUSE_ID: u32 = 65535;

/// The subcommand: called from `main` before any thread exists (it forks). Its working
/// directory becomes the root of PID 1.
pub fn main_with_args() -> ExitCode {
    match start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{ARGV0} {SUBCOMMAND}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn start() -> Result<(), String> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("open /dev/null: {e}"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?;
    chroot(".").map_err(|e| format!("chroot into the working directory: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    let id = Gid::from_raw(PAUSE_ID);
    setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    setgid(id).map_err(|e| format!("setgid {PAUSE_ID}: {e}"))?;
    setuid(Uid::from_raw(PAUSE_ID)).map_err(|e| format!("setuid {PAUSE_ID}: {e}"))?;
    // The thread's name (`comm`, what `ps` shows beside argv) as the executable's would be.
    prctl::set_name(c"pause").map_err(|e| format!("naming the process: {e}"))?;
    prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    prctl::set_dumpable(false).map_err(|e| format!("dumpable: {e}"))?;
    let mut reaped = SigSet::empty();
    reaped.add(Signal::SIGCHLD);
    reaped
        .thread_block()
        .map_err(|e| format!("blocking SIGCHLD: {e}"))?;
    // SAFETY: the process is single-threaded (main calls this before starting any thread),
    // so the child may run any code.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { child } => {
            println!("{child}");
            Ok(())
        }
        ForkResult::Child => {
            let _ = setsid();
            let _ = (dup2_stdin(&null), dup2_stdout(&null), dup2_stderr(&null));
            drop(null);
            reap_forever(&reaped)
        }
    }
}

/// PID 1's life: wait for SIGCHLD and reap every child that ended, for ever.
fn reap_forever(reaped: &SigSet) -> ! {
    loop {
        let _ = reaped.wait();
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
    }
}

/// A pod's PID namespace: the pin containers join and its PID 1 (as the host sees it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PidPin {
    pub path: PathBuf,
    pub init: u32,
}

impl PidPin {
    /// Starts PID 1 of a new namespace with `root` (made, empty) as its root and pins the
    /// namespace on `path` (made). `agent` is the executable to run as `/pause`.
    pub async fn create(agent: &Path, path: &Path, root: &Path) -> Result<PidPin, String> {
        std::fs::create_dir_all(root).map_err(|e| format!("create {}: {e}", root.display()))?;
        std::fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
        let mut command = std::process::Command::new(agent);
        command.arg0(ARGV0).arg(SUBCOMMAND).current_dir(root);
        let out = tokio::process::Command::from(command)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("run {} {SUBCOMMAND}: {e}", agent.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let init = match (out.status.success(), text.trim().parse::<u32>()) {
            (true, Ok(pid)) => pid,
            _ => {
                return Err(format!(
                    "{ARGV0} {SUBCOMMAND}: {}: {}{}",
                    out.status,
                    text.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        let pin = PidPin {
            path: path.to_path_buf(),
            init,
        };
        let source = format!("/proc/{init}/ns/pid");
        let bound = mount(
            Some(source.as_str()),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        );
        if let Err(e) = bound {
            pin.kill();
            return Err(format!("bind {source} on {}: {e}", path.display()));
        }
        Ok(pin)
    }

    /// Whether PID 1 still runs in the pinned namespace (a namespace whose PID 1 ended takes
    /// no new process).
    pub fn alive(&self) -> bool {
        let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
        let init = PathBuf::from(format!("/proc/{}/ns/pid", self.init));
        matches!((id(&self.path), id(&init)), (Ok(a), Ok(b)) if a == b)
    }

    /// Kills PID 1 (the kernel then kills everything else in the namespace), if it is still
    /// the namespace's: a PID reused by another process is left alone.
    pub fn kill(&self) {
        if self.alive() {
            let _ = kill(Pid::from_raw(self.init as i32), Signal::SIGKILL);
        }
    }
}
