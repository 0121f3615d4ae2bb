//! `backfill create`: qemu-img-style arguments turned into [`CreateOptions`].
//!
//! Accepts what `qemu-img create -f qcow2` accepts for the options this
//! engine supports: `-b`/`-F` for the backing file and its format, `-u`
//! (the backing file not opened), `-q`, a size with qemu suffixes, and
//! `-o key=value,...` with `cluster_size`, `compat`
//! (`0.10`/`1.1`, or `v2`/`v3`), `backing_file`, `backing_fmt` and `size`.
//! Anything else is refused rather than silently ignored.

use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::RefcountWidth;
use crate::tools::units::parse_size;
use crate::{Compat, CreateOptions};
use std::path::Path;

/// The default cluster size, as qemu-img's.
pub const DEFAULT_CLUSTER_BYTES: u32 = 65536;

/// `create`'s command-line arguments, before interpretation.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    /// `-f`: only `qcow2` is accepted.
    pub format: Option<String>,
    /// `-b`: the backing file, as it will be recorded in the header.
    pub backing: Option<String>,
    /// `-F`: the backing file's format (`raw` or `qcow2`).
    pub backing_format: Option<String>,
    /// `-o`: comma-separated `key=value` lists (the flag may repeat).
    pub options: Vec<String>,
    /// The size argument; without it the backing file's size is used.
    pub size: Option<String>,
    /// `-u`: the backing file is not opened (it may not exist yet), so the
    /// size and the backing format must be given, as qemu-img requires.
    pub unsafe_backing: bool,
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidInput, message)
}

/// Interprets the arguments. Later values win, as in qemu-img: `-o size=`
/// is overridden by the size argument, `-o backing_file=` by `-b`.
pub fn build_options(args: &CreateArgs) -> Result<CreateOptions> {
    match args.format.as_deref() {
        None | Some("qcow2") => {}
        Some(other) => {
            return Err(invalid(format!(
                "unsupported image format '{other}' (backfill creates qcow2 only)"
            )))
        }
    }
    let mut opts = CreateOptions {
        size: None,
        backing: None,
        backing_format: None,
        cluster_size: DEFAULT_CLUSTER_BYTES,
        compat: Compat::V3,
        ..CreateOptions::default()
    };
    for list in &args.options {
        for item in list.split(',').filter(|item| !item.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| invalid(format!("invalid option '{item}': expected key=value")))?;
            match key {
                "cluster_size" => {
                    let bytes = parse_size(value)?;
                    opts.cluster_size = u32::try_from(bytes)
                        .map_err(|_| invalid(format!("cluster size {value} is too large")))?;
                }
                "compat" => opts.compat = parse_compat(value)?,
                "extended_l2" => opts.extended_l2 = parse_on_off(key, value)?,
                "backing_file" => opts.backing = Some(value.to_owned()),
                "backing_fmt" => opts.backing_format = Some(value.to_owned()),
                "size" => opts.size = Some(parse_size(value)?),
                "refcount_bits" => {
                    opts.refcount_width = value
                        .parse::<u64>()
                        .ok()
                        .and_then(RefcountWidth::from_bits)
                        .ok_or_else(|| {
                            invalid(format!(
                                "refcount_bits {value}: expected a power of two from 1 to 64"
                            ))
                        })?
                }
                _ => {
                    return Err(invalid(format!(
                        "invalid option '{key}' (supported: cluster_size, compat, backing_file, backing_fmt, size, refcount_bits, extended_l2)"
                    )))
                }
            }
        }
    }
    if let Some(backing) = &args.backing {
        opts.backing = Some(backing.clone());
    }
    if let Some(format) = &args.backing_format {
        opts.backing_format = Some(format.clone());
    }
    if let Some(size) = &args.size {
        opts.size = Some(parse_size(size)?);
    }
    if args.unsafe_backing && opts.backing.is_some() {
        if opts.size.is_none() {
            return Err(invalid(
                "-u: the backing file is not opened, so the image size must be given".into(),
            ));
        }
        if opts.backing_format.is_none() {
            return Err(invalid(
                "-u: the backing file is not opened, so its format must be given (-F raw or \
                 -F qcow2)"
                    .into(),
            ));
        }
    }
    if opts.size.is_none() && opts.backing.is_none() {
        return Err(invalid(
            "an image size is required when there is no backing file".into(),
        ));
    }
    Ok(opts)
}

/// A boolean option as qemu-img spells it: `on`/`off` (also `true`/`false`).
fn parse_on_off(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(invalid(format!(
            "invalid value '{value}' for option '{key}' (expected on or off)"
        ))),
    }
}

/// `0.10`/`v2` or `1.1`/`v3`, as qemu-img's `compat` option.
pub fn parse_compat(value: &str) -> Result<Compat> {
    value.parse()
}

/// The qcow2 version string qemu-img shows for a compat level.
pub fn compat_name(compat: Compat) -> &'static str {
    match compat {
        Compat::V2 => "0.10",
        Compat::V3 => "1.1",
    }
}

/// The line qemu-img prints when it creates an image.
pub fn formatting_line(path: &Path, opts: &CreateOptions, size: Option<u64>) -> String {
    let mut line = format!(
        "Formatting '{}', fmt=qcow2 cluster_size={} compat={}",
        path.display(),
        opts.cluster_size,
        compat_name(opts.compat)
    );
    if opts.extended_l2 {
        line.push_str(" extended_l2=on");
    }
    if let Some(size) = size.or(opts.size) {
        line.push_str(&format!(" size={size}"));
    }
    if let Some(backing) = &opts.backing {
        line.push_str(&format!(" backing_file={backing}"));
    }
    if let Some(format) = &opts.backing_format {
        line.push_str(&format!(" backing_fmt={format}"));
    }
    line
}

/// Creates the image and returns the line to print.
pub fn create_image(path: &Path, args: &CreateArgs) -> Result<String> {
    let opts = build_options(args)?;
    // The library's errors name the image already.
    crate::create(path, &opts)?;
    // Without a size argument the size came from the backing file: ask the
    // image, so the line says what was made.
    let size = match opts.size {
        Some(size) => Some(size),
        None => crate::info(path).ok().map(|info| info.virtual_size),
    };
    Ok(formatting_line(path, &opts, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(options: &[&str], size: Option<&str>) -> CreateArgs {
        CreateArgs {
            format: Some("qcow2".into()),
            backing: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            options: options.iter().map(|s| s.to_string()).collect(),
            size: size.map(str::to_owned),
            unsafe_backing: false,
        }
    }

    #[test]
    fn defaults_are_qemu_img_defaults() {
        let opts = build_options(&args(&[], None)).unwrap();
        assert_eq!(opts.cluster_size, 65536);
        assert_eq!(opts.compat, Compat::V3);
        assert_eq!(opts.size, None);
        assert_eq!(opts.backing.as_deref(), Some("base.raw"));
        assert_eq!(opts.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn dash_o_options_and_size_suffixes() {
        let opts =
            build_options(&args(&["cluster_size=64K,compat=0.10", "size=1M"], None)).unwrap();
        assert_eq!(opts.cluster_size, 65536);
        assert_eq!(opts.compat, Compat::V2);
        assert_eq!(opts.size, Some(1 << 20));
        // The size argument wins over -o size=.
        let opts = build_options(&args(&["size=1M", "compat=1.1"], Some("10G"))).unwrap();
        assert_eq!(opts.size, Some(10 << 30));
        assert_eq!(opts.compat, Compat::V3);
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let mut bad_format = args(&[], None);
        bad_format.format = Some("vmdk".into());
        assert!(build_options(&bad_format).is_err());
        assert!(build_options(&args(&["lazy_refcounts=on"], None)).is_err());
        assert!(build_options(&args(&["compat=1.0"], None)).is_err());
        let opts = build_options(&args(&["extended_l2=on,cluster_size=2M"], None)).unwrap();
        assert!(opts.extended_l2);
        assert!(
            !build_options(&args(&["extended_l2=off"], None))
                .unwrap()
                .extended_l2
        );
        assert!(build_options(&args(&["extended_l2=yes"], None)).is_err());
        assert!(build_options(&args(&["cluster_size"], None)).is_err());
        assert!(build_options(&args(&[], Some("12Q"))).is_err());
        let no_size = CreateArgs::default();
        assert!(build_options(&no_size).is_err());
    }

    #[test]
    fn unsafe_backing_needs_a_size_and_a_format() {
        let mut u = args(&[], Some("1G"));
        u.unsafe_backing = true;
        assert_eq!(build_options(&u).unwrap().size, Some(1 << 30));
        u.size = None;
        let e = build_options(&u).unwrap_err();
        assert!(e.message().contains("the image size must be given"), "{e}");
        u.size = Some("1G".into());
        u.backing_format = None;
        let e = build_options(&u).unwrap_err();
        assert!(e.message().contains("its format must be given"), "{e}");
        // Without a backing file there is nothing not to open.
        let alone = CreateArgs {
            size: Some("1M".into()),
            unsafe_backing: true,
            ..CreateArgs::default()
        };
        assert!(build_options(&alone).is_ok());
    }

    #[test]
    fn formatting_line_names_the_image() {
        let opts = build_options(&args(&[], Some("64M"))).unwrap();
        assert_eq!(
            formatting_line(Path::new("disk.qcow2"), &opts, None),
            "Formatting 'disk.qcow2', fmt=qcow2 cluster_size=65536 compat=1.1 size=67108864 backing_file=base.raw backing_fmt=raw"
        );
    }
}
