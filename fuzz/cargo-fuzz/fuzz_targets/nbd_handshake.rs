//! libFuzzer entry for the `nbd_handshake` target (see `spool_fuzz::target_nbd_handshake`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_fuzz::target_nbd_handshake(data));
