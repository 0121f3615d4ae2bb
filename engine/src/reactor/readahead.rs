//! Adaptive readahead for slow (remote) backing media.
//!
//! A client reading a remote-backed disk sequentially pays the medium's
//! round trip on every request it has in flight; with a few requests in
//! flight, the link idles between them. Readahead keeps it busy: when a
//! core sees sequential reads, it populates the clusters ahead of the
//! reader (copy-on-read without returning data), so the reader's later
//! requests find them in the overlay, or join their fills in flight.
//!
//! Detection is per core, on the read parts the core receives. A read
//! continues a stream when it starts where the stream's last read ended
//! (give or take one read's length), or exactly at the start of this
//! core's next stripe: a core owns only every `cores`-th stripe, and the
//! router cuts requests at stripe starts. A core tracks a few streams (the
//! expected next offset of each); the third read in a row that continues
//! one turns readahead on for it. When a stream comes back from the other
//! cores' stripes, their cores have read ahead of it, so this core assumes
//! half a window ahead is asked for already. The window
//! starts at four times the read size (at least [`MIN_WINDOW`]) and doubles
//! each time the reader consumes half of it, up to the disk's
//! `readahead_max_bytes`; a read that continues no stream starts a new one,
//! replacing the least recently used. Random reads never continue a stream
//! twice, so they never read ahead.
//!
//! The populate requests are split by the router and sent to the cores
//! that own their stripes (this one included), like a client's. The bytes
//! a core's readahead has in flight are bounded (twice the window limit);
//! beyond that it skips, and catches up on the next read.
//!
//! On a disk that passes reads through (no copy-on-read, or read-only)
//! the same requests fetch whole clusters into memory instead, kept for
//! the reader (`Core::prefetch`, `kept`); nothing is written.
//!
//! What it never does: fetch what the overlay holds (populate skips
//! allocated clusters without I/O), run on a disk without a remote layer
//! (or passing reads through to an overlay with extended L2 entries: its
//! buffers are by cluster), or start while the core closes.

use super::request::{Callback, ReqKind, Request, Seed};
use super::{Core, Msg};
use crate::io::Io;
use std::sync::atomic::Ordering;

/// The smallest readahead window.
pub const MIN_WINDOW: u64 = 1 << 20;
/// Streams one core follows at once.
const STREAMS: usize = 4;
/// Reads in a row that continue a stream before readahead starts.
const SEQUENTIAL_AFTER: u32 = 2;

#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    /// Where the next read of the stream is expected to start.
    next: u64,
    /// Reads in a row that continued the stream.
    hits: u32,
    /// The end of what readahead has asked for.
    issued: u64,
    window: u64,
    /// When the stream was last used (the detector's read counter).
    used: u64,
}

/// One core's sequential-stream detector.
pub(super) struct Detector {
    streams: [Stream; STREAMS],
    reads: u64,
    /// The router's stripe, and the bytes of other cores' stripes between
    /// two of this core's.
    stripe: u64,
    gap: u64,
    max_window: u64,
}

impl Detector {
    /// For a core of `cores` that own `stripe`-byte stripes in turn.
    pub(super) fn new(stripe: u64, cores: u64, max_window: u64) -> Detector {
        Detector {
            streams: [Stream::default(); STREAMS],
            reads: 0,
            stripe,
            gap: (cores - 1) * stripe,
            max_window,
        }
    }

    /// A read of `[offset, offset + len)` arrived. Returns the range to
    /// read ahead, if any, and notes it as asked for. A range longer than
    /// `budget` bytes is not asked for now; the next read asks again.
    pub(super) fn on_read(
        &mut self,
        offset: u64,
        len: u64,
        disk_size: u64,
        budget: u64,
    ) -> Option<(u64, u64)> {
        if self.max_window == 0 || len == 0 {
            return None;
        }
        self.reads += 1;
        let end = offset + len;
        let (stripe, gap) = (self.stripe, self.gap);
        // A read continues a stream if it starts where the stream's last
        // read ended (give or take one read, for requests that overtake
        // each other), or at the start of this core's next stripe after
        // the other cores' (the router cuts requests at stripe starts).
        let continues = |s: &Stream| {
            s.used != 0
                && (offset + len >= s.next && offset <= s.next + len
                    || gap > 0
                        && offset.is_multiple_of(stripe)
                        && offset > s.next
                        && offset - s.next <= gap + len)
        };
        let Some(s) = self.streams.iter_mut().find(|s| continues(s)) else {
            // A new stream, in the least recently used slot.
            let s = self
                .streams
                .iter_mut()
                .min_by_key(|s| s.used)
                .expect("a stream slot");
            *s = Stream {
                next: end,
                hits: 0,
                issued: end,
                window: (4 * len).clamp(MIN_WINDOW, self.max_window.max(MIN_WINDOW)),
                used: self.reads,
            };
            return None;
        };
        s.used = self.reads;
        s.hits += 1;
        if offset > s.next + len && s.hits > SEQUENTIAL_AFTER {
            // The reader comes back from another core's stripes, whose
            // core read ahead of it there and kept at least half a window
            // asked for ahead of it (the cores' windows grow alike): do not
            // ask for that again.
            s.issued = s.issued.max(end + s.window / 2);
        }
        s.next = s.next.max(end);
        s.issued = s.issued.max(s.next);
        if s.hits < SEQUENTIAL_AFTER {
            return None;
        }
        // Refill when the reader is past half of the window.
        if s.issued >= s.next + s.window / 2 || s.issued >= disk_size {
            return None;
        }
        let from = s.issued;
        let to = (s.next + s.window).min(disk_size);
        if to - from > budget {
            return None;
        }
        s.issued = to;
        s.window = (s.window * 2).min(self.max_window).max(MIN_WINDOW);
        Some((from, to - from))
    }
}

impl<I: Io> Core<I> {
    /// After a client read part of `[offset, offset + len)` arrived: read
    /// ahead of it if it continues a sequential stream.
    pub(super) fn read_ahead(&mut self, offset: u64, len: u64) {
        // The first test keeps a disk without readahead (every local one)
        // free of anything more on its read path.
        if self.readahead.is_none() || self.closing.is_some() || self.shared.meta.is_poisoned() {
            return;
        }
        let shared = self.shared.clone();
        // Set before the disk is handed out, so before any read.
        let (Some(detector), Some(_)) = (self.readahead.as_mut(), shared.peers.get()) else {
            return;
        };
        let budget = (2 * shared.readahead_max)
            .saturating_sub(self.readahead_in_flight.load(Ordering::Relaxed));
        let Some((from, n)) = detector.on_read(offset, len, shared.size, budget) else {
            return;
        };
        self.readahead_in_flight.fetch_add(n, Ordering::Relaxed);
        shared.stats[self.id]
            .readahead_bytes
            .fetch_add(n, Ordering::Relaxed);
        let in_flight = self.readahead_in_flight.clone();
        // Best effort: an error (a failing medium, a full disk) reaches the
        // client reads that need those clusters, not this request.
        let done: Callback = Box::new(move |_| {
            in_flight.fetch_sub(n, Ordering::Relaxed);
        });
        self.send_populate(from, n, None, done);
    }

    /// Populates `[from, from + n)` like a client's request: split by the
    /// router, each part sent to the core that owns it (this one
    /// included); `done` runs when every part finished. With `seed`, its
    /// fills take the decompressed cluster's bytes from it (see
    /// `Request::seed`).
    pub(super) fn send_populate(&mut self, from: u64, n: u64, seed: Option<Seed>, done: Callback) {
        let shared = self.shared.clone();
        let Some(peers) = shared.peers.get() else {
            return;
        };
        let router = shared.router;
        let parts = router.count(from, n);
        let mut req =
            Request::with_callback(ReqKind::Populate, Vec::new(), parts, done, None, false);
        std::sync::Arc::get_mut(&mut req)
            .expect("a new request")
            .seed = seed;
        for part in router.split(from, n) {
            if part.core == self.id {
                self.start_part(req.clone(), part.offset, part.len, part.buf_off);
            } else {
                peers[part.core].post(Msg::Part {
                    req: req.clone(),
                    offset: part.offset,
                    len: part.len,
                    buf_off: part.buf_off,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const DISK: u64 = 1 << 40;
    const NO_LIMIT: u64 = u64::MAX;

    #[test]
    fn sequential_reads_start_readahead_on_the_third_read() {
        let mut d = Detector::new(32 * MIB, 1, 16 * MIB);
        assert_eq!(d.on_read(0, MIB, DISK, NO_LIMIT), None);
        assert_eq!(d.on_read(MIB, MIB, DISK, NO_LIMIT), None);
        // Third read: the window (4 x 1 MiB) ahead of the reader.
        assert_eq!(
            d.on_read(2 * MIB, MIB, DISK, NO_LIMIT),
            Some((3 * MIB, 4 * MIB))
        );
        // The window doubled: the fourth read asks for more, up to 8 MiB
        // past the reader; the fifth up to 16 MiB (the limit).
        assert_eq!(
            d.on_read(3 * MIB, MIB, DISK, NO_LIMIT),
            Some((7 * MIB, 5 * MIB))
        );
        assert_eq!(
            d.on_read(4 * MIB, MIB, DISK, NO_LIMIT),
            Some((12 * MIB, 9 * MIB))
        );
        // Now more than half of the window lies ahead: nothing until the
        // reader gets closer.
        for i in 5..13 {
            assert_eq!(
                d.on_read(i * MIB, MIB, DISK, NO_LIMIT),
                None,
                "read at {i} MiB"
            );
        }
        assert_eq!(
            d.on_read(13 * MIB, MIB, DISK, NO_LIMIT),
            Some((21 * MIB, 9 * MIB))
        );
    }

    #[test]
    fn a_range_over_the_budget_waits_for_the_next_read() {
        let mut d = Detector::new(32 * MIB, 1, 16 * MIB);
        d.on_read(0, MIB, DISK, NO_LIMIT);
        d.on_read(MIB, MIB, DISK, NO_LIMIT);
        assert_eq!(d.on_read(2 * MIB, MIB, DISK, MIB), None);
        // Nothing was noted as asked for: the next read asks for it all.
        assert_eq!(
            d.on_read(3 * MIB, MIB, DISK, NO_LIMIT),
            Some((4 * MIB, 4 * MIB))
        );
    }

    #[test]
    fn window_doubles_up_to_the_limit_and_stops_at_the_disk_end() {
        let mut d = Detector::new(32 * MIB, 1, 8 * MIB);
        let mut asked = 0;
        let mut biggest = 0;
        let mut off = 0;
        while off < 64 * MIB {
            if let Some((from, len)) = d.on_read(off, MIB, 64 * MIB, NO_LIMIT) {
                assert!(from >= off + MIB, "readahead behind the reader");
                assert!(from + len <= 64 * MIB, "readahead past the disk end");
                assert_eq!(from, asked.max(from), "overlapping readahead");
                asked = from + len;
                biggest = biggest.max(len);
            }
            off += MIB;
        }
        assert_eq!(asked, 64 * MIB);
        assert!(biggest <= 8 * MIB, "window above the limit: {biggest}");
    }

    #[test]
    fn random_reads_never_read_ahead() {
        let mut d = Detector::new(32 * MIB, 2, 16 * MIB);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (DISK / 4096)) * 4096;
            assert_eq!(d.on_read(off, 4096, DISK, NO_LIMIT), None, "at {off}");
        }
    }

    #[test]
    fn random_reads_on_a_small_disk_never_read_ahead() {
        // 4 KiB reads over 24 MiB with 2 MiB stripes: they often land near
        // each other, but never twice in a row where a stream goes on.
        let mut d = Detector::new(2 * MIB, 2, 16 * MIB);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut asked = 0;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (24 * MIB / 4096)) * 4096;
            asked += d
                .on_read(off, 4096, 24 * MIB, NO_LIMIT)
                .map_or(0, |(_, n)| n);
        }
        assert_eq!(asked, 0);
    }

    #[test]
    fn a_stream_continues_across_other_cores_stripes() {
        // Two cores, 32 MiB stripes: this core sees [0, 32M) then [64M, ...).
        let mut d = Detector::new(32 * MIB, 2, 16 * MIB);
        let mut got = false;
        for i in 30..32 {
            d.on_read(i * MIB, MIB, DISK, NO_LIMIT);
        }
        for i in 64..67 {
            got |= d.on_read(i * MIB, MIB, DISK, NO_LIMIT).is_some();
        }
        assert!(got, "the stream was lost at the other core's stripe");
    }

    #[test]
    fn interleaved_streams_are_followed_separately() {
        let mut d = Detector::new(32 * MIB, 1, 16 * MIB);
        let (a, b) = (0, 512 * MIB);
        let mut hits = [0; 2];
        for i in 0..8 {
            for (k, base) in [a, b].into_iter().enumerate() {
                if d.on_read(base + i * MIB, MIB, DISK, NO_LIMIT).is_some() {
                    hits[k] += 1;
                }
            }
        }
        assert!(hits[0] > 0 && hits[1] > 0, "{hits:?}");
    }

    #[test]
    fn off_when_the_limit_is_zero() {
        let mut d = Detector::new(32 * MIB, 1, 0);
        for i in 0..10 {
            assert_eq!(d.on_read(i * MIB, MIB, DISK, NO_LIMIT), None);
        }
    }
}
