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
//! The queue is generic over [`Submit`], implemented by [`Disk`], so its
//! bookkeeping is tested against a fake that completes out of order and
//! wakes spuriously.
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

/// The two ways of starting a request that the queue uses: [`Disk`]'s.
pub trait Submit {
    /// The future a write returns; `Unpin` so a slot can poll it in place.
    type Write: Future<Output = Result<Vec<u8>>> + Unpin;

    /// Starts a read into `buf`; `done` runs (on any thread) when it ends.
    fn submit_read_with<F>(&self, offset: u64, buf: Vec<u8>, done: F)
    where
        F: FnOnce(Result<Vec<u8>>) + Send + 'static;

    /// Starts a write of `buf`.
    fn submit_write(&self, offset: u64, buf: Vec<u8>) -> Self::Write;
}

impl Submit for Disk {
    type Write = Completion<Vec<u8>>;

    fn submit_read_with<F>(&self, offset: u64, buf: Vec<u8>, done: F)
    where
        F: FnOnce(Result<Vec<u8>>) + Send + 'static,
    {
        Disk::submit_read_with(self, offset, buf, done)
    }

    fn submit_write(&self, offset: u64, buf: Vec<u8>) -> Completion<Vec<u8>> {
        Disk::submit_write(self, offset, buf)
    }
}

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
pub struct Queue<'d, D: Submit = Disk> {
    disk: &'d D,
    events_tx: Sender<Event>,
    events_rx: Receiver<Event>,
    /// Offset each busy slot was submitted at (for the caller's bookkeeping).
    offsets: Vec<u64>,
    busy: Vec<bool>,
    /// Pending write futures; `None` for reads and for free slots.
    writes: Vec<Option<D::Write>>,
    wakers: Vec<Waker>,
    /// Writes that completed on their first poll, waiting for `next_done`.
    /// Never longer than `depth`, so pushing never reallocates.
    ready: Vec<(usize, Result<Vec<u8>>)>,
    in_flight: usize,
}

impl<'d, D: Submit> Queue<'d, D> {
    /// A queue of `depth` slots on `disk`. `depth` must be at least 1.
    pub fn new(disk: &'d D, depth: usize) -> Queue<'d, D> {
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
        self.take_done(true)
    }

    /// Returns a completed request if one is waiting, without blocking.
    pub fn try_next_done(&mut self) -> Option<Done> {
        self.take_done(false)
    }

    fn take_done(&mut self, block: bool) -> Option<Done> {
        if self.in_flight == 0 {
            return None;
        }
        loop {
            if let Some((slot, result)) = self.ready.pop() {
                return Some(self.release(slot, result));
            }
            let event = if block {
                // The queue holds a sender itself, so the channel never
                // disconnects while we wait.
                self.events_rx
                    .recv()
                    .expect("the queue keeps its own sender alive")
            } else {
                self.events_rx.try_recv().ok()?
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorKind};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::sync::Mutex;

    /// A write's shared state: its result once done, and whom to wake.
    #[derive(Default)]
    struct WriteState {
        result: Option<Result<Vec<u8>>>,
        waker: Option<Waker>,
    }

    struct FakeWrite(Arc<Mutex<WriteState>>);

    impl Future for FakeWrite {
        type Output = Result<Vec<u8>>;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Vec<u8>>> {
            let mut state = self.0.lock().unwrap();
            match state.result.take() {
                Some(result) => Poll::Ready(result),
                None => {
                    state.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }

    type Pending = Box<dyn FnOnce() + Send>;

    /// Holds every request until `complete_some` finishes a random subset,
    /// in random order; completes some writes at once (ready on first
    /// poll); wakes some writes twice. Reads return their buffer filled
    /// with the low byte of the offset; a read at `fail_at` fails.
    struct Fake {
        pending: Mutex<Vec<Pending>>,
        rng: Mutex<StdRng>,
        fail_at: Option<u64>,
    }

    impl Fake {
        fn new(seed: u64, fail_at: Option<u64>) -> Fake {
            Fake {
                pending: Mutex::new(Vec::new()),
                rng: Mutex::new(StdRng::seed_from_u64(seed)),
                fail_at,
            }
        }

        /// Completes between one and all pending requests, in random order;
        /// false when none was pending.
        fn complete_some(&self) -> bool {
            let mut pending = self.pending.lock().unwrap();
            let mut rng = self.rng.lock().unwrap();
            if pending.is_empty() {
                return false;
            }
            let n = rng.random_range(1..=pending.len());
            let mut chosen = Vec::new();
            for _ in 0..n {
                let i = rng.random_range(0..pending.len());
                chosen.push(pending.swap_remove(i));
            }
            drop((pending, rng));
            for complete in chosen {
                complete();
            }
            true
        }
    }

    impl Submit for Fake {
        type Write = FakeWrite;

        fn submit_read_with<F>(&self, offset: u64, mut buf: Vec<u8>, done: F)
        where
            F: FnOnce(Result<Vec<u8>>) + Send + 'static,
        {
            let fail = self.fail_at == Some(offset);
            self.pending.lock().unwrap().push(Box::new(move || {
                if fail {
                    done(Err(Error::new(ErrorKind::Io, "injected")));
                } else {
                    buf.fill(offset as u8);
                    done(Ok(buf));
                }
            }));
        }

        fn submit_write(&self, _offset: u64, buf: Vec<u8>) -> FakeWrite {
            let state = Arc::new(Mutex::new(WriteState::default()));
            let (now, twice) = {
                let mut rng = self.rng.lock().unwrap();
                (rng.random_ratio(1, 4), rng.random_ratio(1, 4))
            };
            if now {
                state.lock().unwrap().result = Some(Ok(buf));
            } else {
                let shared = state.clone();
                self.pending.lock().unwrap().push(Box::new(move || {
                    let waker = {
                        let mut s = shared.lock().unwrap();
                        s.result = Some(Ok(buf));
                        s.waker.take()
                    };
                    let waker = waker.expect("a pending write was polled once");
                    if twice {
                        waker.wake_by_ref();
                    }
                    waker.wake();
                }));
            }
            FakeWrite(state)
        }
    }

    /// Drives `count` requests through a queue of `depth`, completing the
    /// fake's requests whenever the queue would otherwise block.
    fn drive(fake: &Fake, depth: usize, count: u64, write: bool) -> Result<Vec<u64>> {
        let mut queue = Queue::new(fake, depth);
        let mut done_offsets = Vec::new();
        let mut submitted = 0;
        for slot in 0..depth {
            if submitted == count {
                break;
            }
            let buf = vec![0u8; 16];
            if write {
                queue.submit_write(slot, submitted * 16, buf);
            } else {
                queue.submit_read(slot, submitted * 16, buf);
            }
            submitted += 1;
        }
        while queue.in_flight() > 0 {
            // Never block: collect what is done, else let the fake complete
            // more. A request in flight that neither is done nor pending in
            // the fake would be a lost completion.
            let done = match queue.try_next_done() {
                Some(done) => done,
                None => {
                    assert!(fake.complete_some(), "a request was lost");
                    continue;
                }
            };
            let buf = match done.result {
                Ok(buf) => buf,
                Err(e) => {
                    while queue.in_flight() > 0 {
                        if queue.try_next_done().is_none() {
                            assert!(fake.complete_some(), "a request was lost");
                        }
                    }
                    return Err(e);
                }
            };
            assert_eq!(buf.len(), 16, "the buffer comes back whole");
            if !write {
                assert!(
                    buf.iter().all(|&b| b == done.offset as u8),
                    "slot kept its offset"
                );
            }
            done_offsets.push(done.offset);
            if submitted < count {
                if write {
                    queue.submit_write(done.slot, submitted * 16, buf);
                } else {
                    queue.submit_read(done.slot, submitted * 16, buf);
                }
                submitted += 1;
            }
        }
        assert!(queue.next_done().is_none());
        assert!(!fake.complete_some(), "nothing left behind in the fake");
        Ok(done_offsets)
    }

    #[test]
    fn every_request_completes_once_in_any_order() {
        for seed in 0..50 {
            for (depth, write) in [(1, false), (4, false), (7, true), (1, true), (16, true)] {
                let fake = Fake::new(seed, None);
                let mut got =
                    drive(&fake, depth, 200, write).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                got.sort_unstable();
                let want: Vec<u64> = (0..200).map(|i| i * 16).collect();
                assert_eq!(got, want, "seed {seed} depth {depth} write {write}");
            }
        }
    }

    #[test]
    fn fewer_requests_than_slots() {
        let fake = Fake::new(1, None);
        assert_eq!(drive(&fake, 8, 3, false).unwrap().len(), 3);
        assert_eq!(drive(&fake, 8, 0, true).unwrap().len(), 0);
    }

    #[test]
    fn an_error_is_returned_and_the_rest_drained() {
        let fake = Fake::new(3, Some(37 * 16));
        let err = drive(&fake, 4, 100, false).unwrap_err();
        assert_eq!(err.message(), "injected");
    }
}
