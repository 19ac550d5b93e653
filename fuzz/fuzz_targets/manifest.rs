//! Any bytes as a manifest file, through the parser, the validator, admission and the pod → OCI
//! spec conversion (`nodelet::source::mutate::check`): no panic, and a reason for every refusal.
//! Run with `cargo fuzz run manifest -- -max_len=4194304 -rss_limit_mb=512 -timeout=5`; the
//! RSS and time limits are the bounded-memory and bounded-time checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(reason) = nodelet::source::mutate::check(data) {
        assert!(!reason.trim().is_empty(), "a refusal without a reason");
    }
});
