//! libFuzzer entry for the `super_block` target (see `spool_fuzz::target_super_block`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_fuzz::target_super_block(data));
