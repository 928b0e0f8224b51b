//! libFuzzer entry for the `rpc_request` target (see `spool_fuzz::target_rpc_request`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_fuzz::target_rpc_request(data));
