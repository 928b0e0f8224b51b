//! libFuzzer entry for the `md_chain` target (see `spool_fuzz::target_md_chain`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_fuzz::target_md_chain(data));
