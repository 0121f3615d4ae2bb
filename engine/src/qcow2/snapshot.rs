//! The internal snapshot table (qcow2.rst, "Snapshots"): a pure parser.
//!
//! What it owns: the layout of a snapshot table entry, and the bounds that
//! keep a hostile table from costing unbounded memory or time (QEMU's: at
//! most 65,536 snapshots, a table of at most 64 MiB, at most 1 KiB of extra
//! data per entry, L1 tables no larger than the active one may be).
//!
//! What it never does: I/O. The caller reads `snapshots_offset` (the table
//! is contiguous) and checks that the L1 tables lie inside the file.

use super::{MAX_L1_BYTES, MAX_SNAPSHOTS};
use crate::error::{Error, Result};

/// Largest snapshot table QEMU writes or reads (all entries together).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data QEMU accepts in one entry.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Bytes of an entry before its extra data.
const FIXED: usize = 40;

/// One internal snapshot: its own L1 table over clusters it may share with
/// the active disk (those have refcounts above 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    /// Entries of its L1 table (it maps the disk and, past the disk's size,
    /// the saved VM state).
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    /// The disk's virtual size when the snapshot was taken (version 3).
    pub disk_size: Option<u64>,
    pub date_sec: u32,
}

/// Parses `count` entries from `table` (read from `snapshots_offset`; it may
/// be longer than the entries). Offsets are checked for alignment only.
pub fn parse_snapshot_table(table: &[u8], count: u32, cluster_size: u64) -> Result<Vec<Snapshot>> {
    if count > MAX_SNAPSHOTS {
        return Err(Error::corrupt(format!(
            "{count} internal snapshots (at most {MAX_SNAPSHOTS})"
        )));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    for i in 0..count {
        let fixed = table.get(at..at + FIXED).ok_or_else(|| {
            Error::corrupt(format!(
                "snapshot table entry {i} runs past the table's end"
            ))
        })?;
        let be32 = |o: usize| u32::from_be_bytes(fixed[o..o + 4].try_into().expect("4 bytes"));
        let be64 = |o: usize| u64::from_be_bytes(fixed[o..o + 8].try_into().expect("8 bytes"));
        let l1_table_offset = be64(0);
        let l1_size = be32(8);
        let id_len = usize::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let date_sec = be32(16);
        let mut vm_state_size = u64::from(be32(32));
        let extra_len = be32(36);
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(Error::corrupt(format!(
                "snapshot {i}: {extra_len} bytes of extra data (at most {MAX_SNAPSHOT_EXTRA_DATA})"
            )));
        }
        if !l1_table_offset.is_multiple_of(cluster_size) {
            return Err(Error::corrupt(format!(
                "snapshot {i}: L1 table offset {l1_table_offset:#x} is not cluster aligned"
            )));
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "snapshot {i}: L1 table of {l1_size} entries is too large"
            )));
        }
        let extra_at = at + FIXED;
        let extra_end = extra_at + extra_len as usize;
        let end = extra_end + id_len + name_len;
        let entry = table.get(at..end).ok_or_else(|| {
            Error::corrupt(format!(
                "snapshot table entry {i} runs past the table's end"
            ))
        })?;
        let extra = &entry[FIXED..FIXED + extra_len as usize];
        if extra.len() >= 8 {
            vm_state_size = u64::from_be_bytes(extra[0..8].try_into().expect("8 bytes"));
        }
        let disk_size = (extra.len() >= 16)
            .then(|| u64::from_be_bytes(extra[8..16].try_into().expect("8 bytes")));
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let id = text(&table[extra_end..extra_end + id_len]);
        let name = text(&table[extra_end + id_len..end]);
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            vm_state_size,
            disk_size,
            date_sec,
        });
        at = end.next_multiple_of(8);
    }
    Ok(out)
}

/// Bytes the first `count` entries of a table [`parse_snapshot_table`]
/// accepted take, padding included.
pub fn snapshot_table_len(table: &[u8], count: usize) -> u64 {
    let mut at = 0usize;
    for _ in 0..count {
        let be16 = |o: usize| usize::from(u16::from_be_bytes([table[at + o], table[at + o + 1]]));
        let extra = u32::from_be_bytes(table[at + 36..at + 40].try_into().expect("4 bytes"));
        at = (at + FIXED + extra as usize + be16(12) + be16(14)).next_multiple_of(8);
    }
    at as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::testutil::{qemu_img, qemu_io, tool_available};
    use std::os::unix::fs::FileExt;

    fn entry(l1: u64, l1_size: u32, id: &str, name: &str, extra: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&l1.to_be_bytes());
        e.extend_from_slice(&l1_size.to_be_bytes());
        e.extend_from_slice(&(id.len() as u16).to_be_bytes());
        e.extend_from_slice(&(name.len() as u16).to_be_bytes());
        e.extend_from_slice(&7u32.to_be_bytes());
        e.extend_from_slice(&[0; 12]);
        e.extend_from_slice(&5u32.to_be_bytes());
        e.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        e.extend_from_slice(extra);
        e.extend_from_slice(id.as_bytes());
        e.extend_from_slice(name.as_bytes());
        e.resize(e.len().next_multiple_of(8), 0);
        e
    }

    #[test]
    fn parses_entries_and_extra_data() {
        let mut extra = Vec::new();
        extra.extend_from_slice(&9u64.to_be_bytes());
        extra.extend_from_slice(&(1u64 << 20).to_be_bytes());
        let mut t = entry(0x30000, 2, "1", "first", &extra);
        t.extend(entry(0x50000, 1, "22", "", &[]));
        let s = parse_snapshot_table(&t, 2, 65536).unwrap();
        assert_eq!(s[0].name, "first");
        assert_eq!(s[0].id, "1");
        assert_eq!(s[0].vm_state_size, 9);
        assert_eq!(s[0].disk_size, Some(1 << 20));
        assert_eq!(s[0].date_sec, 7);
        assert_eq!((s[1].l1_table_offset, s[1].l1_size), (0x50000, 1));
        assert_eq!(s[1].vm_state_size, 5);
        assert_eq!(s[1].disk_size, None);
        assert_eq!(snapshot_table_len(&t, 2), t.len() as u64);
        assert_eq!(snapshot_table_len(&t, 1), 40 + 16 + 1 + 5 + 2);
    }

    #[test]
    fn hostile_tables_are_errors() {
        let ok = entry(0x30000, 2, "1", "a", &[]);
        // Truncated, too many, unaligned L1, huge L1, huge extra data.
        assert!(parse_snapshot_table(&ok[..20], 1, 65536).is_err());
        assert!(parse_snapshot_table(&ok, 2, 65536).is_err());
        assert!(parse_snapshot_table(&ok, MAX_SNAPSHOTS + 1, 65536).is_err());
        assert!(parse_snapshot_table(&entry(0x30001, 2, "1", "a", &[]), 1, 65536).is_err());
        assert!(parse_snapshot_table(&entry(0x30000, u32::MAX, "1", "a", &[]), 1, 65536).is_err());
        let mut big = ok.clone();
        big[36..40].copy_from_slice(&4096u32.to_be_bytes());
        assert!(parse_snapshot_table(&big, 1, 65536).is_err());
        // Name past the end.
        let mut long = ok;
        long[14..16].copy_from_slice(&1000u16.to_be_bytes());
        assert!(parse_snapshot_table(&long, 1, 65536).is_err());
    }

    #[test]
    fn reads_what_qemu_img_snapshot_writes() {
        if !(tool_available("qemu-img") && tool_available("qemu-io")) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("s.qcow2");
        let p = img.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", p, "4M"]);
        qemu_io(&img, "qcow2", &["write -P 1 0 1M"]);
        qemu_img(&["snapshot", "-c", "before", p]);
        qemu_io(&img, "qcow2", &["write -P 2 0 64k"]);
        qemu_img(&["snapshot", "-c", "second snapshot", p]);
        let f = std::fs::File::open(&img).unwrap();
        let mut h = [0u8; 72];
        f.read_exact_at(&mut h, 0).unwrap();
        let cluster_size = 1u64 << u32::from_be_bytes(h[20..24].try_into().unwrap());
        let nb_snapshots = u32::from_be_bytes(h[60..64].try_into().unwrap());
        let snapshots_offset = u64::from_be_bytes(h[64..72].try_into().unwrap());
        assert_eq!(nb_snapshots, 2);
        let len = f.metadata().unwrap().len() - snapshots_offset;
        let mut table = vec![0u8; len.min(4096) as usize];
        f.read_exact_at(&mut table, snapshots_offset).unwrap();
        let s = parse_snapshot_table(&table, nb_snapshots, cluster_size).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "before");
        assert_eq!(s[1].name, "second snapshot");
        assert_eq!(s[0].disk_size, Some(4 << 20));
        assert!(s.iter().all(|s| s.l1_size >= 1 && s.l1_table_offset != 0));
    }
}
