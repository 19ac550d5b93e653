//! `nodelet-log-driver`, the per-container logging binary (see the library's doc). Not a
//! Cargo target: `agent/build.rs` compiles this file with the library as a module, linked
//! statically (see there why). `no_main`: std's start-up (stack guard discovery through
//! /proc/self/maps, an alternate signal stack) would cost each copy pages for nothing.

#![no_main]

#[path = "lib.rs"]
#[allow(dead_code)]
mod driver;

use std::ffi::{c_char, c_int, c_void, CStr};

/// More arguments than the driver takes (three key/value pairs).
const MAX_ARGS: usize = 8;

/// The C entry point. The arguments are borrowed from `argv` where they lie, not collected
/// into a `Vec`: the driver allocates nothing on its way (only rotation and errors do).
#[no_mangle]
extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    release_dead_stack();
    let given = usize::try_from(argc).unwrap_or(0).saturating_sub(1);
    if given > MAX_ARGS {
        return exit_code(driver::main_with_args(&["(more than 8 arguments)"]));
    }
    let mut args = [""; MAX_ARGS];
    for (i, slot) in args.iter_mut().enumerate().take(given) {
        // SAFETY: glibc passes `argc` valid NUL-terminated strings in `argv`, which live as
        // long as the process.
        let arg = unsafe { CStr::from_ptr(*argv.add(i + 1)) };
        let Ok(arg) = arg.to_str() else {
            return exit_code(driver::main_with_args(&["(an argument not in UTF-8)"]));
        };
        *slot = arg;
    }
    exit_code(driver::main_with_args(&args[..given]))
}

fn exit_code(code: std::process::ExitCode) -> c_int {
    match code {
        code if code == std::process::ExitCode::SUCCESS => 0,
        _ => 1,
    }
}

/// Gives back the stack pages glibc's start-up wrote below `main`'s frame and that nothing
/// uses any more (its deepest frame, `_dl_get_origin`, holds a 4 KiB path buffer): they would
/// stay private for the driver's life, where the driver's own calls reach less deep. A page
/// touched again later comes back zeroed, so this changes nothing but the memory held; about
/// 3 KiB per driver on average (the stack's top is placed at random within a page).
#[inline(never)]
fn release_dead_stack() {
    extern "C" {
        fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
        fn getpagesize() -> c_int;
    }
    const MADV_DONTNEED: c_int = 4;
    /// Room kept below this function's frame for `madvise`'s own call.
    const KEEP: usize = 1024;
    /// How far below that the pages are given back (start-up reaches about 8 KiB deep).
    const SPAN: usize = 64 * 1024;
    // SAFETY: getpagesize has no preconditions.
    let page = usize::try_from(unsafe { getpagesize() }).unwrap_or(4096);
    let here = std::hint::black_box(0u8);
    let end = (std::ptr::addr_of!(here) as usize - KEEP) & !(page - 1);
    // SAFETY: the range lies wholly below the stack pointer of this call and of
    // madvise's (KEEP), memory no live frame uses; MADV_DONTNEED on it only drops pages
    // that read back as zero. A part outside the stack mapping is an error, ignored.
    unsafe { madvise((end - SPAN) as *mut c_void, SPAN, MADV_DONTNEED) };
}
