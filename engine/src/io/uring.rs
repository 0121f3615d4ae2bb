//! The real I/O layer: one io_uring per reactor thread.
//!
//! Every in-flight operation has a slot in a `slab`; the slot holds the
//! operation's buffer (an `Arc<IoBuf>` clone) until its completion is reaped,
//! so the memory the kernel reads or writes outlives the operation. Files are
//! registered once (`IOSQE_FIXED_FILE`), so no per-operation fd lookup.
//! Dropping a `Uring` with operations in flight waits for them; if waiting
//! fails it leaks their buffers rather than free memory the kernel may
//! still write.

use super::{Cqe, Io, Op, OpKind};
use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

/// Submission queue entries per ring. Completions get twice as many.
pub const RING_ENTRIES: u32 = 1024;

struct Slot {
    token: u64,
    /// Keeps the buffer alive while the kernel uses it.
    buf: Option<Arc<super::IoBuf>>,
    /// A vectored operation's buffers and the iovec array the kernel reads
    /// (a boxed slice: its address does not move while the slot lives).
    _iov: Vec<Arc<super::IoBuf>>,
    _iovecs: Box<[libc::iovec]>,
    /// A vectored send's message header, which points at `_iovecs`.
    _msg: Option<Box<libc::msghdr>>,
}

pub struct Uring {
    ring: IoUring,
    slots: Slab<Slot>,
    /// Entries built but not yet in the submission queue (it was full).
    backlog: Vec<squeue::Entry>,
}

impl Uring {
    /// A ring with `files` registered; `FileId(i)` names `files[i]`.
    pub fn new(files: &[RawFd]) -> io::Result<Uring> {
        // Completions run as task work on this thread when it enters the
        // kernel (COOP_TASKRUN) instead of interrupting it, and the ring
        // flags when such work waits (TASKRUN_FLAG), so a polling reactor
        // knows to enter. Older kernels without them get a plain ring.
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 2)
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .build(RING_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(RING_ENTRIES * 2)
                    .build(RING_ENTRIES)
            })?;
        if !files.is_empty() {
            ring.submitter().register_files(files)?;
        }
        Ok(Uring {
            ring,
            slots: Slab::with_capacity(RING_ENTRIES as usize),
            backlog: Vec::new(),
        })
    }

    fn entry(
        op: &Op,
        iovecs: &[libc::iovec],
        msg: Option<&libc::msghdr>,
        user_data: u64,
    ) -> squeue::Entry {
        let fd = types::Fixed(op.file.0);
        if let Some(msg) = msg {
            return opcode::SendMsg::new(types::Fd(op.fd), msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
                .user_data(user_data);
        }
        if !iovecs.is_empty() {
            let n = iovecs.len() as u32;
            let sqe = match op.kind {
                OpKind::Read => opcode::Readv::new(fd, iovecs.as_ptr(), n)
                    .offset(op.offset)
                    .build(),
                _ => opcode::Writev::new(fd, iovecs.as_ptr(), n)
                    .offset(op.offset)
                    .build(),
            };
            return sqe.user_data(user_data);
        }
        let ptr = op.buf.as_ref().map(|b| {
            // SAFETY: buf_off + len <= buf.len() was asserted when the Op was
            // built, so the pointer stays inside the allocation.
            unsafe { b.raw_ptr().add(op.buf_off) }
        });
        let sqe = match op.kind {
            OpKind::Read => opcode::Read::new(fd, ptr.expect("read needs a buffer"), op.len)
                .offset(op.offset)
                .build(),
            OpKind::Write => opcode::Write::new(fd, ptr.expect("write needs a buffer"), op.len)
                .offset(op.offset)
                .build(),
            OpKind::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            OpKind::WakeRead => opcode::Read::new(fd, ptr.expect("wake read needs a buffer"), 8)
                .offset(u64::MAX)
                .build(),
            OpKind::Recv => {
                opcode::Recv::new(types::Fd(op.fd), ptr.expect("recv needs a buffer"), op.len)
                    .build()
            }
            OpKind::Send => {
                opcode::Send::new(types::Fd(op.fd), ptr.expect("send needs a buffer"), op.len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            }
        };
        sqe.user_data(user_data)
    }

    fn flush_backlog(&mut self) -> io::Result<()> {
        while !self.backlog.is_empty() {
            let mut pushed = 0;
            {
                let mut sq = self.ring.submission();
                for e in self.backlog.iter() {
                    // SAFETY: every entry's buffers (and a vectored entry's
                    // iovec array and message header) are held by its slot in `self.slots`
                    // until the matching completion is reaped.
                    if unsafe { sq.push(e) }.is_err() {
                        break;
                    }
                    pushed += 1;
                }
            }
            self.backlog.drain(..pushed);
            if !self.backlog.is_empty() {
                // The queue is full: hand it to the kernel and go on.
                self.ring.submit()?;
            }
        }
        Ok(())
    }
}

impl Io for Uring {
    fn push(&mut self, token: u64, mut op: Op) {
        let iovecs: Box<[libc::iovec]> = op
            .iov
            .iter()
            .map(|(b, off, len)| libc::iovec {
                // SAFETY: off + len <= b.len() was asserted when the Op was
                // built, so the pointer stays inside the allocation.
                iov_base: unsafe { b.raw_ptr().add(*off) }.cast(),
                iov_len: *len,
            })
            .collect();
        let iov = op.iov.drain(..).map(|(b, _, _)| b).collect();
        let msg = (op.kind == OpKind::Send && !iovecs.is_empty()).then(|| {
            // SAFETY: msghdr is plain data; all-zero is a valid empty one.
            let mut m: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
            m.msg_iov = iovecs.as_ptr().cast_mut();
            m.msg_iovlen = iovecs.len() as _;
            m
        });
        let entry = Self::entry(&op, &iovecs, msg.as_deref(), 0);
        let slot = self.slots.insert(Slot {
            token,
            buf: op.buf.clone(),
            _iov: iov,
            _iovecs: iovecs,
            _msg: msg,
        });
        // The iovec array and the message header moved into the slot as
        // boxes: their heap addresses, which the entry points at, are the
        // same.
        self.backlog.push(entry.user_data(slot as u64));
    }

    fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        self.flush_backlog()?;
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                // EINTR: a signal arrived while waiting; wait again.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: the completion queue is full; reap first (the caller does).
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<Cqe>) {
        for cqe in self.ring.completion() {
            if cqe.user_data() == u64::MAX {
                continue; // The cancel request of `drop`.
            }
            let slot = self.slots.remove(cqe.user_data() as usize);
            out.push(Cqe {
                token: slot.token,
                result: cqe.result(),
                buf: slot.buf,
            });
        }
    }

    fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty() || self.ring.submission().taskrun()
    }

    fn in_flight(&self) -> usize {
        self.slots.len()
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if self.slots.is_empty() {
            return;
        }
        // Cancel whatever can be cancelled (an armed wake-up read never
        // completes on its own), then wait for every completion before the
        // buffers are freed.
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(u64::MAX);
        self.backlog.push(cancel);
        let mut sink = Vec::new();
        while !self.slots.is_empty() {
            if self.submit_and_wait(1).is_err() {
                // Cannot tell when the kernel is done: leak the buffers.
                for slot in self.slots.drain() {
                    std::mem::forget(slot.buf);
                }
                return;
            }
            self.reap(&mut sink);
            sink.clear();
        }
    }
}

/// A helper for tests and callers: the kernel's result as bytes or an errno.
pub fn result_to_len(result: i32) -> Result<usize, i32> {
    if result < 0 {
        Err(-result)
    } else {
        Ok(result as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{FileId, IoBuf};
    use std::os::fd::AsRawFd;

    #[test]
    fn write_then_read_back() {
        let f = tempfile::tempfile().unwrap();
        let mut ring = Uring::new(&[f.as_raw_fd()]).unwrap();
        let mut b = IoBuf::zeroed(4096);
        b.as_mut_slice().fill(0x5a);
        let b = Arc::new(b);
        ring.push(1, Op::write(FileId(0), 8192, b.clone(), 0, 4096));
        ring.submit_and_wait(1).unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].token, out[0].result), (1, 4096));
        let r = Arc::new(IoBuf::zeroed(4096));
        ring.push(2, Op::read(FileId(0), 8192, r.clone(), 0, 4096));
        ring.push(3, Op::fsync(FileId(0)));
        ring.submit_and_wait(2).unwrap();
        out.clear();
        while out.len() < 2 {
            ring.reap(&mut out);
            if out.len() < 2 {
                ring.submit_and_wait(1).unwrap();
            }
        }
        drop(out);
        assert!(r.as_slice().iter().all(|&x| x == 0x5a));
        assert_eq!(ring.in_flight(), 0);
    }
}
