//! Fuzz target `lock_table_ops`: see `backfill::testing::fuzz::lock_table_ops`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| backfill::testing::fuzz::lock_table_ops(data));
