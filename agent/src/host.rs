//! Facts of the machine the agent runs on, read from /proc through the procfs crate (and the
//! filesystem size through statvfs), one place for each: the node's status, the downward API's
//! node allocatable and the OOM score of a container all read them here, so they cannot
//! disagree.

use std::path::Path;

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
}
