//! Keeps a fixed number of requests in flight from one thread.
//!
//! A [`Queue`] owns `depth` slots. The caller submits a request into a free
//! slot with the buffer it wants to lend the engine, and [`Queue::next_done`]
//! blocks until some request completes and hands its buffer back, so buffers
//! are recycled and the loop allocates nothing per request.
//!
//! Reads go through [`Disk::submit_read_with`]: the engine's reactor runs the
//! callback, which only sends `(slot, result)` into a crossbeam channel; the
//! completion is handled here, on the caller's thread, never inside the
//! reactor. Writes have no callback form, so they use the [`Completion`]
//! future: each slot has one [`Waker`] (built once, at construction) that
//! sends the slot number into the same channel, and the slot's future is
//! polled again when its number arrives. Wake-ups may be spurious or
//! repeated; a slot that is not ready simply stays pending.
//!
//! Invariant: a slot is busy from `submit_*` until `next_done` returns it, and
//! `in_flight()` counts busy slots. Dropping a `Queue` with requests in flight
//! is allowed (the engine still owns those buffers and completes them into a
//! channel nobody reads), but callers drain it with [`Queue::drain`] so an
//! error path leaves no work behind before the disk is closed.

use crate::{Completion, Disk, Result};
use crossbeam_channel::{Receiver, Sender};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// What arrives on the channel: a finished read, or a write slot to poll.
enum Event {
    ReadDone(usize, Result<Vec<u8>>),
    Woken(usize),
}

/// Wakes one slot's write future by sending its number to the queue.
struct SlotWaker {
    slot: usize,
    events: Sender<Event>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // The receiver lives as long as the queue; after the queue is gone,
        // nobody waits for this slot any more and the wake-up can be lost.
        let _ = self.events.send(Event::Woken(self.slot));
    }
}

/// One finished request: its slot, the offset it was submitted at, and the
/// engine's result (the buffer comes back on success).
pub struct Done {
    pub slot: usize,
    pub offset: u64,
    pub result: Result<Vec<u8>>,
}

/// Up to `depth` requests in flight on one disk, driven from one thread.
pub struct Queue<'d> {
    disk: &'d Disk,
    events_tx: Sender<Event>,
    events_rx: Receiver<Event>,
    /// Offset each busy slot was submitted at (for the caller's bookkeeping).
    offsets: Vec<u64>,
    busy: Vec<bool>,
    /// Pending write futures; `None` for reads and for free slots.
    writes: Vec<Option<Completion<Vec<u8>>>>,
    wakers: Vec<Waker>,
    /// Writes that completed on their first poll, waiting for `next_done`.
    /// Never longer than `depth`, so pushing never reallocates.
    ready: Vec<(usize, Result<Vec<u8>>)>,
    in_flight: usize,
}

impl<'d> Queue<'d> {
    /// A queue of `depth` slots on `disk`. `depth` must be at least 1.
    pub fn new(disk: &'d Disk, depth: usize) -> Queue<'d> {
        assert!(depth >= 1, "an in-flight queue needs at least one slot");
        // Unbounded is safe: at most `depth` completions plus a bounded number
        // of (possibly repeated) wake-ups per pending write are ever queued.
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let wakers = (0..depth)
            .map(|slot| {
                Waker::from(Arc::new(SlotWaker {
                    slot,
                    events: events_tx.clone(),
                }))
            })
            .collect();
        Queue {
            disk,
            events_tx,
            events_rx,
            offsets: vec![0; depth],
            busy: vec![false; depth],
            writes: (0..depth).map(|_| None).collect(),
            wakers,
            ready: Vec::with_capacity(depth),
            in_flight: 0,
        }
    }

    /// Number of slots.
    pub fn depth(&self) -> usize {
        self.busy.len()
    }

    /// Requests submitted and not yet returned by [`Queue::next_done`].
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn claim(&mut self, slot: usize, offset: u64) {
        assert!(!self.busy[slot], "slot {slot} submitted twice");
        self.busy[slot] = true;
        self.offsets[slot] = offset;
        self.in_flight += 1;
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`, in slot `slot`.
    pub fn submit_read(&mut self, slot: usize, offset: u64, buf: Vec<u8>) {
        self.claim(slot, offset);
        let events = self.events_tx.clone();
        self.disk.submit_read_with(offset, buf, move |result| {
            // Runs on a reactor thread: hand over and return at once.
            let _ = events.send(Event::ReadDone(slot, result));
        });
    }

    /// Writes `buf` at `offset`, in slot `slot`.
    pub fn submit_write(&mut self, slot: usize, offset: u64, buf: Vec<u8>) {
        self.claim(slot, offset);
        self.writes[slot] = Some(self.disk.submit_write(offset, buf));
        // A future registers its waker only when polled: poll once now, so
        // the engine knows whom to wake. A write that is already done is
        // parked in `ready` for `next_done` to return.
        if let Some(result) = self.poll_write(slot) {
            self.ready.push((slot, result));
        }
    }

    /// Blocks until a request completes and returns it, or returns `None`
    /// when nothing is in flight.
    pub fn next_done(&mut self) -> Option<Done> {
        if self.in_flight == 0 {
            return None;
        }
        loop {
            if let Some((slot, result)) = self.ready.pop() {
                return Some(self.release(slot, result));
            }
            // The queue holds a sender itself, so the channel never
            // disconnects while we wait.
            let event = self
                .events_rx
                .recv()
                .expect("the queue keeps its own sender alive");
            match event {
                Event::ReadDone(slot, result) => return Some(self.release(slot, result)),
                Event::Woken(slot) => {
                    if let Some(result) = self.poll_write(slot) {
                        return Some(self.release(slot, result));
                    }
                    // Spurious, repeated or stale (the slot's write was
                    // already collected): keep waiting.
                }
            }
        }
    }

    /// Waits for every request in flight, discarding results. Used on error
    /// paths, so the disk can be closed with no request of ours pending.
    pub fn drain(&mut self) {
        while self.next_done().is_some() {}
    }

    /// Polls slot `slot`'s write future; `Some` (and the slot's future is
    /// dropped, never polled again) once it finished.
    fn poll_write(&mut self, slot: usize) -> Option<Result<Vec<u8>>> {
        let future = self.writes[slot].as_mut()?;
        let mut cx = Context::from_waker(&self.wakers[slot]);
        match Pin::new(future).poll(&mut cx) {
            Poll::Ready(result) => {
                self.writes[slot] = None;
                Some(result)
            }
            Poll::Pending => None,
        }
    }

    fn release(&mut self, slot: usize, result: Result<Vec<u8>>) -> Done {
        assert!(self.busy[slot], "completion for idle slot {slot}");
        self.busy[slot] = false;
        self.in_flight -= 1;
        Done {
            slot,
            offset: self.offsets[slot],
            result,
        }
    }
}
