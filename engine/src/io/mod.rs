//! The I/O layer: the one seam between the engine and the kernel.
//!
//! The reactor describes each operation as an [`Op`] (plain data plus the
//! buffer it uses) and gets back a [`Cqe`]. [`uring::Uring`] runs them on a
//! real io_uring; a seeded simulated implementation of the same [`Io`] trait
//! can replace it for deterministic tests and crash replay. All `unsafe` of
//! the engine's I/O path lives in this module.

pub mod buf;
pub mod merge;
pub mod uring;
pub mod wake;

pub use buf::{IoBuf, Spares, IO_ALIGN};

use std::sync::Arc;

/// Whether every byte of `buf` is zero. It looks at 256 bytes at a time,
/// ORed together as 16-byte words (which the compiler vectorises), and
/// stops at the first block with a byte set: an all-zero cluster costs a
/// fraction of a byte-by-byte scan, a data cluster one block.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(256).all(|block| {
        let mut words = block.chunks_exact(16);
        let ored = words.by_ref().fold(0u128, |acc, w| {
            acc | u128::from_ne_bytes(w.try_into().expect("16-byte chunk"))
        });
        ored == 0 && words.remainder().iter().all(|&b| b == 0)
    })
}

/// Gives the file system back the space of `[offset, offset + len)` of
/// `file`; the range then reads as zeros and the file keeps its size.
pub fn punch_hole(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate(2) takes no pointers; the descriptor is borrowed
    // from a live File for the duration of the call.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes sure `[offset, offset + len)` of `file` exists (allocated, reading
/// as zeros where it was a hole), extending the file if needed. Never
/// shrinks it, so it is safe while other threads write past its end.
pub fn allocate(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate(2) takes no pointers; the descriptor is borrowed
    // from a live File for the duration of the call.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            0,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The size of `file` in bytes: its length, or for a block device (an LVM
/// volume, a partition, a loop device), whose length stat(2) gives as 0,
/// its capacity (the end `lseek` finds; the file's offset is put back).
pub fn file_size(file: &std::fs::File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut f = file;
        let at = f.stream_position()?;
        let end = f.seek(SeekFrom::End(0))?;
        f.seek(SeekFrom::Start(at))?;
        Ok(end)
    } else {
        Ok(meta.len())
    }
}

/// The holes of `file` in `[offset, end)`, in order: ranges its file
/// system holds no data for, which read as zeros (`SEEK_DATA` and
/// `SEEK_HOLE`, lseek(2)). A file system that cannot tell reports none.
/// Moves the file's offset, which positioned reads and the rings ignore.
pub fn holes(file: &std::fs::File, offset: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    // Where the next data (or hole) starts at or after `pos`; None if
    // there is none (ENXIO: no data up to the file's end, or `pos` at or
    // past it).
    let seek = |pos: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek(2) takes no pointers; the descriptor is borrowed
        // from a live File for the duration of the call.
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = seek(pos, libc::SEEK_DATA)?.unwrap_or(u64::MAX);
        if data > pos {
            out.push((pos, data.min(end)));
        }
        if data >= end {
            break;
        }
        pos = seek(data, libc::SEEK_HOLE)?.unwrap_or(u64::MAX);
    }
    Ok(out)
}

/// A file registered with the I/O layer, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId(pub u32);

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read `len` bytes at `offset` into `buf[buf_off..]`.
    Read,
    /// Write `buf[buf_off..buf_off+len]` at `offset`.
    Write,
    /// fdatasync the file.
    Fsync,
    /// Read 8 bytes from an eventfd (the reactor's wake-up).
    WakeRead,
    /// Receive up to `len` bytes from socket `fd` into `buf[buf_off..]`.
    Recv,
    /// Send `buf[buf_off..buf_off+len]` on socket `fd`, or with `iov` the
    /// pieces one after another (never raising SIGPIPE).
    Send,
}

/// One operation, owned by the I/O layer until its completion is reaped.
#[derive(Debug)]
pub struct Op {
    pub kind: OpKind,
    pub file: FileId,
    pub offset: u64,
    pub len: u32,
    pub buf: Option<Arc<IoBuf>>,
    pub buf_off: usize,
    /// The socket of `Recv` and `Send` (not registered); -1 otherwise.
    pub fd: i32,
    /// A vectored `Read`, `Write` or `Send`: these (buffer, offset, length)
    /// pieces in order, instead of `buf` (which is then `None`).
    pub iov: Vec<(Arc<IoBuf>, usize, usize)>,
}

impl Op {
    pub fn read(file: FileId, offset: u64, buf: Arc<IoBuf>, buf_off: usize, len: usize) -> Op {
        assert!(
            buf_off + len <= buf.len(),
            "read past the end of its buffer"
        );
        Op {
            kind: OpKind::Read,
            file,
            offset,
            len: u32::try_from(len).expect("I/O larger than 4 GiB"),
            buf: Some(buf),
            buf_off,
            fd: -1,
            iov: Vec::new(),
        }
    }

    pub fn write(file: FileId, offset: u64, buf: Arc<IoBuf>, buf_off: usize, len: usize) -> Op {
        assert!(
            buf_off + len <= buf.len(),
            "write past the end of its buffer"
        );
        Op {
            kind: OpKind::Write,
            file,
            offset,
            len: u32::try_from(len).expect("I/O larger than 4 GiB"),
            buf: Some(buf),
            buf_off,
            fd: -1,
            iov: Vec::new(),
        }
    }

    pub fn fsync(file: FileId) -> Op {
        Op {
            kind: OpKind::Fsync,
            file,
            offset: 0,
            len: 0,
            buf: None,
            buf_off: 0,
            fd: -1,
            iov: Vec::new(),
        }
    }

    /// A vectored read or write of `kind` at `offset`: the pieces of `iov`
    /// (buffer, offset in it, length) one after another in the file.
    pub fn vectored(
        kind: OpKind,
        file: FileId,
        offset: u64,
        iov: Vec<(Arc<IoBuf>, usize, usize)>,
    ) -> Op {
        assert!(
            matches!(kind, OpKind::Read | OpKind::Write),
            "only reads and writes of files are vectored"
        );
        let mut len = 0usize;
        for (b, off, l) in &iov {
            assert!(
                off + l <= b.len(),
                "vectored I/O past the end of its buffer"
            );
            len += l;
        }
        Op {
            kind,
            file,
            offset,
            len: u32::try_from(len).expect("I/O larger than 4 GiB"),
            buf: None,
            buf_off: 0,
            fd: -1,
            iov,
        }
    }

    /// Receives into `buf[buf_off..buf_off+len]` from socket `fd`.
    pub fn recv(fd: i32, buf: Arc<IoBuf>, buf_off: usize, len: usize) -> Op {
        assert!(
            buf_off + len <= buf.len(),
            "recv past the end of its buffer"
        );
        Op {
            kind: OpKind::Recv,
            file: FileId(u32::MAX),
            offset: 0,
            len: u32::try_from(len).expect("I/O larger than 4 GiB"),
            buf: Some(buf),
            buf_off,
            fd,
            iov: Vec::new(),
        }
    }

    /// Sends `buf[buf_off..buf_off+len]` on socket `fd`.
    pub fn send(fd: i32, buf: Arc<IoBuf>, buf_off: usize, len: usize) -> Op {
        assert!(
            buf_off + len <= buf.len(),
            "send past the end of its buffer"
        );
        Op {
            kind: OpKind::Send,
            fd,
            ..Op::recv(fd, buf, buf_off, len)
        }
    }

    /// Sends the pieces of `iov` (buffer, offset in it, length), one after
    /// another, on socket `fd`: one system call, no copy into one buffer.
    pub fn send_vectored(fd: i32, iov: Vec<(Arc<IoBuf>, usize, usize)>) -> Op {
        let mut op = Op::vectored(OpKind::Write, FileId(u32::MAX), 0, iov);
        op.kind = OpKind::Send;
        op.fd = fd;
        op
    }
}

/// A completion: the caller's token, the kernel's result (bytes or -errno),
/// and the buffer handed back.
#[derive(Debug)]
pub struct Cqe {
    pub token: u64,
    pub result: i32,
    pub buf: Option<Arc<IoBuf>>,
}

/// The I/O layer a reactor drives. Single-threaded: one per core.
pub trait Io {
    /// Queues an operation; it is submitted by the next `submit_and_wait`.
    fn push(&mut self, token: u64, op: Op);
    /// Submits everything queued (one syscall) and waits for at least `want`
    /// completions. `want` is 0 for a non-blocking turn.
    fn submit_and_wait(&mut self, want: usize) -> std::io::Result<()>;
    /// Moves every available completion into `out`.
    fn reap(&mut self, out: &mut Vec<Cqe>);
    /// Whether completions wait to be reaped (no syscall).
    fn has_completions(&mut self) -> bool;
    /// Operations pushed and not yet reaped.
    fn in_flight(&self) -> usize;
}

/// Runs a read or write of `op` at once, with positioned system calls on
/// `fd`, moving at most `limit` bytes (a simulated short transfer). Returns
/// what the kernel would complete it with: bytes moved, or -errno. The
/// simulated I/O layer uses this; the real one goes through io_uring.
pub(crate) fn run_blocking(fd: std::os::fd::RawFd, op: &Op, limit: usize) -> i32 {
    let pieces: Vec<(&Arc<IoBuf>, usize, usize)> = match &op.buf {
        Some(b) => vec![(b, op.buf_off, op.len as usize)],
        None => op.iov.iter().map(|(b, o, l)| (b, *o, *l)).collect(),
    };
    let mut done = 0usize;
    for (buf, off, len) in pieces {
        let len = len.min(limit - done.min(limit));
        let mut at = 0usize;
        while at < len {
            let ptr = buf.raw_ptr().wrapping_add(off + at);
            let pos = (op.offset + (done + at) as u64) as libc::off_t;
            // SAFETY: `op` holds an `Arc` of `buf` for the whole call, and
            // `off + len <= buf.len()` was asserted when the op was built, so
            // the kernel reads or writes memory that stays allocated. As with
            // the ring, nobody reads a buffer before its operation completes.
            let r = unsafe {
                match op.kind {
                    OpKind::Read => libc::pread(fd, ptr.cast(), len - at, pos),
                    OpKind::Write => libc::pwrite(fd, ptr.cast(), len - at, pos),
                    _ => unreachable!("only reads and writes run blocking"),
                }
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return if done + at > 0 {
                    (done + at) as i32
                } else {
                    -e.raw_os_error().unwrap_or(libc::EIO)
                };
            }
            if r == 0 {
                // End of file: a short read.
                return (done + at) as i32;
            }
            at += r as usize;
        }
        done += len;
        if done >= limit {
            break;
        }
    }
    done as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// `holes` cuts the file system's holes to the range asked about: a
    /// range that starts or ends inside a hole, or inside data, or lies
    /// in one hole. The file: data at [64K, 128K) and [1M, 1M + 4K), 2 MiB.
    #[test]
    fn holes_are_cut_to_the_range_asked_about() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("sparse")).unwrap();
        f.set_len(2 << 20).unwrap();
        f.write_all_at(&[7u8; 65536], 65536).unwrap();
        f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        let (k, m) = (1024, 1 << 20);
        assert_eq!(
            holes(&f, 0, 2 * m).unwrap(),
            vec![(0, 64 * k), (128 * k, m), (m + 4 * k, 2 * m)],
            "the file system under {} keeps no holes where nothing was written",
            dir.path().display()
        );
        assert_eq!(holes(&f, 4096, 100 * k).unwrap(), vec![(4096, 64 * k)]);
        assert_eq!(
            holes(&f, 100 * k, 200 * k).unwrap(),
            vec![(128 * k, 200 * k)]
        );
        assert_eq!(
            holes(&f, 200 * k, 300 * k).unwrap(),
            vec![(200 * k, 300 * k)]
        );
        assert!(holes(&f, 64 * k, 128 * k).unwrap().is_empty());
        assert_eq!(
            holes(&f, m + 4 * k, 2 * m).unwrap(),
            vec![(m + 4 * k, 2 * m)]
        );
    }
}
