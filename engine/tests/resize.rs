//! Growing an overlay (`backfill resize`, `backfill::resize`).
//!
//! The oracle is the contents a reader must see: the old disk below the old
//! size, zeros above it, even where the backing image is larger (its old
//! data must never show through). Each case is also run through
//! `qemu-img resize` on a copy of the same image, and `qemu-img compare`
//! must find the two results identical; `qemu-img check` must find ours
//! clean.

mod common;

use common::*;
use std::path::Path;

/// Resizes `image` with backfill and (with `qemu_too`) a copy of it with
/// qemu-img, and checks both against `expect` (the whole new disk).
fn resize_and_verify(dir: &Path, image: &Path, new_size: u64, expect: &[u8], qemu_too: bool) {
    let theirs = dir.join("qemu-resized.qcow2");
    std::fs::copy(image, &theirs).unwrap();
    let out = backfill_output(&["resize", &path_str(image), &new_size.to_string()]);
    assert!(
        out.status.success(),
        "backfill resize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Image resized.\n");
    if qemu_too {
        qemu_img(["resize", "-q", &path_str(&theirs), &new_size.to_string()]);
    }
    check_clean(image);
    assert_eq!(virtual_size(image), new_size);
    compare_with_bytes(image, expect, dir);
    let disk = open(image, options(2, true, false));
    assert_same_bytes(&read_all(&disk, 256 * KIB), expect, "read through backfill");
    disk.close().unwrap();
    check_clean(image);
    if qemu_too {
        qemu_img(["compare", "-q", &path_str(image), &path_str(&theirs)]);
    }
}

#[test]
fn grow_over_a_larger_backing_reads_zeros() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let dir = tempdir("resize-larger");
    let base = join(dir.path(), "base.raw");
    let backing = write_random_file(&base, 3 * MIB, 11);
    // Old size: not a multiple of any cluster size; new size past the
    // backing image's end.
    let old = MIB + 1536;
    let new = 4 * MIB;
    for (i, opts) in [
        "cluster_size=65536",
        "cluster_size=4096",
        "cluster_size=65536,compat=0.10",
        "cluster_size=2M",
        "cluster_size=65536,extended_l2=on",
    ]
    .into_iter()
    .enumerate()
    {
        // How the last, partial cluster looks before the resize.
        for last in ["unallocated", "copy-on-read", "qemu-write", "zero"] {
            let image = join(dir.path(), &format!("ov{i}-{last}.qcow2"));
            qemu_create_qcow2(&image, opts, Some((&path_str(&base), "raw")), Some(old));
            let mut expect = backing[..old as usize].to_vec();
            match last {
                "copy-on-read" => {
                    // backfill fills the whole last cluster from the backing.
                    let disk = open(&image, options(1, true, false));
                    let got = read_all(&disk, MIB);
                    disk.close().unwrap();
                    assert_same_bytes(&got, &expect, "copy-on-read before the resize");
                }
                "qemu-write" => {
                    qemu_io(
                        &image,
                        "qcow2",
                        &[format!("write -P 7 {} 1000", old - 1000)],
                    );
                    expect[(old - 1000) as usize..].fill(7);
                }
                "zero" if !opts.contains("0.10") => {
                    qemu_io(&image, "qcow2", &[format!("write -z {} 1536", old - 1536)]);
                    expect[(old - 1536) as usize..].fill(0);
                }
                _ => {}
            }
            expect.resize(new as usize, 0);
            // qemu-img refuses to grow a compat 0.10 image over a larger
            // backing image ("Failed to zero out new clusters"): it has no
            // zero flag. backfill gives the new area zeroed data clusters.
            let qemu_too = !opts.contains("0.10");
            resize_and_verify(dir.path(), &image, new, &expect, qemu_too);
        }
    }
}

#[test]
fn grow_moves_the_l1_table_and_keeps_data() {
    require_tool("qemu-img");
    let dir = tempdir("resize-l1");
    let base = join(dir.path(), "base.raw");
    let backing = write_random_file(&base, 6 * MIB, 12);
    // 4 KiB clusters: one L1 cluster maps 1 GiB, so 3 GiB needs a new table.
    let image = join(dir.path(), "ov.qcow2");
    qemu_create_qcow2(
        &image,
        "cluster_size=4096",
        Some((&path_str(&base), "raw")),
        Some(6 * MIB),
    );
    let mut expect = backing.clone();
    let disk = open(&image, options(2, true, false));
    let mut rng = Rng::new(5);
    for _ in 0..40 {
        let off = rng.below(6 * MIB - 70 * KIB);
        let mut buf = vec![0u8; rng.range(1, 64 * KIB) as usize];
        rng.fill(&mut buf);
        disk.write_at(&buf, off).unwrap();
        expect[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
    }
    disk.close().unwrap();
    let new = 3 << 30;
    let report = backfill::resize(&image, new).unwrap();
    assert!(report.l1_moved, "{report:?}");
    assert_eq!(report.zeroed_bytes, 0);
    check_clean(&image);
    assert_eq!(virtual_size(&image), new);

    // The old data is intact, the new area reads zeros and takes writes.
    let disk = open(&image, options(2, true, false));
    let mut got = vec![0u8; 6 * MIB as usize];
    disk.read_at(&mut got, 0).unwrap();
    assert_same_bytes(&got, &expect, "old area after the resize");
    let mut tail = vec![1u8; 3 * MIB as usize];
    disk.read_at(&mut tail, new - 3 * MIB).unwrap();
    assert!(tail.iter().all(|&b| b == 0), "new area is not zeros");
    disk.write_at(&[9u8; 8192], new - 8192).unwrap();
    disk.close().unwrap();
    check_clean(&image);
    let map = qemu_map(&image);
    assert!(map_at(&map, new - 4096).data, "{map:?}");
}

#[test]
fn grow_without_backing_and_cli_errors() {
    require_tool("qemu-img");
    let dir = tempdir("resize-cli");
    let image = join(dir.path(), "plain.qcow2");
    qemu_create_qcow2(&image, "", None, Some(MIB));
    qemu_io(&image, "qcow2", &["write -P 3 0 1M".to_string()]);
    let ok = backfill_output(&["resize", &path_str(&image), "+1M"]);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(virtual_size(&image), 2 * MIB);
    let mut expect = vec![3u8; MIB as usize];
    expect.resize(2 * MIB as usize, 0);
    compare_with_bytes(&image, &expect, dir.path());
    check_clean(&image);

    for args in [
        vec!["resize", "IMG", "-512K"],
        vec!["resize", "--shrink", "IMG", "1M"],
    ] {
        let img = path_str(&image);
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "IMG" { img.as_str() } else { a })
            .collect();
        let out = backfill_output(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("shrinking"), "{args:?}: {err}");
    }
    // Same size: nothing to do, still success.
    let same = backfill_output(&["resize", &path_str(&image), "2M"]);
    assert!(same.status.success(), "{same:?}");
    check_clean(&image);
    compare_with_bytes(&image, &expect, dir.path());
}
