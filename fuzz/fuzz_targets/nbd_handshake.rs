//! Fuzz target `nbd_handshake`: see `backfill::testing::fuzz::nbd_handshake`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backfill::testing::fuzz::nbd_handshake(data));
