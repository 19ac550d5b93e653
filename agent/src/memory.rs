//! Giving memory back to the node. glibc keeps freed heap in its arenas (one per thread that
//! ever allocated, up to eight per core) and returns little of it by itself: after a burst of
//! pods is gone the agent stayed at its peak. Two calls fix that: the arena count is capped
//! once at start (`mallopt(M_ARENA_MAX)`), and `malloc_trim(0)` runs shortly after the pod set
//! shrank (coalesced, so a burst of deletions trims once). Both are glibc's; elsewhere they do
//! nothing. The libc crate is the binding; no crate wraps these two calls more safely.
//! Trimming returns only free memory at the heap's top: the maps that grew during a burst give
//! their room back first ([`give_back`]), or they pin what lies above them.
#![allow(unsafe_code)]

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Arenas glibc may make: one. The agent allocates little per operation and its threads rarely
/// contend on malloc; a second arena held 1-2 MiB of fragments after a burst for no measured
/// gain in start latency or CPU (`scripts/bench footprint`, 100 pods: held heap 13.5 → 12.3
/// MiB, after teardown 9.0 → 8.3 MiB, start p50/p99 and CPU per cycle unchanged).
const ARENAS: i32 = 1;
/// How long after the first pod ended the heap is trimmed (the rest of a teardown burst ends
/// meanwhile).
const TRIM_AFTER: Duration = Duration::from_secs(2);

static TRIM_PENDING: AtomicBool = AtomicBool::new(false);

/// Caps glibc's malloc arenas. Call once at start, before any thread is made.
pub fn cap_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt sets one allocator parameter; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Returns the free heap to the kernel now.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory malloc holds free; glibc makes it thread safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims the heap shortly, once however many pods end meanwhile. Outside a tokio runtime it
/// does nothing.
pub fn trim_soon() {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if TRIM_PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    handle.spawn(async {
        tokio::time::sleep(TRIM_AFTER).await;
        TRIM_PENDING.store(false, Ordering::Release);
        trim();
    });
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
pub fn give_back(c: &mut impl Spare) {
    if c.mostly_spare() {
        c.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// #17: a map that grew during a burst gives its room back once mostly empty, and one
    /// still well used keeps it.
    #[test]
    fn a_map_mostly_emptied_gives_its_capacity_back() {
        let mut pods: HashMap<String, u64> = (0..1000).map(|i| (format!("uid-{i}"), i)).collect();
        pods.retain(|_, i| *i < 500);
        give_back(&mut pods);
        assert!(pods.capacity() >= 1000, "half full keeps its room");
        let before = crate::heap::live();
        pods.retain(|_, i| *i < 10);
        give_back(&mut pods);
        assert!(pods.capacity() < 32, "capacity {} for 10", pods.capacity());
        assert!(
            before - crate::heap::live() > 16 * 1024,
            "the table's room went back to the allocator"
        );
        assert_eq!(pods.len(), 10);
    }
}
