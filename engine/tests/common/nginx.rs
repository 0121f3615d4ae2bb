//! nginx on loopback as the HTTP(S) server for backing-image tests.
//!
//! Each [`Nginx`] is a real nginx started in the foreground with its own
//! prefix directory, configuration, pid file and error log, on a free port
//! of 127.0.0.1, and killed when dropped. nginx cannot listen on port 0, so
//! the port comes from a std listener bound to port 0 and dropped; if
//! something else takes it before nginx does, nginx exits with "Address
//! already in use" and we try another port.
//!
//! Readiness is by observation, not by sleeping: nginx writes its pid file
//! only after it has bound its listening socket, so the server is ready once
//! the pid file names our child and a TCP connection to the port succeeds.
//! The polling has a bounded number of attempts ([`READY_ATTEMPTS`]) and
//! fails with the error log if nginx never gets there.
//!
//! Include it with `#[path = "common/nginx.rs"] mod nginx_common;` next to
//! `mod common;` (it uses `crate::common`).

// Each test binary uses a different subset.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Polls for readiness at most this many times, [`READY_POLL`] apart: a
/// bound on a failure, not a measurement (60 s in all).
pub const READY_ATTEMPTS: u32 = 6000;
pub const READY_POLL: Duration = Duration::from_millis(10);
/// Ports tried before giving up when each one is taken by someone else.
const PORT_ATTEMPTS: u32 = 20;

/// The nginx binary: on PATH, or in /usr/sbin where Debian puts it (not on
/// an ordinary user's PATH). Panics, naming the package, if there is none:
/// these tests have no meaning without their server and never skip.
pub fn nginx_binary() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"));
    for path in candidates {
        // `nginx -v` (it has no --version) proves the binary runs.
        if let Ok(out) = Command::new(&path).arg("-v").output() {
            if out.status.success() {
                return path;
            }
        }
    }
    panic!(
        "required tool `nginx` is missing; install it (Debian package nginx). These tests never \
         skip{}",
        if crate::common::ci() {
            " (CI=true)"
        } else {
            ""
        }
    );
}

/// TLS material for an https server: files in PEM.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A running nginx, stopped (and reaped) on drop, which must come before
/// its directory is removed: stopping goes through the pid file.
pub struct Nginx {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    https: bool,
}

impl Nginx {
    /// Starts nginx serving the files under `root`, with `server_extra`
    /// (directives inside the `server` block, e.g. `keepalive_requests 2;`
    /// or `location ...`; `{PORT}` in it stands for the port, e.g. for
    /// `listen [::1]:{PORT};`) and TLS when `tls` is given. `dir` holds its
    /// configuration, logs and temporary files.
    pub fn start(dir: &Path, root: &Path, server_extra: &str, tls: Option<&TlsFiles>) -> Nginx {
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = crate::common::free_port();
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, config(dir, root, port, server_extra, tls)).unwrap();
            let pid_file = dir.join("nginx.pid");
            let error_log = dir.join("logs/error.log");
            let _ = std::fs::remove_file(&error_log);
            let child = spawn(dir);
            let mut server = Nginx {
                child,
                port,
                dir: dir.to_path_buf(),
                https: tls.is_some(),
            };
            match server.wait_ready(&pid_file) {
                Ok(()) => return server,
                Err(exited) => {
                    last_log = std::fs::read_to_string(&error_log).unwrap_or_default();
                    assert!(
                        exited && last_log.contains("Address already in use"),
                        "nginx did not start on port {port} (exited: {exited}); error log:\n{last_log}"
                    );
                    // Someone took the port between our probe and nginx's
                    // bind: try another one.
                }
            }
        }
        panic!("nginx found no free port in {PORT_ATTEMPTS} attempts; last error log:\n{last_log}");
    }

    /// Stops nginx, as on drop, until [`Nginx::restart`].
    pub fn stop_for_now(&mut self) {
        self.stop();
    }

    /// Starts nginx again (stopping it first if it runs) with the same
    /// configuration, on the same port; returns once it serves again.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(&self.dir);
        if let Err(exited) = self.wait_ready(&self.dir.join("nginx.pid")) {
            panic!(
                "nginx did not start again on port {} (exited: {exited}); error log:\n{}",
                self.port,
                self.error_log()
            );
        }
    }

    /// `nginx -s stop` (SIGTERM to the master), which stops its workers
    /// and waits for them before it exits; killing the master outright
    /// would leave the workers running, orphaned. Returns once it exited.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() && self.signal("stop").is_ok() {
            for _ in 0..READY_ATTEMPTS {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(READY_POLL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Ok once nginx has bound its port; Err(true) if it exited first,
    /// Err(false) if it is still not ready after [`READY_ATTEMPTS`] polls.
    fn wait_ready(&mut self, pid_file: &Path) -> Result<(), bool> {
        let pid = self.child.id().to_string();
        for _ in 0..READY_ATTEMPTS {
            if self.child.try_wait().unwrap().is_some() {
                return Err(true);
            }
            let written = std::fs::read_to_string(pid_file).is_ok_and(|s| s.trim() == pid);
            if written && TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(READY_POLL);
        }
        Err(false)
    }

    /// Reloads the configuration (`nginx -s reload`) and waits until the
    /// old worker processes have exited. A worker that is told to stop
    /// closes its idle keep-alive connections at once, without a word to
    /// the client, and exits when it has no connection left: when this
    /// returns, every idle connection to the server has been closed by it.
    pub fn reload_and_wait_for_old_workers(&mut self) {
        let master = self.child.id();
        let old = children_of(master);
        assert!(!old.is_empty(), "nginx master {master} has no worker");
        if let Err(e) = self.signal("reload") {
            panic!("nginx -s reload: {e}");
        }
        for _ in 0..READY_ATTEMPTS {
            if old
                .iter()
                .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            {
                return;
            }
            std::thread::sleep(READY_POLL);
        }
        panic!(
            "nginx's old workers {old:?} did not exit after a reload; error log:\n{}",
            self.error_log()
        );
    }

    /// `nginx -s SIGNAL` for this server (through its pid file).
    fn signal(&self, signal: &str) -> Result<(), String> {
        let out = Command::new(nginx_binary())
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .arg("-e")
            .arg(self.dir.join("logs/error.log"))
            .arg("-g")
            .arg(format!(
                "daemon off; pid {};",
                self.dir.join("nginx.pid").display()
            ))
            .args(["-s", signal])
            .output()
            .map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }

    /// The URL of `path` (relative to the server's root, no leading slash).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/{path}", self.port)
    }

    /// The error log so far (for failure messages).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts nginx in the foreground with the configuration in `dir`
/// (`nginx.conf`), its pid file there and its error log in `dir/logs`.
fn spawn(dir: &Path) -> Child {
    let nginx = nginx_binary();
    let pid_file = dir.join("nginx.pid");
    let _ = std::fs::remove_file(&pid_file);
    Command::new(&nginx)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("logs/error.log"))
        .arg("-g")
        .arg(format!("daemon off; pid {};", pid_file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", nginx.display()))
}

/// The processes whose parent is `pid` (from /proc/*/stat).
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses,
        // so the fields are counted from the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|f| f.parse::<u32>().ok());
        if ppid == Some(pid) {
            children.push(child);
        }
    }
    children
}

fn config(
    dir: &Path,
    root: &Path,
    port: u16,
    server_extra: &str,
    tls: Option<&TlsFiles>,
) -> String {
    let d = dir.display();
    let listen = match tls {
        Some(files) => format!(
            "listen 127.0.0.1:{port} ssl;\n        ssl_certificate {};\n        \
             ssl_certificate_key {};",
            files.cert.display(),
            files.key.display()
        ),
        None => format!("listen 127.0.0.1:{port};"),
    };
    // `user` matters only when nginx starts as root (as in CI): its workers
    // then keep root's rights, so that they can read the test's files
    // wherever the checkout lives. As an ordinary user nginx ignores it.
    let user = if is_root() { "user root root;" } else { "" };
    format!(
        r#"{user}
worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log {d}/logs/access.log;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        {listen}
        root {root};
        {server_extra}
    }}
}}
"#,
        root = root.display(),
        server_extra = server_extra.replace("{PORT}", &port.to_string()),
    )
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Makes a throw-away certificate authority and a server certificate it
/// signed for 127.0.0.1 and localhost, with the `openssl` command line
/// tool (an independent implementation of X.509, not the code under test).
/// Returns the CA certificate (what a client must trust) and the server's
/// certificate and key.
pub fn make_test_ca(dir: &Path) -> (PathBuf, TlsFiles) {
    std::fs::create_dir_all(dir).unwrap();
    let p = |name: &str| dir.join(name);
    let ext = p("server.ext");
    std::fs::write(
        &ext,
        "basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature\n\
         extendedKeyUsage = serverAuth\n\
         subjectAltName = IP:127.0.0.1, DNS:localhost\n",
    )
    .unwrap();
    let s = |path: PathBuf| path.to_str().unwrap().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca_args = vec!["req", "-x509"];
    ca_args.extend(ec);
    let (ca_key, ca_pem) = (s(p("ca.key")), s(p("ca.pem")));
    ca_args.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_pem,
        "-days",
        "2",
        "-subj",
        "/CN=backfill test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca_args);
    let (key, csr, cert) = (s(p("server.key")), s(p("server.csr")), s(p("server.pem")));
    let mut req_args = vec!["req"];
    req_args.extend(ec);
    req_args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"]);
    openssl(&req_args);
    let ext = s(ext);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &cert,
        "-days",
        "2",
        "-extfile",
        &ext,
    ]);
    (
        PathBuf::from(ca_pem),
        TlsFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        },
    )
}

/// Runs `openssl ARGS`, which must succeed. (`openssl` has no `--version`,
/// so `common::require_tool` cannot check it.)
fn openssl(args: &[&str]) {
    let out =
        Command::new("openssl")
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!(
            "required tool `openssl` is missing ({e}); install it (Debian package openssl). \
             These tests never skip{}",
            if crate::common::ci() { " (CI=true)" } else { "" }
        )
            });
    assert!(
        out.status.success(),
        "openssl {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
