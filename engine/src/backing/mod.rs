//! The backing chain: raw and qcow2 files below an overlay, read-only, and
//! at its bottom possibly a remote image (an NBD export, see [`nbd`], or an
//! HTTP(S) URL, see [`http`]): raw, or qcow2 (see [`remote_qcow2`]).
//!
//! What it owns: opening the chain (name resolution, format probing, loop
//! and depth limits), each qcow2 layer's header and L1 table, and the
//! translation of a guest byte range into segments: zeros, a byte range
//! of one layer's file, or a byte range of a remote layer ([`remote`]).
//! Ranges a layer is known to hold as zeros without reading them (an NBD
//! server's block status, a raw file's holes: [`Chain::learn_zeros`],
//! [`zeros`]) are zeros. A [`Chain`] is immutable after [`Chain::open`],
//! but for those learned zeros, and shared by every reactor thread; each
//! thread keeps its own [`ChainCache`] of L2 tables, so lookups take no
//! lock (a layer's zeros, a short one once some are learned).
//!
//! What it never does: read or write guest data (the caller performs the
//! reads the segments describe, e.g. on its io_uring with the fds of
//! [`Chain::layer_files`]), or write to any layer.
//!
//! Invariants: every layer is clamped to its own virtual size: nothing below
//! a layer shows through past that layer's end, and nothing past the end of
//! a layer reads as anything but zeros. Every host range a segment names lies
//! inside its layer's file. Hostile metadata is an error, never a panic.

pub mod http;
pub mod json;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub mod nbd;
pub mod remote;
pub mod remote_qcow2;
pub mod zeros;

use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::create::{probe_format, resolve_backing_path};
use crate::qcow2::pin::Pin;
use crate::qcow2::{
    compressed_data, decode_l1, decode_l2, decode_l2_ext, CompressionType, Header, L2Entry,
    SubState, SUBCLUSTERS,
};

/// Deepest backing chain we open; deeper ones are almost certainly a
/// mistake, and every layer costs an L1 table in memory.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Where the bytes of a segment come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Reads as zeros: a zero cluster, past a layer's end, or unallocated
    /// everywhere.
    Zero,
    /// Bytes of layer `layer`'s file from `host_offset`.
    File { layer: usize, host_offset: u64 },
    /// Bytes `[in_cluster, in_cluster + len)` of a compressed cluster of
    /// layer `layer`: read `data_len` bytes of its file (or its medium, for
    /// a remote layer: [`Chain::remote`]) from `host_offset`,
    /// decompress them into one cluster of `1 << cluster_bits` bytes (the
    /// layer's own cluster size) with `kind`
    /// (see [`crate::qcow2::decompress`]). Such a segment never crosses
    /// the cluster's end, and `data_len` never reaches past the file's end.
    Compressed {
        layer: usize,
        host_offset: u64,
        data_len: u64,
        in_cluster: u64,
        cluster_bits: u32,
        kind: CompressionType,
    },
    /// Bytes of remote layer `layer`'s [`remote::Medium`] from `offset`
    /// (a raw image's guest offset, a remote qcow2 image's host offset);
    /// never past the medium's end.
    Remote { layer: usize, offset: u64 },
}

/// A piece of a resolved range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub len: u64,
    pub source: Source,
    /// 1 + the index of the layer that decided the contents (data or a zero
    /// cluster); 0 when no layer holds anything there.
    pub depth: u32,
}

enum Format {
    /// A raw file; `holes` are the ranges its file system said hold no
    /// data ([`Chain::learn_zeros`]), read as zeros without a read.
    Raw { holes: zeros::Zeros },
    Qcow2 {
        header: Header,
        l1: Vec<u64>,
        /// For a qcow2 image on a remote medium (no local file): the
        /// medium and every L2 table, read at open.
        remote: Option<Box<remote_qcow2::RemoteTables>>,
    },
    /// A raw image on a remote medium (no local file).
    Remote(Arc<dyn remote::Medium>),
}

struct Layer {
    /// The path as resolved, or the URI (what messages and `layer_name` show).
    name: String,
    /// None for a remote layer.
    file: Option<File>,
    /// The same file opened with O_DIRECT, for aligned data reads (no page
    /// cache copy); None where the file system refuses O_DIRECT.
    direct: Option<File>,
    file_len: u64,
    /// Virtual size: the header's for qcow2, the file length for raw.
    size: u64,
    format: Format,
}

/// Adds the holes of raw layer `layer`'s file in `[offset, offset + len)`
/// (clamped to its end) to `holes`, shrunk to whole [`IO_ALIGN`] blocks
/// (where its O_DIRECT reads start and end; a hole may end at the file's
/// end); returns their bytes. A file system that cannot tell has none.
///
/// [`IO_ALIGN`]: crate::io::IO_ALIGN
fn learn_holes(layer: &Layer, holes: &zeros::Zeros, offset: u64, len: u64) -> u64 {
    let end = offset.saturating_add(len).min(layer.size);
    let Some(file) = &layer.file else {
        return 0;
    };
    let Ok(found) = crate::io::holes(file, offset, end) else {
        return 0;
    };
    let align = crate::io::IO_ALIGN as u64;
    let mut bytes = 0;
    for (lo, hi) in found {
        let lo = lo.next_multiple_of(align);
        let hi = if hi == layer.size {
            hi
        } else {
            hi / align * align
        };
        if lo < hi {
            holes.insert(lo, hi);
            bytes += hi - lo;
        }
    }
    bytes
}

/// The big-endian 64-bit entries of a table's bytes (an L1 or L2 table).
fn be_u64s(raw: &[u8]) -> impl Iterator<Item = u64> + '_ {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
}

/// The backing chain of one overlay, layer 0 being its direct backing file.
pub struct Chain {
    /// Distinguishes chains inside a [`ChainCache`].
    id: u64,
    layers: Vec<Layer>,
}

impl Drop for Chain {
    /// Drops the read locks a disk took on the local layers at once (see
    /// `imagelock::LockedFile` for why closing is not enough).
    fn drop(&mut self) {
        for layer in &self.layers {
            if let Some(f) = &layer.file {
                crate::imagelock::unlock_image(f);
            }
        }
    }
}

static NEXT_CHAIN_ID: AtomicU64 = AtomicU64::new(1);

/// The protocol of a name in QEMU's `PROTOCOL:...` style that no source
/// here reads (`ssh:`, `iscsi:` ...), refused rather than taken for a file.
fn protocol_of(name: &str) -> Option<&str> {
    let (scheme, _) = name.split_once(':')?;
    if scheme.is_empty() || scheme.contains('/') {
        return None;
    }
    scheme
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
        .then_some(scheme)
}

fn chain_text(names: &[String]) -> String {
    names.join(" -> ")
}

/// `%XX` escapes of a URI part decoded (RFC 3986 2.1); the result must be
/// UTF-8. The error says which rule the part broke.
pub(crate) fn percent_decode(s: &str) -> std::result::Result<String, &'static str> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let byte = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("bad percent escape")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8")
}

/// Whether a backing file name is a URI of a remote medium (NBD or HTTP).
pub fn is_remote_name(name: &str) -> bool {
    nbd::is_nbd_name(name) || http::medium::is_http_name(name)
}

/// Opens the remote medium a URI names: an NBD export or an HTTP(S) URL.
/// For https, the system's CA certificates are trusted; `SSL_CERT_FILE`
/// (a PEM file) replaces them, e.g. for a private CA. HTTP goes through
/// the proxies the environment names (`http_proxy`, `https_proxy`,
/// `all_proxy`, `no_proxy`), as curl does. A `pin` for this very
/// URL (the overlay's record of the version it copied from, see
/// `qcow2::pin`) must still match what the server reports, or the open
/// fails; a pin for another name is ignored.
pub fn open_medium(name: &str, pin: Option<&Pin>) -> Result<Arc<dyn remote::Medium>> {
    if http::medium::is_http_name(name) {
        let opts = http::HttpOptions {
            expect: pin
                .filter(|p| p.name == name)
                .map(|p| (p.validator.clone(), p.size)),
            proxies: http::Proxies::from_env(),
            ..http::HttpOptions::default()
        };
        Ok(Arc::new(http::medium::HttpMedium::open(name, opts)?))
    } else {
        Ok(Arc::new(nbd::NbdClient::open(name)?))
    }
}

/// Opens a remote layer named by URI `name` (in `format`) below `parent`.
fn open_remote(
    name: &str,
    format: Option<&str>,
    parent: &str,
    confine: &Option<PathBuf>,
    pin: Option<&Pin>,
) -> Result<Layer> {
    if let Some(dir) = confine {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "backing file {name:?} of {parent} is remote, but backing files are confined to \
                 the directory {}: a confined image may not reach the network",
                dir.display()
            ),
        ));
    }
    let raw = match format {
        Some("raw") => true,
        Some("qcow2") => false,
        Some(other) => {
            return Err(Error::unsupported(format!(
                "backing file {name:?} of {parent}: format {other:?} over NBD or HTTP is not \
                 supported (only raw and qcow2; e.g. qemu-img create -b URI -F raw)"
            )))
        }
        None => {
            return Err(Error::unsupported(format!(
                "backing file {name:?} of {parent}: no backing format recorded, and formats are \
                 not probed over NBD or HTTP (name it: -F raw or -F qcow2)"
            )))
        }
    };
    let medium = open_medium(name, pin)?;
    let file_len = medium.size();
    let (size, format) = if raw {
        (file_len, Format::Remote(medium))
    } else {
        let (header, l1, tables) = remote_qcow2::open(medium, name)
            .map_err(|e| e.context(format!("backing file of {parent}")))?;
        (
            header.size,
            Format::Qcow2 {
                header,
                l1,
                remote: Some(Box::new(tables)),
            },
        )
    };
    Ok(Layer {
        name: name.to_string(),
        file: None,
        direct: None,
        file_len,
        size,
        format,
    })
}

impl Chain {
    /// Opens the chain below `overlay_path`, whose header names
    /// `backing_file` (relative names are relative to the overlay's
    /// directory) in `backing_format` (probed when `None`).
    pub fn open(
        overlay_path: &Path,
        backing_file: &str,
        backing_format: Option<&str>,
    ) -> Result<Chain> {
        Chain::open_confined(overlay_path, backing_file, backing_format, None)
    }

    /// Like [`Chain::open`]; with `confine`, every file of the chain must
    /// lie inside that directory once symbolic links and `..` are resolved
    /// (for serving images someone else supplied), or the open is refused.
    pub fn open_confined(
        overlay_path: &Path,
        backing_file: &str,
        backing_format: Option<&str>,
        confine: Option<&Path>,
    ) -> Result<Chain> {
        Chain::open_pinned(overlay_path, backing_file, backing_format, confine, None)
    }

    /// Like [`Chain::open_confined`]; a remote layer whose URL `pin` names
    /// must still be the version pinned (see `qcow2::pin`), or the open
    /// fails before any read.
    pub fn open_pinned(
        overlay_path: &Path,
        backing_file: &str,
        backing_format: Option<&str>,
        confine: Option<&Path>,
        pin: Option<&Pin>,
    ) -> Result<Chain> {
        let confine = match confine {
            Some(d) => Some(
                std::fs::canonicalize(d)
                    .map_err(|e| Error::io(e, format!("backing directory {}", d.display())))?,
            ),
            None => None,
        };
        let overlay_name = overlay_path.display().to_string();
        let mut names = vec![overlay_name.clone()];
        let mut seen = Vec::new();
        // The overlay itself takes part in loop detection when it exists.
        if let Ok(m) = std::fs::metadata(overlay_path) {
            seen.push((m.dev(), m.ino()));
        }
        let mut layers: Vec<Layer> = Vec::new();
        let mut parent: PathBuf = overlay_path.to_path_buf();
        let mut next = Some((backing_file.to_string(), backing_format.map(str::to_string)));
        while let Some((name, fmt)) = next.take() {
            let parent_name = parent.display().to_string();
            if layers.len() == MAX_CHAIN_DEPTH {
                names.push(name);
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "backing chain of {overlay_name} is deeper than {MAX_CHAIN_DEPTH} layers: {}",
                        chain_text(&names)
                    ),
                ));
            }
            let (name, fmt) = if json::is_json_name(&name) {
                let r = json::resolve(&name, fmt.as_deref(), &parent_name)?;
                (r.name, r.format)
            } else {
                (name, fmt)
            };
            let name = name.strip_prefix("file:").unwrap_or(&name).to_string();
            if name.is_empty() {
                return Err(Error::corrupt(format!(
                    "{parent_name} names an empty backing file"
                )));
            }
            if is_remote_name(&name) {
                layers.push(open_remote(
                    &name,
                    fmt.as_deref(),
                    &parent_name,
                    &confine,
                    pin,
                )?);
                names.push(name);
                // Raw, or a standalone qcow2 image: the chain ends here.
                continue;
            }
            if let Some(proto) = protocol_of(&name) {
                return Err(Error::unsupported(format!(
                    "backing file {name:?} of {parent_name}: protocol {proto:?} is not supported \
                     (only files, NBD and HTTP(S) URIs, and QEMU's json: options)"
                )));
            }
            let path = resolve_backing_path(&parent, &name);
            let path_s = path.display().to_string();
            names.push(path_s.clone());
            let unavailable = |e: std::io::Error| {
                let mut err = Error::io(
                    e,
                    format!(
                        "opening backing file {name:?} of {parent_name} (resolved to {path_s})"
                    ),
                );
                err = Error::new(ErrorKind::BackingUnavailable, err.message().to_string());
                err
            };
            let path = match &confine {
                Some(dir) => {
                    // Open what the name really resolves to, checked.
                    let real = std::fs::canonicalize(&path).map_err(unavailable)?;
                    if !real.starts_with(dir) {
                        return Err(Error::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "backing file {name:?} of {parent_name} resolves to {}, outside \
                                 the allowed backing directory {}",
                                real.display(),
                                dir.display()
                            ),
                        ));
                    }
                    real
                }
                None => path,
            };
            let file = File::open(&path).map_err(unavailable)?;
            let meta = file.metadata().map_err(unavailable)?;
            let key = (meta.dev(), meta.ino());
            if seen.contains(&key) {
                return Err(Error::corrupt(format!(
                    "backing chain of {overlay_name} loops: {}",
                    chain_text(&names)
                )));
            }
            seen.push(key);
            let file_len = crate::io::file_size(&file).map_err(unavailable)?;
            let fmt = match fmt {
                Some(f) => f,
                None => probe_format(&file, &path_s)?.to_string(),
            };
            let layer = match fmt.as_str() {
                "raw" => Layer {
                    name: path_s,
                    file: Some(file),
                    direct: None,
                    file_len,
                    size: file_len,
                    format: Format::Raw {
                        holes: zeros::Zeros::default(),
                    },
                },
                "qcow2" => {
                    // The dirty bit is fine here: we never allocate from
                    // this layer's refcounts.
                    let header = Header::read_from(&file, &path_s)
                        .map_err(|e| e.context(format!("backing chain of {overlay_name}")))?;
                    let mut raw = vec![0u8; header.l1_size as usize * 8];
                    file.read_exact_at(&mut raw, header.l1_table_offset)
                        .map_err(|e| {
                            Error::io(e, format!("reading the L1 table of backing file {path_s}"))
                        })?;
                    let l1 = be_u64s(&raw).collect();
                    next = header
                        .backing_file
                        .clone()
                        .map(|b| (b, header.backing_format.clone()));
                    Layer {
                        name: path_s,
                        file: Some(file),
                        direct: None,
                        file_len,
                        size: header.size,
                        format: Format::Qcow2 {
                            header,
                            l1,
                            remote: None,
                        },
                    }
                }
                other => {
                    return Err(Error::unsupported(format!(
                        "backing file {path_s} of {parent_name}: format {other:?} is not \
                         supported (only raw and qcow2)"
                    )));
                }
            };
            layers.push(Layer {
                direct: std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                    .ok(),
                ..layer
            });
            parent = path;
        }
        Ok(Chain {
            id: NEXT_CHAIN_ID.fetch_add(1, Ordering::Relaxed),
            layers,
        })
    }

    /// Number of backing layers.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// One fd per layer (index = layer), e.g. to register with io_uring;
    /// -1 (a sparse slot) for a remote layer. They stay valid as long as
    /// the chain lives.
    pub fn layer_files(&self) -> Vec<RawFd> {
        self.layers
            .iter()
            .map(|l| l.file.as_ref().map_or(-1, |f| f.as_raw_fd()))
            .collect()
    }

    /// Per layer, an fd opened with O_DIRECT (the buffered one where the
    /// file system refuses O_DIRECT), to register after `layer_files`.
    pub fn direct_files(&self) -> Vec<RawFd> {
        self.layers
            .iter()
            .map(|l| {
                l.direct
                    .as_ref()
                    .or(l.file.as_ref())
                    .map_or(-1, |f| f.as_raw_fd())
            })
            .collect()
    }

    /// The open file of layer `i`, None for a remote layer.
    pub fn local_file(&self, i: usize) -> Option<&File> {
        self.layers[i].file.as_ref()
    }

    /// The pin of the chain's remote layer (see `qcow2::pin`), if it has
    /// one that can be pinned (an HTTP image with a validator).
    pub fn remote_pin(&self) -> Option<Pin> {
        (0..self.depth()).find_map(|i| self.remote(i).and_then(|m| m.pin()))
    }

    /// The medium of layer `i` when it is remote.
    pub fn remote(&self, i: usize) -> Option<&Arc<dyn remote::Medium>> {
        match &self.layers[i].format {
            Format::Remote(m) => Some(m),
            Format::Qcow2 {
                remote: Some(r), ..
            } => Some(&r.medium),
            _ => None,
        }
    }

    /// Learns which of `[offset, offset + len)` reads as zeros without a
    /// read, layer by layer: a remote layer asks its medium (an NBD
    /// server's block status: a round trip), a raw file its file system
    /// (its holes). [`Chain::resolve`] then gives those ranges as zeros.
    /// Returns the bytes found, over all layers. Nothing fails by it: what
    /// cannot be learned is read as before.
    pub fn learn_zeros(&self, offset: u64, len: u64) -> u64 {
        self.layers
            .iter()
            .map(|layer| match &layer.format {
                Format::Remote(m) => m.learn_zeros(offset, len),
                Format::Raw { holes } => learn_holes(layer, holes, offset, len),
                Format::Qcow2 { .. } => 0,
            })
            .sum()
    }

    /// Whether layer `i` has an O_DIRECT descriptor.
    pub fn has_direct(&self, i: usize) -> bool {
        self.layers[i].direct.is_some()
    }

    /// The open file of a local layer, for synchronous reads.
    pub fn layer_file(&self, i: usize) -> &File {
        self.layers[i]
            .file
            .as_ref()
            .expect("layer_file of a remote layer")
    }

    pub fn layer_name(&self, i: usize) -> &str {
        &self.layers[i].name
    }

    pub fn layer_format(&self, i: usize) -> &str {
        match self.layers[i].format {
            Format::Raw { .. } | Format::Remote(_) => "raw",
            Format::Qcow2 { .. } => "qcow2",
        }
    }

    pub fn layer_size(&self, i: usize) -> u64 {
        self.layers[i].size
    }

    /// Virtual size of layer 0 (0 for an empty chain).
    pub fn size(&self) -> u64 {
        self.layers.first().map_or(0, |l| l.size)
    }

    /// Appends segments covering exactly `[offset, offset + len)`, in order,
    /// merging neighbours of the same kind and depth (and contiguous host
    /// offsets).
    pub fn resolve(
        &self,
        cache: &mut ChainCache,
        offset: u64,
        len: u64,
        out: &mut Vec<Segment>,
    ) -> Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| {
            Error::new(
                ErrorKind::OutOfBounds,
                format!("range at offset {offset} length {len} overflows"),
            )
        })?;
        cache.bind(self.id);
        let mut pos = offset;
        while pos < end {
            let (n, source, depth) = self.lookup(cache, 0, pos, end - pos)?;
            debug_assert!(n > 0 && n <= end - pos);
            push_merged(
                out,
                Segment {
                    len: n,
                    source,
                    depth,
                },
            );
            pos += n;
        }
        Ok(())
    }

    /// What layer `i` and below hold at `pos`, for at most `max` bytes.
    /// Returns the length of the run found (> 0), its source and depth.
    fn lookup(
        &self,
        cache: &mut ChainCache,
        i: usize,
        pos: u64,
        max: u64,
    ) -> Result<(u64, Source, u32)> {
        let Some(layer) = self.layers.get(i) else {
            return Ok((max, Source::Zero, 0));
        };
        if pos >= layer.size {
            // Past this layer's end nothing shows, whatever lies below.
            return Ok((max, Source::Zero, 0));
        }
        let max = max.min(layer.size - pos);
        let depth = i as u32 + 1;
        let (header, l1, remote) = match &layer.format {
            Format::Raw { holes } => {
                let (zeros, n) = holes.run(pos, max);
                if zeros {
                    return Ok((n, Source::Zero, depth));
                }
                return Ok((
                    n,
                    Source::File {
                        layer: i,
                        host_offset: pos,
                    },
                    depth,
                ));
            }
            Format::Remote(m) => {
                // What the medium said reads as zeros needs no fetch.
                let (zeros, n) = m.zeros_at(pos, max);
                if zeros {
                    return Ok((n, Source::Zero, depth));
                }
                return Ok((
                    n,
                    Source::Remote {
                        layer: i,
                        offset: pos,
                    },
                    depth,
                ));
            }
            Format::Qcow2 { header, l1, remote } => (header, l1, remote),
        };
        let cs = header.cluster_size();
        let in_cluster = pos % cs;
        let cluster = pos / cs;
        let l2_entries = header.l2_entries();
        let l1_index = cluster / l2_entries;
        let l2_index = (cluster % l2_entries) as usize;
        let bad = |what: String| Error::corrupt(format!("backing file {}: {what}", layer.name));

        let l1_raw = l1.get(l1_index as usize).copied().unwrap_or(0);
        let l2_offset = decode_l1(l1_raw, cs)
            .map_err(|e| bad(format!("L1 entry {l1_index}: {}", e.message())))?;
        let Some(l2_offset) = l2_offset else {
            // No L2 table: the whole range it would map is unallocated here.
            let to_table_end = (l2_entries - l2_index as u64) * cs - in_cluster;
            return self.lookup(cache, i + 1, pos, max.min(to_table_end));
        };
        if l2_offset.checked_add(cs).is_none_or(|e| e > layer.file_len) {
            return Err(bad(format!(
                "L2 table at offset {l2_offset:#x} (L1 entry {l1_index}) lies past the end of \
                 the file ({} bytes)",
                layer.file_len
            )));
        }
        let table: &[u64] = match remote {
            Some(r) => r
                .tables
                .get(&l2_offset)
                .expect("every L2 table loaded at open"),
            None => {
                let file = layer.file.as_ref().expect("a local qcow2 layer has a file");
                cache.get(i, l2_offset, file, cs, &layer.name)?
            }
        };

        if header.extended_l2() {
            // Subclusters: a run of subclusters of one state, within this
            // cluster (runs across clusters would save little here).
            let e = decode_l2_ext(table[2 * l2_index], table[2 * l2_index + 1], cs)
                .map_err(|e| bad(format!("guest offset {pos:#x}: {}", e.message())))?;
            let sc = cs / u64::from(SUBCLUSTERS);
            let sub = (in_cluster / sc) as u32;
            let run = u64::from(e.run_end(sub)) * sc - in_cluster;
            let first = match e.state(sub) {
                SubState::Unallocated => L2Entry::Unallocated,
                SubState::Zero => L2Entry::Zero { host: None },
                SubState::Data | SubState::Compressed => e.entry,
            };
            return self.mapped(cache, i, pos, max, first, run);
        }
        // Runs of entries of the same kind make one lookup serve many
        // clusters; data runs must also be contiguous on the host.
        let first = decode_l2(table[l2_index], header.version, cs)
            .map_err(|e| bad(format!("guest offset {pos:#x}: {}", e.message())))?;
        let mut run = cs - in_cluster;
        let mut idx = l2_index + 1;
        while run < max && idx < table.len() {
            let e = decode_l2(table[idx], header.version, cs).map_err(|e| {
                bad(format!(
                    "guest offset {:#x}: {}",
                    (cluster + (idx - l2_index) as u64) * cs,
                    e.message()
                ))
            })?;
            let same = match (first, e) {
                (L2Entry::Unallocated, L2Entry::Unallocated) => true,
                (L2Entry::Zero { .. }, L2Entry::Zero { .. }) => true,
                (L2Entry::Data { host: a }, L2Entry::Data { host: b }) => b == a + run + in_cluster,
                _ => false,
            };
            if !same {
                break;
            }
            run += cs;
            idx += 1;
        }
        self.mapped(cache, i, pos, max, first, run)
    }

    /// The answer of [`Chain::lookup`] once layer `i` said `first` about
    /// `pos`, for a run of `run` bytes (which may exceed `max`).
    fn mapped(
        &self,
        cache: &mut ChainCache,
        i: usize,
        pos: u64,
        max: u64,
        first: L2Entry,
        run: u64,
    ) -> Result<(u64, Source, u32)> {
        let layer = &self.layers[i];
        let Format::Qcow2 { header, remote, .. } = &layer.format else {
            unreachable!("only qcow2 layers have L2 entries");
        };
        let cs = header.cluster_size();
        let in_cluster = pos % cs;
        let depth = i as u32 + 1;
        let bad = |what: String| Error::corrupt(format!("backing file {}: {what}", layer.name));
        let max = max.min(layer.size - pos);
        let run = run.min(max);
        match first {
            L2Entry::Unallocated => self.lookup(cache, i + 1, pos, run),
            L2Entry::Zero { .. } => Ok((run, Source::Zero, depth)),
            L2Entry::Compressed(raw) => {
                let (host_offset, data_len) = compressed_data(raw, header.cluster_bits);
                if host_offset < cs || host_offset >= layer.file_len {
                    return Err(bad(format!(
                        "compressed cluster at host offset {host_offset:#x} for guest offset \
                         {pos:#x} lies in the header or past the end of the file ({} bytes)",
                        layer.file_len
                    )));
                }
                let kind = CompressionType::from_header(header.compression_type)
                    .map_err(|e| bad(e.message().to_string()))?;
                // QEMU's last compressed cluster may name padding past the
                // file's end (reads there are zeros); never read past it.
                Ok((
                    max.min(cs - in_cluster),
                    Source::Compressed {
                        layer: i,
                        host_offset,
                        data_len: data_len.min(layer.file_len - host_offset),
                        in_cluster,
                        cluster_bits: header.cluster_bits,
                        kind,
                    },
                    depth,
                ))
            }
            L2Entry::Data { host } => {
                let start = host + in_cluster;
                if host >= layer.file_len {
                    return Err(bad(format!(
                        "data cluster at host offset {host:#x} for guest offset {pos:#x} lies \
                         past the end of the file ({} bytes)",
                        layer.file_len
                    )));
                }
                if start >= layer.file_len {
                    // The tail of a cluster the file does not reach: the
                    // file reads as zeros there.
                    return Ok((run.min(cs - in_cluster), Source::Zero, depth));
                }
                // Never name bytes past the end of the file: a short read
                // would break the caller's linked operations.
                let n = run.min(layer.file_len - start);
                let source = if remote.is_some() {
                    Source::Remote {
                        layer: i,
                        offset: start,
                    }
                } else {
                    Source::File {
                        layer: i,
                        host_offset: start,
                    }
                };
                Ok((n, source, depth))
            }
        }
    }
}

fn push_merged(out: &mut Vec<Segment>, s: Segment) {
    if let Some(last) = out.last_mut() {
        // Zeros join zeros; bytes join bytes that follow them in the same
        // layer's file or remote medium.
        let joins = last.depth == s.depth
            && match (last.source, s.source) {
                (Source::Zero, Source::Zero) => true,
                (
                    Source::File {
                        layer: a,
                        host_offset: x,
                    },
                    Source::File {
                        layer: b,
                        host_offset: y,
                    },
                )
                | (
                    Source::Remote {
                        layer: a,
                        offset: x,
                    },
                    Source::Remote {
                        layer: b,
                        offset: y,
                    },
                ) => a == b && x + last.len == y,
                _ => false,
            };
        if joins {
            last.len += s.len;
            return;
        }
    }
    out.push(s);
}

/// One thread's cache of backing L2 tables, within a byte budget, evicting
/// the least recently used table. Not shared: each reactor thread owns one.
pub struct ChainCache {
    budget_bytes: u64,
    used_bytes: u64,
    /// The chain whose tables are cached; another chain's lookups clear it.
    chain_id: u64,
    tick: u64,
    tables: HashMap<(usize, u64), CachedTable>,
}

struct CachedTable {
    entries: Box<[u64]>,
    last_used: u64,
}

impl ChainCache {
    /// A cache holding at most `budget_bytes` of L2 tables (but always at
    /// least one, so that a lookup can make progress).
    pub fn new(budget_bytes: u64) -> ChainCache {
        ChainCache {
            budget_bytes,
            used_bytes: 0,
            chain_id: 0,
            tick: 0,
            tables: HashMap::new(),
        }
    }

    /// Bytes of tables held now.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    fn bind(&mut self, chain_id: u64) {
        if self.chain_id != chain_id {
            self.tables.clear();
            self.used_bytes = 0;
            self.chain_id = chain_id;
        }
    }

    fn get(
        &mut self,
        layer: usize,
        l2_offset: u64,
        file: &File,
        cs: u64,
        name: &str,
    ) -> Result<&[u64]> {
        self.tick += 1;
        let tick = self.tick;
        if !self.tables.contains_key(&(layer, l2_offset)) {
            let mut raw = vec![0u8; cs as usize];
            file.read_exact_at(&mut raw, l2_offset).map_err(|e| {
                Error::io(
                    e,
                    format!("reading the L2 table at offset {l2_offset:#x} of backing file {name}"),
                )
            })?;
            let entries: Box<[u64]> = be_u64s(&raw).collect();
            while self.used_bytes + cs > self.budget_bytes && !self.tables.is_empty() {
                // A scan is fine: the table count is budget / cluster size,
                // and a miss already costs a pread.
                let victim = *self
                    .tables
                    .iter()
                    .min_by_key(|(_, t)| t.last_used)
                    .map(|(k, _)| k)
                    .expect("non-empty");
                self.tables.remove(&victim);
                self.used_bytes -= cs;
            }
            self.used_bytes += cs;
            self.tables.insert(
                (layer, l2_offset),
                CachedTable {
                    entries,
                    last_used: tick,
                },
            );
        }
        let t = self
            .tables
            .get_mut(&(layer, l2_offset))
            .expect("just inserted");
        t.last_used = tick;
        Ok(&t.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::testutil::{qemu_img, qemu_io, tool_available};

    #[test]
    fn chain_is_shareable_and_cache_is_movable() {
        fn shared<T: Send + Sync>() {}
        fn movable<T: Send>() {}
        shared::<Chain>();
        movable::<ChainCache>();
    }

    /// Reads `[offset, offset+len)` through resolve + pread.
    fn read_via_chain(chain: &Chain, cache: &mut ChainCache, offset: u64, len: u64) -> Vec<u8> {
        let mut segs = Vec::new();
        chain.resolve(cache, offset, len, &mut segs).unwrap();
        assert_eq!(segs.iter().map(|s| s.len).sum::<u64>(), len);
        let mut out = Vec::with_capacity(len as usize);
        for s in segs {
            match s.source {
                Source::Zero => out.resize(out.len() + s.len as usize, 0),
                Source::File { layer, host_offset } => {
                    let mut b = vec![0u8; s.len as usize];
                    chain
                        .layer_file(layer)
                        .read_exact_at(&mut b, host_offset)
                        .unwrap();
                    out.extend_from_slice(&b);
                }
                Source::Compressed {
                    layer,
                    host_offset,
                    data_len,
                    in_cluster,
                    cluster_bits,
                    kind,
                } => {
                    let mut packed = vec![0u8; data_len as usize];
                    chain
                        .layer_file(layer)
                        .read_exact_at(&mut packed, host_offset)
                        .unwrap();
                    let mut cluster = vec![0u8; 1 << cluster_bits];
                    crate::qcow2::decompress(kind, &packed, &mut cluster).unwrap();
                    let at = in_cluster as usize;
                    out.extend_from_slice(&cluster[at..at + s.len as usize]);
                }
                Source::Remote { .. } => unreachable!("these chains are local"),
            }
        }
        out
    }

    /// What qemu says the image reads as, padded with zeros to `len`.
    fn qemu_view(img: &Path, dir: &Path, len: u64) -> Vec<u8> {
        let out = dir.join("view.raw");
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let mut v = std::fs::read(&out).unwrap();
        v.resize(len as usize, 0);
        v
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// raw (6M) <- mid.qcow2 (8M, 4k clusters) <- top.qcow2 (4M) <- the
    /// overlay (10M): a smaller and a larger layer, data and zero clusters at
    /// every level.
    #[test]
    fn chain_matches_qemu_convert() {
        if !tool_available("qemu-img") || !tool_available("qemu-io") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let raw = d.join("base.raw");
        let mut base = vec![0u8; 6 << 20];
        for (i, b) in base.iter_mut().enumerate() {
            *b = (i / 4096) as u8 | 1;
        }
        std::fs::write(&raw, &base).unwrap();
        let mid = d.join("mid.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
            "8M",
        ]);
        qemu_io(
            &mid,
            "qcow2",
            &[
                "write -P 0x11 1M 100k",
                "write -z 2M 64k",
                "write -P 0x12 7M 64k",
                "write -z 5900k 300k",
            ],
        );
        std::fs::create_dir(d.join("sub")).unwrap();
        let top = d.join("sub/top.qcow2");
        // Relative to top's own directory.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "4M",
        ]);
        qemu_io(
            &top,
            "qcow2",
            &[
                "write -P 0x21 1040k 8k",
                "write -z 0 64k",
                "write -P 0x22 3M 200k",
            ],
        );
        let overlay = d.join("sub/overlay.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            s(&overlay),
            "10M",
        ]);

        let chain = Chain::open(&overlay, "top.qcow2", Some("qcow2")).unwrap();
        assert_eq!(chain.depth(), 3);
        assert_eq!(chain.layer_format(0), "qcow2");
        assert_eq!(chain.layer_format(2), "raw");
        assert_eq!(chain.size(), 4 << 20);
        assert_eq!(chain.layer_size(1), 8 << 20);
        assert_eq!(chain.layer_files().len(), 3);
        assert!(chain.layer_name(1).ends_with("mid.qcow2"));

        let want = qemu_view(&overlay, d, 10 << 20);
        let mut cache = ChainCache::new(3 * 65536);
        let got = read_via_chain(&chain, &mut cache, 0, 10 << 20);
        assert!(got == want, "whole-disk read differs");
        assert!(cache.used_bytes() <= 3 * 65536);
        // Unaligned pieces at awkward places, with a tiny cache.
        let mut cache = ChainCache::new(1);
        for &(off, len) in &[
            (1, 4095),
            (1040 * 1024 - 3, 9000),
            (2047 * 1024, 70000),
            ((4 << 20) - 5, 10),
            (3 << 20, 1 << 20),
        ] {
            let got = read_via_chain(&chain, &mut cache, off, len);
            assert!(
                got[..] == want[off as usize..(off + len) as usize],
                "range {off}+{len}"
            );
        }

        // Depths: past the top layer's 4M nothing shows through.
        let mut segs = Vec::new();
        chain
            .resolve(&mut cache, 4 << 20, 4 << 20, &mut segs)
            .unwrap();
        assert_eq!(
            segs,
            vec![Segment {
                len: 4 << 20,
                source: Source::Zero,
                depth: 0
            }]
        );
        segs.clear();
        chain.resolve(&mut cache, 0, 64 << 10, &mut segs).unwrap();
        assert_eq!(
            segs,
            vec![Segment {
                len: 64 << 10,
                source: Source::Zero,
                depth: 1
            }]
        );
        segs.clear();
        chain
            .resolve(&mut cache, 2 << 20, 64 << 10, &mut segs)
            .unwrap();
        assert_eq!(
            segs,
            vec![Segment {
                len: 64 << 10,
                source: Source::Zero,
                depth: 2
            }]
        );
        segs.clear();
        chain
            .resolve(&mut cache, 64 << 10, 4096, &mut segs)
            .unwrap();
        assert_eq!(
            segs,
            vec![Segment {
                len: 4096,
                source: Source::File {
                    layer: 2,
                    host_offset: 64 << 10
                },
                depth: 3
            }]
        );

        // The mid layer alone (8M over a 6M raw): past 6M only its own data.
        let chain = Chain::open(&top, "../mid.qcow2", None).unwrap();
        assert_eq!(chain.depth(), 2);
        let want = qemu_view(&mid, d, 8 << 20);
        let got = read_via_chain(&chain, &mut ChainCache::new(1 << 20), 0, 8 << 20);
        assert!(got == want, "mid layer read differs");
    }

    #[test]
    fn refuses_bad_chains() {
        if !tool_available("qemu-img") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let kind = |r: Result<Chain>| r.err().expect("must fail").kind();
        let ov = d.join("ov.qcow2");
        assert_eq!(
            kind(Chain::open(&ov, "nbd://host/x", None)),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind(Chain::open(&ov, "http://host/x", None)),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind(Chain::open(
                &ov,
                r#"json:{"file":{"driver":"ssh","path":"/x"}}"#,
                None
            )),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind(Chain::open(&ov, "json:{}", None)),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            kind(Chain::open(&ov, "ssh://host/x", None)),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind(Chain::open(&ov, "missing.raw", None)),
            ErrorKind::BackingUnavailable
        );
        std::fs::write(d.join("r.raw"), [0u8; 512]).unwrap();
        assert_eq!(
            kind(Chain::open(&ov, "r.raw", Some("vmdk"))),
            ErrorKind::Unsupported
        );
        assert_eq!(Chain::open(&ov, "file:r.raw", None).unwrap().depth(), 1);
        // Confined to a directory: inside works; `..` and a symlink out do not.
        let dir = ov.parent().unwrap();
        assert_eq!(
            Chain::open_confined(&ov, "r.raw", None, Some(dir))
                .unwrap()
                .depth(),
            1
        );
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.raw"), b"secret").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.raw"), dir.join("link.raw"))
            .unwrap();
        let escape = outside.path().join("secret.raw");
        for name in ["link.raw", escape.to_str().unwrap()] {
            let e = Chain::open_confined(&ov, name, Some("raw"), Some(dir))
                .err()
                .unwrap();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name}: {e}");
            assert!(
                e.to_string()
                    .contains("outside the allowed backing directory"),
                "{e}"
            );
        }
        assert!(
            Chain::open(&ov, "link.raw", Some("raw")).is_ok(),
            "unconfined follows links"
        );

        // a -> b -> a: a loop. Made with -u since qemu-img refuses loops too.
        let a = d.join("a.qcow2");
        let b = d.join("b.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&a), "1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            s(&b),
            "1M",
        ]);
        qemu_img(&[
            "rebase",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            s(&a),
        ]);
        let e = Chain::open(&ov, "a.qcow2", None).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("loops"), "{e}");

        // 66 layers: too deep.
        qemu_img(&["create", "-q", "-f", "qcow2", s(&d.join("l0.qcow2")), "1M"]);
        for i in 1..66 {
            let prev = format!("l{}.qcow2", i - 1);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                &prev,
                "-F",
                "qcow2",
                s(&d.join(format!("l{i}.qcow2"))),
                "1M",
            ]);
        }
        let e = Chain::open(&ov, "l65.qcow2", None).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(Chain::open(&ov, "l62.qcow2", None).unwrap().depth(), 63);

        // Compressed clusters (zlib and zstd) resolve to segments that
        // decompress to what qemu reads.
        let src = d.join("src.raw");
        let mut data = vec![7u8; 1 << 20];
        for (i, b) in data[300_000..400_000].iter_mut().enumerate() {
            *b = (i * 7 % 253) as u8;
        }
        std::fs::write(&src, &data).unwrap();
        for ty in ["zlib", "zstd"] {
            let c = d.join(format!("c-{ty}.qcow2"));
            let o = format!("compression_type={ty},cluster_size=4k");
            qemu_img(&["convert", "-c", "-O", "qcow2", "-o", &o, s(&src), s(&c)]);
            let chain = Chain::open(&ov, c.to_str().unwrap(), None).unwrap();
            let mut segs = Vec::new();
            chain
                .resolve(&mut ChainCache::new(1 << 20), 0, 4096, &mut segs)
                .unwrap();
            assert!(
                matches!(segs[0].source, Source::Compressed { .. }),
                "{segs:?}"
            );
            let got = read_via_chain(&chain, &mut ChainCache::new(1 << 20), 1, (1 << 20) - 1);
            assert!(got[..] == data[1..], "{ty}");
        }
    }

    #[test]
    fn hostile_l2_offsets_are_corrupt() {
        if !tool_available("qemu-img") || !tool_available("qemu-io") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("h.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
        qemu_io(&img, "qcow2", &["write -P 1 0 4k"]);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 40).unwrap();
        let l1 = u64::from_be_bytes(b);
        f.read_exact_at(&mut b, l1).unwrap();
        let l2 = u64::from_be_bytes(b) & crate::qcow2::L1E_OFFSET_MASK;
        // Data cluster far past EOF.
        f.write_all_at(
            &((1u64 << 40) | crate::qcow2::OFLAG_COPIED).to_be_bytes(),
            l2,
        )
        .unwrap();
        let ov = dir.path().join("ov.qcow2");
        let chain = Chain::open(&ov, "h.qcow2", None).unwrap();
        let e = chain
            .resolve(&mut ChainCache::new(1 << 20), 0, 4096, &mut Vec::new())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        // L2 table past EOF.
        f.write_all_at(
            &((1u64 << 40) | crate::qcow2::OFLAG_COPIED).to_be_bytes(),
            l1,
        )
        .unwrap();
        let chain = Chain::open(&ov, "h.qcow2", None).unwrap();
        let e = chain
            .resolve(&mut ChainCache::new(1 << 20), 0, 4096, &mut Vec::new())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("h.qcow2"), "{e}");
    }
}
