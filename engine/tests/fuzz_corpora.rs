//! Replays the fuzz corpora on the stable toolchain, as regression tests.
//!
//! Every file of `fuzz/corpus/<target>/` (the seeds and what fuzzing kept,
//! minimized) and of `fuzz/regressions/<target>/` (inputs that once found a
//! bug) goes through the same entry point the cargo-fuzz target calls
//! (`backfill::testing::fuzz`), which panics when a property breaks. A
//! missing or empty corpus directory fails the test: a replay of nothing
//! would pass by skipping. Each test prints how many inputs it replayed
//! (`--nocapture` shows it).
//!
//! The NBD replay ends with `nbd_finish`: a last well-behaved client, then
//! the server is stopped and its image must check clean.

use backfill::testing::fuzz;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted by name (so a failure replays in order).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Runs every corpus and regression input of `target` through `f`.
fn replay(target: &str, f: fn(&[u8])) {
    let corpus = fuzz_dir().join("corpus").join(target);
    assert!(
        corpus.is_dir(),
        "the corpus of fuzz target {target} is missing: {} (fuzz/make-seeds.sh makes the seeds)",
        corpus.display()
    );
    let seeds = files(&corpus);
    assert!(
        !seeds.is_empty(),
        "the corpus of fuzz target {target} is empty: {}",
        corpus.display()
    );
    let regressions_dir = fuzz_dir().join("regressions").join(target);
    let regressions = if regressions_dir.is_dir() {
        files(&regressions_dir)
    } else {
        Vec::new()
    };
    let start = std::time::Instant::now();
    for path in seeds.iter().chain(&regressions) {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        // Name the input before running it: a panic inside is the finding.
        eprintln!("replaying {}", path.display());
        f(&data);
    }
    println!(
        "fuzz target {target}: replayed {} inputs ({} corpus, {} regressions) in {:.1?}",
        seeds.len() + regressions.len(),
        seeds.len(),
        regressions.len(),
        start.elapsed()
    );
}

#[test]
fn http_wire() {
    replay("http_wire", fuzz::http_wire);
}

#[test]
fn http_responses() {
    replay("http_responses", fuzz::http_responses);
}

#[test]
fn nbd_backing_replies() {
    replay("nbd_backing_replies", fuzz::nbd_backing_replies);
}

#[test]
fn open_and_read() {
    replay("open_and_read", fuzz::open_and_read);
}

#[test]
fn nbd_client_bytes() {
    replay("nbd_client_bytes", fuzz::nbd_client_bytes);
    fuzz::nbd_finish();
}

#[test]
fn nbd_handshake() {
    replay("nbd_handshake", fuzz::nbd_handshake);
}

#[test]
fn lock_table_ops() {
    replay("lock_table_ops", fuzz::lock_table_ops);
}

#[test]
fn engine_crash() {
    replay("engine_crash", |data| {
        if let Err(e) = backfill::testing::crash::fuzz_ops_with_crash(data) {
            panic!("{e}");
        }
    });
}
