//! Namespace pins: persistent network, IPC and UTS namespaces made by util-linux `unshare`
//! (which bind-mounts each new namespace onto a pre-created empty file), and the mount
//! propagation of the directory holding them.
//!
//! The pin directory is made a mount point of its own with shared propagation, as `ip netns`
//! does for /run/netns: mount namespaces created later (runc's, systemd services') receive
//! the pins as copies in the same peer group, so unmounting a pin here unmounts those copies
//! too and the namespace is really freed, instead of lingering in another namespace with the
//! pod's veth and IP still configured.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::statfs::{statfs, NSFS_MAGIC};

/// Makes `dir` (created if needed) a mount point with shared propagation in a peer group of
/// its own: a bind mount of itself made private, then shared. A dir that already is a shared
/// mount point is left as it is.
pub fn ensure_shared_mount_point(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    match crate::host::mount_at(&dir)? {
        Some(e) if e.shared => return Ok(()),
        Some(_) => {}
        None => {
            mount(
                Some(&dir),
                &dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            set_propagation(&dir, MsFlags::MS_PRIVATE)?;
        }
    }
    set_propagation(&dir, MsFlags::MS_SHARED)?;
    Ok(())
}

/// Changes the propagation type (`MS_PRIVATE`, `MS_SHARED`, …) of the mount at `dir`.
fn set_propagation(dir: &Path, propagation: MsFlags) -> nix::Result<()> {
    mount(None::<&str>, dir, None::<&str>, propagation, None::<&str>)
}

/// Whether `path` is a bind mount of a namespace (nsfs).
pub fn is_pinned(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// The pins to create; None = that namespace is the host's.
#[derive(Clone, Debug, Default)]
pub struct PinRequest {
    pub net: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    /// Set inside the new UTS namespace (requires `uts`).
    pub hostname: Option<String>,
}

/// Creates the requested namespaces, pinned on empty files it creates, sets the hostname in
/// the UTS namespace and brings `lo` up in the network namespace. Returns a description of
/// what failed.
pub async fn create(req: &PinRequest) -> Result<(), String> {
    let mut args: Vec<String> = Vec::new();
    for (flag, path) in [
        ("--net", &req.net),
        ("--ipc", &req.ipc),
        ("--uts", &req.uts),
    ] {
        if let Some(p) = path {
            std::fs::File::create(p).map_err(|e| format!("create {}: {e}", p.display()))?;
            args.push(format!("{flag}={}", p.display()));
        }
    }
    if args.is_empty() {
        return Ok(());
    }
    args.push("--".into());
    match (&req.uts, &req.hostname) {
        (Some(_), Some(h)) => {
            if h.is_empty() || h.starts_with('-') {
                return Err(format!("invalid hostname {h:?}"));
            }
            args.extend(["hostname".into(), h.clone()]);
        }
        _ => args.push("true".into()),
    }
    run("unshare", &args).await?;
    if let Some(net) = &req.net {
        let netns = format!("--net={}", net.display());
        let lo_up = [netns.as_str(), "ip", "link", "set", "lo", "up"].map(String::from);
        run("nsenter", &lo_up).await?;
    }
    Ok(())
}

/// Unmounts (if mounted) and removes a pin. Missing pins are fine.
pub fn remove_pin(path: &Path) -> io::Result<()> {
    if is_pinned(path) {
        umount2(path, MntFlags::MNT_DETACH)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

async fn run(program: &str, args: &[String]) -> Result<(), String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("run {program}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{program} {}: {}: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_file_is_not_pinned() {
        assert!(!is_pinned(Path::new("/proc/self/status")));
        assert!(!is_pinned(Path::new("/nonexistent/pin")));
    }
}
