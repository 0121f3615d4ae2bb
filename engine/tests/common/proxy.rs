//! tinyproxy on loopback as the HTTP proxy for backing-image tests: a real
//! forward proxy (plain http requests in absolute form, `CONNECT` tunnels
//! for https), started in the foreground with its own configuration and log
//! on a free port of 127.0.0.1, and killed when dropped.
//!
//! Readiness is by observation: the proxy is ready once its port accepts a
//! connection, polled a bounded number of times ([`READY_ATTEMPTS`]); if
//! tinyproxy exits first (someone took the port), another port is tried.
//!
//! Include it with `#[path = "common/proxy.rs"] mod proxy_common;`.

// Each test binary uses a different subset.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Polls for readiness at most this many times, [`READY_POLL`] apart: a
/// bound on a failure, not a measurement (60 s in all).
const READY_ATTEMPTS: u32 = 6000;
const READY_POLL: Duration = Duration::from_millis(10);
const PORT_ATTEMPTS: u32 = 20;

pub struct Tinyproxy {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Tinyproxy {
    /// Starts tinyproxy with its files in `dir`; with `basic_auth`, it
    /// requires that user and password (`Proxy-Authorization: Basic`).
    pub fn start(dir: &Path, basic_auth: Option<(&str, &str)>) -> Tinyproxy {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        for _ in 0..PORT_ATTEMPTS {
            let port = crate::common::free_port();
            let auth = basic_auth
                .map(|(user, password)| format!("BasicAuth {user} {password}\n"))
                .unwrap_or_default();
            std::fs::write(
                &conf,
                format!(
                    "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Info\n\
                     MaxClients 200\nAllow 127.0.0.1\nDisableViaHeader Yes\n{auth}",
                    log.display()
                ),
            )
            .unwrap();
            let _ = std::fs::remove_file(&log);
            let child = Command::new("tinyproxy")
                .arg("-d")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "starting tinyproxy: {e}; install it (Debian package tinyproxy-bin). \
                         These tests never skip"
                    )
                });
            let mut proxy = Tinyproxy {
                child,
                port,
                log: log.clone(),
            };
            for _ in 0..READY_ATTEMPTS {
                if proxy.child.try_wait().unwrap().is_some() {
                    break;
                }
                if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                    return proxy;
                }
                std::thread::sleep(READY_POLL);
            }
            let exited = proxy.child.try_wait().unwrap().is_some();
            assert!(
                exited,
                "tinyproxy did not listen on port {port}; log:\n{}",
                proxy.log_text()
            );
        }
        panic!("tinyproxy found no free port in {PORT_ATTEMPTS} attempts");
    }

    /// The proxy's URL, with `userinfo@` if given.
    pub fn url(&self, userinfo: &str) -> String {
        match userinfo {
            "" => format!("http://127.0.0.1:{}", self.port),
            u => format!("http://{u}@127.0.0.1:{}", self.port),
        }
    }

    /// What tinyproxy logged so far (a line per request it forwarded).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
