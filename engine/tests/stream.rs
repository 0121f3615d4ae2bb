//! Streaming: the background job that populates the overlay and drops the
//! backing file, judged by `qemu-img info/compare/check/map` and by byte
//! comparison with references built with plain file writes.
//!
//! * `raw_backing_streams_to_a_standalone_image`: a raw backing file with
//!   zero regions (written zeros and a hole) and a partial last cluster;
//!   some clusters are in the overlay before (a read and a write): the
//!   stream fetches exactly what is missing but the hole (which the file
//!   system says reads as zeros: no read), the header loses its backing
//!   reference (`qemu-img info`), the image equals the backing with the
//!   write applied (`qemu-img compare`), `qemu-img check` is clean, and the
//!   zero regions are zero, not data (`qemu-img map`).
//! * `qcow2_chain_streams_to_a_standalone_image`: a chain of two (raw base,
//!   qcow2 middle with its own data and a zero cluster over base data),
//!   the middle named by its file name and by QEMU's `json:` options;
//!   afterwards `qemu-img compare` with the middle image says identical.
//! * `compat_0_10_overlay_larger_than_its_backing`: a version 2 overlay
//!   (no zero clusters) larger than its backing file streams to the
//!   backing's bytes followed by zeros.
//! * `client_writes_win_while_streaming`: writes, write-zeroes and discards
//!   through the engine during a stream end up in the image (checked
//!   against a reference file built with plain writes).
//! * `cancel_midway_then_resume`: a cancelled stream keeps its work; the
//!   next one fetches only the rest.
//! * `pause_resume_and_rate`: pausing, changing the rate and resuming ends
//!   in a finished stream.
//! * `a_broken_backing_image_fails_the_stream_clearly`: a backing L2 entry
//!   past the end of its file fails the stream with an error naming the
//!   range and the cause; the disk keeps serving, the image stays clean
//!   and keeps its backing file.
//! * `keep_backing_keeps_the_reference`: the header still names the
//!   backing file, and `qemu-img map` finds everything in the overlay.
//! * `every_header_rewrite_prefix_opens`: the image after each write of the
//!   header rewrite (a crash between any two) opens in qemu-img and in the
//!   engine, checks clean and reads the same bytes.
//! * `cli_stream_*`, `serve_stream_*`: `backfill stream` (with `--rate`,
//!   `--keep-backing`, SIGINT midway, and SIGKILL midway then a second
//!   run, which ends with `qemu-img check` clean) and
//!   `backfill serve --stream` with NBD clients reading and writing.

mod common;
#[path = "common/nbd.rs"]
mod nbd_common;

use backfill::{Disk, ExtentKind, StreamEnd, StreamOptions, StreamState};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const C64: u64 = 64 * KIB;

struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    overlay: PathBuf,
    data: Vec<u8>,
}

/// A random raw backing file of `size` bytes whose `[zeros]` ranges are
/// written as zeros, and a qcow2 overlay (64 KiB clusters, compat 1.1).
fn fixture(name: &str, size: u64, zeros: &[(u64, u64)], seed: u64) -> Fixture {
    let dir = tempdir(name);
    let base = dir.path().join("base.raw");
    let mut data = random_bytes(size as usize, seed);
    for &(o, l) in zeros {
        data[o as usize..(o + l) as usize].fill(0);
    }
    write_file(&base, &data);
    let overlay = dir.path().join("overlay.qcow2");
    let b = Backing {
        name: "base.raw".into(),
        format: "raw",
    };
    create_qcow2(&overlay, size, C64, Compat::V3, Some(&b));
    Fixture {
        dir,
        base,
        overlay,
        data,
    }
}

fn stream_to_end(disk: &Disk, opts: StreamOptions) -> (StreamEnd, backfill::StreamProgress) {
    let s = disk.stream(opts).expect("starting the stream");
    let last = s.wait_until(|p| p.state.is_stopped());
    let end = s.wait().unwrap_or_else(|e| panic!("stream failed: {e}"));
    (end, last)
}

/// A stream with the default options to its end, which must be a finished
/// stream that dropped the backing reference; its last progress.
fn stream_to_standalone(disk: &Disk) -> backfill::StreamProgress {
    let (end, last) = stream_to_end(disk, StreamOptions::default());
    assert_eq!(
        end,
        StreamEnd::Finished {
            backing_dropped: true
        },
        "{last:?}"
    );
    last
}

#[test]
fn raw_backing_streams_to_a_standalone_image() {
    let size = 8 * MIB + 12 * KIB; // a partial last cluster
    let zeros = [(MIB, MIB + 64 * KIB), (5 * MIB + 4 * KIB, 300 * KIB)];
    let f = fixture("stream-raw", size, &zeros, seed_from_env("stream-raw"));
    // A hole in the backing file, [3 MiB, 3.5 MiB), reads as zeros too.
    let mut expected = f.data.clone();
    let (hole, hole_len) = (3 * MIB as usize, 512 * KIB as usize);
    expected[hole..hole + hole_len].fill(0);
    {
        use std::os::unix::fs::FileExt;
        let _ = std::fs::remove_file(&f.base);
        let file = std::fs::File::create(&f.base).unwrap();
        file.write_all_at(&expected[..hole], 0).unwrap();
        file.write_all_at(&expected[hole + hole_len..], (hole + hole_len) as u64)
            .unwrap();
    }
    let disk = open(&f.overlay, options(2, true, false));
    // Some clusters are in the overlay before the stream: one read (copy-on
    // read) and one client write.
    let mut buf = vec![0u8; 128 * KIB as usize];
    disk.read_at(&mut buf, 6 * MIB).unwrap();
    let written = vec![0x5au8; 100 * KIB as usize];
    disk.write_at(&written, 7 * MIB + 1000).unwrap();
    expected[(7 * MIB + 1000) as usize..(7 * MIB + 1000 + 100 * KIB) as usize]
        .copy_from_slice(&written);
    disk.flush().unwrap();
    let before = disk.stats();

    let last = stream_to_standalone(&disk);
    assert_eq!(last.state, StreamState::Done);
    assert_eq!(last.done_bytes, size);
    // What was in the overlay was neither fetched nor populated again: the
    // read's two clusters and the write's three. The hole was populated
    // (as zero clusters) without a read of the file.
    let held = 4 * C64;
    assert_eq!(last.populated_bytes, size - held, "{last:?}");
    assert_eq!(last.backing_zero_bytes, hole_len as u64, "{last:?}");
    let after = disk.stats();
    assert_eq!(
        after.bytes_fetched - before.bytes_fetched,
        size - held - hole_len as u64,
        "only the missing clusters are fetched, and not the hole"
    );
    assert!(after.cor_zero_fills > before.cor_zero_fills);
    // The engine itself now reads the same bytes as a reference.
    assert_same_bytes(&read_all(&disk, MIB), &expected, "after the stream");
    disk.close().unwrap();

    assert_standalone(&f.overlay);
    check_clean(&f.overlay);
    compare_with_bytes(&f.overlay, &expected, f.dir.path());
    let map = qemu_map(&f.overlay);
    // Whole clusters inside the zero regions are zero, not data.
    assert_zero_in_overlay(&map, MIB, MIB + 64 * KIB);
    assert_zero_in_overlay(&map, 3 * MIB, 512 * KIB);
    assert_zero_in_overlay(&map, 5 * MIB + 64 * KIB, 192 * KIB);
    assert_all_in_overlay(&map);
    assert!(map_at(&map, 0).data, "random data is data");
    // Reopened standalone, it reads the same.
    let disk = open(&f.overlay, options(2, true, false));
    assert!(!disk.has_backing());
    assert_same_bytes(&read_all(&disk, MIB), &expected, "reopened");
    disk.close().unwrap();
}

#[test]
fn qcow2_chain_streams_to_a_standalone_image() {
    let size = 6 * MIB;
    let dir = tempdir("stream-chain");
    let base = dir.path().join("base.raw");
    write_random_file(&base, size, seed_from_env("stream-chain"));
    let mid = dir.path().join("mid.qcow2");
    create_qcow2(
        &mid,
        size,
        C64,
        Compat::V3,
        Some(&Backing {
            name: "base.raw".into(),
            format: "raw",
        }),
    );
    // The middle layer has data of its own, a zero cluster range over base
    // data, and an unaligned write.
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x5a 1M 512K".into(),
            "write -z 3M 1M".into(),
            "write -P 0x33 5000 70000".into(),
        ],
    );
    let expected = raw_contents(&mid);
    let overlay = dir.path().join("overlay.qcow2");
    // The middle layer named by its file name, then by QEMU's json:
    // options (a qcow2 node on a file node, as QEMU writes them for a node
    // opened with options of its own).
    let json = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}","locking":"off"}}}}"#,
        path_str(&mid)
    );
    for name in ["mid.qcow2", json.as_str()] {
        let _ = std::fs::remove_file(&overlay);
        qemu_create_qcow2(&overlay, "", Some((name, "qcow2")), None);
        compare_same(&overlay, &mid, "qcow2");

        let disk = open(&overlay, options(2, true, false));
        let last = stream_to_standalone(&disk);
        assert_eq!(last.done_bytes, size);
        disk.close().unwrap();

        assert_standalone(&overlay);
        check_clean(&overlay);
        // The original backing image and the standalone overlay are identical.
        compare_same(&overlay, &mid, "qcow2");
        compare_with_bytes(&overlay, &expected, dir.path());
        let map = qemu_map(&overlay);
        assert_zero_in_overlay(&map, 3 * MIB, MIB);
        assert_all_in_overlay(&map);
    }
}

#[test]
fn compat_0_10_overlay_larger_than_its_backing() {
    // No zero clusters in version 2: zeros are written as data. The part
    // past the backing file's end reads as zeros before and after.
    let dir = tempdir("stream-v2");
    let base = dir.path().join("base.raw");
    let data = write_random_file(&base, 3 * MIB / 2, seed_from_env("stream-v2"));
    let overlay = dir.path().join("overlay.qcow2");
    let size = 3 * MIB + 4 * KIB;
    create_qcow2(
        &overlay,
        size,
        C64,
        Compat::V2,
        Some(&Backing {
            name: "base.raw".into(),
            format: "raw",
        }),
    );
    let mut expected = data.clone();
    expected.resize(size as usize, 0);
    let disk = open(&overlay, options(2, true, false));
    let last = stream_to_standalone(&disk);
    assert_eq!(last.done_bytes, size);
    disk.close().unwrap();
    assert_standalone(&overlay);
    assert_eq!(
        info_json(&overlay)["format-specific"]["data"]["compat"],
        "0.10"
    );
    check_clean(&overlay);
    compare_with_bytes(&overlay, &expected, dir.path());
}

#[test]
fn client_writes_win_while_streaming() {
    let size = 24 * MIB;
    let seed = seed_from_env("stream-writes");
    let f = fixture("stream-writes", size, &[(2 * MIB, MIB)], seed);
    let mut expected = f.data.clone();
    let disk = open(&f.overlay, options(2, true, false));
    // Slow at first, so that the writes land while much is still missing;
    // unlimited once they are done.
    let s = disk
        .stream(StreamOptions {
            rate_bytes_per_sec: Some(8 * MIB),
            ..StreamOptions::default()
        })
        .unwrap();
    let mut rng = Rng::new(seed);
    for i in 0..300 {
        let off = rng.below(size - 1);
        let len = rng.range(1, 200 * KIB).min(size - off);
        match i % 10 {
            0 => {
                disk.write_zeroes(off, len).unwrap();
                expected[off as usize..(off + len) as usize].fill(0);
            }
            1 => {
                disk.discard(off, len).unwrap();
                expected[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                disk.write_at(&data, off).unwrap();
                expected[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
    }
    s.set_rate(None).unwrap();
    let end = s.wait().unwrap();
    assert_eq!(
        end,
        StreamEnd::Finished {
            backing_dropped: true
        }
    );
    assert_same_bytes(&read_all(&disk, MIB), &expected, "engine after the stream");
    disk.close().unwrap();
    assert_standalone(&f.overlay);
    check_clean(&f.overlay);
    compare_with_bytes(&f.overlay, &expected, f.dir.path());
}

#[test]
fn cancel_midway_then_resume() {
    let size = 16 * MIB;
    let f = fixture("stream-cancel", size, &[], seed_from_env("stream-cancel"));
    let disk = open(&f.overlay, options(2, true, false));
    let s = disk
        .stream(StreamOptions {
            rate_bytes_per_sec: Some(4 * MIB),
            ..StreamOptions::default()
        })
        .unwrap();
    let seen = s.wait_until(|p| p.populated_bytes >= 2 * MIB);
    assert_eq!(seen.state, StreamState::Running, "{seen:?}");
    s.cancel();
    let last = s.wait_until(|p| p.state.is_stopped());
    assert_eq!(last.state, StreamState::Cancelled);
    assert_eq!(s.wait().unwrap(), StreamEnd::Cancelled);
    let first = last.populated_bytes;
    assert!(first >= 2 * MIB && first < size, "{last:?}");
    disk.close().unwrap();

    // Cancelled: the backing file is still there, and the work is kept.
    check_clean(&f.overlay);
    assert!(info_json(&f.overlay).get("backing-filename").is_some());
    let map = qemu_map(&f.overlay);
    let local: u64 = map
        .iter()
        .filter(|e| e.depth == 0 && e.data)
        .map(|e| e.length)
        .sum();
    assert_eq!(local, first, "what the first stream populated: {map:?}");

    let disk = open(&f.overlay, options(2, true, false));
    let last = stream_to_standalone(&disk);
    assert_eq!(last.populated_bytes, size - first, "only the rest");
    assert_eq!(
        disk.stats().bytes_fetched,
        size - first,
        "only the rest fetched"
    );
    disk.close().unwrap();
    assert_standalone(&f.overlay);
    check_clean(&f.overlay);
    compare_identical(&f.overlay, &f.base);
}

#[test]
fn pause_resume_and_rate() {
    let size = 8 * MIB;
    let f = fixture("stream-pause", size, &[], seed_from_env("stream-pause"));
    let disk = open(&f.overlay, options(2, true, false));
    let s = disk
        .stream(StreamOptions {
            rate_bytes_per_sec: Some(2 * MIB),
            ..StreamOptions::default()
        })
        .unwrap();
    s.pause();
    let p = s.wait_until(|p| p.state == StreamState::Paused && p.in_flight == 0);
    assert_eq!(p.state, StreamState::Paused);
    assert_eq!(p.rate_limit, Some(2 * MIB));
    s.set_rate(Some(64 * MIB)).unwrap();
    assert!(s.set_rate(Some(0)).is_err(), "a zero rate is refused");
    s.resume();
    s.set_rate(None).unwrap();
    assert_eq!(
        s.wait().unwrap(),
        StreamEnd::Finished {
            backing_dropped: true
        }
    );
    disk.close().unwrap();
    assert_standalone(&f.overlay);
    check_clean(&f.overlay);
    compare_identical(&f.overlay, &f.base);
}

#[test]
fn keep_backing_keeps_the_reference() {
    let size = 4 * MIB;
    let f = fixture(
        "stream-keep",
        size,
        &[(MIB, MIB)],
        seed_from_env("stream-keep"),
    );
    let disk = open(&f.overlay, options(2, true, false));
    let (end, _) = stream_to_end(
        &disk,
        StreamOptions {
            keep_backing: true,
            ..StreamOptions::default()
        },
    );
    assert_eq!(
        end,
        StreamEnd::Finished {
            backing_dropped: false
        }
    );
    // Nothing reads from the backing chain any more.
    for e in disk.block_status(0, size).unwrap() {
        assert!(
            !matches!(e.kind, ExtentKind::Backing { .. }),
            "{e:?} still reads from the backing file"
        );
    }
    disk.close().unwrap();
    let info = info_json(&f.overlay);
    assert_eq!(info["backing-filename"], "base.raw", "{info}");
    check_clean(&f.overlay);
    compare_identical(&f.overlay, &f.base);
    let map = qemu_map(&f.overlay);
    assert_all_in_overlay(&map);
    assert_zero_in_overlay(&map, MIB, MIB);
}

#[test]
fn every_header_rewrite_prefix_opens() {
    use backfill::qcow2::standalone::drop_backing_plan;
    use std::os::unix::fs::FileExt;
    let size = 2 * MIB;
    let f = fixture(
        "stream-header",
        size,
        &[(0, C64)],
        seed_from_env("stream-header"),
    );
    let disk = open(&f.overlay, options(2, true, false));
    stream_to_end(
        &disk,
        StreamOptions {
            keep_backing: true,
            ..StreamOptions::default()
        },
    );
    disk.close().unwrap();
    let file = std::fs::File::open(&f.overlay).unwrap();
    let header = backfill::qcow2::Header::read_from(&file, "overlay").unwrap();
    let mut area = vec![0u8; C64 as usize];
    file.read_exact_at(&mut area, 0).unwrap();
    drop(file);
    let plan = drop_backing_plan(&area, &header);
    assert_eq!(plan.len(), 4, "{plan:?}");
    for k in 0..=plan.len() {
        let copy = f.dir.path().join(format!("prefix{k}.qcow2"));
        std::fs::copy(&f.overlay, &copy).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        for w in &plan[..k] {
            file.write_all_at(&w.bytes, w.offset).unwrap();
        }
        drop(file);
        check_clean(&copy);
        compare_identical(&copy, &f.base);
        let info = info_json(&copy);
        assert_eq!(
            info.get("backing-filename").is_some(),
            k == 0,
            "after {k} of {} writes: {info}",
            plan.len()
        );
        // What is left to do from here (once the extension list is emptied
        // the extensions are lost: all optional; the rest is zeroing).
        let left = {
            let file = std::fs::File::open(&copy).unwrap();
            let h = backfill::qcow2::Header::read_from(&file, "copy").unwrap();
            let mut a = vec![0u8; C64 as usize];
            file.read_exact_at(&mut a, 0).unwrap();
            drop_backing_plan(&a, &h)
        };
        assert_eq!(left.is_empty(), k == plan.len(), "after {k} writes");
        let disk = open(&copy, options(1, true, false));
        assert_same_bytes(&read_all(&disk, MIB), &f.data, &format!("prefix {k}"));
        // A stream over a half-rewritten header finishes the rewrite.
        let (end, _) = stream_to_end(&disk, StreamOptions::default());
        assert_eq!(
            end,
            StreamEnd::Finished {
                backing_dropped: !left.is_empty()
            },
            "after {k} writes"
        );
        disk.close().unwrap();
        assert_standalone(&copy);
        check_clean(&copy);
    }
}

#[test]
fn a_broken_backing_image_fails_the_stream_clearly() {
    use std::os::unix::fs::FileExt;
    let dir = tempdir("stream-broken");
    let size = 4 * MIB;
    let mid = dir.path().join("mid.qcow2");
    create_qcow2(&mid, size, C64, Compat::V3, None);
    qemu_io(&mid, "qcow2", &["write -P 0x11 0 1M".into()]);
    // Point L2 entry 3 of the backing image past the end of its file.
    let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mid)
        .unwrap();
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, 40).unwrap();
    let l1 = be(&b);
    file.read_exact_at(&mut b, l1).unwrap();
    let l2 = be(&b) & 0x00ff_ffff_ffff_fe00;
    let past = round_up(file.metadata().unwrap().len(), C64) + 16 * C64;
    file.write_all_at(&(past | 1 << 63).to_be_bytes(), l2 + 3 * 8)
        .unwrap();
    drop(file);
    let overlay = dir.path().join("overlay.qcow2");
    create_qcow2(
        &overlay,
        size,
        C64,
        Compat::V3,
        Some(&Backing {
            name: "mid.qcow2".into(),
            format: "qcow2",
        }),
    );
    let disk = open(&overlay, options(2, true, false));
    let s = disk.stream(StreamOptions::default()).unwrap();
    let last = s.wait_until(|p| p.state.is_stopped());
    let e = s
        .wait()
        .expect_err("a stream over a broken backing image fails");
    assert_eq!(last.state, StreamState::Failed);
    let msg = e.to_string();
    assert_eq!(last.error.as_deref(), Some(msg.as_str()));
    assert!(
        msg.starts_with("streaming: ")
            && msg.contains("mid.qcow2")
            && msg.contains("guest offset 0x30000")
            && msg.contains("past the end of the file"),
        "{msg}"
    );
    // The disk keeps serving what it can.
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 2 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    disk.close().unwrap();
    check_clean(&overlay);
    assert_eq!(info_json(&overlay)["backing-filename"], "mid.qcow2");
}

#[test]
fn drop_backing_refuses_while_data_is_missing() {
    let f = fixture("stream-refuse", 2 * MIB, &[], 7);
    let disk = open(&f.overlay, options(1, true, false));
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 0).unwrap();
    let e = disk.drop_backing().unwrap_err();
    assert_eq!(e.kind(), backfill::ErrorKind::InvalidInput, "{e}");
    disk.close().unwrap();
    assert!(info_json(&f.overlay).get("backing-filename").is_some());
    check_clean(&f.overlay);
}

// ------------------------------------------------------------------- CLI

fn backfill_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_backfill"))
}

#[test]
fn cli_stream_with_rate_finishes_standalone() {
    let f = fixture("stream-cli", 4 * MIB, &[(MIB, 512 * KIB)], 11);
    let out = backfill_cmd()
        .args(["stream", "--rate", "64M", "--cores", "2"])
        .arg(&f.overlay)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("streamed ") && stdout.contains("backing file dropped"),
        "{stdout}"
    );
    assert_standalone(&f.overlay);
    check_clean(&f.overlay);
    compare_identical(&f.overlay, &f.base);
    assert_zero_in_overlay(&qemu_map(&f.overlay), MIB, 512 * KIB);
    // A second run has nothing to do.
    let out = backfill_cmd()
        .arg("stream")
        .arg(&f.overlay)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no backing file"));
}

#[test]
fn cli_stream_keep_backing_and_bad_rate() {
    let f = fixture("stream-cli-keep", 2 * MIB, &[], 12);
    let out = backfill_cmd()
        .args(["stream", "--rate", "0"])
        .arg(&f.overlay)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("backfill: "));
    let out = backfill_cmd()
        .args(["stream", "--keep-backing"])
        .arg(&f.overlay)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("backing file kept"));
    assert_eq!(info_json(&f.overlay)["backing-filename"], "base.raw");
    assert_all_in_overlay(&qemu_map(&f.overlay));
    check_clean(&f.overlay);
    // `backfill info` says nothing is left to stream.
    let out = backfill_cmd().arg("info").arg(&f.overlay).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("100.0% populated"), "{text}");
}

#[test]
fn cli_stream_killed_midway_resumes() {
    let size = 32 * MIB;
    let f = fixture("stream-kill", size, &[], 13);
    kill_stream_midway(&f.overlay);

    // Clusters a crash leaves reserved are leaks, never corruption.
    check_no_corruption(&f.overlay);
    assert!(info_json(&f.overlay).get("backing-filename").is_some());

    let out = backfill_cmd()
        .args(["stream", "--cores", "2"])
        .arg(&f.overlay)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_standalone(&f.overlay);
    // The clusters the killed run had reserved are freed at the end.
    check_clean(&f.overlay);
    compare_identical(&f.overlay, &f.base);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("backing file dropped"), "{stdout}");
}

#[test]
fn cli_stream_sigint_cancels_cleanly() {
    let size = 32 * MIB;
    let f = fixture("stream-sigint", size, &[], 16);
    let (child, lines) = start_slow_stream(&f.overlay);
    // SAFETY: kill(2) has no memory effects; the child is not reaped yet, so
    // its pid cannot have been reused.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{rest:?}");
    let last = rest.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("backfill: ") && last.contains("cancelled") && last.contains("resume"),
        "{rest:?}"
    );
    // Closed cleanly, the backing file still there, the work kept.
    check_clean(&f.overlay);
    assert!(info_json(&f.overlay).get("backing-filename").is_some());
    let held = backfill::info(&f.overlay).unwrap().overlay_data_bytes;
    assert!(held > 0 && held < size, "{held}");
}

#[test]
fn serve_stream_finishes_while_clients_read_and_write() {
    use nbd_common::Server;
    let size = 16 * MIB;
    let f = fixture("stream-serve", size, &[(4 * MIB, MIB)], 14);
    let mut expected = f.data.clone();
    let mut server = Server::start(f.dir.path(), &f.overlay, &["--stream=8M"]);
    // A client writes and reads through NBD while the stream runs.
    qemu_io(
        Path::new(&server.uri),
        "raw",
        &[
            "write -P 0xab 1M 64K".into(),
            "write -P 0xcd 10000 3000".into(),
        ],
    );
    expected[MIB as usize..(MIB + 64 * KIB) as usize].fill(0xab);
    expected[10000..13000].fill(0xcd);
    let copy = read_through_nbd(&server.uri, &f.dir.path().join("read.raw"));
    assert_same_bytes(&copy, &expected, "read through NBD");
    let line = server.read_stdout_line();
    assert!(
        line.starts_with("streamed ") && line.contains("backing file dropped"),
        "{line:?}"
    );
    server.stop();
    assert_standalone(&f.overlay);
    check_clean(&f.overlay);
    compare_with_bytes(&f.overlay, &expected, f.dir.path());
    assert_zero_in_overlay(&qemu_map(&f.overlay), 4 * MIB, MIB);
}

/// A local raw backing file's holes read as zeros without a read: its file
/// system says where they are (`SEEK_HOLE`). `backfill serve` shows them
/// to its clients as zeros (`nbdinfo --map`: exactly the file's data, as
/// `qemu-img map` of the file has it, is data), and `backfill stream`
/// populates them as zero clusters without reading them (its summary), to
/// an image `qemu-img compare` finds identical to the file.
#[test]
fn holes_of_a_local_raw_backing_are_not_read() {
    const DATA: [(u64, u64); 3] = [
        (0, MIB),
        (5 * MIB + 4 * KIB, 300 * KIB),
        (16 * MIB - 128 * KIB, 128 * KIB),
    ];
    let size = 16 * MIB;
    let dir = tempdir("stream-holes");
    let base = dir.path().join("base.raw");
    write_sparse_file(&base, size, &DATA, seed_from_env("stream-holes"));
    let overlay = dir.path().join("overlay.qcow2");
    let b = Backing {
        name: "base.raw".into(),
        format: "raw",
    };
    create_qcow2(&overlay, size, C64, Compat::V3, Some(&b));

    let served = nbd_common::Server::start(dir.path(), &overlay, &["--read-only"]);
    let line = served.wait_for_log_line("read as zeros");
    assert!(
        line.contains("the backing file's holes cover 14.6 MiB of the disk"),
        "{line}"
    );
    assert_eq!(nbd_common::nbdinfo_data(&served.uri), DATA);
    served.stop();
    // backfill info tells the same, and what a stream will read.
    let info = backfill_ok(&["info", &path_str(&overlay)]);
    assert!(
        info.contains("of which holes of the backing file: 14.6 MiB (15290368 bytes)"),
        "{info}"
    );
    assert!(
        info.contains("(16 MiB still read from the backing chain, 1.42 MiB of it to fetch)"),
        "{info}"
    );

    let out = backfill_ok(&["stream", &path_str(&overlay)]);
    assert!(
        out.contains("16 MiB populated (14.6 MiB of it zeros in the backing image, not fetched)"),
        "{out}"
    );
    assert_standalone(&overlay);
    check_clean(&overlay);
    compare_identical(&overlay, &base);
    assert_data_clusters(&overlay, C64, &DATA);
}

#[test]
fn serve_stream_keep_backing() {
    use nbd_common::Server;
    let f = fixture("stream-serve-keep", 2 * MIB, &[], 15);
    let mut server = Server::start(f.dir.path(), &f.overlay, &["--stream", "--keep-backing"]);
    let line = server.read_stdout_line();
    assert!(line.contains("backing file kept"), "{line:?}");
    server.stop();
    assert_eq!(info_json(&f.overlay)["backing-filename"], "base.raw");
    assert_all_in_overlay(&qemu_map(&f.overlay));
    check_clean(&f.overlay);
    compare_identical(&f.overlay, &f.base);
}

/// An extended-L2 overlay (subclusters), partly populated by 4 KiB
/// copy-on-read reads and small writes (partial clusters), streams to a
/// standalone image equal to the backing file with the writes applied.
#[test]
fn extended_l2_overlay_streams_to_a_standalone_image() {
    let size = 6 * MIB + 8 * KIB;
    let dir = tempdir("stream-extl2");
    let base = dir.path().join("base.raw");
    let mut expected = random_bytes(size as usize, seed_from_env("stream-extl2"));
    expected[(2 * MIB) as usize..(2 * MIB + 200 * KIB) as usize].fill(0);
    write_file(&base, &expected);
    let overlay = dir.path().join("overlay.qcow2");
    qemu_create_qcow2(
        &overlay,
        "cluster_size=64K,extended_l2=on",
        Some(("base.raw", "raw")),
        Some(size),
    );
    let disk = open(&overlay, options(2, true, false));
    let mut buf = vec![0u8; 4096];
    for off in [8 * KIB, 700 * KIB, 3 * MIB + 12 * KIB] {
        disk.read_at(&mut buf, off).unwrap();
        assert_same_bytes(
            &buf,
            &expected[off as usize..off as usize + 4096],
            "4K read",
        );
    }
    for (off, len) in [(70 * KIB, 3000u64), (4 * MIB + 100, 9000)] {
        let data = random_bytes(len as usize, off);
        disk.write_at(&data, off).unwrap();
        expected[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    stream_to_standalone(&disk);
    assert_same_bytes(&read_all(&disk, MIB), &expected, "after the stream");
    disk.close().unwrap();
    assert_standalone(&overlay);
    check_clean(&overlay);
    compare_with_bytes(&overlay, &expected, dir.path());
}
