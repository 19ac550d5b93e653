//! Host mount operations for volumes: bind (optionally remounted read-only), tmpfs, block
//! device formatting and mounting, and the mount table (`/proc/self/mountinfo`) to notice
//! existing mounts and to unmount everything under a directory, deepest first.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::host::{mounts_where, Mount};

/// The top-most mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> io::Result<Option<Mount>> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    crate::host::mount_at(&path)
}

/// True when something is mounted at `path`.
pub fn is_mounted(path: &Path) -> io::Result<bool> {
    Ok(mount_at(path)?.is_some())
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Bind-mounts `src` on `dst`; read-only through a second remount when `read_only`.
pub fn bind(src: &Path, dst: &Path, read_only: bool) -> io::Result<()> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(errno)?;
    if read_only {
        remount_read_only(dst)?;
    }
    Ok(())
}

/// Makes an existing bind mount read-only.
pub fn remount_read_only(dst: &Path) -> io::Result<()> {
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(errno)
}

/// Mounts a tmpfs on `dst` with an optional size limit in bytes.
pub fn tmpfs(dst: &Path, size: Option<u64>) -> io::Result<()> {
    // A fresh tmpfs's own default, sticky like /tmp: the kubelet keeps it on Memory emptyDirs.
    let mut data = String::from("mode=1777");
    if let Some(size) = size {
        data.push_str(&format!(",size={size}"));
    }
    mount(
        Some("tmpfs"),
        dst,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(errno)
}

/// Mounts a filesystem from a block device.
pub fn mount_device(dev: &Path, dst: &Path, fs_type: &str, read_only: bool) -> io::Result<()> {
    let flags = if read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    mount(Some(dev), dst, Some(fs_type), flags, None::<&str>).map_err(errno)
}

/// True when `path` is a block device node.
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// The filesystem type on a device ("" when it has none), by blkid.
pub fn probe_fs_type(dev: &Path) -> io::Result<String> {
    let out = Command::new("blkid")
        .args(["-p", "-s", "TYPE", "-o", "value"])
        .arg(dev)
        .output()?;
    // blkid exits 2 when it finds nothing.
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        Some(2) => Ok(String::new()),
        _ => Err(io::Error::other(format!(
            "blkid {}: {}",
            dev.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Creates a filesystem of `fs_type` on `dev` when it has none; refuses a different one.
pub fn format_if_blank(dev: &Path, fs_type: &str) -> io::Result<()> {
    let existing = probe_fs_type(dev)?;
    if existing == fs_type {
        return Ok(());
    }
    if !existing.is_empty() {
        return Err(io::Error::other(format!(
            "{} holds {existing}, not {fs_type}",
            dev.display()
        )));
    }
    let mut cmd = Command::new(format!("mkfs.{fs_type}"));
    if fs_type.starts_with("ext") {
        cmd.args(["-F", "-q"]);
    }
    let out = cmd.arg(dev).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "mkfs.{fs_type} {}: {}",
            dev.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Unmounts `path` (lazily when it is busy).
pub fn unmount(path: &Path) -> io::Result<()> {
    match umount2(path, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::Error::EBUSY) => umount2(path, MntFlags::MNT_DETACH).map_err(errno),
        Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(e) => Err(errno(e)),
    }
}

/// Mount points at or beneath `dir`, deepest first; only those are read out of the table.
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = mounts_where(|p| p.starts_with(dir))?
        .into_iter()
        .map(|m| m.mount_point)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(found)
}

/// Unmounts everything at or beneath `dir` (stacked mounts too), deepest first.
pub fn unmount_all_under(dir: &Path) -> io::Result<()> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    // Each pass unmounts the top of every stack; a bounded number of passes handles stacks.
    for _ in 0..16 {
        let found = mounts_under(&dir)?;
        if found.is_empty() {
            return Ok(());
        }
        for path in found {
            unmount(&path)?;
        }
    }
    let left = mounts_under(&dir)?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "mounts remain under {}: {left:?}",
            dir.display()
        )))
    }
}
