//! The transmission phase of one connection.
//!
//! The connection's thread reads requests and submits them to the engine
//! with callbacks; each callback encodes its reply on the reactor thread
//! that finished the request and hands it to the connection's writer
//! thread, so replies go out as soon as each request completes, in any
//! order. What one connection holds is bounded by its [`Budget`]: when a
//! client does not read its replies, its writer blocks, the budget runs
//! out, and the reader stops reading from that client; nobody else waits.

use super::handshake::{Export, Negotiated};
use super::proto::*;
use crate::disk::{BlockStatus, ExtentKind, SparseRead};
use crate::{Disk, Error, ErrorKind};
use crossbeam_channel::{Receiver, Sender};
use std::io::{self, IoSlice, Read, Write};
use std::sync::{Arc, Condvar, Mutex};

/// Bytes of requests and replies one connection may hold in memory.
pub const BUDGET_BYTES: u64 = 64 << 20;
/// Requests one connection may have in flight.
pub const BUDGET_REQUESTS: u64 = 1024;
/// What a request without payload is charged.
const BASE_COST: u64 = 256;
/// Holes shorter than this are sent as data: a chunk header costs more.
const MIN_HOLE: u64 = 4096;
/// A CACHE request is populated in pieces of this size, one after another.
const CACHE_PIECE: u64 = 4 << 20;
/// Block status answers at most this many clusters per request (the spec
/// lets a server answer less than asked; the client asks again).
const STATUS_MAX_CLUSTERS: u64 = 1 << 16;

/// In-flight bytes and requests of a connection.
pub struct Budget {
    used: Mutex<(u64, u64)>,
    cv: Condvar,
}

impl Budget {
    pub fn new() -> Arc<Budget> {
        Arc::new(Budget {
            used: Mutex::new((0, 0)),
            cv: Condvar::new(),
        })
    }

    /// Waits until `cost` more bytes and one more request fit.
    fn acquire(&self, cost: u64) {
        let mut u = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while u.1 > 0 && (u.0 + cost > BUDGET_BYTES || u.1 >= BUDGET_REQUESTS) {
            u = self.cv.wait(u).unwrap_or_else(|p| p.into_inner());
        }
        u.0 += cost;
        u.1 += 1;
    }

    fn release(&self, cost: u64) {
        let mut u = self.used.lock().unwrap_or_else(|p| p.into_inner());
        u.0 -= cost;
        u.1 -= 1;
        self.cv.notify_all();
    }

    /// Waits until every request has been answered (or dropped).
    pub fn wait_idle(&self) {
        let mut u = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while u.1 > 0 {
            u = self.cv.wait(u).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One encoded reply: header bytes interleaved with slices of a data buffer.
pub struct Reply {
    bytes: Vec<u8>,
    data: Vec<u8>,
    /// (from `data`?, start, end), in wire order.
    segs: Vec<(bool, usize, usize)>,
    cost: u64,
}

impl Reply {
    fn new(cost: u64) -> Reply {
        Reply {
            bytes: Vec::with_capacity(32),
            data: Vec::new(),
            segs: Vec::new(),
            cost,
        }
    }

    /// Marks the header bytes written since the last mark as a segment.
    fn mark_bytes(&mut self) {
        let start = self
            .segs
            .iter()
            .filter(|s| !s.0)
            .map(|s| s.2)
            .max()
            .unwrap_or(0);
        if self.bytes.len() > start {
            self.segs.push((false, start, self.bytes.len()));
        }
    }

    fn push_data(&mut self, start: usize, end: usize) {
        self.mark_bytes();
        self.segs.push((true, start, end));
    }

    fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.segs.iter().map(|&(d, s, e)| {
            if d {
                &self.data[s..e]
            } else {
                &self.bytes[s..e]
            }
        })
    }
}

/// Sends replies to the client in batches, one vectored write per batch.
/// After a write error (the client is gone) it keeps taking replies, only
/// to release their budget, and shuts the socket so the reader stops too.
pub fn writer<W: Write>(mut w: W, rx: Receiver<Reply>, budget: Arc<Budget>, on_error: impl Fn()) {
    let mut dead = false;
    let mut batch: Vec<Reply> = Vec::with_capacity(64);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < 64 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if !dead {
            if let Err(e) = write_batch(&mut w, &batch) {
                tracing_conn_error(&e);
                dead = true;
                on_error();
            }
        }
        for r in batch.drain(..) {
            budget.release(r.cost);
        }
    }
}

fn tracing_conn_error(e: &io::Error) {
    if e.kind() != io::ErrorKind::BrokenPipe && e.kind() != io::ErrorKind::ConnectionReset {
        eprintln!("backfill serve: a client connection failed: {e}");
    }
}

fn write_batch<W: Write>(w: &mut W, batch: &[Reply]) -> io::Result<()> {
    let mut slices: Vec<&[u8]> = batch.iter().flat_map(|r| r.slices()).collect();
    let mut first = 0;
    while first < slices.len() {
        let io: Vec<IoSlice> = slices[first..]
            .iter()
            .take(512)
            .map(|s| IoSlice::new(s))
            .collect();
        let mut n = w.write_vectored(&io)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while first < slices.len() && n >= slices[first].len() {
            n -= slices[first].len();
            first += 1;
        }
        if n > 0 {
            slices[first] = &slices[first][n..];
        }
    }
    Ok(())
}

/// The engine error as one of the errors NBD defines.
fn nbd_errno(e: &Error) -> u32 {
    match e.kind() {
        ErrorKind::ShuttingDown => ESHUTDOWN,
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::OutOfBounds | ErrorKind::InvalidInput => EINVAL,
        _ => match e.to_errno() {
            libc::EPERM | libc::EACCES | libc::EROFS => EPERM,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EINVAL => EINVAL,
            libc::ENOMEM => ENOMEM,
            libc::ENOTSUP => libc::ENOTSUP as u32,
            libc::EOVERFLOW => EOVERFLOW,
            _ => EIO,
        },
    }
}

/// Why the reader stopped.
pub enum End {
    /// NBD_CMD_DISC or end of stream at a request boundary.
    Clean,
    /// A protocol violation or I/O error: the connection is dropped.
    Dropped(String),
}

/// One connection in the transmission phase.
pub struct Conn {
    pub disk: Disk,
    pub export: Arc<Export>,
    pub neg: Negotiated,
    pub budget: Arc<Budget>,
    pub tx: Sender<Reply>,
}

impl Conn {
    /// Reads and dispatches requests until the client disconnects or
    /// breaks the protocol, then waits for the requests still in flight.
    pub fn serve<R: Read>(&self, r: &mut R) -> End {
        let end = self.read_loop(r);
        self.budget.wait_idle();
        end
    }

    fn read_loop<R: Read>(&self, r: &mut R) -> End {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        loop {
            match read_full(r, &mut h) {
                Ok(true) => {}
                Ok(false) => return End::Clean,
                Err(e) => return End::Dropped(format!("reading a request: {e}")),
            }
            let Some(req) = RequestHeader::parse(&h) else {
                return End::Dropped("bad request magic".into());
            };
            if req.kind == CMD_DISC {
                return End::Clean;
            }
            if let Err(e) = self.dispatch(r, req) {
                return End::Dropped(e);
            }
        }
    }

    /// Sends an error reply for `req` (structured when negotiated).
    fn fail(&self, req: &RequestHeader, errno: u32, msg: &str) {
        let mut reply = Reply::new(BASE_COST);
        self.budget.acquire(BASE_COST);
        encode_error(&mut reply, self.neg.structured, req.cookie, errno, msg);
        self.send(reply);
    }

    fn send(&self, mut reply: Reply) {
        reply.mark_bytes();
        if let Err(e) = self.tx.send(reply) {
            // The writer is gone: give the budget back ourselves.
            self.budget.release(e.0.cost);
        }
    }

    /// Validates a request and starts it. Errs only when the connection
    /// must be dropped.
    fn dispatch<R: Read>(&self, r: &mut R, req: RequestHeader) -> Result<(), String> {
        let size = self.export.size;
        let allowed = match req.kind {
            CMD_READ => CMD_FLAG_FUA | if self.neg.structured { CMD_FLAG_DF } else { 0 },
            CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => 0,
        };
        let payload = if req.kind == CMD_WRITE {
            req.len as u64
        } else {
            0
        };
        let known = matches!(
            req.kind,
            CMD_READ
                | CMD_WRITE
                | CMD_FLUSH
                | CMD_TRIM
                | CMD_CACHE
                | CMD_WRITE_ZEROES
                | CMD_BLOCK_STATUS
        );
        let end = req.offset.checked_add(req.len as u64);
        let in_bounds = end.is_some_and(|e| e <= size);
        let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        let refusal = if !known {
            Some((EINVAL, format!("unknown command {}", req.kind)))
        } else if req.flags & !allowed != 0 {
            Some((
                EINVAL,
                format!(
                    "flags {:#x} are not valid for command {}",
                    req.flags, req.kind
                ),
            ))
        } else if matches!(req.kind, CMD_READ | CMD_WRITE) && req.len > MAX_PAYLOAD {
            Some((
                EINVAL,
                format!(
                    "{} bytes is more than the maximum of {MAX_PAYLOAD}",
                    req.len
                ),
            ))
        } else if writes && self.export.read_only {
            Some((EPERM, "the export is read-only".to_string()))
        } else if req.kind != CMD_FLUSH && !in_bounds {
            let errno = if req.kind == CMD_WRITE {
                ENOSPC
            } else {
                EINVAL
            };
            Some((
                errno,
                format!(
                    "offset {} length {} is past the end of the disk ({size} bytes)",
                    req.offset, req.len
                ),
            ))
        } else if req.kind == CMD_BLOCK_STATUS
            && !(self.neg.base_allocation || self.neg.allocation_depth)
        {
            Some((EINVAL, "no metadata context was negotiated".to_string()))
        } else if req.kind == CMD_BLOCK_STATUS && req.len == 0 {
            Some((EINVAL, "block status of an empty range".to_string()))
        } else {
            None
        };
        if let Some((errno, msg)) = refusal {
            skip(r, payload).map_err(|e| format!("reading a write payload: {e}"))?;
            self.fail(&req, errno, &msg);
            return Ok(());
        }
        match req.kind {
            CMD_READ => self.read(req),
            CMD_WRITE => {
                let cost = BASE_COST + payload;
                self.budget.acquire(cost);
                let mut buf = vec![0u8; req.len as usize];
                if let Err(e) = r.read_exact(&mut buf) {
                    self.budget.release(cost);
                    return Err(format!("reading a write payload: {e}"));
                }
                let tail = self.tail(req, cost);
                self.disk
                    .submit_write_with(req.offset, buf, move |res| tail.done(res.map(|_| ())));
            }
            CMD_FLUSH => {
                let tail = self.tail(req, BASE_COST);
                self.budget.acquire(BASE_COST);
                self.disk.submit_flush_with(move |res| tail.reply_unit(res));
            }
            CMD_TRIM => {
                let tail = self.tail(req, BASE_COST);
                self.budget.acquire(BASE_COST);
                self.disk
                    .submit_discard_with(req.offset, req.len as u64, move |res| tail.done(res));
            }
            CMD_WRITE_ZEROES => {
                // Zeroes are recorded in metadata, which is always fast, so
                // FAST_ZERO is honoured; NO_HOLE only asks that the range
                // read as zeros, which it does either way.
                let tail = self.tail(req, BASE_COST);
                self.budget.acquire(BASE_COST);
                self.disk
                    .submit_zeroes_with(req.offset, req.len as u64, move |res| tail.done(res));
            }
            CMD_CACHE => {
                self.budget.acquire(BASE_COST + CACHE_PIECE);
                let tail = self.tail(req, BASE_COST + CACHE_PIECE);
                cache(
                    self.disk.clone(),
                    req.offset,
                    req.offset + req.len as u64,
                    tail,
                );
            }
            CMD_BLOCK_STATUS => self.status(req),
            _ => unreachable!("unknown commands were refused above"),
        }
        Ok(())
    }

    fn tail(&self, req: RequestHeader, cost: u64) -> Tail {
        Tail {
            req,
            cost,
            structured: self.neg.structured,
            tx: self.tx.clone(),
            budget: self.budget.clone(),
            fua: (req.flags & CMD_FLAG_FUA != 0).then(|| self.disk.clone()),
        }
    }

    fn read(&self, req: RequestHeader) {
        let cost = BASE_COST + req.len as u64;
        self.budget.acquire(cost);
        let tail = self.tail(req, cost);
        let buf = vec![0u8; req.len as usize];
        self.disk
            .submit_read_sparse_with(req.offset, buf, move |res| match res {
                Ok(read) => {
                    let reply = tail.read_reply(read);
                    tail.send(reply);
                }
                Err(e) => tail.error(&e),
            });
    }

    fn status(&self, req: RequestHeader) {
        let cluster = self.disk.cluster_size();
        let max = STATUS_MAX_CLUSTERS * cluster;
        let len = (req.len as u64).min(max - req.offset % cluster);
        self.budget.acquire(BASE_COST);
        let tail = self.tail(req, BASE_COST);
        let neg = self.neg;
        self.disk
            .submit_status_with(req.offset, len, move |res| match res {
                Ok(extents) => {
                    let mut reply = Reply::new(tail.cost);
                    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
                    let mut chunks: Vec<(u32, Vec<(u32, u32)>)> = Vec::new();
                    if neg.base_allocation {
                        chunks.push((
                            CONTEXT_BASE_ALLOCATION.0,
                            descriptors(&extents, one, base_flags),
                        ));
                    }
                    if neg.allocation_depth {
                        chunks.push((
                            CONTEXT_ALLOCATION_DEPTH.0,
                            descriptors(&extents, one, depth),
                        ));
                    }
                    let n = chunks.len();
                    for (i, (id, ds)) in chunks.into_iter().enumerate() {
                        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                        let len = 4 + 8 * ds.len() as u32;
                        chunk_header(
                            &mut reply.bytes,
                            req.cookie,
                            flags,
                            REPLY_TYPE_BLOCK_STATUS,
                            len,
                        );
                        reply.bytes.extend_from_slice(&id.to_be_bytes());
                        for (l, f) in ds {
                            reply.bytes.extend_from_slice(&l.to_be_bytes());
                            reply.bytes.extend_from_slice(&f.to_be_bytes());
                        }
                    }
                    tail.send(reply);
                }
                Err(e) => tail.error(&e),
            });
    }
}

/// The `base:allocation` flags of an extent.
fn base_flags(k: ExtentKind) -> u32 {
    match k {
        ExtentKind::Data => 0,
        ExtentKind::Backing { zero: false, .. } => 0,
        ExtentKind::Zero | ExtentKind::Backing { zero: true, .. } | ExtentKind::Unallocated => {
            STATE_HOLE | STATE_ZERO
        }
    }
}

/// The `qemu:allocation-depth` value of an extent: 1 in the overlay, 2 and
/// up in a backing image, 0 nowhere.
fn depth(k: ExtentKind) -> u32 {
    match k {
        ExtentKind::Data | ExtentKind::Zero => 1,
        ExtentKind::Backing { depth, .. } => depth + 1,
        ExtentKind::Unallocated => 0,
    }
}

/// Extents as descriptors of one context, neighbours with equal flags merged.
fn descriptors(extents: &[BlockStatus], one: bool, f: fn(ExtentKind) -> u32) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for e in extents {
        let flags = f(e.kind);
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += e.len as u32,
            _ => {
                if one && !out.is_empty() {
                    break;
                }
                out.push((e.len as u32, flags));
            }
        }
    }
    out
}

/// Populates `[pos, end)` through copy-on-read, one piece after another,
/// without sending data back; replies when done.
fn cache(disk: Disk, pos: u64, end: u64, tail: Tail) {
    if pos >= end {
        tail.done(Ok(()));
        return;
    }
    let n = (end - pos).min(CACHE_PIECE);
    let d = disk.clone();
    disk.submit_read_with(pos, vec![0u8; n as usize], move |res| match res {
        Ok(_) => cache(d, pos + n, end, tail),
        Err(e) => tail.error(&e),
    });
}

/// What a callback needs to answer a request.
struct Tail {
    req: RequestHeader,
    cost: u64,
    structured: bool,
    tx: Sender<Reply>,
    budget: Arc<Budget>,
    /// With FUA, the disk to flush before answering.
    fua: Option<Disk>,
}

impl Tail {
    fn send(&self, mut reply: Reply) {
        reply.mark_bytes();
        if let Err(e) = self.tx.send(reply) {
            self.budget.release(e.0.cost);
        }
    }

    fn error(&self, e: &Error) {
        let mut reply = Reply::new(self.cost);
        encode_error(
            &mut reply,
            self.structured,
            self.req.cookie,
            nbd_errno(e),
            &e.to_string(),
        );
        self.send(reply);
    }

    fn reply_unit(self, res: crate::Result<()>) {
        match res {
            Ok(()) => {
                let mut reply = Reply::new(self.cost);
                simple_reply(&mut reply.bytes, self.req.cookie, 0);
                self.send(reply);
            }
            Err(e) => self.error(&e),
        }
    }

    /// A write-like request finished: flush first if the client asked for
    /// FUA, then answer.
    fn done(mut self, res: crate::Result<()>) {
        match (res, self.fua.take()) {
            (Ok(()), Some(disk)) => disk.submit_flush_with(move |r| self.reply_unit(r)),
            (res, _) => self.reply_unit(res),
        }
    }

    /// Encodes a successful read: a simple reply with the data, or
    /// structured chunks with holes where the engine knew the data is zero.
    fn read_reply(&self, read: SparseRead) -> Reply {
        let mut reply = Reply::new(self.cost);
        let cookie = self.req.cookie;
        let len = read.data.len();
        reply.data = read.data;
        if !self.structured {
            simple_reply(&mut reply.bytes, cookie, 0);
            reply.push_data(0, len);
            return reply;
        }
        let df = self.req.flags & CMD_FLAG_DF != 0;
        let holes: Vec<(u64, u64)> = if df {
            Vec::new()
        } else {
            read.zeros
                .into_iter()
                .filter(|&(_, l)| l >= MIN_HOLE)
                .collect()
        };
        if len == 0 {
            chunk_header(
                &mut reply.bytes,
                cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                0,
            );
            return reply;
        }
        // Alternate data and hole chunks; the last one carries DONE.
        let mut pos = 0u64;
        let mut pieces: Vec<(bool, u64, u64)> = Vec::with_capacity(2 * holes.len() + 1);
        for (o, l) in holes {
            if o > pos {
                pieces.push((true, pos, o));
            }
            pieces.push((false, o, o + l));
            pos = o + l;
        }
        if pos < len as u64 {
            pieces.push((true, pos, len as u64));
        }
        let n = pieces.len();
        for (i, (data, s, e)) in pieces.into_iter().enumerate() {
            let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
            let at = self.req.offset + s;
            if data {
                chunk_header(
                    &mut reply.bytes,
                    cookie,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    8 + (e - s) as u32,
                );
                reply.bytes.extend_from_slice(&at.to_be_bytes());
                reply.push_data(s as usize, e as usize);
            } else {
                chunk_header(&mut reply.bytes, cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12);
                reply.bytes.extend_from_slice(&at.to_be_bytes());
                reply
                    .bytes
                    .extend_from_slice(&((e - s) as u32).to_be_bytes());
            }
        }
        reply
    }
}

fn encode_error(reply: &mut Reply, structured: bool, cookie: u64, errno: u32, msg: &str) {
    if structured {
        error_chunk(&mut reply.bytes, cookie, errno, msg);
    } else {
        simple_reply(&mut reply.bytes, cookie, errno);
    }
}

/// Reads exactly `buf.len()` bytes. Ok(false) at a clean end of stream
/// before the first byte; an end in the middle is an error.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads and drops `n` bytes (the payload of a refused write).
fn skip<R: Read>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, kind: ExtentKind) -> BlockStatus {
        BlockStatus { offset, len, kind }
    }

    #[test]
    fn descriptors_merge_equal_flags_and_honour_req_one() {
        let e = [
            ext(0, 4096, ExtentKind::Data),
            ext(
                4096,
                4096,
                ExtentKind::Backing {
                    depth: 1,
                    zero: false,
                },
            ),
            ext(8192, 4096, ExtentKind::Zero),
            ext(12288, 4096, ExtentKind::Unallocated),
        ];
        assert_eq!(
            descriptors(&e, false, base_flags),
            vec![(8192, 0), (8192, 3)]
        );
        assert_eq!(descriptors(&e, true, base_flags), vec![(8192, 0)]);
        assert_eq!(
            descriptors(&e, false, depth),
            vec![(4096, 1), (4096, 2), (4096, 1), (4096, 0)]
        );
    }

    #[test]
    fn writes_of_a_batch_cover_every_byte() {
        let budget = Budget::new();
        let mut r = Reply::new(0);
        r.bytes.extend_from_slice(b"head");
        r.data = b"0123456789".to_vec();
        r.push_data(2, 6);
        r.bytes.extend_from_slice(b"tail");
        r.mark_bytes();
        budget.acquire(0);
        let mut out = Vec::new();
        write_batch(&mut out, &[r]).unwrap();
        assert_eq!(out, b"head2345tail");
    }
}
