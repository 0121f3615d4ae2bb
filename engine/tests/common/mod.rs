//! Helpers shared by the integration tests: the external oracles (`qemu-img`,
//! `qemu-io`), a seeded PRNG, temporary directories and byte comparisons.
//!
//! The oracles are never optional. A test that needs `qemu-img` and cannot run
//! it panics with a message naming the package to install: a test that passes
//! by skipping is worse than one that fails (DESIGN.md, "Real components").
//!
//! Every random choice comes from [`Rng`], seeded by [`seed_from_env`], so any
//! failure replays with `BACKFILL_SEED=<seed>`.

// Each test binary compiles this module on its own and uses a different subset.
#![allow(dead_code)]

use backfill::{Disk, Options};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// True when running under CI (`CI=true`), where missing tools are fatal.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Panics unless `name` can be run. It panics outside CI too: these tests have
/// no meaning without their oracle, and we never skip silently.
pub fn require_tool(name: &str) {
    static CHECKED: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let checked = CHECKED.get_or_init(Default::default);
    if checked.lock().unwrap().iter().any(|n| n == name) {
        return;
    }
    match Command::new(name).arg("--version").output() {
        Ok(out) if out.status.success() => checked.lock().unwrap().push(name.to_string()),
        Ok(out) => panic!(
            "required tool `{name}` does not work (`{name} --version` exited with {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "required tool `{name}` is missing ({e}); install it (Debian package qemu-utils). \
             These tests never skip{}",
            if ci() { " (CI=true)" } else { "" }
        ),
    }
}

/// Runs a command, returning its output whatever its exit status.
pub fn run_status<I, S>(program: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    require_tool(program);
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    Command::new(program)
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = run_status(program, &args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The path of this build's `backfill` command.
pub fn backfill_bin() -> &'static str {
    env!("CARGO_BIN_EXE_backfill")
}

/// `backfill ARGS`; its output, whatever the exit status.
pub fn backfill_output(args: &[&str]) -> Output {
    run_status(backfill_bin(), args)
}

/// `backfill ARGS`, which must succeed; returns stdout.
pub fn backfill_ok(args: &[&str]) -> String {
    run_ok(backfill_bin(), args)
}

/// `qemu-img create -q -f qcow2 [-o OPTS] [-b BACKING -F FORMAT] PATH
/// [SIZE]`: the backing name is stored as given (relative to the image's
/// directory when relative, as qemu resolves it).
pub fn qemu_create_qcow2(
    path: &Path,
    opts: &str,
    backing: Option<(&str, &str)>,
    size: Option<u64>,
) {
    let mut args: Vec<String> = ["create", "-q", "-f", "qcow2"].map(String::from).to_vec();
    if !opts.is_empty() {
        args.extend(["-o".into(), opts.into()]);
    }
    if let Some((name, format)) = backing {
        args.extend(["-b".into(), name.into(), "-F".into(), format.into()]);
    }
    args.push(path_str(path));
    if let Some(size) = size {
        args.push(size.to_string());
    }
    qemu_img(&args);
}

/// `qemu-img create -q -f qcow2 -u -b BACKING -F FORMAT PATH SIZE`: the
/// backing name is recorded and never opened (its server may be down, or
/// it may be one backfill must refuse), so the size is given.
pub fn qemu_create_qcow2_unopened(path: &Path, backing: &str, format: &str, size: &str) {
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        format,
        &path_str(path),
        size,
    ]);
}

/// `qemu-img convert -q -c -f raw -O qcow2 [-o OPTS] RAW OUT`; asserts that
/// QEMU stored some clusters compressed (`qemu-img check`'s count).
pub fn qemu_convert_compressed(raw: &Path, out: &Path, opts: &str) {
    let (raw, out_s) = (path_str(raw), path_str(out));
    let mut args = vec!["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([raw.as_str(), out_s.as_str()]);
    qemu_img(&args);
    let check = qemu_img(["check", "--output=json", &out_s]);
    let check: serde_json::Value = serde_json::from_str(&check).unwrap();
    assert!(
        check["compressed-clusters"].as_u64().unwrap_or(0) > 0,
        "no compressed clusters: {check}"
    );
}

/// `qemu-img ARGS`, which must succeed; returns stdout.
pub fn qemu_img<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_ok("qemu-img", args)
}

/// `qemu-io -f FMT -c CMD... IMAGE`, which must succeed. qemu-io reports some
/// failures only on stderr or stdout with exit status 0, so both are checked.
pub fn qemu_io(image: &Path, format: &str, cmds: &[String]) {
    let mut args: Vec<std::ffi::OsString> = vec!["-f".into(), format.into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.into());
    }
    args.push(image.as_os_str().to_owned());
    let out = run_status("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stdout.contains("failed") && !stderr.contains("failed"),
        "qemu-io {args:?} failed ({})\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
}

/// A temporary directory on the same (real) file system as the target
/// directory: `/tmp` may be a tmpfs, where O_DIRECT behaves differently.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("creating a temporary directory")
}

/// A small, fast, seedable PRNG (SplitMix64). Our own, so that a seed replays
/// the same test whatever version of `rand` is in the lock file.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    /// Uniform in `lo..hi` (lo < hi).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }
    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
    /// A derived generator, so that sub-tasks do not shift each other's draws.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

/// The seed for this run: `BACKFILL_SEED` (decimal or 0x-hex), or a fresh one.
/// It is always printed, so a failure names the seed that replays it.
pub fn seed_from_env(test: &str) -> u64 {
    let seed = match std::env::var("BACKFILL_SEED") {
        Ok(s) => parse_u64(&s).unwrap_or_else(|| panic!("BACKFILL_SEED={s:?} is not a number")),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            let mut r = Rng::new(t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32));
            r.next_u64()
        }
    };
    eprintln!("{test}: seed {seed:#x} (replay with BACKFILL_SEED={seed:#x})");
    seed
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// An unsigned integer from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => parse_u64(&s).unwrap_or_else(|| panic!("{name}={s:?} is not a number")),
        Err(_) => default,
    }
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

pub fn write_random_file(path: &Path, len: u64, seed: u64) -> Vec<u8> {
    let data = random_bytes(len as usize, seed);
    std::fs::write(path, &data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    data
}

/// A file of `size` bytes at `path` with random bytes at `data` (offset,
/// length; in order, apart) and holes between: the file system's holes, as
/// `qemu-img map` of the file must show them (else the test cannot say
/// what it means, and fails).
pub fn write_sparse_file(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) {
    use std::os::unix::fs::FileExt;
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let bytes = random_bytes(size as usize, seed);
    for &(off, len) in data {
        f.write_all_at(&bytes[off as usize..(off + len) as usize], off)
            .unwrap();
    }
    drop(f);
    let held: Vec<(u64, u64)> = qemu_map(path)
        .iter()
        .filter(|e| e.data)
        .map(|e| (e.start, e.length))
        .collect();
    assert_eq!(
        held,
        data,
        "the file system under {} keeps no holes where nothing was written",
        path.display()
    );
}

pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// qcow2 compatibility level, as `qemu-img create -o compat=` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    V2,
    V3,
}

impl Compat {
    pub fn as_qemu(self) -> &'static str {
        match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        }
    }
}

/// A backing file reference: the name written into the overlay (absolute, or
/// relative to the overlay's directory) and its format.
#[derive(Debug, Clone)]
pub struct Backing {
    pub name: String,
    pub format: &'static str,
}

/// `qemu-img create -f raw PATH SIZE`.
pub fn create_raw(path: &Path, size: u64) {
    qemu_img([
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        path.as_os_str(),
        size.to_string().as_ref(),
    ]);
}

/// `qemu-img create -f qcow2` with the given cluster size, compat level and
/// optional backing file. Runs in the image's directory, so that a relative
/// backing name resolves the way qemu resolves it (relative to the overlay).
pub fn create_qcow2(
    path: &Path,
    size: u64,
    cluster_size: u64,
    compat: Compat,
    backing: Option<&Backing>,
) {
    let dir = path.parent().expect("image path has a directory");
    let mut args: Vec<String> = vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        format!("cluster_size={cluster_size},compat={}", compat.as_qemu()),
    ];
    if let Some(b) = backing {
        args.extend(["-b".into(), b.name.clone(), "-F".into(), b.format.into()]);
    }
    args.push(path.to_str().expect("utf-8 path").into());
    args.push(size.to_string());
    require_tool("qemu-img");
    let out = Command::new("qemu-img")
        .args(&args)
        .current_dir(dir)
        .output()
        .expect("running qemu-img create");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The image's guest-visible contents, as `qemu-img convert -O raw` sees them.
pub fn raw_contents(image: &Path) -> Vec<u8> {
    let dir = tempdir("convert");
    let out = dir.path().join("contents.raw");
    qemu_img([
        "convert".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        image.as_os_str(),
        out.as_os_str(),
    ]);
    read_file(&out)
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// 0 = the image itself, 1 = its backing file, and so on.
    pub depth: u32,
    #[serde(default = "yes")]
    pub present: bool,
    pub zero: bool,
    pub data: bool,
}

fn yes() -> bool {
    true
}

impl MapEntry {
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// A port of 127.0.0.1 that was free a moment ago (for a server started
/// next on it).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .expect("binding 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

/// The first line of `text` (a tool's output, a server's log) that starts
/// with `prefix`; fails, showing the text, when there is none.
#[track_caller]
pub fn line_starting<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{text}"))
}

pub fn qemu_map(image: &Path) -> Vec<MapEntry> {
    let json = qemu_img(["map".as_ref(), "--output=json".as_ref(), image.as_os_str()]);
    let map: Vec<MapEntry> =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("parsing qemu-img map: {e}\n{json}"));
    // The oracle itself must be sane before we judge anything by it.
    let mut pos = 0;
    for e in &map {
        assert_eq!(e.start, pos, "qemu-img map is not contiguous: {json}");
        pos = e.end();
    }
    map
}

/// The map entry that covers `offset`.
pub fn map_at(map: &[MapEntry], offset: u64) -> MapEntry {
    *map.iter()
        .find(|e| e.start <= offset && offset < e.end())
        .unwrap_or_else(|| panic!("qemu-img map does not cover offset {offset}: {map:?}"))
}

/// `qemu-img info --output=json IMAGE`, parsed.
pub fn info_json(image: &Path) -> serde_json::Value {
    let json = qemu_img(["info".as_ref(), "--output=json".as_ref(), image.as_os_str()]);
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("parsing qemu-img info: {e}\n{json}"))
}

/// Neither `qemu-img info` nor `backfill info` finds a backing file.
#[track_caller]
pub fn assert_standalone(image: &Path) {
    let info = info_json(image);
    assert!(
        info.get("backing-filename").is_none() && info.get("full-backing-filename").is_none(),
        "qemu-img info still shows a backing file: {info}"
    );
    let ours = backfill::info(image).expect("backfill info");
    assert!(
        ours.backing_file.is_none() && ours.backing_chain.is_empty(),
        "{ours:?}"
    );
}

/// Every cluster of `[off, off + len)` maps to zeros in the image itself,
/// not to data (`qemu-img map`).
#[track_caller]
pub fn assert_zero_in_overlay(map: &[MapEntry], off: u64, len: u64) {
    let mut pos = off;
    while pos < off + len {
        let e = map_at(map, pos);
        assert!(
            e.zero && !e.data && e.depth == 0,
            "offset {pos}: expected a zero region of the image itself, got {e:?}"
        );
        pos = e.end();
    }
}

/// Every byte of the image maps to the image itself (depth 0).
#[track_caller]
pub fn assert_all_in_overlay(map: &[MapEntry]) {
    for e in map {
        assert_eq!(e.depth, 0, "{e:?} still comes from a backing file");
    }
}

/// After a stream of a sparse backing: `image` holds every byte itself,
/// and by `qemu-img map` a `cluster`-byte cluster is data exactly when it
/// overlaps `data` (offset, length), a zero cluster otherwise.
pub fn assert_data_clusters(image: &Path, cluster: u64, data: &[(u64, u64)]) {
    let map = qemu_map(image);
    assert_all_in_overlay(&map);
    let size = map.last().map_or(0, |e| e.start + e.length);
    for c in 0..size.div_ceil(cluster) {
        let (lo, hi) = (c * cluster, (c + 1) * cluster);
        let want = data.iter().any(|&(o, l)| o < hi && lo < o + l);
        let e = map_at(&map, lo);
        assert_eq!(e.data, want, "cluster {c}: {e:?}");
    }
}

/// `qemu-img check`: no corruption and no check errors, leaked clusters
/// allowed (exit status 3: e.g. clusters reserved by fills a crash cut
/// short). Returns the number of leaks, or what
/// qemu-img said.
pub fn qemu_check_no_corruption(image: &Path) -> Result<u64, String> {
    let out = run_status(
        "qemu-img",
        [
            "check".as_ref(),
            "--output=json".as_ref(),
            image.as_os_str(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !matches!(out.status.code(), Some(0) | Some(3)) {
        return Err(format!(
            "qemu-img check {} exited with {} (2 = corruption, 3 = leaks only)\n{stdout}\n{stderr}",
            image.display(),
            out.status
        ));
    }
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .map_err(|e| format!("parsing qemu-img check: {e}\n{stdout}"))?;
    for field in ["check-errors", "corruptions"] {
        let n = report.get(field).and_then(|v| v.as_u64()).unwrap_or(0);
        if n != 0 {
            return Err(format!(
                "qemu-img check {}: {field} = {n}\n{stdout}",
                image.display()
            ));
        }
    }
    Ok(report.get("leaks").and_then(|v| v.as_u64()).unwrap_or(0))
}

/// [`qemu_check_no_corruption`], failing the test on corruption.
#[track_caller]
pub fn check_no_corruption(image: &Path) -> u64 {
    qemu_check_no_corruption(image).unwrap_or_else(|e| panic!("{e}"))
}

/// `qemu-img check`: exit status 0, no corruptions, no leaks, no check errors.
pub fn check_clean(image: &Path) {
    let out = run_status(
        "qemu-img",
        [
            "check".as_ref(),
            "--output=json".as_ref(),
            image.as_os_str(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "qemu-img check {} exited with {} (2 = corruption, 3 = leaks)\n{stdout}\n{stderr}",
        image.display(),
        out.status
    );
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("parsing qemu-img check: {e}\n{stdout}"));
    for field in ["check-errors", "corruptions", "leaks"] {
        let n = report.get(field).and_then(|v| v.as_u64()).unwrap_or(0);
        assert_eq!(
            n,
            0,
            "qemu-img check {}: {field} = {n}\n{stdout}",
            image.display()
        );
    }
}

/// The virtual size `qemu-img info` reports.
pub fn virtual_size(image: &Path) -> u64 {
    let json = qemu_img(["info".as_ref(), "--output=json".as_ref(), image.as_os_str()]);
    let info: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("parsing qemu-img info: {e}\n{json}"));
    info["virtual-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no virtual-size in {json}"))
}

/// `qemu-img compare -f qcow2 -F raw IMAGE RAW` must report identical
/// contents, and the sizes must be equal. (Not `-s`: strict mode also fails on
/// different allocation status, which is none of our business here.)
pub fn compare_identical(image: &Path, raw: &Path) {
    let raw_len = std::fs::metadata(raw)
        .unwrap_or_else(|e| panic!("{}: {e}", raw.display()))
        .len();
    assert_eq!(
        virtual_size(image),
        raw_len,
        "{} and {} differ in size",
        image.display(),
        raw.display()
    );
    compare_same(image, raw, "raw");
}

/// `qemu-img compare -f qcow2 -F FORMAT IMAGE OTHER` must report identical
/// contents.
pub fn compare_same(image: &Path, other: &Path, format: &str) {
    let out = run_status(
        "qemu-img",
        [
            "compare".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            format.as_ref(),
            image.as_os_str(),
            other.as_os_str(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {} exited with {} (1 = different)\n{}\n{}",
        image.display(),
        other.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `bytes` to a raw file in `dir` and compares `image` against it.
pub fn compare_with_bytes(image: &Path, bytes: &[u8], dir: &Path) {
    let reference = dir.join("reference.raw");
    write_file(&reference, bytes);
    compare_identical(image, &reference);
}

pub fn options(cores: usize, copy_on_read: bool, read_only: bool) -> Options {
    Options {
        cores,
        copy_on_read,
        read_only,
        ..Options::default()
    }
}

pub fn open(path: &Path, opts: Options) -> Disk {
    Disk::open(path, opts.clone()).unwrap_or_else(|e| {
        panic!(
            "opening {} with {opts:?}: {e} ({:?})",
            path.display(),
            e.kind()
        )
    })
}

/// Reads the whole disk through `read_at`, in `chunk`-sized pieces.
pub fn read_all(disk: &Disk, chunk: u64) -> Vec<u8> {
    let size = disk.size();
    let mut out = vec![0u8; size as usize];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        disk.read_at(&mut out[off as usize..(off + n) as usize], off)
            .unwrap_or_else(|e| panic!("read_at({off}, {n}): {e}"));
        off += n;
    }
    out
}

/// Asserts two byte strings are equal, naming the first difference instead of
/// printing megabytes.
#[track_caller]
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    if actual == expected {
        return;
    }
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap();
    let last = actual
        .iter()
        .zip(expected)
        .rposition(|(a, b)| a != b)
        .unwrap();
    let count = actual.iter().zip(expected).filter(|(a, b)| a != b).count();
    let show = |v: &[u8]| -> String {
        v[first..(first + 16).min(v.len())]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    panic!(
        "{what}: {count} bytes differ, first at offset {first} (last at {last})\n  actual:   {}\n  expected: {}",
        show(actual),
        show(expected)
    );
}

/// Path of a file in a directory, as a `String` (for qemu command lines).
pub fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

pub fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

pub fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// The rest of a child's stderr, line by line.
pub type StderrLines = std::io::Lines<std::io::BufReader<std::process::ChildStderr>>;

/// Starts `backfill stream --rate 4M --cores 2 OVERLAY` and returns it once
/// it printed its first progress line, which must say it is midway (slow,
/// so that it surely is), with the rest of its stderr.
#[allow(dead_code)]
pub fn start_slow_stream(overlay: &Path) -> (std::process::Child, StderrLines) {
    use std::io::BufRead;
    let mut child = Command::new(backfill_bin())
        .args(["stream", "--rate", "4M", "--cores", "2"])
        .arg(overlay)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines
        .next()
        .expect("a progress line")
        .expect("reading stderr");
    assert!(line.starts_with("stream: "), "{line}");
    assert!(!line.starts_with("stream: 100"), "{line}");
    (child, lines)
}

/// [`start_slow_stream`], then SIGKILL, with fetches in flight.
#[allow(dead_code)]
pub fn kill_stream_midway(overlay: &Path) {
    let (mut child, _) = start_slow_stream(overlay);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Replaces the file at `path` with `len` new random bytes (seeded by
/// `seed`) whose modification time is `later` after the old file's:
/// written aside, then renamed over it, as a web server's document would
/// be. nginx's ETag is the modification second and the size, so a rewrite
/// within the same second would not change it.
pub fn replace_with_newer(path: &Path, len: u64, seed: u64, later: std::time::Duration) {
    let old = std::fs::metadata(path).unwrap().modified().unwrap();
    let new = path.with_extension("new");
    write_random_file(&new, len, seed);
    std::fs::File::options()
        .write(true)
        .open(&new)
        .unwrap()
        .set_modified(old + later)
        .unwrap();
    std::fs::rename(&new, path).unwrap();
}

/// The whole disk behind NBD `uri`, read by `qemu-img convert` into `copy`.
pub fn read_through_nbd(uri: &str, copy: &Path) -> Vec<u8> {
    qemu_img([
        "convert".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        uri.as_ref(),
        copy.as_os_str(),
    ]);
    read_file(copy)
}
