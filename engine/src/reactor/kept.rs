//! Readahead buffers kept after their write-back: the sequential reader
//! that a readahead fill ran ahead of is answered from that fill's buffer,
//! instead of reading back from the overlay what was just written there.
//! Without them a sequential copy-on-read moves every byte over the disk
//! three times (the backing medium's read, the write-back, the reader's
//! read back); with them, twice.
//!
//! What it owns: per core, the buffers of its clusters' completed populate
//! fills, by cluster, with the host cluster they were written to, up to a
//! byte budget (oldest out first). On a disk that passes reads through
//! (no copy-on-read, or read-only), readahead's fetches, written nowhere:
//! their host cluster is 0 (no cluster of data is there: the header is),
//! for as long as the overlay lacks the cluster.
//!
//! What keeps it right: an entry is the cluster's content, and only this
//! core changes this core's clusters. Every write, write-zeroes or discard
//! piece forgets the cluster's entry when it takes the cluster's lock,
//! before it changes anything; a read uses an entry only while the L2 entry
//! still maps the cluster to the same host cluster. A read that consumes
//! the end of a cluster drops its entry (a sequential reader is done
//! with it).

//!
//! The same store, keyed by where compressed data lies, keeps clusters a
//! core decompressed (`Core::inflated`): a compressed cluster read in
//! pieces is read and decompressed once while it stays.

use crate::io::IoBuf;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;

/// Buffers by key (a cluster, by default), each with a tag that a lookup
/// must match (the host cluster), oldest out first past a byte budget.
pub struct Kept<K = u64> {
    /// key -> (tag, buffer, insertion number)
    map: HashMap<K, (u64, Arc<IoBuf>, u64)>,
    /// (key, insertion number), oldest first; stale ones are skipped.
    order: VecDeque<(K, u64)>,
    bytes: usize,
    max_bytes: usize,
    next: u64,
}

impl<K: Copy + Eq + Hash> Kept<K> {
    /// Keeps at most `max_bytes` of buffers (0: keeps none).
    pub fn new(max_bytes: usize) -> Kept<K> {
        Kept {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_bytes,
            next: 0,
        }
    }

    /// Keeps `buf`, the content of `cluster` written at `host`. Returns the
    /// buffers that make room for it (or `buf` itself, past the budget).
    pub fn insert(&mut self, cluster: K, host: u64, buf: Arc<IoBuf>) -> Vec<Arc<IoBuf>> {
        let mut out = Vec::new();
        if buf.len() > self.max_bytes {
            out.push(buf);
            return out;
        }
        out.extend(self.forget(cluster));
        while self.bytes + buf.len() > self.max_bytes {
            let Some((c, n)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&c).is_some_and(|e| e.2 == n) {
                out.extend(self.forget(c));
            }
        }
        self.bytes += buf.len();
        self.map.insert(cluster, (host, buf, self.next));
        self.order.push_back((cluster, self.next));
        self.next += 1;
        // Stale order entries pile up when entries go by `take` or
        // `forget`: drop them once they outnumber the live ones.
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order
                .retain(|(c, n)| map.get(c).is_some_and(|e| e.2 == *n));
        }
        out
    }

    /// The kept content of `cluster`, if it is still the one at `host`.
    pub fn get(&self, cluster: K, host: u64) -> Option<&Arc<IoBuf>> {
        self.map.get(&cluster).filter(|e| e.0 == host).map(|e| &e.1)
    }

    /// Drops the entry of `cluster`, returning its buffer.
    pub fn forget(&mut self, cluster: K) -> Option<Arc<IoBuf>> {
        let (_, buf, _) = self.map.remove(&cluster)?;
        self.bytes -= buf.len();
        Some(buf)
    }

    /// Whether a buffer is kept for `cluster`.
    pub fn has(&self, cluster: K) -> bool {
        self.map.contains_key(&cluster)
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_within_budget_oldest_out_first() {
        let mut k: Kept = Kept::new(3 * 4096);
        for c in 0..3 {
            assert!(k
                .insert(c, 100 + c, IoBuf::filled(4096, c as u8))
                .is_empty());
        }
        let out = k.insert(3, 103, IoBuf::filled(4096, 3));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_slice()[0], 0, "the oldest goes first");
        assert!(k.get(0, 100).is_none());
        assert_eq!(k.get(3, 103).unwrap().as_slice()[0], 3);
        // Too big for the budget: handed straight back.
        assert_eq!(k.insert(9, 9, IoBuf::filled(4 * 4096, 9)).len(), 1);
    }

    #[test]
    fn a_moved_or_forgotten_cluster_is_not_used() {
        let mut k: Kept = Kept::new(1 << 20);
        k.insert(5, 500, IoBuf::filled(4096, 5));
        assert!(k.get(5, 501).is_none(), "another host cluster");
        assert!(k.get(5, 500).is_some());
        assert!(k.forget(5).is_some());
        assert!(k.get(5, 500).is_none());
        assert!(k.is_empty());
        // Re-inserting a cluster replaces its entry.
        k.insert(6, 600, IoBuf::filled(4096, 1));
        let out = k.insert(6, 601, IoBuf::filled(4096, 2));
        assert_eq!(out.len(), 1);
        assert_eq!(k.get(6, 601).unwrap().as_slice()[0], 2);
    }

    #[test]
    fn stale_order_entries_do_not_pile_up() {
        let mut k: Kept = Kept::new(1 << 30);
        for c in 0..10_000u64 {
            k.insert(c, c, IoBuf::filled(16, 0));
            k.forget(c);
        }
        assert!(k.order.len() < 100);
    }
}
