//! Facts of the machine the agent runs on, read from /proc through the procfs crate (and the
//! filesystem size through statvfs), one place for each: the node's status, the downward API's
//! node allocatable and the OOM score of a container all read them here, so they cannot
//! disagree.
//!
//! The mount table is the one fact read by hand ([`mounts`]): procfs's `MountInfo` keeps the
//! kernel's octal escapes in mount points (`\040` for a space), so a path with a space would
//! never match its mount. It is read line by line and only the mounts asked for are made
//! ([`mounts_where`]): during a teardown burst every pod reads it, and a table of thousands of
//! mounts read whole per pod fragmented the heap.

use std::borrow::Cow;
use std::io::{self, BufRead};
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
pub fn mounts() -> io::Result<Vec<Mount>> {
    mounts_where(|_| true)
}

/// The mounts whose mount point `keep` keeps, in mount order.
pub fn mounts_where(keep: impl FnMut(&Path) -> bool) -> io::Result<Vec<Mount>> {
    let file = std::fs::File::open("/proc/self/mountinfo")?;
    read_mountinfo(io::BufReader::new(file), keep)
}

/// The top-most mount at exactly `path` (as given: canonical if it is to match), if any.
pub fn mount_at(path: &Path) -> io::Result<Option<Mount>> {
    Ok(mounts_where(|p| p == path)?.pop())
}

/// Reads mountinfo line by line, octal escapes decoded; a line is made into a [`Mount`] only
/// when `keep` keeps its mount point.
fn read_mountinfo(
    mut reader: impl BufRead,
    mut keep: impl FnMut(&Path) -> bool,
) -> io::Result<Vec<Mount>> {
    let mut found = Vec::new();
    let mut line = String::new();
    while {
        line.clear();
        reader.read_line(&mut line)? > 0
    } {
        found.extend(parse_line(line.trim_end_matches('\n'), &mut keep));
    }
    Ok(found)
}

fn parse_line(line: &str, keep: &mut impl FnMut(&Path) -> bool) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let mut left = left.split(' ');
    let mount_point = unescape(left.nth(4)?);
    if !keep(Path::new(&*mount_point)) {
        return None;
    }
    let options = left.next()?;
    let shared = left.any(|f| f.starts_with("shared:"));
    let mut right = right.split(' ');
    let fs_type = right.next()?;
    Some(Mount {
        mount_point: PathBuf::from(mount_point.into_owned()),
        options: options.split(',').map(str::to_string).collect(),
        shared,
        fs_type: fs_type.to_string(),
        source: unescape(right.next().unwrap_or("")).into_owned(),
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …); a backslash not followed by three
/// octal digits stays as it is. Without a backslash it is the text itself (no copy).
fn unescape(s: &str) -> Cow<'_, str> {
    if !s.contains('\\') {
        return Cow::Borrowed(s);
    }
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
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
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
        let m = read_mountinfo(text.as_bytes(), |_| true).unwrap();
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

    /// #17: asking for the mounts under one pod's directory makes only those: the peak heap of
    /// reading a table of 10,000 mounts stays that of one line, where making every mount (as
    /// each of a burst of teardowns did) holds megabytes.
    #[test]
    fn reading_the_mounts_under_a_directory_makes_only_those() {
        let text: String = (0..10_000)
            .map(|i| {
                format!(
                    "{i} 35 0:{i} / /var/lib/nodelet/pods/uid-{i}/volumes/kubernetes.io~empty-dir/scratch\\040{i} rw,nosuid shared:{i} - tmpfs tmpfs rw,size=65536k\n"
                )
            })
            .collect();
        let under = Path::new("/var/lib/nodelet/pods/uid-7/volumes");
        let (found, peak) = crate::heap::peak_of(|| {
            read_mountinfo(text.as_bytes(), |p| p.starts_with(under)).unwrap()
        });
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].mount_point,
            under.join("kubernetes.io~empty-dir/scratch 7")
        );
        assert!(peak < 4096, "reading the table held {peak} bytes at once");
        let (all, peak) =
            crate::heap::peak_of(|| read_mountinfo(text.as_bytes(), |_| true).unwrap());
        assert_eq!(all.len(), 10_000);
        assert!(peak > 1 << 20, "the whole table is {peak} bytes");
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
