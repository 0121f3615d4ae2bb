//! Overlays whose backing image is served over HTTP(S) by a real nginx on
//! loopback (`qemu-img create -b http://... -F raw`, or `backfill create`).
//!
//! * `copy_on_read_over_http`: an overlay `backfill create` made on a URL
//!   (size from the server) reads equal to the file, many requests in
//!   flight on two cores; a second read fetches nothing; `qemu-img check`
//!   is clean and `qemu-img map` shows everything in the overlay; with the
//!   backing reference dropped (`qemu-img rebase -u -b ''`), `qemu-img
//!   compare` finds it equal to the file.
//! * `an_overlay_on_a_redirecting_url`: the URL in the overlay redirects
//!   (301) to the file: QEMU and backfill both follow it; a cold read and
//!   `backfill stream` end with a standalone overlay equal to the file.
//! * `credentials_in_the_url_are_sent_as_basic_authentication`: nginx with
//!   `auth_basic`; the overlay's URL carries the user and password, which
//!   QEMU and backfill both send; a wrong or missing password is a 401 at
//!   open, and the message hides the password.
//! * `the_cli_goes_through_the_proxy_in_the_environment`: `backfill stream`
//!   with `http_proxy` set to tinyproxy: its log shows the requests, and the
//!   overlay ends standalone and identical; with the proxy gone, it fails
//!   naming the proxy.
//! * `changed_remote_image_is_a_clear_error`: the file is replaced under
//!   nginx after part of the disk was read: a cold read fails with an error
//!   that says the remote image changed, the parts already in the overlay
//!   still read right, and the overlay checks clean.
//! * `cut_responses_are_fetched_again_whole`: a hand-written server (no
//!   real one cuts bodies on purpose) sends every third range response
//!   as half a body of wrong bytes and then closes: each such fetch is
//!   retried, the bytes placed straight into the fill buffers by the
//!   failed attempt are all overwritten, and the disk reads equal to the
//!   file, cold and after a reopen.
//! * `https_with_a_private_ca_through_the_cli`: `backfill convert
//!   --copy-on-read` over an https URL whose CA is given by `SSL_CERT_FILE`;
//!   without it the certificate is refused with a clear error; everything
//!   is in the overlay afterwards (checked with the backing reference
//!   dropped, since qemu's curl driver does not trust the private CA).

mod common;
#[path = "common/nginx.rs"]
mod nginx_common;
#[path = "common/proxy.rs"]
mod proxy_common;

use common::*;
use nginx_common::{make_test_ca, Nginx, TlsFiles};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

struct Site {
    nginx: Nginx,
    www: PathBuf,
    dir: tempfile::TempDir,
}

fn site(name: &str, tls: Option<&TlsFiles>) -> Site {
    site_with(name, "", tls)
}

/// [`site`] with `server_extra` in nginx's server block.
fn site_with(name: &str, server_extra: &str, tls: Option<&TlsFiles>) -> Site {
    let dir = tempdir(name);
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let nginx = Nginx::start(&dir.path().join("nginx"), &www, server_extra, tls);
    Site { nginx, www, dir }
}

fn backfill_env_output(args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(backfill_bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running backfill")
}

fn backfill_env_ok(args: &[&str], env: &[(&str, &Path)]) -> String {
    let out = backfill_env_output(args, env);
    assert!(
        out.status.success(),
        "backfill {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads `[off, off+len)` of the disk with many requests in flight.
fn read_parallel(disk: &backfill::Disk, off: u64, len: u64, chunk: u64) -> Vec<u8> {
    let mut pending = Vec::new();
    let mut at = off;
    while at < off + len {
        let n = chunk.min(off + len - at);
        pending.push(disk.submit_read(at, vec![0u8; n as usize]));
        at += n;
    }
    let mut out = Vec::with_capacity(len as usize);
    for p in pending {
        out.extend_from_slice(&p.wait().unwrap());
    }
    out
}

/// nginx stops while a disk reads over it, and starts again on the same
/// port: a read while it is down fails (after its retries) with an error
/// that names the URL, which `Disk::last_remote_error` keeps; what the
/// overlay holds reads on; once the server is back, the same read and the
/// rest of the disk come right, and the overlay ends holding all of it.
#[test]
fn reads_continue_after_the_http_server_restarts() {
    let mut s = site("http-restart", None);
    let size = 4 * MIB;
    let bytes = write_random_file(&s.www.join("base.raw"), size, 23);
    let image = s.dir.path().join("ov.qcow2");
    let url = s.nginx.url("base.raw");
    backfill_env_ok(&["create", "-b", &url, "-F", "raw", &path_str(&image)], &[]);
    // No readahead: the first half is read in order, and must not bring in
    // the second.
    let mut opts = options(2, true, false);
    opts.readahead_max_bytes = 0;
    let disk = open(&image, opts);
    let half = (size / 2) as usize;
    assert_same_bytes(
        &read_parallel(&disk, 0, half as u64, 256 * KIB),
        &bytes[..half],
        "the first half",
    );
    disk.flush().unwrap();

    s.nginx.stop_for_now();
    let e = match disk.submit_read(half as u64, vec![0u8; 4096]).wait() {
        Ok(_) => panic!("a read of the backing succeeded while its server is down"),
        Err(e) => e,
    };
    assert_eq!(e.kind(), backfill::ErrorKind::BackingUnavailable, "{e}");
    assert!(e.to_string().contains(&url), "the error names the URL: {e}");
    let why = disk.last_remote_error().expect("the failed remote read");
    assert!(why.to_string().contains(&url), "{why}");
    assert_same_bytes(
        &read_parallel(&disk, 0, MIB, 256 * KIB),
        &bytes[..MIB as usize],
        "the overlay's data while the server is down",
    );

    s.nginx.restart();
    assert_same_bytes(
        &read_parallel(&disk, 0, size, 256 * KIB),
        &bytes,
        "the whole disk once the server is back",
    );
    disk.close().unwrap();
    check_clean(&image);
    assert_all_in_overlay(&qemu_map(&image));
}

#[test]
fn copy_on_read_over_http() {
    require_tool("qemu-img");
    let s = site("http-cor", None);
    let size = 9 * MIB + 4096 + 512;
    let bytes = write_random_file(&s.www.join("base.raw"), size, 21);
    let image = s.dir.path().join("ov.qcow2");
    let url = s.nginx.url("base.raw");
    backfill_env_ok(&["create", "-b", &url, "-F", "raw", &path_str(&image)], &[]);
    assert_eq!(virtual_size(&image), size);

    let disk = open(&image, options(2, true, false));
    let got = read_parallel(&disk, 0, size, 192 * KIB);
    assert_same_bytes(&got, &bytes, "cold read over http");
    disk.flush().unwrap();
    let cold = disk.stats();
    assert!(cold.remote_bytes >= size, "{cold:?}");
    let again = read_all(&disk, MIB);
    assert_same_bytes(&again, &bytes, "warm read");
    assert_eq!(
        disk.stats().remote_bytes,
        cold.remote_bytes,
        "fetched twice"
    );
    disk.close().unwrap();

    check_clean(&image);
    assert_all_in_overlay(&qemu_map(&image));
    let standalone = s.dir.path().join("standalone.qcow2");
    std::fs::copy(&image, &standalone).unwrap();
    qemu_img(["rebase", "-q", "-u", "-b", "", &path_str(&standalone)]);
    compare_identical(&standalone, &s.www.join("base.raw"));
}

/// An overlay whose backing URL redirects (nginx's 301 to another path),
/// made by `qemu-img create -b URL`: QEMU's curl driver follows the
/// redirect, and so does backfill. Before anything is copied, `qemu-img
/// compare` (reading through the redirect itself) finds the overlay equal
/// to the file; backfill reads half of it cold, then `backfill stream`
/// finishes it: standalone, clean, and still equal to the file.
#[test]
fn an_overlay_on_a_redirecting_url() {
    let s = site_with(
        "http-redirect",
        "location = /disk.raw { return 301 /store/base.raw; }",
        None,
    );
    let size = 3 * MIB;
    std::fs::create_dir_all(s.www.join("store")).unwrap();
    let base = s.www.join("store/base.raw");
    let bytes = write_random_file(&base, size, 29);
    let image = s.dir.path().join("ov.qcow2");
    qemu_create_qcow2(&image, "", Some((&s.nginx.url("disk.raw"), "raw")), None);
    compare_identical(&image, &base);

    let disk = open(&image, options(2, true, false));
    let half = size / 2;
    let got = read_parallel(&disk, 0, half, 192 * KIB);
    assert_same_bytes(
        &got,
        &bytes[..half as usize],
        "cold read through the redirect",
    );
    disk.close().unwrap();
    check_clean(&image);

    let out = backfill_env_ok(&["stream", &path_str(&image)], &[]);
    assert!(out.contains("backing file dropped"), "{out}");
    assert_standalone(&image);
    check_clean(&image);
    compare_identical(&image, &base);
}

/// Credentials in the backing URL (`http://user:password@host/...`, the
/// password percent-encoded) reach a server that wants HTTP Basic
/// authentication, as QEMU's curl driver sends them: QEMU (`qemu-img
/// compare`) and backfill both read the image through it. A wrong password
/// and none at all are refused at open with the server's 401, and the
/// message does not show the password.
#[test]
fn credentials_in_the_url_are_sent_as_basic_authentication() {
    let auth = tempdir("http-auth-users");
    let users = auth.path().join("htpasswd");
    std::fs::write(&users, "alice:{PLAIN}s@cret\n").unwrap();
    let s = site_with(
        "http-auth",
        &format!(
            "location /private/ {{ auth_basic \"backfill test\"; auth_basic_user_file {}; }}",
            users.display()
        ),
        None,
    );
    std::fs::create_dir_all(s.www.join("private")).unwrap();
    let base = s.www.join("private/base.raw");
    let size = 2 * MIB;
    let bytes = write_random_file(&base, size, 31);
    let url = s.nginx.url("private/base.raw");
    let with = |userinfo: &str| url.replacen("http://", &format!("http://{userinfo}@"), 1);
    let image = s.dir.path().join("ov.qcow2");
    qemu_create_qcow2(&image, "", Some((&with("alice:s%40cret"), "raw")), None);
    compare_identical(&image, &base);

    let disk = open(&image, options(2, true, false));
    let got = read_parallel(&disk, 0, size, 192 * KIB);
    assert_same_bytes(&got, &bytes, "cold read with credentials");
    disk.close().unwrap();
    check_clean(&image);
    assert_all_in_overlay(&qemu_map(&image));

    for name in [with("alice:wrong"), url.clone()] {
        let other = s.dir.path().join("other.qcow2");
        qemu_create_qcow2_unopened(&other, &name, "raw", "2M");
        let e = backfill::Disk::open(&other, options(1, true, false))
            .err()
            .unwrap_or_else(|| panic!("{name}: opened without the right password"));
        let m = e.to_string();
        eprintln!("expected error: {m}");
        assert!(m.contains("401") && !m.contains("wrong"), "{m}");
        std::fs::remove_file(&other).unwrap();
    }
}

/// `backfill stream` of an overlay on an http URL with `http_proxy` set,
/// as a user behind a proxy runs it: every request goes through the proxy
/// (tinyproxy's log), and the overlay ends standalone and identical to the
/// file. With the proxy gone, the same command fails naming it.
#[test]
fn the_cli_goes_through_the_proxy_in_the_environment() {
    let s = site("http-env-proxy", None);
    let size = 3 * MIB;
    let base = s.www.join("base.raw");
    write_random_file(&base, size, 37);
    let url = s.nginx.url("base.raw");
    let proxy = proxy_common::Tinyproxy::start(&s.dir.path().join("tinyproxy"), None);
    let env = |proxy_url: &str| -> Vec<(&'static str, std::ffi::OsString)> {
        vec![
            ("http_proxy", proxy_url.into()),
            ("no_proxy", "".into()),
            ("NO_PROXY", "".into()),
        ]
    };
    let run = |image: &Path, proxy_url: &str| {
        let mut cmd = std::process::Command::new(backfill_bin());
        cmd.args(["stream", &path_str(image)]);
        for (k, v) in env(proxy_url) {
            cmd.env(k, v);
        }
        cmd.output().expect("running backfill")
    };

    let image = s.dir.path().join("ov.qcow2");
    qemu_create_qcow2(&image, "", Some((&url, "raw")), None);
    let out = run(&image, &proxy.url(""));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("backing file dropped"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = proxy.log_text();
    let through = log.matches(&format!("GET {url} HTTP/1.1")).count();
    assert!(
        through >= 2,
        "the probe and the reads go through the proxy:\n{log}"
    );
    assert_standalone(&image);
    check_clean(&image);
    compare_identical(&image, &base);

    let other = s.dir.path().join("other.qcow2");
    qemu_create_qcow2(&other, "", Some((&url, "raw")), None);
    let gone = proxy.url("");
    drop(proxy);
    let out = run(&other, &gone);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("connecting through the proxy {gone}")),
        "{err}"
    );
}

#[test]
fn changed_remote_image_is_a_clear_error() {
    require_tool("qemu-img");
    let s = site("http-changed", None);
    let size = 4 * MIB;
    let bytes = write_random_file(&s.www.join("base.raw"), size, 22);
    let image = s.dir.path().join("ov.qcow2");
    qemu_create_qcow2(
        &image,
        "",
        Some((&s.nginx.url("base.raw"), "raw")),
        Some(size),
    );
    let disk = open(&image, options(2, true, false));
    let mut first = vec![0u8; MIB as usize];
    disk.read_at(&mut first, 0).unwrap();
    assert_same_bytes(&first, &bytes[..MIB as usize], "first MiB");

    // A new image under the same name, an hour newer.
    replace_with_newer(
        &s.www.join("base.raw"),
        size,
        23,
        std::time::Duration::from_secs(3600),
    );

    let mut buf = vec![0u8; 64 * KIB as usize];
    let err = disk.read_at(&mut buf, 3 * MIB).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("changed"), "{msg}");
    assert_eq!(err.kind(), backfill::ErrorKind::BackingChanged, "{msg}");
    let mut first = vec![0u8; MIB as usize];
    disk.read_at(&mut first, 0).unwrap();
    assert_same_bytes(
        &first,
        &bytes[..MIB as usize],
        "populated part after the change",
    );
    disk.close().unwrap();
    check_no_corruption(&image);
}

#[test]
fn https_with_a_private_ca_through_the_cli() {
    require_tool("qemu-img");
    let dir = tempdir("https-ca");
    let (ca, tls) = make_test_ca(&dir.path().join("ca"));
    let s = site("https-cor", Some(&tls));
    let size = 3 * MIB + 512;
    let bytes = write_random_file(&s.www.join("base.raw"), size, 24);
    let image = s.dir.path().join("ov.qcow2");
    let url = s.nginx.url("base.raw");
    assert!(url.starts_with("https://"), "{url}");
    let env: [(&str, &Path); 1] = [("SSL_CERT_FILE", &ca)];

    // Without the CA: refused, and it says why.
    let out = backfill_env_output(&["create", "-b", &url, "-F", "raw", &path_str(&image)], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    backfill_env_ok(
        &["create", "-b", &url, "-F", "raw", &path_str(&image)],
        &env,
    );
    let out = s.dir.path().join("out.raw");
    backfill_env_ok(
        &[
            "convert",
            "--copy-on-read",
            &path_str(&image),
            &path_str(&out),
        ],
        &env,
    );
    assert_same_bytes(&read_file(&out), &bytes, "convert over https");
    // qemu's curl driver would not trust the private CA: check the overlay
    // with its (now unused) backing reference dropped.
    qemu_img(["rebase", "-q", "-u", "-b", "", &path_str(&image)]);
    check_clean(&image);
    compare_identical(&image, &s.www.join("base.raw"));
}

/// Serves `data` over HTTP/1.1 with ranges and an ETag on a thread, one
/// thread per connection; every third range response after the first
/// (the probe) carries half its body as 0xAA bytes and then the connection
/// closes. Returns the URL and the count of responses cut.
fn cutting_server(data: Vec<u8>) -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let url = format!(
        "http://127.0.0.1:{}/base.raw",
        listener.local_addr().unwrap().port()
    );
    let data = Arc::new(data);
    let cut = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let cut2 = cut.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (data, cut, served) = (data.clone(), cut2.clone(), served.clone());
            std::thread::spawn(move || serve_ranges(conn, &data, &cut, &served));
        }
    });
    (url, cut)
}

fn serve_ranges(conn: TcpStream, data: &[u8], cut: &AtomicU64, served: &AtomicU64) {
    let mut rx = BufReader::new(conn.try_clone().unwrap());
    let mut tx = conn;
    loop {
        let mut range = None;
        loop {
            let mut line = String::new();
            if rx.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                let (a, b) = v.split_once('-').unwrap();
                range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
            }
        }
        let (first, last) = range.expect("a range request");
        let body = &data[first..=last];
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/{}\r\n\
             Content-Length: {}\r\nETag: \"v1\"\r\nAccept-Ranges: bytes\r\n\r\n",
            data.len(),
            body.len()
        );
        let n = served.fetch_add(1, Ordering::SeqCst);
        if n > 0 && n.is_multiple_of(3) && body.len() > 1 {
            cut.fetch_add(1, Ordering::SeqCst);
            let _ = tx.write_all(head.as_bytes());
            let _ = tx.write_all(&vec![0xAA; body.len() / 2]);
            return;
        }
        if tx.write_all(head.as_bytes()).is_err() || tx.write_all(body).is_err() {
            return;
        }
    }
}

#[test]
fn cut_responses_are_fetched_again_whole() {
    let dir = tempdir("http-cut");
    let size = 3 * MIB + 4096;
    let base = dir.path().join("base.raw");
    let bytes = write_random_file(&base, size, 33);
    let (url, cut) = cutting_server(bytes.clone());
    let image = dir.path().join("ov.qcow2");
    backfill_env_ok(&["create", "-b", &url, "-F", "raw", &path_str(&image)], &[]);

    let disk = open(&image, options(2, true, false));
    let got = read_parallel(&disk, 0, size, 128 * KIB);
    assert_same_bytes(&got, &bytes, "cold read through cut responses");
    assert!(cut.load(Ordering::SeqCst) > 0, "no response was cut");
    disk.close().unwrap();

    // What went into the overlay is right too, and is all of it.
    let disk = open(&image, options(2, false, true));
    assert_same_bytes(&read_all(&disk, MIB), &bytes, "after reopen");
    assert_eq!(disk.stats().remote_bytes, 0, "read from the server again");
    disk.close().unwrap();
}
