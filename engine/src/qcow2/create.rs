//! Creating an empty qcow2 image, laid out as `qemu-img create -f qcow2` does.
//!
//! What it owns: the initial layout: header (cluster 0), refcount table
//! (from cluster 1), refcount blocks, then the zero-filled L1 table, with a
//! refcount of 1 for every one of those clusters.
//!
//! What it never does: allocate guest data, or touch the backing image other
//! than to probe its format and size (read-only).
//!
//! Invariants: the file it leaves behind passes `qemu-img check` with no
//! leaks and no errors; it is fully written and synced before `create`
//! returns.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::entry::RefcountWidth;
use super::header::{
    l1_entries_needed, qemu_feature_table, Header, INCOMPAT_EXTL2, MIN_EXTL2_CLUSTER_BITS,
    V3_HEADER_LEN,
};
use super::{MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS, QCOW_MAGIC};
use crate::error::{Error, ErrorKind, Result};

/// The qcow2 version to write: `V2` is QEMU's "compat=0.10", `V3` "1.1".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compat {
    V2,
    #[default]
    V3,
}

impl FromStr for Compat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Compat> {
        match s {
            "0.10" | "v2" | "2" => Ok(Compat::V2),
            "1.1" | "v3" | "3" => Ok(Compat::V3),
            _ => Err(Error::new(
                ErrorKind::InvalidInput,
                format!("unknown qcow2 compat level {s:?} (expected 0.10, 1.1, v2 or v3)"),
            )),
        }
    }
}

/// What [`create`] makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes, rounded up to 512 as qemu-img does. `None`
    /// takes the backing image's virtual size.
    pub size: Option<u64>,
    /// Backing file name, stored as given; a relative name is relative to
    /// the directory of the new image.
    pub backing: Option<String>,
    /// "raw" or "qcow2"; probed from the backing file when `None`.
    pub backing_format: Option<String>,
    /// Bytes; a power of two from 4 KiB to 2 MiB.
    pub cluster_size: u32,
    pub compat: Compat,
    /// Width of a refcount entry (qemu-img's `refcount_bits`, 1 to 64;
    /// compat 0.10 images have 16).
    pub refcount_width: RefcountWidth,
    /// Extended L2 entries (`extended_l2=on`): 32 subclusters per cluster,
    /// so copy-on-read and writes allocate subclusters, not whole clusters.
    /// Needs compat 1.1 and clusters of at least 16 KiB, as in qemu-img.
    pub extended_l2: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            backing: None,
            backing_format: None,
            cluster_size: 64 * 1024,
            compat: Compat::V3,
            refcount_width: RefcountWidth::DEFAULT,
            extended_l2: false,
        }
    }
}

/// Resolves a backing file name the way QEMU does: relative names are
/// relative to the directory of the image that names them.
pub(crate) fn resolve_backing_path(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}

/// Format name by content: the qcow2 magic, else raw.
pub(crate) fn probe_format(file: &File, path: &str) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut f = file;
    let mut got = 0;
    while got < 4 {
        let n = f
            .read(&mut magic[got..])
            .map_err(|e| Error::io(e, format!("probing the format of {path}")))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(if got == 4 && u32::from_be_bytes(magic) == QCOW_MAGIC {
        "qcow2"
    } else {
        "raw"
    })
}

/// Creates (or overwrites, like qemu-img) a qcow2 image at `path`.
pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
    let path = path.as_ref();
    let path_s = path.display().to_string();
    let invalid =
        |m: String| Error::new(ErrorKind::InvalidInput, format!("creating {path_s}: {m}"));

    let cs = u64::from(opts.cluster_size);
    if !cs.is_power_of_two() || !((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cs) {
        return Err(invalid(format!(
            "cluster size {cs} must be a power of two from {} to {}",
            1u64 << MIN_CLUSTER_BITS,
            1u64 << MAX_CLUSTER_BITS
        )));
    }
    let cluster_bits = cs.trailing_zeros();

    let mut backing_format = opts.backing_format.clone();
    if let Some(fmt) = &backing_format {
        if fmt != "raw" && fmt != "qcow2" {
            return Err(Error::unsupported(format!(
                "creating {path_s}: backing format {fmt:?} (only raw and qcow2 are supported)"
            )));
        }
    }
    let mut size = opts.size;
    if let Some(backing) = &opts.backing {
        if backing.is_empty() {
            return Err(invalid("empty backing file name".into()));
        }
        let json = crate::backing::json::is_json_name(backing);
        let remote = !json && crate::backing::is_remote_name(backing);
        if json {
            // QEMU's options: checked now. The header keeps the name and
            // format as given: QEMU reads the options' own driver only when
            // it names none.
            crate::backing::json::resolve(backing, backing_format.as_deref(), &path_s)?;
        } else if remote && backing_format.is_none() {
            return Err(Error::unsupported(format!(
                "creating {path_s}: backing image {backing:?} is remote (NBD or HTTP), and \
                 formats are not probed over them: give its format (-F raw or -F qcow2)"
            )));
        }
        if json || remote {
            // The size comes through the chain: from the server, or from a
            // remote qcow2 image's header.
            if size.is_none() {
                let chain = crate::backing::Chain::open(path, backing, backing_format.as_deref())
                    .map_err(|e| e.context(format!("creating {path_s}")))?;
                size = Some(chain.size());
            }
        } else if size.is_none() || backing_format.is_none() {
            let bpath = resolve_backing_path(path, backing);
            let bname = bpath.display().to_string();
            let bfile = File::open(&bpath).map_err(|e| {
                Error::io(
                    e,
                    format!("creating {path_s}: opening backing file {bname}"),
                )
            })?;
            let fmt = match &backing_format {
                Some(f) => f.clone(),
                None => probe_format(&bfile, &bname)
                    .map_err(|e| e.context(format!("creating {path_s}")))?
                    .to_string(),
            };
            if size.is_none() {
                size = Some(if fmt == "qcow2" {
                    Header::read_from(&bfile, &bname)
                        .map_err(|e| e.context(format!("creating {path_s}")))?
                        .size
                } else {
                    crate::io::file_size(&bfile)
                        .map_err(|e| Error::io(e, format!("creating {path_s}: stat {bname}")))?
                });
            }
            backing_format = Some(fmt);
        }
    }
    let Some(size) = size else {
        return Err(invalid(
            "no size given and no backing file to take it from".into(),
        ));
    };
    // qemu-img rounds the size up to whole 512-byte sectors; QEMU's block
    // layer would truncate anything else.
    let size = size
        .checked_next_multiple_of(512)
        .filter(|s| *s <= i64::MAX as u64)
        .ok_or_else(|| invalid(format!("size {size} is too large")))?;
    if opts.extended_l2 {
        if opts.compat != Compat::V3 {
            return Err(invalid(
                "extended L2 entries need compat=1.1 (qcow2 version 3)".into(),
            ));
        }
        if cluster_bits < MIN_EXTL2_CLUSTER_BITS {
            return Err(invalid(format!(
                "extended L2 entries need a cluster size of at least {} bytes",
                1u64 << MIN_EXTL2_CLUSTER_BITS
            )));
        }
    }
    let l1_size = l1_entries_needed(size, cluster_bits, opts.extended_l2);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(invalid(format!(
            "size {size} is too large for {cs}-byte clusters (L1 table would exceed {} MiB; \
             try a larger cluster size)",
            MAX_L1_BYTES >> 20
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);

    // Find a layout whose refcount blocks cover every metadata cluster,
    // including themselves and the refcount table that points to them.
    let width = opts.refcount_width;
    if opts.compat == Compat::V2 && width != RefcountWidth::DEFAULT {
        return Err(invalid(format!(
            "compat 0.10 images have 16-bit refcounts, not {} (use compat 1.1)",
            width.bits()
        )));
    }
    let rb_entries = width.per_block(cs);
    let (mut rt_clusters, mut rb_count) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + rb_count + l1_clusters;
        let need_rb = total.div_ceil(rb_entries);
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb <= rb_count && need_rt <= rt_clusters {
            break;
        }
        rb_count = rb_count.max(need_rb);
        rt_clusters = rt_clusters.max(need_rt);
    }
    let rt_offset = cs;
    let rb_offset = rt_offset + rt_clusters * cs;
    let l1_offset = rb_offset + rb_count * cs;
    let total_clusters = 1 + rt_clusters + rb_count + l1_clusters;

    let mut extensions = Vec::new();
    if opts.compat == Compat::V3 {
        extensions.push(qemu_feature_table());
    }
    let header = Header {
        version: if opts.compat == Compat::V3 { 3 } else { 2 },
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        // QEMU leaves the L1 offset at 0 for an empty disk.
        l1_table_offset: if l1_size == 0 { 0 } else { l1_offset },
        refcount_table_offset: rt_offset,
        refcount_table_clusters: rt_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if opts.extended_l2 { INCOMPAT_EXTL2 } else { 0 },
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: width.order(),
        header_length: V3_HEADER_LEN,
        compression_type: 0,
        extensions,
        backing_file: opts.backing.clone(),
        backing_format: opts.backing.as_ref().and(backing_format),
    };
    let mut head = header
        .serialize()
        .map_err(|e| e.context(format!("creating {path_s}")))?;
    head.resize(cs as usize, 0);

    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    for i in 0..rb_count {
        let at = (i * 8) as usize;
        rt[at..at + 8].copy_from_slice(&(rb_offset + i * cs).to_be_bytes());
    }
    let mut rb = vec![0u8; (rb_count * cs) as usize];
    for c in 0..total_clusters {
        width.set(&mut rb, c as usize, 1);
    }

    if let Ok(meta) = std::fs::metadata(path) {
        crate::imagelock::refuse_block_device(&meta, &path_s)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(e, format!("creating {path_s}")))?;
    let write = |buf: &[u8], at: u64, what: &str| {
        file.write_all_at(buf, at)
            .map_err(|e| Error::io(e, format!("writing {what} at offset {at} of {path_s}")))
    };
    // The L1 table is all zeros: extending the file makes it sparse.
    file.set_len(total_clusters * cs)
        .map_err(|e| Error::io(e, format!("extending {path_s}")))?;
    write(&rt, rt_offset, "the refcount table")?;
    write(&rb, rb_offset, "refcount blocks")?;
    // The header goes last, so an interrupted create never leaves a file
    // that looks like a valid image with missing tables.
    write(&head, 0, "the header")?;
    file.sync_all()
        .map_err(|e| Error::io(e, format!("syncing {path_s}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::testutil::{qemu_check, qemu_img, tool_available};

    fn qemu_info(img: &Path) -> serde_json::Value {
        let out = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    #[test]
    fn compat_from_str() {
        assert_eq!("0.10".parse::<Compat>().unwrap(), Compat::V2);
        assert_eq!("v3".parse::<Compat>().unwrap(), Compat::V3);
        assert!("1.0".parse::<Compat>().is_err());
        assert_eq!(Compat::default(), Compat::V3);
    }

    #[test]
    fn refuses_bad_options() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.qcow2");
        let k = |o: CreateOptions| create(&p, &o).unwrap_err().kind();
        let base = CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        };
        for cs in [0, 512, 2048, 3 << 12, 4 << 20] {
            assert_eq!(
                k(CreateOptions {
                    cluster_size: cs,
                    ..base.clone()
                }),
                ErrorKind::InvalidInput
            );
        }
        assert_eq!(k(CreateOptions::default()), ErrorKind::InvalidInput);
        assert_eq!(
            k(CreateOptions {
                size: Some(u64::MAX - 3),
                ..base.clone()
            }),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            k(CreateOptions {
                size: Some(1 << 50),
                cluster_size: 4096,
                ..base.clone()
            }),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            k(CreateOptions {
                backing: Some("missing.raw".into()),
                size: None,
                ..base.clone()
            }),
            ErrorKind::Io
        );
    }

    #[test]
    fn matches_qemu_img_for_all_combinations() {
        if !tool_available("qemu-img") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, vec![0u8; 3 << 20]).unwrap();
        let q = dir.path().join("base.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            q.to_str().unwrap(),
            "5000000",
        ]);
        let mut n = 0;
        for cs in [4096u32, 65536, 2 << 20] {
            for compat in [Compat::V2, Compat::V3] {
                for backing in [
                    None,
                    Some(("base.raw", "raw", 3u64 << 20)),
                    Some(("base.qcow2", "qcow2", 5000192)),
                ] {
                    for size in [
                        None,
                        Some(0u64),
                        Some(12345),
                        Some(1 << 30),
                        Some((1 << 32) + 1000),
                    ] {
                        if size.is_none() && backing.is_none() {
                            continue;
                        }
                        n += 1;
                        let img = dir.path().join(format!("t{n}.qcow2"));
                        let opts = CreateOptions {
                            size,
                            backing: backing.map(|b| b.0.to_string()),
                            // Probe half the time.
                            backing_format: backing.filter(|_| n % 2 == 0).map(|b| b.1.to_string()),
                            cluster_size: cs,
                            compat,
                            ..CreateOptions::default()
                        };
                        create(&img, &opts).unwrap();
                        let (rc, text) = qemu_check(&img);
                        assert_eq!(rc, 0, "{opts:?}: {text}");
                        let info = qemu_info(&img);
                        let want_size = size
                            .map(|s| s.next_multiple_of(512))
                            .unwrap_or_else(|| backing.unwrap().2);
                        assert_eq!(info["virtual-size"], want_size, "{opts:?}");
                        assert_eq!(info["cluster-size"], cs, "{opts:?}");
                        assert_eq!(info["format"], "qcow2");
                        let compat_s = if compat == Compat::V3 { "1.1" } else { "0.10" };
                        assert_eq!(info["format-specific"]["data"]["compat"], compat_s);
                        if let Some((name, fmt, _)) = backing {
                            assert_eq!(info["backing-filename"], name, "{opts:?}");
                            assert_eq!(info["backing-filename-format"], fmt, "{opts:?}");
                        } else {
                            assert!(info.get("backing-filename").is_none());
                        }
                        // Our own parser and checker agree.
                        let report = crate::qcow2::check::check(&img).unwrap();
                        assert_eq!(report.exit_code(), 0, "{report}");
                    }
                }
            }
        }
    }

    #[test]
    fn large_l1_spanning_refcount_blocks() {
        if !tool_available("qemu-img") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("big.qcow2");
        // 4 KiB clusters, 8 TiB: a 32 MiB L1 table, 8192 clusters, more than
        // one refcount block (2048 entries) can count.
        let opts = CreateOptions {
            size: Some(8 << 40),
            cluster_size: 4096,
            ..Default::default()
        };
        create(&img, &opts).unwrap();
        let (rc, text) = qemu_check(&img);
        assert_eq!(rc, 0, "{text}");
        assert_eq!(crate::qcow2::check::check(&img).unwrap().exit_code(), 0);
    }
}
