//! The spec of a static (manifest-folder) pod, kept in its pod directory while its worker
//! runs. A manifest removed while the agent is down leaves containers with no source to name
//! their grace, preStop or stop signal; the checkpoint lets the restarted agent stop them as
//! the pod asked (the full grace, restarted from zero), not kill them at once. Pods from the
//! API need none: the API still holds a pod being deleted, and one gone from it is killed at
//! once.
//!
//! It also keeps, per container attempt, the agent's intent to kill it for a failed postStart
//! hook: nothing else says so after a restart, and such a container must not be re-adopted as
//! running (its kill, waiting out the grace for a process that ignores TERM, is started anew).

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

use crate::source::manifest::CONFIG_SOURCE;

const FILE: &str = "pod.json";

/// Whether `pod` came from the manifest folder.
pub fn is_static(pod: &Pod) -> bool {
    let annotations = pod.metadata.annotations.as_ref();
    annotations
        .and_then(|a| a.get(CONFIG_SOURCE))
        .is_some_and(|s| s == "file")
}

fn path(pod_dir: &Path) -> PathBuf {
    pod_dir.join(FILE)
}

/// Writes the checkpoint (atomically: a reader sees the old file or the whole new one).
pub fn write(pod_dir: &Path, pod: &Pod) -> std::io::Result<()> {
    std::fs::create_dir_all(pod_dir)?;
    crate::layout::write_atomic(&path(pod_dir), &serde_json::to_vec(pod)?, 0o600)
}

/// The checkpointed pod, if there is a readable one.
pub fn read(pod_dir: &Path) -> Option<Pod> {
    let bytes = std::fs::read(path(pod_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn kill_path(pod_dir: &Path, name: &str, attempt: u32) -> PathBuf {
    pod_dir
        .join("containers")
        .join(name)
        .join(format!("kill-{attempt}"))
}

/// Records that attempt `attempt` of container `name` is to be killed (its postStart failed).
pub fn write_kill(pod_dir: &Path, name: &str, attempt: u32) -> std::io::Result<()> {
    let path = kill_path(pod_dir, name, attempt);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, b"PostStartHookFailed\n")
}

/// Whether a kill of attempt `attempt` of `name` was recorded.
pub fn kill_recorded(pod_dir: &Path, name: &str, attempt: u32) -> bool {
    kill_path(pod_dir, name, attempt).exists()
}

/// Removes the checkpoint (the pod is done).
pub fn remove(pod_dir: &Path) {
    let _ = std::fs::remove_file(path(pod_dir));
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(source: Option<&str>) -> Pod {
        let annotations = source.map(|s| [(CONFIG_SOURCE.to_string(), s.to_string())].into());
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                uid: Some("u1".into()),
                annotations,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_file_pods_are_static() {
        assert!(is_static(&pod(Some("file"))));
        assert!(!is_static(&pod(Some("api"))));
        assert!(!is_static(&pod(None)));
    }

    #[test]
    fn written_read_and_removed() {
        let base = std::env::temp_dir().join(format!("nodelet-ckpt-{}", std::process::id()));
        let pod_dir = base.join("pods/u1");
        assert!(read(&pod_dir).is_none());
        write(&pod_dir, &pod(Some("file"))).unwrap();
        assert_eq!(read(&pod_dir), Some(pod(Some("file"))));
        remove(&pod_dir);
        assert!(read(&pod_dir).is_none());
        std::fs::remove_dir(&pod_dir).expect("nothing else left in the pod dir");
        std::fs::remove_dir_all(base).unwrap();
    }
}
