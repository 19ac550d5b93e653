//! Where the agent keeps each pod's state under its root dir: `<root>/pods/<uid>/…`, as the
//! kubelet keeps `/var/lib/kubelet/pods/<uid>`. One place for the layout that the sandbox, the
//! volume manager, CSI and the pod manager create, read back after a restart and remove.
//! A uid reaches these paths only after validation (`source::validation`): a plain name.

use std::path::{Path, PathBuf};

/// The directory holding every pod's directory.
pub fn pods_dir(root: &Path) -> PathBuf {
    root.join("pods")
}

/// One pod's directory: its volumes, its sandbox files and its records.
pub fn pod_dir(root: &Path, uid: &str) -> PathBuf {
    pods_dir(root).join(uid)
}
