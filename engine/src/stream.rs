//! Streaming: the background job that populates the whole overlay from its
//! backing chain, then drops the backing reference so the image stands
//! alone.
//!
//! What it owns: one driver thread per stream, its cursor over the disk, the
//! window of populate requests in flight, the rate limit, and the progress
//! that [`Stream`] shows. It does no I/O of its own: it finds what the
//! overlay lacks with [`Disk::block_status`], fills it with
//! [`Disk::submit_populate_with`] (the copy-on-read fill path on the owning
//! cores, so it reads any backing the engine can read, and its locks keep
//! client writes winning over stale backing data), flushes, and asks
//! [`Disk::drop_backing`] to rewrite the header.
//!
//! What it never does: fetch a range the overlay already holds (data or a
//! zero cluster), or take the backing reference away before every byte that
//! still reads from the backing chain is in the overlay and durable.
//!
//! - **Parallelism.** Requests of `chunk_bytes` (1 MiB) are cut from the
//!   ranges that still read from the backing chain; up to `window` of them
//!   are in flight. The router deals each to the core owning its stripe, so
//!   every core fills its own clusters at once, each cluster a separate
//!   backing read and write-back.
//! - **Client I/O first.** While clients have requests in flight
//!   ([`crate::Stats::in_flight`], which does not count the stream's own),
//!   at most `busy_window` stream requests are. Streaming never stops
//!   outright (a disk that is always busy still finishes), but a client's
//!   request queues behind at most that many stream requests on a core, not
//!   behind the whole window. The load is sampled each time a stream request
//!   completes.
//! - **Rate limit.** A token bucket over bytes submitted, refilled at the
//!   limit and holding at most one chunk: a request goes when its bytes are
//!   covered. A new limit applies from the next request.
//! - **Zero detection** comes with the fill: backing data that is all zero
//!   becomes a zero cluster (compat 1.1 images), not data. Before each
//!   scan the backing is asked which of the stretch reads as zeros
//!   ([`Disk::learn_backing_zeros`]: an NBD server's block status, a raw
//!   file's holes); those clusters become zero clusters without being
//!   fetched or read, so a sparse image crosses the link as its data only.
//! - **Resumable.** Progress lives in the image: a new stream (after a
//!   cancel, a crash or a restart) skips what the overlay holds, which is
//!   everything an earlier run populated up to its last flush (a fill whose
//!   metadata a crash lost is fetched again).
//! - **The end.** Once nothing reads from the backing chain any more the
//!   stream flushes, then (unless `keep_backing`) drops the reference, which
//!   checks once more that the whole disk is covered, flushes again, and
//!   rewrites the header crash-safely (`qcow2::standalone`).

use crate::disk::{Disk, ExtentKind};
use crate::error::{Error, ErrorKind, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Default bytes per populate request.
pub const CHUNK_BYTES: u64 = 1 << 20;
/// Default populate requests in flight while clients are idle. Each is 16
/// fills of 64 KiB clusters; with 16 requests (16 MiB) in flight a local
/// disk was visibly underused (1 GiB streamed at 285-373 MiB/s, against
/// 347-435 MiB/s with 32, in one noisy session), and 64 gained nothing.
pub const WINDOW: usize = 32;
/// Populate requests in flight for a stream that has the disk to itself
/// (the `backfill stream` command: no clients). A deeper queue keeps the
/// disk busier through the mix of backing reads and write-backs: 1 GiB
/// from a local raw file streamed at a median 460-500 MiB/s with 256,
/// against 370-437 with 32 (4 and 3 alternating rounds, session 6), and
/// over nbdkit with a 2 ms delay at 487 against 364. It costs memory: the
/// command's peak RSS was 368 MB, against 89 MB with 32. A served disk
/// keeps [`WINDOW`], so that a client's first request does not queue
/// behind a quarter of a gigabyte of stream I/O.
pub const OFFLINE_WINDOW: usize = 256;
/// Default populate requests in flight while clients have requests in flight.
pub const BUSY_WINDOW: usize = 2;
/// Bytes of the disk whose block status one scan asks for (in chunks).
const SCAN_CHUNKS: u64 = 64;
/// The rate shown is measured over about this long.
const RATE_SPAN: Duration = Duration::from_secs(3);

/// How a stream runs.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Bytes per second populated at most; `None`: as fast as it goes.
    pub rate_bytes_per_sec: Option<u64>,
    /// Keep the backing reference at the end (the overlay still holds
    /// everything, so the backing image is then only named, never read).
    pub keep_backing: bool,
    /// Bytes per populate request (rounded up to whole clusters).
    pub chunk_bytes: u64,
    /// Requests in flight while clients are idle.
    pub window: usize,
    /// Requests in flight while clients have requests in flight.
    pub busy_window: usize,
}

impl Default for StreamOptions {
    fn default() -> StreamOptions {
        StreamOptions {
            rate_bytes_per_sec: None,
            keep_backing: false,
            chunk_bytes: CHUNK_BYTES,
            window: WINDOW,
            busy_window: BUSY_WINDOW,
        }
    }
}

/// Where a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum StreamState {
    Running,
    Paused,
    /// Everything is populated: flushing and dropping the backing reference.
    Finishing,
    /// Finished: the overlay holds the whole disk.
    Done,
    /// Cancelled; what it populated is flushed, and a new stream resumes.
    Cancelled,
    /// Stopped by an error (see [`StreamProgress::error`]).
    Failed,
}

impl StreamState {
    /// Whether the stream has ended (done, cancelled or failed).
    pub fn is_stopped(self) -> bool {
        matches!(
            self,
            StreamState::Done | StreamState::Cancelled | StreamState::Failed
        )
    }
}

/// A snapshot of a stream's progress.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StreamProgress {
    pub state: StreamState,
    /// Bytes of the disk dealt with: found in the overlay already, or
    /// populated by this stream. Reaches `total_bytes` at the end.
    pub done_bytes: u64,
    /// The disk's virtual size.
    pub total_bytes: u64,
    /// Bytes this stream populated (requests completed), a part of `done_bytes`.
    pub populated_bytes: u64,
    /// Bytes found to read as zeros in the backing chain (zero clusters of
    /// a qcow2 backing file, ranges an NBD server's block status says are
    /// zeros, holes of a raw backing file) in what the stream has scanned:
    /// populated as zero clusters without being fetched or read.
    pub backing_zero_bytes: u64,
    /// Populate requests in flight.
    pub in_flight: usize,
    /// Bytes populated per second, over the last few seconds.
    pub rate_bytes_per_sec: f64,
    /// The rate limit in force, if any.
    pub rate_limit: Option<u64>,
    /// Seconds since the stream started.
    pub elapsed_secs: f64,
    /// Whether the header no longer names a backing file (set at the end).
    pub backing_dropped: bool,
    /// The error that stopped the stream, for people.
    pub error: Option<String>,
    /// Its kind, to match on (`BackingUnavailable` may pass; a changed
    /// remote image, `BackingChanged`, does not).
    #[serde(skip)]
    pub error_kind: Option<ErrorKind>,
}

/// How a stream ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The overlay holds the whole disk; `backing_dropped` says whether the
    /// header lost its backing reference (false with `keep_backing`, or when
    /// the image had none).
    Finished { backing_dropped: bool },
    /// Cancelled before the end; a new stream picks up where it stopped.
    Cancelled,
}

enum Event {
    /// A populate request of `len` bytes completed.
    Done(u64, Result<()>),
    Pause,
    Resume,
    Cancel,
    Rate(Option<u64>),
}

struct Shown {
    progress: Mutex<StreamProgress>,
    changed: Condvar,
}

/// A running stream. Dropping it cancels the stream and waits for it.
pub struct Stream {
    shown: Arc<Shown>,
    tx: Sender<Event>,
    thread: Option<std::thread::JoinHandle<Result<StreamEnd>>>,
}

impl Stream {
    pub(crate) fn start(disk: Disk, opts: StreamOptions) -> Result<Stream> {
        let window = opts.window.max(1);
        let opts = StreamOptions {
            chunk_bytes: opts
                .chunk_bytes
                .max(1)
                .next_multiple_of(disk.cluster_size()),
            window,
            busy_window: opts.busy_window.clamp(1, window),
            ..opts
        };
        if opts.rate_bytes_per_sec == Some(0) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the stream rate limit must be at least 1 byte/s",
            ));
        }
        let shown = Arc::new(Shown {
            progress: Mutex::new(StreamProgress {
                state: StreamState::Running,
                done_bytes: 0,
                total_bytes: disk.size(),
                populated_bytes: 0,
                backing_zero_bytes: 0,
                in_flight: 0,
                rate_bytes_per_sec: 0.0,
                rate_limit: opts.rate_bytes_per_sec,
                elapsed_secs: 0.0,
                backing_dropped: false,
                error: None,
                error_kind: None,
            }),
            changed: Condvar::new(),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let driver = Driver::new(disk, opts, tx.clone(), rx, shown.clone());
        let thread = std::thread::Builder::new()
            .name("backfill-stream".into())
            .spawn(move || driver.run())
            .map_err(|e| Error::io(e, "spawning the stream thread"))?;
        Ok(Stream {
            shown,
            tx,
            thread: Some(thread),
        })
    }

    /// The current progress.
    pub fn progress(&self) -> StreamProgress {
        self.shown
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Blocks until `pred` holds for the progress (checked at every change)
    /// or the stream has stopped; returns the progress it saw last.
    pub fn wait_until(&self, pred: impl Fn(&StreamProgress) -> bool) -> StreamProgress {
        self.wait_until_deadline(None, pred)
    }

    /// [`Stream::wait_until`], giving up after `timeout` (for a display
    /// that redraws itself now and then).
    pub fn wait_until_timeout(
        &self,
        timeout: Duration,
        pred: impl Fn(&StreamProgress) -> bool,
    ) -> StreamProgress {
        self.wait_until_deadline(Some(Instant::now() + timeout), pred)
    }

    fn wait_until_deadline(
        &self,
        deadline: Option<Instant>,
        pred: impl Fn(&StreamProgress) -> bool,
    ) -> StreamProgress {
        let mut p = self
            .shown
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        loop {
            if pred(&p) || p.state.is_stopped() {
                return p.clone();
            }
            p = match deadline {
                None => self
                    .shown
                    .changed
                    .wait(p)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return p.clone();
                    }
                    self.shown
                        .changed
                        .wait_timeout(p, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Stops submitting requests (those in flight finish) until `resume`.
    pub fn pause(&self) {
        let _ = self.tx.send(Event::Pause);
    }

    pub fn resume(&self) {
        let _ = self.tx.send(Event::Resume);
    }

    /// Stops the stream: requests in flight finish, what was populated is
    /// flushed, and `wait` returns `StreamEnd::Cancelled`.
    pub fn cancel(&self) {
        let _ = self.tx.send(Event::Cancel);
    }

    /// Changes the rate limit (bytes per second; `None`: unlimited).
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) -> Result<()> {
        if bytes_per_sec == Some(0) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the stream rate limit must be at least 1 byte/s",
            ));
        }
        let _ = self.tx.send(Event::Rate(bytes_per_sec));
        Ok(())
    }

    /// Waits for the end of the stream.
    pub fn wait(mut self) -> Result<StreamEnd> {
        self.join()
    }

    fn join(&mut self) -> Result<StreamEnd> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "the stream thread panicked"))),
            None => Err(Error::new(ErrorKind::InvalidInput, "stream already waited")),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.cancel();
            let _ = self.join();
        }
    }
}

/// The driver thread's state.
struct Driver {
    disk: Disk,
    opts: StreamOptions,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    shown: Arc<Shown>,
    /// Next offset whose block status is not known yet.
    cursor: u64,
    /// Requests cut from scanned ranges, not submitted yet.
    queue: VecDeque<(u64, u64)>,
    in_flight: usize,
    done_bytes: u64,
    populated_bytes: u64,
    backing_zero_bytes: u64,
    paused: bool,
    cancelled: bool,
    error: Option<Error>,
    rate: Option<u64>,
    /// Token bucket of the rate limit: bytes that may go now, as of when.
    tokens: f64,
    bucket_at: Instant,
    started: Instant,
    /// (when, populated_bytes) samples for the rate shown.
    samples: VecDeque<(Instant, u64)>,
}

impl Driver {
    fn new(
        disk: Disk,
        opts: StreamOptions,
        tx: Sender<Event>,
        rx: Receiver<Event>,
        shown: Arc<Shown>,
    ) -> Driver {
        let now = Instant::now();
        let chunk = opts.chunk_bytes;
        Driver {
            rate: opts.rate_bytes_per_sec,
            disk,
            opts,
            tx,
            rx,
            shown,
            cursor: 0,
            queue: VecDeque::new(),
            in_flight: 0,
            done_bytes: 0,
            populated_bytes: 0,
            backing_zero_bytes: 0,
            paused: false,
            cancelled: false,
            error: None,
            tokens: chunk as f64,
            bucket_at: now,
            started: now,
            samples: VecDeque::new(),
        }
    }

    fn run(mut self) -> Result<StreamEnd> {
        let r = self.populate_all();
        let r = r.and_then(|()| self.finish());
        let state = match &r {
            Ok(StreamEnd::Finished { .. }) => StreamState::Done,
            Ok(StreamEnd::Cancelled) => StreamState::Cancelled,
            Err(_) => StreamState::Failed,
        };
        self.show(state, |p| {
            if let Err(e) = &r {
                p.error = Some(e.to_string());
                p.error_kind = Some(e.kind());
            }
            if let Ok(StreamEnd::Finished { backing_dropped }) = r {
                p.backing_dropped = backing_dropped;
            }
        });
        r
    }

    /// The main loop: scans, submits within the window and the rate, and
    /// handles completions and control events, until nothing is left, the
    /// stream is cancelled, or a request failed.
    fn populate_all(&mut self) -> Result<()> {
        let size = self.disk.size();
        if !self.disk.has_backing() {
            self.done_bytes = size;
            return Ok(());
        }
        loop {
            while let Ok(ev) = self.rx.try_recv() {
                self.handle(ev);
            }
            let stopping = self.cancelled || self.error.is_some();
            let mut wait = None;
            if !stopping {
                wait = self.submit_more()?;
            }
            let state = if self.paused {
                StreamState::Paused
            } else {
                StreamState::Running
            };
            self.show(state, |_| {});
            let idle = self.in_flight == 0;
            if idle && stopping {
                break;
            }
            if idle && !self.paused && self.queue.is_empty() && self.cursor >= size {
                break;
            }
            // Something will send an event: a completion, or a control
            // event (the only way out of a pause); the rate limit sets a
            // deadline. The periodic wake-up keeps the rate shown current.
            let timeout = wait.unwrap_or(Duration::from_secs(1));
            match self.rx.recv_timeout(timeout) {
                Ok(ev) => self.handle(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the driver holds a sender"),
            }
        }
        // What was populated becomes durable: a cancelled or failed stream
        // resumes from it.
        let flushed = self.disk.flush();
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        flushed.map_err(|e| e.context("streaming: flushing"))
    }

    /// Submits requests while the window and the rate allow. Returns how
    /// long to wait for the rate limit, if it is what stopped it.
    fn submit_more(&mut self) -> Result<Option<Duration>> {
        let size = self.disk.size();
        let window = if self.paused {
            0
        } else if self.disk.client_in_flight() > 0 {
            self.opts.busy_window
        } else {
            self.opts.window
        };
        while self.in_flight < window {
            let Some(&(off, len)) = self.queue.front() else {
                if self.cursor >= size {
                    break;
                }
                self.scan()?;
                continue;
            };
            if let Some(rate) = self.rate {
                // The bucket fills at the limit and holds one chunk at most,
                // so that time spent paused or held back by clients is not
                // saved up for a burst later.
                let now = Instant::now();
                let dt = now.duration_since(self.bucket_at).as_secs_f64();
                self.bucket_at = now;
                self.tokens = (self.tokens + rate as f64 * dt).min(self.opts.chunk_bytes as f64);
                if self.tokens < len as f64 {
                    let secs = (len as f64 - self.tokens) / rate as f64;
                    return Ok(Some(Duration::from_secs_f64(secs.min(1.0))));
                }
                self.tokens -= len as f64;
            }
            self.queue.pop_front();
            self.in_flight += 1;
            let tx = self.tx.clone();
            self.disk.submit_populate_with(off, len, move |r| {
                let r = r.map_err(|e| {
                    e.context(format!("streaming: populating {len} bytes at offset {off}"))
                });
                let _ = tx.send(Event::Done(len, r));
            });
        }
        Ok(None)
    }

    /// Finds what still reads from the backing chain in the next stretch
    /// of the disk, and queues requests for it (whole clusters, at most one
    /// chunk each, never crossing a chunk boundary). Everything else of the
    /// stretch counts as done.
    fn scan(&mut self) -> Result<()> {
        let size = self.disk.size();
        let cs = self.disk.cluster_size();
        let chunk = self.opts.chunk_bytes;
        let start = self.cursor;
        let end = size.min(start + chunk * SCAN_CHUNKS);
        // The backing chain says first what of it reads as zeros, where it
        // can tell (an NBD server's block status, a raw file's holes):
        // those ranges then read as zeros in the chain, and their fills
        // fetch (or read) nothing.
        self.disk.learn_backing_zeros(start, end - start);
        let extents = self
            .disk
            .block_status(start, end - start)
            .map_err(|e| e.context("streaming: looking up where the disk's data lives"))?;
        // Ranges that read from the backing chain, widened to clusters
        // (the stretch starts on a cluster boundary) and merged.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for e in extents {
            let ExtentKind::Backing { zero, .. } = e.kind else {
                continue;
            };
            if zero {
                self.backing_zero_bytes += e.len;
            }
            let lo = e.offset / cs * cs;
            let hi = (e.offset + e.len).next_multiple_of(cs).min(end);
            match ranges.last_mut() {
                Some(last) if last.1 >= lo => last.1 = last.1.max(hi),
                _ => ranges.push((lo, hi)),
            }
        }
        let mut queued = 0;
        for (lo, hi) in ranges {
            let mut pos = lo;
            while pos < hi {
                let stop = hi.min((pos / chunk + 1) * chunk);
                self.queue.push_back((pos, stop - pos));
                queued += stop - pos;
                pos = stop;
            }
        }
        self.done_bytes += (end - start) - queued;
        self.cursor = end;
        Ok(())
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Done(len, r) => {
                self.in_flight -= 1;
                match r {
                    Ok(()) => {
                        self.done_bytes += len;
                        self.populated_bytes += len;
                    }
                    Err(e) => {
                        self.error.get_or_insert(e);
                    }
                }
            }
            Event::Pause => self.paused = true,
            Event::Resume => self.paused = false,
            Event::Cancel => self.cancelled = true,
            Event::Rate(r) => self.rate = r,
        }
    }

    /// After the loop: a cancelled stream ends there; a complete one drops
    /// the backing reference unless asked to keep it.
    fn finish(&mut self) -> Result<StreamEnd> {
        if self.cancelled {
            return Ok(StreamEnd::Cancelled);
        }
        self.show(StreamState::Finishing, |_| {});
        if self.opts.keep_backing {
            return Ok(StreamEnd::Finished {
                backing_dropped: false,
            });
        }
        // Also without a backing chain: a header rewrite that a crash cut
        // short (the reference gone, the format extension still there) is
        // finished here.
        let backing_dropped = self
            .disk
            .drop_backing()
            .map_err(|e| e.context("streaming: dropping the backing file"))?;
        Ok(StreamEnd::Finished { backing_dropped })
    }

    /// Publishes the progress and wakes `wait_until` callers.
    fn show(&mut self, state: StreamState, f: impl FnOnce(&mut StreamProgress)) {
        let now = Instant::now();
        self.samples.push_back((now, self.populated_bytes));
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= RATE_SPAN {
            self.samples.pop_front();
        }
        while self.samples.len() > 1024 {
            self.samples.pop_front();
        }
        let (t0, b0) = self.samples[0];
        let span = now.duration_since(t0).as_secs_f64();
        let rate = if span > 0.0 {
            (self.populated_bytes - b0) as f64 / span
        } else {
            0.0
        };
        let mut p = self
            .shown
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        p.state = state;
        p.done_bytes = self.done_bytes;
        p.populated_bytes = self.populated_bytes;
        p.backing_zero_bytes = self.backing_zero_bytes;
        p.in_flight = self.in_flight;
        p.rate_bytes_per_sec = rate;
        p.rate_limit = self.rate;
        p.elapsed_secs = self.started.elapsed().as_secs_f64();
        f(&mut p);
        drop(p);
        self.shown.changed.notify_all();
    }
}
