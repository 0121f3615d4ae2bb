//! Merging of adjacent operations: an [`Io`] layer over another.
//!
//! Copy-on-read works cluster by cluster, so a large sequential read of
//! missing data becomes many cluster-sized backing reads and write-backs.
//! Submitted one by one, the write-backs reach the device as small writes,
//! which cost far more than one large one. This layer looks at what one loop
//! turn queued, and joins reads (or writes) of one file at contiguous
//! offsets into one vectored operation (READV/WRITEV over the original
//! buffers, nothing copied) of up to [`MAX_MERGED`] bytes; each original
//! operation completes with its own token, buffer and share of the result.
//! Nothing above notices, except that there are fewer, larger I/Os.
//!
//! Operations of one turn carry no order among themselves (no links), so
//! merging them keeps every guarantee the caller had.

use super::{Cqe, Io, IoBuf, Op, OpKind};
use slab::Slab;
use std::sync::Arc;

/// Largest merged operation, in bytes and in pieces (well under IOV_MAX).
pub const MAX_MERGED: usize = 1 << 20;
pub const MAX_PIECES: usize = 256;
/// Token tag of a merged operation (a top byte no caller uses).
const TAG_MERGED: u64 = 0xfe << 56;
const TAG_MASK: u64 = 0xff << 56;

/// One original operation inside a merged one.
struct Member {
    token: u64,
    buf: Arc<IoBuf>,
    len: usize,
}

pub struct Merge<I: Io> {
    inner: I,
    queued: Vec<(u64, Op)>,
    /// Scratch: the run of contiguous operations being gathered.
    run: Vec<(u64, Op)>,
    groups: Slab<Vec<Member>>,
    /// Original operations pushed and not yet reaped.
    in_flight: usize,
}

impl<I: Io> Merge<I> {
    pub fn new(inner: I) -> Merge<I> {
        Merge {
            inner,
            queued: Vec::new(),
            run: Vec::new(),
            groups: Slab::new(),
            in_flight: 0,
        }
    }

    fn mergeable(op: &Op) -> bool {
        matches!(op.kind, OpKind::Read | OpKind::Write) && op.buf.is_some()
    }

    /// Hands the queued operations to the inner layer, merged where they
    /// touch.
    fn flush_queue(&mut self) {
        if self.queued.len() < 2 {
            for (t, op) in self.queued.drain(..) {
                self.inner.push(t, op);
            }
            return;
        }
        // Both vectors are taken and put back, so no loop turn allocates.
        let mut ops = std::mem::take(&mut self.queued);
        let mut run = std::mem::take(&mut self.run);
        // Mergeable ones sorted by (kind, file, offset); the rest go first
        // (operations of one turn have no order among them).
        ops.sort_unstable_by_key(|(_, op)| {
            (
                Self::mergeable(op),
                op.kind == OpKind::Write,
                op.file.0,
                op.offset,
            )
        });
        let mut run_len = 0usize;
        for (t, op) in ops.drain(..) {
            let joins = run.last().is_some_and(|(_, last)| {
                Self::mergeable(last)
                    && Self::mergeable(&op)
                    && last.kind == op.kind
                    && last.file == op.file
                    && last.offset + last.len as u64 == op.offset
                    && run_len + op.len as usize <= MAX_MERGED
                    && run.len() < MAX_PIECES
            });
            if !joins {
                self.push_run(&mut run);
                run_len = 0;
            }
            run_len += op.len as usize;
            run.push((t, op));
        }
        self.push_run(&mut run);
        self.queued = ops;
        self.run = run;
    }

    /// Pushes a run of contiguous operations: as is when alone, else merged.
    fn push_run(&mut self, run: &mut Vec<(u64, Op)>) {
        if run.len() == 1 {
            let (t, op) = run.pop().expect("one op");
            self.inner.push(t, op);
        } else if run.len() > 1 {
            self.push_group(run);
            run.clear();
        }
    }

    /// Pushes `ops` (contiguous, same kind and file) as one vectored
    /// operation.
    fn push_group(&mut self, ops: &mut [(u64, Op)]) {
        let kind = ops[0].1.kind;
        let file = ops[0].1.file;
        let offset = ops[0].1.offset;
        let mut members = Vec::with_capacity(ops.len());
        let mut iov = Vec::with_capacity(ops.len());
        for (t, op) in ops.iter_mut() {
            let buf = op.buf.take().expect("mergeable ops have buffers");
            iov.push((buf.clone(), op.buf_off, op.len as usize));
            members.push(Member {
                token: *t,
                buf,
                len: op.len as usize,
            });
        }
        let gid = self.groups.insert(members);
        let op = Op::vectored(kind, file, offset, iov);
        self.inner.push(TAG_MERGED | gid as u64, op);
    }

    /// Splits a merged completion into its members' completions: each gets
    /// its share of the bytes transferred, in order, or the error.
    fn split(&mut self, gid: usize, result: i32, out: &mut Vec<Cqe>) {
        let mut at = 0usize;
        for m in self.groups.remove(gid) {
            let r = if result < 0 {
                result
            } else {
                (result as usize).saturating_sub(at).min(m.len) as i32
            };
            at += m.len;
            out.push(Cqe {
                token: m.token,
                result: r,
                buf: Some(m.buf),
            });
        }
    }
}

impl<I: Io> Io for Merge<I> {
    fn push(&mut self, token: u64, op: Op) {
        debug_assert!(
            token & TAG_MASK != TAG_MERGED,
            "token collides with merged ops"
        );
        self.in_flight += 1;
        self.queued.push((token, op));
    }

    /// Waits for at least one completion when `want` is not 0: merged
    /// operations complete several of the caller's at once, so counting the
    /// caller's could wait for completions that never come.
    fn submit_and_wait(&mut self, want: usize) -> std::io::Result<()> {
        self.flush_queue();
        self.inner.submit_and_wait(want.min(1))
    }

    fn reap(&mut self, out: &mut Vec<Cqe>) {
        let start = out.len();
        self.inner.reap(out);
        // Replace each merged completion by its members' (appended; the
        // order of completions means nothing).
        let mut i = start;
        while i < out.len() {
            if out[i].token & TAG_MASK == TAG_MERGED {
                let cqe = out.swap_remove(i);
                self.split((cqe.token & !TAG_MASK) as usize, cqe.result, out);
            } else {
                i += 1;
            }
        }
        self.in_flight -= out.len() - start;
    }

    fn has_completions(&mut self) -> bool {
        self.inner.has_completions()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::uring::Uring;
    use crate::io::FileId;
    use std::os::fd::AsRawFd;

    fn run<I: Io>(io: &mut I, n: usize) -> Vec<Cqe> {
        let mut out = Vec::new();
        io.submit_and_wait(n).unwrap();
        while out.len() < n {
            io.reap(&mut out);
            if out.len() < n {
                io.submit_and_wait(1).unwrap();
            }
        }
        out
    }

    #[test]
    fn adjacent_writes_and_reads_merge_and_complete_one_by_one() {
        let f = tempfile::tempfile().unwrap();
        let mut io = Merge::new(Uring::new(&[f.as_raw_fd()]).unwrap());
        // Four 4 KiB writes at 8K, 12K, 16K (out of order) and a lone one.
        for (t, off, byte) in [
            (1u64, 12288u64, 2u8),
            (2, 8192, 1),
            (3, 16384, 3),
            (4, 65536, 9),
        ] {
            io.push(
                t,
                Op::write(FileId(0), off, IoBuf::filled(4096, byte), 0, 4096),
            );
        }
        let mut done = run(&mut io, 4);
        done.sort_by_key(|c| c.token);
        assert_eq!(
            done.iter().map(|c| (c.token, c.result)).collect::<Vec<_>>(),
            vec![(1, 4096), (2, 4096), (3, 4096), (4, 4096)]
        );
        assert_eq!(io.in_flight(), 0);
        // Read back in pieces; the middle one into the second half of a buffer.
        let a = Arc::new(IoBuf::zeroed(4096));
        let b = Arc::new(IoBuf::zeroed(8192));
        let c = Arc::new(IoBuf::zeroed(4096));
        io.push(10, Op::read(FileId(0), 8192, a.clone(), 0, 4096));
        io.push(11, Op::read(FileId(0), 12288, b.clone(), 4096, 4096));
        io.push(12, Op::read(FileId(0), 16384, c.clone(), 0, 4096));
        let done = run(&mut io, 3);
        assert!(done.iter().all(|c| c.result == 4096));
        drop(done);
        assert!(a.as_slice().iter().all(|&x| x == 1));
        assert!(b.as_slice()[4096..].iter().all(|&x| x == 2));
        assert!(c.as_slice().iter().all(|&x| x == 3));
    }

    #[test]
    fn a_short_merged_read_is_shared_out_in_order() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096 + 100).unwrap();
        let mut io = Merge::new(Uring::new(&[f.as_raw_fd()]).unwrap());
        for t in 0..3u64 {
            io.push(
                t,
                Op::read(FileId(0), t * 4096, Arc::new(IoBuf::zeroed(4096)), 0, 4096),
            );
        }
        let mut done = run(&mut io, 3);
        done.sort_by_key(|c| c.token);
        assert_eq!(
            done.iter().map(|c| c.result).collect::<Vec<_>>(),
            vec![4096, 100, 0]
        );
    }
}
