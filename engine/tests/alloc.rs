//! Host-cluster allocation paths of the overlay, judged by qemu-img: new
//! refcount blocks, a grown refcount table, L2 tables, and freeing unused
//! reserved clusters at close. The image file is extended (sparsely) first,
//! so that allocation starts far out without writing gigabytes.

mod common;

use backfill::{Disk, Options};
use std::fs::OpenOptions;
use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    common::require_tool("qemu-img");
    run(Command::new("qemu-img").args(args))
}

/// Writes a pattern at several places through the engine, closes, and checks
/// the image with qemu-img against a raw reference.
fn write_check(dir: &Path, cluster: &str, extend_to: u64) {
    let ov = dir.join(format!("ov-{cluster}.qcow2"));
    let ovs = ov.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster}"),
        ovs,
        "64M",
    ]);
    // Free space past the image's end: allocation continues from there.
    OpenOptions::new()
        .write(true)
        .open(&ov)
        .unwrap()
        .set_len(extend_to)
        .unwrap();
    let size = 64u64 << 20;
    let mut reference = vec![0u8; size as usize];
    let disk = Disk::open(&ov, Options::default()).unwrap();
    for i in 0..64u64 {
        let off = i * (size / 64) + 1000;
        let data = vec![(i as u8).wrapping_mul(7) | 1; 10_000];
        disk.write_at(&data, off).unwrap();
        reference[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    let mut back = vec![0u8; size as usize];
    disk.read_at(&mut back, 0).unwrap();
    assert!(
        back == reference,
        "reads after writes differ from the reference"
    );
    disk.close().unwrap();
    let check = qemu_img(&["check", ovs]);
    assert!(check.contains("No errors were found"), "{check}");
    let r = dir.join(format!("ref-{cluster}.raw"));
    std::fs::write(&r, &reference).unwrap();
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        ovs,
        r.to_str().unwrap(),
    ]);
    assert!(cmp.contains("identical"), "{cmp}");
    // A second session on the same image finds its data and allocates on.
    let disk = Disk::open(&ov, Options::default()).unwrap();
    disk.write_at(&[0xee; 4096], 5 << 20).unwrap();
    disk.close().unwrap();
    let check = qemu_img(&["check", ovs]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn new_refcount_blocks_past_the_first() {
    // 64 KiB clusters: one refcount block covers 2 GiB of the file.
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    write_check(d.path(), "65536", (2 << 30) + (5 << 20));
}

#[test]
fn refcount_table_grows() {
    // 4 KiB clusters: one refcount block covers 8 MiB, and the one-cluster
    // refcount table qemu-img makes covers 512 blocks (4 GiB). Starting past
    // that forces the table to move and grow.
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    write_check(d.path(), "4096", (4 << 30) + (1 << 20));
}

#[test]
fn unused_reserved_clusters_are_freed_at_close() {
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let ov = d.path().join("ov.qcow2");
    let ovs = ov.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ovs, "1G"]);
    let disk = Disk::open(&ov, Options::default()).unwrap();
    // One write reserves a batch of clusters on its core; most stay unused.
    disk.write_at(&[1u8; 512], 0).unwrap();
    disk.close().unwrap();
    let check = qemu_img(&["check", ovs]);
    assert!(
        check.contains("No errors were found"),
        "leaks or errors: {check}"
    );
    // The file ends right after what is used: header, tables, one L2, one data cluster.
    let len = std::fs::metadata(&ov).unwrap().len();
    assert!(
        len <= 8 * 65536,
        "file not shrunk after freeing: {len} bytes"
    );
}

#[test]
fn dirty_image_refcounts_are_rebuilt_on_open() {
    use std::os::unix::fs::FileExt;
    common::require_tool("qemu-io");
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let ov = d.path().join("dirty.qcow2");
    let ovs = ov.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        ovs,
        "16M",
    ]);
    run(Command::new("qemu-io").args(["-c", "write -P 0x5a 0 1M", ovs]));
    // What a crash with lazy refcounts leaves: the dirty bit set and a data
    // cluster whose refcount never reached the disk.
    let map = qemu_img(&["map", "--output=json", ovs]);
    let host: u64 = map
        .split("\"offset\": ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("a data extent in qemu-img map");
    let f = OpenOptions::new().read(true).write(true).open(&ov).unwrap();
    let be64 = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    };
    let refblock = be64(be64(48));
    f.write_all_at(&[0, 0], refblock + 2 * (host >> 16))
        .unwrap();
    let incompat = be64(72) | 1;
    f.write_all_at(&incompat.to_be_bytes(), 72).unwrap();
    drop(f);
    let out = Command::new("qemu-img")
        .args(["check", ovs])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "the damage is real corruption before repair"
    );

    let disk = Disk::open(&ov, Options::default()).expect("a dirty image opens after repair");
    let mut b = vec![0u8; 1 << 20];
    disk.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    disk.write_at(&[3u8; 4096], 2 << 20).unwrap();
    disk.close().unwrap();
    let check = qemu_img(&["check", ovs]);
    assert!(check.contains("No errors were found"), "{check}");
    let info = qemu_img(&["info", "--output=json", ovs]);
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
}

#[test]
fn discard_frees_whole_clusters() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![0x11u8; 8 << 20]).unwrap();
    let ov = d.path().join("ov.qcow2");
    let ovs = ov.to_str().unwrap();
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", ovs, "8M",
    ]);
    let disk = Disk::open(&ov, Options::default()).unwrap();
    disk.write_at(&vec![0x22u8; 6 << 20], 0).unwrap();
    disk.close().unwrap();
    let used_before = std::fs::metadata(&ov).unwrap().blocks() * 512;

    // No copy-on-read here: the read below must not allocate anything.
    let no_cor = Options {
        copy_on_read: false,
        ..Options::default()
    };
    let disk = Disk::open(&ov, no_cor).unwrap();
    // Whole clusters [64K, 4M) are freed; the unaligned edges are zeroed.
    disk.discard(1000, (4 << 20) - 1000).unwrap();
    let mut b = vec![1u8; 8 << 20];
    disk.read_at(&mut b, 0).unwrap();
    disk.close().unwrap();
    let mut want = vec![0x22u8; 6 << 20];
    want[1000..4 << 20].fill(0);
    want.resize(8 << 20, 0x11);
    assert!(b == want, "reads after discard");

    let check = qemu_img(&["check", ovs]);
    assert!(check.contains("No errors were found"), "{check}");
    let r = d.path().join("ref.raw");
    std::fs::write(&r, &want).unwrap();
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        ovs,
        r.to_str().unwrap(),
    ]);
    assert!(cmp.contains("identical"), "{cmp}");
    let used_after = std::fs::metadata(&ov).unwrap().blocks() * 512;
    assert!(
        used_before - used_after >= (4 << 20) - (128 << 10),
        "discard did not give space back: {used_before} -> {used_after} bytes"
    );
    // The discarded range is recorded as zero (it hides base.raw) without a
    // host cluster.
    let map = qemu_img(&["map", "--output=json", ovs]);
    let zero_line = map
        .lines()
        .find(|l| l.contains("\"start\": 65536"))
        .unwrap_or_else(|| panic!("no extent at 64 KiB: {map}"));
    assert!(
        zero_line.contains("\"zero\": true") && !zero_line.contains("\"offset\""),
        "{zero_line}"
    );
}
