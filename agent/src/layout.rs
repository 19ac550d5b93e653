//! Where the agent keeps each pod's state under its root dir: `<root>/pods/<uid>/…`, as the
//! kubelet keeps `/var/lib/kubelet/pods/<uid>`. One place for the layout that the sandbox, the
//! volume manager, CSI and the pod manager create, read back after a restart and remove.
//! A uid reaches these paths only after validation (`source::validation`): a plain name.
//! Files the agent must find whole after a crash are replaced with [`write_atomic`].

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The directory holding every pod's directory.
pub fn pods_dir(root: &Path) -> PathBuf {
    root.join("pods")
}

/// One pod's directory: its volumes, its sandbox files and its records.
pub fn pod_dir(root: &Path, uid: &str) -> PathBuf {
    pods_dir(root).join(uid)
}

/// Replaces `path` with `content` so that a crash of the agent or of the machine leaves the old
/// file or the whole new one: written under a name unique to the call (threads and processes
/// may write at once), synced, renamed over `path`, and the directory synced. A new file gets
/// `mode`; nothing is left under the temporary name on failure.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::other(format!(
            "{} names no file in a directory",
            path.display()
        )));
    };
    let tmp = dir.join(format!(
        ".{}.{}.{call}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(content)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| std::fs::File::open(dir)?.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_is_replaced_whole_with_its_mode_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old", 0o600).expect("first write");
        write_atomic(&path, b"new", 0o600).expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["state.json"]);

        let missing = dir.path().join("gone").join("state.json");
        assert!(write_atomic(&missing, b"x", 0o600).is_err());
        assert!(write_atomic(Path::new("/"), b"x", 0o600).is_err());
    }
}
