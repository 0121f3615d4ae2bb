//! The public handle: [`Disk`], its [`Options`], [`Stats`] and block status.
//!
//! A `Disk` is a handle on the reactors: each call is split by the router
//! and sent to the owning cores; the caller blocks, polls a future, or gets
//! a callback.

use crate::backing::Chain;
use crate::error::{Error, ErrorKind, Result};
use crate::meta::Meta;
use crate::qcow2::Header;
use crate::reactor::request::{map_buf, ReqKind, Request};
use crate::reactor::{self, CoreHandle, CoreStats, Msg, Shared};
use crate::router::Router;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How the overlay file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// O_DIRECT: no page cache for data (the default, as `qemu-img -t none`).
    #[default]
    None,
    /// Buffered I/O through the page cache.
    Writeback,
}

/// Options for [`Disk::open`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Reactor threads (one io_uring each). Default: the machine's cores.
    pub cores: usize,
    /// Copy-on-read: fill the overlay from the backing image on reads. Default on.
    pub copy_on_read: bool,
    /// Page cache use for the overlay.
    pub cache: CacheMode,
    /// Refuse writes; never modify the image (implies no copy-on-read).
    pub read_only: bool,
    /// Memory budget for cached metadata (L2 tables), all cores together.
    pub metadata_cache_bytes: usize,
    /// Microseconds a core keeps polling for new requests and completions
    /// before it sleeps in the kernel. Polling saves the sleep and the
    /// eventfd wake-up when requests keep coming (it made two cores scale on
    /// a CPU-bound workload, and cut warm-read latency); the poll yields the
    /// CPU to any other runnable thread, so a client sharing the cores is
    /// not starved. 0 sleeps at once and never polls. A core never polls
    /// while it waits for remote reads (NBD, HTTP): they take milliseconds.
    pub poll_us: u64,
    /// Refuse backing files outside this directory (after resolving `..`
    /// and symbolic links): for images someone else supplied, whose header
    /// could otherwise name any file the process can read.
    pub backing_dir: Option<std::path::PathBuf>,
    /// Largest readahead window, in bytes, for sequential reads of data a
    /// remote backing medium (NBD, HTTP) holds: the engine populates up to
    /// this far ahead of a sequential reader, so the medium's round trips
    /// overlap. Only when the chain has a remote layer. Without
    /// copy-on-read (or read-only) it fetches whole clusters into memory
    /// for the reader instead (not for overlays with extended L2 entries).
    /// 0 turns it off. Default 16 MiB.
    pub readahead_max_bytes: u64,
    /// Memory, all cores together, for write-backs of data fetched from a
    /// remote backing medium (NBD, HTTP) that wait while more remote reads
    /// are in flight. The reader has its data already; the write-back
    /// only keeps the data from being fetched again, so it can wait: a
    /// burst of cold reads then leaves the overlay's disk to the reads
    /// (overlay hits, and a backing server on the same disk), and its
    /// write-backs go out in large merged writes once the burst is over,
    /// or the oldest of them, 1 MiB at a time, when the budget is full. A
    /// flush, a close, or a request for one of the held clusters writes
    /// them at once. Held data is only ever a copy of the backing's, and
    /// its clusters are allocated when it is written: a crash loses fetch
    /// work, never data, and leaks no space. The minimum, 1 MiB per core,
    /// writes each 1 MiB as soon as it is ready. Default
    /// [`default_writeback_hold`]: 256 MiB, or a sixteenth of the memory
    /// the process may use when that is less.
    pub writeback_hold_bytes: usize,
    /// Run the cores on this simulated I/O layer instead of io_uring
    /// (deterministic tests and crash replay; see `testing::sim`). Polling
    /// is off under simulation.
    pub sim: Option<Arc<crate::testing::sim::Sim>>,
}

/// Default [`Options::readahead_max_bytes`].
pub const DEFAULT_READAHEAD_MAX: u64 = 16 << 20;

/// The most [`default_writeback_hold`] gives.
pub const DEFAULT_WRITEBACK_HOLD: usize = 256 << 20;

/// Default [`Options::writeback_hold_bytes`]: [`DEFAULT_WRITEBACK_HOLD`],
/// or a sixteenth of the memory the process may use (the machine's, or its
/// control group's limit) when that is less: a small VM or container must
/// not give a quarter of its memory to a burst of reads.
pub fn default_writeback_hold() -> usize {
    DEFAULT_WRITEBACK_HOLD.min(memory_bytes().map_or(usize::MAX, |m| m / 16))
}

/// The memory this process may use: the machine's (`MemTotal` in
/// /proc/meminfo), or its control group's limit (v2 `memory.max`, v1
/// `memory.limit_in_bytes`) when that is less, as in a container.
fn memory_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let limits = cgroup_memory_files(&cgroup).into_iter().filter_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        text.trim().parse::<usize>().ok()
    });
    parse_mem_total(&info).into_iter().chain(limits).min()
}

/// The files that may hold the memory limit of the control groups listed
/// in `/proc/self/cgroup` text.
fn cgroup_memory_files(cgroup: &str) -> Vec<String> {
    let mut files = Vec::new();
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_end_matches('/');
        if controllers.is_empty() {
            files.push(format!("/sys/fs/cgroup{path}/memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            files.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
        }
    }
    files
}

fn parse_mem_total(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let n: usize = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        _ => None,
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            copy_on_read: true,
            cache: CacheMode::None,
            read_only: false,
            metadata_cache_bytes: 32 << 20,
            // BACKFILL_POLL_US overrides the default, for measurements.
            poll_us: std::env::var("BACKFILL_POLL_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000),
            backing_dir: None,
            readahead_max_bytes: DEFAULT_READAHEAD_MAX,
            writeback_hold_bytes: default_writeback_hold(),
            sim: None,
        }
    }
}

/// Where a range of the disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ExtentKind {
    /// Data held in the overlay.
    Data,
    /// Recorded as zero in the overlay (reads as zeros, hides the backing).
    Zero,
    /// Not in the overlay; found in backing image number `depth` (1 = the
    /// overlay's direct backing image). `zero` when it reads as zeros there.
    Backing { depth: u32, zero: bool },
    /// Allocated nowhere in the chain: reads as zeros.
    Unallocated,
}

/// How much of the disk a walk over it (`serve`, `convert`) asks
/// [`Disk::learn_backing_zeros`] about at once: one round trip to an NBD
/// server each, and no longer a wait than a stream's scan of the same.
pub const LEARN_ZEROS_BYTES: u64 = 64 << 20;

/// One extent of [`Disk::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockStatus {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// Counters, summed over all cores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Clusters whose backing data copy-on-read wrote into the overlay (with
    /// extended L2 entries: runs of subclusters, each fill one run).
    /// Counted when the write-back lands, which is after the read returned
    /// (a `flush` waits for the write-backs in flight).
    pub cor_fills: u64,
    /// Fills that found the cluster all zero and recorded a zero cluster
    /// instead of data (not counted in `cor_fills`).
    pub cor_zero_fills: u64,
    /// Bytes read from backing images (for fills, pass-through and write merges).
    pub bytes_fetched: u64,
    /// Read pieces (per cluster) served from the overlay.
    pub overlay_hits: u64,
    /// Read pieces served from another request's in-flight fill.
    pub dedup_hits: u64,
    /// Read pieces that missed the overlay.
    pub misses: u64,
    /// Bytes returned to readers.
    pub bytes_read: u64,
    /// Bytes written by clients.
    pub bytes_written: u64,
    /// Copy-on-read write-backs that failed (the data was still returned);
    /// [`Disk::last_writeback_error`] says why the latest did.
    pub writeback_errors: u64,
    /// Metadata commits (fdatasync + L2 writes) completed.
    pub commits: u64,
    /// Reads sent to remote backing media (NBD), after adjacent ones were
    /// coalesced; the bytes they returned; those that failed.
    pub remote_reads: u64,
    pub remote_bytes: u64,
    pub remote_errors: u64,
    /// Latency of those reads, from submission to result: the sum (divide
    /// by `remote_reads` for the mean) and the largest, in microseconds.
    pub remote_latency_us: u64,
    pub remote_latency_max_us: u64,
    /// Bytes readahead asked to populate ahead of sequential readers (what
    /// it fetched is in `bytes_fetched`; clusters the overlay held cost
    /// nothing).
    pub readahead_bytes: u64,
    /// Read pieces (cluster-sized parts of reads) answered from the buffer
    /// of a readahead fill kept in memory, instead of read back from the
    /// overlay.
    pub readahead_hits: u64,
    /// Requests accepted and not yet completed.
    pub in_flight: u64,
    /// Bytes (in clusters) of copy-on-read write-backs held in memory now
    /// while remote reads continue (`Options::writeback_hold_bytes`), and
    /// the most held since open (each core's largest, summed).
    pub writebacks_held_bytes: u64,
    pub writebacks_held_peak_bytes: u64,
}

/// A handle on an open disk. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct Disk {
    inner: Arc<Inner>,
}

struct Inner {
    /// Declared before `data_file`, and joined in `shutdown`: the rings
    /// that registered the descriptor are gone before the file closes.
    shared: Arc<Shared>,
    cores: Vec<CoreHandle>,
    /// The reactor threads, joined by whoever closes the disk (see
    /// [`Inner::join_cores`]).
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    closed: AtomicBool,
    in_flight: Arc<AtomicU64>,
    _data_file: std::fs::File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::SeqCst) && reactor::on_core_thread() {
            // The last handle went away inside a callback on a reactor
            // thread, which cannot wait for the cores (itself among them):
            // another thread closes the disk.
            if let Ok(file) = self._data_file.try_clone() {
                let rest = Inner {
                    shared: self.shared.clone(),
                    cores: std::mem::take(&mut self.cores),
                    threads: Mutex::new(std::mem::take(
                        self.threads.get_mut().unwrap_or_else(|p| p.into_inner()),
                    )),
                    closed: AtomicBool::new(false),
                    in_flight: self.in_flight.clone(),
                    _data_file: file,
                };
                self.closed.store(true, Ordering::SeqCst);
                std::thread::spawn(move || drop(rest));
                return;
            }
        }
        if !self.closed.load(Ordering::SeqCst) {
            // Best effort: a disk dropped without close() still flushes.
            let _ = self.shutdown();
        }
    }
}

impl Inner {
    /// Sends a whole-disk request (flush, close) to every core.
    fn send_all(&self, req: &Arc<Request>) {
        for c in &self.cores {
            c.send(Msg::Part {
                req: req.clone(),
                offset: 0,
                len: 0,
                buf_off: 0,
            });
        }
    }

    /// Sends Close to every core and waits for their final commits. The
    /// first caller does it; later ones return at once.
    fn stop_cores(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) || self.cores.is_empty() {
            // Closed already, or no core ever started (a failed open).
            return Ok(());
        }
        let req = Request::new(ReqKind::Close, Vec::new(), self.cores.len());
        self.send_all(&req);
        req.wait();
        req.take_result().map(|_| ())
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let result = self.stop_cores();
        let joined = self.join_cores();
        result.and(joined).and(self.shared.release())
    }

    /// Waits for the reactor threads to end, after [`Inner::stop_cores`]
    /// (a stopped core ends its thread once its ring is idle): when close
    /// returns, nothing of the disk runs any more and the cores' state is
    /// freed. A reactor thread cannot wait for the cores, itself among them:
    /// there the threads end on their own.
    fn join_cores(&self) -> Result<()> {
        if reactor::on_core_thread() {
            return Ok(());
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let mut result = Ok(());
        for t in threads {
            if t.join().is_err() {
                result = Err(Error::new(ErrorKind::Io, "a reactor thread panicked"));
            }
        }
        result
    }
}

use crate::reactor::request::Callback;
pub use crate::reactor::request::Completion;
pub use crate::reactor::request::Lent;

/// A read's data, and the ranges of it (offset into `data`, length; in
/// order, merged) that the engine knew to be zero without reading them.
/// The bytes of the `lent` ranges (in order, disjoint) are not in `data`
/// but in the engine's buffers they came from; [`SparseRead::flatten`]
/// copies them in.
#[derive(Debug, Default)]
pub struct SparseRead {
    pub data: Vec<u8>,
    pub zeros: Vec<(u64, u64)>,
    pub lent: Vec<Lent>,
}

impl SparseRead {
    /// The read's bytes in one buffer.
    pub fn flatten(mut self) -> Vec<u8> {
        for l in &self.lent {
            let o = l.off as usize;
            self.data[o..o + l.len].copy_from_slice(l.bytes());
        }
        self.data
    }
}

/// Sorts and merges touching ranges.
fn merge_ranges(v: Option<Vec<(u64, u64)>>) -> Vec<(u64, u64)> {
    let mut v = v.unwrap_or_default();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (o, l) in v {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l)),
        }
    }
    out
}

/// A status request's extents, in order, adjacent ones of a kind merged.
fn take_status(req: &Request) -> Vec<BlockStatus> {
    let mut v = std::mem::take(&mut *req.status.lock().unwrap_or_else(|p| p.into_inner()));
    v.sort_by_key(|e| e.offset);
    let mut out: Vec<BlockStatus> = Vec::with_capacity(v.len());
    for e in v {
        match out.last_mut() {
            Some(l) if l.kind == e.kind && l.offset + l.len == e.offset => l.len += e.len,
            _ => out.push(e),
        }
    }
    out
}

/// A callback that only wants to know whether the request succeeded.
fn unit<F: FnOnce(Result<()>) + Send + 'static>(done: F) -> Callback {
    Box::new(move |r: &Request| done(r.take_result().map(|_| ())))
}

impl Disk {
    /// Opens a qcow2 overlay (and its backing chain) and starts the reactors.
    pub fn open(path: impl AsRef<Path>, opts: Options) -> Result<Disk> {
        let path = path.as_ref();
        let name = path.display().to_string();
        if opts.cores == 0 || opts.cores > 256 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("cores must be 1 to 256, not {}", opts.cores),
            ));
        }
        let open_locked = || -> Result<(crate::imagelock::LockedFile, Header)> {
            let f = OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .open(path)
                .map_err(|e| Error::io(e, format!("opening {name}")))?;
            let f = crate::imagelock::LockedFile::lock(f, &name, !opts.read_only)?;
            let h = Header::read_from(&f, &name)?;
            Ok((f, h))
        };
        let (mut meta_file, mut header) = open_locked()?;
        if !opts.read_only && header.is_dirty() && !header.is_corrupt() {
            // A lazy-refcounts writer crashed: its refcounts may be stale.
            // Rebuild them from the L1/L2 tables (as QEMU does on open),
            // then open again. The repair takes the image lock itself.
            drop(meta_file);
            crate::qcow2::repair::rebuild_refcounts(path).map_err(|e| {
                e.context(format!("{name}: repairing the refcounts of a dirty image"))
            })?;
            (meta_file, header) = open_locked()?;
        }
        if !opts.read_only {
            header.check_writable(&name)?;
            if header.version >= 3 && header.autoclear_features != 0 {
                // qcow2.rst: a writer that does not maintain what an
                // autoclear bit describes (e.g. persistent bitmaps) must
                // clear the bit before it changes the image.
                use std::os::unix::fs::FileExt;
                meta_file
                    .write_all_at(&0u64.to_be_bytes(), 88)
                    .and_then(|()| meta_file.sync_data())
                    .map_err(|e| {
                        Error::io(e, format!("{name}: clearing autoclear feature bits"))
                    })?;
            }
        }
        let mut data_opts = OpenOptions::new();
        data_opts.read(true).write(!opts.read_only);
        if opts.cache == CacheMode::None {
            data_opts.custom_flags(libc::O_DIRECT);
        }
        let data_file = data_opts.open(path).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EINVAL) {
                " (this file system does not support O_DIRECT; use cache mode writeback)"
            } else {
                ""
            };
            Error::io(e, format!("opening {name} with O_DIRECT{hint}"))
        })?;
        // The version of a remote image the overlay's data came from: the
        // remote layer it names must still be that version (qcow2::pin).
        let stored_pin = match &header.backing_file {
            Some(_) => crate::qcow2::pin::stored_pin(&header, &name)?,
            None => None,
        };
        let chain = match &header.backing_file {
            Some(b) => Some(Arc::new(
                Chain::open_pinned(
                    path,
                    b,
                    header.backing_format.as_deref(),
                    opts.backing_dir.as_deref(),
                    stored_pin.as_ref(),
                )
                .map_err(|e| e.context(format!("{name}: opening its backing image")))?,
            )),
            None => None,
        };
        if !opts.read_only {
            // Pin the remote image's version before any of its data can
            // land in the overlay: durable here, before the reactors start.
            let now = chain.as_ref().and_then(|c| c.remote_pin());
            if let Some(now) = now.filter(|p| stored_pin.as_ref() != Some(p)) {
                crate::qcow2::pin::write_pin(&meta_file, &name, &mut header, &now)
                    .map_err(|e| e.context(format!("{name}: pinning its remote backing image")))?;
            }
        }
        if let Some(chain) = &chain {
            // Nobody may change a backing image under us while we read it.
            for i in 0..chain.depth() {
                if let Some(f) = chain.local_file(i) {
                    crate::imagelock::lock_image(f, chain.layer_name(i), false)?;
                }
            }
        }
        let size = header.size;
        let cluster_bits = header.cluster_bits;
        let mut meta = Meta::open(&name, header, meta_file.into_file(), opts.read_only)?;
        if let Some(sim) = &opts.sim {
            meta.attach_sim(sim.clone());
        }
        let copy_on_read = opts.copy_on_read && !opts.read_only;
        let extended_l2 = meta.header.extended_l2();
        let remote_layer = chain
            .as_ref()
            .is_some_and(|c| (0..c.depth()).any(|i| c.remote(i).is_some()));
        let shared = Arc::new(Shared {
            meta,
            chain,
            router: Router::new(cluster_bits, opts.cores),
            size,
            copy_on_read,
            read_only: opts.read_only,
            metadata_cache_bytes: opts.metadata_cache_bytes,
            poll_us: if opts.sim.is_some() { 0 } else { opts.poll_us },
            // Without copy-on-read, readahead keeps what it fetched in
            // memory, by cluster (not by subcluster).
            readahead_max: if remote_layer && (copy_on_read || !extended_l2) {
                opts.readahead_max_bytes
            } else {
                0
            },
            hold_bytes: (opts.writeback_hold_bytes / opts.cores.max(1))
                .max(crate::io::merge::MAX_MERGED),
            stats: (0..opts.cores).map(|_| CoreStats::default()).collect(),
            peers: std::sync::OnceLock::new(),
        });
        let data_fd = data_file.as_raw_fd();
        let mut inner = Inner {
            shared,
            cores: Vec::with_capacity(opts.cores),
            threads: Mutex::new(Vec::with_capacity(opts.cores)),
            closed: AtomicBool::new(false),
            in_flight: Arc::new(AtomicU64::new(0)),
            _data_file: data_file,
        };
        for i in 0..opts.cores {
            match reactor::spawn(i, inner.shared.clone(), data_fd, opts.sim.clone()) {
                Ok(mut core) => {
                    let threads = inner.threads.get_mut().unwrap_or_else(|p| p.into_inner());
                    threads.extend(core.thread.take());
                    inner.cores.push(core);
                }
                Err(e) => {
                    // The cores started so far wait for a Close that would
                    // never come: stop them, and end their threads.
                    let _ = inner.shutdown();
                    return Err(e);
                }
            }
        }
        let peers = inner.cores.iter().map(|c| c.mailbox().clone()).collect();
        let _ = inner.shared.peers.set(peers);
        if let Some(sim) = &opts.sim {
            sim.wait_parked(opts.cores);
        }
        Ok(Disk {
            inner: Arc::new(inner),
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.shared.size
    }

    /// Cluster size of the overlay in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.inner.shared.meta.cluster_size()
    }

    /// Reactor threads serving this disk.
    pub(crate) fn cores(&self) -> usize {
        self.inner.cores.len()
    }

    /// Runs `task` on core `core`'s frontend slot (see `reactor::Frontend`).
    pub(crate) fn run_on_core(&self, core: usize, task: reactor::FrontTask) {
        self.inner.cores[core % self.inner.cores.len()].send(Msg::Front(task));
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfBounds,
                format!(
                    "{}: request at offset {offset} length {len} reaches past the end of the disk ({size} bytes)",
                    self.inner.shared.meta.path
                ),
            )),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::closed());
        }
        Ok(())
    }

    /// Splits a request over the cores and sends its parts.
    fn send(&self, req: Arc<Request>, offset: u64, len: u64) {
        let router = &self.inner.shared.router;
        for part in router.split(offset, len) {
            self.inner.cores[part.core].send(Msg::Part {
                req: req.clone(),
                offset: part.offset,
                len: part.len,
                buf_off: part.buf_off,
            });
        }
    }

    /// Counts a new request in `Stats::in_flight`; it uncounts itself when
    /// it completes.
    fn count_in_flight(&self) -> Arc<AtomicU64> {
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        self.inner.in_flight.clone()
    }

    fn parts(&self, offset: u64, len: u64) -> usize {
        self.inner.shared.router.count(offset, len)
    }

    fn submit(&self, kind: ReqKind, offset: u64, buf: Vec<u8>, len: u64) -> Completion<Vec<u8>> {
        if let Err(e) = self
            .check_open()
            .and_then(|_| self.check_range(offset, len))
        {
            return Completion::failed(e);
        }
        if kind != ReqKind::Read {
            if let Err(e) = self.inner.shared.meta.check_writable() {
                return Completion::failed(e);
            }
        }
        let parts = self.parts(offset, len);
        let req = Request::counted(kind, buf, parts.max(1), self.count_in_flight());
        if parts == 0 {
            req.finish_part(None);
            return Completion::new(req, map_buf);
        }
        self.send(req.clone(), offset, len);
        Completion::new(req, map_buf)
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let out = self.submit_read(offset, vec![0u8; buf.len()]).wait()?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.submit_write(offset, buf.to_vec()).wait().map(|_| ())
    }

    /// Write that is durable when it returns (NBD FUA).
    pub fn write_at_fua(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_at(buf, offset)?;
        self.flush()
    }

    /// Makes every write completed before this call durable. It also waits
    /// for the copy-on-read write-backs in flight when it was called, so the
    /// clusters read before a flush are in the overlay after it.
    pub fn flush(&self) -> Result<()> {
        self.check_open()?;
        let n = self.inner.cores.len();
        let req = Request::new(ReqKind::Flush, Vec::new(), n);
        self.inner.send_all(&req);
        req.wait();
        req.take_result().map(|_| ())
    }

    /// Makes `[offset, offset + len)` read as zeros (recorded in the overlay).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.submit(ReqKind::Zero, offset, Vec::new(), len)
            .wait()
            .map(|_| ())
    }

    /// Discards `[offset, offset + len)`: it reads as zeros afterwards (over
    /// a backing image the range must not show old backing data again, so it
    /// is recorded as zero), and the host clusters of whole discarded
    /// clusters are freed (refcount 0, hole punched) once the L2 change is
    /// durable.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.submit(ReqKind::Discard, offset, Vec::new(), len)
            .wait()
            .map(|_| ())
    }

    /// Reads `buf.len()` bytes at `offset`; the buffer comes back filled.
    pub fn submit_read(&self, offset: u64, buf: Vec<u8>) -> Completion<Vec<u8>> {
        let len = buf.len() as u64;
        self.submit(ReqKind::Read, offset, buf, len)
    }

    /// Writes `buf` at `offset`; the buffer comes back when done.
    pub fn submit_write(&self, offset: u64, buf: Vec<u8>) -> Completion<Vec<u8>> {
        let len = buf.len() as u64;
        self.submit(ReqKind::Write, offset, buf, len)
    }

    /// Like `submit_read`, calling `done` (on a reactor thread) instead.
    pub fn submit_read_with<F>(&self, offset: u64, buf: Vec<u8>, done: F)
    where
        F: FnOnce(Result<Vec<u8>>) + Send + 'static,
    {
        let len = buf.len() as u64;
        self.submit_cb(
            ReqKind::Read,
            offset,
            len,
            buf,
            false,
            Box::new(move |r| done(r.take_result())),
        )
    }

    /// Like `submit_read_with`, and also says which ranges of the buffer
    /// the engine knew to read as zeros without any I/O (zero clusters,
    /// ranges allocated nowhere): an NBD server sends those as holes. Large
    /// ranges are lent from the engine's buffers instead of copied (see
    /// [`SparseRead`]): an NBD server sends them from there.
    pub fn submit_read_sparse_with<F>(&self, offset: u64, buf: Vec<u8>, done: F)
    where
        F: FnOnce(Result<SparseRead>) + Send + 'static,
    {
        let len = buf.len() as u64;
        let cb = Box::new(move |r: &Request| {
            done(r.take_result().map(|data| {
                fn take<T>(m: &Option<std::sync::Mutex<Vec<T>>>) -> Option<Vec<T>> {
                    m.as_ref()
                        .map(|m| std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner())))
                }
                let mut lent: Vec<Lent> = take(&r.lent).unwrap_or_default();
                lent.sort_unstable_by_key(|l| l.off);
                SparseRead {
                    data,
                    zeros: merge_ranges(take(&r.zeros)),
                    lent,
                }
            }))
        });
        self.submit_cb(ReqKind::Read, offset, len, buf, true, cb)
    }

    /// Like `submit_write`, calling `done` (on a reactor thread) instead.
    pub fn submit_write_with<F>(&self, offset: u64, buf: Vec<u8>, done: F)
    where
        F: FnOnce(Result<Vec<u8>>) + Send + 'static,
    {
        let len = buf.len() as u64;
        self.submit_cb(
            ReqKind::Write,
            offset,
            len,
            buf,
            false,
            Box::new(move |r| done(r.take_result())),
        )
    }

    /// [`Disk::write_zeroes`] that calls `done` (on a reactor thread).
    pub fn submit_zeroes_with<F>(&self, offset: u64, len: u64, done: F)
    where
        F: FnOnce(Result<()>) + Send + 'static,
    {
        self.submit_cb(ReqKind::Zero, offset, len, Vec::new(), false, unit(done))
    }

    /// [`Disk::discard`] that calls `done` (on a reactor thread).
    pub fn submit_discard_with<F>(&self, offset: u64, len: u64, done: F)
    where
        F: FnOnce(Result<()>) + Send + 'static,
    {
        self.submit_cb(ReqKind::Discard, offset, len, Vec::new(), false, unit(done))
    }

    /// [`Disk::flush`] that calls `done` (on a reactor thread).
    pub fn submit_flush_with<F>(&self, done: F)
    where
        F: FnOnce(Result<()>) + Send + 'static,
    {
        if let Err(e) = self.check_open() {
            done(Err(e));
            return;
        }
        let n = self.inner.cores.len();
        let req = Request::with_callback(
            ReqKind::Flush,
            Vec::new(),
            n,
            unit(done),
            Some(self.count_in_flight()),
            false,
        );
        self.inner.send_all(&req);
    }

    /// [`Disk::block_status`] that calls `done` (on a reactor thread).
    pub fn submit_status_with<F>(&self, offset: u64, len: u64, done: F)
    where
        F: FnOnce(Result<Vec<BlockStatus>>) + Send + 'static,
    {
        let cb = Box::new(move |r: &Request| done(r.take_result().map(|_| take_status(r))));
        self.submit_cb(ReqKind::Status, offset, len, Vec::new(), false, cb)
    }

    /// Copies the unallocated clusters of `[offset, offset + len)` (widened
    /// to whole clusters) from the backing chain into the overlay, like
    /// copy-on-read without returning data, and calls `done` (on a reactor
    /// thread) once their write-backs have landed: the clusters are then in
    /// the overlay, durable after the next flush. Clusters the overlay holds
    /// are not fetched; all-zero data becomes zero clusters. Client writes
    /// win as with copy-on-read. Needs copy-on-read on a writable disk.
    /// These requests are not counted in `Stats::in_flight`, which streaming
    /// reads as the clients' load.
    pub fn submit_populate_with<F>(&self, offset: u64, len: u64, done: F)
    where
        F: FnOnce(Result<()>) + Send + 'static,
    {
        if !self.inner.shared.copy_on_read && self.inner.shared.chain.is_some() {
            done(Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{}: populating needs copy-on-read on a writable disk",
                    self.inner.shared.meta.path
                ),
            )));
            return;
        }
        self.submit_cb(
            ReqKind::Populate,
            offset,
            len,
            Vec::new(),
            false,
            unit(done),
        );
    }

    /// [`Disk::submit_populate_with`], blocking until done.
    pub fn populate(&self, offset: u64, len: u64) -> Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.submit_populate_with(offset, len, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| Err(Error::closed()))
    }

    /// Client requests in flight (`Stats::in_flight`, without the cost of
    /// summing the other counters): the streaming job's measure of load.
    pub(crate) fn client_in_flight(&self) -> u64 {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the image was opened with a backing chain.
    pub fn has_backing(&self) -> bool {
        self.inner.shared.chain.is_some()
    }

    /// Whether the backing chain has a remote layer (NBD, HTTP).
    pub fn backing_is_remote(&self) -> bool {
        self.inner
            .shared
            .chain
            .as_ref()
            .is_some_and(|c| (0..c.depth()).any(|i| c.remote(i).is_some()))
    }

    /// Asks the backing chain which bytes of `[offset, offset + len)` read
    /// as zeros there without a read, where it can tell: a remote medium
    /// (an NBD server's block status) or a raw file (its holes, by
    /// `SEEK_HOLE`). From then on the chain reads them as zeros without
    /// fetching or reading them: [`Disk::block_status`] shows them as zero
    /// in the backing, and copy-on-read and populating record zero
    /// clusters for them. Returns the bytes found. May block for a round
    /// trip to a server; nothing fails by it (a layer that cannot tell
    /// finds none). A walk over the disk asks about [`LEARN_ZEROS_BYTES`]
    /// at a time.
    pub fn learn_backing_zeros(&self, offset: u64, len: u64) -> u64 {
        self.inner
            .shared
            .chain
            .as_ref()
            .map_or(0, |chain| chain.learn_zeros(offset, len))
    }

    /// The image's path as given to `open`.
    pub fn path(&self) -> &str {
        &self.inner.shared.meta.path
    }

    /// Makes the image standalone: checks that no byte of the disk still
    /// reads from a backing image (every range is data or zero in the
    /// overlay, or reads as zeros in the backing chain too, which an
    /// unallocated cluster without a backing file also does: qcow2.rst),
    /// flushes, then rewrites the header without the backing reference
    /// (crash-safe; see `qcow2::standalone`). Fails with `InvalidInput`,
    /// changing nothing, if data is still missing. Returns whether the
    /// header changed. This handle keeps reading through its chain until it
    /// closes, which gives the same bytes; the next open has no backing.
    pub fn drop_backing(&self) -> Result<bool> {
        self.check_open()?;
        self.inner.shared.meta.check_writable()?;
        let size = self.size();
        let step = 1u64 << 30;
        let mut pos = 0;
        while pos < size {
            let n = step.min(size - pos);
            for e in self.block_status(pos, n)? {
                if let ExtentKind::Backing { zero: false, .. } = e.kind {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "{}: cannot drop the backing file: {} bytes at offset {} still read from it",
                            self.path(),
                            e.len,
                            e.offset
                        ),
                    ));
                }
            }
            pos += n;
        }
        // Every L2 entry found above is durable before the header stops
        // naming the backing file.
        self.flush()?;
        self.inner.shared.meta.drop_backing_reference()
    }

    /// Starts streaming: a background job that populates the whole overlay
    /// from the backing chain, then (unless `opts.keep_backing`) drops the
    /// backing reference. See [`crate::stream`].
    pub fn stream(&self, opts: crate::stream::StreamOptions) -> Result<crate::stream::Stream> {
        crate::stream::Stream::start(self.clone(), opts)
    }

    /// Checks, splits and sends a request whose completion calls `cb`.
    fn submit_cb(
        &self,
        kind: ReqKind,
        offset: u64,
        len: u64,
        buf: Vec<u8>,
        sparse: bool,
        cb: Callback,
    ) {
        let check = self
            .check_open()
            .and_then(|_| self.check_range(offset, len))
            .and_then(|_| match kind {
                ReqKind::Read | ReqKind::Status => Ok(()),
                _ => self.inner.shared.meta.check_writable(),
            });
        let parts = self.parts(offset, len);
        // The stream's populate requests are not client I/O: the stream
        // yields to what `in_flight` counts.
        let in_flight = (kind != ReqKind::Populate).then(|| self.count_in_flight());
        let req = Request::with_callback(kind, buf, parts.max(1), cb, in_flight, sparse);
        if let Err(e) = check {
            req.finish_part(Some(e));
        } else if parts == 0 {
            req.finish_part(None);
        } else {
            self.send(req, offset, len);
        }
    }

    /// Where `[offset, offset + len)` lives: in the overlay (data or zero), in
    /// a backing image (by depth), or nowhere. Extents are in order and
    /// adjacent ones of the same kind are merged.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockStatus>> {
        self.check_open()?;
        self.check_range(offset, len)?;
        let parts = self.parts(offset, len);
        if parts == 0 {
            return Ok(Vec::new());
        }
        let req = Request::new(ReqKind::Status, Vec::new(), parts);
        self.send(req.clone(), offset, len);
        req.wait();
        req.take_result()?;
        Ok(take_status(&req))
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            in_flight: self.inner.in_flight.load(Ordering::Relaxed),
            ..Stats::default()
        };
        for c in &self.inner.shared.stats {
            let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
            s.cor_fills += g(&c.cor_fills);
            s.cor_zero_fills += g(&c.cor_zero_fills);
            s.bytes_fetched += g(&c.bytes_fetched);
            s.overlay_hits += g(&c.overlay_hits);
            s.dedup_hits += g(&c.dedup_hits);
            s.misses += g(&c.misses);
            s.bytes_read += g(&c.bytes_read);
            s.bytes_written += g(&c.bytes_written);
            s.writeback_errors += g(&c.writeback_errors);
            s.commits += g(&c.commits);
            s.remote_reads += g(&c.remote_reads);
            s.remote_bytes += g(&c.remote_bytes);
            s.remote_errors += g(&c.remote_errors);
            s.readahead_bytes += g(&c.readahead_bytes);
            s.readahead_hits += g(&c.readahead_hits);
            s.writebacks_held_bytes += g(&c.held_bytes);
            s.writebacks_held_peak_bytes += g(&c.held_peak_bytes);
            s.remote_latency_us += g(&c.remote_latency_us);
            s.remote_latency_max_us = s.remote_latency_max_us.max(g(&c.remote_latency_max_us));
        }
        s
    }

    /// Why the latest copy-on-read write-back failed, if one has since
    /// open (`Stats::writeback_errors` counts them): an overlay without
    /// room, say. The readers had their data; the overlay just did not
    /// keep it, so that data is still read from the backing image.
    pub fn last_writeback_error(&self) -> Option<Error> {
        self.latest(|c| &c.last_writeback_error)
    }

    /// Why the latest read of a remote backing medium (NBD, HTTP) failed,
    /// after its retries, if one has since open (`Stats::remote_errors`
    /// counts them). The requests that needed it got the error.
    pub fn last_remote_error(&self) -> Option<Error> {
        self.latest(|c| &c.last_remote_error)
    }

    /// The latest of the errors each core keeps in `slot`.
    fn latest(&self, slot: fn(&CoreStats) -> &reactor::LastError) -> Option<Error> {
        self.inner
            .shared
            .stats
            .iter()
            .filter_map(|c| slot(c).get())
            .max_by_key(|(at, _)| *at)
            .map(|(_, e)| e)
    }

    /// Flushes, writes the metadata, frees unused reserved clusters, stops
    /// the reactors and waits for their threads to end (unless called on a
    /// reactor thread). Other clones of this handle fail with ShuttingDown
    /// after.
    pub fn close(self) -> Result<()> {
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => inner.shutdown(),
            Err(inner) => {
                // Other clones exist: stop the cores now and wait for their
                // threads; the clones fail with ShuttingDown.
                if inner.closed.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let stopped = inner.stop_cores();
                let joined = inner.join_cores();
                stopped.and(joined)?;
                inner.shared.release()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_back_budget_is_a_sixteenth_of_memory_at_most() {
        let info = "MemTotal:        1010304 kB\nMemFree:          512000 kB\n";
        assert_eq!(parse_mem_total(info), Some(1010304 * 1024));
        for bad in [
            "",
            "MemFree: 5 kB\n",
            "MemTotal: lots kB\n",
            "MemTotal: 5\n",
        ] {
            assert_eq!(parse_mem_total(bad), None, "{bad:?}");
        }
        let v2 = "0::/user.slice/app.scope\n";
        assert_eq!(
            cgroup_memory_files(v2),
            ["/sys/fs/cgroup/user.slice/app.scope/memory.max"]
        );
        let v1 = "9:name=systemd:/\n4:memory:/box/1\n3:cpu,cpuacct:/\n0::/\n";
        assert_eq!(
            cgroup_memory_files(v1),
            [
                "/sys/fs/cgroup/memory/box/1/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory.max"
            ]
        );
        // This machine: 256 MiB, or less when its memory is small.
        let memory = memory_bytes().expect("/proc/meminfo has MemTotal");
        assert_eq!(
            default_writeback_hold(),
            DEFAULT_WRITEBACK_HOLD.min(memory / 16)
        );
        assert_eq!(
            Options::default().writeback_hold_bytes,
            default_writeback_hold()
        );
    }
}
