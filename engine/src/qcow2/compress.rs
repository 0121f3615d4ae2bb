//! Compressed clusters: where their bytes lie, and how they decompress.
//!
//! What it owns: the meaning of a compressed L2 descriptor (host byte range
//! of the compressed data, and the host clusters it is counted against), and
//! the two codecs qcow2 knows: zlib (`compression_type` 0, a raw deflate
//! stream without a zlib header, as QEMU writes it with window bits -12) and
//! zstd (`compression_type` 1: QEMU writes one frame per cluster; decoded
//! by libzstd's streaming decoder with QEMU's loop, so the same bytes
//! decode or fail as they do in QEMU).
//!
//! What it never does: I/O. The caller reads the host range named by
//! [`compressed_data`] and hands the bytes to [`decompress`].
//!
//! Invariants: [`decompress`] writes exactly the output slice it is given
//! (one cluster) or fails; it never allocates in proportion to what the
//! input claims beyond a fixed bound ([`MAX_ZSTD_WINDOW_BYTES`]), never
//! loops longer than the input allows, and never panics on hostile input:
//! malformed data is `Corrupt`, like QEMU's -EIO for the same request.

use crate::error::{Error, Result};

/// The compression algorithm of an image (header field `compression_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), no zlib header.
    Zlib,
    /// One zstd frame (RFC 8878).
    Zstd,
}

impl CompressionType {
    /// The type a validated header's `compression_type` byte names.
    pub fn from_header(t: u8) -> Result<CompressionType> {
        match t {
            0 => Ok(CompressionType::Zlib),
            1 => Ok(CompressionType::Zstd),
            t => Err(Error::unsupported(format!("unknown compression type {t}"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Largest zstd window a frame may declare. QEMU compresses one cluster (at
/// most 2 MiB) per frame, so its frames have windows of at most 2 MiB; the
/// decoder reserves the declared window up front, so a hostile frame must
/// not choose it.
pub const MAX_ZSTD_WINDOW_BYTES: u64 = 8 << 20;

/// The host bytes holding a compressed cluster's data: `(offset, len)`.
///
/// qcow2.rst: with `x = 62 - (cluster_bits - 8)`, bits `0..x` are the host
/// offset (any byte) and bits `x..62` the number of 512-byte sectors after
/// the first one. The data runs to the end of the last sector, so `len` is
/// the sectors' bytes minus the offset into the first; it is at most twice
/// the cluster size, whatever the descriptor says. The compressed stream
/// may end before `len` (the last sector is padding).
pub fn compressed_data(raw: u64, cluster_bits: u32) -> (u64, u64) {
    debug_assert!((9..=21).contains(&cluster_bits));
    let x = 62 - (cluster_bits - 8);
    let offset = raw & ((1u64 << x) - 1);
    let sectors = ((raw >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * 512 - (offset & 511))
}

/// The host clusters a compressed cluster is counted against in the
/// refcounts, as QEMU (and `qemu-img check`) count them: every cluster that
/// `[offset rounded down to 512, + sectors * 512)` touches, once.
pub fn compressed_host_clusters(raw: u64, cluster_bits: u32) -> std::ops::Range<u64> {
    let (start, len) = super::entry::compressed_extent(raw, cluster_bits);
    (start >> cluster_bits)..((start + len - 1) >> cluster_bits) + 1
}

/// Decompresses one cluster from `input` (the bytes [`compressed_data`]
/// names; trailing padding is fine) into all of `out`.
///
/// QEMU's rules: the output must be filled exactly (a stream that ends early
/// is an error); zlib input may remain unread (the last sector's padding);
/// the zstd frame in which the output fills must end there (and a frame
/// that ends earlier is followed by the next, as QEMU reads them).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    // The decoders are fuzzed, but a panic in them on hostile bytes must
    // still not take the core down: it is caught and becomes `Corrupt`.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match kind {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => zstd_frame(input, out),
    }));
    match r {
        Ok(r) => r,
        Err(_) => Err(Error::corrupt(format!(
            "{} decoder failed on malformed compressed data",
            kind.name()
        ))),
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    loop {
        let (in_pos, out_pos) = (d.total_in() as usize, d.total_out() as usize);
        if out_pos == out.len() {
            // Full: QEMU accepts both the stream's end and a stream that
            // would go on (its Z_BUF_ERROR case); padding may remain.
            return Ok(());
        }
        let status = d
            .decompress(
                &input[in_pos..],
                &mut out[out_pos..],
                FlushDecompress::Finish,
            )
            .map_err(|e| Error::corrupt(format!("malformed zlib (deflate) data: {e}")))?;
        let progressed = d.total_in() as usize != in_pos || d.total_out() as usize != out_pos;
        if d.total_out() as usize == out.len() {
            continue;
        }
        if status == Status::StreamEnd {
            return Err(Error::corrupt(format!(
                "zlib (deflate) data ends after {} of {} bytes",
                d.total_out(),
                out.len()
            )));
        }
        if !progressed {
            return Err(Error::corrupt(format!(
                "zlib (deflate) data is truncated: {} of {} bytes decoded from {} input bytes",
                d.total_out(),
                out.len(),
                input.len()
            )));
        }
    }
}

thread_local! {
    /// Each thread's zstd decoder, kept: creating one (and its window)
    /// cost a fifth of the decoding of a 64 KiB cluster (`perf` of
    /// `backfill convert` of a zstd image).
    static ZSTD: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_frame(input: &[u8], out: &mut [u8]) -> Result<()> {
    ZSTD.with(|cell| {
        let mut kept = cell.borrow_mut();
        zstd_frame_with(&mut kept, input, out)
    })
}

fn zstd_frame_with(
    kept: &mut Option<zstd::zstd_safe::DCtx<'static>>,
    input: &[u8],
    out: &mut [u8],
) -> Result<()> {
    use zstd::zstd_safe::{get_error_name, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective};
    let bad = |what: String| Error::corrupt(format!("malformed zstd data: {what}"));
    let size = out.len();
    let d = match kept {
        // Whatever the last frame left (an error midway) goes; the window
        // limit stays.
        Some(d) => {
            d.reset(ResetDirective::SessionOnly)
                .map_err(|c| bad(get_error_name(c).to_string()))?;
            d
        }
        None => {
            let mut d = DCtx::create();
            // A frame declaring a larger window is an error before
            // anything is allocated for it.
            d.set_parameter(DParameter::WindowLogMax(MAX_ZSTD_WINDOW_BYTES.ilog2()))
                .map_err(|c| bad(get_error_name(c).to_string()))?;
            kept.insert(d)
        }
    };
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    // QEMU's loop (qcow2_zstd_decompress): decode until the cluster is
    // full, failing a step that makes no progress; the last frame must
    // then be complete and flushed, or it held more than the cluster.
    let mut left = 1;
    while dst.pos() < size {
        let (in_pos, out_pos) = (src.pos(), dst.pos());
        left = d
            .decompress_stream(&mut dst, &mut src)
            .map_err(|c| bad(get_error_name(c).to_string()))?;
        if src.pos() == in_pos && dst.pos() == out_pos {
            return Err(bad(format!(
                "the data ends after {} of {size} bytes",
                dst.pos()
            )));
        }
    }
    if left > 0 {
        return Err(bad(format!(
            "the frame decompresses to more than {size} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::qcow2::OFLAG_COMPRESSED;

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial: runs, a pattern, some noise.
        let mut x = 0x9e37_79b9u32;
        (0..len)
            .map(|i| match (i / 4096) % 3 {
                0 => 0,
                1 => (i % 251) as u8,
                _ => {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                }
            })
            .collect()
    }

    fn deflate_raw(data: &[u8]) -> Vec<u8> {
        use flate2::{Compress, Compression, FlushCompress};
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(data.len() + 1024);
        c.compress_vec(data, &mut out, FlushCompress::Finish)
            .unwrap();
        assert_eq!(c.total_in() as usize, data.len());
        out
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        zstd::bulk::compress(data, 1).unwrap()
    }

    #[test]
    fn descriptor_layout() {
        // 64 KiB clusters: x = 54; offset 0x12345, 2 additional sectors:
        // the data runs from 0x12345 to the end of sector 0x12400..0x12600.
        let raw = OFLAG_COMPRESSED | (2u64 << 54) | 0x12345;
        assert_eq!(compressed_data(raw, 16), (0x12345, 3 * 512 - 0x145));
        assert_eq!(compressed_host_clusters(raw, 16), 1..2);
        // Crossing into the next cluster counts both.
        let raw = OFLAG_COMPRESSED | (1u64 << 54) | 0x1_fe00;
        assert_eq!(compressed_host_clusters(raw, 16), 1..3);
        // 2 MiB clusters: x = 49; the largest length is twice the cluster.
        let raw = OFLAG_COMPRESSED | (0x1fffu64 << 49);
        assert_eq!(compressed_data(raw, 21), (0, 4 << 20));
        // 4 KiB clusters: x = 58.
        let raw = OFLAG_COMPRESSED | (3u64 << 58) | 0x5000;
        assert_eq!(compressed_data(raw, 12), (0x5000, 2048));
        assert_eq!(compressed_host_clusters(raw, 12), 5..6);
    }

    #[test]
    fn round_trips() {
        for cs in [4096usize, 65536, 2 << 20] {
            let data = sample(cs);
            for (kind, mut packed) in [
                (CompressionType::Zlib, deflate_raw(&data)),
                (CompressionType::Zstd, zstd(&data)),
            ] {
                // Padding to the sector, as on disk.
                packed.resize(packed.len().next_multiple_of(512) + 511, 0xa5);
                let mut out = vec![0u8; cs];
                decompress(kind, &packed, &mut out).unwrap();
                assert!(out == data, "{kind:?} {cs}");
            }
        }
    }

    #[test]
    fn malformed_input_is_corrupt() {
        let data = sample(65536);
        let kind = |k, input: &[u8], len: usize| {
            let mut out = vec![0u8; len];
            decompress(k, input, &mut out).unwrap_err().kind()
        };
        for (k, packed) in [
            (CompressionType::Zlib, deflate_raw(&data)),
            (CompressionType::Zstd, zstd(&data)),
        ] {
            // Empty, garbage, truncated, too short or too long for the output.
            assert_eq!(kind(k, &[], 65536), ErrorKind::Corrupt, "{k:?} empty");
            assert_eq!(
                kind(k, &[0xff; 600], 65536),
                ErrorKind::Corrupt,
                "{k:?} garbage"
            );
            assert_eq!(
                kind(k, &packed[..packed.len() / 2], 65536),
                ErrorKind::Corrupt,
                "{k:?} truncated"
            );
            assert_eq!(
                kind(k, &packed, 65536 * 2),
                ErrorKind::Corrupt,
                "{k:?} stream shorter than the output"
            );
            // Every prefix and many bit flips: errors or data, never a panic.
            let mut out = vec![0u8; 65536];
            for cut in (0..packed.len()).step_by(97) {
                let _ = decompress(k, &packed[..cut], &mut out);
            }
            let mut flipped = packed.clone();
            for i in (0..flipped.len()).step_by(13) {
                flipped[i] ^= 1 << (i % 8);
                let _ = decompress(k, &flipped, &mut out);
            }
        }
        // zlib: a stream longer than the output fills it (QEMU accepts
        // that); zstd: a frame longer than the output is an error.
        let packed = deflate_raw(&data);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &packed, &mut out).unwrap();
        assert!(out[..] == data[..4096]);
        assert_eq!(
            kind(CompressionType::Zstd, &zstd(&data), 4096),
            ErrorKind::Corrupt
        );
    }

    /// The thread's kept zstd decoder decodes a good frame right after a
    /// frame that failed midway, and after one too big for the cluster.
    #[test]
    fn kept_zstd_decoder_recovers() {
        let data = sample(65536);
        let packed = zstd(&data);
        let mut out = vec![0u8; 65536];
        for bad in [&packed[..packed.len() / 2], &zstd(&sample(2 * 65536))[..]] {
            assert!(decompress(CompressionType::Zstd, bad, &mut out).is_err());
            decompress(CompressionType::Zstd, &packed, &mut out).unwrap();
            assert!(out == data);
        }
    }

    /// A frame that declares a huge window is refused before anything is
    /// allocated for it; RLE blocks that would expand without end stop at
    /// the cluster.
    #[test]
    fn zstd_bounds() {
        // Magic, descriptor 0 (no single segment, no checksum, no dict),
        // window descriptor: exponent 30 (1 GiB).
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (30 - 10) << 3];
        let mut out = vec![0u8; 65536];
        f.extend_from_slice(&[0x01, 0x00, 0x00]);
        assert_eq!(
            decompress(CompressionType::Zstd, &f, &mut out)
                .unwrap_err()
                .kind(),
            ErrorKind::Corrupt
        );
        // Window 1 MiB, then 1000 RLE blocks of 128 KiB each (not last).
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (20 - 10) << 3];
        for _ in 0..1000 {
            // Block header: last = 0, type 1 (RLE), size 128 KiB.
            let h: u32 = (128 * 1024) << 3 | 1 << 1;
            f.extend_from_slice(&h.to_le_bytes()[..3]);
            f.push(0x42);
        }
        let e = decompress(CompressionType::Zstd, &f, &mut out).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("more than"), "{e}");
    }
}
