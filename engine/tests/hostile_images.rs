//! Hostile qcow2 images: real images made by `qemu-img create` (4 KiB and
//! 64 KiB clusters, with and without a raw backing file and data written by
//! `qemu-io`), then damaged by patching header fields or table entries in a
//! copy. Invariant 7 of DESIGN.md: a hostile image is an error, never a
//! panic, a hang, or made-up data.
//!
//! For every damaged image `Disk::open(path, Options::default())` must return
//! an `Err` whose message names the problem, and `backfill::check` must
//! either return an `Err` or a report with a nonzero exit code. Where the
//! damage lies in an L2 entry, the open may succeed but reading the cluster
//! through `read_at` must fail. Each engine call runs on a watchdog thread,
//! so a hang or a panic fails the case with a message instead of stalling
//! the test binary. Every message is printed (`--nocapture` shows them).
//!
//! Two cases were findings when the file was written, fixed since: an L2
//! entry past the clusters in use read as zeros, and a refcount table that
//! names itself as a refcount block was accepted.

mod common;

use backfill::{Disk, Options};
use common::*;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// How long an engine call may take before the case is declared hung. Not a
/// performance bound: every call here takes milliseconds.
const WATCHDOG: Duration = Duration::from_secs(30);

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const OFLAG_COPIED: u64 = 1 << 63;

// Header offsets (qcow2.rst).
const BACKING_FILE_OFFSET: u64 = 8;
const BACKING_FILE_SIZE: u64 = 16;
const CLUSTER_BITS: u64 = 20;
const SIZE: u64 = 24;
const L1_SIZE: u64 = 36;
const L1_TABLE_OFFSET: u64 = 40;
const REFCOUNT_TABLE_OFFSET: u64 = 48;
const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
const INCOMPATIBLE_FEATURES: u64 = 72;
const HEADER_LENGTH: u64 = 100;

/// Runs `f` on its own thread; panics (naming `what`) if it panics or does
/// not finish within [`WATCHDOG`].
fn guarded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(WATCHDOG) {
        Ok(v) => {
            let _ = handle.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: the engine did not return within {WATCHDOG:?} (hang)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let payload = handle
                .join()
                .expect_err("a thread that sent nothing panicked");
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: the engine panicked: {msg}")
        }
    }
}

/// What the engine makes of an image: the open's error (or `Ok` after a
/// clean close), and `check`'s error or exit code.
#[derive(Debug)]
struct Verdict {
    open: Result<(), String>,
    check: Result<i32, String>,
}

fn judge(case: &str, path: &Path) -> Verdict {
    let p = path.to_path_buf();
    let open = guarded(&format!("{case}: Disk::open"), move || {
        match Disk::open(&p, Options::default()) {
            Ok(disk) => {
                disk.close().map_err(|e| format!("close: {e}"))?;
                Ok(())
            }
            Err(e) => Err(format!("{e} ({:?})", e.kind())),
        }
    });
    let p = path.to_path_buf();
    let check = guarded(&format!("{case}: check"), move || {
        match backfill::check(&p) {
            Ok(report) => Ok(report.exit_code()),
            Err(e) => Err(format!("{e} ({:?})", e.kind())),
        }
    });
    match &open {
        Ok(()) => eprintln!("[{case}] open: SUCCEEDED"),
        Err(m) => eprintln!("[{case}] open: Err: {m}"),
    }
    match &check {
        Ok(rc) => eprintln!("[{case}] check: report, exit code {rc}"),
        Err(m) => eprintln!("[{case}] check: Err: {m}"),
    }
    Verdict { open, check }
}

fn mentions(msg: &str, needles: &[&str]) -> bool {
    let lower = msg.to_lowercase();
    needles.iter().any(|n| lower.contains(&n.to_lowercase()))
}

/// The image must be refused by `Disk::open` with a message naming one of
/// `needles`, and `check` must fail or report a problem.
#[track_caller]
fn expect_refused(case: &str, path: &Path, needles: &[&str]) {
    expect_open_refused(case, path, needles, true)
}

/// Like [`expect_refused`]; `check` is only held to a verdict when
/// `check_must_flag` (a backing chain problem is not a defect of the
/// overlay's own structure, which is all `check` looks at).
#[track_caller]
fn expect_open_refused(case: &str, path: &Path, needles: &[&str], check_must_flag: bool) {
    let v = judge(case, path);
    let msg = match v.open {
        Ok(()) => panic!(
            "{case}: Disk::open accepted the damaged image {}",
            path.display()
        ),
        Err(m) => m,
    };
    assert!(!msg.trim().is_empty(), "{case}: empty error message");
    assert!(
        mentions(&msg, needles),
        "{case}: open error does not mention any of {needles:?}: {msg}"
    );
    if let (true, Ok(rc)) = (check_must_flag, v.check) {
        assert_ne!(rc, 0, "{case}: check reports the damaged image clean");
    }
}

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn get32(buf: &[u8], off: u64) -> u32 {
    u32::from_be_bytes(buf[off as usize..off as usize + 4].try_into().unwrap())
}

fn get64(buf: &[u8], off: u64) -> u64 {
    u64::from_be_bytes(buf[off as usize..off as usize + 8].try_into().unwrap())
}

/// A pristine image made by qemu-img (and written to by qemu-io).
struct Base {
    path: PathBuf,
    cluster: u64,
    /// The image's bytes, as qemu left them.
    bytes: Vec<u8>,
}

impl Base {
    /// `cluster` 4 KiB images are 64 MiB (32 L1 entries), 64 KiB ones 1 GiB
    /// (2 L1 entries). With `backing`, a raw file of the same size backs it.
    /// With `data`, qemu-io writes 0x11 over the first 64 KiB.
    fn new(dir: &Path, name: &str, cluster: u64, backing: bool, data: bool) -> Base {
        let size = if cluster == 4 * KIB {
            64 * MIB
        } else {
            1024 * MIB
        };
        let b = backing.then(|| {
            let raw = format!("{name}.base.raw");
            create_raw(&dir.join(&raw), size);
            Backing {
                name: raw,
                format: "raw",
            }
        });
        let path = dir.join(format!("{name}.qcow2"));
        create_qcow2(&path, size, cluster, Compat::V3, b.as_ref());
        if data {
            qemu_io(&path, "qcow2", &["write -P 0x11 0 64k".to_string()]);
        }
        let bytes = read_file(&path);
        Base {
            path,
            cluster,
            bytes,
        }
    }

    fn hdr32(&self, off: u64) -> u32 {
        get32(&self.bytes, off)
    }

    fn hdr64(&self, off: u64) -> u64 {
        get64(&self.bytes, off)
    }

    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// A copy of the image, named `case`, with `patches` (offset, bytes)
    /// written over it. The copy lies next to the original, so a relative
    /// backing name still resolves.
    fn damaged(&self, case: &str, patches: &[(u64, Vec<u8>)]) -> PathBuf {
        let mut bytes = self.bytes.clone();
        for (off, data) in patches {
            let end = *off as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*off as usize..end].copy_from_slice(data);
        }
        let path = self.path.with_file_name(format!("{case}.qcow2"));
        write_file(&path, &bytes);
        eprintln!(
            "[{case}] from {} ({} KiB clusters), patched {:?}",
            self.path.file_name().unwrap().to_string_lossy(),
            self.cluster / KIB,
            patches
                .iter()
                .map(|(o, d)| format!("@{o:#x}={}", hex(d)))
                .collect::<Vec<_>>()
        );
        path
    }
}

fn hex(d: &[u8]) -> String {
    if d.len() > 16 {
        return format!("<{} bytes>", d.len());
    }
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The usual set of base images for header damage.
fn bases(dir: &Path) -> Vec<Base> {
    vec![
        Base::new(dir, "c4k", 4 * KIB, false, false),
        Base::new(dir, "c4k-backed", 4 * KIB, true, true),
        Base::new(dir, "c64k", 64 * KIB, false, true),
        Base::new(dir, "c64k-backed", 64 * KIB, true, true),
    ]
}

fn name(b: &Base, case: &str) -> String {
    format!(
        "{case}-{}",
        b.path.file_stem().unwrap().to_string_lossy().into_owned()
    )
}

#[test]
fn case01_l1_table_past_eof() {
    let dir = tempdir("hostile");
    for b in bases(dir.path()) {
        let past = round_up(b.len(), b.cluster) + 16 * b.cluster;
        let case = name(&b, "01-l1-past-eof");
        let p = b.damaged(&case, &[(L1_TABLE_OFFSET, be64(past))]);
        expect_refused(&case, &p, &["L1 table", "past the end"]);
    }
}

#[test]
fn case02_l1_table_unaligned() {
    let dir = tempdir("hostile");
    for b in bases(dir.path()) {
        let off = b.hdr64(L1_TABLE_OFFSET) + 512;
        let case = name(&b, "02-l1-unaligned");
        let p = b.damaged(&case, &[(L1_TABLE_OFFSET, be64(off))]);
        expect_refused(&case, &p, &["L1 table", "aligned"]);
    }
}

#[test]
fn case03_l1_table_on_the_header() {
    let dir = tempdir("hostile");
    for b in bases(dir.path()) {
        assert!(b.hdr32(L1_SIZE) > 0);
        let case = name(&b, "03-l1-at-0");
        let p = b.damaged(&case, &[(L1_TABLE_OFFSET, be64(0))]);
        expect_refused(&case, &p, &["L1 table offset 0x0"]);
    }
}

#[test]
fn case04_l1_size_huge_and_too_small() {
    let dir = tempdir("hostile");
    for b in bases(dir.path()) {
        let case = name(&b, "04a-l1-size-huge");
        let p = b.damaged(&case, &[(L1_SIZE, be32(0x7fff_ffff))]);
        expect_refused(&case, &p, &["L1 table of 2147483647 entries exceeds"]);

        let case = name(&b, "04b-l1-size-too-small");
        let p = b.damaged(&case, &[(L1_SIZE, be32(1))]);
        expect_refused(&case, &p, &["L1 table has 1 entries but virtual size"]);
    }
}

#[test]
fn case05_refcount_table_past_eof() {
    let dir = tempdir("hostile");
    for b in bases(dir.path()) {
        let past = round_up(b.len(), b.cluster) + 16 * b.cluster;
        let case = name(&b, "05-reftable-past-eof");
        let p = b.damaged(&case, &[(REFCOUNT_TABLE_OFFSET, be64(past))]);
        expect_refused(&case, &p, &["refcount table at offset", "past the end"]);
    }
}

#[test]
fn case06_refcount_table_unaligned() {
    let dir = tempdir("hostile");
    for b in bases(dir.path()) {
        let off = b.hdr64(REFCOUNT_TABLE_OFFSET) + 8;
        let case = name(&b, "06-reftable-unaligned");
        let p = b.damaged(&case, &[(REFCOUNT_TABLE_OFFSET, be64(off))]);
        expect_refused(&case, &p, &["refcount table offset", "aligned"]);
    }
}

#[test]
fn case07_refcount_table_clusters_huge() {
    let dir = tempdir("hostile");
    for b in bases(dir.path()) {
        let case = name(&b, "07-reftable-clusters-huge");
        let p = b.damaged(&case, &[(REFCOUNT_TABLE_CLUSTERS, be32(0xffff_ffff))]);
        expect_refused(
            &case,
            &p,
            &["refcount table of 4294967295 clusters exceeds"],
        );
    }
}

/// The refcount table's first entry names the refcount table itself as
/// refcount block 0.
fn reftable_into_itself(b: &Base, case: &str) -> PathBuf {
    let rt = b.hdr64(REFCOUNT_TABLE_OFFSET);
    b.damaged(case, &[(rt, be64(rt))])
}

/// The L2 table of L1 entry 0, in an image with data in its first clusters.
fn l2_of_entry0(b: &Base) -> u64 {
    let l1 = b.hdr64(L1_TABLE_OFFSET);
    let l2 = get64(&b.bytes, l1) & L1E_OFFSET_MASK;
    assert_ne!(l2, 0, "qemu-io wrote data, so L1 entry 0 has an L2 table");
    l2
}

/// Case 9: opening may succeed, but reading the damaged cluster `c` must
/// fail. Returns the open's error, or the read's outcome (Ok carries the
/// first bytes returned, to show what was made up).
fn read_cluster(case: &str, path: &Path, cluster: u64, c: u64) -> Result<String, String> {
    let p = path.to_path_buf();
    let out = guarded(&format!("{case}: open + read_at"), move || {
        let disk = match Disk::open(&p, Options::default()) {
            Ok(d) => d,
            Err(e) => return Err(format!("open: {e} ({:?})", e.kind())),
        };
        let mut buf = vec![0xa5u8; cluster as usize];
        let r = match disk.read_at(&mut buf, c * cluster) {
            Ok(()) => Ok(hex(&buf[..16])),
            Err(e) => Err(format!("{e} ({:?})", e.kind())),
        };
        let _ = disk.close();
        r
    });
    match &out {
        Ok(data) => eprintln!("[{case}] read cluster {c}: RETURNED DATA {data}..."),
        Err(m) => eprintln!("[{case}] read cluster {c}: Err: {m}"),
    }
    out
}

/// Damages L2 entry `index` of L1 entry 0 (`entry` computes the new value
/// from the cluster size and file length), then reads that cluster; the
/// read must fail and `check` must not call the image clean.
fn l2_entry_case(case: &str, index: u64, entry: impl Fn(u64, u64) -> u64) {
    let dir = tempdir("hostile");
    for b in [
        Base::new(dir.path(), "c4k-backed", 4 * KIB, true, true),
        Base::new(dir.path(), "c64k-backed", 64 * KIB, true, true),
    ] {
        let l2 = l2_of_entry0(&b);
        let cs = b.cluster;
        let case = name(&b, case);
        let p = b.damaged(&case, &[(l2 + 8 * index, be64(entry(cs, b.len())))]);
        let r = read_cluster(&case, &p, cs, index);
        let msg = r
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{case}: reading cluster {index} returned data: {r:?}"));
        assert!(!msg.trim().is_empty(), "{case}: empty error message");
        assert!(
            mentions(msg, &["L2 entry", "past the end", "aligned"]),
            "{case}: read error of cluster {index} is not specific: {msg}"
        );
        let p2 = p.clone();
        let check = guarded(&format!("{case}: check"), move || {
            backfill::check(&p2)
                .map(|r| r.exit_code())
                .map_err(|e| e.to_string())
        });
        eprintln!("[{case}] check: {check:?}");
        if let Ok(rc) = check {
            assert_ne!(rc, 0, "{case}: check reports the damaged image clean");
        }
    }
}

/// L2 entry 1 names a data cluster 512-byte aligned (as the entry mask
/// keeps it) but not cluster aligned, inside the file.
#[test]
fn case09a_l2_entry_unaligned() {
    l2_entry_case("09a-l2-entry-unaligned", 1, |cs, _| {
        (cs + 512) | OFLAG_COPIED
    });
}

/// L2 entry 0 names an aligned data cluster 16 clusters past the end of
/// the file.
#[test]
fn l2_entry_past_eof_is_an_error_not_zeros() {
    l2_entry_case("09b-l2-entry-past-eof", 0, |cs, len| {
        (round_up(len, cs) + 16 * cs) | OFLAG_COPIED
    });
}

#[test]
fn case10_cluster_bits_8_and_31() {
    let dir = tempdir("hostile");
    for b in bases(dir.path()) {
        for bits in [8u32, 31] {
            let case = name(&b, &format!("10-cluster-bits-{bits}"));
            let p = b.damaged(&case, &[(CLUSTER_BITS, be32(bits))]);
            expect_refused(&case, &p, &[&format!("cluster_bits {bits}")]);
        }
    }
}

#[test]
fn case11_size_overflow_and_beyond_l1() {
    let dir = tempdir("hostile");
    for b in bases(dir.path()) {
        let case = name(&b, "11a-size-top-bit");
        let size = b.hdr64(SIZE) | (1 << 63);
        let p = b.damaged(&case, &[(SIZE, be64(size))]);
        expect_refused(&case, &p, &["virtual size", "too large"]);

        // The L1 table covers l1_size * (cluster / 8) clusters; ask for one
        // byte more than that.
        let cs = b.cluster;
        let covered = u64::from(b.hdr32(L1_SIZE)) * (cs / 8) * cs;
        let case = name(&b, "11b-size-beyond-l1");
        let p = b.damaged(&case, &[(SIZE, be64(covered + 1))]);
        expect_refused(&case, &p, &["entries but virtual size"]);
    }
}

#[test]
fn case12_backing_name_out_of_bounds_and_too_long() {
    let dir = tempdir("hostile");
    for b in [
        Base::new(dir.path(), "c4k-backed", 4 * KIB, true, true),
        Base::new(dir.path(), "c64k-backed", 64 * KIB, true, true),
    ] {
        let name_off = b.hdr64(BACKING_FILE_OFFSET);
        assert_ne!(name_off, 0, "the image has a backing file name");

        let case = name(&b, "12a-backing-offset-past-eof");
        let p = b.damaged(&case, &[(BACKING_FILE_OFFSET, be64(b.len() + 4096))]);
        expect_refused(&case, &p, &["backing file name at offset", "outside"]);

        let case = name(&b, "12b-backing-size-past-eof");
        let p = b.damaged(&case, &[(BACKING_FILE_SIZE, be32(b.len() as u32))]);
        expect_refused(&case, &p, &["backing file name length"]);

        // A 2000-byte name written in place (it fits in the header cluster
        // of both cluster sizes).
        let case = name(&b, "12c-backing-name-2000-bytes");
        let p = b.damaged(
            &case,
            &[
                (BACKING_FILE_SIZE, be32(2000)),
                (name_off, vec![b'a'; 2000]),
            ],
        );
        expect_refused(&case, &p, &["backing file name length 2000"]);
    }
}

/// Runs `qemu-img ARGS` in `dir`, so that relative backing names resolve
/// the way qemu resolves them.
fn qemu_img_in(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn case13_backing_loop_and_deep_chain() {
    require_tool("qemu-img");
    let dir = tempdir("hostile");
    let d = dir.path();

    // a -> b -> a.
    create_qcow2(&d.join("b.qcow2"), 4 * MIB, 4 * KIB, Compat::V3, None);
    let bk = Backing {
        name: "b.qcow2".into(),
        format: "qcow2",
    };
    create_qcow2(&d.join("a.qcow2"), 4 * MIB, 4 * KIB, Compat::V3, Some(&bk));
    qemu_img_in(
        d,
        &["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2"],
    );
    expect_open_refused("13a-backing-loop", &d.join("a.qcow2"), &["loop"], false);

    // base.raw <- l1 <- ... <- l70.
    const DEPTH: usize = 70;
    create_raw(&d.join("base.raw"), 4 * MIB);
    qemu_img_in(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw", "l1.qcow2", "4M",
        ],
    );
    for i in 2..=DEPTH {
        let below = format!("l{}.qcow2", i - 1);
        let this = format!("l{i}.qcow2");
        qemu_img_in(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", &below, "-F", "qcow2", &this, "4M",
            ],
        );
    }
    expect_open_refused(
        "13b-chain-of-70",
        &d.join(format!("l{DEPTH}.qcow2")),
        &["deeper than 64 layers"],
        false,
    );
}

#[test]
fn case14_short_v3_header_and_unknown_incompatible_bit() {
    let dir = tempdir("hostile");
    for b in bases(dir.path()) {
        assert_eq!(b.hdr32(4), 3, "compat=1.1 makes version 3");
        for len in [72u32, 96] {
            let case = name(&b, &format!("14a-header-length-{len}"));
            let p = b.damaged(&case, &[(HEADER_LENGTH, be32(len))]);
            expect_refused(&case, &p, &[&format!("header_length {len}")]);
        }
        let case = name(&b, "14b-incompatible-bit-60");
        let bits = b.hdr64(INCOMPATIBLE_FEATURES) | (1 << 60);
        let p = b.damaged(&case, &[(INCOMPATIBLE_FEATURES, be64(bits))]);
        expect_refused(&case, &p, &["unknown incompatible feature bit 60"]);
    }
}

/// Entry 0 of the refcount table is patched to the refcount table's own
/// offset (header field 48), so the table is its own refcount block 0.
#[test]
fn refcount_table_pointing_into_itself_is_refused() {
    let dir = tempdir("hostile");
    for b in bases(dir.path()) {
        let case = name(&b, "08-reftable-into-itself");
        let p = reftable_into_itself(&b, &case);
        expect_refused(&case, &p, &["refcount"]);
    }
}

/// backfill's remote-image pin extension (`qcow2::pin`), damaged: too
/// short, a name length past its data, an unknown layout version, two of
/// them, and a length past the header area. Open refuses each one
/// (`check` only looks at the image's own structure, where nothing is
/// wrong).
#[test]
fn case15_malformed_remote_image_pin() {
    use backfill::backing::http::Validator;
    use backfill::qcow2::pin::{Pin, EXT_REMOTE_PIN};
    use backfill::qcow2::{Extension, Header};
    let dir = tempdir("hostile");
    let good = Pin {
        name: "http://127.0.0.1:1/base.raw".into(),
        size: 64 * MIB,
        validator: Validator::ETag("\"1-2\"".into()),
    }
    .encode()
    .unwrap();
    let mut long_name = good.clone();
    long_name[16..18].copy_from_slice(&0xffffu16.to_be_bytes());
    let mut version = good.clone();
    version[3] = 2;
    let cases = [
        ("15a-pin-truncated", vec![good[..10].to_vec()], "pin"),
        ("15b-pin-name-length", vec![long_name], "pin"),
        ("15c-pin-version", vec![version], "layout version 2"),
        (
            "15d-two-pins",
            vec![good.clone(), good.clone()],
            "more than one",
        ),
    ];
    for b in bases(dir.path())
        .iter()
        .filter(|b| b.hdr64(BACKING_FILE_OFFSET) != 0)
    {
        let header = Header::parse(&b.bytes, b.len(), "base").unwrap();
        for (what, pins, needle) in &cases {
            let mut h = header.clone();
            h.extensions.extend(pins.iter().map(|data| Extension {
                kind: EXT_REMOTE_PIN,
                data: data.clone(),
            }));
            let case = name(b, what);
            let p = b.damaged(&case, &[(0, h.serialize().unwrap())]);
            expect_open_refused(&case, &p, &[needle], false);
        }
        // A length running past the header area: the extension list itself
        // is refused.
        let mut h = header.clone();
        h.extensions.push(Extension {
            kind: EXT_REMOTE_PIN,
            data: good.clone(),
        });
        let area = h.serialize().unwrap();
        let at = area
            .windows(4)
            .position(|w| w == EXT_REMOTE_PIN.to_be_bytes())
            .unwrap() as u64;
        let case = name(b, "15e-pin-length-huge");
        let p = b.damaged(&case, &[(0, area), (at + 4, be32(0x7fff_fff0))]);
        expect_refused(&case, &p, &["overruns the header area"]);
    }
}
