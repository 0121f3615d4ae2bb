//! Shared helpers for backfill's benchmarks: images made on the spot, a
//! seeded offset generator, and the process's own memory figures.
//!
//! What it owns: nothing the engine does. Everything here goes through the
//! public API of the `backfill` crate (`create`, `Disk`), so the benches
//! measure what an embedder gets, and no engine internals are exposed for
//! them.
//!
//! The criterion benches live in `benches/hot_paths.rs`, the memory probe in
//! `src/bin/probe.rs`, the fio job files in `fio/`, and the comparison with
//! the peers (QEMU, nbdkit, fio on the raw file) in `run`.

use backfill::{CacheMode, CreateOptions, Disk, Options};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Bytes per request when populating an overlay: large, so a populate is a
/// few hundred sequential requests rather than thousands.
pub const POPULATE_REQUEST_BYTES: usize = 1 << 20;
/// Requests in flight while populating.
pub const POPULATE_DEPTH: usize = 8;

/// xorshift64*: a small seeded generator, so a run's offsets can be replayed
/// and the benches need no random-number crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // A zero state would stay zero forever.
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `[0, n)` for picking offsets (n far below 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "empty range");
        self.next_u64() % n
    }

    /// A random offset in `[0, size_bytes)` aligned to `align_bytes`.
    pub fn aligned_offset(&mut self, size_bytes: u64, align_bytes: u64) -> u64 {
        self.below(size_bytes / align_bytes) * align_bytes
    }
}

/// Writes `len_bytes` of seeded pseudo-random data (incompressible, never
/// all zero, so copy-on-read fills data clusters, not zero clusters).
pub fn write_random_file(path: &Path, len_bytes: u64, seed: u64) -> std::io::Result<()> {
    let mut rng = Rng::new(seed);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut block = [0u8; 8];
    for _ in 0..len_bytes / 8 {
        block.copy_from_slice(&rng.next_u64().to_le_bytes());
        out.write_all(&block)?;
    }
    out.flush()?;
    out.get_ref().sync_all()
}

/// Creates a qcow2 overlay (64 KiB clusters) at `path` on the raw `backing`.
pub fn create_overlay(path: &Path, backing: &Path) -> backfill::Result<()> {
    let _ = std::fs::remove_file(path);
    backfill::create(
        path,
        &CreateOptions {
            backing: Some(backing.to_string_lossy().into_owned()),
            backing_format: Some("raw".into()),
            ..CreateOptions::default()
        },
    )
}

/// Reads the whole disk once with copy-on-read, so every cluster is in the
/// overlay, and closes it clean.
pub fn populate(path: &Path) -> backfill::Result<()> {
    let disk = Disk::open(path, Options::default())?;
    let size = disk.size();
    let mut pending = VecDeque::new();
    let mut offset = 0;
    let mut free: Vec<Vec<u8>> = (0..POPULATE_DEPTH)
        .map(|_| vec![0u8; POPULATE_REQUEST_BYTES])
        .collect();
    while offset < size || !pending.is_empty() {
        while offset < size {
            let Some(mut buf) = free.pop() else { break };
            buf.resize(
                (size - offset).min(POPULATE_REQUEST_BYTES as u64) as usize,
                0,
            );
            pending.push_back(disk.submit_read(offset, buf));
            offset += POPULATE_REQUEST_BYTES as u64;
        }
        if let Some(done) = pending.pop_front() {
            free.push(done.wait()?);
        }
    }
    disk.close()
}

/// Options for reading a populated overlay the way the warm benchmarks do.
pub fn warm_options(cache: CacheMode) -> Options {
    Options {
        cache,
        copy_on_read: false,
        read_only: true,
        ..Options::default()
    }
}

/// A scratch directory for bench images: under `BENCH_DIR` if set, else
/// the system's temporary directory. It must support O_DIRECT (tmpfs does
/// not), which `/tmp` on a disk does.
pub fn scratch_dir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    let parent = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new().prefix(prefix).tempdir_in(parent)
}

/// A field of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`, ...).
pub fn proc_status_kib(field: &str) -> Option<u64> {
    status_kib(&std::fs::read_to_string("/proc/self/status").ok()?, field)
}

/// Parses `field` ("VmHWM:   12345 kB") out of a `/proc/PID/status` text.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_parse() {
        let text = "Name:\tx\nVmHWM:\t   2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(status_kib(text, "VmHWM"), Some(2048));
        assert_eq!(status_kib(text, "VmRSS"), Some(1024));
        assert_eq!(status_kib(text, "VmSwap"), None);
        assert!(proc_status_kib("VmRSS").unwrap() > 0);
    }

    #[test]
    fn offsets_are_aligned_and_in_range() {
        let mut rng = Rng::new(0);
        for _ in 0..1000 {
            let o = rng.aligned_offset(1 << 30, 4096);
            assert_eq!(o % 4096, 0);
            assert!(o < 1 << 30);
        }
    }

    #[test]
    fn populate_fills_every_cluster() {
        let dir = scratch_dir("bench-test").unwrap();
        let base = dir.path().join("base.raw");
        let disk = dir.path().join("disk.qcow2");
        write_random_file(&base, 4 << 20, 7).unwrap();
        create_overlay(&disk, &base).unwrap();
        populate(&disk).unwrap();
        let d = Disk::open(&disk, warm_options(CacheMode::None)).unwrap();
        let status = d.block_status(0, d.size()).unwrap();
        assert!(status.iter().all(|s| s.kind == backfill::ExtentKind::Data));
        let mut got = vec![0u8; 4 << 20];
        d.read_at(&mut got, 0).unwrap();
        assert_eq!(got, std::fs::read(&base).unwrap());
        d.close().unwrap();
    }
}
