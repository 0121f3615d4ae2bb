//! L1/L2 table entries and 16-bit refcounts: pure encoders and decoders.
//!
//! What it owns: the meaning of the bits of one table entry.
//!
//! What it never does: I/O, or checking that a host offset lies inside the
//! file (it does not know the file; callers do that with the decoded offset).
//!
//! Invariants: every host offset a decoder returns is cluster aligned and
//! non-zero; [`encode_l2`] of a decoded standard entry gives back the same
//! offset and kind. Reserved bits are ignored on decode, as QEMU does, and
//! always written as zero.

use super::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::error::{Error, Result};

/// What one L2 entry says about a guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: read from the backing image (or zeros without one).
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster, if any.
    Zero { host: Option<u64> },
    /// Data at `host` (cluster aligned).
    Data { host: u64 },
    /// A compressed cluster; the raw descriptor (its layout depends on the
    /// cluster size, see [`compressed_extent`]).
    Compressed(u64),
}

/// Decodes an L2 entry of an image of the given version and cluster size.
///
/// Misaligned host offsets are `Corrupt`, as are the zero flag on version 2
/// (where the spec says the bit is always 0) and an offset of 0 with the
/// COPIED flag (only meaningful with an external data file, which we refuse).
pub fn decode_l2(raw: u64, version: u32, cluster_size: u64) -> Result<L2Entry> {
    debug_assert!(cluster_size.is_power_of_two());
    if raw & OFLAG_COMPRESSED != 0 {
        return Ok(L2Entry::Compressed(raw));
    }
    let host = raw & L2E_OFFSET_MASK;
    if !host.is_multiple_of(cluster_size) {
        return Err(Error::corrupt(format!(
            "L2 entry {raw:#018x}: host offset {host:#x} is not aligned to the cluster size \
             {cluster_size}"
        )));
    }
    if raw & OFLAG_ZERO != 0 {
        if version < 3 {
            return Err(Error::corrupt(format!(
                "L2 entry {raw:#018x}: zero flag set in a version 2 image"
            )));
        }
        return Ok(L2Entry::Zero {
            host: (host != 0).then_some(host),
        });
    }
    if host == 0 {
        if raw & OFLAG_COPIED != 0 {
            return Err(Error::corrupt(format!(
                "L2 entry {raw:#018x}: data cluster at host offset 0 (the header)"
            )));
        }
        return Ok(L2Entry::Unallocated);
    }
    Ok(L2Entry::Data { host })
}

/// Encodes an L2 entry. Data and preallocated zero clusters get the COPIED
/// flag: the engine never shares a cluster, so every refcount it writes is 1.
pub fn encode_l2(e: &L2Entry) -> u64 {
    match *e {
        L2Entry::Unallocated => 0,
        L2Entry::Zero { host: None } => OFLAG_ZERO,
        L2Entry::Zero { host: Some(h) } => {
            debug_assert_eq!(h & !L2E_OFFSET_MASK, 0);
            h | OFLAG_COPIED | OFLAG_ZERO
        }
        L2Entry::Data { host } => {
            debug_assert!(host != 0 && host & !L2E_OFFSET_MASK == 0);
            host | OFLAG_COPIED
        }
        L2Entry::Compressed(raw) => raw,
    }
}

/// Subclusters per cluster in an image with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// What one extended (128-bit) L2 entry says about a guest cluster: the
/// cluster-level entry, and for a standard cluster the state of each of its
/// 32 subclusters.
///
/// `entry` is `Compressed` for a compressed cluster (no subclusters: the
/// bitmap has no meaning), `Data { host }` whenever the descriptor names a
/// host cluster (whatever the bitmap says: the cluster is referenced), and
/// `Unallocated` otherwise. Only `alloc` says which subclusters hold data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtL2 {
    pub entry: L2Entry,
    /// Bit `i`: subcluster `i` holds data at `host + i * subcluster size`.
    pub alloc: u32,
    /// Bit `i`: subcluster `i` reads as zeros (never set with its `alloc` bit).
    pub zero: u32,
}

/// The state of one subcluster (or a whole cluster of a standard image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubState {
    /// Read from the backing image (or zeros without one).
    Unallocated,
    Zero,
    /// Data at the host cluster plus the subcluster's offset.
    Data,
    /// Part of a compressed cluster (no subclusters).
    Compressed,
}

impl ExtL2 {
    pub const UNALLOCATED: ExtL2 = ExtL2 {
        entry: L2Entry::Unallocated,
        alloc: 0,
        zero: 0,
    };

    /// The host cluster, if the descriptor names one.
    pub fn host(&self) -> Option<u64> {
        match self.entry {
            L2Entry::Data { host } => Some(host),
            _ => None,
        }
    }

    /// State of subcluster `i` (0..32).
    pub fn state(&self, i: u32) -> SubState {
        debug_assert!(i < SUBCLUSTERS);
        if matches!(self.entry, L2Entry::Compressed(_)) {
            SubState::Compressed
        } else if self.alloc & (1 << i) != 0 {
            SubState::Data
        } else if self.zero & (1 << i) != 0 {
            SubState::Zero
        } else {
            SubState::Unallocated
        }
    }

    /// The end (exclusive) of the run of subclusters from `i` that share
    /// subcluster `i`'s state, at most `SUBCLUSTERS`.
    pub fn run_end(&self, i: u32) -> u32 {
        let s = self.state(i);
        (i + 1..SUBCLUSTERS)
            .find(|&j| self.state(j) != s)
            .unwrap_or(SUBCLUSTERS)
    }
}

/// The bitmask of subclusters `[a, b)` (`a <= b <= 32`).
pub fn sub_mask(a: u32, b: u32) -> u32 {
    debug_assert!(a <= b && b <= SUBCLUSTERS);
    if a == b {
        return 0;
    }
    (u32::MAX >> (SUBCLUSTERS - (b - a))) << a
}

/// Decodes an extended L2 entry: descriptor `raw` and subcluster bitmap.
///
/// Bit 0 of the descriptor is reserved with extended L2 entries (the bitmap
/// says what reads as zeros): ignored, like the other reserved bits.
/// `Corrupt`: a misaligned host offset, a subcluster both allocated and
/// zero, allocated subclusters without a host cluster, or an offset of 0
/// with the COPIED flag.
pub fn decode_l2_ext(raw: u64, bitmap: u64, cluster_size: u64) -> Result<ExtL2> {
    debug_assert!(cluster_size.is_power_of_two());
    if raw & OFLAG_COMPRESSED != 0 {
        // The bitmap of a compressed cluster is reserved: ignored, as QEMU does.
        return Ok(ExtL2 {
            entry: L2Entry::Compressed(raw),
            alloc: 0,
            zero: 0,
        });
    }
    let host = raw & L2E_OFFSET_MASK;
    let bad = |what: &str| {
        Err(Error::corrupt(format!(
            "extended L2 entry {raw:#018x} bitmap {bitmap:#018x}: {what}"
        )))
    };
    if !host.is_multiple_of(cluster_size) {
        return bad(&format!(
            "host offset {host:#x} is not aligned to the cluster size {cluster_size}"
        ));
    }
    let alloc = bitmap as u32;
    let zero = (bitmap >> 32) as u32;
    if alloc & zero != 0 {
        return bad("subclusters both allocated and reading as zeros");
    }
    if host == 0 {
        if raw & OFLAG_COPIED != 0 {
            return bad("data cluster at host offset 0 (the header)");
        }
        if alloc != 0 {
            return bad("allocated subclusters without a host cluster");
        }
        return Ok(ExtL2 {
            entry: L2Entry::Unallocated,
            alloc,
            zero,
        });
    }
    Ok(ExtL2 {
        entry: L2Entry::Data { host },
        alloc,
        zero,
    })
}

/// Encodes an extended L2 entry: `(descriptor, bitmap)`. A host cluster gets
/// the COPIED flag (the engine never shares one).
pub fn encode_l2_ext(e: &ExtL2) -> (u64, u64) {
    debug_assert_eq!(e.alloc & e.zero, 0, "subcluster both allocated and zero");
    match e.entry {
        L2Entry::Compressed(raw) => (raw, 0),
        L2Entry::Data { host } => {
            debug_assert!(host != 0 && host & !L2E_OFFSET_MASK == 0);
            (
                host | OFLAG_COPIED,
                u64::from(e.alloc) | (u64::from(e.zero) << 32),
            )
        }
        L2Entry::Unallocated | L2Entry::Zero { host: None } => {
            debug_assert_eq!(e.alloc, 0, "allocated subclusters without a host");
            (0, u64::from(e.zero) << 32)
        }
        L2Entry::Zero { host: Some(host) } => (host | OFLAG_COPIED, u64::from(e.zero) << 32),
    }
}

/// Decodes entry `idx` of an L2 table held as its on-disk bytes, with
/// 8-byte entries or, when `extended`, 16-byte ones. Returns the entry's
/// descriptor (the first 8 bytes, for its flags) and what it says; a
/// standard entry's subclusters all share the cluster's state.
pub fn decode_l2_at(
    table: &[u8],
    idx: usize,
    version: u32,
    cluster_size: u64,
    extended: bool,
) -> Result<(u64, ExtL2)> {
    let word = |i: usize| u64::from_be_bytes(table[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if extended {
        let raw = word(idx * 2);
        return Ok((raw, decode_l2_ext(raw, word(idx * 2 + 1), cluster_size)?));
    }
    let raw = word(idx);
    let entry = decode_l2(raw, version, cluster_size)?;
    let (alloc, zero) = match entry {
        L2Entry::Data { .. } => (u32::MAX, 0),
        L2Entry::Zero { .. } => (0, u32::MAX),
        L2Entry::Unallocated | L2Entry::Compressed(_) => (0, 0),
    };
    Ok((raw, ExtL2 { entry, alloc, zero }))
}

/// Decodes an L1 entry: the host offset of its L2 table, if any.
pub fn decode_l1(raw: u64, cluster_size: u64) -> Result<Option<u64>> {
    let host = raw & L1E_OFFSET_MASK;
    if !host.is_multiple_of(cluster_size) {
        return Err(Error::corrupt(format!(
            "L1 entry {raw:#018x}: L2 table offset {host:#x} is not aligned to the cluster \
             size {cluster_size}"
        )));
    }
    Ok((host != 0).then_some(host))
}

/// Encodes an L1 entry (with COPIED: our L2 tables always have refcount 1).
pub fn encode_l1(l2: Option<u64>) -> u64 {
    match l2 {
        None => 0,
        Some(h) => {
            debug_assert!(h & !L1E_OFFSET_MASK == 0);
            h | OFLAG_COPIED
        }
    }
}

/// The host byte range a compressed L2 entry covers, as QEMU accounts it
/// for refcounts: `(start rounded down to 512, length in bytes)`.
pub fn compressed_extent(raw: u64, cluster_bits: u32) -> (u64, u64) {
    // The spec: x = 62 - (cluster_bits - 8); bits 0..x-1 are the host
    // offset, bits x..61 the number of additional 512-byte sectors.
    let x = 62 - (cluster_bits - 8);
    let offset = raw & ((1u64 << x) - 1);
    let sectors = ((raw >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset & !511, sectors * 512)
}

/// The width of a refcount block entry: `1 << order` bits, `order` 0 to 6
/// (qcow2.rst, `refcount_order`; QEMU's `refcount_bits` 1 to 64).
///
/// Entries of 8 bits and more are big-endian. Narrower ones are packed
/// into bytes from the least significant bit up: entry `i` of a 1-bit block
/// is bit `i % 8` of byte `i / 8`, as QEMU stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefcountWidth {
    order: u32,
}

impl RefcountWidth {
    /// The 16-bit width every image we create has unless asked otherwise.
    pub const DEFAULT: RefcountWidth = RefcountWidth { order: 4 };

    /// The width of `refcount_order`, or `None` past 64 bits.
    pub fn from_order(order: u32) -> Option<RefcountWidth> {
        (order <= 6).then_some(RefcountWidth { order })
    }

    /// The width of `refcount_bits` (a power of two from 1 to 64).
    pub fn from_bits(bits: u64) -> Option<RefcountWidth> {
        (bits.is_power_of_two() && bits <= 64).then(|| RefcountWidth {
            order: bits.trailing_zeros(),
        })
    }

    pub fn order(self) -> u32 {
        self.order
    }

    pub fn bits(self) -> u64 {
        1 << self.order
    }

    /// The largest refcount an entry holds.
    pub fn max(self) -> u64 {
        u64::MAX >> (64 - self.bits())
    }

    /// Entries in one refcount block of `cluster_size` bytes.
    pub fn per_block(self, cluster_size: u64) -> u64 {
        (cluster_size * 8) >> self.order
    }

    /// The bytes of a block that hold entries `[first, first + n)`: `(start,
    /// len)`. Narrow entries share bytes with their neighbours, so a writer
    /// of a part must read these bytes first (see [`Self::needs_merge`]).
    pub fn byte_span(self, first: u64, n: u64) -> (u64, u64) {
        let start = (first << self.order) / 8;
        let end = ((first + n) << self.order).div_ceil(8);
        (start, end - start)
    }

    /// Whether an entry shares its byte with others.
    pub fn needs_merge(self) -> bool {
        self.order < 3
    }

    /// Reads entry `idx` of a refcount block.
    pub fn get(self, block: &[u8], idx: usize) -> u64 {
        match self.order {
            0..=2 => {
                let bits = 1usize << self.order;
                let per_byte = 8 / bits;
                let shift = (idx % per_byte) * bits;
                u64::from((block[idx / per_byte] >> shift) & ((1u16 << bits) - 1) as u8)
            }
            _ => {
                let w = 1usize << (self.order - 3);
                let mut b = [0u8; 8];
                b[8 - w..].copy_from_slice(&block[idx * w..idx * w + w]);
                u64::from_be_bytes(b)
            }
        }
    }

    /// Writes entry `idx` of a refcount block; `v` must fit (`<= max()`).
    pub fn set(self, block: &mut [u8], idx: usize, v: u64) {
        debug_assert!(
            v <= self.max(),
            "refcount {v} wider than {} bits",
            self.bits()
        );
        match self.order {
            0..=2 => {
                let bits = 1usize << self.order;
                let per_byte = 8 / bits;
                let shift = (idx % per_byte) * bits;
                let mask = (((1u16 << bits) - 1) as u8) << shift;
                let byte = &mut block[idx / per_byte];
                *byte = (*byte & !mask) | (((v as u8) << shift) & mask);
            }
            _ => {
                let w = 1usize << (self.order - 3);
                block[idx * w..idx * w + w].copy_from_slice(&v.to_be_bytes()[8 - w..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const CS: u64 = 65536;

    #[test]
    fn l2_decode_encode() {
        assert_eq!(decode_l2(0, 3, CS).unwrap(), L2Entry::Unallocated);
        assert_eq!(decode_l2(1, 3, CS).unwrap(), L2Entry::Zero { host: None });
        let d = decode_l2(0x5_0000 | OFLAG_COPIED, 3, CS).unwrap();
        assert_eq!(d, L2Entry::Data { host: 0x5_0000 });
        assert_eq!(encode_l2(&d), 0x5_0000 | OFLAG_COPIED);
        // Without COPIED (shared cluster) it is still data.
        assert_eq!(
            decode_l2(0x5_0000, 2, CS).unwrap(),
            L2Entry::Data { host: 0x5_0000 }
        );
        let z = decode_l2(0x7_0000 | 1 | OFLAG_COPIED, 3, CS).unwrap();
        assert_eq!(
            z,
            L2Entry::Zero {
                host: Some(0x7_0000)
            }
        );
        assert_eq!(encode_l2(&z), 0x7_0000 | 1 | OFLAG_COPIED);
        assert_eq!(encode_l2(&L2Entry::Zero { host: None }), 1);
        assert_eq!(encode_l2(&L2Entry::Unallocated), 0);
        let c = OFLAG_COMPRESSED | 0x1234;
        assert_eq!(decode_l2(c, 3, CS).unwrap(), L2Entry::Compressed(c));
        assert_eq!(encode_l2(&L2Entry::Compressed(c)), c);
        // Reserved bits are ignored.
        assert_eq!(
            decode_l2(0x5_0000 | 0x1fe, 3, CS).unwrap(),
            L2Entry::Data { host: 0x5_0000 }
        );
    }

    #[test]
    fn l2_decode_refuses_bad_entries() {
        let k = |r: Result<L2Entry>| r.unwrap_err().kind();
        assert_eq!(k(decode_l2(0x5_0200, 3, CS)), ErrorKind::Corrupt);
        assert_eq!(k(decode_l2(0x5_0200 | 1, 3, CS)), ErrorKind::Corrupt);
        assert_eq!(k(decode_l2(1, 2, CS)), ErrorKind::Corrupt);
        assert_eq!(k(decode_l2(OFLAG_COPIED, 3, CS)), ErrorKind::Corrupt);
        assert!(decode_l2(0x1000, 3, 4096).is_ok());
        assert!(decode_l2(0x1000, 3, CS).is_err());
    }

    #[test]
    fn extended_entries() {
        let k = |r: Result<ExtL2>| r.unwrap_err().kind();
        assert_eq!(decode_l2_ext(0, 0, CS).unwrap(), ExtL2::UNALLOCATED);
        let z = decode_l2_ext(0, 0xffff_ffff << 32, CS).unwrap();
        assert_eq!((z.state(0), z.state(31)), (SubState::Zero, SubState::Zero));
        let d = decode_l2_ext(0x5_0000 | OFLAG_COPIED, 0b101 | (0b10 << 32), CS).unwrap();
        assert_eq!(d.host(), Some(0x5_0000));
        assert_eq!(d.state(0), SubState::Data);
        assert_eq!(d.state(1), SubState::Zero);
        assert_eq!(d.state(2), SubState::Data);
        assert_eq!(d.state(3), SubState::Unallocated);
        assert_eq!((d.run_end(0), d.run_end(3)), (1, 32));
        assert_eq!(
            encode_l2_ext(&d),
            (0x5_0000 | OFLAG_COPIED, 0b101 | (0b10 << 32))
        );
        // A preallocated host with nothing allocated is still referenced.
        assert_eq!(
            decode_l2_ext(0x5_0000, 0, CS).unwrap().host(),
            Some(0x5_0000)
        );
        let c = OFLAG_COMPRESSED | 0x1234;
        let ce = decode_l2_ext(c, 0xdead, CS).unwrap();
        assert_eq!(
            (ce.entry, ce.state(5)),
            (L2Entry::Compressed(c), SubState::Compressed)
        );
        assert_eq!(k(decode_l2_ext(0x5_0200, 0, CS)), ErrorKind::Corrupt);
        assert_eq!(decode_l2_ext(1, 0, CS).unwrap(), ExtL2::UNALLOCATED);
        assert_eq!(
            k(decode_l2_ext(0x5_0000, 1 | (1 << 32), CS)),
            ErrorKind::Corrupt
        );
        assert_eq!(k(decode_l2_ext(0, 1, CS)), ErrorKind::Corrupt);
        assert_eq!(k(decode_l2_ext(OFLAG_COPIED, 0, CS)), ErrorKind::Corrupt);
        assert_eq!(sub_mask(0, 32), u32::MAX);
        assert_eq!(sub_mask(3, 5), 0b11000);
        assert_eq!(sub_mask(4, 4), 0);
    }

    #[test]
    fn l1_decode_encode() {
        assert_eq!(decode_l1(0, CS).unwrap(), None);
        assert_eq!(
            decode_l1(0x4_0000 | OFLAG_COPIED, CS).unwrap(),
            Some(0x4_0000)
        );
        assert_eq!(encode_l1(Some(0x4_0000)), 0x4_0000 | OFLAG_COPIED);
        assert_eq!(encode_l1(None), 0);
        assert_eq!(
            decode_l1(0x4_1000, CS).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn refcounts_are_big_endian() {
        let mut b = vec![0u8; 8];
        let w = RefcountWidth::DEFAULT;
        w.set(&mut b, 1, 0x0102);
        assert_eq!(b, [0, 0, 1, 2, 0, 0, 0, 0]);
        assert_eq!(w.get(&b, 1), 0x0102);
        assert_eq!(w.get(&b, 0), 0);
    }

    #[test]
    fn refcount_widths_pack_like_qemu() {
        // Sub-byte entries fill each byte from its least significant bit.
        let mut b = vec![0u8; 2];
        let one = RefcountWidth::from_bits(1).unwrap();
        one.set(&mut b, 0, 1);
        one.set(&mut b, 9, 1);
        assert_eq!(b, [0b0000_0001, 0b0000_0010]);
        let mut b = vec![0u8; 1];
        let two = RefcountWidth::from_bits(2).unwrap();
        two.set(&mut b, 1, 3);
        two.set(&mut b, 3, 1);
        assert_eq!(b, [0b0100_1100]);
        assert_eq!((two.get(&b, 0), two.get(&b, 1), two.get(&b, 3)), (0, 3, 1));
        let four = RefcountWidth::from_bits(4).unwrap();
        let mut b = vec![0u8; 1];
        four.set(&mut b, 1, 0xa);
        assert_eq!(b, [0xa0]);
        // Wide entries are big-endian.
        let mut b = vec![0u8; 16];
        RefcountWidth::from_bits(64)
            .unwrap()
            .set(&mut b, 1, 0x0102_0304_0506_0708);
        assert_eq!(&b[8..], [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut b = vec![0u8; 8];
        RefcountWidth::from_bits(32).unwrap().set(&mut b, 1, 7);
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 7]);
    }

    #[test]
    fn refcount_width_limits_and_spans() {
        for bits in [1u64, 2, 4, 8, 16, 32, 64] {
            let w = RefcountWidth::from_bits(bits).unwrap();
            assert_eq!(w.bits(), bits);
            assert_eq!(w.per_block(65536), 65536 * 8 / bits);
            let mut b = vec![0u8; 64];
            for i in 0..(512 / bits as usize) {
                w.set(&mut b, i, w.max() - (i as u64 % 2));
            }
            for i in 0..(512 / bits as usize) {
                assert_eq!(
                    w.get(&b, i),
                    w.max() - (i as u64 % 2),
                    "{bits} bits, entry {i}"
                );
            }
        }
        assert_eq!(RefcountWidth::from_bits(3), None);
        assert_eq!(RefcountWidth::from_bits(128), None);
        assert_eq!(RefcountWidth::from_order(7), None);
        assert_eq!(
            RefcountWidth::from_bits(1).unwrap().byte_span(3, 10),
            (0, 2)
        );
        assert_eq!(
            RefcountWidth::from_bits(16).unwrap().byte_span(3, 2),
            (6, 4)
        );
        assert_eq!(RefcountWidth::from_bits(4).unwrap().byte_span(3, 1), (1, 1));
    }

    #[test]
    fn compressed_extent_layout() {
        // 64 KiB clusters: x = 54; 2 additional sectors.
        let raw = OFLAG_COMPRESSED | (2u64 << 54) | 0x12345;
        assert_eq!(compressed_extent(raw, 16), (0x12200, 3 * 512));
    }
}
