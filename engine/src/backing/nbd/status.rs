//! Block status of the export (`base:allocation`): which ranges read as
//! zeros, so that streaming records them as zero clusters without fetching
//! them. A sparse image of 20 GiB with 2 GiB of data then crosses a slow
//! link as 2 GiB, as `nbdcopy` and `qemu-img convert` copy it.
//!
//! What it owns: a connection of its own, apart from the read pool
//! (opened at the first query, with the meta context asked for in its
//! handshake), the queries on it, and [`Zeros`], the ranges known to read
//! as zeros that [`Medium::zeros_at`](crate::backing::remote::Medium::zeros_at)
//! answers from.
//!
//! Queries are synchronous, from a thread that may wait (the stream's
//! driver, `backfill convert`), never from a core. Block status only saves
//! fetches, so it never fails anything: a server that offers no
//! `base:allocation` (no structured replies, an old server), an error, or a
//! malformed reply makes a query learn nothing, and reads fetch those
//! ranges as before. The connection opens on a thread of its own, and the
//! first query waits for it [`FIRST_WAIT`] at most: a server at its
//! connection limit (qemu-nbd's default is one client) takes the connection
//! but never greets it, which would otherwise hold the query for the whole
//! handshake timeout. A server that could not be reached for status, or
//! offers none, is not asked again by this client; nor is one that let a
//! query wait [`REPLY_TIMEOUT`] (it would hold each of the stream's scans
//! that long), or whose queries failed [`MAX_FAILURES`] times.
//!
//! Only the `NBD_STATE_ZERO` bit counts: a hole without it may read as
//! anything.

use super::{
    connect_for, nbd_error_text, read_chunk_header, read_u32, read_u64, request, ExportInfo,
    NbdUri, Stream,
};
use crate::nbd::proto::*;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The status connection's handshake waits this long at most (a server at
/// its connection limit takes the connection but never greets it).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the first query waits for the connection to open.
const FIRST_WAIT: Duration = Duration::from_secs(2);
/// A query's reply may take this long.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed queries (each on a new connection) before status is off.
const MAX_FAILURES: u32 = 3;
/// Bytes one query asks about (the server may answer for fewer).
const MAX_QUERY: u64 = 1 << 30;
/// The largest status chunk accepted: 512 Ki extents.
const MAX_CHUNK: u32 = 4 << 20;
/// Ranges [`Zeros`] keeps at most; beyond, the lowest go (a stream moves
/// up the disk, and a range forgotten is only fetched).
const MAX_ZERO_RANGES: usize = 1 << 16;

/// Ranges of the export known to read as zeros: disjoint, not touching.
#[derive(Default)]
pub(super) struct Zeros {
    /// Whether any was ever learned: `run` takes no lock until then.
    any: AtomicBool,
    /// start -> end.
    map: Mutex<BTreeMap<u64, u64>>,
}

impl Zeros {
    fn insert(&self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let (mut lo, mut hi) = (start, end);
        if let Some((&s, &e)) = m.range(..=lo).next_back() {
            if e >= lo {
                lo = s;
                hi = hi.max(e);
            }
        }
        while let Some((&s, &e)) = m.range(lo..=hi).next() {
            m.remove(&s);
            hi = hi.max(e);
        }
        m.insert(lo, hi);
        while m.len() > MAX_ZERO_RANGES {
            m.pop_first();
        }
        self.any.store(true, Ordering::Release);
    }

    /// Whether the bytes from `pos` are known zeros, and for how long (at
    /// most `max`): the run up to the end of known zeros, or up to the
    /// next ones.
    pub(super) fn run(&self, pos: u64, max: u64) -> (bool, u64) {
        if !self.any.load(Ordering::Acquire) {
            return (false, max);
        }
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, &e)) = m.range(..=pos).next_back() {
            if e > pos {
                return (true, (e - pos).min(max));
            }
        }
        let next = m.range(pos..).next().map_or(u64::MAX, |(&s, _)| s);
        (false, (next - pos).min(max))
    }
}

/// The status connection and what became of it.
pub(super) struct Status {
    /// The export, its size, and the alignment of its reads.
    uri: NbdUri,
    size: u64,
    align: u64,
    conn: Option<(Stream, u32)>,
    /// The connection being opened, and until when a query waits for it.
    opening: Option<(Opening, Instant)>,
    /// Why this client asks no more.
    off: Option<String>,
    /// Queries that failed so far, and why the last did.
    failures: u32,
    failed: Option<String>,
    cookie: u64,
}

/// The answer of the thread that opens the status connection.
type Opening = Receiver<std::result::Result<(Stream, ExportInfo), String>>;

impl Status {
    /// Status of export `uri` of `size` bytes, whose reads start and end
    /// on multiples of `align`; nothing is opened yet.
    pub(super) fn new(uri: NbdUri, size: u64, align: u64) -> Status {
        Status {
            uri,
            size,
            align,
            conn: None,
            opening: None,
            off: None,
            failures: 0,
            failed: None,
            cookie: 0,
        }
    }

    /// Why block status is off for good, or why the last query failed.
    pub(super) fn trouble(&self) -> Option<&str> {
        self.off.as_deref().or(self.failed.as_deref())
    }

    /// Asks the server about `[offset, offset + len)` (clamped to the
    /// export's end) and adds the ranges that read as zeros, shrunk to
    /// whole alignment blocks (where reads start and end), to `zeros`.
    /// Returns the bytes found zero.
    pub(super) fn learn(&mut self, zeros: &Zeros, offset: u64, len: u64) -> u64 {
        let (size, align) = (self.size, self.align);
        let end = offset.saturating_add(len).min(size);
        let mut pos = offset;
        let mut found = 0;
        while pos < end && self.off.is_none() {
            self.cookie += 1;
            let cookie = self.cookie;
            let Some((conn, ctx)) = self.connection() else {
                break;
            };
            let n = (end - pos).min(MAX_QUERY) as u32;
            let asked = Instant::now();
            let answer = query(conn, cookie, ctx, pos, n)
                .and_then(|extents| zero_ranges(pos, end, size, align, &extents));
            match answer {
                Ok((ranges, next)) => {
                    self.failed = None;
                    for (lo, hi) in ranges {
                        found += hi - lo;
                        zeros.insert(lo, hi);
                    }
                    pos = next;
                }
                Err(e) => {
                    // The next query starts on a new connection, if any.
                    if let Some((s, _)) = self.conn.take() {
                        s.shutdown();
                    }
                    self.failures += 1;
                    // A server that let a query time out is not waited
                    // for again.
                    if self.failures >= MAX_FAILURES || asked.elapsed() >= REPLY_TIMEOUT {
                        self.off = Some(e);
                    } else {
                        self.failed = Some(e);
                    }
                    break;
                }
            }
        }
        found
    }

    /// The connection, if there is one. The first call (and the first
    /// after a failed query) starts opening one on a thread of its own and
    /// waits [`FIRST_WAIT`] for it; later calls look whether it came. So a
    /// server that holds the handshake (at its connection limit) costs the
    /// stream that short wait once, not the handshake timeout; this query
    /// learns nothing, later ones do. None while it is being opened, and
    /// once status is off.
    fn connection(&mut self) -> Option<(&mut Stream, u32)> {
        if self.conn.is_none() && self.off.is_none() {
            if self.opening.is_none() {
                let (tx, rx) = crossbeam_channel::bounded(1);
                let uri = self.uri.clone();
                let spawned = std::thread::Builder::new()
                    .name("backfill-nbd-status".into())
                    .spawn(move || {
                        let _ = tx.send(connect_for(&uri, true, HANDSHAKE_TIMEOUT));
                    });
                if let Err(e) = spawned {
                    self.off = Some(format!("spawning a thread: {e}"));
                    return None;
                }
                self.opening = Some((rx, Instant::now() + FIRST_WAIT));
            }
            let (rx, until) = self.opening.as_ref().expect("being opened");
            // Past `until`, this only looks.
            match rx.recv_deadline(*until) {
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.off = Some("the connecting thread ended".into())
                }
                Ok(Ok((s, info))) => match info.allocation {
                    Some(ctx) if s.set_timeouts(Some(REPLY_TIMEOUT)).is_ok() => {
                        self.conn = Some((s, ctx));
                    }
                    _ => {
                        s.shutdown();
                        self.off = Some("the server offers no base:allocation".into());
                    }
                },
                Ok(Err(e)) => self.off = Some(e),
            }
            self.opening = None;
        }
        self.conn.as_mut().map(|(s, ctx)| (s, *ctx))
    }
}

impl Drop for Status {
    fn drop(&mut self) {
        if let Some((s, _)) = &self.conn {
            let _ = (&*s).write_all(&request(CMD_DISC, 0, 0, 0));
            s.shutdown();
        }
    }
}

/// One NBD_CMD_BLOCK_STATUS on `s`: the extents of context `ctx`, as
/// (length, flags), from `offset` on.
fn query(
    s: &mut Stream,
    cookie: u64,
    ctx: u32,
    offset: u64,
    len: u32,
) -> std::result::Result<Vec<(u32, u32)>, String> {
    (&*s)
        .write_all(&request(CMD_BLOCK_STATUS, cookie, offset, len))
        .map_err(|e| format!("sending a block status query: {e}"))?;
    read_status_reply(s, cookie, ctx)
}

/// Reads the reply to block status query `cookie`: the extents the
/// server gave for context `ctx`.
pub(super) fn read_status_reply(
    s: &mut impl Read,
    cookie: u64,
    ctx: u32,
) -> std::result::Result<Vec<(u32, u32)>, String> {
    let io = |e: std::io::Error| format!("reading a block status reply: {e}");
    let mut extents: Option<Vec<(u32, u32)>> = None;
    loop {
        let magic = read_u32(s).map_err(io)?;
        if magic == SIMPLE_REPLY_MAGIC {
            let error = read_u32(s).map_err(io)?;
            let _ = read_u64(s).map_err(io)?;
            return Err(format!(
                "the server answered a simple reply (error {error})"
            ));
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(format!("protocol error: bad reply magic {magic:#x}"));
        }
        let (flags, kind, got, len) = read_chunk_header(s).map_err(io)?;
        if got != cookie {
            return Err(format!(
                "protocol error: reply to cookie {got}, not {cookie}"
            ));
        }
        if len > MAX_CHUNK {
            return Err(format!("protocol error: a chunk of {len} bytes"));
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).map_err(io)?;
        let mut c = Cursor(&payload);
        match kind {
            REPLY_TYPE_NONE if len == 0 => {}
            REPLY_TYPE_BLOCK_STATUS if len >= 12 && (len - 4) % 8 == 0 => {
                let id = c.u32().unwrap_or_default();
                if id == ctx {
                    if extents.is_some() {
                        return Err("protocol error: two status chunks for one context".into());
                    }
                    let mut v = Vec::with_capacity(c.0.len() / 8);
                    while let (Some(n), Some(f)) = (c.u32(), c.u32()) {
                        v.push((n, f));
                    }
                    extents = Some(v);
                }
            }
            k if k & (1 << 15) != 0 => {
                let error = c.u32().unwrap_or_default();
                return Err(format!(
                    "the server answered a block status query with {}",
                    nbd_error_text(error)
                ));
            }
            k => {
                return Err(format!(
                    "protocol error: unexpected chunk type {k} of {len} bytes"
                ))
            }
        }
        if flags & REPLY_FLAG_DONE != 0 {
            return extents.ok_or_else(|| "protocol error: no extents".into());
        }
    }
}

/// The ranges of `extents` (from `pos`, as (length, flags)) that read as
/// zeros, cut at `end` and shrunk to whole `align` blocks (a range may end
/// at `size`, the export's end, unaligned); and where the extents ended.
pub(super) fn zero_ranges(
    pos: u64,
    end: u64,
    size: u64,
    align: u64,
    extents: &[(u32, u32)],
) -> std::result::Result<(Vec<(u64, u64)>, u64), String> {
    let mut at = pos;
    let mut out = Vec::new();
    // The start of the run of zero extents `at` is in, if it is in one.
    let mut run: Option<u64> = None;
    let mut close = |lo: u64, hi: u64| {
        let lo = lo.next_multiple_of(align);
        let hi = if hi == size { hi } else { hi / align * align };
        if lo < hi {
            out.push((lo, hi));
        }
    };
    for &(n, flags) in extents {
        if at >= end {
            break;
        }
        if n == 0 {
            return Err("protocol error: an extent of 0 bytes".into());
        }
        if flags & STATE_ZERO != 0 {
            run.get_or_insert(at);
        } else if let Some(lo) = run.take() {
            close(lo, at);
        }
        at = (at + u64::from(n)).min(end);
    }
    if let Some(lo) = run {
        close(lo, at);
    }
    Ok((out, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_merge_and_answer_runs() {
        let z = Zeros::default();
        assert_eq!(z.run(0, 100), (false, 100));
        z.insert(100, 200);
        z.insert(300, 400);
        z.insert(200, 250); // touches the first
        assert_eq!(z.run(100, 1000), (true, 150));
        assert_eq!(z.run(150, 1000), (true, 100));
        assert_eq!(z.run(150, 10), (true, 10));
        assert_eq!(z.run(250, 1000), (false, 50));
        assert_eq!(z.run(0, 1000), (false, 100));
        assert_eq!(z.run(0, 30), (false, 30));
        assert_eq!(z.run(400, 1000), (false, 1000));
        z.insert(50, 350); // swallows both
        assert_eq!(z.run(50, 1000), (true, 350));
        assert_eq!(z.map.lock().unwrap().len(), 1);
    }

    #[test]
    fn zeros_stay_bounded() {
        let z = Zeros::default();
        for i in 0..(MAX_ZERO_RANGES as u64 + 10) {
            z.insert(i * 10, i * 10 + 5);
        }
        let m = z.map.lock().unwrap();
        assert_eq!(m.len(), MAX_ZERO_RANGES);
        assert_eq!(*m.first_key_value().unwrap().0, 100);
    }

    #[test]
    fn extents_become_aligned_zero_ranges() {
        let (z, d) = (STATE_HOLE | STATE_ZERO, 0);
        // 4 KiB blocks: data 0..1000, zeros 1000..10000, data, zeros to
        // the (unaligned) end of a 20000-byte export.
        let e = [(1000, d), (9000, z), (5000, d), (5000, z)];
        let (r, next) = zero_ranges(0, 20000, 20000, 4096, &e).unwrap();
        assert_eq!(r, vec![(4096, 8192), (16384, 20000)]);
        assert_eq!(next, 20000);
        // A hole without the zero bit is not zeros; extents past the end
        // are cut; adjacent zero extents merge.
        let e = [(8192, STATE_HOLE), (4096, z), (4096, z), (1 << 20, z)];
        let (r, next) = zero_ranges(0, 20480, 1 << 30, 4096, &e).unwrap();
        assert_eq!(r, vec![(8192, 20480)]);
        assert_eq!(next, 20480);
        // Fewer extents than asked for: the next query starts after them.
        let (r, next) = zero_ranges(4096, 1 << 20, 1 << 30, 512, &[(1024, z)]).unwrap();
        assert_eq!((r, next), (vec![(4096, 5120)], 5120));
        assert!(zero_ranges(0, 10, 10, 1, &[(0, z)]).is_err());
    }

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        chunk_header(&mut v, cookie, flags, kind, payload.len() as u32);
        v.extend_from_slice(payload);
        v
    }

    fn status(ctx: u32, extents: &[(u32, u32)]) -> Vec<u8> {
        let mut p = ctx.to_be_bytes().to_vec();
        for (n, f) in extents {
            p.extend_from_slice(&n.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        p
    }

    #[test]
    fn status_replies_are_read_and_checked() {
        // Another context's chunk is skipped; ours, then the end.
        let mut r = chunk(0, REPLY_TYPE_BLOCK_STATUS, 7, &status(9, &[(1, 0)]));
        r.extend(chunk(
            0,
            REPLY_TYPE_BLOCK_STATUS,
            7,
            &status(3, &[(512, 3), (512, 0)]),
        ));
        r.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 7, &[]));
        let got = read_status_reply(&mut r.as_slice(), 7, 3).unwrap();
        assert_eq!(got, vec![(512, 3), (512, 0)]);

        let done = REPLY_FLAG_DONE;
        let bad = [
            // For another request.
            chunk(done, REPLY_TYPE_BLOCK_STATUS, 8, &status(3, &[(512, 3)])),
            // No extents for our context.
            chunk(done, REPLY_TYPE_NONE, 7, &[]),
            // A payload that is not whole descriptors.
            chunk(done, REPLY_TYPE_BLOCK_STATUS, 7, &[0, 0, 0, 3, 1, 2, 3]),
            // An error chunk.
            chunk(done, REPLY_TYPE_ERROR, 7, &[0, 0, 0, 22, 0, 0]),
            // Cut short.
            chunk(done, REPLY_TYPE_BLOCK_STATUS, 7, &status(3, &[(512, 3)]))[..30].to_vec(),
        ];
        for b in bad {
            assert!(read_status_reply(&mut b.as_slice(), 7, 3).is_err());
        }
    }
}
