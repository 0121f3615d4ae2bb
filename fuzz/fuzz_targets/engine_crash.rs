//! Fuzz target `engine_crash`: engine operations on the simulated I/O
//! layer, chosen by the input, then a crash at a countdown the input also
//! picks; see `backfill::testing::crash::fuzz_ops_with_crash`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = backfill::testing::crash::fuzz_ops_with_crash(data) {
        panic!("{e}");
    }
});
