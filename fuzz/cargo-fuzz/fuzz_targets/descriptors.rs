//! libFuzzer entry for the `descriptors` target (see `spool_fuzz::target_descriptors`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_fuzz::target_descriptors(data));
