//! QEMU's `json:{...}` backing file names.
//!
//! QEMU writes a backing file name as `json:` and the backing node's block
//! options when no file name or URI says everything about the node (an
//! export or URL opened with extra options, a node built with
//! `--image-opts` or by a management layer), and `qemu-img create -b
//! 'json:{...}'` stores what it is given. Such a name still points at one
//! of the sources backfill opens: this module turns its options into that
//! source's name (a local path, an NBD URI or an HTTP(S) URL) and the
//! layer's format, or says which option it cannot honour. It opens
//! nothing; the chain then opens the name as it opens any other.
//!
//! How QEMU reads the options, and so how they are read here:
//! - nested objects and dotted keys are the same thing
//!   (`{"file":{"driver":"nbd"}}` is `{"file.driver":"nbd"}`), and any
//!   scalar may be written as a string (`"port":"10809"`, `"sslverify":"off"`);
//! - the top level is the backing node. The format the overlay's header
//!   names (`qemu-img create -F`) is that node's driver, and then the
//!   top level's own `"driver"` is ignored, as QEMU ignores it. Without a
//!   format in the header, a format driver (`raw`, `qcow2`) at the top is
//!   the format, a protocol driver (`nbd`, `http`, `file` ...) means raw
//!   data, and no driver means the format is probed;
//! - a format node reads its data from its `"file"` child, a protocol node;
//! - a node without a driver is a file, QEMU's default protocol, even
//!   when its `filename` looks like a URI; a relative `filename` is
//!   relative to the working directory, not to the overlay: QEMU opens it
//!   as given. Only the file drivers take a `filename`.
//!
//! An option that would change what is read (TLS for NBD, a byte range of
//! a raw node, credentials or cookies for HTTP, a backing node of its own)
//! is refused by name: reading without it would read something else, or
//! the same thing less safely. Options that only tune how QEMU opens a
//! node (caching, node names, locking, timeouts) are accepted and have no
//! effect here. Any other option is refused, so nothing is guessed.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// Where a `json:` name's data lives, as the chain opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// A local path (absolute), an NBD URI or an HTTP(S) URL.
    pub name: String,
    /// The layer's format; `None` to probe it.
    pub format: Option<String>,
}

/// Whether a backing file name uses QEMU's `json:` pseudo-protocol.
pub fn is_json_name(name: &str) -> bool {
    name.starts_with("json:")
}

/// Options QEMU accepts on any node that do not change what it reads.
const GENERIC: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "force-share",
    "discard",
    "detect-zeroes",
    "cache.direct",
    "cache.no-flush",
];

/// Format drivers, read on top of a `"file"` child.
const FORMATS: &[&str] = &["raw", "qcow2"];

/// Resolves `name`, a `json:` backing file name that image `parent`'s
/// header gives with format `header_format`, to the source it names.
pub fn resolve(name: &str, header_format: Option<&str>, parent: &str) -> Result<Resolved> {
    let bad = |why: String| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("backing file {name:?} of {parent}: {why}"),
        )
    };
    let text = name.strip_prefix("json:").expect("a json: name");
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let serde_json::Value::Object(top) = value else {
        return Err(bad("the options are not a JSON object".into()));
    };
    let mut opts = BTreeMap::new();
    flatten("", &top, &mut opts).map_err(bad)?;
    let unsupported =
        |why: String| Error::unsupported(format!("backing file {name:?} of {parent}: {why}"));
    let get = |k: &str| opts.get(k).map(String::as_str);
    if let Some(node) = get("file") {
        return Err(unsupported(format!(
            "\"file\": {node:?} names another node, which only exists inside the QEMU process \
             that made it"
        )));
    }

    // The top level is the backing node; its driver is the header's format
    // if there is one.
    let has_child = opts.keys().any(|k| k.starts_with("file."));
    let (format, protocol) = match (header_format, get("driver")) {
        (Some(f), _) if has_child => (Some(f.to_string()), "file."),
        (Some(f), _) => {
            return Err(bad(format!(
                "the overlay's header gives the format {f:?}, so the top level of these options \
                 is a {f} node, and it has no \"file\" child to read from (QEMU cannot open it \
                 either): put the protocol's options under \"file\""
            )))
        }
        (None, Some(d)) if FORMATS.contains(&d) && !has_child => {
            return Err(bad(format!(
                "the {d} node has no \"file\" child to read from"
            )))
        }
        (None, Some(d)) if FORMATS.contains(&d) => (Some(d.to_string()), "file."),
        (None, Some(d)) if has_child => {
            return Err(unsupported(format!(
                "format driver {d:?} (only raw and qcow2)"
            )))
        }
        // A protocol node alone: its bytes are the image, raw.
        (None, Some(_)) => (Some("raw".to_string()), ""),
        (None, None) if has_child => (None, "file."),
        // A driverless node: a file (QEMU's default protocol), its
        // format probed.
        (None, None) => (None, ""),
    };
    if protocol == "file." {
        // The format node's own options: those of raw that show a slice of
        // its data are refused, as is anything else not known harmless.
        for key in opts.keys().map(String::as_str) {
            if key.starts_with("file.") || key == "driver" || GENERIC.contains(&key) {
                continue;
            }
            return Err(unsupported(match key {
                "offset" | "size" => {
                    format!(
                        "option {key:?}: a raw node showing a part of its file is not supported"
                    )
                }
                _ if key == "backing" || key.starts_with("backing.") => {
                    "option \"backing\": a chain given inside a json: name is not supported".into()
                }
                _ => format!("option {key:?} is not supported"),
            }));
        }
    }
    let node: BTreeMap<String, String> = opts
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(protocol).map(|k| (k.to_string(), v.clone())))
        .collect();
    let name = protocol_source(&node).map_err(|e| match e {
        Refusal::Bad(why) => bad(why),
        Refusal::Unsupported(why) => unsupported(why),
    })?;
    Ok(Resolved { name, format })
}

/// Why a protocol node's options were refused.
enum Refusal {
    Bad(String),
    Unsupported(String),
}

/// Flattens nested objects into dotted keys and scalars into strings, as
/// QEMU does before it reads them. A key given twice (nested and dotted)
/// is refused, as QEMU refuses it.
fn flatten(
    prefix: &str,
    obj: &serde_json::Map<String, serde_json::Value>,
    out: &mut BTreeMap<String, String>,
) -> std::result::Result<(), String> {
    use serde_json::Value;
    for (k, v) in obj {
        let key = format!("{prefix}{k}");
        let scalar = match v {
            Value::Object(inner) => {
                flatten(&format!("{key}."), inner, out)?;
                continue;
            }
            Value::String(s) => s.clone(),
            Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            Value::Number(n) => n.to_string(),
            Value::Null => "null".to_string(),
            Value::Array(_) => {
                return Err(format!(
                    "option {key:?} is a list, which no source here takes"
                ))
            }
        };
        if out.insert(key.clone(), scalar).is_some() {
            return Err(format!("option {key:?} is given twice"));
        }
    }
    Ok(())
}

/// QEMU's spellings of a true and a false option.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Options of the file protocol drivers that do not change what is read.
const FILE_OPTIONS: &[&str] = &[
    "filename",
    "aio",
    "aio-max-batch",
    "locking",
    "drop-cache",
    "x-check-cache-dropped",
];

/// Options of the nbd driver that do not change what is read (the older
/// flat `host`, `port` and `path` among them).
const NBD_OPTIONS: &[&str] = &[
    "server.type",
    "server.path",
    "server.host",
    "server.port",
    "server.numeric",
    "server.keep-alive",
    "server.ipv4",
    "server.ipv6",
    "host",
    "port",
    "path",
    "export",
    "reconnect-delay",
    "open-timeout",
];

/// Options of the http and https drivers that do not change what is read.
const HTTP_OPTIONS: &[&str] = &["url", "readahead", "timeout"];

/// The name of the source a protocol node reads: its options `node`, keys
/// relative to it. Every option is checked before the source is named.
fn protocol_source(node: &BTreeMap<String, String>) -> std::result::Result<String, Refusal> {
    let get = |k: &str| node.get(k).map(String::as_str);
    let driver = get("driver");
    let known = match driver {
        // No driver is QEMU's default protocol, a file.
        None | Some("file" | "host_device") => FILE_OPTIONS,
        Some("nbd") => NBD_OPTIONS,
        Some("http" | "https") => HTTP_OPTIONS,
        Some(d) => {
            return Err(Refusal::Unsupported(format!(
                "driver {d:?} is not supported (only file, nbd, http and https)"
            )))
        }
    };
    for key in node.keys() {
        let key = key.as_str();
        if key == "driver" || known.contains(&key) || GENERIC.contains(&key) {
            continue;
        }
        let why = match key {
            "tls-creds" | "tls-hostname" => "NBD over TLS is not supported",
            "x-dirty-bitmap" => "reading a dirty bitmap instead of the data is not supported",
            "sslverify" if get("sslverify").and_then(parse_bool) == Some(true) => continue,
            "sslverify" => {
                "sslverify off is not supported: backfill always checks the server's \
                 certificate (SSL_CERT_FILE names a private CA to trust)"
            }
            "cookie"
            | "cookie-secret"
            | "username"
            | "password-secret"
            | "proxy-username"
            | "proxy-password-secret" => {
                "HTTP credentials and cookies from QEMU secrets are not supported (user:password \
                 in the URL is)"
            }
            _ => "not supported",
        };
        return Err(Refusal::Unsupported(format!("option {key:?}: {why}")));
    }
    match driver {
        Some("nbd") => nbd_uri(&get),
        Some(d @ ("http" | "https")) => http_url(d, &get),
        _ => {
            let filename = get("filename").ok_or_else(|| {
                Refusal::Bad(match driver {
                    Some(d) => format!("the {d} node has no \"filename\""),
                    None => "no \"driver\" and no \"filename\" says where the data is".into(),
                })
            })?;
            absolute(filename)
        }
    }
}

/// `path` made absolute against the working directory, as QEMU opens it
/// (a `file:` prefix dropped, as QEMU's file driver drops it). Nothing
/// else is read into it: QEMU takes `nbd://...` here for a file name too.
fn absolute(path: &str) -> std::result::Result<String, Refusal> {
    let path = path.strip_prefix("file:").unwrap_or(path);
    if path.is_empty() {
        return Err(Refusal::Bad("an empty \"filename\"".into()));
    }
    std::path::absolute(Path::new(path))
        .map(|p| p.display().to_string())
        .map_err(|e| Refusal::Bad(format!("filename {path:?}: {e}")))
}

/// The NBD URI of an `nbd` node: `server.*` (or the older flat `host`,
/// `port`, `path`) and `export`. (QEMU takes no `filename` here.)
fn nbd_uri<'a>(get: &impl Fn(&str) -> Option<&'a str>) -> std::result::Result<String, Refusal> {
    let server = |k: &str| get(&format!("server.{k}")).or_else(|| get(k));
    let export = get("export").unwrap_or("");
    let kind = match get("server.type") {
        Some(t) => t,
        None if server("path").is_some() => "unix",
        None if server("host").is_some() => "inet",
        None => return Err(Refusal::Bad("the nbd node names no server".into())),
    };
    let export = encode(export);
    match kind {
        "unix" => {
            let path = server("path")
                .filter(|p| !p.is_empty())
                .ok_or_else(|| Refusal::Bad("the nbd node's unix server has no \"path\"".into()))?;
            Ok(format!("nbd+unix:///{export}?socket={}", encode(path)))
        }
        "inet" => {
            let host = server("host")
                .filter(|h| !h.is_empty())
                .ok_or_else(|| Refusal::Bad("the nbd node's inet server has no \"host\"".into()))?;
            let port = match server("port") {
                None => super::nbd::DEFAULT_PORT,
                Some(p) => p.parse::<u16>().map_err(|_| {
                    Refusal::Bad(format!("the nbd server's port {p:?} is not a port"))
                })?,
            };
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            Ok(format!("nbd://{host}:{port}/{export}"))
        }
        other => Err(Refusal::Unsupported(format!(
            "an NBD server of type {other:?} (only unix and inet)"
        ))),
    }
}

/// The URL of an `http` or `https` node, which must use its scheme.
fn http_url<'a>(
    driver: &str,
    get: &impl Fn(&str) -> Option<&'a str>,
) -> std::result::Result<String, Refusal> {
    let url =
        get("url").ok_or_else(|| Refusal::Bad(format!("the {driver} node has no \"url\"")))?;
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if scheme.as_deref() != Some(driver) {
        return Err(Refusal::Bad(format!(
            "the {driver} node's url {url:?} is not an {driver}:// URL"
        )));
    }
    Ok(url.to_string())
}

/// Percent-encodes `s` for an NBD URI's export (its path) or socket (a
/// query value): everything but unreserved characters and `/`.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || b == b'/';
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::nbd::{Address, NbdUri};

    fn ok(json: &str, header: Option<&str>) -> Resolved {
        resolve(&format!("json:{json}"), header, "ov.qcow2").unwrap()
    }

    fn refused(json: &str, header: Option<&str>) -> (ErrorKind, String) {
        let e = resolve(&format!("json:{json}"), header, "ov.qcow2").unwrap_err();
        assert!(e.message().contains("of ov.qcow2"), "{e}");
        (e.kind(), e.message().to_string())
    }

    fn resolved(name: &str, format: Option<&str>) -> Resolved {
        Resolved {
            name: name.into(),
            format: format.map(str::to_string),
        }
    }

    #[test]
    fn nested_and_dotted_options_name_one_source() {
        let want = resolved("nbd+unix:///disk?socket=/run/s.sock", Some("raw"));
        for json in [
            r#"{"file":{"driver":"nbd","server":{"type":"unix","path":"/run/s.sock"},"export":"disk"}}"#,
            r#"{"file.driver":"nbd","file.server.type":"unix","file.server.path":"/run/s.sock","file.export":"disk"}"#,
            r#"{"file":{"driver":"nbd","server.type":"unix","server":{"path":"/run/s.sock"}},"file.export":"disk"}"#,
        ] {
            assert_eq!(ok(json, Some("raw")), want, "{json}");
        }
        // The same key both ways is one key given twice.
        let (kind, why) = refused(
            r#"{"file":{"driver":"nbd"},"file.driver":"nbd","file.server.path":"/s"}"#,
            Some("raw"),
        );
        assert_eq!(kind, ErrorKind::InvalidInput);
        assert!(why.contains("\"file.driver\" is given twice"), "{why}");
    }

    #[test]
    fn the_header_format_drives_the_top_node() {
        let nbd =
            r#"{"driver":"qcow2","file":{"driver":"nbd","server":{"host":"h","port":10810}}}"#;
        // As in QEMU: the header's format wins, the options' driver is ignored.
        assert_eq!(
            ok(nbd, Some("raw")),
            resolved("nbd://h:10810/", Some("raw"))
        );
        // Without one, the options' format driver is the format.
        assert_eq!(ok(nbd, None), resolved("nbd://h:10810/", Some("qcow2")));
        // A protocol node alone is raw data.
        let alone = r#"{"driver":"nbd","server":{"type":"inet","host":"h"}}"#;
        assert_eq!(ok(alone, None), resolved("nbd://h:10809/", Some("raw")));
        // ... but under a header format it is that format's node, which
        // has no file to read (QEMU fails to open it too).
        let (kind, why) = refused(alone, Some("raw"));
        assert_eq!(kind, ErrorKind::InvalidInput);
        assert!(why.contains("no \"file\" child"), "{why}");
        // No driver anywhere: a file, its format probed.
        let probe = r#"{"file":{"filename":"/images/base.img"}}"#;
        assert_eq!(ok(probe, None), resolved("/images/base.img", None));
        let (_, why) = refused(r#"{"driver":"raw"}"#, None);
        assert!(why.contains("the raw node has no \"file\" child"), "{why}");
        let (kind, _) = refused(
            r#"{"driver":"vmdk","file":{"driver":"file","filename":"/a"}}"#,
            None,
        );
        assert_eq!(kind, ErrorKind::Unsupported);
    }

    #[test]
    fn nbd_servers_become_uris_that_parse_back() {
        let cases = [
            (
                r#"{"file":{"driver":"nbd","server":{"type":"inet","host":"::1","port":"10809"},"export":"a b/c"}}"#,
                Address::Tcp {
                    host: "::1".into(),
                    port: 10809,
                },
                "a b/c",
            ),
            // QEMU's older flat options.
            (
                r#"{"file":{"driver":"nbd","host":"example.org","port":"7000"}}"#,
                Address::Tcp {
                    host: "example.org".into(),
                    port: 7000,
                },
                "",
            ),
            (
                r#"{"file":{"driver":"nbd","path":"/tmp/odd ?&=%#.sock","export":"%41"}}"#,
                Address::Unix("/tmp/odd ?&=%#.sock".into()),
                "%41",
            ),
        ];
        for (json, address, export) in cases {
            let r = ok(json, Some("raw"));
            let uri = NbdUri::parse(&r.name).unwrap_or_else(|e| panic!("{}: {e}", r.name));
            assert_eq!(
                uri,
                NbdUri {
                    address,
                    export: export.into()
                },
                "{json} -> {}",
                r.name
            );
        }
        // QEMU takes no "filename" for these drivers, nor does backfill.
        for (json, what) in [
            (
                r#"{"file":{"driver":"nbd","filename":"nbd://h/e"}}"#,
                "option \"filename\": not supported",
            ),
            (
                r#"{"file":{"driver":"http","filename":"http://h/i","url":"http://h/i"}}"#,
                "option \"filename\": not supported",
            ),
        ] {
            let (kind, why) = refused(json, Some("raw"));
            assert_eq!(kind, ErrorKind::Unsupported, "{json}");
            assert!(why.contains(what), "{json}: {why}");
        }
        for (json, what) in [
            (r#"{"file":{"driver":"nbd"}}"#, "names no server"),
            (
                r#"{"file":{"driver":"nbd","server":{"type":"unix"}}}"#,
                "has no \"path\"",
            ),
            (
                r#"{"file":{"driver":"nbd","server":{"type":"inet","host":"h","port":"x"}}}"#,
                "is not a port",
            ),
        ] {
            let (kind, why) = refused(json, Some("raw"));
            assert_eq!(kind, ErrorKind::InvalidInput, "{json}");
            assert!(why.contains(what), "{json}: {why}");
        }
        for (json, what) in [
            (
                r#"{"file":{"driver":"nbd","server":{"type":"vsock","port":"1"}}}"#,
                "type \"vsock\"",
            ),
            (
                r#"{"file":{"driver":"nbd","server":{"path":"/s"},"tls-creds":"t"}}"#,
                "NBD over TLS",
            ),
            (
                r#"{"file":{"driver":"nbd","server":{"path":"/s"},"x-dirty-bitmap":"b"}}"#,
                "dirty bitmap",
            ),
        ] {
            let (kind, why) = refused(json, Some("raw"));
            assert_eq!(kind, ErrorKind::Unsupported, "{json}");
            assert!(why.contains(what), "{json}: {why}");
        }
    }

    #[test]
    fn http_nodes_keep_their_url_and_refuse_what_changes_the_reads() {
        let url = "https://example.org/img.raw?sig=a%2Fb";
        let json = format!(
            r#"{{"file":{{"driver":"https","url":"{url}","timeout":"30","readahead":65536,"sslverify":true}}}}"#
        );
        assert_eq!(ok(&json, Some("raw")), resolved(url, Some("raw")));
        for (json, what) in [
            (
                r#"{"file":{"driver":"https","url":"https://h/i","sslverify":"off"}}"#,
                "sslverify off",
            ),
            (
                r#"{"file":{"driver":"http","url":"http://h/i","cookie":"a=b"}}"#,
                "cookies",
            ),
            (
                r#"{"file":{"driver":"ftp","url":"ftp://h/i"}}"#,
                "driver \"ftp\"",
            ),
            (
                r#"{"file":{"driver":"http","url":"http://h/i","headers":"x"}}"#,
                "option \"headers\": not supported",
            ),
        ] {
            let (kind, why) = refused(json, Some("raw"));
            assert_eq!(kind, ErrorKind::Unsupported, "{json}");
            assert!(why.contains(what), "{json}: {why}");
        }
        let (kind, why) = refused(
            r#"{"file":{"driver":"http","url":"https://h/i"}}"#,
            Some("raw"),
        );
        assert_eq!(kind, ErrorKind::InvalidInput);
        assert!(why.contains("not an http:// URL"), "{why}");
    }

    #[test]
    fn local_files_are_relative_to_the_working_directory() {
        let cwd = std::env::current_dir().unwrap();
        let json = r#"{"driver":"qcow2","file":{"driver":"file","filename":"dir/base.qcow2","locking":"off"},"node-name":"b0"}"#;
        let want = cwd.join("dir/base.qcow2").display().to_string();
        assert_eq!(ok(json, None), resolved(&want, Some("qcow2")));
        let plain = r#"{"file":{"filename":"file:/images/base.raw"}}"#;
        assert_eq!(
            ok(plain, Some("raw")),
            resolved("/images/base.raw", Some("raw"))
        );
        // QEMU reads no URI into a file name here, nor does backfill.
        let uri = r#"{"file":{"filename":"/x/nbd://h/e"}}"#;
        assert_eq!(ok(uri, Some("raw")).name, "/x/nbd:/h/e");
    }

    #[test]
    fn malformed_or_foreign_options_are_refused() {
        for (json, what) in [
            ("{", "not valid JSON"),
            ("[1]", "not a JSON object"),
            (
                r#"{"file":{"driver":"file","filename":["a"]}}"#,
                "is a list",
            ),
            (r#"{"file":{"driver":"file"}}"#, "has no \"filename\""),
            (r#"{}"#, "no \"driver\" and no \"filename\""),
        ] {
            let (kind, why) = refused(json, None);
            assert_eq!(kind, ErrorKind::InvalidInput, "{json}");
            assert!(why.contains(what), "{json}: {why}");
        }
        for (json, what) in [
            (r#"{"driver":"raw","file":"node0"}"#, "names another node"),
            (
                r#"{"driver":"raw","offset":512,"file":{"driver":"file","filename":"/a"}}"#,
                "a part of its file",
            ),
            (
                r#"{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"/a"}}"#,
                "a chain given inside",
            ),
            (
                r#"{"driver":"qcow2","data-file":"d","file":{"driver":"file","filename":"/a"}}"#,
                "\"data-file\" is not supported",
            ),
            (
                r#"{"file":{"driver":"iscsi","url":"iscsi://h/t/0"}}"#,
                "driver \"iscsi\"",
            ),
        ] {
            let (kind, why) = refused(json, None);
            assert_eq!(kind, ErrorKind::Unsupported, "{json}");
            assert!(why.contains(what), "{json}: {why}");
        }
    }

    #[test]
    fn odd_inputs_are_errors_not_panics() {
        let deep = format!("{}1{}", "{\"a\":".repeat(300), "}".repeat(300));
        for json in [
            deep.as_str(),
            r#"{"":{"":1}}"#,
            r#"{"file":{"":"x"},"file.driver":"file"}"#,
            r#"{"file.":{"driver":"file","filename":"/a"}}"#,
            r#"{"file":{"driver":"nbd","server":{"type":"inet","host":"h","port":1e99}}}"#,
            r#"{"file":{"driver":"file","filename":"a\u0000b"}}"#,
            r#"{"driver":null,"file":{"driver":"file","filename":"/a"}}"#,
            "",
            "null",
            r#""json:{}""#,
        ] {
            for header in [None, Some("raw"), Some("qcow2")] {
                // Whatever the outcome, no panic; an Ok names something.
                if let Ok(r) = resolve(&format!("json:{json}"), header, "ov.qcow2") {
                    assert!(!r.name.is_empty(), "{json}");
                }
            }
        }
    }
}
