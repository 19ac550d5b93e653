//! `nodelet-log-driver`, the per-container logging binary (see the library's doc), built by
//! `agent/build.rs` (`cargo build --features binary --profile logdriver`) statically and
//! without libc: its start-up is the few instructions of `_start` below, and rustix's raw
//! system calls do all its I/O. Nothing runs before [`start`]: no TLS block, no tunables, no
//! IRELATIVE relocations, no heap, no stdio buffers, no atexit list.
//!
//! Why not `origin` (sunfishcode's libc-free program start-up, made for this): its last
//! release (0.26.2) calls `rustix::runtime`, which rustix 1.1 hid, so it does not build
//! against the rustix this workspace locks (1.1.6), and one build cannot hold both. What it
//! brings beyond `_start` (init arrays, at-exit functions, threads, TLS) the driver does not
//! use. The two calls rustix keeps in that hidden module, `rt_sigaction` (to ignore SIGTERM
//! and SIGINT) and `exit_group`, are made here by hand ([`syscall4`]).

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::ffi::{c_char, CStr};
use core::fmt::Write as _;
use nodelet_log_driver::{main_with_args, Stderr};

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the log driver's _start and system calls are written for x86_64 only");

// The kernel starts the program with `argc`, the `argv` pointers and the environment on the
// stack; `_start` passes their address to `start`, with the stack aligned as calls expect.
global_asm!(
    ".globl _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {start}",
    "ud2",
    start = sym start,
);

/// More arguments than the driver takes (three key/value pairs).
const MAX_ARGS: usize = 8;
const SYS_RT_SIGACTION: usize = 13;
const SYS_EXIT_GROUP: usize = 231;
const SIGINT: usize = 2;
const SIGTERM: usize = 15;
const SIG_IGN: usize = 1;

/// The program, called by `_start` with the initial stack (`argc`, then `argv`).
unsafe extern "C" fn start(stack: *const usize) -> ! {
    // The shim sends SIGTERM after closing its pipe ends; ignoring it (and SIGINT) lets the
    // driver drain what is still buffered and exit on EOF instead of dying mid-line.
    for sig in [SIGTERM, SIGINT] {
        // The kernel's `struct sigaction`: handler, flags, restorer, mask.
        let ignore: [usize; 4] = [SIG_IGN, 0, 0, 0];
        // SAFETY: SIG_IGN installs no handler code; `ignore` is a valid kernel sigaction
        // for the call's duration, and the mask is 8 bytes.
        unsafe { syscall4(SYS_RT_SIGACTION, sig, ignore.as_ptr() as usize, 0, 8) };
    }
    // SAFETY: the kernel put `argc` at the stack's top and `argc` string pointers after it,
    // each a NUL-terminated string that lives as long as the process.
    let code = unsafe { run(*stack, stack.add(1).cast::<*const c_char>()) };
    exit(code)
}

/// The arguments, borrowed from `argv` where they lie (the driver allocates nothing: there
/// is no allocator), given to the driver.
///
/// # Safety
/// `argv` holds `argc` pointers to NUL-terminated strings that live as long as the process.
unsafe fn run(argc: usize, argv: *const *const c_char) -> u8 {
    let given = argc.saturating_sub(1);
    if given > MAX_ARGS {
        return main_with_args(&[c"(more than 8 arguments)"]);
    }
    let mut args: [&CStr; MAX_ARGS] = [c""; MAX_ARGS];
    for (i, slot) in args.iter_mut().enumerate().take(given) {
        // SAFETY: see the function's contract.
        let arg = unsafe { CStr::from_ptr(*argv.add(i + 1)) };
        if arg.to_str().is_err() {
            return main_with_args(&[c"(an argument not in UTF-8)"]);
        }
        *slot = arg;
    }
    main_with_args(&args[..given])
}

/// Ends the process with `code`.
fn exit(code: u8) -> ! {
    // SAFETY: exit_group takes a plain number and does not return.
    unsafe { syscall4(SYS_EXIT_GROUP, usize::from(code), 0, 0, 0) };
    unreachable!()
}

/// A raw system call with up to four arguments; returns the kernel's result.
///
/// # Safety
/// The call and its arguments must be valid as the kernel defines them.
unsafe fn syscall4(nr: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: per the function's contract; `syscall` clobbers only rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

// The memory functions the compiler calls (libc would provide them; compiler_builtins does
// not on this target). `rep movsb`/`rep stosb` are what x86_64 copies with; the comparisons
// read through `read_volatile` so that the compiler does not turn them back into calls.

/// `memcpy`.
///
/// # Safety
/// As C's: `n` bytes valid at both, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: per the function's contract.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// `memmove`: copies forwards, or backwards when `dest` lies above `src`.
///
/// # Safety
/// As C's: `n` bytes valid at both.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: per the contract; a forward copy is right when `dest` is below `src` or
        // the two do not overlap.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: per the contract; the direction flag is set for the backward copy from the
    // last byte and cleared again, as the ABI requires.
    unsafe {
        asm!("std", "rep movsb", "cld", inout("rcx") n => _,
             inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dest
}

/// `memset`.
///
/// # Safety
/// As C's: `n` bytes valid at `dest`.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: per the function's contract.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// `memcmp`.
///
/// # Safety
/// As C's: `n` bytes valid at both.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: per the function's contract, `i < n`.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// `bcmp`: whether `n` bytes differ.
///
/// # Safety
/// As C's: `n` bytes valid at both.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: per the function's contract.
    unsafe { memcmp(a, b, n) }
}

/// `strlen`.
///
/// # Safety
/// As C's: `s` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn strlen(s: *const c_char) -> usize {
    let mut n = 0;
    // SAFETY: per the function's contract, every byte up to the NUL is readable.
    while unsafe { s.add(n).read_volatile() } != 0 {
        n += 1;
    }
    n
}

/// A panic (none is expected: the driver indexes only within its buffers) reports itself and
/// exits as Rust's std does (101).
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let _ = writeln!(Stderr, "nodelet-log-driver: {info}");
    exit(101)
}
