//! Block status of the export (`base:allocation`): which ranges read as
//! zeros, so that streaming records them as zero clusters without fetching
//! them. A sparse image of 20 GiB with 2 GiB of data then crosses a slow
//! link as 2 GiB, as `nbdcopy` and `qemu-img convert` copy it.
//!
//! What it owns: the queries (`NBD_CMD_BLOCK_STATUS`) and their replies;
//! what they found goes into the client's [`Zeros`], which
//! [`Medium::zeros_at`](crate::backing::remote::Medium::zeros_at) answers
//! from. The queries go on the read pool's connections, which ask for the
//! context in their handshake, as QEMU's client does: a server that takes
//! one client at a time (qemu-nbd's default) answers them too, and no
//! connection is opened for them. A connection's reader thread reads the
//! replies to its queries between its reads' ([`read_query_reply`]).
//!
//! Queries are synchronous, from a thread that may wait (the stream's
//! driver, `backfill convert`, `backfill info`), never from a core. Block
//! status only saves fetches, so it never fails anything: a server that
//! offers no `base:allocation` (no structured replies, an old server), an
//! error, or a malformed reply makes a query learn nothing, and reads fetch
//! those ranges as before. A server that offers none is not asked again by
//! this client; nor is one that let a query wait [`QUERY_TIMEOUT`] (it
//! would hold each of the stream's scans that long), or whose queries
//! failed [`MAX_FAILURES`] times.
//!
//! Only the `NBD_STATE_ZERO` bit counts: a hole without it may read as
//! anything.

use super::{
    error_chunk_text, read_chunk_header, read_u32, read_u64, request, Lane, Pool,
    REPLY_TYPE_ERROR_BIT,
};
use crate::backing::zeros::Zeros;
use crate::nbd::proto::*;
use crossbeam_channel::{RecvTimeoutError, Sender};
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a query waits for a live connection (the first one may still
/// be in its handshake).
const FIRST_WAIT: Duration = Duration::from_secs(2);
/// A query's reply may take this long.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed queries before status is off.
const MAX_FAILURES: u32 = 3;
/// Bytes one query asks about (the server may answer for fewer).
const MAX_QUERY: u64 = 1 << 30;
/// The largest status chunk accepted: 512 Ki extents.
const MAX_CHUNK: u32 = 4 << 20;
/// The extents of one query's answer, as (length, flags), or why none.
pub(super) type Answer = std::result::Result<Vec<(u32, u32)>, String>;

/// A block status query on the wire: who waits for its answer, and what
/// its reply's chunks gave so far.
pub(super) struct Query {
    waiter: Sender<Answer>,
    extents: Option<Vec<(u32, u32)>>,
    /// The first thing wrong with the reply (the connection goes on).
    error: Option<String>,
}

impl Query {
    pub(super) fn new(waiter: Sender<Answer>) -> Query {
        Query {
            waiter,
            extents: None,
            error: None,
        }
    }

    /// Hands `answer` to the waiter (which may have stopped waiting).
    pub(super) fn answer(self, answer: Answer) {
        let _ = self.waiter.send(answer);
    }

    /// The reply is complete: its extents, or what was wrong with it.
    fn done(mut self) {
        let answer = match (self.error.take(), self.extents.take()) {
            (Some(e), _) => Err(e),
            (None, Some(extents)) => Ok(extents),
            (None, None) => Err("protocol error: no extents in a block status reply".into()),
        };
        self.answer(answer);
    }
}

/// Why a query learned nothing.
enum Trouble {
    /// No connection is up: ask again later.
    NoConnection,
    /// The server gives no block status (why): ask no more.
    Unsupported(String),
    /// The query failed (why); `waited` if it waited the whole timeout.
    Failed { why: String, waited: bool },
}

impl Pool {
    /// A live connection that has the `base:allocation` context, to send
    /// a block status query on. Waits [`FIRST_WAIT`] at most for the first
    /// connection to go live; once one was, a query while none is up (the
    /// server went away) learns nothing at once, rather than wait at every
    /// scan of a stream whose reads wait for the server anyway.
    fn status_lane(&self) -> std::result::Result<Arc<Lane>, Trouble> {
        let until = Instant::now() + FIRST_WAIT;
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let with: Vec<_> = lanes.iter().filter(|l| l.allocation.is_some()).collect();
            if !with.is_empty() {
                let lane = with[self.next_lane.fetch_add(1, Ordering::Relaxed) % with.len()];
                return Ok(lane.clone());
            }
            if !lanes.is_empty() {
                let why = self
                    .status_trouble
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let why = why
                    .as_deref()
                    .unwrap_or("the server offers no base:allocation");
                return Err(Trouble::Unsupported(why.to_string()));
            }
            let now = Instant::now();
            if now >= until || self.stopped() || self.was_live.load(Ordering::Relaxed) {
                return Err(Trouble::NoConnection);
            }
            lanes = self
                .lanes_changed
                .wait_timeout(lanes, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// One `NBD_CMD_BLOCK_STATUS` for `[offset, offset + len)`: the
    /// extents the server gave, from `offset` on.
    fn block_status(&self, offset: u64, len: u32) -> std::result::Result<Vec<(u32, u32)>, Trouble> {
        let lane = self.status_lane()?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        {
            let mut w = lane.wire.lock().unwrap_or_else(|e| e.into_inner());
            if w.dead {
                return Err(Trouble::NoConnection);
            }
            w.cookie += 1;
            let cookie = w.cookie;
            // In the table before the request is on the wire, as a read's.
            w.queries.insert(cookie, Query::new(tx));
            // Lock order: `wire`, then `out`. The sending thread holds
            // `out` only while it writes a batch.
            let out = lane.out.lock().unwrap_or_else(|e| e.into_inner());
            drop(w);
            let header = request(CMD_BLOCK_STATUS, cookie, offset, len);
            match out.send_now(&header) {
                Ok(n) if n == header.len() => {}
                // The socket is full of requests the server has not read:
                // ask another time.
                Ok(0) => {
                    drop(out);
                    let mut w = lane.wire.lock().unwrap_or_else(|e| e.into_inner());
                    w.queries.remove(&cookie);
                    return Err(Trouble::NoConnection);
                }
                // Part of a request on the wire, or a broken socket: the
                // connection is of no more use (its reads go elsewhere,
                // and its session's end answers this query).
                Ok(_) | Err(_) => {
                    out.shutdown();
                    return Err(Trouble::NoConnection);
                }
            }
        }
        match rx.recv_timeout(QUERY_TIMEOUT) {
            Ok(answer) => answer.map_err(|why| Trouble::Failed { why, waited: false }),
            Err(RecvTimeoutError::Timeout) => Err(Trouble::Failed {
                why: format!("no reply to a block status query in {QUERY_TIMEOUT:?}"),
                waited: true,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(Trouble::NoConnection),
        }
    }
}

/// Reads one message of the reply to query `q` from `s`, after its header
/// (a simple reply's `error`, or a structured chunk's flags, type and
/// length): `Some(q)` if more chunks follow, `None` once `q` is answered.
/// An error means the connection is of no more use (the query is answered
/// with it); a reply that is wrong but whole only fails the query.
pub(super) fn read_query_reply(
    s: &mut impl Read,
    mut q: Query,
    chunk: Option<(u16, u16, u32)>,
    error: u32,
    ctx: Option<u32>,
) -> std::result::Result<Option<Query>, String> {
    let Some((flags, kind, len)) = chunk else {
        // A simple reply: an error, or a protocol error (no extents).
        q.error.get_or_insert_with(|| match error {
            0 => "protocol error: a simple reply to a block status query".into(),
            e => format!(
                "the server answered a block status query with {}",
                super::nbd_error_text(e)
            ),
        });
        q.done();
        return Ok(None);
    };
    // The connection is of no more use: the query is answered with why.
    let fatal = |q: Query, why: String| {
        q.answer(Err(why.clone()));
        Err(why)
    };
    if len > MAX_CHUNK {
        return fatal(
            q,
            format!("protocol error: a block status chunk of {len} bytes"),
        );
    }
    let mut payload = vec![0u8; len as usize];
    if let Err(e) = s.read_exact(&mut payload) {
        return fatal(q, format!("reading a block status reply: {e}"));
    }
    let mut c = Cursor(&payload);
    let wrong = match kind {
        REPLY_TYPE_NONE if len == 0 => None,
        REPLY_TYPE_BLOCK_STATUS if len >= 12 && (len - 4) % 8 == 0 => {
            let id = c.u32();
            if id.is_some() && id == ctx {
                if q.extents.is_some() {
                    Some("protocol error: two status chunks for one context".to_string())
                } else {
                    let mut v = Vec::with_capacity(c.0.len() / 8);
                    while let (Some(n), Some(f)) = (c.u32(), c.u32()) {
                        v.push((n, f));
                    }
                    q.extents = Some(v);
                    None
                }
            } else {
                // Another context's: skipped.
                None
            }
        }
        k if k & REPLY_TYPE_ERROR_BIT != 0 => Some(format!(
            "the server answered a block status query with {}",
            error_chunk_text(&payload).1
        )),
        k => Some(format!(
            "protocol error: unexpected chunk type {k} of {len} bytes"
        )),
    };
    if let Some(why) = wrong {
        q.error.get_or_insert(why);
    }
    if flags & REPLY_FLAG_DONE != 0 {
        q.done();
        return Ok(None);
    }
    Ok(Some(q))
}

/// Reads the whole reply to block status query `cookie` from `s` (no
/// other request's chunks between): the extents the server gave for
/// context `ctx`. What a connection's reader does, for one query.
pub(super) fn read_status_reply(s: &mut impl Read, cookie: u64, ctx: u32) -> Answer {
    let io = |e: std::io::Error| format!("reading a block status reply: {e}");
    let (tx, rx) = crossbeam_channel::bounded(1);
    let mut q = Query::new(tx);
    loop {
        let (chunk, error, got) = match read_u32(s).map_err(io)? {
            SIMPLE_REPLY_MAGIC => (None, read_u32(s).map_err(io)?, read_u64(s).map_err(io)?),
            STRUCTURED_REPLY_MAGIC => {
                let (flags, kind, got, len) = read_chunk_header(s).map_err(io)?;
                (Some((flags, kind, len)), 0, got)
            }
            m => return Err(format!("protocol error: bad reply magic {m:#x}")),
        };
        if got != cookie {
            return Err(format!(
                "protocol error: reply to cookie {got}, not {cookie}"
            ));
        }
        match read_query_reply(s, q, chunk, error, Some(ctx)) {
            Ok(Some(more)) => q = more,
            Ok(None) | Err(_) => return rx.try_recv().expect("the query is answered"),
        }
    }
}

/// Whether block status works for this client.
#[derive(Default)]
pub(super) struct Status {
    /// Why this client asks no more.
    off: Option<String>,
    /// Queries that failed so far, and why the last did.
    failures: u32,
    failed: Option<String>,
}

impl Status {
    /// Why block status is off for good, or why the last query failed.
    pub(super) fn trouble(&self) -> Option<&str> {
        self.off.as_deref().or(self.failed.as_deref())
    }

    /// Asks the server, on a connection of `pool`, about `[offset, offset
    /// + len)` (clamped to the export's end) and adds the ranges that read
    /// as zeros, shrunk to whole `align` blocks (where reads start and
    /// end), to `zeros`. Returns the bytes found zero.
    pub(super) fn learn(
        &mut self,
        pool: &Pool,
        align: u64,
        zeros: &Zeros,
        offset: u64,
        len: u64,
    ) -> u64 {
        let size = pool.size;
        let end = offset.saturating_add(len).min(size);
        let mut pos = offset;
        let mut found = 0;
        while pos < end && self.off.is_none() {
            let n = (end - pos).min(MAX_QUERY) as u32;
            let answer = pool.block_status(pos, n).and_then(|extents| {
                zero_ranges(pos, end, size, align, &extents)
                    .map_err(|why| Trouble::Failed { why, waited: false })
            });
            match answer {
                Ok((ranges, next)) => {
                    self.failed = None;
                    for (lo, hi) in ranges {
                        found += hi - lo;
                        zeros.insert(lo, hi);
                    }
                    pos = next;
                }
                Err(Trouble::NoConnection) => break,
                Err(Trouble::Unsupported(why)) => self.off = Some(why),
                Err(Trouble::Failed { why, waited }) => {
                    self.failures += 1;
                    // A server that let a query time out is not waited for
                    // again.
                    if self.failures >= MAX_FAILURES || waited {
                        self.off = Some(why);
                    } else {
                        self.failed = Some(why);
                    }
                    break;
                }
            }
        }
        found
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
