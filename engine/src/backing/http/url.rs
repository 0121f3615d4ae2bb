//! `http://` and `https://` URLs as a backing reference names them.
//!
//! Pure: parsing and formatting only, no name resolution and no I/O. The
//! grammar is the part of RFC 3986 that a backing reference needs: a scheme,
//! a host (a DNS name, an IPv4 literal, or an IPv6 literal in brackets), an
//! optional port, and a path with an optional query, sent to the server
//! exactly as written. Credentials in the URL (`http://user:password@host/`)
//! are sent as HTTP Basic authentication, as curl (and so QEMU's curl
//! driver) sends them; messages show the URL with the password hidden. What
//! we do not support is refused with a message that says so (IPv6 zone
//! ids), never silently dropped.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Whether the connection is plain TCP or TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// The host part of a URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lowercased.
    Name(String),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::V4(ip) => write!(f, "{ip}"),
            Host::V6(ip) => write!(f, "[{ip}]"),
        }
    }
}

/// A parsed `http://` or `https://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    pub host: Host,
    pub port: u16,
    /// The request target: the path (at least `/`) and the query, if any.
    pub target: String,
    /// The URL as given, without its fragment and with its password
    /// hidden: what messages show.
    text: String,
    /// The value of the `Host` header, made once.
    host_header: String,
    /// The `Authorization` header's value for credentials in the URL
    /// (`Basic ...`), if it had some.
    pub authorization: Option<String>,
}

impl Url {
    /// Parses `s`; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<Url, String> {
        let text = match s.find('#') {
            Some(i) => &s[..i],
            None => s,
        };
        let lower_scheme_end = text.find("://").ok_or("not a URL (no \"scheme://\")")?;
        let scheme = match text[..lower_scheme_end].to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => return Err(format!("unsupported scheme {other:?} (use http or https)")),
        };
        let rest = &text[lower_scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(authority_end);
        let (authority, authorization, shown) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let (user, password, shown) = match userinfo.split_once(':') {
                    Some((u, p)) => (u, p, format!("{u}:***@")),
                    None => (userinfo, "", format!("{userinfo}@")),
                };
                let user = percent_decode(user, "user name")?;
                let password = percent_decode(password, "password")?;
                let token = base64(format!("{user}:{password}").as_bytes());
                (hostport, Some(format!("Basic {token}")), shown)
            }
            None => (authority, None, String::new()),
        };
        let (host, port) = parse_authority(authority)?;
        let port = port.unwrap_or(scheme.default_port());
        let target = if target.starts_with('/') {
            target.to_string()
        } else {
            format!("/{target}")
        };
        if let Some(bad) = target.bytes().find(|&b| !(0x21..0x7f).contains(&b)) {
            return Err(format!(
                "the path contains byte {bad:#04x}, which must be percent-encoded"
            ));
        }
        let host_header = if port == scheme.default_port() {
            host.to_string()
        } else {
            format!("{host}:{port}")
        };
        let text = if shown.is_empty() {
            text.to_string()
        } else {
            // The scheme as written, the credentials hidden, the rest as
            // written.
            format!(
                "{}{shown}{authority}{}",
                &text[..lower_scheme_end + 3],
                &rest[authority_end..]
            )
        };
        Ok(Url {
            scheme,
            host,
            port,
            target,
            text,
            host_header,
            authorization,
        })
    }

    /// The value of the `Host` header: the host, and the port unless it is
    /// the scheme's default.
    pub fn host_header(&self) -> &str {
        &self.host_header
    }

    /// Where a connection goes: the scheme, host and port.
    pub fn origin(&self) -> (Scheme, &Host, u16) {
        (self.scheme, &self.host, self.port)
    }

    /// The URL a `Location` header names, resolved against this one as
    /// RFC 3986 section 5 says: absolute (`https://other/x`), without a
    /// scheme (`//other/x`), an absolute path (`/x`), or a path relative to
    /// this URL's directory (`x`, `../x`), with `.` and `..` segments
    /// removed. The result must be an http or https URL like any other.
    pub fn join(&self, location: &str) -> Result<Url, String> {
        let location = location.trim();
        if location.is_empty() {
            return Err("an empty Location".into());
        }
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        let has_scheme = location
            .find(':')
            .is_some_and(|i| i > 0 && !location[..i].contains(['/', '?', '#']));
        let absolute = if has_scheme {
            location.to_string()
        } else if let Some(rest) = location.strip_prefix("//") {
            format!("{scheme}://{rest}")
        } else {
            // This URL's path, without its query.
            let here = self.target.split('?').next().unwrap_or("/");
            let path = if location.starts_with('/') {
                location.to_string()
            } else if location.starts_with('?') {
                format!("{here}{location}")
            } else {
                let dir = &here[..here.rfind('/').map_or(0, |i| i + 1)];
                format!("{dir}{location}")
            };
            format!(
                "{scheme}://{}{}",
                self.host_header,
                remove_dot_segments(&path)
            )
        };
        Url::parse(&absolute)
    }
}

/// A path (with its query) without `.` and `..` segments (RFC 3986 5.2.4):
/// `/a/b/../c/./d?q` is `/a/c/d?q`; `..` never climbs above the root.
fn remove_dot_segments(target: &str) -> String {
    let (path, query) = match target.find('?') {
        Some(i) => target.split_at(i),
        None => (target, ""),
    };
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *seg {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}{query}", out.join("/"))
}

/// Shows the URL with its password hidden, never the credentials.
impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Url").field(&self.text).finish()
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn percent_decode(s: &str, what: &str) -> Result<String, String> {
    crate::backing::percent_decode(s).map_err(|why| format!("the {what}: {why}"))
}

/// Standard base64 with padding (RFC 4648), for Basic authentication.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn parse_authority(authority: &str) -> Result<(Host, Option<u16>), String> {
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let close = inner
            .find(']')
            .ok_or("unterminated IPv6 literal (no \"]\")")?;
        let literal = &inner[..close];
        if literal.contains('%') {
            return Err("IPv6 zone ids are not supported".into());
        }
        let ip: Ipv6Addr = literal
            .parse()
            .map_err(|_| format!("{literal:?} is not an IPv6 address"))?;
        let after = &inner[close + 1..];
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| {
                format!("unexpected {after:?} after the IPv6 literal (expected \":PORT\")")
            })?),
        };
        (Host::V6(ip), port)
    } else {
        let (name, port) = match authority.rfind(':') {
            Some(i) => (&authority[..i], Some(&authority[i + 1..])),
            None => (authority, None),
        };
        if name.is_empty() {
            return Err("the URL has no host".into());
        }
        let host = match name.parse::<Ipv4Addr>() {
            Ok(ip) => Host::V4(ip),
            Err(_) => {
                let valid = name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
                if !valid {
                    return Err(format!("{name:?} is not a valid host name"));
                }
                Host::Name(name.to_ascii_lowercase())
            }
        };
        (host, port)
    };
    let port = match port {
        // "http://host:/" is allowed by RFC 3986 and means the default port.
        None | Some("") => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => return Err(format!("{p:?} is not a valid port")),
        },
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_and_targets() {
        let u = Url::parse("http://Example.COM/disk.raw").unwrap();
        assert_eq!(u.scheme, Scheme::Http);
        assert_eq!(u.host, Host::Name("example.com".into()));
        assert_eq!(u.port, 80);
        assert_eq!(u.target, "/disk.raw");
        assert_eq!(u.host_header(), "example.com");

        let u = Url::parse("HTTPS://10.1.2.3:8443?x=1#frag").unwrap();
        assert_eq!(u.scheme, Scheme::Https);
        assert_eq!(u.host, Host::V4(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(u.port, 8443);
        assert_eq!(u.target, "/?x=1");
        assert_eq!(u.host_header(), "10.1.2.3:8443");
        assert_eq!(u.to_string(), "HTTPS://10.1.2.3:8443?x=1");

        let u = Url::parse("https://[::1]:4443/a/b%20c.qcow2").unwrap();
        assert_eq!(u.host, Host::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(u.port, 4443);
        assert_eq!(u.target, "/a/b%20c.qcow2");
        assert_eq!(u.host_header(), "[::1]:4443");

        let u = Url::parse("https://[::1]").unwrap();
        assert_eq!((u.port, u.target.as_str()), (443, "/"));
        assert_eq!(u.host_header(), "[::1]");

        let u = Url::parse("http://h:/x").unwrap();
        assert_eq!(u.port, 80);
    }

    #[test]
    fn resolves_locations_as_rfc_3986_says() {
        let base = Url::parse("http://h:8080/images/v1/disk.raw?sig=1").unwrap();
        for (location, want) in [
            ("https://other/x.raw", "https://other/x.raw"),
            ("HTTP://Other:81/x", "HTTP://Other:81/x"),
            ("//cdn.test/a/b.raw", "http://cdn.test/a/b.raw"),
            ("/latest/disk.raw", "http://h:8080/latest/disk.raw"),
            ("disk2.raw", "http://h:8080/images/v1/disk2.raw"),
            (
                "./disk2.raw?sig=2",
                "http://h:8080/images/v1/disk2.raw?sig=2",
            ),
            ("../v2/disk.raw", "http://h:8080/images/v2/disk.raw"),
            ("../../../../x", "http://h:8080/x"),
            ("?sig=3", "http://h:8080/images/v1/disk.raw?sig=3"),
            ("/a/./b/../c/", "http://h:8080/a/c/"),
            ("x.raw#part", "http://h:8080/images/v1/x.raw"),
        ] {
            let got = base
                .join(location)
                .unwrap_or_else(|e| panic!("{location}: {e}"));
            assert_eq!(got.to_string(), want, "{location}");
            assert_eq!(got, Url::parse(want).unwrap(), "{location}");
        }
        let https = Url::parse("https://h/a/b").unwrap();
        assert_eq!(https.join("//x/y").unwrap().scheme, Scheme::Https);
        for bad in ["", "ftp://h/x", "mailto:x@y", "/a b"] {
            assert!(base.join(bad).is_err(), "{bad:?} resolved");
        }
    }

    #[test]
    fn credentials_become_basic_authentication_and_are_hidden() {
        // RFC 7617's example.
        let u = Url::parse("http://Aladdin:open%20sesame@h/x").unwrap();
        assert_eq!(
            u.authorization.as_deref(),
            Some("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
        );
        assert_eq!(u.to_string(), "http://Aladdin:***@h/x");
        assert_eq!((u.host_header(), u.target.as_str()), ("h", "/x"));
        let u = Url::parse("https://me@[::1]:8443/a?b").unwrap();
        assert_eq!(u.authorization.as_deref(), Some("Basic bWU6"));
        assert_eq!(u.to_string(), "https://me@[::1]:8443/a?b");
        let u = Url::parse("http://a:p%40ss:w@h").unwrap();
        assert_eq!(u.authorization.as_deref(), Some("Basic YTpwQHNzOnc="));
        assert!(!u.to_string().contains("ss"), "{u}");
        assert!(!format!("{u:?}").contains("ss") && !format!("{u:?}").contains("YTpw"));
        for (data, want) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v")] {
            assert_eq!(base64(data.as_bytes()), want);
        }
        assert_eq!(Url::parse("http://h/x").unwrap().authorization, None);
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        for bad in [
            "",
            "disk.raw",
            "ftp://h/x",
            "nbd://h/x",
            "http://",
            "http:///x",
            "http://user:pw@/x",
            "http://us%zzer@h/x",
            "http://user:%ff@h/x",
            "http://h:0/x",
            "http://h:65536/x",
            "http://h:+80/x",
            "http://h:8a/x",
            "http://[::1/x",
            "http://[::1]x/",
            "http://[fe80::1%25eth0]/x",
            "http://[1.2.3.4]/x",
            "http://h h/x",
            "http://h/a b",
            "http://h/\u{e9}",
            "http://h/a\r\nInjected: yes",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
