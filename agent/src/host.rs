//! Facts of the machine the agent runs on, read from /proc through the procfs crate (and the
//! filesystem size through statvfs), one place for each: the node's status, the downward API's
//! node allocatable and the OOM score of a container all read them here, so they cannot
//! disagree.
//!
//! The mount table is the one fact read by hand ([`mounts`]): procfs's `MountInfo` keeps the
//! kernel's octal escapes in mount points (`\040` for a space), so a path with a space would
//! never match its mount.

use std::path::{Path, PathBuf};

use procfs::Current;

/// Usable memory in bytes (`MemTotal`); 0 when /proc cannot be read.
pub fn memory_total() -> u64 {
    procfs::Meminfo::current().map_or(0, |m| m.mem_total)
}

/// Memory available to new work in bytes (`MemAvailable`); 0 when unknown.
pub fn memory_available() -> u64 {
    procfs::Meminfo::current()
        .ok()
        .and_then(|m| m.mem_available)
        .unwrap_or(0)
}

/// The processors the kernel lists, or what the process may use when /proc says nothing;
/// at least 1.
pub fn cpus() -> usize {
    match procfs::CpuInfo::current().map_or(0, |c| c.num_cores()) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Scheduling entities (processes and threads) that exist now.
pub fn threads() -> u64 {
    procfs::LoadAverage::current().map_or(0, |l| u64::from(l.max))
}

/// The kernel's `pid_max`; 0 when unknown.
pub fn pid_max() -> u64 {
    procfs::sys::kernel::pid_max().map_or(0, |n| u64::try_from(n).unwrap_or(0))
}

/// (size, available) in bytes of the filesystem holding `dir`, or of its nearest existing
/// ancestor (the root dir may not exist yet); zeros when none answers.
pub fn filesystem(dir: &Path) -> (u64, u64) {
    for d in dir.ancestors() {
        if let Ok(s) = nix::sys::statvfs::statvfs(d) {
            let frag = s.fragment_size();
            return (s.blocks() * frag, s.blocks_available() * frag);
        }
    }
    (0, 0)
}

/// One mount of this process's mount namespace, a line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The filesystem type (ext4, tmpfs, nsfs, …).
    pub fs_type: String,
    /// The mount source (device or "tmpfs").
    pub source: String,
    /// Per-mount options (rw/ro, nosuid, …).
    pub options: Vec<String>,
    /// Has a `shared:N` optional field (shared propagation).
    pub shared: bool,
}

/// The mount table of this process's mount namespace, in mount order.
pub fn mounts() -> std::io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Parses mountinfo text, octal escapes decoded.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                mount_point: PathBuf::from(unescape(left.get(4)?)),
                options: left.get(5)?.split(',').map(str::to_string).collect(),
                shared: left.iter().skip(6).any(|f| f.starts_with("shared:")),
                fs_type: right.first()?.to_string(),
                source: unescape(right.get(1).unwrap_or(&"")),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …); a backslash not followed by three
/// octal digits stays as it is.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|o| bytes[i] == b'\\' && o.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let Some(o) = octal {
            let v = o.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machines_facts_are_read() {
        let total = memory_total();
        assert!(total > 64 << 20, "MemTotal {total}");
        assert!((1..=total).contains(&memory_available()));
        assert!(cpus() >= 1);
        assert!(threads() >= 1);
        assert!(pid_max() >= threads());
        let (size, available) = filesystem(Path::new("/no/such/dir/below/root"));
        assert!(size > 0 && available <= size, "{size} {available}");
    }

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    37 35 0:5 / /dev/shm rw,nosuid shared:2 - tmpfs tmpfs rw,size=65536k\n\
                    46 27 0:4 net:[4026532180] /run/nodelet/sandboxes/u1/net rw - nsfs nsfs rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[0].source, "/dev/root");
        assert_eq!(m[0].options, vec!["rw", "noatime"]);
        assert!(!m[0].shared, "master: is not shared:");
        assert_eq!(m[1].fs_type, "tmpfs");
        assert!(m[1].shared);
        assert_eq!(m[2].fs_type, "nsfs");
        assert!(!m[2].shared);
        assert!(mounts()
            .unwrap()
            .iter()
            .any(|m| m.mount_point == Path::new("/")));
    }

    #[test]
    fn unescape_decodes_octal_and_keeps_other_backslashes() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("a\\011b"), "a\tb");
        assert_eq!(unescape("a\\b"), "a\\b");
        assert_eq!(unescape("end\\04"), "end\\04");
        assert_eq!(unescape("a\\"), "a\\");
        assert_eq!(unescape("\\0"), "\\0");
        assert_eq!(unescape("\\089"), "\\089", "8 and 9 are not octal");
    }
}
