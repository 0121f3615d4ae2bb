//! Aligned I/O buffers.
//!
//! An [`IoBuf`] is a heap allocation aligned for O_DIRECT (4 KiB). The ring
//! reads into and writes from it through a raw pointer, so it is shared with
//! in-flight operations as an `Arc<IoBuf>`: an operation holds a clone until
//! its completion is reaped, which keeps the memory alive for the kernel.
//! Mutable access goes through `Arc::get_mut` in [`IoBuf::unique_mut`],
//! which succeeds only when no operation holds the buffer any more — the
//! ownership proof that the kernel is done with it.
//!
//! A buffer whose contents are final can be *lent* to another thread (an
//! `Arc` clone in a finished read, which an NBD connection on another core
//! sends from): nothing writes a buffer that anyone else holds, since every
//! write goes through `&mut` (which needs the only `Arc`), a fresh buffer's
//! first operation, or `IoBuf::copy_in` into a range in flight.
//!
//! A buffer can also wrap a `Vec<u8>` the caller already has
//! ([`IoBuf::from_vec`]), so that a socket send goes out of that memory
//! without a copy. Such a buffer is not aligned: it is for sockets only,
//! never for an O_DIRECT file.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every I/O buffer: enough for O_DIRECT on 512- and 4096-byte devices.
pub const IO_ALIGN: usize = 4096;

pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// `Some(capacity)`: the memory is a `Vec<u8>`'s (see `from_vec`).
    vec_cap: Option<usize>,
}

// SAFETY: an `IoBuf` owns its allocation as a `Vec<u8>` does (it frees it
// on drop, from any thread, with the global allocator), and holds no
// thread-bound state, so moving it to another thread is sound.
unsafe impl Send for IoBuf {}
// SAFETY: `&IoBuf` gives only reads (`as_slice`) in safe code; writes need
// `&mut IoBuf` or the `unsafe` contracts of `raw_ptr` and `copy_in` (the
// range belongs to one operation in flight and nobody else reads it until
// its completion), and a buffer is shared with another thread only after
// its last such write completed (see the module doc).
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed buffer of `len` bytes (rounded up to the alignment for the allocation).
    pub fn zeroed(len: usize) -> IoBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (at least IO_ALIGN) and a
        // power-of-two alignment; a null return is handled below.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        IoBuf {
            ptr,
            len,
            vec_cap: None,
        }
    }

    /// Wraps `v` without copying it: its bytes, not aligned (for socket
    /// sends). [`IoBuf::into_vec`] gives it back.
    pub fn from_vec(v: Vec<u8>) -> IoBuf {
        let mut v = std::mem::ManuallyDrop::new(v);
        IoBuf {
            ptr: NonNull::new(v.as_mut_ptr()).expect("a Vec's pointer is never null"),
            len: v.len(),
            vec_cap: Some(v.capacity()),
        }
    }

    /// The `Vec` a buffer made by [`IoBuf::from_vec`] wraps; `None` for an
    /// aligned buffer (which is then freed).
    pub fn into_vec(self) -> Option<Vec<u8>> {
        let cap = self.vec_cap?;
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: ptr, len and capacity are those of the Vec that
        // `from_vec` took apart, and `this` is never dropped, so the memory
        // has exactly one owner again.
        Some(unsafe { Vec::from_raw_parts(this.ptr.as_ptr(), this.len, cap) })
    }

    fn layout(len: usize) -> Layout {
        let size = len.max(1).next_multiple_of(IO_ALIGN);
        Layout::from_size_align(size, IO_ALIGN).expect("I/O buffer size overflows")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer's bytes. Callers must not read while a ring READ into this
    /// buffer is in flight (the state machines read only after completion).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the lifetime of self; the
        // allocation is initialised (zeroed at creation, or a Vec's first `len`
        // bytes).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Mutable bytes, for a buffer no in-flight operation holds.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` means no other Rust reference
        // exists; an operation would hold an `Arc` clone, which rules out `&mut`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Mutable access through an `Arc`, only when no operation still holds it.
    pub fn unique_mut(this: &mut std::sync::Arc<IoBuf>) -> &mut [u8] {
        std::sync::Arc::get_mut(this)
            .expect("I/O buffer still held by an in-flight operation")
            .as_mut_slice()
    }

    /// Copies `data` to `[at, at + data.len())`, as a ring READ into that
    /// range would (remote backing reads land this way).
    ///
    /// # Safety
    ///
    /// The same contract as a READ the kernel performs through [`raw_ptr`]:
    /// the range belongs to one operation in flight on this thread, and
    /// nobody reads or writes it (through `as_slice` or another operation)
    /// until that operation's completion is handled.
    ///
    /// [`raw_ptr`]: IoBuf::raw_ptr
    pub(crate) unsafe fn copy_in(&self, at: usize, data: &[u8]) {
        assert!(
            at.checked_add(data.len())
                .is_some_and(|end| end <= self.len),
            "copy past the end of an I/O buffer"
        );
        // SAFETY: the range lies inside the allocation (asserted above) and
        // `data` cannot overlap it (it is a distinct, borrowed allocation);
        // exclusive use of the range is the caller's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(at), data.len());
        }
    }

    /// Reads exactly `len` bytes from `src` into `[at, at + len)`, or
    /// fills that range with `byte` when `src` is None: a remote medium's
    /// thread writing a read's bytes in place.
    ///
    /// # Safety
    ///
    /// The contract of [`IoBuf::copy_in`]: the range belongs to one read in
    /// flight, written by one thread, and nobody reads or writes it until
    /// that read's completion is handled.
    pub(crate) unsafe fn write_range(
        &self,
        at: usize,
        len: usize,
        src: Option<&mut dyn std::io::Read>,
        byte: u8,
    ) -> std::io::Result<()> {
        assert!(
            at.checked_add(len).is_some_and(|end| end <= self.len),
            "range past the end of an I/O buffer"
        );
        // SAFETY: the range lies inside the allocation (asserted above);
        // exclusive use of it is the caller's contract, so no other
        // reference to these bytes exists while this one lives (it does
        // not outlive this call).
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(at), len) };
        match src {
            Some(r) => r.read_exact(dst),
            None => {
                dst.fill(byte);
                Ok(())
            }
        }
    }

    /// A buffer of `len` bytes of `byte` (for tests).
    #[cfg(test)]
    pub(crate) fn filled(len: usize, byte: u8) -> std::sync::Arc<IoBuf> {
        let mut b = IoBuf::zeroed(len);
        b.as_mut_slice().fill(byte);
        std::sync::Arc::new(b)
    }

    /// Raw pointer for the kernel. The caller keeps an `Arc` clone alive until
    /// the operation's completion is reaped.
    pub(crate) fn raw_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

/// Byte vectors kept for reuse once their contents were consumed, so that
/// the next buffer needs neither an allocation nor zeroing (its user
/// overwrites every byte). Bounded by `max_bytes` of capacity.
pub struct Spares {
    bufs: Vec<Vec<u8>>,
    max_bytes: usize,
}

impl Spares {
    pub fn new(max_bytes: usize) -> Spares {
        Spares {
            bufs: Vec::new(),
            max_bytes,
        }
    }

    /// A vector of `len` bytes (contents unspecified).
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        let mut buf = match self.bufs.iter().position(|b| b.capacity() >= len) {
            Some(i) => self.bufs.swap_remove(i),
            None => return vec![0u8; len],
        };
        // Only bytes past the old length are zeroed.
        buf.resize(len, 0);
        buf
    }

    /// Keeps `buf` for a later `take`, if the bound allows.
    pub fn give(&mut self, buf: Vec<u8>) {
        let kept: usize = self.bufs.iter().map(Vec::capacity).sum();
        if buf.capacity() > 0 && kept + buf.capacity() <= self.max_bytes {
            self.bufs.push(buf);
        }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match self.vec_cap {
            // SAFETY: the parts of the Vec `from_vec` took apart; this is
            // its only owner.
            Some(cap) => drop(unsafe { Vec::from_raw_parts(self.ptr.as_ptr(), self.len, cap) }),
            // SAFETY: allocated in `zeroed` with the same layout.
            None => unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) },
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = IoBuf::zeroed(5000);
        assert_eq!(b.raw_ptr() as usize % IO_ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[4999] = 7;
        assert_eq!(b.as_slice()[4999], 7);
    }

    #[test]
    fn wraps_a_vec_and_gives_it_back() {
        let mut v = Vec::with_capacity(100);
        v.extend_from_slice(b"reply data");
        let ptr = v.as_ptr();
        let b = IoBuf::from_vec(v);
        assert_eq!(b.as_slice(), b"reply data");
        let v = b.into_vec().expect("made from a Vec");
        assert_eq!((v.as_ptr(), v.len(), v.capacity()), (ptr, 10, 100));
        assert!(IoBuf::zeroed(10).into_vec().is_none());
        drop(IoBuf::from_vec(vec![1, 2, 3]));
    }

    #[test]
    fn spares_are_reused_within_their_bound() {
        let mut s = Spares::new(10);
        let mut v = s.take(8);
        v.fill(7);
        let ptr = v.as_ptr();
        s.give(v);
        let v = s.take(4);
        assert_eq!((v.as_ptr(), v.len()), (ptr, 4));
        s.give(v);
        // Past the bound: not kept.
        s.give(vec![0; 8]);
        let a = s.take(8);
        let b = s.take(8);
        assert_eq!(a.as_ptr(), ptr);
        assert_ne!(b.as_ptr(), ptr);
        assert_eq!(b, vec![0; 8]);
    }
}
