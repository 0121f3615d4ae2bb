//! Faults on real media: an overlay whose file system has no room left, and
//! NBD clients that vanish in the middle of a request. Each fault must give
//! the affected request a clear error (or cost only that client), the engine
//! must keep serving everyone else, and nothing already written may be lost
//! (DESIGN.md invariants 4, 5 and 7). Real components only: the engine, the
//! `backfill serve` binary, `qemu-io`, `nbdcopy` and `qemu-img` as oracles.
//!
//! **How the overlay runs out of room.** A size-limited tmpfs (`mount -t
//! tmpfs -o size=...`) gives a true ENOSPC, and tmpfs takes O_DIRECT on
//! recent kernels, but mounting needs CAP_SYS_ADMIN: a CI container running
//! as root without it (Docker's default) cannot, and neither can an
//! unprivileged user namespace where the distribution restricts those
//! (Ubuntu 24.04's AppArmor default). RLIMIT_FSIZE needs no privilege at all
//! and is inherited across exec: a write that would take a file past the
//! limit fails with EFBIG (a write that straddles it is cut short there),
//! exactly where a full file system answers ENOSPC, which is what we want to
//! exercise. Its one difference from a full file system is that holes below
//! the limit can still be filled; the tests never count on either behaviour.
//! The kernel also raises SIGXFSZ, whose default action kills the process,
//! so the limited process ignores it (PostgreSQL's postmaster does the same,
//! "so that ulimit violations work like disk full").
//!
//! The limit is per process, so no test sets it on the test process itself
//! (other tests run on its threads, and every tool it starts would inherit
//! it): the in-process scenario re-executes this test binary for one test,
//! and the NBD scenarios set it on `backfill serve` between fork and exec.
//!
//! * `full_overlay_in_process`: a `Disk` (two cores, O_DIRECT) over a 48 MiB
//!   backing image, with room for only a few more clusters once some
//!   writes, reads and a flush are done. A write that needs more clusters
//!   than are left, whole-cluster and partial writes to unallocated
//!   clusters on both cores: each fails with an I/O error that carries
//!   EFBIG/ENOSPC and names the image, and no cluster is left half written.
//!   Zeroing a cluster (no data needed), writes into allocated clusters and
//!   reads of populated data keep working; reading the whole disk returns
//!   the backing data although every write-back fails (counted in
//!   `Stats::writeback_errors`); flush and close succeed. Reopened with the
//!   limit still in force, and again without it, the disk reads exactly as
//!   the reference, `qemu-img check` finds no corruption and no leak (the
//!   clusters the failed writes had reserved are freed at close; checked
//!   past the file's end too, see `check_clean_past_end`) and `qemu-img
//!   compare` agrees.
//! * `full_overlay_over_nbd`: the same through `backfill serve` with real
//!   clients: `qemu-io` writes that cannot get room fail with "No space left
//!   on device" while a second connection keeps writing, reading (copy-on-
//!   read without room included) and flushing; the server stays up, reads
//!   through `nbdcopy` match, and after SIGTERM (exit 0) the image checks
//!   without corruption and equals the reference; the server's stderr says
//!   why copy-on-read write-backs failed, and how many.
//! * `held_write_backs_without_room`: over an NBD backing (nbdkit's eval
//!   plugin, one read held at a gate), write-backs of remote fills wait in
//!   memory and take their clusters only when they go out; 100 of them go
//!   out into an overlay with room for a few clusters. Every read is right
//!   before and after, FLUSH succeeds, the server reports the failures, and
//!   the image has no corruption and no leak and reads as the base.
//! * `failed_writes_on_extended_l2_leak_no_cluster`: the same with extended
//!   L2 entries, whose fills and partial writes take a new cluster for a
//!   few subclusters: those of failed writes are freed too.
//! * `file_size_limit_does_not_kill_the_server`: `backfill serve` started
//!   under `ulimit -f` as a user would, SIGXFSZ not ignored for it: a write
//!   past the limit fails with ENOSPC and the server keeps serving.
//! * `file_size_limit_fails_stream_and_convert_with_their_errors`: the
//!   same limit, SIGXFSZ not ignored, on `backfill stream` and `backfill
//!   convert`: each exits 1 with its error (the file and "File too large"),
//!   not killed by the signal; the image has no corruption, and a second
//!   `stream` without the limit finishes it (standalone, identical to the
//!   base). `convert --copy-on-read` with room for its output but not for
//!   the overlay's write-backs: the output is whole, and the report names
//!   the image and the OS error.
//! * `vanished_clients_lose_nothing`: while a well-behaved client writes,
//!   reads and flushes on its own thread, other clients vanish: one after
//!   acknowledged (flushed and unflushed) writes and a copy-on-read, in the
//!   middle of an unaligned WRITE payload over clusters holding its data;
//!   one after a pipeline of complete WRITEs and half a sixth, replies never
//!   read; one in the middle of receiving large copy-on-read READs (reset,
//!   with replies unread); and a real `nbdcopy` killed with SIGKILL while it
//!   reads the whole disk on several connections. After SIGTERM (exit 0) the
//!   image checks clean and equals the reference: every acknowledged write
//!   is there, nothing of a half-sent write, and each write whose reply was
//!   never read is whole or absent in every cluster.
//!   (`tests/nbd_hostile.rs` already covers hang-ups in a request header or
//!   payload on unallocated clusters and readers that never read replies;
//!   this adds what the disconnects may cost a client's own earlier writes
//!   and their neighbours, with the whole image as the oracle.)
//!
//! Every random choice comes from `BACKFILL_SEED`. Nothing sleeps: waits are
//! on protocol events or process exits, each under a hang guard that asserts
//! nothing about speed.

mod common;
#[path = "common/nbd.rs"]
mod nbd_common;
#[path = "common/nbd_peer.rs"]
mod nbd_peer;

use backfill::{Disk, ErrorKind};
use common::*;
use nbd_common::*;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

/// Set in the environment of the re-executed test binary: the directory of
/// the fixture the child works on.
const CHILD_ENV: &str = "BACKFILL_FAULTS_CHILD_DIR";

/// Clusters left free under the file size limit in the tests that place
/// the limit just past the data written so far.
const FREE_CLUSTERS: u64 = 8;

// ------------------------------------------------------------ file size limit

/// This process's RLIMIT_FSIZE.
fn fsize_limit() -> libc::rlimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `r`, which lives across the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut r) };
    assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
    r
}

/// Sets this process's RLIMIT_FSIZE soft limit, keeping the hard one (so
/// that it can be raised again), and ignores SIGXFSZ so that a write past
/// the limit fails with EFBIG instead of killing the process. Only for the
/// re-executed child, which runs one test alone.
fn set_fsize_soft_limit(bytes: u64) {
    let old = fsize_limit();
    assert!(
        bytes <= old.rlim_max,
        "the hard RLIMIT_FSIZE ({}) is below {bytes}",
        old.rlim_max
    );
    let new = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: old.rlim_max,
    };
    // SAFETY: signal(2) with SIG_IGN installs no handler code; setrlimit
    // reads one rlimit that lives across the call.
    unsafe {
        assert_ne!(libc::signal(libc::SIGXFSZ, libc::SIG_IGN), libc::SIG_ERR);
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_FSIZE, &new),
            0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Makes `cmd` start with RLIMIT_FSIZE at `bytes` (soft; the hard limit is
/// kept), and with SIGXFSZ ignored when `ignore_sigxfsz`; otherwise it keeps
/// the default action (terminate), as after `ulimit -f` in a shell.
fn limit_file_size_on_exec(cmd: &mut Command, bytes: u64, ignore_sigxfsz: bool) {
    let hard = fsize_limit().rlim_max;
    assert!(
        bytes <= hard,
        "the hard RLIMIT_FSIZE ({hard}) is below {bytes}"
    );
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: hard,
    };
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (signal and setrlimit, which take no
    // locks and allocate nothing); `limit` is a plain copy it owns.
    unsafe {
        cmd.pre_exec(move || {
            let disposition = if ignore_sigxfsz {
                libc::SIG_IGN
            } else {
                libc::SIG_DFL
            };
            if libc::signal(libc::SIGXFSZ, disposition) == libc::SIG_ERR
                || libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The limit for an image: the end of its data (rounded up to a cluster)
/// plus `FREE_CLUSTERS` clusters. The end of the data, not of the file: the
/// engine keeps the file's size ahead of the clusters it uses (a sparse
/// tail), and the kernel checks the limit against each write's position.
fn limit_after(image: &Path) -> u64 {
    round_up(data_end(image), CLUSTER) + FREE_CLUSTERS * CLUSTER
}

/// The end of the last data extent of a file (`SEEK_DATA`/`SEEK_HOLE`).
fn data_end(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fd = f.as_raw_fd();
    let mut end = 0i64;
    let mut at = 0i64;
    loop {
        // SAFETY: lseek(2) takes no pointers; `f` keeps the descriptor open.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data at or after `at`.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole >= data, "{}: SEEK_HOLE failed", path.display());
        end = hole;
        at = hole;
    }
    end as u64
}

// ------------------------------------------------------------------ oracles

/// A write whose outcome is unknown (it failed, or its client vanished
/// before the reply) left every cluster it touches either as it was or with
/// the write applied, never a mix (invariant 4). `seen` holds what the disk
/// reads as from `seen_at` on. What was seen becomes the model. Returns the
/// number of clusters that show the write.
#[track_caller]
fn settle(model: &mut [u8], seen_at: u64, seen: &[u8], off: u64, data: &[u8], what: &str) -> u64 {
    let end = off + data.len() as u64;
    let mut applied = 0;
    let mut c = off / CLUSTER * CLUSTER;
    while c < end {
        let ce = (c + CLUSTER).min(model.len() as u64);
        let old = model[c as usize..ce as usize].to_vec();
        let mut new = old.clone();
        let (lo, hi) = (off.max(c), end.min(ce));
        new[(lo - c) as usize..(hi - c) as usize]
            .copy_from_slice(&data[(lo - off) as usize..(hi - off) as usize]);
        assert!(
            seen_at <= c && ce <= seen_at + seen.len() as u64,
            "{what}: cluster at {c} was not read"
        );
        let got = &seen[(c - seen_at) as usize..(ce - seen_at) as usize];
        if got == new.as_slice() {
            applied += u64::from(new != old);
        } else if got != old.as_slice() {
            assert_same_bytes(
                got,
                &old,
                &format!(
                    "{what}: the cluster at {c} is neither as before nor as written \
                     (shown against before)"
                ),
            );
        }
        model[c as usize..ce as usize].copy_from_slice(got);
        c += CLUSTER;
    }
    applied
}

fn random_vec(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// The error a write gets when the overlay has no room: an I/O error that
/// carries the OS's own answer (EFBIG past RLIMIT_FSIZE, ENOSPC on a full
/// file system) and names the image. A "short write" without an errno is
/// not clear: an NBD client would see EIO, and a hypervisor pauses a guest
/// on ENOSPC (QEMU's werror=enospc) but fails its I/O on EIO.
#[track_caller]
fn assert_no_room(r: backfill::Result<()>, image: &Path, what: &str) {
    let e = match r {
        Ok(()) => panic!("{what}: succeeded although the overlay has no room left"),
        Err(e) => e,
    };
    let errno = e.errno();
    assert!(
        e.kind() == ErrorKind::Io && matches!(errno, Some(libc::EFBIG) | Some(libc::ENOSPC)),
        "{what}: expected an I/O error with errno EFBIG or ENOSPC, got {:?} with errno {errno:?}: {e}",
        e.kind()
    );
    let os = std::io::Error::from_raw_os_error(errno.unwrap()).to_string();
    let name = image.file_name().unwrap().to_str().unwrap();
    assert!(
        e.message().contains(name) && e.message().contains(&os),
        "{what}: the message should name the image ({name}) and the OS error ({os}): {e}"
    );
}

#[track_caller]
fn read_range(disk: &Disk, off: u64, len: u64, what: &str) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    disk.read_at(&mut buf, off)
        .unwrap_or_else(|e| panic!("{what}: read_at({off}, {len}): {e} ({:?})", e.kind()));
    buf
}

#[track_caller]
fn check_range(disk: &Disk, model: &[u8], off: u64, len: u64, what: &str) {
    let got = read_range(disk, off, len, what);
    assert_same_bytes(
        &got,
        &model[off as usize..(off + len) as usize],
        &format!("{what}: [{off}, +{len})"),
    );
}

/// `qemu-img check` with no corruption and no leak, past the file's end
/// too. It looks only at the clusters inside the file, so a refcount left
/// on a reserved cluster past the end, which nothing uses, would go unseen
/// (and QEMU would skip that cluster forever once the file grows). The file
/// is grown by a sparse 64 MiB for the check, where such a refcount shows
/// as a leak, then cut back.
#[track_caller]
fn check_clean_past_end(image: &Path) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    let len = file.metadata().expect("stat the image").len();
    file.set_len(len + 64 * MIB).expect("growing the image");
    check_clean(image);
    file.set_len(len).expect("cutting the image back");
}

fn apply(model: &mut [u8], off: u64, data: &[u8]) {
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// The data extents of `[0, len)`: clusters the overlay holds.
fn allocated(disk: &Disk, len: u64) -> Vec<(u64, u64)> {
    disk.block_status(0, len)
        .unwrap_or_else(|e| panic!("block_status: {e}"))
        .into_iter()
        .filter(|s| s.kind == backfill::ExtentKind::Data)
        .map(|s| (s.offset, s.len))
        .collect()
}

/// A random range of at most `max` bytes inside one of `extents`.
fn range_inside(rng: &mut Rng, extents: &[(u64, u64)], max: u64) -> (u64, u64) {
    let (o, l) = extents[rng.below(extents.len() as u64) as usize];
    let len = rng.range(1, max.min(l) + 1);
    (o + rng.below(l - len + 1), len)
}

// ------------------------------------------------------ in-process scenario

#[test]
fn full_overlay_in_process() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        return full_overlay_child(Path::new(&dir));
    }
    let test = "full_overlay_in_process";
    let seed = seed_from_env(test);
    let mut rng = Rng::new(seed);
    let f = Fixture::with_backing("faults-disk", 48 * MIB, rng.next_u64());

    // The child is this binary running only this test, with the fixture's
    // directory in its environment; it leaves its reference in expected.raw.
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, f.dir.path())
        .env("BACKFILL_SEED", format!("{seed:#x}"))
        .output()
        .expect("re-executing the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("test {test} ... ok")),
        "the child ({}) failed\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // Judged by independent tools, with room again.
    let mut expected = read_file(&f.path("expected.raw"));
    check_clean_past_end(&f.image);
    compare_with_bytes(&f.image, &expected, f.dir.path());

    // Reopened with room: everything reads as the reference, and a cluster
    // that could not be written before now can.
    let disk = open(&f.image, options(2, true, false));
    assert_same_bytes(&read_all(&disk, MIB), &expected, "reopened with room");
    let data = random_vec(&mut rng, CLUSTER as usize);
    disk.write_at(&data, 14 * MIB)
        .unwrap_or_else(|e| panic!("a write with room again: {e}"));
    apply(&mut expected, 14 * MIB, &data);
    disk.close().expect("close");
    check_clean_past_end(&f.image);
    compare_with_bytes(&f.image, &expected, f.dir.path());
}

/// The child of `full_overlay_in_process`: runs alone in its process, so it
/// may limit its own file size.
fn full_overlay_child(dir: &Path) {
    let seed = seed_from_env("full_overlay_in_process (child)");
    let mut rng = Rng::new(seed).fork();
    let image = dir.join("disk.qcow2");
    let mut model = read_file(&dir.join("base.raw"));
    let size = model.len() as u64;
    let stripe = 32 * MIB; // backfill::router::STRIPE_CLUSTERS clusters
    assert!(size > stripe, "the disk must span both cores' stripes");
    let disk = open(&image, options(2, true, false));

    // Before the fault, only the first core's stripe is touched, so that
    // its clusters come from one reserve, in order, ending at the file's
    // end. Writes (unaligned), copy-on-read, a flush: all durable.
    for _ in 0..10 {
        let len = rng.range(1, 200 * KIB);
        let off = rng.below(8 * MIB - len);
        let data = random_vec(&mut rng, len as usize);
        disk.write_at(&data, off)
            .unwrap_or_else(|e| panic!("write_at({off}, {len}) with room: {e}"));
        apply(&mut model, off, &data);
    }
    check_range(&disk, &model, 8 * MIB, MIB, "copy-on-read with room");
    check_range(
        &disk,
        &model,
        9 * MIB + 12345,
        300_000,
        "copy-on-read with room",
    );
    disk.flush().expect("flush with room");
    let before = disk.stats();
    assert!(before.cor_fills >= 16, "copy-on-read filled: {before:?}");
    assert_eq!(before.writeback_errors, 0, "{before:?}");
    let populated = allocated(&disk, size);
    assert!(!populated.is_empty());

    // From here on, the file may grow by FREE_CLUSTERS clusters only.
    let limit = limit_after(&image);
    let original = fsize_limit();
    set_fsize_soft_limit(limit);

    // A write that needs one cluster more than is left: it fails, whatever
    // part of it landed, each cluster is whole (old or new).
    let big_at = 12 * MIB;
    let big = random_vec(&mut rng, ((FREE_CLUSTERS + 1) * CLUSTER) as usize);
    assert_no_room(
        disk.write_at(&big, big_at),
        &image,
        "a write of one cluster more than is left",
    );
    let seen = read_range(&disk, big_at, big.len() as u64, "after the failed write");
    let landed = settle(&mut model, big_at, &seen, big_at, &big, "the failed write");
    eprintln!(
        "a write of {} clusters failed; {landed} of them landed",
        FREE_CLUSTERS + 1
    );

    // Now there is no room at all: writes to unallocated clusters fail on
    // both cores, whole or partial (the partial one merges backing data),
    // and change nothing.
    for (off, len, what) in [
        (14 * MIB, CLUSTER, "a whole-cluster write"),
        (
            14 * MIB + 3 * CLUSTER + 1000,
            3000,
            "a partial-cluster write",
        ),
        (
            40 * MIB,
            CLUSTER,
            "a whole-cluster write on the second core",
        ),
        (
            44 * MIB - 5000,
            10_000,
            "a write across two clusters on the second core",
        ),
    ] {
        let data = random_vec(&mut rng, len as usize);
        assert_no_room(disk.write_at(&data, off), &image, what);
        let lo = off / CLUSTER * CLUSTER;
        let hi = round_up(off + len, CLUSTER);
        check_range(&disk, &model, lo, hi - lo, &format!("after {what} failed"));
    }

    // What needs no room still works: zeroing a whole cluster (an L2 entry),
    // writes into allocated clusters (aligned or not, FUA too), and reads
    // of what they hold.
    disk.write_zeroes(15 * MIB, CLUSTER)
        .unwrap_or_else(|e| panic!("write_zeroes of a whole cluster without room: {e}"));
    model[(15 * MIB) as usize..(15 * MIB + CLUSTER) as usize].fill(0);
    for i in 0..8 {
        let (off, len) = range_inside(&mut rng, &populated, 100 * KIB);
        let data = random_vec(&mut rng, len as usize);
        let r = if i % 4 == 0 {
            disk.write_at_fua(&data, off)
        } else {
            disk.write_at(&data, off)
        };
        r.unwrap_or_else(|e| panic!("write_at({off}, {len}) into allocated clusters: {e}"));
        apply(&mut model, off, &data);
    }
    for &(off, len) in &populated {
        check_range(&disk, &model, off, len, "populated data without room");
    }

    // Reading the whole disk returns the backing data where the overlay has
    // none, although no write-back can land; twice, since nothing was kept.
    for pass in ["first", "second"] {
        assert_same_bytes(
            &read_all(&disk, MIB),
            &model,
            &format!("{pass} read of the whole disk without room"),
        );
    }
    disk.flush()
        .unwrap_or_else(|e| panic!("flush after failed writes: {e} ({:?})", e.kind()));
    let after = disk.stats();
    assert!(
        after.writeback_errors > 0,
        "write-backs failed for lack of room, and were counted: {after:?}"
    );
    let why = disk
        .last_writeback_error()
        .expect("the latest failed write-back's error");
    assert_no_room(Err(why), &image, "the latest failed write-back");

    // Failures do not poison the image: a write without room still gets the
    // same clear error, one with room still works.
    assert_no_room(
        disk.write_at(&[7u8; 512], 41 * MIB),
        &image,
        "a write after everything else",
    );
    let (off, len) = range_inside(&mut rng, &populated, 64 * KIB);
    let data = random_vec(&mut rng, len as usize);
    disk.write_at(&data, off)
        .unwrap_or_else(|e| panic!("a write into allocated clusters at the end: {e}"));
    apply(&mut model, off, &data);
    disk.flush().expect("the last flush");
    disk.close()
        .unwrap_or_else(|e| panic!("close without room: {e} ({:?})", e.kind()));

    // Reopened with the limit still in force: the same contents, the same
    // behaviour.
    let disk = open(&image, options(2, true, false));
    assert_same_bytes(&read_all(&disk, MIB), &model, "reopened without room");
    let (off, len) = range_inside(&mut rng, &populated, 64 * KIB);
    let data = random_vec(&mut rng, len as usize);
    disk.write_at(&data, off)
        .unwrap_or_else(|e| panic!("reopened: a write into allocated clusters: {e}"));
    apply(&mut model, off, &data);
    assert_no_room(
        disk.write_at(&[9u8; 4096], 42 * MIB),
        &image,
        "reopened: a write to an unallocated cluster",
    );
    disk.close().expect("close after reopening");

    // Room again for the reference file (the limit applies to every file).
    set_fsize_soft_limit(original.rlim_cur);
    write_file(&dir.join("expected.raw"), &model);
}

// ------------------------------------------------------------ NBD scenarios

/// `qemu-io -f raw URI -c CMD...`, whatever its outcome.
fn qemu_io_run(uri: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f".to_string(), "raw".to_string(), uri.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    run_status("qemu-io", &args)
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A `qemu-io` write that must have failed for lack of room: "No space left
/// on device" (NBD's ENOSPC, which is also where EFBIG belongs), not EIO.
#[track_caller]
fn assert_qemu_io_no_room(out: &Output, what: &str) {
    let text = output_text(out);
    assert!(
        text.contains("write failed: No space left on device"),
        "{what}: qemu-io should report \"No space left on device\" ({}):\n{text}",
        out.status
    );
}

#[track_caller]
fn assert_qemu_io_ok(out: &Output, what: &str) {
    let text = output_text(out);
    assert!(
        out.status.success() && !text.contains("failed"),
        "{what}: qemu-io failed ({}):\n{text}",
        out.status
    );
}

/// Fails with the server's exit status and log if it is gone.
#[track_caller]
fn assert_alive(server: &mut Server, what: &str) {
    if let Some(status) = server.exited() {
        use std::os::unix::process::ExitStatusExt;
        panic!(
            "{what}: backfill serve died ({status}){}\nstderr:\n{}",
            match status.signal() {
                Some(libc::SIGXFSZ) => {
                    ": a write reached RLIMIT_FSIZE, and the server does not ignore SIGXFSZ"
                }
                _ => "",
            },
            server.log_text()
        );
    }
}

#[test]
fn full_overlay_over_nbd() {
    let seed = seed_from_env("full_overlay_over_nbd");
    let mut rng = Rng::new(seed);
    let size = 48 * MIB;
    let f = Fixture::with_backing("faults-nbd", size, rng.next_u64());
    let mut model = f.data.clone();
    // Room for the writes before the fault (some 45 clusters with the L2
    // table), then for a few more.
    let limit = 4 * MIB;
    let mut server = Server::start_with(f.dir.path(), &f.image, &[], |cmd| {
        limit_file_size_on_exec(cmd, limit, true)
    });

    // Before the fault, in the first core's stripe only (its clusters come
    // from one reserve, in order): qemu-io writes aligned and unaligned, a
    // copy-on-read, a flush; the second connection writes and flushes too.
    let out = qemu_io_run(
        &server.uri,
        &[
            "write -P 0xa1 1M 1M",
            "write -P 0xa2 3145739 200000",
            "read 6M 1M",
            "flush",
        ],
    );
    assert_qemu_io_ok(&out, "writes with room");
    model[MIB as usize..2 * MIB as usize].fill(0xa1);
    model[3_145_739..3_345_739].fill(0xa2);
    let mut good = server.client();
    let g_at = 2 * MIB + 777;
    let g = random_vec(&mut rng, 300_000);
    good.write_ok(g_at, &g, 0);
    good.flush_ok();
    apply(&mut model, g_at, &g);
    let len = data_end(&f.image);
    let free = (limit - round_up(len, CLUSTER)) / CLUSTER;
    assert!(
        (1..=32).contains(&free),
        "the limit ({limit}) should leave a few clusters free after the first writes, \
         the data ends at {len} bytes"
    );

    // The fault, from qemu-io on another thread: a write of one cluster
    // more than is left, one on the second core (which has no room at all),
    // a large one; then writes and reads of allocated clusters, which work.
    let straddle = (free + 1) * CLUSTER;
    let unknown = [
        (8 * MIB, straddle, 0xcdu8),
        (36 * MIB, 4 * MIB, 0xce),
        (16 * MIB, 16 * MIB, 0xcf),
    ];
    let uri = server.uri.clone();
    let writer = std::thread::spawn(move || {
        let mut outs: Vec<Output> = unknown
            .iter()
            .map(|&(off, len, byte)| {
                qemu_io_run(&uri, &[&format!("write -P {byte:#x} {off} {len}")])
            })
            .collect();
        outs.push(qemu_io_run(
            &uri,
            &["write -P 0xa3 1M 64k", "read -P 0xa3 1M 64k", "flush"],
        ));
        outs
    });

    // Meanwhile the second connection keeps working: writes into its
    // allocated range, reads of them, flushes, and copy-on-read of the
    // second core's stripe (whose write-backs have no room) away from the
    // ranges being written.
    let mut i = 0;
    while !writer.is_finished() || i < 24 {
        let len = rng.range(1, 64 * KIB);
        let off = g_at + rng.below(g.len() as u64 - len);
        let data = random_vec(&mut rng, len as usize);
        good.write_ok(off, &data, 0);
        apply(&mut model, off, &data);
        assert_same_bytes(
            &good.read_ok(off, len as u32),
            &model[off as usize..(off + len) as usize],
            "the second connection reads its write",
        );
        if i % 3 == 0 {
            good.flush_ok();
        }
        if i % 4 == 0 {
            let (lo, hi) = if rng.percent(50) {
                (32 * MIB, 36 * MIB)
            } else {
                (40 * MIB, 48 * MIB)
            };
            let len = rng.range(1, 256 * KIB);
            let off = lo + rng.below(hi - lo - len);
            assert_same_bytes(
                &good.read_ok(off, len as u32),
                &model[off as usize..(off + len) as usize],
                "copy-on-read without room",
            );
        }
        i += 1;
    }
    let outs = writer.join().expect("the qemu-io thread");
    for (out, (off, len, _)) in outs.iter().zip(unknown) {
        assert_qemu_io_no_room(out, &format!("qemu-io write [{off}, +{len})"));
    }
    assert_qemu_io_ok(&outs[3], "qemu-io writes into allocated clusters");
    model[MIB as usize..(MIB + 64 * KIB) as usize].fill(0xa3);
    assert_alive(&mut server, "after writes without room");

    // The same connection: a write without room gets ENOSPC with a message,
    // and the connection goes on.
    let data = random_vec(&mut rng, CLUSTER as usize);
    let r = good.call(0, CMD_WRITE, 44 * MIB, CLUSTER as u32, &data);
    assert_eq!(r.error, ENOSPC, "a WRITE without room: {}", r.describe());
    assert!(
        !r.error_message.is_empty(),
        "no error message: {}",
        r.describe()
    );
    good.flush_ok();
    assert_same_bytes(
        &good.read_ok(44 * MIB, CLUSTER as u32),
        &model[44 * MIB as usize..(44 * MIB + CLUSTER) as usize],
        "after a WRITE without room",
    );

    // The whole disk through another real client: the failed writes left
    // whole clusters, the rest is exactly the reference.
    let copy = f.path("copy.raw");
    let out = run_status("nbdcopy", [server.uri.as_str(), copy.to_str().unwrap()]);
    assert!(out.status.success(), "nbdcopy: {}", output_text(&out));
    let seen = read_file(&copy);
    for (off, len, byte) in unknown {
        let n = settle(
            &mut model,
            0,
            &seen,
            off,
            &vec![byte; len as usize],
            &format!("the failed write [{off}, +{len})"),
        );
        eprintln!("failed write [{off}, +{len}): {n} clusters landed");
    }
    assert_same_bytes(&seen, &model, "nbdcopy of the disk after the fault");
    assert_alive(&mut server, "after nbdcopy");

    good.disconnect();
    let log = server.stop();
    // Nobody's read failed, so the server says why the overlay stopped filling.
    let report = line_starting(
        &log,
        "backfill serve: copy-on-read could not write into the overlay",
    );
    assert!(report.contains("write-backs failed"), "{report}");
    check_clean_past_end(&f.image);
    compare_with_bytes(&f.image, &model, f.dir.path());
}

/// Write-backs of remote fills wait in memory while remote reads continue,
/// and take their clusters only when they go out: on an overlay without
/// room, that is where they fail. The backing is nbdkit's eval plugin,
/// which holds one read at a gate (a FIFO the test writes to, once); with
/// it in flight, 100 cold reads through `backfill serve` (one core, room
/// for a few clusters) complete and their write-backs are held. When the
/// gate opens, they go out and most fail for lack of room. Every read,
/// before and after, returns the base's bytes; a FLUSH succeeds (the
/// failed write-backs lost only copy-on-read work); the server says on
/// stderr why write-backs failed and how many; the image has no corruption
/// and no leak (`qemu-img check`), holds some of the clusters read and not others
/// (`qemu-img map`), and reads as the base (`qemu-img compare`).
#[test]
fn held_write_backs_without_room() {
    let size = 16 * MIB;
    let dir = tempdir("faults-held");
    let base = dir.path().join("base.raw");
    let data = random_bytes(size as usize, 41);
    write_file(&base, &data);
    let gated = 3 * MIB;
    let sock = nbd_peer::socket_path(dir.path(), "eval.sock");
    let (backing, gate) = nbd_peer::gated_nbdkit(dir.path(), &sock, &base, size, gated);
    let image = dir.path().join("overlay.qcow2");
    qemu_create_qcow2(&image, "", Some((&nbd_peer::unix_uri(&sock), "raw")), None);
    let limit = limit_after(&image);
    let mut server = Server::start_with(dir.path(), &image, &["--cores", "1"], |cmd| {
        limit_file_size_on_exec(cmd, limit, true)
    });
    // Dropped before the server, whose stop would wait for the gated read.
    let gate = gate;

    let mut client = server.client();
    let stuck = client.send(0, CMD_READ, gated, 4096, &[]);
    // Every other cluster of the first 13 MiB but the gated one's neighbours.
    let reads: Vec<u64> = (0..size / CLUSTER)
        .map(|c| c * CLUSTER)
        .filter(|&o| o < 13 * MIB && o.abs_diff(gated) > CLUSTER && (o / CLUSTER).is_multiple_of(2))
        .take(100)
        .collect();
    assert_eq!(reads.len(), 100);
    let read_all = |client: &mut nbd_common::Client, what: &str| {
        let cookies: Vec<u64> = reads
            .iter()
            .map(|&o| client.send(0, CMD_READ, o, 4096, &[]))
            .collect();
        for (&o, c) in reads.iter().zip(cookies) {
            let got = client.recv(c).assemble(o, 4096);
            assert_same_bytes(
                &got,
                &data[o as usize..][..4096],
                &format!("{what}: read at {o}"),
            );
        }
    };
    read_all(&mut client, "held");
    // All answered while the gated read is in flight: their write-backs
    // wait. Now they go out, into an overlay without room for most.
    gate.open();
    let got = client.recv(stuck).assemble(gated, 4096);
    assert_same_bytes(&got, &data[gated as usize..][..4096], "the gated read");
    client.flush_ok();
    read_all(&mut client, "after the write-backs");
    assert_alive(&mut server, "after the write-backs");
    client.disconnect();
    let log = server.stop();
    let report = line_starting(
        &log,
        "backfill serve: copy-on-read could not write into the overlay",
    );
    assert!(
        report.contains("overlay.qcow2") && report.contains("write-backs failed"),
        "{report}"
    );

    check_clean_past_end(&image);
    let map = qemu_map(&image);
    let held = reads
        .iter()
        .filter(|&&o| map_at(&map, o).depth == 0)
        .count();
    eprintln!("held_write_backs_without_room: {held} of 100 clusters written; {report}");
    assert!(
        held < 100,
        "every write-back found room under a limit of {limit} bytes"
    );
    compare_with_bytes(&image, &data, dir.path());
    backing.stop();
}

/// With extended L2 entries, copy-on-read fills and partial writes take a
/// new host cluster for a few subclusters. On an overlay without room,
/// through `backfill serve`: cold reads of 64 clusters (2 KiB of each, so
/// the fills are subcluster-sized) return the base's bytes although most
/// write-backs fail; a partial write and a whole-cluster write into
/// unallocated clusters fail with "No space left on device"; a write into
/// an allocated cluster succeeds. After the server stops, the
/// clusters the failed writes had reserved are free again: `qemu-img check`
/// finds no leak (QEMU, too, frees the clusters of a failed allocating
/// write), and `qemu-img compare` equals the expected bytes.
#[test]
fn failed_writes_on_extended_l2_leak_no_cluster() {
    let size = 8 * MIB;
    let dir = tempdir("faults-ext");
    let base = dir.path().join("base.raw");
    let mut model = write_random_file(&base, size, 47);
    let image = dir.path().join("disk.qcow2");
    qemu_create_qcow2(&image, "extended_l2=on", Some(("base.raw", "raw")), None);
    // One cluster allocated with room, by QEMU.
    let out = run_status(
        "qemu-io",
        ["-c", "write -P 0xc0 7M 64k", path_str(&image).as_str()],
    );
    assert_qemu_io_ok(&out, "qemu-io's write into the image");
    model[(7 * MIB) as usize..][..CLUSTER as usize].fill(0xc0);
    let limit = limit_after(&image);
    let mut server = Server::start_with(dir.path(), &image, &[], |cmd| {
        limit_file_size_on_exec(cmd, limit, true)
    });

    // Reads of 2 KiB at 1 KiB into each of the first 64 clusters: there is
    // room for a few of their write-backs only.
    let mut client = server.client();
    for i in 0..64 {
        let off = i * CLUSTER + 1024;
        assert_same_bytes(
            &client.read_ok(off, 2048),
            &model[off as usize..][..2048],
            &format!("cold read at {off}"),
        );
    }
    client.flush_ok();

    for (cmd, what) in [
        (
            format!("write -P 0xc1 {} 3000", 5 * MIB + 1000),
            "a partial write",
        ),
        (
            format!("write -P 0xc2 {} 64k", 6 * MIB),
            "a whole-cluster write",
        ),
    ] {
        assert_qemu_io_no_room(&qemu_io_run(&server.uri, &[&cmd]), what);
    }
    let at = 7 * MIB + 1024;
    let out = qemu_io_run(
        &server.uri,
        &[
            &format!("write -P 0xc3 {at} 512"),
            &format!("read -P 0xc3 {at} 512"),
        ],
    );
    assert_qemu_io_ok(&out, "a write into an allocated cluster");
    model[at as usize..][..512].fill(0xc3);
    assert_alive(&mut server, "after the failed writes");
    client.disconnect();
    server.stop();

    check_clean_past_end(&image);
    let map = qemu_map(&image);
    let filled = (0..64)
        .filter(|i| map_at(&map, i * CLUSTER + 1024).depth == 0)
        .count();
    assert!(
        (1..64).contains(&filled),
        "{filled} of 64 fills written under a limit of {limit} bytes"
    );
    compare_with_bytes(&image, &model, dir.path());
}

#[test]
fn file_size_limit_does_not_kill_the_server() {
    let seed = seed_from_env("file_size_limit_does_not_kill_the_server");
    let mut rng = Rng::new(seed);
    let f = Fixture::with_backing("faults-ulimit", 8 * MIB, rng.next_u64());
    let mut model = f.data.clone();
    // As after `ulimit -f` in the shell that starts the server: the limit,
    // and SIGXFSZ with its default action.
    let limit = limit_after(&f.image);
    let mut server = Server::start_with(f.dir.path(), &f.image, &[], |cmd| {
        limit_file_size_on_exec(cmd, limit, false)
    });
    let out = qemu_io_run(&server.uri, &["write -P 0x5a 0 1M"]);
    assert_alive(&mut server, "a write past the file size limit");
    assert_qemu_io_no_room(&out, "a write past the file size limit");

    // The server keeps serving, on a new connection too.
    let mut c = server.client();
    let seen = c.read_ok(0, MIB as u32);
    settle(
        &mut model,
        0,
        &seen,
        0,
        &[0x5a; MIB as usize],
        "the failed write",
    );
    c.disconnect();
    server.stop();
    check_clean_past_end(&f.image);
    compare_with_bytes(&f.image, &model, f.dir.path());
}

/// The other commands that write, under `ulimit -f` as a user's shell sets
/// it (SIGXFSZ with its default action, which kills): `backfill stream`
/// stops with its error (exit 1, the image and the OS error named), not a
/// signal, and leaves an image without corruption that a second `stream`,
/// without the limit, finishes: standalone, identical to the base.
/// `backfill convert` into a file past the limit says so too; `convert
/// --copy-on-read` whose output fits but whose overlay does not writes the
/// whole output and says why the overlay did not keep the data.
#[test]
fn file_size_limit_fails_stream_and_convert_with_their_errors() {
    let f = Fixture::with_backing("faults-stream", 16 * MIB, 43);
    let limit = limit_after(&f.image);
    let limited = |args: &[&str]| {
        let mut cmd = Command::new(backfill_bin());
        cmd.args(args);
        limit_file_size_on_exec(&mut cmd, limit, false);
        let out = cmd.output().expect("running backfill");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "backfill {args:?} under a file size limit: {} ({stderr})",
            out.status
        );
        let efbig = std::io::Error::from_raw_os_error(libc::EFBIG).to_string();
        assert!(
            stderr.starts_with("backfill: ") && stderr.contains(&efbig),
            "backfill {args:?}: {stderr}"
        );
        stderr
    };
    let image = path_str(&f.image);
    let err = limited(&["stream", &image]);
    assert!(err.contains("disk.qcow2"), "{err}");
    check_clean_past_end(&f.image);
    eprintln!("stream without room: {err}");

    let out = run_ok(backfill_bin(), ["stream", image.as_str()]);
    assert!(out.contains("backing file dropped"), "{out}");
    check_clean_past_end(&f.image);
    compare_identical(&f.image, f.base());
    let info = qemu_img(["info", image.as_str()]);
    assert!(!info.contains("backing file"), "{info}");

    let copy = f.path("copy.raw");
    let err = limited(&["convert", &image, &path_str(&copy)]);
    assert!(err.contains("copy.raw"), "{err}");

    // `convert --copy-on-read` whose output fits under the limit but whose
    // overlay does not: the output is whole, and the report says why the
    // overlay did not keep the data (the OS error, retried out of a short
    // write-back).
    let g = Fixture::with_backing("faults-convert", MIB, 44);
    let image = path_str(&g.image);
    let copy = g.path("copy.raw");
    let mut cmd = Command::new(backfill_bin());
    cmd.args(["convert", "--copy-on-read", &image, &path_str(&copy)]);
    limit_file_size_on_exec(&mut cmd, MIB, false);
    let out = cmd.output().expect("running backfill convert");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} {text} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_bytes(&read_file(&copy), &g.data, "convert's output");
    let efbig = std::io::Error::from_raw_os_error(libc::EFBIG).to_string();
    let line = line_starting(&text, "Copy-on-read could not write ");
    assert!(
        line.contains("disk.qcow2") && line.contains(&efbig),
        "{line}"
    );
    check_clean_past_end(&g.image);
    compare_identical(&g.image, g.base());
}

// ---------------------------------------------------------- vanishing clients

/// Runs `f` on a thread and returns its result, or fails after
/// [`HANG_GUARD`] naming `what` (a hang guard, not a timing assertion).
fn guarded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG_GUARD)
        .unwrap_or_else(|_| panic!("{what}: nothing happened within {HANG_GUARD:?}"))
}

#[test]
fn vanished_clients_lose_nothing() {
    let seed = seed_from_env("vanished_clients_lose_nothing");
    let mut rng = Rng::new(seed);
    let size = 64 * MIB;
    let f = Fixture::with_backing("faults-vanish", size, rng.next_u64());
    let mut model = f.data.clone();
    let server = f.serve(&[]);

    // The well-behaved client owns [0, 8 MiB) and works on its own thread
    // until the others are gone: writes, reads of them, flushes.
    let good_end = 8 * MIB;
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let mut c = server.client();
        let mut mine = model[..good_end as usize].to_vec();
        let mut rng = rng.fork();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) || i < 16 {
                let len = rng.range(1, 256 * KIB);
                let off = rng.below(good_end - len);
                let data = random_vec(&mut rng, len as usize);
                c.write_ok(off, &data, 0);
                apply(&mut mine, off, &data);
                let len = rng.range(1, 256 * KIB);
                let off = rng.below(good_end - len);
                assert_same_bytes(
                    &c.read_ok(off, len as u32),
                    &mine[off as usize..(off + len) as usize],
                    "the well-behaved client reads",
                );
                if i % 4 == 3 {
                    c.flush_ok();
                }
                i += 1;
            }
            c.flush_ok();
            (c, mine)
        })
    };

    // 1. Acknowledged writes (flushed, then one not flushed), a copy-on-read,
    // then half of an unaligned WRITE over the clusters holding them, and a
    // hang-up. Nothing of the half write may show, in those clusters or
    // their neighbours; everything acknowledged must stay.
    let v1 = 16 * MIB;
    let mut c = server.client();
    let p1 = random_vec(&mut rng, 200_000);
    c.write_ok(v1 + 10_000, &p1, 0);
    apply(&mut model, v1 + 10_000, &p1);
    c.flush_ok();
    let p2 = random_vec(&mut rng, 100_000);
    c.write_ok(v1 + 600_000, &p2, 0);
    apply(&mut model, v1 + 600_000, &p2);
    assert_same_bytes(
        &c.read_ok(v1 + 300_000, 100_000),
        &model[(v1 + 300_000) as usize..(v1 + 400_000) as usize],
        "a copy-on-read before hanging up",
    );
    let mut half = encode_request(0, CMD_WRITE, 0x77, v1 + 50_000, 150_000);
    half.extend_from_slice(&random_vec(&mut rng, 70_000));
    c.stream().write_all(&half).unwrap();
    drop(c);

    // 2. A pipeline of complete WRITEs (to distinct clusters) and half of
    // one more, replies never read, then a hang-up. Each complete one may or
    // may not have happened, but whole in each cluster; the half one not.
    let mut c = server.client();
    let mut pipeline = Vec::new();
    let mut unknown = Vec::new();
    for (i, (off, len)) in [
        (20 * MIB + 1000, 300_000u32),
        (21 * MIB, 65_536),
        (22 * MIB + 5000, 10_000),
        (23 * MIB - 100, 200),
    ]
    .into_iter()
    .enumerate()
    {
        let data = random_vec(&mut rng, len as usize);
        pipeline.extend(encode_request(0, CMD_WRITE, 100 + i as u64, off, len));
        pipeline.extend_from_slice(&data);
        unknown.push((off, data));
    }
    pipeline.extend(encode_request(
        0,
        CMD_WRITE,
        200,
        21 * MIB + 500_000,
        100_000,
    ));
    pipeline.extend_from_slice(&random_vec(&mut rng, 30_000));
    c.stream().write_all(&pipeline).unwrap();
    drop(c);

    // 3. Large READs of data only the backing file holds (each one fills
    // the overlay), and a hang-up once the first reply is being received:
    // the rest stays unread, so the server's sends fail (reset).
    let mut c = server.client();
    let mut reads = Vec::new();
    for i in 0..8u64 {
        reads.extend(encode_request(
            0,
            CMD_READ,
            300 + i,
            32 * MIB + i * 4 * MIB,
            4 << 20,
        ));
    }
    c.stream().write_all(&reads).unwrap();
    let mut first = vec![0u8; 64 << 10];
    c.stream()
        .read_exact(&mut first)
        .expect("the start of the replies to the large READs");
    drop(c);

    // 4. A real client killed: nbdcopy reading the whole disk (several
    // connections, many requests in flight), SIGKILLed once 4 MiB are out.
    require_tool("nbdcopy");
    let mut copier = Command::new("nbdcopy")
        .args([server.uri.as_str(), "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting nbdcopy");
    let mut out = copier.stdout.take().expect("piped stdout");
    guarded("reading nbdcopy's first 4 MiB", move || {
        let mut buf = vec![0u8; 4 << 20];
        out.read_exact(&mut buf).expect("nbdcopy's output");
    });
    copier.kill().expect("killing nbdcopy");
    copier.wait().expect("reaping nbdcopy");

    // The well-behaved client's work ends, flushed.
    stop.store(true, Ordering::SeqCst);
    let (good, mine) = guarded("the well-behaved client", move || good.join())
        .expect("the well-behaved client's thread");
    apply(&mut model, 0, &mine);

    // Through the server, on a new connection: the whole disk.
    let mut c = server.client();
    let mut seen = Vec::with_capacity(size as usize);
    for off in (0..size).step_by(4 << 20) {
        seen.extend(c.read_ok(off, (4 * MIB).min(size - off) as u32));
    }
    c.disconnect();
    assert_same_bytes(
        &seen[v1 as usize..(v1 + MIB) as usize],
        &model[v1 as usize..(v1 + MIB) as usize],
        "the clusters of a half-sent WRITE and of the same client's acknowledged writes",
    );
    for (off, data) in &unknown {
        settle(
            &mut model,
            0,
            &seen,
            *off,
            data,
            "a WRITE whose reply was never read",
        );
    }
    assert_same_bytes(&seen, &model, "the disk after the clients vanished");

    good.disconnect();
    server.stop();
    check_clean_past_end(&f.image);
    compare_with_bytes(&f.image, &model, f.dir.path());
}
