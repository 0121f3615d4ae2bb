//! Library side of the CLI tools: create options, info rendering, convert,
//! bench and the demo.
//!
//! The `backfill` binary is a thin shell: it parses arguments, calls into
//! this module and prints what comes back. Everything here goes through the
//! public engine API ([`crate::Disk`], [`crate::create`], [`crate::info`],
//! [`crate::check`]) and never reaches into the engine's internals, so the
//! tools double as examples of how to embed the crate.
//!
//! Nothing here allocates per request on a hot path: the request loops in
//! [`bench`], [`convert`] and [`demo`] recycle a fixed set of buffers through
//! one [`inflight::Queue`].

pub mod bench;
pub mod convert;
pub mod create;
pub mod demo;
pub mod inflight;
pub mod info;
pub mod serve;
pub mod stream;
pub mod units;

pub use crate::io::is_zero;
use crate::Stats;

/// Makes a write past `RLIMIT_FSIZE` (`ulimit -f`, systemd's `LimitFSIZE=`)
/// fail with EFBIG, as a write to a full disk fails with ENOSPC, instead of
/// raising SIGXFSZ, whose default action kills the process: a server would
/// drop every client, and a stream or convert would die without its error
/// or its clean close. PostgreSQL does the same. For the whole process; the
/// `backfill` command calls it first thing.
pub fn ignore_sigxfsz() -> crate::Result<()> {
    // SAFETY: SIG_IGN installs no handler code; nothing here relies on the
    // previous disposition.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(crate::Error::io(
            std::io::Error::last_os_error(),
            "ignoring SIGXFSZ",
        ));
    }
    Ok(())
}

/// The change of the engine's counters between two [`Stats`] snapshots.
///
/// Counters are monotonic, so the delta of each is `after - before`
/// (saturating, in case a counter was reset by a reopen). `in_flight` and
/// `writebacks_held_bytes` are gauges, not counters: the delta keeps their
/// `after` values, and so do the largest remote latency and the most
/// write-backs held (maxima since open).
pub fn stats_delta(before: &Stats, after: &Stats) -> Stats {
    Stats {
        cor_fills: after.cor_fills.saturating_sub(before.cor_fills),
        cor_zero_fills: after.cor_zero_fills.saturating_sub(before.cor_zero_fills),
        bytes_fetched: after.bytes_fetched.saturating_sub(before.bytes_fetched),
        overlay_hits: after.overlay_hits.saturating_sub(before.overlay_hits),
        dedup_hits: after.dedup_hits.saturating_sub(before.dedup_hits),
        misses: after.misses.saturating_sub(before.misses),
        bytes_read: after.bytes_read.saturating_sub(before.bytes_read),
        bytes_written: after.bytes_written.saturating_sub(before.bytes_written),
        writeback_errors: after
            .writeback_errors
            .saturating_sub(before.writeback_errors),
        commits: after.commits.saturating_sub(before.commits),
        remote_reads: after.remote_reads.saturating_sub(before.remote_reads),
        remote_bytes: after.remote_bytes.saturating_sub(before.remote_bytes),
        remote_errors: after.remote_errors.saturating_sub(before.remote_errors),
        remote_latency_us: after
            .remote_latency_us
            .saturating_sub(before.remote_latency_us),
        remote_latency_max_us: after.remote_latency_max_us,
        readahead_bytes: after.readahead_bytes.saturating_sub(before.readahead_bytes),
        readahead_hits: after.readahead_hits.saturating_sub(before.readahead_hits),
        in_flight: after.in_flight,
        writebacks_held_bytes: after.writebacks_held_bytes,
        writebacks_held_peak_bytes: after.writebacks_held_peak_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_sees_every_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4096]));
        for len in [1usize, 15, 16, 17, 100, 255, 256, 257, 300, 4096, 65536] {
            for pos in [0, len / 2, len - 1] {
                let mut buf = vec![0u8; len];
                buf[pos] = 1;
                assert!(!is_zero(&buf), "len {len} pos {pos}");
            }
        }
    }

    #[test]
    fn stats_delta_subtracts_counters_and_keeps_the_gauge() {
        let before = Stats {
            cor_fills: 3,
            bytes_fetched: 100,
            in_flight: 7,
            ..Stats::default()
        };
        let after = Stats {
            cor_fills: 5,
            bytes_fetched: 300,
            in_flight: 2,
            ..Stats::default()
        };
        let d = stats_delta(&before, &after);
        assert_eq!(d.cor_fills, 2);
        assert_eq!(d.bytes_fetched, 200);
        assert_eq!(d.in_flight, 2);
        // A counter that went backwards (a reopen) reads as zero, not as a wrap.
        assert_eq!(stats_delta(&after, &before).cor_fills, 0);
    }
}
