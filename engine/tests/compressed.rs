//! Compressed clusters (zlib and zstd), in images `qemu-img convert -c`
//! makes with 4 KiB, 64 KiB and 2 MiB clusters from a source with random
//! regions (which qemu stores uncompressed: they do not shrink), zero
//! regions (left unallocated) and qemu-io patterns (which compress well).
//!
//! * `backing_*`: the compressed image is the backing file (directly, or
//!   under a plain qcow2 layer) of an overlay. Reads through backfill equal
//!   `qemu-img convert -O raw` of the backing, without copy-on-read (the
//!   overlay stays empty) and with it; afterwards `qemu-img check` finds the
//!   overlay clean and `qemu-img compare` finds it equal to its backing.
//! * `direct_*`: the compressed image opened itself. Reads equal qemu's;
//!   then partial and whole-cluster writes, write-zeroes and discards over
//!   compressed clusters, applied to a reference too; `qemu-img check` must
//!   find no leak and no corruption (the compressed data's shared host
//!   clusters lose exactly their uses), and `qemu-img compare` must find the
//!   image equal to the reference, also after a reopen.
//! * `hostile_*`: a compressed cluster whose data is garbage fails its read
//!   with `Corrupt` naming the offset; every other cluster still reads.
//! * `small_reads_of_a_compressed_cluster_in_flight_with_a_write`: 4 KiB
//!   reads of compressed clusters, 16 of each in flight (they share one
//!   read and decompression), with a write into the same cluster among
//!   them: every read right, the image clean and equal to the reference.

mod common;

use backfill::{Disk, ErrorKind};
use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const OFLAG_COMPRESSED: u64 = 1 << 62;
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// A raw source of `size` bytes: random regions, zero regions and qemu-io
/// patterns, placed at cluster-unaligned offsets.
fn make_source(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; size as usize];
    write_file(path, &data);
    let mut pos = 0u64;
    let mut cmds = Vec::new();
    let mut region = 0;
    while pos < size {
        let len = rng.range(20 * KIB, 700 * KIB).min(size - pos);
        match region % 3 {
            0 => {
                // Random: incompressible.
                rng.fill(&mut data[pos as usize..(pos + len) as usize]);
            }
            1 => {} // zeros
            _ => {
                let pattern = 1 + rng.below(250) as u8;
                cmds.push(format!("write -P {pattern} {pos} {len}"));
            }
        }
        region += 1;
        pos += len;
    }
    // Random regions by plain writes, patterns by qemu-io.
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&data, 0).unwrap();
    drop(f);
    qemu_io(path, "raw", &cmds);
    read_file(path)
}

fn compressed_image(dir: &Path, src: &Path, kind: &str, cluster: u64) -> PathBuf {
    let img = dir.join(format!("c-{kind}-{cluster}.qcow2"));
    qemu_img([
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        &format!("compression_type={kind},cluster_size={cluster}"),
        &path_str(src),
        &path_str(&img),
    ]);
    img
}

/// Guest offsets of the clusters qemu-img map calls compressed.
fn compressed_clusters(image: &Path, cluster: u64) -> Vec<u64> {
    let json = qemu_img(["map".as_ref(), "--output=json".as_ref(), image.as_os_str()]);
    let map: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let mut out = Vec::new();
    for e in map {
        if e["compressed"].as_bool() == Some(true) && e["depth"].as_u64() == Some(0) {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            assert_eq!(start % cluster, 0, "compressed extents are whole clusters");
            out.extend((start..start + len).step_by(cluster as usize));
        }
    }
    out
}

fn read_all_chunked(disk: &Disk, chunk: u64) -> Vec<u8> {
    read_all(disk, chunk)
}

fn qemu_compare(a: &Path, b: &Path) {
    let out = run_status(
        "qemu-img",
        ["compare".as_ref(), a.as_os_str(), b.as_os_str()],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}\n{}{}",
        a.display(),
        b.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sizes not a multiple of the cluster size, so the last cluster is partial.
fn size_for(cluster: u64) -> u64 {
    if cluster >= 2 * MIB {
        15 * MIB + 12 * KIB
    } else {
        5 * MIB + 12 * KIB
    }
}

fn backing_case(kind: &str, cluster: u64, overlay_cluster: u64, mid: bool) {
    let dir = tempdir(&format!("compressed-backing-{kind}-{cluster}"));
    let d = dir.path();
    let size = size_for(cluster);
    let seed = seed_from_env("compressed_backing") ^ cluster;
    let src = d.join("src.raw");
    make_source(&src, size, seed);
    let img = compressed_image(d, &src, kind, cluster);
    assert!(
        compressed_clusters(&img, cluster).len() >= 3,
        "the image must hold compressed clusters"
    );
    let want = raw_contents(&img);
    assert_eq!(want.len() as u64, size);
    // Optionally a plain qcow2 layer in between, with a few writes of its
    // own, so the compressed layer is not the overlay's direct backing.
    let (top, top_fmt) = if mid {
        let m = d.join("mid.qcow2");
        create_qcow2(
            &m,
            size,
            64 * KIB,
            Compat::V3,
            Some(&Backing {
                name: path_str(&img),
                format: "qcow2",
            }),
        );
        qemu_io(
            &m,
            "qcow2",
            &[
                "write -P 0x5a 100k 30k".to_string(),
                "write -z 1M 64k".to_string(),
            ],
        );
        (m, "qcow2")
    } else {
        (img.clone(), "qcow2")
    };
    let want = if mid { raw_contents(&top) } else { want };
    for cor in [false, true] {
        let overlay = d.join(format!("overlay-{cor}.qcow2"));
        create_qcow2(
            &overlay,
            size,
            overlay_cluster,
            Compat::V3,
            Some(&Backing {
                name: path_str(&top),
                format: top_fmt,
            }),
        );
        let disk = open(&overlay, options(2, cor, false));
        // Unaligned chunks: pieces start and end inside clusters.
        let got = read_all_chunked(&disk, 100 * KIB + 512);
        assert_same_bytes(
            &got,
            &want,
            &format!("{kind} {cluster} cor={cor} first read"),
        );
        // Again: from the overlay now (with CoR), from the backing without.
        let got = read_all_chunked(&disk, MIB);
        assert_same_bytes(
            &got,
            &want,
            &format!("{kind} {cluster} cor={cor} second read"),
        );
        // A fill answers its readers before its write-back lands (the
        // second read may have joined fills still writing): the counters
        // are read after the close, which waits for them.
        let observer = disk.clone();
        disk.close().unwrap();
        let stats = observer.stats();
        if cor {
            assert!(stats.cor_fills > 0, "{stats:?}");
        } else {
            assert_eq!(stats.cor_fills, 0, "{stats:?}");
        }
        check_clean(&overlay);
        qemu_compare(&overlay, &top);
        if !cor {
            // Nothing was copied: every cluster still comes from below.
            let map = qemu_map(&overlay);
            assert!(map.iter().all(|e| e.depth > 0 || !e.data), "{map:?}");
        }
    }

    // Partial writes into overlay clusters that are still unallocated over
    // compressed backing clusters: the rest of each cluster comes from the
    // decompressed backing data.
    let overlay = d.join("overlay-writes.qcow2");
    create_qcow2(
        &overlay,
        size,
        overlay_cluster,
        Compat::V3,
        Some(&Backing {
            name: path_str(&top),
            format: top_fmt,
        }),
    );
    let mut want = want;
    let disk = open(&overlay, options(2, true, false));
    let comp = compressed_clusters(&img, cluster);
    for (i, &g) in comp.iter().enumerate().take(5) {
        let off = g + 1000 + i as u64 * 517;
        let len = 3000u64.min(size - off);
        let r = &mut want[off as usize..(off + len) as usize];
        r.fill(0xc0 + i as u8);
        disk.write_at(r, off).unwrap();
        // Partial write-zeroes, too.
        let z = g + 8192 + 100;
        if z + 50 < size {
            want[z as usize..z as usize + 50].fill(0);
            disk.write_zeroes(z, 50).unwrap();
        }
    }
    assert_same_bytes(&read_all(&disk, MIB), &want, "read after writes");
    disk.close().unwrap();
    check_clean(&overlay);
    compare_with_bytes(&overlay, &want, d);
}

#[test]
fn backing_zlib_4k() {
    backing_case("zlib", 4 * KIB, 64 * KIB, false);
}

#[test]
fn backing_zlib_64k() {
    backing_case("zlib", 64 * KIB, 64 * KIB, false);
}

#[test]
fn backing_zlib_2m_under_a_plain_layer() {
    backing_case("zlib", 2 * MIB, 64 * KIB, true);
}

#[test]
fn backing_zstd_4k_small_overlay_clusters() {
    backing_case("zstd", 4 * KIB, 4 * KIB, false);
}

#[test]
fn backing_zstd_64k_under_a_plain_layer() {
    backing_case("zstd", 64 * KIB, 64 * KIB, true);
}

#[test]
fn backing_zstd_2m() {
    backing_case("zstd", 2 * MIB, 2 * MIB, false);
}

fn direct_case(kind: &str, cluster: u64) {
    let dir = tempdir(&format!("compressed-direct-{kind}-{cluster}"));
    let d = dir.path();
    let size = size_for(cluster);
    let seed = seed_from_env("compressed_direct") ^ cluster;
    let src = d.join("src.raw");
    make_source(&src, size, seed);
    let img = compressed_image(d, &src, kind, cluster);
    let mut want = raw_contents(&img);
    let comp = compressed_clusters(&img, cluster);
    assert!(comp.len() >= 6, "too few compressed clusters: {comp:?}");

    // Read-only first: nothing changes.
    let disk = open(&img, options(2, true, true));
    assert_same_bytes(&read_all(&disk, 100 * KIB + 512), &want, "read-only read");
    disk.close().unwrap();
    check_clean(&img);

    let disk = open(&img, options(2, true, false));
    assert_same_bytes(&read_all(&disk, 100 * KIB + 512), &want, "first read");
    let mut rng = Rng::new(seed ^ 0x77);
    let mut apply = |disk: &Disk, want: &mut Vec<u8>, op: u8, off: u64, len: u64| {
        let len = len.min(size - off);
        let r = &mut want[off as usize..(off + len) as usize];
        match op {
            0 => {
                rng.fill(r);
                disk.write_at(r, off).unwrap();
            }
            1 => {
                r.fill(0);
                disk.write_zeroes(off, len).unwrap();
            }
            _ => {
                r.fill(0);
                disk.discard(off, len).unwrap();
            }
        }
    };
    let c = |i: usize| comp[i * comp.len() / 6];
    // Partial writes inside a compressed cluster (unaligned, and aligned).
    apply(&disk, &mut want, 0, c(0) + 1000, 3000);
    apply(&disk, &mut want, 0, c(0) + cluster / 2, 4096);
    // A whole compressed cluster.
    apply(&disk, &mut want, 0, c(1), cluster);
    // Across a compressed cluster's end into the next cluster.
    apply(&disk, &mut want, 0, c(2) + cluster - 700, 5000);
    // Zeroes: a whole cluster and a partial one; a whole discard.
    apply(&disk, &mut want, 1, c(3), cluster);
    apply(&disk, &mut want, 1, c(4) + 512, 1024);
    apply(&disk, &mut want, 2, c(5), cluster);
    // The last cluster of the image (partial) if it is compressed.
    if let Some(&last) = comp.last() {
        if last + cluster > size {
            apply(&disk, &mut want, 0, last + 10, 100);
        }
    }
    assert_same_bytes(&read_all(&disk, MIB), &want, "read after writes");
    disk.flush().unwrap();
    disk.close().unwrap();
    check_clean(&img);
    compare_with_bytes(&img, &want, d);

    // Reopened: the same, and a second round over what is left compressed.
    let left = compressed_clusters(&img, cluster);
    let disk = open(&img, options(1, true, false));
    assert_same_bytes(&read_all(&disk, 256 * KIB), &want, "after reopen");
    for &g in left.iter().take(4) {
        apply(&disk, &mut want, 0, g + 4096, 100);
    }
    disk.close().unwrap();
    check_clean(&img);
    compare_with_bytes(&img, &want, d);
}

#[test]
fn direct_zlib_4k() {
    direct_case("zlib", 4 * KIB);
}

#[test]
fn direct_zlib_64k() {
    direct_case("zlib", 64 * KIB);
}

#[test]
fn direct_zlib_2m() {
    direct_case("zlib", 2 * MIB);
}

#[test]
fn direct_zstd_4k() {
    direct_case("zstd", 4 * KIB);
}

#[test]
fn direct_zstd_64k() {
    direct_case("zstd", 64 * KIB);
}

#[test]
fn direct_zstd_2m() {
    direct_case("zstd", 2 * MIB);
}

/// The host offset of the compressed data of guest cluster `guest`.
fn compressed_host_offset(img: &Path, guest: u64) -> u64 {
    let f = std::fs::File::open(img).unwrap();
    let mut b4 = [0u8; 4];
    f.read_exact_at(&mut b4, 20).unwrap();
    let cb = u32::from_be_bytes(b4);
    let cs = 1u64 << cb;
    let mut b8 = [0u8; 8];
    f.read_exact_at(&mut b8, 40).unwrap();
    let l1 = u64::from_be_bytes(b8);
    let entries = cs / 8;
    let c = guest / cs;
    f.read_exact_at(&mut b8, l1 + (c / entries) * 8).unwrap();
    let l2 = u64::from_be_bytes(b8) & L1E_OFFSET_MASK;
    f.read_exact_at(&mut b8, l2 + (c % entries) * 8).unwrap();
    let e = u64::from_be_bytes(b8);
    assert!(
        e & OFLAG_COMPRESSED != 0,
        "cluster {guest:#x} is not compressed"
    );
    let x = 62 - (cb - 8);
    e & ((1 << x) - 1)
}

fn hostile_case(kind: &str) {
    let cluster = 64 * KIB;
    let dir = tempdir(&format!("compressed-hostile-{kind}"));
    let d = dir.path();
    let size = 4 * MIB;
    let src = d.join("src.raw");
    make_source(&src, size, seed_from_env("compressed_hostile"));
    let img = compressed_image(d, &src, kind, cluster);
    let want = raw_contents(&img);
    let comp = compressed_clusters(&img, cluster);
    let victim = comp[comp.len() / 2];
    let host = compressed_host_offset(&img, victim);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    // One byte, so no neighbour sharing the host cluster is hit: 0xff
    // starts a deflate block of the reserved type, or breaks zstd's magic.
    f.write_all_at(&[0xff], host).unwrap();
    drop(f);

    let expect_corrupt = |disk: &Disk, what: &str| {
        let mut buf = vec![0u8; 4096];
        let e = disk.read_at(&mut buf, victim + 4096).unwrap_err();
        eprintln!("{what}: {e}");
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{host:#x}")) && msg.contains("compressed"),
            "{what}: the message names the compressed cluster's offset: {msg}"
        );
        // Every other cluster reads as qemu says.
        for c in (0..size).step_by(cluster as usize) {
            if c == victim {
                continue;
            }
            let mut b = vec![0u8; cluster as usize];
            disk.read_at(&mut b, c).unwrap();
            assert!(
                b[..] == want[c as usize..(c + cluster) as usize],
                "{what}: {c:#x}"
            );
        }
    };
    // Opened directly: reads, and a partial write (which must read the
    // old data) fail; the image is left as it was.
    let disk = open(&img, options(1, true, false));
    expect_corrupt(&disk, "direct");
    let e = disk.write_at(&[1u8; 100], victim + 5).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    disk.close().unwrap();

    // As a backing image, with and without copy-on-read.
    for cor in [false, true] {
        let overlay = d.join(format!("ov-{cor}.qcow2"));
        create_qcow2(
            &overlay,
            size,
            cluster,
            Compat::V3,
            Some(&Backing {
                name: path_str(&img),
                format: "qcow2",
            }),
        );
        let disk = open(&overlay, options(1, cor, false));
        expect_corrupt(&disk, &format!("backing cor={cor}"));
        disk.close().unwrap();
        check_clean(&overlay);
    }
}

#[test]
fn hostile_zlib_garbage() {
    hostile_case("zlib");
}

#[test]
fn hostile_zstd_garbage() {
    hostile_case("zstd");
}

/// Many small reads of one compressed cluster in flight at once share one
/// read and decompression of it (the others wait for it, then take the
/// kept cluster); a write into another part of the same cluster, sent with
/// them, rewrites it uncompressed meanwhile. Every read returns the bytes
/// it must, and the image ends equal to the reference (`qemu-img check`
/// and `compare`).
#[test]
fn small_reads_of_a_compressed_cluster_in_flight_with_a_write() {
    let cluster = 64 * KIB;
    let dir = tempdir("compressed-inflight");
    let d = dir.path();
    let size = size_for(cluster);
    let src = d.join("src.raw");
    make_source(&src, size, seed_from_env("compressed_inflight"));
    let img = compressed_image(d, &src, "zstd", cluster);
    let mut want = raw_contents(&img);
    let comp = compressed_clusters(&img, cluster);
    assert!(comp.len() >= 8, "too few compressed clusters: {comp:?}");
    let g = 4 * KIB;

    // Read-only: 16 reads of each of 4 clusters, all 64 in flight.
    let disk = open(&img, options(2, true, true));
    let reads: Vec<u64> = comp[..4]
        .iter()
        .flat_map(|&c| (0..16).map(move |i| c + i * g))
        .collect();
    let pending: Vec<_> = reads
        .iter()
        .map(|&off| (off, disk.submit_read(off, vec![0u8; g as usize])))
        .collect();
    for (off, p) in pending {
        let got = p.wait().unwrap();
        assert_same_bytes(&got, &want[off as usize..(off + g) as usize], "read-only");
    }
    disk.close().unwrap();

    let disk = open(&img, options(2, true, false));
    for (n, &c) in comp[..8].iter().enumerate() {
        let k = n as u64 % 16;
        let mut pending = Vec::new();
        for i in (0..16).filter(|&i| i != k) {
            let off = c + i * g;
            pending.push((off, disk.submit_read(off, vec![0u8; g as usize])));
        }
        let data = vec![0xa0 | n as u8; g as usize];
        let write = disk.submit_write(c + k * g, data.clone());
        for (off, p) in pending {
            let got = p.wait().unwrap();
            let what = format!("cluster {c:#x}, read at {off:#x}");
            assert_same_bytes(&got, &want[off as usize..(off + g) as usize], &what);
        }
        write.wait().unwrap();
        want[(c + k * g) as usize..(c + (k + 1) * g) as usize].copy_from_slice(&data);
    }
    assert_same_bytes(&read_all(&disk, 4 * KIB), &want, "after the writes");
    disk.close().unwrap();
    check_clean(&img);
    compare_with_bytes(&img, &want, d);
}
