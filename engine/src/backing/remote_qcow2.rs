//! qcow2 images read through a remote medium: a cloud image on an HTTP
//! server (`qemu-img create -b https://.../image.qcow2 -F qcow2`), or a
//! qcow2 file exported as is by an NBD server.
//!
//! What it owns: reading such an image's metadata at open, on the opening
//! thread (which may wait): its header, its L1 table and every L2 table the
//! L1 table names, all requests in flight at once. The chain then looks
//! clusters up in memory, so a core never waits for a table; data clusters
//! are remote reads at their host offsets, compressed ones are fetched and
//! inflated by the core (see `reactor::cor`).
//!
//! What it never does: ask the medium which of its bytes are zeros (a
//! qcow2 file's holes are not the guest's zeros: its L2 tables say which
//! clusters read as zeros), or follow a backing file named inside the
//! remote image (refused: such chains are rare, and their names would be
//! relative to a URL).
//!
//! Invariants: every L2 table the L1 table names is loaded and lies inside
//! the medium, or the open fails; memory for tables is bounded by
//! [`MAX_REMOTE_TABLE_BYTES`].

use std::collections::HashMap;
use std::sync::Arc;

use super::be_u64s;
use super::remote::{read_blocking, Medium};
use crate::error::{Error, Result};
use crate::qcow2::{decode_l1, Header};

/// Bytes of L2 tables a remote qcow2 layer loads at open at most (a
/// fully allocated 4 TiB image with 64 KiB clusters; a cloud image needs a
/// few hundred KiB).
pub const MAX_REMOTE_TABLE_BYTES: u64 = 512 << 20;

/// The metadata of a remote qcow2 layer, read whole at open.
pub(super) struct RemoteTables {
    pub(super) medium: Arc<dyn Medium>,
    /// L2 tables by their host offset, decoded.
    pub(super) tables: HashMap<u64, Box<[u64]>>,
}

/// Reads the header, L1 table and L2 tables of the qcow2 image `medium`
/// serves (named `name` in messages).
pub(super) fn open(
    medium: Arc<dyn Medium>,
    name: &str,
) -> Result<(Header, Vec<u64>, RemoteTables)> {
    let size = medium.size();
    let context = |e: Error| e.context(format!("reading the qcow2 image {name}"));
    // The header lies in the first cluster; most images' clusters are 64 KiB.
    let first = size.min(64 << 10) as usize;
    let mut buf = read_blocking(&*medium, &[(0, first)])
        .map_err(context)?
        .remove(0);
    if buf.len() >= 24 {
        let bits = u32::from_be_bytes(buf[20..24].try_into().expect("4 bytes"));
        if (17..=crate::qcow2::MAX_CLUSTER_BITS).contains(&bits) {
            let want = (1u64 << bits).min(size) as usize;
            buf = read_blocking(&*medium, &[(0, want)])
                .map_err(context)?
                .remove(0);
        }
    }
    let header = Header::parse(&buf, size, name)?;
    if let Some(b) = &header.backing_file {
        return Err(Error::unsupported(format!(
            "qcow2 image {name} names a backing file of its own ({b:?}): a remote qcow2 image \
             must be standalone (e.g. made with qemu-img convert)"
        )));
    }
    let l1_bytes = header.l1_size as usize * 8;
    let raw = read_blocking(&*medium, &[(header.l1_table_offset, l1_bytes)]).map_err(context)?;
    let l1: Vec<u64> = be_u64s(&raw[0]).collect();
    let cs = header.cluster_size();
    let mut offsets = Vec::new();
    for (i, &raw) in l1.iter().enumerate() {
        let l2 = decode_l1(raw, cs).map_err(|e| {
            Error::corrupt(format!("qcow2 image {name}: L1 entry {i}: {}", e.message()))
        })?;
        let Some(l2) = l2 else { continue };
        if l2 < cs || l2.checked_add(cs).is_none_or(|e| e > size) {
            return Err(Error::corrupt(format!(
                "qcow2 image {name}: the L2 table at offset {l2:#x} (L1 entry {i}) lies in the \
                 header or past the end of the image ({size} bytes)"
            )));
        }
        offsets.push(l2);
    }
    offsets.sort_unstable();
    offsets.dedup();
    let table_bytes = offsets.len() as u64 * cs;
    if table_bytes > MAX_REMOTE_TABLE_BYTES {
        return Err(Error::unsupported(format!(
            "qcow2 image {name}: its L2 tables take {} MiB, more than the {} MiB backfill \
             loads from a remote image",
            table_bytes >> 20,
            MAX_REMOTE_TABLE_BYTES >> 20
        )));
    }
    let ranges: Vec<(u64, usize)> = offsets.iter().map(|&o| (o, cs as usize)).collect();
    let raw = read_blocking(&*medium, &ranges).map_err(context)?;
    let tables = offsets
        .into_iter()
        .zip(raw)
        .map(|(o, t)| (o, be_u64s(&t).collect()))
        .collect();
    Ok((header, l1, RemoteTables { medium, tables }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::remote::RemoteRead;
    use crate::qcow2::testutil::{qemu_create as create, tool_available};

    /// An image in memory as a medium that answers at once, with reads
    /// split small and aligned (to exercise [`read_blocking`]); bytes past
    /// `data` up to `size` read as zeros.
    struct Memory {
        data: Vec<u8>,
        size: u64,
    }

    impl Medium for Memory {
        fn name(&self) -> &str {
            "memory"
        }
        fn size(&self) -> u64 {
            self.size
        }
        fn max_read(&self) -> usize {
            4096
        }
        fn alignment(&self) -> usize {
            512
        }
        fn submit(&self, read: RemoteRead) {
            assert!(read.offset.is_multiple_of(512) && read.len <= 4096);
            assert!(read.offset + read.len as u64 <= self.size);
            let mut out = vec![0u8; read.len];
            let lo = (read.offset as usize).min(self.data.len());
            let hi = (read.offset as usize + read.len).min(self.data.len());
            out[..hi - lo].copy_from_slice(&self.data[lo..hi]);
            read.complete(Ok(out));
        }
    }

    fn opened(data: Vec<u8>, size: u64) -> Result<(Header, Vec<u64>, RemoteTables)> {
        open(Arc::new(Memory { data, size }), "memory")
    }

    /// `qemu-img create -f qcow2 -o OPTS` of `size` in a new directory.
    fn qemu_create(opts: &str, size: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        create(&p, opts, size);
        (dir, p)
    }

    /// An image made by `qemu-img` with some data, as bytes.
    fn qemu_image(opts: &str) -> Vec<u8> {
        let (_dir, p) = qemu_create(opts, "2G");
        crate::qcow2::testutil::qemu_io(
            &p,
            "qcow2",
            &["write -P 7 0 64k", "write -P 9 1G 4k", "write -z 1536M 1M"],
        );
        std::fs::read(&p).unwrap()
    }

    #[test]
    fn reads_what_the_local_chain_reads() {
        if !tool_available("qemu-img") {
            return;
        }
        for opts in ["cluster_size=65536", "cluster_size=16384,extended_l2=on"] {
            let bytes = qemu_image(opts);
            let size = bytes.len() as u64;
            let (h, l1, t) = opened(bytes.clone(), size).unwrap();
            assert_eq!(h.size, 2 << 30);
            assert_eq!(l1.len(), h.l1_size as usize);
            // Every L2 table the L1 table names, as the file holds it.
            let cs = h.cluster_size();
            let named: Vec<u64> = l1
                .iter()
                .filter(|&&e| e != 0)
                .map(|e| e & !(1 << 63))
                .collect();
            assert_eq!(t.tables.len(), named.len(), "{opts}");
            for off in named {
                let want: Vec<u64> = bytes[off as usize..(off + cs) as usize]
                    .chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                    .collect();
                assert_eq!(&*t.tables[&off], &want[..], "{opts}: table at {off:#x}");
            }
        }
    }

    #[test]
    fn hostile_images_are_errors_not_panics() {
        if !tool_available("qemu-img") {
            return;
        }
        let good = qemu_image("cluster_size=65536");
        let size = good.len() as u64;
        // Truncated media, and bytes flipped in the header and L1 table.
        for cut in [0, 7, 71, 104, 4096, 65536, 65536 + 8] {
            let _ = opened(good[..cut].to_vec(), cut as u64);
        }
        let l1 = u64::from_be_bytes(good[40..48].try_into().unwrap()) as usize;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = good.clone();
            let at = if x & 1 == 0 {
                (x >> 8) as usize % 112
            } else {
                l1 + (x >> 8) as usize % 64
            };
            b[at] ^= (x >> 32) as u8 | 1;
            let _ = opened(b, size);
        }
    }

    #[test]
    fn tables_beyond_the_budget_are_refused() {
        if !tool_available("qemu-img") {
            return;
        }
        // 2 MiB clusters: 257 L2 tables take more than 512 MiB.
        let (_dir, p) = qemu_create("cluster_size=2M", "200T");
        let mut bytes = std::fs::read(&p).unwrap();
        let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
        let cs = 2u64 << 20;
        for k in 0..257u64 {
            let e = (cs * (k + 8)) | 1 << 63;
            bytes[l1 + 8 * k as usize..l1 + 8 * k as usize + 8].copy_from_slice(&e.to_be_bytes());
        }
        let e = match opened(bytes, cs * 300) {
            Ok(_) => panic!("257 tables of 2 MiB loaded"),
            Err(e) => e,
        };
        assert!(e.message().contains("its L2 tables take 514 MiB"), "{e}");
    }
}
