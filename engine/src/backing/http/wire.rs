//! The HTTP/1.1 wire format as a range-reading client needs it (RFC 9110,
//! RFC 9112): response heads, `Content-Range`, chunk-size lines and
//! `Retry-After`.
//!
//! Pure: every function takes bytes and returns values or an error message;
//! nothing here reads a socket. The input is whatever a server (or anything
//! pretending to be one) sent, so every function bounds what it accepts and
//! returns an error on anything malformed, never panics. Parsing borrows
//! from the caller's buffer and allocates only for error messages.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The largest response head (status line and headers) we accept.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A `Content-Range` value (RFC 9110 section 14.4), bytes only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentRange {
    /// `bytes FIRST-LAST/TOTAL`, with TOTAL `None` for `*`.
    Bytes {
        first: u64,
        last: u64,
        total: Option<u64>,
    },
    /// `bytes */TOTAL`, as sent with 416 Range Not Satisfiable.
    Unsatisfied { total: u64 },
}

/// The parts of a response head this client acts on. Header values borrow
/// from the buffer the head was parsed from.
#[derive(Debug, Default)]
pub struct Head<'a> {
    pub status: u16,
    /// False when the server will close the connection after this response
    /// (`Connection: close`, or HTTP/1.0 without `keep-alive`).
    pub keep_alive: bool,
    pub content_length: Option<u64>,
    /// `Transfer-Encoding: chunked` (the only transfer coding we accept).
    pub chunked: bool,
    pub content_range: Option<ContentRange>,
    pub etag: Option<&'a str>,
    pub last_modified: Option<&'a str>,
    /// `Accept-Ranges` lists `bytes`.
    pub accept_ranges_bytes: bool,
    pub retry_after: Option<&'a str>,
    /// `Content-Encoding`, when it is anything but `identity`.
    pub content_encoding: Option<&'a str>,
    pub location: Option<&'a str>,
}

/// The length of the head at the start of `buf` (through the blank line
/// that ends it), or `None` if `buf` does not hold a whole head yet.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a response head: the bytes [`head_len`] delimited.
pub fn parse_head(head: &[u8]) -> Result<Head<'_>, String> {
    let text = head
        .strip_suffix(b"\r\n\r\n")
        .ok_or("the response head does not end with an empty line")?;
    let mut lines = text
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().unwrap_or_default();
    let (http10, status) = parse_status_line(status_line)?;
    let mut h = Head {
        status,
        ..Head::default()
    };
    let mut close = false;
    let mut keep_alive_token = false;
    for line in lines {
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            return Err("obsolete folded header line in the response".into());
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| format!("malformed header line {:?}", String::from_utf8_lossy(line)))?;
        let name = &line[..colon];
        if name.is_empty() || name.iter().any(|b| !is_token_byte(*b)) {
            return Err(format!(
                "malformed header name {:?}",
                String::from_utf8_lossy(name)
            ));
        }
        let value = || -> Result<&str, String> {
            let v = std::str::from_utf8(&line[colon + 1..]).map_err(|_| {
                format!(
                    "header {} is not valid UTF-8",
                    String::from_utf8_lossy(name)
                )
            })?;
            Ok(v.trim_matches([' ', '\t']))
        };
        if name.eq_ignore_ascii_case(b"content-length") {
            let v = value()?;
            let n = parse_decimal(v).ok_or_else(|| format!("bad Content-Length {v:?}"))?;
            if h.content_length.is_some_and(|old| old != n) {
                return Err("conflicting Content-Length headers".into());
            }
            h.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let v = value()?;
            for coding in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                if coding.eq_ignore_ascii_case("chunked") && !h.chunked {
                    h.chunked = true;
                } else {
                    return Err(format!("unsupported Transfer-Encoding {v:?}"));
                }
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value()?.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive_token |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"content-range") {
            let v = value()?;
            let cr = parse_content_range(v).ok_or_else(|| format!("bad Content-Range {v:?}"))?;
            if h.content_range.is_some_and(|old| old != cr) {
                return Err("conflicting Content-Range headers".into());
            }
            h.content_range = Some(cr);
        } else if name.eq_ignore_ascii_case(b"etag") {
            h.etag = Some(value()?);
        } else if name.eq_ignore_ascii_case(b"last-modified") {
            h.last_modified = Some(value()?);
        } else if name.eq_ignore_ascii_case(b"accept-ranges") {
            h.accept_ranges_bytes |= value()?
                .split(',')
                .any(|u| u.trim().eq_ignore_ascii_case("bytes"));
        } else if name.eq_ignore_ascii_case(b"retry-after") {
            h.retry_after = Some(value()?);
        } else if name.eq_ignore_ascii_case(b"content-encoding") {
            let v = value()?;
            if !v.eq_ignore_ascii_case("identity") {
                h.content_encoding = Some(v);
            }
        } else if name.eq_ignore_ascii_case(b"location") {
            h.location = Some(value()?);
        }
    }
    // A body whose length we do not know ends when the connection closes
    // (RFC 9112 section 6.3), so such a connection cannot be reused either.
    let delimited = h.chunked || h.content_length.is_some();
    // Both framings at once is how request smuggling starts: chunked wins
    // (RFC 9112 section 6.3), and the connection is not trusted again.
    let ambiguous = h.chunked && h.content_length.is_some();
    h.keep_alive = delimited && !ambiguous && !close && (!http10 || keep_alive_token);
    Ok(h)
}

/// `HTTP/1.x NNN reason` → (is HTTP/1.0, status).
fn parse_status_line(line: &[u8]) -> Result<(bool, u16), String> {
    let bad = || {
        format!(
            "malformed status line {:?}",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        )
    };
    let http10 = match line.get(..9) {
        Some(b"HTTP/1.1 ") => false,
        Some(b"HTTP/1.0 ") => true,
        _ => return Err(bad()),
    };
    let code = line.get(9..12).ok_or_else(bad)?;
    if !code.iter().all(u8::is_ascii_digit) || line.get(12).is_some_and(|&b| b != b' ') {
        return Err(bad());
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&status) {
        return Err(bad());
    }
    Ok((http10, status))
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A non-empty run of ASCII digits that fits in a u64.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a `Content-Range` value; `None` if malformed or inconsistent
/// (FIRST > LAST, or LAST >= TOTAL).
pub fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.strip_prefix("bytes ")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    if range == "*" {
        return Some(ContentRange::Unsatisfied {
            total: parse_decimal(total)?,
        });
    }
    let (first, last) = range.split_once('-')?;
    let (first, last) = (parse_decimal(first)?, parse_decimal(last)?);
    let total = match total {
        "*" => None,
        t => Some(parse_decimal(t)?),
    };
    if first > last || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some(ContentRange::Bytes { first, last, total })
}

/// The size of the next chunk from a chunk-size line (without its CRLF):
/// hex digits, optionally followed by `;extensions`, which we ignore.
pub fn parse_chunk_size(line: &[u8]) -> Result<u64, String> {
    let end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let hex = line[..end].trim_ascii();
    if hex.is_empty() || hex.len() > 16 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!(
            "malformed chunk size line {:?}",
            String::from_utf8_lossy(&line[..line.len().min(40)])
        ));
    }
    // Sixteen hex digits always fit in a u64.
    let hex = std::str::from_utf8(hex).expect("hex digits are ASCII");
    Ok(u64::from_str_radix(hex, 16).expect("at most 16 hex digits"))
}

/// How long a `Retry-After` value asks us to wait: delta-seconds, or an
/// HTTP-date (IMF-fixdate, the form RFC 9110 says senders must use) relative
/// to `now`. `None` if the value is neither.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    if let Some(secs) = parse_decimal(v) {
        return Some(Duration::from_secs(secs));
    }
    let at = UNIX_EPOCH + Duration::from_secs(parse_imf_fixdate(v)?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` → seconds since the Unix epoch.
fn parse_imf_fixdate(v: &str) -> Option<u64> {
    let b = v.as_bytes();
    if b.len() != 29 || &b[3..5] != b", " || &b[25..] != b" GMT" {
        return None;
    }
    let num = |r: std::ops::Range<usize>| parse_decimal(v.get(r)?);
    let day = num(5..7)?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| v.get(8..11) == Some(*m))? as u64 + 1;
    let year = num(12..16)?;
    let (hour, min, sec) = (num(17..19)?, num(20..22)?, num(23..25)?);
    if b[7] != b' ' || b[11] != b' ' || b[16] != b' ' || b[19] != b':' || b[22] != b':' {
        return None;
    }
    if year < 1970 || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (year >= 1970),
/// by the usual era arithmetic (March-based years, 400-year eras).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The fuzz target `http_wire` (see [`crate::testing::fuzz`]): whatever a
/// server sends, through every parser here. Must hold: no panic; a head's
/// length ends at its first blank line; a parsed head has a valid status,
/// keeps the connection only when the body has exactly one framing, has a
/// consistent `Content-Range`, and header values without surrounding
/// blanks; values that parse print back to what parses the same (chunk
/// sizes, `Content-Range`, delta-seconds `Retry-After`).
pub(super) fn fuzz(data: &[u8]) {
    // A fixed "now", so that the same input always does the same.
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let check_range = |cr: ContentRange| match cr {
        ContentRange::Bytes { first, last, total } => {
            assert!(first <= last && total.is_none_or(|t| last < t), "{cr:?}");
            let text = match total {
                Some(t) => format!("bytes {first}-{last}/{t}"),
                None => format!("bytes {first}-{last}/*"),
            };
            assert_eq!(parse_content_range(&text), Some(cr));
        }
        ContentRange::Unsatisfied { total } => {
            assert_eq!(parse_content_range(&format!("bytes */{total}")), Some(cr));
        }
    };
    if let Some(n) = head_len(data) {
        assert!(data[..n].ends_with(b"\r\n\r\n"));
        assert!(data[..n].windows(4).filter(|w| *w == b"\r\n\r\n").count() == 1);
        if let Ok(h) = parse_head(&data[..n]) {
            assert!((100..=599).contains(&h.status));
            if h.keep_alive {
                assert!(h.chunked != h.content_length.is_some(), "{h:?}");
            }
            if let Some(cr) = h.content_range {
                check_range(cr);
            }
            let values = [
                h.etag,
                h.last_modified,
                h.retry_after,
                h.content_encoding,
                h.location,
            ];
            for v in values.into_iter().flatten() {
                assert_eq!(v, v.trim_matches([' ', '\t']), "{h:?}");
            }
            if let Some(v) = h.retry_after {
                let _ = parse_retry_after(v, now);
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(cr) = parse_content_range(text) {
            check_range(cr);
        }
        if let (Some(d), Some(secs)) = (parse_retry_after(text, now), parse_decimal(text)) {
            assert_eq!(d, Duration::from_secs(secs));
        }
    }
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if let Ok(size) = parse_chunk_size(line) {
        assert_eq!(parse_chunk_size(format!("{size:x}").as_bytes()), Ok(size));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Head<'_>, String> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn parses_a_partial_content_head() {
        let raw = "HTTP/1.1 206 Partial Content\r\nServer: nginx\r\ncontent-length: 4096\r\n\
                   Content-Range: bytes 4096-8191/1048576\r\nETag: \"6566-100000\"\r\n\
                   Last-Modified: Thu, 26 Nov 2026 08:00:00 GMT\r\nAccept-Ranges: none, bytes\r\n\r\n";
        assert_eq!(head_len(raw.as_bytes()), Some(raw.len()));
        assert_eq!(head_len(&raw.as_bytes()[..raw.len() - 1]), None);
        let h = head(raw).unwrap();
        assert_eq!(h.status, 206);
        assert!(h.keep_alive && !h.chunked && h.accept_ranges_bytes);
        assert_eq!(h.content_length, Some(4096));
        assert_eq!(
            h.content_range,
            Some(ContentRange::Bytes {
                first: 4096,
                last: 8191,
                total: Some(1 << 20)
            })
        );
        assert_eq!(h.etag, Some("\"6566-100000\""));
        assert_eq!(h.last_modified, Some("Thu, 26 Nov 2026 08:00:00 GMT"));
    }

    #[test]
    fn connection_reuse_rules() {
        let h =
            head("HTTP/1.1 206 x\r\nConnection: Keep-Alive, Close\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.unwrap().keep_alive);
        let h = head("HTTP/1.0 206 x\r\nContent-Length: 1\r\n\r\n").unwrap();
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 206 x\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n");
        assert!(h.unwrap().keep_alive);
        // No length: the body runs to the end of the connection.
        assert!(!head("HTTP/1.1 206 x\r\n\r\n").unwrap().keep_alive);
        let h = head("HTTP/1.1 206 x\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert!(h.keep_alive && h.chunked);
        let h = head("HTTP/1.1 206 x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        let h = h.unwrap();
        assert!(h.chunked && !h.keep_alive);
        // No reason phrase at all is legal.
        assert_eq!(head("HTTP/1.1 503\r\n\r\n").unwrap().status, 503);
    }

    #[test]
    fn refuses_malformed_heads() {
        for bad in [
            "",
            "\r\n\r\n",
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 099 x\r\n\r\n",
            "HTTP/1.1 600 x\r\n\r\n",
            "HTTP/1.1 2a6 x\r\n\r\n",
            "HTTP/1.1 206 x\r\nno colon\r\n\r\n",
            "HTTP/1.1 206 x\r\n: empty name\r\n\r\n",
            "HTTP/1.1 206 x\r\nbad name: v\r\n\r\n",
            "HTTP/1.1 206 x\r\nX: a\r\n folded\r\n\r\n",
            "HTTP/1.1 206 x\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 206 x\r\nContent-Length: 1, 2\r\n\r\n",
            "HTTP/1.1 206 x\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 206 x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 206 x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 206 x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 206 x\r\nContent-Range: bytes 5-4/10\r\n\r\n",
            "HTTP/1.1 206 x\r\nContent-Range: bytes 0-10/10\r\n\r\n",
            "HTTP/1.1 206 x\r\nContent-Range: bytes 0-1/10\r\nContent-Range: bytes 0-2/10\r\n\r\n",
        ] {
            assert!(head(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_head(b"HTTP/1.1 206 x\r\nETag: \"\xff\"\r\n\r\n").is_err());
        // Unknown headers may hold anything.
        assert!(parse_head(b"HTTP/1.1 206 x\r\nX-Junk: \xff\x01\r\n\r\n").is_ok());
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 0-0/1"),
            Some(ContentRange::Bytes {
                first: 0,
                last: 0,
                total: Some(1)
            })
        );
        assert_eq!(
            parse_content_range("bytes 7-9/*"),
            Some(ContentRange::Bytes {
                first: 7,
                last: 9,
                total: None
            })
        );
        assert_eq!(
            parse_content_range("bytes */0"),
            Some(ContentRange::Unsatisfied { total: 0 })
        );
        for bad in [
            "bytes 0-0/0",
            "items 0-0/1",
            "bytes 0-/1",
            "bytes -1/2",
            "bytes 0-1",
            "bytes */*",
            "bytes 1-0/5",
            "bytes 0-1/x",
            "bytes 0 - 1/5",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1000"), Ok(4096));
        assert_eq!(parse_chunk_size(b"aF;name=value"), Ok(0xaf));
        assert_eq!(parse_chunk_size(b"0"), Ok(0));
        assert_eq!(parse_chunk_size(b"ffffffffffffffff"), Ok(u64::MAX));
        for bad in [&b""[..], b";x", b"1ffffffffffffffff", b"-1", b"0x10", b"g"] {
            assert!(parse_chunk_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retry_after_values() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        // RFC 9110's example date is 784111777 seconds after the epoch.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_imf_fixdate("Thu, 29 Feb 2024 00:00:00 GMT"),
            Some(1_709_164_800)
        );
        for bad in [
            "",
            "-5",
            "1.5",
            "soon",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "Sun, 06 Nov 1969 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT\u{e9}",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }
}
