//! The per-core range-lock table, at cluster granularity.
//!
//! Each reactor owns one table for the clusters of its stripes; only that
//! thread touches it, so it needs no lock of its own. A cluster is locked by
//! whatever may change its contents or its L2 entry: a copy-on-read fill
//! (from its lookup until its L2 entry is published) or a client write,
//! write-zeroes or discard (from its lookup until its data is written and its
//! entry published). Reads of allocated clusters take no lock.
//!
//! Invariant 3 (writes win) is enforced here: a fill holds the lock across
//! backing read, write-back and publish, so a client write to the cluster
//! waits and lands after it; a fill that starts after a write re-reads the L2
//! entry under the lock and finds the cluster allocated.
//!
//! Images with extended L2 entries (subclusters) are locked per cluster
//! too: a fill or write of some subclusters holds the whole cluster (see
//! `reactor::cor::subcluster` for why).
//!
//! Waiters are woken all at once on release, in arrival order, and re-run
//! their step from the L2 lookup: a reader that waited behind a write usually
//! finds the cluster allocated and needs no lock at all.

use std::collections::HashMap;

/// Who holds a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder<F> {
    /// A copy-on-read fill, with its id (readers may join it).
    Fill(F),
    /// A client write, write-zeroes or discard.
    Write,
}

#[derive(Debug)]
struct Entry<F, W> {
    holder: Holder<F>,
    waiters: Vec<W>,
}

/// Cluster index → holder and waiters. `F` names fills, `W` names waiters.
#[derive(Debug)]
pub struct LockTable<F, W> {
    map: HashMap<u64, Entry<F, W>>,
}

impl<F: Copy, W> Default for LockTable<F, W> {
    fn default() -> Self {
        LockTable {
            map: HashMap::new(),
        }
    }
}

impl<F: Copy, W> LockTable<F, W> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current holder of `cluster`, if any.
    pub fn holder(&self, cluster: u64) -> Option<Holder<F>> {
        self.map.get(&cluster).map(|e| e.holder)
    }

    /// Takes the lock if it is free. Returns false if someone holds it.
    pub fn try_lock(&mut self, cluster: u64, holder: Holder<F>) -> bool {
        if self.map.contains_key(&cluster) {
            return false;
        }
        self.map.insert(
            cluster,
            Entry {
                holder,
                waiters: Vec::new(),
            },
        );
        true
    }

    /// Parks `waiter` until `cluster` is released. The cluster must be held.
    pub fn wait(&mut self, cluster: u64, waiter: W) {
        self.map
            .get_mut(&cluster)
            .expect("waiting on a cluster nobody holds")
            .waiters
            .push(waiter);
    }

    /// Releases `cluster` and returns its waiters, in arrival order, for the
    /// caller to re-run.
    pub fn unlock(&mut self, cluster: u64) -> Vec<W> {
        self.map
            .remove(&cluster)
            .expect("unlocking a cluster nobody holds")
            .waiters
    }

    /// Whether someone waits for `cluster`.
    pub fn has_waiters(&self, cluster: u64) -> bool {
        self.map
            .get(&cluster)
            .is_some_and(|e| !e.waiters.is_empty())
    }

    /// Clusters currently held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_and_fifo_wakeups() {
        let mut t: LockTable<u32, &str> = LockTable::new();
        assert!(t.try_lock(7, Holder::Fill(1)));
        assert!(!t.try_lock(7, Holder::Write));
        assert_eq!(t.holder(7), Some(Holder::Fill(1)));
        t.wait(7, "a");
        t.wait(7, "b");
        assert!(
            t.try_lock(8, Holder::Write),
            "other clusters are independent"
        );
        assert_eq!(t.unlock(7), vec!["a", "b"]);
        assert_eq!(t.holder(7), None);
        assert!(t.try_lock(7, Holder::Write));
        assert_eq!(t.len(), 2);
    }

    #[test]
    #[should_panic(expected = "nobody holds")]
    fn unlock_of_free_cluster_is_a_bug() {
        let mut t: LockTable<u32, ()> = LockTable::new();
        t.unlock(1);
    }

    #[test]
    fn model_random_ops() {
        // Against a model: a set of held clusters and a waiter list per cluster.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut t: LockTable<u32, u32> = LockTable::new();
        let mut model: HashMap<u64, Vec<u32>> = HashMap::new();
        for i in 0..10_000u32 {
            let c = rng.random_range(0..16u64);
            match rng.random_range(0..3) {
                0 => {
                    let got = t.try_lock(c, Holder::Write);
                    assert_eq!(got, !model.contains_key(&c));
                    model.entry(c).or_default();
                }
                1 if model.contains_key(&c) => {
                    t.wait(c, i);
                    model.get_mut(&c).unwrap().push(i);
                }
                2 if model.contains_key(&c) => {
                    assert_eq!(t.unlock(c), model.remove(&c).unwrap());
                }
                _ => {}
            }
            assert_eq!(t.len(), model.len());
        }
    }
}
