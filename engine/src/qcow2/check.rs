//! Offline consistency check of a qcow2 image, with the verdicts of
//! `qemu-img check`.
//!
//! What it owns: recomputing the reference count of every host cluster from
//! the metadata (header, L1, L2, refcount table and blocks, data clusters)
//! and comparing it with the stored refcounts and the COPIED flags.
//!
//! What it never does: repair, or write anything. It only reads.
//!
//! Invariants: memory is bounded by the file length (two 16-bit counters
//! per host cluster) plus one cluster of table at a time; every offset read
//! from the image is checked against the file length before it is followed.

use std::fmt;
use std::fs::File;
use std::path::Path;

use super::entry::{compressed_extent, decode_l1, decode_l2_at, L2Entry};
use super::header::{read_exact_at, Header, EXT_BITMAPS};
use super::snapshot::{parse_snapshot_table, snapshot_table_len, MAX_SNAPSHOT_TABLE_BYTES};
use super::{OFLAG_COPIED, REFT_OFFSET_MASK};
use crate::error::{Error, Result};

/// The result of [`check`], counted the way `qemu-img check` counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters whose stored refcount is below their real reference count,
    /// plus broken metadata (misaligned or out-of-file entries, bad COPIED).
    pub corruptions: u64,
    /// Clusters whose stored refcount is above their reference count.
    pub leaks: u64,
    /// Errors that kept the check from completing a part of its walk.
    pub check_errors: u64,
    /// One line per finding, in the words qemu-img uses.
    pub messages: Vec<String>,
    /// Guest clusters backed by a host cluster (data or preallocated zero).
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// End of the last host cluster in use (referenced or refcounted).
    pub image_end_offset: u64,
}

impl CheckReport {
    /// The exit code qemu-img check would give: 0 clean, 1 the check could
    /// not complete, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    fn corruption(&mut self, msg: String) {
        self.corruptions += 1;
        self.messages.push(msg);
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.messages {
            writeln!(f, "{m}")?;
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            writeln!(f, "No errors were found on the image.")?;
        } else {
            if self.corruptions > 0 {
                writeln!(
                    f,
                    "\n{} errors were found on the image.\nData may be corrupted, or further \
                     writes to the image may corrupt it.",
                    self.corruptions
                )?;
            }
            if self.leaks > 0 {
                writeln!(
                    f,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                     space, but no harm to data.",
                    self.leaks
                )?;
            }
            if self.check_errors > 0 {
                writeln!(
                    f,
                    "\n{} internal errors have occurred during the check.",
                    self.check_errors
                )?;
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
            writeln!(
                f,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                pct(self.allocated_clusters, self.total_clusters),
                pct(self.fragmented_clusters, self.allocated_clusters),
                pct(self.compressed_clusters, self.allocated_clusters),
            )?;
        }
        if self.image_end_offset != 0 {
            writeln!(f, "Image end offset: {}", self.image_end_offset)?;
        }
        Ok(())
    }
}

/// The walk's state: computed references per host cluster of the file.
struct Walk<'a> {
    file: &'a File,
    path: &'a str,
    cs: u64,
    file_len: u64,
    /// References found in the metadata, per host cluster inside the file.
    refs: Vec<u16>,
    report: CheckReport,
}

impl Walk<'_> {
    /// Counts a reference to every cluster overlapping `[offset, offset+len)`.
    /// Ranges past the end of the file are corruption: nothing can live there.
    fn reference(&mut self, offset: u64, len: u64, what: &dyn Fn() -> String) -> bool {
        if len == 0 {
            return true;
        }
        let end = match offset.checked_add(len) {
            Some(e) if e <= self.file_len.next_multiple_of(self.cs) => e,
            _ => {
                self.report.corruption(format!(
                    "ERROR {} at offset {offset:#x} (length {len}) is beyond the end of the \
                     image ({} bytes)",
                    what(),
                    self.file_len
                ));
                return false;
            }
        };
        for c in offset / self.cs..end.div_ceil(self.cs) {
            let r = &mut self.refs[c as usize];
            *r = r.saturating_add(1);
        }
        true
    }
}

/// Checks the image at `path`: refcounts against the metadata, and the
/// COPIED flags against the refcounts. Errors only when the image cannot be
/// opened or its header is invalid; everything else is in the report.
pub fn check(path: impl AsRef<Path>) -> Result<CheckReport> {
    let path = path.as_ref();
    let path_s = path.display().to_string();
    let file = File::open(path).map_err(|e| Error::io(e, format!("opening {path_s}")))?;
    // Like qemu-img check: a consistent view needs that nobody writes.
    let file = crate::imagelock::LockedFile::lock(file, &path_s, false)?;
    let h = Header::read_from(&file, &path_s)?;
    let file_len =
        crate::io::file_size(&file).map_err(|e| Error::io(e, format!("stat {path_s}")))?;
    let cs = h.cluster_size();
    let nclusters = file_len.div_ceil(cs);
    let mut w = Walk {
        file: &file,
        path: &path_s,
        cs,
        file_len,
        refs: vec![0u16; nclusters as usize],
        report: CheckReport {
            total_clusters: h.size.div_ceil(cs),
            ..Default::default()
        },
    };

    // The header area is one cluster (the parser keeps everything in it).
    w.reference(0, cs.min(file_len.max(1)), &|| "header".into());
    // Our own extension: qemu-img ignores it, but no open accepts a
    // malformed one.
    if let Err(e) = super::pin::stored_pin(&h, &path_s) {
        w.report.corruption(format!("ERROR {}", e.message()));
    }

    let stored = read_refcounts(&mut w, &h)?;

    // The active L1 table, then each L2 table and what it points to; then
    // every internal snapshot's, whose clusters the active one may share
    // (each use counts, as QEMU counts them).
    walk_l1(&mut w, &h, &stored, h.l1_table_offset, h.l1_size, None)?;
    if h.nb_snapshots > 0 {
        walk_snapshots(&mut w, &h, &stored)?;
    }

    // Persistent bitmaps: valid only while autoclear bit 0 is set (a writer
    // that does not know them clears it); then qemu-img counts their
    // directory, tables and data clusters as references too.
    if h.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
        if let Some(ext) = h.extensions.iter().find(|e| e.kind == EXT_BITMAPS) {
            walk_bitmaps(&mut w, &ext.data)?;
        }
    }

    // Compare: below is corruption (the cluster could be handed out again
    // while in use), above is a leak (wasted space only).
    let mut highest = None;
    for (i, (&s, &r)) in stored.iter().zip(w.refs.iter()).enumerate() {
        if s != 0 || r != 0 {
            highest = Some(i as u64);
        }
        if s < r {
            w.report
                .corruption(format!("ERROR cluster {i} refcount={s} reference={r}"));
        } else if s > r {
            w.report.leaks += 1;
            w.report
                .messages
                .push(format!("Leaked cluster {i} refcount={s} reference={r}"));
        }
    }
    w.report.image_end_offset = highest.map_or(0, |h| (h + 1) * cs);
    Ok(w.report)
}

/// Walks one L1 table (the active one, or snapshot `snapshot`'s) and the
/// L2 tables and clusters it reaches, counting a reference for each use.
/// The COPIED flags and the allocation counts are the active table's.
fn walk_l1(
    w: &mut Walk<'_>,
    h: &Header,
    stored: &[u16],
    l1_offset: u64,
    l1_size: u32,
    snapshot: Option<usize>,
) -> Result<()> {
    let active = snapshot.is_none();
    let cs = w.cs;
    let l1_len = u64::from(l1_size) * 8;
    let what = |t: &str| match snapshot {
        None => t.to_string(),
        Some(i) => format!("{t} of snapshot {i}"),
    };
    if !w.reference(l1_offset, l1_len, &|| what("L1 table")) {
        return Ok(());
    }
    let mut l1 = vec![0u8; l1_len as usize];
    read_exact_at(w.file, &mut l1, l1_offset, w.path)?;
    let mut l2 = vec![0u8; cs as usize];
    for (l1_index, chunk) in l1.chunks_exact(8).enumerate() {
        let raw = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
        let l2_offset = match decode_l1(raw, cs) {
            Ok(Some(o)) => o,
            Ok(None) => continue,
            Err(_) => {
                w.report.corruption(format!(
                    "ERROR l2_offset={:#x}: Table is not cluster aligned; L1 entry corrupted",
                    raw & super::L1E_OFFSET_MASK
                ));
                continue;
            }
        };
        if !w.reference(l2_offset, cs, &|| {
            what(&format!("L2 table of L1 entry {l1_index}"))
        }) {
            continue;
        }
        if l2_offset + cs > w.file_len {
            // A partial L2 cluster at the end of the file: read what is there.
            l2.fill(0);
            let n = (w.file_len - l2_offset) as usize;
            read_exact_at(w.file, &mut l2[..n], l2_offset, w.path)?;
        } else {
            read_exact_at(w.file, &mut l2, l2_offset, w.path)?;
        }
        let stored_l2 = stored.get((l2_offset / cs) as usize).copied().unwrap_or(0);
        // COPIED flags are the active table's (QEMU checks only those).
        if active && (stored_l2 == 1) != (raw & OFLAG_COPIED != 0) {
            w.report.corruption(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={raw:x} \
                 refcount={stored_l2}"
            ));
        }
        // Like qemu-img, fragmentation is counted within one L2 table.
        let mut next_contiguous = 0u64;
        for l2_index in 0..h.l2_entries() as usize {
            let guest = ((l1_index as u64) * h.l2_entries() + l2_index as u64) * cs;
            // With extended entries, `entry` names the host cluster whatever
            // the subcluster bitmap says: the cluster is referenced.
            let decoded = decode_l2_at(&l2, l2_index, h.version, cs, h.extended_l2());
            let raw = decoded.as_ref().map_or(0, |d| d.0);
            let entry = match decoded {
                Ok((_, e)) => e.entry,
                Err(err) => {
                    w.report.corruption(what(&format!(
                        "ERROR guest offset {guest:#x}: {}; L2 entry corrupted",
                        err.message()
                    )));
                    continue;
                }
            };
            let host = match entry {
                L2Entry::Unallocated | L2Entry::Zero { host: None } => continue,
                L2Entry::Compressed(raw) => {
                    if active && raw & OFLAG_COPIED != 0 {
                        w.report.corruption(format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for \
                             compressed clusters",
                            compressed_extent(raw, h.cluster_bits).0
                        ));
                    }
                    let (off, len) = compressed_extent(raw, h.cluster_bits);
                    if active {
                        w.report.allocated_clusters += 1;
                        w.report.compressed_clusters += 1;
                    }
                    w.reference(off, len, &|| {
                        what(&format!("compressed cluster of guest offset {guest:#x}"))
                    });
                    next_contiguous = 0;
                    continue;
                }
                L2Entry::Data { host } | L2Entry::Zero { host: Some(host) } => host,
            };
            if active {
                w.report.allocated_clusters += 1;
                if next_contiguous != 0 && host != next_contiguous {
                    w.report.fragmented_clusters += 1;
                }
            }
            next_contiguous = host + cs;
            if !w.reference(host, cs, &|| {
                what(&format!("data cluster of guest offset {guest:#x}"))
            }) {
                continue;
            }
            let refcount = stored.get((host / cs) as usize).copied().unwrap_or(0);
            if active && (refcount == 1) != (raw & OFLAG_COPIED != 0) {
                w.report.corruption(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={refcount}"
                ));
            }
        }
    }

    Ok(())
}

/// Counts the snapshot table and every snapshot's L1 table and what it
/// reaches. A table that cannot be parsed is corruption (the image's other
/// structures are still checked).
fn walk_snapshots(w: &mut Walk<'_>, h: &Header, stored: &[u16]) -> Result<()> {
    let cs = w.cs;
    let off = h.snapshots_offset;
    if !off.is_multiple_of(cs) || off >= w.file_len {
        w.report.corruption(format!(
            "ERROR snapshot table at offset {off:#x} is unaligned or outside the image"
        ));
        return Ok(());
    }
    let len = (w.file_len - off).min(MAX_SNAPSHOT_TABLE_BYTES);
    let mut table = vec![0u8; len as usize];
    read_exact_at(w.file, &mut table, off, w.path)?;
    let snapshots = match parse_snapshot_table(&table, h.nb_snapshots, cs) {
        Ok(s) => s,
        Err(e) => {
            w.report
                .corruption(format!("ERROR snapshot table: {}", e.message()));
            return Ok(());
        }
    };
    let table_len = snapshot_table_len(&table, snapshots.len());
    w.reference(off, table_len, &|| "snapshot table".into());
    for (i, s) in snapshots.iter().enumerate() {
        walk_l1(w, h, stored, s.l1_table_offset, s.l1_size, Some(i))?;
    }
    Ok(())
}

/// Autoclear feature bit 0: the bitmaps extension is consistent.
const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Offset bits of a bitmap table entry (qcow2.rst, "Bitmap table").
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bytes of one bitmap directory entry before its extra data and name.
const BITMAP_DIR_ENTRY_LEN: usize = 24;

fn be32_at(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64_at(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Counts references to the bitmap directory, to each bitmap table and to
/// the data clusters the tables name (qcow2.rst, "Bitmaps extension"). Every
/// offset is checked against the file length (by `reference`) before it is
/// read, so a hostile directory cannot make us allocate more than the file.
fn walk_bitmaps(w: &mut Walk<'_>, ext: &[u8]) -> Result<()> {
    if ext.len() < 24 {
        w.report
            .corruption("ERROR bitmaps extension is shorter than 24 bytes".into());
        return Ok(());
    }
    let count = be32_at(ext, 0);
    let dir_len = be64_at(ext, 8);
    let dir_offset = be64_at(ext, 16);
    if !dir_offset.is_multiple_of(w.cs) {
        w.report.corruption(format!(
            "ERROR bitmap directory at {dir_offset:#x} is not cluster aligned"
        ));
        return Ok(());
    }
    if !w.reference(dir_offset, dir_len, &|| "bitmap directory".into()) {
        return Ok(());
    }
    let mut dir = vec![0u8; dir_len as usize];
    read_exact_at(w.file, &mut dir, dir_offset, w.path)?;
    let mut pos = 0usize;
    for i in 0..count {
        let Some(e) = dir.get(pos..pos + BITMAP_DIR_ENTRY_LEN) else {
            w.report
                .corruption(format!("ERROR bitmap directory ends before bitmap {i}"));
            break;
        };
        let table_offset = be64_at(e, 0);
        let table_len = u64::from(be32_at(e, 8)) * 8;
        let name_len = usize::from(u16::from_be_bytes([e[18], e[19]]));
        let extra_len = be32_at(e, 20) as usize;
        // Cannot overflow: `pos` stays within the directory (checked above)
        // plus one entry's at most 4 GiB + 64 KiB.
        pos = (pos + BITMAP_DIR_ENTRY_LEN + extra_len + name_len).next_multiple_of(8);
        if !table_offset.is_multiple_of(w.cs) {
            w.report.corruption(format!(
                "ERROR table of bitmap {i} at {table_offset:#x} is not cluster aligned"
            ));
            continue;
        }
        if !w.reference(table_offset, table_len, &|| format!("table of bitmap {i}")) {
            continue;
        }
        let mut table = vec![0u8; table_len as usize];
        read_exact_at(w.file, &mut table, table_offset, w.path)?;
        for (j, entry) in table.chunks_exact(8).enumerate() {
            let off = u64::from_be_bytes(entry.try_into().expect("8 bytes")) & BME_OFFSET_MASK;
            if off != 0 {
                w.reference(off, w.cs, &|| format!("data cluster {j} of bitmap {i}"));
            }
        }
    }
    Ok(())
}

/// Reads the refcount table and blocks into one counter per host cluster of
/// the file, counting references to the table and blocks. Counts wider than
/// 16 bits saturate at 65535: no writer we know references a cluster that
/// often, and a saturated count still compares as too high or too low.
fn read_refcounts(w: &mut Walk<'_>, h: &Header) -> Result<Vec<u16>> {
    let cs = w.cs;
    let nclusters = w.refs.len();
    let mut stored = vec![0u16; nclusters];
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    w.reference(h.refcount_table_offset, rt_len, &|| "refcount table".into());
    let mut rt = vec![0u8; rt_len as usize];
    read_exact_at(w.file, &mut rt, h.refcount_table_offset, w.path)?;
    let per_block = h.refcount_block_entries() as usize;
    let width = h.refcount_width();
    let mut block = vec![0u8; cs as usize];
    for (i, e) in rt.chunks_exact(8).enumerate() {
        let raw = u64::from_be_bytes(e.try_into().expect("8 bytes"));
        let off = raw & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            w.report.corruption(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            continue;
        }
        if off
            .checked_add(cs)
            .is_none_or(|end| end > w.file_len.next_multiple_of(cs))
        {
            w.report
                .corruption(format!("ERROR refcount block {i} is outside image"));
            continue;
        }
        w.reference(off, cs, &|| format!("refcount block {i}"));
        let first = i * per_block;
        if first >= nclusters {
            // A block for clusters past the end of the file: its counts
            // describe nothing that exists, but the block itself is used.
            continue;
        }
        block.fill(0);
        let n = cs.min(w.file_len - off) as usize;
        read_exact_at(w.file, &mut block[..n], off, w.path)?;
        for j in 0..per_block.min(nclusters - first) {
            stored[first + j] = width.get(&block, j).min(u64::from(u16::MAX)) as u16;
        }
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::create::{create, CreateOptions};
    use crate::qcow2::testutil::{qemu_check, qemu_create, qemu_io, tool_available};
    use std::os::unix::fs::FileExt;

    fn patch(path: &Path, offset: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }

    fn read_u64(path: &Path, offset: u64) -> u64 {
        let f = File::open(path).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, offset).unwrap();
        u64::from_be_bytes(b)
    }

    /// An image with data, zero and preallocated-zero clusters, by qemu-io.
    fn populated(dir: &Path, name: &str, cluster: &str) -> std::path::PathBuf {
        let img = dir.join(name);
        qemu_create(&img, &format!("cluster_size={cluster}"), "10M");
        qemu_io(
            &img,
            "qcow2",
            &[
                "write -P 0xab 0 200k",
                "write -P 0xcd 5M 64k",
                "write -z 7M 128k",
            ],
        );
        img
    }

    fn assert_same_verdict(img: &Path) -> CheckReport {
        let ours = check(img).unwrap();
        let (rc, text) = qemu_check(img);
        assert_eq!(ours.exit_code(), rc, "ours:\n{ours}\nqemu-img:\n{text}");
        ours
    }

    #[test]
    fn clean_images_agree_with_qemu() {
        if !tool_available("qemu-img") || !tool_available("qemu-io") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for cs in ["4k", "64k", "2M"] {
            let img = populated(dir.path(), &format!("c{cs}.qcow2"), cs);
            let r = assert_same_verdict(&img);
            assert_eq!(r.exit_code(), 0, "{r}");
            let (_, text) = qemu_check(&img);
            // Our summary lines are the same as qemu-img's.
            for line in r.to_string().lines() {
                assert!(text.contains(line), "{line:?} not in {text}");
            }
        }
        // Images made by our own create, with a backing file.
        let img = dir.path().join("ours.qcow2");
        std::fs::write(dir.path().join("b.raw"), vec![1u8; 1 << 20]).unwrap();
        create(
            &img,
            &CreateOptions {
                backing: Some("b.raw".into()),
                ..Default::default()
            },
        )
        .unwrap();
        qemu_io(&img, "qcow2", &["write -P 1 4k 4k"]);
        assert_eq!(assert_same_verdict(&img).exit_code(), 0);
    }

    #[test]
    fn damaged_images_agree_with_qemu() {
        if !tool_available("qemu-img") || !tool_available("qemu-io") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cs = 65536u64;
        // Refcount block at cluster 2 (qemu's layout). Cluster 0 is the header.
        let rb = 2 * cs;

        // Clear the refcount of the L1 table's cluster: corruption.
        let img = populated(dir.path(), "a.qcow2", "64k");
        let l1 = read_u64(&img, 40);
        patch(&img, rb + 2 * (l1 / cs), &[0, 0]);
        let r = assert_same_verdict(&img);
        assert_eq!(r.exit_code(), 2, "{r}");
        assert!(
            r.messages
                .iter()
                .any(|m| m.starts_with("ERROR cluster 3 refcount=0 reference=1")),
            "{r}"
        );

        // Bump the refcount of a data cluster: COPIED now disagrees with the
        // refcount, which qemu counts as corruption too.
        let img = populated(dir.path(), "b.qcow2", "64k");
        let l1 = read_u64(&img, 40);
        let l2 = read_u64(&img, l1) & super::super::L1E_OFFSET_MASK;
        let data = read_u64(&img, l2) & super::super::L2E_OFFSET_MASK;
        patch(&img, rb + 2 * (data / cs), &[0, 2]);
        let r = assert_same_verdict(&img);
        assert_eq!(r.exit_code(), 2, "{r}");

        // A refcount for a cluster nothing uses (past the data): a leak.
        let img = populated(dir.path(), "c.qcow2", "64k");
        let len = std::fs::metadata(&img).unwrap().len();
        let spare = len.div_ceil(cs);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len((spare + 1) * cs)
            .unwrap();
        patch(&img, rb + 2 * spare, &[0, 1]);
        let r = assert_same_verdict(&img);
        assert_eq!(r.exit_code(), 3, "{r}");
        assert_eq!(r.leaks, 1);
        assert!(r
            .to_string()
            .contains("1 leaked clusters were found on the image."));

        // An L2 entry pointing at a misaligned offset: corruption.
        let img = populated(dir.path(), "d.qcow2", "64k");
        let l1 = read_u64(&img, 40);
        let l2 = read_u64(&img, l1) & super::super::L1E_OFFSET_MASK;
        let e = read_u64(&img, l2);
        patch(&img, l2, &(e + 512).to_be_bytes());
        let r = check(&img).unwrap();
        assert_eq!(r.exit_code(), 2, "{r}");
        let (rc, _) = qemu_check(&img);
        assert_ne!(rc, 0);

        // An L2 entry pointing past the end of the file: corruption.
        let img = populated(dir.path(), "e.qcow2", "64k");
        let l1 = read_u64(&img, 40);
        let l2 = read_u64(&img, l1) & super::super::L1E_OFFSET_MASK;
        patch(&img, l2, &((1u64 << 40) | OFLAG_COPIED).to_be_bytes());
        let r = check(&img).unwrap();
        assert_eq!(r.exit_code(), 2, "{r}");

        // An L1 entry pointing past the end of the file: corruption.
        // (4 KiB clusters, so that the L1 table has more than one entry.)
        let img = populated(dir.path(), "f.qcow2", "4k");
        let l1 = read_u64(&img, 40);
        patch(&img, l1 + 8, &((1u64 << 40) | OFLAG_COPIED).to_be_bytes());
        let r = check(&img).unwrap();
        assert_eq!(r.exit_code(), 2, "{r}");

        // COPIED cleared on an L2 entry with refcount 1: corruption.
        let img = populated(dir.path(), "g.qcow2", "64k");
        let l1 = read_u64(&img, 40);
        let l2 = read_u64(&img, l1) & super::super::L1E_OFFSET_MASK;
        let e = read_u64(&img, l2);
        patch(&img, l2, &(e & !OFLAG_COPIED).to_be_bytes());
        let r = assert_same_verdict(&img);
        assert_eq!(r.exit_code(), 2, "{r}");
    }

    /// Random damage to the metadata is reported, never a panic, in check,
    /// info and the backing chain lookups.
    #[test]
    fn random_damage_never_panics() {
        if !tool_available("qemu-img") || !tool_available("qemu-io") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = populated(dir.path(), "src.qcow2", "4k");
        let pristine = std::fs::read(&src).unwrap();
        let img = dir.path().join("damaged.qcow2");
        let ov = dir.path().join("ov.qcow2");
        // A fixed-seed generator: any failure replays.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let mut bytes = pristine.clone();
            for _ in 0..1 + next() % 4 {
                // Mostly the header and the first tables; sometimes anywhere.
                let span = if next() % 4 == 0 {
                    bytes.len() as u64
                } else {
                    6 * 4096
                };
                let at = (next() % span) as usize;
                bytes[at] = next() as u8;
            }
            std::fs::write(&img, &bytes).unwrap();
            let _ = check(&img).map(|r| r.to_string());
            let _ = crate::qcow2::info::info(&img);
            if let Ok(chain) = crate::backing::Chain::open(&ov, "damaged.qcow2", Some("qcow2")) {
                let mut cache = crate::backing::ChainCache::new(8192);
                let mut segs = Vec::new();
                let _ = chain.resolve(&mut cache, 0, 10 << 20, &mut segs);
            }
        }
    }
}
