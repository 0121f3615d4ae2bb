//! Errors: a small kind to match on, plus context for people.
//!
//! Every error that leaves the engine carries an [`ErrorKind`] (what a caller
//! can act on) and a human message naming the image, offset and operation.
//! Programmer errors are assertions, not `Err`s.

use std::fmt;
use std::io;

/// What went wrong, coarse enough to match on (and to map to NBD errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The operating system refused an I/O (EIO, ENOSPC, ...). `errno` is kept.
    Io,
    /// The image is malformed: a table points outside the file, a field overflows.
    Corrupt,
    /// The image uses a feature this build does not handle (yet).
    Unsupported,
    /// A request reaches past the end of the disk, or is otherwise invalid.
    OutOfBounds,
    /// A request argument is invalid (e.g. an option out of range).
    InvalidInput,
    /// The backing image could not be opened or read.
    BackingUnavailable,
    /// The remote backing image changed since the overlay first used it
    /// (another ETag, Last-Modified or size): what it serves now cannot be
    /// mixed with what the overlay holds. Unlike an outage it does not
    /// pass: reads that need the backing keep failing until the original
    /// is back, or the overlay is rebased onto the new image.
    BackingChanged,
    /// The disk is read-only.
    ReadOnly,
    /// Another process (QEMU or backfill) holds a conflicting image lock.
    Locked,
    /// The disk is closing or closed; the request was not started.
    ShuttingDown,
    /// An earlier metadata write failed; the image accepts no further writes.
    Poisoned,
}

/// An engine error: a kind plus context.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    errno: Option<i32>,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            errno: None,
            message: message.into(),
        }
    }

    /// An I/O error from a raw errno (as io_uring reports it), with context.
    pub fn from_errno(errno: i32, context: impl fmt::Display) -> Error {
        let os = io::Error::from_raw_os_error(errno);
        Error {
            kind: ErrorKind::Io,
            errno: Some(errno),
            message: format!("{context}: {os}"),
        }
    }

    /// An `io::Error` with context; keeps the errno when there is one.
    pub fn io(err: io::Error, context: impl fmt::Display) -> Error {
        Error {
            kind: ErrorKind::Io,
            errno: err.raw_os_error(),
            message: format!("{context}: {err}"),
        }
    }

    /// A request on a disk that is closed (or closing).
    pub(crate) fn closed() -> Error {
        Error::new(ErrorKind::ShuttingDown, "the disk is closed")
    }

    pub fn corrupt(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Corrupt, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unsupported, message)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The OS error number, when the error came from the OS.
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same error with more context in front ("opening X: ...").
    pub fn context(mut self, context: impl fmt::Display) -> Error {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The errno an NBD server (or any POSIX-ish caller) should report.
    pub fn to_errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io | ErrorKind::BackingUnavailable => self.errno.unwrap_or(libc::EIO),
            ErrorKind::Corrupt | ErrorKind::Poisoned | ErrorKind::BackingChanged => libc::EIO,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::OutOfBounds | ErrorKind::InvalidInput => libc::EINVAL,
            ErrorKind::ReadOnly => libc::EPERM,
            ErrorKind::Locked => libc::EBUSY,
            ErrorKind::ShuttingDown => libc::ESHUTDOWN,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::other(e.to_string())
    }
}
