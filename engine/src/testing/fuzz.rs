//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the tests
//! that replay their corpora on the stable toolchain
//! (`tests/fuzz_corpora.rs`).
//!
//! One function per target, each taking arbitrary bytes:
//!
//! * [`open_and_read`]: the bytes are a qcow2 image (or a sparse encoding
//!   of one, see [`SPARSE_MAGIC`]). It is checked, opened read-only, read
//!   through a second overlay as a backing layer, opened read-write with
//!   copy-on-read, and opened again; reads, block status and `check` are
//!   compared across those sessions.
//! * [`nbd_client_bytes`]: the bytes are what a client sends to the real NBD
//!   server ([`crate::nbd::Server`] on a Unix socket, serving a qcow2 overlay
//!   over a raw backing file), either raw from the first byte or after a
//!   valid handshake, or as compact requests whose replies are checked.
//! * [`nbd_handshake`]: the bytes are the client's side of the handshake,
//!   fed to [`crate::nbd::handshake::negotiate`] in memory.
//! * [`lock_table_ops`]: the bytes are operations on a
//!   [`crate::locks::LockTable`], driven the way the reactor drives it and
//!   compared with a model.
//!
//! What they promise: they never panic on any input unless the code under
//! test broke a property (DESIGN.md invariant 7: hostile input is an error,
//! not a crash; and the properties asserted below). A panic is a finding.
//! What they must never do: touch files outside their own scratch
//! directories (every image is opened with `backing_dir` confined to its
//! scratch directory, so a hostile header cannot name other files).

use crate::disk::{BlockStatus, CacheMode, ExtentKind};
use crate::locks::{Holder, LockTable};
use crate::nbd::handshake::{self, Export, Outcome, MAX_OPTION_LEN};
use crate::nbd::proto::*;
use crate::qcow2::create::{create, Compat, CreateOptions};
use crate::{Disk, Options};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Scratch directories are named `SCRATCH_PREFIX<kind>-<pid>-<random>`.
const SCRATCH_PREFIX: &str = "backfill-fuzz-";

/// A directory for scratch files: tmpfs when there is one (fast, and it
/// takes O_DIRECT), else the system's temporary directory.
///
/// The harness keeps its scratch directories in statics for the whole
/// process, and a fuzzer process ends in `exit` or `abort`, which run no
/// destructors; so each new one first removes those of processes that are
/// gone (tmpfs is memory).
fn scratch_dir(kind: &str) -> tempfile::TempDir {
    let prefix = format!("{SCRATCH_PREFIX}{kind}-{}-", std::process::id());
    let make = |base: &Path| {
        remove_stale_scratch(base);
        tempfile::Builder::new().prefix(&prefix).tempdir_in(base)
    };
    let shm = Path::new("/dev/shm");
    let tmp = std::env::temp_dir();
    let dir = if shm.is_dir() {
        make(shm).or_else(|_| make(&tmp))
    } else {
        make(&tmp)
    };
    dir.unwrap_or_else(|e| panic!("fuzz harness: no scratch directory: {e}"))
}

/// Removes the scratch directories in `base` whose process has ended.
fn remove_stale_scratch(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(SCRATCH_PREFIX)) else {
            continue;
        };
        // <kind>-<pid>-<random>
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Locks a harness mutex; a panic that poisoned it was already reported.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The bytes of a small backing file: distinct nonzero bytes per sector,
/// with a run of zeros in the middle (zero detection on copy-on-read).
fn pattern(len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if (64 << 10..128 << 10).contains(&i) {
                0
            } else {
                ((i * 31 + (i >> 9)) % 251 + 1) as u8
            }
        })
        .collect()
}

// Fuzz input is read like option data: big-endian fields off the front,
// `None` at its end.
use crate::nbd::proto::Cursor as Input;

/// A 24-bit big-endian field.
fn u24(inp: &mut Input<'_>) -> Option<u32> {
    inp.take(3)
        .map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]))
}

// ---------------------------------------------------------------------------
// open_and_read
// ---------------------------------------------------------------------------

/// Inputs longer than this are ignored (the fuzzer's `-max_len` keeps them
/// far shorter).
pub const MAX_IMAGE_INPUT: usize = 4 << 20;

/// An input that starts with these bytes is a sparse image: a big-endian
/// u32 file length, then records of (u32 offset, u16 length, bytes) written
/// over a file of zeros. It keeps images with large clusters (whose tables
/// sit megabytes apart) down to a few hundred bytes of input.
pub const SPARSE_MAGIC: [u8; 4] = *b"BFSP";

/// Largest file a sparse image makes (offsets wrap at this length).
const MAX_SPARSE_FILE: u64 = 64 << 20;

/// Names inside an image's scratch directory. Seeds name the backing files
/// `base.raw` and `base.qcow2` (see `fuzz/make-seeds.sh`).
const IMAGE: &str = "image.qcow2";
const TOP: &str = "top.qcow2";
const BASE_RAW: &str = "base.raw";
const BASE_QCOW2: &str = "base.qcow2";
/// The raw backing file is smaller than most seeds' virtual size, with an
/// odd length (reads past its end are zeros).
const BASE_RAW_LEN: u64 = (192 << 10) + 100;
/// The qcow2 backing file, itself backed by `base.raw`.
const BASE_QCOW2_SIZE: u64 = 320 << 10;

/// Bytes read at the start of the disk, at its end, and at most in all.
const HEAD_BYTES: u64 = 256 << 10;
const TAIL_BYTES: u64 = 64 << 10;
const MAX_PLAN_BYTES: u64 = 1 << 20;
/// Extents whose first bytes are read, at most.
const EXTENT_PROBES: usize = 8;
/// Block status is asked for at most this much of the head of the disk,
/// and the tail bytes at the end.
const STATUS_SPAN: u64 = 64 << 20;
/// The second overlay stacked on the fuzzed image is at most this large.
const MAX_TOP_SIZE: u64 = 1 << 40;
/// Image files up to this long are compared before and after a read-only
/// open.
const COMPARED_FILE_BYTES: u64 = 1 << 20;
/// Metadata cache budget: small, so that L2 tables are evicted.
const METADATA_CACHE_BYTES: usize = 64 << 10;

/// The scratch directory of the image target, with its backing files
/// written once; every input overwrites the image and the top overlay.
struct ImageScratch {
    dir: tempfile::TempDir,
}

static IMAGE_SCRATCH: Mutex<Option<ImageScratch>> = Mutex::new(None);

impl ImageScratch {
    fn new() -> ImageScratch {
        let dir = scratch_dir("image");
        let base_raw = dir.path().join(BASE_RAW);
        std::fs::write(&base_raw, pattern(BASE_RAW_LEN))
            .unwrap_or_else(|e| panic!("fuzz harness: writing {}: {e}", base_raw.display()));
        // base.qcow2 over base.raw, with data, zero and unallocated clusters.
        let base_q = dir.path().join(BASE_QCOW2);
        let opts = CreateOptions {
            size: Some(BASE_QCOW2_SIZE),
            backing: Some(BASE_RAW.to_string()),
            backing_format: Some("raw".to_string()),
            cluster_size: 4096,
            compat: Compat::V3,
            ..CreateOptions::default()
        };
        create(&base_q, &opts).unwrap_or_else(|e| panic!("fuzz harness: {e}"));
        let disk = Disk::open(
            &base_q,
            image_options(dir.path(), false, CacheMode::Writeback),
        )
        .unwrap_or_else(|e| panic!("fuzz harness: {e}"));
        let data: Vec<u8> = (0..32u32 << 10).map(|i| (i % 253) as u8 ^ 0x5a).collect();
        let setup = disk
            .write_at(&data, 8 << 10)
            .and_then(|()| disk.write_at(&data[..1000], (200 << 10) + 7))
            .and_then(|()| disk.write_zeroes(64 << 10, 16 << 10))
            .and_then(|()| disk.write_zeroes(300 << 10, 4 << 10))
            .and_then(|()| disk.close());
        setup.unwrap_or_else(|e| panic!("fuzz harness: writing {}: {e}", base_q.display()));
        ImageScratch { dir }
    }
}

fn image_options(dir: &Path, read_only: bool, cache: CacheMode) -> Options {
    Options {
        cores: 1,
        copy_on_read: !read_only,
        cache,
        read_only,
        metadata_cache_bytes: METADATA_CACHE_BYTES,
        // Polling only burns the fuzzer's CPU.
        poll_us: 0,
        backing_dir: Some(dir.to_path_buf()),
        ..Options::default()
    }
}

/// Writes the image an input describes to `path`. False when the input is
/// not one (too long).
fn write_image(path: &Path, data: &[u8]) -> bool {
    if data.len() > MAX_IMAGE_INPUT {
        return false;
    }
    let written = if let Some(rest) = data.strip_prefix(&SPARSE_MAGIC) {
        let mut inp = Input(rest);
        let len = u64::from(inp.u32().unwrap_or(0)).min(MAX_SPARSE_FILE);
        std::fs::File::create(path).and_then(|f| {
            f.set_len(len)?;
            while let (Some(off), Some(n)) = (inp.u32(), inp.u16()) {
                let bytes = inp.take(n as usize).unwrap_or(inp.0);
                f.write_all_at(bytes, u64::from(off) % MAX_SPARSE_FILE)?;
            }
            Ok(())
        })
    } else {
        std::fs::write(path, data)
    };
    written.unwrap_or_else(|e| panic!("fuzz harness: writing {}: {e}", path.display()));
    true
}

/// What one open of an image showed.
struct Session {
    size: u64,
    /// Per pass over the plan, per range: the bytes, or `None` on error.
    passes: Vec<Vec<Option<Vec<u8>>>>,
    stats: crate::Stats,
}

/// Block status of `[offset, offset + len)`, checked for shape: extents in
/// order, adjacent, non-empty, covering exactly the range, neighbours of
/// the same kind merged.
fn status(disk: &Disk, offset: u64, len: u64, what: &str) -> Option<Vec<BlockStatus>> {
    let extents = disk.block_status(offset, len).ok()?;
    let mut at = offset;
    for (i, e) in extents.iter().enumerate() {
        assert!(
            e.offset == at && e.len > 0,
            "{what}: block status of [{offset}, +{len}) has extent {i} {e:?} where {at} was \
             expected: {extents:?}"
        );
        if i > 0 {
            assert_ne!(
                extents[i - 1].kind,
                e.kind,
                "{what}: block status did not merge extents {} and {i}: {extents:?}",
                i - 1
            );
        }
        at += e.len;
    }
    assert_eq!(
        at,
        offset + len,
        "{what}: block status of [{offset}, +{len}) ends at {at}: {extents:?}"
    );
    Some(extents)
}

fn reads_as_zeros(kind: ExtentKind) -> bool {
    matches!(
        kind,
        ExtentKind::Zero | ExtentKind::Unallocated | ExtentKind::Backing { zero: true, .. }
    )
}

/// Asserts that every read byte inside an extent that reads as zeros is 0.
fn check_zero_extents(
    plan: &[(u64, u64)],
    reads: &[Option<Vec<u8>>],
    extents: &[BlockStatus],
    what: &str,
) {
    for (&(off, len), got) in plan.iter().zip(reads) {
        let Some(got) = got else { continue };
        for e in extents.iter().filter(|e| reads_as_zeros(e.kind)) {
            let lo = off.max(e.offset);
            let hi = (off + len).min(e.offset + e.len);
            if lo >= hi {
                continue;
            }
            let slice = &got[(lo - off) as usize..(hi - off) as usize];
            if let Some(p) = first_difference(slice, None) {
                panic!(
                    "{what}: byte {} reads {:#x} but block status says {:?} for [{}, +{})",
                    lo + p as u64,
                    slice[p],
                    e.kind,
                    e.offset,
                    e.len
                );
            }
        }
    }
}

/// The ranges every session reads: the head and the tail of the disk, a
/// read across the first cluster boundary, an unaligned one in the middle,
/// and the first bytes of the first extents.
fn make_plan(size: u64, cs: u64, extents: &[BlockStatus]) -> Vec<(u64, u64)> {
    let mut plan = Vec::new();
    let mut push = |off: u64, len: u64| {
        let len = len.min(size.saturating_sub(off));
        if len > 0 {
            plan.push((off, len));
        }
    };
    push(0, HEAD_BYTES);
    if size > HEAD_BYTES {
        let tail = TAIL_BYTES.min(size - HEAD_BYTES);
        push(size - tail, tail);
    }
    if cs > 100 {
        push(cs - 100, 200);
    }
    push((size / 2) | 1, 3000);
    for e in extents.iter().skip(1).take(EXTENT_PROBES) {
        push(e.offset, cs.min(64 << 10));
    }
    let mut total = 0;
    plan.retain(|&(_, len)| {
        total += len;
        total <= MAX_PLAN_BYTES
    });
    plan
}

/// Opens `path`, asks block status, makes the plan if there is none yet,
/// reads it `passes` times and closes. `None` when the open failed.
fn session(
    path: &Path,
    opts: Options,
    plan: &mut Option<Vec<(u64, u64)>>,
    passes: usize,
    what: &str,
) -> Option<(Session, Vec<BlockStatus>)> {
    let disk = Disk::open(path, opts).ok()?;
    let size = disk.size();
    let cs = disk.cluster_size();
    let head = STATUS_SPAN.min(size);
    let mut extents = status(&disk, 0, head, what).unwrap_or_default();
    if size > head {
        let tail = TAIL_BYTES.min(size - head);
        extents.extend(status(&disk, size - tail, tail, what).unwrap_or_default());
    }
    let plan = plan.get_or_insert_with(|| make_plan(size, cs, &extents));
    let passes = (0..passes)
        .map(|_| {
            plan.iter()
                .map(|&(off, len)| {
                    if off + len > size {
                        return None;
                    }
                    let mut buf = vec![0u8; len as usize];
                    disk.read_at(&mut buf, off).ok().map(|()| buf)
                })
                .collect()
        })
        .collect();
    let stats = disk.stats();
    // Close may fail (e.g. a write-back error on a broken image); it must
    // not panic.
    let _ = disk.close();
    Some((
        Session {
            size,
            passes,
            stats,
        },
        extents,
    ))
}

/// The first byte where `a` differs from `b` (from zeros when `b` is
/// `None`). Compares 4 KiB at a time with `==` (a memcmp) and looks at single
/// bytes only inside a block that differs: a byte loop would be traced
/// compare by compare by the fuzzer's instrumentation, and dominate.
fn first_difference(a: &[u8], b: Option<&[u8]>) -> Option<usize> {
    const BLOCK: usize = 4096;
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    a.chunks(BLOCK).enumerate().find_map(|(i, x)| {
        let y = match b {
            Some(b) => &b[i * BLOCK..i * BLOCK + x.len()],
            None => &ZEROS[..x.len()],
        };
        (x != y).then(|| i * BLOCK + x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(0))
    })
}

/// Asserts that two sessions read the same bytes wherever both succeeded.
fn same_reads(plan: &[(u64, u64)], a: &[Option<Vec<u8>>], b: &[Option<Vec<u8>>], what: &str) {
    for ((&(off, len), x), y) in plan.iter().zip(a).zip(b) {
        if let (Some(x), Some(y)) = (x, y) {
            if let Some(p) = first_difference(x, Some(y)) {
                panic!(
                    "{what}: the read of [{off}, +{len}) differs at byte {}: {:#x} vs {:#x}",
                    off + p as u64,
                    x[p],
                    y[p]
                );
            }
        }
    }
}

/// A big-endian u64 header field of the image, if the file has it.
fn header_u64(path: &Path, offset: u64) -> Option<u64> {
    let f = std::fs::File::open(path).ok()?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).ok()?;
    Some(u64::from_be_bytes(b))
}

/// The virtual size field of a qcow2 header.
fn header_size(path: &Path) -> Option<u64> {
    header_u64(path, 24)
}

/// Whether a version 3 header has autoclear feature bits set. A writable
/// open clears them (qcow2.rst: a writer that does not maintain what they
/// describe must), which orphans e.g. the clusters of persistent bitmaps:
/// leaks, as `qemu-img check` would see them too.
fn has_autoclear_bits(path: &Path) -> bool {
    let version = header_u64(path, 0).map(|v| v as u32);
    version.is_some_and(|v| v >= 3) && header_u64(path, 88).is_some_and(|a| a != 0)
}

/// Fuzz target: `data` is a qcow2 image (or a sparse encoding of one). It
/// is checked with [`crate::check`], then:
///
/// 1. opened read-only: block status and reads, which must agree (extents
///    that read as zeros do), must not fill, and must leave the file
///    unchanged;
/// 2. read through a second overlay whose backing file it is: the backing
///    chain's qcow2 reader must read what the overlay reader read;
/// 3. opened read-write with copy-on-read, reading everything twice;
/// 4. checked again and opened read-only once more.
///
/// When the first check found no corruption, the reads of 1, 3 (both
/// passes) and 4 must be equal, and so must be the check after them:
/// copy-on-read never changes what a disk reads, and never breaks an image.
pub fn open_and_read(data: &[u8]) {
    let mut scratch = lock(&IMAGE_SCRATCH);
    let dir = scratch.get_or_insert_with(ImageScratch::new).dir.path();
    let image = dir.join(IMAGE);
    if !write_image(&image, data) {
        return;
    }
    let pre = crate::check(&image).ok();
    let autoclear = has_autoclear_bits(&image);
    let sound = pre
        .as_ref()
        .is_some_and(|r| r.corruptions == 0 && r.check_errors == 0);

    // 1. Read-only, with O_DIRECT. The file must not change (compared for
    // small files only: reading a large sparse one costs more than the
    // rest of the input together).
    let contents = || {
        std::fs::metadata(&image)
            .is_ok_and(|m| m.len() <= COMPARED_FILE_BYTES)
            .then(|| std::fs::read(&image).ok())
            .flatten()
    };
    let original = contents();
    let mut plan = None;
    let ro = session(
        &image,
        image_options(dir, true, CacheMode::None),
        &mut plan,
        1,
        "read-only open",
    );
    if let Some((s, extents)) = &ro {
        let p = plan.as_deref().unwrap_or_default();
        check_zero_extents(p, &s.passes[0], extents, "read-only open");
        assert_eq!(
            (s.stats.cor_fills, s.stats.bytes_written),
            (0, 0),
            "a read-only open filled or wrote: {:?}",
            s.stats
        );
    }
    if let Some(original) = original {
        let after = contents().unwrap_or_default();
        assert!(
            original == after,
            "a read-only open changed the image file ({} bytes before, {} after)",
            original.len(),
            after.len()
        );
    }

    // 2. The same image as the backing file of a fresh overlay.
    let top_size = ro
        .as_ref()
        .map(|(s, _)| s.size)
        .or_else(|| header_size(&image))
        .filter(|&s| s > 0)
        .unwrap_or(1 << 20)
        .min(MAX_TOP_SIZE);
    let top = dir.join(TOP);
    let top_opts = CreateOptions {
        size: Some(top_size),
        backing: Some(IMAGE.to_string()),
        backing_format: Some("qcow2".to_string()),
        cluster_size: 64 << 10,
        compat: Compat::V3,
        ..CreateOptions::default()
    };
    if create(&top, &top_opts).is_ok() {
        let chained = session(
            &top,
            image_options(dir, true, CacheMode::Writeback),
            &mut plan,
            1,
            "overlay over the image",
        );
        if let (Some((c, extents)), Some((s, _))) = (&chained, &ro) {
            let p = plan.as_deref().unwrap_or_default();
            check_zero_extents(p, &c.passes[0], extents, "overlay over the image");
            // Compare only what lies inside both disks (the top's size is
            // rounded up to 512 bytes).
            let within: Vec<bool> = p.iter().map(|&(o, l)| o + l <= s.size).collect();
            let keep = |v: &[Option<Vec<u8>>]| -> Vec<Option<Vec<u8>>> {
                v.iter()
                    .zip(&within)
                    .map(|(r, &w)| if w { r.clone() } else { None })
                    .collect()
            };
            same_reads(
                p,
                &keep(&s.passes[0]),
                &keep(&c.passes[0]),
                "the overlay reader and the backing chain reader",
            );
        }
    }

    // 3. Read-write with copy-on-read, two passes.
    let rw = session(
        &image,
        image_options(dir, false, CacheMode::None),
        &mut plan,
        2,
        "read-write open",
    );
    if !sound {
        return;
    }
    let p = &plan.clone().unwrap_or_default();
    if let Some((w, extents)) = &rw {
        check_zero_extents(p, &w.passes[0], extents, "read-write open");
        same_reads(
            p,
            &w.passes[0],
            &w.passes[1],
            "copy-on-read: the first and second read",
        );
        if let Some((s, _)) = &ro {
            same_reads(
                p,
                &s.passes[0],
                &w.passes[0],
                "a read-only and a copy-on-read open",
            );
        }
        // 4. The image after copy-on-read: no corruption, and no new leaks
        // unless clearing autoclear bits orphaned what they described.
        let post = crate::check(&image);
        let pre_leaks = pre.as_ref().map_or(0, |r| r.leaks);
        match &post {
            Ok(r)
                if r.corruptions == 0
                    && r.check_errors == 0
                    && (r.leaks <= pre_leaks || autoclear) => {}
            other => panic!(
                "check after copy-on-read of an image that checked clean ({pre:?}): {other:?}"
            ),
        }
        let again = session(
            &image,
            image_options(dir, true, CacheMode::Writeback),
            &mut plan,
            1,
            "read-only reopen after copy-on-read",
        );
        match &again {
            Some((a, _)) => same_reads(
                p,
                &w.passes[0],
                &a.passes[0],
                "copy-on-read and a later read-only open",
            ),
            None => panic!("an image that copy-on-read left clean no longer opens read-only"),
        }
    }
}

// ---------------------------------------------------------------------------
// nbd_handshake
// ---------------------------------------------------------------------------

/// The export the in-memory handshake offers.
const HANDSHAKE_EXPORT_SIZE: u64 = (1 << 20) + 512;

/// One side of a connection, in memory: reads what the peer sent
/// (`input`, then end of stream) and keeps what it writes (`out`).
pub(crate) struct Duplex<'a> {
    input: &'a [u8],
    pub(crate) out: Vec<u8>,
}

impl<'a> Duplex<'a> {
    pub(crate) fn new(input: &'a [u8]) -> Duplex<'a> {
        Duplex {
            input,
            out: Vec::new(),
        }
    }
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The options in the client's bytes that the server reads whole, in
/// order: their numbers.
fn client_options(mut c: Input<'_>) -> Vec<u32> {
    let mut opts = Vec::new();
    if c.u32().is_none() {
        return opts;
    }
    while let (Some(magic), Some(opt), Some(len)) = (c.take(8), c.u32(), c.u32()) {
        if be64(magic) != IHAVEOPT || len > MAX_OPTION_LEN || c.take(len as usize).is_none() {
            break;
        }
        opts.push(opt);
    }
    opts
}

fn is_final_reply(kind: u32) -> bool {
    kind == REP_ACK || kind & (1 << 31) != 0
}

/// Fuzz target: what a broken or hostile NBD server sends the NBD backing
/// client (its handshake, or its replies to reads on the wire); the input's
/// layout and the properties checked are those of
/// [`crate::backing::nbd::fuzz_server_bytes`].
pub fn nbd_backing_replies(data: &[u8]) {
    crate::backing::nbd::fuzz_server_bytes(data);
}

/// Fuzz target: what a broken or hostile HTTP server sends an HTTP backing,
/// through its whole response handling (open probe, ranged reads,
/// statuses, validators, retries); the input's layout and the properties
/// are those of [`crate::backing::http::fuzz_responses`].
pub fn http_responses(data: &[u8]) {
    crate::backing::http::fuzz_responses(data);
}

/// Fuzz target: what an HTTP server sends, through the HTTP backing's wire
/// parsers (response heads, `Content-Range`, chunk sizes, `Retry-After`);
/// the properties are those of `backing::http`'s `fuzz_wire`.
pub fn http_wire(data: &[u8]) {
    crate::backing::http::fuzz_wire(data);
}

/// Fuzz target: the first byte chooses whether the export is read-only and
/// whether the server is shutting down; the rest is the client's side of
/// the handshake. Every reply must be well formed and belong to the option
/// the client sent at its place; each option gets one final reply (ACK or
/// error); the transmission phase starts only after GO or EXPORT_NAME of
/// an existing export; a server that is shutting down refuses everything.
pub fn nbd_handshake(data: &[u8]) {
    let Some((&cfg, rest)) = data.split_first() else {
        return;
    };
    let export = Export {
        name: "fuzz".to_string(),
        description: "fuzzed handshake".to_string(),
        size: HANDSHAKE_EXPORT_SIZE,
        read_only: cfg & 1 != 0,
    };
    let stopping = cfg & 2 != 0;
    let mut s = Duplex::new(rest);
    let outcome = handshake::negotiate(&mut s, &export, &|| stopping);
    let sent = client_options(Input(rest));
    let out = s.out;

    // The greeting.
    assert!(out.len() >= 18, "no greeting: {out:?}");
    assert_eq!(be64(&out[0..8]), NBDMAGIC);
    assert_eq!(be64(&out[8..16]), IHAVEOPT);
    assert_eq!(
        u16::from_be_bytes([out[16], out[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    let mut r = Input(&out[18..]);
    let mut answered = 0usize; // options with their final reply
    let mut last: Option<(u32, u32)> = None; // (option, reply type)
    let mut export_name_reply = false;
    while !r.0.is_empty() {
        if r.0.len() >= 8 && be64(r.0) == REPLY_MAGIC_OPT {
            let (_, opt, kind, len) = (r.take(8), r.u32(), r.u32(), r.u32());
            let (opt, kind, len) = (
                opt.expect("option"),
                kind.expect("reply type"),
                len.expect("length"),
            );
            let body = r
                .take(len as usize)
                .unwrap_or_else(|| panic!("option reply cut short: {len} bytes announced"));
            let expected = sent.get(answered).copied();
            assert_eq!(
                Some(opt),
                expected,
                "reply {kind:#x} to option {opt} where option {expected:?} was sent ({sent:?})"
            );
            if stopping {
                assert!(
                    kind == REP_ERR_SHUTDOWN || (opt == OPT_ABORT && kind == REP_ACK),
                    "a stopping server answered option {opt} with {kind:#x}"
                );
            }
            check_option_reply(opt, kind, body, &export);
            if is_final_reply(kind) {
                answered += 1;
            }
            last = Some((opt, kind));
        } else {
            // Only EXPORT_NAME's reply has no header, and it is the last.
            let b = r.0;
            assert!(
                sent.get(answered) == Some(&OPT_EXPORT_NAME) && (b.len() == 10 || b.len() == 134),
                "unframed bytes in the handshake: {b:?} (options sent: {sent:?})"
            );
            assert_eq!(be64(b), export.size);
            let flags = u16::from_be_bytes([b[8], b[9]]);
            assert_eq!(flags & FLAG_READ_ONLY != 0, export.read_only);
            assert!(b[10..].iter().all(|&z| z == 0));
            export_name_reply = true;
            break;
        }
    }
    match outcome {
        Ok(Outcome::Transmission(neg)) => {
            assert!(!stopping, "a stopping server entered transmission");
            assert!(
                neg.structured || !(neg.base_allocation || neg.allocation_depth),
                "meta contexts without structured replies: {neg:?}"
            );
            assert!(
                export_name_reply || last == Some((OPT_GO, REP_ACK)),
                "transmission after {last:?}"
            );
        }
        Ok(Outcome::Closed) => {
            assert!(!export_name_reply, "closed after an EXPORT_NAME reply");
        }
        Err(_) => {
            assert!(!export_name_reply && last != Some((OPT_GO, REP_ACK)));
        }
    }
}

/// The body of one option reply is well formed for its type.
fn check_option_reply(opt: u32, kind: u32, body: &[u8], export: &Export) {
    match kind {
        REP_ACK => assert!(body.is_empty(), "ACK with data"),
        REP_SERVER => {
            assert_eq!(opt, OPT_LIST);
            let n = be32(body) as usize;
            assert_eq!(&body[4..4 + n], export.name.as_bytes());
        }
        REP_INFO => {
            assert!(
                opt == OPT_INFO || opt == OPT_GO,
                "INFO reply to option {opt}"
            );
            let info = u16::from_be_bytes([body[0], body[1]]);
            match info {
                INFO_EXPORT => {
                    assert_eq!(body.len(), 12);
                    assert_eq!(be64(&body[2..10]), export.size);
                    let flags = u16::from_be_bytes([body[10], body[11]]);
                    assert!(flags & FLAG_HAS_FLAGS != 0);
                    assert_eq!(flags & FLAG_READ_ONLY != 0, export.read_only);
                }
                INFO_BLOCK_SIZE => {
                    assert_eq!(body.len(), 14);
                    let (min, pref, max) = (be32(&body[2..]), be32(&body[6..]), be32(&body[10..]));
                    assert!(min.is_power_of_two() && min <= pref && pref <= max);
                }
                INFO_NAME | INFO_DESCRIPTION => {}
                other => panic!("unknown NBD_INFO type {other}"),
            }
        }
        REP_META_CONTEXT => {
            assert!(opt == OPT_LIST_META_CONTEXT || opt == OPT_SET_META_CONTEXT);
            let id = be32(body);
            let name = &body[4..];
            let known = [CONTEXT_BASE_ALLOCATION, CONTEXT_ALLOCATION_DEPTH];
            assert!(
                known.iter().any(
                    |&(i, n)| n.as_bytes() == name && (id == i || opt == OPT_LIST_META_CONTEXT)
                ),
                "meta context {id} {:?}",
                String::from_utf8_lossy(name)
            );
        }
        REP_ERR_UNSUP | REP_ERR_POLICY | REP_ERR_INVALID | REP_ERR_UNKNOWN | REP_ERR_SHUTDOWN
        | REP_ERR_TOO_BIG => {}
        other => panic!("unknown option reply type {other:#x} to option {opt}"),
    }
}

// ---------------------------------------------------------------------------
// nbd_client_bytes
// ---------------------------------------------------------------------------

/// The served disk: a qcow2 overlay with 4 KiB clusters (three stripes of
/// the router, so two cores both own some) and a partial last cluster,
/// over a raw backing file that ends before it, at an odd length.
const NBD_DISK_SIZE: u64 = (4 << 20) + 1536;
const NBD_BASE_LEN: u64 = (3 << 20) + 100;
const NBD_EXPORT: &str = "fuzz";
/// Inputs served by one server; then it is stopped, its image closed and
/// checked, and a fresh one started (copy-on-read would otherwise have
/// filled the whole overlay, and nothing would exercise it any more).
const NBD_EPOCH_INPUTS: u64 = 2000;
/// A well-behaved client checks the server every this many inputs.
const NBD_PROBE_EVERY: u64 = 50;
/// A server that sends nothing for this long has hung.
const NBD_HANG: std::time::Duration = std::time::Duration::from_secs(20);
/// Bytes of READ data the compact requests of one input may ask for; the
/// requests past it are not sent. (Bounds keep every input fast: the
/// fuzzer learns nothing from moving more bytes.)
const NBD_MAX_READ_BYTES: u64 = 32 << 20;
/// Bytes one input may send in all (compact WRITE payloads included).
const NBD_MAX_SEND_BYTES: usize = 16 << 20;
/// A compact WRITE's length wraps at this, a little past the disk size (so
/// that writes past the end remain), to bound its payload.
const NBD_MAX_WRITE_LEN: u32 = NBD_DISK_SIZE as u32 + (64 << 10);

/// A running server on its own image.
struct Live {
    _dir: tempfile::TempDir,
    image: PathBuf,
    sock: PathBuf,
    disk: Disk,
    stop: crate::nbd::StopHandle,
    thread: Option<std::thread::JoinHandle<crate::Result<()>>>,
    inputs: u64,
}

static LIVE: Mutex<Option<Live>> = Mutex::new(None);

impl Live {
    fn start() -> Live {
        // The harness writes to sockets the server may have closed; that
        // must be an EPIPE error, not a signal that ends the process. (Rust
        // programs ignore SIGPIPE; a libFuzzer binary has a C main.)
        // SAFETY: setting a signal's disposition to SIG_IGN installs no
        // handler code and touches no memory of ours.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let dir = scratch_dir("nbd");
        let fail = |e: &dyn std::fmt::Display| -> ! { panic!("fuzz harness: nbd server: {e}") };
        std::fs::write(dir.path().join(BASE_RAW), pattern(NBD_BASE_LEN))
            .unwrap_or_else(|e| fail(&e));
        let image = dir.path().join(IMAGE);
        let opts = CreateOptions {
            size: Some(NBD_DISK_SIZE),
            backing: Some(BASE_RAW.to_string()),
            backing_format: Some("raw".to_string()),
            cluster_size: 4096,
            compat: Compat::V3,
            ..CreateOptions::default()
        };
        create(&image, &opts).unwrap_or_else(|e| fail(&e));
        let disk = Disk::open(
            &image,
            Options {
                cores: 2,
                metadata_cache_bytes: METADATA_CACHE_BYTES,
                poll_us: 0,
                backing_dir: Some(dir.path().to_path_buf()),
                ..Options::default()
            },
        )
        .unwrap_or_else(|e| fail(&e));
        let sock = dir.path().join("nbd.sock");
        let listener = crate::nbd::Listener::unix(&sock).unwrap_or_else(|e| fail(&e));
        let cfg = crate::nbd::Config {
            export: NBD_EXPORT.to_string(),
            description: "fuzzed".to_string(),
            read_only: false,
        };
        let server = crate::nbd::Server::new(disk.clone(), listener, cfg);
        let stop = server.stop_handle();
        let thread = std::thread::Builder::new()
            .name("fuzz-nbd-server".to_string())
            .spawn(move || server.run())
            .unwrap_or_else(|e| fail(&e));
        Live {
            _dir: dir,
            image,
            sock,
            disk,
            stop,
            thread: Some(thread),
            inputs: 0,
        }
    }

    /// Stops the server, closes the disk, and checks the image: whatever
    /// the clients sent, it must be consistent.
    fn retire(mut self) {
        self.stop.stop();
        let run = self.thread.take().map(|t| t.join());
        match run {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => panic!("the NBD server failed: {e}"),
            Some(Err(_)) => panic!("the NBD server thread panicked"),
            None => {}
        }
        if let Err(e) = self.disk.close() {
            panic!("closing the served disk failed: {e}");
        }
        match crate::check(&self.image) {
            Ok(r) if r.exit_code() == 0 => {}
            other => panic!("the served image does not check clean: {other:?}"),
        }
        drop(self.stop);
        #[cfg(feature = "lsan-at-retire")]
        leak_check_without_reactors();
    }
}

/// With feature `lsan-at-retire`, in a LeakSanitizer build: a leak check
/// after each server stop, made once no reactor thread is left. Every
/// reactor thread has then ended, so a reactor's state (its `Core`, which
/// lives on its thread's stack) reported here is a real leak, not a thread
/// LeakSanitizer failed to scan. Panics (a finding) on a report, or when
/// reactor threads outlive the stop.
#[cfg(feature = "lsan-at-retire")]
fn leak_check_without_reactors() {
    extern "C" {
        fn __lsan_do_recoverable_leak_check() -> libc::c_int;
    }
    let reactors: Vec<String> = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|n| n.starts_with("backfill-core"))
        .collect();
    assert!(
        reactors.is_empty(),
        "reactor threads still running after the disk closed: {reactors:?}"
    );
    // SAFETY: LeakSanitizer's `int __lsan_do_recoverable_leak_check(void)`,
    // callable from any thread at any time.
    let found = unsafe { __lsan_do_recoverable_leak_check() };
    assert!(
        found == 0,
        "LeakSanitizer found leaks after a server stop, with every reactor thread ended"
    );
}

/// How an input starts its connection (the low bits of its first byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opening {
    /// The input is sent from the first byte.
    Raw,
    /// Valid client flags; the input is the option haggling.
    Options,
    /// A valid handshake ending in GO.
    Go { structured: bool, meta: bool },
    /// Client flags without NO_ZEROES, then EXPORT_NAME (the old way in).
    ExportName,
}

impl Opening {
    fn from_mode(mode: u8) -> Opening {
        match mode & 7 {
            0 => Opening::Raw,
            1 => Opening::Options,
            2 => Opening::Go {
                structured: false,
                meta: false,
            },
            3 => Opening::Go {
                structured: true,
                meta: false,
            },
            5 => Opening::ExportName,
            _ => Opening::Go {
                structured: true,
                meta: true,
            },
        }
    }

    fn reaches_transmission(self) -> bool {
        matches!(self, Opening::Go { .. } | Opening::ExportName)
    }

    fn bytes(self) -> Vec<u8> {
        let mut v = Vec::new();
        let option = |v: &mut Vec<u8>, opt: u32, data: &[u8]| {
            v.extend_from_slice(&IHAVEOPT.to_be_bytes());
            v.extend_from_slice(&opt.to_be_bytes());
            v.extend_from_slice(&(data.len() as u32).to_be_bytes());
            v.extend_from_slice(data);
        };
        match self {
            Opening::Raw => {}
            Opening::Options => {
                v.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            }
            Opening::Go { structured, meta } => {
                v.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
                if structured {
                    option(&mut v, OPT_STRUCTURED_REPLY, &[]);
                }
                if meta {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(NBD_EXPORT.len() as u32).to_be_bytes());
                    d.extend_from_slice(NBD_EXPORT.as_bytes());
                    d.extend_from_slice(&2u32.to_be_bytes());
                    for (_, name) in [CONTEXT_BASE_ALLOCATION, CONTEXT_ALLOCATION_DEPTH] {
                        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                    }
                    option(&mut v, OPT_SET_META_CONTEXT, &d);
                }
                let mut d = Vec::new();
                d.extend_from_slice(&(NBD_EXPORT.len() as u32).to_be_bytes());
                d.extend_from_slice(NBD_EXPORT.as_bytes());
                d.extend_from_slice(&1u16.to_be_bytes());
                d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                option(&mut v, OPT_GO, &d);
            }
            Opening::ExportName => {
                v.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
                option(&mut v, OPT_EXPORT_NAME, NBD_EXPORT.as_bytes());
            }
        }
        v
    }
}

/// Bytes compact WRITEs send: slices of one pattern, each from its own
/// start. Copied in one piece: a loop over the bytes would be traced
/// compare by compare by the fuzzer's instrumentation, and dominate.
fn write_pattern() -> &'static [u8] {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| pattern(u64::from(NBD_MAX_WRITE_LEN) + 256))
}

/// A request the compact encoding sent, and what its replies showed.
#[derive(Debug)]
struct Sent {
    kind: u16,
    flags: u16,
    offset: u64,
    len: u32,
    /// READ: byte ranges the chunks covered. BLOCK_STATUS: context ids.
    seen: Vec<(u64, u64)>,
    failed: bool,
}

/// Compact requests: records of (command, flags, offset, length) with the
/// magic, cookies and WRITE payloads filled in by the harness, so that the
/// fuzzer spends its time on sequences of requests. Record layout: u8
/// command (0-15; 8 and up are unknown commands), u8 flags (the low 5 bits
/// are the protocol's, the top 3 become unknown bits), u24 offset (its top
/// bit makes it a huge offset near 2^64; else it wraps a little past the
/// end of the disk), u24 length (a WRITE's wraps at `NBD_MAX_WRITE_LEN`). A record of DISC ends the expected
/// replies; whatever follows it is sent, unanswered.
fn encode_compact(rest: &[u8], out: &mut Vec<u8>) -> BTreeMap<u64, Sent> {
    let mut expect = BTreeMap::new();
    let mut inp = Input(rest);
    let mut cookie = 0u64;
    let mut read_bytes = 0u64;
    let mut disconnected = false;
    while let (Some(cmd), Some(fl), Some(off), Some(len)) =
        (inp.u8(), inp.u8(), u24(&mut inp), u24(&mut inp))
    {
        let kind = u16::from(cmd & 15);
        let len = if kind == CMD_WRITE {
            len % NBD_MAX_WRITE_LEN
        } else {
            len
        };
        let flags = u16::from(fl & 0x1f) | (u16::from(fl & 0xe0) << 8);
        let offset = if off & 0x80_0000 != 0 {
            u64::MAX - u64::from(off & 0xffff)
        } else {
            u64::from(off) % (NBD_DISK_SIZE + 8192)
        };
        let in_bounds = offset
            .checked_add(u64::from(len))
            .is_some_and(|e| e <= NBD_DISK_SIZE);
        if kind == CMD_READ && in_bounds {
            read_bytes += u64::from(len);
        }
        let payload = if kind == CMD_WRITE { len as usize } else { 0 };
        if read_bytes > NBD_MAX_READ_BYTES || out.len() + 28 + payload > NBD_MAX_SEND_BYTES {
            break;
        }
        cookie += 1;
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        let start = (cookie % 251) as usize;
        out.extend_from_slice(&write_pattern()[start..start + payload]);
        if disconnected {
            continue;
        }
        if kind == CMD_DISC {
            disconnected = true;
            continue;
        }
        expect.insert(
            cookie,
            Sent {
                kind,
                flags,
                offset,
                len,
                seen: Vec::new(),
                failed: false,
            },
        );
    }
    expect
}

/// What the reply reader knows about the session.
struct Expect {
    opening: Opening,
    /// Compact mode: the requests sent, by cookie. `None`: raw bytes, whose
    /// replies are only drained.
    requests: Option<BTreeMap<u64, Sent>>,
    /// Every request must succeed (the well-behaved probe).
    strict: bool,
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), String> {
    r.read_exact(buf).map_err(|e| format!("{what}: {e}"))
}

fn read_u16(r: &mut impl Read, what: &str) -> Result<u16, String> {
    let mut b = [0u8; 2];
    read_exact_or(r, &mut b, what)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read, what: &str) -> Result<u32, String> {
    let mut b = [0u8; 4];
    read_exact_or(r, &mut b, what)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read, what: &str) -> Result<u64, String> {
    let mut b = [0u8; 8];
    read_exact_or(r, &mut b, what)?;
    Ok(u64::from_be_bytes(b))
}

fn skip(r: &mut impl Read, n: u64, what: &str) -> Result<(), String> {
    let got =
        io::copy(&mut r.by_ref().take(n), &mut io::sink()).map_err(|e| format!("{what}: {e}"))?;
    if got != n {
        return Err(format!("{what}: the stream ended {} bytes early", n - got));
    }
    Ok(())
}

/// Reads the server's side of a handshake the harness made, up to the
/// transmission phase. Returns the meta context ids selected.
fn read_handshake(r: &mut impl Read, opening: Opening) -> Result<Vec<u32>, String> {
    let magic = read_u64(r, "greeting")?;
    let ihaveopt = read_u64(r, "greeting")?;
    let _flags = read_u16(r, "greeting")?;
    if (magic, ihaveopt) != (NBDMAGIC, IHAVEOPT) {
        return Err(format!("bad greeting {magic:#x} {ihaveopt:#x}"));
    }
    let mut contexts = Vec::new();
    let options: &[u32] = match opening {
        Opening::Go {
            structured: true,
            meta: true,
        } => &[OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_GO],
        Opening::Go {
            structured: true, ..
        } => &[OPT_STRUCTURED_REPLY, OPT_GO],
        Opening::Go { .. } => &[OPT_GO],
        Opening::ExportName => {
            let size = read_u64(r, "EXPORT_NAME reply")?;
            let _flags = read_u16(r, "EXPORT_NAME reply")?;
            skip(r, 124, "EXPORT_NAME reply padding")?;
            if size != NBD_DISK_SIZE {
                return Err(format!("EXPORT_NAME says the size is {size}"));
            }
            return Ok(contexts);
        }
        Opening::Raw | Opening::Options => return Ok(contexts),
    };
    for &want in options {
        loop {
            let magic = read_u64(r, "option reply")?;
            let opt = read_u32(r, "option reply")?;
            let kind = read_u32(r, "option reply")?;
            let len = read_u32(r, "option reply")?;
            if magic != REPLY_MAGIC_OPT || opt != want || len > 4096 {
                return Err(format!(
                    "option {want}: reply magic {magic:#x} option {opt} type {kind:#x} length {len}"
                ));
            }
            let mut body = vec![0u8; len as usize];
            read_exact_or(r, &mut body, "option reply data")?;
            match kind {
                REP_ACK => break,
                REP_META_CONTEXT if body.len() >= 4 => contexts.push(be32(&body)),
                REP_INFO => {}
                _ => return Err(format!("option {want} refused with {kind:#x}: {body:?}")),
            }
        }
    }
    Ok(contexts)
}

/// Reads and checks every reply of a compact session until the server
/// closes the connection.
fn read_replies(
    r: &mut impl Read,
    structured: bool,
    contexts: &[u32],
    sent: &mut BTreeMap<u64, Sent>,
    strict: bool,
) -> Result<(), String> {
    loop {
        let mut m = [0u8; 4];
        match r.read(&mut m[..1]) {
            Ok(0) => break,
            Ok(_) => {}
            // libFuzzer's timer signal (SIGALRM) interrupts blocking reads.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The server closed with bytes of ours unread (after DISC).
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(format!("reply magic: {e}")),
        }
        read_exact_or(r, &mut m[1..], "reply magic")?;
        match u32::from_be_bytes(m) {
            SIMPLE_REPLY_MAGIC => {
                let error = read_u32(r, "simple reply")?;
                let cookie = read_u64(r, "simple reply")?;
                let req = sent
                    .remove(&cookie)
                    .ok_or_else(|| format!("simple reply to unknown cookie {cookie}"))?;
                if structured && req.kind == CMD_READ {
                    return Err(format!(
                        "simple reply to a READ after structured replies: {req:?}"
                    ));
                }
                if strict && error != 0 {
                    return Err(format!("{req:?} failed with {error}"));
                }
                if error == 0 && req.kind == CMD_READ {
                    skip(r, u64::from(req.len), "READ data")?;
                }
            }
            STRUCTURED_REPLY_MAGIC if structured => {
                let flags = read_u16(r, "chunk")?;
                let kind = read_u16(r, "chunk")?;
                let cookie = read_u64(r, "chunk")?;
                let len = read_u32(r, "chunk")?;
                let req = sent
                    .get_mut(&cookie)
                    .ok_or_else(|| format!("chunk {kind} for unknown cookie {cookie}"))?;
                chunk(r, req, kind, len, contexts)?;
                if flags & REPLY_FLAG_DONE != 0 {
                    let req = sent.remove(&cookie).expect("just seen");
                    finished(&req, contexts, strict)?;
                }
            }
            other => return Err(format!("bad reply magic {other:#x}")),
        }
    }
    if !sent.is_empty() {
        return Err(format!(
            "the server closed the connection without answering {} requests, e.g. {:?}",
            sent.len(),
            sent.iter().next()
        ));
    }
    Ok(())
}

/// Checks one structured chunk of `req` and consumes its payload.
fn chunk(
    r: &mut impl Read,
    req: &mut Sent,
    kind: u16,
    len: u32,
    contexts: &[u32],
) -> Result<(), String> {
    let end = req.offset.saturating_add(u64::from(req.len));
    let bad = |req: &Sent, m: &str| Err(format!("chunk type {kind} length {len} for {req:?}: {m}"));
    match kind {
        REPLY_TYPE_NONE => {
            if len != 0 {
                return bad(req, "NONE with a payload");
            }
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            if req.kind != CMD_READ || req.failed {
                return bad(req, "data or hole chunk where none belongs");
            }
            let off = read_u64(r, "chunk offset")?;
            let n = if kind == REPLY_TYPE_OFFSET_DATA {
                if len <= 8 {
                    return bad(req, "empty data chunk");
                }
                skip(r, u64::from(len - 8), "chunk data")?;
                u64::from(len - 8)
            } else {
                if len != 12 {
                    return bad(req, "hole chunk of the wrong length");
                }
                u64::from(read_u32(r, "hole size")?)
            };
            if off < req.offset || off.saturating_add(n) > end || n == 0 {
                return bad(req, &format!("covers [{off}, +{n}) outside the request"));
            }
            if req.seen.iter().any(|&(a, b)| off < b && a < off + n) {
                return bad(req, &format!("[{off}, +{n}) overlaps an earlier chunk"));
            }
            req.seen.push((off, off + n));
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if req.kind != CMD_BLOCK_STATUS || len < 12 || !(len - 4).is_multiple_of(8) {
                return bad(req, "malformed block status");
            }
            let id = read_u32(r, "context id")?;
            if !contexts.contains(&id) || req.seen.iter().any(|&(c, _)| c == u64::from(id)) {
                return bad(req, &format!("context {id} not negotiated, or repeated"));
            }
            req.seen.push((u64::from(id), 0));
            let n = (len - 4) / 8;
            if req.flags & CMD_FLAG_REQ_ONE != 0 && n != 1 {
                return bad(req, "REQ_ONE answered with several extents");
            }
            let mut total = 0u64;
            for _ in 0..n {
                let l = read_u32(r, "extent")?;
                let _flags = read_u32(r, "extent")?;
                if l == 0 {
                    return bad(req, "empty extent");
                }
                total += u64::from(l);
            }
            if req.offset.saturating_add(total) > NBD_DISK_SIZE {
                return bad(req, &format!("extents of {total} bytes run past the disk"));
            }
        }
        REPLY_TYPE_ERROR => {
            if len < 6 {
                return bad(req, "short error chunk");
            }
            let error = read_u32(r, "error")?;
            let msg_len = read_u16(r, "error")?;
            if error == 0 || u32::from(msg_len) > len - 6 {
                return bad(req, &format!("error {error} with a {msg_len}-byte message"));
            }
            skip(r, u64::from(len - 6), "error message")?;
            req.failed = true;
        }
        _ => return bad(req, "unknown chunk type"),
    }
    Ok(())
}

/// Checks a request whose last chunk arrived.
fn finished(req: &Sent, contexts: &[u32], strict: bool) -> Result<(), String> {
    if req.failed {
        return if strict {
            Err(format!("{req:?} failed"))
        } else {
            Ok(())
        };
    }
    match req.kind {
        CMD_READ => {
            let covered: u64 = req.seen.iter().map(|&(a, b)| b - a).sum();
            if covered != u64::from(req.len) {
                return Err(format!("a READ was answered with {covered} bytes: {req:?}"));
            }
            Ok(())
        }
        // `seen` holds (context id, 0) pairs here.
        CMD_BLOCK_STATUS if req.seen.len() != contexts.len() => Err(format!(
            "block status for contexts {:?} of {contexts:?}",
            req.seen
        )),
        _ => Ok(()),
    }
}

/// Runs one connection: sends `bytes` (then shuts down the sending side)
/// while reading and checking what comes back.
fn converse(sock: &Path, bytes: &[u8], mut expect: Expect) -> Result<(), String> {
    use std::os::unix::net::UnixStream;
    let stream = UnixStream::connect(sock).map_err(|e| format!("connecting: {e}"))?;
    let setup = stream
        .set_read_timeout(Some(NBD_HANG))
        .and_then(|()| stream.set_write_timeout(Some(NBD_HANG)))
        .and_then(|()| stream.try_clone());
    let mut writer = setup.map_err(|e| format!("socket setup: {e}"))?;
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || {
            let r = writer.write_all(bytes);
            let _ = writer.shutdown(std::net::Shutdown::Write);
            match r {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    Err(format!("the server stopped reading for {NBD_HANG:?}"))
                }
                _ => Ok(()),
            }
        });
        let mut r = io::BufReader::with_capacity(64 << 10, &stream);
        let read = match &mut expect.requests {
            None => io::copy(&mut r, &mut io::sink())
                .map(|_| ())
                .or_else(|e| match e.kind() {
                    io::ErrorKind::ConnectionReset => Ok(()),
                    _ => Err(format!("reading replies: {e}")),
                }),
            Some(sent) => read_handshake(&mut r, expect.opening).and_then(|contexts| {
                let structured = matches!(
                    expect.opening,
                    Opening::Go {
                        structured: true,
                        ..
                    }
                );
                read_replies(&mut r, structured, &contexts, sent, expect.strict)
            }),
        };
        if read.is_err() {
            // Unblock the sender before the scope joins it.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err("the sender panicked".into()));
        read.and(sent)
    })
}

/// Checks that the server serves a well-behaved client: a handshake with
/// structured replies and both meta contexts, reads (the partial last
/// cluster too), block status, a flush and a clean disconnect.
fn probe(sock: &Path) {
    let opening = Opening::Go {
        structured: true,
        meta: true,
    };
    let mut bytes = opening.bytes();
    let mut records = Vec::new();
    for (cmd, off, len) in [
        (CMD_READ, 0u64, 4096u32),
        (CMD_READ, NBD_DISK_SIZE - 1000, 1000),
        (CMD_BLOCK_STATUS, 0, 64 << 10),
        (CMD_FLUSH, 0, 0),
        (CMD_DISC, 0, 0),
    ] {
        records.extend_from_slice(&[cmd as u8, 0]);
        records.extend_from_slice(&(off as u32).to_be_bytes()[1..]);
        records.extend_from_slice(&len.to_be_bytes()[1..]);
    }
    let requests = encode_compact(&records, &mut bytes);
    let expect = Expect {
        opening,
        requests: Some(requests),
        strict: true,
    };
    if let Err(e) = converse(sock, &bytes, expect) {
        panic!("a well-behaved client is no longer served: {e}");
    }
}

/// Fuzz target: one connection to the real NBD server. The first byte's
/// low 3 bits choose how the connection opens (raw bytes, after the client
/// flags, after GO with or without structured replies and meta contexts,
/// or after EXPORT_NAME; see `Opening`); with its top bit set, and a
/// handshake that reaches transmission, the rest is compact requests (see
/// `encode_compact`) whose replies are checked: one final reply per
/// request, well-formed chunks that cover a READ exactly, no unknown
/// cookies. Otherwise the rest is sent as is and the replies are drained.
/// The server must never hang or crash, and keeps serving a well-behaved
/// client; every [`NBD_EPOCH_INPUTS`] inputs it is stopped and its image
/// must check clean.
pub fn nbd_client_bytes(data: &[u8]) {
    let mut live = lock(&LIVE);
    if live.as_ref().is_some_and(|l| l.inputs >= NBD_EPOCH_INPUTS) {
        if let Some(l) = live.take() {
            l.retire();
        }
    }
    let l = live.get_or_insert_with(Live::start);
    l.inputs += 1;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let opening = Opening::from_mode(mode);
    let mut bytes = opening.bytes();
    let requests = if mode & 0x80 != 0 && opening.reaches_transmission() {
        Some(encode_compact(rest, &mut bytes))
    } else {
        bytes.extend_from_slice(&rest[..rest.len().min(NBD_MAX_SEND_BYTES)]);
        None
    };
    let expect = Expect {
        opening,
        requests,
        strict: false,
    };
    if let Err(e) = converse(&l.sock, &bytes, expect) {
        panic!(
            "NBD session ({opening:?}, input {} of this server): {e}",
            l.inputs
        );
    }
    if l.inputs.is_multiple_of(NBD_PROBE_EVERY) {
        probe(&l.sock);
    }
}

/// Stops the server [`nbd_client_bytes`] started (if any), after a last
/// probe, and checks its image; the corpus replay calls it at the end.
pub fn nbd_finish() {
    if let Some(l) = lock(&LIVE).take() {
        probe(&l.sock);
        l.retire();
    }
}

// ---------------------------------------------------------------------------
// lock_table_ops
// ---------------------------------------------------------------------------

/// Cluster indexes the lock-table ops use: a few small ones (so that ops
/// collide) and extreme ones.
const LOCK_CLUSTERS: [u64; 10] = [0, 1, 2, 3, 4, 5, 6, 7, 1 << 40, u64::MAX];

/// A parked piece, as the table holds it; counts its drops so that a
/// waiter the table loses is noticed.
struct Waiter {
    piece: usize,
    drops: std::rc::Rc<std::cell::Cell<usize>>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.drops.set(self.drops.get() + 1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceState {
    /// Created, or woken and queued to run again.
    Runnable,
    Waiting(u64),
    /// Joined the fill with this id (a reader).
    Joined(usize),
    Holding,
    Done,
}

#[derive(Debug)]
struct Piece {
    write: bool,
    cluster: u64,
    state: PieceState,
}

/// The model of one cluster: who holds it and who waits, in order.
#[derive(Debug)]
struct ModelEntry {
    holder: Holder<usize>,
    /// The piece that took the lock.
    owner: usize,
    waiters: Vec<usize>,
}

struct LockHarness {
    table: LockTable<usize, Waiter>,
    model: BTreeMap<u64, ModelEntry>,
    pieces: Vec<Piece>,
    /// Fill id → the readers waiting for its data.
    fills: HashMap<usize, Vec<usize>>,
    next_fill: usize,
    runnable: VecDeque<usize>,
    drops: std::rc::Rc<std::cell::Cell<usize>>,
    /// Waiters parked, and waiters the table gave back.
    waits: usize,
    returned: usize,
}

impl LockHarness {
    /// One step of a piece, as the reactor runs it: a read joins a fill in
    /// progress, waits behind a write, or starts a fill; a write takes the
    /// lock or waits.
    fn run(&mut self, id: usize) {
        let (write, c) = (self.pieces[id].write, self.pieces[id].cluster);
        assert_eq!(self.pieces[id].state, PieceState::Runnable);
        let held = self.model.get(&c).map(|e| e.holder);
        assert_eq!(self.table.holder(c), held, "holder of cluster {c}");
        let state = match (write, held) {
            (false, Some(Holder::Fill(f))) => {
                self.fills.get_mut(&f).expect("live fill").push(id);
                PieceState::Joined(f)
            }
            (_, Some(_)) => {
                assert!(
                    !self.table.try_lock(c, Holder::Write),
                    "cluster {c} locked twice"
                );
                self.table.wait(
                    c,
                    Waiter {
                        piece: id,
                        drops: self.drops.clone(),
                    },
                );
                self.waits += 1;
                self.model.get_mut(&c).expect("held").waiters.push(id);
                PieceState::Waiting(c)
            }
            (_, None) => {
                let holder = if write {
                    Holder::Write
                } else {
                    let f = self.next_fill;
                    self.next_fill += 1;
                    self.fills.insert(f, Vec::new());
                    Holder::Fill(f)
                };
                assert!(self.table.try_lock(c, holder), "free cluster {c} refused");
                self.model.insert(
                    c,
                    ModelEntry {
                        holder,
                        owner: id,
                        waiters: Vec::new(),
                    },
                );
                PieceState::Holding
            }
        };
        self.pieces[id].state = state;
    }

    /// The holder of `c` finishes: its fill's readers are done, the lock is
    /// released, and its waiters are queued to run again, in arrival order,
    /// each exactly once.
    fn release(&mut self, c: u64) {
        let entry = self.model.remove(&c).expect("releasing a held cluster");
        self.pieces[entry.owner].state = PieceState::Done;
        if let Holder::Fill(f) = entry.holder {
            for r in self.fills.remove(&f).expect("live fill") {
                assert_eq!(self.pieces[r].state, PieceState::Joined(f));
                self.pieces[r].state = PieceState::Done;
            }
        }
        let woken = self.table.unlock(c);
        self.returned += woken.len();
        let ids: Vec<usize> = woken.iter().map(|w| w.piece).collect();
        assert_eq!(
            ids, entry.waiters,
            "waiters of cluster {c}, in arrival order"
        );
        for w in woken {
            let p = &mut self.pieces[w.piece];
            assert_eq!(
                p.state,
                PieceState::Waiting(c),
                "piece {} woken twice",
                w.piece
            );
            p.state = PieceState::Runnable;
            self.runnable.push_back(w.piece);
        }
        assert_eq!(self.table.holder(c), None);
    }

    fn check_sizes(&self) {
        assert_eq!(self.table.len(), self.model.len());
        assert_eq!(self.table.is_empty(), self.model.is_empty());
    }
}

/// Fuzz target: the bytes are operations on a lock table, driven the way
/// the reactor drives it (reads join fills in progress or wait behind
/// writes; writes wait for any holder; woken pieces run again). Checked
/// against a model after every operation: at most one holder per cluster,
/// `holder` and `len` agree, waiters come back in arrival order, each
/// exactly once; at the end, with every holder released, every piece is
/// done and no waiter was lost.
pub fn lock_table_ops(data: &[u8]) {
    let mut h = LockHarness {
        table: LockTable::new(),
        model: BTreeMap::new(),
        pieces: Vec::new(),
        fills: HashMap::new(),
        next_fill: 0,
        runnable: VecDeque::new(),
        drops: Default::default(),
        waits: 0,
        returned: 0,
    };
    let mut inp = Input(data);
    while let (Some(op), Some(arg)) = (inp.u8(), inp.u8()) {
        let cluster = LOCK_CLUSTERS[arg as usize % LOCK_CLUSTERS.len()];
        match op % 5 {
            0 | 1 => {
                let id = h.pieces.len();
                h.pieces.push(Piece {
                    write: op % 5 == 1,
                    cluster,
                    state: PieceState::Runnable,
                });
                h.run(id);
            }
            2 => {
                let held: Vec<u64> = h.model.keys().copied().collect();
                if !held.is_empty() {
                    h.release(held[arg as usize % held.len()]);
                }
            }
            3 => {
                for _ in 0..=arg % 4 {
                    if let Some(id) = h.runnable.pop_front() {
                        h.run(id);
                    }
                }
            }
            _ => {
                let held = h.model.get(&cluster).map(|e| e.holder);
                assert_eq!(h.table.holder(cluster), held);
            }
        }
        h.check_sizes();
    }
    // Drain: run what is runnable, release the oldest holder, repeat. A
    // piece may wait again each time its cluster is released (the first
    // woken takes it), so the drain takes up to quadratically many steps.
    let n = h.pieces.len();
    let limit = (n + 1) * (n + 1) + 4;
    let mut steps = 0usize;
    loop {
        if let Some(id) = h.runnable.pop_front() {
            h.run(id);
        } else if let Some(&c) = h.model.keys().next() {
            h.release(c);
        } else {
            break;
        }
        h.check_sizes();
        steps += 1;
        assert!(steps <= limit, "the drain does not end");
    }
    assert!(h.table.is_empty());
    for (i, p) in h.pieces.iter().enumerate() {
        assert_eq!(
            p.state,
            PieceState::Done,
            "piece {i} ({p:?}) never finished"
        );
    }
    // Every waiter came back from the table exactly once, and the table
    // keeps none.
    assert_eq!(h.returned, h.waits, "waiters lost inside the table");
    assert_eq!(h.drops.get(), h.waits, "waiters kept inside the table");
}
