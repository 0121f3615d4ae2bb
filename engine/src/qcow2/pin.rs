//! The remote-image pin: a qcow2 header extension of backfill's own that
//! records which version of a remote (HTTP) backing image the overlay's
//! copied-on-read data came from.
//!
//! What it owns: the extension's on-disk layout, its validation, and the
//! plan of header writes that adds or replaces it crash-safely. It does no
//! data-path I/O; [`write_pin`] performs a plan on the overlay's metadata
//! descriptor at open, before any reactor runs.
//!
//! Why: an HTTP server's `ETag`/`Last-Modified` only protects one process's
//! reads. Data copied into the overlay outlives the process, so the
//! validator is made durable in the overlay the first time a writable open
//! uses the HTTP backing, before any byte of it can land there; every later
//! open hands it to the HTTP client as the expected one, and a server that
//! now reports another validator or size fails the open
//! (`HttpErrorKind::Changed`) before any read.
//!
//! # On-disk layout
//!
//! Header extension type [`EXT_REMOTE_PIN`] = `0x6266706e` (ASCII "bfpn",
//! "backfill pin"; none of the types qcow2.rst documents: 0xe2792aca,
//! 0x6803f857, 0x23852875, 0x0537be77, 0x44415441). QEMU treats it as an
//! unknown extension: it ignores it and keeps it, in order, whenever it
//! rewrites the header (qemu-img resize, amend, rebase -u, commit). The
//! extension data, big-endian, exactly `24 + N + V` bytes (then the usual
//! padding to a multiple of 8):
//!
//! ```text
//!   0 -  3  layout version, 1
//!        4  validator kind: 1 = strong ETag (quotes included),
//!                           2 = Last-Modified (the HTTP date as sent)
//!   5 -  7  reserved, 0
//!   8 - 15  the remote image's size in bytes
//!  16 - 17  N: length of the backing name (1..=1023)
//!  18 - 19  V: length of the validator value (1..=1024)
//!  20 - 23  reserved, 0
//!  24 - ..  the backing name (UTF-8, exactly as the header names the
//!           remote layer: its URL), then the validator value (ASCII)
//! ```
//!
//! A pin applies only to the remote layer whose URL equals its name: after
//! `qemu-img rebase -u -b OTHER-URL` the old pin is ignored, and the next
//! writable open replaces it with one for the new URL.
//!
//! # Crash safety of the write
//!
//! A write of at most 12 bytes inside one 512-byte sector lands whole or
//! not at all (the assumption QEMU's own header updates and
//! `qcow2::standalone` make); longer writes may tear and only go where no
//! reader looks. The pin is always the last extension (we append it; QEMU
//! keeps unknown extensions after its own ones), at offset `P`:
//!
//! 1. an existing pin (for another URL) is cut off: 8 zero bytes (the end
//!    marker) at `P`;
//! 2. if the backing name lies where the new list will reach, a copy of it
//!    is written further on (behind the end marker, unread), then bytes
//!    8..20 (`backing_file_offset`, `backing_file_size`) switch to it;
//! 3. the new pin's data and a new end marker are written at `P + 8`,
//!    behind the end marker, unread, followed by zeros up to the name;
//! 4. the pin's type and length (8 bytes) replace the end marker at `P`,
//!    which makes the pin visible at once.
//!
//! Each step is followed by an fdatasync. A crash at any point leaves a
//! header that parses, names the same backing file, and has either no pin
//! or the complete new one. The caller starts the reactors (so no remote
//! data can land) only after step 4 is durable.
//!
//! A header area without room for the pin (small clusters and a long URL)
//! is a clear error before anything is written.
//!
//! # Removing a malformed pin
//!
//! A pin that does not decode (or a second one) makes every open fail:
//! without it a changed remote image could not be told. `backfill check`
//! reports it as corruption and `backfill check --repair` ([`repair_pin`])
//! removes it with one write: an end marker over the pin's type and length
//! (8 bytes, inside one sector), then an fdatasync. The pin is the last
//! extension, so nothing else is cut off (a pin followed by another
//! extension is refused). The next writable open pins the version the
//! server has then.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::header::{Header, V2_HEADER_LEN};
use super::standalone::HeaderWrite;
use super::MAX_BACKING_NAME_LEN;
use crate::backing::http::Validator;
use crate::error::{Error, ErrorKind, Result};

/// Header extension type of the remote-image pin (ASCII "bfpn").
pub const EXT_REMOTE_PIN: u32 = 0x6266_706e;
/// The layout version this code writes and reads.
const LAYOUT_VERSION: u32 = 1;
/// Bytes before the name.
const FIXED_LEN: usize = 24;
/// The longest validator value we pin (ETags are short in practice).
pub const MAX_VALIDATOR_LEN: usize = 1024;
const KIND_ETAG: u8 = 1;
const KIND_LAST_MODIFIED: u8 = 2;

/// Which version of which remote image an overlay's data came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    /// The backing name (URL) the pin belongs to.
    pub name: String,
    /// The remote image's size in bytes.
    pub size: u64,
    pub validator: Validator,
}

impl Pin {
    /// The extension data (see the module documentation), or an error if a
    /// field is too long to be pinned.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let (kind, value) = match &self.validator {
            Validator::ETag(v) => (KIND_ETAG, v),
            Validator::LastModified(v) => (KIND_LAST_MODIFIED, v),
        };
        if self.name.is_empty() || self.name.len() > MAX_BACKING_NAME_LEN as usize {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                "{:?}: a backing name of {} bytes cannot be pinned (1..={MAX_BACKING_NAME_LEN})",
                self.name,
                self.name.len()
            ),
            ));
        }
        if value.is_empty() || value.len() > MAX_VALIDATOR_LEN {
            return Err(Error::unsupported(format!(
                "{}: the server's {} is {} bytes long; at most {MAX_VALIDATOR_LEN} can be \
                 pinned in the overlay",
                self.name,
                self.validator,
                value.len()
            )));
        }
        let mut out = Vec::with_capacity(FIXED_LEN + self.name.len() + value.len());
        out.extend_from_slice(&LAYOUT_VERSION.to_be_bytes());
        out.extend_from_slice(&[kind, 0, 0, 0]);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(value.as_bytes());
        Ok(out)
    }

    /// Decodes extension data; the error says what is wrong with it.
    pub fn decode(data: &[u8]) -> std::result::Result<Pin, String> {
        if data.len() < FIXED_LEN {
            return Err(format!(
                "{} bytes, shorter than its fixed {FIXED_LEN}-byte part",
                data.len()
            ));
        }
        let version = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes"));
        if version != LAYOUT_VERSION {
            return Err(format!(
                "layout version {version} (this backfill knows {LAYOUT_VERSION})"
            ));
        }
        let kind = data[4];
        if data[5..8] != [0; 3] || data[20..24] != [0; 4] {
            return Err("reserved bytes are not zero".into());
        }
        let size = u64::from_be_bytes(data[8..16].try_into().expect("8 bytes"));
        let name_len = usize::from(u16::from_be_bytes([data[16], data[17]]));
        let value_len = usize::from(u16::from_be_bytes([data[18], data[19]]));
        if name_len == 0 || name_len > MAX_BACKING_NAME_LEN as usize {
            return Err(format!("backing name length {name_len}"));
        }
        if value_len == 0 || value_len > MAX_VALIDATOR_LEN {
            return Err(format!("validator length {value_len}"));
        }
        if data.len() != FIXED_LEN + name_len + value_len {
            return Err(format!(
                "{} bytes, but its fields need {}",
                data.len(),
                FIXED_LEN + name_len + value_len
            ));
        }
        let name = std::str::from_utf8(&data[FIXED_LEN..FIXED_LEN + name_len])
            .map_err(|_| "the backing name is not UTF-8".to_string())?;
        let value = &data[FIXED_LEN + name_len..];
        if !value.iter().all(|b| (0x20..0x7f).contains(b)) {
            return Err("the validator is not printable ASCII".into());
        }
        let value = String::from_utf8(value.to_vec()).expect("ASCII is UTF-8");
        let validator = match kind {
            KIND_ETAG => Validator::ETag(value),
            KIND_LAST_MODIFIED => Validator::LastModified(value),
            k => return Err(format!("validator kind {k}")),
        };
        Ok(Pin {
            name: name.to_string(),
            size,
            validator,
        })
    }
}

/// The pin `header` holds, if any. A malformed one is a `Corrupt` error
/// naming the image: without it a changed remote image could not be told.
pub fn stored_pin(header: &Header, path: &str) -> Result<Option<Pin>> {
    let mut pins = header
        .extensions
        .iter()
        .filter(|e| e.kind == EXT_REMOTE_PIN);
    let Some(ext) = pins.next() else {
        return Ok(None);
    };
    if pins.next().is_some() {
        return Err(Error::corrupt(format!(
            "qcow2 image {path}: more than one remote-image pin extension ({EXT_REMOTE_PIN:#010x}) \
             (`backfill check --repair` removes them)"
        )));
    }
    Pin::decode(&ext.data).map(Some).map_err(|what| {
        Error::corrupt(format!(
            "qcow2 image {path}: backfill's remote-image pin extension ({EXT_REMOTE_PIN:#010x}) \
             is malformed: {what}; the version of the remote image its data came from is \
             unknown (`backfill check --repair` removes the pin)"
        ))
    })
}

/// The writes that make `pin` the image's pin (see the module
/// documentation for their order). `area` is the header area (its first
/// cluster, or the whole file if shorter) that parses as `header`, which
/// must name a backing file.
pub fn set_pin_plan(
    area: &[u8],
    header: &Header,
    pin: &Pin,
    path: &str,
) -> Result<Vec<HeaderWrite>> {
    let data = pin.encode()?;
    let (name_off, name_len) = (
        header.backing_file_offset as usize,
        header.backing_file_size as usize,
    );
    if header.backing_file.is_none() || name_off == 0 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("qcow2 image {path}: no backing file to pin"),
        ));
    }
    let (old_pin, off) = find_pin(area, header, name_off, path, "replaced")?;
    // Where the pin goes: over the old one, or where the list ends.
    let at = old_pin.unwrap_or(off);
    let padded = data.len().next_multiple_of(8);
    let list_end = at + 8 + padded + 8;
    let moved = name_off < list_end;
    let new_name_off = if moved {
        list_end.max(name_off + name_len)
    } else {
        name_off
    };
    if list_end > area.len() || new_name_off + name_len > area.len() {
        return Err(Error::unsupported(format!(
            "qcow2 image {path}: no room in the header area ({} bytes, the first cluster) for \
             the remote-image pin of {} ({} bytes) and the backing name; use a larger cluster \
             size or a shorter URL",
            area.len(),
            pin.name,
            8 + padded
        )));
    }
    let mut plan = Vec::new();
    if old_pin.is_some() {
        plan.push(HeaderWrite {
            offset: at as u64,
            bytes: vec![0; 8],
        });
    }
    if moved {
        plan.push(HeaderWrite {
            offset: new_name_off as u64,
            bytes: area[name_off..name_off + name_len].to_vec(),
        });
        let mut field = Vec::with_capacity(12);
        field.extend_from_slice(&(new_name_off as u64).to_be_bytes());
        field.extend_from_slice(&(name_len as u32).to_be_bytes());
        plan.push(HeaderWrite {
            offset: 8,
            bytes: field,
        });
    }
    // Behind the end marker up to the name, all unread by now: the pin's
    // data, the new end marker, then zeros over whatever an old name or
    // pin left there (qcow2.rst allows nothing else in that space).
    let mut body = data.clone();
    body.resize(new_name_off - at - 8, 0);
    plan.push(HeaderWrite {
        offset: at as u64 + 8,
        bytes: body,
    });
    let mut head = Vec::with_capacity(8);
    head.extend_from_slice(&EXT_REMOTE_PIN.to_be_bytes());
    head.extend_from_slice(&(data.len() as u32).to_be_bytes());
    plan.push(HeaderWrite {
        offset: at as u64,
        bytes: head,
    });
    Ok(plan)
}

/// Walks the extension list of `area` as `Header::parse` does (it ends at
/// an end marker, at the backing name at `name_off`, or at the end of the
/// area), from the end of `header`'s fixed part. Returns the offset of the
/// pin extension, if any, and where the list ends. A pin with other
/// extensions after it is refused: cutting the list at the pin would drop
/// them (`doing` says what could not be done).
fn find_pin(
    area: &[u8],
    header: &Header,
    name_off: usize,
    path: &str,
    doing: &str,
) -> Result<(Option<usize>, usize)> {
    let end = name_off.min(area.len());
    let mut off = if header.version >= 3 {
        header.header_length as usize
    } else {
        V2_HEADER_LEN as usize
    };
    let mut pin_at = None;
    while off + 8 <= end {
        let kind = u32::from_be_bytes(area[off..off + 4].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(area[off + 4..off + 8].try_into().expect("4 bytes")) as usize;
        if kind == 0 {
            break;
        }
        if pin_at.is_some() && kind != EXT_REMOTE_PIN {
            return Err(Error::unsupported(format!(
                "qcow2 image {path}: another header extension ({kind:#010x}) follows the \
                 remote-image pin, which therefore cannot be {doing} safely"
            )));
        }
        if kind == EXT_REMOTE_PIN && pin_at.is_none() {
            pin_at = Some(off);
        }
        off += 8 + len.next_multiple_of(8);
    }
    Ok((pin_at, off))
}

/// The write that removes the pin (and any second one after it) from the
/// image whose header area is `area` and parses as `header`: an end marker
/// over the pin's type and length, 8 bytes inside one sector, so that it
/// lands whole or not at all. `None` when there is no pin.
pub fn drop_pin_plan(area: &[u8], header: &Header, path: &str) -> Result<Option<HeaderWrite>> {
    let name_off = match header.backing_file_offset {
        0 => area.len(),
        o => o as usize,
    };
    let (pin_at, _) = find_pin(area, header, name_off, path, "removed")?;
    Ok(pin_at.map(|at| HeaderWrite {
        offset: at as u64,
        bytes: vec![0; 8],
    }))
}

/// `backfill check --repair`'s part for the pin: removes a malformed pin
/// (or a second one), which no open accepts, so that the image can be used
/// again. The version of the remote image the overlay's data came from is
/// then unknown: the next writable open pins the version the server has at
/// that time. Returns what was done, `None` when the pin was fine or
/// absent. Takes the image's write lock, like the refcount repair.
pub fn repair_pin(path: impl AsRef<std::path::Path>) -> Result<Option<String>> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(e, format!("opening {name}")))?;
    let file = crate::imagelock::LockedFile::lock(file, &name, true)?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(e, format!("{name}: stat")))?
        .len();
    // A header that does not parse is not the pin's to repair: the check
    // reports it.
    let Ok(header) = Header::read_from(&file, &name) else {
        return Ok(None);
    };
    let Err(why) = stored_pin(&header, &name) else {
        return Ok(None);
    };
    let mut area = vec![0u8; header.cluster_size().min(len) as usize];
    super::header::read_exact_at(&file, &mut area, 0, &name)?;
    let Some(w) = drop_pin_plan(&area, &header, &name)? else {
        return Ok(None);
    };
    file.write_all_at(&w.bytes, w.offset)
        .and_then(|()| file.sync_data())
        .map_err(|e| Error::io(e, format!("{name}: removing the remote-image pin")))?;
    Ok(Some(format!(
        "Removed the malformed remote-image pin ({}). The next writable open pins the version \
         of the remote image the server has then: make sure it is the one the overlay's data \
         came from.",
        why.message()
    )))
}

/// Makes `pin` the pin of the image open as `file` (read-write), each
/// write followed by an fdatasync, and updates `header` to match.
pub fn write_pin(file: &File, path: &str, header: &mut Header, pin: &Pin) -> Result<()> {
    let len = file
        .metadata()
        .map_err(|e| Error::io(e, format!("{path}: stat")))?
        .len();
    let mut area = vec![0u8; header.cluster_size().min(len) as usize];
    super::header::read_exact_at(file, &mut area, 0, path)?;
    let on_disk = Header::parse(&area, len, path)?;
    let plan = set_pin_plan(&area, &on_disk, pin, path)?;
    for w in &plan {
        file.write_all_at(&w.bytes, w.offset)
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io(e, format!("{path}: writing the remote-image pin")))?;
    }
    let mut fresh = vec![0u8; area.len()];
    super::header::read_exact_at(file, &mut fresh, 0, path)?;
    *header = Header::parse(&fresh, len, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::header::qemu_feature_table;

    fn pin(name: &str, etag: &str) -> Pin {
        Pin {
            name: name.into(),
            size: 8 << 20,
            validator: Validator::ETag(etag.into()),
        }
    }

    /// A header area as QEMU lays it out, backed by `name`, with `exts`.
    fn backed(name: &str, cluster_bits: u32, filler: usize) -> (Vec<u8>, Header) {
        let h = Header {
            cluster_bits,
            size: 1 << 20,
            l1_size: 1,
            l1_table_offset: 3 << cluster_bits,
            refcount_table_offset: 1 << cluster_bits,
            extensions: vec![
                qemu_feature_table(),
                crate::qcow2::Extension {
                    kind: 0x1234_5678,
                    data: vec![7; filler],
                },
            ],
            backing_file: Some(name.into()),
            ..crate::qcow2::testutil::sample_header()
        };
        let mut area = h.serialize().expect("serializes");
        area.resize(1 << cluster_bits, 0);
        let h = Header::parse(&area, 1 << 30, "t").expect("parses");
        (area, h)
    }

    fn apply(area: &mut [u8], w: &HeaderWrite) {
        let o = w.offset as usize;
        area[o..o + w.bytes.len()].copy_from_slice(&w.bytes);
    }

    #[test]
    fn round_trip_and_hostile_data() {
        let p = pin("http://h/x.raw", "\"abc-123\"");
        let data = p.encode().unwrap();
        assert_eq!(Pin::decode(&data).unwrap(), p);
        let lm = Pin {
            validator: Validator::LastModified("Thu, 26 Nov 2026 11:00:00 GMT".into()),
            ..p.clone()
        };
        assert_eq!(Pin::decode(&lm.encode().unwrap()).unwrap(), lm);
        // Every truncation, a longer buffer, each field broken: errors.
        for n in 0..data.len() {
            assert!(Pin::decode(&data[..n]).is_err(), "truncated to {n}");
        }
        let mut longer = data.clone();
        longer.push(b'x');
        assert!(Pin::decode(&longer).is_err());
        for (at, v) in [(3, 2), (4, 9), (6, 1), (16, 0xff), (18, 0xff), (22, 1)] {
            let mut d = data.clone();
            d[at] = v;
            assert!(Pin::decode(&d).is_err(), "byte {at} = {v}");
        }
        let mut d = data.clone();
        let last = d.len() - 1;
        d[last] = b'\n';
        assert!(Pin::decode(&d).is_err());
        assert!(pin("", "\"a\"").encode().is_err());
        assert!(pin("http://h/x", &"a".repeat(MAX_VALIDATOR_LEN + 1))
            .encode()
            .is_err());
    }

    /// Applies `plan` step by step from `area`: every prefix parses, names
    /// the same backing file, and holds no pin or exactly `want`, never a
    /// mixture; the end holds `want`.
    fn check_every_prefix(
        mut area: Vec<u8>,
        plan: &[HeaderWrite],
        want: &Pin,
        before: Option<&Pin>,
    ) {
        let name = Header::parse(&area, 1 << 30, "t").unwrap().backing_file;
        for w in plan {
            if w.bytes.len() > 12 {
                // A long write may tear: it must go where nobody reads.
                let mut alone = area.clone();
                apply(&mut alone, w);
                assert_eq!(
                    Header::parse(&alone, 1 << 30, "t").unwrap(),
                    Header::parse(&area, 1 << 30, "t").unwrap()
                );
            } else {
                assert_eq!(w.offset / 512, (w.offset + w.bytes.len() as u64 - 1) / 512);
            }
            apply(&mut area, w);
            let h = Header::parse(&area, 1 << 30, "t").expect("every prefix parses");
            assert_eq!(h.backing_file, name);
            assert_eq!(h.backing_format.as_deref(), Some("raw"));
            let p = stored_pin(&h, "t").expect("never a malformed pin");
            assert!(
                p.is_none() || p.as_ref() == Some(want) || p.as_ref() == before,
                "{p:?}"
            );
        }
        let h = Header::parse(&area, 1 << 30, "t").unwrap();
        assert_eq!(stored_pin(&h, "t").unwrap().as_ref(), Some(want));
        assert_eq!(h.extensions[0], qemu_feature_table());
        // Nothing but zeros between the end marker and the name.
        let mut off = h.header_length as usize;
        while area[off..off + 4] != [0; 4] {
            let len = u32::from_be_bytes(area[off + 4..off + 8].try_into().unwrap()) as usize;
            off += 8 + len.next_multiple_of(8);
        }
        let name_off = h.backing_file_offset as usize;
        assert!(area[off..name_off].iter().all(|&b| b == 0));
    }

    #[test]
    fn adding_and_replacing_a_pin_is_crash_safe() {
        let url = "http://127.0.0.1:8080/images/base.raw";
        let (area, h) = backed(url, 16, 8);
        let first = pin(url, "\"5f1-800000\"");
        let plan = set_pin_plan(&area, &h, &first, "t").unwrap();
        assert_eq!(plan.len(), 4, "the name moves: {plan:?}");
        check_every_prefix(area.clone(), &plan, &first, None);
        let mut pinned = area.clone();
        for w in &plan {
            apply(&mut pinned, w);
        }
        // Rebased onto another URL (as qemu-img rebase -u leaves it: the
        // old pin kept, the name rewritten right after the end marker).
        let other = "http://127.0.0.1:8080/b.raw";
        let mut h2 = Header::parse(&pinned, 1 << 30, "t").unwrap();
        h2.backing_file = Some(other.into());
        let mut rebased = h2.serialize().unwrap();
        rebased.resize(1 << 16, 0);
        let h2 = Header::parse(&rebased, 1 << 30, "t").unwrap();
        assert_eq!(stored_pin(&h2, "t").unwrap().as_ref(), Some(&first));
        let second = pin(other, "\"a-much-longer-etag-than-before-0123456789\"");
        let plan = set_pin_plan(&rebased, &h2, &second, "t").unwrap();
        assert_eq!(plan[0].bytes, vec![0; 8], "the old pin is cut off first");
        check_every_prefix(rebased, &plan, &second, Some(&first));
    }

    #[test]
    fn dropping_a_pin_is_one_end_marker() {
        let url = "http://127.0.0.1:8080/images/base.raw";
        let (area, h) = backed(url, 16, 8);
        assert!(drop_pin_plan(&area, &h, "t").unwrap().is_none(), "no pin");
        let mut pinned = area.clone();
        for w in &set_pin_plan(&area, &h, &pin(url, "\"5f1-800000\""), "t").unwrap() {
            apply(&mut pinned, w);
        }
        let h = Header::parse(&pinned, 1 << 30, "t").unwrap();
        let w = drop_pin_plan(&pinned, &h, "t").unwrap().expect("a pin");
        assert_eq!(w.bytes, vec![0; 8]);
        assert_eq!(w.offset / 512, (w.offset + 7) / 512, "inside one sector");
        let mut dropped = pinned.clone();
        apply(&mut dropped, &w);
        let after = Header::parse(&dropped, 1 << 30, "t").unwrap();
        assert_eq!(stored_pin(&after, "t").unwrap(), None);
        assert_eq!(after.backing_file.as_deref(), Some(url));
        assert_eq!(after.extensions.len(), h.extensions.len() - 1);

        // Another extension after the pin would be cut off with it.
        let mut h2 = h.clone();
        h2.extensions.push(crate::qcow2::Extension {
            kind: 0x1111_2222,
            data: vec![1; 8],
        });
        let mut followed = h2.serialize().unwrap();
        followed.resize(1 << 16, 0);
        let h2 = Header::parse(&followed, 1 << 30, "t").unwrap();
        let e = drop_pin_plan(&followed, &h2, "t").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    }

    #[test]
    fn no_room_is_a_clear_error() {
        // The smallest clusters we open (4 KiB) always have room for the
        // largest pin unless other extensions fill the area.
        let url = format!("http://h/{}", "x".repeat(1000));
        let (area, h) = backed(&url, 12, 2000);
        let e = set_pin_plan(&area, &h, &pin(&url, "\"e\""), "t").unwrap_err();
        assert!(e.message().contains("no room"), "{e}");
    }
}
