//! The agent's exclusive claim on its node state: its root dir, its run dir and its containerd
//! namespace. Two agents sharing any of them would each remove the other's containers as
//! unwanted, so the second refuses to start, naming the agent that holds the lock.
//!
//! Each claim is an `flock(2)` on a file (`<root>/nodelet.lock`, `<run>/nodelet.lock`, and
//! `/run/nodelet-namespaces/<endpoint>_<namespace>.lock` for the namespace), held for the life
//! of the process: the kernel releases it when the process dies, however it dies, so a crash
//! never leaves a stale lock. The file says who holds it (pid, root dir, run dir, namespace).

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Where namespace locks live: tmpfs, host-wide, empty after a reboot.
pub const NAMESPACE_LOCK_DIR: &str = "/run/nodelet-namespaces";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another agent holds the lock.
    #[error("another nodelet holds {path} ({holder}): two agents must not share a root dir, a run dir or a containerd namespace")]
    Held { path: PathBuf, holder: String },
    /// The lock file could not be opened or written.
    #[error("locking {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The held locks; dropping them releases the claim.
#[derive(Debug)]
pub struct NodeLock {
    _held: Vec<Flock<std::fs::File>>,
}

/// What the agent claims.
pub struct Claim<'a> {
    pub root_dir: &'a Path,
    pub run_dir: &'a Path,
    pub runtime_endpoint: &'a str,
    pub namespace: &'a str,
}

/// A file name for an endpoint and namespace: anything but `[A-Za-z0-9.-]` becomes `_`.
fn namespace_file(endpoint: &str, namespace: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}_{}.lock", clean(endpoint), clean(namespace))
}

impl NodeLock {
    /// Takes every lock of `claim`, or says who holds one. `namespace_dir` is normally
    /// [`NAMESPACE_LOCK_DIR`].
    pub fn acquire(claim: &Claim<'_>, namespace_dir: &Path) -> Result<NodeLock, LockError> {
        let me = format!(
            "pid {}, root {}, run dir {}, namespace {}",
            std::process::id(),
            claim.root_dir.display(),
            claim.run_dir.display(),
            claim.namespace
        );
        let paths = [
            claim.root_dir.join("nodelet.lock"),
            claim.run_dir.join("nodelet.lock"),
            namespace_dir.join(namespace_file(claim.runtime_endpoint, claim.namespace)),
        ];
        let mut held = Vec::new();
        for path in paths {
            held.push(lock_one(&path, &me)?);
        }
        Ok(NodeLock { _held: held })
    }
}

fn lock_one(path: &Path, me: &str) -> Result<Flock<std::fs::File>, LockError> {
    let io = |source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, _)) => {
            let mut holder = String::new();
            let _ = (&mut file).take(4096).read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(LockError::Held {
                path: path.to_path_buf(),
                holder: if holder.is_empty() {
                    "an agent that has not written its pid yet".into()
                } else {
                    holder.to_string()
                },
            });
        }
    };
    locked.set_len(0).map_err(io)?;
    locked.rewind().map_err(io)?;
    locked.write_all(me.as_bytes()).map_err(io)?;
    Ok(locked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_on_any_shared_part_is_refused_naming_the_holder() {
        let base = std::env::temp_dir().join(format!("nodelet-lock-{}", std::process::id()));
        let ns_dir = base.join("ns");
        let dirs = |n: &str| (base.join(n).join("root"), base.join(n).join("run"));
        let (root_a, run_a) = dirs("a");
        let (root_b, run_b) = dirs("b");
        let claim = |root: &Path, run: &Path, ns: &'static str| {
            let c = Claim {
                root_dir: root,
                run_dir: run,
                runtime_endpoint: "unix:///run/containerd/containerd.sock",
                namespace: ns,
            };
            NodeLock::acquire(&c, &ns_dir)
        };
        let held = claim(&root_a, &run_a, "k8s.nodelet").unwrap();
        for (root, run, ns) in [
            (&root_b, &run_b, "k8s.nodelet"),
            (&root_a, &run_b, "other"),
            (&root_b, &run_a, "other"),
        ] {
            let err = claim(root, run, ns).unwrap_err().to_string();
            let pid = format!("pid {}", std::process::id());
            assert!(err.contains(&pid), "{err}");
            assert!(err.contains(&format!("root {}", root_a.display())), "{err}");
        }
        assert!(claim(&root_b, &run_b, "other").is_ok());
        drop(held);
        assert!(claim(&root_b, &run_b, "k8s.nodelet").is_ok(), "released");
        std::fs::remove_dir_all(base).unwrap();
    }
}
