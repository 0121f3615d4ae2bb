//! The seam between the reactors and a remote backing medium (an NBD
//! export today; an HTTP range client plugs in the same way).
//!
//! What it owns: the [`Medium`] trait and the request/completion types that
//! cross it. A medium is a byte array of a fixed size that answers ranged
//! reads asynchronously, on threads of its own: a reactor thread hands it a
//! [`RemoteRead`] and never waits; the medium later calls the read's
//! [`Reply`] from one of its threads, which posts the result to the owning
//! core's inbox and wakes it (see `reactor::remote`).
//!
//! What a medium never does: block the caller of [`Medium::submit`], call a
//! reply twice or never (every submitted read is answered exactly once,
//! with data or with a clear error, also when the medium shuts down), or
//! return fewer bytes than asked for as success.
//!
//! To add a medium (e.g. HTTP range GETs): implement [`Medium`] (its name is
//! the URI the overlay's header names, its size is fixed when it opens,
//! `max_read` bounds one request), and teach `Chain::open_confined` its URI
//! scheme. Nothing else in the engine changes.

use crate::error::Result;
use crate::io::IoBuf;
use std::sync::Arc;

/// A remote, read-only backing image.
pub trait Medium: Send + Sync {
    /// The name the overlay's header uses for it (its URI).
    fn name(&self) -> &str;
    /// Virtual size in bytes, fixed for the medium's lifetime.
    fn size(&self) -> u64;
    /// The largest read one [`RemoteRead`] may ask for; callers split
    /// larger ranges. A multiple of [`Medium::alignment`].
    fn max_read(&self) -> usize;
    /// Reads must start at a multiple of this and end at one (or at the
    /// medium's end); callers widen theirs. A power of two.
    fn alignment(&self) -> usize {
        1
    }
    /// Queues a read. Never blocks; `read.len <= self.max_read()`, the
    /// range is aligned and lies inside `[0, size)`.
    fn submit(&self, read: RemoteRead);
    /// What identifies the version of the image this medium serves, for
    /// the overlay to pin (see `qcow2::pin`); None where the medium has no
    /// such thing (NBD).
    fn pin(&self) -> Option<crate::qcow2::pin::Pin> {
        None
    }
    /// Takes back the buffer of a completed read once its bytes were
    /// copied out, for a later read; by default it is dropped.
    fn recycle(&self, _buf: Vec<u8>) {}
    /// Whether this medium writes a read's bytes straight into its
    /// [`RemoteRead::dest`] (and answers with an empty buffer) instead of
    /// returning them.
    fn places(&self) -> bool {
        false
    }
    /// Asks the medium which bytes of `[offset, offset + len)` (which may
    /// reach past its end: the rest is ignored) read as zeros (an NBD
    /// server's block status), and remembers them for
    /// [`Medium::zeros_at`]; returns how many it found. May block, so only
    /// a thread that can wait calls it (the stream's driver), never a core.
    /// A medium that cannot tell (HTTP) finds none.
    fn learn_zeros(&self, _offset: u64, _len: u64) -> u64 {
        0
    }
    /// Whether the bytes from `offset` are zeros by what
    /// [`Medium::learn_zeros`] found (the chain then reads them as zeros
    /// without a fetch) or not known to be, and for how many bytes (at
    /// most `max`, more than 0) that holds. Never blocks.
    fn zeros_at(&self, _offset: u64, max: u64) -> (bool, u64) {
        (false, max)
    }
    /// Why [`Medium::learn_zeros`] found nothing last time on a medium that
    /// could tell (an NBD server without block status, or whose query
    /// failed); None while it can, and for media that never can.
    fn zeros_unknown(&self) -> Option<String> {
        None
    }
}

/// Bytes `[at, at + len)` of a read, to be written straight into
/// `buf[buf_off..buf_off + len]`, a core's I/O buffer (see
/// [`Medium::places`]). The `Arc` keeps the memory alive whatever the core
/// does meanwhile.
pub struct Placement {
    pub at: usize,
    pub buf: Arc<IoBuf>,
    pub buf_off: usize,
    pub len: usize,
}

impl Placement {
    /// Writes the destination bytes `[from, from + n)` of this placement
    /// (`from` relative to its start): read from `src`, or zeros when
    /// `src` is None.
    ///
    /// # Safety
    ///
    /// Only the medium answering the read this placement belongs to may
    /// call it, before it completes the read, from one thread at a time:
    /// until that completion reaches the core, the range is this read's
    /// alone (the contract of [`IoBuf::copy_in`]).
    pub(crate) unsafe fn write(
        &self,
        from: usize,
        n: usize,
        src: Option<&mut dyn std::io::Read>,
    ) -> std::io::Result<()> {
        assert!(from + n <= self.len, "past the end of a placement");
        // SAFETY: the caller's contract above.
        unsafe { self.buf.write_range(self.buf_off + from, n, src, 0) }
    }
}

/// Reads bytes `[at, at + n)` of a read from `src` into the parts of
/// `dest` (in order, disjoint) they fall in; bytes outside the placements
/// (alignment padding) are read and dropped. A medium calls it for a whole
/// reply body, or for each data chunk of one.
///
/// # Safety
///
/// As [`Placement::write`], for every placement of `dest`.
pub(crate) unsafe fn place_range(
    src: &mut dyn std::io::Read,
    dest: &[Placement],
    at: usize,
    n: usize,
) -> std::io::Result<()> {
    let end = at + n;
    let mut pos = at;
    for d in dest {
        if d.at + d.len <= pos {
            continue;
        }
        if d.at >= end {
            break;
        }
        let (lo, hi) = (d.at.max(pos), (d.at + d.len).min(end));
        skip_bytes(src, lo - pos)?;
        // SAFETY: the caller's contract.
        unsafe { d.write(lo - d.at, hi - lo, Some(&mut *src)) }?;
        pos = hi;
    }
    skip_bytes(src, end - pos)
}

/// Reads and drops `n` bytes of `src`.
fn skip_bytes(src: &mut dyn std::io::Read, n: usize) -> std::io::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let got = std::io::copy(
        &mut std::io::Read::take(src, n as u64),
        &mut std::io::sink(),
    )?;
    if got < n as u64 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Bytes of read buffers a medium keeps for reuse at most.
pub const SPARE_BYTES: usize = 32 << 20;

/// A medium's spare read buffers, shared by its threads and the cores.
pub struct SharedSpares(std::sync::Mutex<crate::io::Spares>);

impl Default for SharedSpares {
    fn default() -> SharedSpares {
        SharedSpares(std::sync::Mutex::new(crate::io::Spares::new(SPARE_BYTES)))
    }
}

impl SharedSpares {
    /// A buffer of `len` bytes for a read (contents unspecified).
    pub fn take(&self, len: usize) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take(len)
    }

    pub fn give(&self, buf: Vec<u8>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).give(buf)
    }
}

/// One ranged read of a [`Medium`].
pub struct RemoteRead {
    pub offset: u64,
    pub len: usize,
    /// The submitter's name for this read, handed back with the result.
    pub tag: u64,
    /// Where the result goes.
    pub reply: Arc<dyn Reply>,
    /// For a medium that [places](Medium::places) its bytes: where they go,
    /// in order and disjoint. Bytes of the read outside them (alignment
    /// padding) are dropped.
    pub dest: Vec<Placement>,
}

impl RemoteRead {
    /// Answers the read: exactly `len` bytes (none once they were placed
    /// into `dest`), or an error for this read only.
    pub fn complete(mut self, result: Result<Vec<u8>>) {
        // Placed bytes come back as an empty buffer.
        debug_assert!(!matches!(&result,
            Ok(d) if d.len() != self.len && (self.dest.is_empty() || !d.is_empty())));
        // The placements' buffer references go first: once the core has the
        // answer, its buffers are its own again (it may write them).
        drop(std::mem::take(&mut self.dest));
        self.reply.done(self.tag, result);
    }
}

/// Receives the results of remote reads (called on the medium's threads).
pub trait Reply: Send + Sync {
    fn done(&self, tag: u64, result: Result<Vec<u8>>);
}

/// Collects the answers of [`read_blocking`]'s reads.
struct Collect(crossbeam_channel::Sender<(u64, Result<Vec<u8>>)>);

impl Reply for Collect {
    fn done(&self, tag: u64, result: Result<Vec<u8>>) {
        // The reader may have given up after an earlier error.
        let _ = self.0.send((tag, result));
    }
}

/// Reads the byte ranges `ranges` (offset, length; inside the medium) of
/// `medium` and waits for all of them, for a thread that may block (one
/// opening a chain), never a core. All reads are in flight at once, split
/// at [`Medium::max_read`] and widened to [`Medium::alignment`]; the first
/// error fails the call.
pub fn read_blocking(medium: &dyn Medium, ranges: &[(u64, usize)]) -> Result<Vec<Vec<u8>>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let reply: Arc<dyn Reply> = Arc::new(Collect(tx));
    let (a, max, size) = (
        medium.alignment() as u64,
        medium.max_read() as u64,
        medium.size(),
    );
    // Per read: (range index, medium offset of its first byte).
    let mut reads = Vec::new();
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        let end = offset + len as u64;
        debug_assert!(end <= size, "a blocking read past the medium's end");
        let mut at = offset - offset % a;
        while at < end {
            let hi = (at + max).min(end.next_multiple_of(a)).min(size);
            reads.push((i, at));
            medium.submit(RemoteRead {
                offset: at,
                len: (hi - at) as usize,
                tag: reads.len() as u64 - 1,
                reply: reply.clone(),
                dest: Vec::new(),
            });
            at = hi;
        }
    }
    drop(reply);
    let mut out: Vec<Vec<u8>> = ranges.iter().map(|&(_, len)| vec![0u8; len]).collect();
    for _ in 0..reads.len() {
        let (tag, result) = rx.recv().map_err(|_| {
            crate::error::Error::new(
                crate::error::ErrorKind::BackingUnavailable,
                format!("{}: a read was dropped unanswered", medium.name()),
            )
        })?;
        let data = result?;
        let (i, at) = reads[tag as usize];
        let (offset, len) = ranges[i];
        // The part of `[at, at + data.len())` inside the range.
        let lo = at.max(offset);
        let hi = (at + data.len() as u64).min(offset + len as u64);
        if lo < hi {
            out[i][(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&data[(lo - at) as usize..(hi - at) as usize]);
        }
    }
    Ok(out)
}
