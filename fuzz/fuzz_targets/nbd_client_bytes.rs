//! Fuzz target `nbd_client_bytes`: see `backfill::testing::fuzz::nbd_client_bytes`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backfill::testing::fuzz::nbd_client_bytes(data));
