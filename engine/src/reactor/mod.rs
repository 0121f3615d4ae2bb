//! The reactor: one thread per core, each with its own io_uring.
//!
//! A core owns, for the stripes the router gives it: its L2 cache blocks,
//! its range-lock table, its in-flight pieces and fills, a batch of reserved
//! host clusters, and its commits. Nothing in a `Core` is shared; other
//! threads reach it only through its inbox (a `crossbeam-channel`) and an
//! eventfd that wakes it when it sleeps in `io_uring_enter`.
//!
//! One loop turn: take new messages, run ready work, maybe start a commit,
//! then one `submit_and_wait` for everything the turn queued (one syscall per
//! turn, not per request), then dispatch the completions reaped.

mod cor;
mod kept;
pub mod l2cache;
mod readahead;
mod remote;
pub mod request;

use crate::backing::{Chain, ChainCache};
use crate::error::{Error, Result};
use crate::io::merge::Merge;
use crate::io::uring::Uring;
use crate::io::wake::EventFd;
use crate::io::{Cqe, FileId, Io, IoBuf, Op, OpKind};
use crate::locks::LockTable;
use crate::meta::Meta;
use crate::router::Router;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use l2cache::L2Cache;
use request::{ReqKind, Request};
use slab::Slab;
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Registered file indexes on every ring.
pub const FILE_DATA: FileId = FileId(0);
pub const FILE_WAKE: FileId = FileId(1);
/// Backing layer `i` is registered as `FileId(FILE_BACKING0 + i)`, and
/// again, opened with O_DIRECT, as `FileId(FILE_BACKING0 + depth + i)`.
pub const FILE_BACKING0: u32 = 2;

/// Dirty L2 blocks that trigger a commit while the core is busy.
pub const COMMIT_DIRTY_BLOCKS: usize = 64;
/// Cached free buffers per size class. Enough for the fill buffers a core
/// has in flight while it reads ahead of a sequential reader over a remote
/// medium (tens of MiB of 64 KiB clusters), so that they are reused
/// instead of freed and allocated (and zeroed, and faulted in) again;
/// [`POOL_BYTES`] bounds them all.
pub const POOL_PER_CLASS: usize = 1024;
/// Bytes of free buffers a core keeps at most, whatever their sizes: a
/// client's burst of large requests (NBD allows 32 MiB each) must not pin
/// gigabytes after it ends.
pub const POOL_BYTES: usize = 64 << 20;
/// Buffers a core waits for at most while they are lent to other threads
/// (read data an NBD connection sends from, see `request::Lent`), and
/// their bytes at most.
pub const POOL_LENT: usize = 256;
pub const POOL_LENT_BYTES: usize = 64 << 20;
/// Bytes of decompressed clusters a core keeps (see `kept`): a 64 KiB
/// cluster read 4 KiB at a time is decompressed once, not 16 times.
pub const INFLATED_BYTES: usize = 4 << 20;

/// Everything the cores share, read-only after open (plus atomics).
pub struct Shared {
    pub meta: Meta,
    pub chain: Option<Arc<Chain>>,
    pub router: Router,
    pub size: u64,
    pub copy_on_read: bool,
    pub read_only: bool,
    pub metadata_cache_bytes: usize,
    /// Microseconds a core polls for work before it sleeps.
    pub poll_us: u64,
    /// Readahead window limit in bytes (0: no readahead; see `readahead`).
    pub readahead_max: u64,
    /// Bytes of remote fills' write-backs one core holds at most while
    /// more remote reads are in flight (see `release_held`).
    pub hold_bytes: usize,
    pub stats: Vec<CoreStats>,
    /// Every core's mailbox, set once all cores started: readahead sends
    /// populate parts to the cores that own their stripes.
    pub(crate) peers: std::sync::OnceLock<Vec<Mailbox>>,
}

impl Shared {
    /// After the cores stopped: frees unused clusters, syncs, and drops the
    /// image locks, so the image can be opened again at once, even while
    /// clones of the closed handle still exist.
    pub fn release(&self) -> Result<()> {
        let r = self.meta.close();
        crate::imagelock::unlock_image(&self.meta.file);
        if let Some(chain) = &self.chain {
            for i in 0..chain.depth() {
                if let Some(f) = chain.local_file(i) {
                    crate::imagelock::unlock_image(f);
                }
            }
        }
        r
    }
}

/// A core's latest error of some kind, and when it happened. Taken only
/// when one happens, so the lock costs nothing on the way of a request.
#[derive(Default)]
pub struct LastError(std::sync::Mutex<Option<(std::time::Instant, Error)>>);

impl LastError {
    pub fn record(&self, e: &Error) {
        let now = std::time::Instant::now();
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, e.clone()));
    }

    pub fn get(&self) -> Option<(std::time::Instant, Error)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Counters of one core; only that core writes them.
#[derive(Default)]
pub struct CoreStats {
    pub cor_fills: AtomicU64,
    pub cor_zero_fills: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub overlay_hits: AtomicU64,
    pub dedup_hits: AtomicU64,
    pub misses: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub writeback_errors: AtomicU64,
    pub commits: AtomicU64,
    /// Reads sent to remote backing media (after coalescing), the bytes
    /// they brought, the ones that failed, and their latency (sum and
    /// maximum, from the end of the core's turn to the result's arrival).
    pub remote_reads: AtomicU64,
    pub remote_bytes: AtomicU64,
    pub remote_errors: AtomicU64,
    pub remote_latency_us: AtomicU64,
    pub remote_latency_max_us: AtomicU64,
    /// Bytes this core's readahead asked to populate.
    pub readahead_bytes: AtomicU64,
    /// Read pieces answered from a kept readahead buffer (see `kept`).
    pub readahead_hits: AtomicU64,
    /// Bytes of write-backs this core holds now, and the most it held.
    pub held_bytes: AtomicU64,
    pub held_peak_bytes: AtomicU64,
    /// This core's latest failed copy-on-read write-back: when, and why
    /// (see `Disk::last_writeback_error`). Taken only when one fails.
    pub last_writeback_error: LastError,
    /// This core's latest failed remote backing read (see
    /// `Disk::last_remote_error`). Taken only when one fails.
    pub last_remote_error: LastError,
}

/// Something that lives on a core besides the engine (the NBD server's
/// connections): it runs on the core thread, uses the core's ring for its
/// socket operations, and gets their completions.
pub trait Frontend: std::any::Any {
    /// Completion of an operation pushed with `token`.
    fn completion(&mut self, token: u64, result: i32, ctx: &mut FrontCtx);
    fn as_any(&mut self) -> &mut dyn std::any::Any;
}

/// What a frontend may do on its core: queue operations on the ring.
pub struct FrontCtx {
    pub core: usize,
    ops: Vec<(u64, Op)>,
}

impl FrontCtx {
    /// Queues `op`; its completion comes back with `token` (56 bits).
    pub fn push(&mut self, token: u64, op: Op) {
        debug_assert!(token & TAG_MASK == 0, "frontend token too large");
        self.ops.push((token, op));
    }
}

/// Work sent to a core's frontend slot (which it may fill or replace).
pub type FrontTask = Box<dyn FnOnce(&mut Option<Box<dyn Frontend>>, &mut FrontCtx) + Send>;

/// A message to a core.
pub enum Msg {
    /// Run a task on the core's frontend.
    Front(FrontTask),
    /// One part of a request: `[offset, offset + len)` at `buf_off` in its buffer.
    Part {
        req: Arc<Request>,
        offset: u64,
        len: u64,
        buf_off: u64,
    },
    /// A remote backing read of this core's finished (see `remote`).
    Remote { tag: u64, result: Result<Vec<u8>> },
}

/// How any thread reaches a core: its inbox, and the eventfd that wakes it
/// when it sleeps. Clients and remote backing media both post here.
#[derive(Clone)]
pub(crate) struct Mailbox {
    tx: Sender<Msg>,
    wake: Arc<EventFd>,
    sleeping: Arc<AtomicBool>,
}

impl Mailbox {
    /// Sends `msg` to the core and wakes it if it sleeps.
    pub(crate) fn post(&self, msg: Msg) {
        if let Err(crossbeam_channel::SendError(msg)) = self.tx.send(msg) {
            // The core's thread has ended (the disk closed): answer the
            // part rather than drop it unanswered.
            if let Msg::Part { req, .. } = msg {
                req.finish_part(Some(Error::closed()));
            }
            return;
        }
        // Pairs with the fence in `Core::sleep_prepare`: either the core
        // sees the message before it sleeps, or we see it sleeping and wake
        // it.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake.signal();
        }
    }
}

/// The client side of a core: its mailbox and its thread.
pub struct CoreHandle {
    mailbox: Mailbox,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl CoreHandle {
    pub fn send(&self, msg: Msg) {
        self.mailbox.post(msg);
    }

    pub(crate) fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }
}

thread_local! {
    static ON_CORE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is a reactor thread (which must never block
/// waiting for the cores, itself among them).
pub fn on_core_thread() -> bool {
    ON_CORE.with(|c| c.get())
}

/// Runs a core on its thread until the disk closes. A core that cannot go
/// on, because its ring failed or a bug panicked it, fails the requests it
/// holds and every request sent to it after, until the close: its clients
/// get an error, never silence, and the other cores keep serving theirs.
/// After a panic the core's metadata may be half-updated: the image is
/// poisoned (no more writes or flushes; what was flushed before stays, as
/// after a crash).
fn run_core<I: Io>(mut core: Core<I>) {
    let id = core.id;
    let inbox = core.inbox.clone();
    let shared = core.shared.clone();
    let failed = match std::panic::catch_unwind(AssertUnwindSafe(|| core.run())) {
        Ok(failed) => {
            core.front = None;
            drop(core);
            failed
        }
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_string());
            let why = format!("internal error: core {id} stopped ({why})");
            shared.meta.poison_because(why.clone());
            let e = Error::new(crate::ErrorKind::Io, why);
            let later = e.clone();
            let closing = core.closing.is_some();
            // The state may be half-updated; whatever this finds wrong in
            // it must not keep the thread from answering later requests.
            // Dropping the core drops its connections and waits for the
            // kernel to finish with its ring's buffers.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(move || {
                core.front = None;
                core.fatal(e);
                drop(core);
            }));
            (!closing).then_some(later)
        }
    };
    if let Some(e) = failed {
        // Until the close: fail every part sent here. Frontend tasks
        // (connections handed to this core) are dropped, which closes them.
        while let Ok(msg) = inbox.recv() {
            if let Msg::Part { req, .. } = msg {
                let close = req.kind == ReqKind::Close;
                req.finish_part(Some(e.clone()));
                if close {
                    break;
                }
            }
        }
    }
    // Parts that arrived after the close: fail them rather than hang.
    while let Ok(msg) = inbox.try_recv() {
        if let Msg::Part { req, .. } = msg {
            req.finish_part(Some(Error::closed()));
        }
    }
}

/// Starts core `id`: its thread, ring and state. Fails if the ring cannot be made.
/// With `sim`, the core runs on the simulated I/O layer instead of a ring.
pub fn spawn(
    id: usize,
    shared: Arc<Shared>,
    data_fd: RawFd,
    sim: Option<Arc<crate::testing::sim::Sim>>,
) -> Result<CoreHandle> {
    let wake = Arc::new(EventFd::new().map_err(|e| Error::io(e, "creating an eventfd"))?);
    let efd = wake.raw_fd();
    let (tx, rx) = crossbeam_channel::unbounded();
    let sleeping = Arc::new(AtomicBool::new(false));
    let mailbox = Mailbox {
        tx,
        wake: wake.clone(),
        sleeping: sleeping.clone(),
    };
    let reply: Arc<dyn crate::backing::remote::Reply> =
        Arc::new(remote::CoreReply(mailbox.clone()));
    let mut files = vec![data_fd, efd];
    if let Some(chain) = &shared.chain {
        files.extend(chain.layer_files());
        files.extend(chain.direct_files());
    }
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<()>>(1);
    let sleeping2 = sleeping.clone();
    let thread = std::thread::Builder::new()
        .name(format!("backfill-core-{id}"))
        .spawn(move || {
            ON_CORE.with(|c| c.set(true));
            if let Some(sim) = sim {
                let io = crate::testing::sim::SimIo::new(sim, id, files);
                let _ = ready_tx.send(Ok(()));
                let mut core = Core::new(id, shared, Merge::new(io), rx, sleeping2);
                core.remote.reply = Some(reply);
                run_core(core);
                return;
            }
            let ring = match Uring::new(&files) {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(Error::io(e, "setting up io_uring")));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut core = Core::new(id, shared, Merge::new(ring), rx, sleeping2);
            core.remote.reply = Some(reply);
            run_core(core);
        })
        .map_err(|e| Error::io(e, "spawning a reactor thread"))?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(Error::new(
                crate::ErrorKind::Io,
                "reactor thread died at start",
            ))
        }
    }
    Ok(CoreHandle {
        mailbox,
        thread: Some(thread),
    })
}

/// Token tags: what a completion belongs to (top byte of the token).
const TAG_PIECE: u64 = 1 << 56;
const TAG_FILL: u64 = 2 << 56;
const TAG_L2: u64 = 3 << 56;
const TAG_COMMIT: u64 = 4 << 56;
const TAG_WAKE: u64 = 5 << 56;
const TAG_FRONT: u64 = 6 << 56;
const TAG_MASK: u64 = 0xff << 56;

/// Free aligned buffers by power-of-two size class (4 KiB and up).
struct BufPool {
    classes: Vec<Vec<Arc<IoBuf>>>,
    /// Bytes of the buffers in `classes` (at most [`POOL_BYTES`]).
    bytes: usize,
    /// Buffers put back while lent (at most [`POOL_LENT`]): they join
    /// `classes` once the borrower dropped its clone.
    lent: Vec<Arc<IoBuf>>,
    lent_bytes: usize,
}

impl BufPool {
    fn class(len: usize) -> usize {
        len.max(4096).next_power_of_two().trailing_zeros() as usize - 12
    }

    /// A buffer of exactly `len` bytes (contents unspecified).
    fn get(&mut self, len: usize) -> Arc<IoBuf> {
        let c = Self::class(len);
        if self.classes.get(c).is_none_or(Vec::is_empty) {
            self.reclaim();
        }
        if let Some(v) = self.classes.get_mut(c) {
            if let Some(b) = v.pop() {
                self.bytes -= b.len();
                return b;
            }
        }
        Arc::new(IoBuf::zeroed(4096usize << c))
    }

    fn put(&mut self, b: Arc<IoBuf>) {
        // Only buffers nobody else holds go back to the pool; one still
        // held (lent to another thread) waits in `lent` until it comes back.
        let mut b = b;
        if Arc::get_mut(&mut b).is_none() {
            if self.lent.len() < POOL_LENT && self.lent_bytes + b.len() <= POOL_LENT_BYTES {
                self.lent_bytes += b.len();
                self.lent.push(b);
            }
            return;
        }
        let c = Self::class(b.len());
        if self.classes.len() <= c {
            self.classes.resize_with(c + 1, Vec::new);
        }
        if self.classes[c].len() < POOL_PER_CLASS && self.bytes + b.len() <= POOL_BYTES {
            self.bytes += b.len();
            self.classes[c].push(b);
        }
    }

    /// Takes back the lent buffers whose borrowers are done with them.
    fn reclaim(&mut self) {
        let mut i = 0;
        while i < self.lent.len() {
            // `get_mut` synchronises with the borrower's drop of its clone,
            // so its reads happen before anything writes the buffer again.
            if Arc::get_mut(&mut self.lent[i]).is_some() {
                let b = self.lent.swap_remove(i);
                self.lent_bytes -= b.len();
                self.put(b);
            } else {
                i += 1;
            }
        }
    }
}

/// One request part in progress on this core.
struct PartState {
    req: Arc<Request>,
    pending: u32,
    error: Option<Error>,
    bytes: u64,
}

/// Deferred work, run from the loop (never inline in completion handling).
enum Ev {
    /// (Re)run a piece from its current step.
    Run(usize),
    /// A fill has all its backing data.
    FillData(usize),
}

/// One core's state, generic over its I/O layer: the real io_uring here, a
/// seeded simulation in tests that replay faults and crashes.
pub(crate) struct Core<I: Io = Uring> {
    id: usize,
    shared: Arc<Shared>,
    io: I,
    inbox: Receiver<Msg>,
    sleeping: Arc<AtomicBool>,
    wake_armed: bool,
    wake_buf: Arc<IoBuf>,
    parts: Slab<PartState>,
    pieces: Slab<cor::Piece>,
    fills: Slab<cor::Fill>,
    locks: LockTable<usize, usize>,
    l2: L2Cache,
    chain_cache: ChainCache,
    pool: BufPool,
    events: VecDeque<Ev>,
    /// Reserved host clusters `[next, end)`.
    reserve: (u64, u64),
    /// Reserved clusters taken out and not used (host offsets).
    spare: Vec<u64>,
    /// L1 indexes of tables this core installed, not yet written.
    l1_dirty: Vec<u64>,
    /// Clusters discarded from the L2 entries of block `key` at generation
    /// `generation`; freed after a commit has made that generation durable.
    frees: Vec<(u64, u64, cor::Release)>,
    commit: cor::Commit,
    /// Flush and close requests waiting for the next commit.
    flush_waiters: Vec<Arc<Request>>,
    /// Flushes waiting for the fills that were in flight when they arrived
    /// (so a read, then a flush, leaves the read's clusters in the overlay),
    /// with the fill sequence number they wait for.
    fill_barriers: VecDeque<(u64, Arc<Request>)>,
    /// Sequence numbers of the fills in flight, and the next one.
    live_fills: std::collections::BTreeSet<u64>,
    next_fill_seq: u64,
    closing: Option<Arc<Request>>,
    stopped: bool,
    cqes: Vec<Cqe>,
    /// Snapshots of the dirty L2 blocks of the commit in flight.
    commit_bufs: Vec<Arc<IoBuf>>,
    segs: Vec<crate::backing::Segment>,
    /// Reads of remote backing layers, queued and in flight.
    remote: remote::RemoteOps,
    /// Sequential-read detection (None: readahead is off for this disk).
    readahead: Option<readahead::Detector>,
    /// Bytes of this core's readahead requests not yet finished.
    readahead_in_flight: Arc<AtomicU64>,
    /// Buffers of completed populate fills, for the readers readahead ran
    /// ahead of (empty and unused without readahead).
    kept: kept::Kept,
    /// Compressed clusters this core decompressed, by where their data
    /// lies: `(0, descriptor)` for the overlay's own, `(1 + layer, host
    /// offset)` for a backing layer's (see `kept`).
    inflated: kept::Kept<(usize, u64)>,
    /// The overlay's compressed clusters (by descriptor) being read for a
    /// read piece, with the read pieces that wait for them (run again when
    /// the read is done: they then find the cluster in `inflated`).
    inflating: std::collections::HashMap<u64, Vec<usize>>,
    /// Fills whose write-back waits for more (see `release_held`).
    held: Vec<usize>,
    /// Held fills that populate (their pieces wait for the write-back).
    held_populating: usize,
    /// A request waits for a held fill's cluster.
    held_wanted: bool,
    front: Option<Box<dyn Frontend>>,
    front_ctx: FrontCtx,
}

impl<I: Io> Core<I> {
    fn new(
        id: usize,
        shared: Arc<Shared>,
        io: I,
        inbox: Receiver<Msg>,
        sleeping: Arc<AtomicBool>,
    ) -> Core<I> {
        let per_core = shared.metadata_cache_bytes / shared.router.cores().max(1);
        let router = shared.router;
        let readahead = (shared.readahead_max > 0).then(|| {
            let cores = router.cores() as u64;
            readahead::Detector::new(router.stripe_bytes(), cores, shared.readahead_max)
        });
        Core {
            id,
            io,
            inbox,
            sleeping,
            wake_armed: false,
            wake_buf: Arc::new(IoBuf::zeroed(8)),
            parts: Slab::new(),
            pieces: Slab::new(),
            fills: Slab::new(),
            locks: LockTable::new(),
            l2: L2Cache::new(per_core / 2),
            chain_cache: ChainCache::new(per_core as u64 / 2),
            pool: BufPool {
                classes: Vec::new(),
                bytes: 0,
                lent: Vec::new(),
                lent_bytes: 0,
            },
            events: VecDeque::new(),
            reserve: (0, 0),
            spare: Vec::new(),
            l1_dirty: Vec::new(),
            frees: Vec::new(),
            commit: cor::Commit::default(),
            flush_waiters: Vec::new(),
            fill_barriers: VecDeque::new(),
            live_fills: std::collections::BTreeSet::new(),
            next_fill_seq: 0,
            closing: None,
            stopped: false,
            cqes: Vec::with_capacity(256),
            commit_bufs: Vec::new(),
            segs: Vec::new(),
            remote: remote::RemoteOps::default(),
            readahead,
            readahead_in_flight: Arc::new(AtomicU64::new(0)),
            // Readahead keeps at most twice its limit in flight per core.
            kept: kept::Kept::new(2 * shared.readahead_max as usize),
            inflated: kept::Kept::new(INFLATED_BYTES),
            inflating: std::collections::HashMap::new(),
            held: Vec::new(),
            held_populating: 0,
            held_wanted: false,
            front: None,
            front_ctx: FrontCtx {
                core: id,
                ops: Vec::new(),
            },
            shared,
        }
    }

    /// Runs the core until it stops: closed (`None`), or failed while the
    /// disk stays open (the error; see [`run_core`]).
    fn run(&mut self) -> Option<Error> {
        while !self.stopped {
            self.take_messages();
            while let Some(ev) = self.events.pop_front() {
                match ev {
                    Ev::Run(id) => self.run_piece(id),
                    Ev::FillData(fid) => self.fill_data_ready(fid),
                }
            }
            self.maybe_commit();
            if self.stopped {
                break;
            }
            self.release_held();
            self.submit_remote();
            let busy = !self.events.is_empty() || !self.inbox.is_empty() || self.poll_briefly();
            let want = if busy { 0 } else { self.sleep_prepare() };
            if let Err(e) = self.io.submit_and_wait(want) {
                // The ring itself failed: nothing on this core can make
                // progress; fail what is queued rather than hang.
                let e = Error::io(e, "io_uring_enter");
                let closing = self.closing.is_some();
                self.fatal(e.clone());
                return (!closing).then_some(e);
            }
            self.sleeping.store(false, Ordering::SeqCst);
            let mut cqes = std::mem::take(&mut self.cqes);
            self.io.reap(&mut cqes);
            for cqe in cqes.drain(..) {
                self.dispatch(cqe);
            }
            self.cqes = cqes;
            // Completions may have queued remote reads; the next turn may
            // sleep, so send them now.
            self.submit_remote();
        }
        None
    }

    /// Before sleeping, submits what this turn queued and polls for a
    /// moment for new messages or completions: a sleep and an eventfd
    /// wake-up cost more than a short spin when requests keep coming.
    ///
    /// Not while remote reads are queued or in flight: they take
    /// milliseconds, the core's work is paced by them, and a spin would
    /// only burn CPU that a client or the backing server's own threads on
    /// the same machine could use (in process over nbdkit 2 ms, the same
    /// IOPS with half the CPU: BENCHMARKS.md, session 7).
    fn poll_briefly(&mut self) -> bool {
        let spin = self.shared.poll_us;
        if spin == 0 || self.remote.in_flight() {
            return false;
        }
        if self.io.submit_and_wait(0).is_err() {
            return false;
        }
        let t = std::time::Instant::now();
        loop {
            if !self.inbox.is_empty() || self.io.has_completions() {
                return true;
            }
            if t.elapsed().as_micros() as u64 >= spin {
                return false;
            }
            // Let another runnable thread (a client sharing the cores) have
            // the CPU rather than spin against it.
            std::thread::yield_now();
        }
    }

    /// Arms the wake-up and announces sleep. Returns how many completions to
    /// wait for: 1 to block, 0 if a message slipped in.
    fn sleep_prepare(&mut self) -> usize {
        if !self.wake_armed {
            let buf = self.wake_buf.clone();
            self.io.push(
                TAG_WAKE,
                Op {
                    kind: OpKind::WakeRead,
                    file: FILE_WAKE,
                    offset: 0,
                    len: 8,
                    buf: Some(buf),
                    buf_off: 0,
                    fd: -1,
                    iov: Vec::new(),
                },
            );
            self.wake_armed = true;
        }
        self.sleeping.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.inbox.is_empty() {
            self.sleeping.store(false, Ordering::SeqCst);
            return 0;
        }
        1
    }

    fn take_messages(&mut self) {
        loop {
            match self.inbox.try_recv() {
                Ok(Msg::Part {
                    req,
                    offset,
                    len,
                    buf_off,
                }) => self.start_part(req, offset, len, buf_off),
                Ok(Msg::Front(task)) => {
                    task(&mut self.front, &mut self.front_ctx);
                    self.push_front_ops();
                }
                Ok(Msg::Remote { tag, result }) => self.remote_done(tag, result),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            }
        }
    }

    fn push_front_ops(&mut self) {
        for (token, op) in self.front_ctx.ops.drain(..) {
            self.io.push(TAG_FRONT | token, op);
        }
    }

    fn dispatch(&mut self, cqe: Cqe) {
        let id = (cqe.token & !TAG_MASK) as usize;
        match cqe.token & TAG_MASK {
            TAG_PIECE => self.piece_io_done(id, cqe),
            TAG_FILL => self.fill_io_done(id, cqe),
            TAG_L2 => self.l2_loaded(id as u64, cqe),
            TAG_COMMIT => self.commit_io_done(id, cqe),
            TAG_WAKE => {
                self.wake_armed = false;
            }
            TAG_FRONT => {
                // The frontend gets its buffer back unshared.
                let Cqe { result, buf, .. } = cqe;
                drop(buf);
                if let Some(f) = self.front.as_mut() {
                    f.completion(id as u64, result, &mut self.front_ctx);
                }
                self.push_front_ops();
            }
            t => unreachable!("completion with unknown tag {t:#x}"),
        }
    }

    /// The core cannot go on (its ring failed, or it panicked): fail every
    /// waiting request and stop.
    fn fatal(&mut self, e: Error) {
        self.shared.meta.poison();
        for p in self.parts.drain() {
            p.req.finish_part(Some(e.clone()));
        }
        for r in self.flush_waiters.drain(..) {
            r.finish_part(Some(e.clone()));
        }
        for (_, r) in self.fill_barriers.drain(..) {
            r.finish_part(Some(e.clone()));
        }
        if let Some(r) = self.closing.take() {
            r.finish_part(Some(e));
        }
        self.stopped = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> BufPool {
        BufPool {
            classes: Vec::new(),
            bytes: 0,
            lent: Vec::new(),
            lent_bytes: 0,
        }
    }

    #[test]
    fn a_lent_buffer_returns_to_the_pool_once_its_borrower_drops_it() {
        let mut p = pool();
        let b = p.get(65536);
        let ptr = b.raw_ptr();
        let borrowed = b.clone();
        // Put back while lent: not handed out again while the borrower
        // holds it.
        p.put(b);
        let other = p.get(65536);
        assert_ne!(other.raw_ptr(), ptr);
        p.put(other);
        // Once the borrower dropped its clone (on another thread), the
        // pool reuses it.
        std::thread::spawn(move || drop(borrowed))
            .join()
            .expect("borrower thread");
        let mut got = vec![p.get(65536), p.get(65536)];
        assert!(got.iter().any(|g| g.raw_ptr() == ptr), "reclaimed");
        // Unique again: writable.
        for g in &mut got {
            IoBuf::unique_mut(g).fill(1);
        }
    }

    /// A burst of fills (readahead's) puts back many buffers of one size
    /// at once: the pool keeps them, up to its byte bound, and hands the
    /// same memory out again.
    #[test]
    fn a_burst_of_buffers_is_kept_up_to_the_byte_bound() {
        let mut p = pool();
        let cluster = 64 << 10;
        let burst = POOL_BYTES / cluster + 64;
        let bufs: Vec<_> = (0..burst).map(|_| p.get(cluster)).collect();
        let kept: std::collections::HashSet<usize> =
            bufs.iter().map(|b| b.raw_ptr() as usize).collect();
        for b in bufs {
            p.put(b);
        }
        assert_eq!(p.bytes, POOL_BYTES, "kept up to the bound");
        // The next burst gets that memory back.
        let again: Vec<_> = (0..POOL_BYTES / cluster).map(|_| p.get(cluster)).collect();
        assert!(again.iter().all(|b| kept.contains(&(b.raw_ptr() as usize))));
        assert_eq!(p.bytes, 0);
    }

    #[test]
    fn lent_buffers_are_bounded() {
        let mut p = pool();
        let mut held = Vec::new();
        for _ in 0..POOL_LENT + 10 {
            let b = p.get(4096);
            held.push(b.clone());
            p.put(b);
        }
        assert_eq!(p.lent.len(), POOL_LENT);
        assert_eq!(p.lent_bytes, POOL_LENT * 4096);
        drop(held);
        let _ = p.get(4096);
        assert!(p.lent.is_empty());
        assert_eq!(p.lent_bytes, 0);
    }
}
