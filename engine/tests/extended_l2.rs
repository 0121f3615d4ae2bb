//! Extended L2 entries (`extended_l2=on`: 32 subclusters per cluster), in
//! images `qemu-img create` makes with 16 KiB, 64 KiB and 2 MiB clusters.
//!
//! * `qemu_images_read_like_qemu`: images filled by `qemu-io` with patterns
//!   at subcluster-unaligned offsets, zero writes and discards, with and
//!   without a raw backing file, read through backfill (as the overlay and
//!   as a qcow2 backing layer under a plain overlay) equal
//!   `qemu-img convert -O raw`.
//! * `cold_4k_read_copies_one_subcluster`: copy-on-read of one 4 KiB read
//!   fetches only its granule (`max(subcluster, 4 KiB)`), which
//!   `qemu-img map` shows allocated while the rest of the cluster still
//!   comes from the backing file; after the whole disk is read,
//!   `qemu-img check` is clean and `qemu-img compare` finds the overlay
//!   equal to its backing.
//! * `writes_match_a_plain_file`: writes, write-zeroes and discards at
//!   unaligned offsets through backfill, with copy-on-read reads between
//!   them, applied with plain file writes to a copy of the backing file too:
//!   `qemu-img check` is clean and `qemu-img compare` finds them equal.
//! * `cold_read_over_a_compressed_cluster_keeps_all_of_it`: over a
//!   compressed backing image (clusters of 32, 64 and 128 KiB), a cold
//!   4 KiB read keeps the whole decompressed cluster's part in its overlay
//!   cluster, up to the subclusters a client wrote or zeroed
//!   (`qemu-img map`); a read next to it fetches nothing.
//! * `create_makes_extended_overlays`: `backfill create -o extended_l2=on`
//!   makes images `qemu-img info` calls extended, and refuses cluster sizes
//!   QEMU refuses (under 16 KiB) as qemu-img does.

mod common;

use backfill::{CreateOptions, ExtentKind};
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

const CLUSTER_SIZES: [u64; 3] = [16 * KIB, 64 * KIB, 2 * MIB];

/// `qemu-img create -f qcow2 -o extended_l2=on,cluster_size=CS` with an
/// optional backing file (a name relative to the image's directory; qcow2
/// when it ends in `.qcow2`, else raw).
fn create_ext(path: &Path, size: u64, cs: u64, backing: Option<&str>) {
    let dir = path.parent().unwrap();
    let mut args: Vec<String> = vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        format!("extended_l2=on,cluster_size={cs}"),
    ];
    if let Some(b) = backing {
        let format = if b.ends_with(".qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        args.extend(["-b".into(), b.into(), "-F".into(), format.into()]);
    }
    args.push(path_str(path));
    args.push(size.to_string());
    require_tool("qemu-img");
    let out = std::process::Command::new("qemu-img")
        .args(&args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// qemu-io commands at offsets that straddle subclusters of every size
/// tested: patterns, zero writes (some unaligned) and discards.
fn qemu_io_commands(size: u64, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let mut cmds = Vec::new();
    for i in 0..40 {
        let len = rng.range(1, 300 * KIB);
        let off = rng.below(size - len);
        // qemu-io wants 512-byte multiples for zero writes and discards.
        let (a, l) = (off / 512 * 512, len.div_ceil(512) * 512);
        match i % 5 {
            3 => cmds.push(format!("write -z {a} {l}")),
            4 => cmds.push(format!("discard {a} {l}")),
            _ => cmds.push(format!("write -P {} {off} {len}", 1 + rng.below(250))),
        }
    }
    cmds
}

#[test]
fn qemu_images_read_like_qemu() {
    let dir = tempdir("extl2-read");
    let d = dir.path();
    let size = 6 * MIB + 12345 / 512 * 512;
    write_random_file(&d.join("base.raw"), size, 7);
    for (n, &cs) in CLUSTER_SIZES.iter().enumerate() {
        for backing in [None, Some("base.raw")] {
            let img = d.join(format!("e{n}.qcow2"));
            create_ext(&img, size, cs, backing);
            qemu_io(&img, "qcow2", &qemu_io_commands(size, 100 + n as u64));
            let expected = raw_contents(&img);
            let what = format!("cluster size {cs}, backing {backing:?}");

            // The image itself, without copy-on-read (nothing changes).
            let disk = open(&img, options(2, false, true));
            assert_same_bytes(&read_all(&disk, 256 * KIB), &expected, &what);
            disk.close().unwrap();

            // As the backing layer of a plain overlay.
            let top = d.join(format!("top{n}.qcow2"));
            create_qcow2(
                &top,
                size,
                64 * KIB,
                Compat::V3,
                Some(&Backing {
                    name: format!("e{n}.qcow2"),
                    format: "qcow2",
                }),
            );
            let disk = open(&top, options(2, false, true));
            assert_same_bytes(
                &read_all(&disk, MIB),
                &expected,
                &format!("{what}, as a backing layer"),
            );
            disk.close().unwrap();
            std::fs::remove_file(&top).unwrap();

            // Reading with copy-on-read copies everything; the image stays
            // clean and equal.
            if backing.is_some() {
                let disk = open(&img, options(2, true, false));
                assert_same_bytes(&read_all(&disk, 100 * KIB), &expected, &what);
                disk.close().unwrap();
                check_clean(&img);
                compare_with_bytes(&img, &expected, d);
            }
        }
    }
}

#[test]
fn cold_4k_read_copies_one_subcluster() {
    let dir = tempdir("extl2-cor");
    let d = dir.path();
    let size = 8 * MIB;
    let base = write_random_file(&d.join("base.raw"), size, 11);
    for &cs in &[64 * KIB, 2 * MIB] {
        let img = d.join("o.qcow2");
        create_ext(&img, size, cs, Some("base.raw"));
        let granule = (cs / 32).max(4 * KIB);
        // Inside the second cluster, within its third granule.
        let off = cs + 2 * granule + (granule - 4096) / 2;
        let disk = open(&img, options(1, true, false));
        let mut buf = vec![0u8; 4096];
        disk.read_at(&mut buf, off).unwrap();
        assert_same_bytes(&buf, &base[off as usize..off as usize + 4096], "cold read");
        disk.flush().unwrap();
        let stats = disk.stats();
        assert_eq!(stats.bytes_fetched, granule, "cluster size {cs}: {stats:?}");
        assert_eq!(stats.cor_fills, 1, "{stats:?}");
        // Block status answers at subcluster granularity.
        let status = disk.block_status(cs, cs).unwrap();
        let data: Vec<_> = status
            .iter()
            .filter(|s| s.kind == ExtentKind::Data)
            .map(|s| (s.offset, s.len))
            .collect();
        assert_eq!(data, vec![(cs + 2 * granule, granule)], "{status:?}");
        disk.close().unwrap();

        check_clean(&img);
        let map = qemu_map(&img);
        let lo = cs + 2 * granule;
        let hit = map_at(&map, lo);
        assert_eq!(
            (hit.start, hit.length, hit.depth),
            (lo, granule, 0),
            "cluster size {cs}: {map:?}"
        );
        assert_eq!(map_at(&map, lo - 1).depth, 1, "{map:?}");
        assert_eq!(map_at(&map, lo + granule).depth, 1, "{map:?}");
        compare_identical(&img, &d.join("base.raw"));

        // A second cold read in the same cluster uses the same host cluster;
        // then the whole disk.
        let disk = open(&img, options(2, true, false));
        disk.read_at(&mut buf, cs + cs / 2).unwrap();
        assert_same_bytes(
            &read_all(&disk, 192 * KIB),
            &base,
            &format!("cluster size {cs}"),
        );
        disk.close().unwrap();
        check_clean(&img);
        compare_identical(&img, &d.join("base.raw"));
        let map = qemu_map(&img);
        assert!(map.iter().all(|e| e.depth == 0), "{map:?}");
        std::fs::remove_file(&img).unwrap();
    }
}

/// One write-like operation, applied to the disk and to the reference.
enum OpKind {
    Write(u8),
    Zeroes,
    Discard,
    Read,
}

#[test]
fn writes_match_a_plain_file() {
    let dir = tempdir("extl2-write");
    let d = dir.path();
    let size = 5 * MIB + 3 * 512;
    write_random_file(&d.join("base.raw"), size, 23);
    // A compressed backing image (fills keep whole decompressed clusters):
    // text-like bytes, a few random pieces stored uncompressed, holes.
    let mut text = vec![0u8; size as usize];
    let mut rng = Rng::new(24);
    for (i, b) in text.iter_mut().enumerate() {
        *b = b"lorem ipsum "[i % 12] ^ (i / 700) as u8;
    }
    for _ in 0..6 {
        let (off, len) = (
            rng.below(size - 100 * KIB) as usize,
            rng.range(1, 100 * KIB) as usize,
        );
        match rng.below(2) {
            0 => rng.fill(&mut text[off..off + len]),
            _ => text[off..off + len].fill(0),
        }
    }
    write_file(&d.join("text.raw"), &text);
    qemu_convert_compressed(
        &d.join("text.raw"),
        &d.join("text.qcow2"),
        "cluster_size=32K",
    );
    for (n, &cs) in CLUSTER_SIZES.iter().enumerate() {
        for backing in [Some("base.raw"), Some("text.qcow2"), None] {
            let img = d.join("w.qcow2");
            create_ext(&img, size, cs, backing);
            let mut reference = match backing {
                Some("text.qcow2") => text.clone(),
                Some(_) => read_file(&d.join("base.raw")),
                None => vec![0u8; size as usize],
            };
            let mut rng = Rng::new(1000 + n as u64);
            for round in 0..2 {
                let disk = open(&img, options(2, true, false));
                for i in 0..120 {
                    let len = match rng.below(4) {
                        0 => rng.range(1, 2 * KIB),
                        1 => rng.range(1, 70 * KIB),
                        2 => 4 * KIB,
                        _ => rng.range(1, 700 * KIB),
                    };
                    let off = rng.below(size - len + 1);
                    let op = match rng.below(8) {
                        0 => OpKind::Zeroes,
                        1 => OpKind::Discard,
                        2 | 3 => OpKind::Read,
                        _ => OpKind::Write(1 + rng.below(250) as u8),
                    };
                    let range = off as usize..(off + len) as usize;
                    let what = format!("cs {cs}, backing {backing:?}, round {round}, op {i}");
                    match op {
                        OpKind::Write(p) => {
                            let data: Vec<u8> = (0..len).map(|j| p ^ (j as u8)).collect();
                            disk.write_at(&data, off).unwrap();
                            reference[range].copy_from_slice(&data);
                        }
                        OpKind::Zeroes => {
                            disk.write_zeroes(off, len).unwrap();
                            reference[range].fill(0);
                        }
                        OpKind::Discard => {
                            // Discarded bytes read as zeros here (recorded
                            // as zero subclusters over a backing file).
                            disk.discard(off, len).unwrap();
                            reference[range].fill(0);
                        }
                        OpKind::Read => {
                            let mut buf = vec![0u8; len as usize];
                            disk.read_at(&mut buf, off).unwrap();
                            assert_same_bytes(&buf, &reference[range], &what);
                        }
                    }
                }
                assert_same_bytes(
                    &read_all(&disk, 300 * KIB),
                    &reference,
                    &format!("cs {cs}, backing {backing:?}, round {round}"),
                );
                disk.close().unwrap();
                check_clean(&img);
                compare_with_bytes(&img, &reference, d);
            }
            std::fs::remove_file(&img).unwrap();
        }
    }
}

#[test]
fn create_makes_extended_overlays() {
    let dir = tempdir("extl2-create");
    let d = dir.path();
    let size = 3 * MIB;
    let base = write_random_file(&d.join("base.raw"), size, 5);
    let img = d.join("c.qcow2");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backfill"))
        .args(["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o"])
        .arg("extended_l2=on,cluster_size=128K")
        .arg(&img)
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "backfill create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_str(&qemu_img([
        "info".as_ref(),
        "--output=json".as_ref(),
        img.as_os_str(),
    ]))
    .unwrap();
    assert_eq!(
        info["format-specific"]["data"]["extended-l2"], true,
        "{info}"
    );
    assert_eq!(info["cluster-size"], 128 * KIB, "{info}");
    check_clean(&img);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backfill"))
        .arg("info")
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("extended l2: true"), "backfill info:\n{text}");

    // qemu-io writes a subcluster (4 KiB of 128 KiB clusters); backfill
    // reads it, and the backing data around it.
    qemu_io(&img, "qcow2", &["write -P 0x5a 135168 4096".to_string()]);
    let mut expected = base.clone();
    expected[135168..139264].fill(0x5a);
    let disk = open(&img, options(1, true, false));
    assert_same_bytes(&read_all(&disk, 64 * KIB), &expected, "after qemu-io");
    disk.close().unwrap();
    check_clean(&img);
    compare_with_bytes(&img, &expected, d);

    // Library: too-small clusters are refused, as qemu-img refuses them.
    let e = backfill::create(
        d.join("small.qcow2"),
        &CreateOptions {
            size: Some(size),
            cluster_size: 4096,
            extended_l2: true,
            ..CreateOptions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("at least 16384"), "{e}");
    let out = run_status(
        "qemu-img",
        [
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4096",
            &path_str(&d.join("small2.qcow2")),
            "1M",
        ],
    );
    assert!(
        !out.status.success(),
        "qemu-img accepted 4 KiB subclustered clusters"
    );

    // A hand-made 4 KiB image with the bit set is refused with a reason.
    std::fs::copy(&img, d.join("bad.qcow2")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("bad.qcow2"))
        .unwrap();
    f.write_all_at(&12u32.to_be_bytes(), 20).unwrap(); // cluster_bits = 12
    drop(f);
    let Err(e) = backfill::Disk::open(d.join("bad.qcow2"), options(1, false, true)) else {
        panic!("a 4 KiB image with extended L2 entries opened");
    };
    assert!(e.to_string().contains("extended L2"), "{e}");
}

/// `qemu-img convert -c -o extended_l2=on`: compressed clusters have no
/// subclusters; they read like qemu's, and writes, write-zeroes and
/// discards over them (and over the uncompressed ones) match a plain file.
#[test]
fn compressed_clusters_with_subclusters() {
    let dir = tempdir("extl2-compressed");
    let d = dir.path();
    let size = 4 * MIB;
    let src = d.join("src.raw");
    let mut data = vec![0u8; size as usize];
    Rng::new(3).fill(&mut data[..MIB as usize]); // random: stored uncompressed
    write_file(&src, &data);
    qemu_io(
        &src,
        "raw",
        &[
            "write -P 0x61 1048576 1500000".to_string(),
            "write -P 0x62 3145728 700000".to_string(),
        ],
    );
    let img = d.join("c.qcow2");
    qemu_convert_compressed(&src, &img, "extended_l2=on,cluster_size=64K");
    let mut reference = read_file(&src);
    assert_same_bytes(&raw_contents(&img), &reference, "qemu's own view");
    let disk = open(&img, options(2, false, false));
    assert_same_bytes(&read_all(&disk, 200 * KIB), &reference, "read");
    let mut rng = Rng::new(77);
    for _ in 0..60 {
        let len = rng.range(1, 150 * KIB);
        let off = rng.below(size - len + 1);
        let range = off as usize..(off + len) as usize;
        match rng.below(3) {
            0 => {
                disk.write_zeroes(off, len).unwrap();
                reference[range].fill(0);
            }
            1 => {
                disk.discard(off, len).unwrap();
                reference[range].fill(0);
            }
            _ => {
                let p = 1 + rng.below(250) as u8;
                disk.write_at(&vec![p; len as usize], off).unwrap();
                reference[range].fill(p);
            }
        }
    }
    assert_same_bytes(&read_all(&disk, 200 * KIB), &reference, "after writes");
    disk.close().unwrap();
    check_clean(&img);
    compare_with_bytes(&img, &reference, d);
}

/// The overlay's data regions (depth 0, data) of `[lo, hi)`, by
/// `qemu-img map`, as (offset, length) runs relative to `lo`.
fn overlay_data(map: &[MapEntry], lo: u64, hi: u64) -> Vec<(u64, u64)> {
    map.iter()
        .filter(|e| e.depth == 0 && e.data && e.end() > lo && e.start < hi)
        .map(|e| (e.start.max(lo) - lo, e.end().min(hi) - e.start.max(lo)))
        .collect()
}

/// A cold 4 KiB read of an extended-L2 overlay over a compressed backing
/// cluster decompresses the whole backing cluster: the fill keeps all of
/// it that lies in the overlay cluster (where no subcluster is allocated
/// or zero), so the next reader of a neighbouring granule neither fetches
/// nor inflates that cluster again; a backing cluster larger than the
/// overlay's fills the neighbouring overlay cluster it covers too. Backing
/// clusters of 32, 64 and 128 KiB under the overlay's 64 KiB; what the
/// fills cover is read from `qemu-img map`, the bytes compared with the
/// source file.
#[test]
fn cold_read_over_a_compressed_cluster_keeps_all_of_it() {
    let dir = tempdir("extl2-compressed-cor");
    let d = dir.path();
    let size = MIB;
    let cs = 64 * KIB;
    let g = 4 * KIB;
    // 128 KiB of random bytes (stored uncompressed), then text-like bytes
    // that differ in every 512-byte block (stored compressed).
    let mut src_bytes = vec![0u8; size as usize];
    Rng::new(5).fill(&mut src_bytes[..128 * KIB as usize]);
    for (i, b) in src_bytes.iter_mut().enumerate().skip(128 * KIB as usize) {
        *b = b"abcdefgh"[i % 8] ^ (i / 512) as u8;
    }
    let src = d.join("src.raw");
    write_file(&src, &src_bytes);
    for bcs in [32 * KIB, 64 * KIB, 128 * KIB] {
        let base = d.join("base.qcow2");
        let _ = std::fs::remove_file(&base);
        qemu_convert_compressed(&src, &base, &format!("cluster_size={bcs}"));
        let img = d.join("o.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_create_qcow2(
            &img,
            "extended_l2=on,cluster_size=64K",
            Some(("base.qcow2", "qcow2")),
            None,
        );
        let mut reference = src_bytes.clone();
        let disk = open(&img, options(1, true, false));
        // Cluster 4: the client writes granule 5 and zeroes granule 9.
        let c4 = 4 * cs;
        disk.write_at(&vec![0xee; g as usize], c4 + 5 * g).unwrap();
        reference[(c4 + 5 * g) as usize..(c4 + 6 * g) as usize].fill(0xee);
        disk.write_zeroes(c4 + 9 * g, g).unwrap();
        reference[(c4 + 9 * g) as usize..(c4 + 10 * g) as usize].fill(0);

        let mut buf = vec![0u8; g as usize];
        let mut read = |off: u64| {
            disk.read_at(&mut buf, off).unwrap();
            assert_same_bytes(&buf, &reference[off as usize..(off + g) as usize], "read");
        };
        read(2 * g); // random bytes: an uncompressed cluster
        read(2 * cs + 3 * g);
        read(c4 + 7 * g);
        // Fills count once their write-back is in.
        disk.flush().unwrap();
        // A 128 KiB compressed cluster also fills the overlay cluster next
        // to the one read (clusters 3 and 5), from the same bytes.
        let siblings = if bcs > cs { 2 } else { 0 };
        let fills = disk.stats().cor_fills;
        assert_eq!(
            fills,
            3 + siblings,
            "backing clusters of {bcs}: {:?}",
            disk.stats()
        );
        // Within what the second read's fill kept: no fill, no fetch.
        let fetched = disk.stats().bytes_fetched;
        read(2 * cs);
        disk.flush().unwrap();
        assert_eq!(disk.stats().cor_fills, fills, "{:?}", disk.stats());
        assert_eq!(disk.stats().bytes_fetched, fetched, "{:?}", disk.stats());
        disk.close().unwrap();

        check_clean(&img);
        let map = qemu_map(&img);
        // An uncompressed cluster: the granule read, no more.
        assert_eq!(overlay_data(&map, 0, cs), vec![(2 * g, g)], "{map:?}");
        // The compressed cluster's part in this overlay cluster.
        let kept = bcs.min(cs);
        assert_eq!(
            overlay_data(&map, 2 * cs, 3 * cs),
            vec![(0, kept)],
            "backing clusters of {bcs}: {map:?}"
        );
        // Stopped by the written granule below and the zeroed one above
        // (the compressed cluster reaches both, but for 32 KiB, which
        // ends below the zeroed granule).
        let top = if bcs == 32 * KIB { 8 * g } else { 9 * g };
        assert_eq!(
            overlay_data(&map, c4, c4 + cs),
            vec![(5 * g, top - 5 * g)],
            "backing clusters of {bcs}: {map:?}"
        );
        assert_zero_in_overlay(&map, c4 + 9 * g, g);
        if siblings > 0 {
            for c in [3, 5] {
                assert_eq!(
                    overlay_data(&map, c * cs, (c + 1) * cs),
                    vec![(0, cs)],
                    "cluster {c}: {map:?}"
                );
            }
        }
        compare_with_bytes(&img, &reference, d);

        // The rest of the disk, read through copy-on-read, still equals
        // the source with the client's writes.
        let disk = open(&img, options(2, true, false));
        assert_same_bytes(&read_all(&disk, 96 * KIB), &reference, "whole disk");
        disk.close().unwrap();
        check_clean(&img);
        compare_with_bytes(&img, &reference, d);
    }
}
