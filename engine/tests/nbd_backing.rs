//! Backing images on NBD servers (issue 5): a raw base image served by
//! qemu-nbd or nbdkit (with its delay and error filters), below a qcow2
//! overlay made by `qemu-img create -f qcow2 -b URI -F raw`, read through
//! the engine with copy-on-read.
//!
//! Oracles: the base image's bytes, `qemu-img check`, `qemu-img map` (what
//! the overlay holds), `qemu-img compare` (which reads the backing over NBD
//! itself), the engine's remote counters, and nbdcopy reading a
//! `backfill serve` of such an overlay.
//!
//! Synchronisation: the servers are started and stopped by
//! `common/nbd_peer.rs` (ready once they wrote their pid file, gone when
//! `wait` returns); no sleeps stand in for either.

mod common;
#[path = "common/nbd.rs"]
mod nbd_common;
#[path = "common/nbd_peer.rs"]
mod nbd_peer;

use backfill::{Disk, ErrorKind, Options, Stats};
use common::*;
use nbd_peer::{socket_path, unix_uri, Peer};
use std::path::{Path, PathBuf};

const CLUSTER: u64 = 64 * KIB;

/// A base image and, once a server runs, an overlay on it.
struct Setup {
    dir: tempfile::TempDir,
    base: PathBuf,
    data: Vec<u8>,
    overlay: PathBuf,
}

impl Setup {
    /// `size` bytes of seeded random data, with an all-zero stretch (which
    /// copy-on-read records as zero clusters) and a partial last cluster.
    fn new(prefix: &str, size: u64, seed: u64) -> Setup {
        let dir = tempdir(prefix);
        let base = dir.path().join("base.raw");
        let mut data = random_bytes(size as usize, seed);
        data[(MIB as usize)..(MIB + 4 * CLUSTER) as usize].fill(0);
        write_file(&base, &data);
        let overlay = dir.path().join("overlay.qcow2");
        Setup {
            dir,
            base,
            data,
            overlay,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn sock(&self, name: &str) -> PathBuf {
        socket_path(self.dir.path(), name)
    }

    /// `nbdkit [FILTERS] file base.raw [PARAMS]` on Unix socket `sock`.
    fn nbdkit(&self, sock: &Path, filters: &[&str], params: &[&str]) -> Peer {
        nbd_peer::nbdkit(self.dir.path(), sock, &self.base, filters, params)
    }

    /// nbdkit with its delay filter (`rdelay`), and the URI it serves on.
    fn delayed_server(&self, rdelay: &str) -> (Peer, String) {
        let sock = self.sock("delayed.sock");
        let server = self.nbdkit(&sock, &["delay"], &[&format!("rdelay={rdelay}")]);
        (server, unix_uri(&sock))
    }

    /// A fresh overlay `name` over `uri` with `cluster`-byte clusters.
    fn overlay_over(&self, name: &str, uri: &str, cluster: u64) -> PathBuf {
        let p = self.path(name);
        let opts = format!("cluster_size={cluster}");
        qemu_create_qcow2(&p, &opts, Some((uri, "raw")), None);
        p
    }

    /// After the disk closed: `qemu-img check` is clean and `compare` finds
    /// `image` equal to `want` (written to a raw file for it).
    fn check_reads_as(&self, image: &Path, want: &[u8]) {
        check_clean(image);
        let expected = self.path("expected.raw");
        std::fs::write(&expected, want).unwrap();
        compare_same(image, &expected, "raw");
    }

    /// `qemu-nbd -r -f raw base.raw` on `listen` (`-k SOCKET` or `-b HOST -p PORT`).
    fn qemu_nbd(&self, listen: &[String]) -> Peer {
        nbd_peer::qemu_nbd(self.dir.path(), &self.base, listen)
    }

    /// qemu-nbd on TCP 127.0.0.1, with `extra` arguments: the server and
    /// its port (one nobody listened on a moment before).
    fn qemu_nbd_tcp(&self, extra: &[&str]) -> (Peer, u16) {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "-b".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        (self.qemu_nbd(&args), port)
    }

    /// qemu-nbd on Unix socket `name` and the overlay over it: the server,
    /// its socket and its URI.
    fn qemu_nbd_overlay(&self, name: &str) -> (Peer, PathBuf, String) {
        let sock = self.sock(name);
        let server = self.qemu_nbd(&["-k".into(), path_str(&sock)]);
        let uri = unix_uri(&sock);
        self.make_overlay(&uri);
        (server, sock, uri)
    }

    /// `qemu-img create -f qcow2 -b URI -F raw overlay.qcow2` (the size
    /// comes from the server).
    fn make_overlay(&self, uri: &str) {
        qemu_create_qcow2(&self.overlay, "", Some((uri, "raw")), None);
    }

    fn open(&self, copy_on_read: bool) -> Disk {
        open(&self.overlay, options(2, copy_on_read, false))
    }

    /// After the disk closed: `qemu-img check` is clean, the overlay holds
    /// every byte itself (`qemu-img map`), and reads as the base image
    /// (`qemu-img compare`, which reads the backing over NBD).
    fn check_populated(&self) {
        self.check_populated_as(None);
    }

    /// Like [`Setup::check_populated`], the overlay reading as `expected`
    /// when given (the base image with the test's writes).
    fn check_populated_as(&self, expected: Option<&[u8]>) {
        check_clean(&self.overlay);
        assert_all_in_overlay(&qemu_map(&self.overlay));
        match expected {
            Some(bytes) => compare_with_bytes(&self.overlay, bytes, self.dir.path()),
            None => compare_identical(&self.overlay, &self.base),
        }
    }
}

/// Reads `ranges` with every read in flight at once; panics on an error.
fn read_all_at_once(disk: &Disk, ranges: &[(u64, u64)]) -> Vec<Vec<u8>> {
    let pending: Vec<_> = ranges
        .iter()
        .map(|&(off, len)| disk.submit_read(off, vec![0u8; len as usize]))
        .collect();
    pending
        .into_iter()
        .zip(ranges)
        .map(|(c, (off, len))| {
            c.wait()
                .unwrap_or_else(|e| panic!("read of {len} bytes at {off}: {e}"))
        })
        .collect()
}

/// Reads the whole disk in unaligned 192 KiB pieces, all in flight at once,
/// and checks it against `data`.
fn read_everything(disk: &Disk, data: &[u8]) {
    let size = disk.size();
    let step = 192 * KIB;
    let ranges: Vec<(u64, u64)> = (0..size)
        .step_by(step as usize)
        .map(|off| (off, step.min(size - off)))
        .collect();
    for (got, &(off, len)) in read_all_at_once(disk, &ranges).iter().zip(&ranges) {
        assert_same_bytes(
            got,
            &data[off as usize..(off + len) as usize],
            &format!("read of {len} bytes at {off}"),
        );
    }
}

/// Copy-on-read of the whole disk; a second pass fetches nothing.
fn populate_and_check(s: &Setup) {
    let disk = s.open(true);
    read_everything(&disk, &s.data);
    disk.flush().expect("flush");
    let first = disk.stats();
    assert!(first.remote_reads > 0, "{first:?}");
    assert_eq!(first.remote_bytes, s.data.len() as u64, "{first:?}");
    assert_eq!(first.remote_errors, 0, "{first:?}");
    read_everything(&disk, &s.data);
    let second = disk.stats();
    assert_eq!(second.remote_reads, first.remote_reads, "{second:?}");
    assert_eq!(second.bytes_fetched, first.bytes_fetched, "{second:?}");
    disk.close().expect("close");
    s.check_populated();
}

#[test]
fn copy_on_read_over_qemu_nbd_unix_socket() {
    let s = Setup::new("nbdb-unix", 6 * MIB + 12 * KIB, 1);
    let (server, _, _) = s.qemu_nbd_overlay("q.sock");
    populate_and_check(&s);
    server.stop();
}

#[test]
fn copy_on_read_over_qemu_nbd_tcp() {
    let s = Setup::new("nbdb-tcp", 5 * MIB + 512, 2);
    let (server, port) = s.qemu_nbd_tcp(&[]);
    s.make_overlay(&format!("nbd://127.0.0.1:{port}/"));
    populate_and_check(&s);
    server.stop();
}

/// QEMU's NBD syntax from before URIs, which `qemu-img create -b` still
/// takes and writes into the header as given: `nbd:unix:PATH` and
/// `nbd:HOST:PORT:exportname=NAME` (qemu-nbd exporting under a name, so a
/// wrong export would be refused). Each overlay, made by qemu-img against
/// the running server, is read through by backfill and ends as the base.
#[test]
fn qemus_older_nbd_syntax() {
    let s = Setup::new("nbdb-legacy", 3 * MIB + 4 * KIB, 3);
    let sock = s.sock("q.sock");
    let server = s.qemu_nbd(&["-k".into(), path_str(&sock)]);
    let name = format!("nbd:unix:{}", path_str(&sock));
    s.make_overlay(&name);
    assert_eq!(info_json(&s.overlay)["backing-filename"], name.as_str());
    populate_and_check(&s);
    server.stop();

    std::fs::remove_file(&s.overlay).unwrap();
    let (server, port) = s.qemu_nbd_tcp(&["-x", "the disk"]);
    let name = format!("nbd:127.0.0.1:{port}:exportname=the disk");
    s.make_overlay(&name);
    populate_and_check(&s);
    server.stop();
}

/// nbdkit's delay filter makes every read take 2 ms, so many reads are in
/// flight at once on every connection; each must get its own bytes.
#[test]
fn many_reads_in_flight_over_a_slow_server() {
    let seed = seed_from_env("many_reads_in_flight_over_a_slow_server");
    let size = 12 * MIB;
    let s = Setup::new("nbdb-delay", size, seed);
    let (server, uri) = s.delayed_server("2ms");
    s.make_overlay(&uri);

    // Without copy-on-read (read-only): reads pass through to the server.
    let disk = open(&s.overlay, options(2, false, true));
    let mut rng = Rng::new(seed);
    let ranges: Vec<(u64, u64)> = (0..200)
        .map(|_| {
            let len = rng.range(1, 300 * KIB);
            (rng.below(size - len), len)
        })
        .collect();
    for (got, &(off, len)) in read_all_at_once(&disk, &ranges).iter().zip(&ranges) {
        assert_same_bytes(
            got,
            &s.data[off as usize..(off + len) as usize],
            "pass-through",
        );
    }
    assert_eq!(disk.stats().cor_fills, 0);
    disk.close().unwrap();

    let disk = s.open(true);
    // One cold, cluster-aligned 1 MiB read: its 16 fills travel as one
    // remote read.
    let at = 8 * MIB;
    let got = read_all_at_once(&disk, &[(at, MIB)]);
    assert_same_bytes(&got[0], &s.data[at as usize..(at + MIB) as usize], "1 MiB");
    let st = disk.stats();
    assert_eq!((st.remote_reads, st.remote_bytes), (1, MIB), "{st:?}");

    // Writes of part of a cluster the overlay lacks merge the backing's
    // bytes around them (fetched from the server); a whole-cluster write
    // fetches nothing.
    let mut expected = s.data.clone();
    let writes = [
        (3 * MIB + 1000, 5000),
        (10 * MIB + 70_000, 100),
        (5 * MIB, CLUSTER),
        (size - 700, 700),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let bytes = random_bytes(len as usize, seed ^ i as u64);
        disk.write_at(&bytes, off).expect("write");
        expected[off as usize..(off + len) as usize].copy_from_slice(&bytes);
    }

    // Hundreds of small reads and some large ones, all in flight at once,
    // overlapping each other and the range read already.
    let mut ranges: Vec<(u64, u64)> = (0..400)
        .map(|_| {
            let off = rng.below(size - 4 * KIB) & !511;
            (off, 4 * KIB)
        })
        .collect();
    ranges.extend((0..6).map(|_| (rng.below(size - MIB), MIB)));
    for (got, &(off, len)) in read_all_at_once(&disk, &ranges).iter().zip(&ranges) {
        assert_same_bytes(
            got,
            &expected[off as usize..(off + len) as usize],
            "cold read",
        );
    }
    read_everything(&disk, &expected);
    let st = disk.stats();
    assert_eq!(st.remote_errors, 0, "{st:?}");
    assert!(st.remote_bytes <= size, "fetched something twice: {st:?}");
    disk.close().unwrap();
    s.check_populated_as(Some(&expected));
    server.stop();
}

/// A server that refuses reads not aligned to 4 KiB or larger than 64 KiB
/// (nbdkit's blocksize-policy filter, which answers EINVAL): unaligned
/// pass-through reads are widened, large reads split, and everything reads
/// right.
#[test]
fn reads_respect_the_servers_block_sizes() {
    let seed = seed_from_env("reads_respect_the_servers_block_sizes");
    let size = 3 * MIB + 12 * KIB;
    let s = Setup::new("nbdb-blocks", size, seed);
    let sock = s.sock("b.sock");
    let server = s.nbdkit(
        &sock,
        &["blocksize-policy"],
        &[
            "blocksize-minimum=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    s.make_overlay(&unix_uri(&sock));
    let disk = open(&s.overlay, options(2, false, true));
    let mut rng = Rng::new(seed);
    let mut ranges: Vec<(u64, u64)> = (0..100)
        .map(|_| {
            let len = rng.range(1, 200 * KIB);
            (rng.below(size - len), len)
        })
        .collect();
    ranges.push((size - 5, 5));
    for (got, &(off, len)) in read_all_at_once(&disk, &ranges).iter().zip(&ranges) {
        assert_same_bytes(
            got,
            &s.data[off as usize..(off + len) as usize],
            "pass-through",
        );
    }
    let st = disk.stats();
    assert_eq!(st.remote_errors, 0, "{st:?}");
    disk.close().unwrap();
    populate_and_check(&s);
    server.stop();
}

/// nbdkit's error filter fails every request while its error file exists:
/// the reads that need the backing fail with EIO, reads of what the overlay
/// holds go on, and once the file is gone the same reads succeed.
#[test]
fn backing_errors_fail_only_the_reads_that_need_the_backing() {
    let size = 4 * MIB;
    let s = Setup::new("nbdb-error", size, 3);
    let sock = s.sock("e.sock");
    let trigger = s.path("errors-on");
    let server = s.nbdkit(
        &sock,
        &["error"],
        &[
            "error=EIO",
            "error-rate=100%",
            &format!("error-file={}", trigger.display()),
        ],
    );
    s.make_overlay(&unix_uri(&sock));
    let disk = s.open(true);
    let half = size / 2;
    let first = read_all_at_once(&disk, &[(0, half)]);
    assert_same_bytes(&first[0], &s.data[..half as usize], "first half");
    disk.flush().unwrap();

    write_file(&trigger, b"");
    let before = disk.stats();
    let probes = [
        (half, 4 * KIB),
        (half + 300 * KIB, 200 * KIB),
        (size - 1, 1),
    ];
    for &(off, len) in &probes {
        let e = disk
            .submit_read(off, vec![0u8; len as usize])
            .wait()
            .expect_err("a read of the backing while it fails");
        assert_eq!(e.kind(), ErrorKind::BackingUnavailable, "{e}");
        assert_eq!(e.to_errno(), libc::EIO, "{e}");
        assert!(
            e.to_string().contains(&unix_uri(&sock)),
            "the error names the backing: {e}"
        );
        // What the overlay holds is still there.
        let ok = read_all_at_once(&disk, &[(off % half, len)]);
        assert_same_bytes(
            &ok[0],
            &s.data[(off % half) as usize..(off % half + len) as usize],
            "overlay data while the backing fails",
        );
    }
    let during: Stats = disk.stats();
    assert!(during.remote_errors >= probes.len() as u64, "{during:?}");
    let why = disk
        .last_remote_error()
        .expect("the latest failed remote read");
    assert!(
        why.to_string().contains(&unix_uri(&sock)),
        "the latest remote error names the backing: {why}"
    );
    assert_eq!(during.cor_fills, before.cor_fills, "{during:?}");

    std::fs::remove_file(&trigger).unwrap();
    for &(off, len) in &probes {
        let got = read_all_at_once(&disk, &[(off, len)]);
        assert_same_bytes(
            &got[0],
            &s.data[off as usize..(off + len) as usize],
            "after the errors stopped",
        );
    }
    read_everything(&disk, &s.data);
    disk.close().unwrap();
    s.check_populated();
    server.stop();
}

/// The server goes away and comes back on the same socket: reads after that
/// succeed, and so do reads that were in flight when it was killed.
#[test]
fn reads_continue_after_the_server_restarts() {
    let size = 4 * MIB;
    let s = Setup::new("nbdb-restart", size, 4);
    let sock = s.sock("r.sock");
    let listen = ["-k".to_string(), path_str(&sock)];
    let server = s.qemu_nbd(&listen);
    s.make_overlay(&unix_uri(&sock));
    let disk = s.open(true);
    let q = size / 4;
    let got = read_all_at_once(&disk, &[(0, q)]);
    assert_same_bytes(&got[0], &s.data[..q as usize], "before the restart");

    // A clean stop (qemu-nbd ends its connections and removes the socket),
    // then a new server on the same socket.
    server.stop();
    let server = s.qemu_nbd(&listen);
    let got = read_all_at_once(&disk, &[(q, q)]);
    assert_same_bytes(
        &got[0],
        &s.data[q as usize..2 * q as usize],
        "after the restart",
    );

    // A server that sits on every read; the reads are in flight (or still
    // queued) when it is killed, and must complete on the next server.
    server.stop();
    let slow = s.nbdkit(&sock, &["delay"], &["rdelay=60"]);
    let ranges: Vec<(u64, u64)> = (0..8).map(|i| (2 * q + i * 128 * KIB, 128 * KIB)).collect();
    let pending: Vec<_> = ranges
        .iter()
        .map(|&(off, len)| disk.submit_read(off, vec![0u8; len as usize]))
        .collect();
    slow.stop_with(libc::SIGKILL);
    let server = s.nbdkit(&sock, &[], &[]);
    for (c, &(off, len)) in pending.into_iter().zip(&ranges) {
        let got = c.wait().unwrap_or_else(|e| panic!("read at {off}: {e}"));
        assert_same_bytes(&got, &s.data[off as usize..(off + len) as usize], "retried");
    }
    read_everything(&disk, &s.data);
    assert_eq!(disk.stats().remote_errors, 0);
    disk.close().unwrap();
    s.check_populated();
    // nbdkit waits for its clients to leave before it exits on SIGTERM
    // (qemu-img's connections of check_populated are gone by now).
    server.stop();
}

/// An overlay made by qemu-img over `nbd+unix:///?socket=S`: `backfill
/// info` names the URI, `backfill create -b URI -F raw` makes the same kind
/// of overlay, `backfill serve` of it serves the base image to nbdcopy, a
/// confined serve refuses it, and a qcow2-over-NBD backing is refused.
#[test]
fn qemu_img_overlay_over_nbd_through_the_cli() {
    let size = 3 * MIB + 4 * KIB;
    let s = Setup::new("nbdb-cli", size, 5);
    let (server, _, uri) = s.qemu_nbd_overlay("c.sock");
    let backfill = env!("CARGO_BIN_EXE_backfill");

    let info = run_ok(backfill, ["info".as_ref(), s.overlay.as_os_str()]);
    assert!(
        info.contains(&format!("backing file: {uri}\n")),
        "backfill info:\n{info}"
    );

    // backfill create takes the size from the server.
    let made = s.path("made.qcow2");
    run_ok(
        backfill,
        ["create", "-b", &uri, "-F", "raw", &path_str(&made)],
    );
    assert_eq!(virtual_size(&made), size);
    let json = qemu_img(["info", "--output=json", &path_str(&made)]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["backing-filename"], uri.as_str(), "{json}");
    assert_eq!(v["backing-filename-format"], "raw", "{json}");
    let out = run_status(
        backfill,
        [
            "create",
            "-b",
            &uri,
            "-F",
            "qcow2",
            &path_str(&s.path("q.qcow2")),
        ],
    );
    // The export is raw: read as qcow2, it has no qcow2 header.
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a qcow2 image"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A confined serve must not reach the network.
    let out = run_status(
        backfill,
        [
            "serve".as_ref(),
            "--backing-dir".as_ref(),
            s.dir.path().as_os_str(),
            "--socket".as_ref(),
            s.sock("no.sock").as_os_str(),
            s.overlay.as_os_str(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a confined serve started: {err}");
    assert!(err.contains("may not reach the network"), "{err}");

    // Served over NBD, read by nbdcopy: the base image's bytes.
    let served = nbd_common::Server::start(s.dir.path(), &s.overlay, &[]);
    let copy = s.path("copy.raw");
    run_ok("nbdcopy", [served.uri.as_str(), &path_str(&copy)]);
    served.stop();
    assert_same_bytes(&read_file(&copy), &s.data, "nbdcopy of backfill serve");
    s.check_populated();

    // A raw export named as qcow2 is a clear error (qcow2 exports are
    // read: tests/remote_qcow2.rs).
    let q = s.path("q2.qcow2");
    qemu_create_qcow2_unopened(&q, &uri, "qcow2", "1M");
    let e = Disk::open(&q, options(1, true, false))
        .err()
        .expect("a raw export read as qcow2");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("not a qcow2 image"), "{e}");
    server.stop();
}

/// With its server down, `backfill info` still describes the overlay (as
/// `qemu-img info` does): it exits 0, names the backing URI and format the
/// header records, says why the chain is unavailable, and counts what the
/// overlay holds as `qemu-img map` counted it while the server was up; the
/// rest is "elsewhere", and the stream progress a lower bound.
#[test]
fn info_describes_the_overlay_while_its_server_is_down() {
    let size = 3 * MIB + 4 * KIB;
    let s = Setup::new("nbdb-info", size, 9);
    let (server, sock, uri) = s.qemu_nbd_overlay("i.sock");
    // Copy-on-read of the first 1.5 MiB: data, and the base's zero
    // stretch at 1 MiB as zero clusters.
    let disk = s.open(true);
    let got = read_all_at_once(&disk, &[(0, 3 * MIB / 2)]);
    assert_same_bytes(&got[0], &s.data[..(3 * MIB / 2) as usize], "read");
    disk.close().unwrap();

    // The oracle, while the server is up.
    let (mut data, mut zero) = (0, 0);
    for e in qemu_map(&s.overlay) {
        if e.depth == 0 && e.data {
            data += e.length;
        } else if e.depth == 0 && e.zero {
            zero += e.length;
        }
    }
    assert!(data > 0 && zero > 0, "data {data}, zero {zero}");
    let backfill = env!("CARGO_BIN_EXE_backfill");
    let up = run_ok(backfill, ["info", "--json", &path_str(&s.overlay)]);
    let up: serde_json::Value = serde_json::from_str(&up).unwrap();
    assert!(up.get("backing_error").is_none(), "{up}");
    assert_eq!(up["overlay_data_bytes"], data, "{up}");
    server.stop();

    let out = run_status(backfill, ["info", &path_str(&s.overlay)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        format!("backing file: {uri}\n"),
        "backing file format: raw\n".to_string(),
        format!(" ({size} bytes)\ndisk size: "),
        "Backing chain: unavailable: ".to_string(),
        "elsewhere:".to_string(),
        "Streaming: at least ".to_string(),
    ] {
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
    assert!(
        text.contains(&path_str(&sock)),
        "the error names the socket:\n{text}"
    );

    let down = run_ok(backfill, ["info", "--json", &path_str(&s.overlay)]);
    let down: serde_json::Value = serde_json::from_str(&down).unwrap();
    assert_eq!(down["backing_file"], uri.as_str(), "{down}");
    assert_eq!(down["backing_format"], "raw", "{down}");
    assert_eq!(
        down["backing_chain"].as_array().map(Vec::len),
        Some(0),
        "{down}"
    );
    let why = down["backing_error"].as_str().expect("backing_error");
    assert!(why.contains(&uri), "{why}");
    assert_eq!(down["overlay_data_bytes"], data, "{down}");
    assert_eq!(down["overlay_zero_bytes"], zero, "{down}");
    assert_eq!(down["backing_bytes"], size - data - zero, "{down}");
    assert_eq!(down["unallocated_bytes"], 0, "{down}");
}

/// Sequential reads over a slow server read ahead: the engine populates
/// the clusters ahead of the reader (across both cores' stripes, 2 MiB with
/// 4 KiB clusters), the reader finds most of them filled or in flight
/// (some answered from the fills' kept buffers), no byte is fetched twice,
/// writes to clusters filled ahead of the reader are what it reads, and
/// the overlay ends as the base with those writes. Random reads never read
/// ahead, and `readahead_max_bytes: 0` turns it off.
#[test]
fn sequential_reads_read_ahead_and_random_reads_do_not() {
    let size = 24 * MIB;
    let s = Setup::new("nbdb-ra", size, 21);
    let (server, uri) = s.delayed_server("1ms");
    let make = |name: &str| s.overlay_over(name, &uri, 4 * KIB);

    // 1 MiB reads in order, two in flight, over the whole disk; halfway,
    // writes land in clusters readahead filled (and keeps in memory) ahead
    // of the reader, and a 4 KiB read of the middle of one (which keeps
    // it) comes before the write: the reader must see the writes.
    let seq = make("seq.qcow2");
    let disk = open(&seq, options(2, true, false));
    let ranges: Vec<(u64, u64)> = (0..size).step_by(MIB as usize).map(|o| (o, MIB)).collect();
    let mut want = s.data.clone();
    let seq_read = |pairs: &[(u64, u64)], want: &[u8]| {
        for pair in pairs.chunks(2) {
            for (got, &(off, len)) in read_all_at_once(&disk, pair).iter().zip(pair) {
                let w = &want[off as usize..(off + len) as usize];
                assert_same_bytes(got, w, &format!("sequential read at {off}"));
            }
        }
    };
    seq_read(&ranges[..12], &want);
    let mid = 12 * MIB + 64 * KIB + 2048;
    assert_same_bytes(
        &read_all_at_once(&disk, &[(mid, 1024)])[0],
        &want[mid as usize..mid as usize + 1024],
        "a 4 KiB read ahead of the reader",
    );
    for (off, len, byte) in [
        (mid - 512, 4 * KIB, 0xa1u8),
        (13 * MIB + 4 * KIB, 8 * KIB, 0xb2),
    ] {
        disk.write_at(&vec![byte; len as usize], off).unwrap();
        want[off as usize..(off + len) as usize].fill(byte);
    }
    disk.write_zeroes(14 * MIB, 4 * KIB).unwrap();
    want[14 * MIB as usize..(14 * MIB + 4 * KIB) as usize].fill(0);
    seq_read(&ranges[12..], &want);
    disk.flush().unwrap();
    let st = disk.stats();
    let clusters = size / (4 * KIB);
    assert!(st.readahead_bytes > 0, "no readahead: {st:?}");
    assert!(
        st.readahead_hits > 0,
        "no read was answered from a kept readahead buffer: {st:?}"
    );
    assert!(st.remote_bytes <= size, "fetched something twice: {st:?}");
    assert!(st.bytes_fetched <= size, "fetched something twice: {st:?}");
    assert!(
        st.overlay_hits + st.dedup_hits >= clusters / 2,
        "the reader did not find the readahead's clusters: {st:?}"
    );
    disk.close().unwrap();
    s.check_reads_as(&seq, &want);
    for e in qemu_map(&seq) {
        assert_eq!(e.depth, 0, "not in the overlay: {e:?}");
    }

    // Random 4 KiB reads: no readahead, and only what they need fetched.
    let rand = make("rand.qcow2");
    let disk = open(&rand, options(2, true, false));
    let mut rng = Rng::new(21);
    let reads: Vec<(u64, u64)> = (0..300)
        .map(|_| (rng.below(size / (4 * KIB)) * 4 * KIB, 4 * KIB))
        .collect();
    for (got, &(off, len)) in read_all_at_once(&disk, &reads).iter().zip(&reads) {
        let want = &s.data[off as usize..(off + len) as usize];
        assert_same_bytes(got, want, &format!("random read at {off}"));
    }
    let st = disk.stats();
    assert_eq!(st.readahead_bytes, 0, "{st:?}");
    assert!(st.remote_bytes <= 300 * 4 * KIB, "{st:?}");
    disk.close().unwrap();
    check_clean(&rand);

    // Off: sequential reads fetch only what they read.
    let off = make("off.qcow2");
    let mut opts = options(2, true, false);
    opts.readahead_max_bytes = 0;
    let disk = open(&off, opts);
    for chunk in ranges[..8].chunks(2) {
        read_all_at_once(&disk, chunk);
    }
    let st = disk.stats();
    assert_eq!(st.readahead_bytes, 0, "{st:?}");
    assert_eq!(st.remote_bytes, 8 * MIB, "{st:?}");
    disk.close().unwrap();
    server.stop();
}

/// Random reads over a slow server hold their write-backs until a batch is
/// ready (so that they merge into one large write): writes into the
/// clusters of held fills and a flush in the middle of them get through,
/// every read returns the base image's bytes, and the overlay ends as the
/// base with the writes (`qemu-img check` and `compare`).
#[test]
fn held_write_backs_give_way_to_writes_and_flushes() {
    let size = 8 * MIB;
    let s = Setup::new("nbdb-held", size, 23);
    let (server, uri) = s.delayed_server("2ms");
    let image = s.overlay_over("held.qcow2", &uri, 64 * KIB);
    let disk = open(&image, options(2, true, false));
    let mut want = s.data.clone();
    let mut rng = Rng::new(23);
    let cs = 64 * KIB;
    for round in 0..4u8 {
        let reads: Vec<(u64, u64)> = (0..64)
            .map(|_| (rng.below(size / (4 * KIB)) * 4 * KIB, 4 * KIB))
            .collect();
        let pending: Vec<_> = reads
            .iter()
            .map(|&(off, len)| disk.submit_read(off, vec![0u8; len as usize]))
            .collect();
        // Into every eighth read's cluster, half a cluster away from it.
        let writes: Vec<(u64, u64)> = reads
            .iter()
            .step_by(8)
            .map(|&(off, _)| (off - off % cs + (off % cs + cs / 2) % cs, 4 * KIB))
            .filter(|&(w, _)| reads.iter().all(|&(r, _)| r != w))
            .collect();
        let written: Vec<_> = writes
            .iter()
            .map(|&(off, len)| disk.submit_write(off, vec![0xc0 | round; len as usize]))
            .collect();
        disk.flush().unwrap();
        for (c, &(off, len)) in pending.into_iter().zip(&reads) {
            let got = c.wait().unwrap();
            let w = &s.data[off as usize..(off + len) as usize];
            assert_same_bytes(&got, w, &format!("round {round}: read at {off}"));
        }
        for (c, &(off, len)) in written.into_iter().zip(&writes) {
            c.wait().unwrap();
            want[off as usize..(off + len) as usize].fill(0xc0 | round);
        }
    }
    disk.close().unwrap();
    s.check_reads_as(&image, &want);
    server.stop();
}

/// A burst of cold random reads over a slow server holds its write-backs in
/// memory while more remote reads are in flight: never more than the budget
/// (`Options::writeback_hold_bytes`, one core here), and more than one
/// merged write's worth when the budget allows. Once the burst is over they
/// are all written: every read returned the base's bytes, the overlay holds
/// every cluster read (`qemu-img map`) and reads as the base (`qemu-img
/// check` and `compare`). Budgets of 0 (the minimum: 1 MiB per core, sent
/// as soon as it is ready), 4 MiB, and the default.
#[test]
fn write_backs_held_during_a_burst_stay_within_the_budget() {
    let size = 32 * MIB;
    let s = Setup::new("nbdb-budget", size, 29);
    let (server, uri) = s.delayed_server("2ms");
    let mut rng = Rng::new(29);
    // 200 distinct clusters outside the base's zero stretch, 4 KiB of each.
    let mut clusters: Vec<u64> = (0..size / CLUSTER)
        .filter(|c| !(MIB / CLUSTER..MIB / CLUSTER + 4).contains(c))
        .collect();
    for i in (1..clusters.len()).rev() {
        clusters.swap(i, rng.below(i as u64 + 1) as usize);
    }
    clusters.truncate(200);
    let reads: Vec<(u64, u64)> = clusters
        .iter()
        .map(|&c| (c * CLUSTER + rng.below(16) * 4 * KIB, 4 * KIB))
        .collect();
    let default = Options::default().writeback_hold_bytes as u64;
    for (name, budget, most) in [
        ("min", Some(0), MIB),
        ("4m", Some(4 * MIB), 4 * MIB),
        ("default", None, default),
    ] {
        let image = s.overlay_over(&format!("{name}.qcow2"), &uri, CLUSTER);
        let mut opts = options(1, true, false);
        if let Some(b) = budget {
            opts.writeback_hold_bytes = b as usize;
        }
        let disk = open(&image, opts);
        for (got, &(off, len)) in read_all_at_once(&disk, &reads).iter().zip(&reads) {
            let want = &s.data[off as usize..(off + len) as usize];
            assert_same_bytes(got, want, &format!("{name}: read at {off}"));
        }
        disk.flush().unwrap();
        let st = disk.stats();
        let peak = st.writebacks_held_peak_bytes;
        assert!(
            peak <= most,
            "{name}: held {peak} bytes, budget {most}: {st:?}"
        );
        if most > MIB {
            assert!(peak > MIB, "{name}: held no more than a batch: {st:?}");
        }
        assert_eq!(
            st.writebacks_held_bytes, 0,
            "{name}: held after a flush: {st:?}"
        );
        assert_eq!(st.cor_fills, 200, "{name}: {st:?}");
        disk.close().unwrap();
        let map = qemu_map(&image);
        for &c in &clusters {
            let e = map_at(&map, c * CLUSTER);
            assert!(
                e.depth == 0 && e.data,
                "{name}: cluster {c} not in the overlay: {e:?}"
            );
        }
        s.check_reads_as(&image, &s.data);
    }

    // The same through `backfill bench --writeback-hold`, which reports the
    // most it held; a size it cannot parse is refused.
    let image = s.overlay_over("cli.qcow2", &uri, CLUSTER);
    let backfill = env!("CARGO_BIN_EXE_backfill");
    let bench = |hold: &str| {
        run_status(
            backfill,
            [
                "bench",
                "--copy-on-read",
                "--pattern",
                "rand",
                "-c",
                "200",
                "-d",
                "32",
                "-s",
                "4k",
                "--cores",
                "1",
                "--writeback-hold",
                hold,
                &path_str(&image),
            ],
        )
    };
    let out = bench("2M");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peak: u64 = text
        .split("write-backs held while remote reads continued: at most ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no held write-backs reported:\n{text}"));
    assert!(peak > MIB && peak <= 2 * MIB, "{peak}:\n{text}");
    check_clean(&image);
    let out = bench("lots");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lots"), "{err}");
    server.stop();
}

/// Held write-backs take their clusters only when they go out, so a crash
/// while they are held leaks none of them. nbdkit's eval plugin serves the
/// base and holds its reply to one read (a gate: a FIFO the test writes to);
/// with that read in flight, 100 cold reads of other clusters complete and
/// their write-backs wait. A copy of the overlay file then (what a crash
/// would leave) has no leaked cluster (`qemu-img check`); once the gate
/// opens everything is written, and the overlay reads as the base.
#[test]
fn held_write_backs_leave_no_cluster_to_leak_in_a_crash() {
    let size = 16 * MIB;
    let s = Setup::new("nbdb-crash", size, 37);
    let gated = 3 * MIB;
    let sock = s.sock("eval.sock");
    let (server, gate) = nbd_peer::gated_nbdkit(s.dir.path(), &sock, &s.base, size, gated);
    let image = s.overlay_over("crash.qcow2", &unix_uri(&sock), CLUSTER);
    let disk = open(&image, options(1, true, false));
    // Dropped before the disk, whose close would wait for the gated read.
    let gate = gate;

    let stuck = disk.submit_read(gated, vec![0u8; 4096]);
    // Every other cluster of the first 13 MiB but the gated one's neighbours.
    let reads: Vec<(u64, u64)> = (0..size / CLUSTER)
        .map(|c| c * CLUSTER)
        .filter(|&o| o < 13 * MIB && o.abs_diff(gated) > CLUSTER && (o / CLUSTER).is_multiple_of(2))
        .filter(|o| !(MIB..MIB + 4 * CLUSTER).contains(o))
        .take(100)
        .map(|o| (o, 4 * KIB))
        .collect();
    assert_eq!(reads.len(), 100);
    for (got, &(off, len)) in read_all_at_once(&disk, &reads).iter().zip(&reads) {
        let want = &s.data[off as usize..(off + len) as usize];
        assert_same_bytes(got, want, &format!("read at {off}"));
    }
    // The core handles this after the turn that answered the last read.
    disk.block_status(15 * MIB, CLUSTER).unwrap();
    let st = disk.stats();
    assert_eq!(st.writebacks_held_bytes, 100 * CLUSTER, "{st:?}");

    let crashed = s.path("crashed.qcow2");
    std::fs::copy(&image, &crashed).unwrap();
    let leaks = check_no_corruption(&crashed);
    gate.open();
    assert_eq!(leaks, 0, "clusters leaked by held write-backs");
    let got = stuck.wait().unwrap();
    assert_same_bytes(&got, &s.data[gated as usize..][..4096], "the gated read");
    disk.flush().unwrap();
    let st = disk.stats();
    assert_eq!(st.writebacks_held_bytes, 0, "{st:?}");
    assert_eq!(st.cor_fills, 101, "{st:?}");
    disk.close().unwrap();
    s.check_reads_as(&image, &s.data);
    server.stop();
}

/// Readahead keeps its fills' buffers to answer the sequential reader from
/// memory; nothing may make such a buffer outlive a change of its cluster.
/// A reader goes through the disk in order (two reads in flight) while
/// writes, write-zeroes and discards land at random up to 4 MiB ahead of it
/// (in clusters readahead filled, is filling, or has not reached), some
/// mid-cluster, and some reads stop short of a cluster's end (which keeps
/// its buffer): every read returns the base image with the changes so far,
/// and the overlay ends as exactly that (`qemu-img check` and `compare`).
/// With 4 KiB and with 64 KiB clusters; with copy-on-read, and without
/// it (readahead then keeps what it fetched in memory only, and the
/// changes are the overlay's only data).
#[test]
fn kept_readahead_buffers_follow_every_change() {
    for (cluster, read, cor) in [
        (4 * KIB, 64 * KIB, true),
        (64 * KIB, 24 * KIB, true),
        (64 * KIB, 24 * KIB, false),
    ] {
        let size = 12 * MIB;
        let s = Setup::new(&format!("nbdb-kept{}k{cor}", cluster / KIB), size, 31);
        let (server, uri) = s.delayed_server("1ms");
        let image = s.overlay_over("kept.qcow2", &uri, cluster);
        let disk = open(&image, options(2, cor, false));
        let mut want = s.data.clone();
        let mut rng = Rng::new(31 + cluster);
        let mut pos = 0;
        let mut changes = 0;
        while pos < size {
            let pair: Vec<(u64, u64)> = [pos, pos + read]
                .into_iter()
                .filter(|&o| o < size)
                .map(|o| (o, read.min(size - o)))
                .collect();
            for (got, &(off, len)) in read_all_at_once(&disk, &pair).iter().zip(&pair) {
                let w = &want[off as usize..(off + len) as usize];
                assert_same_bytes(got, w, &format!("{cluster}-byte clusters: read at {off}"));
            }
            pos += 2 * read;
            if pos >= size || !rng.percent(40) {
                continue;
            }
            let off = (pos + rng.below(4 * MIB)).min(size - 1);
            let len = rng.range(1, 2 * cluster).min(size - off);
            let (lo, hi) = (off as usize, (off + len) as usize);
            match rng.below(3) {
                0 => {
                    let mut b = vec![0u8; len as usize];
                    rng.fill(&mut b);
                    disk.write_at(&b, off).unwrap();
                    want[lo..hi].copy_from_slice(&b);
                }
                1 => {
                    disk.write_zeroes(off, len).unwrap();
                    want[lo..hi].fill(0);
                }
                _ => {
                    disk.discard(off, len).unwrap();
                    want[lo..hi].fill(0);
                }
            }
            changes += 1;
        }
        let st = disk.stats();
        assert!(changes > 20, "{changes} changes");
        assert!(st.readahead_hits > 0, "no read from a kept buffer: {st:?}");
        disk.close().unwrap();
        s.check_reads_as(&image, &want);
        if !cor {
            assert_eq!(st.cor_fills, 0, "{st:?}");
        }
        server.stop();
    }
}

/// A read-only disk (and one opened without copy-on-read) reads ahead of a
/// sequential reader too, into memory: 4 KiB reads in order, one at a
/// time, are answered from what readahead fetched, each byte is fetched
/// once, the image file is not changed by a byte, and random reads still
/// fetch only what they read.
#[test]
fn read_only_disks_read_ahead_into_memory() {
    let size = 8 * MIB;
    let s = Setup::new("nbdb-ro-ra", size, 41);
    let (server, uri) = s.delayed_server("1ms");
    let image = s.overlay_over("ro.qcow2", &uri, 64 * KIB);
    let before = read_file(&image);
    let disk = open(&image, options(2, true, true));
    let mut buf = vec![0u8; 4096];
    for off in (0..size).step_by(4096) {
        disk.read_at(&mut buf, off).unwrap();
        let want = &s.data[off as usize..off as usize + 4096];
        assert_same_bytes(&buf, want, &format!("read at {off}"));
    }
    let st = disk.stats();
    let reads = size / 4096;
    assert!(st.readahead_bytes > 0, "no readahead: {st:?}");
    assert!(
        st.readahead_hits > reads * 9 / 10,
        "reads not answered from readahead: {st:?}"
    );
    // The reads before the stream was seen fetched their own 4 KiB; the
    // readahead fetches their cluster whole once more.
    assert!(
        st.remote_bytes <= size + 3 * 4096,
        "fetched something twice: {st:?}"
    );
    assert!(st.remote_reads < reads / 10, "{st:?}");
    assert_eq!(st.cor_fills, 0, "{st:?}");

    let mut rng = Rng::new(41);
    let before_random = st.remote_bytes;
    for _ in 0..100 {
        let off = rng.below(size / 4096) * 4096;
        disk.read_at(&mut buf, off).unwrap();
        assert_same_bytes(&buf, &s.data[off as usize..off as usize + 4096], "random");
    }
    let st2 = disk.stats();
    assert_eq!(st2.readahead_bytes, st.readahead_bytes, "{st2:?}");
    assert!(st2.remote_bytes - before_random <= 100 * 4096, "{st2:?}");
    disk.close().unwrap();
    assert!(
        read_file(&image) == before,
        "a read-only open changed the image"
    );
    server.stop();
}
