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
