//! Copy-on-read behaviour, judged by the engine's counters and by
//! `qemu-img map`/`check`/`compare`.
//!
//! * `fills_then_hits`: a CoR read allocates exactly the clusters it touched
//!   (qemu-img map: depth 0, data), counts one fill and one cluster fetched
//!   per cluster; reading again fetches nothing, also after a reopen.
//! * `single_flight_*`: many concurrent readers of one missing cluster cause
//!   one backing fetch; the others are served by the fill (dedup) or by the
//!   overlay, and all get the right bytes.
//! * `cor_off_*`: with copy-on-read off (or read-only), reads return backing
//!   data and the overlay stays unallocated and unchanged.
//! * `block_status_matches_qemu_map_*`: `Disk::block_status` agrees with
//!   `qemu-img map --output=json` cluster by cluster, before and after fills.
//! * `write_zeroes_and_discard_hide_backing_*`: zeroed/discarded ranges over
//!   backing data read as zeros after a reopen, are recorded in the overlay
//!   (zero clusters on compat 1.1), and the image equals the reference.
//! * `zero_clusters_filled_as_zero`: a backing cluster that is all zero (as
//!   written zeros or as a hole) is recorded as a zero cluster, not data.

mod common;

use backfill::{BlockStatus, Disk, ExtentKind, Stats};
use common::*;
use std::path::{Path, PathBuf};

const C64: u64 = 64 * KIB;

/// A random raw backing image and a qcow2 overlay on it.
struct Fixture {
    dir: tempfile::TempDir,
    backing: PathBuf,
    overlay: PathBuf,
    data: Vec<u8>,
}

fn fixture(name: &str, size: u64, cluster: u64, compat: Compat, seed: u64) -> Fixture {
    let dir = tempdir(name);
    let backing = dir.path().join("backing.raw");
    let data = write_random_file(&backing, size, seed);
    let overlay = dir.path().join("overlay.qcow2");
    let b = Backing {
        name: path_str(&backing),
        format: "raw",
    };
    create_qcow2(&overlay, size, cluster, compat, Some(&b));
    Fixture {
        dir,
        backing,
        overlay,
        data,
    }
}

/// The counters a test looks at, as the change between two `Stats`.
#[derive(Debug, Clone, Copy)]
struct Delta {
    cor_fills: u64,
    cor_zero_fills: u64,
    bytes_fetched: u64,
    overlay_hits: u64,
    dedup_hits: u64,
    misses: u64,
    bytes_read: u64,
}

fn delta(after: &Stats, before: &Stats) -> Delta {
    Delta {
        cor_fills: after.cor_fills - before.cor_fills,
        cor_zero_fills: after.cor_zero_fills - before.cor_zero_fills,
        bytes_fetched: after.bytes_fetched - before.bytes_fetched,
        overlay_hits: after.overlay_hits - before.overlay_hits,
        dedup_hits: after.dedup_hits - before.dedup_hits,
        misses: after.misses - before.misses,
        bytes_read: after.bytes_read - before.bytes_read,
    }
}

fn read(disk: &Disk, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    disk.read_at(&mut buf, off)
        .unwrap_or_else(|e| panic!("read_at({off}, {len}): {e}"));
    buf
}

fn slice(data: &[u8], off: u64, len: u64) -> &[u8] {
    &data[off as usize..(off + len) as usize]
}

/// Closes the disk and returns its counters once it is quiescent.
///
/// A copy-on-read fill answers its readers before its write-back lands
/// (DESIGN.md, "The I/O path"), so `cor_fills` and `bytes_fetched` may still
/// move after the read returns. `close()` waits for every fill, so the
/// counters are read through a second handle after it: counting stays exact
/// with no sleeps or polling.
fn close_and_stats(disk: Disk) -> Stats {
    let observer = disk.clone();
    disk.close().expect("close");
    observer.stats()
}

#[test]
fn fills_then_hits() {
    let f = fixture("cor-fills", 4 * MIB, C64, Compat::V3, 1);
    // Clusters 3..=7, starting and ending inside a cluster.
    let (off, len) = (3 * C64 + 1000, 4 * C64 - 500);
    let touched = 3..=7u64;
    let n = touched.clone().count() as u64;

    let disk = open(&f.overlay, options(2, true, false));
    let s0 = disk.stats();
    assert_same_bytes(
        &read(&disk, off, len),
        slice(&f.data, off, len),
        "first read",
    );
    // Lookups are counted before the data is delivered.
    let d1 = delta(&disk.stats(), &s0);
    assert_eq!(d1.misses, n, "one miss per touched cluster: {d1:?}");
    assert_eq!(d1.overlay_hits, 0, "nothing was in the overlay: {d1:?}");

    // Again: served by the overlay, or by the fill still writing back.
    let s1 = disk.stats();
    assert_same_bytes(
        &read(&disk, off, len),
        slice(&f.data, off, len),
        "second read",
    );
    let d2 = delta(&disk.stats(), &s1);
    // A piece may count as a miss only if the earlier fill served it.
    assert!(d2.misses <= d2.dedup_hits, "{d2:?}");
    assert_eq!(d2.overlay_hits + d2.dedup_hits, n, "{d2:?}");

    // Both reads together: one fill and one fetch per cluster, no more.
    let d = delta(&close_and_stats(disk), &s0);
    assert_eq!(d.cor_fills, n, "one fill per touched cluster: {d:?}");
    assert_eq!(d.cor_zero_fills, 0, "random data is not zero: {d:?}");
    assert_eq!(
        d.bytes_fetched,
        n * C64,
        "whole clusters, fetched once: {d:?}"
    );
    assert_eq!(d.misses, n, "the second read missed nothing: {d:?}");
    assert_eq!(d.bytes_read, 2 * len, "{d:?}");

    check_clean(&f.overlay);
    let map = qemu_map(&f.overlay);
    for cl in 0..4 * MIB / C64 {
        let e = map_at(&map, cl * C64);
        if touched.contains(&cl) {
            assert!(
                e.depth == 0 && e.data && e.present,
                "cluster {cl} filled by CoR, qemu-img map says {e:?}"
            );
        } else {
            assert_eq!(
                e.depth, 1,
                "cluster {cl} was not read, qemu-img map says {e:?}"
            );
        }
    }
    compare_identical(&f.overlay, &f.backing);

    // After a reopen the overlay serves the range with no fetch at all, and
    // block_status shows the filled clusters as data, their neighbours not.
    let disk = open(&f.overlay, options(2, true, false));
    let s0 = disk.stats();
    assert_same_bytes(
        &read(&disk, off, len),
        slice(&f.data, off, len),
        "read after reopen",
    );
    let d = delta(&disk.stats(), &s0);
    assert_eq!(d.misses, 0, "{d:?}");
    assert_eq!(
        d.overlay_hits, n,
        "every touched cluster is an overlay hit: {d:?}"
    );
    let status = full_status(&disk, 0, disk.size());
    for cl in 0..disk.size() / C64 {
        let kind = kind_at(&status, cl * C64);
        if touched.contains(&cl) {
            assert_eq!(kind, ExtentKind::Data, "cluster {cl} after its fill");
        } else {
            assert!(
                matches!(
                    kind,
                    ExtentKind::Backing {
                        depth: 1,
                        zero: false
                    }
                ),
                "cluster {cl} was not read but is {kind:?}"
            );
        }
    }
    let d = delta(&close_and_stats(disk), &s0);
    assert_eq!(d.bytes_fetched, 0, "{d:?}");
    assert_eq!(d.cor_fills, 0, "{d:?}");
    drop(f.dir);
}

/// Concurrent readers of missing clusters on a freshly opened disk, and the
/// counters they must leave. All `ranges` lie within `clusters` clusters none
/// of which is in the overlay yet.
fn assert_single_flight(
    overlay: &Path,
    data: &[u8],
    ranges: &[(u64, u64)],
    clusters: u64,
    what: &str,
) {
    let disk = open(overlay, options(2, true, false));
    let s0 = disk.stats();
    let pending: Vec<_> = ranges
        .iter()
        .map(|&(o, l)| disk.submit_read(o, vec![0u8; l as usize]))
        .collect();
    for (c, &(o, l)) in pending.into_iter().zip(ranges) {
        let buf = c
            .wait()
            .unwrap_or_else(|e| panic!("{what}: read {o}+{l}: {e}"));
        assert_same_bytes(&buf, slice(data, o, l), &format!("{what}: read {o}+{l}"));
    }
    let cs = disk.cluster_size();
    check_single_flight_stats(
        &delta(&close_and_stats(disk), &s0),
        ranges,
        clusters,
        cs,
        what,
    );
}

/// One fill and one fetch per cluster; every other read piece served by the
/// fill or by the overlay.
fn check_single_flight_stats(d: &Delta, ranges: &[(u64, u64)], clusters: u64, cs: u64, what: &str) {
    let pieces: u64 = ranges
        .iter()
        .map(|&(o, l)| (o + l).div_ceil(cs) - o / cs)
        .sum();
    assert_eq!(d.cor_fills, clusters, "{what}: one fill per cluster: {d:?}");
    assert_eq!(
        d.bytes_fetched,
        clusters * cs,
        "{what}: each missing cluster fetched exactly once: {d:?}"
    );
    assert!(
        d.misses >= clusters,
        "{what}: the first reader of each cluster misses: {d:?}"
    );
    assert_eq!(
        d.dedup_hits + d.overlay_hits,
        pieces - clusters,
        "{what}: every other read piece is served by the fill or the overlay: {d:?}"
    );
    let bytes: u64 = ranges.iter().map(|r| r.1).sum();
    assert_eq!(d.bytes_read, bytes, "{what}: {d:?}");
}

#[test]
fn single_flight_submit_read() {
    let seed = seed_from_env("cor::single_flight_submit_read");
    let mut rng = Rng::new(seed);
    let f = fixture("cor-single", 2 * MIB, C64, Compat::V3, seed);

    // 32 readers of cluster 5: one whole, the rest arbitrary pieces of it.
    let base = 5 * C64;
    let mut ranges = vec![(base, C64)];
    for _ in 1..32 {
        let o = rng.below(C64);
        ranges.push((base + o, rng.range(1, C64 - o + 1)));
    }
    assert_single_flight(&f.overlay, &f.data, &ranges, 1, "32 readers of cluster 5");

    // 16 readers straddling the boundary of clusters 11 and 12.
    let boundary = 12 * C64;
    let ranges: Vec<_> = (0..16)
        .map(|_| {
            let before = rng.range(1, C64 + 1);
            (boundary - before, before + rng.range(1, C64 + 1))
        })
        .collect();
    assert_single_flight(
        &f.overlay,
        &f.data,
        &ranges,
        2,
        "16 readers across clusters 11|12",
    );
    check_clean(&f.overlay);
    compare_identical(&f.overlay, &f.backing);
}

#[test]
fn single_flight_threads_4k() {
    let f = fixture("cor-threads", MIB, 4 * KIB, Compat::V3, 11);
    let cs = 4 * KIB;
    let threads = 32u64;
    // Each thread reads a different piece of cluster 17.
    let target = 17 * cs;
    let ranges: Vec<_> = (0..threads)
        .map(|t| {
            let off = target + (t * 97) % cs;
            (off, (cs - (off - target)).min(1 + t * 131))
        })
        .collect();
    let disk = open(&f.overlay, options(2, true, false));
    assert_eq!(disk.cluster_size(), cs);
    let barrier = std::sync::Barrier::new(threads as usize);
    let s0 = disk.stats();
    std::thread::scope(|s| {
        for (t, &(off, len)) in ranges.iter().enumerate() {
            let (disk, barrier, data) = (&disk, &barrier, &f.data);
            s.spawn(move || {
                barrier.wait();
                assert_same_bytes(
                    &read(disk, off, len),
                    slice(data, off, len),
                    &format!("thread {t}"),
                );
            });
        }
    });
    let d = delta(&close_and_stats(disk), &s0);
    check_single_flight_stats(&d, &ranges, 1, cs, "32 threads on one cluster");

    // submit_read_with: the callbacks run on reactor threads.
    let target = 40 * cs;
    let ranges: Vec<_> = (0..32).map(|i| (target + i, cs - i)).collect();
    let disk = open(&f.overlay, options(2, true, false));
    let (tx, rx) = std::sync::mpsc::channel();
    let s0 = disk.stats();
    for (i, &(off, len)) in ranges.iter().enumerate() {
        let tx = tx.clone();
        disk.submit_read_with(off, vec![0u8; len as usize], move |r| {
            tx.send((i, r)).unwrap();
        });
    }
    drop(tx);
    let mut seen = 0;
    for (i, r) in rx {
        let buf = r.unwrap_or_else(|e| panic!("submit_read_with #{i}: {e}"));
        let (off, len) = ranges[i];
        assert_same_bytes(&buf, slice(&f.data, off, len), "submit_read_with");
        seen += 1;
    }
    assert_eq!(seen, 32, "every callback ran exactly once");
    let d = delta(&close_and_stats(disk), &s0);
    check_single_flight_stats(&d, &ranges, 1, cs, "32 submit_read_with on one cluster");
    check_clean(&f.overlay);
    compare_identical(&f.overlay, &f.backing);
}

/// Copy-on-read off, writable: backing data comes back, nothing is allocated,
/// and no data or metadata outside the header changes.
#[test]
fn cor_off_leaves_overlay_unallocated() {
    let f = fixture("cor-off", 2 * MIB, C64, Compat::V3, 3);
    let before = read_file(&f.overlay);
    let disk = open(&f.overlay, options(2, false, false));
    let s0 = disk.stats();
    assert_same_bytes(&read_all(&disk, 3 * C64 + 7), &f.data, "full read");
    assert_same_bytes(
        &read(&disk, C64 - 3, 2 * C64),
        slice(&f.data, C64 - 3, 2 * C64),
        "straddling read",
    );
    for e in full_status(&disk, 0, disk.size()) {
        assert!(
            matches!(
                e.kind,
                ExtentKind::Backing {
                    depth: 1,
                    zero: false
                }
            ),
            "with CoR off nothing is allocated: {e:?}"
        );
    }
    let d = delta(&close_and_stats(disk), &s0);
    assert_eq!(d.cor_fills + d.cor_zero_fills, 0, "{d:?}");
    assert_eq!(d.overlay_hits, 0, "{d:?}");
    assert!(d.bytes_fetched >= f.data.len() as u64, "{d:?}");

    for e in qemu_map(&f.overlay) {
        assert_eq!(
            e.depth, 1,
            "with CoR off qemu-img map finds overlay data: {e:?}"
        );
    }
    check_clean(&f.overlay);
    let after = read_file(&f.overlay);
    assert_eq!(after.len(), before.len(), "the overlay file grew");
    // The header may be rewritten (dirty/clean bits); nothing after it may.
    assert!(
        after[C64 as usize..] == before[C64 as usize..],
        "with CoR off, the overlay's tables or data changed"
    );
    compare_identical(&f.overlay, &f.backing);
}

/// Read-only implies no copy-on-read, and never modifies the file.
#[test]
fn cor_off_read_only_changes_nothing() {
    let f = fixture("cor-ro", MIB + 512, 4 * KIB, Compat::V2, 4);
    let before = read_file(&f.overlay);
    let disk = open(&f.overlay, options(2, true, true));
    assert_same_bytes(&read_all(&disk, 100_000), &f.data, "read-only read");
    let s = close_and_stats(disk);
    assert_eq!(s.cor_fills + s.cor_zero_fills, 0, "{s:?}");
    assert!(
        read_file(&f.overlay) == before,
        "a read-only open modified the overlay"
    );
    assert!(
        read_file(&f.backing) == f.data,
        "a read-only open modified the backing file"
    );
}

/// `block_status` over `off..off + len`, asking again where a reply stops
/// short; asserts the extents are contiguous and inside the request.
fn full_status(disk: &Disk, off: u64, len: u64) -> Vec<BlockStatus> {
    let end = off + len;
    let mut out = Vec::new();
    let mut pos = off;
    while pos < end {
        let ext = disk
            .block_status(pos, end - pos)
            .unwrap_or_else(|e| panic!("block_status({pos}, {}): {e}", end - pos));
        assert!(
            !ext.is_empty(),
            "block_status({pos}, {}) returned nothing",
            end - pos
        );
        for e in ext {
            assert_eq!(
                e.offset, pos,
                "block_status extents are not contiguous: {e:?}"
            );
            assert!(
                e.len > 0 && e.offset + e.len <= end,
                "extent outside the request: {e:?}"
            );
            pos += e.len;
            out.push(e);
        }
    }
    out
}

fn kind_at(status: &[BlockStatus], offset: u64) -> ExtentKind {
    status
        .iter()
        .find(|e| e.offset <= offset && offset < e.offset + e.len)
        .unwrap_or_else(|| panic!("no extent covers {offset}: {status:?}"))
        .kind
}

/// What `ExtentKind` a `qemu-img map` entry corresponds to (qemu's depth 0 is
/// the overlay, as ours).
fn expected_kind(e: &MapEntry) -> ExtentKind {
    match (e.present, e.depth, e.data) {
        (false, _, _) => ExtentKind::Unallocated,
        (true, 0, true) => ExtentKind::Data,
        (true, 0, false) => ExtentKind::Zero,
        (true, depth, _) => ExtentKind::Backing {
            depth,
            zero: e.zero && !e.data,
        },
    }
}

/// Every cluster's status (at its first and last byte) equals qemu's.
fn assert_status_matches_map(disk: &Disk, image: &Path, what: &str) {
    let map = qemu_map(image);
    let size = disk.size();
    let cs = disk.cluster_size();
    let status = full_status(disk, 0, size);
    for cl in 0..size.div_ceil(cs) {
        for at in [cl * cs, ((cl + 1) * cs).min(size) - 1] {
            let want = expected_kind(&map_at(&map, at));
            let got = kind_at(&status, at);
            assert_eq!(
                got,
                want,
                "{what}: block_status at {at} (cluster {cl}) vs qemu-img map {:?}",
                map_at(&map, at)
            );
        }
    }
    // A sub-range query starting mid-cluster agrees with the full one.
    let (off, len) = (3 * cs + 100, (10 * cs).min(size - 3 * cs - 100));
    for e in full_status(disk, off, len) {
        assert_eq!(
            e.kind,
            kind_at(&status, e.offset),
            "{what}: sub-range query {e:?}"
        );
        assert_eq!(
            e.kind,
            kind_at(&status, e.offset + e.len - 1),
            "{what}: sub-range query {e:?}"
        );
    }
}

fn qcow2_chain(name: &str, compat: Compat) -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir(name);
    let size = 2 * MIB;
    let c = C64;
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    create_qcow2(&base, size, c, compat, None);
    let w =
        |p: u8, from: u64, to: u64| format!("write -P {p:#04x} {} {}", from * c, (to - from) * c);
    let z = |from: u64, to: u64| format!("write -z {} {}", from * c, (to - from) * c);
    qemu_io(&base, "qcow2", &[w(0x0b, 0, 8), z(8, 10), w(0x0b, 28, 32)]);
    let b = Backing {
        name: "base.qcow2".into(),
        format: "qcow2",
    };
    create_qcow2(&mid, size, c, compat, Some(&b));
    qemu_io(
        &mid,
        "qcow2",
        &[w(0x0c, 4, 6), z(12, 14), w(0x0c, 20, 22), z(29, 30)],
    );
    let b = Backing {
        name: "mid.qcow2".into(),
        format: "qcow2",
    };
    create_qcow2(&top, size, c, compat, Some(&b));
    qemu_io(
        &top,
        "qcow2",
        &[w(0x0d, 2, 3), w(0x0d, 20, 21), z(6, 7), z(25, 26)],
    );
    (dir, top)
}

fn block_status_matches(compat: Compat) {
    let (dir, top) = qcow2_chain("cor-status", compat);
    let expected = raw_contents(&top);

    let disk = open(&top, options(2, false, true));
    assert_status_matches_map(&disk, &top, "fresh chain");
    disk.close().expect("close");

    // Fill some clusters from each layer, then compare again after reopening.
    let disk = open(&top, options(2, true, false));
    for (from, to) in [(0, 2), (4, 5), (8, 9), (12, 13), (16, 17), (29, 31)] {
        let (off, len) = (from * C64 + 5, (to - from) * C64 - 10);
        assert_same_bytes(
            &read(&disk, off, len),
            slice(&expected, off, len),
            "CoR read",
        );
    }
    disk.close().expect("close");
    check_clean(&top);
    let disk = open(&top, options(2, false, true));
    assert_status_matches_map(&disk, &top, "after fills");
    assert_same_bytes(&read_all(&disk, MIB), &expected, "contents after fills");
    disk.close().expect("close");
    drop(dir);
}

#[test]
fn block_status_matches_qemu_map_v3() {
    block_status_matches(Compat::V3);
}

#[test]
fn block_status_matches_qemu_map_v2() {
    block_status_matches(Compat::V2);
}

fn zeroes_hide_backing(compat: Compat) {
    let name = format!("cor-zeroes-{}", compat.as_qemu());
    let f = fixture(&name, 2 * MIB, C64, compat, 5);
    let mut reference = f.data.clone();
    let disk = open(&f.overlay, options(2, true, false));
    // (offset, len, discard?)
    let ops = [
        (2 * C64, 3 * C64, false),                   // whole clusters 2..=4
        (8 * C64 + 100, 2 * C64, false),             // the tail of 8, all of 9, the head of 10
        (14 * C64, 2 * C64, true),                   // whole clusters 14..=15
        (20 * C64 + 777, 1000, true),                // inside cluster 20
        (2 * MIB - 3 * C64 - 1, 3 * C64 + 1, false), // to the end of the disk
    ];
    for &(off, len, discard) in &ops {
        if discard {
            disk.discard(off, len)
        } else {
            disk.write_zeroes(off, len)
        }
        .unwrap_or_else(|e| panic!("zeroing {off}+{len}: {e}"));
        reference[off as usize..(off + len) as usize].fill(0);
        assert!(
            read(&disk, off, len).iter().all(|&b| b == 0),
            "{off}+{len} does not read as zeros right after zeroing"
        );
    }
    assert_same_bytes(&read_all(&disk, MIB), &reference, "before close");
    disk.close().expect("close");

    let disk = open(&f.overlay, options(2, true, false));
    assert_same_bytes(&read_all(&disk, MIB), &reference, "after reopen");
    disk.close().expect("close");

    check_clean(&f.overlay);
    compare_with_bytes(&f.overlay, &reference, f.dir.path());
    let map = qemu_map(&f.overlay);
    for cl in [2, 3, 4, 9, 14, 15, 29, 30, 31] {
        let e = map_at(&map, cl * C64);
        assert_eq!(
            e.depth, 0,
            "zeroed cluster {cl} must be recorded in the overlay: {e:?}"
        );
        if compat == Compat::V3 {
            assert!(
                e.zero && !e.data,
                "compat 1.1: zeroed cluster {cl} is a zero cluster: {e:?}"
            );
        }
    }
    for cl in [8, 10, 20, 28] {
        let e = map_at(&map, cl * C64);
        assert_eq!(
            e.depth, 0,
            "partly zeroed cluster {cl} must be in the overlay: {e:?}"
        );
    }
}

#[test]
fn write_zeroes_and_discard_hide_backing_v3() {
    zeroes_hide_backing(Compat::V3);
}

#[test]
fn write_zeroes_and_discard_hide_backing_v2() {
    zeroes_hide_backing(Compat::V2);
}

#[test]
fn zero_clusters_filled_as_zero() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempdir("cor-zero-fill");
    let size = MIB;
    let clusters = size / C64;
    // Random data, except cluster 3 (written zeros) and cluster 5 (a hole).
    let mut data = random_bytes(size as usize, 6);
    data[(3 * C64) as usize..(4 * C64) as usize].fill(0);
    data[(5 * C64) as usize..(6 * C64) as usize].fill(0);
    let backing = dir.path().join("backing.raw");
    {
        let mut file = std::fs::File::create(&backing).unwrap();
        file.write_all(&data[..(5 * C64) as usize]).unwrap();
        file.seek(SeekFrom::Start(6 * C64)).unwrap();
        file.write_all(&data[(6 * C64) as usize..]).unwrap();
        file.set_len(size).unwrap();
    }
    assert!(read_file(&backing) == data);
    let overlay = dir.path().join("overlay.qcow2");
    let b = Backing {
        name: path_str(&backing),
        format: "raw",
    };
    create_qcow2(&overlay, size, C64, Compat::V3, Some(&b));

    let disk = open(&overlay, options(2, true, false));
    assert_same_bytes(
        &read_all(&disk, 3 * C64 - 1),
        &data,
        "CoR read of everything",
    );
    let s = close_and_stats(disk);
    assert_eq!(s.cor_zero_fills, 2, "clusters 3 and 5 are zero: {s:?}");
    // `cor_zero_fills` may count a subset of `cor_fills` or apart from it.
    assert!(
        s.cor_fills == clusters || s.cor_fills + s.cor_zero_fills == clusters,
        "every cluster filled once: {s:?}"
    );

    check_clean(&overlay);
    compare_identical(&overlay, &backing);
    let map = qemu_map(&overlay);
    for cl in 0..clusters {
        let e = map_at(&map, cl * C64);
        assert_eq!(e.depth, 0, "cluster {cl} was filled: {e:?}");
        if cl == 3 || cl == 5 {
            assert!(
                e.zero && !e.data,
                "all-zero cluster {cl} recorded as zero: {e:?}"
            );
        } else {
            assert!(e.data && !e.zero, "cluster {cl} recorded as data: {e:?}");
        }
    }
}

/// A cluster the backing chain holds as zeros (a zero cluster of a qcow2
/// backing layer, over data in the layer below) is filled without a read
/// and without a buffer: the reader gets zeros, a compat 1.1 overlay a
/// zero cluster (`qemu-img map`; zero subclusters with extended L2
/// entries), and nothing is fetched for it. A compat 0.10 overlay, which
/// has no zero clusters, gets the zeros as data.
#[test]
fn backing_zero_clusters_fill_without_a_read() {
    let dir = tempdir("cor-known-zeros");
    let size = MIB;
    let base = dir.path().join("base.raw");
    let mut data = write_random_file(&base, size, seed_from_env("cor-known-zeros"));
    let mid = dir.path().join("mid.qcow2");
    qemu_create_qcow2(
        &mid,
        "cluster_size=65536",
        Some((&path_str(&base), "raw")),
        None,
    );
    qemu_io(&mid, "qcow2", &["write -z 192k 128k".into()]);
    data[(3 * C64) as usize..(5 * C64) as usize].fill(0);
    let mid_map = qemu_map(&mid);
    assert!(map_at(&mid_map, 3 * C64).zero && map_at(&mid_map, 3 * C64).depth == 0);

    for (kind, opts) in [
        ("v3", "compat=1.1"),
        ("v2", "compat=0.10"),
        ("ext", "extended_l2=on"),
    ] {
        let overlay = dir.path().join(format!("overlay-{kind}.qcow2"));
        let opts = format!("cluster_size=65536,{opts}");
        qemu_create_qcow2(&overlay, &opts, Some((&path_str(&mid), "qcow2")), None);
        let disk = open(&overlay, options(2, true, false));
        // Reads that start and end inside the zero clusters and around them.
        let mut buf = vec![0xffu8; (3 * C64) as usize];
        disk.read_at(&mut buf, 2 * C64 + 4096).unwrap();
        let at = (2 * C64 + 4096) as usize;
        assert_same_bytes(&buf, &data[at..at + buf.len()], "across the zero clusters");
        assert_same_bytes(&read_all(&disk, 100 * KIB), &data, "everything");
        let s = close_and_stats(disk);
        // Only the data clusters were read from the chain.
        assert_eq!(s.bytes_fetched, size - 2 * C64, "{kind}: {s:?}");
        check_clean(&overlay);
        compare_with_bytes(&overlay, &data, dir.path());
        let map = qemu_map(&overlay);
        assert_all_in_overlay(&map);
        for cl in [3, 4] {
            let e = map_at(&map, cl * C64);
            let zero = kind != "v2";
            assert!(
                e.zero == zero && e.data != zero,
                "{kind}: cluster {cl}: {e:?}"
            );
        }
        assert_eq!(s.cor_zero_fills > 0, kind != "v2", "{kind}: {s:?}");
    }
}
