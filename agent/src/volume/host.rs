//! Host-side checks and ownership: hostPath `type` checks (creating DirectoryOrCreate and
//! FileOrCreate targets) and fsGroup ownership (`chown -R :gid` plus setgid dirs) per
//! fsGroupChangePolicy, both as the kubelet does them.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Checks (and for the *OrCreate types creates) a hostPath of the given `type`.
/// Err carries a message for VolumeError::Invalid.
pub fn check_host_path(path: &Path, kind: Option<&str>) -> Result<(), String> {
    let meta = fs::metadata(path);
    let shown = path.display();
    let want = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!(
                "hostPath type check failed: {shown} is not a {what}"
            ))
        }
    };
    match kind.unwrap_or("") {
        "" => Ok(()),
        "DirectoryOrCreate" => match meta {
            Ok(m) => want(m.is_dir(), "directory"),
            Err(_) => {
                fs::create_dir_all(path).map_err(|e| format!("creating {shown}: {e}"))?;
                fs::set_permissions(path, fs::Permissions::from_mode(0o755))
                    .map_err(|e| format!("chmod {shown}: {e}"))
            }
        },
        "FileOrCreate" => match meta {
            Ok(m) => want(m.is_file(), "file"),
            Err(_) => {
                // Upstream does not create the parent directory.
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| format!("creating {shown}: {e}"))?;
                fs::set_permissions(path, fs::Permissions::from_mode(0o644))
                    .map_err(|e| format!("chmod {shown}: {e}"))
            }
        },
        kind => {
            let m =
                meta.map_err(|_| format!("hostPath type check failed: {shown} does not exist"))?;
            let t = m.file_type();
            match kind {
                "Directory" => want(t.is_dir(), "directory"),
                "File" => want(t.is_file(), "file"),
                "Socket" => want(t.is_socket(), "socket"),
                "CharDevice" => want(t.is_char_device(), "character device"),
                "BlockDevice" => want(t.is_block_device(), "block device"),
                other => Err(format!("invalid hostPath type {other:?}")),
            }
        }
    }
}

/// fsGroupChangePolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangePolicy {
    Always,
    OnRootMismatch,
}

impl ChangePolicy {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("OnRootMismatch") => ChangePolicy::OnRootMismatch,
            _ => ChangePolicy::Always,
        }
    }
}

const RW_MASK: u32 = 0o660;
const RO_MASK: u32 = 0o440;
const EXEC_MASK: u32 = 0o110;
const SETGID: u32 = 0o2000;

/// Gives `gid` group ownership of everything under `dir` (symlinks themselves, not their
/// targets), adds group read (and write unless `read_only`) and sets setgid on directories.
/// With OnRootMismatch nothing is done when the root already has the right group and bits.
pub fn apply_fs_group(
    dir: &Path,
    gid: u32,
    policy: ChangePolicy,
    read_only: bool,
) -> io::Result<()> {
    let mask = if read_only { RO_MASK } else { RW_MASK };
    if policy == ChangePolicy::OnRootMismatch {
        let m = fs::metadata(dir)?;
        let want = mask | EXEC_MASK | SETGID;
        if m.gid() == gid && m.mode() & want == want {
            return Ok(());
        }
    }
    walk(dir, &mut |path, meta| {
        std::os::unix::fs::lchown(path, None, Some(gid))?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let mut mode = (meta.mode() & 0o7777) | mask;
        if meta.is_dir() {
            mode |= EXEC_MASK | SETGID;
        }
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    })
}

fn walk(path: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata) -> io::Result<()>) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    f(path, &meta)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            walk(&entry?.path(), f)?;
        }
    }
    Ok(())
}
