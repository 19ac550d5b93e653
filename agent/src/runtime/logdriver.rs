//! The per-container log driver, seen from the agent. containerd's shim starts it for every
//! container (the `binary://` stdio URI, see `container::log_uri`) and it runs on without the
//! agent; what it does is in the `nodelet-log-driver` crate. Its binary is built by
//! `agent/build.rs` (statically linked, without libc: one runs per container, so its private
//! memory, about 16 KiB, is what a node pays per container) and embedded here, and the agent
//! installs it on start-up as `<root-dir>/bin/nodelet-log-driver-<hash of the build>`: a fresh name per
//! build, so a new agent never rewrites a binary that running drivers still execute, and the
//! agent's executable is all an installation needs. Should installing fail, the agent falls
//! back to running itself as the driver (`nodelet log-driver <path>`, same code, over ten
//! times the memory per container); so it does on architectures the driver's binary is not
//! written for (x86_64 only: nothing is embedded there).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub use nodelet_log_driver::{MAX_LINE, PATH_KEY};

/// `nodelet log-driver …`: the agent itself as the driver (the fallback above), with the
/// driver's signal set-up: SIGTERM and SIGINT kept from killing it (blocked here, which nix
/// offers without `unsafe`; the driver's binary ignores them), see `nodelet_log_driver::run`.
pub fn main_with_args(args: &[String]) -> std::process::ExitCode {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    // Only this thread runs: blocked here, they are blocked for the process.
    let _ = signals.thread_block();
    let args: Vec<std::ffi::CString> = args
        .iter()
        .map(|a| std::ffi::CString::new(a.as_bytes()).unwrap_or_default())
        .collect();
    let args: Vec<&std::ffi::CStr> = args.iter().map(|a| a.as_c_str()).collect();
    std::process::ExitCode::from(nodelet_log_driver::main_with_args(&args))
}

/// The driver's binary as built for this agent.
const BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nodelet-log-driver"));
/// A hash of `BINARY`, computed by the build (hashing it here would page it all in).
const ID: &str = env!("NODELET_LOG_DRIVER_ID");

/// `nodelet install-log-driver <dir>`: installs the driver from a child process. Writing the
/// embedded copy pages its 1.2 MB into the writer's memory; a child gives them back when it
/// exits, where the agent would hold them for as long as it runs.
pub const INSTALL_SUBCOMMAND: &str = "install-log-driver";

/// The file name the driver is installed under.
pub fn file_name() -> String {
    format!("nodelet-log-driver-{ID}")
}

/// Installs the driver in `dir` unless this build of it is already there, and returns its
/// path. Written under a temporary name and renamed, so a concurrent install or a crash
/// never leaves a partial binary under the final name.
pub fn install(dir: &Path) -> std::io::Result<PathBuf> {
    if BINARY.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "no log driver binary is built for this architecture",
        ));
    }
    let path = dir.join(file_name());
    if installed(&path) {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    crate::layout::write_atomic(&path, BINARY, 0o755)?;
    Ok(path)
}

/// Whether `path` holds this build's driver, executable.
fn installed(path: &Path) -> bool {
    !BINARY.is_empty()
        && std::fs::metadata(path).is_ok_and(|meta| {
            meta.len() == BINARY.len() as u64 && meta.permissions().mode() & 0o111 != 0
        })
}

/// Installs the driver by running `<agent> install-log-driver <dir>` (see
/// `INSTALL_SUBCOMMAND`), unless it is there already.
fn install_in_child(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join(file_name());
    if installed(&path) {
        return Ok(path);
    }
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg(INSTALL_SUBCOMMAND)
        .arg(dir)
        .output()?;
    if out.status.success() && installed(&path) {
        return Ok(path);
    }
    Err(std::io::Error::other(format!(
        "{INSTALL_SUBCOMMAND} {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// The driver the agent hands to the shim: the installed binary, or the agent's own
/// executable (which runs the same code as `nodelet log-driver`) when installing failed.
/// Drivers of earlier builds are removed from the directory: drivers still running from them
/// keep their file until they exit, and shims start only the one this agent names.
pub fn binary_for(root_dir: &Path) -> PathBuf {
    let dir = root_dir.join("bin");
    // In process only when the child could not do it (say, the agent's file was replaced).
    match install_in_child(&dir).or_else(|_| install(&dir)) {
        Ok(path) => {
            let stale = std::fs::read_dir(&dir).into_iter().flatten().flatten();
            for entry in stale {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("nodelet-log-driver-") && name != file_name() {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            path
        }
        Err(e) => {
            let own = std::env::current_exe().unwrap_or_else(|_| "/usr/local/bin/nodelet".into());
            tracing::warn!(
                error = %e,
                dir = %dir.display(),
                fallback = %own.display(),
                "could not install the log driver; containers log through the agent's own binary"
            );
            own
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_writes_an_executable_once_and_reuses_it() {
        let dir = std::env::temp_dir().join(format!("nodelet-ld-install-{}", std::process::id()));
        let path = install(&dir).unwrap();
        assert_eq!(path, dir.join(file_name()));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), BINARY.len() as u64);
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(
                &std::fs::metadata(install(&dir).unwrap()).unwrap()
            ),
            inode,
            "an installed driver is not written again"
        );
        // The embedded binary is a static executable: it runs, and refuses bad arguments.
        let out = std::process::Command::new(&path).output().unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage: nodelet-log-driver"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn installs_at_once_from_many_threads_all_succeed() {
        let dir = std::env::temp_dir().join(format!("nodelet-ld-race-{}", std::process::id()));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || install(&dir))
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().unwrap(), dir.join(file_name()));
        }
        let left = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(left, 1, "no temporary file is left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_agent_uses_its_own_build_and_removes_earlier_ones() {
        let root = std::env::temp_dir().join(format!("nodelet-ld-root-{}", std::process::id()));
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("nodelet-log-driver-0000000000000000"), "old").unwrap();
        std::fs::write(bin.join("other-tool"), "kept").unwrap();
        assert_eq!(binary_for(&root), bin.join(file_name()));
        let mut left: Vec<String> = std::fs::read_dir(&bin)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [file_name(), "other-tool".to_string()]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
