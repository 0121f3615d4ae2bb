//! Ranges of a backing layer known to read as zeros, without reading
//! them: what an NBD server's block status said (`nbd/status.rs`), or the
//! holes a local raw file's file system reported (`SEEK_HOLE`). The chain's
//! lookup reads them as zeros, so copy-on-read and streaming record zero
//! clusters there and fetch (or read) nothing.
//!
//! Bounded: at most [`MAX_ZERO_RANGES`] ranges; past that the lowest are
//! forgotten (a stream moves up the disk), and a range forgotten is only
//! read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Ranges [`Zeros`] keeps at most; beyond, the lowest go.
const MAX_ZERO_RANGES: usize = 1 << 16;

/// Ranges of a layer known to read as zeros: disjoint, not touching.
#[derive(Default)]
pub struct Zeros {
    /// Whether any was ever learned: `run` takes no lock until then.
    any: AtomicBool,
    /// start -> end.
    map: Mutex<BTreeMap<u64, u64>>,
}

impl Zeros {
    /// Adds `[start, end)`, merged with the ranges it touches.
    pub fn insert(&self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let (mut lo, mut hi) = (start, end);
        if let Some((&s, &e)) = m.range(..=lo).next_back() {
            if e >= lo {
                lo = s;
                hi = hi.max(e);
            }
        }
        while let Some((&s, &e)) = m.range(lo..=hi).next() {
            m.remove(&s);
            hi = hi.max(e);
        }
        m.insert(lo, hi);
        while m.len() > MAX_ZERO_RANGES {
            m.pop_first();
        }
        self.any.store(true, Ordering::Release);
    }

    /// Whether the bytes from `pos` are known zeros, and for how long (at
    /// most `max`): the run up to the end of known zeros, or up to the
    /// next ones.
    pub fn run(&self, pos: u64, max: u64) -> (bool, u64) {
        if !self.any.load(Ordering::Acquire) {
            return (false, max);
        }
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, &e)) = m.range(..=pos).next_back() {
            if e > pos {
                return (true, (e - pos).min(max));
            }
        }
        let next = m.range(pos..).next().map_or(u64::MAX, |(&s, _)| s);
        (false, (next - pos).min(max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_merge_and_answer_runs() {
        let z = Zeros::default();
        assert_eq!(z.run(0, 100), (false, 100));
        z.insert(100, 200);
        z.insert(300, 400);
        z.insert(200, 250); // touches the first
        assert_eq!(z.run(100, 1000), (true, 150));
        assert_eq!(z.run(150, 1000), (true, 100));
        assert_eq!(z.run(150, 10), (true, 10));
        assert_eq!(z.run(250, 1000), (false, 50));
        assert_eq!(z.run(0, 1000), (false, 100));
        assert_eq!(z.run(0, 30), (false, 30));
        assert_eq!(z.run(400, 1000), (false, 1000));
        z.insert(50, 350); // swallows both
        assert_eq!(z.run(50, 1000), (true, 350));
        assert_eq!(z.map.lock().unwrap().len(), 1);
    }

    #[test]
    fn zeros_stay_bounded() {
        let z = Zeros::default();
        for i in 0..(MAX_ZERO_RANGES as u64 + 10) {
            z.insert(i * 10, i * 10 + 5);
        }
        let m = z.map.lock().unwrap();
        assert_eq!(m.len(), MAX_ZERO_RANGES);
        assert_eq!(*m.first_key_value().unwrap().0, 100);
    }
}
