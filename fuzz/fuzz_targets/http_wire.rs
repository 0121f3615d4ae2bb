//! Fuzz target `http_wire`: see `backfill::testing::fuzz::http_wire`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backfill::testing::fuzz::http_wire(data));
