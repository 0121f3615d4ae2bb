//! Streaming over remote backing media (issue 5): overlays made by
//! `qemu-img create -f qcow2 -b URI -F raw` whose backing image is served by
//! nbdkit (plain, with its delay, error and log filters) or by nginx, streamed
//! to standalone images with `backfill stream` and through the API.
//!
//! Oracles: `qemu-img info` (the backing reference is gone, or kept),
//! `qemu-img check`, `qemu-img compare` against the raw base file,
//! `qemu-img map` (the all-zero regions of the base became zero clusters,
//! not data, though their bytes came over the network), and nbdkit's log
//! filter, which records every read the server was asked for (so that a
//! resumed stream can be shown to fetch only what the first run left).
//!
//! * `cli_stream_over_nbdkit` (also: no server is a clear error),
//!   `cli_stream_over_a_slow_nbdkit_on_four_cores` (delay filter, reads
//!   capped at 64 KiB), `cli_stream_over_qemu_nbd_tcp` (with `--rate`),
//!   `cli_stream_over_http`: a fresh overlay streams to a standalone image
//!   identical to the base, with its zero regions zero.
//! * `cli_stream_over_older_nbd_handshakes`: nbdkit `--oldstyle` (no
//!   options, no export names, no structured replies) and
//!   `--mask-handshake=0` (plain newstyle: NBD_OPT_EXPORT_NAME only): the
//!   stream ends identical; an export name is refused by the oldstyle one,
//!   saying why.
//! * `json_backing_names_over_nbd_and_http`: overlays whose header names
//!   the backing by QEMU's `json:` options (nested and dotted, nbd and
//!   http) stream like those with a URI; a TLS option is refused by name.
//! * `overlay_larger_than_its_remote_backing`: a backing whose size is no
//!   multiple of 512, below a larger overlay, over NBD and HTTP: the bytes
//!   past its end stream as zeros.
//! * `cancelled_over_nbd_then_resumed_by_the_cli`: a stream cancelled
//!   through the API after some progress keeps its work and its backing;
//!   `backfill stream` finishes it, and the server was asked for every byte
//!   exactly once over both runs.
//! * `cli_stream_killed_over_nbd_then_resumed`: SIGKILL to `backfill stream`
//!   after its first progress line, then a second run to the end.
//! * `failing_backing_stops_the_stream_clearly`: nbdkit's error filter
//!   starts failing every read midway: the stream fails with an error that
//!   names the backing, the disk keeps serving what it holds, the overlay
//!   has no corruption, and a later stream over the healthy server ends
//!   identical.
//! * `backing_server_killed_midway`: nbdkit is killed mid-stream and
//!   restarted (the stream goes on), then killed for good (the stream
//!   fails, naming the backing, once reconnecting gave up); a new stream on
//!   the same open disk finishes when the server is back.
//! * `http_image_replaced_mid_stream_fails_clearly`: the file under nginx is
//!   replaced midway: the stream fails saying the remote image changed, and
//!   so does a new one on the same disk; nothing of the new image gets in.
//! * `cli_stream_keep_backing_over_nbd`: `--keep-backing` ends with every
//!   byte in the overlay and the URI still in the header.
//! * `cli_stream_fetches_only_what_the_server_says_is_data`: a sparse base
//!   image (holes in its file): `backfill info` says how much a stream
//!   will fetch; `backfill convert` and `backfill stream` ask nbdkit's
//!   block status and fetch its data only, the holes becoming
//!   holes of the output and zero clusters of the overlay; over nbdkit
//!   without structured replies, or with its block status failing,
//!   everything is fetched, to the same image.
//! * `serve_shows_its_clients_the_zeros_the_backing_server_reports`:
//!   `backfill serve` learns the same in the background; `nbdinfo --map`
//!   of it shows the holes as zeros, and `nbdcopy` from it makes nbdkit
//!   read the data only.
//! * `serve_stream_over_a_slow_nbdkit`: `backfill serve --stream` over a
//!   delayed nbdkit while a client writes and reads through NBD.
//! * `serve_stream_with_a_failing_backing_keeps_serving`: the stream of
//!   `backfill serve --stream` fails (error on stderr, naming the backing);
//!   the server goes on serving, starts the stream again, and once the
//!   backing heals the stream finishes.
//! * `serve_stream_stops_for_good_when_the_http_image_changes`: the file
//!   under nginx is replaced mid-stream: the stream fails saying so and is
//!   not started again; the server goes on serving, and nothing of the new
//!   image gets in.
//!
//! Synchronisation is by observation only: servers are ready once they
//! wrote their pid file (nbdkit) or accept connections (nginx), a stream is
//! midway once its progress says so (`Stream::wait_until`, or the CLI's
//! first progress line), and the error filter is switched by a file. Rate
//! limits only keep a stream from finishing before the test acts; nothing
//! is asserted about time.

mod common;
#[path = "common/nbd.rs"]
mod nbd_common;
#[path = "common/nbd_peer.rs"]
mod nbd_peer;
#[path = "common/nginx.rs"]
mod nginx_common;

use backfill::{ErrorKind, ExtentKind, StreamEnd, StreamOptions, StreamProgress, StreamState};
use common::*;
use nbd_peer::{logged_reads, socket_path, unix_uri, Peer};
use std::path::{Path, PathBuf};

const CLUSTER: u64 = 64 * KIB;

/// The all-zero stretches of every base image: one cluster-aligned, one not
/// (only the clusters wholly inside it can become zero clusters).
const ZEROS: [(u64, u64); 2] = [(MIB, MIB + CLUSTER), (5 * MIB + 4 * KIB, 300 * KIB)];
/// The whole clusters inside [`ZEROS`]: what must map as zero, not data.
const ZERO_CLUSTERS: [(u64, u64); 2] = [(MIB, MIB + CLUSTER), (5 * MIB + CLUSTER, 3 * CLUSTER)];

/// A raw base image of random bytes with [`ZEROS`] in it, and the path of
/// an overlay on it (made once its server runs).
struct Base {
    dir: tempfile::TempDir,
    base: PathBuf,
    overlay: PathBuf,
    size: u64,
}

impl Base {
    /// `size` (at least 6 MiB) random bytes; sizes that are not a multiple
    /// of the cluster size give the overlay a partial last cluster.
    fn new(prefix: &str, size: u64) -> Base {
        assert!(size >= 6 * MIB);
        let dir = tempdir(prefix);
        let base = dir.path().join("base.raw");
        let mut data = random_bytes(size as usize, seed_from_env(prefix));
        for (off, len) in ZEROS {
            data[off as usize..(off + len) as usize].fill(0);
        }
        write_file(&base, &data);
        let overlay = dir.path().join("overlay.qcow2");
        Base {
            dir,
            base,
            overlay,
            size,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn sock(&self) -> PathBuf {
        socket_path(self.dir.path(), "nbd.sock")
    }

    fn uri(&self) -> String {
        unix_uri(&self.sock())
    }

    /// nbdkit serving the base image on [`Base::sock`], with `filters`.
    fn nbdkit(&self, filters: &[&str], params: &[&str]) -> Peer {
        nbd_peer::nbdkit(self.dir.path(), &self.sock(), &self.base, filters, params)
    }

    /// nbdkit whose every read fails with EIO (its error filter) while the
    /// file `trigger` exists.
    fn nbdkit_failing_while(&self, trigger: &Path) -> Peer {
        let file = format!("error-pread-file={}", trigger.display());
        self.nbdkit(&["error"], &["error=EIO", "error-pread-rate=100%", &file])
    }

    /// nginx serving the base image, which moves to `www/base.raw` below
    /// the directory. Its URL is `nginx.url("base.raw")`; the server must
    /// be dropped before `self` (declared after it).
    fn nginx(&mut self) -> nginx_common::Nginx {
        let www = self.path("www");
        std::fs::create_dir_all(&www).unwrap();
        let moved = www.join("base.raw");
        std::fs::rename(&self.base, &moved).unwrap();
        self.base = moved;
        nginx_common::Nginx::start(&self.path("nginx"), &www, "", None)
    }

    /// nbdkit whose log filter writes every request to `log`.
    fn nbdkit_logged(&self, log: &Path) -> Peer {
        let _ = std::fs::remove_file(log);
        self.nbdkit(&["log"], &[&format!("logfile={}", log.display())])
    }

    /// `qemu-img create -f qcow2 -b URI -F raw overlay.qcow2`: the size
    /// comes from the server, which must be running.
    fn create_overlay(&self, uri: &str) {
        qemu_create_qcow2(&self.overlay, "", Some((uri, "raw")), None);
        assert_eq!(virtual_size(&self.overlay), self.size);
    }

    /// Runs `backfill stream ARGS overlay.qcow2` with `run`.
    fn stream_with<T>(&self, args: &[&str], run: impl FnOnce(&[&str]) -> T) -> T {
        let overlay = path_str(&self.overlay);
        let mut argv = vec!["stream"];
        argv.extend_from_slice(args);
        argv.push(&overlay);
        run(&argv)
    }

    /// `backfill stream ARGS overlay.qcow2`, which must succeed; its stdout.
    fn stream_cli(&self, args: &[&str]) -> String {
        self.stream_with(args, backfill_ok)
    }

    /// `backfill stream ARGS overlay.qcow2` to the end: it must say it
    /// dropped the backing file.
    fn stream_to_the_end(&self, args: &[&str]) {
        stream_summary_ok(&self.stream_cli(args), "backing file dropped");
    }

    /// `backfill stream ARGS overlay.qcow2`, which must fail with status 1
    /// and one `backfill: ` line on stderr; that line.
    fn stream_cli_fails(&self, args: &[&str]) -> String {
        let out = self.stream_with(args, backfill_output);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "backfill stream {args:?}: {err}"
        );
        let last = err.lines().last().unwrap_or_default().to_string();
        assert!(last.starts_with("backfill: "), "{err}");
        last
    }

    /// After a complete stream: standalone (`qemu-img info`), clean,
    /// identical to the base, everything in the overlay itself, and the
    /// zero regions zero clusters, not data (`qemu-img map`).
    fn check_streamed(&self) {
        assert_standalone(&self.overlay);
        self.check_populated();
    }

    /// Every byte in the overlay, which checks clean, reads as the base, and
    /// holds the zero regions as zero clusters.
    fn check_populated(&self) {
        check_clean(&self.overlay);
        compare_identical(&self.overlay, &self.base);
        let map = qemu_map(&self.overlay);
        assert_all_in_overlay(&map);
        for (off, len) in ZERO_CLUSTERS {
            assert_zero_in_overlay(&map, off, len);
        }
        assert!(map_at(&map, 0).data, "random bytes are data: {map:?}");
        assert!(map_at(&map, self.size - 1).data, "{map:?}");
    }

    /// Bytes of the overlay that the image itself holds (data or zero
    /// clusters), by `qemu-img map` (the backing must be reachable).
    fn held_bytes(&self) -> u64 {
        qemu_map(&self.overlay)
            .iter()
            .filter(|e| e.depth == 0)
            .map(|e| e.length)
            .sum()
    }
}

fn stream_summary_ok(stdout: &str, how: &str) {
    assert!(
        stdout.starts_with("streamed ") && stdout.contains(how),
        "backfill stream said: {stdout}"
    );
}

/// The reads of `runs` together cover `[0, size)` exactly once: nothing was
/// fetched twice, nothing was skipped.
#[track_caller]
fn assert_each_byte_fetched_once(runs: &[&[(u64, u64)]], size: u64) {
    let mut reads: Vec<(u64, u64)> = runs.iter().flat_map(|r| r.iter().copied()).collect();
    reads.sort_unstable();
    let mut pos = 0;
    for &(off, len) in &reads {
        assert!(
            off >= pos,
            "bytes [{off:#x}, {:#x}) fetched twice",
            pos.min(off + len)
        );
        assert_eq!(off, pos, "bytes [{pos:#x}, {off:#x}) never fetched");
        pos = off + len;
    }
    assert_eq!(pos, size, "the reads end at {pos:#x}");
}

// ------------------------------------------------------- complete streams

#[test]
fn cli_stream_over_nbdkit() {
    let b = Base::new("sr-nbd", 8 * MIB + 12 * KIB);
    let server = b.nbdkit(&[], &[]);
    let uri = b.uri();
    b.create_overlay(&uri);
    // With no server, a clear error that names the backing.
    server.stop();
    let err = b.stream_cli_fails(&[]);
    assert!(err.contains(&uri) && err.contains("connect"), "{err}");
    assert_eq!(info_json(&b.overlay)["backing-filename"], uri.as_str());

    let server = b.nbdkit(&[], &[]);
    b.stream_to_the_end(&["--cores", "2"]);
    // The standalone image needs no server any more.
    server.stop();
    b.check_streamed();
}

/// Every read takes a millisecond longer on the server, which refuses
/// reads larger than 64 KiB (so every 1 MiB stream request is split), and
/// four reactors (more than the machine's cores in CI) fill their stripes
/// at once.
#[test]
fn cli_stream_over_a_slow_nbdkit_on_four_cores() {
    let b = Base::new("sr-nbd-slow", 12 * MIB + 4 * KIB);
    let server = b.nbdkit(
        &["delay", "blocksize-policy"],
        &[
            "rdelay=1ms",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    b.create_overlay(&b.uri());
    b.stream_to_the_end(&["--cores", "4"]);
    server.stop();
    b.check_streamed();
}

/// qemu-nbd on TCP (`nbd://127.0.0.1:PORT/`), with a rate limit.
#[test]
fn cli_stream_over_qemu_nbd_tcp() {
    let b = Base::new("sr-qnbd", 6 * MIB + 512);
    // A port nobody listens on now; qemu-nbd takes it a moment later.
    let port = free_port();
    let listen = ["-b", "127.0.0.1", "-p", &port.to_string()].map(String::from);
    let server = nbd_peer::qemu_nbd(b.dir.path(), &b.base, &listen);
    b.create_overlay(&format!("nbd://127.0.0.1:{port}/"));
    b.stream_to_the_end(&["--rate", "256M", "--cores", "2"]);
    server.stop();
    b.check_streamed();
}

#[test]
fn cli_stream_over_http() {
    let mut b = Base::new("sr-http", 8 * MIB + 4 * KIB);
    let nginx = b.nginx();
    let url = nginx.url("base.raw");
    b.create_overlay(&url);
    assert_eq!(info_json(&b.overlay)["backing-filename"], url.as_str());
    b.stream_to_the_end(&["--cores", "2"]);
    drop(nginx);
    b.check_streamed();
}

#[test]
fn cli_stream_over_older_nbd_handshakes() {
    // Oldstyle (no options at all), then plain newstyle (only
    // NBD_OPT_EXPORT_NAME): QEMU reads through both.
    for (flag, prefix) in [
        ("--oldstyle", "sr-oldstyle"),
        ("--mask-handshake=0", "sr-newstyle"),
    ] {
        let b = Base::new(prefix, 6 * MIB + 4 * KIB);
        let plugin = [flag.to_string(), "file".to_string(), path_str(&b.base)];
        let _server = nbd_peer::nbdkit_plugin(b.dir.path(), &b.sock(), &[], &plugin);
        // QEMU reads from it (the oracle), and so does backfill, which says
        // why it learns no zeros from such a server.
        b.create_overlay(&b.uri());
        compare_identical(&b.overlay, &b.base);
        let text = backfill_ok(&["info", &path_str(&b.overlay)]);
        assert!(
            text.contains("zeros in it unknown (the server offers no base:allocation)"),
            "{flag}: {text}"
        );
        b.stream_to_the_end(&["--cores", "2"]);
        b.check_streamed();

        if flag == "--oldstyle" {
            // An oldstyle server has one export and no names for it.
            let named = format!("nbd+unix:///disk?socket={}", path_str(&b.sock()));
            qemu_create_qcow2_unopened(&b.overlay, &named, "raw", "6M");
            let err = b.stream_cli_fails(&[]);
            assert!(
                err.contains(
                    "the server speaks only the oldstyle protocol, which has no export names"
                ),
                "{err}"
            );
        }
    }
}

/// The overlay's `backfill info` and `backfill stream`, where the header
/// names the backing by QEMU's `json:` options `json`: the chain shows the
/// source it resolved to, and the stream ends standalone and identical.
fn stream_json_named(b: &Base, json: &str, resolved: &str) {
    qemu_create_qcow2(&b.overlay, "", Some((&format!("json:{json}"), "raw")), None);
    assert_eq!(virtual_size(&b.overlay), b.size);
    // QEMU reads the same bytes through the name (the independent oracle).
    compare_identical(&b.overlay, &b.base);
    let info = backfill_ok(&["info", &path_str(&b.overlay)]);
    assert!(
        info.contains(&format!("1: {resolved}, raw, ")),
        "{resolved}: {info}"
    );
    b.stream_to_the_end(&["--cores", "2"]);
    b.check_streamed();
}

#[test]
fn json_backing_names_over_nbd_and_http() {
    let b = Base::new("sr-json-nbd", 6 * MIB + 4 * KIB);
    let _server = b.nbdkit(&[], &[]);
    let sock = path_str(&b.sock());
    let uri = b.uri();
    // Nested and dotted spellings of one node, as QEMU takes both.
    let nested =
        format!(r#"{{"file":{{"driver":"nbd","server":{{"type":"unix","path":"{sock}"}}}}}}"#);
    stream_json_named(&b, &nested, &uri);
    let dotted = format!(
        r#"{{"file.driver":"nbd","file.server.type":"unix","file.server.path":"{sock}","file.reconnect-delay":5}}"#
    );
    stream_json_named(&b, &dotted, &uri);

    // An option that would change what is read is refused by name; QEMU
    // refuses it too (no such TLS credentials object).
    let tls = format!(
        r#"json:{{"file":{{"driver":"nbd","server":{{"type":"unix","path":"{sock}"}},"tls-creds":"tls0"}}}}"#
    );
    qemu_create_qcow2_unopened(&b.overlay, &tls, "raw", "6M");
    let overlay = path_str(&b.overlay);
    let why = "option \"tls-creds\": NBD over TLS is not supported";
    let info = backfill_ok(&["info", &overlay]);
    assert!(
        line_starting(&info, "Backing chain: unavailable: ").contains(why),
        "{info}"
    );
    let err = b.stream_cli_fails(&[]);
    assert!(err.contains(why), "{err}");

    // HTTP: the header's format (raw) is the top node's driver, so QEMU
    // ignores the options' own "driver" there, and so does backfill.
    let mut b = Base::new("sr-json-http", 6 * MIB + 4 * KIB);
    let nginx = b.nginx();
    let url = nginx.url("base.raw");
    let json =
        format!(r#"{{"driver":"qcow2","file":{{"driver":"http","url":"{url}","timeout":30}}}}"#);
    stream_json_named(&b, &json, &url);
}

#[test]
fn cli_stream_keep_backing_over_nbd() {
    let b = Base::new("sr-keep", 6 * MIB + 8 * KIB);
    let server = b.nbdkit(&[], &[]);
    let uri = b.uri();
    b.create_overlay(&uri);
    let out = b.stream_cli(&["--keep-backing", "--cores", "2"]);
    stream_summary_ok(&out, "backing file kept");
    let info = info_json(&b.overlay);
    assert_eq!(info["backing-filename"], uri.as_str(), "{info}");
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    b.check_populated();
    let text = backfill_ok(&["info", &path_str(&b.overlay)]);
    assert!(text.contains("100.0% populated"), "{text}");
    server.stop();
}

// ------------------------------------------------ interrupted and resumed

/// The data of [`sparse_base`]'s image; the rest of it is holes.
const SPARSE_DATA: [(u64, u64); 4] = [
    (0, MIB),
    (5 * MIB + 4 * KIB, 300 * KIB),
    (10 * MIB, CLUSTER),
    (24 * MIB - 128 * KIB, 128 * KIB),
];

/// A 24 MiB raw base image with random bytes at [`SPARSE_DATA`], holes in
/// between (the file system's, as `qemu-img map` of the file shows them).
fn sparse_base(prefix: &str) -> Base {
    let b = Base::new(prefix, 6 * MIB);
    let size = 24 * MIB;
    write_sparse_file(&b.base, size, &SPARSE_DATA, seed_from_env(prefix));
    Base { size, ..b }
}

/// The reads of `reads`, sorted and merged where they touch.
fn merged(reads: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v = reads.to_vec();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len) in v {
        match out.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// A sparse image crosses the link as its data only: the stream asks the
/// server's block status (`base:allocation`) which ranges read as zeros,
/// records them as zero clusters without fetching them, and fetches the
/// rest exactly once. nbdkit's log filter is the oracle for what was
/// fetched, `qemu-img map` of the base file for where its data is, and of
/// the overlay for what became zero clusters. `backfill convert` fetches
/// only the data too. The same over a server without structured replies
/// (so without block status), and over one whose block status fails:
/// everything is fetched, and the result is the same image.
#[test]
fn cli_stream_fetches_only_what_the_server_says_is_data() {
    let b = sparse_base("sr-sparse");
    let log = b.path("nbdkit.log");
    let server = b.nbdkit_logged(&log);
    b.create_overlay(&b.uri());

    // `backfill info` tells how much a stream will fetch.
    let text = backfill_ok(&["info", &path_str(&b.overlay)]);
    assert!(
        text.contains("of which zeros, by the backing server: 22.5 MiB (23613440 bytes)")
            && text.contains(
                "Streaming: 0.0% populated (24 MiB still read from the backing chain, 1.48 MiB \
                 of it to fetch)"
            ),
        "{text}"
    );

    // `backfill convert` (read-only) fetches the data only, and leaves the
    // rest holes in its output.
    let raw = b.path("out.raw");
    backfill_ok(&["convert", &path_str(&b.overlay), &path_str(&raw)]);
    assert_eq!(merged(&logged_reads(&log)), SPARSE_DATA);
    assert!(std::fs::read(&raw).unwrap() == std::fs::read(&b.base).unwrap());
    let written: Vec<(u64, u64)> = qemu_map(&raw)
        .iter()
        .filter(|e| e.data)
        .map(|e| (e.start, e.length))
        .collect();
    assert_eq!(written, SPARSE_DATA);
    drop(server);

    let server = b.nbdkit_logged(&log);
    let out = b.stream_cli(&[]);
    stream_summary_ok(&out, "backing file dropped");
    // 24 MiB less 1,516 KiB of data.
    assert!(
        out.contains("24 MiB populated (22.5 MiB of it zeros in the backing image, not fetched)"),
        "{out}"
    );
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(" Extents "), "no block status was asked for");
    assert_eq!(merged(&logged_reads(&log)), SPARSE_DATA);

    assert_standalone(&b.overlay);
    check_clean(&b.overlay);
    compare_identical(&b.overlay, &b.base);
    // Whole clusters of holes are zero clusters; clusters with data in
    // them are data.
    assert_data_clusters(&b.overlay, CLUSTER, &SPARSE_DATA);

    // Without structured replies there is no block status: every byte is
    // fetched, once, and the image is the same.
    std::fs::remove_file(&b.overlay).unwrap();
    let _ = std::fs::remove_file(&log);
    let plugin = [
        "--no-sr".to_string(),
        "file".to_string(),
        path_str(&b.base),
        format!("logfile={}", log.display()),
    ];
    let server = nbd_peer::nbdkit_plugin(b.dir.path(), &b.sock(), &["log"], &plugin);
    b.create_overlay(&b.uri());
    let text = backfill_ok(&["info", &path_str(&b.overlay)]);
    assert!(
        text.contains(
            "zeros in it unknown (the server offers no base:allocation): a stream fetches all \
             of it"
        ),
        "{text}"
    );
    let out = b.stream_cli(&[]);
    stream_summary_ok(&out, "backing file dropped");
    assert!(!out.contains("zeros in the backing image"), "{out}");
    drop(server);
    assert_each_byte_fetched_once(&[&logged_reads(&log)], b.size);
    check_clean(&b.overlay);
    compare_identical(&b.overlay, &b.base);
    assert_data_clusters(&b.overlay, CLUSTER, &SPARSE_DATA);

    // A server whose block status fails (nbdkit's error filter on its
    // extents): the same, status being only a saving.
    std::fs::remove_file(&b.overlay).unwrap();
    let _ = std::fs::remove_file(&log);
    let logfile = format!("logfile={}", log.display());
    let server = b.nbdkit(
        &["log", "error"],
        &[&logfile, "error-extents=EIO", "error-extents-rate=100%"],
    );
    b.create_overlay(&b.uri());
    let text = backfill_ok(&["info", &path_str(&b.overlay)]);
    assert!(
        text.contains("zeros in it unknown (the server answered a block status query with error 5"),
        "{text}"
    );
    let out = b.stream_cli(&[]);
    stream_summary_ok(&out, "backing file dropped");
    assert!(!out.contains("zeros in the backing image"), "{out}");
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(" Extents "), "no block status was asked for");
    assert_each_byte_fetched_once(&[&logged_reads(&log)], b.size);
    compare_identical(&b.overlay, &b.base);
}

/// qemu-nbd at its default of one client at a time answers block status
/// too: the queries go on the connection that reads, as QEMU's client
/// sends them (a connection of their own would wait, ungreeted, behind
/// the one qemu-nbd serves). `backfill info` tells the zeros, the stream
/// fetches the data only, and the image is the base's.
#[test]
fn block_status_from_qemu_nbd_serving_one_client_at_a_time() {
    let b = sparse_base("sr-qnbd-one");
    let listen = ["-k".to_string(), path_str(&b.sock())];
    let server = nbd_peer::qemu_nbd_for(b.dir.path(), &b.base, &listen, 1);
    b.create_overlay(&b.uri());
    let text = backfill_ok(&["info", &path_str(&b.overlay)]);
    assert!(
        text.contains("of which zeros, by the backing server: 22.5 MiB (23613440 bytes)"),
        "{text}"
    );
    let out = b.stream_cli(&[]);
    stream_summary_ok(&out, "backing file dropped");
    assert!(
        out.contains("24 MiB populated (22.5 MiB of it zeros in the backing image, not fetched)"),
        "{out}"
    );
    server.stop();
    assert_standalone(&b.overlay);
    check_clean(&b.overlay);
    compare_identical(&b.overlay, &b.base);
    assert_data_clusters(&b.overlay, CLUSTER, &SPARSE_DATA);
}

/// `backfill serve` asks the backing server's block status in the
/// background, and says what it found. Then its own clients see the holes
/// as zeros (`nbdinfo --map`), and `nbdcopy` from it, which skips what
/// reads as zeros, has the backing server read the data only (nbdkit's
/// log); the copy has the base's bytes.
#[test]
fn serve_shows_its_clients_the_zeros_the_backing_server_reports() {
    let b = sparse_base("sr-serve-sparse");
    let log = b.path("nbdkit.log");
    let server = b.nbdkit_logged(&log);
    b.create_overlay(&b.uri());
    let served = nbd_common::Server::start(b.dir.path(), &b.overlay, &["--read-only"]);
    let line = served.wait_for_log_line("read as zeros");
    assert!(
        line.contains("server says 22.5 MiB of the disk read as zeros: they are not fetched"),
        "{line}"
    );
    assert_eq!(nbd_common::nbdinfo_data(&served.uri), SPARSE_DATA);

    require_tool("nbdcopy");
    let copy = b.path("copy.raw");
    run_ok("nbdcopy", [served.uri.as_str(), path_str(&copy).as_str()]);
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&b.base).unwrap());
    served.stop();
    check_clean(&b.overlay);
    drop(server);
    assert_eq!(merged(&logged_reads(&log)), SPARSE_DATA);
}

/// Opens the overlay and starts a stream at `rate` bytes/s (slow enough
/// that the test acts midway).
fn start_stream(b: &Base, rate: u64) -> (backfill::Disk, backfill::Stream) {
    let disk = open(&b.overlay, options(2, true, false));
    let s = disk
        .stream(StreamOptions {
            rate_bytes_per_sec: Some(rate),
            ..StreamOptions::default()
        })
        .expect("starting the stream");
    (disk, s)
}

/// Waits until the stream populated at least `bytes`; it must still run.
#[track_caller]
fn wait_populated(s: &backfill::Stream, bytes: u64) -> StreamProgress {
    let p = s.wait_until(|p| p.populated_bytes >= bytes);
    assert_eq!(p.state, StreamState::Running, "{p:?}");
    p
}

#[test]
fn cancelled_over_nbd_then_resumed_by_the_cli() {
    let b = Base::new("sr-cancel", 12 * MIB + 12 * KIB);
    // The overlay is made before the logged server runs, so that the logs
    // hold the streams' reads only.
    let server = b.nbdkit(&[], &[]);
    b.create_overlay(&b.uri());
    server.stop();
    let first_log = b.path("first.log");
    let server = b.nbdkit_logged(&first_log);
    let (disk, s) = start_stream(&b, 4 * MIB);
    wait_populated(&s, 2 * MIB);
    s.cancel();
    let last = s.wait_until(|p| p.state.is_stopped());
    assert_eq!(last.state, StreamState::Cancelled, "{last:?}");
    assert_eq!(s.wait().expect("a cancelled stream"), StreamEnd::Cancelled);
    let first = last.populated_bytes;
    assert!(first >= 2 * MIB && first < b.size, "{last:?}");
    disk.close().unwrap();
    // The server exits once its clients are gone, and its log is complete.
    server.stop();
    let first_reads = logged_reads(&first_log);

    // Cancelled: flushed, clean, the backing still named, the work kept.
    let server = b.nbdkit(&[], &[]);
    check_clean(&b.overlay);
    assert_eq!(info_json(&b.overlay)["backing-filename"], b.uri().as_str());
    assert_eq!(b.held_bytes(), first, "what the first stream populated");
    server.stop();

    let second_log = b.path("second.log");
    let server = b.nbdkit_logged(&second_log);
    b.stream_to_the_end(&["--cores", "2"]);
    server.stop();
    assert_each_byte_fetched_once(&[&first_reads, &logged_reads(&second_log)], b.size);
    b.check_streamed();
}

#[test]
fn cli_stream_killed_over_nbd_then_resumed() {
    let b = Base::new("sr-kill", 24 * MIB);
    let server = b.nbdkit(&[], &[]);
    b.create_overlay(&b.uri());
    kill_stream_midway(&b.overlay);

    // Clusters a crash leaves reserved are leaks, never corruption.
    check_no_corruption(&b.overlay);
    assert_eq!(info_json(&b.overlay)["backing-filename"], b.uri().as_str());
    let held = b.held_bytes();
    assert!(held > 0 && held < b.size, "{held}");

    b.stream_to_the_end(&["--cores", "2"]);
    server.stop();
    b.check_streamed();
}

/// The failure of a stream over `uri`: it names the stream and the backing.
#[track_caller]
fn assert_backing_failure(last: &StreamProgress, e: &backfill::Error, uri: &str, kind: ErrorKind) {
    assert_eq!(last.state, StreamState::Failed, "{last:?}");
    let msg = e.to_string();
    eprintln!("the stream failed: {msg}");
    assert_eq!(last.error.as_deref(), Some(msg.as_str()));
    assert_eq!(e.kind(), kind, "{msg}");
    assert_eq!(last.error_kind, Some(kind), "{msg}");
    assert!(
        msg.starts_with("streaming: ") && msg.contains(uri),
        "the error names the stream and the backing: {msg}"
    );
    assert!(last.populated_bytes < last.total_bytes, "{last:?}");
}

/// The disk still reads what the overlay holds (found by block status),
/// equal to the base image.
fn check_held_reads(disk: &backfill::Disk, base: &[u8]) {
    let mut checked = 0;
    for e in disk.block_status(0, disk.size()).unwrap() {
        if matches!(e.kind, ExtentKind::Data | ExtentKind::Zero) {
            let mut buf = vec![0u8; e.len as usize];
            disk.read_at(&mut buf, e.offset)
                .unwrap_or_else(|err| panic!("reading held {e:?}: {err}"));
            let at = e.offset as usize;
            assert_same_bytes(&buf, &base[at..at + buf.len()], "a held range");
            checked += e.len;
        }
    }
    assert!(checked > 0, "nothing held");
}

#[test]
fn failing_backing_stops_the_stream_clearly() {
    let b = Base::new("sr-fail", 12 * MIB);
    let trigger = b.path("errors-on");
    let server = b.nbdkit_failing_while(&trigger);
    let uri = b.uri();
    b.create_overlay(&uri);
    let (disk, s) = start_stream(&b, 4 * MIB);
    wait_populated(&s, 2 * MIB);
    write_file(&trigger, b"");
    let last = s.wait_until(|p| p.state.is_stopped());
    let e = s.wait().expect_err("a stream whose backing fails");
    assert_backing_failure(&last, &e, &uri, ErrorKind::BackingUnavailable);
    check_held_reads(&disk, &read_file(&b.base));
    disk.close().unwrap();

    // Consistent, the backing still named, nothing lost of what is held.
    check_no_corruption(&b.overlay);
    assert_eq!(info_json(&b.overlay)["backing-filename"], uri.as_str());
    assert!(b.held_bytes() >= last.populated_bytes);

    // The CLI fails the same way, with the error on stderr.
    let err = b.stream_cli_fails(&["--cores", "2"]);
    assert!(
        err.contains("streaming: ") && err.contains(&uri) && err.contains("error 5"),
        "{err}"
    );
    check_no_corruption(&b.overlay);

    // The server heals; the next stream finishes the job.
    std::fs::remove_file(&trigger).unwrap();
    b.stream_to_the_end(&["--cores", "2"]);
    server.stop();
    b.check_streamed();
}

#[test]
fn backing_server_killed_midway() {
    let b = Base::new("sr-killed-server", 16 * MIB);
    let server = b.nbdkit(&[], &[]);
    let uri = b.uri();
    b.create_overlay(&uri);
    let (disk, s) = start_stream(&b, 4 * MIB);

    // Killed and back at once: the stream goes on.
    wait_populated(&s, 2 * MIB);
    server.stop_with(libc::SIGKILL);
    let server = b.nbdkit(&[], &[]);
    wait_populated(&s, 6 * MIB);

    // Killed for good: the stream fails once reconnecting gives up.
    server.stop_with(libc::SIGKILL);
    let last = s.wait_until(|p| p.state.is_stopped());
    let e = s.wait().expect_err("a stream whose backing is gone");
    assert_backing_failure(&last, &e, &uri, ErrorKind::BackingUnavailable);
    check_held_reads(&disk, &read_file(&b.base));

    // Back again: a new stream on the same open disk finishes.
    let server = b.nbdkit(&[], &[]);
    let s = disk.stream(StreamOptions::default()).unwrap();
    let end = s
        .wait()
        .unwrap_or_else(|e| panic!("the stream after the restart: {e}"));
    assert_eq!(
        end,
        StreamEnd::Finished {
            backing_dropped: true
        }
    );
    disk.close().unwrap();
    server.stop();
    b.check_streamed();
}

/// The file under nginx is replaced by another image midway: the stream
/// fails with "changed" (never mixing the two images in the overlay), the
/// disk keeps serving what it holds, and a new stream fails the same way.
#[test]
fn http_image_replaced_mid_stream_fails_clearly() {
    let mut b = Base::new("sr-http-changed", 12 * MIB);
    let nginx = b.nginx();
    let original = read_file(&b.base);
    let url = nginx.url("base.raw");
    b.create_overlay(&url);
    let (disk, s) = start_stream(&b, 4 * MIB);
    wait_populated(&s, 2 * MIB);

    // A new image under the same name, an hour newer.
    replace_with_newer(
        &b.base,
        b.size,
        0x5eed,
        std::time::Duration::from_secs(3600),
    );

    let last = s.wait_until(|p| p.state.is_stopped());
    let e = s.wait().expect_err("a stream whose remote image changed");
    assert_backing_failure(&last, &e, &url, ErrorKind::BackingChanged);
    assert!(e.to_string().contains("changed"), "{e}");
    check_held_reads(&disk, &original);
    let again = disk.stream(StreamOptions::default()).unwrap().wait();
    let e = again.expect_err("a new stream over the changed image");
    assert!(e.to_string().contains("changed"), "{e}");
    assert_eq!(e.kind(), ErrorKind::BackingChanged, "{e}");
    disk.close().unwrap();
    check_no_corruption(&b.overlay);
    assert_eq!(info_json(&b.overlay)["backing-filename"], url.as_str());
}

// ------------------------------------------------------- serve --stream

/// `backfill serve --stream` over a slow nbdkit backing: a client writes
/// and reads through NBD while the stream runs; the image ends standalone
/// with the client's writes in it.
#[test]
fn serve_stream_over_a_slow_nbdkit() {
    let b = Base::new("sr-serve", 12 * MIB);
    let server = b.nbdkit(&["delay"], &["rdelay=1ms"]);
    b.create_overlay(&b.uri());
    let mut expected = read_file(&b.base);
    let mut served = nbd_common::Server::start(b.dir.path(), &b.overlay, &["--stream=16M"]);
    qemu_io(
        Path::new(&served.uri),
        "raw",
        &[
            "write -P 0xab 1M 64K".into(),
            "write -P 0xcd 10000 3000".into(),
            "write -z 7M 128K".into(),
        ],
    );
    expected[MIB as usize..(MIB + CLUSTER) as usize].fill(0xab);
    expected[10000..13000].fill(0xcd);
    expected[7 * MIB as usize..(7 * MIB + 128 * KIB) as usize].fill(0);
    let copy = read_through_nbd(&served.uri, &b.path("read.raw"));
    assert_same_bytes(&copy, &expected, "read through NBD");
    let line = served.read_stdout_line();
    stream_summary_ok(&line, "backing file dropped");
    served.stop();
    server.stop();
    assert_standalone(&b.overlay);
    check_clean(&b.overlay);
    compare_with_bytes(&b.overlay, &expected, b.dir.path());
    let map = qemu_map(&b.overlay);
    assert_all_in_overlay(&map);
    assert_zero_in_overlay(&map, MIB + CLUSTER, MIB);
    assert_zero_in_overlay(&map, ZERO_CLUSTERS[1].0, ZERO_CLUSTERS[1].1);
}

/// An overlay larger than its remote backing image, whose size is no
/// multiple of 512: the stream reads up to the backing's end and no
/// further (the rest reads as zeros), over NBD and over HTTP.
#[test]
fn overlay_larger_than_its_remote_backing() {
    let mut b = Base::new("sr-larger", 6 * MIB + 4 * KIB + 123);
    let base_bytes = read_file(&b.base);
    let size = 8 * MIB + 12 * KIB;
    let mut expected = base_bytes.clone();
    expected.resize(size as usize, 0);

    let server = b.nbdkit(&[], &[]);
    qemu_create_qcow2(&b.overlay, "", Some((&b.uri(), "raw")), Some(size));
    b.stream_to_the_end(&["--cores", "2"]);
    server.stop();
    assert_standalone(&b.overlay);
    check_clean(&b.overlay);
    compare_with_bytes(&b.overlay, &expected, b.dir.path());

    let nginx = b.nginx();
    let overlay = b.path("http.qcow2");
    qemu_create_qcow2(
        &overlay,
        "",
        Some((&nginx.url("base.raw"), "raw")),
        Some(size),
    );
    let out = backfill_ok(&["stream", "--cores", "2", &path_str(&overlay)]);
    stream_summary_ok(&out, "backing file dropped");
    drop(nginx);
    assert_standalone(&overlay);
    check_clean(&overlay);
    compare_with_bytes(&overlay, &expected, b.dir.path());
}

/// `backfill serve --stream` whose backing fails every read from the start:
/// the stream fails with the error on stderr and the server goes on serving
/// (a write that needs no backing data succeeds). It starts the stream again
/// after a wait that doubles each time: once the backing heals, a new stream
/// finishes the image (`streamed ...; backing file dropped` on stdout), and
/// the server says why the backing's reads had failed.
#[test]
fn serve_stream_with_a_failing_backing_keeps_serving() {
    let b = Base::new("sr-serve-fail", 6 * MIB);
    let trigger = b.path("errors-on");
    write_file(&trigger, b"");
    let server = b.nbdkit_failing_while(&trigger);
    let uri = b.uri();
    b.create_overlay(&uri);
    let mut expected = read_file(&b.base);
    let mut served = nbd_common::Server::start(b.dir.path(), &b.overlay, &["--stream"]);
    let failure = served.wait_for_log_line("stream failed");
    assert!(
        failure.starts_with("backfill: stream failed: streaming: ")
            && failure.contains(&uri)
            && failure.ends_with("; starting it again in 1 s (serving goes on)"),
        "{failure}"
    );
    // Whole clusters need nothing from the backing.
    qemu_io(
        Path::new(&served.uri),
        "raw",
        &["write -P 0xab 2M 128K".into()],
    );
    expected[2 * MIB as usize..(2 * MIB + 2 * CLUSTER) as usize].fill(0xab);
    std::fs::remove_file(&trigger).unwrap();
    // A stream started again after the backing healed finishes.
    let line = served.read_stdout_line();
    stream_summary_ok(&line, "backing file dropped");
    let copy = read_through_nbd(&served.uri, &b.path("read.raw"));
    assert_same_bytes(&copy, &expected, "read through NBD");
    let log = served.stop();
    // The operator is told why the backing's reads failed.
    let report = line_starting(&log, "backfill serve: reads of the backing image failed: ");
    assert!(
        report.contains(&uri) && report.contains("since start"),
        "{report}"
    );
    server.stop();
    assert_standalone(&b.overlay);
    check_clean(&b.overlay);
    compare_with_bytes(&b.overlay, &expected, b.dir.path());
}

/// `backfill serve --stream` over nginx whose file is replaced by another
/// image mid-stream: the stream fails saying the remote image changed and
/// is not started again (a new one would fail the same way, once a minute,
/// for as long as the server runs); the server goes on serving. Once the
/// original file is back (same bytes, same modification time, so the same
/// ETag), the overlay reads as the original with the client's write: no
/// byte of the other image got in.
#[test]
fn serve_stream_stops_for_good_when_the_http_image_changes() {
    let mut b = Base::new("sr-serve-changed", 12 * MIB);
    let nginx = b.nginx();
    let url = nginx.url("base.raw");
    b.create_overlay(&url);
    let mut expected = read_file(&b.base);
    let served = nbd_common::Server::start(b.dir.path(), &b.overlay, &["--stream=1M"]);
    // The file is replaced at once (a rename), never missing: a stream
    // request between a rename away and a copy back got 404 instead of
    // the changed image.
    let saved = b.path("original.raw");
    std::fs::copy(&b.base, &saved).unwrap();
    replace_with_newer(
        &b.base,
        b.size,
        0x5eed,
        std::time::Duration::from_secs(3600),
    );
    let failure = served.wait_for_log_line("stream failed");
    assert!(
        failure.starts_with("backfill: stream failed: streaming: ")
            && failure.contains(&url)
            && failure.contains("the remote image changed")
            && failure.ends_with("; not starting it again (serving goes on)"),
        "{failure}"
    );
    // Whole clusters need nothing from the backing.
    qemu_io(
        Path::new(&served.uri),
        "raw",
        &[
            "write -P 0xab 2M 128K".into(),
            "read -P 0xab 2M 128K".into(),
        ],
    );
    expected[2 * MIB as usize..(2 * MIB + 2 * CLUSTER) as usize].fill(0xab);
    let log = served.stop();
    assert_eq!(
        log.lines().filter(|l| l.contains("stream failed")).count(),
        1,
        "{log}"
    );
    std::fs::rename(&saved, &b.base).unwrap();
    check_clean(&b.overlay);
    assert_eq!(info_json(&b.overlay)["backing-filename"], url.as_str());
    compare_with_bytes(&b.overlay, &expected, b.dir.path());
    drop(nginx);
}
