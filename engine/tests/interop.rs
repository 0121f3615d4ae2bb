//! Interoperability with images that `qemu-img` and `qemu-io` made, judged by
//! `qemu-img convert`, `check` and `compare`.
//!
//! Every case builds a backing chain with qemu's tools (raw or qcow2 backing,
//! a three-deep chain with relative names, 4 KiB / 64 KiB / 2 MiB clusters,
//! compat 0.10 and 1.1, virtual sizes that are not a multiple of the cluster
//! size, backing images smaller and larger than the overlay) and fills each
//! layer with `qemu-io` patterns and zero writes. Then:
//!
//! * `reads`: the engine's view of the disk, read-only and then with
//!   copy-on-read, is byte-identical to `qemu-img convert -O raw`; read-only
//!   never changes a file; copy-on-read never changes the backing files and
//!   leaves an image that `qemu-img check` passes.
//! * `ops`: a seeded random sequence of writes, FUA writes, write-zeroes,
//!   discards, flushes and copy-on-read reads over unaligned, cluster-straddling
//!   ranges (and requests past the end, which must fail with `OutOfBounds`),
//!   mirrored into a raw reference with plain `std::fs` semantics. The engine's
//!   reads must match the reference at every step; after `close()`,
//!   `qemu-img check` is clean and `qemu-img compare` finds the overlay
//!   identical to the reference.
//!
//! Scale: `BACKFILL_INTEROP_OPS` (default 300 per case). Replay: `BACKFILL_SEED`.

mod common;

use backfill::{CacheMode, Disk, ErrorKind, Options};
use common::*;
use std::path::PathBuf;

/// What sits under the overlay.
#[derive(Debug, Clone, Copy)]
enum Chain {
    None,
    Raw {
        size: u64,
    },
    Qcow2 {
        size: u64,
        cluster: u64,
    },
    /// raw base ← qcow2 middle ← overlay, referenced by relative names.
    RawQcow2 {
        base_size: u64,
        mid_size: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    cluster: u64,
    compat: Compat,
    size: u64,
    chain: Chain,
    cache: CacheMode,
}

/// A built case: the overlay, and every file of its chain (to check which ones
/// the engine may and may not modify).
struct Built {
    dir: tempfile::TempDir,
    top: PathBuf,
    backing_files: Vec<PathBuf>,
    /// Where the direct backing image ends (guest bytes), if there is one.
    backing_end: Option<u64>,
}

/// `write -P` / `write -z` commands for one layer, deterministic in `rng`.
fn layer_writes(rng: &mut Rng, size: u64, cluster: u64, count: usize) -> Vec<String> {
    let mut cmds = Vec::new();
    for _ in 0..count {
        let off = match rng.below(3) {
            // On a cluster boundary, a little before it, or anywhere.
            0 => rng.below(size / cluster + 1) * cluster,
            1 => (rng.below(size / cluster + 1) * cluster).saturating_sub(rng.range(1, 700)),
            _ => rng.below(size),
        }
        .min(size - 1);
        let len = match rng.below(3) {
            0 => rng.range(1, 1000),
            1 => rng.range(1, 2 * cluster),
            _ => cluster,
        }
        .min(size - off);
        if rng.percent(25) {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            let pattern = rng.range(1, 256);
            cmds.push(format!("write -P {pattern:#04x} {off} {len}"));
        }
    }
    cmds
}

fn build(case: &Case, rng: &mut Rng) -> Built {
    let dir = tempdir(case.name);
    let top = dir.path().join("overlay.qcow2");
    let mut backing_files = Vec::new();
    let c = case.cluster;
    let backing = match case.chain {
        Chain::None => None,
        Chain::Raw { size } => {
            let p = dir.path().join("base.raw");
            create_raw(&p, size);
            qemu_io(&p, "raw", &layer_writes(rng, size, c, 12));
            backing_files.push(p.clone());
            Some((
                Backing {
                    name: path_str(&p),
                    format: "raw",
                },
                size,
            ))
        }
        Chain::Qcow2 { size, cluster } => {
            let p = dir.path().join("base.qcow2");
            create_qcow2(&p, size, cluster, case.compat, None);
            qemu_io(&p, "qcow2", &layer_writes(rng, size, cluster, 12));
            backing_files.push(p.clone());
            Some((
                Backing {
                    name: path_str(&p),
                    format: "qcow2",
                },
                size,
            ))
        }
        Chain::RawQcow2 {
            base_size,
            mid_size,
        } => {
            let base = dir.path().join("base.raw");
            create_raw(&base, base_size);
            qemu_io(&base, "raw", &layer_writes(rng, base_size, c, 10));
            let mid = dir.path().join("mid.qcow2");
            let base_ref = Backing {
                name: "base.raw".into(),
                format: "raw",
            };
            create_qcow2(&mid, mid_size, c, case.compat, Some(&base_ref));
            qemu_io(&mid, "qcow2", &layer_writes(rng, mid_size, c, 10));
            backing_files.push(base);
            backing_files.push(mid);
            Some((
                Backing {
                    name: "mid.qcow2".into(),
                    format: "qcow2",
                },
                mid_size,
            ))
        }
    };
    create_qcow2(
        &top,
        case.size,
        c,
        case.compat,
        backing.as_ref().map(|b| &b.0),
    );
    qemu_io(&top, "qcow2", &layer_writes(rng, case.size, c, 12));
    Built {
        dir,
        top,
        backing_files,
        backing_end: backing.map(|b| b.1),
    }
}

fn snapshot(files: &[PathBuf]) -> Vec<Vec<u8>> {
    files.iter().map(|f| read_file(f)).collect()
}

fn assert_unchanged(files: &[PathBuf], before: &[Vec<u8>], why: &str) {
    for (f, b) in files.iter().zip(before) {
        assert!(read_file(f) == *b, "{why}: {} was modified", f.display());
    }
}

fn case_options(case: &Case, copy_on_read: bool, read_only: bool) -> Options {
    Options {
        cache: case.cache,
        ..options(2, copy_on_read, read_only)
    }
}

#[track_caller]
fn expect_kind<T: std::fmt::Debug>(r: backfill::Result<T>, kind: ErrorKind, what: &str) {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected {kind:?}"),
        Err(e) => assert_eq!(e.kind(), kind, "{what}: wrong error kind ({e})"),
    }
}

/// (a) The engine reads what qemu reads, read-only and with copy-on-read.
fn reads(case: &Case) {
    let seed = seed_from_env(&format!("interop::{}::reads", case.name));
    let mut rng = Rng::new(seed);
    let built = build(case, &mut rng.fork());
    let expected = raw_contents(&built.top);
    let size = expected.len() as u64;
    let mut all_files = built.backing_files.clone();
    all_files.push(built.top.clone());
    let before = snapshot(&all_files);

    // Read-only, no copy-on-read: the engine must not touch any file.
    let disk = open(&built.top, case_options(case, false, true));
    assert_eq!(disk.size(), size, "virtual size");
    assert_eq!(disk.cluster_size(), case.cluster, "cluster size");
    assert_same_bytes(
        &read_all(&disk, MIB + 512),
        &expected,
        "read-only full read",
    );
    random_reads(&disk, &expected, &mut rng, 60, "read-only");
    let mut buf = vec![0u8; 4096];
    expect_kind(
        disk.read_at(&mut buf, size - 100),
        ErrorKind::OutOfBounds,
        "read past the end",
    );
    expect_kind(
        disk.write_at(&buf[..10], 0),
        ErrorKind::ReadOnly,
        "write to a read-only disk",
    );
    disk.close().expect("close read-only");
    assert_unchanged(&all_files, &before, "read-only open");

    // Copy-on-read: same bytes, read in shuffled unaligned pieces (so fills
    // meet partially-read clusters), then again from the overlay.
    let disk = open(&built.top, case_options(case, true, false));
    let mut pieces = Vec::new();
    let mut off = 0;
    while off < size {
        let len = rng.range(1, 3 * case.cluster).min(size - off);
        pieces.push((off, len));
        off += len;
    }
    for i in (1..pieces.len()).rev() {
        pieces.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for &(off, len) in &pieces {
        let mut buf = vec![0u8; len as usize];
        disk.read_at(&mut buf, off)
            .unwrap_or_else(|e| panic!("CoR read_at({off}, {len}): {e}"));
        assert_same_bytes(
            &buf,
            &expected[off as usize..(off + len) as usize],
            &format!("CoR read at {off}+{len} (seed {seed:#x})"),
        );
    }
    assert_same_bytes(&read_all(&disk, MIB), &expected, "read after CoR");
    disk.close().expect("close after CoR");
    assert_unchanged(
        &built.backing_files,
        &before,
        "copy-on-read (backing files)",
    );
    check_clean(&built.top);
    assert_same_bytes(
        &raw_contents(&built.top),
        &expected,
        "qemu's view after CoR",
    );
    // Everything the backing chain held as data was copied up.
    if !built.backing_files.is_empty() {
        for e in qemu_map(&built.top) {
            assert!(
                !(e.depth > 0 && e.data),
                "after reading the whole disk with CoR, qemu-img map still finds backing data: {e:?}"
            );
        }
    }
    drop(built.dir);
}

fn random_reads(disk: &Disk, expected: &[u8], rng: &mut Rng, count: usize, what: &str) {
    let size = expected.len() as u64;
    for _ in 0..count {
        let off = rng.below(size);
        let len = rng.range(1, (256 * KIB).min(size - off) + 1);
        let mut buf = vec![0u8; len as usize];
        disk.read_at(&mut buf, off)
            .unwrap_or_else(|e| panic!("{what} read_at({off}, {len}): {e}"));
        assert_same_bytes(
            &buf,
            &expected[off as usize..(off + len) as usize],
            &format!("{what} read at {off}+{len}"),
        );
    }
}

/// Picks a range: biased to cluster boundaries, the backing image's end and
/// the disk's (partial) last cluster, with lengths from one byte to several
/// clusters.
fn pick_range(rng: &mut Rng, size: u64, cluster: u64, backing_end: Option<u64>) -> (u64, u64) {
    let near = |rng: &mut Rng, point: u64| -> u64 {
        let d = rng.below(2 * KIB);
        if rng.percent(50) {
            point.saturating_sub(d)
        } else {
            point + d
        }
    };
    let off = match rng.below(10) {
        0..=3 => {
            let boundary = rng.below(size / cluster + 1) * cluster;
            near(rng, boundary)
        }
        4 | 5 => near(rng, backing_end.unwrap_or(size / 2)),
        6 => near(rng, size - size % cluster),
        _ => rng.below(size),
    }
    .min(size - 1);
    let len = match rng.below(20) {
        0..=7 => rng.range(1, 1025),
        8..=14 => rng.range(1, 2 * cluster + 1),
        15..=17 => cluster * rng.range(1, 3),
        _ => rng.range(1, 3 * cluster + 1),
    }
    .min(size - off);
    (off, len)
}

/// (b) Random operations mirrored into a raw reference.
fn ops(case: &Case) {
    let seed = seed_from_env(&format!("interop::{}::ops", case.name));
    let count = env_u64("BACKFILL_INTEROP_OPS", 300);
    let mut rng = Rng::new(seed);
    let built = build(case, &mut rng.fork());
    let mut reference = raw_contents(&built.top);
    let size = reference.len() as u64;
    let backing_before = snapshot(&built.backing_files);
    let c = case.cluster;

    let disk = open(&built.top, case_options(case, true, false));
    let (mut reads, mut writes, mut zeroes, mut discards) = (0, 0, 0, 0);
    for i in 0..count {
        let (off, len) = pick_range(&mut rng, size, c, built.backing_end);
        let (o, l) = (off as usize, len as usize);
        let what = format!("op {i} at {off}+{len} (seed {seed:#x})");
        match rng.below(100) {
            0..=39 => {
                reads += 1;
                let mut buf = vec![0u8; l];
                disk.read_at(&mut buf, off)
                    .unwrap_or_else(|e| panic!("read {what}: {e}"));
                assert_same_bytes(&buf, &reference[o..o + l], &format!("read {what}"));
            }
            40..=64 => {
                writes += 1;
                let mut buf = vec![0u8; l];
                rng.fill(&mut buf);
                disk.write_at(&buf, off)
                    .unwrap_or_else(|e| panic!("write {what}: {e}"));
                reference[o..o + l].copy_from_slice(&buf);
            }
            65..=69 => {
                writes += 1;
                let mut buf = vec![0u8; l];
                rng.fill(&mut buf);
                disk.write_at_fua(&buf, off)
                    .unwrap_or_else(|e| panic!("write_at_fua {what}: {e}"));
                reference[o..o + l].copy_from_slice(&buf);
            }
            70..=81 => {
                zeroes += 1;
                disk.write_zeroes(off, len)
                    .unwrap_or_else(|e| panic!("write_zeroes {what}: {e}"));
                reference[o..o + l].fill(0);
            }
            82..=91 => {
                discards += 1;
                disk.discard(off, len)
                    .unwrap_or_else(|e| panic!("discard {what}: {e}"));
                reference[o..o + l].fill(0);
            }
            92..=95 => disk.flush().unwrap_or_else(|e| panic!("flush {what}: {e}")),
            _ => out_of_bounds(&disk, &mut rng, size),
        }
    }
    assert_same_bytes(
        &read_all(&disk, MIB),
        &reference,
        &format!("full read before close (seed {seed:#x})"),
    );
    let stats = disk.stats();
    assert_eq!(stats.in_flight, 0, "nothing in flight when idle: {stats:?}");
    disk.close().expect("close");
    eprintln!(
        "interop::{}::ops: {count} ops ({reads} reads, {writes} writes, {zeroes} write-zeroes, {discards} discards); {stats:?}",
        case.name
    );

    assert_unchanged(
        &built.backing_files,
        &backing_before,
        "writes (backing files)",
    );
    check_clean(&built.top);
    compare_with_bytes(&built.top, &reference, built.dir.path());

    // The engine reads back what it wrote, after a reopen.
    let disk = open(&built.top, case_options(case, false, true));
    assert_same_bytes(&read_all(&disk, 3 * MIB), &reference, "read after reopen");
    disk.close().expect("close");
}

/// Requests reaching past the end fail with `OutOfBounds` and change nothing
/// (the caller's next reads check the "nothing").
fn out_of_bounds(disk: &Disk, rng: &mut Rng, size: u64) {
    let (off, len) = match rng.below(3) {
        0 => (size - rng.range(0, 100.min(size)), 101),
        1 => (size, 1),
        // An end that overflows u64 must be an error, not a wrap-around.
        _ => (u64::MAX - rng.below(4096), 8192),
    };
    let buf = vec![0xEEu8; len as usize];
    let mut rbuf = vec![0u8; len as usize];
    let what = |op: &str| format!("{op} at {off}+{len} on a disk of {size} bytes");
    expect_kind(
        disk.read_at(&mut rbuf, off),
        ErrorKind::OutOfBounds,
        &what("read"),
    );
    expect_kind(
        disk.write_at(&buf, off),
        ErrorKind::OutOfBounds,
        &what("write"),
    );
    expect_kind(
        disk.write_zeroes(off, len),
        ErrorKind::OutOfBounds,
        &what("write_zeroes"),
    );
    expect_kind(
        disk.discard(off, len),
        ErrorKind::OutOfBounds,
        &what("discard"),
    );
    expect_kind(
        disk.submit_read(off, rbuf).wait(),
        ErrorKind::OutOfBounds,
        &what("submit_read"),
    );
    expect_kind(
        disk.submit_write(off, buf).wait(),
        ErrorKind::OutOfBounds,
        &what("submit_write"),
    );
}

/// One module per case, with a `reads` and an `ops` test each, so that the
/// harness runs them in parallel and names the failing case.
macro_rules! cases {
    ($($name:ident: $case:expr;)*) => {$(
        mod $name {
            use super::*;
            const CASE: Case = Case { name: stringify!($name), ..$case };
            #[test]
            fn reads() {
                super::reads(&CASE);
            }
            #[test]
            fn ops() {
                super::ops(&CASE);
            }
        }
    )*};
}

const BASE: Case = Case {
    name: "",
    cluster: 64 * KIB,
    compat: Compat::V3,
    size: 4 * MIB,
    chain: Chain::None,
    cache: CacheMode::None,
};

cases! {
    // No backing file at all; the size ends in a partial cluster.
    no_backing_64k_v3: Case { size: 3 * MIB + 5 * 512, ..BASE };
    no_backing_4k_v2: Case { cluster: 4 * KIB, compat: Compat::V2, size: MIB + 1536, ..BASE };
    // Raw backing of the same size.
    raw_4k_v3: Case {
        cluster: 4 * KIB, size: 2 * MIB + 512, chain: Chain::Raw { size: 2 * MIB + 512 }, ..BASE
    };
    // Raw backing smaller than the overlay, neither size cluster-aligned.
    raw_smaller_64k_v2: Case {
        compat: Compat::V2, size: 4 * MIB + 3584, chain: Chain::Raw { size: 2 * MIB + 1536 },
        cache: CacheMode::Writeback, ..BASE
    };
    // Raw backing larger than the overlay: its tail must never show.
    raw_larger_4k_v2: Case {
        cluster: 4 * KIB, compat: Compat::V2, size: MIB + 2560,
        chain: Chain::Raw { size: 3 * MIB }, ..BASE
    };
    // qcow2 backing with a different cluster size.
    qcow2_64k_v2: Case {
        compat: Compat::V2, size: 3 * MIB, chain: Chain::Qcow2 { size: 3 * MIB, cluster: 4 * KIB },
        ..BASE
    };
    qcow2_smaller_64k_v3: Case {
        size: 4 * MIB + 512, chain: Chain::Qcow2 { size: 3 * MIB - 512, cluster: 64 * KIB }, ..BASE
    };
    // raw ← qcow2 ← overlay, relative backing names, sizes all different.
    chain3_64k_v3: Case {
        size: 3 * MIB + 1024,
        chain: Chain::RawQcow2 { base_size: 2 * MIB + 512, mid_size: 3 * MIB + 4096 + 512 },
        cache: CacheMode::Writeback, ..BASE
    };
    chain3_4k_v2: Case {
        cluster: 4 * KIB, compat: Compat::V2, size: 2 * MIB,
        chain: Chain::RawQcow2 { base_size: 3 * MIB, mid_size: MIB + 512 }, ..BASE
    };
    // 2 MiB clusters: a backing image that ends inside a cluster, and one
    // larger than the overlay.
    raw_smaller_2m_v3: Case {
        cluster: 2 * MIB, size: 9 * MIB + 512, chain: Chain::Raw { size: 5 * MIB + 1536 }, ..BASE
    };
    qcow2_larger_2m_v2: Case {
        cluster: 2 * MIB, compat: Compat::V2, size: 7 * MIB + 4096,
        chain: Chain::Qcow2 { size: 12 * MIB, cluster: 64 * KIB }, ..BASE
    };
}

/// The builder itself, checked against qemu: guards the other tests against
/// a broken fixture (e.g. qemu-io silently writing nothing).
#[test]
fn fixtures_are_what_they_claim() {
    let case = Case {
        name: "fixture",
        size: 3 * MIB + 1024,
        chain: Chain::RawQcow2 {
            base_size: 2 * MIB + 512,
            mid_size: 3 * MIB + 4096 + 512,
        },
        ..BASE
    };
    let built = build(&case, &mut Rng::new(7));
    let info = qemu_img([
        "info".as_ref(),
        "--output=json".as_ref(),
        "--backing-chain".as_ref(),
        built.top.as_os_str(),
    ]);
    let chain: serde_json::Value = serde_json::from_str(&info).unwrap();
    let chain = chain.as_array().expect("backing chain array");
    assert_eq!(chain.len(), 3, "three images in the chain: {info}");
    assert_eq!(chain[0]["virtual-size"], 3 * MIB + 1024);
    assert_eq!(chain[0]["cluster-size"], 64 * KIB);
    assert_eq!(chain[2]["format"], "raw");
    let contents = raw_contents(&built.top);
    assert!(contents.iter().any(|&b| b != 0), "the layers hold data");
}

/// Persistent bitmaps (`qemu-img bitmap --add`) own clusters: the bitmap
/// directory, each bitmap's table and its data. `qemu-img check` counts
/// them while autoclear bit 0 says the bitmaps are valid, so `backfill
/// check` must too, or it reports them as leaked (a fuzzing seed found it).
#[test]
fn check_counts_persistent_bitmap_clusters() {
    let dir = tempdir("interop-bitmaps");
    let img = dir.path().join("bitmaps.qcow2");
    let img_s = img.to_str().unwrap();
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        img_s,
        "8M",
    ]);
    qemu_img(["bitmap", "--add", img_s, "b0"]);
    qemu_img(["bitmap", "--add", "-g", "512", img_s, "b1"]);
    let cmds: Vec<String> = (0..41)
        .map(|i| format!("write -P {} {} 4k", i + 1, i * 192 * 1024))
        .collect();
    qemu_io(&img, "qcow2", &cmds);
    check_clean(&img);
    let report = backfill::check(&img).expect("backfill check");
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{:?}",
        report.messages
    );
}
