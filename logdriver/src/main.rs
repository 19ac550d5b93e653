//! `nodelet-log-driver`, the per-container logging binary (see the library's doc). Not a
//! Cargo target: `agent/build.rs` compiles this file with the library as a module, linked
//! statically (see there why). `no_main`: std's start-up (stack guard discovery through
//! /proc/self/maps, an alternate signal stack) would cost each copy pages for nothing.

#![no_main]

#[path = "lib.rs"]
#[allow(dead_code)]
mod driver;

/// The C entry point; std's `env::args` still works (glibc hands it the arguments).
#[no_mangle]
pub extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match driver::main_with_args(&args) {
        code if code == std::process::ExitCode::SUCCESS => 0,
        _ => 1,
    }
}
