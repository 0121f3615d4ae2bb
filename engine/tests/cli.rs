//! Tests of the `backfill` binary as scripts use it, judged by qemu's tools.
//!
//! Each test runs the built binary on images in a fresh temporary directory
//! and checks the result with an independent oracle: `qemu-img info`,
//! `check`, `map`, `compare` and `convert`, and `qemu-io` to write known
//! patterns. A test that needs a qemu tool fails when it is missing under
//! `CI=true` (scripts/test installs qemu-utils); elsewhere it says loudly
//! that it skipped. No test sleeps or asserts on timing.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

fn backfill() -> Command {
    Command::new(env!("CARGO_BIN_EXE_backfill"))
}

/// True when `tool` can run. Missing under CI is a failure, never a skip.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required under CI=true but is not installed (scripts/test installs qemu-utils)"
        );
        eprintln!("SKIPPED: {tool} is not installed; under CI=true this test fails instead");
    }
    found
}

fn have_qemu() -> bool {
    have("qemu-img") && have("qemu-io")
}

/// Asserts the exit code, showing the command's output when it differs.
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cmd` in `dir` and returns its output, whatever its status.
fn run_in(dir: &Path, cmd: &mut Command) -> Output {
    cmd.current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd` in `dir`; panics with its output unless it exits 0.
fn ok_in(dir: &Path, cmd: &mut Command) -> String {
    let out = run_in(dir, cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn qemu_img(args: &[&str]) -> Command {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    cmd
}

/// `backfill` with arguments.
fn bf(args: &[&str]) -> Command {
    let mut cmd = backfill();
    cmd.args(args);
    cmd
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

/// Deterministic random bytes.
fn random_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    StdRng::seed_from_u64(seed).fill_bytes(&mut buf);
    buf
}

/// Writes a raw backing image of `len` bytes: random data with an all-zero
/// hole of `len / 4` bytes starting at `len / 2`.
fn write_base(path: &Path, len: u64, seed: u64) -> Vec<u8> {
    let mut data = random_bytes(len, seed);
    let hole = (len / 2) as usize..(len / 2 + len / 4) as usize;
    data[hole].fill(0);
    fs::write(path, &data).unwrap();
    data
}

struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    fn new() -> Images {
        Images {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn ok(&self, cmd: &mut Command) -> String {
        ok_in(self.path(), cmd)
    }
    fn run(&self, cmd: &mut Command) -> Output {
        run_in(self.path(), cmd)
    }
    /// `qemu-img info --output=json`.
    fn qemu_info(&self, image: &str) -> Value {
        json(&self.ok(&mut qemu_img(&["info", "--output=json", image])))
    }
    /// `qemu-img check`: its exit code.
    fn qemu_check(&self, image: &str) -> i32 {
        let out = self.run(&mut qemu_img(&["check", image]));
        out.status
            .code()
            .expect("qemu-img check exited by a signal")
    }
    /// A qcow2 overlay made by qemu-img (not by us), on a raw backing file.
    fn qemu_overlay(&self, image: &str, base: &str, size: Option<u64>) {
        let mut args = vec![
            "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", image,
        ];
        let size_arg = size.map(|s| s.to_string());
        if let Some(size) = &size_arg {
            args.push(size);
        }
        self.ok(&mut qemu_img(&args));
    }
    /// Runs qemu-io commands on an image.
    fn qemu_io(&self, image: &str, commands: &[&str]) {
        let mut cmd = Command::new("qemu-io");
        for c in commands {
            cmd.args(["-c", c]);
        }
        cmd.arg(image);
        let out = self.ok(&mut cmd);
        assert!(
            !out.contains("failed") && !out.contains("error"),
            "qemu-io {commands:?}: {out}"
        );
    }
}

// ---------------------------------------------------------------- arguments

#[test]
fn help_lists_every_command() {
    let out = ok_in(Path::new("."), &mut bf(&["--help"]));
    for command in ["create", "info", "convert", "bench", "check", "demo"] {
        assert!(
            out.contains(command),
            "--help does not mention {command}:\n{out}"
        );
    }
}

#[test]
fn bad_arguments_exit_1_with_a_message() {
    let images = Images::new();
    for args in [
        &["create", "-f", "qcow2", "x.qcow2", "12Q"][..],
        &["create", "-f", "vmdk", "x.qcow2", "1M"][..],
        &["create", "-o", "lazy_refcounts=on", "x.qcow2", "1M"][..],
        &["create", "x.qcow2"][..],
        &["create", "-b", "gone.raw", "-F", "raw", "x.qcow2"][..],
        &["create", "-b", "gone.raw", "x.qcow2"][..],
        &["demo", "--size", "1000"][..],
    ] {
        let out = images.run(&mut bf(args));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("backfill: "), "{args:?}: {stderr}");
        // Each context once: "creating x.qcow2: creating x.qcow2: ..." was
        // a bug.
        assert!(
            stderr.matches("creating").count() <= 1,
            "{args:?}: {stderr}"
        );
        assert!(
            !images.file("x.qcow2").exists(),
            "{args:?} created an image"
        );
    }
    // Usage errors exit 1 as well (never 2, which means "corrupt" for check).
    for args in [
        &["frobnicate"][..],
        &["bench"][..],
        &["bench", "--pattern", "zigzag", "x"][..],
    ] {
        let out = images.run(&mut bf(args));
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn missing_image_is_an_error_not_a_crash() {
    let images = Images::new();
    for command in ["info", "check"] {
        let out = images.run(&mut bf(&[command, "missing.qcow2"]));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        assert!(stderr.starts_with("backfill: "), "{command}: {stderr}");
        assert!(stderr.contains("missing.qcow2"), "{command}: {stderr}");
    }
}

// ------------------------------------------------------------------- create

#[test]
fn create_makes_what_qemu_img_would() {
    if !have("qemu-img") {
        return;
    }
    let images = Images::new();
    write_base(&images.file("base.raw"), 4 * MIB, 1);

    // The size comes from the backing file when none is given.
    let out = images.ok(&mut bf(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "disk.qcow2",
    ]));
    assert!(
        out.starts_with("Formatting 'disk.qcow2', fmt=qcow2"),
        "{out}"
    );
    let info = images.qemu_info("disk.qcow2");
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 4 * MIB, "{info}");
    assert_eq!(info["cluster-size"], 65536, "{info}");
    assert_eq!(info["backing-filename"], "base.raw", "{info}");
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "{info}");
    assert_eq!(images.qemu_check("disk.qcow2"), 0);

    // Options, a size with a suffix larger than the backing file, old compat.
    images.ok(&mut bf(&[
        "create",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "-o",
        "cluster_size=128K,compat=0.10",
        "big.qcow2",
        "8M",
    ]));
    let info = images.qemu_info("big.qcow2");
    assert_eq!(info["virtual-size"], 8 * MIB, "{info}");
    assert_eq!(info["cluster-size"], 131072, "{info}");
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10", "{info}");
    assert_eq!(info["backing-filename"], "base.raw", "{info}");
    assert_eq!(images.qemu_check("big.qcow2"), 0);

    // -u: a backing file that is not there (a server not up yet), not
    // opened; -q: nothing printed. qemu-img reads the header it wrote.
    let uri = "nbd+unix:///disk?socket=/nonexistent/nbd.sock";
    let out = images.ok(&mut bf(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        uri,
        "-F",
        "raw",
        "later.qcow2",
        "10G",
    ]));
    assert_eq!(out, "", "-q prints nothing");
    let info = images.qemu_info("later.qcow2");
    assert_eq!(info["virtual-size"], 10u64 << 30, "{info}");
    assert_eq!(info["backing-filename"], uri, "{info}");
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    // Without a size or a format, -u cannot do without the backing file.
    for args in [
        &["create", "-u", "-b", uri, "-F", "raw", "x.qcow2"][..],
        &["create", "-u", "-b", "base.raw", "x.qcow2", "1M"][..],
    ] {
        let out = images.run(&mut bf(args));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains("-u: the backing file is not opened"),
            "{args:?}"
        );
    }

    // No backing file at all.
    images.ok(&mut bf(&["create", "-f", "qcow2", "plain.qcow2", "1M"]));
    let info = images.qemu_info("plain.qcow2");
    assert_eq!(info["virtual-size"], MIB, "{info}");
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_eq!(images.qemu_check("plain.qcow2"), 0);
}

// --------------------------------------------------------------------- info

#[test]
fn info_reports_where_bytes_live() {
    if !have_qemu() {
        return;
    }
    let images = Images::new();
    write_base(&images.file("base.raw"), 4 * MIB, 2);
    images.qemu_overlay("disk.qcow2", "base.raw", None);
    images.qemu_io("disk.qcow2", &["write -P 0x5a 0 64k", "write -z 1M 64k"]);

    let info = json(&images.ok(&mut bf(&["info", "--json", "disk.qcow2"])));
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual_size"], 4 * MIB, "{info}");
    assert_eq!(info["cluster_size"], 65536, "{info}");
    assert_eq!(info["dirty"], false, "{info}");
    assert_eq!(info["corrupt"], false, "{info}");
    assert_eq!(info["overlay_data_bytes"], 65536, "{info}");
    assert_eq!(info["overlay_zero_bytes"], 65536, "{info}");
    let chain = info["backing_chain"]
        .as_array()
        .expect("backing_chain is a list");
    assert_eq!(chain.len(), 1, "{info}");
    assert_eq!(chain[0]["format"], "raw", "{info}");
    assert_eq!(chain[0]["virtual_size"], 4 * MIB, "{info}");
    assert!(
        chain[0]["filename"].as_str().unwrap().ends_with("base.raw"),
        "{info}"
    );
    let parts: u64 = [
        "overlay_data_bytes",
        "overlay_zero_bytes",
        "backing_bytes",
        "unallocated_bytes",
    ]
    .iter()
    .map(|k| {
        info[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing: {info}"))
    })
    .sum();
    assert_eq!(parts, 4 * MIB, "every byte lives somewhere: {info}");

    // `backfill info`'s text holds each of `lines`.
    let human_has = |lines: &[&str]| {
        let human = images.ok(&mut bf(&["info", "disk.qcow2"]));
        for line in lines {
            assert!(human.contains(line), "no {line:?} in:\n{human}");
        }
    };
    human_has(&[
        "file format: qcow2",
        "virtual size: 4 MiB (4194304 bytes)",
        "cluster_size: 65536",
        "backing file: base.raw",
        "backing file format: raw",
    ]);

    // With its backing file gone, the overlay is still described (exit 0,
    // as qemu-img info): what it holds, the backing file its header names,
    // and why the chain is unavailable.
    fs::rename(images.file("base.raw"), images.file("moved.raw")).unwrap();
    human_has(&[
        "backing file: base.raw\n",
        "backing file format: raw\n",
        "    overlay data: 64 KiB (65536 bytes, 1.6%)\n",
        "Backing chain: unavailable: ",
        "No such file",
    ]);
    let info = json(&images.ok(&mut bf(&["info", "--json", "disk.qcow2"])));
    assert_eq!(info["overlay_data_bytes"], 65536, "{info}");
    assert_eq!(info["overlay_zero_bytes"], 65536, "{info}");
    assert_eq!(info["backing_bytes"], 4 * MIB - 2 * 65536, "{info}");
    assert_eq!(info["unallocated_bytes"], 0, "{info}");
    assert!(info["backing_error"].is_string(), "{info}");
}

// -------------------------------------------------------------------- check

/// Offsets in a qcow2 header (docs/interop/qcow2.rst).
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Sets the 16-bit refcount of the host cluster holding `host_offset`.
fn set_refcount(image: &Path, host_offset: u64, refcount: u16) {
    let mut b = fs::read(image).unwrap();
    let cluster_bits = be32(&b, 20);
    assert_eq!(be32(&b, 4), 3, "a version 3 image");
    assert_eq!(be32(&b, 96), 4, "16-bit refcounts");
    let refcount_table = be64(&b, 48) as usize;
    let index = host_offset >> cluster_bits;
    let per_block = 1u64 << (cluster_bits - 1);
    let block = be64(&b, refcount_table + 8 * (index / per_block) as usize) as usize;
    assert_ne!(block, 0, "the cluster has a refcount block");
    let at = block + 2 * (index % per_block) as usize;
    b[at..at + 2].copy_from_slice(&refcount.to_be_bytes());
    fs::write(image, b).unwrap();
}

#[test]
fn check_exit_codes_follow_qemu_img() {
    if !have_qemu() {
        return;
    }
    let images = Images::new();
    write_base(&images.file("base.raw"), 2 * MIB, 3);
    for name in ["clean.qcow2", "leaky.qcow2", "corrupt.qcow2"] {
        images.qemu_overlay(name, "base.raw", None);
        images.qemu_io(name, &["write -P 0x11 0 64k", "write -P 0x22 1M 4k"]);
    }

    let out = images.run(&mut bf(&["check", "clean.qcow2"]));
    assert_exit(&out, 0);
    assert!(
        !text(&out.stdout).trim().is_empty(),
        "check prints its verdict"
    );

    // A refcount one too high leaks the cluster: qemu-img check exits 3.
    set_refcount(&images.file("leaky.qcow2"), 0, 2);
    assert_eq!(images.qemu_check("leaky.qcow2"), 3, "the damage is a leak");
    let out = images.run(&mut bf(&["check", "leaky.qcow2"]));
    assert_exit(&out, 3);

    // A zero refcount on the live L1 table is corruption: exit 2.
    let header = fs::read(images.file("corrupt.qcow2")).unwrap();
    let l1_table = be64(&header, 40);
    set_refcount(&images.file("corrupt.qcow2"), l1_table, 0);
    assert_eq!(
        images.qemu_check("corrupt.qcow2"),
        2,
        "the damage is corruption"
    );
    let out = images.run(&mut bf(&["check", "corrupt.qcow2"]));
    assert_exit(&out, 2);
}

/// `check --repair` fixes what `qemu-img check -r all` fixes (a leak, a
/// refcount too low on a live table), judged by `qemu-img check` and by
/// comparing the repaired image's content with the undamaged one's.
#[test]
fn check_repair_fixes_leaks_and_refcount_errors_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let images = Images::new();
    write_base(&images.file("base.raw"), 2 * MIB, 5);
    for name in ["reference.qcow2", "leaky.qcow2", "low.qcow2"] {
        images.qemu_overlay(name, "base.raw", None);
        images.qemu_io(name, &["write -P 0x11 0 64k", "write -P 0x22 1M 4k"]);
    }
    set_refcount(&images.file("leaky.qcow2"), 0, 2);
    let l1_table = be64(&fs::read(images.file("low.qcow2")).unwrap(), 40);
    set_refcount(&images.file("low.qcow2"), l1_table, 0);
    for (name, damaged_code) in [("leaky.qcow2", 3), ("low.qcow2", 2)] {
        assert_eq!(images.qemu_check(name), damaged_code, "{name} is damaged");
        // The same damage repaired by qemu-img, for comparison.
        let copy = format!("qemu-{name}");
        fs::copy(images.file(name), images.file(&copy)).unwrap();
        let out = images.run(&mut qemu_img(&["check", "-r", "all", &copy]));
        assert_eq!(
            out.status.code(),
            Some(0),
            "qemu-img check -r all {copy}: {}",
            text(&out.stdout)
        );

        let out = images.run(&mut bf(&["check", "--repair", name]));
        assert_eq!(
            out.status.code(),
            Some(0),
            "backfill check --repair {name}:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains("refcounts rebuilt"),
            "{}",
            text(&out.stdout)
        );
        assert_eq!(
            images.qemu_check(name),
            0,
            "{name} is clean after the repair"
        );
        assert_eq!(images.run(&mut bf(&["check", name])).status.code(), Some(0));
        for other in ["reference.qcow2", copy.as_str()] {
            images.ok(&mut qemu_img(&[
                "compare", "-f", "qcow2", "-F", "qcow2", name, other,
            ]));
        }
    }

    // Broken mapping metadata is not a refcount problem: refused, untouched.
    images.qemu_overlay("broken.qcow2", "base.raw", None);
    images.qemu_io("broken.qcow2", &["write -P 0x33 0 64k"]);
    let header = fs::read(images.file("broken.qcow2")).unwrap();
    let l2 = be64(&header, be64(&header, 40) as usize) & 0x00ff_ffff_ffff_fe00;
    let mut bytes = header.clone();
    let at = l2 as usize + 8;
    bytes[at..at + 8].copy_from_slice(&((1u64 << 40) | (1 << 63)).to_be_bytes());
    fs::write(images.file("broken.qcow2"), &bytes).unwrap();
    let out = images.run(&mut bf(&["check", "--repair", "broken.qcow2"]));
    assert_exit(&out, 2);
    assert!(
        text(&out.stderr).contains("not repaired"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        fs::read(images.file("broken.qcow2")).unwrap(),
        bytes,
        "left untouched"
    );
}

/// `serve --backing-dir` refuses an image whose backing file lies outside
/// the directory (through `..`, or named by QEMU's `json:` options), before
/// it listens.
#[test]
fn serve_confines_backing_files_to_a_directory() {
    if !have_qemu() {
        return;
    }
    let images = Images::new();
    fs::create_dir(images.file("inside")).unwrap();
    write_base(&images.file("base.raw"), MIB, 6);
    let json = format!(
        r#"json:{{"file":{{"driver":"file","filename":"{}"}}}}"#,
        images.file("base.raw").display()
    );
    for backing in ["../base.raw", json.as_str()] {
        images.ok(&mut qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            "raw",
            "inside/disk.qcow2",
        ]));
        // A hang would be a bug; `timeout` turns one into a failure.
        let out = images.run(
            Command::new("timeout")
                .arg("60")
                .arg(env!("CARGO_BIN_EXE_backfill"))
                .args([
                    "serve",
                    "--backing-dir",
                    "inside",
                    "--socket",
                    "s.sock",
                    "inside/disk.qcow2",
                ]),
        );
        assert_exit(&out, 1);
        assert!(
            text(&out.stderr).contains("outside the allowed backing directory"),
            "{backing}: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stdout).is_empty(), "it never said it was serving");
    }
}

// ------------------------------------------------------------------ convert

/// An overlay larger than its backing file, with qemu-io patterns written
/// into it: whole clusters, a partial cluster, zeroes, a discard, and data
/// past the backing file's end. Returns `qemu-img convert -O raw`'s output.
fn patterned_overlay(images: &Images) -> Vec<u8> {
    write_base(&images.file("base.raw"), 3 * MIB + 8192, 4);
    images.qemu_overlay("disk.qcow2", "base.raw", Some(5 * MIB));
    images.qemu_io(
        "disk.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 100k 12k",
            "write -z 1M 128k",
            "discard 2M 64k",
            "write -P 0x33 4M 64k",
            "write -P 0x44 5056k 4k",
        ],
    );
    images.ok(&mut qemu_img(&[
        "convert",
        "-O",
        "raw",
        "disk.qcow2",
        "expect.raw",
    ]));
    fs::read(images.file("expect.raw")).unwrap()
}

fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at}: got {:#04x}, want {:#04x}",
            got[at], want[at]
        );
    }
}

#[test]
fn convert_equals_qemu_img_convert_and_leaves_the_image_alone() {
    if !have_qemu() {
        return;
    }
    let images = Images::new();
    let expect = patterned_overlay(&images);
    let image_before = fs::read(images.file("disk.qcow2")).unwrap();

    let out = images.ok(&mut bf(&[
        "convert",
        "--cores",
        "2",
        "disk.qcow2",
        "out.raw",
    ]));
    assert!(!out.trim().is_empty(), "convert prints a summary");
    let got = fs::read(images.file("out.raw")).unwrap();
    assert_same_bytes(&got, &expect, "backfill convert vs qemu-img convert");

    // Without --copy-on-read the image is opened read-only: not one byte changes.
    let image_after = fs::read(images.file("disk.qcow2")).unwrap();
    assert!(
        image_before == image_after,
        "convert without --copy-on-read changed the image"
    );

    // The output is sparse: the backing file's hole and the zeroed and
    // unwritten areas past its end are not written.
    let meta = fs::metadata(images.file("out.raw")).unwrap();
    assert!(
        meta.blocks() * 512 < meta.len(),
        "out.raw is not sparse: {} bytes allocated of {}",
        meta.blocks() * 512,
        meta.len()
    );

    // An existing output is replaced, not merged into.
    fs::write(images.file("out.raw"), vec![0xffu8; 8 * MIB as usize]).unwrap();
    images.ok(&mut bf(&["convert", "disk.qcow2", "out.raw"]));
    let got = fs::read(images.file("out.raw")).unwrap();
    assert_same_bytes(&got, &expect, "convert over an existing file");
}

#[test]
fn convert_with_copy_on_read_fills_the_overlay() {
    if !have_qemu() {
        return;
    }
    let images = Images::new();
    let expect = patterned_overlay(&images);

    images.ok(&mut bf(&[
        "convert",
        "--copy-on-read",
        "disk.qcow2",
        "out.raw",
    ]));
    let got = fs::read(images.file("out.raw")).unwrap();
    assert_same_bytes(
        &got,
        &expect,
        "backfill convert --copy-on-read vs qemu-img convert",
    );

    // The image is still clean and still reads the same...
    assert_eq!(images.qemu_check("disk.qcow2"), 0);
    images.ok(&mut qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "disk.qcow2",
        "expect.raw",
    ]));
    // ...and every byte of data now lives in the overlay, none in base.raw.
    let map = json(&images.ok(&mut qemu_img(&["map", "--output=json", "disk.qcow2"])));
    for extent in map.as_array().expect("map is a list") {
        if extent["data"] == true {
            assert_eq!(
                extent["depth"], 0,
                "data still read from the backing file: {extent}"
            );
        }
    }
}

// -------------------------------------------------------------------- bench

#[test]
fn bench_reads_and_writes() {
    if !have_qemu() {
        return;
    }
    let images = Images::new();
    let base = write_base(&images.file("base.raw"), 16 * MIB, 5);
    images.qemu_overlay("disk.qcow2", "base.raw", None);

    let out = images.ok(&mut bf(&["bench", "-c", "2000", "disk.qcow2"]));
    assert!(
        out.contains("Sending 2000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)"),
        "{out}"
    );
    assert!(out.contains("Run completed in "), "{out}");
    assert!(out.contains("IOPS"), "{out}");

    // 2000 sequential 8 KiB writes of 0xa5: the first 16000 KiB, no wrap.
    let out = images.ok(&mut bf(&[
        "bench",
        "-c",
        "2000",
        "-d",
        "8",
        "-s",
        "8K",
        "-w",
        "disk.qcow2",
    ]));
    assert!(
        out.contains("Sending 2000 write requests, 8192 bytes each, 8 in parallel"),
        "{out}"
    );
    assert!(out.contains("Run completed in "), "{out}");
    assert_eq!(images.qemu_check("disk.qcow2"), 0);
    images.ok(&mut qemu_img(&[
        "convert",
        "-O",
        "raw",
        "disk.qcow2",
        "after.raw",
    ]));
    let after = fs::read(images.file("after.raw")).unwrap();
    let written = 2000 * 8192;
    assert!(
        after[..written].iter().all(|&b| b == 0xa5),
        "written area is 0xa5"
    );
    assert_same_bytes(
        &after[written..],
        &base[written..],
        "unwritten area is the backing data",
    );

    // Random reads with copy-on-read change where bytes live, not what they are.
    images.qemu_overlay("cor.qcow2", "base.raw", None);
    let out = images.ok(&mut bf(&[
        "bench",
        "-c",
        "2000",
        "--pattern",
        "rand",
        "--seed",
        "7",
        "--copy-on-read",
        "--cache",
        "writeback",
        "cor.qcow2",
    ]));
    assert!(out.contains("seed 7"), "{out}");
    assert!(out.contains("Run completed in "), "{out}");
    assert_eq!(images.qemu_check("cor.qcow2"), 0);
    images.ok(&mut qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "cor.qcow2",
        "base.raw",
    ]));
}

// --------------------------------------------------------------------- demo

#[test]
fn demo_runs_clean() {
    let images = Images::new();
    let out = images.ok(&mut bf(&["demo", "--size", "4M"]));
    assert!(out.contains("Result: OK"), "{out}");

    let dir = images.file("kept");
    let dir_arg = dir.to_str().unwrap();
    let out = images.ok(&mut bf(&[
        "demo", "--dir", dir_arg, "--size", "2M", "--seed", "1",
    ]));
    assert!(out.contains("Result: OK"), "{out}");
    assert!(dir.join("base.raw").exists() && dir.join("disk.qcow2").exists());
    if have("qemu-img") {
        assert_eq!(images.qemu_check("kept/disk.qcow2"), 0);
        images.ok(&mut qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "kept/disk.qcow2",
            "kept/base.raw",
        ]));
    }
}
