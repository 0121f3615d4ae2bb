//! Fuzz target `open_and_read`: see `backfill::testing::fuzz::open_and_read`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backfill::testing::fuzz::open_and_read(data));
