//! libFuzzer entry for the `nbd_request` target (see `spool_fuzz::target_nbd_request`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_fuzz::target_nbd_request(data));
