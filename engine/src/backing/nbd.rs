//! A backing image on an NBD server: `nbd://HOST[:PORT]/EXPORT` or
//! `nbd+unix:///EXPORT?socket=PATH`, the names QEMU writes into a qcow2
//! header (`qemu-img create -b URI -F raw`), and QEMU's older
//! `nbd:unix:PATH[:exportname=NAME]` and `nbd:HOST:PORT[:exportname=NAME]`.
//!
//! What it owns: the URI syntax, the fixed-newstyle handshake (NBD_OPT_GO,
//! structured replies when the server offers them), and a small pool of
//! connections ([`CONNECTIONS`]) to one export. Each connection has a
//! manager thread (connect, handshake, send requests, reconnect with
//! exponential backoff) and, while connected, a reader thread that matches
//! replies to requests by cookie, and reads a reply's data straight into
//! the core buffers the read names ([`Medium::places`]), so the bytes are
//! copied once, by the kernel. A read submitted while no read is queued
//! goes out at once from the submitting thread, on a connection with room
//! whose socket takes the request without waiting; this saves a thread
//! wake-up per read (a third of the context switches of cold random
//! reads). Other reads wait in one shared queue, so a free connection's
//! thread takes the next one. Each connection has at most
//! [`IN_FLIGHT_PER_CONNECTION`] requests on the wire, which bounds the
//! backing's concurrency. Block status (`base:allocation`, which ranges
//! read as zeros, so that streaming need not fetch them) goes over the
//! same connections, as QEMU's client sends it: each asks for the context
//! in its handshake, and its reader thread answers status queries as it
//! answers reads (`status`). So a server that takes one client at a time
//! (qemu-nbd's default) answers them too.
//!
//! Error policy: a read the server answers with an NBD error fails (that
//! read only, with the server's errno and message). A read in flight on a
//! connection that drops is retried on another, or the reconnected, one, at
//! most [`MAX_ATTEMPTS`] times in all; so is a read the server answers with
//! ESHUTDOWN (it is going away, another server may come). Once no
//! connection could be made for [`GIVE_UP_AFTER`], queued reads fail
//! instead of waiting. Connection threads that failed to connect wait out
//! their backoff (up to 2 s), but a read submitted while no connection is
//! up wakes them: it is tried at once, so a server that came back is found
//! by the next read, not up to a backoff later (and, while the server is
//! still away after the give-up time, the read fails at once too).
//!
//! Dropping the client stops the pool: idle connections say goodbye
//! (NBD_CMD_DISC) and close; a quarter of [`DROP_WAIT`] later the sockets
//! of any still open are shut down, which wakes threads blocked on them;
//! the drop then waits for every thread, all within [`DROP_WAIT`]. When
//! the drop returns, no connection is open and no thread is left, except
//! one inside a TCP connect or handshake to a host that does not answer,
//! which is left to that step's own timeout.
//!
//! What it never does: write to the export, block the thread that submits
//! a read, read past the export's end, or hand out bytes a reply did not
//! cover (a malformed reply is an error, never zeros passed off as data).
//! The wire format is `doc/proto.md` in NetworkBlockDevice/nbd.

mod status;

use super::remote::{place_range, Medium, Placement, RemoteRead};
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::proto::*;
use crossbeam_channel::{select, Receiver, Sender, TryRecvError};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Connections per backing export.
pub const CONNECTIONS: usize = 4;
/// Requests on the wire per connection; the backing's whole cap is
/// `CONNECTIONS * IN_FLIGHT_PER_CONNECTION`.
pub const IN_FLIGHT_PER_CONNECTION: usize = 16;
/// Connections a read may be sent on before it fails (a connection that
/// drops with the read in flight costs one attempt).
pub const MAX_ATTEMPTS: u32 = 5;
/// How long connection attempts may keep failing (with no other
/// connection up) before queued reads fail instead of waiting on.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(5);
/// The default NBD port (IANA).
pub const DEFAULT_PORT: u16 = 10809;
/// The first reconnect delay; it doubles per failure up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bounds on a handshake (and a TCP connect) that stalls.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose oldest request has waited this long for its reply is
/// dropped (its reads go to another connection): a hung server becomes an
/// error after [`MAX_ATTEMPTS`] tries, never a read that waits forever.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a waiting reader looks at the age of its requests; also the
/// longest a reply may stall part way, or a request may wait to be sent.
const STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long dropping the client waits for its connection threads.
pub const DROP_WAIT: Duration = Duration::from_secs(1);
/// The largest read we ask for when the server names no maximum.
const DEFAULT_MAX_READ: u32 = 32 << 20;
/// The largest option reply or error chunk we accept.
const MAX_SMALL_PAYLOAD: u32 = 64 << 10;
/// The oldstyle greeting's second magic (a server that speaks only oldstyle).
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const REP_FLAG_ERROR: u32 = 1 << 31;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
}

/// Whether `name` uses one of the NBD URI schemes (supported or not), or
/// QEMU's older `nbd:` syntax, so that it is never mistaken for a file name
/// (QEMU takes `nbd:...` for its NBD driver too).
pub fn is_nbd_name(name: &str) -> bool {
    let scheme = name.split_once("://").map_or("", |(s, _)| s);
    matches!(
        scheme,
        "nbd" | "nbd+tcp" | "nbd+unix" | "nbds" | "nbds+tcp" | "nbds+unix" | "nbd+vsock"
    ) || legacy_spec(name).is_some()
}

/// What follows `nbd:` in QEMU's older syntax (a name without `://`).
fn legacy_spec(name: &str) -> Option<&str> {
    name.strip_prefix("nbd:").filter(|_| !name.contains("://"))
}

fn percent_decode(s: &str, what: &str, uri: &str) -> Result<String> {
    crate::backing::percent_decode(s).map_err(|why| bad_uri(uri, &format!("the {what}: {why}")))
}

fn bad_uri(uri: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!("backing file {uri:?} is not a valid NBD URI: {why}"),
    )
}

impl NbdUri {
    /// Parses `nbd://HOST[:PORT]/EXPORT`, `nbd+tcp://...` or
    /// `nbd+unix:///EXPORT?socket=PATH` (an empty export is allowed), or
    /// QEMU's older syntax (see [`NbdUri::parse_legacy`]).
    pub fn parse(uri: &str) -> Result<NbdUri> {
        if let Some(spec) = legacy_spec(uri) {
            return NbdUri::parse_legacy(uri, spec);
        }
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| bad_uri(uri, "no scheme"))?;
        let unix = match scheme {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+tcp" | "nbds+unix" => {
                return Err(Error::unsupported(format!(
                    "backing file {uri:?}: NBD over TLS is not supported"
                )))
            }
            _ => {
                return Err(Error::unsupported(format!(
                    "backing file {uri:?}: transport {scheme:?} is not supported (only nbd:// \
                     and nbd+unix://)"
                )))
            }
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path), "export name", uri)?;
        let mut socket = None;
        for kv in query.into_iter().flat_map(|q| q.split('&')) {
            match kv.split_once('=') {
                Some(("socket", v)) if unix => {
                    socket = Some(percent_decode(v, "socket path", uri)?);
                }
                _ => return Err(bad_uri(uri, &format!("unexpected query parameter {kv:?}"))),
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad_uri(uri, "nbd+unix:// takes no host"));
            }
            let socket = socket
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad_uri(uri, "nbd+unix:// needs ?socket=PATH"))?;
            Address::Unix(PathBuf::from(socket))
        } else {
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (h, p) = v6
                    .split_once(']')
                    .ok_or_else(|| bad_uri(uri, "unclosed '[' in the host"))?;
                (h, p.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                }
            };
            if host.is_empty() {
                return Err(bad_uri(uri, "no host"));
            }
            let port = match port {
                None | Some("") => DEFAULT_PORT,
                Some(p) => p
                    .parse()
                    .map_err(|_| bad_uri(uri, &format!("bad port {p:?}")))?,
            };
            Address::Tcp {
                host: host.to_string(),
                port,
            }
        };
        Ok(NbdUri { address, export })
    }

    /// QEMU's syntax from before NBD URIs, which `qemu-img create -b`
    /// still accepts and writes into the header as given:
    /// `nbd:unix:PATH[:exportname=NAME]` and
    /// `nbd:HOST:PORT[:exportname=NAME]` (`HOST` may be `[IPv6]`). As in
    /// QEMU (`nbd_parse_filename`), the export name is what follows the
    /// first `:exportname=`, and the port is required.
    fn parse_legacy(uri: &str, spec: &str) -> Result<NbdUri> {
        const EXPORT: &str = ":exportname=";
        // Searched in the whole name, as QEMU does: "nbd:" itself cannot
        // hold it.
        let (spec, export) = match spec.find(EXPORT) {
            Some(i) => {
                let name = &spec[i + EXPORT.len()..];
                if name.is_empty() {
                    return Err(bad_uri(uri, "an empty export name after \":exportname=\""));
                }
                (&spec[..i], name.to_string())
            }
            None => (spec, String::new()),
        };
        if spec.is_empty() {
            return Err(bad_uri(uri, "no server after \"nbd:\""));
        }
        if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad_uri(uri, "no socket path after \"nbd:unix:\""));
            }
            return Ok(NbdUri {
                address: Address::Unix(PathBuf::from(path)),
                export,
            });
        }
        let (host, port) = if let Some(v6) = spec.strip_prefix('[') {
            v6.split_once("]:")
                .ok_or_else(|| bad_uri(uri, "expected [IPv6]:PORT after \"nbd:\""))?
        } else {
            spec.split_once(':')
                .ok_or_else(|| bad_uri(uri, "expected HOST:PORT or unix:PATH after \"nbd:\""))?
        };
        if host.is_empty() {
            return Err(bad_uri(uri, "no host"));
        }
        if port.contains(',') {
            return Err(bad_uri(
                uri,
                "socket options (\",...\" after the port) are not supported",
            ));
        }
        let port = port
            .parse()
            .map_err(|_| bad_uri(uri, &format!("bad port {port:?}")))?;
        Ok(NbdUri {
            address: Address::Tcp {
                host: host.to_string(),
                port,
            },
            export,
        })
    }
}

/// A connected socket, Unix or TCP.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn connect(addr: &Address) -> std::io::Result<Stream> {
        match addr {
            Address::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
            Address::Tcp { host, port } => {
                let mut last = None;
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, HANDSHAKE_TIMEOUT) {
                        Ok(s) => {
                            // Request headers are small; send each batch at once.
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "host has no address")
                }))
            }
        }
    }

    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Sends what the socket takes of `buf` without waiting for room: how
    /// many bytes, 0 when it has none.
    fn send_now(&self, buf: &[u8]) -> std::io::Result<usize> {
        let fd = match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        };
        loop {
            // SAFETY: `buf` is borrowed for the whole call, and the kernel
            // copies what it takes before `send` returns: it keeps no
            // pointer into it.
            let n = unsafe {
                libc::send(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the handshake learned about the export.
#[derive(Clone, Copy, Debug)]
struct ExportInfo {
    size: u64,
    structured: bool,
    /// The server's minimum block size (reads are aligned to it).
    min_block: u32,
    /// The largest read, a multiple of `min_block`.
    max_block: u32,
    /// The id of the `base:allocation` meta context, when it was asked
    /// for and the server gave it (see `status`).
    allocation: Option<u32>,
}

fn read_u16(s: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// Reads one option reply: (reply type, data).
fn read_option_reply(
    s: &mut impl Read,
    option: u32,
) -> std::result::Result<(u32, Vec<u8>), String> {
    let io = |e: std::io::Error| format!("reading an option reply: {e}");
    let magic = read_u64(s).map_err(io)?;
    let opt = read_u32(s).map_err(io)?;
    let kind = read_u32(s).map_err(io)?;
    let len = read_u32(s).map_err(io)?;
    if magic != REPLY_MAGIC_OPT || opt != option {
        return Err(format!(
            "bad option reply (magic {magic:#x}, option {opt}, expected {option})"
        ));
    }
    if len > MAX_SMALL_PAYLOAD {
        return Err(format!("option reply of {len} bytes is too large"));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).map_err(io)?;
    Ok((kind, data))
}

fn rep_error_name(kind: u32) -> String {
    match kind {
        REP_ERR_UNSUP => "unsupported".into(),
        REP_ERR_POLICY => "refused by policy".into(),
        REP_ERR_INVALID => "invalid".into(),
        REP_ERR_UNKNOWN => "unknown export".into(),
        REP_ERR_SHUTDOWN => "server shutting down".into(),
        REP_ERR_TOO_BIG => "too big".into(),
        k if k == REP_FLAG_ERROR | 5 => "TLS required".into(),
        k => format!("error {k:#x}"),
    }
}

/// The handshake up to the transmission phase: fixed newstyle with
/// NBD_OPT_GO, and with `allocation` also the `base:allocation` meta
/// context (for block status queries; reads need none); or, as QEMU, the
/// older ways for servers that do not speak it (oldstyle, plain newstyle,
/// no NBD_OPT_GO).
fn handshake(
    s: &mut (impl Read + Write),
    export: &str,
    allocation: bool,
) -> std::result::Result<ExportInfo, String> {
    let io = |e: std::io::Error| format!("handshake: {e}");
    if read_u64(s).map_err(io)? != NBDMAGIC {
        return Err("not an NBD server (bad greeting)".into());
    }
    match read_u64(s).map_err(io)? {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return oldstyle_handshake(s, export),
        m => return Err(format!("not an NBD server (magic {m:#x})")),
    }
    let hflags = read_u16(s).map_err(io)?;
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = if fixed { FLAG_C_FIXED_NEWSTYLE } else { 0 }
        | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes()).map_err(io)?;
    if !fixed {
        // Plain newstyle: a server that may drop the connection at any
        // option it does not know, so the only one sent is the one every
        // newstyle server knows (QEMU does the same).
        return export_name_handshake(s, export, no_zeroes, false);
    }

    send_option(s, OPT_STRUCTURED_REPLY, &[]).map_err(io)?;
    let (kind, _) = read_option_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = kind == REP_ACK;
    if !structured && kind & REP_FLAG_ERROR == 0 {
        return Err(format!(
            "unexpected reply {kind} to NBD_OPT_STRUCTURED_REPLY"
        ));
    }
    // Block status needs structured replies; a server that refuses the
    // context (or meta contexts at all) just answers no block status.
    let allocation = if allocation && structured {
        set_meta_context(s, export).map_err(|e| format!("{ASKING_STATUS}: {e}"))?
    } else {
        None
    };

    let mut go = Vec::new();
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &go).map_err(io)?;
    let mut size = None;
    let mut min_block = 1;
    let mut max_block = DEFAULT_MAX_READ;
    loop {
        let (kind, data) = read_option_reply(s, OPT_GO)?;
        match kind {
            REP_ACK => break,
            REP_INFO => {
                let mut c = Cursor(&data);
                match c.u16() {
                    Some(INFO_EXPORT) => {
                        let sz = c.take(8).map(be64);
                        let _flags = c.u16();
                        size = Some(sz.ok_or("short NBD_INFO_EXPORT")?);
                    }
                    Some(INFO_BLOCK_SIZE) => {
                        let (min, _pref, max) = (c.u32(), c.u32(), c.u32());
                        let (Some(min), Some(max)) = (min, max) else {
                            return Err("short NBD_INFO_BLOCK_SIZE".into());
                        };
                        // The spec: a power of two up to 64 KiB, and a
                        // maximum that is a multiple of it.
                        if !min.is_power_of_two() || min > 64 << 10 {
                            return Err(format!("bad minimum block size {min}"));
                        }
                        min_block = min;
                        if max > 0 {
                            max_block = max.min(DEFAULT_MAX_READ);
                        }
                    }
                    _ => {}
                }
            }
            // A server from before NBD_OPT_GO: the older way, as QEMU
            // falls back to it. Its meta context is not for this.
            REP_ERR_UNSUP => return export_name_handshake(s, export, no_zeroes, structured),
            k if k & REP_FLAG_ERROR != 0 => {
                let msg = String::from_utf8_lossy(&data);
                return Err(format!(
                    "the server refused export {export:?} ({}){}",
                    rep_error_name(k),
                    if msg.is_empty() {
                        String::new()
                    } else {
                        format!(": {msg}")
                    }
                ));
            }
            k => return Err(format!("unexpected reply {k} to NBD_OPT_GO")),
        }
    }
    let size = size.ok_or("the server sent no export size")?;
    export_info(size, structured, min_block, max_block, allocation)
}

/// What a handshake learned, checked: the size fits a file offset, and the
/// largest read is whole minimum blocks and never less than one 4 KiB page.
fn export_info(
    size: u64,
    structured: bool,
    min_block: u32,
    max_block: u32,
    allocation: Option<u32>,
) -> std::result::Result<ExportInfo, String> {
    if size > i64::MAX as u64 {
        return Err(format!("export size {size} is too large"));
    }
    let max_block = (max_block.max(4096).max(min_block) / min_block) * min_block;
    Ok(ExportInfo {
        size,
        structured,
        min_block,
        max_block,
        allocation,
    })
}

/// Ends a newstyle handshake with NBD_OPT_EXPORT_NAME, for a server that
/// does not speak fixed newstyle or does not know NBD_OPT_GO: the server
/// answers with the export's size and transmission flags (and 124 zero
/// bytes unless both sides dropped them), or closes the connection if it
/// has no such export. No block status is asked of such a server.
fn export_name_handshake(
    s: &mut (impl Read + Write),
    export: &str,
    no_zeroes: bool,
    structured: bool,
) -> std::result::Result<ExportInfo, String> {
    let io = |e: std::io::Error| format!("handshake: {e}");
    send_option(s, OPT_EXPORT_NAME, export.as_bytes()).map_err(io)?;
    let size = read_u64(s).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            format!(
                "the server closed the connection at NBD_OPT_EXPORT_NAME: it has no export \
                 {export:?}"
            )
        } else {
            io(e)
        }
    })?;
    let _flags = read_u16(s).map_err(io)?;
    if !no_zeroes {
        let mut reserved = [0u8; 124];
        s.read_exact(&mut reserved).map_err(io)?;
    }
    export_info(size, structured, 1, DEFAULT_MAX_READ, None)
}

/// The rest of an oldstyle greeting (proto.md, "Oldstyle negotiation"):
/// the export's size, 16 bits of handshake flags and 16 of transmission
/// flags, 124 reserved bytes, and then straight to transmission. Such a
/// server has one export and no options: no export name, no structured
/// replies (so no block status), no block size constraints. QEMU still
/// reads from one, and so does backfill.
fn oldstyle_handshake(s: &mut impl Read, export: &str) -> std::result::Result<ExportInfo, String> {
    let io = |e: std::io::Error| format!("handshake: {e}");
    if !export.is_empty() {
        return Err(format!(
            "the server speaks only the oldstyle protocol, which has no export names, and \
             {export:?} was asked for (name none: nbd://HOST:PORT or nbd+unix:///?socket=PATH)"
        ));
    }
    let size = read_u64(s).map_err(io)?;
    let _flags = read_u32(s).map_err(io)?;
    let mut reserved = [0u8; 124];
    s.read_exact(&mut reserved).map_err(io)?;
    export_info(size, false, 1, DEFAULT_MAX_READ, None)
}

/// NBD_OPT_SET_META_CONTEXT for `base:allocation`: its id if the server
/// selected it.
fn set_meta_context(
    s: &mut (impl Read + Write),
    export: &str,
) -> std::result::Result<Option<u32>, String> {
    const NAME: &str = "base:allocation";
    let mut m = Vec::new();
    m.extend_from_slice(&(export.len() as u32).to_be_bytes());
    m.extend_from_slice(export.as_bytes());
    m.extend_from_slice(&1u32.to_be_bytes());
    m.extend_from_slice(&(NAME.len() as u32).to_be_bytes());
    m.extend_from_slice(NAME.as_bytes());
    send_option(s, OPT_SET_META_CONTEXT, &m).map_err(|e| format!("handshake: {e}"))?;
    let mut id = None;
    loop {
        let (kind, data) = read_option_reply(s, OPT_SET_META_CONTEXT)?;
        match kind {
            REP_ACK => return Ok(id),
            REP_META_CONTEXT => {
                let mut c = Cursor(&data);
                let got = c.u32();
                if c.0 == NAME.as_bytes() {
                    id = got;
                }
            }
            // Refused: no block status from this server.
            k if k & REP_FLAG_ERROR != 0 => return Ok(None),
            k => return Err(format!("unexpected reply {k} to NBD_OPT_SET_META_CONTEXT")),
        }
    }
}

/// How the error of a handshake that failed while it asked for block
/// status begins.
const ASKING_STATUS: &str = "asking for base:allocation";

/// Connects to `uri` and runs the handshake, with bounded waits; with
/// `status`, it asks for block status too. While the handshake runs,
/// `pool` (if any) holds a handle on the socket, so that dropping the
/// client ends a handshake with a server that does not answer.
fn connect_once(
    uri: &NbdUri,
    status: bool,
    pool: Option<&Pool>,
) -> std::result::Result<(Stream, ExportInfo), String> {
    let mut s = Stream::connect(&uri.address).map_err(|e| format!("cannot connect: {e}"))?;
    let registered = pool.and_then(|p| p.register(&s));
    let info = s
        .set_timeouts(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| format!("setting socket timeouts: {e}"))
        .and_then(|()| handshake(&mut s, &uri.export, status))
        .and_then(|info| {
            s.set_timeouts(None)
                .map_err(|e| format!("clearing socket timeouts: {e}"))?;
            Ok(info)
        });
    if let Some(p) = pool {
        p.unregister(registered);
    }
    match info {
        Ok(info) => Ok((s, info)),
        Err(e) => {
            s.shutdown();
            Err(e)
        }
    }
}

/// [`connect_once`]; a handshake that failed at the question for block
/// status is run again without it (reads need none), and the third value
/// then says why this server gives no block status.
fn connect(
    uri: &NbdUri,
    status: bool,
    pool: Option<&Pool>,
) -> std::result::Result<(Stream, ExportInfo, Option<String>), String> {
    match connect_once(uri, status, pool) {
        Err(e) if status && e.starts_with(ASKING_STATUS) => {
            let (s, info) = connect_once(uri, false, pool)?;
            let why = format!("its handshake failed when asked for block status ({e})");
            Ok((s, info, Some(why)))
        }
        r => r.map(|(s, info)| (s, info, None)),
    }
}

/// A queued read and how many connections it was tried on.
struct Job {
    read: RemoteRead,
    attempts: u32,
}

/// A read on the wire.
struct Pending {
    job: Job,
    data: Vec<u8>,
    /// Bytes the reply's chunks covered so far.
    covered: u64,
    /// The server's error (NBD errno, text), the first if several.
    error: Option<(u32, String)>,
    sent: Instant,
}

impl Pending {
    fn new(pool: &Pool, job: Job) -> Pending {
        Pending {
            // A read placed into the core's buffers needs none.
            data: if job.read.dest.is_empty() {
                pool.spares.take(job.read.len)
            } else {
                Vec::new()
            },
            job,
            covered: 0,
            error: None,
            sent: Instant::now(),
        }
    }
}

/// What the connections share.
struct Pool {
    name: String,
    uri: NbdUri,
    size: u64,
    jobs_tx: Sender<Job>,
    jobs_rx: Receiver<Job>,
    /// Disconnected when the client is dropped.
    stop_rx: Receiver<()>,
    /// A read arrived while no connection was up: connection threads in
    /// their backoff wait try again at once. Bounded, sent with
    /// `try_send`: one token per waiting thread is enough.
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
    /// Connections in the transmission phase.
    live: AtomicUsize,
    /// Read buffers the cores gave back.
    spares: crate::backing::remote::SharedSpares,
    /// A handle on each live session's socket, for the drop to shut down.
    sockets: Mutex<HashMap<u64, Stream>>,
    next_socket: AtomicU64,
    /// The live connections, for [`Pool::send_now`] and block status.
    lanes: Mutex<Vec<Arc<Lane>>>,
    /// Notified when a connection goes live.
    lanes_changed: Condvar,
    /// Whether a connection was ever live.
    was_live: AtomicBool,
    /// Why handshakes no longer ask for block status (see [`connect`]);
    /// None while they do.
    status_trouble: Mutex<Option<String>>,
    /// Where `send_now` starts looking, so that reads spread out.
    next_lane: AtomicUsize,
    /// Requests written by submitters, and by the sending threads.
    sent_now: AtomicU64,
    sent_queued: AtomicU64,
}

impl Pool {
    /// A pool for the export `uri` (parsed as `parsed`) of `size` bytes,
    /// with no connection yet. Dropping `stop`, the returned sender,
    /// stops it.
    fn new(uri: &str, parsed: NbdUri, size: u64) -> (Pool, Sender<()>) {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(CONNECTIONS);
        let pool = Pool {
            name: uri.to_string(),
            uri: parsed,
            size,
            jobs_tx,
            jobs_rx,
            stop_rx,
            wake_tx,
            wake_rx,
            live: AtomicUsize::new(0),
            spares: Default::default(),
            sockets: Mutex::new(HashMap::new()),
            next_socket: AtomicU64::new(0),
            lanes: Mutex::new(Vec::new()),
            lanes_changed: Condvar::new(),
            was_live: AtomicBool::new(false),
            status_trouble: Mutex::new(None),
            next_lane: AtomicUsize::new(0),
            sent_now: AtomicU64::new(0),
            sent_queued: AtomicU64::new(0),
        };
        (pool, stop_tx)
    }

    fn stopped(&self) -> bool {
        matches!(self.stop_rx.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Connects to the export (see [`connect`]), asking for block status
    /// until a handshake failed at that question.
    fn connect(&self) -> std::result::Result<(Stream, ExportInfo), String> {
        let ask = self
            .status_trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        let (s, info, trouble) = connect(&self.uri, ask, Some(self))?;
        if let Some(why) = trouble {
            self.stop_asking(why);
        }
        Ok((s, info))
    }

    /// Handshakes ask for block status no more, because of `why`.
    fn stop_asking(&self, why: String) {
        *self
            .status_trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// Keeps a handle on `stream` for [`Pool::shut_down_sockets`]; `None`
    /// if it could not be cloned. A stream registered after the client
    /// stopped is shut down at once: the drop's sweep may be over.
    fn register(&self, stream: &Stream) -> Option<u64> {
        let handle = stream.try_clone().ok()?;
        let id = self.next_socket.fetch_add(1, Ordering::Relaxed);
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, handle);
        if self.stopped() {
            stream.shutdown();
        }
        Some(id)
    }

    fn unregister(&self, id: Option<u64>) {
        if let Some(id) = id {
            self.sockets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }

    /// Shuts down every live session's socket: blocked reads and writes on
    /// them return, so their threads see the stop.
    fn shut_down_sockets(&self) {
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            s.shutdown();
        }
    }

    /// Writes the request for `read` on a live connection with room, from
    /// the submitting thread, which saves the connection's sending thread a
    /// wake-up per read. Gives the read back for the queue when reads are
    /// queued already (they go first), no connection is up or has room, or
    /// the socket would not take the request at once: this never waits.
    fn send_now(&self, read: RemoteRead) -> Option<RemoteRead> {
        if !self.jobs_rx.is_empty() {
            return Some(read);
        }
        let first = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let mut read = Some(read);
        for k in 0..CONNECTIONS {
            let lane = {
                let lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
                if k >= lanes.len() {
                    break;
                }
                lanes[(first + k) % lanes.len()].clone()
            };
            read = lane.send_now(self, read?);
        }
        read
    }

    fn fail(&self, job: Job, why: &str) {
        let r = &job.read;
        let e = Error::new(
            ErrorKind::BackingUnavailable,
            format!(
                "backing image {}: reading {} bytes at offset {}: {why}",
                self.name, r.len, r.offset
            ),
        );
        job.read.complete(Err(e));
    }

    /// Fails every queued read.
    fn fail_queued(&self, why: &str) {
        while let Ok(job) = self.jobs_rx.try_recv() {
            self.fail(job, why);
        }
    }

    /// A read whose connection dropped: again, or an error once it has
    /// used up its attempts.
    fn retry(&self, mut job: Job, why: &str) {
        job.attempts += 1;
        if job.attempts >= MAX_ATTEMPTS {
            let why = format!("the connection to the server dropped {MAX_ATTEMPTS} times ({why})");
            self.fail(job, &why);
        } else if let Err(e) = self.jobs_tx.send(job) {
            self.fail(e.into_inner(), why);
        }
    }
}

/// An NBD export used as a backing image.
pub struct NbdClient {
    pool: Arc<Pool>,
    max_read: usize,
    alignment: usize,
    /// Dropped first by the drop: tells the connection threads to stop.
    stop: Option<Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Disconnected once every connection thread has ended (each holds a
    /// sender).
    ended: Receiver<()>,
    /// Block status queries ([`Medium::learn_zeros`]) and what they found.
    status: Mutex<status::Status>,
    zeros: crate::backing::zeros::Zeros,
}

impl NbdClient {
    /// Connects to the export named by `uri` (one connection now, to learn
    /// its size; the others in the background).
    pub fn open(uri: &str) -> Result<NbdClient> {
        let parsed = NbdUri::parse(uri)?;
        let (stream, info, trouble) = connect(&parsed, true, None).map_err(|e| {
            Error::new(
                ErrorKind::BackingUnavailable,
                format!("backing image {uri}: {e}"),
            )
        })?;
        let (ended_tx, ended) = crossbeam_channel::bounded::<()>(0);
        let (pool, stop_tx) = Pool::new(uri, parsed, info.size);
        if let Some(why) = trouble {
            pool.stop_asking(why);
        }
        let mut client = NbdClient {
            pool: Arc::new(pool),
            max_read: info.max_block as usize,
            alignment: info.min_block as usize,
            stop: Some(stop_tx),
            threads: Vec::with_capacity(CONNECTIONS),
            ended,
            status: Mutex::default(),
            zeros: crate::backing::zeros::Zeros::default(),
        };
        let mut first = Some((stream, info));
        for i in 0..CONNECTIONS {
            let pool = client.pool.clone();
            let conn = first.take();
            let ended = ended_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("backfill-nbd-{i}"))
                .spawn(move || {
                    let _ended = ended;
                    run_connection(&pool, conn)
                })
                .map_err(|e| Error::io(e, "spawning an NBD connection thread"))?;
            client.threads.push(t);
        }
        Ok(client)
    }
}

impl NbdClient {
    /// Waits until every connection thread has ended or `deadline` passed;
    /// true if they all ended.
    fn wait_ended(&self, deadline: Instant) -> bool {
        loop {
            match self.ended.recv_deadline(deadline) {
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return true,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return false,
                Ok(()) => {}
            }
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // The stop: idle connections say goodbye and close on their own.
        self.stop = None;
        let start = Instant::now();
        // Then the sockets of those that did not (blocked on a server that
        // does not answer, or waiting for room on a full connection).
        let ended = self.wait_ended(start + DROP_WAIT / 4) || {
            self.pool.shut_down_sockets();
            self.wait_ended(start + DROP_WAIT)
        };
        if ended {
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

impl Medium for NbdClient {
    fn name(&self) -> &str {
        &self.pool.name
    }

    fn size(&self) -> u64 {
        self.pool.size
    }

    fn max_read(&self) -> usize {
        self.max_read
    }

    fn alignment(&self) -> usize {
        self.alignment
    }

    fn recycle(&self, buf: Vec<u8>) {
        self.pool.spares.give(buf);
    }

    fn places(&self) -> bool {
        true
    }

    fn learn_zeros(&self, offset: u64, len: u64) -> u64 {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.learn(&self.pool, self.alignment as u64, &self.zeros, offset, len)
    }

    fn zeros_at(&self, offset: u64, max: u64) -> (bool, u64) {
        self.zeros.run(offset, max)
    }

    fn zeros_unknown(&self) -> Option<String> {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.trouble().map(str::to_string)
    }

    fn submit(&self, read: RemoteRead) {
        let end = read.offset + read.len as u64;
        let a = self.alignment as u64;
        debug_assert!(read.len <= self.max_read && end <= self.size());
        debug_assert!(
            read.offset.is_multiple_of(a) && (end.is_multiple_of(a) || end == self.size())
        );
        let Some(read) = self.pool.send_now(read) else {
            return;
        };
        // Unbounded: the submitters' own in-flight limits bound the queue.
        if let Err(e) = self.pool.jobs_tx.send(Job { read, attempts: 0 }) {
            self.pool.fail(e.into_inner(), "the client is shut down");
            return;
        }
        if self.pool.live.load(Ordering::SeqCst) == 0 {
            // Never blocks: a full channel already wakes every thread.
            let _ = self.pool.wake_tx.try_send(());
        }
    }
}

/// One connection's life: connect (with backoff), serve requests until the
/// connection drops, send what was in flight elsewhere, again.
fn run_connection(pool: &Pool, mut next: Option<(Stream, ExportInfo)>) {
    let mut backoff = BACKOFF_FIRST;
    let mut failing_since: Option<Instant> = None;
    while !pool.stopped() {
        let attempt = match next.take() {
            Some(c) => Ok(c),
            None => pool.connect(),
        };
        let attempt = attempt.and_then(|(s, info)| {
            if info.size == pool.size {
                return Ok((s, info));
            }
            s.shutdown();
            Err(format!(
                "the export's size changed from {} to {} bytes",
                pool.size, info.size
            ))
        });
        let (stream, info) = match attempt {
            Ok(c) => c,
            Err(e) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= GIVE_UP_AFTER && pool.live.load(Ordering::SeqCst) == 0 {
                    pool.fail_queued(&format!(
                        "cannot reach the NBD server for {GIVE_UP_AFTER:?}: {e}"
                    ));
                }
                // The backoff, cut short by a new read (see `submit`).
                let stop = select! {
                    recv(pool.stop_rx) -> _ => true,
                    recv(pool.wake_rx) -> _ => false,
                    default(backoff) => false,
                };
                if stop {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        failing_since = None;
        backoff = BACKOFF_FIRST;
        // Wake-ups sent while no connection was up are answered.
        while pool.wake_rx.try_recv().is_ok() {}
        pool.live.fetch_add(1, Ordering::SeqCst);
        let (left, why) = session(pool, stream, info);
        pool.live.fetch_sub(1, Ordering::SeqCst);
        for job in left {
            pool.retry(job, &why);
        }
    }
    pool.fail_queued("the backing image is closed");
}

/// The requests on one connection, by cookie, and whether it is dead.
#[derive(Default)]
struct Wire {
    pending: HashMap<u64, Pending>,
    /// Block status queries on the wire.
    queries: HashMap<u64, status::Query>,
    dead: bool,
    /// The last cookie given out.
    cookie: u64,
}

impl Wire {
    /// Puts `job` in the table under the next cookie; returns the request
    /// to send for it.
    fn add(&mut self, pool: &Pool, job: Job) -> [u8; REQUEST_HEADER_LEN] {
        self.cookie += 1;
        let r = &job.read;
        let header = request(CMD_READ, self.cookie, r.offset, r.len as u32);
        self.pending.insert(self.cookie, Pending::new(pool, job));
        header
    }
}

/// A live connection: its requests on the wire and its sending side, which
/// its sending thread and submitters (see [`Pool::send_now`]) share. Lock
/// order: `wire`, then `out`.
struct Lane {
    wire: Mutex<Wire>,
    out: Mutex<Stream>,
    /// The id of the `base:allocation` context on this connection, if
    /// the server gave it (block status queries go only where it did).
    allocation: Option<u32>,
}

impl Lane {
    /// Sends `read` on this connection if it has room and its socket takes
    /// the request at once; else gives it back.
    fn send_now(&self, pool: &Pool, read: RemoteRead) -> Option<RemoteRead> {
        let mut w = self.wire.lock().unwrap_or_else(|e| e.into_inner());
        if w.dead || w.pending.len() >= IN_FLIGHT_PER_CONNECTION {
            return Some(read);
        }
        // The sending thread holds it while it writes a batch.
        let Ok(out) = self.out.try_lock() else {
            return Some(read);
        };
        // In the table before the request is on the wire: the reply may
        // come before this thread runs again.
        let header = w.add(pool, Job { read, attempts: 0 });
        match out.send_now(&header) {
            Ok(n) if n == header.len() => {
                pool.sent_now.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(0) => {
                let cookie = w.cookie;
                w.pending.remove(&cookie).map(|p| p.job.read)
            }
            // Part of a request on the wire, or a broken socket: the
            // connection is of no more use. Shutting it down ends its
            // session, which sends its reads, this one too, elsewhere.
            Ok(_) | Err(_) => {
                out.shutdown();
                None
            }
        }
    }
}

/// Runs one connection until it drops (or the client stops). Returns the
/// reads left unanswered on it, and why it ended.
fn session(pool: &Pool, stream: Stream, info: ExportInfo) -> (Vec<Job>, String) {
    let rx = match stream
        .try_clone()
        .and_then(|rx| rx.set_timeouts(Some(STALL_TIMEOUT)).map(|()| rx))
    {
        Ok(s) => s,
        Err(e) => return (Vec::new(), format!("setting up the socket: {e}")),
    };
    let registered = pool.register(&stream);
    let lane = Arc::new(Lane {
        wire: Mutex::new(Wire::default()),
        out: Mutex::new(stream),
        allocation: info.allocation,
    });
    pool.lanes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(lane.clone());
    pool.was_live.store(true, Ordering::Relaxed);
    pool.lanes_changed.notify_all();
    let wire = &lane.wire;
    let room = Condvar::new();
    let reason = Mutex::new(String::new());
    let end = |why: String, wire: &Mutex<Wire>| {
        let mut r = reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_empty() {
            *r = why;
        }
        wire.lock().unwrap_or_else(|e| e.into_inner()).dead = true;
        room.notify_all();
    };
    let (dead_tx, dead_rx) = crossbeam_channel::bounded::<()>(0);
    std::thread::scope(|sc| {
        let reader = std::thread::Builder::new()
            .name("backfill-nbd-rx".into())
            .spawn_scoped(sc, || {
                let _dead = dead_tx;
                let rx = BufReader::with_capacity(256 << 10, rx);
                let why = read_replies(pool, rx, wire, &room, &info);
                end(why, wire);
            });
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                end(format!("spawning the reader thread: {e}"), wire);
                return;
            }
        };
        let why = send_requests(pool, &lane, &room, &dead_rx);
        end(why, wire);
        // Wakes the reader, which then ends too. Joined here, not by the
        // scope: the scope only waits for its closure, and the client's drop
        // promises that the thread itself is gone.
        lane.out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown();
        let _ = reader.join();
    });
    pool.unregister(registered);
    pool.lanes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|l| !Arc::ptr_eq(l, &lane));
    let (pending, queries) = {
        let mut w = wire.lock().unwrap_or_else(|e| e.into_inner());
        (
            std::mem::take(&mut w.pending),
            std::mem::take(&mut w.queries),
        )
    };
    let why = reason.into_inner().unwrap_or_else(|e| e.into_inner());
    for q in queries.into_values() {
        q.answer(Err(format!(
            "the connection ended before the reply ({why})"
        )));
    }
    (pending.into_values().map(|p| p.job).collect(), why)
}

/// The sending half: takes reads from the shared queue while the
/// connection has room, and writes their requests in batches.
fn send_requests(pool: &Pool, lane: &Lane, room: &Condvar, dead_rx: &Receiver<()>) -> String {
    let wire = &lane.wire;
    // The wire once it has room, or `None` once the connection is dead.
    let with_room = || {
        let mut w = wire.lock().unwrap_or_else(|e| e.into_inner());
        while !w.dead && w.pending.len() >= IN_FLIGHT_PER_CONNECTION {
            w = room.wait(w).unwrap_or_else(|e| e.into_inner());
        }
        (!w.dead).then_some(w)
    };
    let mut batch = Vec::with_capacity(REQUEST_HEADER_LEN * IN_FLIGHT_PER_CONNECTION);
    loop {
        if with_room().is_none() {
            return String::new();
        }
        let first = select! {
            recv(pool.jobs_rx) -> j => j.ok(),
            recv(pool.stop_rx) -> _ => None,
            recv(dead_rx) -> _ => return String::new(),
        };
        let Some(first) = first else {
            // The client is gone: say goodbye.
            let out = lane.out.lock().unwrap_or_else(|e| e.into_inner());
            let _ = (&*out).write_all(&request(CMD_DISC, 0, 0, 0));
            return "the backing image is closed".into();
        };
        // Submitters may have taken the room while this thread waited for
        // a read.
        let Some(mut w) = with_room() else {
            if let Err(e) = pool.jobs_tx.send(first) {
                pool.fail(e.into_inner(), "the client is shut down");
            }
            return String::new();
        };
        batch.clear();
        let mut job = Some(first);
        while let Some(j) = job.take() {
            batch.extend_from_slice(&w.add(pool, j));
            pool.sent_queued.fetch_add(1, Ordering::Relaxed);
            if w.pending.len() < IN_FLIGHT_PER_CONNECTION {
                job = pool.jobs_rx.try_recv().ok();
            }
        }
        let out = lane.out.lock().unwrap_or_else(|e| e.into_inner());
        drop(w);
        let sent = (&*out).write_all(&batch);
        // Submitters may send on it again.
        drop(out);
        if let Err(e) = sent {
            return format!("sending requests: {e}");
        }
    }
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&0u16.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tcp(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What one reply message did to its request.
enum Outcome {
    /// More chunks follow.
    More,
    /// The request is answered (data or error).
    Done,
}

/// The receiving half: matches replies to requests until the connection
/// fails. Returns why it stopped.
fn read_replies(
    pool: &Pool,
    mut s: BufReader<impl Read>,
    wire: &Mutex<Wire>,
    room: &Condvar,
    info: &ExportInfo,
) -> String {
    loop {
        // At a message boundary: wait for the next reply, watching the age
        // of the requests in flight.
        match s.fill_buf() {
            Ok([]) => return "the server closed the connection".into(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let w = wire.lock().unwrap_or_else(|e| e.into_inner());
                if w.pending
                    .values()
                    .any(|p| p.sent.elapsed() >= REPLY_TIMEOUT)
                {
                    return format!("no reply for {REPLY_TIMEOUT:?}");
                }
                continue;
            }
            Err(e) => return format!("reading a reply: {e}"),
        }
        let magic = match read_u32(&mut s) {
            Ok(m) => m,
            Err(e) => return format!("reading a reply: {e}"),
        };
        let header = match magic {
            SIMPLE_REPLY_MAGIC => {
                read_u32(&mut s).and_then(|err| Ok((None, err, read_u64(&mut s)?)))
            }
            STRUCTURED_REPLY_MAGIC if info.structured => read_chunk_header(&mut s)
                .map(|(flags, kind, cookie, len)| (Some((flags, kind, len)), 0, cookie)),
            m => return format!("protocol error: bad reply magic {m:#x}"),
        };
        let (chunk, error, cookie) = match header {
            Ok(h) => h,
            Err(e) => return format!("reading a reply: {e}"),
        };
        let mut w = wire.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut p) = w.pending.remove(&cookie) else {
            let Some(q) = w.queries.remove(&cookie) else {
                return format!("protocol error: reply to unknown cookie {cookie}");
            };
            drop(w);
            match status::read_query_reply(&mut s, q, chunk, error, info.allocation) {
                Ok(Some(q)) => {
                    wire.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .queries
                        .insert(cookie, q);
                }
                Ok(None) => {}
                Err(why) => return why,
            }
            continue;
        };
        drop(w);
        let r = match chunk {
            None => read_simple_reply(&mut s, &mut p, error),
            Some((flags, kind, len)) => read_chunk(&mut s, &mut p, flags, kind, len),
        };
        match r {
            Ok(Outcome::Done) => {
                if matches!(p.error, Some((ESHUTDOWN, _))) {
                    pool.retry(p.job, "the server is shutting down");
                } else {
                    finish(pool, p);
                }
                room.notify_all();
            }
            Ok(Outcome::More) => {
                wire.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pending
                    .insert(cookie, p);
            }
            Err(why) => {
                // Back in the table, so that the read is retried elsewhere.
                wire.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pending
                    .insert(cookie, p);
                return why;
            }
        }
    }
}

/// The rest of a structured reply chunk's header, after its magic: its
/// flags, type, cookie and payload length.
fn read_chunk_header(s: &mut impl Read) -> std::io::Result<(u16, u16, u64, u32)> {
    Ok((read_u16(s)?, read_u16(s)?, read_u64(s)?, read_u32(s)?))
}

fn nbd_error_text(error: u32) -> String {
    let os = std::io::Error::from_raw_os_error(error as i32);
    format!("error {error} ({os})")
}

/// The errno of an error chunk's payload (EIO if it names none), and its
/// description: the error, and the server's message if it sent one.
fn error_chunk_text(payload: &[u8]) -> (u32, String) {
    let mut c = Cursor(payload);
    let error = c.u32().filter(|&e| e != 0).unwrap_or(EIO);
    let msg = c
        .u16()
        .and_then(|n| c.take(n as usize))
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let mut text = nbd_error_text(error);
    if !msg.is_empty() {
        text.push_str(&format!(": {msg}"));
    }
    (error, text)
}

fn read_simple_reply(
    s: &mut impl Read,
    p: &mut Pending,
    error: u32,
) -> std::result::Result<Outcome, String> {
    if error != 0 {
        p.error = Some((
            error,
            format!("the server answered {}", nbd_error_text(error)),
        ));
        return Ok(Outcome::Done);
    }
    let len = p.job.read.len;
    place(s, p, 0, len).map_err(|e| format!("reading read data: {e}"))?;
    p.covered = len as u64;
    Ok(Outcome::Done)
}

/// Reads bytes `[at, at + n)` of `p`'s read from the connection into
/// place: the read's destinations in the core's buffers where it has them
/// (bytes outside them, alignment padding, are dropped), else its buffer.
fn place(s: &mut dyn Read, p: &mut Pending, at: usize, n: usize) -> std::io::Result<()> {
    let dest = &p.job.read.dest;
    if dest.is_empty() {
        return s.read_exact(&mut p.data[at..at + n]);
    }
    // SAFETY: this reader thread is the only one answering the read `dest`
    // belongs to (its chunks all come on this connection), and it has not
    // completed it: until it does, the ranges are the read's.
    unsafe { place_range(s, dest, at, n) }
}

/// Zeros bytes `[at, at + n)` of `p`'s read (a hole the server reported).
fn zero(p: &mut Pending, at: usize, n: usize) {
    let dest = &p.job.read.dest;
    if dest.is_empty() {
        p.data[at..at + n].fill(0);
        return;
    }
    let end = at + n;
    for d in dest {
        let (lo, hi) = (d.at.max(at), (d.at + d.len).min(end));
        if lo < hi {
            // SAFETY: as in `place`.
            let _ = unsafe { d.write(lo - d.at, hi - lo, None) };
        }
    }
}

fn read_chunk(
    s: &mut impl Read,
    p: &mut Pending,
    flags: u16,
    kind: u16,
    len: u32,
) -> std::result::Result<Outcome, String> {
    let io = |e: std::io::Error| format!("reading a reply chunk: {e}");
    let (start, want) = (p.job.read.offset, p.job.read.len as u64);
    // The range [off, off + n) of the request's data, checked.
    let span = |off: u64, n: u64| -> std::result::Result<std::ops::Range<usize>, String> {
        match off.checked_sub(start) {
            Some(at) if n > 0 && at.checked_add(n).is_some_and(|e| e <= want) => {
                Ok(at as usize..(at + n) as usize)
            }
            _ => Err(format!(
                "protocol error: chunk for {n} bytes at {off} outside the read of {want} bytes at \
                 {start}"
            )),
        }
    };
    match kind {
        REPLY_TYPE_NONE if len == 0 => {}
        REPLY_TYPE_OFFSET_DATA if len > 8 && u64::from(len) - 8 <= want => {
            let off = read_u64(s).map_err(io)?;
            let r = span(off, u64::from(len) - 8)?;
            p.covered += r.len() as u64;
            place(s, p, r.start, r.len()).map_err(io)?;
        }
        REPLY_TYPE_OFFSET_HOLE if len == 12 => {
            let off = read_u64(s).map_err(io)?;
            let n = read_u32(s).map_err(io)?;
            let r = span(off, u64::from(n))?;
            p.covered += r.len() as u64;
            zero(p, r.start, r.len());
        }
        k if k & REPLY_TYPE_ERROR_BIT != 0 && (6..=MAX_SMALL_PAYLOAD).contains(&len) => {
            let mut b = vec![0u8; len as usize];
            s.read_exact(&mut b).map_err(io)?;
            let (error, text) = error_chunk_text(&b);
            p.error
                .get_or_insert_with(|| (error, format!("the server answered {text}")));
        }
        k => {
            return Err(format!(
                "protocol error: unexpected reply chunk type {k} of {len} bytes"
            ))
        }
    }
    Ok(if flags & REPLY_FLAG_DONE != 0 {
        Outcome::Done
    } else {
        Outcome::More
    })
}

/// Answers a read whose reply is complete.
fn finish(pool: &Pool, p: Pending) {
    let Pending {
        job,
        data,
        covered,
        error,
        ..
    } = p;
    let r = &job.read;
    let (offset, len) = (r.offset, r.len);
    let fail = |why: String| {
        Err(Error::new(
            ErrorKind::BackingUnavailable,
            format!(
                "backing image {}: reading {len} bytes at offset {offset}: {why}",
                pool.name
            ),
        ))
    };
    let result = match error {
        Some((_, e)) => fail(e),
        None if covered != len as u64 => fail(format!(
            "protocol error: the reply covered {covered} of {len} bytes"
        )),
        None => Ok(data),
    };
    job.read.complete(result);
}

/// A buffer of `len + 12` bytes of `guard`, and where a `len`-byte read
/// lands in it: its first third 7 bytes in, the rest 5 bytes after that
/// (byte `len / 3` goes nowhere, as alignment padding would), 1 byte of
/// guard behind. For checking that a medium writes its placements only.
fn guarded_placements(len: usize, guard: u8) -> (Arc<crate::io::IoBuf>, Vec<Placement>) {
    let mut b = crate::io::IoBuf::zeroed(len + 12);
    b.as_mut_slice().fill(guard);
    let b = Arc::new(b);
    let third = len / 3;
    let dest = vec![
        Placement {
            at: 0,
            buf: b.clone(),
            buf_off: 7,
            len: third,
        },
        Placement {
            at: third + 1,
            buf: b.clone(),
            buf_off: 7 + third + 5,
            len: len.saturating_sub(third + 1),
        },
    ];
    (b, dest)
}

/// The fuzz target `nbd_backing_replies` (see [`crate::testing::fuzz`]):
/// what a broken or hostile NBD server may send our client, from memory.
///
/// The first byte: bits 0 and 2 clear, the rest is the server's side of a
/// handshake (asking for block status when bit 1 is set); bit 0 clear and
/// bit 2 set, the reply to a block status query (cookie 1, context 1) and
/// the zero ranges made of it; bit 0 set, the replies to 1 to 8 reads the
/// client has on the wire (cookies 1 to n; the next byte is n - 1 in its
/// low 3 bits, then 4 bytes a read: offset in 512-byte units and length -
/// 1, both u16 BE), bit 1 saying whether structured replies were
/// negotiated (and then a block status query is on the wire too, cookie n
/// + 1, context 1) and bit 2 whether the reads are placed in core buffers
/// (two pieces with a gap, each buffer with 7 guard bytes in front and 5
/// behind).
///
/// Must hold: no panic, and no allocation sized by the server beyond the
/// small option payloads and status chunks (4 MiB at most); a handshake
/// that succeeds describes a usable export; zero ranges lie inside the
/// query, aligned, in order and apart, and the next query starts past the
/// last; each read is answered at most once, and when the replies stop,
/// every read is answered, still on the wire (to be retried), or back in
/// the queue (ESHUTDOWN), exactly one of those; a read answered with data
/// has all its bytes, and a placed read wrote inside its placements only;
/// the query is answered once or still on the wire, not both.
#[doc(hidden)]
pub fn fuzz_server_bytes(data: &[u8]) {
    use crate::backing::remote::Reply;

    use crate::testing::fuzz::Duplex;

    struct Answers(Mutex<Vec<(u64, Result<Vec<u8>>)>>);
    impl Reply for Answers {
        fn done(&self, tag: u64, result: Result<Vec<u8>>) {
            self.0.lock().unwrap().push((tag, result));
        }
    }
    const GUARD: u8 = 0xee;

    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 5 == 4 {
        // A block status reply, and the zero ranges it makes.
        if let Ok(extents) = status::read_status_reply(&mut Duplex::new(rest), 1, 1) {
            let (pos, end, size, align) = (4096, 1 << 30, 1 << 40, 512);
            if let Ok((ranges, next)) = status::zero_ranges(pos, end, size, align, &extents) {
                assert!(next > pos && next <= end, "no progress, or past the end");
                let mut last = 0;
                for (lo, hi) in ranges {
                    assert!(lo >= pos.max(last) && lo < hi && hi <= next);
                    assert!(lo % align == 0 && hi % align == 0);
                    last = hi + 1;
                }
            }
        }
        return;
    }
    if mode & 1 == 0 {
        if let Ok(info) = handshake(&mut Duplex::new(rest), "", mode & 2 != 0) {
            assert!(info.size <= i64::MAX as u64);
            assert!(info.min_block.is_power_of_two() && info.min_block <= 64 << 10);
            assert!(info.max_block >= info.min_block.max(4096));
            assert!(info.max_block <= DEFAULT_MAX_READ.max(info.min_block));
            assert_eq!(info.max_block % info.min_block, 0);
        }
        return;
    }
    let (structured, placed) = (mode & 2 != 0, mode & 4 != 0);
    let Some((&count, rest)) = rest.split_first() else {
        return;
    };
    let n = usize::from(count & 7) + 1;
    if rest.len() < n * 4 {
        return;
    }
    let (spec, stream) = rest.split_at(n * 4);
    let uri = "nbd+unix:///?socket=/fuzz";
    let (pool, _stop) = Pool::new(uri, NbdUri::parse(uri).expect("a valid URI"), 1 << 40);
    let answers = Arc::new(Answers(Mutex::new(Vec::new())));
    let reply: Arc<dyn Reply> = answers.clone();
    let mut reads = Vec::with_capacity(n);
    let mut wire = Wire::default();
    for (i, r) in spec.chunks_exact(4).enumerate() {
        let offset = u64::from(u16::from_be_bytes([r[0], r[1]])) * 512;
        let len = usize::from(u16::from_be_bytes([r[2], r[3]])) + 1;
        let (buf, dest) = if placed {
            let (b, dest) = guarded_placements(len, GUARD);
            (Some(b), dest)
        } else {
            (None, Vec::new())
        };
        reads.push((offset, len, buf));
        let read = RemoteRead {
            offset,
            len,
            tag: i as u64,
            reply: reply.clone(),
            dest,
        };
        wire.add(&pool, Job { read, attempts: 0 });
    }
    // With structured replies, a block status query too (cookie n + 1).
    let (query_tx, query_rx) = crossbeam_channel::unbounded();
    if structured {
        wire.cookie += 1;
        wire.queries
            .insert(wire.cookie, status::Query::new(query_tx));
    }
    let info = ExportInfo {
        size: 1 << 40,
        structured,
        min_block: 1,
        max_block: DEFAULT_MAX_READ,
        allocation: structured.then_some(1),
    };
    let wire = Mutex::new(wire);
    let why = read_replies(
        &pool,
        BufReader::new(Duplex::new(stream)),
        &wire,
        &Condvar::new(),
        &info,
    );
    assert!(!why.is_empty(), "the replies stopped without a reason");

    let mut seen = vec![0u8; n];
    let answered = std::mem::take(&mut *answers.0.lock().unwrap());
    for (tag, result) in &answered {
        let t = *tag as usize;
        seen[t] += 1;
        let (_, len, buf) = &reads[t];
        if let Ok(data) = result {
            match buf {
                None => assert_eq!(data.len(), *len, "read {t} answered short"),
                Some(b) => {
                    assert!(data.is_empty(), "placed read {t} returned bytes");
                    let (third, b) = (len / 3, b.as_slice());
                    assert!(
                        b[..7].iter().all(|&x| x == GUARD),
                        "read {t} wrote before its buffer"
                    );
                    assert!(
                        b[7 + third..7 + third + 5].iter().all(|&x| x == GUARD),
                        "read {t} wrote into the gap between its placements"
                    );
                    let end = 7 + third + 5 + len.saturating_sub(third + 1);
                    assert!(
                        b[end..].iter().all(|&x| x == GUARD),
                        "read {t} wrote past its placements"
                    );
                }
            }
        }
    }
    let wire = wire.into_inner().unwrap();
    for p in wire.pending.into_values() {
        seen[p.job.read.tag as usize] += 1;
    }
    if structured {
        let answers = query_rx.try_iter().count() + wire.queries.len();
        assert_eq!(
            answers, 1,
            "the query answered or left {answers} times ({why})"
        );
    }
    while let Ok(job) = pool.jobs_rx.try_recv() {
        seen[job.read.tag as usize] += 1;
    }
    for (t, &k) in seen.iter().enumerate() {
        assert_eq!(k, 1, "read {t} answered, left or queued {k} times ({why})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::remote::Reply;
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;

    /// What the hand-written server below does with reads: no real NBD
    /// server sends malformed replies on purpose, so this one does.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Mode {
        /// Structured replies: the first half of each read as data, the
        /// second half as a hole.
        Chunks,
        /// Simple replies only (it refuses structured replies).
        Simple,
        /// A data chunk outside the read (a protocol error).
        OutOfRange,
        /// Only the first half of each read, then DONE.
        Partial,
        /// An error chunk for reads at offset 0, good replies otherwise.
        ErrorAtZero,
        /// As `Chunks`, but garbage in reply to NBD_OPT_SET_META_CONTEXT
        /// (and then the connection closes).
        BadMeta,
        /// As `Simple`, but a server from before NBD_OPT_GO: it refuses
        /// it as unsupported and takes NBD_OPT_EXPORT_NAME.
        NoGo,
        /// As `NoGo`, but without the export asked for: it closes the
        /// connection at NBD_OPT_EXPORT_NAME.
        NoExport,
    }

    /// The `base:allocation` context id the fake server gives (`Chunks`):
    /// its block status says the second half of each query reads as zeros.
    const FAKE_CTX: u32 = 5;

    const SIZE: u64 = 1 << 20;

    fn pattern(off: u64) -> u8 {
        (off % 251) as u8
    }

    /// What a read gives in `Chunks` mode: the first half of the read the
    /// pattern, the second half zeros (a hole).
    fn chunks_read(off: u64, len: usize) -> Vec<u8> {
        (off..off + len as u64)
            .enumerate()
            .map(|(i, o)| if i >= len / 2 { 0 } else { pattern(o) })
            .collect()
    }

    /// Serves `mode` on a fresh Unix socket; returns its URI.
    fn fake_server(dir: &std::path::Path, mode: Mode) -> String {
        let sock = dir.join("fake.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                std::thread::spawn(move || {
                    let _ = serve(conn, mode);
                });
            }
        });
        format!("nbd+unix:///?socket={}", sock.display())
    }

    fn serve(mut c: UnixStream, mode: Mode) -> std::io::Result<()> {
        let mut out = Vec::new();
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        c.write_all(&out)?;
        read_u32(&mut c)?;
        loop {
            let (_magic, opt, len) = (read_u64(&mut c)?, read_u32(&mut c)?, read_u32(&mut c)?);
            let mut data = vec![0u8; len as usize];
            c.read_exact(&mut data)?;
            let mut out = Vec::new();
            if opt == OPT_STRUCTURED_REPLY {
                let kind = if matches!(mode, Mode::Simple | Mode::NoGo | Mode::NoExport) {
                    REP_ERR_UNSUP
                } else {
                    REP_ACK
                };
                option_reply(&mut out, opt, kind, &[]);
                c.write_all(&out)?;
                continue;
            }
            if opt == OPT_SET_META_CONTEXT {
                match mode {
                    Mode::BadMeta => {
                        c.write_all(b"not an option reply, not at all")?;
                        return Ok(());
                    }
                    Mode::Chunks => {
                        let mut ctx = FAKE_CTX.to_be_bytes().to_vec();
                        ctx.extend_from_slice(b"base:allocation");
                        option_reply(&mut out, opt, REP_META_CONTEXT, &ctx);
                        option_reply(&mut out, opt, REP_ACK, &[]);
                    }
                    _ => option_reply(&mut out, opt, REP_ERR_UNSUP, &[]),
                }
                c.write_all(&out)?;
                continue;
            }
            if opt == OPT_EXPORT_NAME {
                assert!(matches!(mode, Mode::NoGo | Mode::NoExport));
                if mode == Mode::NoExport {
                    return Ok(());
                }
                // Both sides dropped the 124 zero bytes (FLAG_NO_ZEROES).
                c.write_all(&SIZE.to_be_bytes())?;
                c.write_all(&(FLAG_HAS_FLAGS | FLAG_READ_ONLY).to_be_bytes())?;
                break;
            }
            assert_eq!(opt, OPT_GO);
            if matches!(mode, Mode::NoGo | Mode::NoExport) {
                option_reply(&mut out, opt, REP_ERR_UNSUP, &[]);
                c.write_all(&out)?;
                continue;
            }
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&SIZE.to_be_bytes());
            info.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_READ_ONLY).to_be_bytes());
            option_reply(&mut out, opt, REP_INFO, &info);
            option_reply(&mut out, opt, REP_ACK, &[]);
            c.write_all(&out)?;
            break;
        }
        loop {
            let mut h = [0u8; REQUEST_HEADER_LEN];
            c.read_exact(&mut h)?;
            let r = RequestHeader::parse(&h).expect("request magic");
            if r.kind == CMD_DISC {
                return Ok(());
            }
            let (off, len) = (r.offset, u64::from(r.len));
            if r.kind == CMD_BLOCK_STATUS {
                // Another context's extents first, then ours: data, then
                // zeros.
                let mut out = Vec::new();
                for (ctx, flags) in [(FAKE_CTX + 1, 0), (FAKE_CTX, REPLY_FLAG_DONE)] {
                    chunk_header(&mut out, r.cookie, flags, REPLY_TYPE_BLOCK_STATUS, 20);
                    out.extend_from_slice(&ctx.to_be_bytes());
                    for state in [0, STATE_HOLE | STATE_ZERO] {
                        out.extend_from_slice(&(r.len / 2).to_be_bytes());
                        out.extend_from_slice(&state.to_be_bytes());
                    }
                }
                c.write_all(&out)?;
                continue;
            }
            let bytes = |from: u64, to: u64| (from..to).map(pattern).collect::<Vec<u8>>();
            let half = off + len / 2;
            let mut out = Vec::new();
            let data_chunk = |out: &mut Vec<u8>, at: u64, d: &[u8], flags: u16| {
                chunk_header(
                    out,
                    r.cookie,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    8 + d.len() as u32,
                );
                out.extend_from_slice(&at.to_be_bytes());
                out.extend_from_slice(d);
            };
            match mode {
                Mode::Simple | Mode::NoGo | Mode::NoExport => {
                    simple_reply(&mut out, r.cookie, 0);
                    out.extend_from_slice(&bytes(off, off + len));
                }
                Mode::ErrorAtZero if off == 0 => {
                    error_chunk(&mut out, r.cookie, EPERM, "nope, not this one");
                }
                Mode::Chunks | Mode::ErrorAtZero | Mode::BadMeta => {
                    if half > off {
                        data_chunk(&mut out, off, &bytes(off, half), 0);
                    }
                    chunk_header(
                        &mut out,
                        r.cookie,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_HOLE,
                        12,
                    );
                    out.extend_from_slice(&half.to_be_bytes());
                    out.extend_from_slice(&((off + len - half) as u32).to_be_bytes());
                }
                Mode::OutOfRange => {
                    data_chunk(&mut out, off + len, &[1], REPLY_FLAG_DONE);
                }
                Mode::Partial => {
                    data_chunk(&mut out, off, &bytes(off, half), REPLY_FLAG_DONE);
                }
            }
            c.write_all(&out)?;
        }
    }

    /// A read's tag, its result, and how many references its buffer had
    /// when the result came.
    type Counted = (u64, Result<Vec<u8>>, usize);

    /// Answers, with how many references each read's buffer has then.
    struct CountAtDone {
        bufs: Vec<Arc<crate::io::IoBuf>>,
        tx: Mutex<mpsc::Sender<Counted>>,
    }

    impl Reply for CountAtDone {
        fn done(&self, tag: u64, result: Result<Vec<u8>>) {
            let n = Arc::strong_count(&self.bufs[tag as usize]);
            let _ = self.tx.lock().unwrap().send((tag, result, n));
        }
    }

    struct Collect(Mutex<mpsc::Sender<(u64, Result<Vec<u8>>)>>);

    impl Reply for Collect {
        fn done(&self, tag: u64, result: Result<Vec<u8>>) {
            let _ = self.0.lock().unwrap().send((tag, result));
        }
    }

    /// Submits every `(offset, len)` at once; the results in order.
    fn read_many(c: &NbdClient, reads: &[(u64, usize)]) -> Vec<Result<Vec<u8>>> {
        let (tx, rx) = mpsc::channel();
        let reply: Arc<dyn Reply> = Arc::new(Collect(Mutex::new(tx)));
        for (i, &(offset, len)) in reads.iter().enumerate() {
            c.submit(RemoteRead {
                offset,
                len,
                tag: i as u64,
                reply: reply.clone(),
                dest: Vec::new(),
            });
        }
        let mut out: Vec<Option<Result<Vec<u8>>>> = (0..reads.len()).map(|_| None).collect();
        for _ in reads {
            let (tag, r) = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("every read is answered");
            assert!(out[tag as usize].replace(r).is_none(), "answered twice");
        }
        out.into_iter().map(Option::unwrap).collect()
    }

    /// Block status goes on the read connections, its replies read by the
    /// same reader threads between the reads'.
    #[test]
    fn block_status_queries_share_the_read_connections() {
        let dir = tempfile::tempdir().unwrap();
        let c = NbdClient::open(&fake_server(dir.path(), Mode::Chunks)).unwrap();
        let reads: Vec<(u64, usize)> = (0..64).map(|i| (i * 8192, 4096)).collect();
        std::thread::scope(|sc| {
            let learner = sc.spawn(|| {
                (0..16)
                    .map(|i| c.learn_zeros(i * 65536, 65536))
                    .collect::<Vec<_>>()
            });
            for (r, &(off, len)) in read_many(&c, &reads).into_iter().zip(&reads) {
                assert!(
                    r.unwrap() == chunks_read(off, len),
                    "read of {len} at {off}"
                );
            }
            // The second half of each 64 KiB asked about reads as zeros.
            assert_eq!(learner.join().unwrap(), vec![32768; 16]);
        });
        assert_eq!(c.zeros_at(0, SIZE), (false, 32768));
        assert_eq!(c.zeros_at(32768, SIZE), (true, 32768));
        assert_eq!(c.zeros_unknown(), None);
    }

    /// A server whose handshake breaks at the question for block status is
    /// connected to again without it: reads work, and `zeros_unknown`
    /// says why there is no block status.
    #[test]
    fn a_handshake_broken_by_the_status_question_is_run_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = NbdClient::open(&fake_server(dir.path(), Mode::BadMeta)).unwrap();
        let reads: Vec<(u64, usize)> = (0..32).map(|i| (i * 4096, 4096)).collect();
        for (r, &(off, len)) in read_many(&c, &reads).into_iter().zip(&reads) {
            assert!(
                r.unwrap() == chunks_read(off, len),
                "read of {len} at {off}"
            );
        }
        assert_eq!(c.learn_zeros(0, SIZE), 0);
        let why = c.zeros_unknown().expect("no block status, and why");
        assert!(
            why.contains("handshake failed when asked for block status"),
            "{why}"
        );
        // Servers without the context at all: no zeros, and why.
        let dir = tempfile::tempdir().unwrap();
        let c = NbdClient::open(&fake_server(dir.path(), Mode::Simple)).unwrap();
        assert_eq!(c.learn_zeros(0, SIZE), 0);
        assert_eq!(
            c.zeros_unknown().as_deref(),
            Some("the server offers no base:allocation")
        );
    }

    /// A server from before NBD_OPT_GO is read through
    /// NBD_OPT_EXPORT_NAME, as QEMU reads it; one without the export ends
    /// the open with an error that says so.
    #[test]
    fn servers_without_opt_go_are_read_through_export_name() {
        let dir = tempfile::tempdir().unwrap();
        let c = NbdClient::open(&fake_server(dir.path(), Mode::NoGo)).unwrap();
        assert_eq!(c.size(), SIZE);
        let reads: Vec<(u64, usize)> = (0..64)
            .map(|i| (i * 12_289, 1 + i as usize * 997))
            .collect();
        for (r, &(off, len)) in read_many(&c, &reads).into_iter().zip(&reads) {
            let want: Vec<u8> = (off..off + len as u64).map(pattern).collect();
            assert!(r.unwrap() == want, "read of {len} at {off}");
        }
        assert_eq!(c.learn_zeros(0, SIZE), 0);
        drop(c);
        let dir = tempfile::tempdir().unwrap();
        let e = NbdClient::open(&fake_server(dir.path(), Mode::NoExport))
            .err()
            .expect("no export");
        assert!(
            e.to_string().contains(
                "the server closed the connection at NBD_OPT_EXPORT_NAME: it has no export \"\""
            ),
            "{e}"
        );
    }

    #[test]
    fn structured_and_simple_replies() {
        for mode in [Mode::Chunks, Mode::Simple] {
            let dir = tempfile::tempdir().unwrap();
            let c = NbdClient::open(&fake_server(dir.path(), mode)).unwrap();
            assert_eq!(c.size(), SIZE);
            let reads: Vec<(u64, usize)> = (0..200u64)
                .map(|i| (i * 4099 % (SIZE - 70_000), 1 + (i as usize * 331) % 65_536))
                .collect();
            for (r, &(off, len)) in read_many(&c, &reads).into_iter().zip(&reads) {
                let got = r.unwrap();
                let want = match mode {
                    Mode::Chunks => chunks_read(off, len),
                    _ => (off..off + len as u64).map(pattern).collect(),
                };
                assert!(got == want, "read of {len} at {off}");
            }
        }
    }

    #[test]
    fn reads_go_out_from_the_submitter_or_through_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let c = NbdClient::open(&fake_server(dir.path(), Mode::Simple)).unwrap();
        // Answered, so a connection is up, with room.
        read_many(&c, &[(0, 512)]).remove(0).unwrap();
        let before = c.pool.sent_now.load(Ordering::Relaxed);
        // More at once than the connections have room for: reads go out
        // from this thread while a connection has room, and the reads that
        // find none (how many depends on how fast the server answers) wait
        // in the queue.
        let reads: Vec<(u64, usize)> = (0..300u64)
            .map(|i| (i * 3001 % (SIZE - 4096), 4096))
            .collect();
        for (r, &(off, len)) in read_many(&c, &reads).into_iter().zip(&reads) {
            let want: Vec<u8> = (off..off + len as u64).map(pattern).collect();
            assert!(r.unwrap() == want, "read of {len} at {off}");
        }
        // A submitter finds a connection's socket busy while its sending
        // thread writes a batch, which on a loaded machine may be every
        // time in a burst: single reads, one at a time, until one goes out
        // from this thread.
        let mut singles = 0;
        while c.pool.sent_now.load(Ordering::Relaxed) == before && singles < 1000 {
            read_many(&c, &[(4096, 512)]).remove(0).unwrap();
            singles += 1;
        }
        let now = c.pool.sent_now.load(Ordering::Relaxed) - before;
        let queued = c.pool.sent_queued.load(Ordering::Relaxed);
        assert!(now >= 1, "no read went out from the submitter");
        assert_eq!(before + now + queued, 301 + singles, "each read sent once");
    }

    #[test]
    fn a_socket_without_room_gives_the_read_back_for_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let c = NbdClient::open(&fake_server(dir.path(), Mode::Simple)).unwrap();
        // A connection whose peer reads nothing, its socket filled up.
        let (ours, _peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut filled = 0;
        loop {
            match (&ours).write(&[0u8; 4096]) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the socket: {e}"),
            }
        }
        assert!(filled > 0);
        let lane = Lane {
            wire: Mutex::new(Wire::default()),
            out: Mutex::new(Stream::Unix(ours)),
            allocation: None,
        };
        let (tx, _rx) = mpsc::channel();
        let read = RemoteRead {
            offset: 4096,
            len: 512,
            tag: 7,
            reply: Arc::new(Collect(Mutex::new(tx))),
            dest: Vec::new(),
        };
        let back = lane.send_now(&c.pool, read).expect("the read comes back");
        assert_eq!((back.offset, back.len, back.tag), (4096, 512, 7));
        let w = lane.wire.lock().unwrap();
        assert!(
            w.pending.is_empty(),
            "a read that never went out is not waiting for a reply"
        );
        assert!(!w.dead);
        assert_eq!(c.pool.sent_now.load(Ordering::Relaxed), 0);
        drop(w);
        // The client goes on through its own connections.
        let got = read_many(&c, &[(back.offset, back.len)]).remove(0).unwrap();
        assert!(got == (4096..4096 + 512).map(pattern).collect::<Vec<u8>>());
    }

    #[test]
    fn placed_reads_land_in_their_buffers_and_nowhere_else() {
        use crate::io::IoBuf;
        for mode in [Mode::Chunks, Mode::Simple, Mode::Partial] {
            let dir = tempfile::tempdir().unwrap();
            let c = NbdClient::open(&fake_server(dir.path(), mode)).unwrap();
            assert!(c.places());
            let reads: Vec<(u64, usize)> = (0..50u64)
                .map(|i| (i * 7919 % (SIZE - 70_000), 3 + (i as usize * 1237) % 65_000))
                .collect();
            // Each read lands in two pieces of its own buffer, 7 bytes in
            // and with a 5-byte gap between them; byte `len / 3` of the
            // read goes nowhere (as alignment padding would).
            let (bufs, dests): (Vec<Arc<IoBuf>>, Vec<_>) = reads
                .iter()
                .map(|&(_, len)| guarded_placements(len, 0xee))
                .unzip();
            let (tx, rx) = mpsc::channel();
            let reply: Arc<dyn Reply> = Arc::new(CountAtDone {
                bufs: bufs.clone(),
                tx: Mutex::new(tx),
            });
            for (i, (&(offset, len), dest)) in reads.iter().zip(dests).enumerate() {
                c.submit(RemoteRead {
                    offset,
                    len,
                    tag: i as u64,
                    reply: reply.clone(),
                    dest,
                });
            }
            for _ in &reads {
                let (tag, r, holders) = rx
                    .recv_timeout(Duration::from_secs(60))
                    .expect("every read is answered");
                // By the time the answer comes, the medium holds none of
                // the buffer (the test's two clones are all).
                assert_eq!(holders, 2, "{mode:?}: the medium still holds the buffer");
                let (off, len) = reads[tag as usize];
                if mode == Mode::Partial {
                    let e = r.unwrap_err();
                    assert!(e.message().contains(&format!("of {len} bytes")), "{e}");
                    continue;
                }
                assert!(r.unwrap().is_empty(), "placed bytes are not returned");
                let want = |i: usize| {
                    if mode == Mode::Chunks && i >= len / 2 {
                        0
                    } else {
                        pattern(off + i as u64)
                    }
                };
                let third = len / 3;
                let mut expect = vec![0xee; 7];
                expect.extend((0..third).map(want));
                expect.extend([0xee; 5]);
                expect.extend((third + 1..len).map(want));
                expect.resize(bufs[tag as usize].len(), 0xee);
                assert!(
                    bufs[tag as usize].as_slice() == expect,
                    "{mode:?}: read of {len} at {off}"
                );
            }
        }
    }

    #[test]
    fn malformed_replies_are_errors_not_data() {
        let dir = tempfile::tempdir().unwrap();
        // A reply outside its read: the connection is dropped and the read
        // retried, MAX_ATTEMPTS times, then an error.
        let c = NbdClient::open(&fake_server(dir.path(), Mode::OutOfRange)).unwrap();
        let e = read_many(&c, &[(4096, 512)]).remove(0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BackingUnavailable);
        assert!(e.message().contains("dropped"), "{e}");
        assert!(e.message().contains("outside the read"), "{e}");
        drop(c);

        // A reply that covers half the read: an error for that read.
        let dir = tempfile::tempdir().unwrap();
        let c = NbdClient::open(&fake_server(dir.path(), Mode::Partial)).unwrap();
        let e = read_many(&c, &[(0, 1000)]).remove(0).unwrap_err();
        assert!(e.message().contains("covered 500 of 1000"), "{e}");
    }

    #[test]
    fn an_error_chunk_fails_that_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let c = NbdClient::open(&fake_server(dir.path(), Mode::ErrorAtZero)).unwrap();
        let mut r = read_many(&c, &[(0, 100), (100, 100), (0, 10), (5000, 2)]);
        let e = r.remove(0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BackingUnavailable);
        assert!(e.message().contains("nope, not this one"), "{e}");
        assert!(r.remove(0).is_ok());
        assert!(r.remove(0).is_err());
        assert_eq!(r.remove(0).unwrap(), vec![pattern(5000), 0]);
    }

    #[test]
    fn refuses_what_it_cannot_reach() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nobody.sock");
        let e = NbdClient::open(&format!("nbd+unix:///?socket={}", sock.display()))
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::BackingUnavailable);
        assert!(e.message().contains("cannot connect"), "{e}");
    }

    fn tcp(host: &str, port: u16) -> Address {
        Address::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_qemu_uris() {
        let u = NbdUri::parse("nbd+unix:///?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+unix:///disk%20a?socket=/tmp/x%3Fy").unwrap();
        assert_eq!(u.address, Address::Unix("/tmp/x?y".into()));
        assert_eq!(u.export, "disk a");
        let u = NbdUri::parse("nbd://127.0.0.1:10810/exp").unwrap();
        assert_eq!(u.address, tcp("127.0.0.1", 10810));
        assert_eq!(u.export, "exp");
        let u = NbdUri::parse("nbd://host").unwrap();
        assert_eq!(u.address, tcp("host", DEFAULT_PORT));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+tcp://[::1]:99/").unwrap();
        assert_eq!(u.address, tcp("::1", 99));
        for bad in [
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://:1/x",
            "nbd://h:port/x",
            "nbd://h/x?socket=/s",
            "nbd+unix:///?socket=%zz",
        ] {
            assert_eq!(
                NbdUri::parse(bad).unwrap_err().kind(),
                ErrorKind::InvalidInput,
                "{bad}"
            );
        }
        assert_eq!(
            NbdUri::parse("nbds://h/x").unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        assert!(is_nbd_name("nbd+unix:///?socket=/s"));
        assert!(!is_nbd_name("nbd.raw"));
    }

    /// The server's side of a handshake that offers structured replies
    /// and answers NBD_OPT_SET_META_CONTEXT with `meta` (the replies after
    /// its own), then an export of 1 GiB.
    fn server_handshake(meta: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = NBDMAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        option_reply(&mut b, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        for (kind, data) in meta {
            option_reply(&mut b, OPT_SET_META_CONTEXT, *kind, data);
        }
        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 30).to_be_bytes());
        export.extend_from_slice(&0u16.to_be_bytes());
        option_reply(&mut b, OPT_GO, REP_INFO, &export);
        option_reply(&mut b, OPT_GO, REP_ACK, &[]);
        b
    }

    #[test]
    fn block_status_is_asked_for_in_the_handshake() {
        let context = |id: u32, name: &str| {
            let mut v = id.to_be_bytes().to_vec();
            v.extend_from_slice(name.as_bytes());
            (REP_META_CONTEXT, v)
        };
        let ack = (REP_ACK, Vec::new());
        // Selected: its id is kept, whatever other contexts come with it.
        let bytes = server_handshake(&[
            context(7, "qemu:dirty-bitmap:x"),
            context(3, "base:allocation"),
            ack.clone(),
        ]);
        let mut d = crate::testing::fuzz::Duplex::new(&bytes);
        let info = handshake(&mut d, "disk", true).unwrap();
        assert_eq!((info.size, info.allocation), (1 << 30, Some(3)));
        let sent = String::from_utf8_lossy(&d.out).into_owned();
        assert!(sent.contains("base:allocation") && sent.contains("disk"));
        // Not selected, or refused: no block status, and no failure.
        for meta in [vec![ack.clone()], vec![(REP_ERR_UNSUP, Vec::new())]] {
            let bytes = server_handshake(&meta);
            let info = handshake(&mut crate::testing::fuzz::Duplex::new(&bytes), "", true);
            assert_eq!(info.unwrap().allocation, None);
        }
        // Not asked for: the option is never sent.
        let bytes = server_handshake(&[]);
        let mut d = crate::testing::fuzz::Duplex::new(&bytes);
        assert_eq!(handshake(&mut d, "", false).unwrap().allocation, None);
        assert!(!String::from_utf8_lossy(&d.out).contains("base:allocation"));
    }

    #[test]
    fn parses_qemus_older_syntax() {
        let unix = |p: &str| Address::Unix(p.into());
        for (uri, address, export) in [
            ("nbd:unix:/tmp/s.sock", unix("/tmp/s.sock"), ""),
            (
                "nbd:unix:/tmp/a:b.sock:exportname=disk one",
                unix("/tmp/a:b.sock"),
                "disk one",
            ),
            ("nbd:127.0.0.1:10810", tcp("127.0.0.1", 10810), ""),
            (
                "nbd:host.example:99:exportname=a:exportname=b",
                tcp("host.example", 99),
                "a:exportname=b",
            ),
            ("nbd:[::1]:10809:exportname=x", tcp("::1", 10809), "x"),
        ] {
            let u = NbdUri::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!((u.address, u.export.as_str()), (address, export), "{uri}");
        }
        for bad in [
            "nbd:",
            "nbd:unix:",
            "nbd:host",
            "nbd::10809",
            "nbd:host:port",
            "nbd:host:10809,ipv4=on",
            "nbd:[::1]",
            "nbd:unix:/s:exportname=",
        ] {
            assert!(is_nbd_name(bad), "{bad}");
            assert_eq!(
                NbdUri::parse(bad).unwrap_err().kind(),
                ErrorKind::InvalidInput,
                "{bad}"
            );
        }
        assert!(!is_nbd_name("nbd-disk.raw"));
        assert!(!is_nbd_name("./nbd:x"));
    }
}
