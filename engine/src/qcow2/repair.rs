//! Offline rebuild of a qcow2 image's refcounts: what QEMU does when it
//! opens an image whose dirty bit is set, and what `qemu-img check -r all`
//! does for refcount errors.
//!
//! What it owns: recomputing the reference count of every host cluster from
//! the metadata it trusts (the header, the L1 table, the L2 tables, and the
//! location of the refcount table), and rewriting the refcount blocks, the
//! refcount table entries (and, when the table is too small, a whole new
//! table) so that the stored refcounts match exactly; then clearing the
//! dirty bit (incompatible feature bit 0).
//!
//! What it never does: change an L1 or L2 entry, a data cluster, or any
//! header field other than the refcount table location (bytes 48..60) and
//! the dirty bit (byte 72). It does not "repair" broken mapping metadata:
//! an L1/L2 entry that is misaligned or points past the end of the file, or
//! a cluster used twice (two L2 entries, or an L2 entry and a table), is
//! corruption that no refcount can fix, and the image is refused untouched.
//! It never reuses free clusters inside the file for new refcount
//! structures: they go at the end of the file. It does not clear the
//! corrupt bit (incompatible bit 1), nor fix COPIED flags; `check` reports
//! those. It is an offline tool: it takes QEMU-compatible image locks, so it
//! fails while QEMU or a backfill engine has the image open for writing.
//!
//! Ordering invariants (each one is where it is enforced, in
//! [`rebuild_refcounts`]):
//! 1. Nothing is written before the whole image was walked and the plan is
//!    known to fit: a refusal leaves the file byte for byte as it was.
//! 2. Refcount blocks are written before anything points at them:
//!    blocks → fdatasync → refcount table entries (or a new table →
//!    fdatasync → header pointer) → fdatasync.
//! 3. At every instant, every cluster in use has a stored refcount of at
//!    least one: refcounts rewritten in place already count the new blocks
//!    and the new table, and the old table keeps its refcounts until the
//!    header no longer points at it. A crash mid-repair leaves at worst
//!    leaks (and the errors the image already had).
//! 4. The dirty bit is cleared last, only after the refcounts are durable,
//!    and is followed by its own fdatasync.
//!
//! Memory: one 16-bit counter per host cluster of the file, the L1 table and
//! the refcount table (both bounded by the header parser), and one cluster
//! of table or block at a time.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::entry::{compressed_extent, decode_l1, decode_l2_at, L2Entry};
use super::header::{read_exact_at, Header, INCOMPAT_DIRTY};
use super::{MAX_REFTABLE_BYTES, REFT_OFFSET_MASK};
use crate::error::{Error, ErrorKind, Result};

/// What [`rebuild_refcounts`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Clusters whose stored refcount was above their reference count (set
    /// to the reference count, usually 0: the space is free again).
    pub leaks_fixed: u64,
    /// Clusters whose stored refcount was below their reference count, plus
    /// refcount table entries that were misaligned, past the end of the file
    /// or pointing at a cluster in use for something else (replaced).
    pub errors_fixed: u64,
    /// The dirty bit was set when the repair started and is now clear.
    pub dirty_cleared: bool,
}

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refcounts rebuilt: {} leaked clusters freed, {} refcount errors fixed",
            self.leaks_fixed, self.errors_fixed
        )?;
        if self.dirty_cleared {
            write!(f, ", dirty bit cleared")?;
        }
        Ok(())
    }
}

/// The computed reference of a cluster used by exactly one thing that may
/// not be shared (header, tables, refcount blocks, data clusters). Shared
/// uses (compressed clusters packed into one host cluster) count up from
/// zero and stay below it. Both end up as a refcount: this one as 1.
const EXCLUSIVE: u16 = u16::MAX;

/// Byte offsets of the header fields this module rewrites (qcow2.rst).
const HDR_REFCOUNT_TABLE_OFFSET: u64 = 48;
const HDR_INCOMPATIBLE_FEATURES: u64 = 72;

/// The walk's state: computed references per host cluster of the file.
struct Refs<'a> {
    path: &'a str,
    cs: u64,
    file_len: u64,
    /// One counter per host cluster: 0 unused, [`EXCLUSIVE`], or the number
    /// of compressed clusters that overlap it.
    refs: Vec<u16>,
}

impl Refs<'_> {
    /// The cluster range `[offset, offset+len)` covers, or an error when it
    /// reaches past the end of the file (nothing can live there). A partial
    /// last cluster counts as inside, as `check` counts it.
    fn clusters(&self, offset: u64, len: u64, what: &dyn Fn() -> String) -> Result<(u64, u64)> {
        match offset.checked_add(len) {
            Some(end) if end <= self.file_len.next_multiple_of(self.cs) => {
                Ok((offset / self.cs, end.div_ceil(self.cs)))
            }
            _ => Err(Error::corrupt(format!(
                "qcow2 image {}: {} at offset {offset:#x} (length {len}) lies beyond the end of \
                 the file ({} bytes); refusing to rebuild refcounts",
                self.path,
                what(),
                self.file_len
            ))),
        }
    }

    /// Counts an exclusive use of every cluster of `[offset, offset+len)`.
    /// Any other use of one of them is corruption.
    fn exclusive(&mut self, offset: u64, len: u64, what: &dyn Fn() -> String) -> Result<()> {
        if len == 0 {
            // An empty table (l1_size 0) uses nothing, wherever it points.
            return Ok(());
        }
        let (first, end) = self.clusters(offset, len, what)?;
        for c in first..end {
            if self.refs[c as usize] != 0 {
                return Err(self.twice(c, what));
            }
            self.refs[c as usize] = EXCLUSIVE;
        }
        Ok(())
    }

    /// Counts one shared use (a compressed cluster) of every cluster
    /// overlapping `[offset, offset+len)`.
    fn shared(&mut self, offset: u64, len: u64, what: &dyn Fn() -> String) -> Result<()> {
        let (first, end) = self.clusters(offset, len, what)?;
        for c in first..end {
            let r = &mut self.refs[c as usize];
            if *r >= EXCLUSIVE - 1 {
                return Err(self.twice(c, what));
            }
            *r += 1;
        }
        Ok(())
    }

    fn twice(&self, cluster: u64, what: &dyn Fn() -> String) -> Error {
        Error::corrupt(format!(
            "qcow2 image {}: host cluster at offset {:#x} is used by {} and by other metadata \
             or data (refcount would be 2, but every writer we support keeps refcount 1); \
             refusing to rebuild refcounts",
            self.path,
            cluster * self.cs,
            what()
        ))
    }
}

/// The refcount a computed reference becomes.
fn refcount_of(r: u16) -> u16 {
    if r == EXCLUSIVE {
        1
    } else {
        r
    }
}

fn be64_at(buf: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// Walks the mapping metadata: header, L1 table, refcount table, L2 tables
/// and what they point to. Every violation is a refusal.
fn walk_mapping(file: &File, h: &Header, r: &mut Refs<'_>) -> Result<()> {
    let cs = r.cs;
    let path = r.path;
    r.exclusive(0, cs.min(r.file_len.max(1)), &|| "the header".into())?;
    let l1_len = u64::from(h.l1_size) * 8;
    r.exclusive(h.l1_table_offset, l1_len, &|| "the L1 table".into())?;
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    r.exclusive(h.refcount_table_offset, rt_len, &|| {
        "the refcount table".into()
    })?;

    let mut l1 = vec![0u8; l1_len as usize];
    read_exact_at(file, &mut l1, h.l1_table_offset, path)?;
    let mut l2 = vec![0u8; cs as usize];
    for l1_index in 0..h.l1_size as usize {
        let raw = be64_at(&l1, l1_index);
        let l2_offset = match decode_l1(raw, cs) {
            Ok(Some(o)) => o,
            Ok(None) => continue,
            Err(e) => {
                return Err(Error::corrupt(format!(
                    "qcow2 image {path}: L1 entry {l1_index} at offset {:#x}: {}; refusing to \
                     rebuild refcounts",
                    h.l1_table_offset + l1_index as u64 * 8,
                    e.message()
                )))
            }
        };
        r.exclusive(l2_offset, cs, &|| {
            format!("the L2 table of L1 entry {l1_index}")
        })?;
        // A partial L2 cluster at the end of the file reads as zeros past it.
        l2.fill(0);
        let n = cs.min(r.file_len - l2_offset) as usize;
        read_exact_at(file, &mut l2[..n], l2_offset, path)?;
        for l2_index in 0..h.l2_entries() as usize {
            let guest = (l1_index as u64 * h.l2_entries() + l2_index as u64) * cs;
            let entry = decode_l2_at(&l2, l2_index, h.version, cs, h.extended_l2())
                .map_err(|e| {
                    Error::corrupt(format!(
                        "qcow2 image {path}: L2 entry for guest offset {guest:#x} at offset \
                         {:#x}: {}; refusing to rebuild refcounts",
                        l2_offset + l2_index as u64 * h.l2_entry_bytes(),
                        e.message()
                    ))
                })?
                .1
                .entry;
            match entry {
                L2Entry::Unallocated | L2Entry::Zero { host: None } => {}
                L2Entry::Data { host } | L2Entry::Zero { host: Some(host) } => {
                    r.exclusive(host, cs, &|| {
                        format!("the data cluster of guest offset {guest:#x}")
                    })?;
                }
                L2Entry::Compressed(raw) => {
                    let (off, len) = compressed_extent(raw, h.cluster_bits);
                    r.shared(off, len, &|| {
                        format!("the compressed cluster of guest offset {guest:#x}")
                    })?;
                }
            }
        }
    }
    Ok(())
}

/// The refcount table as found: one block offset per entry (0 for none).
/// Entries that cannot be trusted (misaligned, past the end of the file, or
/// on a cluster already in use) are dropped here and counted; they are
/// replaced like missing blocks. Valid blocks are counted as exclusive uses.
fn read_table(file: &File, h: &Header, r: &mut Refs<'_>) -> Result<(Vec<u64>, u64)> {
    let cs = r.cs;
    let mut rt = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
    read_exact_at(file, &mut rt, h.refcount_table_offset, r.path)?;
    let mut dropped = 0;
    let mut table = Vec::with_capacity(rt.len() / 8);
    for i in 0..rt.len() / 8 {
        let off = be64_at(&rt, i) & REFT_OFFSET_MASK;
        let usable = off != 0
            && off.is_multiple_of(cs)
            && off
                .checked_add(cs)
                .is_some_and(|end| end <= r.file_len.next_multiple_of(cs))
            && r.refs[(off / cs) as usize] == 0;
        if usable {
            r.refs[(off / cs) as usize] = EXCLUSIVE;
            table.push(off);
        } else {
            dropped += u64::from(off != 0);
            table.push(0);
        }
    }
    Ok((table, dropped))
}

/// Where the new refcount structures go: `blocks` new refcount blocks, then
/// `table_clusters` clusters of new refcount table (0: keep the old one),
/// contiguous from cluster `start` (the first cluster past the file).
struct Plan {
    start: u64,
    blocks: Vec<u64>,
    table_clusters: u64,
    /// Refcount table entries needed in the end.
    entries: u64,
}

impl Plan {
    fn end(&self) -> u64 {
        self.start + self.blocks.len() as u64 + self.table_clusters
    }
}

/// Finds the new blocks and table the image needs. New structures need
/// refcounts themselves, which may need more blocks and a larger table, so
/// this iterates to the fixed point (reached in two or three rounds: one
/// block covers thousands of clusters).
fn plan(refs: &[u16], table: &[u64], start: u64, per_block: u64, cs: u64) -> Plan {
    let has_block = |b: u64| table.get(b as usize).is_some_and(|&o| o != 0);
    // Blocks missing for clusters already in the file.
    let mut missing_in_file = Vec::new();
    let mut last_used = None;
    for (c, &r) in refs.iter().enumerate() {
        if r != 0 {
            last_used = Some(c as u64);
            let b = c as u64 / per_block;
            if !has_block(b) && missing_in_file.last() != Some(&b) {
                missing_in_file.push(b);
            }
        }
    }
    let last_kept = table.iter().rposition(|&o| o != 0).map(|b| b as u64);
    let mut len = 0u64;
    loop {
        let mut blocks = missing_in_file.clone();
        let mut last_block = last_used.map(|c| c / per_block).max(last_kept);
        if len > 0 {
            let (first, last) = (start / per_block, (start + len - 1) / per_block);
            for b in first..=last {
                if !has_block(b) && !blocks.contains(&b) {
                    blocks.push(b);
                }
            }
            last_block = last_block.max(Some(last));
        }
        let entries = last_block.map_or(0, |b| b + 1);
        let table_clusters = if entries <= table.len() as u64 {
            0
        } else {
            (entries * 8).div_ceil(cs)
        };
        let p = Plan {
            start,
            blocks,
            table_clusters,
            entries,
        };
        let new_len = p.end() - start;
        // Growing the region only ever adds blocks and table clusters, so
        // the length never shrinks between rounds and the loop ends.
        debug_assert!(new_len >= len);
        if new_len == len {
            return p;
        }
        len = new_len;
    }
}

fn sync(file: &File, path: &str, after: &str) -> Result<()> {
    file.sync_data()
        .map_err(|e| Error::io(e, format!("fdatasync of {path} after {after}")))
}

fn write_at(file: &File, buf: &[u8], offset: u64, path: &str, what: &str) -> Result<()> {
    file.write_all_at(buf, offset).map_err(|e| {
        Error::io(
            e,
            format!(
                "writing {what} ({} bytes) at offset {offset:#x} of {path}",
                buf.len()
            ),
        )
    })
}

/// Recomputes every host cluster's refcount of the qcow2 image at `path`
/// from its L1/L2 tables and rewrites the refcount structures to match, then
/// clears the dirty bit. See the module documentation for what is trusted,
/// what is refused (`Corrupt`, file untouched), and the write ordering.
/// Refcount widths other than 16 bits are `Unsupported`, as is everything
/// the header parser refuses (internal snapshots, encryption, external data
/// files, extended L2 entries). An image in use by another process (QEMU's
/// image locks) is refused with `Locked`. An image whose refcounts are
/// already right and that is not dirty is not written at all.
pub fn rebuild_refcounts(path: impl AsRef<Path>) -> Result<RepairReport> {
    let path = path.as_ref();
    let path_s = path.display().to_string();
    let path_s = path_s.as_str();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(e, format!("opening {path_s} for repair")))?;
    let file = crate::imagelock::LockedFile::lock(file, path_s, true)?;
    let h = Header::read_from(&file, path_s)?;
    if h.nb_snapshots != 0 {
        // The walk below counts every cluster as used once; snapshots share
        // clusters with the active disk, and rebuilding without them would
        // free what the snapshots still use.
        return Err(Error::unsupported(format!(
            "qcow2 image {path_s}: has {} internal snapshot(s); refcounts of images with \
             snapshots are not rebuilt (use `qemu-img check -r all`)",
            h.nb_snapshots
        )));
    }
    let width = h.refcount_width();
    let file_len = file
        .metadata()
        .map_err(|e| Error::io(e, format!("stat {path_s}")))?
        .len();
    let cs = h.cluster_size();
    let per_block = h.refcount_block_entries();
    let nclusters = file_len.div_ceil(cs);
    let mut r = Refs {
        path: path_s,
        cs,
        file_len,
        refs: vec![0u16; nclusters as usize],
    };

    // Invariant 1: walk and plan everything before the first write.
    walk_mapping(&file, &h, &mut r)?;
    let (old_table, dropped) = read_table(&file, &h, &mut r)?;
    let p = plan(&r.refs, &old_table, nclusters, per_block, cs);
    if p.table_clusters * cs > MAX_REFTABLE_BYTES {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "qcow2 image {path_s}: its refcounts need a table of {} clusters, more than the \
                 {} MiB limit",
                p.table_clusters,
                MAX_REFTABLE_BYTES >> 20
            ),
        ));
    }
    let mut refs = r.refs;
    // The new structures are exclusive uses of the clusters past the file.
    refs.resize(p.end() as usize, EXCLUSIVE);

    // The refcount table after the repair: the kept blocks plus the new ones.
    let mut table = old_table.clone();
    table.resize(table.len().max(p.entries as usize), 0);
    for (i, &b) in p.blocks.iter().enumerate() {
        debug_assert_eq!(table[b as usize], 0);
        table[b as usize] = (p.start + i as u64) * cs;
    }

    let mut report = RepairReport {
        errors_fixed: dropped,
        ..Default::default()
    };
    // Invariant 3: every block is written with the final refcounts, which
    // count the new blocks and the new table, and still count the old
    // table (freed only once the header points elsewhere).
    let mut stored = vec![0u8; cs as usize];
    let mut want = vec![0u8; cs as usize];
    let mut wrote = false;
    for (b, &block_off) in table.iter().enumerate() {
        let first = b as u64 * per_block;
        if block_off == 0 {
            // No block: every refcount it would hold must be 0 (the plan
            // gave a block to every cluster in use).
            debug_assert!(
                (first..first + per_block).all(|c| refs.get(c as usize).is_none_or(|&x| x == 0))
            );
            continue;
        }
        let is_new = old_table.get(b).is_none_or(|&o| o != block_off);
        // A new block (also one replacing a dropped entry) stored nothing:
        // every cluster in use that it covers was missing its refcount.
        stored.fill(0);
        if !is_new {
            let n = cs.min(file_len - block_off) as usize;
            read_exact_at(&file, &mut stored[..n], block_off, path_s)?;
        }
        for j in 0..per_block as usize {
            let c = first as usize + j;
            let v = u64::from(refs.get(c).copied().map_or(0, refcount_of));
            if v > width.max() {
                return Err(Error::unsupported(format!(
                    "qcow2 image {path_s}: host cluster at offset {:#x} needs refcount {v}, \
                     more than {}-bit refcounts hold; refusing to rebuild refcounts",
                    c as u64 * cs,
                    width.bits()
                )));
            }
            width.set(&mut want, j, v);
            // Only clusters of the original file count as findings; the
            // rest are our own allocations or nothing at all.
            if (c as u64) < nclusters {
                let s = width.get(&stored, j);
                if s < v {
                    report.errors_fixed += 1;
                } else if s > v {
                    report.leaks_fixed += 1;
                }
            }
        }
        if is_new || stored != want {
            write_at(&file, &want, block_off, path_s, "a refcount block")?;
            wrote = true;
        }
    }
    // Invariant 2: blocks are durable before any table entry points at them.
    let table_changed = table[..old_table.len()] != old_table[..] || p.table_clusters > 0;
    if wrote || table_changed {
        sync(&file, path_s, "writing refcount blocks")?;
    }
    let encode = |t: &[u64], len: usize| {
        let mut buf = vec![0u8; len];
        for (i, o) in t.iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&o.to_be_bytes());
        }
        buf
    };
    if p.table_clusters == 0 && table_changed {
        let len = old_table.len() * 8;
        let buf = encode(&table[..old_table.len()], len);
        write_at(
            &file,
            &buf,
            h.refcount_table_offset,
            path_s,
            "the refcount table",
        )?;
        sync(&file, path_s, "writing the refcount table")?;
    } else if p.table_clusters > 0 {
        let new_off = (p.start + p.blocks.len() as u64) * cs;
        let buf = encode(&table, (p.table_clusters * cs) as usize);
        write_at(&file, &buf, new_off, path_s, "the new refcount table")?;
        sync(&file, path_s, "writing the new refcount table")?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(p.table_clusters as u32).to_be_bytes());
        write_at(
            &file,
            &hdr,
            HDR_REFCOUNT_TABLE_OFFSET,
            path_s,
            "the header's refcount table location",
        )?;
        sync(
            &file,
            path_s,
            "pointing the header at the new refcount table",
        )?;
        // Only now is the old table unused: free its clusters.
        let old_first = h.refcount_table_offset / cs;
        for c in old_first..old_first + u64::from(h.refcount_table_clusters) {
            let block_off = table[(c / per_block) as usize];
            debug_assert_ne!(block_off, 0, "the old table's clusters had refcounts");
            // The entry's byte(s); narrow entries share a byte, so merge.
            let idx = c % per_block;
            let (start, len) = width.byte_span(idx, 1);
            let mut bytes = [0u8; 8];
            let bytes = &mut bytes[..len as usize];
            let at = block_off + start;
            if width.needs_merge() {
                read_exact_at(&file, bytes, at, path_s)?;
            }
            let first_in_span = (start * 8) >> width.order();
            width.set(bytes, (idx - first_in_span) as usize, 0);
            write_at(
                &file,
                bytes,
                at,
                path_s,
                "the old refcount table's refcount",
            )?;
        }
        sync(&file, path_s, "freeing the old refcount table")?;
    }

    // Invariant 4: the dirty bit goes last, once the refcounts are durable.
    if h.is_dirty() {
        let features = h.incompatible_features & !INCOMPAT_DIRTY;
        write_at(
            &file,
            &features.to_be_bytes(),
            HDR_INCOMPATIBLE_FEATURES,
            path_s,
            "the header's incompatible features",
        )?;
        sync(&file, path_s, "clearing the dirty bit")?;
        report.dirty_cleared = true;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::check::check;
    use crate::qcow2::testutil::{qemu_check, qemu_create, qemu_img, qemu_io, run, tool_available};
    use crate::qcow2::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COPIED};
    use std::path::PathBuf;

    fn tools() -> bool {
        tool_available("qemu-img") && tool_available("qemu-io")
    }

    fn patch(path: &Path, offset: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }

    fn read_u64(path: &Path, offset: u64) -> u64 {
        let f = File::open(path).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, offset).unwrap();
        u64::from_be_bytes(b)
    }

    /// Byte offset of the stored refcount of `cluster`.
    fn refcount_at(path: &Path, cluster: u64) -> u64 {
        let cs = 1u64 << (read_u64(path, 16) & 0xffff_ffff);
        let per_block = cs / 2;
        let rt = read_u64(path, HDR_REFCOUNT_TABLE_OFFSET);
        let block = read_u64(path, rt + 8 * (cluster / per_block)) & REFT_OFFSET_MASK;
        assert_ne!(block, 0, "no refcount block for cluster {cluster}");
        block + 2 * (cluster % per_block)
    }

    fn set_refcount(path: &Path, cluster: u64, v: u16) {
        patch(path, refcount_at(path, cluster), &v.to_be_bytes());
    }

    fn get_refcount(path: &Path, cluster: u64) -> u16 {
        let f = File::open(path).unwrap();
        let mut b = [0u8; 2];
        f.read_exact_at(&mut b, refcount_at(path, cluster)).unwrap();
        u16::from_be_bytes(b)
    }

    fn read_bytes(path: &Path, offset: u64, len: u64) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut b, offset)
            .unwrap();
        b
    }

    fn set_dirty(path: &Path) {
        let f = read_u64(path, HDR_INCOMPATIBLE_FEATURES);
        patch(
            path,
            HDR_INCOMPATIBLE_FEATURES,
            &(f | INCOMPAT_DIRTY).to_be_bytes(),
        );
    }

    fn is_dirty(path: &Path) -> bool {
        read_u64(path, HDR_INCOMPATIBLE_FEATURES) & INCOMPAT_DIRTY != 0
    }

    /// Host offset of the first L2 table, and of the data of guest cluster 0.
    fn first_l2(path: &Path) -> u64 {
        read_u64(path, read_u64(path, 40)) & L1E_OFFSET_MASK
    }

    fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
        let img = dir.join(name);
        qemu_create(&img, opts, size);
        img
    }

    fn assert_clean(img: &Path) {
        let (rc, text) = qemu_check(img);
        assert_eq!(rc, 0, "qemu-img check after repair:\n{text}");
        assert!(text.contains("No errors were found"), "{text}");
        let ours = check(img).unwrap();
        assert_eq!(ours.exit_code(), 0, "{ours}");
    }

    fn assert_same_content(a: &Path, b: &Path, b_fmt: &str) {
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", b_fmt])
            .args([a, b])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img compare {a:?} {b:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A crash with lazy refcounts: dirty bit set, data clusters without
    /// refcounts, and a leak. Repaired, qemu-img finds nothing, and the
    /// content is what qemu-io wrote and what `qemu-img check -r all` gives.
    #[test]
    fn lazy_refcounts_crash_is_repaired() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "lazy.qcow2", "lazy_refcounts=on", "16M");
        qemu_io(&img, "qcow2", &["write -P 0x5a 0 1M"]);
        let reference = dir.path().join("ref.raw");
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            reference.to_str().unwrap(),
        ]);

        // A clean image is left alone: no write at all.
        let before = std::fs::read(&img).unwrap();
        let r = rebuild_refcounts(&img).unwrap();
        assert_eq!(r, RepairReport::default(), "{r}");
        assert_eq!(std::fs::read(&img).unwrap(), before);

        let cs = 65536u64;
        let l2 = first_l2(&img);
        let data = |i: u64| read_u64(&img, l2 + 8 * i) & L2E_OFFSET_MASK;
        set_dirty(&img);
        for i in [0, 3, 15] {
            set_refcount(&img, data(i) / cs, 0);
        }
        // A leak: a cluster past the data that nothing references.
        let len = std::fs::metadata(&img).unwrap().len();
        let spare = len.div_ceil(cs);
        OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len((spare + 1) * cs)
            .unwrap();
        set_refcount(&img, spare, 1);

        let (rc, text) = qemu_check(&img);
        assert_eq!(rc, 2, "damage must show before the repair:\n{text}");
        let by_qemu = dir.path().join("by-qemu.qcow2");
        std::fs::copy(&img, &by_qemu).unwrap();
        run(
            "qemu-img",
            &["check", "-q", "-r", "all", by_qemu.to_str().unwrap()],
        );

        let r = rebuild_refcounts(&img).unwrap();
        assert_eq!(
            r,
            RepairReport {
                leaks_fixed: 1,
                errors_fixed: 3,
                dirty_cleared: true
            }
        );
        assert_eq!(
            r.to_string(),
            "refcounts rebuilt: 1 leaked clusters freed, 3 refcount errors fixed, dirty bit \
             cleared"
        );
        assert_clean(&img);
        assert!(!is_dirty(&img));
        let info = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["dirty-flag"], serde_json::Value::Bool(false), "{info}");
        assert_same_content(&img, &by_qemu, "qcow2");
        assert_same_content(&img, &reference, "raw");

        // A second repair finds nothing and writes nothing.
        let after = std::fs::read(&img).unwrap();
        assert_eq!(rebuild_refcounts(&img).unwrap(), RepairReport::default());
        assert_eq!(std::fs::read(&img).unwrap(), after);
        // And QEMU can write to it.
        qemu_io(&img, "qcow2", &["write -P 0x33 2M 256k"]);
        assert_clean(&img);
    }

    /// Dirty with nothing else wrong: only the dirty bit changes.
    #[test]
    fn dirty_bit_alone_is_cleared() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "d.qcow2", "lazy_refcounts=on", "4M");
        qemu_io(&img, "qcow2", &["write -P 1 0 128k"]);
        set_dirty(&img);
        let mut before = std::fs::read(&img).unwrap();
        let r = rebuild_refcounts(&img).unwrap();
        assert_eq!(
            r,
            RepairReport {
                dirty_cleared: true,
                ..Default::default()
            }
        );
        before[HDR_INCOMPATIBLE_FEATURES as usize + 7] &= !1;
        assert_eq!(std::fs::read(&img).unwrap(), before);
        assert_clean(&img);
    }

    /// Compressed clusters share host clusters: their refcounts are above 1
    /// and are rebuilt as such.
    #[test]
    fn compressed_clusters_are_counted() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("src.raw");
        let mut bytes = vec![0u8; 1 << 20];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i / 4096) as u8;
        }
        std::fs::write(&raw, &bytes).unwrap();
        let img = dir.path().join("c.qcow2");
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        // Zero every refcount of the first block: all of it is rebuilt,
        // shared counts included.
        let rt = read_u64(&img, HDR_REFCOUNT_TABLE_OFFSET);
        let block = read_u64(&img, rt) & REFT_OFFSET_MASK;
        let n = std::fs::metadata(&img).unwrap().len().div_ceil(4096);
        patch(&img, block, &vec![0u8; 2 * n as usize]);
        set_dirty(&img);
        assert_ne!(qemu_check(&img).0, 0);
        let r = rebuild_refcounts(&img).unwrap();
        assert!(r.errors_fixed > 0 && r.dirty_cleared, "{r}");
        assert_clean(&img);
        assert_same_content(&img, &raw, "raw");
    }

    /// A 4 KiB-cluster image (one refcount block covers 8 MiB): a data
    /// cluster past that coverage needs a new block; so does a refcount
    /// table entry that was cleared.
    #[test]
    fn missing_refcount_blocks_are_allocated() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cs = 4096u64;

        // A cleared refcount table entry: its block must be rebuilt elsewhere.
        let img = create(dir.path(), "a.qcow2", "cluster_size=4k", "64M");
        qemu_io(&img, "qcow2", &["write -P 0x11 0 300k"]);
        let rt = read_u64(&img, HDR_REFCOUNT_TABLE_OFFSET);
        let old_block = read_u64(&img, rt);
        patch(&img, rt, &[0u8; 8]);
        let len = std::fs::metadata(&img).unwrap().len();
        let r = rebuild_refcounts(&img).unwrap();
        assert!(r.errors_fixed > 0, "{r}");
        let new_block = read_u64(&img, rt);
        assert_eq!(new_block, len, "the new block goes at the end of the file");
        assert_ne!(new_block, old_block);
        assert_clean(&img);
        qemu_io(&img, "qcow2", &["read -P 0x11 0 300k"]);

        // A refcount table entry pointing at the L2 table: the entry is
        // replaced, and the L2 table (trusted) is never written over.
        let img = create(dir.path(), "c.qcow2", "cluster_size=4k", "64M");
        qemu_io(&img, "qcow2", &["write -P 0x33 0 300k"]);
        let l2 = first_l2(&img);
        let l2_bytes = read_bytes(&img, l2, cs);
        patch(&img, rt, &l2.to_be_bytes());
        let r = rebuild_refcounts(&img).unwrap();
        assert!(r.errors_fixed > 0, "{r}");
        assert_eq!(read_bytes(&img, l2, cs), l2_bytes);
        assert_ne!(read_u64(&img, rt), l2);
        assert_clean(&img);
        qemu_io(&img, "qcow2", &["read -P 0x33 0 300k"]);

        // A data cluster at 9 MiB in a sparse file, mapped by hand.
        let img = create(dir.path(), "b.qcow2", "cluster_size=4k", "64M");
        qemu_io(&img, "qcow2", &["write -P 0x22 0 64k"]);
        let host = 9u64 << 20;
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(host + cs).unwrap();
        f.write_all_at(&vec![0x77u8; cs as usize], host).unwrap();
        drop(f);
        let l2 = first_l2(&img);
        patch(&img, l2 + 8 * 100, &(host | OFLAG_COPIED).to_be_bytes());
        assert_eq!(qemu_check(&img).0, 2);
        let r = rebuild_refcounts(&img).unwrap();
        assert_eq!(r.errors_fixed, 1, "{r}");
        assert_eq!(r.leaks_fixed, 0, "{r}");
        assert!(read_u64(&img, rt + 8) != 0, "a second refcount block");
        assert_clean(&img);
        qemu_io(
            &img,
            "qcow2",
            &["read -P 0x22 0 64k", "read -P 0x77 400k 4k"],
        );
    }

    /// A data cluster past 4 GiB in a sparse 4 KiB-cluster image: the
    /// one-cluster refcount table (512 blocks of 8 MiB) is too small, so a
    /// new table is written at the end and the header points at it.
    #[test]
    fn refcount_table_grows() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cs = 4096u64;
        let img = create(dir.path(), "g.qcow2", "cluster_size=4k", "64M");
        qemu_io(&img, "qcow2", &["write -P 0x44 0 64k"]);
        let old_rt = read_u64(&img, HDR_REFCOUNT_TABLE_OFFSET);
        assert_eq!(read_u64(&img, 56) >> 32, 1, "a one-cluster refcount table");
        let host = (4u64 << 30) + (1 << 20);
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(host + cs).unwrap();
        f.write_all_at(&vec![0x99u8; cs as usize], host).unwrap();
        drop(f);
        let l2 = first_l2(&img);
        patch(&img, l2 + 8 * 200, &(host | OFLAG_COPIED).to_be_bytes());
        set_dirty(&img);

        let r = rebuild_refcounts(&img).unwrap();
        assert_eq!(
            r,
            RepairReport {
                leaks_fixed: 0,
                errors_fixed: 1,
                dirty_cleared: true
            }
        );
        let new_rt = read_u64(&img, HDR_REFCOUNT_TABLE_OFFSET);
        assert!(new_rt > host, "new table at the end: {new_rt:#x}");
        assert_eq!(read_u64(&img, 56) >> 32, 2, "two clusters of table");
        assert_clean(&img);
        // The old table's cluster is free; the new table's are in use.
        assert_eq!(get_refcount(&img, old_rt / cs), 0);
        assert_eq!(get_refcount(&img, new_rt / cs), 1);
        assert_eq!(get_refcount(&img, new_rt / cs + 1), 1);
        qemu_io(
            &img,
            "qcow2",
            &["read -P 0x44 0 64k", "read -P 0x99 800k 4k"],
        );
        // QEMU can keep allocating with the new structures.
        qemu_io(&img, "qcow2", &["write -P 0x55 1M 1M"]);
        assert_clean(&img);
    }

    /// Broken mapping metadata is refused, and the file is not touched.
    #[test]
    fn corruption_is_refused_untouched() {
        if !tools() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let refused = |img: &Path, kind: ErrorKind, needle: &str| {
            let before = std::fs::read(img).unwrap();
            let e = rebuild_refcounts(img).unwrap_err();
            assert_eq!(e.kind(), kind, "{e}");
            let msg = e.to_string();
            assert!(msg.contains(img.to_str().unwrap()), "{msg}");
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
            assert_eq!(std::fs::read(img).unwrap(), before, "{msg}");
        };
        let damaged = |name: &str, f: &dyn Fn(&Path, u64)| {
            let img = create(dir.path(), name, "lazy_refcounts=on", "16M");
            qemu_io(&img, "qcow2", &["write -P 0x5a 0 1M"]);
            set_dirty(&img);
            let l2 = first_l2(&img);
            f(&img, l2);
            img
        };

        // Two L2 entries referencing the same data cluster.
        let img = damaged("twice.qcow2", &|img, l2| {
            let e = read_u64(img, l2);
            patch(img, l2 + 8 * 100, &e.to_be_bytes());
        });
        refused(&img, ErrorKind::Corrupt, "guest offset 0x640000 ");
        // An L2 entry past the end of the file.
        let img = damaged("eof.qcow2", &|img, l2| {
            patch(
                img,
                l2 + 8 * 100,
                &((1u64 << 40) | OFLAG_COPIED).to_be_bytes(),
            );
        });
        refused(&img, ErrorKind::Corrupt, "beyond the end of the file");
        // A misaligned L2 entry.
        let img = damaged("misaligned.qcow2", &|img, l2| {
            let e = read_u64(img, l2);
            patch(img, l2 + 8 * 100, &(e + 512).to_be_bytes());
        });
        refused(&img, ErrorKind::Corrupt, "not aligned");
        // An L2 table that is also a data cluster.
        let img = damaged("l2-is-data.qcow2", &|img, l2| {
            patch(img, l2 + 8 * 100, &(l2 | OFLAG_COPIED).to_be_bytes());
        });
        refused(&img, ErrorKind::Corrupt, "used by");
        // An L1 entry past the end of the file (4 KiB clusters: several).
        let img = create(dir.path(), "l1.qcow2", "cluster_size=4k", "16M");
        qemu_io(&img, "qcow2", &["write -P 1 0 64k"]);
        let l1 = read_u64(&img, 40);
        patch(&img, l1 + 8, &((1u64 << 40) | OFLAG_COPIED).to_be_bytes());
        refused(&img, ErrorKind::Corrupt, "L2 table of L1 entry 1");

        // An image another process has open for writing (QEMU's locks).
        let img = damaged("locked.qcow2", &|_, _| {});
        let holder = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        crate::imagelock::lock_image(&holder, "holder", true).unwrap();
        refused(&img, ErrorKind::Locked, "lock");
        drop(holder);
        // Once nobody holds it, the same image repairs. (Repaired as a copy:
        // a child another test thread forks in the meantime shares the
        // holder's open file description, and with it the lock, until it
        // execs.)
        let copy = dir.path().join("unlocked.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        assert!(rebuild_refcounts(&copy).unwrap().dirty_cleared);
    }
}
