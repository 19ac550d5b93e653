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

/// One line of /proc/self/mountinfo, the fields used here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// Has a `shared:N` optional field.
    pub shared: bool,
}

/// Parses /proc/self/mountinfo text (octal escapes such as `\040` decoded).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let mount_point = PathBuf::from(unescape(fields.get(4)?));
            let shared = fields.iter().skip(6).any(|f| f.starts_with("shared:"));
            let fs_type = right.split(' ').next()?.to_string();
            Some(MountEntry {
                mount_point,
                fs_type,
                shared,
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            let digits = std::str::from_utf8(oct)
                .ok()
                .filter(|o| o.bytes().all(|c| c.is_ascii_digit()));
            if let Some(b) = digits.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last (topmost) mount at exactly `path`.
pub fn mount_at<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == path)
}

/// Makes `dir` (created if needed) a mount point with shared propagation in a peer group of
/// its own: a bind mount of itself made private, then shared. A dir that already is a shared
/// mount point is left as it is.
pub fn ensure_shared_mount_point(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let entries = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo")?);
    match mount_at(&entries, &dir) {
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

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
46 27 0:4 net:[4026532180] /run/nodelet/sandboxes/u1/net rw - nsfs nsfs rw
50 27 254:0 /run/nodelet/sandboxes /run/nodelet/sandboxes rw shared:7 - ext4 /dev/vda rw
51 27 0:50 / /mnt/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_mountinfo() {
        let entries = parse_mountinfo(MOUNTINFO);
        assert_eq!(entries.len(), 4);
        assert!(entries[0].shared);
        assert_eq!(entries[1].fs_type, "nsfs");
        assert!(!entries[1].shared);
        let run = mount_at(&entries, Path::new("/run/nodelet/sandboxes")).unwrap();
        assert!(run.shared);
        assert_eq!(
            mount_at(&entries, Path::new("/mnt/with space"))
                .unwrap()
                .fs_type,
            "tmpfs"
        );
        assert!(mount_at(&entries, Path::new("/run")).is_none());
    }

    #[test]
    fn unescape_keeps_plain_backslashes() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("a\\b"), "a\\b");
        assert_eq!(unescape("end\\04"), "end\\04");
    }

    #[test]
    fn a_plain_file_is_not_pinned() {
        assert!(!is_pinned(Path::new("/proc/self/status")));
        assert!(!is_pinned(Path::new("/nonexistent/pin")));
    }
}
