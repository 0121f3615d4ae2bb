//! The interop matrix: images made by `qemu-img create` and `qemu-img
//! convert -c` with every combination of cluster size (4K, 64K, 2M),
//! compat (0.10, 1.1), refcount_bits (1, 16, 64), compression_type (none,
//! zlib, zstd), lazy_refcounts (off, on), with and without a backing image,
//! filled with `qemu-io` patterns, zero writes and discards.
//!
//! For each image:
//! 1. `qemu-img check` finds it clean (qemu made it right);
//! 2. backfill, read-only, reads it byte-identical to `qemu-img convert -O
//!    raw`;
//! 3. backfill, read-write with copy-on-read, applies a seeded mix of
//!    writes, write-zeroes and discards (mirrored into a reference), reads
//!    back equal to the reference, and closes;
//! 4. `qemu-img check` finds it clean and `qemu-img compare` finds it equal
//!    to the reference.
//!
//! Combinations qemu-img itself refuses to make are listed, not skipped
//! silently: compat 0.10 has only 16-bit refcounts, no lazy refcounts and
//! no zstd.

mod common;

use common::*;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Zlib,
    Zstd,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    cluster: u64,
    v2: bool,
    refcount_bits: u64,
    compression: Compression,
    lazy: bool,
    backing: bool,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "c{}k-{}-rc{}-{:?}-{}-{}",
            self.cluster / KIB,
            if self.v2 { "v2" } else { "v3" },
            self.refcount_bits,
            self.compression,
            if self.lazy { "lazy" } else { "strict" },
            if self.backing { "backed" } else { "plain" }
        )
        .to_lowercase()
    }

    fn options(&self) -> String {
        let mut o = format!(
            "cluster_size={},compat={},refcount_bits={}",
            self.cluster,
            if self.v2 { "0.10" } else { "1.1" },
            self.refcount_bits
        );
        if self.lazy {
            o.push_str(",lazy_refcounts=on");
        }
        match self.compression {
            Compression::Zstd => o.push_str(",compression_type=zstd"),
            Compression::Zlib if !self.v2 => o.push_str(",compression_type=zlib"),
            _ => {}
        }
        o
    }
}

/// Every combination qemu-img can make, for one cluster size.
fn cases(cluster: u64) -> Vec<Case> {
    let mut out = Vec::new();
    for v2 in [false, true] {
        for refcount_bits in [1, 16, 64] {
            for compression in [Compression::None, Compression::Zlib, Compression::Zstd] {
                for lazy in [false, true] {
                    for backing in [false, true] {
                        // qemu-img: compat 0.10 has 16-bit refcounts only,
                        // no lazy refcounts, no compression type field.
                        if v2 && (refcount_bits != 16 || lazy || compression == Compression::Zstd) {
                            continue;
                        }
                        out.push(Case {
                            cluster,
                            v2,
                            refcount_bits,
                            compression,
                            lazy,
                            backing,
                        });
                    }
                }
            }
        }
    }
    out
}

const SIZE: u64 = 5 * MIB + 1536;

/// A raw source: random, zero and pattern regions at unaligned offsets.
fn make_source(path: &Path, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; SIZE as usize];
    let mut pos = 0u64;
    let mut region = 0;
    while pos < SIZE {
        let len = rng.range(30 * KIB, 600 * KIB).min(SIZE - pos);
        let r = &mut data[pos as usize..(pos + len) as usize];
        match region % 3 {
            0 => rng.fill(r),
            1 => {}
            _ => r.fill(1 + rng.below(250) as u8),
        }
        region += 1;
        pos += len;
    }
    write_file(path, &data);
}

/// qemu-io commands that write patterns, zeroes and discards over the image.
fn qemu_io_commands(rng: &mut Rng, v2: bool) -> Vec<String> {
    let mut cmds = Vec::new();
    for _ in 0..12 {
        let off = rng.below(SIZE - 1);
        let len = rng.range(1, 300 * KIB).min(SIZE - off);
        match rng.below(4) {
            // qemu-io's write -z on compat 0.10 writes real zeros.
            0 if !v2 => cmds.push(format!("write -z {off} {len}")),
            1 => {
                // Discards are cluster-granular in qcow2: whatever qemu
                // does, convert -O raw is the oracle.
                cmds.push(format!("discard {off} {len}"))
            }
            _ => cmds.push(format!("write -P {} {off} {len}", 1 + rng.below(250))),
        }
    }
    cmds
}

fn build(dir: &Path, case: &Case, seed: u64) -> std::path::PathBuf {
    let name = case.name();
    let image = dir.join(format!("{name}.qcow2"));
    let base = dir.join("base.raw");
    if !base.exists() {
        write_random_file(&base, SIZE + 64 * KIB, 99);
    }
    let mut args: Vec<String> = Vec::new();
    if case.compression == Compression::None {
        args.extend(["create", "-q", "-f", "qcow2", "-o"].map(String::from));
        args.push(case.options());
        if case.backing {
            args.extend(["-b".into(), path_str(&base), "-F".into(), "raw".into()]);
        }
        args.push(path_str(&image));
        args.push(SIZE.to_string());
    } else {
        let source = dir.join(format!("{name}.src.raw"));
        make_source(&source, seed);
        args.extend(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o"].map(String::from));
        args.push(case.options());
        if case.backing {
            args.extend(["-B".into(), path_str(&base), "-F".into(), "raw".into()]);
        }
        args.push(path_str(&source));
        args.push(path_str(&image));
    }
    qemu_img(&args);
    let mut rng = Rng::new(seed);
    qemu_io(&image, "qcow2", &qemu_io_commands(&mut rng, case.v2));
    image
}

fn run_case(dir: &Path, case: &Case, seed: u64) {
    let image = build(dir, case, seed);
    let name = case.name();
    check_clean(&image);
    let mut expect = raw_contents(&image);
    assert_eq!(expect.len() as u64, SIZE, "{name}");

    let disk = open(&image, options(2, false, true));
    assert_same_bytes(
        &read_all(&disk, 320 * KIB),
        &expect,
        &format!("{name}: read-only"),
    );
    disk.close().unwrap();

    let disk = open(&image, options(2, true, false));
    let mut rng = Rng::new(seed ^ 0x5eed);
    for _ in 0..25 {
        let off = rng.below(SIZE - 1);
        let len = rng.range(1, 256 * KIB).min(SIZE - off);
        let r = off as usize..(off + len) as usize;
        match rng.below(5) {
            0 => {
                disk.write_zeroes(off, len).unwrap();
                expect[r].fill(0);
            }
            1 => {
                disk.discard(off, len).unwrap();
                expect[r].fill(0);
            }
            2 => {
                let mut got = vec![0u8; len as usize];
                disk.read_at(&mut got, off).unwrap();
                assert_same_bytes(&got, &expect[r], &format!("{name}: read at {off}"));
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                disk.write_at(&buf, off).unwrap();
                expect[r].copy_from_slice(&buf);
            }
        }
    }
    assert_same_bytes(
        &read_all(&disk, MIB),
        &expect,
        &format!("{name}: after writes"),
    );
    disk.close().unwrap();
    check_clean(&image);
    compare_with_bytes(&image, &expect, dir);
    // Keep the directory small: the next case builds its own files.
    for f in [image.clone(), dir.join(format!("{name}.src.raw"))] {
        let _ = std::fs::remove_file(f);
    }
}

fn run_matrix(cluster: u64) {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let dir = tempdir(&format!("matrix-{}k", cluster / KIB));
    let cases = cases(cluster);
    let base_seed = seed_from_env("interop_matrix");
    for (i, case) in cases.iter().enumerate() {
        run_case(dir.path(), case, base_seed.wrapping_add(i as u64));
    }
    println!(
        "interop matrix, {} KiB clusters: {} cases",
        cluster / KIB,
        cases.len()
    );
}

#[test]
fn matrix_4k_clusters() {
    run_matrix(4 * KIB);
}

#[test]
fn matrix_64k_clusters() {
    run_matrix(64 * KIB);
}

#[test]
fn matrix_2m_clusters() {
    run_matrix(2 * MIB);
}
