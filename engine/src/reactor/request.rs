//! Requests crossing from client threads to reactors, and their completion.
//!
//! A client request is split by the router into parts (one per stripe); each
//! part goes to its owning core. The request counts its parts down; the core
//! that finishes the last part completes it: it wakes a blocked thread or a
//! `Future`'s waker, or calls a callback.

use crate::disk::BlockStatus;
use crate::error::{Error, ErrorKind, Result};
use crate::io::IoBuf;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

/// Bytes of a read's result that stay in an engine buffer instead of being
/// copied into the request's buffer: the read's bytes `[off, off + len)`
/// are `buf[at..at + len]`. The buffer's contents are final; the core that
/// lent it takes it back into its pool once every clone is dropped.
#[derive(Clone, Debug)]
pub struct Lent {
    pub off: u64,
    pub buf: Arc<IoBuf>,
    pub at: usize,
    pub len: usize,
}

impl Lent {
    /// The lent bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[self.at..self.at + self.len]
    }
}

/// Reads into a sparse request's buffer of at least this many bytes are
/// lent rather than copied: below it a copy costs less than a buffer
/// reference and a piece of a vectored send.
pub const LEND_MIN: usize = 16 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqKind {
    Read,
    Write,
    /// Write-zeroes: the range reads as zeros after it.
    Zero,
    /// Discard: reads as zeros after it too (over a backing image it must,
    /// or old backing data would show), and whole clusters are freed.
    Discard,
    /// Block status query.
    Status,
    /// Populate: copy-on-read the range's unallocated clusters into the
    /// overlay without returning data; completes once their write-backs
    /// landed (the streaming job's request).
    Populate,
    /// Flush: every core commits and syncs.
    Flush,
    /// Close: flush, hand back reserved clusters, stop.
    Close,
}

/// Called once, on the reactor thread that finishes the request, with the
/// finished request (its result, status extents and zero ranges).
pub type Callback = Box<dyn FnOnce(&Request) + Send>;

enum Notify {
    Wait {
        state: Mutex<WaitState>,
        cv: Condvar,
    },
    Callback(Mutex<Option<Callback>>),
}

#[derive(Default)]
struct WaitState {
    done: bool,
    waker: Option<Waker>,
}

pub struct Request {
    pub kind: ReqKind,
    /// Read destination or write source.
    pub buf: Mutex<Vec<u8>>,
    pub status: Mutex<Vec<BlockStatus>>,
    /// Ranges of a read (offsets into `buf`) that the engine knew to be
    /// zero without reading anything, when the caller asked for them.
    pub zeros: Option<Mutex<Vec<(u64, u64)>>>,
    /// Ranges of a read left in engine buffers instead of copied into
    /// `buf` (whose bytes there are unspecified), when the caller asked.
    pub lent: Option<Mutex<Vec<Lent>>>,
    remaining: AtomicUsize,
    error: Mutex<Option<Error>>,
    notify: Notify,
    in_flight: Option<Arc<AtomicU64>>,
    /// For a populate: a decompressed backing cluster its fills take their
    /// bytes from (`Core::fill_siblings`).
    pub seed: Option<Seed>,
}

/// A decompressed backing cluster, by its key in `Core::inflated`.
pub type Seed = ((usize, u64), Arc<crate::io::IoBuf>);

impl Request {
    fn build(
        kind: ReqKind,
        buf: Vec<u8>,
        parts: usize,
        notify: Notify,
        in_flight: Option<Arc<AtomicU64>>,
        sparse: bool,
    ) -> Arc<Request> {
        Arc::new(Request {
            kind,
            buf: Mutex::new(buf),
            status: Mutex::new(Vec::new()),
            zeros: sparse.then(|| Mutex::new(Vec::new())),
            lent: sparse.then(|| Mutex::new(Vec::new())),
            remaining: AtomicUsize::new(parts),
            error: Mutex::new(None),
            notify,
            in_flight,
            seed: None,
        })
    }

    fn waited() -> Notify {
        Notify::Wait {
            state: Mutex::new(WaitState::default()),
            cv: Condvar::new(),
        }
    }

    /// A request completed by waiting on it (blocking or as a `Future`).
    pub fn new(kind: ReqKind, buf: Vec<u8>, parts: usize) -> Arc<Request> {
        Request::build(kind, buf, parts, Request::waited(), None, false)
    }

    /// A request completed by calling `cb` on the reactor thread that
    /// finishes it. A `sparse` read also records the ranges it knew to be
    /// zero (see `zeros`) and leaves large ranges in the engine's buffers
    /// (see `lent`) instead of copying them into its buffer.
    pub fn with_callback(
        kind: ReqKind,
        buf: Vec<u8>,
        parts: usize,
        cb: Callback,
        in_flight: Option<Arc<AtomicU64>>,
        sparse: bool,
    ) -> Arc<Request> {
        let notify = Notify::Callback(Mutex::new(Some(cb)));
        Request::build(kind, buf, parts, notify, in_flight, sparse)
    }

    /// Lends `buf[at..at + len]` as the read's bytes at `off` instead of
    /// copying them into the buffer, if the request takes lent ranges and
    /// the range is worth it; returns whether it did (only then is `buf`
    /// shared).
    pub fn lend(&self, off: u64, buf: &Arc<IoBuf>, at: usize, len: usize) -> bool {
        match &self.lent {
            Some(l) if len >= LEND_MIN => {
                l.lock().unwrap_or_else(|p| p.into_inner()).push(Lent {
                    off,
                    buf: buf.clone(),
                    at,
                    len,
                });
                true
            }
            _ => false,
        }
    }

    /// Records that `[off, off + len)` of the buffer reads as zeros.
    pub fn note_zeros(&self, off: u64, len: u64) {
        if let Some(z) = &self.zeros {
            z.lock().unwrap_or_else(|p| p.into_inner()).push((off, len));
        }
    }

    /// A blocking/future request counted in `in_flight` until it completes.
    pub fn counted(
        kind: ReqKind,
        buf: Vec<u8>,
        parts: usize,
        in_flight: Arc<AtomicU64>,
    ) -> Arc<Request> {
        Request::build(kind, buf, parts, Request::waited(), Some(in_flight), false)
    }

    /// Records the first error of the request.
    pub fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// One part is finished (with `err` if it failed). The last one completes
    /// the request.
    pub fn finish_part(self: &Arc<Request>, err: Option<Error>) {
        if let Some(e) = err {
            self.fail(e);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if let Some(n) = &self.in_flight {
            n.fetch_sub(1, Ordering::Relaxed);
        }
        match &self.notify {
            Notify::Wait { state, cv } => {
                let waker = {
                    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                    s.done = true;
                    s.waker.take()
                };
                cv.notify_all();
                if let Some(w) = waker {
                    w.wake();
                }
            }
            Notify::Callback(cb) => {
                let cb = cb.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(cb) = cb {
                    cb(self);
                }
            }
        }
    }

    /// The result once complete: the buffer, or the first error.
    pub fn take_result(&self) -> Result<Vec<u8>> {
        if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        Ok(std::mem::take(
            &mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()),
        ))
    }

    fn is_done(&self) -> bool {
        match &self.notify {
            Notify::Wait { state, .. } => state.lock().unwrap_or_else(|p| p.into_inner()).done,
            Notify::Callback(_) => self.remaining.load(Ordering::Acquire) == 0,
        }
    }

    /// Blocks until complete.
    pub fn wait(&self) {
        if let Notify::Wait { state, cv } = &self.notify {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            while !s.done {
                s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    fn poll_done(&self, cx: &mut Context<'_>) -> bool {
        match &self.notify {
            Notify::Wait { state, .. } => {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                if s.done {
                    return true;
                }
                s.waker = Some(cx.waker().clone());
                false
            }
            Notify::Callback(_) => self.is_done(),
        }
    }
}

/// A request in flight: a `Future` that works under any executor, or
/// [`Completion::wait`] to block the calling thread.
pub struct Completion<T> {
    req: Result<Arc<Request>, Option<Error>>,
    map: fn(&Request) -> Result<T>,
}

impl<T> Completion<T> {
    pub(crate) fn new(req: Arc<Request>, map: fn(&Request) -> Result<T>) -> Completion<T> {
        Completion { req: Ok(req), map }
    }

    /// A completion that failed before it was submitted.
    pub(crate) fn failed(e: Error) -> Completion<T> {
        Completion {
            req: Err(Some(e)),
            map: |_| Err(Error::new(ErrorKind::InvalidInput, "no request")),
        }
    }

    /// Blocks the calling thread until the request completes.
    pub fn wait(self) -> Result<T> {
        match self.req {
            Ok(req) => {
                req.wait();
                (self.map)(&req)
            }
            Err(e) => Err(e.expect("completion polled after it finished")),
        }
    }
}

impl<T> Future for Completion<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = self.get_mut();
        match &mut this.req {
            Ok(req) => {
                if req.poll_done(cx) {
                    Poll::Ready((this.map)(req))
                } else {
                    Poll::Pending
                }
            }
            Err(e) => Poll::Ready(Err(e.take().expect("completion polled after it finished"))),
        }
    }
}

/// Completion mapping for requests that return their buffer.
pub fn map_buf(r: &Request) -> Result<Vec<u8>> {
    r.take_result()
}
