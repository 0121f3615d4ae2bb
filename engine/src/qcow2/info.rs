//! Image information: what `qemu-img info` says, plus how much of the
//! virtual disk the overlay holds, the backing chain holds, and nobody holds.
//!
//! What it owns: a read-only walk of the overlay's L1/L2 tables and, for the
//! clusters the overlay does not hold, a lookup through the backing chain
//! (whose NBD servers, or the file system under a raw backing file, are
//! first asked which of it reads as zeros, for two seconds at most, to
//! tell what a stream need not fetch).
//!
//! What it never does: write, or read guest data.
//!
//! Invariants: `overlay_data_bytes + overlay_zero_bytes + backing_bytes +
//! unallocated_bytes == virtual_size`; the last, partial cluster counts only
//! up to the virtual size. Memory is bounded: one L2 table of the overlay at
//! a time and a fixed budget for backing L2 tables.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use super::entry::{decode_l1, decode_l2_at, SubState, SUBCLUSTERS};
use super::header::{read_exact_at, Header};
use crate::backing::{Chain, ChainCache, Source};
use crate::error::{Error, Result};

/// Budget for backing L2 tables while counting backing bytes.
const INFO_CACHE_BYTES: u64 = 32 << 20;
/// Largest range handed to one `Chain::resolve`, to bound its output.
const RESOLVE_CHUNK_BYTES: u64 = 1 << 30;
/// Bytes of the chain one question about zeros covers (a block status
/// query of a remote layer, a `SEEK_DATA` walk of a raw file).
const LEARN_BYTES: u64 = 1 << 30;
/// How long `info` asks the chain about its zeros at most.
const LEARN_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

/// The version of a remote (HTTP) backing image the overlay's data came
/// from, as the overlay records it (see `qcow2::pin`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RemotePinInfo {
    /// The backing name (URL) it belongs to.
    pub filename: String,
    /// `ETag "..."` or `Last-Modified "..."`.
    pub validator: String,
    pub virtual_size: u64,
}

/// One layer of the backing chain.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackingInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub filename: String,
    /// Always "qcow2".
    pub format: String,
    pub virtual_size: u64,
    /// Bytes the file occupies on disk (st_blocks * 512).
    pub disk_size: u64,
    pub cluster_size: u64,
    /// "1.1" (version 3) or "0.10" (version 2).
    pub compat: String,
    /// Width of a refcount entry (1 to 64).
    pub refcount_bits: u64,
    /// Internal snapshots (such an image opens read-only only).
    pub internal_snapshots: u32,
    pub dirty: bool,
    pub corrupt: bool,
    /// L2 entries with subcluster bitmaps (`extended_l2=on`).
    pub extended_l2: bool,
    /// The backing file and its format as the header names them (like
    /// `qemu-img info`'s), whether or not the chain could be opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_format: Option<String>,
    /// The backing chain, nearest first (empty when it could not be
    /// opened, see `backing_error`).
    pub backing_chain: Vec<BackingInfo>,
    /// Why the backing chain could not be opened (a server that is down, a
    /// file that is gone): the overlay is described all the same, as
    /// `qemu-img info` does, and where its bytes live is known only as far
    /// as the overlay holds them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_error: Option<String>,
    /// The remote image version the overlay is pinned to, if any.
    pub remote_pin: Option<RemotePinInfo>,
    /// Why the pin could not be read (a malformed or doubled extension:
    /// no open accepts the image until `backfill check --repair`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_pin_error: Option<String>,
    /// Virtual bytes the overlay holds as data.
    pub overlay_data_bytes: u64,
    /// Virtual bytes the overlay records as zeros.
    pub overlay_zero_bytes: u64,
    /// Virtual bytes not in the overlay but held as data by a backing layer
    /// (with `backing_error`: every byte not in the overlay, as the chain
    /// could not say which of them it holds).
    pub backing_bytes: u64,
    /// Of `backing_bytes`, those the raw image at the bottom of the chain
    /// reads as zeros without holding them: what its NBD server says (block
    /// status), or the holes of a local file. A stream records them as
    /// zero clusters without fetching them.
    pub backing_zero_bytes: u64,
    /// Of `backing_bytes`, what a stream reads from the backing chain's
    /// files or media to get the rest: `backing_bytes` less
    /// `backing_zero_bytes`, with each compressed cluster counted as its
    /// compressed bytes (a compressed qcow2 image, e.g. a cloud image on
    /// a web server). An estimate where a compressed cluster is only
    /// partly missing from the overlay (it counts once per missing piece).
    pub backing_fetch_bytes: u64,
    /// Why an NBD backing server could not say which of it reads as zeros
    /// (no block status offered, or the query failed): a stream then
    /// fetches every byte the backing holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_zeros_unknown: Option<String>,
    /// Virtual bytes held nowhere (or as zero clusters in a backing layer):
    /// they read as zeros. 0 with `backing_error`.
    pub unallocated_bytes: u64,
}

/// Asks the raw image at the bottom of `c` which of it reads as zeros (an
/// NBD server's block status, a local file's holes: `Chain::learn_zeros`),
/// a GiB at a time from its start, for [`LEARN_BUDGET`] at most, so that
/// the walk can tell how much of what the backing holds a stream need not
/// fetch (`backing_zero_bytes`). Over a slow link, the rest of a large
/// image counts as data.
fn learn_zeros(c: &Chain) {
    let started = std::time::Instant::now();
    // Nothing below the first layer shows past its end.
    let size = c.size();
    let mut pos = 0;
    while pos < size && started.elapsed() < LEARN_BUDGET {
        c.learn_zeros(pos, LEARN_BYTES.min(size - pos));
        pos += LEARN_BYTES;
    }
}

/// Describes the qcow2 image at `path` and its backing chain.
pub fn info(path: impl AsRef<Path>) -> Result<ImageInfo> {
    let path = path.as_ref();
    let path_s = path.display().to_string();
    let file = File::open(path).map_err(|e| Error::io(e, format!("opening {path_s}")))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(e, format!("stat {path_s}")))?;
    let h = Header::read_from(&file, &path_s)?;
    // A malformed pin is reported, not fatal: this is where a user looks
    // to find out what is wrong with the image.
    let (remote_pin, remote_pin_error) = match super::pin::stored_pin(&h, &path_s) {
        Ok(p) => (
            p.map(|p| RemotePinInfo {
                filename: p.name,
                validator: p.validator.to_string(),
                virtual_size: p.size,
            }),
            None,
        ),
        Err(e) => (None, Some(e.message().to_string())),
    };
    // An unreachable or missing backing image is reported, not fatal: the
    // user may be here to find out which one the header names.
    let (chain, backing_error) = match &h.backing_file {
        Some(b) => match Chain::open(path, b, h.backing_format.as_deref()) {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(e.to_string())),
        },
        None => (None, None),
    };
    let mut info = ImageInfo {
        filename: path_s.clone(),
        format: "qcow2".into(),
        virtual_size: h.size,
        disk_size: meta.blocks() * 512,
        cluster_size: h.cluster_size(),
        compat: h.compat_name().into(),
        refcount_bits: h.refcount_width().bits(),
        internal_snapshots: h.nb_snapshots,
        dirty: h.is_dirty(),
        corrupt: h.is_corrupt(),
        extended_l2: h.extended_l2(),
        backing_file: h.backing_file.clone(),
        backing_format: h.backing_format.clone(),
        backing_chain: Vec::new(),
        backing_error,
        remote_pin,
        remote_pin_error,
        overlay_data_bytes: 0,
        overlay_zero_bytes: 0,
        backing_bytes: 0,
        backing_zero_bytes: 0,
        backing_fetch_bytes: 0,
        backing_zeros_unknown: None,
        unallocated_bytes: 0,
    };
    if let Some(c) = &chain {
        learn_zeros(c);
        info.backing_zeros_unknown =
            // Only a raw image's medium could have told (a remote qcow2
            // image's zeros are in its tables).
            (0..c.depth())
                .filter(|&i| c.layer_format(i) == "raw")
                .find_map(|i| c.remote(i).and_then(|m| m.zeros_unknown()));
        info.backing_chain = (0..c.depth())
            .map(|i| BackingInfo {
                filename: c.layer_name(i).to_string(),
                format: c.layer_format(i).to_string(),
                virtual_size: c.layer_size(i),
            })
            .collect();
    }

    let cs = h.cluster_size();
    let file_len =
        crate::io::file_size(&file).map_err(|e| Error::io(e, format!("stat {path_s}")))?;
    let mut cache = ChainCache::new(INFO_CACHE_BYTES);
    let mut segs = Vec::new();
    // Unallocated ranges are gathered into runs so that the chain sees few,
    // long lookups.
    let mut run: Option<(u64, u64)> = None;
    let mut flush = |run: &mut Option<(u64, u64)>, info: &mut ImageInfo| -> Result<()> {
        let Some((start, end)) = run.take() else {
            return Ok(());
        };
        let Some(c) = &chain else {
            if info.backing_error.is_some() {
                info.backing_bytes += end - start;
                info.backing_fetch_bytes += end - start;
            } else {
                info.unallocated_bytes += end - start;
            }
            return Ok(());
        };
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(RESOLVE_CHUNK_BYTES);
            segs.clear();
            c.resolve(&mut cache, pos, n, &mut segs)?;
            for s in &segs {
                match s.source {
                    Source::File { .. } | Source::Remote { .. } => {
                        info.backing_bytes += s.len;
                        info.backing_fetch_bytes += s.len;
                    }
                    Source::Compressed { data_len, .. } => {
                        info.backing_bytes += s.len;
                        info.backing_fetch_bytes += data_len;
                    }
                    // Zeros of the raw layer are what its server or its
                    // file system said (nothing else of a raw layer is a
                    // Zero): the backing still holds them, a stream
                    // fetches nothing there.
                    Source::Zero
                        if s.depth > 0 && c.layer_format(s.depth as usize - 1) == "raw" =>
                    {
                        info.backing_bytes += s.len;
                        info.backing_zero_bytes += s.len;
                    }
                    Source::Zero => info.unallocated_bytes += s.len,
                }
            }
            pos += n;
        }
        Ok(())
    };

    let mut l1 = vec![0u8; h.l1_size as usize * 8];
    read_exact_at(&file, &mut l1, h.l1_table_offset, &path_s)?;
    let l2_span = h.l2_entries() * cs;
    let mut l2 = vec![0u8; cs as usize];
    for (l1_index, chunk) in l1.chunks_exact(8).enumerate() {
        let base = l1_index as u64 * l2_span;
        if base >= h.size {
            break;
        }
        let raw = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
        let l2_offset =
            decode_l1(raw, cs).map_err(|e| e.context(format!("{path_s}: L1 entry {l1_index}")))?;
        let Some(l2_offset) = l2_offset else {
            let end = (base + l2_span).min(h.size);
            run = Some((run.map_or(base, |r| r.0), end));
            continue;
        };
        if l2_offset.checked_add(cs).is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(format!(
                "{path_s}: L2 table at offset {l2_offset:#x} (L1 entry {l1_index}) lies past the \
                 end of the file ({file_len} bytes)"
            )));
        }
        read_exact_at(&file, &mut l2, l2_offset, &path_s)?;
        // With extended L2 entries, each of the 32 subclusters counts on
        // its own; a standard entry is one piece.
        let (pieces, piece_len) = if h.extended_l2() {
            (SUBCLUSTERS, cs / u64::from(SUBCLUSTERS))
        } else {
            (1, cs)
        };
        for i in 0..h.l2_entries() as usize {
            let cluster_start = base + i as u64 * cs;
            if cluster_start >= h.size {
                break;
            }
            let (_, e) = decode_l2_at(&l2, i, h.version, cs, h.extended_l2())
                .map_err(|e| e.context(format!("{path_s}: guest offset {cluster_start:#x}")))?;
            for j in 0..pieces {
                let start = cluster_start + u64::from(j) * piece_len;
                if start >= h.size {
                    break;
                }
                let end = (start + piece_len).min(h.size);
                let state = e.state(j);
                if state == SubState::Unallocated {
                    run = Some((run.map_or(start, |r| r.0), end));
                    continue;
                }
                flush(&mut run, &mut info)?;
                match state {
                    SubState::Zero => info.overlay_zero_bytes += end - start,
                    _ => info.overlay_data_bytes += end - start,
                }
            }
        }
    }
    // Entries past the L1 table cannot exist (the parser checked that the
    // table covers the size), but a short table would be counted here.
    let covered = (h.l1_size as u64 * l2_span).min(h.size);
    if covered < h.size {
        run = Some((run.map_or(covered, |r| r.0), h.size));
    }
    flush(&mut run, &mut info)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::testutil::{qemu_create, qemu_img, qemu_io, tool_available};

    #[test]
    fn counts_overlay_backing_and_holes() {
        if !tool_available("qemu-img") || !tool_available("qemu-io") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Backing: 3 MiB raw, all data.
        std::fs::write(d.join("base.raw"), vec![5u8; 3 << 20]).unwrap();
        let mid = d.join("mid.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            mid.to_str().unwrap(),
            "3M",
        ]);
        // A zero cluster in mid hides 64k of base: neither data nor backing.
        qemu_io(&mid, "qcow2", &["write -z 1M 64k"]);
        let ov = d.join("ov.qcow2");
        // 5M + 1000 bytes (rounded to 512 by qemu-img): a partial last cluster.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            ov.to_str().unwrap(),
            "5243880",
        ]);
        qemu_io(
            &ov,
            "qcow2",
            &["write -P 1 0 128k", "write -z 2M 64k", "write -P 2 5M 512"],
        );
        let i = info(&ov).unwrap();
        let size = 5243904u64;
        assert_eq!(i.virtual_size, size);
        assert_eq!(i.cluster_size, 65536);
        assert_eq!(i.compat, "1.1");
        assert_eq!(i.refcount_bits, 16);
        assert_eq!(i.backing_chain.len(), 2);
        assert_eq!(i.backing_chain[0].format, "qcow2");
        assert_eq!(i.backing_chain[1].format, "raw");
        assert_eq!(i.backing_chain[1].virtual_size, 3 << 20);
        assert_eq!(i.overlay_data_bytes, (128 << 10) + (size - (5 << 20)));
        assert_eq!(i.overlay_zero_bytes, 64 << 10);
        assert_eq!(
            i.backing_bytes,
            (3 << 20) - (128 << 10) - (64 << 10) - (64 << 10)
        );
        assert_eq!(
            i.overlay_data_bytes + i.overlay_zero_bytes + i.backing_bytes + i.unallocated_bytes,
            size
        );
        assert!(i.disk_size > 0);
        assert!(!i.dirty && !i.corrupt);
        serde_json::to_string(&i).unwrap();

        // No backing at all.
        let solo = d.join("solo.qcow2");
        qemu_create(&solo, "compat=0.10", "1G");
        let i = info(&solo).unwrap();
        assert_eq!(i.compat, "0.10");
        assert_eq!(i.unallocated_bytes, 1 << 30);
        assert!(i.backing_chain.is_empty());
    }
}
