//! The router: which core owns which byte of the disk.
//!
//! The disk is cut into stripes of one 4 KiB block of L2 entries (512
//! clusters; two blocks with 16-byte extended L2 entries), dealt to the
//! cores round-robin. One core therefore owns whole
//! on-disk L2 blocks and is the only writer of each: no two cores ever write
//! the same metadata block, and each core's L2 cache is authoritative for
//! its blocks. A request that crosses stripes is split into parts, one per
//! stripe; the parts are joined by the request's completion counter.

/// Clusters per stripe: one 4 KiB block of 8-byte L2 entries.
pub const STRIPE_CLUSTERS: u64 = 512;

#[derive(Debug, Clone, Copy)]
pub struct Router {
    cluster_bits: u32,
    cores: usize,
}

/// One part of a request: the byte range `[offset, offset + len)` within one
/// stripe, owned by `core`, at `buf_off` in the request's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub core: usize,
    pub stripe: u64,
    pub offset: u64,
    pub len: u64,
    pub buf_off: u64,
}

impl Router {
    pub fn new(cluster_bits: u32, cores: usize) -> Router {
        assert!(cores > 0, "at least one core");
        Router {
            cluster_bits,
            cores,
        }
    }

    pub fn stripe_bytes(&self) -> u64 {
        STRIPE_CLUSTERS << self.cluster_bits
    }

    pub fn cores(&self) -> usize {
        self.cores
    }

    /// The core that owns stripe `stripe`.
    pub fn owner_of_stripe(&self, stripe: u64) -> usize {
        (stripe % self.cores as u64) as usize
    }

    /// The core that owns the byte at `offset`.
    pub fn owner(&self, offset: u64) -> usize {
        self.owner_of_stripe(offset / self.stripe_bytes())
    }

    /// The parts of `[offset, offset + len)`, in order.
    pub fn split(&self, offset: u64, len: u64) -> impl Iterator<Item = Part> + '_ {
        let stripe_bytes = self.stripe_bytes();
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let stripe = pos / stripe_bytes;
            let stop = end.min((stripe + 1) * stripe_bytes);
            let part = Part {
                core: self.owner_of_stripe(stripe),
                stripe,
                offset: pos,
                len: stop - pos,
                buf_off: pos - offset,
            };
            pos = stop;
            Some(part)
        })
    }

    /// How many parts `split` yields.
    pub fn count(&self, offset: u64, len: u64) -> usize {
        if len == 0 {
            return 0;
        }
        let s = self.stripe_bytes();
        ((offset + len - 1) / s - offset / s + 1) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_range_in_order() {
        let r = Router::new(16, 2); // 64 KiB clusters, 32 MiB stripes
        let s = r.stripe_bytes();
        assert_eq!(s, 32 << 20);
        let parts: Vec<_> = r.split(s - 10, s + 20).collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(r.count(s - 10, s + 20), 3);
        assert_eq!(
            parts[0],
            Part {
                core: 0,
                stripe: 0,
                offset: s - 10,
                len: 10,
                buf_off: 0
            }
        );
        assert_eq!(
            parts[1],
            Part {
                core: 1,
                stripe: 1,
                offset: s,
                len: s,
                buf_off: 10
            }
        );
        assert_eq!(parts[2].core, 0);
        assert_eq!(parts[2].len, 10);
        assert_eq!(parts.iter().map(|p| p.len).sum::<u64>(), s + 20);
    }

    #[test]
    fn random_splits_match_count_and_cover() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let r = Router::new(rng.random_range(12..=21), rng.random_range(1..5));
            let off = rng.random_range(0..1u64 << 36);
            let len = rng.random_range(0..1u64 << 31);
            let parts: Vec<_> = r.split(off, len).collect();
            assert_eq!(parts.len(), r.count(off, len));
            let mut pos = off;
            for p in &parts {
                assert_eq!(p.offset, pos);
                assert_eq!(p.buf_off, pos - off);
                assert_eq!(r.owner(p.offset), p.core);
                assert_eq!(
                    r.owner(p.offset + p.len - 1),
                    p.core,
                    "a part stays in one stripe"
                );
                pos += p.len;
            }
            assert_eq!(pos, off + len);
        }
    }
}
