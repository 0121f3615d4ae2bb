//! The HTTP backing client against a real nginx on loopback.
//!
//! Each test starts its own nginx (see `common/nginx.rs`) over a directory
//! holding a file of seeded random bytes, and judges what the client reads
//! against those bytes. The counters are checked as counts (requests,
//! connections, retries), never as times.
//!
//! * `whole_file_in_random_chunks`: sequential reads of random sizes cover
//!   the file exactly; random reads, some past the end (zeros), agree; one
//!   keep-alive connection serves them all.
//! * `many_threads_share_a_small_pool`: eight threads read at once through
//!   three connections; every byte agrees and no more than three
//!   connections are ever opened.
//! * `https_with_a_private_ca`: nginx with a certificate from a CA made by
//!   `openssl`, for 127.0.0.1 and localhost; trusted through the CA-file
//!   option (by address and by name), refused without it (a TLS error, not
//!   retried).
//! * `ipv6_literal`: `http://[::1]:PORT/` against nginx listening on ::1.
//! * `replaced_file_is_a_clear_error` and
//!   `replaced_file_is_caught_by_last_modified`: a new file renamed over the
//!   old one makes the next read fail with "the remote image changed",
//!   detected through ETag/If-Match and through Last-Modified/
//!   If-Unmodified-Since (nginx `etag off`); the handle stays failed.
//! * `server_closing_keep_alive_connections`: nginx `keepalive_requests 2`
//!   closes every connection after two requests; reads go on, and no
//!   request is ever sent on a closed connection.
//! * `server_closing_idle_connections`: an nginx reload closes the pooled
//!   idle connection silently; the next read notices before any response
//!   byte and goes again at once on a new connection, as no retry.
//! * `redirects_are_followed_and_remembered`: 301, 302 and 307 (relative
//!   and absolute `Location`, a chain of two) are followed at open, then
//!   every read goes straight to the end of the chain; a redirect loop and a
//!   redirect to ftp fail the open, saying so.
//! * `a_redirect_target_that_goes_away_is_resolved_again`: the place a
//!   redirect led to answers 404 (the file moved, the redirect with it,
//!   through an nginx reload): the read follows the redirect again from the
//!   URL the overlay names, and succeeds.
//! * `through_an_http_proxy`: tinyproxy as `http_proxy` (absolute-form
//!   requests) and `https_proxy` (a CONNECT tunnel, TLS end to end), both
//!   seen in its log; `no_proxy`; a proxy that wants credentials.
//! * `connection_refused_at_open`, `not_found_is_not_retried`,
//!   `server_without_ranges_is_refused`, `retry_after_is_capped`,
//!   `silent_server_times_out`, `empty_file`: the error policy.

mod common;
#[path = "common/nginx.rs"]
mod nginx_common;
#[path = "common/proxy.rs"]
mod proxy_common;

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backfill::backing::http::{
    HttpBacking, HttpError, HttpErrorKind, HttpOptions, Proxies, RetryPolicy, Validator,
};
use common::{assert_same_bytes, replace_with_newer, seed_from_env, tempdir, Rng, KIB, MIB};
use nginx_common::{make_test_ca, Nginx, TlsFiles};

/// A directory with nginx serving `www/` below it.
struct Site {
    // Fields drop in this order: nginx must stop before its directory goes.
    nginx: Nginx,
    www: PathBuf,
    _dir: tempfile::TempDir,
}

impl Site {
    fn start(name: &str, server_extra: &str, tls: Option<&TlsFiles>) -> Site {
        let dir = tempdir(name);
        let www = dir.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        let nginx = Nginx::start(&dir.path().join("nginx"), &www, server_extra, tls);
        Site {
            nginx,
            www,
            _dir: dir,
        }
    }

    /// Writes `len` seeded random bytes to `www/name`; returns them.
    fn put_random(&self, name: &str, len: u64, seed: u64) -> Vec<u8> {
        let path = self.www.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        common::write_random_file(&path, len, seed)
    }

    fn url(&self, name: &str) -> String {
        self.nginx.url(name)
    }
}

/// `HttpBacking::open` that must fail: its error, shown in the test's
/// output.
#[track_caller]
fn open_refused(url: &str, opts: HttpOptions) -> HttpError {
    let err = HttpBacking::open(url, opts).unwrap_err();
    eprintln!("expected error: {err}");
    err
}

/// Fast retries, so that the tests of failures finish in milliseconds.
fn quick_options() -> HttpOptions {
    HttpOptions {
        max_connections: 4,
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            max_retry_after: Duration::from_millis(5),
        },
        ca_file: None,
        require_validator: true,
        expect: None,
        proxies: Proxies::default(),
    }
}

fn open(url: &str, opts: HttpOptions) -> HttpBacking {
    HttpBacking::open(url, opts).unwrap_or_else(|e| panic!("opening {url}: {e}"))
}

/// Reads `[offset, offset + len)` and checks it against `expected`
/// (zeros past its end).
fn check_read(backing: &HttpBacking, expected: &[u8], offset: u64, len: usize) {
    let mut buf = vec![0xA5u8; len];
    backing
        .read_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("reading {len} bytes at {offset}: {e}"));
    let mut want = vec![0u8; len];
    let start = (offset as usize).min(expected.len());
    let end = (offset as usize + len).min(expected.len());
    want[..end - start].copy_from_slice(&expected[start..end]);
    assert_same_bytes(&buf, &want, &format!("{len} bytes at {offset}"));
}

#[test]
fn whole_file_in_random_chunks() {
    let mut rng = Rng::new(seed_from_env("whole_file_in_random_chunks"));
    let site = Site::start("http-whole", "", None);
    // Not a multiple of any block size, so the last read is short.
    let len = 5 * MIB + 4 * KIB + 123;
    let data = site.put_random("disk.raw", len, rng.next_u64());
    let backing = open(&site.url("disk.raw"), quick_options());
    assert_eq!(backing.size(), len);
    assert!(
        matches!(backing.validator(), Some(Validator::ETag(tag)) if tag.starts_with('"')),
        "nginx sends a strong ETag: {:?}",
        backing.validator()
    );

    let mut whole = vec![0u8; len as usize];
    let mut offset = 0usize;
    let mut reads = 0u64;
    while offset < whole.len() {
        let n = (rng.range(1, 300 * KIB) as usize).min(whole.len() - offset);
        backing
            .read_at(&mut whole[offset..offset + n], offset as u64)
            .unwrap();
        offset += n;
        reads += 1;
    }
    assert_same_bytes(&whole, &data, "the whole file read in random chunks");

    for _ in 0..200 {
        let n = rng.range(1, 64 * KIB) as usize;
        // Some reads start near or past the end: the part past it is zeros.
        let offset = rng.below(len + 16 * KIB);
        check_read(&backing, &data, offset, n);
        if offset < len {
            reads += 1;
        }
    }
    let stats = backing.stats();
    assert_eq!(
        stats.requests,
        reads + 1,
        "one request per read, plus the open probe"
    );
    assert_eq!(stats.retries, 0);
    assert_eq!(
        stats.connections_opened, 1,
        "one keep-alive connection serves every read"
    );
    assert!(stats.max_latency <= stats.total_latency);
}

#[test]
fn many_threads_share_a_small_pool() {
    let mut rng = Rng::new(seed_from_env("many_threads_share_a_small_pool"));
    let site = Site::start("http-threads", "", None);
    let len = 8 * MIB + 511;
    let data = Arc::new(site.put_random("disk.raw", len, rng.next_u64()));
    let opts = HttpOptions {
        max_connections: 3,
        ..quick_options()
    };
    let backing = Arc::new(open(&site.url("disk.raw"), opts));
    const THREADS: usize = 8;
    const READS: usize = 60;
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (backing, data, mut rng) = (Arc::clone(&backing), Arc::clone(&data), rng.fork());
            std::thread::spawn(move || {
                let mut fetched = 0u64;
                for _ in 0..READS {
                    let n = rng.range(1, 256 * KIB);
                    let offset = rng.below(len - n);
                    check_read(&backing, &data, offset, n as usize);
                    fetched += n;
                }
                fetched
            })
        })
        .collect();
    let fetched: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let stats = backing.stats();
    assert_eq!(stats.requests, (THREADS * READS) as u64 + 1);
    assert_eq!(stats.bytes_fetched, fetched);
    assert_eq!(stats.retries, 0);
    assert!(
        (1..=3).contains(&stats.connections_opened),
        "the pool opens at most max_connections connections: {stats:?}"
    );
}

#[test]
fn https_with_a_private_ca() {
    let mut rng = Rng::new(seed_from_env("https_with_a_private_ca"));
    let pki = tempdir("http-pki");
    let (ca, server_files) = make_test_ca(pki.path());
    let site = Site::start("http-tls", "", Some(&server_files));
    let len = 3 * MIB + 77;
    let data = site.put_random("disk.raw", len, rng.next_u64());
    let url = site.url("disk.raw");
    assert!(url.starts_with("https://127.0.0.1:"));

    let opts = HttpOptions {
        ca_file: Some(ca.clone()),
        max_connections: 2,
        ..quick_options()
    };
    let backing = open(&url, opts);
    assert_eq!(backing.size(), len);
    for _ in 0..50 {
        let n = rng.range(1, 512 * KIB) as usize;
        check_read(&backing, &data, rng.below(len), n);
    }
    assert_eq!(backing.stats().retries, 0);

    // By name: resolution, and the certificate checked against the name.
    let by_name = url.replace("127.0.0.1", "localhost");
    let opts = HttpOptions {
        ca_file: Some(ca.clone()),
        ..quick_options()
    };
    check_read(&open(&by_name, opts), &data, len - 100, 100);

    // Without the CA the server's certificate is refused, once, clearly.
    let err = open_refused(&url, quick_options());
    assert_eq!(err.kind(), HttpErrorKind::Protocol, "{err}");
    assert!(
        err.message().contains("TLS") && err.message().contains(&url),
        "{err}"
    );

    // A CA file that is not PEM is an options error, before any request.
    let not_pem = pki.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let opts = HttpOptions {
        ca_file: Some(not_pem),
        ..quick_options()
    };
    let err = open_refused(&url, opts);
    assert_eq!(err.kind(), HttpErrorKind::InvalidOptions, "{err}");
}

/// Replaces `www/name` the way a publisher would: write a new file, then
/// rename it over the old path.
fn replace_file(www: &Path, name: &str, contents: &[u8], mtime: Option<std::time::SystemTime>) {
    let tmp = www.join(format!(".{name}.new"));
    let file = std::fs::File::create(&tmp).unwrap();
    std::io::Write::write_all(&mut &file, contents).unwrap();
    if let Some(t) = mtime {
        file.set_modified(t).unwrap();
    }
    drop(file);
    std::fs::rename(&tmp, www.join(name)).unwrap();
}

fn assert_changed(backing: &HttpBacking, url: &str, offset: u64, len: usize) {
    let mut buf = vec![0u8; len];
    let err = backing.read_at(&mut buf, offset).unwrap_err();
    eprintln!("expected error: {err}");
    assert_eq!(err.kind(), HttpErrorKind::Changed, "{err}");
    let range = format!("bytes={offset}-{}", offset + len as u64 - 1);
    assert!(
        err.message().contains("the remote image changed")
            && err.message().contains(url)
            && err.message().contains(&range),
        "{err}"
    );
    assert_eq!(
        backfill::Error::from(err).kind(),
        backfill::ErrorKind::BackingChanged
    );
}

#[test]
fn replaced_file_is_a_clear_error() {
    let mut rng = Rng::new(seed_from_env("replaced_file_is_a_clear_error"));
    let site = Site::start("http-replaced", "", None);
    let len = 2 * MIB;
    let data = site.put_random("disk.raw", len, rng.next_u64());
    let url = site.url("disk.raw");
    let backing = open(&url, quick_options());
    check_read(&backing, &data, 0, 64 * KIB as usize);

    // A new image, one byte longer: nginx's ETag (mtime and size) changes.
    let mut newer = common::random_bytes(len as usize + 1, rng.next_u64());
    newer[..1024].copy_from_slice(&data[..1024]);
    replace_file(&site.www, "disk.raw", &newer, None);
    assert_changed(&backing, &url, 4096, 8192);
    let before = backing.stats();
    // The handle stays failed, without asking the server again.
    assert_changed(&backing, &url, 0, 512);
    let after = backing.stats();
    assert_eq!(after.requests, before.requests);
    assert_eq!(after.retries, 0, "a changed image is never retried");
}

#[test]
fn replaced_file_is_caught_by_last_modified() {
    let mut rng = Rng::new(seed_from_env("replaced_file_is_caught_by_last_modified"));
    let site = Site::start("http-lastmod", "etag off;", None);
    let len = MIB;
    let data = site.put_random("disk.raw", len, rng.next_u64());
    let url = site.url("disk.raw");
    let backing = open(&url, quick_options());
    let Some(Validator::LastModified(date)) = backing.validator() else {
        panic!(
            "without ETag, Last-Modified is pinned: {:?}",
            backing.validator()
        );
    };
    assert!(date.ends_with(" GMT"), "{date}");
    check_read(&backing, &data, 12345, 54321);

    // Same size, newer modification time: only Last-Modified tells.
    replace_with_newer(
        &site.www.join("disk.raw"),
        len,
        rng.next_u64(),
        Duration::from_secs(10),
    );
    assert_changed(&backing, &url, 0, 4096);
}

/// An overlay's pinned validator (`HttpOptions::expect`, Last-Modified
/// here) is checked at open: the same one opens, another size or a newer
/// file is `Changed` before any read, naming both validators.
#[test]
fn pinned_validator_is_checked_at_open() {
    let mut rng = Rng::new(seed_from_env("pinned_validator_is_checked_at_open"));
    let site = Site::start("http-pinned", "etag off;", None);
    let len = MIB;
    site.put_random("disk.raw", len, rng.next_u64());
    let url = site.url("disk.raw");
    let pinned = open(&url, quick_options()).validator().cloned().unwrap();
    let with = |expect| HttpOptions {
        expect: Some(expect),
        ..quick_options()
    };
    let same = open(&url, with((pinned.clone(), len)));
    assert_eq!(same.validator(), Some(&pinned));
    let refused = |opts: HttpOptions| {
        let err = open_refused(&url, opts);
        assert_eq!(err.kind(), HttpErrorKind::Changed, "{err}");
        assert!(
            err.message().contains(&url) && err.message().contains(&format!("pinned {pinned}")),
            "{err}"
        );
        err
    };
    refused(with((pinned.clone(), len + 1)));
    replace_with_newer(
        &site.www.join("disk.raw"),
        len,
        rng.next_u64(),
        Duration::from_secs(10),
    );
    let err = refused(with((pinned.clone(), len)));
    assert!(err.message().contains("now sends Last-Modified"), "{err}");
}

#[test]
fn server_closing_keep_alive_connections() {
    let mut rng = Rng::new(seed_from_env("server_closing_keep_alive_connections"));
    let site = Site::start("http-close", "keepalive_requests 2;", None);
    let len = 2 * MIB + 3;
    let data = site.put_random("disk.raw", len, rng.next_u64());
    let opts = HttpOptions {
        max_connections: 1,
        ..quick_options()
    };
    let backing = open(&site.url("disk.raw"), opts);
    const READS: u64 = 21;
    for _ in 0..READS {
        let n = rng.range(1, 128 * KIB);
        check_read(&backing, &data, rng.below(len - n), n as usize);
    }
    let stats = backing.stats();
    // nginx says `Connection: close` on every second response: had the
    // client sent a request on such a connection, it would have failed and
    // been sent again, and `requests` would be larger.
    assert_eq!(stats.requests, READS + 1);
    assert_eq!(stats.retries, 0);
    assert_eq!(stats.connections_opened, (READS + 1).div_ceil(2));
}

#[test]
fn ipv6_literal() {
    let mut rng = Rng::new(seed_from_env("ipv6_literal"));
    let site = Site::start("http-ipv6", "listen [::1]:{PORT};", None);
    let len = MIB + 1;
    let data = site.put_random("disk.raw", len, rng.next_u64());
    let url = format!("http://[::1]:{}/disk.raw", site.nginx.port);
    let backing = open(&url, quick_options());
    assert_eq!(backing.size(), len);
    for _ in 0..20 {
        let n = rng.range(1, 128 * KIB);
        check_read(&backing, &data, rng.below(len), n as usize);
    }
}

#[test]
fn server_closing_idle_connections() {
    let mut rng = Rng::new(seed_from_env("server_closing_idle_connections"));
    let mut site = Site::start("http-idle", "", None);
    let len = MIB + 5;
    let data = site.put_random("disk.raw", len, rng.next_u64());
    let opts = HttpOptions {
        max_connections: 1,
        ..quick_options()
    };
    let backing = open(&site.url("disk.raw"), opts);
    check_read(&backing, &data, 0, 4096);
    // The pooled connection is idle; the old worker closes it silently.
    site.nginx.reload_and_wait_for_old_workers();
    for _ in 0..5 {
        let n = rng.range(1, 64 * KIB);
        check_read(&backing, &data, rng.below(len - n), n as usize);
    }
    let stats = backing.stats();
    // The first read after the reload met the closed connection before any
    // byte of a response, and went again at once on a new connection: one
    // extra request, no retry counted, no backoff.
    assert_eq!(stats.requests, 1 + 1 + 1 + 5, "{stats:?}");
    assert_eq!(stats.retries, 0);
    assert_eq!(stats.connections_opened, 2);
}

#[test]
fn connection_refused_at_open() {
    // A port that was free a moment ago, with nothing listening on it.
    let port = common::free_port();
    let url = format!("http://127.0.0.1:{port}/disk.raw");
    let err = open_refused(&url, quick_options());
    assert_eq!(err.kind(), HttpErrorKind::Unavailable, "{err}");
    let m = err.message();
    assert!(m.contains(&url) && m.contains("bytes=0-0"), "{err}");
    assert!(
        m.contains("refused") && m.contains("after 3 attempts"),
        "{err}"
    );
}

/// Redirects are followed as QEMU's curl driver follows them: a 301 to an
/// absolute path (nginx with `absolute_redirect off` sends it relative), a
/// chain of a 302 and a 307 to an absolute URL. The open follows them;
/// every read after goes straight to where they led (one redirect per hop
/// in all, one connection). A loop, and a redirect to a scheme we cannot
/// read, fail the open with a message that says so.
#[test]
fn redirects_are_followed_and_remembered() {
    let mut rng = Rng::new(seed_from_env("redirects_are_followed_and_remembered"));
    let site = Site::start(
        "http-redirects",
        "location = /moved.raw { absolute_redirect off; return 301 /images/disk.raw; }\n\
         location = /hop1.raw { return 302 /hop2.raw; }\n\
         location = /hop2.raw { return 307 http://127.0.0.1:{PORT}/images/disk.raw; }\n\
         location = /loop.raw { return 302 /loop.raw; }\n\
         location = /away.raw { return 302 ftp://127.0.0.1/disk.raw; }",
        None,
    );
    let len = 3 * MIB + 1234;
    let data = site.put_random("images/disk.raw", len, rng.next_u64());
    for (name, hops) in [("moved.raw", 1), ("hop1.raw", 2)] {
        let backing = open(&site.url(name), quick_options());
        assert_eq!(backing.size(), len, "{name}");
        let mut reads = 0;
        for _ in 0..40 {
            let n = rng.range(1, 256 * KIB) as usize;
            check_read(&backing, &data, rng.below(len), n);
            reads += 1;
        }
        let stats = backing.stats();
        assert_eq!(stats.redirects, hops, "{name}: {stats:?}");
        assert_eq!(
            stats.requests,
            hops + 1 + reads,
            "{name}: the redirects, the probe, one request per read: {stats:?}"
        );
        assert_eq!(stats.retries, 0, "{name}");
        assert_eq!(backing.url(), site.url(name), "the URL the overlay names");
    }

    let url = site.url("loop.raw");
    let err = open_refused(&url, quick_options());
    assert_eq!(err.kind(), HttpErrorKind::Status, "{err}");
    assert!(
        err.message().contains("more than 10 redirects") && err.message().contains(&url),
        "{err}"
    );
    let err = open_refused(&site.url("away.raw"), quick_options());
    assert!(
        err.message().contains("ftp://127.0.0.1/disk.raw")
            && err.message().contains("unsupported scheme"),
        "{err}"
    );
}

/// Where a redirect led stops serving the image (a signed URL expired, a
/// mirror dropped the file: 404 there): the read goes back to the URL the
/// overlay names, follows its redirect again, now elsewhere, and succeeds.
/// The image moved with its modification time, so its ETag is the one
/// pinned at open.
#[test]
fn a_redirect_target_that_goes_away_is_resolved_again() {
    let mut rng = Rng::new(seed_from_env("a_redirect_target_that_goes_away"));
    let conf_dir = tempdir("http-redirect-conf");
    let conf = conf_dir.path().join("latest.conf");
    std::fs::write(&conf, "return 302 /v1/disk.raw;\n").unwrap();
    let mut site = Site::start(
        "http-redirect-again",
        &format!("location = /latest.raw {{ include {}; }}", conf.display()),
        None,
    );
    let len = 2 * MIB;
    let data = site.put_random("v1/disk.raw", len, rng.next_u64());
    let backing = open(&site.url("latest.raw"), quick_options());
    check_read(&backing, &data, 0, 64 * 1024);

    std::fs::rename(site.www.join("v1"), site.www.join("v2")).unwrap();
    std::fs::write(&conf, "return 302 /v2/disk.raw;\n").unwrap();
    site.nginx.reload_and_wait_for_old_workers();
    check_read(&backing, &data, MIB, 64 * 1024);
    check_read(&backing, &data, 5000, 300_000);
    let stats = backing.stats();
    assert_eq!(stats.redirects, 2, "{stats:?}");
    assert_eq!(stats.retries, 0, "{stats:?}");

    // Gone everywhere: the 404 of the place the redirect now leads, named.
    std::fs::remove_dir_all(site.www.join("v2")).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = backing.read_at(&mut buf, 0).unwrap_err();
    eprintln!("expected error: {err}");
    assert_eq!(err.status(), Some(404), "{err}");
    assert!(
        err.message().contains("/v2/disk.raw")
            && err
                .message()
                .contains(&format!("redirected from {}", site.url("latest.raw"))),
        "{err}"
    );
}

/// Through a real forward proxy (tinyproxy), as curl goes through
/// `http_proxy` and `https_proxy`: plain http requests go to it in absolute
/// form, https goes through a `CONNECT` tunnel with TLS end to end (the
/// test CA), and tinyproxy's log shows both. `no_proxy` sends a server
/// around a proxy that is not there. A proxy that wants credentials gets
/// them from its URL; a wrong password is refused at open.
#[test]
fn through_an_http_proxy() {
    let mut rng = Rng::new(seed_from_env("through_an_http_proxy"));
    let dir = tempdir("http-proxy");
    let proxy = proxy_common::Tinyproxy::start(&dir.path().join("tinyproxy"), None);
    let via = |http: Option<String>, https: Option<String>, no_proxy: &[&str]| HttpOptions {
        proxies: Proxies {
            http,
            https,
            no_proxy: no_proxy.iter().map(|s| s.to_string()).collect(),
        },
        ..quick_options()
    };

    let site = Site::start("http-proxied", "", None);
    let len = 2 * MIB + 77;
    let data = site.put_random("disk.raw", len, rng.next_u64());
    let url = site.url("disk.raw");
    let backing = open(&url, via(Some(proxy.url("")), None, &[]));
    for _ in 0..20 {
        let n = rng.range(1, 200 * KIB) as usize;
        check_read(&backing, &data, rng.below(len), n);
    }
    let log = proxy.log_text();
    assert!(log.contains(&format!("GET {url} HTTP/1.1")), "{log}");

    let (ca, files) = make_test_ca(dir.path());
    let tls_site = Site::start("https-proxied", "", Some(&files));
    let tls_data = tls_site.put_random("disk.raw", len, rng.next_u64());
    let tls_url = tls_site.url("disk.raw");
    let opts = HttpOptions {
        ca_file: Some(ca),
        ..via(None, Some(proxy.url("")), &[])
    };
    let backing = open(&tls_url, opts);
    for _ in 0..20 {
        let n = rng.range(1, 200 * KIB) as usize;
        check_read(&backing, &tls_data, rng.below(len), n);
    }
    let authority = tls_url
        .trim_start_matches("https://")
        .trim_end_matches("/disk.raw");
    let log = proxy.log_text();
    assert!(log.contains(&format!("CONNECT {authority}")), "{log}");

    // Nothing listens on port 1.
    let nowhere = Some("http://127.0.0.1:1".to_string());
    let backing = open(
        &url,
        via(nowhere.clone(), None, &["localhost", "127.0.0.1"]),
    );
    check_read(&backing, &data, 0, 4096);
    let err = open_refused(&url, via(nowhere, None, &["example.com"]));
    assert!(
        err.message()
            .contains("connecting through the proxy http://127.0.0.1:1"),
        "{err}"
    );

    let guarded = proxy_common::Tinyproxy::start(&dir.path().join("guarded"), Some(("bob", "pw")));
    let backing = open(&url, via(Some(guarded.url("bob:pw")), None, &[]));
    check_read(&backing, &data, 4096, 65536);
    let err = open_refused(&url, via(Some(guarded.url("bob:nope")), None, &[]));
    // tinyproxy answers a wrong password with 401 (RFC 9110 says 407).
    assert!(
        matches!(err.status(), Some(401 | 407)) && !err.message().contains("nope"),
        "{err}"
    );
}

#[test]
fn not_found_is_not_retried() {
    let mut rng = Rng::new(seed_from_env("not_found_is_not_retried"));
    let site = Site::start("http-404", "", None);
    let url = site.url("missing.raw");
    let err = open_refused(&url, quick_options());
    assert_eq!(err.kind(), HttpErrorKind::Status, "{err}");
    assert_eq!(err.status(), Some(404));
    assert!(
        err.message().contains(&url) && err.message().contains("404 Not Found"),
        "{err}"
    );

    // A file that disappears after open: the read fails at once.
    let data = site.put_random("disk.raw", MIB, rng.next_u64());
    let url = site.url("disk.raw");
    let backing = open(&url, quick_options());
    check_read(&backing, &data, 0, 4096);
    std::fs::remove_file(site.www.join("disk.raw")).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = backing.read_at(&mut buf, 8192).unwrap_err();
    eprintln!("expected error: {err}");
    assert_eq!(err.status(), Some(404), "{err}");
    assert!(err.message().contains("bytes=8192-12287"), "{err}");
    let stats = backing.stats();
    assert_eq!((stats.requests, stats.retries), (3, 0));
}

#[test]
fn server_without_ranges_is_refused() {
    let mut rng = Rng::new(seed_from_env("server_without_ranges_is_refused"));
    let site = Site::start(
        "http-noranges",
        "location /noranges/ { max_ranges 0; }",
        None,
    );
    site.put_random("noranges/disk.raw", 256 * KIB, rng.next_u64());
    let url = site.url("noranges/disk.raw");
    let err = open_refused(&url, quick_options());
    assert_eq!(err.kind(), HttpErrorKind::RangesUnsupported, "{err}");
    assert!(
        err.message().contains(&url) && err.message().contains("does not serve byte ranges"),
        "{err}"
    );
}

#[test]
fn retry_after_is_capped() {
    // nginx asks for an hour; the cap (5 ms) wins, and the retries end.
    let site = Site::start(
        "http-busy",
        "location = /busy.raw { add_header Retry-After 3600 always; return 503; }",
        None,
    );
    let url = site.url("busy.raw");
    let err = open_refused(&url, quick_options());
    assert_eq!(err.kind(), HttpErrorKind::Unavailable, "{err}");
    assert!(
        err.message().contains("503") && err.message().contains("after 3 attempts"),
        "{err}"
    );
}

#[test]
fn silent_server_times_out() {
    // A listener that never accepts: the connection is made (the kernel
    // completes it into the backlog) but no answer ever comes.
    let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let url = format!(
        "http://127.0.0.1:{}/disk.raw",
        silent.local_addr().unwrap().port()
    );
    let opts = HttpOptions {
        io_timeout: Duration::from_millis(50),
        retry: RetryPolicy {
            max_attempts: 2,
            ..quick_options().retry
        },
        ..quick_options()
    };
    let err = open_refused(&url, opts);
    assert_eq!(err.kind(), HttpErrorKind::Unavailable, "{err}");
    assert!(
        err.message().contains("timed out") && err.message().contains("after 2 attempts"),
        "{err}"
    );
}

#[test]
fn empty_file() {
    let site = Site::start("http-empty", "", None);
    std::fs::write(site.www.join("empty.raw"), b"").unwrap();
    let backing = open(&site.url("empty.raw"), quick_options());
    assert_eq!(backing.size(), 0);
    let mut buf = vec![0xFFu8; 4096];
    backing.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(
        backing.stats().requests,
        1,
        "reads past the end send nothing"
    );
}
