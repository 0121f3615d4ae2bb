//! The fixed newstyle handshake and option haggling, up to the start of the
//! transmission phase.
//!
//! Runs on a blocking stream (a connection's own thread, with a read
//! timeout so a client that never finishes cannot hold it forever). Every
//! option is bounded: its data is at most [`MAX_OPTION_LEN`] bytes, or the
//! client is disconnected.

use super::proto::*;
use std::io::{self, Read, Write};

/// Option data larger than this is refused (names and queries are at most
/// 4 KiB by the protocol; a few of them fit).
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// What the server exports.
#[derive(Debug, Clone)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
}

impl Export {
    /// The empty name is the default export; the configured name works too.
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    fn flags(&self, structured: bool) -> u16 {
        let mut f = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN
            | FLAG_SEND_CACHE
            | FLAG_SEND_FAST_ZERO;
        if structured {
            f |= FLAG_SEND_DF;
        }
        if self.read_only {
            f |= FLAG_READ_ONLY;
        }
        f
    }
}

/// What the client chose during option haggling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    pub structured: bool,
    pub base_allocation: bool,
    pub allocation_depth: bool,
}

/// How the handshake ended.
#[derive(Debug)]
pub enum Outcome {
    /// Go on to the transmission phase.
    Transmission(Negotiated),
    /// The client aborted, or asked for something that ends the session.
    Closed,
}

/// Why a connection was dropped during the handshake.
fn violation(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Runs the handshake on `s`. `shutting_down` says whether the server is
/// stopping (options then get NBD_REP_ERR_SHUTDOWN).
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &Export,
    shutting_down: &dyn Fn() -> bool,
) -> io::Result<Outcome> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut b4 = [0u8; 4];
    s.read_exact(&mut b4)?;
    let client = u32::from_be_bytes(b4);
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {client:#x}")));
    }
    let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    let mut neg = Negotiated::default();
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        if be64(&h[0..8]) != IHAVEOPT {
            return Err(violation("bad option magic"));
        }
        let opt = be32(&h[8..12]);
        let len = be32(&h[12..16]);
        if len > MAX_OPTION_LEN {
            return Err(violation(format!("option {opt} with {len} bytes of data")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        out.clear();
        if shutting_down() && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(Outcome::Closed);
            }
            option_reply(
                &mut out,
                opt,
                REP_ERR_SHUTDOWN,
                b"the server is shutting down",
            );
            s.write_all(&out)?;
            continue;
        }
        match opt {
            OPT_EXPORT_NAME => {
                if !export.matches(&data) {
                    // This option has no error reply: the session ends.
                    return Ok(Outcome::Closed);
                }
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export.flags(neg.structured).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out)?;
                return Ok(Outcome::Transmission(neg));
            }
            OPT_ABORT => {
                option_reply(&mut out, opt, REP_ACK, &[]);
                // The client may already be gone; that is fine.
                let _ = s.write_all(&out);
                return Ok(Outcome::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(&mut out, opt, REP_ERR_INVALID, b"LIST takes no data");
                } else {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(export.name.as_bytes());
                    d.extend_from_slice(export.description.as_bytes());
                    option_reply(&mut out, opt, REP_SERVER, &d);
                    option_reply(&mut out, opt, REP_ACK, &[]);
                }
            }
            OPT_STARTTLS => {
                option_reply(&mut out, opt, REP_ERR_POLICY, b"TLS is not supported");
            }
            OPT_INFO | OPT_GO => {
                if info(&mut out, opt, &data, export, neg.structured) && opt == OPT_GO {
                    s.write_all(&out)?;
                    return Ok(Outcome::Transmission(neg));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(&mut out, opt, REP_ERR_INVALID, b"takes no data");
                } else {
                    neg.structured = true;
                    option_reply(&mut out, opt, REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(&mut out, opt, &data, export, &mut neg);
            }
            _ => {
                option_reply(&mut out, opt, REP_ERR_UNSUP, b"option not supported");
            }
        }
        s.write_all(&out)?;
    }
}

/// NBD_OPT_INFO / NBD_OPT_GO. Returns true when the export was described
/// (GO then enters transmission).
fn info(out: &mut Vec<u8>, opt: u32, data: &[u8], export: &Export, structured: bool) -> bool {
    let mut c = Cursor(data);
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u16()?;
        let mut wanted = Vec::new();
        for _ in 0..n {
            wanted.push(c.u16()?);
        }
        c.0.is_empty().then_some((name, wanted))
    })();
    let Some((name, wanted)) = parsed else {
        option_reply(out, opt, REP_ERR_INVALID, b"malformed INFO/GO request");
        return false;
    };
    if !export.matches(name) {
        let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
        option_reply(out, opt, REP_ERR_UNKNOWN, msg.as_bytes());
        return false;
    }
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&export.size.to_be_bytes());
    d.extend_from_slice(&export.flags(structured).to_be_bytes());
    option_reply(out, opt, REP_INFO, &d);
    // Block sizes are always sent: the client may rely on them.
    d.clear();
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&MIN_BLOCK.to_be_bytes());
    d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    option_reply(out, opt, REP_INFO, &d);
    if wanted.contains(&INFO_NAME) {
        d.clear();
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(export.name.as_bytes());
        option_reply(out, opt, REP_INFO, &d);
    }
    if wanted.contains(&INFO_DESCRIPTION) {
        d.clear();
        d.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
        d.extend_from_slice(export.description.as_bytes());
        option_reply(out, opt, REP_INFO, &d);
    }
    option_reply(out, opt, REP_ACK, &[]);
    true
}

/// The contexts a query selects: an exact name, or a namespace prefix
/// ("base:", "qemu:") for LIST.
fn select(query: &[u8], list: bool) -> Vec<(u32, &'static str)> {
    [CONTEXT_BASE_ALLOCATION, CONTEXT_ALLOCATION_DEPTH]
        .into_iter()
        .filter(|(_, name)| {
            query == name.as_bytes()
                || (list && query.ends_with(b":") && name.as_bytes().starts_with(query))
        })
        .collect()
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
fn meta_context(out: &mut Vec<u8>, opt: u32, data: &[u8], export: &Export, neg: &mut Negotiated) {
    let list = opt == OPT_LIST_META_CONTEXT;
    if !neg.structured {
        option_reply(
            out,
            opt,
            REP_ERR_INVALID,
            b"structured replies are needed first",
        );
        return;
    }
    let mut c = Cursor(data);
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(c.string()?);
        }
        c.0.is_empty().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        option_reply(out, opt, REP_ERR_INVALID, b"malformed meta context request");
        return;
    };
    if !export.matches(name) {
        option_reply(out, opt, REP_ERR_UNKNOWN, b"no such export");
        return;
    }
    let mut chosen: Vec<(u32, &str)> = Vec::new();
    if queries.is_empty() && list {
        chosen = select(b"base:", true);
        chosen.extend(select(b"qemu:", true));
    }
    for q in &queries {
        for c in select(q, list) {
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        }
    }
    if !list {
        neg.base_allocation = chosen.contains(&CONTEXT_BASE_ALLOCATION);
        neg.allocation_depth = chosen.contains(&CONTEXT_ALLOCATION_DEPTH);
    }
    for (id, name) in chosen {
        let mut d = Vec::with_capacity(4 + name.len());
        d.extend_from_slice(&(if list { 0 } else { id }).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        option_reply(out, opt, REP_META_CONTEXT, &d);
    }
    option_reply(out, opt, REP_ACK, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_select_by_name_or_namespace() {
        assert_eq!(
            select(b"base:allocation", false),
            vec![CONTEXT_BASE_ALLOCATION]
        );
        assert_eq!(select(b"qemu:", true), vec![CONTEXT_ALLOCATION_DEPTH]);
        assert!(select(b"qemu:", false).is_empty());
        assert!(select(b"qemu:dirty-bitmap:x", false).is_empty());
    }

    #[test]
    fn info_parsing_is_bounded() {
        let e = Export {
            name: "x".into(),
            description: String::new(),
            size: 1 << 20,
            read_only: false,
        };
        let mut out = Vec::new();
        // A name length far beyond the data.
        assert!(!info(
            &mut out,
            OPT_GO,
            &[0xff, 0xff, 0xff, 0xff],
            &e,
            false
        ));
        assert_eq!(be32(&out[12..16]), REP_ERR_INVALID);
        out.clear();
        let mut d = vec![0, 0, 0, 1, b'x', 0, 1, 0, 3];
        assert!(info(&mut out, OPT_GO, &d, &e, false));
        d[4] = b'y';
        out.clear();
        assert!(!info(&mut out, OPT_GO, &d, &e, false));
        assert_eq!(be32(&out[12..16]), REP_ERR_UNKNOWN);
    }
}
