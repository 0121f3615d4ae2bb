//! qcow2 backing images on remote media (issue 5): the images people keep
//! "somewhere slow" are often qcow2 files (cloud images, compressed) on an
//! HTTP server, or a qcow2 file exported as is by an NBD server. QEMU reads
//! them through its qcow2 driver over curl or NBD
//! (`qemu-img create -b URL -F qcow2`); backfill reads their metadata once
//! at open and fetches data clusters, compressed or not, as remote reads.
//!
//! Oracles: `qemu-img compare` of the overlay with the raw image the qcow2
//! file was converted from (QEMU reading the same chain through its own
//! curl and NBD drivers), a byte comparison of what backfill reads with
//! that raw image, `qemu-img info` (standalone after a stream), `qemu-img
//! check`, and `qemu-img map` (what copy-on-read put in the overlay).
//!
//! * `compressed_cloud_image_over_http`: a zlib-compressed qcow2 image
//!   under nginx, named by a URL that redirects to it; `backfill create`
//!   sizes the overlay from its header;
//!   copy-on-read through the engine, `backfill convert` and `backfill
//!   stream` give its bytes, and the stream ends standalone; a disk larger
//!   than the image reads as zeros past the image's end.
//! * `qcow2_export_over_nbd`: a zstd-compressed qcow2 image with extended L2
//!   entries and 128 KiB clusters, exported by nbdkit: the same; and a
//!   stream fetches each compressed cluster once though it spans two of
//!   the overlay's clusters (nbdkit's log filter: no more bytes read than
//!   the file has); `backfill serve` over it gives qemu-img the same bytes.
//! * `hostile_remote_qcow2_images_fail_clearly`: a remote qcow2 image naming
//!   a backing file of its own, one whose L1 table names an L2 table past
//!   its end, and a raw image given as qcow2: `info` and `stream` fail
//!   with an error saying which, and the overlay is untouched.
//! * `replaced_remote_qcow2_image_is_refused`: the overlay pins the
//!   image's version at its first copy-on-read; once the file under nginx
//!   is replaced, a stream fails saying the remote image changed.
//! * `read_only_serve_reads_ahead`: `backfill serve --read-only` over the
//!   image under nginx, read by nbdcopy 4 KiB at a time with one request
//!   in flight: the image's bytes with far fewer range requests than reads
//!   (nginx's access log), and the overlay file unchanged.
//! * `a_compressed_cluster_read_in_pieces_is_fetched_once`: 128 KiB
//!   compressed clusters under 64 KiB overlay clusters, their halves read
//!   at different times with copy-on-read, and 4 KiB at a time on a
//!   read-only disk without readahead: each fetched once (nbdkit's log).
//!
//! Synchronisation by observation only (servers are ready once they wrote
//! their pid file or accept connections); nothing is asserted about time.

mod common;
#[path = "common/nbd.rs"]
mod nbd_common;
#[path = "common/nbd_peer.rs"]
mod nbd_peer;
#[path = "common/nginx.rs"]
mod nginx_common;

use common::*;
use nbd_peer::{logged_reads, socket_path, unix_uri};
use std::path::{Path, PathBuf};

/// Size of the base image: not a multiple of any cluster size.
const SIZE: u64 = 8 * MIB + 4 * KIB;

/// A raw image of 64 KiB pieces, in turn random (incompressible: QEMU
/// stores them as plain clusters), zeros (unallocated in the converted
/// image) and text (compressible: compressed clusters).
fn write_base(path: &Path, seed: u64) -> Vec<u8> {
    let mut data = random_bytes(SIZE as usize, seed);
    for (i, piece) in data.chunks_mut(64 * KIB as usize).enumerate() {
        match i % 3 {
            0 => {}
            1 => piece.fill(0),
            _ => {
                let text = format!("piece {i} of a compressible image; ").repeat(4096);
                piece.copy_from_slice(&text.as_bytes()[..piece.len()]);
            }
        }
    }
    write_file(path, &data);
    data
}

/// A directory with `base.raw` ([`write_base`]) and `www/base.qcow2`
/// converted from it by `qemu-img convert -c -O qcow2 -o OPTS`.
struct Images {
    dir: tempfile::TempDir,
    raw: PathBuf,
    qcow2: PathBuf,
    data: Vec<u8>,
}

impl Images {
    fn new(prefix: &str, opts: &str) -> Images {
        let dir = tempdir(prefix);
        let raw = dir.path().join("base.raw");
        let data = write_base(&raw, seed_from_env(prefix));
        let www = dir.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        let qcow2 = www.join("base.qcow2");
        qemu_convert_compressed(&raw, &qcow2, opts);
        Images {
            dir,
            raw,
            qcow2,
            data,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn overlay(&self) -> PathBuf {
        self.path("overlay.qcow2")
    }

    /// nginx serving `www/`; `/current/image.img` redirects to
    /// `/base.qcow2`, as a cloud image's "current" link does.
    fn nginx(&self) -> nginx_common::Nginx {
        let redirect = "location = /current/image.img { return 302 /base.qcow2; }";
        nginx_common::Nginx::start(&self.path("nginx"), &self.path("www"), redirect, None)
    }
}

/// Copy-on-read through the engine reads the base's bytes and leaves them
/// in the overlay (`qemu-img map`: nothing left below it but the base's
/// zeros); `backfill convert` reads them too; `backfill stream` ends with
/// a standalone image, clean, identical to the raw base.
fn read_and_stream(img: &Images, backing: &str) {
    let overlay = img.overlay();
    let ov = path_str(&overlay);
    // QEMU reads the chain as the raw base (its curl or NBD driver).
    compare_identical(&overlay, &img.raw);
    let info = backfill_ok(&["info", &ov]);
    assert!(
        info.contains(&format!("1: {backing}, qcow2, 8 MiB")),
        "{info}"
    );

    // What a stream would fetch: the compressed clusters count as their
    // compressed bytes, so less than the bytes they hold, and never more
    // than the remote file; `backfill convert` then fetches just that.
    let json: serde_json::Value =
        serde_json::from_str(&backfill_ok(&["info", "--json", &ov])).unwrap();
    let (held, fetch) = (
        json["backing_bytes"].as_u64().unwrap(),
        json["backing_fetch_bytes"].as_u64().unwrap(),
    );
    let file_len = std::fs::metadata(&img.qcow2).unwrap().len();
    assert!(fetch > 0 && fetch < held && fetch <= file_len, "{json}");
    let to_fetch = line_starting(&info, "Streaming: ");
    assert!(to_fetch.contains(" of it to fetch)"), "{info}");

    let copy = img.path("copy.raw");
    let out = backfill_ok(&["convert", &ov, &path_str(&copy)]);
    assert_same_bytes(&read_file(&copy), &img.data, "backfill convert");
    let fetched = out.rsplit("; ").next().unwrap().trim_end();
    let fetched = fetched
        .strip_suffix(" fetched from backing.")
        .unwrap_or(fetched);
    assert!(
        to_fetch.contains(&format!(", {fetched} of it to fetch")),
        "{to_fetch} / {out}"
    );

    let disk = open(&overlay, options(2, true, false));
    assert_same_bytes(&read_all(&disk, 192 * KIB), &img.data, "copy-on-read");
    disk.close().unwrap();
    check_clean(&overlay);
    // Every cluster with data in the base is the overlay's own now.
    for e in qemu_map(&overlay).iter().filter(|e| e.data) {
        assert_eq!(e.depth, 0, "data left in the backing: {e:?}");
    }

    let out = backfill_ok(&["stream", "--cores", "2", &ov]);
    assert!(out.contains("backing file dropped"), "{out}");
    assert_standalone(&overlay);
    check_clean(&overlay);
    compare_identical(&overlay, &img.raw);
}

#[test]
fn compressed_cloud_image_over_http() {
    let img = Images::new("rq-http", "");
    let nginx = img.nginx();
    // Through a redirect, as cloud images are published.
    let url = nginx.url("current/image.img");
    let ov = path_str(&img.overlay());
    // The size comes from the remote image's header, as with qemu-img.
    backfill_ok(&["create", "-f", "qcow2", "-b", &url, "-F", "qcow2", &ov]);
    let info = info_json(&img.overlay());
    assert_eq!(info["backing-filename"], url.as_str(), "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    assert_eq!(virtual_size(&img.overlay()), SIZE);
    read_and_stream(&img, &url);

    // A disk larger than its cloud image (`qemu-img create -b URL -F qcow2
    // vm.qcow2 20G`): past the image's end it reads as zeros, for QEMU and
    // for backfill, before the stream and after.
    let big = img.path("big.qcow2");
    let big_size = (SIZE + 4 * MIB).to_string();
    backfill_ok(&[
        "create",
        "-b",
        &url,
        "-F",
        "qcow2",
        &path_str(&big),
        &big_size,
    ]);
    let mut want = img.data.clone();
    want.resize((SIZE + 4 * MIB) as usize, 0);
    compare_with_bytes(&big, &want, img.dir.path());
    let out = backfill_ok(&["stream", &path_str(&big)]);
    assert!(out.contains("backing file dropped"), "{out}");
    check_clean(&big);
    compare_with_bytes(&big, &want, img.dir.path());
}

#[test]
fn qcow2_export_over_nbd() {
    let img = Images::new(
        "rq-nbd",
        "compression_type=zstd,extended_l2=on,cluster_size=128k",
    );
    let sock = socket_path(img.dir.path(), "nbd.sock");
    let log = img.path("nbdkit.log");
    let logfile = format!("logfile={}", log.display());
    let _server = nbd_peer::nbdkit(img.dir.path(), &sock, &img.qcow2, &["log"], &[&logfile]);
    let uri = unix_uri(&sock);

    // The image's 128 KiB clusters span two of the overlay's: a stream
    // fetches each compressed cluster once all the same, so it reads no
    // more than the file (nbdkit's log filter counts what was asked).
    let once = img.path("once.qcow2");
    qemu_create_qcow2(&once, "", Some((&uri, "qcow2")), None);
    let before = logged_reads(&log).len();
    let out = backfill_ok(&["stream", &path_str(&once)]);
    assert!(out.contains("backing file dropped"), "{out}");
    compare_identical(&once, &img.raw);
    let fetched: u64 = logged_reads(&log)[before..].iter().map(|r| r.1).sum();
    let file_len = std::fs::metadata(&img.qcow2).unwrap().len();
    assert!(
        fetched <= file_len,
        "fetched {fetched} bytes of a {file_len}-byte image"
    );

    // Served to NBD clients: qemu-img reads the disk through `backfill
    // serve` over the remote image.
    let served = img.path("served.qcow2");
    qemu_create_qcow2(&served, "", Some((&uri, "qcow2")), None);
    let server = nbd_common::Server::start(img.dir.path(), &served, &[]);
    let got = read_through_nbd(&server.uri, &img.path("served.raw"));
    server.stop();
    assert_same_bytes(&got, &img.data, "qemu-img through backfill serve");
    check_clean(&served);
    qemu_create_qcow2(&img.overlay(), "", Some((&uri, "qcow2")), None);
    assert_eq!(virtual_size(&img.overlay()), SIZE);
    read_and_stream(&img, &uri);
}

/// `backfill info` says the chain is unavailable and why (`why`), and
/// `backfill stream` fails saying it, leaving the overlay as it was.
fn refused(overlay: &Path, why: &str) {
    let ov = path_str(overlay);
    let before = read_file(overlay);
    let info = backfill_ok(&["info", &ov]);
    assert!(
        line_starting(&info, "Backing chain: unavailable: ").contains(why),
        "{why}: {info}"
    );
    let out = backfill_output(&["stream", &ov]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(why), "{why}: {err}");
    assert_eq!(
        read_file(overlay),
        before,
        "a refused stream changed the overlay"
    );
}

#[test]
fn hostile_remote_qcow2_images_fail_clearly() {
    let img = Images::new("rq-hostile", "");
    let nginx = img.nginx();
    let www = img.path("www");
    let overlay = img.overlay();
    let size = SIZE.to_string();

    // A qcow2 image with a backing file of its own.
    let layered = www.join("layered.qcow2");
    qemu_create_qcow2(&layered, "", Some(("base.qcow2", "qcow2")), None);
    qemu_create_qcow2_unopened(&overlay, &nginx.url("layered.qcow2"), "qcow2", &size);
    refused(&overlay, "names a backing file of its own (\"base.qcow2\")");

    // An L1 entry naming an L2 table past the image's end.
    let bad = www.join("bad.qcow2");
    let mut bytes = read_file(&img.qcow2);
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let past = (bytes.len() as u64).next_multiple_of(64 * KIB) + 64 * KIB;
    bytes[l1..l1 + 8].copy_from_slice(&(past | 1 << 63).to_be_bytes());
    write_file(&bad, &bytes);
    qemu_create_qcow2_unopened(&overlay, &nginx.url("bad.qcow2"), "qcow2", &size);
    refused(
        &overlay,
        "(L1 entry 0) lies in the header or past the end of the image",
    );

    // A raw image given as qcow2.
    std::fs::copy(&img.raw, www.join("base.raw")).unwrap();
    qemu_create_qcow2_unopened(&overlay, &nginx.url("base.raw"), "qcow2", &size);
    refused(&overlay, "not a qcow2 image");
}

#[test]
fn replaced_remote_qcow2_image_is_refused() {
    let img = Images::new("rq-replaced", "");
    let nginx = img.nginx();
    let url = nginx.url("base.qcow2");
    qemu_create_qcow2(&img.overlay(), "", Some((&url, "qcow2")), None);
    // The first copy-on-read pins the image's version.
    let disk = open(&img.overlay(), options(1, true, false));
    let mut buf = vec![0u8; MIB as usize];
    disk.read_at(&mut buf, 0).unwrap();
    assert_same_bytes(&buf, &img.data[..MIB as usize], "copy-on-read");
    disk.close().unwrap();

    // Another qcow2 image under the same name, an hour newer (nginx's ETag
    // is the modification second and the size).
    let other = img.path("other.raw");
    write_random_file(&other, SIZE, 0x5eed);
    let old = std::fs::metadata(&img.qcow2).unwrap().modified().unwrap();
    let new = img.path("www/new.qcow2");
    convert_plain(&other, &new);
    std::fs::File::options()
        .write(true)
        .open(&new)
        .unwrap()
        .set_modified(old + std::time::Duration::from_secs(3600))
        .unwrap();
    std::fs::rename(&new, &img.qcow2).unwrap();

    let ov = path_str(&img.overlay());
    let before = read_file(&img.overlay());
    let out = backfill_output(&["stream", &ov]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("changed"), "{err}");
    // Nothing of the new image got in.
    assert_eq!(
        read_file(&img.overlay()),
        before,
        "the refused stream wrote"
    );
    check_clean(&img.overlay());
}

/// `qemu-img convert -O qcow2 RAW OUT` (no compression).
fn convert_plain(raw: &Path, out: &Path) {
    qemu_img([
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &path_str(raw),
        &path_str(out),
    ]);
}

/// `backfill serve --read-only` over a compressed image on a web server
/// reads ahead of a sequential client, into memory: nbdcopy reading 4 KiB
/// at a time with one request in flight gets the image's bytes with far
/// fewer range requests than it made (nginx's access log), and the overlay
/// file is not changed by a byte.
#[test]
fn read_only_serve_reads_ahead() {
    require_tool("nbdcopy");
    let img = Images::new("rq-ro-ra", "");
    let nginx = img.nginx();
    let overlay = img.overlay();
    qemu_create_qcow2(
        &overlay,
        "",
        Some((&nginx.url("base.qcow2"), "qcow2")),
        None,
    );
    let before = read_file(&overlay);
    let access_log = img.path("nginx").join("logs/access.log");
    let gets = || {
        std::fs::read_to_string(&access_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("GET /base.qcow2"))
            .count()
    };
    let gets_before = gets();
    let server = nbd_common::Server::start(img.dir.path(), &overlay, &["--read-only"]);
    let copy = img.path("copy.raw");
    run_ok(
        "nbdcopy",
        [
            "--request-size=4096",
            "--requests=1",
            "--connections=1",
            &server.uri,
            &path_str(&copy),
        ],
    );
    server.stop();
    assert_same_bytes(
        &read_file(&copy),
        &img.data,
        "nbdcopy through serve --read-only",
    );
    let fetches = gets() - gets_before;
    let requests = (SIZE / 4096) as usize;
    assert!(
        fetches * 8 < requests,
        "{fetches} range requests for {requests} reads of 4 KiB"
    );
    assert_eq!(
        read_file(&overlay),
        before,
        "a read-only serve changed the overlay"
    );
}

/// A compressed cluster twice the overlay's cluster size is fetched once:
/// with copy-on-read, a read of one half fills the other half's overlay
/// cluster too, from the same decompressed bytes (`qemu-img map`: every
/// data cluster in the overlay after reading the first halves only, more
/// than the core keeps decompressed), so reading the second halves later
/// fetches nothing; on a read-only disk without readahead, 4 KiB reads in
/// order fetch each cluster once (the core keeps what it decompressed).
/// nbdkit's log filter counts what was asked; the bytes come out right.
#[test]
fn a_compressed_cluster_read_in_pieces_is_fetched_once() {
    let img = Images::new("rq-pieces", "cluster_size=128k");
    let sock = socket_path(img.dir.path(), "nbd.sock");
    let log = img.path("nbdkit.log");
    let logfile = format!("logfile={}", log.display());
    let _server = nbd_peer::nbdkit(img.dir.path(), &sock, &img.qcow2, &["log"], &[&logfile]);
    let uri = unix_uri(&sock);
    let file_len = std::fs::metadata(&img.qcow2).unwrap().len();
    let fetched_since =
        |before: usize| -> u64 { logged_reads(&log)[before..].iter().map(|r| r.1).sum() };
    let read = |disk: &backfill::Disk, off: u64| {
        let mut buf = vec![0u8; 4096];
        disk.read_at(&mut buf, off).unwrap();
        let want = &img.data[off as usize..off as usize + 4096];
        assert_same_bytes(&buf, want, &format!("read at {off}"));
    };

    // Copy-on-read: the first half of each 128 KiB cluster (8 MiB of
    // decompressed clusters, twice what a core keeps), then the second.
    let overlay = img.overlay();
    qemu_create_qcow2(&overlay, "", Some((&uri, "qcow2")), None);
    let before = logged_reads(&log).len();
    let clusters = SIZE.div_ceil(128 * KIB);
    let disk = open(&overlay, options(2, true, false));
    for c in 0..clusters {
        read(&disk, (c * 128 * KIB + 4 * KIB).min(SIZE - 4096));
    }
    disk.close().unwrap();
    let fetched = fetched_since(before);
    assert!(
        fetched <= file_len,
        "copy-on-read fetched {fetched} bytes of a {file_len}-byte image"
    );
    check_clean(&overlay);
    for e in qemu_map(&overlay) {
        assert!(
            !e.data || e.depth == 0,
            "data left in the backing image: {e:?}"
        );
    }
    // (The open reads the image's tables: count from after it.)
    let disk = open(&overlay, options(2, true, false));
    let before = logged_reads(&log).len();
    for c in 0..clusters {
        let off = (c * 128 * KIB + 64 * KIB + 8 * KIB).min(SIZE - 4096);
        read(&disk, off);
    }
    disk.close().unwrap();
    assert_eq!(
        fetched_since(before),
        0,
        "the second halves were fetched again"
    );
    compare_identical(&overlay, &img.raw);

    // Read-only, no readahead: 4 KiB at a time through the first 2 MiB.
    let ro = img.path("ro.qcow2");
    qemu_create_qcow2(&ro, "", Some((&uri, "qcow2")), None);
    let before = logged_reads(&log).len();
    let mut opts = options(1, true, true);
    opts.readahead_max_bytes = 0;
    let disk = open(&ro, opts);
    for off in (0..2 * MIB).step_by(4096) {
        read(&disk, off);
    }
    disk.close().unwrap();
    // Each of the 16 clusters once is at most their 2 MiB; each 4 KiB
    // read fetching its cluster would be 512 fetches of 30 to 128 KiB.
    let fetched = fetched_since(before);
    assert!(
        fetched <= 2 * MIB,
        "4 KiB reads of 2 MiB fetched {fetched} bytes"
    );
}
