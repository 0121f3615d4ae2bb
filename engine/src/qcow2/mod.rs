//! The qcow2 format: header, header extensions, L1/L2 entries, refcounts,
//! image creation, consistency check and image information.
//!
//! What it owns: the on-disk layout as described in `docs/interop/qcow2.rst`
//! of qemu/qemu, and its validation. Everything that decodes bytes from an
//! image treats them as hostile: every offset is checked against the file
//! size and the cluster alignment before anything follows it, and every
//! length is bounded before memory is allocated for it.
//!
//! What it never does: the data path. The codecs here (`header`, `entry`) are
//! pure functions over byte slices; only `create`, `check` and `info` (offline
//! tools) do their own synchronous I/O, with positioned reads and writes.
//!
//! Invariants: host offsets produced by the decoders are cluster aligned;
//! a [`header::Header`] that parsed successfully describes tables that lie
//! inside the file it was parsed against.

pub mod check;
pub mod compress;
pub mod create;
pub mod entry;
pub mod header;
pub mod info;
pub mod pin;
pub mod repair;
pub mod snapshot;
pub mod standalone;

#[cfg(test)]
pub(crate) mod testutil;

pub use compress::{compressed_data, compressed_host_clusters, decompress, CompressionType};
pub use entry::{
    decode_l1, decode_l2, decode_l2_ext, encode_l1, encode_l2, encode_l2_ext, sub_mask, ExtL2,
    L2Entry, RefcountWidth, SubState, SUBCLUSTERS,
};
pub use header::{l1_entries_needed, Extension, Header};

/// "QFI\xfb": the first four bytes of every qcow2 image.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;

/// Host offset bits of an L1 entry (bits 9..=55).
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host offset bits of a standard L2 entry (bits 9..=55).
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Set in L1 and L2 entries whose target has a refcount of exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Set in L2 entries that describe a compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Set in (version 3) L2 entries whose cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits of a refcount table entry (bits 9..=63).
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Smallest cluster size this engine handles (4 KiB). qcow2 allows 512 bytes,
/// but such images are rare and would multiply our metadata traffic.
pub const MIN_CLUSTER_BITS: u32 = 12;
/// Largest cluster size qcow2 allows (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Largest L1 table QEMU accepts (32 MiB); we use the same bound so that any
/// image QEMU opens, we open, and a hostile header cannot make us allocate more.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts (8 MiB), for the same reason.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots QEMU accepts in one image.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME_LEN: u32 = 1023;
