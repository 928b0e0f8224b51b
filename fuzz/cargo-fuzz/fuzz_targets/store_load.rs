//! libFuzzer entry for the `store_load` target (see `spool_fuzz::target_store_load`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_fuzz::target_store_load(data));
