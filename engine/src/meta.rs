//! The overlay's shared metadata: L1 table, refcounts and host-cluster
//! allocation. These are the only structures more than one core touches.
//!
//! - The L1 table is a vector of atomics: every core reads it lock-free on
//!   the hot path; it only changes when an L2 table is installed, under the
//!   allocator mutex, once per table. The core that installed a table
//!   writes its L1 entry in its next commit, after that commit's first
//!   fdatasync (see [`Meta::install_l2_table`]).
//! - Host clusters come from the end of the used file (the "frontier").
//!   Cores take them in batches ([`Meta::reserve`]) so the hot path never
//!   waits on another core; the mutex is taken once per batch.
//! - Refcounts are written when a batch is reserved, before any cluster of
//!   the batch is used, so the next fdatasync (the one a commit issues before
//!   it writes L2 entries) makes them durable first. **Invariant 2** (a
//!   cluster's refcount is durable before any durable L2 entry points to
//!   it) is enforced by that order. A crash may leave reserved clusters
//!   unreferenced: leaks, never corruption. `close` frees unused ones.
//! - New refcount blocks and a grown refcount table are made durable
//!   (fdatasync) before anything points to them, so no crash can leave a
//!   reference to a block whose contents were lost.
//!
//! All I/O here is synchronous positioned I/O on the buffered metadata file
//! descriptor: it is rare, small, and runs under the allocator mutex.

use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::{self, Header, L1E_OFFSET_MASK, OFLAG_COPIED};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Header offsets of the refcount table fields (qcow2.rst: bytes 48..=59).
const HDR_REFTABLE_OFFSET: u64 = 48;

pub struct Meta {
    pub path: String,
    pub header: Header,
    pub cluster_bits: u32,
    /// Buffered descriptor for metadata reads and writes.
    pub file: File,
    l1: Vec<AtomicU64>,
    alloc: Mutex<Alloc>,
    poisoned: AtomicBool,
    /// Why the image was poisoned, when it was not a failed metadata write.
    poison_why: std::sync::OnceLock<String>,
    read_only: bool,
    /// End of the clusters in use (the frontier, in bytes): no L2 entry may
    /// point at or past it. Kept beside `Alloc` so reads check it lock-free.
    frontier_bytes: AtomicU64,
    /// The simulation that records (and may fail) these writes, in tests.
    sim: Option<std::sync::Arc<crate::testing::sim::Sim>>,
}

struct Alloc {
    /// First host cluster index never handed out.
    frontier: u64,
    /// Host offset of each refcount block (0: none yet).
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u64,
    /// Batches handed back by cores (unused reserved clusters), freed at close.
    returned: Vec<(u64, u64)>,
    /// The file's size as we last set it (see [`EXTEND_AHEAD_BYTES`]).
    file_len: u64,
}

/// How far ahead of the clusters in use the file is extended (a sparse
/// tail, no blocks allocated). Writes inside the file's size are cheaper
/// than writes that extend it: on ext4 an extending O_DIRECT write takes
/// the inode lock exclusively and joins the orphan list until its size
/// update is journaled; inside the size it only fills a hole. `close` cuts
/// the tail off again; after a crash it is a harmless sparse tail (the
/// next open allocates after it), which `qemu-img check` ignores.
pub const EXTEND_AHEAD_BYTES: u64 = 64 << 20;

impl Drop for Meta {
    /// Drops the image locks at once, even while a forked child still
    /// holds a copy of the descriptor (see `imagelock::LockedFile`).
    fn drop(&mut self) {
        crate::imagelock::unlock_image(&self.file);
    }
}

impl Meta {
    /// Reads the L1 and refcount tables of an already validated header.
    pub fn open(path: &str, header: Header, file: File, read_only: bool) -> Result<Meta> {
        let cs = header.cluster_size();
        let l1_bytes = header.l1_size as usize * 8;
        let mut raw = vec![0u8; l1_bytes];
        file.read_exact_at(&mut raw, header.l1_table_offset)
            .map_err(|e| Error::io(e, format!("{path}: reading the L1 table")))?;
        let l1: Vec<AtomicU64> = raw
            .chunks_exact(8)
            .map(|b| AtomicU64::new(u64::from_be_bytes(b.try_into().unwrap())))
            .collect();
        let rt_bytes = header.refcount_table_clusters as usize * cs as usize;
        let mut raw = vec![0u8; rt_bytes];
        file.read_exact_at(&mut raw, header.refcount_table_offset)
            .map_err(|e| Error::io(e, format!("{path}: reading the refcount table")))?;
        let reftable: Vec<u64> = raw
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()) & qcow2::REFT_OFFSET_MASK)
            .collect();
        let file_len =
            crate::io::file_size(&file).map_err(|e| Error::io(e, format!("{path}: stat")))?;
        // Clusters that hold the header and the tables: nothing else may
        // live there (a refcount block inside the refcount table would have
        // us overwrite the table with counts).
        let l1_range = header.l1_table_offset..header.l1_table_offset + l1_bytes as u64;
        let rt_range = header.refcount_table_offset..header.refcount_table_offset + rt_bytes as u64;
        let overlaps_tables =
            |off: u64| off < cs || l1_range.contains(&off) || rt_range.contains(&off);
        for (i, &rb) in reftable.iter().enumerate() {
            if rb != 0 && (!rb.is_multiple_of(cs) || rb + cs > file_len.next_multiple_of(cs)) {
                return Err(Error::corrupt(format!(
                    "{path}: refcount block {i} at offset {rb:#x} is unaligned or past the end of the file"
                )));
            }
            if rb != 0 && overlaps_tables(rb) {
                return Err(Error::corrupt(format!(
                    "{path}: refcount block {i} at offset {rb:#x} overlaps the header, the L1 table or the refcount table"
                )));
            }
        }
        // Hostile images: every L2 table must lie inside the file. (Tables
        // installed later, by us, may lie past its end: they read as zeros.)
        for (i, e) in l1.iter().enumerate() {
            let off = e.load(Ordering::Relaxed) & L1E_OFFSET_MASK;
            if off != 0
                && (!off.is_multiple_of(cs)
                    || off.saturating_add(cs) > file_len.next_multiple_of(cs))
            {
                return Err(Error::corrupt(format!(
                    "{path}: L1 entry {i} points to offset {off:#x}, unaligned or past the end of the file"
                )));
            }
            if off != 0 && overlaps_tables(off) {
                return Err(Error::corrupt(format!(
                    "{path}: L1 entry {i} points to offset {off:#x}, inside the header, the L1 table or the refcount table"
                )));
            }
        }
        let frontier = file_len.div_ceil(cs);
        let cluster_bits = header.cluster_bits;
        Ok(Meta {
            path: path.to_string(),
            cluster_bits,
            alloc: Mutex::new(Alloc {
                frontier,
                reftable,
                reftable_offset: header.refcount_table_offset,
                reftable_clusters: header.refcount_table_clusters as u64,
                returned: Vec::new(),
                file_len,
            }),
            header,
            file,
            l1,
            poisoned: AtomicBool::new(false),
            poison_why: std::sync::OnceLock::new(),
            read_only,
            frontier_bytes: AtomicU64::new(frontier << cluster_bits),
            sim: None,
        })
    }

    /// Routes the metadata writes and syncs through a simulation (tests).
    pub(crate) fn attach_sim(&mut self, sim: std::sync::Arc<crate::testing::sim::Sim>) {
        self.sim = Some(sim);
    }

    /// Whether a data cluster at host offset `host` lies inside the clusters
    /// in use (an entry pointing past them is corruption: it would read as
    /// invented zeros, or a write would land past the end of the file).
    pub fn host_in_use(&self, host: u64) -> bool {
        host < self.frontier_bytes.load(Ordering::Acquire)
    }

    /// Publishes the frontier after a change (under the allocation lock).
    fn frontier_moved(&self, a: &Alloc) {
        self.frontier_bytes
            .store(a.frontier << self.cluster_bits, Ordering::Release);
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Host offset of the L2 table for L1 index `i`, or None if unallocated.
    pub fn l2_table(&self, i: u64) -> Result<Option<u64>> {
        let raw = match self.l1.get(i as usize) {
            Some(a) => a.load(Ordering::Acquire),
            None => return Ok(None),
        };
        let off = raw & L1E_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cluster_size()) {
            return Err(Error::corrupt(format!(
                "{}: L1 entry {i} points to unaligned offset {off:#x}",
                self.path
            )));
        }
        Ok(Some(off))
    }

    pub fn l1_len(&self) -> u64 {
        self.l1.len() as u64
    }

    /// Refuses new writes after a failed metadata write or a failed core
    /// (nothing is guessed).
    pub fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{}: opened read-only", self.path),
            ));
        }
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(Error::new(
                ErrorKind::Poisoned,
                format!(
                    "{}: {}; the image accepts no more writes",
                    self.path,
                    self.poison_reason()
                ),
            ));
        }
        Ok(())
    }

    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Relaxed);
    }

    /// Poisons the image for a reason other than a failed metadata write
    /// (the first reason given is kept).
    pub fn poison_because(&self, why: String) {
        let _ = self.poison_why.set(why);
        self.poison();
    }

    /// Why the image accepts no more writes, once it is poisoned.
    pub fn poison_reason(&self) -> &str {
        self.poison_why
            .get()
            .map_or("an earlier metadata write failed", |s| s.as_str())
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Alloc> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `n` contiguous host clusters with refcount 1 (written, not
    /// yet synced). Returns the first cluster index.
    pub fn reserve(&self, n: u64) -> Result<u64> {
        self.check_writable()?;
        let mut a = self.lock();
        let first = a.frontier;
        a.frontier += n;
        self.frontier_moved(&a);
        let r = self
            .ensure_refblocks(&mut a, first, n)
            .and_then(|()| self.set_refcounts(&a, first, n, 1));
        if r.is_ok() {
            self.extend_ahead(&mut a);
        }
        if let Err(e) = r {
            self.poison();
            return Err(e);
        }
        Ok(first)
    }

    /// Keeps the file's size at least [`EXTEND_AHEAD_BYTES`] past the
    /// frontier's half-way mark, so the data writes of reserved clusters
    /// stay inside it. Best effort: a failure only costs speed (the writes
    /// extend the file themselves, and fail on their own if there is no
    /// room). Never shrinks the file, and never goes past the process's
    /// file size limit (`RLIMIT_FSIZE`), where the attempt would raise
    /// SIGXFSZ.
    fn extend_ahead(&self, a: &mut Alloc) {
        let end = a.frontier << self.cluster_bits;
        if end + EXTEND_AHEAD_BYTES / 2 <= a.file_len {
            return;
        }
        let mut want = end + EXTEND_AHEAD_BYTES;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) writes one rlimit into `lim`, a live local.
        if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim) } == 0
            && lim.rlim_cur != libc::RLIM_INFINITY
        {
            want = want.min(lim.rlim_cur);
        }
        let Ok(meta) = self.file.metadata() else {
            return;
        };
        let len = meta.len();
        if len < want && self.file.set_len(want).is_ok() {
            if let Some(sim) = &self.sim {
                sim.meta_set_len(want, true);
            }
            a.file_len = want;
        } else {
            a.file_len = len.max(a.file_len);
        }
    }

    /// Frees host clusters that no durable L2 entry points to any more:
    /// refcount 0, and the space handed back to the file system. The caller
    /// guarantees the L2 change is durable (invariant 2, in reverse). The
    /// clusters are never handed out again: allocation only moves forward.
    pub fn free_clusters(&self, hosts: &[u64]) -> Result<()> {
        let a = self.lock();
        for &h in hosts {
            let r = self.set_refcounts(&a, h >> self.cluster_bits, 1, 0);
            if let Err(e) = r {
                self.poison();
                return Err(e);
            }
            // Losing only the space, not data: a failed punch is ignored.
            if crate::io::punch_hole(&self.file, h, self.cluster_size()).is_ok() {
                if let Some(sim) = &self.sim {
                    sim.meta_punch(h, self.cluster_size());
                }
            }
        }
        Ok(())
    }

    /// Drops one use of each host cluster in `hosts` (one entry per use:
    /// the clusters a compressed cluster's data touched, which other
    /// compressed clusters may share). A cluster whose count reaches 0 is
    /// freed as in [`Meta::free_clusters`]. The caller guarantees the L2
    /// change that dropped the uses is durable.
    ///
    /// A count that is already 0, or a cluster without a refcount block or
    /// past the clusters in use, belongs to a corrupt image: it is left
    /// alone (never wrapped round), and `check` reports it.
    pub fn drop_refs(&self, hosts: &[u64]) -> Result<()> {
        let a = self.lock();
        let rbe = self.rb_entries();
        for &h in hosts {
            let c = h >> self.cluster_bits;
            let block = a.reftable.get((c / rbe) as usize).copied().unwrap_or(0);
            if block == 0 || c >= a.frontier {
                continue;
            }
            let width = self.header.refcount_width();
            let (start, len) = width.byte_span(c % rbe, 1);
            let idx = ((c % rbe) - ((start * 8) >> width.order())) as usize;
            let at = block + start;
            let mut b = [0u8; 8];
            let b = &mut b[..len as usize];
            let r = self
                .file
                .read_exact_at(b, at)
                .map_err(|e| Error::io(e, format!("{}: reading a refcount at {at:#x}", self.path)))
                .and_then(|()| {
                    let n = width.get(b, idx);
                    if n == 0 {
                        return Ok(false);
                    }
                    width.set(b, idx, n - 1);
                    self.pwrite(b, at, "writing refcounts")?;
                    Ok(n == 1)
                });
            match r {
                Ok(true) => {
                    // Losing only the space, not data: a failed punch is ignored.
                    if crate::io::punch_hole(&self.file, h, self.cluster_size()).is_ok() {
                        if let Some(sim) = &self.sim {
                            sim.meta_punch(h, self.cluster_size());
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    self.poison();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Hands back reserved clusters nothing points to: unused, or taken by
    /// a write that failed (which may have written part of one). They are
    /// not handed out again, and `close` frees them.
    pub fn give_back(&self, first: u64, n: u64) {
        if n > 0 {
            self.lock().returned.push((first, n));
        }
    }

    /// Makes host cluster offset `off` the L2 table for L1 index `i`, in
    /// memory. Returns false, leaving `off` unused, if another core
    /// installed one first.
    ///
    /// No zeroing and no sync are needed here:
    /// - `off` was reserved by the caller, and reserved clusters lie past
    ///   the end the file had when it was opened and are used once, so it
    ///   has never been written: it reads as zeros, an empty table, even
    ///   after a crash. The file is extended over it (`fallocate`, which
    ///   never shrinks), so the table lies inside the file as every reader
    ///   expects; the new size is durable with the next fdatasync, which
    ///   comes before the L1 entry is written.
    /// - Its refcount was written when it was reserved. The L1 entry
    ///   reaches the disk only through [`Meta::write_l1_entries`], which a
    ///   commit calls after its first fdatasync, so the refcount is durable
    ///   first (invariant 2).
    pub fn install_l2_table(&self, i: u64, off: u64) -> Result<bool> {
        self.check_writable()?;
        let _a = self.lock();
        if self.l2_table(i)?.is_some() {
            return Ok(false);
        }
        crate::io::allocate(&self.file, off, self.cluster_size()).map_err(|e| {
            Error::io(
                e,
                format!(
                    "{}: extending the file for a new L2 table at {off:#x}",
                    self.path
                ),
            )
        })?;
        if let Some(sim) = &self.sim {
            sim.meta_set_len(off + self.cluster_size(), true);
        }
        self.l1[i as usize].store(off | OFLAG_COPIED, Ordering::Release);
        Ok(true)
    }

    /// Writes L1 entries `indexes` as they are in memory. Called by a commit
    /// after its first fdatasync (see [`Meta::install_l2_table`]). Each
    /// entry is written alone (8 bytes, buffered), so cores writing
    /// neighbouring entries never overwrite each other's.
    pub fn write_l1_entries(&self, indexes: &[u64]) -> Result<()> {
        for &i in indexes {
            let raw = self.l1[i as usize].load(Ordering::Acquire);
            let r = self.pwrite(
                &raw.to_be_bytes(),
                self.header.l1_table_offset + i * 8,
                "writing an L1 entry",
            );
            if let Err(e) = r {
                self.poison();
                return Err(e);
            }
        }
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], off: u64, what: &str) -> Result<()> {
        match &self.sim {
            Some(sim) => sim.meta_write(&self.file, buf, off),
            None => self.file.write_all_at(buf, off),
        }
        .map_err(|e| Error::io(e, format!("{}: {what} at offset {off:#x}", self.path)))
    }

    fn sync(&self, what: &str) -> Result<()> {
        if let Some(sim) = &self.sim {
            // The simulation records what the sync makes durable; the
            // file's contents are already what a reader sees.
            sim.meta_sync();
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io(e, format!("{}: fdatasync ({what})", self.path)))
    }

    fn rb_entries(&self) -> u64 {
        self.header.refcount_block_entries()
    }

    /// Makes sure refcount blocks exist for clusters `[first, first + n)`,
    /// allocating (and growing the table) as needed.
    fn ensure_refblocks(&self, a: &mut Alloc, first: u64, n: u64) -> Result<()> {
        let rbe = self.rb_entries();
        let mut bi = first / rbe;
        while bi <= (first + n - 1) / rbe {
            if bi as usize >= a.reftable.len() {
                self.grow_reftable(a, bi + 1)?;
            }
            if a.reftable[bi as usize] == 0 {
                self.new_refblock(a, bi)?;
            }
            bi += 1;
        }
        Ok(())
    }

    /// Allocates refcount block `bi` at the frontier.
    fn new_refblock(&self, a: &mut Alloc, bi: u64) -> Result<()> {
        let rbe = self.rb_entries();
        let c = a.frontier;
        a.frontier += 1;
        self.frontier_moved(a);
        let mut block = vec![0u8; self.cluster_size() as usize];
        let self_covered = c / rbe == bi;
        if self_covered {
            self.header
                .refcount_width()
                .set(&mut block, (c % rbe) as usize, 1);
        }
        let off = c << self.cluster_bits;
        self.pwrite(&block, off, "writing a new refcount block")?;
        // Record it in memory before describing its own cluster, so that a
        // recursive allocation sees it.
        a.reftable[bi as usize] = off;
        if !self_covered {
            self.ensure_refblocks(a, c, 1)?;
            self.set_refcounts(a, c, 1, 1)?;
        }
        // The block (and its own refcount) is durable before the table entry.
        self.sync("allocating a refcount block")?;
        self.pwrite(
            &off.to_be_bytes(),
            a.reftable_offset + bi * 8,
            "writing a refcount table entry",
        )
    }

    /// Moves the refcount table to a larger one at the frontier.
    fn grow_reftable(&self, a: &mut Alloc, min_entries: u64) -> Result<()> {
        let cs = self.cluster_size();
        let rbe = self.rb_entries();
        let old_off = a.reftable_offset;
        let old_clusters = a.reftable_clusters;
        // Room for the blocks the new table and its own refcount blocks need.
        let want = (min_entries.max(a.reftable.len() as u64 * 2) + 4).max(a.frontier / rbe + 8);
        let new_clusters = (want * 8).div_ceil(cs);
        if new_clusters * cs > qcow2::MAX_REFTABLE_BYTES {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                format!(
                    "{}: the refcount table would exceed its maximum size",
                    self.path
                ),
            ));
        }
        let first = a.frontier;
        a.frontier += new_clusters;
        self.frontier_moved(a);
        a.reftable.resize((new_clusters * cs / 8) as usize, 0);
        a.reftable_offset = first << self.cluster_bits;
        a.reftable_clusters = new_clusters;
        self.ensure_refblocks(a, first, new_clusters)?;
        self.set_refcounts(a, first, new_clusters, 1)?;
        let mut raw = Vec::with_capacity(a.reftable.len() * 8);
        for e in &a.reftable {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.pwrite(&raw, a.reftable_offset, "writing the grown refcount table")?;
        self.sync("growing the refcount table")?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&a.reftable_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(new_clusters as u32).to_be_bytes());
        self.pwrite(
            &hdr,
            HDR_REFTABLE_OFFSET,
            "pointing the header to the new refcount table",
        )?;
        self.sync("growing the refcount table")?;
        self.set_refcounts(a, old_off >> self.cluster_bits, old_clusters, 0)
    }

    /// Writes refcount `value` for clusters `[first, first + n)`; their blocks exist.
    fn set_refcounts(&self, a: &Alloc, first: u64, n: u64, value: u64) -> Result<()> {
        let rbe = self.rb_entries();
        let width = self.header.refcount_width();
        let mut c = first;
        let end = first + n;
        while c < end {
            let bi = c / rbe;
            let stop = end.min((bi + 1) * rbe);
            let block = a.reftable[bi as usize];
            debug_assert!(block != 0, "refcount block {bi} missing");
            let (start, len) = width.byte_span(c % rbe, stop - c);
            let mut run = vec![0u8; len as usize];
            let at = block + start;
            if width.needs_merge() {
                // Entries narrower than a byte share it with neighbours
                // that keep their counts (rewritten unchanged: a torn or
                // lost write leaves them as they were).
                self.file.read_exact_at(&mut run, at).map_err(|e| {
                    Error::io(e, format!("{}: reading refcounts at {at:#x}", self.path))
                })?;
            }
            let skip = ((c % rbe) - ((start * 8) >> width.order())) as usize;
            for i in 0..(stop - c) as usize {
                width.set(&mut run, skip + i, value);
            }
            self.pwrite(&run, at, "writing refcounts")?;
            c = stop;
        }
        Ok(())
    }

    /// Drops the backing file reference from the header on disk (see
    /// `qcow2::standalone` for the order of the writes and why each state
    /// in between opens correctly), each write followed by an fdatasync.
    /// Returns whether anything changed. The caller makes sure first that
    /// the overlay no longer needs its backing chain and that this is
    /// durable. The in-memory `header` keeps the old reference: it is only
    /// read at open.
    pub fn drop_backing_reference(&self) -> Result<bool> {
        self.check_writable()?;
        // Under the allocator lock: growing the refcount table also writes
        // (other bytes of) the header and syncs.
        let _a = self.lock();
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io(e, format!("{}: stat", self.path)))?
            .len();
        let mut area = vec![0u8; self.cluster_size().min(len) as usize];
        self.file
            .read_exact_at(&mut area, 0)
            .map_err(|e| Error::io(e, format!("{}: reading the header", self.path)))?;
        let header = Header::parse(&area, len, &self.path)?;
        let plan = qcow2::standalone::drop_backing_plan(&area, &header);
        for w in &plan {
            self.pwrite(&w.bytes, w.offset, "dropping the backing file reference")?;
            self.sync("dropping the backing file reference")?;
        }
        Ok(!plan.is_empty())
    }

    /// Frees clusters handed back by the cores, shrinks the file if its tail
    /// is free, and syncs. Called once, after every core has stopped.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut a = self.lock();
        let mut returned = std::mem::take(&mut a.returned);
        returned.sort();
        // Clusters handed back one by one (after failed writes) often
        // follow each other: one refcount write per run.
        returned.dedup_by(|next, run| {
            let joins = run.0 + run.1 == next.0;
            if joins {
                run.1 += next.1;
            }
            joins
        });
        for &(first, n) in &returned {
            self.set_refcounts(&a, first, n, 0)?;
        }
        // Drop free ranges at the end of the file.
        while let Some(&(first, n)) = returned.last() {
            if first + n != a.frontier {
                break;
            }
            a.frontier = first;
            returned.pop();
        }
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io(e, format!("{}: stat", self.path)))?
            .len();
        let end = a.frontier << self.cluster_bits;
        if len > end {
            self.file
                .set_len(end)
                .map_err(|e| Error::io(e, format!("{}: truncating free clusters", self.path)))?;
            if let Some(sim) = &self.sim {
                sim.meta_set_len(end, false);
            }
        }
        self.sync("closing")
    }
}
