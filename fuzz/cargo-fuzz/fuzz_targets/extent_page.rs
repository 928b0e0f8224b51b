//! libFuzzer entry for the `extent_page` target (see `spool_fuzz::target_extent_page`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_fuzz::target_extent_page(data));
