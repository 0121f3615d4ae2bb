//! Images with internal snapshots (`qemu-img snapshot -c`): their active
//! layer opens read-only (writing would have to copy the clusters the
//! snapshots share first), and such images work as backing images.
//!
//! * `read_only_reads_the_active_layer`: reads equal `qemu-img convert -O
//!   raw` of the active layer (not of a snapshot); `backfill check` agrees
//!   with `qemu-img check` that the image is clean (the snapshots' L1 and L2
//!   tables and shared clusters are counted); a read-write open, `serve`
//!   without `--read-only` and `check --repair` are refused with a reason
//!   naming the snapshots; nothing in the file changes.
//! * `as_a_backing_image`: an overlay on an image with snapshots reads the
//!   active layer with copy-on-read and checks clean.
//! * `check_finds_damage_in_a_snapshot_table`: a snapshot L1 entry pointing
//!   past the end of the file is corruption for both checkers.

mod common;

use backfill::ErrorKind;
use common::*;
use std::path::{Path, PathBuf};

/// An image with two snapshots, the active layer changed after each.
fn snapshotted(dir: &Path, opts: &str) -> PathBuf {
    let img = dir.join("snap.qcow2");
    qemu_create_qcow2(&img, opts, None, Some(6 * MIB));
    qemu_io(
        &img,
        "qcow2",
        &["write -P 1 0 2M".into(), "write -P 2 3M 1M".into()],
    );
    qemu_img(["snapshot", "-c", "first", &path_str(&img)]);
    qemu_io(
        &img,
        "qcow2",
        &["write -P 3 64k 100k".into(), "write -z 3M 64k".into()],
    );
    qemu_img(["snapshot", "-c", "second", &path_str(&img)]);
    qemu_io(
        &img,
        "qcow2",
        &["write -P 4 1M 1500k".into(), "discard 5M 1M".into()],
    );
    img
}

#[test]
fn read_only_reads_the_active_layer() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let dir = tempdir("snapshots");
    for opts in [
        "cluster_size=64K",
        "cluster_size=4K,refcount_bits=64",
        "compat=0.10",
    ] {
        let img = snapshotted(dir.path(), opts);
        check_clean(&img);
        let before = read_file(&img);
        let expect = raw_contents(&img);

        let disk = open(&img, options(2, false, true));
        assert_same_bytes(&read_all(&disk, 320 * KIB), &expect, opts);
        disk.close().unwrap();

        let ok = backfill_output(&["check", &path_str(&img)]);
        assert_eq!(ok.status.code(), Some(0), "{opts}: {ok:?}");

        let Err(e) = backfill::Disk::open(&img, options(1, true, false)) else {
            panic!("{opts}: opened read-write");
        };
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("internal snapshot"), "{e}");
        assert!(e.to_string().contains("read-only"), "{e}");
        let repair = backfill_output(&["check", "--repair", &path_str(&img)]);
        assert!(!repair.status.success(), "{opts}: {repair:?}");
        assert!(
            String::from_utf8_lossy(&repair.stderr).contains("snapshot"),
            "{repair:?}"
        );
        let info = backfill_output(&["info", &path_str(&img)]);
        assert!(
            String::from_utf8_lossy(&info.stdout).contains("internal snapshots: 2"),
            "{info:?}"
        );
        assert!(read_file(&img) == before, "{opts}: the image changed");
        check_clean(&img);
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn as_a_backing_image() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let dir = tempdir("snapshots-backing");
    let base = snapshotted(dir.path(), "cluster_size=64K");
    let expect = raw_contents(&base);
    let top = dir.path().join("top.qcow2");
    qemu_create_qcow2(&top, "", Some(("snap.qcow2", "qcow2")), None);
    let disk = open(&top, options(2, true, false));
    assert_same_bytes(&read_all(&disk, 256 * KIB), &expect, "copy-on-read");
    disk.close().unwrap();
    check_clean(&top);
    check_clean(&base);
    compare_with_bytes(&top, &expect, dir.path());
}

#[test]
fn check_finds_damage_in_a_snapshot_table() {
    use std::os::unix::fs::FileExt;
    require_tool("qemu-img");
    require_tool("qemu-io");
    let dir = tempdir("snapshots-damage");
    let img = snapshotted(dir.path(), "cluster_size=64K");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut h = [0u8; 72];
    f.read_exact_at(&mut h, 0).unwrap();
    let table = u64::from_be_bytes(h[64..72].try_into().unwrap());
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, table).unwrap();
    let l1 = u64::from_be_bytes(e);
    // The first snapshot's first L1 entry: an L2 table far past the end.
    f.write_all_at(&((1u64 << 40) | (1 << 63)).to_be_bytes(), l1)
        .unwrap();
    drop(f);
    let qemu = run_status("qemu-img", ["check".as_ref(), img.as_os_str()]);
    assert_eq!(qemu.status.code(), Some(2), "{qemu:?}");
    let ours = backfill_output(&["check", &path_str(&img)]);
    assert_eq!(ours.status.code(), Some(2), "{ours:?}");
    assert!(
        String::from_utf8_lossy(&ours.stdout).contains("snapshot 0"),
        "{ours:?}"
    );
}
