//! A pod's cgroup directories: `nodelet/pod<uid>` under the cgroup v2 root and under each v1
//! hierarchy. runc makes them for the pod's containers (their cgroup parent); the pod worker
//! removes them once the containers are removed, since an exited container that still exists
//! keeps its cgroup and so its parent.

use std::io;
use std::path::Path;

/// The pod's cgroup below a hierarchy's root, `nodelet/pod<uid>`; its containers' are
/// `nodelet/pod<uid>/<container id>`.
pub fn pod_path(uid: &str) -> String {
    format!("nodelet/pod{uid}")
}

/// Removes `nodelet/pod<uid>` (and any empty child cgroup left in it) from the v2 root and
/// every v1 hierarchy under `root`. Ok when none is left; the first failure otherwise (a cgroup
/// that still holds a process cannot go).
pub fn remove_pod(root: &Path, uid: &str) -> io::Result<()> {
    if uid.is_empty() || uid.contains('/') || uid.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid pod uid {uid:?}"),
        ));
    }
    let pod = pod_path(uid);
    let hierarchies = std::fs::read_dir(root).into_iter().flatten().flatten();
    let mut first_error = None;
    for dir in hierarchies.map(|e| e.path()).chain([root.to_path_buf()]) {
        if let Err(e) = remove_tree(&dir.join(&pod)) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// rmdir of a cgroup and its child cgroups, deepest first (a cgroup's files go with it).
fn remove_tree(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_the_pod_cgroup_in_every_hierarchy_with_its_children() {
        let root = tempfile::tempdir().unwrap();
        let hierarchies = ["memory", "cpu", "pids"];
        for h in hierarchies {
            std::fs::create_dir_all(root.path().join(h).join("nodelet/podu1/ctr")).unwrap();
            std::fs::create_dir_all(root.path().join(h).join("nodelet/podu2")).unwrap();
        }
        std::fs::create_dir_all(root.path().join("nodelet/podu1")).unwrap();
        remove_pod(root.path(), "u1").unwrap();
        for h in hierarchies {
            assert!(!root.path().join(h).join("nodelet/podu1").exists());
            assert!(
                root.path().join(h).join("nodelet/podu2").exists(),
                "other pods stay"
            );
        }
        assert!(!root.path().join("nodelet/podu1").exists());
        remove_pod(root.path(), "u1").expect("nothing left is fine");
    }

    #[test]
    fn a_cgroup_that_cannot_go_is_an_error_and_paths_cannot_escape() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("memory/nodelet/podu1");
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::write(pod.join("busy"), b"a process").unwrap();
        assert!(remove_pod(root.path(), "u1").is_err());
        assert!(remove_pod(root.path(), "../x").is_err());
    }
}
