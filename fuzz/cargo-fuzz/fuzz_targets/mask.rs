//! libFuzzer entry for the `mask` target (see `spool_fuzz::target_mask`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_fuzz::target_mask(data));
