//! Fuzz target `http_responses`: see `backfill::testing::fuzz::http_responses`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backfill::testing::fuzz::http_responses(data));
