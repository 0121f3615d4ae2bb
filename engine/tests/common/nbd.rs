//! Helpers for the NBD tests: `backfill serve` as a child process, started and
//! stopped the way a user would, and a small raw NBD client written from the
//! protocol specification (`doc/proto.md` in NetworkBlockDevice/nbd), so that
//! the tests can send what no well-behaved client would.
//!
//! Synchronisation is by protocol, never by sleeping: the server is ready when
//! it has printed its `serving <image> at <uri>` line, and it is gone when
//! `wait` returns. The only clocks here are hang guards ([`HANG_GUARD`]): a
//! server that neither answers nor closes a connection, or never exits after
//! SIGTERM, turns into a failure that names what it was waiting for instead of
//! a test that never ends. They assert nothing about speed.
//!
//! Include it with `#[path = "common/nbd.rs"] mod nbd_common;` next to
//! `mod common;` (it uses `crate::common`).

// Each test binary uses a different subset.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// How long a test waits for something that must happen before it calls the
/// server hung. Generous: it only bounds a failure, it measures nothing.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

// ----------------------------------------------------------- protocol values

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_RESIZE: u16 = 1 << 9;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = 0x8001;
pub const CHUNK_ERROR_OFFSET: u16 = 0x8002;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// NBD error values (errno numbering, as the spec fixes them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The largest request the server accepts (its NBD_INFO_BLOCK_SIZE maximum).
pub const MAX_REQUEST: u32 = 32 << 20;

/// base:allocation of a range recorded as zero in the overlay (a zero
/// cluster): HOLE | ZERO, as qemu-nbd reports its zero clusters. It reads as
/// zeros and owns no host cluster (a write there allocates); the depth
/// context tells that the overlay holds it (depth 1).
pub const OVERLAY_ZERO: u32 = STATE_HOLE | STATE_ZERO;

pub const BASE_ALLOCATION: &str = "base:allocation";
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

// -------------------------------------------------------------------- server

/// A running `backfill serve`. Dropping it without [`Server::stop`] (a test
/// that panicked) kills the process and prints its stderr.
pub struct Server {
    child: Option<Child>,
    pid: libc::pid_t,
    /// The URI from the server's ready line.
    pub uri: String,
    /// The Unix socket, when serving on one.
    pub socket: Option<PathBuf>,
    /// The export name asked for (`""` by default).
    pub export: String,
    pub image: PathBuf,
    log: PathBuf,
    stdout: Option<BufReader<ChildStdout>>,
    /// The signal sent to stop it (0: none yet).
    signalled: std::sync::atomic::AtomicI32,
}

/// Distinct socket names for several servers in one directory.
static SOCKETS: AtomicUsize = AtomicUsize::new(0);

impl Server {
    /// Starts `backfill serve [ARGS] IMAGE`, on a fresh Unix socket in `dir`
    /// unless `args` has `--listen`, with `--cores 2` unless `args` has
    /// `--cores` (so that a request can cross cores, and a big machine does
    /// not start a thread per CPU for every test). Returns once the server
    /// has printed its ready line, which is checked against the arguments.
    pub fn start(dir: &Path, image: &Path, args: &[&str]) -> Server {
        Server::start_with(dir, image, args, |_| {})
    }

    /// Like [`Server::start`], with `prepare` applied to the command before
    /// it is spawned: a `pre_exec` that sets a resource limit, say.
    pub fn start_with(
        dir: &Path,
        image: &Path,
        args: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Server {
        let mut argv: Vec<String> = vec!["serve".into()];
        argv.extend(args.iter().map(|s| s.to_string()));
        let tcp = args.contains(&"--listen");
        let socket = if tcp {
            None
        } else {
            let n = SOCKETS.fetch_add(1, Ordering::Relaxed);
            let p = dir.join(format!("nbd{n}.sock"));
            // sun_path holds 108 bytes with its NUL.
            assert!(
                p.as_os_str().len() < 100,
                "socket path {} is too long for a Unix socket",
                p.display()
            );
            argv.push("--socket".into());
            argv.push(crate::common::path_str(&p));
            Some(p)
        };
        if !args.contains(&"--cores") {
            argv.push("--cores".into());
            argv.push("2".into());
        }
        let export = args
            .iter()
            .position(|a| *a == "--export")
            .map(|i| args[i + 1].to_string())
            .unwrap_or_default();
        argv.push(crate::common::path_str(image));

        let n = SOCKETS.fetch_add(1, Ordering::Relaxed);
        let log = dir.join(format!("serve{n}.log"));
        let log_file = std::fs::File::create(&log).expect("creating the server log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_backfill"));
        cmd.args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        prepare(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning backfill {argv:?}: {e}"));
        let pid = child.id() as libc::pid_t;

        // The ready line, read on a thread so that a server that never prints
        // it fails the test instead of hanging it.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let r = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send((r, reader));
        });
        let mut server = Server {
            child: Some(child),
            pid,
            uri: String::new(),
            socket,
            export,
            image: image.to_path_buf(),
            log,
            stdout: None,
            signalled: std::sync::atomic::AtomicI32::new(0),
        };
        let (line, reader) = match rx.recv_timeout(HANG_GUARD) {
            Ok((Ok(line), reader)) => (line, reader),
            Ok((Err(e), _)) => panic!("reading the server's stdout: {e}"),
            Err(_) => panic!(
                "backfill {argv:?} printed no ready line within {HANG_GUARD:?}\nstderr:\n{}",
                server.log_text()
            ),
        };
        server.stdout = Some(reader);
        if line.is_empty() {
            let status = server.child.as_mut().unwrap().wait().unwrap();
            server.child = None;
            panic!(
                "backfill {argv:?} exited ({status}) before it was ready\nstderr:\n{}",
                server.log_text()
            );
        }
        assert!(
            line.ends_with('\n'),
            "the ready line must be a whole line: {line:?}"
        );
        let line = line.trim_end_matches('\n');
        let (served, uri) = line
            .strip_prefix("serving ")
            .and_then(|rest| rest.rsplit_once(" at "))
            .unwrap_or_else(|| panic!("ready line is not `serving <image> at <uri>`: {line:?}"));
        let file_name = image.file_name().unwrap().to_str().unwrap();
        assert!(
            served.ends_with(file_name),
            "ready line names {served:?}, not the image {}",
            image.display()
        );
        match &server.socket {
            Some(sock) => assert_eq!(
                uri,
                format!("nbd+unix:///{}?socket={}", server.export, sock.display()),
                "ready line: {line:?}"
            ),
            None => {
                let port = tcp_port(uri);
                assert_ne!(port, 0, "the ready line must name the real port: {line:?}");
                assert!(
                    uri.ends_with(&format!(":{port}/{}", server.export)),
                    "ready line: {line:?}"
                );
            }
        }
        server.uri = uri.to_string();
        server
    }

    /// The Unix socket (panics for a TCP server).
    pub fn sock(&self) -> &Path {
        self.socket.as_deref().expect("a server on a Unix socket")
    }

    /// The URI of another export name on the same server.
    pub fn uri_for(&self, export: &str) -> String {
        match &self.socket {
            Some(sock) => format!("nbd+unix:///{export}?socket={}", sock.display()),
            None => format!("nbd://127.0.0.1:{}/{export}", tcp_port(&self.uri)),
        }
    }

    /// A raw client connection, just past the server's greeting.
    pub fn connect(&self) -> Handshake {
        Handshake::connect(self.sock())
    }

    /// A raw client in transmission: structured replies, both meta contexts,
    /// the default export.
    pub fn client(&self) -> Client {
        let mut h = self.connect();
        h.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        h.structured_reply();
        h.set_meta_context("", &[BASE_ALLOCATION, ALLOCATION_DEPTH]);
        h.go("")
    }

    /// The exit status, if the server has exited (without a signal from the
    /// test: it died). Reaps it, so that the test can report how it ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("server already stopped");
        let status = child.try_wait().expect("polling the server process")?;
        self.child = None;
        Some(status)
    }

    /// The next line the server prints on stdout after its ready line
    /// (empty if it closed stdout), within the hang guard.
    pub fn read_stdout_line(&mut self) -> String {
        let mut reader = self.stdout.take().expect("stdout already consumed");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let r = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send((r, reader));
        });
        match rx.recv_timeout(HANG_GUARD) {
            Ok((Ok(line), reader)) => {
                self.stdout = Some(reader);
                line
            }
            Ok((Err(e), _)) => panic!("reading the server's stdout: {e}"),
            Err(_) => panic!(
                "backfill serve printed no line on stdout within {HANG_GUARD:?}\nstderr:\n{}",
                self.log_text()
            ),
        }
    }

    /// What the server wrote on stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first line of stderr that contains `text`, once the server has
    /// written it. Polled with a hang guard; the pause only keeps the poll
    /// from spinning.
    pub fn wait_for_log_line(&self, text: &str) -> String {
        let guard = std::time::Instant::now() + HANG_GUARD;
        loop {
            let log = self.log_text();
            if let Some(line) = log.lines().find(|l| l.contains(text)) {
                return line.to_string();
            }
            assert!(
                std::time::Instant::now() < guard,
                "no line with {text:?} on stderr within {HANG_GUARD:?}:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Stops the server with SIGTERM and asserts a clean exit; returns
    /// what it printed on stderr.
    pub fn stop(self) -> String {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `signal`, waits for the exit, and asserts exit status 0 and that
    /// nothing but the ready line was printed on stdout; returns stderr.
    pub fn stop_with(self, signal: libc::c_int) -> String {
        self.signal(signal);
        self.wait_stopped()
    }

    /// Sends `signal` and returns at once.
    pub fn signal(&self, signal: libc::c_int) {
        assert!(self.child.is_some(), "server already stopped");
        // SAFETY: kill(2) has no memory effects; `pid` is our unreaped child,
        // so the id cannot have been reused.
        let r = unsafe { libc::kill(self.pid, signal) };
        assert_eq!(r, 0, "kill({}, {signal}) failed", self.pid);
        self.signalled.store(signal, Ordering::SeqCst);
    }

    /// After [`Server::signal`]: waits for the exit (with a hang guard) and
    /// asserts exit status 0 and nothing but the ready line on stdout;
    /// returns what it printed on stderr.
    pub fn wait_stopped(mut self) -> String {
        let signal = self.signalled.load(Ordering::SeqCst);
        assert_ne!(signal, 0, "no signal sent");
        let status = self.wait();
        let log = self.log_text();
        assert!(
            status.success(),
            "backfill serve exited with {status} after signal {signal}, not 0\nstderr:\n{log}"
        );
        let mut rest = String::new();
        if let Some(mut out) = self.stdout.take() {
            out.read_to_string(&mut rest).expect("reading stdout");
        }
        assert!(
            rest.is_empty(),
            "backfill serve printed more than its ready line on stdout: {rest:?}"
        );
        log
    }

    /// Reaps the process, with a hang guard.
    fn wait(&mut self) -> ExitStatus {
        let signal = self.signalled.load(Ordering::SeqCst);
        let mut child = self.child.take().expect("server already stopped");
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(HANG_GUARD) {
            Ok(status) => status.expect("waiting for the server"),
            Err(_) => {
                // SAFETY: kill(2) has no memory effects. The waiter has not
                // reported a reap, so the pid is still our hung child.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                let _ = waiter.join();
                panic!(
                    "backfill serve did not exit within {HANG_GUARD:?} of signal {signal}\nstderr:\n{}",
                    self.log_text()
                );
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- backfill serve stderr ({}) ---\n{}",
                    self.uri,
                    self.log_text()
                );
            }
        }
    }
}

/// The port of an `nbd://HOST:PORT/NAME` URI.
pub fn tcp_port(uri: &str) -> u16 {
    let rest = uri
        .strip_prefix("nbd://")
        .unwrap_or_else(|| panic!("not an nbd:// URI: {uri:?}"));
    let hostport = rest.split('/').next().unwrap();
    let port = hostport
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no port in {uri:?}"))
        .1;
    port.parse()
        .unwrap_or_else(|e| panic!("bad port in {uri:?}: {e}"))
}

/// The ranges `nbdinfo --map` of `uri` calls data (type 0, merged where
/// they touch); every other extent must be a hole that reads as zeros
/// (type 3).
pub fn nbdinfo_data(uri: &str) -> Vec<(u64, u64)> {
    crate::common::require_tool("nbdinfo");
    let map = crate::common::run_ok("nbdinfo", ["--map", uri]);
    let mut data: Vec<(u64, u64)> = Vec::new();
    for l in map.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        match (f[2], data.last_mut()) {
            ("0", Some((o, n))) if *o + *n == off => *n += len,
            ("0", _) => data.push((off, len)),
            ("3", _) => {}
            (t, _) => panic!("nbdinfo --map: type {t} in {l:?}\n{map}"),
        }
    }
    data
}

// ------------------------------------------------------------------ fixture

/// Images in a fresh directory: a raw backing file of seeded random bytes and
/// a qcow2 overlay on it made by `qemu-img create -f qcow2 -b base.raw -F raw`
/// (64 KiB clusters, compat 1.1), or an overlay without backing.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    /// The raw backing file (None without backing).
    pub base: Option<PathBuf>,
    pub image: PathBuf,
    /// What the disk reads as before any write: the backing bytes, or zeros.
    pub data: Vec<u8>,
}

pub const CLUSTER: u64 = 64 << 10;

impl Fixture {
    /// `size` need not be a multiple of the cluster size (only of 512).
    pub fn with_backing(prefix: &str, size: u64, seed: u64) -> Fixture {
        let dir = crate::common::tempdir(prefix);
        let base = dir.path().join("base.raw");
        let data = crate::common::write_random_file(&base, size, seed);
        let image = dir.path().join("disk.qcow2");
        let backing = crate::common::Backing {
            name: "base.raw".into(),
            format: "raw",
        };
        crate::common::create_qcow2(
            &image,
            size,
            CLUSTER,
            crate::common::Compat::V3,
            Some(&backing),
        );
        Fixture {
            dir,
            base: Some(base),
            image,
            data,
        }
    }

    pub fn without_backing(prefix: &str, size: u64) -> Fixture {
        let dir = crate::common::tempdir(prefix);
        let image = dir.path().join("disk.qcow2");
        crate::common::create_qcow2(&image, size, CLUSTER, crate::common::Compat::V3, None);
        Fixture {
            dir,
            base: None,
            image,
            data: vec![0; size as usize],
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn base(&self) -> &Path {
        self.base.as_deref().expect("a fixture with a backing file")
    }

    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// `backfill serve ARGS disk.qcow2`.
    pub fn serve(&self, args: &[&str]) -> Server {
        Server::start(self.dir.path(), &self.image, args)
    }

    /// After the server stopped: `qemu-img check` is clean and the overlay
    /// reads as `expected` (`qemu-img compare` against a raw file of it).
    pub fn check_image(&self, expected: &[u8]) {
        crate::common::check_clean(&self.image);
        crate::common::compare_with_bytes(&self.image, expected, self.dir.path());
    }
}

// ---------------------------------------------------------------- raw client

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// A name for an option reply type, for messages.
pub fn rep_name(t: u32) -> String {
    match t {
        REP_ACK => "ACK".into(),
        REP_SERVER => "SERVER".into(),
        REP_INFO => "INFO".into(),
        REP_META_CONTEXT => "META_CONTEXT".into(),
        REP_ERR_UNSUP => "ERR_UNSUP".into(),
        REP_ERR_POLICY => "ERR_POLICY".into(),
        REP_ERR_INVALID => "ERR_INVALID".into(),
        REP_ERR_PLATFORM => "ERR_PLATFORM".into(),
        REP_ERR_TLS_REQD => "ERR_TLS_REQD".into(),
        REP_ERR_UNKNOWN => "ERR_UNKNOWN".into(),
        REP_ERR_SHUTDOWN => "ERR_SHUTDOWN".into(),
        REP_ERR_BLOCK_SIZE_REQD => "ERR_BLOCK_SIZE_REQD".into(),
        REP_ERR_TOO_BIG => "ERR_TOO_BIG".into(),
        t => format!("{t:#x}"),
    }
}

/// One option reply.
#[derive(Clone)]
pub struct OptReply {
    pub option: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for OptReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OptReply {{ option: {}, type: {}, data: {:?} }}",
            self.option,
            rep_name(self.typ),
            String::from_utf8_lossy(&self.data)
        )
    }
}

impl OptReply {
    pub fn is_error(&self) -> bool {
        self.typ & REP_FLAG_ERROR != 0
    }
}

/// What NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE (or EXPORT_NAME) said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum), when the server sent it.
    pub block_size: Option<(u32, u32, u32)>,
}

/// The data of LIST_META_CONTEXT and SET_META_CONTEXT: the export name and
/// the queries, each with a u32 length.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// The data of GO and INFO: the export name (u32 length) and the info types
/// asked for (u16 count, u16 each).
pub fn go_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// How a connection ended when the test expected it to.
#[derive(Debug)]
pub struct Closed {
    /// Whatever the server sent before closing.
    pub bytes: Vec<u8>,
}

fn set_guards(s: &UnixStream) {
    s.set_read_timeout(Some(HANG_GUARD)).unwrap();
    s.set_write_timeout(Some(HANG_GUARD)).unwrap();
}

fn read_exact(s: &mut UnixStream, buf: &mut [u8], what: &str) {
    if let Err(e) = s.read_exact(buf) {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => panic!(
                "the server sent nothing for {HANG_GUARD:?} while the client waited for {what}"
            ),
            _ => panic!("reading {what}: {e}"),
        }
    }
}

fn write_all(s: &mut UnixStream, buf: &[u8], what: &str) {
    if let Err(e) = s.write_all(buf) {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                panic!("the server read nothing for {HANG_GUARD:?} while the client sent {what}")
            }
            _ => panic!("sending {what}: {e}"),
        }
    }
}

/// Reads until the server closes the connection; panics if it stays open.
/// A reset counts as closed (the server may close with unread data queued).
fn read_to_close(s: &mut UnixStream, what: &str) -> Closed {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Closed { bytes },
            Ok(n) => {
                bytes.extend_from_slice(&buf[..n]);
                assert!(
                    bytes.len() < (64 << 20),
                    "{what}: the server keeps sending instead of closing"
                );
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Closed { bytes },
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => panic!(
                "{what}: the server kept the connection open for {HANG_GUARD:?} (it should have closed it); \
                 it had sent {} bytes: {:02x?}",
                bytes.len(),
                &bytes[..bytes.len().min(64)]
            ),
            Err(e) => panic!("{what}: reading until close: {e}"),
        }
    }
}

/// A connection in the handshake phase. It remembers what the helpers
/// negotiated (structured replies, meta contexts) for the [`Client`].
pub struct Handshake {
    s: UnixStream,
    pub handshake_flags: u16,
    structured: bool,
    contexts: Vec<(u32, String)>,
}

impl Handshake {
    /// Connects and reads the greeting (NBDMAGIC, IHAVEOPT, handshake flags),
    /// which must offer fixed newstyle and no-zeroes.
    pub fn connect(sock: &Path) -> Handshake {
        let mut s = UnixStream::connect(sock)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
        set_guards(&s);
        let mut g = [0u8; 18];
        read_exact(&mut s, &mut g, "the greeting");
        assert_eq!(be64(&g), NBDMAGIC, "greeting: no NBDMAGIC: {g:02x?}");
        assert_eq!(be64(&g[8..]), IHAVEOPT, "greeting: not newstyle: {g:02x?}");
        let flags = be16(&g[16..]);
        assert_eq!(
            flags,
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            "handshake flags: fixed newstyle and no zeroes, nothing else"
        );
        Handshake {
            s,
            handshake_flags: flags,
            structured: false,
            contexts: Vec::new(),
        }
    }

    /// The socket, for sending what the helpers cannot.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.s
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        write_all(&mut self.s, bytes, "raw bytes");
    }

    pub fn send_client_flags(&mut self, flags: u32) {
        write_all(&mut self.s, &flags.to_be_bytes(), "client flags");
    }

    /// Sends one option (IHAVEOPT, option, length, data).
    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        write_all(&mut self.s, &m, "an option");
    }

    pub fn read_option_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        read_exact(&mut self.s, &mut h, "an option reply");
        assert_eq!(
            be64(&h),
            OPT_REPLY_MAGIC,
            "option reply magic: header {h:02x?}"
        );
        let len = be32(&h[16..]) as usize;
        assert!(len <= 1 << 20, "option reply of {len} bytes: {h:02x?}");
        let mut data = vec![0u8; len];
        read_exact(&mut self.s, &mut data, "option reply data");
        OptReply {
            option: be32(&h[8..]),
            typ: be32(&h[12..]),
            data,
        }
    }

    /// Sends an option and reads its replies, up to and including the final
    /// one (ACK or an error). Every reply must name the option.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data);
        let mut out = Vec::new();
        loop {
            let r = self.read_option_reply();
            assert_eq!(r.option, option, "reply to the wrong option: {r:?}");
            let last = r.typ == REP_ACK || r.is_error();
            assert!(
                last || matches!(r.typ, REP_SERVER | REP_INFO | REP_META_CONTEXT),
                "unexpected option reply {r:?}"
            );
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// An option whose only reply must be `expected` (ACK or an error).
    pub fn option_expect(&mut self, option: u32, data: &[u8], expected: u32) -> OptReply {
        let r = self.option(option, data);
        assert_eq!(
            r.len(),
            1,
            "option {option}: expected one {} reply, got {r:?}",
            rep_name(expected)
        );
        assert_eq!(
            r[0].typ,
            expected,
            "option {option}: expected {}, got {:?}",
            rep_name(expected),
            r[0]
        );
        r.into_iter().next().unwrap()
    }

    pub fn structured_reply(&mut self) {
        self.option_expect(OPT_STRUCTURED_REPLY, &[], REP_ACK);
        self.structured = true;
    }

    /// SET_META_CONTEXT; returns the (id, name) pairs the server selected,
    /// which the client will expect in BLOCK_STATUS replies.
    pub fn set_meta_context(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let c = self.meta_context(OPT_SET_META_CONTEXT, export, queries);
        let mut ids: Vec<u32> = c.iter().map(|x| x.0).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), c.len(), "context ids must be distinct: {c:?}");
        self.contexts = c.clone();
        c
    }

    pub fn list_meta_context(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.meta_context(OPT_LIST_META_CONTEXT, export, queries)
    }

    fn meta_context(&mut self, opt: u32, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let replies = self.option(opt, &meta_context_data(export, queries));
        let (last, contexts) = replies.split_last().unwrap();
        assert_eq!(last.typ, REP_ACK, "meta context option {opt}: {replies:?}");
        contexts
            .iter()
            .map(|r| {
                assert_eq!(r.typ, REP_META_CONTEXT, "{replies:?}");
                assert!(r.data.len() >= 4, "short META_CONTEXT reply {r:?}");
                let name = String::from_utf8(r.data[4..].to_vec())
                    .unwrap_or_else(|_| panic!("context name is not UTF-8: {r:?}"));
                (be32(&r.data), name)
            })
            .collect()
    }

    /// NBD_OPT_INFO or NBD_OPT_GO asking for the block size; the parsed
    /// answer, or the error reply.
    pub fn info_or_go(&mut self, option: u32, export: &str) -> Result<ExportInfo, OptReply> {
        let replies = self.option(option, &go_data(export, &[INFO_BLOCK_SIZE]));
        let (last, infos) = replies.split_last().unwrap();
        if last.is_error() {
            assert!(
                infos.is_empty(),
                "INFO replies before an error: {replies:?}"
            );
            return Err(last.clone());
        }
        let mut size_flags = None;
        let mut block_size = None;
        for r in infos {
            assert_eq!(r.typ, REP_INFO, "{replies:?}");
            assert!(r.data.len() >= 2, "short INFO reply {r:?}");
            match be16(&r.data) {
                INFO_EXPORT => {
                    assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length: {r:?}");
                    assert!(size_flags.is_none(), "two NBD_INFO_EXPORT: {replies:?}");
                    size_flags = Some((be64(&r.data[2..]), be16(&r.data[10..])));
                }
                INFO_BLOCK_SIZE => {
                    assert_eq!(r.data.len(), 14, "NBD_INFO_BLOCK_SIZE length: {r:?}");
                    block_size =
                        Some((be32(&r.data[2..]), be32(&r.data[6..]), be32(&r.data[10..])));
                }
                INFO_NAME | INFO_DESCRIPTION => {}
                t => panic!("unknown info type {t}: {r:?}"),
            }
        }
        let (size, flags) =
            size_flags.unwrap_or_else(|| panic!("no NBD_INFO_EXPORT before ACK: {replies:?}"));
        Ok(ExportInfo {
            size,
            flags,
            block_size,
        })
    }

    /// NBD_OPT_GO, which must succeed: the connection enters transmission.
    pub fn go(mut self, export: &str) -> Client {
        let info = self
            .info_or_go(OPT_GO, export)
            .unwrap_or_else(|r| panic!("NBD_OPT_GO {export:?} failed: {r:?}"));
        self.into_client(info)
    }

    /// NBD_OPT_EXPORT_NAME, which must succeed (no-zeroes was negotiated).
    pub fn export_name(mut self, export: &str) -> Client {
        self.send_option(OPT_EXPORT_NAME, export.as_bytes());
        let mut b = [0u8; 10];
        read_exact(&mut self.s, &mut b, "the NBD_OPT_EXPORT_NAME reply");
        let info = ExportInfo {
            size: be64(&b),
            flags: be16(&b[8..]),
            block_size: None,
        };
        self.into_client(info)
    }

    /// Call after GO or EXPORT_NAME succeeded by other means.
    pub fn into_client(self, info: ExportInfo) -> Client {
        Client {
            s: self.s,
            info,
            structured: self.structured,
            contexts: self.contexts,
            next_cookie: 0,
            pending: HashMap::new(),
            partial: HashMap::new(),
            done: HashMap::new(),
            peeked: None,
        }
    }

    /// Expects the server to close the connection (after whatever it sends).
    pub fn closed(mut self, what: &str) -> Closed {
        read_to_close(&mut self.s, what)
    }
}

/// A request the client sent and has no complete reply to yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    typ: u16,
    offset: u64,
    len: u32,
}

/// A request for [`Client::send_in_background`].
#[derive(Debug, Clone)]
pub struct Request {
    pub cookie: u64,
    pub flags: u16,
    pub typ: u16,
    pub offset: u64,
    pub len: u32,
    pub payload: Vec<u8>,
}

/// BLOCK_STATUS chunks: (context id, [(length, flags)]) for each context.
pub type StatusChunks = Vec<(u32, Vec<(u32, u32)>)>;

/// One complete reply: a simple reply, or all the chunks up to DONE.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub cookie: u64,
    /// A simple reply (not structured chunks).
    pub simple: bool,
    /// The first error (0: none).
    pub error: u32,
    pub error_message: String,
    pub error_offset: Option<u64>,
    /// OFFSET_DATA chunks (or a simple reply's data, at the request offset).
    pub data: Vec<(u64, Vec<u8>)>,
    /// OFFSET_HOLE chunks: (offset, length).
    pub holes: Vec<(u64, u32)>,
    pub status: StatusChunks,
    /// Chunk types in arrival order.
    pub chunks: Vec<u16>,
}

impl Reply {
    /// The bytes of a successful READ of `[offset, offset + len)`: the data
    /// and hole chunks must cover the range exactly, without overlap.
    pub fn assemble(&self, offset: u64, len: u32) -> Vec<u8> {
        assert_eq!(
            self.error,
            0,
            "assembling a failed read: {}",
            self.describe()
        );
        let mut pieces: Vec<(u64, u64, Option<&[u8]>)> = self
            .data
            .iter()
            .map(|(o, d)| (*o, d.len() as u64, Some(d.as_slice())))
            .chain(self.holes.iter().map(|(o, l)| (*o, *l as u64, None)))
            .collect();
        pieces.sort_by_key(|p| p.0);
        let mut out = vec![0u8; len as usize];
        let mut pos = offset;
        for (o, l, d) in pieces {
            assert!(l > 0, "empty read chunk at {o}: {}", self.describe());
            assert_eq!(
                o,
                pos,
                "read chunks of [{offset}, +{len}) leave a gap or overlap at {pos}: {}",
                self.describe()
            );
            assert!(
                o + l <= offset + len as u64,
                "read chunk [{o}, +{l}) outside [{offset}, +{len})"
            );
            if let Some(d) = d {
                let at = (o - offset) as usize;
                out[at..at + d.len()].copy_from_slice(d);
            }
            pos = o + l;
        }
        assert_eq!(
            pos,
            offset + len as u64,
            "read chunks of [{offset}, +{len}) stop at {pos}: {}",
            self.describe()
        );
        out
    }

    /// The content chunks (data and holes), for DF checks.
    pub fn content_chunks(&self) -> usize {
        self.data.len() + self.holes.len()
    }

    /// A short description for failure messages (no payload bytes).
    pub fn describe(&self) -> String {
        format!(
            "cookie {:#x}, {}, error {} {:?}{}, data chunks {:?}, holes {:?}, status {:?}, chunk types {:x?}",
            self.cookie,
            if self.simple { "simple" } else { "structured" },
            self.error,
            self.error_message,
            self.error_offset
                .map(|o| format!(" at offset {o}"))
                .unwrap_or_default(),
            self.data
                .iter()
                .map(|(o, d)| (*o, d.len()))
                .collect::<Vec<_>>(),
            self.holes,
            self.status,
            self.chunks
        )
    }
}

/// A connection in the transmission phase.
pub struct Client {
    s: UnixStream,
    pub info: ExportInfo,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The meta contexts selected: (id, name).
    pub contexts: Vec<(u32, String)>,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    partial: HashMap<u64, Reply>,
    done: HashMap<u64, Reply>,
    /// A byte `try_recv_any` read to tell a close from a message.
    peeked: Option<u8>,
}

impl Client {
    pub fn size(&self) -> u64 {
        self.info.size
    }

    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.s
    }

    /// The id of a selected meta context.
    pub fn context_id(&self, name: &str) -> u32 {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .unwrap_or_else(|| panic!("context {name} not negotiated: {:?}", self.contexts))
            .0
    }

    /// Cookies that are neither small nor consecutive, so that a server that
    /// truncates or invents them is caught.
    pub fn fresh_cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 << 63
    }

    /// Sends one request with a caller-chosen cookie; a WRITE's payload is
    /// `payload` (which may differ in length from `len`, for abuse).
    pub fn send_with_cookie(
        &mut self,
        cookie: u64,
        flags: u16,
        typ: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut m = encode_request(flags, typ, cookie, offset, len);
        m.extend_from_slice(payload);
        if typ != CMD_DISC {
            let old = self.pending.insert(cookie, Pending { typ, offset, len });
            assert!(old.is_none(), "cookie {cookie:#x} already in flight");
        }
        write_all(&mut self.s, &m, "a request");
    }

    /// Sends many requests from another thread, so that this one can read
    /// the replies meanwhile: a client that only writes would deadlock
    /// against a server that bounds its memory (it stops reading requests
    /// while its replies are not read). Join the handle after the replies.
    /// The thread's result is the send's: an error when the connection was
    /// closed before everything was sent.
    pub fn send_in_background(
        &mut self,
        reqs: Vec<Request>,
    ) -> std::thread::JoinHandle<std::io::Result<()>> {
        let mut bytes = Vec::new();
        for r in reqs {
            bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            bytes.extend_from_slice(&r.flags.to_be_bytes());
            bytes.extend_from_slice(&r.typ.to_be_bytes());
            bytes.extend_from_slice(&r.cookie.to_be_bytes());
            bytes.extend_from_slice(&r.offset.to_be_bytes());
            bytes.extend_from_slice(&r.len.to_be_bytes());
            bytes.extend_from_slice(&r.payload);
            let p = Pending {
                typ: r.typ,
                offset: r.offset,
                len: r.len,
            };
            let old = self.pending.insert(r.cookie, p);
            assert!(old.is_none(), "cookie {:#x} already in flight", r.cookie);
        }
        let mut s = self.s.try_clone().expect("cloning the socket");
        std::thread::spawn(move || s.write_all(&bytes))
    }

    /// Sends one request; returns its cookie.
    pub fn send(&mut self, flags: u16, typ: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        let cookie = self.fresh_cookie();
        self.send_with_cookie(cookie, flags, typ, offset, len, payload);
        cookie
    }

    /// Reads messages until some request's reply is complete, and returns
    /// it (whichever request that is: replies may come in any order).
    pub fn recv_any(&mut self) -> Reply {
        if let Some(&c) = self.done.keys().next() {
            return self.done.remove(&c).unwrap();
        }
        loop {
            if let Some(r) = self.recv_message() {
                return r;
            }
        }
    }

    /// Like [`Client::recv_any`], but `None` when the server closed the
    /// connection cleanly between two messages (a close in the middle of a
    /// message fails).
    pub fn try_recv_any(&mut self) -> Option<Reply> {
        if let Some(&c) = self.done.keys().next() {
            return self.done.remove(&c);
        }
        loop {
            let mut first = [0u8; 1];
            match self.s.read(&mut first) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("reading a reply: {e}"),
            }
            self.peeked = Some(first[0]);
            if let Some(r) = self.recv_message() {
                return Some(r);
            }
        }
    }

    /// The reply to `cookie`; replies to other requests that arrive first
    /// are kept for later.
    pub fn recv(&mut self, cookie: u64) -> Reply {
        loop {
            if let Some(r) = self.done.remove(&cookie) {
                return r;
            }
            assert!(
                self.pending.contains_key(&cookie) || self.partial.contains_key(&cookie),
                "no request with cookie {cookie:#x} in flight"
            );
            if let Some(r) = self.recv_message() {
                self.done.insert(r.cookie, r);
            }
        }
    }

    /// Requests still waiting for a (complete) reply.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Reads one message (a simple reply or one chunk); returns the reply it
    /// completed, if any.
    fn recv_message(&mut self) -> Option<Reply> {
        let mut m = [0u8; 4];
        match self.peeked.take() {
            Some(b) => {
                m[0] = b;
                read_exact(&mut self.s, &mut m[1..], "a reply");
            }
            None => read_exact(&mut self.s, &mut m, "a reply"),
        }
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                read_exact(&mut self.s, &mut h, "a simple reply header");
                let error = be32(&h);
                let cookie = be64(&h[4..]);
                let p = self.take_pending(cookie, "simple reply");
                assert!(
                    !self.partial.contains_key(&cookie),
                    "simple reply to cookie {cookie:#x} after structured chunks"
                );
                let mut r = Reply {
                    cookie,
                    simple: true,
                    error,
                    ..Reply::default()
                };
                if p.typ == CMD_READ && error == 0 {
                    assert!(
                        !self.structured,
                        "simple reply with data to READ (cookie {cookie:#x}) although structured \
                         replies were negotiated (proto.md: MUST NOT)"
                    );
                    let mut d = vec![0u8; p.len as usize];
                    read_exact(&mut self.s, &mut d, "simple reply data");
                    r.data.push((p.offset, d));
                }
                Some(r)
            }
            STRUCTURED_REPLY_MAGIC => {
                assert!(
                    self.structured,
                    "structured reply chunk without NBD_OPT_STRUCTURED_REPLY"
                );
                let mut h = [0u8; 16];
                read_exact(&mut self.s, &mut h, "a structured reply chunk header");
                let flags = be16(&h);
                let typ = be16(&h[2..]);
                let cookie = be64(&h[4..]);
                let len = be32(&h[12..]) as usize;
                assert!(
                    len <= MAX_REQUEST as usize + 64,
                    "chunk of {len} bytes (cookie {cookie:#x}, type {typ:#x})"
                );
                assert_eq!(
                    flags & !REPLY_FLAG_DONE,
                    0,
                    "unknown chunk flags {flags:#x} (cookie {cookie:#x})"
                );
                let mut payload = vec![0u8; len];
                read_exact(&mut self.s, &mut payload, "a chunk payload");
                let p = *self.pending.get(&cookie).unwrap_or_else(|| {
                    panic!("chunk type {typ:#x} for cookie {cookie:#x}, which is not in flight")
                });
                let r = self.partial.entry(cookie).or_insert_with(|| Reply {
                    cookie,
                    ..Reply::default()
                });
                r.chunks.push(typ);
                match typ {
                    CHUNK_NONE => {
                        assert_eq!(len, 0, "NONE chunk with a payload");
                        assert!(flags & REPLY_FLAG_DONE != 0, "NONE chunk without DONE");
                    }
                    CHUNK_OFFSET_DATA => {
                        assert_eq!(p.typ, CMD_READ, "OFFSET_DATA for command {}", p.typ);
                        assert!(len > 8, "OFFSET_DATA chunk of {len} bytes");
                        r.data.push((be64(&payload), payload[8..].to_vec()));
                    }
                    CHUNK_OFFSET_HOLE => {
                        assert_eq!(p.typ, CMD_READ, "OFFSET_HOLE for command {}", p.typ);
                        assert_eq!(len, 12, "OFFSET_HOLE chunk of {len} bytes");
                        r.holes.push((be64(&payload), be32(&payload[8..])));
                    }
                    CHUNK_BLOCK_STATUS => {
                        assert_eq!(
                            p.typ, CMD_BLOCK_STATUS,
                            "BLOCK_STATUS for command {}",
                            p.typ
                        );
                        assert!(
                            len >= 12 && (len - 4).is_multiple_of(8),
                            "BLOCK_STATUS chunk of {len} bytes"
                        );
                        let id = be32(&payload);
                        let ext = payload[4..]
                            .chunks_exact(8)
                            .map(|e| (be32(e), be32(&e[4..])))
                            .collect();
                        r.status.push((id, ext));
                    }
                    t if t & 0x8000 != 0 => {
                        assert!(len >= 6, "error chunk of {len} bytes");
                        let err = be32(&payload);
                        let msg_len = be16(&payload[4..]) as usize;
                        assert!(6 + msg_len <= len, "error message overruns its chunk");
                        assert_ne!(err, 0, "error chunk with error 0");
                        if r.error == 0 {
                            r.error = err;
                            r.error_message =
                                String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned();
                            if t == CHUNK_ERROR_OFFSET {
                                assert_eq!(len, 6 + msg_len + 8, "ERROR_OFFSET length");
                                r.error_offset = Some(be64(&payload[6 + msg_len..]));
                            }
                        }
                    }
                    t => panic!("unknown chunk type {t:#x} (cookie {cookie:#x})"),
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    self.pending.remove(&cookie);
                    Some(self.partial.remove(&cookie).unwrap())
                } else {
                    None
                }
            }
            other => panic!("reply magic {other:#010x} is neither simple nor structured"),
        }
    }

    fn take_pending(&mut self, cookie: u64, what: &str) -> Pending {
        self.pending
            .remove(&cookie)
            .unwrap_or_else(|| panic!("{what} for cookie {cookie:#x}, which is not in flight"))
    }

    /// Sends a request and waits for its reply.
    pub fn call(&mut self, flags: u16, typ: u16, offset: u64, len: u32, payload: &[u8]) -> Reply {
        let c = self.send(flags, typ, offset, len, payload);
        self.recv(c)
    }

    /// READ; the bytes, or the error.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.read_flags(offset, len, 0)
    }

    pub fn read_flags(&mut self, offset: u64, len: u32, flags: u16) -> Result<Vec<u8>, u32> {
        let r = self.call(flags, CMD_READ, offset, len, &[]);
        self.check_read_reply(&r);
        if r.error != 0 {
            return Err(r.error);
        }
        Ok(r.assemble(offset, len))
    }

    /// proto.md: with structured replies, READ never gets a simple reply.
    pub fn check_read_reply(&self, r: &Reply) {
        if self.structured {
            assert!(
                !r.simple,
                "simple reply to READ with structured replies negotiated: {}",
                r.describe()
            );
        }
    }

    /// A READ that must succeed.
    #[track_caller]
    pub fn read_ok(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.read(offset, len)
            .unwrap_or_else(|e| panic!("READ [{offset}, +{len}) failed with error {e}"))
    }

    /// WRITE; the error (0 for success).
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.call(flags, CMD_WRITE, offset, data.len() as u32, data)
            .error
    }

    #[track_caller]
    pub fn write_ok(&mut self, offset: u64, data: &[u8], flags: u16) {
        let e = self.write(offset, data, flags);
        assert_eq!(
            e,
            0,
            "WRITE [{offset}, +{}) failed with error {e}",
            data.len()
        );
    }

    /// A command without payload or data in its reply (FLUSH, TRIM, CACHE,
    /// WRITE_ZEROES); the error (0 for success).
    pub fn command(&mut self, typ: u16, flags: u16, offset: u64, len: u32) -> u32 {
        let r = self.call(flags, typ, offset, len, &[]);
        assert!(
            r.data.is_empty() && r.holes.is_empty() && r.status.is_empty(),
            "command {typ} got a reply with content: {}",
            r.describe()
        );
        r.error
    }

    #[track_caller]
    pub fn flush_ok(&mut self) {
        let e = self.command(CMD_FLUSH, 0, 0, 0);
        assert_eq!(e, 0, "FLUSH failed with error {e}");
    }

    /// BLOCK_STATUS; one (context id, extents) per selected context.
    pub fn block_status(&mut self, offset: u64, len: u32, flags: u16) -> Result<StatusChunks, u32> {
        let r = self.call(flags, CMD_BLOCK_STATUS, offset, len, &[]);
        if r.error != 0 {
            return Err(r.error);
        }
        assert!(!r.simple, "BLOCK_STATUS answered by a simple reply");
        Ok(r.status)
    }

    /// The whole map of one context over `[offset, offset + len)` as merged
    /// (start, length, flags) extents, asking again where a reply stops
    /// short. Checks the reply's shape on the way: one chunk per context,
    /// non-empty extents, a final extent that may run past the request only
    /// when it is the last one.
    pub fn status_map(&mut self, ctx: &str, offset: u64, len: u64) -> Vec<(u64, u64, u32)> {
        let id = self.context_id(ctx);
        let end = offset + len;
        let mut pos = offset;
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        while pos < end {
            let ask = (end - pos).min(u32::MAX as u64 & !4095) as u32;
            let chunks = self
                .block_status(pos, ask, 0)
                .unwrap_or_else(|e| panic!("BLOCK_STATUS [{pos}, +{ask}) failed with error {e}"));
            let mut ids: Vec<u32> = chunks.iter().map(|c| c.0).collect();
            ids.sort_unstable();
            let mut want: Vec<u32> = self.contexts.iter().map(|c| c.0).collect();
            want.sort_unstable();
            assert_eq!(ids, want, "one BLOCK_STATUS chunk per selected context");
            let ext = &chunks.iter().find(|c| c.0 == id).unwrap().1;
            assert!(!ext.is_empty(), "BLOCK_STATUS chunk without extents");
            for (i, &(l, flags)) in ext.iter().enumerate() {
                assert!(l > 0, "zero-length extent in {ext:?}");
                let l = l as u64;
                assert!(
                    pos + l <= end || i == ext.len() - 1,
                    "extent {i} of {ext:?} runs past the request end {end}"
                );
                let l = l.min(end - pos);
                match out.last_mut() {
                    Some(last) if last.2 == flags && last.0 + last.1 == pos => last.1 += l,
                    _ => out.push((pos, l, flags)),
                }
                pos += l;
            }
        }
        out
    }

    /// NBD_CMD_DISC: the server must close the connection, sending nothing.
    pub fn disconnect(mut self) {
        self.send_with_cookie(0, 0, CMD_DISC, 0, 0, &[]);
        let c = read_to_close(&mut self.s, "after NBD_CMD_DISC");
        assert!(
            c.bytes.is_empty(),
            "the server replied to NBD_CMD_DISC: {:02x?}",
            &c.bytes[..c.bytes.len().min(64)]
        );
    }

    /// Expects the server to close the connection (after whatever it sends).
    pub fn closed(mut self, what: &str) -> Closed {
        read_to_close(&mut self.s, what)
    }
}

/// The flags of the extent covering `at` in a merged map.
pub fn flags_at(map: &[(u64, u64, u32)], at: u64) -> u32 {
    map.iter()
        .find(|(o, l, _)| *o <= at && at < o + l)
        .unwrap_or_else(|| panic!("no extent covers {at}: {map:?}"))
        .2
}

/// Merges adjacent (start, length, value) extents with the same value.
pub fn merge_extents(v: &[(u64, u64, u32)]) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for &(o, l, f) in v {
        match out.last_mut() {
            Some(last) if last.2 == f && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, f)),
        }
    }
    out
}

/// The 28 bytes of a request header (doc/proto.md, "Request message").
pub fn encode_request(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(28);
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&typ.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m
}
