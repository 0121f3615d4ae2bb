//! The transmission phase of one connection, independent of transport:
//! checking requests, submitting them to the engine, and encoding replies.
//!
//! Each request is submitted with a callback; the callback encodes the
//! reply on the reactor thread that finished the request and hands it to
//! the connection's [`Sink`], so replies go out as soon as each request
//! completes, in any order. The transport (see `ring`) reads requests,
//! sends replies, and bounds what a connection holds with each request's
//! [`cost`].

use super::handshake::{Export, Negotiated};
use super::proto::*;
use crate::disk::{BlockStatus, ExtentKind, Lent, SparseRead};
use crate::{Disk, Error, ErrorKind};
use std::sync::Arc;

/// What a request without payload is charged.
pub const BASE_COST: u64 = 256;
/// Holes shorter than this are sent as data: a chunk header costs more.
const MIN_HOLE: u64 = 4096;
/// A CACHE request is populated in pieces of this size, one after another.
const CACHE_PIECE: u64 = 4 << 20;
/// Block status answers at most this many clusters per request (the spec
/// lets a server answer less than asked; the client asks again).
const STATUS_MAX_CLUSTERS: u64 = 1 << 16;

/// Where a piece of a reply comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    /// The reply's header bytes.
    Bytes,
    /// The read's data buffer.
    Data,
    /// Lent engine buffer `i` (see [`Lent`]).
    Lent(usize),
}

/// A reply's wire segments: (source, start, end) in wire order; start and
/// end are offsets into that source.
pub type Segments = Vec<(Src, usize, usize)>;

/// One encoded reply: header bytes interleaved with slices of a data buffer
/// and of buffers the engine lent.
pub struct Reply {
    /// What its request cost the connection's budget (given back once sent).
    pub cost: u64,
    bytes: Vec<u8>,
    data: Vec<u8>,
    lent: Vec<Lent>,
    segs: Segments,
    /// `bytes` up to here are in `segs`.
    marked: usize,
}

impl Reply {
    pub fn new(cost: u64) -> Reply {
        Reply {
            bytes: Vec::with_capacity(32),
            data: Vec::new(),
            lent: Vec::new(),
            segs: Vec::new(),
            marked: 0,
            cost,
        }
    }

    /// Marks the header bytes written since the last mark as a segment.
    pub fn mark_bytes(&mut self) {
        if self.bytes.len() > self.marked {
            self.segs.push((Src::Bytes, self.marked, self.bytes.len()));
            self.marked = self.bytes.len();
        }
    }

    /// The read's bytes `[start, end)`: from the lent buffers that hold
    /// them (`lent` is in order and disjoint), the rest from `data`.
    fn push_data(&mut self, start: usize, end: usize) {
        self.mark_bytes();
        let mut pos = start;
        let first = self
            .lent
            .partition_point(|l| (l.off as usize) + l.len <= start);
        for (i, l) in self.lent.iter().enumerate().skip(first) {
            let (lo, hi) = (l.off as usize, l.off as usize + l.len);
            if lo >= end {
                break;
            }
            let (lo, hi) = (lo.max(pos), hi.min(end));
            if lo > pos {
                self.segs.push((Src::Data, pos, lo));
            }
            let at = l.at + (lo - l.off as usize);
            self.segs.push((Src::Lent(i), at, at + (hi - lo)));
            pos = hi;
        }
        if pos < end {
            self.segs.push((Src::Data, pos, end));
        }
    }

    /// The header bytes, the data buffer, the lent buffers, and the
    /// segments that say how they interleave on the wire.
    pub fn into_parts(self) -> (Vec<u8>, Vec<u8>, Vec<Lent>, Segments) {
        (self.bytes, self.data, self.lent, self.segs)
    }

    /// The wire segments, in order.
    pub fn segments(&self) -> &[(Src, usize, usize)] {
        &self.segs
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.segs.iter().map(|&(_, s, e)| e - s).sum()
    }

    #[cfg(test)]
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.segs.iter().map(|&(src, s, e)| match src {
            Src::Bytes => &self.bytes[s..e],
            Src::Data => &self.data[s..e],
            Src::Lent(i) => &self.lent[i].buf.as_slice()[s..e],
        })
    }
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

/// Where a connection's replies go. Called on whatever thread finished the
/// request (a reactor thread, or the transport's for refusals).
pub type Sink = Arc<dyn Fn(Reply) + Send + Sync>;

/// What a request costs its connection's budget until its reply is sent:
/// its payload or data, plus a little for the rest.
pub fn cost(req: &RequestHeader) -> u64 {
    match req.kind {
        CMD_READ | CMD_WRITE => BASE_COST + req.len as u64,
        CMD_CACHE => BASE_COST + CACHE_PIECE,
        _ => BASE_COST,
    }
}

/// One connection's protocol state in the transmission phase.
pub struct Session {
    pub disk: Disk,
    pub export: Arc<Export>,
    pub neg: Negotiated,
    pub sink: Sink,
}

impl Session {
    /// Sends an error reply for `req` (structured when negotiated).
    pub fn refuse(&self, req: &RequestHeader, errno: u32, msg: &str) {
        let mut reply = Reply::new(BASE_COST);
        encode_error(&mut reply, self.neg.structured, req.cookie, errno, msg);
        reply.mark_bytes();
        (self.sink)(reply);
    }

    /// Why `req` must be refused (its NBD error and a message), if it must.
    /// A refused WRITE's payload is still read and dropped by the caller.
    pub fn check(&self, req: &RequestHeader) -> Option<(u32, String)> {
        let size = self.export.size;
        let allowed = match req.kind {
            CMD_READ => CMD_FLAG_FUA | if self.neg.structured { CMD_FLAG_DF } else { 0 },
            CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => return Some((EINVAL, format!("unknown command {}", req.kind))),
        };
        let in_bounds = req
            .offset
            .checked_add(req.len as u64)
            .is_some_and(|e| e <= size);
        let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if req.flags & !allowed != 0 {
            let msg = format!(
                "flags {:#x} are not valid for command {}",
                req.flags, req.kind
            );
            Some((EINVAL, msg))
        } else if matches!(req.kind, CMD_READ | CMD_WRITE) && req.len > MAX_PAYLOAD {
            let msg = format!(
                "{} bytes is more than the maximum of {MAX_PAYLOAD}",
                req.len
            );
            Some((EINVAL, msg))
        } else if writes && self.export.read_only {
            Some((EPERM, "the export is read-only".to_string()))
        } else if req.kind != CMD_FLUSH && !in_bounds {
            let errno = if req.kind == CMD_WRITE {
                ENOSPC
            } else {
                EINVAL
            };
            let msg = format!(
                "offset {} length {} is past the end of the disk ({size} bytes)",
                req.offset, req.len
            );
            Some((errno, msg))
        } else if req.kind == CMD_BLOCK_STATUS
            && !(self.neg.base_allocation || self.neg.allocation_depth)
        {
            Some((EINVAL, "no metadata context was negotiated".to_string()))
        } else if req.kind == CMD_BLOCK_STATUS && req.len == 0 {
            Some((EINVAL, "block status of an empty range".to_string()))
        } else {
            None
        }
    }

    /// Starts a request that passed `check`; `payload` is a WRITE's data,
    /// or a READ's buffer (any contents; a fresh one if its length is not
    /// the request's).
    pub fn start(&self, req: RequestHeader, payload: Vec<u8>) {
        let tail = self.tail(req);
        let len = req.len as u64;
        match req.kind {
            CMD_READ => self.read(req, payload, tail),
            CMD_WRITE => self
                .disk
                .submit_write_with(req.offset, payload, move |res| tail.done(res.map(|_| ()))),
            CMD_FLUSH => self.disk.submit_flush_with(move |res| tail.reply_unit(res)),
            CMD_TRIM => self
                .disk
                .submit_discard_with(req.offset, len, move |res| tail.done(res)),
            // Zeroes are recorded in metadata, which is always fast, so
            // FAST_ZERO is honoured; NO_HOLE only asks that the range read
            // as zeros, which it does either way.
            CMD_WRITE_ZEROES => self
                .disk
                .submit_zeroes_with(req.offset, len, move |res| tail.done(res)),
            CMD_CACHE => cache(self.disk.clone(), req.offset, req.offset + len, tail),
            CMD_BLOCK_STATUS => self.status(req, tail),
            _ => tail.error(&Error::new(ErrorKind::InvalidInput, "unknown command")),
        }
    }

    fn tail(&self, req: RequestHeader) -> Tail {
        Tail {
            req,
            cost: cost(&req),
            structured: self.neg.structured,
            sink: self.sink.clone(),
            fua: (req.flags & CMD_FLAG_FUA != 0).then(|| self.disk.clone()),
        }
    }

    fn read(&self, req: RequestHeader, mut buf: Vec<u8>, tail: Tail) {
        if buf.len() != req.len as usize {
            buf = vec![0u8; req.len as usize];
        }
        self.disk
            .submit_read_sparse_with(req.offset, buf, move |res| match res {
                Ok(read) => {
                    let reply = tail.read_reply(read);
                    tail.send(reply);
                }
                Err(e) => tail.error(&e),
            });
    }

    fn status(&self, req: RequestHeader, tail: Tail) {
        let cluster = self.disk.cluster_size();
        let max = STATUS_MAX_CLUSTERS * cluster;
        let len = (req.len as u64).min(max - req.offset % cluster);
        let neg = self.neg;
        self.disk
            .submit_status_with(req.offset, len, move |res| match res {
                Ok(extents) => {
                    let mut reply = Reply::new(tail.cost);
                    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
                    let mut chunks: Vec<(u32, Vec<(u32, u32)>)> = Vec::new();
                    if neg.base_allocation {
                        let ds = descriptors(&extents, one, base_flags);
                        chunks.push((CONTEXT_BASE_ALLOCATION.0, ds));
                    }
                    if neg.allocation_depth {
                        let ds = descriptors(&extents, one, depth);
                        chunks.push((CONTEXT_ALLOCATION_DEPTH.0, ds));
                    }
                    let n = chunks.len();
                    for (i, (id, ds)) in chunks.into_iter().enumerate() {
                        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                        let len = 4 + 8 * ds.len() as u32;
                        let kind = REPLY_TYPE_BLOCK_STATUS;
                        chunk_header(&mut reply.bytes, req.cookie, flags, kind, len);
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
    sink: Sink,
    /// With FUA, the disk to flush before answering.
    fua: Option<Disk>,
}

impl Tail {
    fn send(&self, mut reply: Reply) {
        reply.mark_bytes();
        (self.sink)(reply);
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
        reply.lent = read.lent;
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
    fn reply_slices_interleave_headers_and_data() {
        let mut r = Reply::new(0);
        r.bytes.extend_from_slice(b"head");
        r.data = b"0123456789".to_vec();
        r.push_data(2, 6);
        r.bytes.extend_from_slice(b"tail");
        r.mark_bytes();
        let out: Vec<u8> = r.slices().flatten().copied().collect();
        assert_eq!(out, b"head2345tail");
    }

    #[test]
    fn reply_data_comes_from_lent_buffers_where_they_cover_it() {
        use crate::io::IoBuf;
        let lent = |off: u64, fill: u8, at: usize, len: usize| {
            let mut b = IoBuf::zeroed(at + len + 3);
            b.as_mut_slice().fill(fill);
            Lent {
                off,
                buf: Arc::new(b),
                at,
                len,
            }
        };
        let mut r = Reply::new(0);
        r.bytes.extend_from_slice(b"H");
        // The read's 20 bytes: data buffer "a"s, except lent ranges [4, 8)
        // of "x"s and [12, 16) of "y"s.
        r.data = vec![b'a'; 20];
        r.lent = vec![lent(4, b'x', 5, 4), lent(12, b'y', 0, 4)];
        r.push_data(0, 20);
        let out: Vec<u8> = r.slices().flatten().copied().collect();
        assert_eq!(out, b"Haaaaxxxxaaaayyyyaaaa");
        let srcs: Vec<Src> = r.segments().iter().map(|s| s.0).collect();
        assert_eq!(
            srcs,
            [
                Src::Bytes,
                Src::Data,
                Src::Lent(0),
                Src::Data,
                Src::Lent(1),
                Src::Data
            ]
        );
        // A data chunk that starts and ends inside lent ranges (the holes
        // of a structured reply cut the read this way).
        let mut r = Reply::new(0);
        r.data = vec![b'a'; 20];
        r.lent = vec![lent(4, b'x', 5, 4), lent(12, b'y', 0, 4)];
        r.push_data(6, 14);
        let out: Vec<u8> = r.slices().flatten().copied().collect();
        assert_eq!(out, b"xxaaaayy");
        assert_eq!(r.len(), 8);
    }
}
