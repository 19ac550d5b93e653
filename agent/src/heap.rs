//! A counting global allocator for the unit tier's heap tests (test builds only): it keeps, per
//! thread, the bytes allocated minus the bytes freed on that thread. A test on a current-thread
//! runtime (`#[tokio::test]`) runs its tasks on its own thread, so the difference of [`live`]
//! across a step is the heap that step left behind, whatever other tests run meanwhile.
//! Written by hand: dhat's testing mode counts the whole process and wants a test binary of its
//! own, while this counts one thread and needs nothing beyond `std`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    /// Const-initialised and without a destructor: reading it never allocates.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// The most `LIVE` has been since [`peak_of`] last set it.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn add(bytes: isize) {
    // During thread teardown the slots may be gone; those bytes are not any test's.
    let _ = LIVE.try_with(|c| {
        let live = c.get() + bytes;
        c.set(live);
        let _ = PEAK.try_with(|p| p.set(p.get().max(live)));
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping only
// touches a thread-local counter and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; the caller guarantees `new_size` is valid for `layout`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated and not yet freed on this thread since it started.
pub(crate) fn live() -> isize {
    LIVE.with(Cell::get)
}

/// What `f` returns, and the most heap it held at once on this thread beyond what was live
/// before it.
pub(crate) fn peak_of<T>(f: impl FnOnce() -> T) -> (T, isize) {
    let before = live();
    PEAK.with(|p| p.set(before));
    let out = f();
    (out, PEAK.with(Cell::get) - before)
}
