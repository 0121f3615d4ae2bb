//! The NBD server frontend: serves a [`Disk`] to QEMU, `qemu-img`,
//! `nbdcopy`, fio or the kernel's NBD client (`doc/proto.md` in
//! NetworkBlockDevice/nbd).
//!
//! One listener, any number of connections to one export (multi-conn: a
//! FLUSH on one connection flushes the whole disk, so it covers writes
//! completed on every connection). The accept loop runs on the caller's
//! thread and each handshake on a short-lived thread of its own (with a
//! timeout); then the connection moves to a reactor core, round robin, and
//! is served on that core's io_uring (see [`ring`]), replies going out as
//! each request completes. A connection's memory is bounded by its budget,
//! and a connection that misbehaves is answered with an error or dropped
//! without touching the others.
//!
//! [`Server::run`] returns after [`StopHandle::stop`]: no new connections,
//! requests in flight finish and are answered, then connections close. The
//! caller then closes the disk (flush, clean).

mod conn;
pub mod handshake;
pub mod proto;
mod ring;

use crate::error::{Error, Result};
use crate::Disk;
use handshake::{Export, Outcome};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 256;
/// A client has this long to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// On stop, connections get this long to take their last replies before
/// they are cut.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What to export, and how.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Export name ("" is the default export; it always works too).
    pub export: String,
    /// Shown to clients that ask (NBD_INFO_DESCRIPTION, LIST).
    pub description: String,
    /// Refuse writes with EPERM and advertise the export read-only.
    pub read_only: bool,
}

/// A bound listening socket.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Listens on a Unix socket at `path`, replacing a stale socket there.
    pub fn unix(path: &Path) -> Result<Listener> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let l = UnixListener::bind(path)
            .map_err(|e| Error::io(e, format!("listening on {}", path.display())))?;
        Ok(Listener::Unix(l, path.to_path_buf()))
    }

    /// Listens on TCP `addr` (port 0 picks a free port).
    pub fn tcp(addr: &str) -> Result<Listener> {
        let l =
            TcpListener::bind(addr).map_err(|e| Error::io(e, format!("listening on {addr}")))?;
        Ok(Listener::Tcp(l))
    }

    /// The NBD URI clients use to reach `export` here.
    pub fn uri(&self, export: &str) -> String {
        match self {
            Listener::Unix(_, p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(SocketAddr::V6(a)) => format!("nbd://[{}]:{}/{export}", a.ip(), a.port()),
                Ok(a) => format!("nbd://{a}/{export}"),
                Err(_) => "nbd://?".to_string(),
            },
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }

    /// Connects to this listener (to wake a blocked accept).
    fn poke(&self) {
        match self {
            Listener::Unix(_, p) => drop(UnixStream::connect(p)),
            Listener::Tcp(l) => {
                if let Ok(a) = l.local_addr() {
                    drop(TcpStream::connect(a));
                }
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A connected client socket.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Live connections, for shutdown: a clone of each socket by id.
pub(crate) struct Registry {
    conns: Mutex<HashMap<u64, Stream>>,
    gone: Condvar,
}

impl Registry {
    /// A connection closed.
    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.gone.notify_all();
    }
}

/// A connection's entry in the [`Registry`], removed (and the registry's
/// clone of its socket closed) when this is dropped, however the
/// connection ends: closed by its core, dropped with a core that failed, or
/// never adopted because the core was gone. Without it such a client would
/// wait forever on a socket the registry kept open, and the server's
/// shutdown would wait for it.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

struct Inner {
    disk: Disk,
    export: Arc<Export>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    registry: Arc<Registry>,
}

/// Serves one disk over NBD.
pub struct Server {
    inner: Arc<Inner>,
    listener: Arc<Listener>,
}

/// Stops a running [`Server`] from another thread (e.g. a signal handler
/// thread).
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<Inner>,
    listener: Arc<Listener>,
}

impl StopHandle {
    /// Stops accepting and makes [`Server::run`] wind down and return.
    pub fn stop(&self) {
        if !self.inner.stopping.swap(true, Ordering::SeqCst) {
            self.listener.poke();
        }
    }
}

impl Server {
    pub fn new(disk: Disk, listener: Listener, cfg: Config) -> Server {
        let export = Export {
            name: cfg.export,
            description: cfg.description,
            size: disk.size(),
            read_only: cfg.read_only,
        };
        Server {
            inner: Arc::new(Inner {
                disk,
                export: Arc::new(export),
                stopping: AtomicBool::new(false),
                next_id: AtomicU64::new(0),
                registry: Arc::new(Registry {
                    conns: Mutex::new(HashMap::new()),
                    gone: Condvar::new(),
                }),
            }),
            listener: Arc::new(listener),
        }
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            inner: self.inner.clone(),
            listener: self.listener.clone(),
        }
    }

    /// Accepts and serves connections until stopped; then lets requests in
    /// flight finish, closes every connection, and returns once its
    /// handshake threads have ended.
    pub fn run(&self) -> Result<()> {
        let inner = &self.inner;
        // The handshake threads, joined before run returns (finished ones
        // are let go as new ones start).
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        while !inner.stopping.load(Ordering::SeqCst) {
            let stream = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors and the like: say so, keep serving
                    // the connections there are.
                    eprintln!("backfill serve: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if inner.stopping.load(Ordering::SeqCst) {
                break;
            }
            let Ok(clone) = stream.try_clone() else {
                continue;
            };
            let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            {
                let mut conns = inner
                    .registry
                    .conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if conns.len() >= MAX_CONNECTIONS {
                    eprintln!(
                        "backfill serve: {MAX_CONNECTIONS} connections already; refusing one"
                    );
                    continue;
                }
                conns.insert(id, clone);
            }
            let registration = Registration {
                registry: inner.registry.clone(),
                id,
            };
            let inner2 = inner.clone();
            // A failed spawn drops the closure, and the registration in it.
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || handshake_and_adopt(&inner2, stream, registration));
            if let Ok(t) = spawned {
                threads.retain(|t| !t.is_finished());
                threads.push(t);
            }
        }
        self.drain();
        // Every connection is gone from the registry; a handshake thread
        // may still be on its way out, holding a handle on the disk.
        for t in threads {
            let _ = t.join();
        }
        Ok(())
    }

    /// Stops reading new requests on every connection, waits for what is in
    /// flight to be answered, and cuts connections whose clients do not take
    /// their replies.
    fn drain(&self) {
        let reg = &self.inner.registry;
        let mut conns = reg.conns.lock().unwrap_or_else(|p| p.into_inner());
        for s in conns.values() {
            s.shutdown(Shutdown::Read);
        }
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        while !conns.is_empty() {
            let now = std::time::Instant::now();
            if now >= deadline {
                for s in conns.values() {
                    s.shutdown(Shutdown::Both);
                }
                conns = reg.gone.wait(conns).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            conns = reg
                .gone
                .wait_timeout(conns, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Runs the handshake of a connection, then hands it to a core (with its
/// registration, dropped here when the connection ends here).
fn handshake_and_adopt(inner: &Arc<Inner>, mut stream: Stream, registration: Registration) {
    if stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).is_err() {
        return;
    }
    let stopping = || inner.stopping.load(Ordering::SeqCst);
    let neg = match handshake::negotiate(&mut stream, &inner.export, &stopping) {
        Ok(Outcome::Transmission(neg)) => neg,
        Ok(Outcome::Closed) => return,
        Err(e) => {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                eprintln!("backfill serve: dropped a client during the handshake: {e}");
            }
            return;
        }
    };
    if stream.set_read_timeout(None).is_err() {
        return;
    }
    let disk = inner.disk.clone();
    let export = inner.export.clone();
    let make = move |sink| conn::Session {
        disk,
        export,
        neg,
        sink,
    };
    let core = registration.id as usize % inner.disk.cores();
    ring::adopt(stream, registration, make, &inner.disk, core);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However a connection ends, dropping its registration takes it out of
    /// the registry and closes the registry's clone of its socket, so the
    /// client sees the end instead of waiting, and a shutdown's drain does
    /// not wait for it.
    #[test]
    fn a_dropped_registration_leaves_the_registry_and_closes_the_socket() {
        let (ours, mut client) = UnixStream::pair().expect("socketpair");
        let registry = Arc::new(Registry {
            conns: Mutex::new(HashMap::new()),
            gone: Condvar::new(),
        });
        let clone = ours.try_clone().expect("clone");
        registry
            .conns
            .lock()
            .unwrap()
            .insert(7, Stream::Unix(clone));
        let registration = Registration {
            registry: registry.clone(),
            id: 7,
        };
        // The connection's own socket goes (a dropped task or connection).
        drop(ours);
        client.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let open = client
            .read(&mut byte)
            .expect_err("the registry keeps it open");
        assert_eq!(open.kind(), io::ErrorKind::WouldBlock);

        drop(registration);
        assert!(registry.conns.lock().unwrap().is_empty());
        assert_eq!(client.read(&mut byte).expect("end of stream"), 0);
    }
}
