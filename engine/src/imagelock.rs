//! Image locking compatible with QEMU's, so that backfill and QEMU tools
//! never write one image at the same time.
//!
//! QEMU (block/file-posix.c) takes open-file-description (OFD) byte-range
//! locks on the image file: a shared lock on byte `100 + p` for each
//! permission `p` it holds, and on byte `200 + p` for each permission it
//! does not let others hold. Before taking them it tests the opposite bytes
//! for conflicts. We speak the same protocol: a writable open holds
//! "consistent read" and "write" and shares neither "write" nor "resize";
//! a read-only open holds "consistent read" and does not share "write", as
//! `qemu-img convert` does for its source. Then `qemu-img check` or
//! `qemu-io` refuse an image backfill is writing ("Failed to get ... lock"),
//! and backfill refuses one that QEMU is writing.
//!
//! The locks belong to the open file description, so they last exactly as
//! long as the `File` the caller keeps, and vanish if the process dies.

use crate::error::{Error, ErrorKind, Result};
use std::fs::File;
use std::os::fd::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;
const PERM_NAMES: [&str; 5] = [
    "consistent read",
    "write",
    "write unchanged",
    "resize",
    "change children",
];

fn fcntl_lock(
    file: &File,
    cmd: libc::c_int,
    ty: libc::c_int,
    byte: i64,
) -> std::io::Result<libc::flock> {
    // SAFETY: flock is a plain C struct for which all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: `fl` lives on this stack frame for the whole call; fcntl
    // only reads it (SETLK) or writes it back (GETLK) before returning.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl)
}

/// True if another open file description holds a lock on `byte`.
fn held_by_other(file: &File, byte: i64) -> std::io::Result<bool> {
    let fl = fcntl_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK, byte)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes QEMU-compatible locks on `file` for a writable or read-only open.
/// Fails with a clear error if another process (QEMU or backfill) holds a
/// conflicting permission.
pub fn lock_image(file: &File, path: &str, writable: bool) -> Result<()> {
    let held: &[i64] = if writable {
        &[PERM_CONSISTENT_READ, PERM_WRITE]
    } else {
        &[PERM_CONSISTENT_READ]
    };
    let unshared: &[i64] = if writable {
        &[PERM_WRITE, PERM_RESIZE]
    } else {
        &[PERM_WRITE]
    };
    let io = |e: std::io::Error| Error::io(e, format!("{path}: locking the image"));
    // Someone who does not share a permission we need, or who holds one we
    // do not share, is a conflict.
    for &p in held {
        if held_by_other(file, SHARED_BASE + p).map_err(io)? {
            return Err(conflict(path, p));
        }
    }
    for &p in unshared {
        if held_by_other(file, PERM_BASE + p).map_err(io)? {
            return Err(conflict(path, p));
        }
    }
    for &p in held {
        fcntl_lock(file, libc::F_OFD_SETLK, libc::F_RDLCK, PERM_BASE + p).map_err(io)?;
    }
    for &p in unshared {
        fcntl_lock(file, libc::F_OFD_SETLK, libc::F_RDLCK, SHARED_BASE + p).map_err(io)?;
    }
    Ok(())
}

/// Drops every lock `lock_image` took on `file` (the file stays open).
pub fn unlock_image(file: &File) {
    // SAFETY: flock is a plain C struct for which all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_UNLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = PERM_BASE;
    fl.l_len = SHARED_BASE + PERM_NAMES.len() as i64 - PERM_BASE;
    // SAFETY: `fl` lives on this stack frame for the whole call. An error
    // leaves the locks to go with the file when it closes.
    let _ = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
}

/// Refuses to write a qcow2 image on a block device (an LVM volume, a
/// partition): backfill takes new clusters from past the end of the
/// image's file, where a file reads as zeros and a device reads as
/// whatever it held before. Reading one is fine.
pub fn refuse_block_device(meta: &std::fs::Metadata, path: &str) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_block_device() {
        return Ok(());
    }
    Err(Error::unsupported(format!(
        "{path} is a block device: backfill writes qcow2 images in files only (it can read one \
         on a device: open it read-only, e.g. serve --read-only, or copy it to a file with \
         qemu-img convert -O qcow2)"
    )))
}

/// An image file holding the locks of [`lock_image`], which it drops
/// explicitly when it goes away (or hands the file to an owner that does,
/// see [`LockedFile::into_file`]).
///
/// Closing the descriptor is not enough: a child that another thread of
/// this process forks holds a copy of every descriptor until it execs, and
/// with it the locks, so a reopen in that window (the next step of a
/// resize, a test's next open) would find the image locked by itself.
pub struct LockedFile(Option<File>);

impl LockedFile {
    /// Takes the locks on `file` (see [`lock_image`]). Every writer of an
    /// image opens it here, so this is also where one on a block device is
    /// refused for writing (see [`refuse_block_device`]).
    pub fn lock(file: File, path: &str, writable: bool) -> Result<LockedFile> {
        if writable {
            if let Ok(meta) = file.metadata() {
                refuse_block_device(&meta, path)?;
            }
        }
        if let Err(e) = lock_image(&file, path, writable) {
            unlock_image(&file);
            return Err(e);
        }
        Ok(LockedFile(Some(file)))
    }

    /// The file, still locked, for an owner that calls [`unlock_image`]
    /// when it is done with it (the overlay's `Meta`).
    pub fn into_file(mut self) -> File {
        self.0.take().expect("a locked file")
    }
}

impl std::ops::Deref for LockedFile {
    type Target = File;
    fn deref(&self) -> &File {
        self.0.as_ref().expect("a locked file")
    }
}

impl Drop for LockedFile {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            unlock_image(f);
        }
    }
}

fn conflict(path: &str, perm: i64) -> Error {
    Error::new(
        ErrorKind::Locked,
        format!(
            "{path}: failed to get \"{}\" lock: is another process (QEMU or backfill) using the image?",
            PERM_NAMES[perm as usize]
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let open = || OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let r1 = open();
        lock_image(&r1, "img", false).unwrap();
        let r2 = open();
        lock_image(&r2, "img", false).expect("two readers share the image");
        let w = open();
        let e = lock_image(&w, "img", true).expect_err("a writer must not join readers");
        assert!(e.to_string().contains("lock"), "{e}");
        drop((r1, r2));
        let w = open();
        lock_image(&w, "img", true).unwrap();
        let r3 = open();
        assert!(
            lock_image(&r3, "img", false).is_err(),
            "a reader must not join a writer"
        );
        drop(w);
        lock_image(&open(), "img", true).expect("the locks went with the file");
    }
}
