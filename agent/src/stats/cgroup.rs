//! Usage counters of a cgroup, read from its files: cumulative CPU time, memory (the working set
//! as cAdvisor counts it: usage less inactive file pages) and swap, on the v1 hierarchies or the
//! unified v2 one. Read by hand: the crates that know cgroups (cgroups-rs) manage them, and would
//! bring their whole controller API for these few reads.

use std::path::{Path, PathBuf};

use procfs::Current;

/// Where the cgroup hierarchies are mounted, and which kind they are.
#[derive(Clone, Debug)]
pub enum Cgroups {
    /// One hierarchy per controller under the root (`cpuacct/`, `memory/`).
    V1(PathBuf),
    /// The unified hierarchy at the root.
    V2(PathBuf),
}

/// A cgroup's memory as the summary API counts it, in bytes (faults in counts).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Memory {
    pub(super) usage: u64,
    pub(super) working_set: u64,
    pub(super) rss: u64,
    pub(super) page_faults: u64,
    pub(super) major_page_faults: u64,
    /// The cgroup's memory limit; None when unlimited.
    pub(super) limit: Option<u64>,
}

/// A v1 limit at or past this is "unlimited" (the kernel writes the largest page multiple).
const V1_UNLIMITED: u64 = 1 << 62;

impl Cgroups {
    /// The host's hierarchies at /sys/fs/cgroup.
    pub fn of_host() -> Self {
        Self::at(Path::new("/sys/fs/cgroup"))
    }

    /// The hierarchies under `root`: unified when it lists its controllers.
    pub fn at(root: &Path) -> Self {
        if root.join("cgroup.controllers").exists() {
            Cgroups::V2(root.to_path_buf())
        } else {
            Cgroups::V1(root.to_path_buf())
        }
    }

    /// Cumulative CPU time of the cgroup at `rel` ("" for the root) in nanoseconds.
    pub(super) fn cpu_ns(&self, rel: &str) -> Option<u64> {
        match self {
            Cgroups::V1(root) => read_u64(&root.join("cpuacct").join(rel).join("cpuacct.usage")),
            Cgroups::V2(root) => {
                let stat = std::fs::read_to_string(root.join(rel).join("cpu.stat")).ok()?;
                keyed(&stat, "usage_usec").map(|us| us.saturating_mul(1000))
            }
        }
    }

    /// Memory of the cgroup at `rel`; the v2 root, which has no `memory.current`, is read from
    /// /proc/meminfo as cAdvisor reads it.
    pub(super) fn memory(&self, rel: &str) -> Option<Memory> {
        let (usage, limit, stat, [inactive, rss, faults, major]) = match self {
            Cgroups::V1(root) => {
                let dir = root.join("memory").join(rel);
                let limit =
                    read_u64(&dir.join("memory.limit_in_bytes")).filter(|&l| l < V1_UNLIMITED);
                let keys = [
                    "total_inactive_file",
                    "total_rss",
                    "total_pgfault",
                    "total_pgmajfault",
                ];
                (
                    read_u64(&dir.join("memory.usage_in_bytes"))?,
                    limit,
                    dir,
                    keys,
                )
            }
            Cgroups::V2(_) if rel.is_empty() => return node_memory_from_meminfo(),
            Cgroups::V2(root) => {
                let dir = root.join(rel);
                let keys = ["inactive_file", "anon", "pgfault", "pgmajfault"];
                // "max" does not parse: unlimited.
                let limit = read_u64(&dir.join("memory.max"));
                (read_u64(&dir.join("memory.current"))?, limit, dir, keys)
            }
        };
        let stat = std::fs::read_to_string(stat.join("memory.stat")).ok()?;
        let value = |key| keyed(&stat, key).unwrap_or(0);
        Some(Memory {
            usage,
            working_set: usage.saturating_sub(value(inactive)),
            rss: value(rss),
            page_faults: value(faults),
            major_page_faults: value(major),
            limit,
        })
    }
}

/// A cgroup's swap: what it uses and its limit (None when unlimited), in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Swap {
    pub(super) usage: u64,
    pub(super) limit: Option<u64>,
}

impl Cgroups {
    /// Swap of the cgroup at `rel`: v1 counts memory and swap together (`memsw`), v2 apart;
    /// nothing when the kernel does not account swap.
    pub(super) fn swap(&self, rel: &str) -> Swap {
        match self {
            Cgroups::V1(root) => {
                let dir = root.join("memory").join(rel);
                let read = |file: &str| read_u64(&dir.join(file));
                let usage = read("memory.memsw.usage_in_bytes")
                    .zip(read("memory.usage_in_bytes"))
                    .map_or(0, |(both, memory)| both.saturating_sub(memory));
                let limit = read("memory.memsw.limit_in_bytes")
                    .filter(|&l| l < V1_UNLIMITED)
                    .zip(read("memory.limit_in_bytes"))
                    .map(|(both, memory)| both.saturating_sub(memory));
                Swap { usage, limit }
            }
            Cgroups::V2(root) => Swap {
                usage: read_u64(&root.join(rel).join("memory.swap.current")).unwrap_or(0),
                limit: read_u64(&root.join(rel).join("memory.swap.max")),
            },
        }
    }
}

/// The node's swap from /proc/meminfo: (total, free) in bytes.
pub(super) fn node_swap() -> (u64, u64) {
    procfs::Meminfo::current().map_or((0, 0), |m| (m.swap_total, m.swap_free))
}

fn node_memory_from_meminfo() -> Option<Memory> {
    let m = procfs::Meminfo::current().ok()?;
    let usage = m.mem_total.saturating_sub(m.mem_free);
    Some(Memory {
        usage,
        working_set: usage.saturating_sub(m.inactive_file.unwrap_or(0)),
        rss: m.active_anon.unwrap_or(0) + m.inactive_anon.unwrap_or(0),
        ..Memory::default()
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a `key value` per line file (memory.stat, cpu.stat).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}
