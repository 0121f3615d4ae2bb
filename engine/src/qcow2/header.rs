//! The qcow2 header and its extensions: parsing, validation, serialisation.
//!
//! What it owns: the bytes of the header area (the first cluster): the fixed
//! header, the extension list, the end marker and the backing file name.
//!
//! What it never does: follow a table. It only checks that the tables the
//! header names are aligned and lie inside the file; reading them is the
//! caller's job.
//!
//! Invariants: a parsed [`Header`] has a supported version, cluster size and
//! refcount width; its L1 and refcount tables lie inside the file; its L1
//! table covers the virtual size; everything it refuses is refused with
//! `Unsupported` (a feature we lack) or `Corrupt` (bytes that break the spec),
//! and the message names the image and the field.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::entry::RefcountWidth;
use super::{
    MAX_BACKING_NAME_LEN, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS, QCOW_MAGIC,
};
use crate::error::{Error, ErrorKind, Result};

/// Header extension: the backing file's format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: human-readable names of feature bits.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: QEMU found the image corrupt; no writes.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is meaningful.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: L2 entries carry subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Smallest cluster size with extended L2 entries (16 KiB), as in QEMU.
pub const MIN_EXTL2_CLUSTER_BITS: u32 = 14;
/// Every incompatible bit the spec defines today.
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Compatible feature bit 0: lazy refcounts may be used.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Size of the fixed version 2 header; extensions follow it directly.
pub const V2_HEADER_LEN: u32 = 72;
/// Size of the mandatory part of a version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Version 3 header length QEMU writes: 104 + compression type + padding.
pub const V3_HEADER_LEN: u32 = 112;
/// One entry of the feature name table: type, bit number, 46 bytes of name.
const FEATURE_ENTRY_LEN: usize = 48;
/// QEMU keeps the backing format in a 16-byte buffer; a longer name is refused.
const MAX_BACKING_FORMAT_LEN: usize = 15;

/// A header extension kept verbatim (the backing format is parsed out of the
/// list into [`Header::backing_format`]; every other one stays here, in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The qcow2 header, version 2 or 3, as the fields appear on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

fn be32(buf: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(buf[off..off + 4].try_into().expect("4-byte slice"))
}

fn be64(buf: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(buf[off..off + 8].try_into().expect("8-byte slice"))
}

/// Number of L1 entries needed to map `size` bytes with clusters of
/// `1 << cluster_bits` bytes (each L2 table maps `cluster_size / 8` clusters).
pub fn l1_entries_needed(size: u64, cluster_bits: u32, extended_l2: bool) -> u64 {
    // One L1 entry maps 2^(2 * cluster_bits - 3) bytes (- 4 with 16-byte
    // extended entries); at most 2^39 with 2 MiB clusters, so the shift
    // cannot overflow.
    let shift = 2 * cluster_bits - 3 - u32::from(extended_l2);
    size.div_ceil(1u64 << shift)
}

/// Names of incompatible feature bits, taken from the image's own feature
/// name table when it has one (so a newer QEMU's feature gets its real name).
fn feature_name(extensions: &[Extension], kind: u8, bit: u8) -> Option<String> {
    let table = extensions.iter().find(|e| e.kind == EXT_FEATURE_TABLE)?;
    table
        .data
        .chunks_exact(FEATURE_ENTRY_LEN)
        .find(|e| e[0] == kind && e[1] == bit)
        .map(|e| {
            let name = &e[2..];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            String::from_utf8_lossy(&name[..end]).into_owned()
        })
}

impl Header {
    /// Parses and validates the header area of an image.
    ///
    /// `buf` holds the start of the file: at least its first cluster, or the
    /// whole file when that is shorter. `file_len` bounds every table offset.
    /// `path` only names the image in messages.
    pub fn parse(buf: &[u8], file_len: u64, path: &str) -> Result<Header> {
        let corrupt = |what: String| Error::corrupt(format!("qcow2 image {path}: {what}"));
        let unsupported = |what: String| Error::unsupported(format!("qcow2 image {path}: {what}"));

        if buf.len() < V2_HEADER_LEN as usize {
            return Err(corrupt(format!(
                "header truncated: {} bytes, need at least {V2_HEADER_LEN}",
                buf.len()
            )));
        }
        let magic = be32(buf, 0);
        if magic != QCOW_MAGIC {
            return Err(corrupt(format!(
                "bad magic {magic:#010x} at offset 0 (expected {QCOW_MAGIC:#010x}, not a qcow2 image)"
            )));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!(
                "qcow2 version {version} (only versions 2 and 3 are supported)"
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} at offset 20 out of range 9..={MAX_CLUSTER_BITS}"
            )));
        }
        if cluster_bits < MIN_CLUSTER_BITS {
            return Err(unsupported(format!(
                "cluster size {} bytes (at least {} needed)",
                1u64 << cluster_bits,
                1u64 << MIN_CLUSTER_BITS
            )));
        }
        let cluster_size = 1u64 << cluster_bits;

        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
        };

        // The header area is the first cluster; nothing in it may reach past
        // what we were given (a file shorter than a cluster ends earlier).
        let area_end = (cluster_size as usize).min(buf.len());

        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(corrupt(format!(
                    "version 3 header truncated: {} bytes, need at least {V3_MIN_HEADER_LEN}",
                    buf.len()
                )));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LEN
                || !h.header_length.is_multiple_of(8)
                || h.header_length as usize > area_end
            {
                return Err(corrupt(format!(
                    "header_length {} at offset 100 invalid (must be a multiple of 8, at least \
                     {V3_MIN_HEADER_LEN} and inside the first {area_end} bytes)",
                    h.header_length
                )));
            }
            if h.header_length > V3_MIN_HEADER_LEN {
                h.compression_type = buf[104];
            }
        }

        // Extensions come first so that unknown feature bits can be named
        // with the image's own feature name table.
        h.parse_extensions(buf, area_end, path)?;

        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| match feature_name(&h.extensions, 0, b) {
                    Some(n) => format!("bit {b} ({n})"),
                    None => format!("bit {b}"),
                })
                .collect();
            return Err(unsupported(format!(
                "unknown incompatible feature {} (incompatible_features {:#x})",
                names.join(", "),
                h.incompatible_features
            )));
        }
        if h.crypt_method != 0 {
            return Err(unsupported(format!(
                "encrypted image (crypt_method {}) is not supported",
                h.crypt_method
            )));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(
                "external data file (incompatible feature bit 2) is not supported".into(),
            ));
        }
        if h.incompatible_features & INCOMPAT_EXTL2 != 0 && cluster_bits < MIN_EXTL2_CLUSTER_BITS {
            // As QEMU: 32 subclusters of less than 512 bytes make no sense.
            return Err(unsupported(format!(
                "extended L2 entries (incompatible feature bit 4) with {cluster_size}-byte \
                 clusters (at least {} needed)",
                1u64 << MIN_EXTL2_CLUSTER_BITS
            )));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!(
                "{} internal snapshots (at most {MAX_SNAPSHOTS})",
                h.nb_snapshots
            )));
        }
        if h.nb_snapshots != 0 && !h.snapshots_offset.is_multiple_of(1 << h.cluster_bits) {
            return Err(corrupt(format!(
                "snapshot table offset {:#x} is not cluster aligned",
                h.snapshots_offset
            )));
        }
        if RefcountWidth::from_order(h.refcount_order).is_none() {
            return Err(corrupt(format!(
                "refcount_order {} (refcounts wider than 64 bits do not exist; qcow2 allows 0 to 6)",
                h.refcount_order
            )));
        }
        match h.compression_type {
            0 if h.incompatible_features & INCOMPAT_COMPRESSION != 0 => {
                return Err(corrupt(
                    "compression type bit (incompatible bit 3) set with zlib compression".into(),
                ));
            }
            0 => {}
            1 if h.incompatible_features & INCOMPAT_COMPRESSION == 0 => {
                return Err(corrupt(
                    "compression type zstd without incompatible feature bit 3".into(),
                ));
            }
            1 => {}
            t => return Err(unsupported(format!("unknown compression type {t}"))),
        }

        if h.size > i64::MAX as u64 {
            return Err(corrupt(format!("virtual size {} too large", h.size)));
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {} entries exceeds the {} MiB limit",
                h.l1_size,
                MAX_L1_BYTES >> 20
            )));
        }
        let needed = l1_entries_needed(h.size, cluster_bits, h.extended_l2());
        if u64::from(h.l1_size) < needed {
            return Err(corrupt(format!(
                "L1 table has {} entries but virtual size {} needs {needed}",
                h.l1_size, h.size
            )));
        }
        if h.l1_size > 0 {
            check_table(
                h.l1_table_offset,
                l1_bytes,
                cluster_size,
                file_len,
                "L1 table",
            )
            .map_err(corrupt)?;
        }
        if h.refcount_table_clusters == 0 {
            return Err(corrupt(
                "refcount_table_clusters is 0 (no refcount table)".into(),
            ));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {} clusters exceeds the {} MiB limit",
                h.refcount_table_clusters,
                MAX_REFTABLE_BYTES >> 20
            )));
        }
        check_table(
            h.refcount_table_offset,
            rt_bytes,
            cluster_size,
            file_len,
            "refcount table",
        )
        .map_err(corrupt)?;

        if h.backing_file_offset != 0 {
            let len = h.backing_file_size;
            if len > MAX_BACKING_NAME_LEN {
                return Err(corrupt(format!(
                    "backing file name length {len} exceeds {MAX_BACKING_NAME_LEN}"
                )));
            }
            let start = h.backing_file_offset;
            let end = start + u64::from(len);
            if end > area_end as u64 || start < u64::from(h.header_length) {
                return Err(corrupt(format!(
                    "backing file name at offset {start} length {len} lies outside the header \
                     area [{}, {area_end})",
                    h.header_length
                )));
            }
            let raw = &buf[start as usize..end as usize];
            if raw.contains(&0) {
                return Err(corrupt(format!(
                    "backing file name at offset {start} contains a NUL byte"
                )));
            }
            let name = std::str::from_utf8(raw).map_err(|_| {
                unsupported(format!(
                    "backing file name at offset {start} is not valid UTF-8"
                ))
            })?;
            if !name.is_empty() {
                h.backing_file = Some(name.to_string());
            }
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8], area_end: usize, path: &str) -> Result<()> {
        // Extensions end where the backing name starts (QEMU's rule), or at
        // the end of the header area.
        let mut end = area_end;
        if self.backing_file_offset != 0 && self.backing_file_offset < area_end as u64 {
            end = self.backing_file_offset as usize;
        }
        let mut off = self.header_length as usize;
        while off + 8 <= end {
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            if kind == 0 {
                break;
            }
            let data_start = off + 8;
            if len > end - data_start {
                return Err(Error::corrupt(format!(
                    "qcow2 image {path}: header extension {kind:#010x} at offset {off} with \
                     length {len} overruns the header area (ends at {end})"
                )));
            }
            let data = &buf[data_start..data_start + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    if len > MAX_BACKING_FORMAT_LEN {
                        return Err(Error::corrupt(format!(
                            "qcow2 image {path}: backing format extension at offset {off} too \
                             long ({len} bytes, at most {MAX_BACKING_FORMAT_LEN})"
                        )));
                    }
                    let s = std::str::from_utf8(data).map_err(|_| {
                        Error::corrupt(format!(
                            "qcow2 image {path}: backing format at offset {off} is not UTF-8"
                        ))
                    })?;
                    let s = s.trim_end_matches('\0');
                    self.backing_format = (!s.is_empty()).then(|| s.to_string());
                }
                EXT_FEATURE_TABLE if !len.is_multiple_of(FEATURE_ENTRY_LEN) => {
                    return Err(Error::corrupt(format!(
                        "qcow2 image {path}: feature name table at offset {off} has length \
                         {len}, not a multiple of {FEATURE_ENTRY_LEN}"
                    )));
                }
                _ => self.extensions.push(Extension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            // Extension data is padded to a multiple of 8 bytes; the padding
            // may run into `end` only if nothing follows.
            off = data_start + len.next_multiple_of(8);
        }
        Ok(())
    }

    /// Reads the header area of `file` and parses it (see [`Header::parse`]).
    pub fn read_from(file: &File, path: &str) -> Result<Header> {
        let file_len =
            crate::io::file_size(file).map_err(|e| Error::io(e, format!("stat {path}")))?;
        // A cluster is at most 2 MiB; read what the cluster_bits field asks
        // for, bounded by the file length.
        let mut first = vec![0u8; (file_len.min(4096)) as usize];
        read_exact_at(file, &mut first, 0, path)?;
        let bits = if first.len() >= 24 {
            be32(&first, 20)
        } else {
            0
        };
        let want = if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            (1u64 << bits).min(file_len)
        } else {
            first.len() as u64
        };
        let buf = if want as usize > first.len() {
            let mut b = vec![0u8; want as usize];
            read_exact_at(file, &mut b, 0, path)?;
            b
        } else {
            first
        };
        Header::parse(&buf, file_len, path)
    }

    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Entries per L2 table (one cluster of 8-byte entries, or of 16-byte
    /// ones with extended L2 entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    /// Bytes per L2 entry: 16 with extended L2 entries (subclusters), else 8.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Whether L2 entries are extended (incompatible feature bit 4): 32
    /// subclusters per cluster.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// The width of a refcount entry (validated by the parser).
    pub fn refcount_width(&self) -> RefcountWidth {
        RefcountWidth::from_order(self.refcount_order).unwrap_or(RefcountWidth::DEFAULT)
    }

    /// Entries per refcount block (one cluster of refcounts).
    pub fn refcount_block_entries(&self) -> u64 {
        self.refcount_width().per_block(self.cluster_size())
    }

    /// Entries of the refcount table.
    pub fn refcount_table_entries(&self) -> u64 {
        u64::from(self.refcount_table_clusters) * self.cluster_size() / 8
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// "1.1" for version 3, "0.10" for version 2, as `qemu-img info` says.
    pub fn compat_name(&self) -> &'static str {
        if self.version >= 3 {
            "1.1"
        } else {
            "0.10"
        }
    }

    /// Refuses to write to an image QEMU marked corrupt, or whose refcounts
    /// may be stale (the dirty bit): allocating from stale refcounts could
    /// hand out a cluster that is still in use.
    pub fn check_writable(&self, path: &str) -> Result<()> {
        if self.is_corrupt() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "qcow2 image {path} is marked corrupt (incompatible feature bit 1); it \
                     cannot be opened for writing: run `qemu-img check -r all {path}`"
                ),
            ));
        }
        if self.nb_snapshots != 0 {
            return Err(Error::unsupported(format!(
                "qcow2 image {path} has {} internal snapshot(s); backfill opens such images \
                 read-only (writing would have to copy the clusters the snapshots share \
                 first): open it read-only, or make a copy without them with `qemu-img \
                 convert -O qcow2`",
                self.nb_snapshots
            )));
        }
        if self.is_dirty() {
            return Err(Error::unsupported(format!(
                "qcow2 image {path} is dirty (incompatible feature bit 0): refcounts need \
                 repair: run `qemu-img check -r all {path}`"
            )));
        }
        Ok(())
    }

    pub fn set_incompatible_bit(&mut self, bit: u64) {
        self.incompatible_features |= bit;
    }

    pub fn clear_incompatible_bit(&mut self, bit: u64) {
        self.incompatible_features &= !bit;
    }

    /// Clears every autoclear bit. A writer that does not maintain what the
    /// autoclear features describe (e.g. persistent bitmaps) must do this
    /// before its first write, so that stale data is never trusted later.
    pub fn clear_autoclear_features(&mut self) {
        self.autoclear_features = 0;
    }

    /// The header area as QEMU lays it out: fixed header, extensions (backing
    /// format first, then the kept ones in order), end marker, backing name.
    /// `backing_file_offset`/`backing_file_size` are recomputed. Fails when
    /// the result does not fit in one cluster.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let header_len = if self.version >= 3 {
            let min = if self.compression_type != 0 {
                V3_HEADER_LEN
            } else {
                V3_MIN_HEADER_LEN
            };
            self.header_length.max(min).next_multiple_of(8)
        } else {
            V2_HEADER_LEN
        };
        let mut out = vec![0u8; header_len as usize];
        let put32 =
            |o: &mut Vec<u8>, at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |o: &mut Vec<u8>, at: usize, v: u64| o[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut out, 0, QCOW_MAGIC);
        put32(&mut out, 4, self.version);
        put32(&mut out, 20, self.cluster_bits);
        put64(&mut out, 24, self.size);
        put32(&mut out, 32, self.crypt_method);
        put32(&mut out, 36, self.l1_size);
        put64(&mut out, 40, self.l1_table_offset);
        put64(&mut out, 48, self.refcount_table_offset);
        put32(&mut out, 56, self.refcount_table_clusters);
        put32(&mut out, 60, self.nb_snapshots);
        put64(&mut out, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut out, 72, self.incompatible_features);
            put64(&mut out, 80, self.compatible_features);
            put64(&mut out, 88, self.autoclear_features);
            put32(&mut out, 96, self.refcount_order);
            put32(&mut out, 100, header_len);
            if header_len > V3_MIN_HEADER_LEN {
                out[104] = self.compression_type;
            }
        } else if self.incompatible_features != 0
            || self.compatible_features != 0
            || self.autoclear_features != 0
            || self.refcount_order != 4
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "qcow2 version 2 header cannot carry feature bits or a refcount order",
            ));
        }

        let push_ext = |out: &mut Vec<u8>, kind: u32, data: &[u8]| {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut out, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        for e in &self.extensions {
            push_ext(&mut out, e.kind, &e.data);
        }
        // The end-of-extensions marker: type 0, length 0.
        out.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME_LEN as usize || name.is_empty() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("backing file name {name:?} must be 1..={MAX_BACKING_NAME_LEN} bytes"),
                ));
            }
            let at = out.len() as u64;
            put64(&mut out, 8, at);
            put32(&mut out, 16, name.len() as u32);
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() as u64 > self.cluster_size() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "qcow2 header area needs {} bytes, more than one cluster ({})",
                    out.len(),
                    self.cluster_size()
                ),
            ));
        }
        Ok(out)
    }
}

/// Checks that a table at `offset` of `len` bytes is cluster aligned and
/// lies inside the file without overflowing.
fn check_table(
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
    what: &str,
) -> std::result::Result<(), String> {
    if !offset.is_multiple_of(cluster_size) || offset == 0 {
        return Err(format!(
            "{what} offset {offset:#x} is not cluster aligned (or is 0, the header)"
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(format!(
            "{what} at offset {offset:#x} length {len} reaches past the end of the file \
             ({file_len} bytes)"
        )),
    }
}

/// `read_exact_at` with the image and offset in the error.
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64, path: &str) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        Error::io(
            e,
            format!("reading {} bytes at offset {offset} of {path}", buf.len()),
        )
    })
}

/// The feature name table QEMU writes into version 3 images; we write the
/// same so that `qemu-img` and older tools can name our bits.
pub fn qemu_feature_table() -> Extension {
    const FEATURES: &[(u8, u8, &str)] = &[
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut data = Vec::with_capacity(FEATURES.len() * FEATURE_ENTRY_LEN);
    for &(kind, bit, name) in FEATURES {
        let mut e = [0u8; FEATURE_ENTRY_LEN];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        data.extend_from_slice(&e);
    }
    Extension {
        kind: EXT_FEATURE_TABLE,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::testutil::{qemu_img, tool_available};

    fn sample() -> Header {
        crate::qcow2::testutil::sample_header()
    }

    fn parse_mutated(f: impl FnOnce(&mut Vec<u8>)) -> Result<Header> {
        let mut buf = sample().serialize().unwrap();
        buf.resize(1 << 16, 0);
        f(&mut buf);
        Header::parse(&buf, 4 << 16, "t.qcow2")
    }

    #[test]
    fn round_trip_sample() {
        let h = sample();
        let mut buf = h.serialize().unwrap();
        buf.resize(1 << 16, 0);
        let mut p = Header::parse(&buf, 4 << 16, "t").unwrap();
        assert_eq!(p.backing_file_offset, 0x210);
        p.backing_file_offset = 0;
        p.backing_file_size = 0;
        assert_eq!(p, h);
    }

    #[test]
    fn hostile_headers_are_refused() {
        let kind = |r: Result<Header>| r.unwrap_err().kind();
        assert_eq!(kind(parse_mutated(|b| b[0] = 0)), ErrorKind::Corrupt);
        assert_eq!(kind(parse_mutated(|b| b[7] = 4)), ErrorKind::Unsupported);
        assert_eq!(kind(parse_mutated(|b| b[23] = 22)), ErrorKind::Corrupt);
        assert_eq!(kind(parse_mutated(|b| b[23] = 9)), ErrorKind::Unsupported);
        // Encryption.
        assert_eq!(kind(parse_mutated(|b| b[35] = 1)), ErrorKind::Unsupported);
        // L1 too small for the size, L1 too large, L1 misaligned, L1 past EOF.
        assert_eq!(kind(parse_mutated(|b| b[39] = 1)), ErrorKind::Corrupt);
        assert_eq!(
            kind(parse_mutated(
                |b| b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())
            )),
            ErrorKind::Corrupt
        );
        assert_eq!(kind(parse_mutated(|b| b[47] = 8)), ErrorKind::Corrupt);
        assert_eq!(kind(parse_mutated(|b| b[45] = 4)), ErrorKind::Corrupt);
        assert_eq!(
            kind(parse_mutated(
                |b| b[40..48].copy_from_slice(&u64::MAX.to_be_bytes())
            )),
            ErrorKind::Corrupt
        );
        // Refcount table: none, huge, past EOF.
        assert_eq!(kind(parse_mutated(|b| b[59] = 0)), ErrorKind::Corrupt);
        assert_eq!(kind(parse_mutated(|b| b[57] = 1)), ErrorKind::Corrupt);
        assert_eq!(kind(parse_mutated(|b| b[53] = 9)), ErrorKind::Corrupt);
        // Snapshots, external data file, extended L2, unknown bits, refcount order.
        // Snapshots: parsed (opened read-only only), but not too many.
        let h = parse_mutated(|b| b[63] = 1).unwrap();
        assert_eq!(
            h.check_writable("x").unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(kind(parse_mutated(|b| b[61] = 2)), ErrorKind::Corrupt);
        assert_eq!(kind(parse_mutated(|b| b[79] = 4)), ErrorKind::Unsupported);
        // Extended L2 entries halve what one L1 entry maps.
        assert_eq!(kind(parse_mutated(|b| b[79] = 16)), ErrorKind::Corrupt);
        assert!(parse_mutated(|b| {
            b[79] = 16;
            b[39] = 4
        })
        .unwrap()
        .extended_l2());
        let e = parse_mutated(|b| b[79] = 32).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("bit 5"), "{e}");
        assert_eq!(kind(parse_mutated(|b| b[99] = 7)), ErrorKind::Corrupt);
        assert!(parse_mutated(|b| b[99] = 6).is_ok());
        // Header length: odd, too small, too large.
        assert_eq!(kind(parse_mutated(|b| b[103] = 105)), ErrorKind::Corrupt);
        assert_eq!(kind(parse_mutated(|b| b[103] = 96)), ErrorKind::Corrupt);
        assert_eq!(kind(parse_mutated(|b| b[101] = 2)), ErrorKind::Corrupt);
        // Compression type zstd without bit 3; bit 3 with zlib; unknown type.
        assert_eq!(kind(parse_mutated(|b| b[104] = 1)), ErrorKind::Corrupt);
        assert_eq!(kind(parse_mutated(|b| b[79] = 8)), ErrorKind::Corrupt);
        assert!(parse_mutated(|b| {
            b[104] = 1;
            b[79] = 8
        })
        .is_ok());
        assert_eq!(
            kind(parse_mutated(|b| {
                b[104] = 7;
                b[79] = 8
            })),
            ErrorKind::Unsupported
        );
        // Backing name: too long, outside the cluster.
        assert_eq!(kind(parse_mutated(|b| b[18] = 4)), ErrorKind::Corrupt);
        assert_eq!(
            kind(parse_mutated(
                |b| b[8..16].copy_from_slice(&0xfffcu64.to_be_bytes())
            )),
            ErrorKind::Corrupt
        );
        // Extension overrunning the header area.
        assert_eq!(
            kind(parse_mutated(
                |b| b[116..120].copy_from_slice(&0x1000u32.to_be_bytes())
            )),
            ErrorKind::Corrupt
        );
        // Truncated buffers never panic.
        let full = sample().serialize().unwrap();
        for n in 0..full.len() {
            let _ = Header::parse(&full[..n], 4 << 16, "t");
        }
    }

    #[test]
    fn dirty_and_corrupt_parse_but_refuse_writes() {
        let h = parse_mutated(|b| b[79] = 1).unwrap();
        assert!(h.is_dirty());
        let e = h.check_writable("t.qcow2").unwrap_err();
        assert!(e.message().contains("qemu-img check -r all"), "{e}");
        let h = parse_mutated(|b| b[79] = 2).unwrap();
        assert!(h.is_corrupt());
        assert_eq!(
            h.check_writable("t").unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert!(sample().check_writable("t").is_ok());
    }

    #[test]
    fn qemu_images_round_trip() {
        if !tool_available("qemu-img") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let cases: &[&[&str]] = &[
            &["-o", "compat=1.1"],
            &["-o", "compat=0.10"],
            &["-b", "base.raw", "-F", "raw"],
            &["-o", "compat=0.10", "-b", "base.raw", "-F", "raw"],
            &[
                "-o",
                "cluster_size=4096,lazy_refcounts=on",
                "-b",
                "base.raw",
                "-F",
                "raw",
            ],
            &["-o", "compression_type=zstd,cluster_size=2M"],
        ];
        for (i, extra) in cases.iter().enumerate() {
            let img = dir.path().join(format!("i{i}.qcow2"));
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            args.extend_from_slice(extra);
            let img_s = img.to_str().unwrap();
            args.push(img_s);
            args.push("3M");
            qemu_img(&args);
            let bytes = std::fs::read(&img).unwrap();
            let h = Header::parse(&bytes, bytes.len() as u64, img_s).unwrap();
            let ser = h.serialize().unwrap();
            assert_eq!(&bytes[..ser.len()], &ser[..], "case {extra:?}");
            let mut padded = ser.clone();
            padded.resize(h.cluster_size() as usize, 0);
            let again = Header::parse(&padded, bytes.len() as u64, img_s).unwrap();
            assert_eq!(again, h);
        }
    }
}
