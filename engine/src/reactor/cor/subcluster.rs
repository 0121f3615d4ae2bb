//! Extended L2 entries (qcow2 `extended_l2=on`): reads, writes and
//! copy-on-read at subcluster granularity.
//!
//! Each cluster is 32 subclusters; each is allocated (data at the host
//! cluster plus its offset), zero, or unallocated (read from the backing
//! image). The host cluster is allocated once, by the first write or fill
//! that needs it; later ones write their subclusters into it.
//!
//! - **Pieces** stay at most one cluster, and hold the same cluster locks
//!   as without subclusters. A piece whose range crosses subclusters of
//!   different states is split ([`Core::split_piece`]) so each piece sees
//!   one state. Cluster locks, not subcluster locks: the fill or write of
//!   one part of a cluster holds off the others until its entry is
//!   published. That keeps invariant 3 (writes win) exactly as it is for
//!   whole clusters, at the cost of serialising concurrent work on one
//!   cluster, which random I/O over a large disk rarely meets.
//! - **I/O unit.** O_DIRECT wants 4 KiB, and a subcluster of a 64 KiB
//!   cluster is 2 KiB: fills and writes work on *granules* of
//!   `max(subcluster, 4 KiB)`, aligned, and mark every subcluster of the
//!   granules they wrote.
//! - **Fills** fetch the granules the first reader needs, write them into
//!   the host cluster, and only then publish the new allocation bits
//!   (invariant 1 through the commit's fdatasync, as for clusters); all-zero
//!   data sets zero bits instead. A granule that also holds allocated
//!   subclusters (images written by QEMU with subclusters under 4 KiB) is
//!   served but not written back: its other data would be needed. A fill
//!   whose backing data is a compressed cluster decompresses all of it, so
//!   it keeps all of it that lies in this cluster's unallocated granules
//!   next to its own ([`Core::widen_for_compressed`]).
//! - **Writes** build the granules they touch in a private buffer: host
//!   data for allocated subclusters, zeros, backing data for the parts of
//!   unallocated subclusters the client did not cover; then write, then
//!   publish. Write-zeroes and discard set zero bits for whole subclusters
//!   without any I/O (a discard of a whole cluster frees its host cluster).

use super::{Core, Ev, Piece, Step, TAG_PIECE};
use crate::backing::Source;
use crate::error::Result;
use crate::io::{Io, IoBuf, Op, IO_ALIGN};
use crate::qcow2::{decode_l2_ext, encode_l2_ext, sub_mask, ExtL2, L2Entry, SubState, SUBCLUSTERS};
use crate::reactor::l2cache::BLOCK_ENTRIES;
use crate::reactor::request::ReqKind;
use crate::reactor::FILE_DATA;
use std::sync::Arc;

impl<I: Io> Core<I> {
    /// Whether the overlay has extended L2 entries.
    pub(super) fn ext(&self) -> bool {
        self.shared.meta.header.extended_l2()
    }

    /// Subcluster size in bytes (the cluster size without subclusters).
    pub(super) fn sc(&self) -> u64 {
        if self.ext() {
            self.cs() / u64::from(SUBCLUSTERS)
        } else {
            self.cs()
        }
    }

    /// Fills and writes of extended clusters move whole granules.
    fn granule(&self) -> u64 {
        self.sc().max(IO_ALIGN as u64)
    }

    /// Entries of one L2 table.
    pub(super) fn l2_entries(&self) -> u64 {
        self.shared.meta.header.l2_entries()
    }

    /// Clusters one cached L2 block (4 KiB) maps: 512, or 256 with 16-byte
    /// entries. A stripe of the router (512 clusters) is one or two whole
    /// blocks, so every block still has one owner.
    pub(super) fn block_clusters(&self) -> u64 {
        if self.ext() {
            BLOCK_ENTRIES as u64 / 2
        } else {
            BLOCK_ENTRIES as u64
        }
    }

    /// The cache key of the L2 block that maps `cluster`.
    pub(super) fn l2_key(&self, cluster: u64) -> u64 {
        cluster / self.block_clusters()
    }

    /// The index of `cluster`'s (first) 8-byte word in its cached block.
    pub(super) fn l2_slot(&self, cluster: u64) -> usize {
        let words = if self.ext() { 2 } else { 1 };
        (cluster % self.block_clusters()) as usize * words
    }

    /// Decodes and checks an extended entry (descriptor, bitmap).
    pub(super) fn check_ext(&self, raw: u64, bitmap: u64) -> Result<ExtL2> {
        let e = decode_l2_ext(raw, bitmap, self.cs())?;
        self.check_host(raw, e.entry)?;
        Ok(e)
    }

    /// The extended entry of `cluster`, whose block is cached and ready.
    pub(super) fn ext_entry(&self, cluster: u64) -> Result<ExtL2> {
        let b = self
            .l2
            .peek(self.l2_key(cluster))
            .expect("looked-up block is cached");
        let slot = self.l2_slot(cluster);
        self.check_ext(b.entries[slot], b.entries[slot + 1])
    }

    /// Makes `e` the cluster's extended entry in the cache (written by a
    /// later commit). The block must be pinned by the caller.
    pub(super) fn publish_ext(&mut self, cluster: u64, e: ExtL2) -> Result<()> {
        self.ensure_l2_table(cluster)?;
        let (raw, bitmap) = encode_l2_ext(&e);
        let (key, slot) = (self.l2_key(cluster), self.l2_slot(cluster));
        self.l2.set_entry(key, slot, raw);
        self.l2.set_entry(key, slot + 1, bitmap);
        Ok(())
    }

    /// After a write whose data is in the host cluster `host`: subclusters
    /// `mask` are allocated.
    pub(super) fn publish_sub_data(&mut self, cluster: u64, host: u64, mask: u32) -> Result<()> {
        let e = self.ext_entry(cluster)?;
        self.publish_ext(
            cluster,
            ExtL2 {
                entry: L2Entry::Data { host },
                alloc: e.alloc | mask,
                zero: e.zero & !mask,
            },
        )
    }

    /// After a fill wrote bytes `[lo, hi)` of the cluster into `host`: its
    /// unallocated subclusters there are allocated (zero ones stay zero).
    pub(super) fn publish_fill_ext(
        &mut self,
        cluster: u64,
        host: u64,
        lo: u64,
        hi: u64,
    ) -> Result<()> {
        let e = self.ext_entry(cluster)?;
        let sc = self.sc();
        let mask = sub_mask((lo / sc) as u32, (hi / sc) as u32) & !e.zero;
        self.publish_ext(
            cluster,
            ExtL2 {
                entry: L2Entry::Data { host },
                alloc: e.alloc | mask,
                zero: e.zero,
            },
        )
    }

    /// The bytes of the cluster a fill for a reader of `[start, start +
    /// len)` fetches: the granules around it.
    pub(super) fn fill_span(&self, start: u64, len: u64) -> (u64, u64) {
        let g = self.granule();
        let lo = start / g * g;
        let hi = (start + len).next_multiple_of(g).min(self.cs());
        (lo, hi)
    }

    /// A fill of `[lo, hi)` of `cluster` whose backing bytes (resolved in
    /// `self.segs`) come from compressed clusters fetches and decompresses
    /// those whole, however little of them it needs. The wider span to
    /// fill instead, if any: the granules of those compressed clusters in
    /// this cluster whose subclusters are all unallocated, next to the
    /// span. The next reader of a neighbouring granule then finds it in
    /// the overlay instead of fetching and inflating the same cluster
    /// again (a 4 KiB reader of a 64 KiB compressed cluster would
    /// otherwise fetch it up to 16 times).
    pub(super) fn widen_for_compressed(
        &self,
        cluster: u64,
        lo: u64,
        hi: u64,
        valid: u64,
    ) -> Result<Option<(u64, u64)>> {
        let cs = self.cs();
        let (mut want_lo, mut want_hi) = (lo, hi);
        let mut pos = lo;
        for s in &self.segs {
            if let Source::Compressed {
                in_cluster,
                cluster_bits,
                ..
            } = s.source
            {
                // The segment is bytes `in_cluster..` of its compressed
                // cluster, and starts at `pos` of this cluster.
                want_lo = want_lo.min(pos.saturating_sub(in_cluster));
                want_hi = want_hi.max(pos + ((1u64 << cluster_bits) - in_cluster));
            }
            pos += s.len;
        }
        let g = self.granule();
        let want_lo = want_lo / g * g;
        let want_hi = want_hi.min(valid).next_multiple_of(g).min(cs);
        if want_lo >= lo && want_hi <= hi {
            return Ok(None);
        }
        let e = self.ext_entry(cluster)?;
        let sc = self.sc();
        // Granule `[a, a + g)` is all unallocated subclusters.
        let free =
            |a: u64| sub_mask((a / sc) as u32, ((a + g) / sc) as u32) & (e.alloc | e.zero) == 0;
        let (mut new_lo, mut new_hi) = (lo, hi);
        while new_lo > want_lo && free(new_lo - g) {
            new_lo -= g;
        }
        while new_hi < want_hi && free(new_hi) {
            new_hi += g;
        }
        Ok(((new_lo, new_hi) != (lo, hi)).then_some((new_lo, new_hi)))
    }

    /// Cuts piece `id` at byte `at` of its cluster: it keeps the head, and
    /// a new piece of the same part, run later, takes the tail.
    fn split_piece(&mut self, id: usize, at: u64) {
        let p = &self.pieces[id];
        debug_assert!(p.start < at && at < p.start + p.len);
        let tail = Piece::new(
            p.part,
            p.kind,
            p.cluster,
            at,
            p.start + p.len - at,
            p.buf_off + (at - p.start),
        );
        let part = p.part;
        self.pieces[id].len = at - self.pieces[id].start;
        let tail = self.pieces.insert(tail);
        self.parts[part].pending += 1;
        self.events.push_back(Ev::Run(tail));
    }

    // ----- populate ----------------------------------------------------------

    /// A populate piece of an extended cluster whose block is loaded: cuts
    /// it to one run of subclusters of the same state, and says whether
    /// that run still reads from the backing chain.
    pub(super) fn populate_run_ext(&mut self, id: usize) -> Result<bool> {
        let (cluster, start, len) = self.span(id);
        let e = self.ext_entry(cluster)?;
        if matches!(e.entry, L2Entry::Compressed(_)) {
            return Ok(false);
        }
        let sc = self.sc();
        let sub = (start / sc) as u32;
        let run_end = u64::from(e.run_end(sub)) * sc;
        if run_end < start + len {
            self.split_piece(id, run_end);
        }
        Ok(e.state(sub) == SubState::Unallocated)
    }

    /// Whether fill `fid` fetches every byte piece `id` covers (always, for
    /// whole-cluster fills).
    pub(super) fn fill_covers(&self, fid: usize, id: usize) -> bool {
        if !self.ext() {
            return true;
        }
        let (_, start, len) = self.span(id);
        let (lo, hi) = self.fill_span(start, len);
        let f = &self.fills[fid];
        f.lo <= lo && hi <= f.hi
    }

    // ----- reads -----------------------------------------------------------

    /// A read of an extended cluster whose block is loaded: one run of
    /// subclusters of the same state at a time.
    pub(super) fn run_read_ext(&mut self, id: usize) -> Result<()> {
        let (cluster, start, len) = self.span(id);
        let e = self.ext_entry(cluster)?;
        if let L2Entry::Compressed(raw) = e.entry {
            self.bump(|s| &s.overlay_hits, 1);
            self.read_compressed(id, raw, Step::CompressedRead);
            return Ok(());
        }
        let sc = self.sc();
        let sub = (start / sc) as u32;
        let run_end = u64::from(e.run_end(sub)) * sc;
        if run_end < start + len {
            self.split_piece(id, run_end);
        }
        match e.state(sub) {
            SubState::Data => {
                self.bump(|s| &s.overlay_hits, 1);
                let host = e.host().expect("allocated subclusters have a host");
                self.read_overlay(id, host);
                Ok(())
            }
            SubState::Zero => {
                self.bump(|s| &s.overlay_hits, 1);
                self.deliver_zeros(id);
                self.finish_piece(id, Ok(()));
                Ok(())
            }
            SubState::Unallocated => self.read_unallocated(id),
            SubState::Compressed => unreachable!("compressed clusters are read whole"),
        }
    }

    /// A fill of an extended cluster has its data in `buf` (readers were
    /// answered), or none for a fill of known zeros: record zeros, or
    /// write the granules into the host cluster (allocated now if the
    /// cluster has none).
    pub(super) fn fill_write_back_ext(&mut self, fid: usize, buf: Option<Arc<IoBuf>>) {
        let (cluster, lo, hi) = {
            let f = &self.fills[fid];
            (f.cluster, f.lo, f.hi)
        };
        let e = match self.ext_entry(cluster) {
            Ok(e) => e,
            Err(e) => {
                self.writeback_failed(&e);
                drop(buf);
                self.release_fill(fid);
                return;
            }
        };
        let sc = self.sc();
        let mask = sub_mask((lo / sc) as u32, (hi / sc) as u32);
        if e.alloc & mask != 0 {
            // The granules also hold allocated subclusters, whose data the
            // buffer does not have: leave this part uncached.
            drop(buf);
            self.release_fill(fid);
            return;
        }
        let Some(buf) = buf.filter(|b| !crate::io::is_zero(b.as_slice())) else {
            // Zero detection keeps the overlay sparse.
            let z = ExtL2 {
                zero: e.zero | mask,
                ..e
            };
            if self.publish_ext(cluster, z).is_ok() {
                self.bump(|s| &s.cor_zero_fills, 1);
            }
            self.release_fill(fid);
            return;
        };
        let (host, new_host) = match e.host() {
            Some(h) => (h, false),
            None => match self.alloc_cluster() {
                Ok(h) => (h, true),
                Err(e) => {
                    self.writeback_failed(&e);
                    drop(buf);
                    self.release_fill(fid);
                    return;
                }
            },
        };
        self.io.push(
            super::TAG_FILL | fid as u64,
            Op::write(FILE_DATA, host + lo, buf, 0, (hi - lo) as usize),
        );
        let f = &mut self.fills[fid];
        f.host = host;
        f.new_host = new_host;
        f.writing = true;
        f.pending = 1;
    }

    // ----- writes ----------------------------------------------------------

    /// A write, write-zeroes or discard of an extended (not compressed)
    /// cluster; the piece holds the cluster's lock and pins its block.
    pub(super) fn run_write_ext(&mut self, id: usize) -> Result<()> {
        let (cluster, start, len, kind) = {
            let p = &self.pieces[id];
            (p.cluster, p.start, p.len, p.kind)
        };
        let e = self.ext_entry(cluster)?;
        let (sc, cs) = (self.sc(), self.cs());
        let valid = self.valid_len(cluster);
        let end = start + len;
        if matches!(kind, ReqKind::Zero | ReqKind::Discard) {
            // The end of the disk covers the rest of the last subcluster.
            let covered_end = if end >= valid { cs } else { end };
            let (fa, fb) = (start.div_ceil(sc), covered_end / sc);
            if start.is_multiple_of(sc) && fa < fb {
                // Whole subclusters from the piece's start: zero bits, no I/O.
                if fb * sc < end {
                    self.split_piece(id, fb * sc);
                }
                let mask = sub_mask(fa as u32, fb as u32);
                match e.host() {
                    Some(host) if kind == ReqKind::Discard && mask == u32::MAX => {
                        self.discard_cluster(cluster, host)?;
                    }
                    _ => {
                        let z = ExtL2 {
                            entry: e.entry,
                            alloc: e.alloc & !mask,
                            zero: e.zero | mask,
                        };
                        self.publish_ext(cluster, z)?;
                    }
                }
                self.finish_piece(id, Ok(()));
                return Ok(());
            }
            // Part of one subcluster: zeros are written like data, unless
            // the subcluster reads as zeros already.
            let edge_end = end.min((start / sc + 1) * sc);
            if edge_end < end {
                self.split_piece(id, edge_end);
            }
            let state = e.state((start / sc) as u32);
            if state == SubState::Zero
                || (state == SubState::Unallocated && self.shared.chain.is_none())
            {
                self.finish_piece(id, Ok(()));
                return Ok(());
            }
        }
        let (start, len) = (self.pieces[id].start, self.pieces[id].len);
        let end = start + len;
        let g = self.granule();
        let (a, b) = (start / g * g, end.next_multiple_of(g).min(cs));
        let mask = sub_mask((a / sc) as u32, (b / sc) as u32);
        if e.alloc & mask == mask {
            let host = e.host().expect("allocated subclusters have a host");
            self.write_in_place(id, host);
            return Ok(());
        }
        // Build the granules `[a, b)` in a private buffer, then write them.
        let buf = self.pool.get((b - a) as usize);
        let p = &mut self.pieces[id];
        p.span_lo = a;
        p.span_hi = b;
        p.sub_mask = mask;
        p.publish = true;
        let covered = start == a && (end == b || end >= valid);
        if !covered && e.alloc & mask != 0 {
            // Some of them hold data: read it first.
            let host = e.host().expect("allocated subclusters have a host");
            self.read_into_piece(id, buf, host + a, (b - a) as usize, Step::SubRead);
            return Ok(());
        }
        self.pieces[id].buf = Some(buf);
        self.sub_gather(id)
    }

    /// The write's buffer holds the host data of the granules (if they had
    /// any): zero what is not allocated data, and read backing data for the
    /// bytes of unallocated subclusters that the client does not cover.
    pub(super) fn sub_gather(&mut self, id: usize) -> Result<()> {
        let (cluster, start, len, a, b) = {
            let p = &self.pieces[id];
            (p.cluster, p.start, p.len, p.span_lo, p.span_hi)
        };
        let end = start + len;
        let e = self.ext_entry(cluster)?;
        let sc = self.sc();
        let mut buf = self.pieces[id].buf.take().expect("sub-write buffer");
        {
            let dst = IoBuf::unique_mut(&mut buf);
            for s in (a / sc) as u32..(b / sc) as u32 {
                if e.state(s) != SubState::Data {
                    let at = (u64::from(s) * sc - a) as usize;
                    dst[at..at + sc as usize].fill(0);
                }
            }
        }
        let mut q = super::Queued::default();
        if self.shared.chain.is_some() {
            let valid = self.valid_len(cluster);
            let base = cluster << self.cluster_bits();
            let mut s = (a / sc) as u32;
            while s < (b / sc) as u32 {
                let run_end = e.run_end(s).min((b / sc) as u32);
                if e.state(s) == SubState::Unallocated {
                    let (r0, r1) = (u64::from(s) * sc, (u64::from(run_end) * sc).min(valid));
                    for (x, y) in [(r0, start.min(r1)), (end.max(r0), r1)] {
                        if x < y {
                            self.resolve(base + x, y - x)?;
                            // Zeroed above: other reads into `buf` may be in flight.
                            q.add(self.push_segment_reads(
                                TAG_PIECE | id as u64,
                                &buf,
                                (x - a) as usize,
                            ));
                        }
                    }
                }
                s = run_end;
            }
        }
        self.bump(|s| &s.bytes_fetched, q.local_bytes);
        let p = &mut self.pieces[id];
        p.buf = Some(buf);
        p.inflates = q.inflates;
        p.step = Step::SubGather;
        p.io_pending = q.reads;
        p.backing_want = q.bytes;
        p.backing_got = 0;
        if q.reads == 0 {
            return self.sub_gathered(id);
        }
        Ok(())
    }

    /// The granules' old contents are in the buffer: merge the client's
    /// bytes and write them into the host cluster (allocated now if the
    /// cluster has none); the subclusters are published after the write.
    pub(super) fn sub_gathered(&mut self, id: usize) -> Result<()> {
        let cluster = self.pieces[id].cluster;
        let e = self.ext_entry(cluster)?;
        let host = match e.host() {
            Some(h) => h,
            None => self.alloc_piece_cluster(id)?,
        };
        let mut buf = self.pieces[id].buf.take().expect("sub-write buffer");
        self.pieces[id].host = host;
        self.merge_client_data(id, &mut buf);
        let p = &self.pieces[id];
        let (a, b) = (p.span_lo, p.span_hi);
        self.push_write(id, buf, host + a, (b - a) as usize);
        Ok(())
    }
}
