//! The per-core L2 cache: 4 KiB blocks of L2 entries, for the stripes this
//! core owns, under a memory budget (invariant 6).
//!
//! The core is the only writer of its blocks (see `router`), so its cached
//! copy is authoritative: entries are changed here first ("published") and
//! written to disk by a commit, after the data they point to is durable.
//! A block is never evicted while it is dirty, loading, or pinned by a fill
//! or write that will publish into it; so the budget is a target that
//! in-flight work can exceed by at most its own size.

use std::collections::{HashMap, VecDeque};

/// Entries per cached block (4 KiB of 8-byte entries).
pub const BLOCK_ENTRIES: usize = 512;
/// Bytes per cached block.
pub const BLOCK_BYTES: usize = BLOCK_ENTRIES * 8;

pub enum BlockState {
    /// A read of the block is in flight; these pieces wait for it.
    Loading(Vec<usize>),
    Ready,
}

pub struct Block {
    pub state: BlockState,
    /// Raw entries, host byte order.
    pub entries: Box<[u64; BLOCK_ENTRIES]>,
    /// Bumped on every change; `committed` is the generation on disk.
    pub generation: u64,
    pub committed: u64,
    pub pins: u32,
    referenced: bool,
}

impl Block {
    pub fn is_dirty(&self) -> bool {
        self.generation != self.committed
    }
}

pub struct L2Cache {
    map: HashMap<u64, Block>,
    /// Keys of blocks that may be dirty (a superset; pruned by `dirty_keys`).
    dirty: Vec<u64>,
    clock: VecDeque<u64>,
    max_blocks: usize,
}

impl L2Cache {
    pub fn new(budget_bytes: usize) -> L2Cache {
        L2Cache {
            map: HashMap::new(),
            dirty: Vec::new(),
            clock: VecDeque::new(),
            max_blocks: (budget_bytes / BLOCK_BYTES).max(2),
        }
    }

    pub fn get(&mut self, key: u64) -> Option<&mut Block> {
        let b = self.map.get_mut(&key)?;
        b.referenced = true;
        Some(b)
    }

    pub fn peek(&self, key: u64) -> Option<&Block> {
        self.map.get(&key)
    }

    /// Inserts a block (loading, or ready with `entries`), evicting clean,
    /// unpinned blocks if the cache is over budget.
    pub fn insert(&mut self, key: u64, state: BlockState, entries: Box<[u64; BLOCK_ENTRIES]>) {
        self.evict();
        let prev = self.map.insert(
            key,
            Block {
                state,
                entries,
                generation: 0,
                committed: 0,
                pins: 0,
                referenced: true,
            },
        );
        debug_assert!(prev.is_none(), "block {key} inserted twice");
        self.clock.push_back(key);
    }

    fn evict(&mut self) {
        // Second-chance clock: at most two passes over the queue.
        let mut budget = self.clock.len() * 2;
        while self.map.len() >= self.max_blocks && budget > 0 {
            budget -= 1;
            let Some(key) = self.clock.pop_front() else {
                return;
            };
            let Some(b) = self.map.get_mut(&key) else {
                continue;
            };
            let busy = b.pins > 0 || b.is_dirty() || matches!(b.state, BlockState::Loading(_));
            if busy || b.referenced {
                b.referenced = false;
                self.clock.push_back(key);
                continue;
            }
            self.map.remove(&key);
        }
    }

    pub fn remove(&mut self, key: u64) {
        self.map.remove(&key);
    }

    /// Changes entry `idx` of cached block `key` (which must be ready).
    pub fn set_entry(&mut self, key: u64, idx: usize, raw: u64) {
        let b = self.map.get_mut(&key).expect("changing an uncached block");
        debug_assert!(matches!(b.state, BlockState::Ready));
        if !b.is_dirty() {
            self.dirty.push(key);
        }
        b.entries[idx] = raw;
        b.generation += 1;
    }

    /// Whether any block is dirty (cheap: no scan).
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    /// The dirty blocks, in no particular order.
    pub fn dirty_keys(&mut self) -> Vec<u64> {
        let map = &self.map;
        self.dirty.sort_unstable();
        self.dirty.dedup();
        self.dirty
            .retain(|k| map.get(k).is_some_and(|b| b.is_dirty()));
        self.dirty.clone()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_only_clean_unpinned_blocks() {
        let mut c = L2Cache::new(16 * BLOCK_BYTES);
        assert_eq!(L2Cache::new(0).max_blocks, 2, "a tiny budget still works");
        for k in 0..16 {
            c.insert(k, BlockState::Ready, Box::new([0; BLOCK_ENTRIES]));
        }
        c.get(0).unwrap().pins = 1;
        c.set_entry(1, 0, 5);
        for k in 16..64 {
            c.insert(k, BlockState::Ready, Box::new([0; BLOCK_ENTRIES]));
            assert!(c.len() <= 16, "over budget: {}", c.len());
        }
        assert!(c.peek(0).is_some(), "pinned block evicted");
        assert!(c.peek(1).is_some(), "dirty block evicted");
        assert_eq!(c.dirty_keys(), vec![1]);
    }
}
