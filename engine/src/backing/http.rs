//! A backing image read over HTTP or HTTPS with range requests.
//!
//! # Interface for the engine
//!
//! * [`HttpBacking::open`] takes an `http://` or `https://` URL and
//!   [`HttpOptions`]. It sends one `Range: bytes=0-0` GET, which proves that
//!   the server honours ranges (a server that answers it with `200 OK` and
//!   the whole file is refused with [`HttpErrorKind::RangesUnsupported`]),
//!   learns the image size from `Content-Range`, and pins a [`Validator`]:
//!   the strong `ETag`, or else `Last-Modified`. A server that sends neither
//!   is refused ([`HttpErrorKind::NoValidator`]) unless
//!   [`HttpOptions::require_validator`] is false.
//!   [`HttpOptions::expect`] is the validator and size an overlay pinned
//!   on an earlier run (`qcow2::pin`): if the server now reports another,
//!   the open fails with [`HttpErrorKind::Changed`], before any read.
//! * [`HttpBacking::size`] is the image size in bytes, fixed at open.
//! * [`HttpBacking::read_at`] fills a buffer from an offset with one ranged
//!   GET carrying `If-Match` (or `If-Unmodified-Since`). Every response is
//!   checked: status 206, `Content-Range` exactly the range asked for and
//!   the pinned size, and the pinned validator. Anything else that says the
//!   image is not the one opened (412, 200, 416, another ETag, another
//!   Last-Modified, another size) is [`HttpErrorKind::Changed`]: it is never
//!   retried, the handle stays failed (every later read returns the same
//!   error at once), and the caller's buffer must be treated as garbage: no
//!   mix of old and new data is ever returned as a success. Bytes past
//!   [`HttpBacking::size`] read as zeros without a request; the engine
//!   clamps backing reads to the backing size anyway.
//! * Thread-safety: `HttpBacking` is `Send + Sync`; `read_at` takes `&self`
//!   and many threads may call it at once. Each call borrows one connection
//!   from a pool of at most [`HttpOptions::max_connections`] keep-alive
//!   connections (blocking while all are busy), so that option also bounds
//!   the requests in flight. Calls block (plain sockets, no async runtime):
//!   call them from fetch threads, never from a reactor thread.
//! * Retry policy ([`RetryPolicy`]): connection refused or reset, connect
//!   and I/O timeouts, 408, 429 and 5xx are retried up to
//!   `max_attempts` attempts in all, with exponential backoff (jittered,
//!   capped at `max_backoff`); a `Retry-After` on 429 or 503 replaces the
//!   backoff, capped at `max_retry_after`. A reused keep-alive connection
//!   that the server closed while idle is replaced at once and not counted
//!   as a retry. Other 4xx, TLS refusals and malformed responses fail at
//!   once. Every error names the URL and the byte range.
//! * Proxies ([`HttpOptions::proxies`], which the engine takes from
//!   `http_proxy`, `https_proxy`, `all_proxy` and `no_proxy` as curl does):
//!   an http request goes to the proxy with the whole URL, an https
//!   connection is a `CONNECT` tunnel through it, TLS end to end.
//! * Credentials in the URL (`https://user:password@host/disk.raw`) are
//!   sent as HTTP Basic authentication, to that server only (not to
//!   another one a redirect leads to), and hidden in messages.
//! * Redirects (301, 302, 303, 307, 308) are followed as QEMU's curl
//!   driver follows them, up to ten per request, relative or absolute, to
//!   http or https; later requests go straight to where the last one led,
//!   and go back to the URL the overlay names if that place answers 401,
//!   403, 404 or 410 (a signed URL that expired). The validator pinned is
//!   the one of the image at the end of the chain.
//! * Errors are [`HttpError`]s with a matchable [`HttpErrorKind`]; they
//!   convert into the engine's [`crate::Error`] (kind `BackingUnavailable`,
//!   `BackingChanged` for a changed image, or `InvalidInput` /
//!   `Unsupported` for a bad URL or server).
//! * Counters ([`HttpBacking::stats`]): requests sent, body bytes fetched,
//!   retries, connections opened, total and maximum request latency.
//!
//! TLS is rustls with the ring provider: the system's root certificates
//! (`rustls-native-certs`) plus, for private CAs, a PEM file
//! ([`HttpOptions::ca_file`]).

mod conn;
pub mod medium;
pub mod url;
mod wire;

/// The fuzz target `http_wire`; see `wire::fuzz`.
#[doc(hidden)]
pub fn fuzz_wire(data: &[u8]) {
    wire::fuzz(data);
}

/// The fuzz target `http_responses`: what a broken or hostile HTTP server
/// sends an [`HttpBacking`], through its whole response handling: the open
/// probe, ranged reads, statuses, validators, framing, retries.
///
/// The input: a flags byte (bit 0: require a validator; bits 1 and 2: 1 to
/// 4 reads), two bytes per read (its offset in 4 KiB units, its length in
/// 512-byte units, 1 to 16), then the servers, each a 16-bit little-endian
/// length and that many bytes: one per connection the backing opens (none
/// left: the connection is refused). One connection at a time, 3 attempts
/// per request, no waits between them.
///
/// What must hold: no panic, and every call returns (a server's bytes end);
/// an open that succeeds has a validator when one is required, and a pinned
/// ETag is a strong one; a read's bytes past the image's end are zeros;
/// every error names the URL; once a read finds the image changed, every
/// later read that needs the server says so.
#[doc(hidden)]
pub fn fuzz_responses(data: &[u8]) {
    const URL: &str = "http://backing.test/base.raw";
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let reads = 1 + usize::from((flags >> 1) & 3);
    let Some((spec, mut servers)) = rest.split_at_checked(2 * reads) else {
        return;
    };
    let mut scripts = Vec::new();
    while let Some((len, rest)) = servers.split_first_chunk::<2>() {
        let n = usize::from(u16::from_le_bytes(*len)).min(rest.len());
        let (script, rest) = rest.split_at(n);
        scripts.push(script.to_vec());
        servers = rest;
    }
    let opts = HttpOptions {
        max_connections: 1,
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            max_retry_after: Duration::ZERO,
        },
        require_validator: flags & 1 != 0,
        ..HttpOptions::default()
    };
    let names_url = |e: &HttpError| assert!(e.message().contains("backing.test"), "{e}");
    let backing = match HttpBacking::open_with(URL, opts.clone(), Some(scripts)) {
        Ok(b) => b,
        Err(e) => return names_url(&e),
    };
    match &backing.validator {
        Some(Validator::ETag(tag)) => assert!(tag.starts_with('"'), "{tag}"),
        Some(Validator::LastModified(_)) => {}
        None => assert!(!opts.require_validator),
    }
    let mut changed = false;
    for r in spec.chunks_exact(2) {
        let offset = u64::from(r[0]) * 4096;
        let len = (usize::from(r[1] % 16) + 1) * 512;
        let inside = backing.size.saturating_sub(offset).min(len as u64) as usize;
        let mut buf = vec![0xa5u8; len];
        match backing.read_at(&mut buf, offset) {
            Ok(()) => {
                assert!(
                    !changed || inside == 0,
                    "a read went through after a change"
                );
                assert!(buf[inside..].iter().all(|&b| b == 0), "past the end");
            }
            Err(e) => {
                names_url(&e);
                assert!(!changed || e.kind() == HttpErrorKind::Changed, "{e}");
                changed |= e.kind() == HttpErrorKind::Changed;
            }
        }
    }
}

use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng as _;

use self::conn::{Conn, ConnectError};
use self::url::{Scheme, Url};
use self::wire::ContentRange;
use crate::backing::remote::{place_range, Placement};
use crate::error::{Error, ErrorKind};

/// When and how often a failed request is tried again.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The wait after the first failure; it doubles after each further one.
    pub initial_backoff: Duration,
    /// The longest wait between two attempts from backoff.
    pub max_backoff: Duration,
    /// The longest wait a server's `Retry-After` can ask for.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

/// How an [`HttpBacking`] connects, times out and retries.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Keep-alive connections kept open at most, which is also the number
    /// of requests in flight at most (at least 1). Default 32: a backing
    /// served over a link with milliseconds of round trip needs as many
    /// ranges in flight as the client has reads in flight (fio's depth 32,
    /// a guest's queue), or the link idles; QEMU's curl driver keeps 8.
    pub max_connections: usize,
    /// The limit for establishing one TCP connection.
    pub connect_timeout: Duration,
    /// The limit for any one read or write on a connection (TLS handshake
    /// included): a server silent for longer is treated as failed.
    pub io_timeout: Duration,
    pub retry: RetryPolicy,
    /// A PEM file of CA certificates trusted for https in addition to the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
    /// Refuse a server that sends neither a strong ETag nor Last-Modified:
    /// without a validator a changed image cannot be detected.
    pub require_validator: bool,
    /// The validator and size an overlay pinned when it first used this
    /// image (see `qcow2::pin`): the open fails with
    /// [`HttpErrorKind::Changed`] unless the server still reports exactly
    /// these, so data copied from another version is never mixed in.
    pub expect: Option<(Validator, u64)>,
    /// HTTP proxies to go through (none by default; the engine takes them
    /// from the environment, see [`Proxies::from_env`]).
    pub proxies: Proxies,
}

/// HTTP proxies, as curl (and so QEMU's curl driver) takes them from the
/// environment. A proxy is an `http://[user:password@]host[:port]` URL (a
/// bare `host:port` means http); requests to http servers go to it in
/// absolute form, and connections to https servers are `CONNECT` tunnels
/// through it, TLS end to end.
#[derive(Clone, Debug, Default)]
pub struct Proxies {
    /// For http URLs: `http_proxy` (not `HTTP_PROXY`, which curl ignores:
    /// in a CGI program a request header could set it), else `all_proxy`.
    pub http: Option<String>,
    /// For https URLs: `https_proxy` or `HTTPS_PROXY`, else `all_proxy`.
    pub https: Option<String>,
    /// Servers reached directly: `no_proxy` or `NO_PROXY`, comma
    /// separated; a host name, which covers its subdomains too, an
    /// address, or `*` for every server.
    pub no_proxy: Vec<String>,
}

impl Proxies {
    /// What the environment says, as curl reads it (the lowercase name
    /// first, an empty value as none).
    pub fn from_env() -> Proxies {
        let var = |names: &[&str]| {
            names
                .iter()
                .filter_map(|n| std::env::var(n).ok())
                .find(|v| !v.trim().is_empty())
        };
        let all = var(&["all_proxy", "ALL_PROXY"]);
        Proxies {
            http: var(&["http_proxy"]).or_else(|| all.clone()),
            https: var(&["https_proxy", "HTTPS_PROXY"]).or(all),
            no_proxy: var(&["no_proxy", "NO_PROXY"])
                .map(|v| {
                    v.split(',')
                        .map(|e| e.trim().trim_start_matches('.').to_ascii_lowercase())
                        .filter(|e| !e.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Whether `host` is reached directly.
    fn bypassed(&self, host: &url::Host) -> bool {
        let name = match host {
            url::Host::V6(ip) => ip.to_string(),
            other => other.to_string(),
        };
        self.no_proxy.iter().any(|e| {
            let e = e.trim_start_matches('[').trim_end_matches(']');
            e == "*"
                || name
                    .strip_suffix(e)
                    .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
        })
    }
}

/// A proxy's URL: `http://`, or a bare `host:port`.
fn parse_proxy(value: &str) -> Result<Url, HttpError> {
    let value = value.trim();
    let text = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    let bad = |why: String| {
        HttpError::new(
            HttpErrorKind::InvalidOptions,
            format!("proxy {value:?}: {why}"),
        )
    };
    let url = Url::parse(&text).map_err(bad)?;
    if url.scheme != Scheme::Http {
        return Err(bad(
            "only http:// proxies are supported (https servers are reached through them with \
             CONNECT)"
                .into(),
        ));
    }
    Ok(url)
}

impl Default for HttpOptions {
    fn default() -> HttpOptions {
        HttpOptions {
            max_connections: 32,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            ca_file: None,
            require_validator: true,
            expect: None,
            proxies: Proxies::default(),
        }
    }
}

/// What identifies the version of the image that was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validator {
    /// A strong entity tag, quotes included, sent back as `If-Match`.
    ETag(String),
    /// A `Last-Modified` date, sent back as `If-Unmodified-Since`.
    LastModified(String),
}

impl fmt::Display for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Validator::ETag(tag) => write!(f, "ETag {tag}"),
            Validator::LastModified(date) => write!(f, "Last-Modified {date:?}"),
        }
    }
}

/// What went wrong, coarse enough to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpErrorKind {
    /// The URL is malformed or uses something we do not support.
    InvalidUrl,
    /// Options or local files (the CA file) are unusable.
    InvalidOptions,
    /// The server does not serve byte ranges of this resource.
    RangesUnsupported,
    /// The server sends neither a strong ETag nor Last-Modified.
    NoValidator,
    /// The remote image is no longer the one that was opened.
    Changed,
    /// The server answered with a status that retrying cannot fix (404,
    /// 403, ...; [`HttpError::status`] has it), or redirected too often or
    /// to a place we cannot go.
    Status,
    /// The response broke the protocol, or TLS refused the server.
    Protocol,
    /// The server could not be reached or kept failing transiently, and the
    /// retries ran out.
    Unavailable,
}

/// An error of the HTTP backing: a kind, the HTTP status if there was one,
/// and a message naming the URL and byte range.
#[derive(Clone, Debug)]
pub struct HttpError {
    kind: HttpErrorKind,
    status: Option<u16>,
    message: String,
}

impl HttpError {
    fn new(kind: HttpErrorKind, message: impl Into<String>) -> HttpError {
        HttpError {
            kind,
            status: None,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> HttpErrorKind {
        self.kind
    }

    /// The HTTP status of the response that caused the error, if any.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HttpError {}

impl From<HttpError> for Error {
    fn from(e: HttpError) -> Error {
        let kind = match e.kind {
            HttpErrorKind::InvalidUrl | HttpErrorKind::InvalidOptions => ErrorKind::InvalidInput,
            HttpErrorKind::RangesUnsupported | HttpErrorKind::NoValidator => ErrorKind::Unsupported,
            HttpErrorKind::Changed => ErrorKind::BackingChanged,
            HttpErrorKind::Status | HttpErrorKind::Protocol | HttpErrorKind::Unavailable => {
                ErrorKind::BackingUnavailable
            }
        };
        Error::new(kind, e.message)
    }
}

/// A snapshot of an [`HttpBacking`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpStats {
    /// HTTP requests sent (the open probe and every attempt included).
    pub requests: u64,
    /// Body bytes of successful reads delivered into callers' buffers.
    pub bytes_fetched: u64,
    /// Attempts that followed a transient failure.
    pub retries: u64,
    /// TCP (and TLS) connections established.
    pub connections_opened: u64,
    /// Redirects followed (each costs a request; later requests go where
    /// the last one led).
    pub redirects: u64,
    /// Sum over requests of the time from sending the request to having
    /// the whole response (or its failure).
    pub total_latency: Duration,
    /// The longest such time.
    pub max_latency: Duration,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes_fetched: AtomicU64,
    retries: AtomicU64,
    connections_opened: AtomicU64,
    redirects: AtomicU64,
    total_latency_ns: AtomicU64,
    max_latency_ns: AtomicU64,
}

/// The connection pool: idle connections, and how many exist in all (idle
/// or lent out), which never exceeds `max`.
struct Pool {
    state: Mutex<PoolState>,
    freed: Condvar,
    max: usize,
}

struct PoolState {
    idle: Vec<Conn>,
    open: usize,
}

/// A slot taken from the pool: a connection that exists (idle before), or
/// the right to open one. Dropping it gives the slot back.
struct Lease<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
    /// Put the connection back as idle when the lease ends.
    keep: bool,
}

impl Pool {
    fn acquire(&self) -> Lease<'_> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(conn) = state.idle.pop() {
                return Lease {
                    pool: self,
                    conn: Some(conn),
                    keep: false,
                };
            }
            if state.open < self.max {
                state.open += 1;
                return Lease {
                    pool: self,
                    conn: None,
                    keep: false,
                };
            }
            state = self.freed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
        match self.conn.take() {
            Some(conn) if self.keep => state.idle.push(conn),
            _ => state.open -= 1,
        }
        drop(state);
        self.pool.freed.notify_one();
    }
}

/// How one attempt failed.
enum Failure {
    /// A reused connection failed before any byte of the response arrived:
    /// the server most likely closed it while it was idle.
    Stale(String),
    /// Worth another attempt, after `retry_after` if the server asked.
    Transient {
        what: String,
        retry_after: Option<Duration>,
    },
    Fatal(HttpError),
    /// A redirect (301, 302, 303, 307, 308) to this `Location`.
    Redirect(String),
}

/// Redirects one request follows at most before it fails.
const MAX_REDIRECTS: u32 = 10;

/// A backing image served over HTTP(S). See the module documentation.
pub struct HttpBacking {
    /// The URL as the overlay names it: messages, the pin.
    url: Url,
    /// Where requests go: `url`, or where it last redirected to (see
    /// [`HttpBacking::run`]).
    target: Mutex<Arc<Url>>,
    opts: HttpOptions,
    /// Made at open for an https URL, or when a redirect first leads to one.
    tls: Mutex<Option<Arc<rustls::ClientConfig>>>,
    /// The proxies of [`HttpOptions::proxies`], parsed.
    http_proxy: Option<Url>,
    https_proxy: Option<Url>,
    size: u64,
    validator: Option<Validator>,
    pool: Pool,
    counters: Counters,
    /// Set once the image is found changed; every later read fails with it.
    changed: OnceLock<HttpError>,
    /// For the fuzz target `http_responses`: the servers' bytes, one string
    /// per connection opened, instead of connecting (none left: refused).
    scripts: Option<Mutex<std::collections::VecDeque<Vec<u8>>>>,
}

impl fmt::Debug for HttpBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBacking")
            .field("url", &self.url.to_string())
            .field("size", &self.size)
            .field("validator", &self.validator)
            .finish_non_exhaustive()
    }
}

/// `read_at` is called from many fetch threads at once.
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<HttpBacking>();
};

/// What the open probe learned.
struct Probe {
    size: u64,
    etag: Option<String>,
    last_modified: Option<String>,
}

impl HttpBacking {
    /// Opens `url`: checks that the server serves byte ranges, learns the
    /// size and pins the validator. Retries transient failures as reads do.
    pub fn open(url: &str, opts: HttpOptions) -> Result<HttpBacking, HttpError> {
        HttpBacking::open_with(url, opts, None)
    }

    fn open_with(
        url: &str,
        opts: HttpOptions,
        scripts: Option<Vec<Vec<u8>>>,
    ) -> Result<HttpBacking, HttpError> {
        let parsed = Url::parse(url)
            .map_err(|e| HttpError::new(HttpErrorKind::InvalidUrl, format!("{url}: {e}")))?;
        if opts.max_connections == 0 || opts.retry.max_attempts == 0 {
            return Err(HttpError::new(
                HttpErrorKind::InvalidOptions,
                format!("{url}: max_connections and retry.max_attempts must be at least 1"),
            ));
        }
        let tls = match parsed.scheme {
            Scheme::Http => None,
            Scheme::Https => Some(conn::tls_config(opts.ca_file.as_deref()).map_err(|e| {
                HttpError::new(HttpErrorKind::InvalidOptions, format!("{url}: {e}"))
            })?),
        };
        let proxy = |p: &Option<String>| p.as_deref().map(parse_proxy).transpose();
        let mut backing = HttpBacking {
            http_proxy: proxy(&opts.proxies.http)?,
            https_proxy: proxy(&opts.proxies.https)?,
            pool: Pool {
                state: Mutex::new(PoolState {
                    idle: Vec::with_capacity(opts.max_connections),
                    open: 0,
                }),
                freed: Condvar::new(),
                max: opts.max_connections,
            },
            target: Mutex::new(Arc::new(parsed.clone())),
            url: parsed,
            opts,
            tls: Mutex::new(tls),
            size: 0,
            validator: None,
            counters: Counters::default(),
            changed: OnceLock::new(),
            scripts: scripts.map(|s| Mutex::new(s.into())),
        };
        let probe = backing.run(0, 0, |conn, url| backing.probe(conn, url))?;
        let context = || backing.context(0, 0, &backing.target());
        // A weak ETag cannot be used with If-Match (it needs the strong
        // comparison), so Last-Modified is the fallback for it too.
        backing.validator = match (probe.etag, probe.last_modified) {
            (Some(etag), _) if etag.starts_with('"') => Some(Validator::ETag(etag)),
            (_, Some(date)) => Some(Validator::LastModified(date)),
            _ if !backing.opts.require_validator => None,
            _ => {
                return Err(HttpError::new(
                    HttpErrorKind::NoValidator,
                    format!(
                        "{}: the server sends neither a strong ETag nor Last-Modified, so a \
                         change of the remote image could not be detected",
                        context()
                    ),
                ))
            }
        };
        backing.size = probe.size;
        if let Some((pinned, pinned_size)) = &backing.opts.expect {
            let now = backing.validator.as_ref();
            if now != Some(pinned) || backing.size != *pinned_size {
                let now = match now {
                    Some(v) => v.to_string(),
                    None => "no validator".to_string(),
                };
                return Err(HttpError::new(
                    HttpErrorKind::Changed,
                    format!(
                        "{}: the remote image changed since the overlay first used it (pinned \
                         {pinned}, {pinned_size} bytes; the server now sends {now}, {} bytes): \
                         refusing to mix data of two images; point the overlay at the original \
                         image, or recreate it",
                        backing.url, backing.size
                    ),
                ));
            }
        }
        Ok(backing)
    }

    /// The image size in bytes, as the server reported it at open.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The validator pinned at open (`None` only if
    /// [`HttpOptions::require_validator`] was false and the server sent none).
    pub fn validator(&self) -> Option<&Validator> {
        self.validator.as_ref()
    }

    pub fn url(&self) -> String {
        self.url.to_string()
    }

    /// Fills `buf` with the image bytes at `offset..offset + buf.len()`.
    /// Bytes past [`HttpBacking::size`] are zeros. On error the contents of
    /// `buf` are unspecified.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), HttpError> {
        let in_image = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (data, past_end) = buf.split_at_mut(in_image);
        past_end.fill(0);
        self.get_body(offset, &mut Body::Slice(data))
    }

    /// Reads the image bytes `offset..offset + len` (inside the image)
    /// straight into their placements, in order and disjoint; bytes
    /// outside them are dropped. On error the placements' contents are
    /// unspecified.
    ///
    /// # Safety
    ///
    /// The contract of [`Placement::write`]: the caller answers the read
    /// these placements belong to, and has not completed it.
    pub(crate) unsafe fn read_placed(
        &self,
        offset: u64,
        len: usize,
        dest: &[Placement],
    ) -> Result<(), HttpError> {
        // Inside the image (the medium's contract).
        self.get_body(offset, &mut Body::Placed { len, dest })
    }

    /// Fetches the image bytes from `offset` (inside the image) into
    /// `body`, retrying as the policy says; the server's Content-Range is
    /// checked against exactly this range.
    fn get_body(&self, offset: u64, body: &mut Body<'_>) -> Result<(), HttpError> {
        let len = body.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let (first, last) = (offset, offset + len - 1);
        self.run(first, last, |conn, url| {
            self.ranged_get(conn, url, first, last, body)
        })?;
        self.counters
            .bytes_fetched
            .fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> HttpStats {
        let c = &self.counters;
        HttpStats {
            requests: c.requests.load(Ordering::Relaxed),
            bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            connections_opened: c.connections_opened.load(Ordering::Relaxed),
            redirects: c.redirects.load(Ordering::Relaxed),
            total_latency: Duration::from_nanos(c.total_latency_ns.load(Ordering::Relaxed)),
            max_latency: Duration::from_nanos(c.max_latency_ns.load(Ordering::Relaxed)),
        }
    }

    /// What messages call a request: its method, URL and range, and the
    /// URL the overlay names when a redirect led elsewhere.
    fn context(&self, first: u64, last: u64, target: &Url) -> String {
        if *target == self.url {
            format!("GET {target} bytes={first}-{last}")
        } else {
            format!(
                "GET {target} bytes={first}-{last} (redirected from {})",
                self.url
            )
        }
    }

    /// Where requests go now.
    fn target(&self) -> Arc<Url> {
        self.target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_target(&self, url: Arc<Url>) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = url;
    }

    /// Runs `exchange` on a pooled connection until it succeeds, fails for
    /// good, or the retries run out. `exchange` returns its result and
    /// whether the connection may be reused.
    ///
    /// Redirects are followed, as QEMU's curl driver follows them: up to
    /// [`MAX_REDIRECTS`] per request, to http or https, relative or not.
    /// Where the chain ends becomes the target of later requests, so a
    /// redirect costs one round trip, not one per read. A target reached
    /// by a redirect that then answers 401, 403, 404 or 410 (a signed URL
    /// that expired, a mirror that dropped the file) is given up for the
    /// URL the overlay names, once per request: its redirect is followed
    /// again from the start.
    fn run<T>(
        &self,
        first: u64,
        last: u64,
        mut exchange: impl FnMut(&mut Conn, &Url) -> Result<(T, bool), Failure>,
    ) -> Result<T, HttpError> {
        let policy = &self.opts.retry;
        let mut failures = 0u32;
        // Each stale connection is dropped, so at most `max` of them can be
        // met in a row; one more is a server closing fresh connections too.
        let mut stale = 0usize;
        let mut redirects = 0u32;
        let mut restarted = false;
        loop {
            let target = self.target();
            if let Some(first_report) = self.changed.get() {
                return Err(HttpError::new(
                    HttpErrorKind::Changed,
                    format!(
                        "{}: the remote image changed since it was opened (not sent: an earlier \
                         request found it: {first_report})",
                        self.context(first, last, &target)
                    ),
                ));
            }
            let mut lease = self.pool.acquire();
            let result = self.attempt(&target, &mut lease, &mut exchange);
            drop(lease);
            let (what, retry_after) = match result {
                Ok(value) => return Ok(value),
                Err(Failure::Redirect(location)) => {
                    redirects += 1;
                    let next = self.follow(&target, &location, redirects).map_err(|why| {
                        HttpError::new(
                            HttpErrorKind::Status,
                            format!("{}: {why}", self.context(first, last, &target)),
                        )
                    })?;
                    self.counters.redirects.fetch_add(1, Ordering::Relaxed);
                    self.set_target(Arc::new(next));
                    continue;
                }
                Err(Failure::Fatal(e))
                    if !restarted
                        && e.kind == HttpErrorKind::Status
                        && matches!(e.status, Some(401 | 403 | 404 | 410))
                        && *target != self.url =>
                {
                    restarted = true;
                    self.set_target(Arc::new(self.url.clone()));
                    continue;
                }
                Err(Failure::Fatal(mut e)) => {
                    e.message = format!("{}: {}", self.context(first, last, &target), e.message);
                    if e.kind == HttpErrorKind::Changed {
                        // Only the first report is kept: it says what changed.
                        let _ = self.changed.set(e.clone());
                    }
                    return Err(e);
                }
                Err(Failure::Stale(_)) if stale <= self.pool.max => {
                    stale += 1;
                    continue;
                }
                Err(Failure::Stale(what)) => (what, None),
                Err(Failure::Transient { what, retry_after }) => (what, retry_after),
            };
            failures += 1;
            if failures >= policy.max_attempts {
                return Err(HttpError::new(
                    HttpErrorKind::Unavailable,
                    format!(
                        "{}: {what} (gave up after {failures} attempt{})",
                        self.context(first, last, &target),
                        if failures == 1 { "" } else { "s" }
                    ),
                ));
            }
            let wait = match retry_after {
                Some(asked) => asked.min(policy.max_retry_after),
                None => backoff(policy, failures),
            };
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(wait);
        }
    }

    /// Where the `redirects`-th redirect of a request, from `target` to
    /// `location`, leads. Credentials go along to the same server only, as
    /// curl sends them.
    fn follow(&self, target: &Url, location: &str, redirects: u32) -> Result<Url, String> {
        if redirects > MAX_REDIRECTS {
            return Err(format!(
                "more than {MAX_REDIRECTS} redirects (the last to {location})"
            ));
        }
        let mut next = target.join(location).map_err(|e| {
            format!("the server redirects to {location:?}, which cannot be followed: {e}")
        })?;
        if next.authorization.is_none() && next.origin() == self.url.origin() {
            next.authorization = self.url.authorization.clone();
        }
        Ok(next)
    }

    /// The TLS configuration for a connection to `url` (none for http),
    /// made the first time an https URL needs it.
    fn tls_for(&self, url: &Url) -> Result<Option<Arc<rustls::ClientConfig>>, Failure> {
        if url.scheme == Scheme::Http {
            return Ok(None);
        }
        let mut tls = self.tls.lock().unwrap_or_else(|p| p.into_inner());
        if tls.is_none() {
            let config = conn::tls_config(self.opts.ca_file.as_deref()).map_err(|e| {
                Failure::Fatal(HttpError::new(HttpErrorKind::InvalidOptions, e.to_string()))
            })?;
            *tls = Some(config);
        }
        Ok(tls.clone())
    }

    /// The proxy requests to `url` go through, if any.
    fn proxy_for(&self, url: &Url) -> Option<&Url> {
        let proxy = match url.scheme {
            Scheme::Http => &self.http_proxy,
            Scheme::Https => &self.https_proxy,
        };
        proxy
            .as_ref()
            .filter(|_| !self.opts.proxies.bypassed(&url.host))
    }

    /// One attempt: a connection to `target` from the lease (opened if need
    /// be), one request and response on it.
    fn attempt<T>(
        &self,
        target: &Url,
        lease: &mut Lease<'_>,
        exchange: &mut impl FnMut(&mut Conn, &Url) -> Result<(T, bool), Failure>,
    ) -> Result<T, Failure> {
        let elsewhere = |c: &Conn| {
            c.origin
                .as_ref()
                .is_some_and(|(s, h, p)| (*s, h, *p) != target.origin())
        };
        if lease.conn.as_ref().is_some_and(elsewhere) {
            // Connected to where an earlier target was.
            lease.conn = None;
        }
        if lease.conn.is_none() {
            let conn = match &self.scripts {
                None => Conn::connect(
                    target,
                    self.tls_for(target)?.as_ref(),
                    self.proxy_for(target),
                    self.opts.connect_timeout,
                    self.opts.io_timeout,
                ),
                Some(scripts) => {
                    let next = scripts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop_front();
                    next.map(Conn::scripted)
                        .ok_or_else(|| ConnectError::Io(io::ErrorKind::ConnectionRefused.into()))
                }
            }
            .map_err(|e| match e {
                ConnectError::Io(e) => Failure::Transient {
                    what: match self.proxy_for(target) {
                        Some(proxy) => format!("connecting through the proxy {proxy}: {e}"),
                        None => format!("connecting to {}:{}: {}", target.host, target.port, e),
                    },
                    retry_after: None,
                },
                ConnectError::Fatal(msg) => {
                    Failure::Fatal(HttpError::new(HttpErrorKind::Protocol, msg))
                }
            })?;
            self.counters
                .connections_opened
                .fetch_add(1, Ordering::Relaxed);
            lease.conn = Some(conn);
        }
        let conn = lease.conn.as_mut().expect("a connection was just ensured");
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = exchange(conn, target);
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.counters
            .total_latency_ns
            .fetch_add(ns, Ordering::Relaxed);
        self.counters
            .max_latency_ns
            .fetch_max(ns, Ordering::Relaxed);
        let (value, keep) = result?;
        conn.completed += 1;
        lease.keep = keep;
        Ok(value)
    }

    /// Sends `GET` with `Range: bytes=first-last` and, once the size is
    /// known, the validator precondition; reads and checks the head.
    /// Returns the head's length in the connection's buffer.
    fn send_and_read_head(
        &self,
        conn: &mut Conn,
        url: &Url,
        first: u64,
        last: u64,
        conditional: bool,
    ) -> Result<usize, Failure> {
        let validator = if conditional {
            self.validator.as_ref()
        } else {
            None
        };
        // Out of the connection while it sends (no copy per request).
        let forward = conn.forward.take();
        let sent = conn.send(|req| {
            // Writing into a Vec cannot fail.
            let _ = match &forward {
                // Through a proxy: the whole URL, without credentials.
                Some(_) => write!(
                    req,
                    "GET http://{}{} HTTP/1.1\r\n",
                    url.host_header(),
                    url.target
                ),
                None => write!(req, "GET {} HTTP/1.1\r\n", url.target),
            };
            if let Some(Some(auth)) = &forward {
                let _ = write!(req, "Proxy-Authorization: {auth}\r\n");
            }
            let _ = write!(
                req,
                "Host: {}\r\nUser-Agent: backfill/{}\r\n\
                 Accept-Encoding: identity\r\nRange: bytes={first}-{last}\r\n",
                url.host_header(),
                env!("CARGO_PKG_VERSION"),
            );
            if let Some(auth) = &url.authorization {
                let _ = write!(req, "Authorization: {auth}\r\n");
            }
            let _ = match validator {
                Some(Validator::ETag(tag)) => write!(req, "If-Match: {tag}\r\n"),
                Some(Validator::LastModified(date)) => {
                    write!(req, "If-Unmodified-Since: {date}\r\n")
                }
                None => Ok(()),
            };
            req.extend_from_slice(b"\r\n");
        });
        conn.forward = forward;
        sent.map_err(|e| io_failure(conn, "sending the request", e))?;
        loop {
            let len = conn
                .read_head()
                .map_err(|e| io_failure(conn, "reading the response", e))?;
            let head = wire::parse_head(conn.head(len)).map_err(protocol)?;
            // Interim responses (100 Continue, 103 Early Hints) precede the
            // real one; 101 would switch protocols, which we never asked for.
            if (100..200).contains(&head.status) && head.status != 101 {
                conn.consume(len);
                continue;
            }
            return Ok(len);
        }
    }

    /// The open probe: `Range: bytes=0-0` without preconditions.
    fn probe(&self, conn: &mut Conn, url: &Url) -> Result<(Probe, bool), Failure> {
        let len = self.send_and_read_head(conn, url, 0, 0, false)?;
        let head = wire::parse_head(conn.head(len)).map_err(protocol)?;
        let owned = |v: Option<&str>| v.map(str::to_string);
        let (etag, last_modified) = (owned(head.etag), owned(head.last_modified));
        match head.status {
            206 => {}
            // An empty file: nothing is satisfiable, not even byte 0, so
            // servers answer 416 (RFC 9110) or the whole, empty, file (nginx).
            // Either way no read will ever need a range.
            416 | 200
                if head.content_range == Some(ContentRange::Unsatisfied { total: 0 })
                    || (head.status == 200 && head.content_length == Some(0)) =>
            {
                let probe = Probe {
                    size: 0,
                    etag,
                    last_modified,
                };
                return Ok((probe, false));
            }
            200 => {
                return Err(Failure::Fatal(HttpError::new(
                    HttpErrorKind::RangesUnsupported,
                    format!(
                        "the server answered a range request with 200 OK and the whole file \
                         ({}): it does not serve byte ranges, which a backing image needs",
                        if head.accept_ranges_bytes {
                            "despite Accept-Ranges: bytes"
                        } else {
                            "and no Accept-Ranges: bytes"
                        }
                    ),
                )))
            }
            _ => return Err(status_failure(&head)),
        }
        check_encoding(&head)?;
        let size = match head.content_range {
            Some(ContentRange::Bytes {
                first: 0,
                last: 0,
                total: Some(total),
            }) => total,
            other => {
                return Err(protocol(format!(
                    "206 for bytes=0-0 with Content-Range {other:?} (a whole size was expected)"
                )))
            }
        };
        let (chunked, content_length, keep_alive) =
            (head.chunked, head.content_length, head.keep_alive);
        conn.consume(len);
        let mut byte = [0u8; 1];
        read_body(conn, &mut Body::Slice(&mut byte), chunked, content_length)?;
        let probe = Probe {
            size,
            etag,
            last_modified,
        };
        Ok((probe, keep_alive))
    }

    /// One ranged read into `dst` (exactly `last - first + 1` bytes).
    fn ranged_get(
        &self,
        conn: &mut Conn,
        url: &Url,
        first: u64,
        last: u64,
        dst: &mut Body<'_>,
    ) -> Result<((), bool), Failure> {
        let len = self.send_and_read_head(conn, url, first, last, true)?;
        let head = wire::parse_head(conn.head(len)).map_err(protocol)?;
        let pinned = self.pinned();
        match head.status {
            206 => {}
            412 => {
                return Err(changed(format!(
                    "the server answered 412 Precondition Failed: {pinned} no longer matches"
                )))
            }
            200 => {
                return Err(changed(format!(
                    "the server answered 200 OK (the whole resource) instead of 206 with \
                     {pinned} as precondition"
                )))
            }
            416 => {
                return Err(changed(format!(
                    "the server answered 416 Range Not Satisfiable (Content-Range {:?}): \
                     the image is no longer {} bytes",
                    head.content_range, self.size
                )))
            }
            _ => return Err(status_failure(&head)),
        }
        match (&self.validator, head.etag, head.last_modified) {
            (Some(Validator::ETag(tag)), Some(now), _) if now != tag => {
                return Err(changed(format!(
                    "its ETag is now {now}, {pinned} when it was opened"
                )))
            }
            (Some(Validator::LastModified(date)), _, Some(now)) if now != date => {
                return Err(changed(format!(
                    "its Last-Modified is now {now}, {pinned} when it was opened"
                )))
            }
            _ => {}
        }
        match head.content_range {
            Some(ContentRange::Bytes {
                total: Some(total), ..
            }) if total != self.size => {
                return Err(changed(format!(
                    "its size is now {total} bytes, {} when it was opened",
                    self.size
                )))
            }
            Some(ContentRange::Bytes {
                first: f, last: l, ..
            }) if f == first && l == last => {}
            other => {
                return Err(protocol(format!(
                    "206 with Content-Range {other:?}, bytes {first}-{last} were asked for"
                )))
            }
        }
        check_encoding(&head)?;
        let (chunked, content_length, keep_alive) =
            (head.chunked, head.content_length, head.keep_alive);
        conn.consume(len);
        read_body(conn, dst, chunked, content_length)?;
        Ok(((), keep_alive))
    }

    /// The pinned validator, for messages (formatted only when one is made).
    fn pinned(&self) -> Pinned<'_> {
        Pinned(self.validator.as_ref())
    }
}

/// Names a pinned validator in messages.
struct Pinned<'a>(Option<&'a Validator>);

impl fmt::Display for Pinned<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(Validator::ETag(tag)) => write!(f, "ETag {tag}"),
            Some(Validator::LastModified(date)) => write!(f, "Last-Modified {date}"),
            None => f.write_str("no validator"),
        }
    }
}

/// The wait before attempt `failures + 1`: `initial * 2^(failures - 1)`,
/// capped, then jittered into its upper half so that many clients that
/// failed together do not retry together.
fn backoff(policy: &RetryPolicy, failures: u32) -> Duration {
    let doubling = 1u32 << failures.saturating_sub(1).min(20);
    let full = policy
        .initial_backoff
        .saturating_mul(doubling)
        .min(policy.max_backoff);
    let half = full / 2;
    let jitter_ns = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(rand::rng().random_range(0..=jitter_ns))
}

/// Where a ranged read's body goes.
enum Body<'a> {
    /// A buffer of exactly the body's length.
    Slice(&'a mut [u8]),
    /// A remote read's placements: `len` body bytes, those outside the
    /// placements dropped. Built only by [`HttpBacking::read_placed`]
    /// (and a unit test owning its buffer), whose safety contract covers
    /// the writes [`read_body`] makes through it.
    Placed { len: usize, dest: &'a [Placement] },
}

impl Body<'_> {
    fn len(&self) -> usize {
        match self {
            Body::Slice(dst) => dst.len(),
            Body::Placed { len, .. } => *len,
        }
    }
}

/// Reads a body of exactly `dst.len()` bytes, however it is framed.
fn read_body(
    conn: &mut Conn,
    dst: &mut Body<'_>,
    chunked: bool,
    content_length: Option<u64>,
) -> Result<(), Failure> {
    match content_length {
        Some(n) if !chunked && n != dst.len() as u64 => {
            return Err(protocol(format!(
                "Content-Length {n} for a range of {} bytes",
                dst.len()
            )))
        }
        _ => {}
    }
    // Without a length (and not chunked) the body runs to the end of the
    // connection, which is then not reused (see `wire::parse_head`).
    let result = match dst {
        Body::Slice(dst) if chunked => conn.read_chunked(dst),
        Body::Slice(dst) => conn.read_exact(dst),
        Body::Placed { len, dest } if chunked => {
            // Chunked ranges are rare: decode into a buffer, then place it.
            let mut body = vec![0u8; *len];
            conn.read_chunked(&mut body).and_then(|()| {
                // SAFETY: `read_placed`'s contract, which built this body.
                unsafe { place_range(&mut &body[..], dest, 0, *len) }
            })
        }
        // SAFETY: as above.
        Body::Placed { len, dest } => unsafe { place_range(conn, dest, 0, *len) },
    };
    result.map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => protocol(e.to_string()),
        _ => Failure::Transient {
            what: format!("reading the response body: {}", describe_io(&e)),
            retry_after: None,
        },
    })
}

fn check_encoding(head: &wire::Head<'_>) -> Result<(), Failure> {
    match head.content_encoding {
        Some(enc) => Err(protocol(format!(
            "the server sent Content-Encoding {enc} although identity was asked for"
        ))),
        None => Ok(()),
    }
}

/// The failure for a status other than the expected ones.
fn status_failure(head: &wire::Head<'_>) -> Failure {
    let status = head.status;
    let name = status_name(status);
    match status {
        408 | 429 | 500..=599 => {
            let retry_after = match status {
                429 | 503 => head
                    .retry_after
                    .and_then(|v| wire::parse_retry_after(v, SystemTime::now())),
                _ => None,
            };
            Failure::Transient {
                what: format!("the server answered {status} {name}"),
                retry_after,
            }
        }
        301 | 302 | 303 | 307 | 308 if head.location.is_some() => {
            Failure::Redirect(head.location.unwrap_or_default().to_string())
        }
        _ => {
            let message = format!("the server answered {status} {name} (not retried)");
            Failure::Fatal(HttpError {
                kind: HttpErrorKind::Status,
                status: Some(status),
                message,
            })
        }
    }
}

fn status_name(status: u16) -> &'static str {
    match status {
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

fn changed(detail: String) -> Failure {
    Failure::Fatal(HttpError::new(
        HttpErrorKind::Changed,
        format!("the remote image changed since it was opened: {detail}"),
    ))
}

fn protocol(detail: String) -> Failure {
    Failure::Fatal(HttpError::new(
        HttpErrorKind::Protocol,
        format!("malformed response: {detail}"),
    ))
}

/// Classifies an I/O error while sending a request or reading a head.
fn io_failure(conn: &Conn, doing: &str, e: io::Error) -> Failure {
    if e.kind() == io::ErrorKind::InvalidData {
        return protocol(format!("{doing}: {e}"));
    }
    let what = format!("{doing}: {}", describe_io(&e));
    if conn.completed > 0 && conn.nothing_received() {
        Failure::Stale(what)
    } else {
        Failure::Transient {
            what,
            retry_after: None,
        }
    }
}

/// Socket timeouts surface as `WouldBlock` or `TimedOut`; name them plainly.
fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::IoBuf;

    #[test]
    fn proxies_are_parsed_and_bypassed_as_curl_does() {
        assert_eq!(
            parse_proxy(" proxy.test:3128 ").unwrap().to_string(),
            "http://proxy.test:3128"
        );
        let p = parse_proxy("http://u:p@10.0.0.1:8080/").unwrap();
        assert_eq!(p.authorization.as_deref(), Some("Basic dTpw"));
        for bad in ["https://proxy.test", "socks5://proxy.test:1080", "http://"] {
            let e = parse_proxy(bad).unwrap_err();
            assert_eq!(e.kind(), HttpErrorKind::InvalidOptions, "{bad}: {e}");
        }
        let p = Proxies {
            no_proxy: vec!["example.com".into(), "10.1.2.3".into(), "[::1]".into()],
            ..Proxies::default()
        };
        let host = |s: &str| Url::parse(&format!("http://{s}/")).unwrap().host;
        for (h, direct) in [
            ("example.com", true),
            ("a.b.example.com", true),
            ("badexample.com", false),
            ("10.1.2.3", true),
            ("10.1.2.30", false),
            ("[::1]", true),
            ("other.test", false),
        ] {
            assert_eq!(p.bypassed(&host(h)), direct, "{h}");
        }
        let all = Proxies {
            no_proxy: vec!["*".into()],
            ..Proxies::default()
        };
        assert!(all.bypassed(&host("anything.test")));
    }

    /// A body read into placements lands in their ranges of the buffer and
    /// nowhere else (the bytes between and after them are dropped), with a
    /// Content-Length or chunked, and leaves the connection at the next
    /// response.
    #[test]
    fn placed_bodies_land_in_their_ranges_and_nowhere_else() {
        let body: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let next = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 0\r\n\r\n";
        for chunked in [false, true] {
            let mut bytes = Vec::new();
            if chunked {
                bytes.extend_from_slice(b"HTTP/1.1 206 x\r\nTransfer-Encoding: chunked\r\n\r\n");
                for piece in body.chunks(7_000) {
                    bytes.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                    bytes.extend_from_slice(piece);
                    bytes.extend_from_slice(b"\r\n");
                }
                bytes.extend_from_slice(b"0\r\n\r\n");
            } else {
                bytes.extend_from_slice(b"HTTP/1.1 206 x\r\nContent-Length: 20000\r\n\r\n");
                bytes.extend_from_slice(&body);
            }
            bytes.extend_from_slice(next);
            let mut conn = conn::tests::conn_receiving(&bytes);
            let head = conn.read_head().unwrap();
            conn.consume(head);

            let buf = IoBuf::filled(30_000, 0xee);
            let dest = vec![
                Placement {
                    at: 100,
                    buf: buf.clone(),
                    buf_off: 1_000,
                    len: 5_000,
                },
                Placement {
                    at: 8_000,
                    buf: buf.clone(),
                    buf_off: 10_000,
                    len: 11_000,
                },
            ];
            let length = (!chunked).then_some(20_000);
            let mut placed = Body::Placed {
                len: 20_000,
                dest: &dest,
            };
            assert!(read_body(&mut conn, &mut placed, chunked, length).is_ok());
            drop(dest);
            let got = buf.as_slice();
            assert_eq!(&got[1_000..6_000], &body[100..5_100], "chunked {chunked}");
            assert_eq!(
                &got[10_000..21_000],
                &body[8_000..19_000],
                "chunked {chunked}"
            );
            let untouched = got[..1_000]
                .iter()
                .chain(&got[6_000..10_000])
                .chain(&got[21_000..]);
            assert!(
                untouched.into_iter().all(|&b| b == 0xee),
                "chunked {chunked}"
            );
            // The whole body was consumed: the next head follows.
            let head = conn.read_head().unwrap();
            assert_eq!(conn.head(head), next);
        }
    }
}
