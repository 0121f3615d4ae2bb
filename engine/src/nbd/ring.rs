//! The NBD transport on the reactors: each connection lives on one core,
//! which receives its requests and sends its replies with RECV and SEND
//! operations on that core's io_uring, batched with the engine's own I/O
//! in the same loop turn.
//!
//! Receiving: one RECV at a time into the connection's buffer; every whole
//! request in it is started at once (a WRITE's payload is gathered first).
//! Sending: replies arrive from whichever core finished their request (as
//! a task on this core's inbox) and queue; one SEND at a time carries as
//! many queued replies as fit in the send buffer. Their headers and short
//! data are copied into it; read data of [`ZERO_COPY_MIN`] bytes or more
//! goes out of the buffer that holds it, as a piece of a vectored send
//! (SENDMSG): the engine buffer the core lent the reply (a fill's, the
//! readahead's, an overlay read's: see `request::Lent`), or the reply's
//! own data buffer. A large read is never copied in user space on its way
//! to the client, from the disk or from a remote backing medium (which
//! reads its reply straight into the fill's buffer).
//!
//! Bounds: a connection holds at most [`BUDGET_BYTES`] of requests and
//! replies and [`BUDGET_REQUESTS`] requests; past that it stops receiving
//! until replies are sent, so a client that does not read its replies
//! stalls only itself.

use super::conn::{cost, Reply, Session, Src, BASE_COST};
use super::proto::*;
use super::Registration;
use crate::io::{IoBuf, Op, Spares};
use crate::reactor::{FrontCtx, Frontend};
use std::collections::VecDeque;
use std::sync::Arc;

/// Bytes of requests and replies one connection may hold in memory.
pub const BUDGET_BYTES: u64 = 64 << 20;
/// Requests one connection may have in flight.
pub const BUDGET_REQUESTS: u64 = 1024;
/// Receive buffer of a connection.
const RX_BYTES: usize = 256 << 10;
/// Send buffer of a connection (a larger reply gets a buffer of its size).
const TX_BYTES: usize = 256 << 10;
/// Data segments of a reply at least this long are sent from the reply's
/// own buffer instead of a copy in the send buffer.
pub const ZERO_COPY_MIN: usize = 16 << 10;
/// Pieces one vectored send carries at most (well below IOV_MAX).
const SEND_PIECES: usize = 64;

const TOKEN_RECV: u64 = 0;
const TOKEN_SEND: u64 = 1;

/// Bytes of spare read buffers a connection keeps at most: a read reuses
/// one of its sent replies' buffers instead of allocating (and zeroing) a
/// new one; the engine writes every byte of a read's buffer.
const SPARE_BYTES: usize = 8 << 20;

#[derive(Default)]
pub struct Connections {
    conns: slab::Slab<Conn>,
}

struct Conn {
    /// The socket; closed when the connection is dropped.
    stream: super::Stream,
    fd: i32,
    /// The server's registry entry, removed when the connection is dropped.
    _reg: Registration,
    session: Session,
    rx: Arc<IoBuf>,
    rx_lo: usize,
    rx_hi: usize,
    recv_pending: bool,
    /// A WRITE whose payload is still arriving: header, data so far.
    partial: Option<(RequestHeader, Vec<u8>)>,
    /// Payload bytes of a refused WRITE still to drop.
    skip: u64,
    out: VecDeque<Reply>,
    /// Data buffers of sent read replies, for the next reads.
    spare: Spares,
    tx: Arc<IoBuf>,
    /// What the send in flight still has to send: ranges of `tx` and of
    /// reply buffers, in wire order. A reply buffer goes back to `spare`
    /// once its last range is sent.
    tx_iov: Vec<(Arc<IoBuf>, usize, usize)>,
    /// Cost of the replies in `tx`, given back when it has been sent.
    tx_cost: u64,
    tx_count: u64,
    send_pending: bool,
    used_bytes: u64,
    used_reqs: u64,
    /// False after end of stream, DISC, a protocol violation or an error.
    reading: bool,
    /// Sending failed: the client is gone; replies are dropped.
    dead: bool,
}

impl Frontend for Connections {
    fn completion(&mut self, token: u64, result: i32, ctx: &mut FrontCtx) {
        let id = (token >> 1) as usize;
        if !self.conns.contains(id) {
            return;
        }
        if token & 1 == TOKEN_RECV {
            self.received(id, result, ctx);
        } else {
            self.sent(id, result, ctx);
        }
        self.maybe_close(id);
    }

    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The connections on the core that runs `ctx`, made on first use.
fn on_core(slot: &mut Option<Box<dyn Frontend>>) -> &mut Connections {
    let f = slot.get_or_insert_with(|| Box::new(Connections::default()));
    f.as_any()
        .downcast_mut::<Connections>()
        .expect("the core's frontend is the NBD server")
}

/// Hands a connection that finished its handshake to core `core`.
pub fn adopt(
    stream: super::Stream,
    reg: Registration,
    make_session: impl FnOnce(super::conn::Sink) -> Session + Send + 'static,
    disk: &crate::Disk,
    core: usize,
) {
    let d = disk.clone();
    disk.run_on_core(
        core,
        Box::new(move |slot, ctx| {
            let conns = on_core(slot);
            let entry = conns.conns.vacant_entry();
            let id = entry.key();
            let core = ctx.core;
            // Replies come back to this core as tasks on its inbox.
            let sink: super::conn::Sink = Arc::new(move |reply: Reply| {
                d.run_on_core(
                    core,
                    Box::new(move |slot, ctx| on_core(slot).deliver(id, reply, ctx)),
                )
            });
            let fd = stream.raw_fd();
            entry.insert(Conn {
                stream,
                fd,
                _reg: reg,
                session: make_session(sink),
                rx: Arc::new(IoBuf::zeroed(RX_BYTES)),
                rx_lo: 0,
                rx_hi: 0,
                recv_pending: false,
                partial: None,
                skip: 0,
                out: VecDeque::new(),
                spare: Spares::new(SPARE_BYTES),
                tx: Arc::new(IoBuf::zeroed(TX_BYTES)),
                tx_iov: Vec::new(),
                tx_cost: 0,
                tx_count: 0,
                send_pending: false,
                used_bytes: 0,
                used_reqs: 0,
                reading: true,
                dead: false,
            });
            conns.arm_recv(id, ctx);
        }),
    );
}

impl Connections {
    /// A reply from whichever core finished the request.
    fn deliver(&mut self, id: usize, reply: Reply, ctx: &mut FrontCtx) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.dead {
            c.release(reply.cost, 1);
        } else {
            c.out.push_back(reply);
            c.flush(id, ctx);
        }
        // Budget came back: take more requests.
        self.resume(id, ctx);
        self.maybe_close(id);
    }

    fn arm_recv(&mut self, id: usize, ctx: &mut FrontCtx) {
        let c = &mut self.conns[id];
        if c.recv_pending || !c.reading || c.over_budget() {
            return;
        }
        if c.rx_hi == RX_BYTES {
            // Full of unparsed bytes only while over budget; parse first.
            return;
        }
        c.recv_pending = true;
        let op = Op::recv(c.fd, c.rx.clone(), c.rx_hi, RX_BYTES - c.rx_hi);
        ctx.push((id as u64) << 1 | TOKEN_RECV, op);
    }

    fn received(&mut self, id: usize, result: i32, ctx: &mut FrontCtx) {
        let c = &mut self.conns[id];
        c.recv_pending = false;
        if result <= 0 {
            // End of stream (or the server shut the socket for reading),
            // or an error: take no more requests.
            if result < 0 && result != -libc::ECONNRESET {
                let e = std::io::Error::from_raw_os_error(-result);
                eprintln!("backfill serve: receiving from a client: {e}");
            }
            if c.partial.is_some() || c.rx_lo < c.rx_hi {
                eprintln!("backfill serve: a client went away in the middle of a request");
            }
            c.stop_reading();
            return;
        }
        c.rx_hi += result as usize;
        self.resume(id, ctx);
    }

    /// Parses and starts what the receive buffer holds, then receives more.
    fn resume(&mut self, id: usize, ctx: &mut FrontCtx) {
        let c = &mut self.conns[id];
        if c.reading {
            c.parse();
        }
        self.arm_recv(id, ctx);
    }

    fn sent(&mut self, id: usize, result: i32, ctx: &mut FrontCtx) {
        let c = &mut self.conns[id];
        c.send_pending = false;
        if result <= 0 {
            if result != -libc::EPIPE && result != -libc::ECONNRESET {
                let e = std::io::Error::from_raw_os_error(-result);
                eprintln!("backfill serve: sending to a client: {e}");
            }
            c.kill();
            return;
        }
        // Drop what was sent; a short send goes on with the rest.
        let mut n = result as usize;
        let mut whole = 0;
        for piece in c.tx_iov.iter_mut() {
            if n < piece.2 {
                piece.1 += n;
                piece.2 -= n;
                break;
            }
            n -= piece.2;
            whole += 1;
        }
        for (b, _, _) in c.tx_iov.drain(..whole) {
            // The last range of a reply buffer (`tx` itself never unwraps).
            if let Some(v) = Arc::try_unwrap(b).ok().and_then(IoBuf::into_vec) {
                c.spare.give(v);
            }
        }
        if !c.tx_iov.is_empty() {
            c.push_send(id, ctx);
            return;
        }
        let (cost, n) = (c.tx_cost, c.tx_count);
        c.tx_cost = 0;
        c.tx_count = 0;
        c.release(cost, n);
        c.flush(id, ctx);
        self.resume(id, ctx);
    }

    /// Closes a connection that takes no more requests and has nothing in
    /// flight; its socket closes with it.
    fn maybe_close(&mut self, id: usize) {
        let Some(c) = self.conns.get(id) else {
            return;
        };
        if c.reading || c.recv_pending || c.send_pending || c.used_reqs > 0 {
            return;
        }
        // Its registration goes with it.
        self.conns.remove(id);
    }
}

/// How reply `r` goes out: the bytes copied into the send buffer, how many
/// of its data segments are sent from its own data buffer, and how many
/// from lent buffers (none of either when there are too many pieces for one
/// vectored send: then everything is copied).
fn plan(r: &Reply) -> (usize, usize, usize) {
    let (mut copied, mut data, mut lent) = (0, 0, 0);
    for &(src, s, e) in r.segments() {
        match src {
            Src::Data if e - s >= ZERO_COPY_MIN => data += 1,
            Src::Lent(_) if e - s >= ZERO_COPY_MIN => lent += 1,
            _ => copied += e - s,
        }
    }
    let big = data + lent;
    if big == 0 || 2 * big + 1 > SEND_PIECES {
        return (r.len(), 0, 0);
    }
    (copied, data, lent)
}

impl Conn {
    fn over_budget(&self) -> bool {
        self.used_bytes >= BUDGET_BYTES || self.used_reqs >= BUDGET_REQUESTS
    }

    fn charge(&mut self, cost: u64) {
        self.used_bytes += cost;
        self.used_reqs += 1;
    }

    fn release(&mut self, cost: u64, n: u64) {
        self.used_bytes -= cost;
        self.used_reqs -= n;
    }

    /// Takes no more requests; a WRITE whose payload never came is dropped.
    fn stop_reading(&mut self) {
        self.reading = false;
        if let Some((req, _)) = self.partial.take() {
            self.release(cost(&req), 1);
        }
    }

    /// The client is gone: drop queued replies and take no more requests.
    fn kill(&mut self) {
        self.dead = true;
        self.stop_reading();
        let (cost, n) = (self.tx_cost, self.tx_count);
        self.tx_cost = 0;
        self.tx_count = 0;
        self.tx_iov.clear();
        self.release(cost, n);
        while let Some(r) = self.out.pop_front() {
            self.release(r.cost, 1);
        }
        self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// A protocol violation: answer nothing more, drop the connection once
    /// the requests in flight are done.
    fn violation(&mut self, why: &str) {
        eprintln!("backfill serve: dropping a client: {why}");
        self.reading = false;
        self.stream.shutdown(std::net::Shutdown::Read);
    }

    /// Starts every whole request in the receive buffer, while the budget
    /// allows.
    fn parse(&mut self) {
        while self.reading && !self.over_budget() {
            let avail = self.rx_hi - self.rx_lo;
            if self.skip > 0 {
                let n = (self.skip as usize).min(avail);
                self.rx_lo += n;
                self.skip -= n as u64;
                if self.skip > 0 {
                    break;
                }
                continue;
            }
            if let Some((req, mut data)) = self.partial.take() {
                let want = req.len as usize - data.len();
                let n = want.min(avail);
                data.extend_from_slice(&self.rx.as_slice()[self.rx_lo..self.rx_lo + n]);
                self.rx_lo += n;
                if n < want {
                    self.partial = Some((req, data));
                    break;
                }
                self.session.start(req, data);
                continue;
            }
            if avail < REQUEST_HEADER_LEN {
                break;
            }
            let head: &[u8; REQUEST_HEADER_LEN] = self.rx.as_slice()
                [self.rx_lo..self.rx_lo + REQUEST_HEADER_LEN]
                .try_into()
                .expect("header length");
            let Some(req) = RequestHeader::parse(head) else {
                self.violation("bad request magic");
                break;
            };
            self.rx_lo += REQUEST_HEADER_LEN;
            if req.kind == CMD_DISC {
                // Answer what is in flight, then close; a receive still
                // pending ends now.
                self.reading = false;
                self.stream.shutdown(std::net::Shutdown::Read);
                break;
            }
            if let Some((errno, msg)) = self.session.check(&req) {
                if req.kind == CMD_WRITE {
                    self.skip = req.len as u64;
                }
                self.charge(BASE_COST);
                self.session.refuse(&req, errno, &msg);
                continue;
            }
            self.charge(cost(&req));
            if req.kind == CMD_WRITE && req.len > 0 {
                self.partial = Some((req, Vec::with_capacity(req.len as usize)));
            } else if req.kind == CMD_READ {
                let buf = self.spare.take(req.len as usize);
                self.session.start(req, buf);
            } else {
                self.session.start(req, Vec::new());
            }
        }
        // Keep the unparsed bytes at the front of the buffer (not while a
        // receive is writing behind them).
        if self.recv_pending {
            return;
        }
        if self.rx_lo == self.rx_hi {
            self.rx_lo = 0;
            self.rx_hi = 0;
        } else if self.rx_lo > 0 {
            let (lo, hi) = (self.rx_lo, self.rx_hi);
            IoBuf::unique_mut(&mut self.rx).copy_within(lo..hi, 0);
            self.rx_lo = 0;
            self.rx_hi = hi - lo;
        }
    }

    /// Sends queued replies, if no send is in flight.
    fn flush(&mut self, id: usize, ctx: &mut FrontCtx) {
        if self.send_pending || self.dead || self.out.is_empty() {
            return;
        }
        let first = self.out.front().map_or(0, |r| plan(r).0);
        if first > self.tx.len() {
            self.tx = Arc::new(IoBuf::zeroed(first.next_power_of_two()));
        } else if self.tx.len() > TX_BYTES && first <= TX_BYTES {
            // Back to the usual size after a large reply.
            self.tx = Arc::new(IoBuf::zeroed(TX_BYTES));
        }
        let cap = self.tx.len();
        let buf = IoBuf::unique_mut(&mut self.tx);
        // Ranges of `tx` (None) and of reply or lent buffers, in wire order.
        let mut pieces: Vec<(Option<Arc<IoBuf>>, usize, usize)> = Vec::new();
        let (mut at, mut run) = (0, 0);
        while let Some(r) = self.out.front() {
            let (copied, big_data, big_lent) = plan(r);
            let big = big_data + big_lent;
            if at + copied > cap || pieces.len() + 2 * big + 1 > SEND_PIECES {
                break;
            }
            let r = self.out.pop_front().expect("front exists");
            self.tx_cost += r.cost;
            self.tx_count += 1;
            let (bytes, mut data, lent, segs) = r.into_parts();
            // Only a reply with data to send from its buffer shares it.
            let shared =
                (big_data > 0).then(|| Arc::new(IoBuf::from_vec(std::mem::take(&mut data))));
            let data_bytes = shared.as_deref().map_or(&data[..], IoBuf::as_slice);
            for (src, s, e) in segs {
                let from = match src {
                    Src::Data if big > 0 && e - s >= ZERO_COPY_MIN => shared.clone(),
                    Src::Lent(i) if big > 0 && e - s >= ZERO_COPY_MIN => Some(lent[i].buf.clone()),
                    _ => None,
                };
                if let Some(b) = from {
                    if at > run {
                        pieces.push((None, run, at - run));
                        run = at;
                    }
                    pieces.push((Some(b), s, e - s));
                    continue;
                }
                let src = match src {
                    Src::Bytes => &bytes[s..e],
                    Src::Data => &data_bytes[s..e],
                    Src::Lent(i) => &lent[i].buf.as_slice()[s..e],
                };
                buf[at..at + src.len()].copy_from_slice(src);
                at += src.len();
            }
            if shared.is_none() {
                self.spare.give(data);
            }
        }
        if at > run {
            pieces.push((None, run, at - run));
        }
        self.tx_iov = pieces
            .into_iter()
            .map(|(b, off, len)| (b.unwrap_or_else(|| self.tx.clone()), off, len))
            .collect();
        self.push_send(id, ctx);
    }

    fn push_send(&mut self, id: usize, ctx: &mut FrontCtx) {
        self.send_pending = true;
        let op = match &self.tx_iov[..] {
            [(b, off, len)] => Op::send(self.fd, b.clone(), *off, *len),
            _ => Op::send_vectored(self.fd, self.tx_iov.clone()),
        };
        ctx.push((id as u64) << 1 | TOKEN_SEND, op);
    }
}
