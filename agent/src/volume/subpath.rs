//! subPath resolution that can never leave the volume: the path is opened with `openat2`
//! (RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) relative to an fd of the volume root, so `..`,
//! absolute symlinks and relative symlinks climbing out are refused by the kernel; missing
//! directories are created one component at a time with `mkdirat` on an fd already resolved
//! beneath the root.
//!
//! TOCTOU: the container runtime mounts later, in another process, so handing it a path that
//! was checked would let a container swap a component for a symlink in between. Instead the
//! opened fd is bind-mounted right away through `/proc/self/fd/N` (the kernel binds the very
//! inode that was resolved) onto a directory only the agent controls,
//! `<pod>/volume-subpaths/<volume>/<container>/<index>`, and that mount is what the runtime
//! receives. This is what the kubelet does too.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::sys::stat::{fchmod, fstat, mkdirat, Mode, SFlag};

use super::mount;

/// Why a subPath was refused or could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum SubPathError {
    /// The subPath is absolute, has `..`, or resolves outside the volume.
    #[error("subPath {0:?} escapes the volume or is not a relative path")]
    Escapes(String),
    /// A filesystem or mount operation failed.
    #[error("subPath {path:?}: {op}: {errno}")]
    Sys {
        path: String,
        op: &'static str,
        errno: Errno,
    },
}

/// Rejects absolute paths and `..` components before touching the filesystem.
pub fn validate(sub: &str) -> Result<(), SubPathError> {
    let p = Path::new(sub);
    if p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(SubPathError::Escapes(sub.to_string()));
    }
    Ok(())
}

fn how() -> OpenHow {
    OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

/// Opens `sub` beneath `root` as an O_PATH fd, creating missing directories with `mode`.
pub fn open_beneath(root: &Path, sub: &str, mode: u32) -> Result<OwnedFd, SubPathError> {
    validate(sub)?;
    let sys = |op, errno| SubPathError::Sys {
        path: sub.to_string(),
        op,
        errno,
    };
    let root_fd = openat(
        AT_FDCWD,
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| sys("open volume root", e))?;
    let parts: Vec<&str> = Path::new(sub)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => n.to_str(),
            _ => None,
        })
        .collect();
    if parts.is_empty() {
        return Ok(root_fd);
    }
    // Walk prefixes so each step is resolved beneath the root as a whole (a relative symlink
    // that stays inside is fine; one that leaves is EXDEV).
    let mut current = root_fd.try_clone().map_err(|_| sys("dup", Errno::EBADF))?;
    for i in 0..parts.len() {
        let prefix = parts[..=i].join("/");
        match openat2(&root_fd, prefix.as_str(), how()) {
            Ok(fd) => current = fd,
            Err(Errno::ENOENT) => {
                // Create the missing component on the fd of its (verified) parent, then open it
                // without following a symlink someone may have raced in, and give it the whole
                // mode (the umask cut it; setgid and sticky included), as the kubelet does.
                let created = match mkdirat(&current, parts[i], Mode::from_bits_truncate(mode)) {
                    Ok(()) => true,
                    Err(Errno::EEXIST) => false,
                    Err(e) => return Err(sys("mkdir", e)),
                };
                current = openat(
                    &current,
                    parts[i],
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| sys("open created dir", e))?;
                if created {
                    fchmod(&current, Mode::from_bits_truncate(mode))
                        .map_err(|e| sys("chmod created dir", e))?;
                }
            }
            Err(Errno::EXDEV) | Err(Errno::ELOOP) => {
                return Err(SubPathError::Escapes(sub.to_string()))
            }
            Err(e) => return Err(sys("openat2", e)),
        }
    }
    Ok(current)
}

/// Resolves `sub` beneath `root` and binds it onto `target` (created as a file or a dir to
/// match). An existing mount at `target` is replaced, so a restarted container gets a fresh
/// resolution.
pub fn bind_beneath(root: &Path, sub: &str, target: &Path) -> Result<(), SubPathError> {
    let sys = |op, errno| SubPathError::Sys {
        path: sub.to_string(),
        op,
        errno,
    };
    let io = |op| move |e: std::io::Error| sys(op, Errno::from_raw(e.raw_os_error().unwrap_or(0)));
    let root_mode = fs::metadata(root).map_err(io("stat volume root"))?;
    let fd = open_beneath(
        root,
        sub,
        std::os::unix::fs::PermissionsExt::mode(&root_mode.permissions()) & 0o7777,
    )?;
    let st = fstat(&fd).map_err(|e| sys("fstat", e))?;
    let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
    while mount::is_mounted(target).map_err(io("mountinfo"))? {
        mount::unmount(target).map_err(io("unmount old subpath"))?;
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io("mkdir"))?;
    }
    if fs::symlink_metadata(target).is_ok_and(|m| m.is_dir() != is_dir) {
        let _ = fs::remove_file(target).or_else(|_| fs::remove_dir(target));
    }
    if fs::symlink_metadata(target).is_err() {
        if is_dir {
            fs::create_dir(target).map_err(io("mkdir"))?;
        } else {
            fs::File::create(target).map_err(io("create"))?;
        }
    }
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    mount::bind(Path::new(&source), target, false).map_err(io("bind"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nodelet-subpath-{:x}", rand::random::<u64>()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn fd_path(fd: &OwnedFd) -> std::path::PathBuf {
        fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
    }

    #[test]
    fn refuses_escapes() {
        let root = tempdir();
        let vol = root.join("vol");
        fs::create_dir_all(vol.join("inner")).unwrap();
        symlink("/etc", vol.join("evil")).unwrap();
        symlink("../../", vol.join("inner/up")).unwrap();
        symlink("inner", vol.join("ok")).unwrap();
        for sub in [
            "evil/passwd",
            "evil",
            "inner/up/x",
            "../x",
            "/etc",
            "a/../../b",
        ] {
            assert!(
                matches!(
                    open_beneath(&vol, sub, 0o755),
                    Err(SubPathError::Escapes(_))
                ),
                "{sub}"
            );
        }
        // A symlink that stays inside the volume is fine.
        let fd = open_beneath(&vol, "ok", 0o755).unwrap();
        assert_eq!(fd_path(&fd), fs::canonicalize(vol.join("inner")).unwrap());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn creates_missing_dirs() {
        let vol = tempdir();
        let fd = open_beneath(&vol, "a/b/c", 0o750).unwrap();
        assert_eq!(fd_path(&fd), fs::canonicalize(&vol).unwrap().join("a/b/c"));
        assert!(vol.join("a/b/c").is_dir());
        // Existing path: opened as is.
        fs::write(vol.join("a/f"), "x").unwrap();
        let fd = open_beneath(&vol, "a/f", 0o750).unwrap();
        assert_eq!(fd_path(&fd), fs::canonicalize(vol.join("a/f")).unwrap());
        fs::remove_dir_all(&vol).unwrap();
    }

    #[test]
    fn created_dirs_get_the_whole_mode_despite_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let vol = tempdir();
        // The root of a Memory emptyDir with an fsGroup: drwxrwsrwt.
        fs::set_permissions(&vol, fs::Permissions::from_mode(0o3777)).unwrap();
        let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
        let made = open_beneath(&vol, "test-sub/inner", 0o3777).map(drop);
        nix::sys::stat::umask(old);
        made.unwrap();
        for dir in ["test-sub", "test-sub/inner"] {
            let mode = fs::metadata(vol.join(dir)).unwrap().permissions().mode();
            assert_eq!(mode & 0o7777, 0o3777, "{dir}: {mode:o}");
        }
        fs::remove_dir_all(&vol).unwrap();
    }
}
