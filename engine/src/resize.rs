//! Growing an overlay's virtual size (`backfill resize`, like `qemu-img
//! resize`), offline.
//!
//! What it owns: the order of the writes that grow an image, so that a
//! crash at any point leaves an image that opens, checks clean (at worst
//! with leaked clusters) and reads as before or as after.
//!
//! The one trap: the new area must read as zeros even where the backing
//! image is larger than the old size (DESIGN.md, "Pitfalls"). Unallocated
//! clusters there would show the backing image's old data, so before the
//! size changes:
//! - the last, partial cluster is made a data cluster of its own (read
//!   through the engine and written back unchanged), and its bytes past the
//!   old end are zeroed: a copy-on-read or copy-on-write of that cluster
//!   may have copied backing bytes past the old end into it;
//! - every whole cluster of the new area that the backing image covers gets
//!   a zero entry (version 3) or a zeroed data cluster (version 2, which
//!   has no zero flag).
//!
//! The order of the writes:
//! 1. If the L1 table must grow past its clusters, a new one is written at
//!    the end of the file and made durable, then the header points to it
//!    (durable), then the old table's clusters are freed.
//! 2. The zeroing above: new L2 tables and data are durable before the L1
//!    entries that point to them; entries past the old end are read by
//!    nobody until the size changes.
//! 3. The header's size, last.
//!
//! Shrinking is refused: it discards data, and QEMU asks for `--shrink`
//! before it does it; we do not do it at all.

use crate::imagelock::LockedFile;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::backing::Chain;
use crate::disk::{Disk, Options};
use crate::error::{Error, ErrorKind, Result};
use crate::meta::Meta;
use crate::qcow2::entry::decode_l2_at;
use crate::qcow2::header::{l1_entries_needed, Header};
use crate::qcow2::{encode_l2, encode_l2_ext, ExtL2, L2Entry, MAX_L1_BYTES, SUBCLUSTERS};

/// Header offsets (qcow2.rst): virtual size, L1 size and L1 offset.
const HDR_SIZE: u64 = 24;
const HDR_L1_SIZE: u64 = 36;
const HDR_L1_OFFSET: u64 = 40;

/// What [`resize`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResizeReport {
    pub old_size: u64,
    pub new_size: u64,
    /// The L1 table moved to a larger one.
    pub l1_moved: bool,
    /// Bytes of the new area that were zeroed because the backing image
    /// covers them.
    pub zeroed_bytes: u64,
}

/// Grows the image at `path` to `new_size` bytes (rounded up to 512, as
/// qemu-img does). The same size is a no-op; a smaller one is refused.
pub fn resize(path: impl AsRef<Path>, new_size: u64) -> Result<ResizeReport> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let new_size = new_size
        .checked_next_multiple_of(512)
        .filter(|s| *s <= i64::MAX as u64)
        .ok_or_else(|| invalid(format!("size {new_size} is too large")))?;
    let (file, header) = open_locked(path, &name)?;
    header.check_writable(&name)?;
    let old_size = header.size;
    let mut report = ResizeReport {
        old_size,
        new_size,
        ..ResizeReport::default()
    };
    if new_size < old_size {
        return Err(Error::unsupported(format!(
            "{name}: shrinking from {old_size} to {new_size} bytes is not supported (it \
             discards data); only growing is"
        )));
    }
    if new_size == old_size {
        return Ok(report);
    }
    let l1_needed = l1_entries_needed(new_size, header.cluster_bits, header.extended_l2());
    if l1_needed * 8 > MAX_L1_BYTES {
        return Err(invalid(format!(
            "{name}: {new_size} bytes is too large for {}-byte clusters (the L1 table would \
             exceed {} MiB)",
            header.cluster_size(),
            MAX_L1_BYTES >> 20
        )));
    }
    let backing_size = match &header.backing_file {
        Some(b) => Chain::open(path, b, header.backing_format.as_deref())
            .map_err(|e| e.context(format!("{name}: opening its backing image")))?
            .size(),
        None => 0,
    };

    // Step 1: room in the L1 table.
    let header = grow_l1(&name, file, header, l1_needed, &mut report)?;

    // Step 2: the new area the backing image covers reads as zeros.
    let zero_end = new_size.min(backing_size);
    if zero_end > old_size {
        let cs = header.cluster_size();
        if !old_size.is_multiple_of(cs) {
            drop(header);
            materialize_last_cluster(path, old_size, cs)?;
        }
        let (file, header) = open_locked(path, &name)?;
        zero_new_area(&name, file, header, old_size, zero_end)?;
        report.zeroed_bytes = zero_end - old_size;
    }

    // Step 3: the size, last.
    let (file, _header) = open_locked(path, &name)?;
    write_sync(
        &file,
        &new_size.to_be_bytes(),
        HDR_SIZE,
        &name,
        "the new size",
    )?;
    Ok(report)
}

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidInput, msg)
}

fn open_locked(path: &Path, name: &str) -> Result<(LockedFile, Header)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(e, format!("opening {name}")))?;
    let file = LockedFile::lock(file, name, true)?;
    let header = Header::read_from(&file, name)?;
    Ok((file, header))
}

fn write_sync(file: &File, buf: &[u8], at: u64, name: &str, what: &str) -> Result<()> {
    file.write_all_at(buf, at)
        .and_then(|()| file.sync_data())
        .map_err(|e| Error::io(e, format!("{name}: writing {what}")))
}

/// Makes the L1 table hold `needed` entries. Entries past `l1_size` inside
/// the table's last cluster are zeroed first (qemu keeps them zero, but
/// nothing promised it); past that cluster the table moves.
fn grow_l1(
    name: &str,
    file: LockedFile,
    header: Header,
    needed: u64,
    report: &mut ResizeReport,
) -> Result<Header> {
    let old = u64::from(header.l1_size);
    if needed <= old {
        return Ok(header);
    }
    let cs = header.cluster_size();
    let room = (old * 8).next_multiple_of(cs) / 8;
    let mut hdr = [0u8; 12];
    hdr[..4].copy_from_slice(&(needed as u32).to_be_bytes());
    if needed <= room && header.l1_table_offset != 0 {
        let zeros = vec![0u8; ((needed - old) * 8) as usize];
        write_sync(
            &file,
            &zeros,
            header.l1_table_offset + old * 8,
            name,
            "the L1 table's new entries",
        )?;
        write_sync(&file, &hdr[..4], HDR_L1_SIZE, name, "the L1 size")?;
        return Header::read_from(&file, name);
    }
    // A new table at the end of the file: the old entries, then zeros.
    let mut table = vec![0u8; (needed * 8).next_multiple_of(cs) as usize];
    if old > 0 {
        file.read_exact_at(&mut table[..(old * 8) as usize], header.l1_table_offset)
            .map_err(|e| Error::io(e, format!("{name}: reading the L1 table")))?;
    }
    let old_off = header.l1_table_offset;
    let old_clusters = (old * 8).div_ceil(cs);
    let meta_file = file
        .try_clone()
        .map_err(|e| Error::io(e, format!("{name}: dup")))?;
    let meta = Meta::open(name, header, meta_file, false)?;
    let clusters = table.len() as u64 / cs;
    let first = meta.reserve(clusters)?;
    let new_off = first * cs;
    // The table and its refcounts are durable before the header names it.
    file.write_all_at(&table, new_off)
        .and_then(|()| file.sync_data())
        .map_err(|e| Error::io(e, format!("{name}: writing the grown L1 table")))?;
    hdr[4..].copy_from_slice(&new_off.to_be_bytes());
    write_sync(&file, &hdr, HDR_L1_SIZE, name, "the header's new L1 table")?;
    debug_assert_eq!(HDR_L1_OFFSET, HDR_L1_SIZE + 4);
    // Only now is the old table unused.
    if old_off != 0 && old_clusters > 0 {
        let hosts: Vec<u64> = (0..old_clusters).map(|i| old_off + i * cs).collect();
        meta.free_clusters(&hosts)?;
    }
    meta.close()?;
    report.l1_moved = true;
    Header::read_from(&file, name)
}

/// Makes the cluster holding `old_size` (not cluster aligned) a data
/// cluster of the overlay whose bytes past `old_size` are zeros, without
/// changing what the disk reads below `old_size`.
fn materialize_last_cluster(path: &Path, old_size: u64, cs: u64) -> Result<()> {
    let start = old_size - old_size % cs;
    let disk = Disk::open(
        path,
        Options {
            cores: 1,
            copy_on_read: false,
            ..Options::default()
        },
    )?;
    // Whatever the cluster is now (unallocated, compressed, zero or data),
    // writing its own bytes back leaves a data or zero cluster of the
    // overlay with the same contents below the old end.
    let mut buf = vec![0u8; (old_size - start) as usize];
    let result = disk
        .read_at(&mut buf, start)
        .and_then(|()| disk.write_at(&buf, start))
        .and_then(|()| disk.flush());
    let closed = disk.close();
    result?;
    closed
}

/// Writes zero entries for every cluster of `[old_size, zero_end)`; the
/// partial cluster holding `old_size` (if any) is already a data or zero
/// cluster of the overlay, whose tail is zeroed here.
fn zero_new_area(
    name: &str,
    file: LockedFile,
    header: Header,
    old_size: u64,
    zero_end: u64,
) -> Result<()> {
    let cs = header.cluster_size();
    let cluster_bits = header.cluster_bits;
    let version = header.version;
    let ext = header.extended_l2();
    let entry_bytes = header.l2_entry_bytes() as usize;
    let per_l2 = header.l2_entries();
    let meta_file = file
        .try_clone()
        .map_err(|e| Error::io(e, format!("{name}: dup")))?;
    let meta = Meta::open(name, header, meta_file, false)?;
    let mut replaced = Vec::new();
    let mut new_l1 = Vec::new();
    let zeros = |at: u64, len: u64| {
        file.write_all_at(&vec![0u8; len as usize], at)
            .map_err(|e| Error::io(e, format!("{name}: zeroing past the old end at {at:#x}")))
    };

    let first_cluster = old_size / cs;
    let end_cluster = zero_end.div_ceil(cs);
    let mut c = first_cluster;
    while c < end_cluster {
        let l1i = c / per_l2;
        let stop = end_cluster.min((l1i + 1) * per_l2);
        let table_off = meta.l2_table(l1i)?;
        let mut table = vec![0u8; cs as usize];
        if let Some(off) = table_off {
            file.read_exact_at(&mut table, off)
                .map_err(|e| Error::io(e, format!("{name}: reading an L2 table at {off:#x}")))?;
        }
        for cc in c..stop {
            let idx = (cc % per_l2) as usize;
            let at = idx * entry_bytes;
            let (_, e) = decode_l2_at(&table, idx, version, cs, ext)?;
            let new = if cc * cs < old_size {
                // The partial last cluster (a data or zero cluster of the
                // overlay): zero its bytes past the old end.
                let tail = old_size - cc * cs;
                if !ext {
                    if let L2Entry::Data { host } = e.entry {
                        zeros(host + tail, cs - tail)?;
                    }
                    continue;
                }
                // Subclusters wholly past the old end read as zeros; the
                // one the old end cuts has its tail zeroed if allocated.
                let sc = cs / u64::from(SUBCLUSTERS);
                let cut = (tail / sc) as u32;
                let past = if tail.is_multiple_of(sc) {
                    cut
                } else {
                    cut + 1
                };
                if past > cut && e.alloc & (1 << cut) != 0 {
                    let host = e.host().expect("allocated subclusters have a host");
                    zeros(host + tail, u64::from(past) * sc - tail)?;
                }
                let mask = if past >= SUBCLUSTERS {
                    0
                } else {
                    u32::MAX << past
                };
                ExtL2 {
                    entry: e.entry,
                    alloc: e.alloc & !mask,
                    zero: e.zero | mask,
                }
            } else {
                // Whole clusters past the old end: zeros.
                match e.entry {
                    L2Entry::Data { host } | L2Entry::Zero { host: Some(host) } => {
                        replaced.push(host)
                    }
                    // Past the old end nothing reads it; its clusters stay in
                    // use (shared ones too): leaked at worst, never corrupt.
                    L2Entry::Compressed(_) | L2Entry::Unallocated | L2Entry::Zero { .. } => {}
                }
                if ext {
                    ExtL2 {
                        entry: L2Entry::Unallocated,
                        alloc: 0,
                        zero: u32::MAX,
                    }
                } else if version >= 3 {
                    ExtL2 {
                        entry: L2Entry::Zero { host: None },
                        alloc: 0,
                        zero: u32::MAX,
                    }
                } else {
                    // No zero flag in version 2: a fresh cluster from past the
                    // end of the file reads as zeros without being written.
                    ExtL2 {
                        entry: L2Entry::Data {
                            host: meta.reserve(1)? << cluster_bits,
                        },
                        alloc: u32::MAX,
                        zero: 0,
                    }
                }
            };
            if ext {
                let (raw, bitmap) = encode_l2_ext(&new);
                table[at..at + 8].copy_from_slice(&raw.to_be_bytes());
                table[at + 8..at + 16].copy_from_slice(&bitmap.to_be_bytes());
            } else {
                table[at..at + 8].copy_from_slice(&encode_l2(&new.entry).to_be_bytes());
            }
        }
        match table_off {
            Some(off) => {
                file.write_all_at(&table, off).map_err(|e| {
                    Error::io(e, format!("{name}: writing an L2 table at {off:#x}"))
                })?;
            }
            None => {
                let off = meta.reserve(1)? << cluster_bits;
                meta.install_l2_table(l1i, off)?;
                file.write_all_at(&table, off).map_err(|e| {
                    Error::io(e, format!("{name}: writing a new L2 table at {off:#x}"))
                })?;
                new_l1.push(l1i);
            }
        }
        c = stop;
    }
    // Data, tables and refcounts durable, then the L1 entries.
    file.sync_data()
        .map_err(|e| Error::io(e, format!("{name}: fdatasync (zeroing the new area)")))?;
    meta.write_l1_entries(&new_l1)?;
    file.sync_data()
        .map_err(|e| Error::io(e, format!("{name}: fdatasync (L1 entries)")))?;
    if !replaced.is_empty() {
        meta.free_clusters(&replaced)?;
    }
    meta.close()?;
    Ok(())
}
