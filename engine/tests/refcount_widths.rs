//! Refcount widths 1 to 64 bits (`qemu-img create -o refcount_bits=N`).
//!
//! * `engine_writes_every_width`: for each width, an overlay `qemu-img`
//!   made with 4 KiB clusters (so a 64-bit refcount block covers only 512
//!   clusters and the run allocates new refcount blocks and grows the
//!   refcount table) over a random raw backing. backfill reads it all with
//!   copy-on-read on two cores, writes, zeroes and discards, is closed,
//!   reopened and written again. `qemu-img check` must find it clean (no
//!   leak: every refcount the engine wrote is right, in QEMU's packing of
//!   narrow entries), and `qemu-img compare` must find it equal to a
//!   reference built with plain byte copies.
//! * `backfill_create_every_width`: `backfill create -o refcount_bits=N`
//!   makes an image `qemu-img info` reports with that width, `qemu-img
//!   check` finds clean, and `qemu-io` can write to.
//! * `check_and_repair_every_width`: refcount blocks wiped in an image
//!   qemu wrote; `backfill check` and `qemu-img check` agree it is
//!   corrupt; `backfill check --repair` rebuilds it and `qemu-img check`
//!   then finds it clean with the data intact.

mod common;

use common::*;
use std::path::Path;

const WIDTHS: [u64; 7] = [1, 2, 4, 8, 16, 32, 64];
const CLUSTER: u64 = 4096;

fn refcount_bits_of(image: &Path) -> u64 {
    let json = qemu_img(["info".as_ref(), "--output=json".as_ref(), image.as_os_str()]);
    let info: serde_json::Value = serde_json::from_str(&json).unwrap();
    info["format-specific"]["data"]["refcount-bits"]
        .as_u64()
        .unwrap_or_else(|| panic!("no refcount-bits in {json}"))
}

/// One pass of client I/O: writes, zeroes and discards at random
/// cluster-unaligned places, mirrored into `reference`.
fn client_io(disk: &backfill::Disk, reference: &mut [u8], rng: &mut Rng) {
    let size = reference.len() as u64;
    for _ in 0..60 {
        let off = rng.below(size - 1);
        let len = rng.range(1, 200 * KIB).min(size - off);
        match rng.below(6) {
            0 => {
                disk.write_zeroes(off, len).unwrap();
                reference[off as usize..(off + len) as usize].fill(0);
            }
            1 => {
                // Discard over a backing image reads as zeros too.
                disk.discard(off, len).unwrap();
                reference[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                disk.write_at(&buf, off).unwrap();
                reference[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
        }
    }
}

#[test]
fn engine_writes_every_width() {
    require_tool("qemu-img");
    let dir = tempdir("refcount-widths");
    let size = 6 * MIB + 3 * KIB;
    let base = join(dir.path(), "base.raw");
    let backing = write_random_file(&base, size, 7);
    for (i, bits) in WIDTHS.into_iter().enumerate() {
        let image = join(dir.path(), &format!("rc{bits}.qcow2"));
        qemu_create_qcow2(
            &image,
            &format!("cluster_size={CLUSTER},refcount_bits={bits}"),
            Some((&path_str(&base), "raw")),
            None,
        );
        assert_eq!(refcount_bits_of(&image), bits);
        let mut reference = backing.clone();
        let mut rng = Rng::new(100 + i as u64);

        let disk = open(&image, options(2, true, false));
        assert_same_bytes(&read_all(&disk, 192 * KIB), &reference, "copy-on-read");
        client_io(&disk, &mut reference, &mut rng);
        disk.flush().unwrap();
        disk.close().unwrap();
        check_clean(&image);
        compare_with_bytes(&image, &reference, dir.path());

        let disk = open(&image, options(2, true, false));
        client_io(&disk, &mut reference, &mut rng);
        assert_same_bytes(&read_all(&disk, MIB), &reference, "after reopening");
        disk.close().unwrap();
        check_clean(&image);
        compare_with_bytes(&image, &reference, dir.path());
        assert_eq!(refcount_bits_of(&image), bits);
    }
}

#[test]
fn backfill_create_every_width() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let dir = tempdir("refcount-create");
    for bits in WIDTHS {
        let image = join(dir.path(), &format!("c{bits}.qcow2"));
        backfill_ok(&[
            "create",
            "-o",
            &format!("refcount_bits={bits},cluster_size=4K"),
            &path_str(&image),
            "8M",
        ]);
        assert_eq!(refcount_bits_of(&image), bits);
        let info = String::from_utf8_lossy(&backfill_output(&["info", &path_str(&image)]).stdout)
            .into_owned();
        assert!(info.contains(&format!("refcount bits: {bits}\n")), "{info}");
        check_clean(&image);
        qemu_io(&image, "qcow2", &["write -P 9 100k 3M".to_string()]);
        check_clean(&image);
    }
    let out = backfill_output(&[
        "create",
        "-o",
        "refcount_bits=3",
        &path_str(&join(dir.path(), "bad.qcow2")),
        "1M",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refcount_bits 3"), "{err}");
}

#[test]
fn check_and_repair_every_width() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let dir = tempdir("refcount-repair");
    for bits in WIDTHS {
        let image = join(dir.path(), &format!("r{bits}.qcow2"));
        qemu_create_qcow2(
            &image,
            &format!("cluster_size={CLUSTER},refcount_bits={bits}"),
            None,
            Some(4 * MIB),
        );
        qemu_io(
            &image,
            "qcow2",
            &[
                "write -P 3 0 1M".to_string(),
                "write -P 4 2100k 900k".to_string(),
            ],
        );
        let before = raw_contents(&image);
        let ok = backfill_output(&["check", &path_str(&image)]);
        assert_eq!(ok.status.code(), Some(0), "{bits} bits: {ok:?}");

        wipe_refcount_blocks(&image);
        let qemu = run_status("qemu-img", ["check".as_ref(), image.as_os_str()]);
        assert_eq!(qemu.status.code(), Some(2), "{bits} bits: {qemu:?}");
        let ours = backfill_output(&["check", &path_str(&image)]);
        assert_eq!(ours.status.code(), Some(2), "{bits} bits: {ours:?}");

        let repaired = backfill_output(&["check", "--repair", &path_str(&image)]);
        assert_eq!(repaired.status.code(), Some(0), "{bits} bits: {repaired:?}");
        check_clean(&image);
        assert_same_bytes(&raw_contents(&image), &before, "after repair");
    }
}

/// Zeroes every refcount block (the refcount table stays): every cluster
/// in use now has a refcount below its references.
fn wipe_refcount_blocks(image: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut h = [0u8; 64];
    f.read_exact_at(&mut h, 0).unwrap();
    let cs = 1u64 << u32::from_be_bytes(h[20..24].try_into().unwrap());
    let rt = u64::from_be_bytes(h[48..56].try_into().unwrap());
    let rt_clusters = u64::from(u32::from_be_bytes(h[56..60].try_into().unwrap()));
    let mut table = vec![0u8; (rt_clusters * cs) as usize];
    f.read_exact_at(&mut table, rt).unwrap();
    for e in table.chunks_exact(8) {
        let off = u64::from_be_bytes(e.try_into().unwrap()) & !0x1ff;
        if off != 0 {
            f.write_all_at(&vec![0u8; cs as usize], off).unwrap();
        }
    }
}
