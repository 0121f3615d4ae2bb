//! The copy-on-read state machines: the steps of reads, fills, writes,
//! block-status queries and commits on one core.
//!
//! A request part is cut into pieces of at most one cluster. Each piece walks
//! its steps, and each step returns the I/O it needs:
//!
//! - **read**: look up the L2 entry → allocated: read the overlay (no lock);
//!   zero: zeros; unallocated: join the cluster's fill if there is one
//!   (single-flight), else start one.
//! - **fill** (one per missing cluster, holding its lock): read the backing
//!   data → answer every waiting reader at once → write the cluster back
//!   (or record a zero cluster) → publish the L2 entry in the cache →
//!   unlock. The readers do not wait for the write-back.
//! - **write** (holding the cluster's lock): look up → allocated: write in
//!   place (read-modify-write for unaligned edges); otherwise build the whole
//!   cluster in a private buffer (backing data or zeros, then the client's
//!   bytes) → write it to a new cluster → publish → unlock.
//! - **commit**: fdatasync → write the dirty L2 blocks as they were when the
//!   sync was issued → (for flushes) fdatasync again. **Invariant 1**: an L2
//!   entry is written only after an fdatasync that was issued after its data
//!   write completed, because entries are published only on completion and
//!   the snapshot is taken when the sync is issued.
//!
//! With extended L2 entries (subclusters) the same steps run on parts of a
//! cluster: see [`subcluster`].
//!
//! **Invariant 4** (reads are whole): an entry is published only after its
//! cluster's data write completed, so a reader that finds it allocated reads
//! complete data; a reader that finds it unallocated reads backing data or
//! the fill's buffer, which holds the full backing data before anyone sees it.

use super::l2cache::{BlockState, BLOCK_BYTES, BLOCK_ENTRIES};

mod subcluster;
use super::request::{ReqKind, Request};
use super::{
    Core, Ev, PartState, FILE_BACKING0, FILE_DATA, TAG_COMMIT, TAG_FILL, TAG_L2, TAG_PIECE,
};
use crate::backing::Source;
use crate::disk::{BlockStatus, ExtentKind};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{Cqe, FileId, Io, IoBuf, Op, IO_ALIGN};
use crate::locks::Holder;
use crate::qcow2::{
    compressed_data, compressed_host_clusters, decode_l2, decompress, encode_l2, sub_mask,
    CompressionType, ExtL2, L2Entry, SubState,
};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Start,
    OverlayRead,
    PassThrough,
    RmwRead,
    Gather,
    WriteData,
    /// Reading an overlay compressed cluster's bytes, to answer a read.
    CompressedRead,
    /// Reading an overlay compressed cluster's bytes, to rewrite the
    /// cluster uncompressed with the client's bytes merged in.
    CompressedRmw,
    /// Extended L2: reading the host bytes of the granules a write touches,
    /// for the allocated subclusters among them.
    SubRead,
    /// Extended L2: reading backing data for the unallocated subclusters a
    /// write touches but does not cover.
    SubGather,
}

/// The reads [`Core::push_segment_reads`] queued for one step.
#[derive(Default)]
struct Queued {
    /// Completions to wait for.
    reads: u32,
    /// Bytes those completions bring (what a short read falls short of).
    bytes: u64,
    /// Of `bytes`, those read from local layers: counted as fetched by the
    /// step; remote ones count as their reads return, once however many
    /// slots a read serves (`reactor::remote`).
    local_bytes: u64,
    /// Compressed backing clusters among them (read into buffers of their
    /// own; [`Core::run_inflates`] finishes them once every read is in).
    inflates: Vec<Inflate>,
}

impl Queued {
    fn add(&mut self, other: Queued) {
        self.reads += other.reads;
        self.bytes += other.bytes;
        self.local_bytes += other.local_bytes;
        self.inflates.extend(other.inflates);
    }
}

/// A compressed cluster whose bytes a step is reading into `buf`; once
/// every read of the step is in, it is decompressed and bytes
/// `[in_cluster, in_cluster + len)` of the cluster go to offset `dst` of the
/// step's buffer.
pub struct Inflate {
    buf: Arc<IoBuf>,
    /// Bytes of `buf` that hold the compressed data (from offset 0).
    data_len: usize,
    kind: CompressionType,
    cluster_bits: u32,
    in_cluster: usize,
    len: usize,
    dst: usize,
    /// Backing layer, and host offset, for messages.
    layer: usize,
    host_offset: u64,
}

/// What a commit releases once the L2 change that dropped it is durable.
#[derive(Clone, Copy, Debug)]
pub enum Release {
    /// A data cluster the entry owned alone: refcount 0.
    Cluster(u64),
    /// One use of a host cluster a compressed cluster's data touched:
    /// refcount minus one (the host cluster may hold other compressed
    /// clusters' data too).
    Shared(u64),
}

pub struct Piece {
    part: usize,
    kind: ReqKind,
    cluster: u64,
    /// Byte range within the cluster.
    start: u64,
    len: u64,
    /// Offset of this piece in the request's buffer.
    buf_off: u64,
    step: Step,
    buf: Option<Arc<IoBuf>>,
    io_pending: u32,
    io_error: Option<Error>,
    /// Start of the aligned span `buf` holds, within the cluster.
    span_lo: u64,
    /// Host offset of the cluster being written.
    host: u64,
    /// The write makes the cluster allocated: publish `Data { host }` after it.
    publish: bool,
    /// `host` was reserved for this write: handed back if the write fails.
    new_host: bool,
    /// Bytes the current overlay read or write transfers.
    io_len: usize,
    /// A short overlay read: bytes actually read (the rest is past EOF).
    short: Option<usize>,
    /// How far the current overlay write got in earlier, short attempts.
    partial: PartialWrite,
    /// Bytes the backing reads of the current step asked for, and got.
    backing_want: u64,
    backing_got: u64,
    /// Compressed backing clusters the current step's reads fetch.
    inflates: Vec<Inflate>,
    /// The cluster's compressed L2 descriptor, when it had one: read from,
    /// and released once the entry that replaces it is published.
    compressed: Option<u64>,
    pinned: bool,
    locked: bool,
    /// Extended L2: the subclusters the write makes allocated (0: the
    /// whole cluster, as `publish` says).
    sub_mask: u32,
    /// Extended L2: end of the span `buf` holds, within the cluster.
    span_hi: u64,
}

impl Piece {
    /// Bytes `[start, start + len)` of `cluster` for part `part`, at
    /// `buf_off` in the request's buffer; nothing done yet.
    fn new(part: usize, kind: ReqKind, cluster: u64, start: u64, len: u64, buf_off: u64) -> Piece {
        Piece {
            part,
            kind,
            cluster,
            start,
            len,
            buf_off,
            step: Step::Start,
            buf: None,
            io_pending: 0,
            io_error: None,
            span_lo: 0,
            host: 0,
            publish: false,
            new_host: false,
            io_len: 0,
            short: None,
            partial: PartialWrite::default(),
            backing_want: 0,
            backing_got: 0,
            inflates: Vec::new(),
            compressed: None,
            pinned: false,
            locked: false,
            sub_mask: 0,
            span_hi: 0,
        }
    }
}

pub struct Fill {
    seq: u64,
    cluster: u64,
    buf: Option<Arc<IoBuf>>,
    pending: u32,
    ready: bool,
    writing: bool,
    /// Its write-back waits in `held` (see `release_held`).
    held: bool,
    readers: Vec<usize>,
    error: Option<Error>,
    host: u64,
    /// `host` was reserved for this fill (not a cluster the overlay had):
    /// handed back if the write-back fails.
    new_host: bool,
    /// Bytes the backing reads asked for, and got.
    fetched: u64,
    got: u64,
    /// Of `fetched`, those read from local layers (counted as fetched when
    /// the fill's data is in; remote ones count as their reads return).
    fetched_local: u64,
    /// Compressed backing clusters the reads fetch.
    inflates: Vec<Inflate>,
    /// Populate pieces waiting for this fill's write-back (not its data).
    populators: Vec<usize>,
    /// The byte range of the cluster the fill fetches and writes back: the
    /// whole cluster, or with extended L2 entries the granules of
    /// subclusters its first reader needs; `buf` holds exactly it.
    lo: u64,
    hi: u64,
    /// How far its write-back got in earlier, short attempts.
    partial: PartialWrite,
    /// Every byte is known to read as zeros in the chain (zero clusters
    /// below, or what a medium or file system said reads as zeros): the
    /// fill has no buffer and reads nothing, and becomes a zero cluster
    /// (zero subclusters).
    zeros: bool,
    /// Readahead on a disk that passes reads through: nothing is written
    /// back; the buffer is kept for the reader (see [`Core::prefetch`]).
    prefetch: bool,
}

/// How far a write that came back short has got. write(2) may write less
/// than asked (the file system ran out of room part way, or the write
/// reached RLIMIT_FSIZE), and only a retry of the rest gets the reason
/// (ENOSPC, EFBIG, EDQUOT); a merged write that stopped short completes
/// the operations after the stop with 0 bytes, untried, so they are retried
/// too. Two attempts in a row that write nothing are an error.
#[derive(Default, Clone, Copy)]
struct PartialWrite {
    /// Bytes done by earlier attempts.
    written: usize,
    /// The last attempt wrote nothing.
    stalled: bool,
}

impl PartialWrite {
    /// Counts an attempt that wrote `n` bytes, short of the whole write:
    /// where the rest starts, or `Err(written)` when this attempt and the
    /// one before wrote nothing.
    fn advance(&mut self, n: usize) -> std::result::Result<usize, usize> {
        if n == 0 && self.stalled {
            return Err(self.written);
        }
        self.stalled = n == 0;
        self.written += n;
        Ok(self.written)
    }
}

#[derive(Default)]
pub struct Commit {
    in_flight: bool,
    phase: u8,
    pending: u32,
    blocks: Vec<(u64, u64)>,
    waiters: Vec<Arc<Request>>,
    error: Option<Error>,
    /// A close asked for this commit: hand back the reserve after it.
    closing: bool,
    /// Host clusters to release once this commit is durable.
    freeing: Vec<Release>,
    /// L1 entries (tables this core installed) to write after the first sync.
    l1: Vec<u64>,
}

/// Bytes of held write-backs that go out together (one merged write, see
/// `release_held`).
const HOLD_BYTES: usize = crate::io::merge::MAX_MERGED;

const PHASE_SYNC1: usize = 0;
const PHASE_WRITE: usize = 1;
const PHASE_SYNC2: usize = 2;

fn kernel_result(res: i32, what: impl FnOnce() -> String) -> Result<usize> {
    if res < 0 {
        Err(Error::from_errno(-res, what()))
    } else {
        Ok(res as usize)
    }
}

impl<I: Io> Core<I> {
    fn cluster_bits(&self) -> u32 {
        self.shared.meta.cluster_bits
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits()
    }

    fn version(&self) -> u32 {
        self.shared.meta.header.version
    }

    /// Bytes of cluster `c` that lie inside the disk.
    fn valid_len(&self, c: u64) -> u64 {
        let start = c << self.cluster_bits();
        self.cs().min(self.shared.size - start)
    }

    fn bump(&self, counter: fn(&super::CoreStats) -> &std::sync::atomic::AtomicU64, n: u64) {
        counter(&self.shared.stats[self.id]).fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// A copy-on-read write-back failed (no room, say): counted, and its
    /// error kept for the operator. Only copy-on-read work is lost: the
    /// readers had their data, and the cluster still reads from the backing.
    fn writeback_failed(&self, e: &Error) {
        self.bump(|s| &s.writeback_errors, 1);
        self.shared.stats[self.id].last_writeback_error.record(e);
    }

    fn writable(&self) -> bool {
        !self.shared.read_only && !self.shared.meta.is_poisoned()
    }

    /// Reads of data the overlay lacks go to the backing chain and nothing
    /// is written back: no copy-on-read, a read-only disk, or one that
    /// takes no more writes.
    fn passes_through(&self) -> bool {
        !self.shared.copy_on_read || !self.writable()
    }

    // ----- parts -----------------------------------------------------------

    pub(super) fn start_part(&mut self, req: Arc<Request>, offset: u64, len: u64, buf_off: u64) {
        match req.kind {
            ReqKind::Flush => {
                if self.live_fills.is_empty() {
                    self.flush_waiters.push(req);
                } else {
                    self.fill_barriers.push_back((self.next_fill_seq, req));
                }
                return;
            }
            ReqKind::Close => {
                self.closing = Some(req);
                return;
            }
            _ => {}
        }
        if matches!(req.kind, ReqKind::Write | ReqKind::Zero | ReqKind::Discard) {
            if let Err(e) = self.shared.meta.check_writable() {
                req.finish_part(Some(e));
                return;
            }
        }
        let part = self.parts.insert(PartState {
            req,
            pending: 0,
            error: None,
            bytes: len,
        });
        let kind = self.parts[part].req.kind;
        let cs = self.cs();
        let mut pos = offset;
        let end = offset + len;
        let mut n = 0;
        while pos < end {
            let cluster = pos >> self.cluster_bits();
            let stop = if kind == ReqKind::Status {
                // One L2 block at most (a stripe holds two with extended entries).
                let bc = self.block_clusters();
                end.min(((cluster / bc + 1) * bc) << self.cluster_bits())
            } else {
                end.min((cluster + 1) * cs)
            };
            let id = self.pieces.insert(Piece::new(
                part,
                kind,
                cluster,
                pos - (cluster << self.cluster_bits()),
                stop - pos,
                buf_off + pos - offset,
            ));
            self.events.push_back(Ev::Run(id));
            n += 1;
            pos = stop;
        }
        self.parts[part].pending = n;
        if n == 0 {
            let p = self.parts.remove(part);
            p.req.finish_part(None);
        }
        if kind == ReqKind::Read {
            self.read_ahead(offset, len);
        }
    }

    fn finish_piece(&mut self, id: usize, result: Result<()>) {
        let p = self.pieces.remove(id);
        if result.is_err() && p.new_host {
            // Its write failed, or publishing it did (which fails before
            // it sets the entry): nothing points to the cluster.
            self.hand_back(p.host);
        }
        if p.pinned {
            self.unpin(p.cluster);
        }
        if p.locked {
            for w in self.locks.unlock(p.cluster) {
                self.events.push_back(Ev::Run(w));
            }
        }
        if let Some(b) = p.buf {
            self.pool.put(b);
        }
        let part = &mut self.parts[p.part];
        if let Err(e) = result {
            part.error.get_or_insert(e);
        }
        part.pending -= 1;
        if part.pending == 0 {
            let part = self.parts.remove(p.part);
            if part.error.is_none() {
                match part.req.kind {
                    ReqKind::Read => self.bump(|s| &s.bytes_read, part.bytes),
                    ReqKind::Write | ReqKind::Zero | ReqKind::Discard => {
                        self.bump(|s| &s.bytes_written, part.bytes)
                    }
                    _ => {}
                }
            }
            part.req.finish_part(part.error);
        }
    }

    /// Gives piece `id` its bytes, `len` of them at `at` in `buf` (whose
    /// contents are final): lent to a request that takes lent ranges (an
    /// NBD server sends them from `buf`), copied into its buffer otherwise.
    fn deliver(&self, id: usize, buf: &Arc<IoBuf>, at: usize, len: usize) {
        let p = &self.pieces[id];
        let req = &self.parts[p.part].req;
        if req.kind == ReqKind::Populate {
            return; // Populate returns no data.
        }
        if req.lend(p.buf_off, buf, at, len) {
            return;
        }
        let data = &buf.as_slice()[at..at + len];
        let mut dst = req.buf.lock().unwrap_or_else(|e| e.into_inner());
        let o = p.buf_off as usize;
        dst[o..o + len].copy_from_slice(data);
    }

    fn deliver_zeros(&self, id: usize) {
        let p = &self.pieces[id];
        let req = &self.parts[p.part].req;
        if req.kind == ReqKind::Populate {
            return; // Populate returns no data.
        }
        let mut buf = req.buf.lock().unwrap_or_else(|e| e.into_inner());
        let o = p.buf_off as usize;
        buf[o..o + p.len as usize].fill(0);
        req.note_zeros(p.buf_off, p.len);
    }

    // ----- L2 lookups ------------------------------------------------------

    /// The raw L2 entry of `cluster`, or None if piece `id` now waits for
    /// its block to load.
    fn lookup(&mut self, id: usize, cluster: u64) -> Option<Result<u64>> {
        let (key, idx) = (self.l2_key(cluster), self.l2_slot(cluster));
        if let Some(b) = self.l2.get(key) {
            return match &mut b.state {
                BlockState::Ready => Some(Ok(b.entries[idx])),
                BlockState::Loading(waiters) => {
                    waiters.push(id);
                    None
                }
            };
        }
        let l2e = self.l2_entries();
        let table = match self.shared.meta.l2_table(cluster / l2e) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        let Some(table) = table else {
            // No L2 table: every entry is unallocated. Only this core ever
            // writes this block, so an all-zero copy is authoritative.
            self.l2
                .insert(key, BlockState::Ready, Box::new([0; BLOCK_ENTRIES]));
            return Some(Ok(0));
        };
        let within = (cluster % l2e) / self.block_clusters();
        let off = table + within * BLOCK_BYTES as u64;
        self.l2.insert(
            key,
            BlockState::Loading(vec![id]),
            Box::new([0; BLOCK_ENTRIES]),
        );
        let buf = self.pool.get(BLOCK_BYTES);
        self.io
            .push(TAG_L2 | key, Op::read(FILE_DATA, off, buf, 0, BLOCK_BYTES));
        None
    }

    pub(super) fn l2_loaded(&mut self, key: u64, cqe: Cqe) {
        let mut buf = cqe.buf.expect("L2 load has a buffer");
        let res = kernel_result(cqe.result, || {
            format!("{}: reading L2 block {key}", self.shared.meta.path)
        })
        .map(|n| {
            // A table installed this session may lie past the end of the
            // file, never written: it reads as zeros. (Tables the image came
            // with were checked against the file's end at open.)
            if n < BLOCK_BYTES {
                IoBuf::unique_mut(&mut buf)[n..BLOCK_BYTES].fill(0);
            }
        });
        let b = self.l2.get(key).expect("loading block is cached");
        let BlockState::Loading(waiters) = std::mem::replace(&mut b.state, BlockState::Ready)
        else {
            unreachable!("L2 block {key} loaded twice");
        };
        match res {
            Ok(()) => {
                for (e, raw) in b.entries.iter_mut().zip(buf.as_slice().chunks_exact(8)) {
                    *e = u64::from_be_bytes(raw.try_into().unwrap());
                }
                for w in waiters {
                    self.events.push_back(Ev::Run(w));
                }
            }
            Err(e) => {
                self.l2.remove(key);
                for w in waiters {
                    self.finish_piece(w, Err(e.clone()));
                }
            }
        }
        self.pool.put(buf);
    }

    fn pin(&mut self, id: usize) {
        let c = self.pieces[id].cluster;
        if !self.pieces[id].pinned {
            self.l2
                .get(self.l2_key(c))
                .expect("pinning a cached block")
                .pins += 1;
            self.pieces[id].pinned = true;
        }
    }

    fn unpin(&mut self, cluster: u64) {
        let b = self
            .l2
            .get(self.l2_key(cluster))
            .expect("pinned block stays cached");
        b.pins -= 1;
    }

    /// Makes `entry` the cluster's L2 entry in the cache (written by a later
    /// commit). The block must be pinned by the caller.
    ///
    /// With extended L2 entries, `entry` describes the whole cluster: data
    /// or zeros in all 32 subclusters (see [`Core::publish_ext`] for the
    /// subcluster-granular changes).
    fn publish(&mut self, cluster: u64, entry: L2Entry) -> Result<()> {
        if self.ext() {
            let (alloc, zero) = match entry {
                L2Entry::Data { .. } => (u32::MAX, 0),
                L2Entry::Zero { .. } => (0, u32::MAX),
                L2Entry::Unallocated | L2Entry::Compressed(_) => (0, 0),
            };
            return self.publish_ext(cluster, ExtL2 { entry, alloc, zero });
        }
        self.ensure_l2_table(cluster)?;
        self.l2.set_entry(
            self.l2_key(cluster),
            self.l2_slot(cluster),
            encode_l2(&entry),
        );
        Ok(())
    }

    /// Installs the L2 table that maps `cluster` if there is none yet.
    fn ensure_l2_table(&mut self, cluster: u64) -> Result<()> {
        let l1 = cluster / self.l2_entries();
        if self.shared.meta.l2_table(l1)?.is_none() {
            // The table comes from this core's reserve, so it sits next to
            // the data and the file stays dense.
            let off = self.alloc_cluster()?;
            match self.shared.meta.install_l2_table(l1, off) {
                // Written to disk by this core's next commit.
                Ok(true) => self.l1_dirty.push(l1),
                // Still never written: another use may take it.
                Ok(false) => self.spare.push(off),
                Err(e) => {
                    self.spare.push(off);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn decode(&self, raw: u64) -> Result<L2Entry> {
        let e = decode_l2(raw, self.version(), self.cs())?;
        self.check_host(raw, e)?;
        Ok(e)
    }

    /// Refuses an entry whose data lies in the header or past the clusters
    /// in use.
    fn check_host(&self, raw: u64, e: L2Entry) -> Result<()> {
        if let L2Entry::Data { host } = e {
            if !self.shared.meta.host_in_use(host) {
                return Err(Error::corrupt(format!(
                    "{}: L2 entry {raw:#x} points to host offset {host:#x}, past the clusters in use",
                    self.shared.meta.path
                )));
            }
        }
        if let L2Entry::Compressed(raw) = e {
            let (off, len) = compressed_data(raw, self.cluster_bits());
            if off < self.cs() || !self.shared.meta.host_in_use(off + len - 1) {
                return Err(Error::corrupt(format!(
                    "{}: compressed L2 entry {raw:#x} names host bytes {off:#x}+{len}, in the \
                     header or past the clusters in use",
                    self.shared.meta.path
                )));
            }
        }
        Ok(())
    }

    /// A new host cluster for piece `id`'s write (see `Piece::new_host`).
    pub(super) fn alloc_piece_cluster(&mut self, id: usize) -> Result<u64> {
        let host = self.alloc_cluster()?;
        self.pieces[id].new_host = true;
        Ok(host)
    }

    /// Hands back host cluster `host`, reserved for a write that failed:
    /// nothing points to it, and it may hold part of the write, so it is
    /// not used again but freed when the image closes (as QEMU frees the
    /// clusters of a failed allocating write), never left as a leak.
    fn hand_back(&self, host: u64) {
        self.shared.meta.give_back(host >> self.cluster_bits(), 1);
    }

    /// A free host cluster from this core's reserve (refilled in batches).
    fn alloc_cluster(&mut self) -> Result<u64> {
        if let Some(off) = self.spare.pop() {
            return Ok(off);
        }
        if self.reserve.0 == self.reserve.1 {
            let batch = (32u64 << 20 >> self.cluster_bits()).clamp(1, 256);
            let first = self.shared.meta.reserve(batch)?;
            self.reserve = (first, first + batch);
        }
        let c = self.reserve.0;
        self.reserve.0 += 1;
        Ok(c << self.cluster_bits())
    }

    /// Backing segments for guest range `[off, off + len)` into `self.segs`.
    fn resolve(&mut self, off: u64, len: u64) -> Result<()> {
        self.segs.clear();
        let chain = self
            .shared
            .chain
            .as_ref()
            .expect("resolve needs a backing chain");
        chain.resolve(&mut self.chain_cache, off, len, &mut self.segs)
    }

    /// Pushes reads of `self.segs` into `buf` (zeroed first), and says
    /// what it queued. Parts of compressed clusters this core decompressed
    /// lately are copied in instead (their segments become zeros: done).
    fn push_backing_reads(&mut self, token: u64, buf: &mut Arc<IoBuf>, at: usize) -> Queued {
        // Reads, remote fetches and inflates write every byte of their
        // segments (or fail the step): only zero segments need zeroing.
        let b = IoBuf::unique_mut(buf);
        let mut pos = at;
        for s in &mut self.segs {
            let len = s.len as usize;
            match s.source {
                Source::Zero => b[pos..pos + len].fill(0),
                Source::Compressed {
                    layer,
                    host_offset,
                    in_cluster,
                    ..
                } => {
                    if let Some(c) = self.inflated.get((1 + layer, host_offset), 0) {
                        let from = in_cluster as usize;
                        b[pos..pos + len].copy_from_slice(&c.as_slice()[from..from + len]);
                        s.source = Source::Zero;
                    }
                }
                _ => {}
            }
            pos += len;
        }
        self.push_segment_reads(token, buf, at)
    }

    /// [`Core::push_backing_reads`] into a buffer whose bytes there are
    /// zeros already (other reads into it may be in flight).
    fn push_segment_reads(&mut self, token: u64, buf: &Arc<IoBuf>, at: usize) -> Queued {
        let mut pos = at;
        let mut q = Queued::default();
        let chain = self.shared.chain.as_ref();
        let depth = chain.map_or(0, |c| c.depth()) as u32;
        let align = IO_ALIGN as u64;
        for s in &self.segs {
            if let Source::Compressed {
                layer,
                host_offset,
                data_len,
                in_cluster,
                cluster_bits,
                kind,
            } = s.source
            {
                let packed = self.pool.get(data_len as usize);
                q.reads += match chain.filter(|c| c.remote(layer).is_some()) {
                    // A remote qcow2 image's cluster: fetched like its data.
                    Some(chain) => self.remote.push(
                        chain,
                        token,
                        (layer, host_offset),
                        (&packed, 0),
                        data_len as usize,
                    ),
                    // Any alignment: read through the page cache.
                    None => {
                        q.local_bytes += data_len;
                        self.io.push(
                            token,
                            Op::read(
                                FileId(FILE_BACKING0 + layer as u32),
                                host_offset,
                                packed.clone(),
                                0,
                                data_len as usize,
                            ),
                        );
                        1
                    }
                };
                q.inflates.push(Inflate {
                    buf: packed,
                    data_len: data_len as usize,
                    kind,
                    cluster_bits,
                    in_cluster: in_cluster as usize,
                    len: s.len as usize,
                    dst: pos,
                    layer,
                    host_offset,
                });
                q.bytes += data_len;
            }
            if let Source::File { layer, host_offset } = s.source {
                // Aligned reads bypass the page cache (no copy out of it);
                // the rest (a tail at the backing file's end, pass-through
                // pieces) read through it.
                let aligned = host_offset.is_multiple_of(align)
                    && s.len.is_multiple_of(align)
                    && (pos as u64).is_multiple_of(align);
                let direct = aligned && chain.is_some_and(|c| c.has_direct(layer));
                let file = if direct {
                    FileId(FILE_BACKING0 + depth + layer as u32)
                } else {
                    FileId(FILE_BACKING0 + layer as u32)
                };
                self.io.push(
                    token,
                    Op::read(file, host_offset, buf.clone(), pos, s.len as usize),
                );
                q.reads += 1;
                q.bytes += s.len;
                q.local_bytes += s.len;
            }
            if let (Source::Remote { layer, offset }, Some(chain)) = (s.source, chain) {
                // Completes like ring reads, from another thread (see `remote`).
                let len = s.len as usize;
                q.reads += self
                    .remote
                    .push(chain, token, (layer, offset), (buf, pos), len);
                q.bytes += s.len;
            }
            pos += s.len as usize;
        }
        q
    }

    /// Decompresses the compressed backing clusters a step has read and
    /// copies their wanted bytes into `dst`. Runs on the core: the data is
    /// in memory, and one cluster's inflate is short next to its fetch.
    fn run_inflates(&mut self, jobs: Vec<Inflate>, dst: &mut Arc<IoBuf>) -> Result<()> {
        let mut r = Ok(());
        for j in jobs {
            let key = (1 + j.layer, j.host_offset);
            if let (Ok(()), Some(c)) = (&r, self.inflated.get(key, 0)) {
                // Decompressed for another step of this turn.
                IoBuf::unique_mut(dst)[j.dst..j.dst + j.len]
                    .copy_from_slice(&c.as_slice()[j.in_cluster..j.in_cluster + j.len]);
            } else if r.is_ok() {
                let cs = 1usize << j.cluster_bits;
                let mut scratch = self.pool.get(cs);
                let out = &mut IoBuf::unique_mut(&mut scratch)[..cs];
                r = decompress(j.kind, &j.buf.as_slice()[..j.data_len], out).map_err(|e| {
                    let name = self
                        .shared
                        .chain
                        .as_ref()
                        .map_or("?", |c| c.layer_name(j.layer));
                    e.context(format!(
                        "backing file {name}: compressed cluster at host offset {:#x}",
                        j.host_offset
                    ))
                });
                if r.is_ok() {
                    IoBuf::unique_mut(dst)[j.dst..j.dst + j.len]
                        .copy_from_slice(&out[j.in_cluster..j.in_cluster + j.len]);
                    self.keep_inflated(key, scratch);
                } else {
                    self.pool.put(scratch);
                }
            }
            self.pool.put(j.buf);
        }
        r
    }

    /// Decompresses the overlay's own compressed cluster `raw`, whose bytes
    /// piece `id` read into its buffer (from the aligned offset `span_lo`),
    /// into a fresh cluster buffer.
    fn inflate_overlay(&mut self, id: usize) -> Result<Arc<IoBuf>> {
        let p = &mut self.pieces[id];
        let packed = p.buf.take().expect("compressed read buffer");
        let raw = p.compressed.expect("compressed piece has a descriptor");
        let (cluster, lo) = (p.cluster, p.span_lo);
        let cb = self.cluster_bits();
        let (off, len) = compressed_data(raw, cb);
        let kind = self.compression()?;
        let cs = self.cs() as usize;
        let mut out = self.pool.get(cs);
        let at = (off - lo) as usize;
        let r = decompress(
            kind,
            &packed.as_slice()[at..at + len as usize],
            &mut IoBuf::unique_mut(&mut out)[..cs],
        );
        self.pool.put(packed);
        match r {
            Ok(()) => Ok(out),
            Err(e) => {
                self.pool.put(out);
                Err(e.context(format!(
                    "{}: compressed cluster of guest offset {:#x} at host offset {off:#x}",
                    self.shared.meta.path,
                    cluster << cb
                )))
            }
        }
    }

    /// Keeps decompressed cluster `buf` under `key` (see `Core::inflated`);
    /// what it pushes out goes back to the pool.
    fn keep_inflated(&mut self, key: (usize, u64), buf: Arc<IoBuf>) {
        for b in self.inflated.insert(key, 0, buf) {
            self.pool.put(b);
        }
    }

    fn compression(&self) -> Result<CompressionType> {
        CompressionType::from_header(self.shared.meta.header.compression_type)
    }

    /// Reads `len` bytes of the overlay file at `at` into `buf` for piece
    /// `id`, which goes on at `step` when they are in.
    pub(super) fn read_into_piece(
        &mut self,
        id: usize,
        buf: Arc<IoBuf>,
        at: u64,
        len: usize,
        step: Step,
    ) {
        self.io.push(
            TAG_PIECE | id as u64,
            Op::read(FILE_DATA, at, buf.clone(), 0, len),
        );
        let p = &mut self.pieces[id];
        p.buf = Some(buf);
        p.io_len = len;
        p.step = step;
        p.io_pending = 1;
    }

    /// Reads the bytes of the overlay's compressed cluster `raw` for piece
    /// `id` (an aligned span, for O_DIRECT), which goes on at `step`.
    fn read_compressed(&mut self, id: usize, raw: u64, step: Step) {
        if let (Step::CompressedRead, Some(c)) = (step, self.inflated.get((0, raw), 0)) {
            let c = c.clone();
            let (start, len) = (self.pieces[id].start as usize, self.pieces[id].len as usize);
            self.deliver(id, &c, start, len);
            self.finish_piece(id, Ok(()));
            return;
        }
        if step == Step::CompressedRead {
            if let Some(waiting) = self.inflating.get_mut(&raw) {
                waiting.push(id);
                return;
            }
            self.inflating.insert(raw, Vec::new());
        }
        let (off, len) = compressed_data(raw, self.cluster_bits());
        let lo = off & !(IO_ALIGN as u64 - 1);
        let hi = (off + len).next_multiple_of(IO_ALIGN as u64);
        let n = (hi - lo) as usize;
        let buf = self.pool.get(n);
        self.read_into_piece(id, buf, lo, n, step);
        let p = &mut self.pieces[id];
        p.span_lo = lo;
        p.compressed = Some(raw);
    }

    /// Queues the release of the host clusters the overlay's compressed
    /// cluster `raw` used, after the commit that makes the entry just
    /// published for `cluster` durable.
    fn release_compressed(&mut self, cluster: u64, raw: u64) {
        if let Some(b) = self.inflated.forget((0, raw)) {
            self.pool.put(b);
        }
        let cb = self.cluster_bits();
        for c in compressed_host_clusters(raw, cb) {
            self.release_after_commit(cluster, Release::Shared(c << cb));
        }
    }

    /// Queues `release` for after the commit that makes the entry just
    /// published for `cluster` durable (its L2 block's current generation).
    fn release_after_commit(&mut self, cluster: u64, release: Release) {
        let key = self.l2_key(cluster);
        let generation = self
            .l2
            .peek(key)
            .expect("published block is cached")
            .generation;
        self.frees.push((key, generation, release));
    }

    /// Reads the backing segments in `self.segs` into `buf` for piece `id`,
    /// which goes on at `step` when they are in.
    fn read_backing_into(&mut self, id: usize, mut buf: Arc<IoBuf>, step: Step) {
        let q = self.push_backing_reads(TAG_PIECE | id as u64, &mut buf, 0);
        self.bump(|s| &s.bytes_fetched, q.local_bytes);
        let p = &mut self.pieces[id];
        p.buf = Some(buf);
        p.inflates = q.inflates;
        p.step = step;
        p.io_pending = q.reads;
        p.backing_want = q.bytes;
        p.backing_got = 0;
        if q.reads == 0 {
            self.piece_step_done(id);
        }
    }

    // ----- pieces ----------------------------------------------------------

    /// Cluster, byte offset within it, and length of piece `id`.
    fn span(&self, id: usize) -> (u64, u64, u64) {
        let p = &self.pieces[id];
        (p.cluster, p.start, p.len)
    }

    pub(super) fn run_piece(&mut self, id: usize) {
        let r = match self.pieces[id].kind {
            ReqKind::Read => self.run_read(id),
            ReqKind::Write | ReqKind::Zero | ReqKind::Discard => self.run_write(id),
            ReqKind::Status => self.run_status(id),
            ReqKind::Populate => self.run_populate(id),
            k => unreachable!("{k:?} has no pieces"),
        };
        if let Err(e) = r {
            self.finish_piece(id, Err(e));
        }
    }

    fn run_read(&mut self, id: usize) -> Result<()> {
        let cluster = self.pieces[id].cluster;
        let Some(raw) = self.lookup(id, cluster) else {
            return Ok(());
        };
        let raw = raw?;
        if self.ext() {
            return self.run_read_ext(id);
        }
        match self.decode(raw)? {
            L2Entry::Data { host } => {
                self.bump(|s| &s.overlay_hits, 1);
                if !self.read_kept(id, host) {
                    self.read_overlay(id, host);
                }
                Ok(())
            }
            L2Entry::Zero { .. } => {
                self.bump(|s| &s.overlay_hits, 1);
                self.deliver_zeros(id);
                self.finish_piece(id, Ok(()));
                Ok(())
            }
            L2Entry::Compressed(raw) => {
                self.bump(|s| &s.overlay_hits, 1);
                self.read_compressed(id, raw, Step::CompressedRead);
                Ok(())
            }
            L2Entry::Unallocated => self.read_unallocated(id),
        }
    }

    /// Answers read piece `id` from the kept buffer of its cluster, if
    /// there is one for host cluster `host`. A piece that reads up to the
    /// cluster's end uses it up.
    fn read_kept(&mut self, id: usize, host: u64) -> bool {
        if self.kept.is_empty() {
            return false;
        }
        let (cluster, start, len) = self.span(id);
        let Some(buf) = self.kept.get(cluster, host).cloned() else {
            return false;
        };
        let (s, l) = (start as usize, len as usize);
        self.deliver(id, &buf, s, l);
        drop(buf);
        if start + len == self.cs() {
            if let Some(b) = self.kept.forget(cluster) {
                self.pool.put(b);
            }
        }
        self.bump(|s| &s.readahead_hits, 1);
        self.finish_piece(id, Ok(()));
        true
    }

    /// Readahead on a disk that passes reads through (see `readahead`):
    /// populate piece `id` of an unallocated cluster fetches the whole
    /// cluster into memory, kept for the reader it runs ahead of, under
    /// the cluster's lock (a write of the cluster waits for it, then drops
    /// what it kept). A cluster kept or being fetched already, or being
    /// written, needs nothing.
    fn prefetch(&mut self, id: usize) -> Result<()> {
        let cluster = self.pieces[id].cluster;
        if self.ext() || self.locks.holder(cluster).is_some() || self.kept.has(cluster) {
            self.finish_piece(id, Ok(()));
            return Ok(());
        }
        if let Some(fid) = self.start_populating_fill(id)? {
            self.fills[fid].prefetch = true;
        }
        Ok(())
    }

    /// Keeps the buffer of prefetch fill `fid` (see [`Core::prefetch`]),
    /// as the content of its cluster while the overlay lacks it (host 0).
    fn keep_prefetched(&mut self, fid: usize, buf: Option<Arc<IoBuf>>) {
        let f = &mut self.fills[fid];
        let Some(buf) = buf else {
            return;
        };
        if f.error.is_some() || !f.prefetch {
            return;
        }
        let cluster = f.cluster;
        // `release_fill` puts the fill's own clone back in the pool.
        f.buf = None;
        for b in self.kept.insert(cluster, 0, buf) {
            self.pool.put(b);
        }
    }

    /// Answers pass-through read piece `id` from what readahead fetched
    /// for its cluster: kept, or still being fetched (then it waits with
    /// the fetch's readers).
    fn read_prefetched(&mut self, id: usize) -> bool {
        if self.read_kept(id, 0) {
            return true;
        }
        let cluster = self.pieces[id].cluster;
        let Some(Holder::Fill(fid)) = self.locks.holder(cluster) else {
            return false;
        };
        self.join_fill(id, fid);
        true
    }

    /// Read piece `id` takes its bytes from fill `fid`, which covers them:
    /// at once if its data is in, else with its readers.
    fn join_fill(&mut self, id: usize, fid: usize) {
        self.bump(|s| &s.dedup_hits, 1);
        let (start, len) = (self.pieces[id].start, self.pieces[id].len as usize);
        let f = &mut self.fills[fid];
        if f.ready {
            let buf = f.buf.clone().expect("ready fill has data");
            let at = (start - f.lo) as usize;
            self.deliver(id, &buf, at, len);
            self.finish_piece(id, Ok(()));
        } else {
            f.readers.push(id);
        }
    }

    /// Reads the piece's bytes from the overlay's host cluster `host` (an
    /// aligned span around them, for O_DIRECT).
    fn read_overlay(&mut self, id: usize, host: u64) {
        let (_, start, len) = self.span(id);
        let lo = start & !(IO_ALIGN as u64 - 1);
        let hi = (start + len)
            .next_multiple_of(IO_ALIGN as u64)
            .min(self.cs());
        let buf = self.pool.get((hi - lo) as usize);
        let n = (hi - lo) as usize;
        self.read_into_piece(id, buf, host + lo, n, Step::OverlayRead);
        self.pieces[id].span_lo = lo;
    }

    fn read_unallocated(&mut self, id: usize) -> Result<()> {
        let (cluster, start, len) = self.span(id);
        if self.shared.chain.is_none() {
            self.deliver_zeros(id);
            self.finish_piece(id, Ok(()));
            return Ok(());
        }
        if self.passes_through() {
            // What readahead fetched for this reader, if anything.
            if !self.ext() && self.read_prefetched(id) {
                return Ok(());
            }
            // Pass-through: read the backing image directly; no lock needed,
            // since nothing is written back.
            self.bump(|s| &s.misses, 1);
            let base = cluster << self.cluster_bits();
            self.resolve(base + start, len)?;
            let buf = self.pool.get(len as usize);
            self.read_backing_into(id, buf, Step::PassThrough);
            return Ok(());
        }
        match self.locks.holder(cluster) {
            // With extended L2 entries a fill may fetch another part of
            // the cluster: then the reader waits for the lock.
            Some(Holder::Fill(fid))
                if self.fills[fid].lo <= start && start + len <= self.fills[fid].hi =>
            {
                self.join_fill(id, fid);
                Ok(())
            }
            Some(_) => {
                self.wait_lock(cluster, id);
                Ok(())
            }
            None => self.start_fill(id),
        }
    }

    /// A populate piece: a cluster the overlay lacks is filled from the
    /// backing chain (joining a fill in flight, if any) and the piece
    /// finishes when the fill's write-back has landed; anything the
    /// overlay holds already finishes at once, with no I/O.
    fn run_populate(&mut self, id: usize) -> Result<()> {
        let cluster = self.pieces[id].cluster;
        let Some(raw) = self.lookup(id, cluster) else {
            return Ok(());
        };
        let raw = raw?;
        let missing = if self.ext() {
            // One run of subclusters of one state at a time, as reads.
            self.populate_run_ext(id)?
        } else {
            self.decode(raw)? == L2Entry::Unallocated
        };
        if !missing || self.shared.chain.is_none() {
            self.finish_piece(id, Ok(()));
            return Ok(());
        }
        if self.passes_through() {
            if self.shared.meta.is_poisoned() {
                self.shared.meta.check_writable()?;
            }
            // `Disk::populate` refuses such disks: this is readahead.
            return self.prefetch(id);
        }
        match self.locks.holder(cluster) {
            Some(Holder::Fill(fid)) if !self.fill_covers(fid, id) => {
                // A fill of other subclusters: run again when it is done.
                self.wait_lock(cluster, id);
                Ok(())
            }
            Some(Holder::Fill(fid)) => {
                let f = &mut self.fills[fid];
                if f.held && f.populators.is_empty() {
                    self.held_populating += 1;
                }
                f.populators.push(id);
                Ok(())
            }
            Some(Holder::Write) => {
                // Run again when the write is done: it allocates the cluster.
                self.wait_lock(cluster, id);
                Ok(())
            }
            None => {
                // A sibling fill's bytes are decompressed already.
                if let Some((key, buf)) = self.parts[self.pieces[id].part].req.seed.clone() {
                    if !self.inflated.has(key) {
                        self.keep_inflated(key, buf);
                    }
                }
                self.start_populating_fill(id).map(|_| ())
            }
        }
    }

    /// Starts a fill for populate piece `id`, which waits for its
    /// write-back (or, for a prefetch, its data) instead of taking data:
    /// started as the fill's reader (a cluster allocated nowhere in the
    /// chain finishes it at once), then moved to the populators. The
    /// fill, unless it finished at once.
    fn start_populating_fill(&mut self, id: usize) -> Result<Option<usize>> {
        let cluster = self.pieces[id].cluster;
        self.start_fill(id)?;
        let Some(Holder::Fill(fid)) = self.locks.holder(cluster) else {
            return Ok(None);
        };
        let f = &mut self.fills[fid];
        if let Some(i) = f.readers.iter().position(|&r| r == id) {
            f.readers.swap_remove(i);
            f.populators.push(id);
        }
        Ok(Some(fid))
    }

    fn start_fill(&mut self, id: usize) -> Result<()> {
        let cluster = self.pieces[id].cluster;
        let base = cluster << self.cluster_bits();
        let valid = self.valid_len(cluster);
        let (mut lo, mut hi) = if self.ext() {
            let p = &self.pieces[id];
            self.fill_span(p.start, p.len)
        } else {
            (0, self.cs())
        };
        self.resolve(base + lo, valid.min(hi) - lo)?;
        if self.ext() {
            if let Some(wider) = self.widen_for_compressed(cluster, lo, hi, valid)? {
                (lo, hi) = wider;
                self.resolve(base + lo, valid.min(hi) - lo)?;
            }
        }
        if self.segs.iter().all(|s| s.depth == 0) {
            // Allocated nowhere in the chain: zeros, and nothing to copy.
            self.deliver_zeros(id);
            self.finish_piece(id, Ok(()));
            return Ok(());
        }
        // Known zeros need no buffer: no memset, no read, no zero scan of
        // 64 KiB per cluster, which was most of a sparse stream's time. An
        // image without zero clusters (compat 0.10) writes them as data.
        let zeros = (self.version() >= 3 || !self.writable())
            && self.segs.iter().all(|s| matches!(s.source, Source::Zero));
        let seq = self.next_fill_seq;
        self.next_fill_seq += 1;
        self.live_fills.insert(seq);
        let fid = self.fills.insert(Fill {
            seq,
            cluster,
            buf: None,
            pending: 0,
            ready: false,
            writing: false,
            held: false,
            readers: vec![id],
            error: None,
            host: 0,
            new_host: false,
            fetched: 0,
            got: 0,
            fetched_local: 0,
            inflates: Vec::new(),
            populators: Vec::new(),
            lo,
            hi,
            partial: PartialWrite::default(),
            zeros,
            prefetch: false,
        });
        let locked = self.locks.try_lock(cluster, Holder::Fill(fid));
        debug_assert!(locked, "fill started on a locked cluster");
        // Keep the block cached until the entry is published.
        let key = self.l2_key(cluster);
        self.l2.get(key).expect("looked-up block is cached").pins += 1;
        self.bump(|s| &s.misses, 1);
        if zeros {
            self.events.push_back(Ev::FillData(fid));
            return Ok(());
        }
        let mut buf = self.pool.get((hi - lo) as usize);
        // Past the disk's end (a partial last cluster) and past `hi` (the
        // pool rounds sizes up) nothing is read: zeros, which zero
        // detection and the write-back see.
        let covered = valid.min(hi).saturating_sub(lo) as usize;
        IoBuf::unique_mut(&mut buf)[covered..].fill(0);
        let q = self.push_backing_reads(TAG_FILL | fid as u64, &mut buf, 0);
        let f = &mut self.fills[fid];
        f.buf = Some(buf);
        f.inflates = q.inflates;
        f.pending = q.reads;
        f.fetched = q.bytes;
        f.fetched_local = q.local_bytes;
        if q.reads == 0 {
            self.events.push_back(Ev::FillData(fid));
        }
        Ok(())
    }

    pub(super) fn fill_io_done(&mut self, fid: usize, cqe: Cqe) {
        let path = &self.shared.meta.path;
        let remote_error = self.remote.error.take();
        let f = &mut self.fills[fid];
        let res = kernel_result(cqe.result, || {
            if f.writing {
                format!("{path}: copy-on-read write-back of cluster {}", f.cluster)
            } else {
                format!("{path}: reading backing data for cluster {}", f.cluster)
            }
        });
        let buf = cqe.buf;
        match res {
            Err(e) if !f.writing => {
                f.error
                    .get_or_insert(remote_error.unwrap_or_else(|| e.context("backing image")));
            }
            Err(e) => {
                f.error.get_or_insert(e);
            }
            // A short write-back is retried for the rest, as a client's
            // write is (see `PartialWrite`), so that the operator's report
            // has the reason.
            Ok(n) if f.writing && f.partial.written + n < (f.hi - f.lo) as usize => {
                let len = (f.hi - f.lo) as usize;
                match f.partial.advance(n) {
                    Err(done) => {
                        f.error.get_or_insert(Error::new(
                            ErrorKind::Io,
                            format!(
                                "{path}: copy-on-read write-back of cluster {}: short write \
                                 ({done} of {len} bytes)",
                                f.cluster
                            ),
                        ));
                    }
                    Ok(done) if f.error.is_none() => {
                        let at = f.host + f.lo + done as u64;
                        let buf = buf.expect("a write has its buffer");
                        self.io.push(
                            TAG_FILL | fid as u64,
                            Op::write(FILE_DATA, at, buf, done, len - done),
                        );
                        return;
                    }
                    Ok(_) => {}
                }
            }
            Ok(n) if !f.writing => f.got += n as u64,
            Ok(_) => {}
        }
        // The operation's clone of the buffer: the fill's own is what
        // goes on (to the pool, or kept).
        drop(buf);
        f.pending -= 1;
        if f.pending > 0 {
            return;
        }
        if !f.writing && f.error.is_none() && f.got < f.fetched {
            f.error = Some(short_backing_read(f.got, f.fetched));
        }
        let jobs = std::mem::take(&mut f.inflates);
        if !f.writing && !jobs.is_empty() {
            let mut buf = f.buf.take().expect("fill has a buffer");
            let failed = f.error.is_some();
            // Compressed clusters reaching past this cluster (none, and no
            // allocation, when the backing's clusters are no larger).
            let cb = self.shared.meta.cluster_bits;
            let (base, start) = (f.cluster << cb, (f.cluster << cb) + f.lo);
            let siblings: Vec<_> = jobs
                .iter()
                .map(|j| {
                    let lo = start + j.dst as u64 - j.in_cluster as u64;
                    let key = (1 + j.layer, j.host_offset);
                    (key, lo, lo + (1u64 << j.cluster_bits))
                })
                .filter(|&(_, lo, hi)| lo < base || hi > base + (1u64 << cb))
                .collect();
            let r = if failed {
                for j in jobs {
                    self.pool.put(j.buf);
                }
                Ok(())
            } else {
                self.run_inflates(jobs, &mut buf)
            };
            let f = &mut self.fills[fid];
            f.buf = Some(buf);
            let cluster = f.cluster;
            match r {
                Err(e) => f.error = Some(e),
                Ok(()) if !failed => self.fill_siblings(cluster, &siblings),
                Ok(()) => {}
            }
        }
        let f = &mut self.fills[fid];
        if f.writing {
            self.fill_written(fid);
        } else {
            self.fill_data_ready(fid);
        }
    }

    /// A fill of `cluster` decompressed the backing clusters `siblings`
    /// (their keys in `inflated` and guest ranges) and used its part of
    /// each. Where one reaches into neighbouring clusters, they are
    /// populated from the decompressed bytes (a populate request seeded
    /// with them, sent to the cores that own them): a compressed cluster
    /// larger than the overlay's is fetched and decompressed once, not
    /// once per overlay cluster a reader meets at another time. Best
    /// effort, as readahead: an error reaches the readers of those
    /// clusters, not this fill's.
    fn fill_siblings(&mut self, cluster: u64, siblings: &[((usize, u64), u64, u64)]) {
        if self.passes_through() || self.closing.is_some() {
            return;
        }
        let cb = self.cluster_bits();
        let (base, end) = (cluster << cb, (cluster + 1) << cb);
        let size = self.shared.size;
        for &(key, lo, hi) in siblings {
            let Some(buf) = self.inflated.get(key, 0).cloned() else {
                continue;
            };
            for (from, to) in [(lo, base.min(hi)), (end.max(lo), hi.min(size))] {
                if from < to {
                    self.send_populate(from, to - from, Some((key, buf.clone())), Box::new(|_| {}));
                }
            }
        }
    }

    pub(super) fn fill_data_ready(&mut self, fid: usize) {
        let readers = std::mem::take(&mut self.fills[fid].readers);
        if let Some(e) = self.fills[fid].error.take() {
            // Malformed backing data stays `Corrupt`, and a changed remote
            // image `BackingChanged`; anything else is the backing medium
            // failing.
            let e = if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::BackingChanged) {
                e
            } else {
                Error::new(ErrorKind::BackingUnavailable, e.to_string())
            };
            for r in readers {
                self.finish_piece(r, Err(e.clone()));
            }
            self.fills[fid].error = Some(e);
            self.release_fill(fid);
            return;
        }
        self.fills[fid].ready = true;
        // A fill of known zeros has no buffer.
        let buf = self.fills[fid].buf.clone();
        debug_assert_eq!(buf.is_none(), self.fills[fid].zeros);
        let lo = self.fills[fid].lo;
        for r in readers {
            match &buf {
                Some(b) => {
                    let (s, l) = (
                        (self.pieces[r].start - lo) as usize,
                        self.pieces[r].len as usize,
                    );
                    self.deliver(r, b, s, l);
                }
                None => self.deliver_zeros(r),
            }
            self.finish_piece(r, Ok(()));
        }
        self.bump(|s| &s.bytes_fetched, self.fills[fid].fetched_local);
        if self.passes_through() {
            self.keep_prefetched(fid, buf);
            self.release_fill(fid);
            return;
        }
        let cluster = self.fills[fid].cluster;
        if self.ext() {
            self.fill_write_back_ext(fid, buf);
            return;
        }
        // Known zeros, or zero detection: a zero cluster keeps the overlay
        // sparse (a fill of known zeros is only made where one can be).
        let v3 = self.version() >= 3;
        let Some(buf) = buf.filter(|b| !(v3 && crate::io::is_zero(b.as_slice()))) else {
            match self.publish(cluster, L2Entry::Zero { host: None }) {
                Ok(()) => self.bump(|s| &s.cor_zero_fills, 1),
                Err(e) => self.fills[fid].error = Some(e),
            }
            self.release_fill(fid);
            return;
        };
        drop(buf);
        let f = &mut self.fills[fid];
        f.writing = true;
        f.pending = 1;
        if self.remote.in_flight() {
            // More fills are on their way from a remote medium: their
            // write-backs go out together (see `release_held`). Their
            // clusters are allocated then, so a crash in between leaks none.
            f.held = true;
            self.held_populating += usize::from(!f.populators.is_empty());
            self.held.push(fid);
            if self.held_over_budget() {
                self.release_held();
            } else {
                self.count_held();
            }
        } else if self.allocate_fill(fid) {
            self.push_fill_write(fid);
        }
    }

    /// Allocates the host cluster fill `fid` is written to; on failure
    /// the fill ends with the error (its readers were answered already).
    fn allocate_fill(&mut self, fid: usize) -> bool {
        match self.alloc_cluster() {
            Ok(host) => {
                let f = &mut self.fills[fid];
                f.host = host;
                f.new_host = true;
                true
            }
            Err(e) => {
                self.writeback_failed(&e);
                self.fills[fid].error = Some(e);
                self.release_fill(fid);
                false
            }
        }
    }

    fn push_fill_write(&mut self, fid: usize) {
        let f = &self.fills[fid];
        let buf = f.buf.clone().expect("fill has a buffer");
        let op = Op::write(FILE_DATA, f.host, buf, 0, self.cs() as usize);
        self.io.push(TAG_FILL | fid as u64, op);
    }

    /// Sends held write-backs of remote fills. Fills of random reads
    /// complete one by one; their clusters are allocated here, one after
    /// another, so that written back in host order in one turn they merge
    /// into large writes (`io::merge`) instead of a small random write
    /// each, and a crash while they are held leaks no cluster. The readers
    /// were answered already: holding delays only the write-back, and while
    /// remote reads keep coming it leaves the disk to the reads
    /// (`Options::writeback_hold_bytes`). What goes out:
    ///
    /// - everything, once nothing more is coming (no remote read in
    ///   flight), or a flush or a close waits;
    /// - the fills whose clusters a request waits for (a write, say);
    /// - fills that populate (readahead, streaming), every [`HOLD_BYTES`]:
    ///   their pieces wait for the write-back, so they are not held for
    ///   long;
    /// - the oldest, [`HOLD_BYTES`] at a time, while the core holds more
    ///   than its share of the budget.
    pub(super) fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let cs = self.cs() as usize;
        let mut out = Vec::new();
        if !self.remote.in_flight() || !self.fill_barriers.is_empty() || self.closing.is_some() {
            out = std::mem::take(&mut self.held);
        } else {
            let n = self.held.len();
            if self.held_over_budget() {
                // Keep what the budget holds after one batch; the oldest go.
                let keep = self.shared.hold_bytes.saturating_sub(HOLD_BYTES) / cs;
                out.extend(self.held.drain(..n - keep.min(n)));
            }
            let populating = self.held_populating * cs >= HOLD_BYTES;
            if self.held_wanted || populating {
                let (fills, locks) = (&self.fills, &self.locks);
                self.held.retain(|&f| {
                    let fill = &fills[f];
                    let go = (populating && !fill.populators.is_empty())
                        || locks.has_waiters(fill.cluster);
                    if go {
                        out.push(f);
                    }
                    !go
                });
            }
        }
        self.held_wanted = false;
        if out.is_empty() {
            return;
        }
        for &f in &out {
            let fill = &mut self.fills[f];
            fill.held = false;
            self.held_populating -= usize::from(!fill.populators.is_empty());
        }
        self.count_held();
        // Clusters allocated one after another merge into large writes.
        out.retain(|&f| self.allocate_fill(f));
        out.sort_unstable_by_key(|&f| self.fills[f].host);
        for &fid in &out {
            self.push_fill_write(fid);
        }
        if self.held.capacity() == 0 {
            // All went out: keep the list's memory for the next burst.
            out.clear();
            self.held = out;
        }
    }

    fn held_over_budget(&self) -> bool {
        self.held.len() << self.cluster_bits() >= self.shared.hold_bytes
    }

    fn count_held(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let bytes = (self.held.len() as u64) << self.cluster_bits();
        let stats = &self.shared.stats[self.id];
        stats.held_bytes.store(bytes, Relaxed);
        stats.held_peak_bytes.fetch_max(bytes, Relaxed);
    }

    /// Runs piece `id` again once the holder of `cluster`'s lock lets go;
    /// a held write-back is then sent at once (see `release_held`).
    fn wait_lock(&mut self, cluster: u64, id: usize) {
        if let Some(Holder::Fill(f)) = self.locks.holder(cluster) {
            self.held_wanted |= self.fills[f].held;
        }
        self.locks.wait(cluster, id);
    }

    fn fill_written(&mut self, fid: usize) {
        let f = &mut self.fills[fid];
        let (cluster, host, err) = (f.cluster, f.host, f.error.is_some());
        // A failed write-back loses only copy-on-read work; the readers
        // were answered already. Its error stays in the fill for the
        // populate pieces that wait for it.
        let (lo, hi) = (f.lo, f.hi);
        let published = if err {
            Ok(())
        } else if self.ext() {
            self.publish_fill_ext(cluster, host, lo, hi)
        } else {
            self.publish(cluster, L2Entry::Data { host })
        };
        if !err && published.is_ok() {
            self.bump(|s| &s.cor_fills, 1);
            self.keep_fill(fid);
        } else {
            if self.fills[fid].new_host {
                // Nothing points to it: published entries are set last.
                self.hand_back(host);
            }
            let e = published.as_ref().err().or(self.fills[fid].error.as_ref());
            let e = e.cloned().expect("a failed write-back has its error");
            self.writeback_failed(&e);
        }
        if let Err(e) = published {
            self.fills[fid].error = Some(e);
        }
        self.release_fill(fid);
    }

    /// Keeps the buffer of populate fill `fid`, just published, for the
    /// reader readahead ran ahead of (see `kept`).
    fn keep_fill(&mut self, fid: usize) {
        if self.readahead.is_none() || self.ext() || self.fills[fid].populators.is_empty() {
            return;
        }
        let f = &mut self.fills[fid];
        let Some(buf) = f.buf.take() else {
            return;
        };
        let (cluster, host) = (f.cluster, f.host);
        for b in self.kept.insert(cluster, host, buf) {
            self.pool.put(b);
        }
    }

    fn release_fill(&mut self, fid: usize) {
        let mut f = self.fills.remove(fid);
        if !f.populators.is_empty() {
            // A populate piece succeeds once the cluster (with extended
            // entries: every subcluster of the fill's range) is in the
            // overlay, as data or zeros: its block is still pinned, so the
            // cached entry is the published one.
            let in_overlay = if self.ext() {
                let sc = self.sc();
                let m = sub_mask((f.lo / sc) as u32, f.hi.div_ceil(sc) as u32);
                self.ext_entry(f.cluster)
                    .is_ok_and(|e| (e.alloc | e.zero) & m == m)
            } else {
                let (key, slot) = (self.l2_key(f.cluster), self.l2_slot(f.cluster));
                self.l2.peek(key).expect("fill pins its block").entries[slot] != 0
            };
            // A prefetch leaves its errors to the readers.
            let result = if in_overlay || f.prefetch {
                Ok(())
            } else {
                Err(f.error.take().unwrap_or_else(|| {
                    let why = self.shared.meta.check_writable().err();
                    why.unwrap_or_else(|| {
                        Error::new(
                            ErrorKind::Io,
                            format!(
                                "{}: cluster {} was not written into the overlay",
                                self.shared.meta.path, f.cluster
                            ),
                        )
                    })
                }))
            };
            for p in std::mem::take(&mut f.populators) {
                self.finish_piece(p, result.clone());
            }
        }
        self.live_fills.remove(&f.seq);
        // Flushes that waited for this fill (and every older one) may go.
        let oldest = self.live_fills.first().copied().unwrap_or(u64::MAX);
        while self
            .fill_barriers
            .front()
            .is_some_and(|(barrier, _)| *barrier <= oldest)
        {
            let (_, r) = self.fill_barriers.pop_front().expect("checked");
            self.flush_waiters.push(r);
        }
        debug_assert!(f.readers.is_empty());
        self.unpin(f.cluster);
        for w in self.locks.unlock(f.cluster) {
            self.events.push_back(Ev::Run(w));
        }
        if let Some(b) = f.buf {
            self.pool.put(b);
        }
    }

    fn run_write(&mut self, id: usize) -> Result<()> {
        let (cluster, start, len, kind) = {
            let p = &self.pieces[id];
            (p.cluster, p.start, p.len, p.kind)
        };
        if !self.pieces[id].locked {
            if !self.locks.try_lock(cluster, Holder::Write) {
                self.wait_lock(cluster, id);
                return Ok(());
            }
            self.pieces[id].locked = true;
            // The cluster changes: its kept content is stale from here.
            if let Some(b) = self.kept.forget(cluster) {
                self.pool.put(b);
            }
        }
        self.shared.meta.check_writable()?;
        let Some(raw) = self.lookup(id, cluster) else {
            return Ok(());
        };
        let entry = self.decode(raw?)?;
        self.pin(id);
        if self.ext() && !matches!(entry, L2Entry::Compressed(_)) {
            // Compressed clusters have no subclusters: rewritten whole below.
            return self.run_write_ext(id);
        }
        let zero = matches!(kind, ReqKind::Zero | ReqKind::Discard);
        let valid = self.valid_len(cluster);
        let whole = start == 0 && start + len >= valid;
        let v3 = self.version() >= 3;
        if kind == ReqKind::Discard && whole && v3 {
            if let L2Entry::Data { host } | L2Entry::Zero { host: Some(host) } = entry {
                self.discard_cluster(cluster, host)?;
                self.finish_piece(id, Ok(()));
                return Ok(());
            }
        }
        match entry {
            L2Entry::Compressed(raw) => {
                // Never rewritten in place: the cluster becomes an ordinary
                // one (or a zero entry), and the compressed data's host
                // clusters lose this use once that entry is durable.
                self.pieces[id].compressed = Some(raw);
                if zero && whole {
                    let e = if v3 {
                        Some(L2Entry::Zero { host: None })
                    } else if self.shared.chain.is_none() {
                        Some(L2Entry::Unallocated)
                    } else {
                        None
                    };
                    if let Some(e) = e {
                        self.publish(cluster, e)?;
                        self.release_compressed(cluster, raw);
                        self.finish_piece(id, Ok(()));
                        return Ok(());
                    }
                }
                let p = &mut self.pieces[id];
                p.publish = true;
                if whole {
                    // Nothing of the old contents survives.
                    let mut buf = self.pool.get(self.cs() as usize);
                    IoBuf::unique_mut(&mut buf).fill(0);
                    let p = &mut self.pieces[id];
                    p.span_lo = 0;
                    p.buf = Some(buf);
                    return self.gathered(id);
                }
                self.read_compressed(id, raw, Step::CompressedRmw);
                Ok(())
            }
            L2Entry::Data { host } => {
                if zero && whole && v3 {
                    self.publish(cluster, L2Entry::Zero { host: Some(host) })?;
                    self.finish_piece(id, Ok(()));
                    return Ok(());
                }
                self.write_in_place(id, host);
                Ok(())
            }
            L2Entry::Zero { host } => {
                if zero {
                    self.finish_piece(id, Ok(()));
                    return Ok(());
                }
                let mut buf = self.pool.get(self.cs() as usize);
                IoBuf::unique_mut(&mut buf).fill(0);
                let target = match host {
                    Some(h) => h,
                    None => self.alloc_piece_cluster(id)?,
                };
                let p = &mut self.pieces[id];
                p.host = target;
                p.publish = true;
                p.span_lo = 0;
                self.merge_client_data(id, &mut buf);
                let cs = self.cs() as usize;
                self.push_write(id, buf, target, cs);
                Ok(())
            }
            L2Entry::Unallocated => {
                let has_backing = self.shared.chain.is_some();
                if zero && !has_backing {
                    // Unallocated without a backing image already reads zeros.
                    self.finish_piece(id, Ok(()));
                    return Ok(());
                }
                if zero && whole && v3 {
                    // Over a backing image, zeros must be recorded, never
                    // "unallocated", or the old backing data would show.
                    self.publish(cluster, L2Entry::Zero { host: None })?;
                    self.finish_piece(id, Ok(()));
                    return Ok(());
                }
                let mut buf = self.pool.get(self.cs() as usize);
                IoBuf::unique_mut(&mut buf).fill(0);
                let p = &mut self.pieces[id];
                p.span_lo = 0;
                p.publish = true;
                if has_backing && !whole {
                    let base = cluster << self.cluster_bits();
                    self.resolve(base, valid)?;
                    if zero && self.segs.iter().all(|s| matches!(s.source, Source::Zero)) {
                        // Partial zeroes over zeros: nothing changes.
                        self.pool.put(buf);
                        self.finish_piece(id, Ok(()));
                        return Ok(());
                    }
                    self.read_backing_into(id, buf, Step::Gather);
                    return Ok(());
                }
                self.pieces[id].buf = Some(buf);
                self.gathered(id)
            }
        }
    }

    /// Writes the piece's bytes in place into the overlay's host cluster
    /// `host` (read-modify-write of the aligned span around unaligned edges).
    fn write_in_place(&mut self, id: usize, host: u64) {
        let (_, start, len) = self.span(id);
        let lo = start & !(IO_ALIGN as u64 - 1);
        let hi = (start + len)
            .next_multiple_of(IO_ALIGN as u64)
            .min(self.cs());
        let mut buf = self.pool.get((hi - lo) as usize);
        let p = &mut self.pieces[id];
        p.span_lo = lo;
        p.host = host;
        if lo == start && hi == start + len {
            self.merge_client_data(id, &mut buf);
            self.push_write(id, buf, host + lo, (hi - lo) as usize);
        } else {
            self.read_into_piece(id, buf, host + lo, (hi - lo) as usize, Step::RmwRead);
        }
    }

    /// Drops the host cluster of a whole discarded cluster: the entry says
    /// zero (or unallocated, with no backing image to hide), and the host
    /// cluster is freed once a commit has made that entry durable.
    fn discard_cluster(&mut self, cluster: u64, host: u64) -> Result<()> {
        let entry = if self.shared.chain.is_some() {
            L2Entry::Zero { host: None }
        } else {
            L2Entry::Unallocated
        };
        self.publish(cluster, entry)?;
        self.release_after_commit(cluster, Release::Cluster(host));
        Ok(())
    }

    /// Backing data for a write to an unallocated cluster is in the piece's
    /// buffer: merge the client's bytes and write the whole cluster.
    fn gathered(&mut self, id: usize) -> Result<()> {
        let mut buf = self.pieces[id].buf.take().expect("gathered buffer");
        let target = self.alloc_piece_cluster(id)?;
        self.pieces[id].host = target;
        self.merge_client_data(id, &mut buf);
        let cs = self.cs() as usize;
        self.push_write(id, buf, target, cs);
        Ok(())
    }

    /// Copies the client's bytes (or zeros) into `buf`, which starts at the
    /// piece's `span_lo` within the cluster. Writes go from this private
    /// copy, never from memory the client may still change.
    fn merge_client_data(&self, id: usize, buf: &mut Arc<IoBuf>) {
        let p = &self.pieces[id];
        let at = (p.start - p.span_lo) as usize;
        let dst = &mut IoBuf::unique_mut(buf)[at..at + p.len as usize];
        if matches!(p.kind, ReqKind::Zero | ReqKind::Discard) {
            dst.fill(0);
        } else {
            let req = &self.parts[p.part].req;
            let src = req.buf.lock().unwrap_or_else(|e| e.into_inner());
            let o = p.buf_off as usize;
            dst.copy_from_slice(&src[o..o + p.len as usize]);
        }
    }

    fn push_write(&mut self, id: usize, buf: Arc<IoBuf>, host_off: u64, len: usize) {
        self.io.push(
            TAG_PIECE | id as u64,
            Op::write(FILE_DATA, host_off, buf.clone(), 0, len),
        );
        let p = &mut self.pieces[id];
        p.buf = Some(buf);
        p.step = Step::WriteData;
        p.io_pending = 1;
        p.io_len = len;
        p.partial = PartialWrite::default();
    }

    pub(super) fn piece_io_done(&mut self, id: usize, cqe: Cqe) {
        let path = &self.shared.meta.path;
        let remote_error = self.remote.error.take();
        let p = &mut self.pieces[id];
        let res = kernel_result(cqe.result, || {
            format!("{path}: {:?} of cluster {}", p.step, p.cluster)
        });
        drop(cqe.buf);
        match res {
            Err(e) => {
                let e = if let Some(remote) = remote_error {
                    remote
                } else if matches!(p.step, Step::PassThrough | Step::Gather | Step::SubGather) {
                    Error::new(ErrorKind::BackingUnavailable, e.to_string())
                } else {
                    e
                };
                p.io_error.get_or_insert(e);
            }
            // A short write is retried for the rest (see `PartialWrite`):
            // the client needs the reason, since a "short write" would reach
            // an NBD client as EIO. Short reads stop at the end of a file:
            // backing buffers were zeroed before the read, and a short
            // overlay read is zero-filled when its step completes.
            Ok(n) if p.step == Step::WriteData && p.partial.written + n < p.io_len => {
                match p.partial.advance(n) {
                    Err(done) => {
                        p.io_error.get_or_insert(Error::new(
                            ErrorKind::Io,
                            format!(
                                "{path}: short write ({done} of {} bytes) to cluster {}",
                                p.io_len, p.cluster
                            ),
                        ));
                    }
                    Ok(done) if p.io_error.is_none() => {
                        let at = p.host + p.span_lo + done as u64;
                        let buf = p.buf.clone().expect("write buffer");
                        self.io.push(
                            TAG_PIECE | id as u64,
                            Op::write(FILE_DATA, at, buf, done, p.io_len - done),
                        );
                        return;
                    }
                    Ok(_) => {}
                }
            }
            Ok(n)
                if matches!(
                    p.step,
                    Step::OverlayRead
                        | Step::RmwRead
                        | Step::CompressedRead
                        | Step::CompressedRmw
                        | Step::SubRead
                ) && n < p.io_len =>
            {
                p.short = Some(n);
            }
            Ok(n) if matches!(p.step, Step::PassThrough | Step::Gather | Step::SubGather) => {
                p.backing_got += n as u64;
            }
            Ok(_) => {}
        }
        p.io_pending -= 1;
        if p.io_pending == 0 {
            if matches!(p.step, Step::PassThrough | Step::Gather | Step::SubGather)
                && p.io_error.is_none()
                && p.backing_got < p.backing_want
            {
                p.io_error = Some(short_backing_read(p.backing_got, p.backing_want));
            }
            self.piece_step_done(id);
        }
    }

    fn piece_step_done(&mut self, id: usize) {
        let p = &self.pieces[id];
        let inflated = p.compressed.filter(|_| p.step == Step::CompressedRead);
        self.piece_step_finish(id);
        // Readers of the same compressed cluster that waited for this
        // piece's read: decompressed (or, after an error, read again).
        if let Some(waiting) = inflated.and_then(|raw| self.inflating.remove(&raw)) {
            self.events.extend(waiting.into_iter().map(Ev::Run));
        }
    }

    fn piece_step_finish(&mut self, id: usize) {
        if let Some(e) = self.pieces[id].io_error.take() {
            self.finish_piece(id, Err(e));
            return;
        }
        let p = &mut self.pieces[id];
        if let Some(n) = p.short.take() {
            // The cluster runs past the end of the file (a partial last
            // cluster): what lies beyond reads as zeros.
            let len = p.io_len;
            if let Some(b) = p.buf.as_mut() {
                IoBuf::unique_mut(b)[n..len].fill(0);
            }
        }
        if !self.pieces[id].inflates.is_empty() {
            let p = &mut self.pieces[id];
            let jobs = std::mem::take(&mut p.inflates);
            let mut buf = p.buf.take().expect("backing read buffer");
            let r = self.run_inflates(jobs, &mut buf);
            self.pieces[id].buf = Some(buf);
            if let Err(e) = r {
                self.finish_piece(id, Err(e));
                return;
            }
        }
        let r = match self.pieces[id].step {
            Step::OverlayRead | Step::PassThrough => {
                let p = &self.pieces[id];
                let buf = p.buf.clone().expect("read buffer");
                let at = (p.start - p.span_lo) as usize;
                let at = if p.step == Step::PassThrough { 0 } else { at };
                self.deliver(id, &buf, at, p.len as usize);
                drop(buf);
                self.finish_piece(id, Ok(()));
                Ok(())
            }
            Step::RmwRead => {
                let mut buf = self.pieces[id].buf.take().expect("rmw buffer");
                self.merge_client_data(id, &mut buf);
                let p = &self.pieces[id];
                let (host, lo) = (p.host, p.span_lo);
                let hi = (p.start + p.len)
                    .next_multiple_of(IO_ALIGN as u64)
                    .min(self.cs());
                self.push_write(id, buf, host + lo, (hi - lo) as usize);
                Ok(())
            }
            Step::Gather => self.gathered(id),
            Step::SubRead => self.sub_gather(id),
            Step::SubGather => self.sub_gathered(id),
            Step::CompressedRead => self.inflate_overlay(id).map(|cluster| {
                let (start, len) = (self.pieces[id].start as usize, self.pieces[id].len as usize);
                self.deliver(id, &cluster, start, len);
                let raw = self.pieces[id]
                    .compressed
                    .expect("compressed piece has a descriptor");
                self.keep_inflated((0, raw), cluster);
                self.finish_piece(id, Ok(()));
            }),
            Step::CompressedRmw => self.inflate_overlay(id).and_then(|cluster| {
                let p = &mut self.pieces[id];
                p.span_lo = 0;
                p.buf = Some(cluster);
                self.gathered(id)
            }),
            Step::WriteData => {
                let p = &self.pieces[id];
                let r = if p.publish && p.sub_mask != 0 {
                    let (c, host, mask) = (p.cluster, p.host, p.sub_mask);
                    self.publish_sub_data(c, host, mask)
                } else if p.publish {
                    let (c, host, old) = (p.cluster, p.host, p.compressed);
                    self.publish(c, L2Entry::Data { host }).map(|()| {
                        if let Some(raw) = old {
                            self.release_compressed(c, raw);
                        }
                    })
                } else {
                    Ok(())
                };
                self.finish_piece(id, r);
                Ok(())
            }
            Step::Start => unreachable!("I/O completed for a piece that issued none"),
        };
        if let Err(e) = r {
            self.finish_piece(id, Err(e));
        }
    }

    fn run_status(&mut self, id: usize) -> Result<()> {
        let (cluster, start, len) = self.span(id);
        let Some(raw) = self.lookup(id, cluster) else {
            return Ok(());
        };
        raw?;
        let cb = self.cluster_bits();
        let mut pos = (cluster << cb) + start;
        let end = pos + len;
        let mut out: Vec<BlockStatus> = Vec::new();
        let key = self.l2_key(cluster);
        while pos < end {
            let c = pos >> cb;
            let mut stop = end.min((c + 1) << cb);
            debug_assert_eq!(self.l2_key(c), key, "status piece crosses an L2 block");
            let entries = &self.l2.peek(key).expect("status block cached").entries;
            let slot = self.l2_slot(c);
            let entry = if self.ext() {
                // One run of subclusters of the same state at a time.
                let e = self.check_ext(entries[slot], entries[slot + 1])?;
                let sc = self.sc();
                let sub = ((pos - (c << cb)) / sc) as u32;
                stop = stop.min((c << cb) + u64::from(e.run_end(sub)) * sc);
                match e.state(sub) {
                    SubState::Data | SubState::Compressed => e.entry,
                    SubState::Zero => L2Entry::Zero { host: None },
                    SubState::Unallocated => L2Entry::Unallocated,
                }
            } else {
                self.decode(entries[slot])?
            };
            let mut push = |kind: ExtentKind, off: u64, l: u64| match out.last_mut() {
                Some(last) if last.kind == kind && last.offset + last.len == off => last.len += l,
                _ => out.push(BlockStatus {
                    offset: off,
                    len: l,
                    kind,
                }),
            };
            match entry {
                L2Entry::Data { .. } | L2Entry::Compressed(_) => {
                    push(ExtentKind::Data, pos, stop - pos)
                }
                L2Entry::Zero { .. } => push(ExtentKind::Zero, pos, stop - pos),
                L2Entry::Unallocated => {
                    if self.shared.chain.is_none() {
                        push(ExtentKind::Unallocated, pos, stop - pos);
                    } else {
                        self.resolve(pos, stop - pos)?;
                        let mut at = pos;
                        for s in std::mem::take(&mut self.segs) {
                            let kind = if s.depth == 0 {
                                ExtentKind::Unallocated
                            } else {
                                ExtentKind::Backing {
                                    depth: s.depth,
                                    zero: matches!(s.source, Source::Zero),
                                }
                            };
                            push(kind, at, s.len);
                            at += s.len;
                        }
                    }
                }
            }
            pos = stop;
        }
        {
            let req = &self.parts[self.pieces[id].part].req;
            req.status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(out);
        }
        self.finish_piece(id, Ok(()));
        Ok(())
    }

    // ----- commits ---------------------------------------------------------

    /// Starts a commit when one is due: a flush or close waits, enough L2
    /// blocks are dirty, or the core has gone idle with dirty blocks.
    pub(super) fn maybe_commit(&mut self) {
        if self.commit.in_flight {
            return;
        }
        let idle = self.pieces.is_empty() && self.fills.is_empty() && self.events.is_empty();
        let closing = self.closing.is_some() && idle;
        let due = !self.flush_waiters.is_empty()
            || closing
            || self.l2.dirty_count() >= super::COMMIT_DIRTY_BLOCKS
            || (idle && self.l2.has_dirty() && self.writable());
        if !due {
            return;
        }
        let dirty = self.l2.dirty_keys();
        if dirty.is_empty() && self.flush_waiters.is_empty() && !closing {
            return;
        }
        if self.shared.meta.is_poisoned() && (closing || !self.flush_waiters.is_empty()) {
            let e = Error::new(
                ErrorKind::Poisoned,
                format!(
                    "{}: {}; cannot flush",
                    self.shared.meta.path,
                    self.shared.meta.poison_reason()
                ),
            );
            for r in self.flush_waiters.drain(..) {
                r.finish_part(Some(e.clone()));
            }
            if closing {
                self.finish_close(Some(e));
            }
            return;
        }
        if self.shared.read_only {
            for r in self.flush_waiters.drain(..) {
                r.finish_part(None);
            }
            if closing {
                self.finish_close(None);
            }
            return;
        }
        let c = &mut self.commit;
        c.in_flight = true;
        c.phase = PHASE_SYNC1 as u8;
        c.blocks = dirty
            .iter()
            .map(|&k| (k, self.l2.peek(k).expect("dirty block cached").generation))
            .collect();
        c.waiters = std::mem::take(&mut self.flush_waiters);
        c.closing = closing;
        c.l1 = std::mem::take(&mut self.l1_dirty);
        // Frees whose L2 change this commit writes; they are applied after
        // the commit's second sync has made the change durable.
        let blocks = &c.blocks;
        let (covered, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.frees)
            .into_iter()
            .partition(|&(k, g, _)| blocks.iter().any(|&(bk, bg)| bk == k && g <= bg));
        self.frees = rest;
        c.freeing = covered.into_iter().map(|(_, _, h)| h).collect();
        c.error = None;
        c.pending = 1;
        // Snapshot the dirty blocks now: every entry in them points to data
        // whose write has completed, so the sync issued next covers it.
        let mut writes = Vec::with_capacity(dirty.len());
        for &k in &dirty {
            let mut buf = self.pool.get(BLOCK_BYTES);
            {
                let b = self.l2.peek(k).expect("dirty block cached");
                let dst = IoBuf::unique_mut(&mut buf);
                for (d, e) in dst.chunks_exact_mut(8).zip(b.entries.iter()) {
                    d.copy_from_slice(&e.to_be_bytes());
                }
            }
            writes.push(buf);
        }
        self.commit_bufs = writes;
        self.io
            .push(TAG_COMMIT | PHASE_SYNC1 as u64, Op::fsync(FILE_DATA));
    }

    pub(super) fn commit_io_done(&mut self, phase: usize, cqe: Cqe) {
        let path = self.shared.meta.path.clone();
        if let Some(b) = cqe.buf {
            self.pool.put(b);
        }
        if let Err(e) = kernel_result(cqe.result, || format!("{path}: committing metadata")) {
            self.commit.error.get_or_insert(e);
        }
        self.commit.pending -= 1;
        if self.commit.pending > 0 {
            return;
        }
        if let Some(e) = self.commit.error.clone() {
            // A failed metadata sync or write: stop writing rather than guess.
            self.shared.meta.poison();
            self.commit_bufs.clear();
            self.end_commit(Some(e));
            return;
        }
        match phase {
            PHASE_SYNC1 => {
                // Refcounts of the new tables are durable now; their L1
                // entries may follow.
                let l1 = std::mem::take(&mut self.commit.l1);
                if let Err(e) = self.shared.meta.write_l1_entries(&l1) {
                    self.commit_bufs.clear();
                    self.end_commit(Some(e));
                    return;
                }
                let bufs = std::mem::take(&mut self.commit_bufs);
                let l2e = self.l2_entries();
                let block_clusters = self.block_clusters();
                let mut n = 0;
                for (buf, &(key, _)) in bufs.into_iter().zip(self.commit.blocks.iter()) {
                    let first = key * block_clusters;
                    let table = match self.shared.meta.l2_table(first / l2e) {
                        Ok(Some(t)) => t,
                        _ => unreachable!("dirty block {key} without an L2 table"),
                    };
                    let off = table + ((first % l2e) / block_clusters) * BLOCK_BYTES as u64;
                    self.io.push(
                        TAG_COMMIT | PHASE_WRITE as u64,
                        Op::write(FILE_DATA, off, buf, 0, BLOCK_BYTES),
                    );
                    n += 1;
                }
                self.commit.phase = PHASE_WRITE as u8;
                if n == 0 {
                    self.end_commit(None);
                } else {
                    self.commit.pending = n;
                }
            }
            PHASE_WRITE => {
                for &(key, generation) in &self.commit.blocks {
                    if let Some(b) = self.l2.get(key) {
                        b.committed = b.committed.max(generation);
                    }
                }
                if self.commit.waiters.is_empty()
                    && !self.commit.closing
                    && self.commit.freeing.is_empty()
                {
                    self.end_commit(None);
                } else {
                    self.commit.phase = PHASE_SYNC2 as u8;
                    self.commit.pending = 1;
                    self.io
                        .push(TAG_COMMIT | PHASE_SYNC2 as u64, Op::fsync(FILE_DATA));
                }
            }
            _ => self.end_commit(None),
        }
    }

    fn end_commit(&mut self, err: Option<Error>) {
        let c = std::mem::take(&mut self.commit);
        self.bump(|s| &s.commits, 1);
        // The L2 entries no longer point to these clusters, durably (the
        // commit ended with a sync): their refcounts may drop. On an error
        // they stay allocated: a leak, never a dangling reference.
        let err = if err.is_none() && !c.freeing.is_empty() {
            let (mut whole, mut shared) = (Vec::new(), Vec::new());
            for r in &c.freeing {
                match *r {
                    Release::Cluster(h) => whole.push(h),
                    Release::Shared(h) => shared.push(h),
                }
            }
            self.shared
                .meta
                .free_clusters(&whole)
                .and_then(|()| self.shared.meta.drop_refs(&shared))
                .err()
        } else {
            err
        };
        for r in c.waiters {
            r.finish_part(err.clone());
        }
        if c.closing {
            self.finish_close(err);
        }
    }

    fn finish_close(&mut self, err: Option<Error>) {
        let (next, end) = self.reserve;
        self.shared.meta.give_back(next, end - next);
        self.reserve = (0, 0);
        for off in std::mem::take(&mut self.spare) {
            self.shared.meta.give_back(off >> self.cluster_bits(), 1);
        }
        if let Some(r) = self.closing.take() {
            r.finish_part(err);
        }
        self.stopped = true;
    }
}

/// Backing reads are clamped to the size each layer had when it was opened,
/// so one that comes back short means the file shrank under us or the
/// medium misbehaved: an error, never zeros passed off as data.
fn short_backing_read(got: u64, want: u64) -> Error {
    Error::new(
        ErrorKind::BackingUnavailable,
        format!(
            "short read from the backing image: {got} of {want} bytes (did the backing file shrink?)"
        ),
    )
}
