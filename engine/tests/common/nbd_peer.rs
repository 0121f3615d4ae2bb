//! nbdkit and qemu-nbd as the NBD servers of a backing image: real peers
//! started as child processes, stopped (and reaped) when dropped.
//!
//! Synchronisation: a server is ready when it has written its pid file
//! (qemu-nbd and nbdkit both write it once they accept connections); it is
//! gone when `wait` returns. No sleeps stand in for either; the only clock
//! is a hang guard ([`READY_GUARD`]) that turns a server that never gets
//! ready into a failure naming it.
//!
//! Include it with `#[path = "common/nbd_peer.rs"] mod nbd_peer;` next to
//! `mod common;` (it uses `crate::common`).

// Each test binary uses a different subset.
#![allow(dead_code)]

use crate::common::{path_str, require_tool};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to become ready before the test calls it
/// hung. It bounds a failure; it measures nothing.
pub const READY_GUARD: Duration = Duration::from_secs(60);

/// A running NBD server (qemu-nbd or nbdkit) serving a backing image. Its
/// output goes to a log file, printed when a test panics while it runs.
pub struct Peer {
    child: Option<Child>,
    what: String,
    log: PathBuf,
}

impl Peer {
    /// Runs `program args` with its log in `dir`; returns once it wrote
    /// `pid_file`, which both servers do when they accept connections.
    pub fn start(dir: &Path, program: &str, args: &[String], pid_file: &Path) -> Peer {
        require_tool(program);
        let _ = std::fs::remove_file(pid_file);
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = dir.join(format!("{program}-{n}.log"));
        let out = std::fs::File::create(&log).expect("creating a server log");
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("cloning the log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {program} {args:?}: {e}"));
        let what = format!("{program} {}", args.join(" "));
        let guard = Instant::now() + READY_GUARD;
        // Polls for the pid file (the servers' readiness signal); the pause
        // only keeps the poll from spinning.
        while !std::fs::read_to_string(pid_file).is_ok_and(|s| s.ends_with('\n')) {
            if let Some(status) = child.try_wait().expect("waiting for the server") {
                panic!(
                    "{what} exited ({status}) before it was ready:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < guard, "{what} never became ready");
            std::thread::sleep(Duration::from_millis(2));
        }
        Peer {
            child: Some(child),
            what,
            log,
        }
    }

    /// Stops the server with `signal` and waits until it is gone.
    pub fn stop_with(mut self, signal: libc::c_int) {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) with the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        child.wait().expect("waiting for the server to exit");
    }

    /// Stops the server with SIGTERM. nbdkit waits for its clients to leave
    /// before it exits.
    pub fn stop(self) {
        self.stop_with(libc::SIGTERM);
    }

    /// Waits until the server exits on its own (nbdkit's exitlast filter:
    /// once its last client has gone); its exit status.
    pub fn wait_exit(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        child.wait().expect("waiting for the server to exit")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!(
                    "{} log:\n{}",
                    self.what,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
        }
    }
}

/// `nbdkit [--filter=F]... file IMAGE [PARAMS]` on Unix socket `sock`, its
/// pid file and log in `dir`. It exits with the test process.
pub fn nbdkit(dir: &Path, sock: &Path, image: &Path, filters: &[&str], params: &[&str]) -> Peer {
    let mut plugin = vec!["file".to_string(), path_str(image)];
    plugin.extend(params.iter().map(|p| p.to_string()));
    nbdkit_plugin(dir, sock, filters, &plugin)
}

/// `nbdkit [--filter=F]... PLUGIN [PARAMS]` (`plugin` is the plugin's name
/// and its parameters) on Unix socket `sock`, as [`nbdkit`].
pub fn nbdkit_plugin(dir: &Path, sock: &Path, filters: &[&str], plugin: &[String]) -> Peer {
    let pid = dir.join("nbdkit.pid");
    let _ = std::fs::remove_file(sock);
    let mut args: Vec<String> = vec![
        "-f".into(),
        "--exit-with-parent".into(),
        "-U".into(),
        path_str(sock),
        "-P".into(),
        path_str(&pid),
    ];
    args.extend(filters.iter().map(|f| format!("--filter={f}")));
    args.extend_from_slice(plugin);
    Peer::start(dir, "nbdkit", &args, &pid)
}

/// `qemu-nbd -r -t -e 16 -f raw IMAGE` on `listen` (`-k SOCKET` or `-b HOST
/// -p PORT`), its pid file and log in `dir`.
pub fn qemu_nbd(dir: &Path, image: &Path, listen: &[String]) -> Peer {
    qemu_nbd_for(dir, image, listen, 16)
}

/// [`qemu_nbd`] taking `clients` at a time (`-e`); qemu-nbd's default is
/// one: it then leaves further connections waiting, ungreeted, until the
/// one it serves closes.
pub fn qemu_nbd_for(dir: &Path, image: &Path, listen: &[String], clients: u32) -> Peer {
    let pid = dir.join("qemu-nbd.pid");
    let clients = clients.to_string();
    let mut args: Vec<String> = ["-r", "-t", "-e", &clients, "-f", "raw", "--pid-file"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(path_str(&pid));
    args.extend(listen.iter().cloned());
    args.push(path_str(image));
    Peer::start(dir, "qemu-nbd", &args, &pid)
}

/// The URI of the default export on Unix socket `sock`, as qemu writes it
/// into an overlay's header.
pub fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// A path in `dir` for a Unix socket, checked against the length limit of
/// `sun_path`.
pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    assert!(p.as_os_str().len() < 100, "socket path too long: {p:?}");
    p
}

/// A gate in front of one read of a [`gated_nbdkit`] server: its first
/// read at the gated offset waits until [`Gate::open`]. A test that fails
/// while the read waits opens it when the gate is dropped, so that a disk
/// or server closing after it does not wait for that read: bind the gate
/// after them, so that it drops first.
pub struct Gate {
    fifo: PathBuf,
    opened: PathBuf,
}

impl Gate {
    /// Lets the waiting read (and every later one) through.
    pub fn open(&self) {
        std::fs::write(&self.opened, b"").expect("marking the gate open");
        std::fs::write(&self.fifo, "go\n").expect("opening the gate");
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if !std::thread::panicking() {
            return;
        }
        let _ = std::fs::write(&self.opened, b"");
        // Non-blocking: nobody may be reading the FIFO any more.
        let fifo = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.fifo);
        if let Ok(mut f) = fifo {
            let _ = f.write_all(b"go\n");
        }
    }
}

/// nbdkit's eval plugin serving `image` (`size` bytes) on Unix socket
/// `sock`, reads in parallel, the first read at offset `gated` held until
/// the returned [`Gate`] opens (a FIFO its shell reads; a marker file lets
/// later reads of that offset through).
pub fn gated_nbdkit(dir: &Path, sock: &Path, image: &Path, size: u64, gated: u64) -> (Peer, Gate) {
    let gate = Gate {
        fifo: dir.join("gate"),
        opened: dir.join("gate-opened"),
    };
    crate::common::run_ok("mkfifo", [path_str(&gate.fifo)]);
    let pread = format!(
        "if [ \"$4\" = {gated} ] && [ ! -e '{}' ]; then read line < '{}'; fi; \
         exec dd if='{}' iflag=skip_bytes,count_bytes skip=\"$4\" count=\"$3\" status=none",
        path_str(&gate.opened),
        path_str(&gate.fifo),
        path_str(image)
    );
    let eval = [
        "eval".to_string(),
        "thread_model=echo parallel".into(),
        format!("get_size=echo {size}"),
        format!("pread={pread}"),
    ];
    (nbdkit_plugin(dir, sock, &[], &eval), gate)
}

/// The reads nbdkit's log filter recorded in `log`, as (offset, count).
pub fn logged_reads(log: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let hex = |line: &str, key: &str| -> u64 {
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in log line {line:?}"));
        u64::from_str_radix(v.trim_start_matches("0x"), 16)
            .unwrap_or_else(|e| panic!("{key}{v} in {line:?}: {e}"))
    };
    text.lines()
        .filter(|l| l.contains(" Read id="))
        .map(|l| (hex(l, "offset="), hex(l, "count=")))
        .collect()
}
