//! One HTTP/1.1 connection: a blocking TCP socket, TLS on top for https,
//! and a fixed read buffer that response heads are parsed from.
//!
//! What it owns: the socket, the rustls session, the buffer and the
//! request-assembly vector, all allocated once per connection and reused
//! by every request on it. It never decides what a response means (that is
//! the client's job in `http.rs`); it moves bytes and says how a transfer
//! failed.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, IpAddr as TlsIpAddr, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::url::{Host, Scheme, Url};
use super::wire::{self, MAX_HEAD_BYTES};

/// The longest chunk-size or trailer line we accept in a chunked body.
const MAX_CHUNK_LINE_BYTES: usize = 1024;

/// Builds the TLS configuration for `https` URLs: the system's root
/// certificates plus those in `ca_file` (PEM), ring as the crypto provider,
/// TLS 1.2 and 1.3, ALPN `http/1.1`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    // Unreadable system certificates are not fatal: a private CA file may be
    // all this backing needs. No usable root at all is reported below.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("reading CA file {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "CA file {} holds no PEM certificate",
                path.display()
            ));
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted root certificates: the system has none (install ca-certificates) \
             and no CA file was given"
                .into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How opening a connection failed.
pub enum ConnectError {
    /// The network: refused, reset, unreachable, timed out. Worth retrying.
    Io(io::Error),
    /// TLS refused the peer (a bad certificate, no common protocol), or
    /// the name resolved to no address. Retrying will not help.
    Fatal(String),
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
    /// A server that is a byte string (the fuzz target `http_responses`):
    /// reads give its bytes, then the end of the stream; writes go nowhere.
    Script(io::Cursor<Vec<u8>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Script(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Script(_) => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Script(_) => Ok(()),
        }
    }
}

/// Opens a `CONNECT` tunnel to `url`'s host through `proxy` on `socket`
/// (connected to the proxy); returns the socket once the proxy answered 2xx
/// and nothing more.
fn tunnel(socket: TcpStream, url: &Url, proxy: &Url) -> Result<TcpStream, ConnectError> {
    let authority = format!("{}:{}", url.host, url.port);
    let mut conn = Conn::new(Stream::Plain(socket));
    conn.send(|req| {
        // Writing into a Vec cannot fail.
        let _ = write!(req, "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(auth) = &proxy.authorization {
            let _ = write!(req, "Proxy-Authorization: {auth}\r\n");
        }
        req.extend_from_slice(b"\r\n");
    })
    .map_err(ConnectError::Io)?;
    let len = conn.read_head().map_err(ConnectError::Io)?;
    let status = wire::parse_head(conn.head(len))
        .map_err(|e| {
            ConnectError::Fatal(format!(
                "the proxy {proxy} answered CONNECT {authority} with a malformed response: {e}"
            ))
        })?
        .status;
    match status {
        200..=299 => {}
        // The proxy could not reach the server, for now.
        502..=504 => {
            return Err(ConnectError::Io(io::Error::other(format!(
                "the proxy {proxy} answered CONNECT {authority} with {status}"
            ))))
        }
        _ => {
            return Err(ConnectError::Fatal(format!(
                "the proxy {proxy} refused CONNECT {authority} with {status}"
            )))
        }
    }
    conn.consume(len);
    if conn.start != conn.end {
        return Err(ConnectError::Fatal(format!(
            "the proxy {proxy} sent bytes after its answer to CONNECT {authority}"
        )));
    }
    match conn.stream {
        Stream::Plain(socket) => Ok(socket),
        _ => unreachable!("the tunnel is made on a plain socket"),
    }
}

/// An open connection with its buffers.
pub struct Conn {
    stream: Stream,
    /// Bytes read from the stream and not consumed yet: `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Bytes received since the last request was sent: a reused connection
    /// that fails before receiving any was most likely closed by the server
    /// while idle.
    received: u64,
    /// Responses completed on this connection.
    pub completed: u64,
    /// The scheme, host and port it is connected to (none: scripted).
    pub origin: Option<(Scheme, Host, u16)>,
    /// Connected to an HTTP proxy that forwards plain http requests: they
    /// name the whole URL, with this `Proxy-Authorization` value if any.
    pub forward: Option<Option<String>>,
    /// The request being assembled; keeps its capacity across requests.
    request: Vec<u8>,
}

impl Conn {
    /// Connects to `url`'s host (trying each resolved address in turn, each
    /// within `connect_timeout`) and, for https, completes the TLS handshake.
    /// Every later read or write on the socket times out after `io_timeout`.
    ///
    /// Through `proxy` (an `http://` URL), if given: an http request then
    /// goes to it in absolute form (`GET http://host/path`), and an https
    /// connection is a `CONNECT` tunnel through it, TLS end to end.
    pub fn connect(
        url: &Url,
        tls: Option<&Arc<ClientConfig>>,
        proxy: Option<&Url>,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        let hop = proxy.unwrap_or(url);
        let addrs: Vec<SocketAddr> = match &hop.host {
            Host::V4(ip) => vec![SocketAddr::from((*ip, hop.port))],
            Host::V6(ip) => vec![SocketAddr::from((*ip, hop.port))],
            // A failed lookup may be a passing resolver failure: it is
            // retried like a refused connection (and as boundedly).
            Host::Name(name) => (name.as_str(), hop.port)
                .to_socket_addrs()
                .map_err(|e| {
                    ConnectError::Io(io::Error::new(e.kind(), format!("resolving {name}: {e}")))
                })?
                .collect(),
        };
        let mut last_err = None;
        let mut socket = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, connect_timeout) {
                Ok(s) => {
                    socket = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let socket = match (socket, last_err) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(ConnectError::Io(e)),
            (None, None) => {
                return Err(ConnectError::Fatal(format!(
                    "{} resolves to no address",
                    hop.host
                )))
            }
        };
        let setup = |s: &TcpStream| {
            s.set_read_timeout(Some(io_timeout))?;
            s.set_write_timeout(Some(io_timeout))?;
            // Requests are small and answered before the next one is sent:
            // do not let Nagle's algorithm hold them back.
            s.set_nodelay(true)
        };
        setup(&socket).map_err(ConnectError::Io)?;
        let stream = match (url.scheme, tls) {
            (Scheme::Http, _) => Stream::Plain(socket),
            (Scheme::Https, None) => {
                return Err(ConnectError::Fatal(
                    "https without a TLS configuration".into(),
                ))
            }
            (Scheme::Https, Some(config)) => {
                let socket = match proxy {
                    Some(proxy) => tunnel(socket, url, proxy)?,
                    None => socket,
                };
                Stream::Tls(Box::new(handshake(url, config, socket)?))
            }
        };
        let mut conn = Conn::new(stream);
        conn.origin = Some((url.scheme, url.host.clone(), url.port));
        if url.scheme == Scheme::Http {
            if let Some(proxy) = proxy {
                conn.forward = Some(proxy.authorization.clone());
            }
        }
        Ok(conn)
    }

    /// A connection to a server whose every byte is `server` (the fuzz
    /// target `http_responses`).
    pub fn scripted(server: Vec<u8>) -> Conn {
        Conn::new(Stream::Script(io::Cursor::new(server)))
    }

    fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            buf: vec![0u8; MAX_HEAD_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            received: 0,
            completed: 0,
            origin: None,
            forward: None,
            request: Vec::with_capacity(512),
        }
    }

    /// Sends one request, assembled by `build` into the connection's reusable
    /// request buffer.
    pub fn send(&mut self, build: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        self.request.clear();
        build(&mut self.request);
        self.received = 0;
        self.stream.write_all(&self.request)?;
        self.stream.flush()
    }

    /// True if nothing of the current response has arrived yet.
    pub fn nothing_received(&self) -> bool {
        self.received == 0
    }

    /// Reads until the buffer starts with a whole response head; returns its
    /// length. Look at it with [`Conn::head`], then [`Conn::consume`] it.
    pub fn read_head(&mut self) -> io::Result<usize> {
        loop {
            if let Some(n) = wire::head_len(&self.buf[self.start..self.end]) {
                return Ok(n);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("response head larger than {MAX_HEAD_BYTES} bytes"),
                ));
            }
            self.fill()?;
        }
    }

    /// The first `len` buffered bytes (a head [`Conn::read_head`] found).
    pub fn head(&self, len: usize) -> &[u8] {
        &self.buf[self.start..self.start + len]
    }

    pub fn consume(&mut self, len: usize) {
        assert!(len <= self.end - self.start);
        self.start += len;
    }

    /// Reads more bytes into the buffer's free tail; EOF is an error.
    fn fill(&mut self) -> io::Result<()> {
        let n = loop {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        self.end += n;
        self.received += n as u64;
        Ok(())
    }

    /// Decodes a chunked body that must hold exactly `dst.len()` bytes into
    /// `dst`, through its last chunk and trailers. A body of another length
    /// is an `InvalidData` error.
    pub fn read_chunked(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let mut filled = 0usize;
        loop {
            let line_len = self.read_line()?;
            let size = wire::parse_chunk_size(&self.buf[self.start..self.start + line_len - 2])
                .map_err(invalid)?;
            self.consume(line_len);
            if size == 0 {
                break;
            }
            let room = (dst.len() - filled) as u64;
            if size > room {
                return Err(invalid(format!(
                    "chunked body longer than the {} bytes asked for",
                    dst.len()
                )));
            }
            let size = size as usize;
            self.read_exact(&mut dst[filled..filled + size])?;
            filled += size;
            let mut crlf = [0u8; 2];
            self.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(invalid("chunk data not followed by CRLF".into()));
            }
        }
        // Trailer fields, up to the empty line that ends the message.
        loop {
            let line_len = self.read_line()?;
            self.consume(line_len);
            if line_len == 2 {
                break;
            }
        }
        if filled != dst.len() {
            return Err(invalid(format!(
                "chunked body of {filled} bytes, {} asked for",
                dst.len()
            )));
        }
        Ok(())
    }

    /// The length, CRLF included, of the line at the start of the buffer.
    fn read_line(&mut self) -> io::Result<usize> {
        loop {
            let avail = &self.buf[self.start..self.end];
            if let Some(i) = avail.windows(2).position(|w| w == b"\r\n") {
                return Ok(i + 2);
            }
            if avail.len() >= MAX_CHUNK_LINE_BYTES {
                return Err(invalid(format!(
                    "chunk or trailer line longer than {MAX_CHUNK_LINE_BYTES} bytes"
                )));
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            self.fill()?;
        }
    }
}

/// Body bytes: the buffered ones first, then straight from the socket into
/// the caller's buffer (no extra copy: a read's buffer, or a remote read's
/// placement, see `backing::remote::Placement`).
impl Read for Conn {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if self.start < self.end {
            let n = (self.end - self.start).min(dst.len());
            dst[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            return Ok(n);
        }
        let n = self.stream.read(dst)?;
        self.received += n as u64;
        Ok(n)
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Runs the TLS handshake to completion, so that a certificate the client
/// refuses is reported as such (and not retried), apart from I/O errors.
fn handshake(
    url: &Url,
    config: &Arc<ClientConfig>,
    mut socket: TcpStream,
) -> Result<StreamOwned<ClientConnection, TcpStream>, ConnectError> {
    let name: ServerName<'static> = match &url.host {
        Host::V4(ip) => ServerName::IpAddress(TlsIpAddr::from(std::net::IpAddr::V4(*ip))),
        Host::V6(ip) => ServerName::IpAddress(TlsIpAddr::from(std::net::IpAddr::V6(*ip))),
        Host::Name(name) => ServerName::try_from(name.clone())
            .map_err(|e| ConnectError::Fatal(format!("TLS server name {name:?}: {e}")))?,
    };
    let mut session = ClientConnection::new(Arc::clone(config), name)
        .map_err(|e| ConnectError::Fatal(format!("TLS: {e}")))?;
    while session.is_handshaking() {
        if let Err(e) = session.complete_io(&mut socket) {
            let tls_refusal = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .map(|tls| tls.to_string());
            return Err(match tls_refusal {
                Some(msg) => ConnectError::Fatal(format!("TLS handshake with {}: {msg}", url.host)),
                None => ConnectError::Io(e),
            });
        }
    }
    Ok(StreamOwned::new(session, socket))
}

#[cfg(test)]
pub(crate) mod tests {
    //! The body readers over a real loopback socket, fed bytes that a
    //! well-behaved server would never send (nginx serves our ranges with
    //! Content-Length, so the chunked decoder meets only these peers).

    use super::*;
    use std::net::{Ipv4Addr, TcpListener};

    /// A connection whose peer has sent `bytes` and then closed.
    pub(crate) fn conn_receiving(bytes: &[u8]) -> Conn {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(bytes).unwrap();
        drop(server);
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Conn::new(Stream::Plain(client))
    }

    fn chunked(bytes: &[u8], want: usize) -> io::Result<Vec<u8>> {
        let mut conn = conn_receiving(bytes);
        let mut dst = vec![0u8; want];
        conn.read_chunked(&mut dst)?;
        Ok(dst)
    }

    #[test]
    fn decodes_chunked_bodies() {
        let body = b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Trailer: t\r\n\r\n";
        assert_eq!(chunked(body, 7).unwrap(), b"abcdefg");
        assert_eq!(chunked(b"0\r\n\r\n", 0).unwrap(), b"");

        // After a head and a chunked body, the next head is intact.
        let mut conn = conn_receiving(
            b"HTTP/1.1 206 x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\nHTTP/1.1 412 x\r\n\r\n",
        );
        let len = conn.read_head().unwrap();
        conn.consume(len);
        let mut dst = [0u8; 2];
        conn.read_chunked(&mut dst).unwrap();
        assert_eq!(&dst, b"hi");
        let len = conn.read_head().unwrap();
        assert_eq!(conn.head(len), b"HTTP/1.1 412 x\r\n\r\n");
    }

    #[test]
    fn refuses_bad_chunked_bodies() {
        let cases: [(&[u8], usize, io::ErrorKind); 6] = [
            // Longer than asked for.
            (b"8\r\nabcdefgh\r\n0\r\n\r\n", 4, io::ErrorKind::InvalidData),
            // Shorter than asked for.
            (b"2\r\nab\r\n0\r\n\r\n", 4, io::ErrorKind::InvalidData),
            // Data not followed by CRLF.
            (b"2\r\nabXY0\r\n\r\n", 2, io::ErrorKind::InvalidData),
            // Not hex.
            (b"zz\r\nab\r\n0\r\n\r\n", 2, io::ErrorKind::InvalidData),
            // Cut off by the peer.
            (b"4\r\nab", 4, io::ErrorKind::UnexpectedEof),
            // Trailers that never end are cut off too.
            (b"0\r\nX: y\r\n", 0, io::ErrorKind::UnexpectedEof),
        ];
        for (body, want, kind) in cases {
            let err = chunked(body, want).unwrap_err();
            assert_eq!(err.kind(), kind, "{body:?}: {err}");
        }
        // An endless chunk-size line is bounded.
        let mut long = vec![b'0'; 4 * MAX_CHUNK_LINE_BYTES];
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            chunked(&long, 0).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn bounds_response_heads() {
        let mut head = b"HTTP/1.1 206 x\r\n".to_vec();
        while head.len() <= MAX_HEAD_BYTES {
            head.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let err = conn_receiving(&head).read_head().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");

        let mut conn = conn_receiving(b"HTTP/1.1 206 x\r\nContent-Le");
        assert_eq!(
            conn.read_head().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(!conn.nothing_received());
        let mut conn = conn_receiving(b"");
        assert_eq!(
            conn.read_head().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(conn.nothing_received());
    }

    #[test]
    fn body_bytes_come_from_the_buffer_then_the_socket() {
        let mut bytes = b"HTTP/1.1 206 x\r\nContent-Length: 40000\r\n\r\n".to_vec();
        let body: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        bytes.extend_from_slice(&body);
        let mut conn = conn_receiving(&bytes);
        let len = conn.read_head().unwrap();
        conn.consume(len);
        let mut dst = vec![0u8; body.len()];
        conn.read_exact(&mut dst).unwrap();
        assert_eq!(dst, body);
    }
}
