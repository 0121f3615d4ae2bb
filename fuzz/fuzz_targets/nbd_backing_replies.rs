//! Fuzz target `nbd_backing_replies`: see `backfill::testing::fuzz::nbd_backing_replies`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backfill::testing::fuzz::nbd_backing_replies(data));
