//! Giving memory back to the node. Two kinds of memory stay with a process after the work that
//! needed them is over:
//! - freed heap: glibc keeps it in its arenas (one per thread that ever allocated, up to eight
//!   per core) and returns little of it by itself. The arena count is capped once at start
//!   (`mallopt(M_ARENA_MAX)`) and `malloc_trim(0)` returns the free pages.
//! - the executable's own pages: code and read-only data run once (start-up, the pod start and
//!   teardown paths of a burst) stay mapped for the process's life, and the kernel maps 64 KiB
//!   around every page faulted in. The idle agent had 10-12 MiB of its 29 MB binary resident
//!   where the code it runs while idle is about 2 MiB. `madvise(MADV_PAGEOUT)` on those
//!   mappings (Linux 5.4) gives them back: they are clean pages of the file, read again on
//!   their next use. What reclaim leaves mapped (after a burst in cluster mode, most of it:
//!   probably large page-cache folios it does not split) is unmapped from the code's mapping
//!   (`MADV_DONTNEED`): it leaves the agent's resident set and stays in the page cache as
//!   clean pages the kernel drops first.
//!
//! Trimming returns only free pages: the tables that grew during a burst give their room back
//! first ([`shrink_spare`]), or they pin what lies around them.
//!
//! Both run once the pods have settled: no pod status changed for [`QUIET`] (start-up counts
//! as a change), at most once per [`MIN_INTERVAL`] so a crash-looping pod does not make the
//! agent read its code again and again. The glibc calls and madvise are the libc crate's; no
//! crate wraps these calls more safely.
#![allow(unsafe_code)]

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasher, Hash};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Arenas glibc may make: one. The agent allocates little per operation and its threads rarely
/// contend on malloc; a second arena held 1-2 MiB of fragments after a burst for no measured
/// gain in start latency or CPU (`scripts/bench footprint`, 100 pods: held heap 13.5 → 12.3
/// MiB, after teardown 9.0 → 8.3 MiB, start p50/p99 and CPU per cycle unchanged).
const ARENAS: i32 = 1;
/// How long no pod status may change before memory is given back.
pub const QUIET: Duration = Duration::from_secs(2);
/// The least time between two give-backs.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);

/// Caps glibc's malloc arenas. Call once at start, before any thread is made.
pub fn cap_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt sets one allocator parameter; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Returns the free heap and the executable's resident pages to the kernel now. Blocking: a
/// few milliseconds.
pub fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory malloc holds free; glibc makes it thread safe.
    unsafe {
        libc::malloc_trim(0);
    }
    let paged = page_out_executable();
    debug!(bytes = paged, "gave memory back");
}

/// Pages out every read-only mapping of the agent's own executable; returns their size.
/// Writable mappings (data, relocated pages) are left: they are not the file's pages.
fn page_out_executable() -> u64 {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return 0;
    };
    let Ok(maps) = procfs::process::Process::myself().and_then(|p| p.maps()) else {
        return 0;
    };
    let mut total = 0;
    for map in maps {
        let own = matches!(&map.pathname, procfs::process::MMapPath::Path(p) if *p == exe);
        if !own || map.perms.contains(procfs::process::MMPermissions::WRITE) {
            continue;
        }
        let (start, end) = map.address;
        let (addr, len) = (start as *mut libc::c_void, (end - start) as usize);
        // SAFETY: the range is a whole mapping of this process, read from its own maps;
        // MADV_PAGEOUT only reclaims pages the kernel can read back or never drops (a
        // relocated page without swap stays), so no memory the program uses changes.
        let paged = unsafe { libc::madvise(addr, len, libc::MADV_PAGEOUT) } == 0;
        // What reclaim left (probably large page-cache folios it does not split, read ahead
        // as pages fault back after an earlier give-back) is unmapped: it stays
        // in the page cache, clean, and the kernel drops it first when it needs memory. Only
        // the code: it is never written (no text relocations), so its pages are the file's,
        // where a read-only mapping may hold relocated copies (RELRO) that must stay.
        let code = map.perms.contains(procfs::process::MMPermissions::EXECUTE);
        // SAFETY: as above; MADV_DONTNEED on a private file mapping whose pages are all the
        // file's drops only their mappings, and the next access maps the file's page again.
        let unmapped = code && unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) } == 0;
        if paged || unmapped {
            total += end - start;
        }
    }
    total
}

/// Gives memory back each time the pods settle: `changes` ticks on every change of a pod's
/// status (the status manager's). Runs until `cancel`.
pub async fn give_back_when_settled(changes: watch::Receiver<u64>, cancel: CancellationToken) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = settle_loop(changes, QUIET, MIN_INTERVAL, || {
            // Detached: it ends on its own, well within the interval.
            drop(tokio::task::spawn_blocking(give_back));
        }) => {}
    }
}

/// Runs `act` each time `changes` has been quiet for `quiet`, at most once per `interval`.
async fn settle_loop(
    mut changes: watch::Receiver<u64>,
    quiet: Duration,
    interval: Duration,
    act: impl Fn(),
) {
    let mut last: Option<Instant> = None;
    loop {
        // Settled: no change for `quiet` (the first pass stands for start-up's change).
        match tokio::time::timeout(quiet, changes.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return,
            Err(_) => {}
        }
        if let Some(wait) = last.and_then(|t| interval.checked_sub(t.elapsed())) {
            tokio::time::sleep(wait).await;
            continue;
        }
        act();
        last = Some(Instant::now());
        // Nothing to give back until a pod changes again.
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// A collection that can say it holds mostly spare capacity, and give that back.
pub trait Spare {
    /// Holds under a quarter of what it has room for.
    fn mostly_spare(&self) -> bool;
    fn shrink_to_fit(&mut self);
}

impl<K: Eq + Hash, V, S: BuildHasher> Spare for HashMap<K, V, S> {
    fn mostly_spare(&self) -> bool {
        self.len() < self.capacity() / 4
    }
    fn shrink_to_fit(&mut self) {
        HashMap::shrink_to_fit(self);
    }
}

impl<T: Eq + Hash, S: BuildHasher> Spare for HashSet<T, S> {
    fn mostly_spare(&self) -> bool {
        self.len() < self.capacity() / 4
    }
    fn shrink_to_fit(&mut self) {
        HashSet::shrink_to_fit(self);
    }
}

impl<T: Ord> Spare for BinaryHeap<T> {
    fn mostly_spare(&self) -> bool {
        self.len() < self.capacity() / 4
    }
    fn shrink_to_fit(&mut self) {
        BinaryHeap::shrink_to_fit(self);
    }
}

/// Gives back the capacity a burst grew once it is mostly unused (under a quarter held), so
/// the heap can be trimmed after the burst: a map keeps the room it once needed otherwise. A
/// map shrunk here grows again by doubling, so shrinking and growing across the threshold
/// costs no more than its growth did.
pub fn shrink_spare(c: &mut impl Spare) {
    if c.mostly_spare() {
        c.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// #17: a map that grew during a burst gives its room back once mostly empty, and one
    /// still well used keeps it.
    #[test]
    fn a_map_mostly_emptied_gives_its_capacity_back() {
        let mut pods: HashMap<String, u64> = (0..1000).map(|i| (format!("uid-{i}"), i)).collect();
        pods.retain(|_, i| *i < 500);
        shrink_spare(&mut pods);
        assert!(pods.capacity() >= 1000, "half full keeps its room");
        let before = crate::heap::live();
        pods.retain(|_, i| *i < 10);
        shrink_spare(&mut pods);
        assert!(pods.capacity() < 32, "capacity {} for 10", pods.capacity());
        assert!(
            before - crate::heap::live() > 16 * 1024,
            "the table's room went back to the allocator"
        );
        assert_eq!(pods.len(), 10);
    }

    /// Resident KiB of this process's read-only mappings of its own executable.
    fn executable_resident_kib() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let exe = exe.to_string_lossy().into_owned();
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut own = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if let Some(rss) = line.strip_prefix("Rss:") {
                if own {
                    kib += rss
                        .trim()
                        .trim_end_matches(" kB")
                        .parse::<u64>()
                        .expect("Rss");
                }
            } else if line
                .split_whitespace()
                .next()
                .is_some_and(|f| f.contains('-'))
            {
                let fields: Vec<&str> = line.split_whitespace().collect();
                own = fields.len() > 5 && fields[5] == exe && !fields[1].contains('w');
            }
        }
        kib
    }

    #[test]
    fn giving_back_drops_the_executables_resident_pages() {
        // Touch code: this very test binary's pages are resident while it runs.
        let before = executable_resident_kib();
        assert!(
            before > 1024,
            "only {before} KiB of the test binary resident"
        );
        give_back();
        let after = executable_resident_kib();
        // Other tests run meanwhile and fault some code back in; most must be gone.
        assert!(
            after < before / 2,
            "resident executable pages {before} KiB before, {after} KiB after"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_given_back_once_the_pods_settle_and_not_more_often_than_the_interval() {
        let (tx, rx) = watch::channel(0u64);
        let acts = Arc::new(AtomicUsize::new(0));
        let counted = acts.clone();
        let quiet = Duration::from_secs(2);
        let interval = Duration::from_secs(10);
        let task = tokio::spawn(settle_loop(rx, quiet, interval, move || {
            counted.fetch_add(1, Ordering::SeqCst);
        }));
        // Start-up: given back once it is quiet.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(acts.load(Ordering::SeqCst), 1, "after start-up");
        // Statuses change every second for five seconds: nothing while they do.
        for _ in 0..5 {
            tx.send_modify(|g| *g += 1);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(acts.load(Ordering::SeqCst), 1, "while pods change");
        // Quiet again, but within the interval of the last give-back (at 2 s): waits for it.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(acts.load(Ordering::SeqCst), 1, "within the interval");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            acts.load(Ordering::SeqCst),
            2,
            "once the interval passed and all is quiet"
        );
        // Nothing changes: nothing more.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(acts.load(Ordering::SeqCst), 2, "with nothing changing");
        drop(tx);
        task.await.expect("loop ends with its sender");
    }
}
