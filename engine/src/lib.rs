//! backfill: a thread-per-core io_uring copy-on-read engine over qcow2 overlays.
//!
//! A [`Disk`] is a qcow2 overlay on top of a backing image. With copy-on-read
//! (on by default), a read of data the overlay does not hold yet fetches it
//! from the backing image, answers the caller, and writes it back into the
//! overlay so it is never fetched again. See `DESIGN.md` in the shared
//! folder for the architecture and invariants.
//!
//! ```no_run
//! let disk = backfill::Disk::open("disk.qcow2", backfill::Options::default())?;
//! let mut buf = vec![0u8; 4096];
//! disk.read_at(&mut buf, 0)?;
//! disk.close()?;
//! # Ok::<(), backfill::Error>(())
//! ```

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backing;
pub mod disk;
pub mod error;
mod imagelock;
pub mod io;
pub mod locks;
pub mod meta;
pub mod nbd;
pub mod qcow2;
mod reactor;
pub mod resize;
pub mod router;
pub mod testing;
pub mod tools;

pub use disk::{BlockStatus, CacheMode, Completion, Disk, ExtentKind, Options, SparseRead, Stats};
pub use error::{Error, ErrorKind, Result};
pub use qcow2::check::{check, CheckReport};
pub use qcow2::create::{create, Compat, CreateOptions};
pub use qcow2::info::{info, ImageInfo};
pub use resize::{resize, ResizeReport};
