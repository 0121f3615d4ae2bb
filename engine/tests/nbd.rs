//! `backfill serve` with real NBD clients: `qemu-img`, `qemu-io`, `nbdinfo`,
//! `nbdcopy` and fio's nbd engine, judged by `qemu-img check`, `compare` and
//! `map`, and by references built here with plain byte vectors.
//!
//! Each test starts its own server on images in a fresh directory (a raw
//! backing file of seeded random bytes under a qcow2 overlay made by
//! `qemu-img create`), waits for its ready line, drives it, stops it with
//! SIGTERM (or SIGINT) and then asserts exit status 0 and a clean image.
//!
//! * `info_and_flags`: `qemu-img info` and `nbdinfo` see the virtual size
//!   (not a multiple of the cluster size), the block sizes, both meta
//!   contexts and every capability, multi-conn included.
//! * `export_names`: `--export NAME` is listed, reachable by NAME and by "",
//!   and no other name connects.
//! * `maps_follow_copy_on_read`: `qemu-img map` (base:allocation, and
//!   qemu:allocation-depth through `x-dirty-bitmap`) and `nbdinfo --map` of
//!   both contexts show what was read (filled: depth 1), written, zeroed and
//!   left in the backing file (depth 2); `qemu-img map` of the overlay agrees
//!   after shutdown.
//! * `compare_and_convert_equal_the_backing`: `qemu-img compare` and
//!   `convert -O raw` through NBD see the backing bytes, and reading the whole
//!   disk filled the whole overlay.
//! * `qemu_io_writes_match_reference`: aligned, unaligned, asynchronous, FUA,
//!   vectored and zero writes and discards from `qemu-io` read back, and after
//!   shutdown the overlay equals a reference built in Rust.
//! * `nbdcopy_both_ways`: out of the disk (in 256 KiB and in 32 MiB reads)
//!   equals the backing file; into the disk, the overlay equals the source
//!   after shutdown.
//! * `reads_sent_from_engine_buffers`: reads of 64 KiB and more go out of
//!   the engine's own buffers (lent, not copied); cold copy-on-read, warm
//!   overlay reads and reads across zero clusters (structured replies with
//!   holes between lent data), 64 requests in flight over several
//!   connections, each pass after the last one's buffers went back to the
//!   pools, equal a reference (`nbdcopy`, byte comparison; `qemu-img
//!   compare`).
//! * `fio_verify`: random writes at depth 16 with crc32c verification, and
//!   random reads at depth 32.
//! * `concurrent_clients`: four `qemu-io` processes writing their own regions
//!   at once, and four raw connections whose flushed writes are then visible
//!   on every connection (multi-conn).
//! * `read_only_export`: writes fail, reads work, the image file is unchanged.
//! * `tcp_listen`: `--listen 127.0.0.1:0` serves on the port it prints.
//! * `no_copy_on_read`: reads leave the overlay unallocated; writes still land.
//! * `sigint_stops_cleanly`: SIGINT, like SIGTERM, exits 0 with the data kept.
//!
//! No test sleeps or asserts on timing; `BACKFILL_SEED` replays the data.

mod common;
#[path = "common/nbd.rs"]
mod nbd_common;

use common::*;
use nbd_common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Output;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(program: &str, args: &[String], out: &Output) -> String {
    format!(
        "{program} {args:?} exited with {}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Runs a tool that must succeed; its stdout.
fn tool(program: &str, args: &[String]) -> String {
    let out = run_status(program, args);
    assert!(out.status.success(), "{}", describe(program, args, &out));
    text(&out.stdout)
}

/// `qemu-io -f raw` over NBD. Like `common::qemu_io`, it fails on any
/// "failed" in the output (a pattern mismatch prints one and exits 0).
fn qemu_io_uri(uri: &str, cmds: &[String]) {
    qemu_io(Path::new(uri), "raw", cmds);
}

/// `qemu-img compare -f raw -F raw URI RAW` must report identical contents.
fn compare_uri(uri: &str, raw: &Path) {
    tool(
        "qemu-img",
        &strings(&["compare", "-f", "raw", "-F", "raw", uri, &path_str(raw)]),
    );
}

/// `nbdcopy [OPTIONS] URI OUT` into a fresh file `out`; the bytes it
/// wrote.
fn nbdcopy_out(out: &Path, uri: &str, options: &[&str]) -> Vec<u8> {
    write_file(out, &[]);
    let mut args = strings(options);
    args.extend([uri.to_string(), path_str(out)]);
    tool("nbdcopy", &args);
    read_file(out)
}

/// Converts a map to (start, length, value) extents, merged.
fn extents(v: impl IntoIterator<Item = (u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    merge_extents(&v.into_iter().collect::<Vec<_>>())
}

/// `qemu-img map --output=json` entries of an image or URI, with the format.
fn qemu_map_args(args: &[String]) -> Vec<MapEntry> {
    let json = tool("qemu-img", args);
    let map: Vec<MapEntry> =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("qemu-img map: {e}\n{json}"));
    let mut pos = 0;
    for e in &map {
        assert_eq!(e.start, pos, "qemu-img map is not contiguous: {json}");
        pos = e.end();
    }
    map
}

/// base:allocation as `qemu-img map` shows it over NBD, as NBD state flags.
fn qemu_map_base(uri: &str) -> Vec<(u64, u64, u32)> {
    let map = qemu_map_args(&strings(&["map", "--output=json", "-f", "raw", uri]));
    extents(map.iter().map(|e| {
        let flags = match (e.data, e.zero) {
            (true, false) => 0,
            (true, true) => STATE_ZERO,
            (false, true) => STATE_HOLE | STATE_ZERO,
            (false, false) => panic!("qemu-img map over NBD: neither data nor zero: {e:?}"),
        };
        (e.start, e.length, flags)
    }))
}

/// qemu:allocation-depth as `qemu-img map` shows it: qemu's NBD client reads
/// the context given in `x-dirty-bitmap` as if it were base:allocation, so
/// depth 1 (bit 0, HOLE) shows as no data, depth 2 (bit 1, ZERO) as data and
/// zero, and depth 0 as plain data (checked against `qemu-nbd -A`).
fn qemu_map_depth(sock: &Path) -> Vec<(u64, u64, u32)> {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:allocation-depth",
        sock.display()
    );
    let map = qemu_map_args(&strings(&["map", "--output=json", "--image-opts", &opts]));
    extents(map.iter().map(|e| {
        let depth = match (e.data, e.zero) {
            (true, false) => 0,
            (false, false) => 1,
            (true, true) => 2,
            (false, true) => 3,
        };
        (e.start, e.length, depth)
    }))
}

/// `nbdinfo --map[=CONTEXT] URI`: lines of `offset length type description`.
fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let map_arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = tool("nbdinfo", &strings(&[&map_arg, uri]));
    extents(out.lines().filter(|l| !l.trim().is_empty()).map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert!(f.len() >= 3, "nbdinfo --map line {l:?}");
        let n = |s: &str| -> u64 {
            s.parse()
                .unwrap_or_else(|e| panic!("nbdinfo --map line {l:?}: {e}"))
        };
        (n(f[0]), n(f[1]), n(f[2]) as u32)
    }))
}

/// `nbdinfo --json --no-content URI`: the first export.
fn nbdinfo_json(uri: &str) -> Value {
    let out = tool("nbdinfo", &strings(&["--json", "--no-content", uri]));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo: {e}\n{out}"));
    v["exports"][0].clone()
}

/// Exit code of `nbdinfo --can X URI` / `--is X` (0 true, 2 false).
fn nbdinfo_code(args: &[&str]) -> i32 {
    let out = run_status("nbdinfo", args);
    out.status.code().expect("nbdinfo killed by a signal")
}

/// The map the overlay should have, by cluster: `f(cluster offset)`.
fn cluster_map(size: u64, f: impl Fn(u64) -> u32) -> Vec<(u64, u64, u32)> {
    extents((0..size.div_ceil(CLUSTER)).map(|i| {
        let o = i * CLUSTER;
        (o, CLUSTER.min(size - o), f(o))
    }))
}

// ------------------------------------------------------------------- info

#[test]
fn info_and_flags() {
    let seed = seed_from_env("info_and_flags");
    // 10 MiB + 12.5 KiB: the last cluster is partial.
    let size = 10 * MIB + 12 * KIB + 512;
    let f = Fixture::with_backing("nbd-info", size, seed);
    let server = f.serve(&[]);

    let json = tool(
        "qemu-img",
        &strings(&["info", "--output=json", "-f", "raw", &server.uri]),
    );
    let info: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(info["virtual-size"], size, "qemu-img info: {json}");

    let e = nbdinfo_json(&server.uri);
    assert_eq!(e["export-size"], size, "{e}");
    assert_eq!(e["export-name"], "", "{e}");
    assert_eq!(e["block_size_minimum"], 1, "{e}");
    assert_eq!(e["block_size_preferred"], 4096, "{e}");
    assert_eq!(e["block_size_maximum"], 32 * MIB, "{e}");
    assert_eq!(e["is_read_only"], false, "{e}");
    for cap in [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(e[cap], true, "{cap}: {e}");
    }
    let mut contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap_or_else(|| panic!("no contexts: {e}"))
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    contexts.sort_unstable();
    assert_eq!(contexts, [BASE_ALLOCATION, ALLOCATION_DEPTH], "{e}");
    assert_eq!(nbdinfo_code(&["--can", "multi-conn", &server.uri]), 0);
    assert_eq!(nbdinfo_code(&["--is", "read-only", &server.uri]), 2);
    assert_eq!(nbdinfo_code(&["--size", &server.uri]), 0);
    let out = tool("nbdinfo", &strings(&["--size", &server.uri]));
    assert_eq!(out.trim(), size.to_string());

    server.stop();
    f.check_image(&f.data);
}

#[test]
fn export_names() {
    let seed = seed_from_env("export_names");
    let f = Fixture::with_backing("nbd-name", 4 * MIB, seed);
    let server = f.serve(&["--export", "vm1"]);
    assert!(server.uri.contains("/vm1?"), "{}", server.uri);

    let out = tool(
        "nbdinfo",
        &strings(&["--list", "--json", "--no-content", &server.uri]),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vm1"], "{out}");
    for name in ["vm1", ""] {
        let uri = server.uri_for(name);
        assert_eq!(nbdinfo_json(&uri)["export-size"], 4 * MIB, "{uri}");
        compare_uri(&uri, f.base());
    }
    let bad = server.uri_for("nope");
    let out = run_status("nbdinfo", [&bad]);
    assert!(
        !out.status.success(),
        "{}",
        describe("nbdinfo", &[bad], &out)
    );

    server.stop();
    f.check_image(&f.data);
}

// -------------------------------------------------------------------- maps

#[test]
fn maps_follow_copy_on_read() {
    let seed = seed_from_env("maps_follow_copy_on_read");
    let size = 16 * MIB;
    let f = Fixture::with_backing("nbd-map", size, seed);
    let server = f.serve(&[]);
    let uri = server.uri.clone();

    // Before any I/O: everything is in the backing file (depth 2), data.
    assert_eq!(qemu_map_base(&uri), vec![(0, size, 0)], "base:allocation");
    assert_eq!(qemu_map_depth(server.sock()), vec![(0, size, 2)], "depth");
    assert_eq!(nbdinfo_map(&uri, None), vec![(0, size, 0)]);
    assert_eq!(
        nbdinfo_map(&uri, Some(ALLOCATION_DEPTH)),
        vec![(0, size, 2)]
    );

    // Read the first MiB (copy-on-read fills it), write 64 KiB, zero 128
    // KiB. qemu-io's final flush also waits for the fills' write-backs.
    qemu_io_uri(
        &uri,
        &[
            "read 0 1M".into(),
            "write -P 0xab 4M 64k".into(),
            "write -z 6M 128k".into(),
            "flush".into(),
        ],
    );
    let local = |o: u64| o < MIB || (4 * MIB..4 * MIB + 64 * KIB).contains(&o);
    let zeroed = |o: u64| (6 * MIB..6 * MIB + 128 * KIB).contains(&o);
    let depth = cluster_map(size, |o| if local(o) || zeroed(o) { 1 } else { 2 });
    let base = cluster_map(size, |o| if zeroed(o) { OVERLAY_ZERO } else { 0 });

    assert_eq!(qemu_map_depth(server.sock()), depth, "qemu-img map, depth");
    assert_eq!(
        nbdinfo_map(&uri, Some(ALLOCATION_DEPTH)),
        depth,
        "nbdinfo --map=qemu:allocation-depth"
    );
    assert_eq!(nbdinfo_map(&uri, None), base, "nbdinfo --map");
    assert_eq!(qemu_map_base(&uri), base, "qemu-img map, base:allocation");

    server.stop();
    let mut expected = f.data.clone();
    expected[4 * MIB as usize..4 * MIB as usize + 64 * 1024].fill(0xab);
    expected[6 * MIB as usize..6 * MIB as usize + 128 * 1024].fill(0);
    f.check_image(&expected);
    // The overlay itself: filled and written clusters are in it (depth 0),
    // the rest is in the backing file (depth 1); the zeroed ones are zero.
    for e in qemu_map(&f.image) {
        for o in (e.start..e.end()).step_by(CLUSTER as usize) {
            let want = if local(o) || zeroed(o) { 0 } else { 1 };
            assert_eq!(e.depth, want, "qemu-img map of the overlay at {o}: {e:?}");
            if zeroed(o) {
                assert!(e.zero && !e.data, "zeroed cluster at {o}: {e:?}");
            }
        }
    }
}

// ------------------------------------------------------------ whole disks

#[test]
fn compare_and_convert_equal_the_backing() {
    let seed = seed_from_env("compare_and_convert_equal_the_backing");
    // Not a multiple of the cluster size.
    let size = 16 * MIB + 20 * KIB;
    let f = Fixture::with_backing("nbd-cmp", size, seed);
    let server = f.serve(&[]);

    compare_uri(&server.uri, f.base());
    let out = f.path("out.raw");
    tool(
        "qemu-img",
        &strings(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &server.uri,
            &path_str(&out),
        ]),
    );
    assert_same_bytes(&read_file(&out), &f.data, "qemu-img convert from NBD");

    server.stop();
    f.check_image(&f.data);
    // Every byte was read, so copy-on-read filled every cluster.
    for e in qemu_map(&f.image) {
        assert_eq!(e.depth, 0, "after reading everything: {e:?}");
    }
}

#[test]
fn qemu_io_writes_match_reference() {
    let seed = seed_from_env("qemu_io_writes_match_reference");
    let size = 16 * MIB;
    let f = Fixture::with_backing("nbd-qio", size, seed);
    let server = f.serve(&[]);
    let mut reference = f.data.clone();
    let mut fill = |off: u64, len: u64, byte: u8| {
        reference[off as usize..(off + len) as usize].fill(byte);
    };

    // (offset, length, pattern byte; 0 for zero writes and discards).
    let aio_c = 5 * MIB + 8 * KIB + 120;
    let fua = 6 * MIB + 4000;
    let unaligned_zero = 8 * MIB + 1234;
    let first: Vec<String> = vec![
        "write -P 0xab 1M 64k".into(),
        "write -P 0x5c 1000 3000".into(),
        "aio_write -P 0x11 3M 128k".into(),
        "aio_write -P 0x22 5M 4k".into(),
        format!("aio_write -P 0x33 {aio_c} 5000"),
        "aio_flush".into(),
        format!("write -f -P 0x44 {fua} 70000"),
        "write -z 7M 192k".into(),
        format!("write -z {unaligned_zero} 5000"),
        "discard 9M 128k".into(),
        "writev -P 0x66 10M 4k 8k".into(),
        "flush".into(),
        "read -P 0xab 1M 64k".into(),
        "read -P 0x5c 1000 3000".into(),
        "read -P 0x11 3M 128k".into(),
        "read -P 0x22 5M 4k".into(),
        format!("read -P 0x33 {aio_c} 5000"),
        format!("read -P 0x44 {fua} 70000"),
        "read -P 0 7M 192k".into(),
        format!("read -P 0 {unaligned_zero} 5000"),
        "read -P 0 9M 128k".into(),
        "read -P 0x66 10M 12k".into(),
    ];
    qemu_io_uri(&server.uri, &first);
    fill(MIB, 64 * KIB, 0xab);
    fill(1000, 3000, 0x5c);
    fill(3 * MIB, 128 * KIB, 0x11);
    fill(5 * MIB, 4 * KIB, 0x22);
    fill(aio_c, 5000, 0x33);
    fill(fua, 70000, 0x44);
    fill(7 * MIB, 192 * KIB, 0);
    fill(unaligned_zero, 5000, 0);
    fill(9 * MIB, 128 * KIB, 0);
    fill(10 * MIB, 12 * KIB, 0x66);

    // A second connection overwrites parts of the first one's writes, across
    // cluster boundaries, and reads what it did not write.
    let cross = MIB + 60 * KIB;
    let second: Vec<String> = vec![
        format!("write -P 0x77 {cross} 8k"),
        "write -z 3M 4k".into(),
        format!("read -P 0xab {} 4k", MIB),
        format!("read -P 0x77 {cross} 8k"),
        "read -P 0 3M 4k".into(),
        format!("read -P 0x11 {} 124k", 3 * MIB + 4 * KIB),
        "read -P 0x5c 1000 3000".into(),
    ];
    qemu_io_uri(&server.uri, &second);
    fill(cross, 8 * KIB, 0x77);
    fill(3 * MIB, 4 * KIB, 0);

    let ref_path = f.path("ref.raw");
    write_file(&ref_path, &reference);
    compare_uri(&server.uri, &ref_path);

    server.stop();
    check_clean(&f.image);
    compare_identical(&f.image, &ref_path);
}

#[test]
fn nbdcopy_both_ways() {
    let seed = seed_from_env("nbdcopy_both_ways");
    let size = 16 * MIB;
    let f = Fixture::with_backing("nbd-copy", size, seed);
    let server = f.serve(&[]);

    let out = f.path("out.raw");
    assert_same_bytes(
        &nbdcopy_out(&out, &server.uri, &[]),
        &f.data,
        "nbdcopy out of the disk",
    );
    // 32 MiB reads, four in flight: each reply goes out of its own buffer
    // in many short sends (a Unix socket holds far less).
    let options = ["--request-size=33554432", "--requests=4"];
    assert_same_bytes(
        &nbdcopy_out(&out, &server.uri, &options),
        &f.data,
        "nbdcopy out of the disk, 32 MiB reads",
    );

    let other = f.path("other.raw");
    let data = write_random_file(&other, size, seed ^ 0x5eed);
    tool("nbdcopy", &[path_str(&other), server.uri.clone()]);
    compare_uri(&server.uri, &other);

    server.stop();
    f.check_image(&data);
}

#[test]
fn reads_sent_from_engine_buffers() {
    let seed = seed_from_env("reads_sent_from_engine_buffers");
    let size = 32 * MIB;
    let f = Fixture::with_backing("nbd-lent", size, seed);
    let server = f.serve(&[]);

    // Zero clusters and zeroed parts of clusters amid the data.
    let zeroed: [(u64, u64); 3] = [(MIB, 192 * KIB), (5_000_000, 300_000), (20 * MIB, 64 * KIB)];
    let cmds: Vec<String> = zeroed
        .iter()
        .map(|(o, l)| format!("write -z {o} {l}"))
        .collect();
    qemu_io_uri(&server.uri, &cmds);
    let mut reference = f.data.clone();
    for &(o, l) in &zeroed {
        reference[o as usize..(o + l) as usize].fill(0);
    }

    let out = f.path("out.raw");
    let copy = |request: &str, requests: &str, what: &str| {
        let size = format!("--request-size={request}");
        let count = format!("--requests={requests}");
        let got = nbdcopy_out(&out, &server.uri, &[&size, &count]);
        assert_same_bytes(&got, &reference, what);
    };
    // Cold: every read is a copy-on-read fill, sent from the fill's buffer.
    copy("65536", "64", "cold 64 KiB reads");
    // Warm, twice: overlay reads sent from pool buffers that earlier
    // replies were sent from.
    copy("65536", "64", "warm 64 KiB reads");
    copy("1048576", "16", "warm 1 MiB reads across zero clusters");
    let reference_file = f.path("reference.raw");
    write_file(&reference_file, &reference);
    compare_uri(&server.uri, &reference_file);

    server.stop();
    f.check_image(&reference);
}

#[test]
fn fio_verify() {
    let seed = seed_from_env("fio_verify");
    let size = 16 * MIB;
    let f = Fixture::with_backing("nbd-fio", size, seed);
    let server = f.serve(&[]);

    let fio = |extra: &[&str]| -> Value {
        let mut args = strings(&[
            "--name=nbd",
            "--ioengine=nbd",
            "--bs=4k",
            "--size=16M",
            "--output-format=json",
        ]);
        args.push(format!("--uri={}", server.uri));
        args.extend(strings(extra));
        // In the test's directory, and no verify state file: fio writes one
        // in its working directory otherwise.
        args.push("--verify_state_save=0".into());
        require_tool("fio");
        let out = std::process::Command::new("fio")
            .args(&args)
            .current_dir(f.dir.path())
            .output()
            .expect("running fio");
        assert!(out.status.success(), "{}", describe("fio", &args, &out));
        let out = text(&out.stdout);
        // fio may print notes before the JSON.
        let json = &out[out
            .find('{')
            .unwrap_or_else(|| panic!("fio: no JSON: {out}"))..];
        let v: Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}\n{out}"));
        let job = v["jobs"][0].clone();
        assert_eq!(job["error"], 0, "fio {args:?}: {job}");
        job
    };
    let job = fio(&[
        "--rw=randwrite",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]);
    assert_eq!(job["write"]["io_bytes"], size, "{job}");
    assert_eq!(job["read"]["io_bytes"], size, "the verify pass: {job}");
    let job = fio(&["--rw=randread", "--iodepth=32"]);
    assert_eq!(job["read"]["io_bytes"], size, "{job}");

    server.stop();
    check_clean(&f.image);
}

// -------------------------------------------------------------- multi-conn

#[test]
fn concurrent_clients() {
    let seed = seed_from_env("concurrent_clients");
    let size = 16 * MIB;
    let f = Fixture::with_backing("nbd-conc", size, seed);
    // Three cores: stripes of the disk on an odd number of owners.
    let server = f.serve(&["--cores", "3"]);
    assert_eq!(
        nbdinfo_code(&["--can", "multi-conn", &server.uri]),
        0,
        "the server must offer multi-conn"
    );
    let mut reference = f.data.clone();

    // Four qemu-io processes at once, each writing its own 2 MiB region
    // (unaligned, across clusters) while reading the whole disk.
    let region = |i: u64| i * 2 * MIB + 777;
    let pattern = |i: u64| 0x10 + i as u8;
    let barrier = std::sync::Barrier::new(4);
    std::thread::scope(|s| {
        for i in 0..4u64 {
            let (uri, barrier) = (&server.uri, &barrier);
            s.spawn(move || {
                let mut cmds = Vec::new();
                for k in 0..8 {
                    let off = region(i) + k * 256 * KIB;
                    cmds.push(format!("aio_write -P {:#x} {off} 256k", pattern(i)));
                }
                cmds.push("aio_flush".into());
                cmds.push("read 0 16M".into());
                cmds.push(format!("read -P {:#x} {} 2M", pattern(i), region(i)));
                barrier.wait();
                qemu_io_uri(uri, &cmds);
            });
        }
    });
    for i in 0..4 {
        let o = region(i) as usize;
        reference[o..o + 2 * MIB as usize].fill(pattern(i));
    }
    let ref_path = f.path("ref.raw");
    write_file(&ref_path, &reference);
    compare_uri(&server.uri, &ref_path);

    // Four raw connections write interleaved 64 KiB stripes, flush, wait for
    // each other, then each reads the whole disk: a flushed write is visible
    // on every connection (CAN_MULTI_CONN).
    let mut rng = Rng::new(seed ^ 0xc0ffee);
    let stripe = 64 * KIB;
    let mut plans: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); 4];
    for (k, plan) in plans.iter_mut().enumerate() {
        for _ in 0..32 {
            let s = rng.below(size / stripe / 4) * 4 + k as u64;
            let start = rng.below(stripe - 1);
            let len = rng.range(1, stripe - start + 1);
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data);
            let off = s * stripe + start;
            reference[off as usize..(off + len) as usize].copy_from_slice(&data);
            plan.push((off, data));
        }
    }
    let reference = &reference;
    let barrier = std::sync::Barrier::new(4);
    std::thread::scope(|s| {
        for plan in &plans {
            let (server, barrier) = (&server, &barrier);
            s.spawn(move || {
                let mut c = server.client();
                assert_ne!(c.info.flags & TF_CAN_MULTI_CONN, 0);
                barrier.wait();
                // One at a time: a connection's writes may overlap, and
                // NBD does not order the requests in flight.
                for (off, data) in plan {
                    c.write_ok(*off, data, 0);
                }
                c.flush_ok();
                barrier.wait();
                for off in (0..size).step_by(MIB as usize) {
                    assert_same_bytes(
                        &c.read_ok(off, MIB as u32),
                        &reference[off as usize..(off + MIB) as usize],
                        &format!("multi-conn read at {off}"),
                    );
                }
                c.disconnect();
            });
        }
    });

    server.stop();
    f.check_image(reference);
}

// -------------------------------------------------------------- modes

#[test]
fn read_only_export() {
    let seed = seed_from_env("read_only_export");
    let size = 8 * MIB;
    let f = Fixture::with_backing("nbd-ro", size, seed);
    let before = read_file(&f.image);
    let server = f.serve(&["--read-only"]);
    let uri = server.uri.clone();

    assert_eq!(nbdinfo_code(&["--is", "read-only", &uri]), 0);
    assert_eq!(nbdinfo_code(&["--can", "write", &uri]), 2);
    // qemu refuses to open a read-only export for writing, or the write fails.
    let args = strings(&["-f", "raw", "-c", "write -P 0x1 0 4k", &uri]);
    let out = run_status("qemu-io", &args);
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(
        !out.status.success() && !all.contains("wrote"),
        "{}",
        describe("qemu-io", &args, &out)
    );
    let args = strings(&["-r", "-f", "raw", "-c", "write -P 0x1 0 4k", &uri]);
    let out = run_status("qemu-io", &args);
    assert!(
        !out.status.success(),
        "{}",
        describe("qemu-io", &args, &out)
    );
    let other = f.path("other.raw");
    write_random_file(&other, size, seed ^ 1);
    let args = vec![path_str(&other), uri.clone()];
    let out = run_status("nbdcopy", &args);
    assert!(
        !out.status.success(),
        "{}",
        describe("nbdcopy", &args, &out)
    );

    compare_uri(&uri, f.base());
    let args = strings(&["-r", "-f", "raw", "-c", "read 0 8M", &uri]);
    tool("qemu-io", &args);
    assert_eq!(
        nbdinfo_map(&uri, Some(ALLOCATION_DEPTH)),
        vec![(0, size, 2)]
    );

    server.stop();
    assert!(
        read_file(&f.image) == before,
        "a read-only export changed the image file"
    );
    f.check_image(&f.data);
}

#[test]
fn tcp_listen() {
    let seed = seed_from_env("tcp_listen");
    let size = 8 * MIB;
    let f = Fixture::with_backing("nbd-tcp", size, seed);
    let server = f.serve(&["--listen", "127.0.0.1:0"]);
    let uri = server.uri.clone();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");

    let json = tool(
        "qemu-img",
        &strings(&["info", "--output=json", "-f", "raw", &uri]),
    );
    let info: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(info["virtual-size"], size, "{json}");
    assert_eq!(nbdinfo_json(&uri)["export-size"], size);
    compare_uri(&uri, f.base());
    qemu_io_uri(
        &uri,
        &[
            "write -P 0x3c 2M 100k".into(),
            "read -P 0x3c 2M 100k".into(),
        ],
    );

    server.stop();
    let mut expected = f.data.clone();
    expected[2 * MIB as usize..2 * MIB as usize + 100 * 1024].fill(0x3c);
    f.check_image(&expected);
}

#[test]
fn no_copy_on_read() {
    let seed = seed_from_env("no_copy_on_read");
    let size = 8 * MIB;
    let f = Fixture::with_backing("nbd-nocor", size, seed);
    let server = f.serve(&["--no-copy-on-read"]);
    let uri = server.uri.clone();

    let out = f.path("out.raw");
    tool(
        "qemu-img",
        &strings(&["convert", "-f", "raw", "-O", "raw", &uri, &path_str(&out)]),
    );
    assert_same_bytes(&read_file(&out), &f.data, "reads without copy-on-read");
    qemu_io_uri(&uri, &["write -P 0x3c 1M 64k".into(), "flush".into()]);
    let written = |o: u64| (MIB..MIB + 64 * KIB).contains(&o);
    let depth = cluster_map(size, |o| if written(o) { 1 } else { 2 });
    assert_eq!(nbdinfo_map(&uri, Some(ALLOCATION_DEPTH)), depth);

    server.stop();
    let mut expected = f.data.clone();
    expected[MIB as usize..(MIB + 64 * KIB) as usize].fill(0x3c);
    f.check_image(&expected);
    for e in qemu_map(&f.image) {
        let want = if written(e.start) { 0 } else { 1 };
        assert_eq!(e.depth, want, "qemu-img map of the overlay: {e:?}");
    }
}

#[test]
fn sigint_stops_cleanly() {
    let seed = seed_from_env("sigint_stops_cleanly");
    let size = 8 * MIB;
    let f = Fixture::with_backing("nbd-int", size, seed);
    let server = f.serve(&["--cores", "1"]);
    qemu_io_uri(&server.uri, &["write -P 0x42 100000 300000".into()]);
    server.stop_with(libc::SIGINT);
    let mut expected = f.data.clone();
    expected[100_000..400_000].fill(0x42);
    f.check_image(&expected);
}
