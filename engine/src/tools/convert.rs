//! `backfill convert`: read a whole disk through the engine into a raw file.
//!
//! The disk is read in fixed-size chunks with several requests in flight
//! (by default 8 x 1 MiB), so a slow backing medium is read in parallel. With
//! copy-on-read the overlay is populated on the way, as a side effect; without
//! it the image is opened read-only and never modified.
//!
//! The output stays sparse: it is truncated, sized with `set_len`, and
//! all-zero blocks ([`SPARSE_BLOCK_BYTES`], like `qemu-img convert -S`) are
//! never written, so they stay holes. Chunks complete in
//! any order and are written with positioned writes at their own offset.

use crate::disk::LEARN_ZEROS_BYTES;
use crate::error::{Error, ErrorKind, Result};
use crate::tools::inflight::Queue;
use crate::tools::{is_zero, stats_delta};
use crate::{Disk, Options, Stats};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Default request size: big enough to amortise per-request work, small
/// enough that 8 of them keep a remote backing medium busy.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default number of requests in flight.
pub const DEFAULT_DEPTH: usize = 8;
/// Granularity of zero detection in the output, as `qemu-img convert -S`'s
/// default: an all-zero block this large is left as a hole.
pub const SPARSE_BLOCK_BYTES: usize = 4096;
/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Populate the overlay while reading (else the image is opened read-only).
    pub copy_on_read: bool,
    /// Reactor threads; `None` for the engine's default.
    pub cores: Option<usize>,
    /// Bytes per request.
    pub chunk_bytes: usize,
    /// Requests in flight.
    pub depth: usize,
}

impl Default for ConvertOptions {
    fn default() -> ConvertOptions {
        ConvertOptions {
            copy_on_read: false,
            cores: None,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            depth: DEFAULT_DEPTH,
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// Virtual size of the disk, and length of the output file.
    pub size_bytes: u64,
    /// Bytes actually written to the output (non-zero chunks).
    pub written_bytes: u64,
    /// Time from the first request to the last byte written.
    pub elapsed: Duration,
    /// Engine counters over the run.
    pub stats: Stats,
    /// Why the latest copy-on-read write-back failed, when some did (an
    /// overlay without room, say): the output is whole, but the overlay
    /// did not keep that data.
    pub writeback_error: Option<Error>,
}

impl std::fmt::Display for ConvertReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::tools::units::{format_size, mib_per_sec};
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "Converted {} ({} bytes) in {secs:.3} seconds ({:.1} MiB/s); wrote {} of data, the rest left sparse.",
            format_size(self.size_bytes),
            self.size_bytes,
            mib_per_sec(self.size_bytes, secs),
            format_size(self.written_bytes),
        )?;
        write!(
            f,
            "Copy-on-read: {} clusters filled with data, {} with zeros; {} fetched from backing.",
            self.stats.cor_fills,
            self.stats.cor_zero_fills,
            format_size(self.stats.bytes_fetched),
        )?;
        if self.stats.writeback_errors > 0 {
            let why = self
                .writeback_error
                .as_ref()
                .map_or_else(|| "no reason recorded".to_string(), |e| e.to_string());
            write!(
                f,
                "\nCopy-on-read could not write {} fills into the overlay ({why}): that data is \
                 still read from the backing image.",
                self.stats.writeback_errors
            )?;
        }
        Ok(())
    }
}

/// Reads all of `source` through the engine and writes it to `dest` as raw.
pub fn convert(source: &Path, dest: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    if opts.chunk_bytes == 0 || opts.depth == 0 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "convert needs a non-zero chunk size and depth",
        ));
    }
    let mut disk_opts = Options {
        copy_on_read: opts.copy_on_read,
        read_only: !opts.copy_on_read,
        ..Options::default()
    };
    if let Some(cores) = opts.cores {
        disk_opts.cores = cores;
    }
    let disk = Disk::open(source, disk_opts)
        .map_err(|e| e.context(format_args!("opening {}", source.display())))?;
    let result = copy_out(&disk, dest, opts);
    // Close even after a failed copy: it flushes what copy-on-read did and
    // stops the reactors. The copy's error is the one worth reporting.
    let closed = disk
        .close()
        .map_err(|e| e.context(format_args!("closing {}", source.display())));
    let report = result?;
    closed?;
    Ok(report)
}

fn copy_out(disk: &Disk, dest: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    let out_err =
        |e: std::io::Error, what: &str| Error::io(e, format_args!("{what} {}", dest.display()));
    // Truncate first: a hole must read as zeros, not as an older file's data.
    let out = File::create(dest).map_err(|e| out_err(e, "creating"))?;
    let size = disk.size();
    out.set_len(size).map_err(|e| out_err(e, "sizing"))?;

    let before = disk.stats();
    let start = Instant::now();
    let mut queue = Queue::new(disk, opts.depth);
    let mut next_offset = 0u64;
    let mut written = 0u64;
    let chunk = opts.chunk_bytes as u64;
    // Where the backing was asked up to which of it reads as zeros (an NBD
    // server's block status, a raw file's holes): reads of those fetch
    // nothing, and their chunks stay holes in the output.
    let mut learned = 0u64;
    let mut learn_ahead = |end: u64| {
        while learned < end {
            disk.learn_backing_zeros(learned, LEARN_ZEROS_BYTES);
            learned = (learned + LEARN_ZEROS_BYTES).min(size);
        }
    };
    // Prime every slot (fewer if the disk is small); each buffer is then
    // recycled for the slot's next chunk.
    for slot in 0..opts.depth {
        if next_offset >= size {
            break;
        }
        let len = chunk.min(size - next_offset) as usize;
        learn_ahead(next_offset + len as u64);
        let mut buf = Vec::with_capacity(opts.chunk_bytes);
        buf.resize(len, 0);
        queue.submit_read(slot, next_offset, buf);
        next_offset += len as u64;
    }
    while let Some(done) = queue.next_done() {
        let mut buf = match done.result {
            Ok(buf) => buf,
            Err(e) => {
                queue.drain();
                return Err(e.context(format_args!("reading at offset {}", done.offset)));
            }
        };
        match write_sparse(&out, &buf, done.offset) {
            Ok(bytes) => written += bytes,
            Err(e) => {
                queue.drain();
                return Err(out_err(e, "writing"));
            }
        }
        if next_offset < size {
            let len = chunk.min(size - next_offset) as usize;
            learn_ahead(next_offset + len as u64);
            // Within capacity: no allocation.
            buf.resize(len, 0);
            queue.submit_read(done.slot, next_offset, buf);
            next_offset += len as u64;
        }
    }
    out.sync_all().map_err(|e| out_err(e, "syncing"))?;
    if opts.copy_on_read {
        // Write-backs finish behind the reads: wait for them, so the
        // counters (and the time) include the whole copy-on-read.
        disk.flush().map_err(|e| e.context("flushing"))?;
    }
    let stats = stats_delta(&before, &disk.stats());
    Ok(ConvertReport {
        size_bytes: size,
        written_bytes: written,
        elapsed: start.elapsed(),
        stats,
        writeback_error: (stats.writeback_errors > 0)
            .then(|| disk.last_writeback_error())
            .flatten(),
    })
}

/// Writes the non-zero [`SPARSE_BLOCK_BYTES`] blocks of `buf` at `offset`,
/// one write per run of consecutive non-zero blocks. Returns bytes written.
fn write_sparse(out: &File, buf: &[u8], offset: u64) -> std::io::Result<u64> {
    let mut written = 0;
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    while pos < buf.len() {
        let end = (pos + SPARSE_BLOCK_BYTES).min(buf.len());
        let zero = is_zero(&buf[pos..end]);
        match (run_start, zero) {
            (None, false) => run_start = Some(pos),
            (Some(start), true) => {
                out.write_all_at(&buf[start..pos], offset + start as u64)?;
                written += (pos - start) as u64;
                run_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(start) = run_start {
        out.write_all_at(&buf[start..], offset + start as u64)?;
        written += (buf.len() - start) as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_zero_blocks_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.raw");
        let out = File::create(&path).unwrap();
        let block = SPARSE_BLOCK_BYTES;
        // Blocks: data, zero, zero, data, data, and a short data tail.
        let mut buf = vec![0u8; 5 * block + 100];
        buf[10] = 1;
        buf[3 * block] = 2;
        buf[5 * block - 1] = 3;
        buf[5 * block + 99] = 4;
        // Pre-fill so an unwritten block shows as 0xee, not as a hole.
        out.write_all_at(&vec![0xee; buf.len() + 4096], 0).unwrap();
        let written = write_sparse(&out, &buf, 4096).unwrap();
        assert_eq!(written, (3 * block + 100) as u64);
        let back = std::fs::read(&path).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0xee));
        let back = &back[4096..];
        assert_eq!(back[..block], buf[..block]);
        assert!(
            back[block..3 * block].iter().all(|&b| b == 0xee),
            "zero blocks skipped"
        );
        assert_eq!(back[3 * block..], buf[3 * block..]);
        assert_eq!(write_sparse(&out, &vec![0u8; 3 * block], 0).unwrap(), 0);
        assert_eq!(write_sparse(&out, &[], 0).unwrap(), 0);
    }
}
