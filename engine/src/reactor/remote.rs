//! Remote backing reads on a core: the bridge between the fill and piece
//! state machines, which think in ring operations, and a
//! [`Medium`](crate::backing::remote::Medium) that answers on threads of its
//! own.
//!
//! A backing segment on a remote layer becomes one or more *slots* (split
//! at multiples of the medium's largest read), each completing like one
//! ring operation of its piece or fill (same token). The slots queued
//! during a loop turn are sorted and adjacent ones coalesced into
//! *batches*, one medium read each (widened to the medium's alignment),
//! when the turn submits its I/O: the fills of neighbouring missing
//! clusters that one client read starts become one remote read; slots
//! that ask for the same bytes again (a compressed cluster of a remote
//! qcow2 image larger than the overlay's clusters, which every overlay
//! cluster in it needs whole) ride on the same read. A batch's
//! result arrives as [`Msg::Remote`] in the core's inbox (with an eventfd
//! wake-up) and each slot is dispatched as a completion, exactly as the
//! ring would. A medium that places its bytes (NBD: its reader thread
//! reads them from the socket straight into the slots' buffers, which the
//! read holds as `Arc` clones, like a ring operation) has nothing to copy;
//! otherwise (HTTP) the result's bytes are copied into each slot's buffer,
//! and that buffer goes back to the medium for a later read.
//!
//! What it never does: block the core (submitting only queues), or touch a
//! local backing read: local layers never come here, so their path has no
//! extra allocation or system call.

use super::{Core, Mailbox, Msg};
use crate::backing::remote::{Placement, RemoteRead, Reply};
use crate::backing::Chain;
use crate::error::{Error, Result};
use crate::io::{Cqe, Io, IoBuf};
use slab::Slab;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// The largest read that coalescing builds out of adjacent slots: big
/// enough that one client request's fills travel as one read, small enough
/// that a long sequential burst still spreads over several connections.
pub const COALESCE_MAX_BYTES: usize = 2 << 20;

/// Posts remote results to one core's mailbox.
pub(crate) struct CoreReply(pub(super) Mailbox);

impl Reply for CoreReply {
    fn done(&self, tag: u64, result: Result<Vec<u8>>) {
        self.0.post(Msg::Remote { tag, result });
    }
}

/// One piece of a remote segment: completes as one operation of `token`.
struct Slot {
    token: u64,
    layer: usize,
    offset: u64,
    len: usize,
    buf: Arc<IoBuf>,
    buf_off: usize,
}

/// One read of a medium, covering adjacent slots.
struct Batch {
    layer: usize,
    slots: Vec<usize>,
    offset: u64,
    len: usize,
    /// The medium writes the bytes into the slots' buffers itself.
    placed: bool,
    /// The slots' bytes, each counted once (a slot that repeats another's
    /// bytes is served by the same read).
    unique: u64,
    started: Instant,
}

/// A core's remote reads: queued this turn, and in flight.
#[derive(Default)]
pub(super) struct RemoteOps {
    /// Where this core's results go; set when the core starts.
    pub(super) reply: Option<Arc<dyn Reply>>,
    slots: Slab<Slot>,
    queued: Vec<usize>,
    batches: Slab<Batch>,
    /// The error of the remote completion being dispatched, for the state
    /// machine to report instead of a bare errno.
    pub(super) error: Option<Error>,
}

impl RemoteOps {
    /// Whether remote reads are queued or in flight.
    pub(super) fn in_flight(&self) -> bool {
        !self.batches.is_empty() || !self.queued.is_empty()
    }

    /// Queues `len` bytes of remote layer `layer` at `offset` (`source`)
    /// into `buf[buf_off..]` (`dst`); each part completes as an operation
    /// of `token`. Returns how many completions will come.
    pub(super) fn push(
        &mut self,
        chain: &Chain,
        token: u64,
        source: (usize, u64),
        dst: (&Arc<IoBuf>, usize),
        len: usize,
    ) -> u32 {
        let ((layer, offset), (buf, buf_off)) = (source, dst);
        let max = chain.remote(layer).expect("a remote layer").max_read() as u64;
        let mut n = 0;
        let mut done = 0;
        while done < len {
            // Never across a multiple of `max`: a slot widened to the
            // medium's alignment (which divides `max`) still fits one read.
            let at = offset + done as u64;
            let l = (len - done).min((max - at % max) as usize);
            let id = self.slots.insert(Slot {
                token,
                layer,
                offset: offset + done as u64,
                len: l,
                buf: buf.clone(),
                buf_off: buf_off + done,
            });
            self.queued.push(id);
            done += l;
            n += 1;
        }
        n
    }
}

impl<I: Io> Core<I> {
    /// Sends the remote reads queued this turn, adjacent ones coalesced.
    pub(super) fn submit_remote(&mut self) {
        if self.remote.queued.is_empty() {
            return;
        }
        let chain = self
            .shared
            .chain
            .clone()
            .expect("remote reads need a chain");
        let mut queued = std::mem::take(&mut self.remote.queued);
        let slots = &self.remote.slots;
        queued.sort_unstable_by_key(|&id| (slots[id].layer, slots[id].offset));
        let mut i = 0;
        while i < queued.len() {
            let first = &self.remote.slots[queued[i]];
            let (layer, start) = (first.layer, first.offset);
            let medium = chain.remote(layer).expect("a remote layer").clone();
            let a = medium.alignment() as u64;
            // The aligned read that covers `[start, end)`.
            let widen = |end: u64| {
                let lo = start - start % a;
                (lo, end.next_multiple_of(a).min(medium.size()))
            };
            let limit = (medium.max_read() as u64).min(COALESCE_MAX_BYTES as u64);
            let mut end = start + first.len as u64;
            let mut last = (start, first.len);
            let mut twice = false;
            let mut unique = first.len as u64;
            let mut j = i + 1;
            while j < queued.len() {
                let s = &self.remote.slots[queued[j]];
                if s.layer != layer {
                    break;
                }
                if (s.offset, s.len) == last {
                    // The same bytes again, for another buffer: a
                    // compressed cluster of the backing image that spans
                    // several of the overlay's clusters. One read serves
                    // every copy.
                    twice = true;
                    j += 1;
                    continue;
                }
                if s.offset != end {
                    break;
                }
                let (lo, hi) = widen(end + s.len as u64);
                if hi - lo > limit {
                    break;
                }
                end += s.len as u64;
                unique += s.len as u64;
                last = (s.offset, s.len);
                j += 1;
            }
            let (offset, hi) = widen(end);
            let len = (hi - offset) as usize;
            // Placements must be disjoint: a batch that serves some bytes
            // twice has them returned, and copied into each slot.
            let placed = medium.places() && !twice;
            // A medium that places its bytes writes them into the slots'
            // buffers itself: no copy here when it answers.
            let dest = if placed {
                queued[i..j]
                    .iter()
                    .map(|&id| {
                        let s = &self.remote.slots[id];
                        Placement {
                            at: (s.offset - offset) as usize,
                            buf: s.buf.clone(),
                            buf_off: s.buf_off,
                            len: s.len,
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let tag = self.remote.batches.insert(Batch {
                layer,
                slots: queued[i..j].to_vec(),
                offset,
                len,
                placed,
                unique,
                started: Instant::now(),
            });
            medium.submit(RemoteRead {
                offset,
                len,
                tag: tag as u64,
                reply: self
                    .remote
                    .reply
                    .clone()
                    .expect("the core set its reply sink"),
                dest,
            });
            i = j;
        }
        queued.clear();
        self.remote.queued = queued;
    }

    /// A medium answered batch `tag`: fill its slots' buffers and complete
    /// them like ring operations.
    pub(super) fn remote_done(&mut self, tag: u64, result: Result<Vec<u8>>) {
        let Some(batch) = self.remote.batches.try_remove(tag as usize) else {
            debug_assert!(false, "remote completion for unknown batch {tag}");
            return;
        };
        let us = batch.started.elapsed().as_micros() as u64;
        let stats = &self.shared.stats[self.id];
        stats.remote_reads.fetch_add(1, Ordering::Relaxed);
        stats.remote_latency_us.fetch_add(us, Ordering::Relaxed);
        stats.remote_latency_max_us.fetch_max(us, Ordering::Relaxed);
        match &result {
            Ok(_) => {
                stats
                    .remote_bytes
                    .fetch_add(batch.len as u64, Ordering::Relaxed);
                stats
                    .bytes_fetched
                    .fetch_add(batch.unique, Ordering::Relaxed)
            }
            Err(e) => {
                stats.last_remote_error.record(e);
                stats.remote_errors.fetch_add(1, Ordering::Relaxed)
            }
        };
        for id in batch.slots {
            let s = self.remote.slots.remove(id);
            let res = match &result {
                Ok(_) if batch.placed => s.len as i32,
                Ok(data) => {
                    let at = (s.offset - batch.offset) as usize;
                    // SAFETY: `[buf_off, buf_off + len)` of this buffer is the
                    // target of this slot alone (the state machine gave each
                    // operation its own range), and its owner reads it only
                    // after this completion is dispatched, below.
                    unsafe { s.buf.copy_in(s.buf_off, &data[at..at + s.len]) };
                    s.len as i32
                }
                Err(e) => {
                    self.remote.error = Some(e.clone());
                    -libc::EIO
                }
            };
            self.dispatch(Cqe {
                token: s.token,
                result: res,
                buf: Some(s.buf),
            });
            self.remote.error = None;
        }
        // Every byte was copied out: the medium reuses the buffer.
        if let (Ok(data), Some(chain)) = (result, &self.shared.chain) {
            if let Some(medium) = chain.remote(batch.layer) {
                medium.recycle(data);
            }
        }
    }
}
