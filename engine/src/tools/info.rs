//! `backfill info`: an [`ImageInfo`] rendered for people, like `qemu-img info`.
//!
//! The JSON form (`--json`) is the struct's own serialisation; this module
//! only produces the human text, which adds one section qemu-img does not
//! have: where the disk's bytes live (overlay data, overlay zeros, backing
//! chain, nowhere).

use crate::tools::units::format_size;
use crate::ImageInfo;
use std::fmt::Write;

fn size_line(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", format_size(bytes))
}

/// A share of the virtual size, as a percentage; zero for an empty disk.
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// The human form of `info`, ending in a newline.
pub fn render(info: &ImageInfo) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = write_info(&mut out, info);
    out
}

fn write_info(out: &mut String, info: &ImageInfo) -> std::fmt::Result {
    writeln!(out, "image: {}", info.filename)?;
    writeln!(out, "file format: {}", info.format)?;
    writeln!(out, "virtual size: {}", size_line(info.virtual_size))?;
    writeln!(out, "disk size: {}", format_size(info.disk_size))?;
    writeln!(out, "cluster_size: {}", info.cluster_size)?;
    if let Some(backing) = &info.backing_file {
        writeln!(out, "backing file: {backing}")?;
        match (&info.backing_format, info.backing_chain.first()) {
            (Some(format), _) => writeln!(out, "backing file format: {format}")?,
            // Probed: what the chain found.
            (None, Some(layer)) => writeln!(out, "backing file format: {}", layer.format)?,
            (None, None) => {}
        }
    }
    writeln!(out, "Format specific information:")?;
    writeln!(out, "    compat: {}", info.compat)?;
    writeln!(out, "    refcount bits: {}", info.refcount_bits)?;
    if info.internal_snapshots > 0 {
        writeln!(
            out,
            "    internal snapshots: {} (opened read-only only)",
            info.internal_snapshots
        )?;
    }
    writeln!(out, "    dirty: {}", info.dirty)?;
    writeln!(out, "    corrupt: {}", info.corrupt)?;
    if info.extended_l2 {
        writeln!(out, "    extended l2: true")?;
    }
    if let Some(pin) = &info.remote_pin {
        let other = match info.backing_chain.first() {
            Some(b) if b.filename == pin.filename => String::new(),
            _ => format!(" (of {}, not the current backing file)", pin.filename),
        };
        writeln!(
            out,
            "    remote image pinned: {}, {} bytes{other}",
            pin.validator, pin.virtual_size
        )?;
    }
    if let Some(e) = &info.remote_pin_error {
        writeln!(out, "    remote image pin: unusable: {e}")?;
    }
    let whole = info.virtual_size;
    writeln!(out, "Allocation:")?;
    let mut parts = vec![
        ("overlay data", info.overlay_data_bytes),
        ("overlay zero", info.overlay_zero_bytes),
    ];
    if info.backing_error.is_some() {
        // Backing data or nowhere: the chain could not be asked.
        parts.push(("elsewhere", info.backing_bytes));
    } else {
        parts.push(("backing", info.backing_bytes));
        parts.push(("unallocated", info.unallocated_bytes));
    }
    for (label, bytes) in parts {
        writeln!(
            out,
            "    {:<13} {} ({bytes} bytes, {:.1}%)",
            format!("{label}:"),
            format_size(bytes),
            percent(bytes, whole)
        )?;
        if label != "backing" {
            continue;
        }
        match (info.backing_zero_bytes, &info.backing_zeros_unknown) {
            (0, Some(why)) => writeln!(
                out,
                "      zeros in it unknown ({why}): a stream fetches all of it"
            )?,
            (0, None) => {}
            (zeros, _) => {
                let remote = info
                    .backing_chain
                    .last()
                    .is_some_and(|l| crate::backing::is_remote_name(&l.filename));
                let by = if remote {
                    "zeros, by the backing server"
                } else {
                    "holes of the backing file"
                };
                writeln!(
                    out,
                    "      of which {by}: {} ({zeros} bytes)",
                    format_size(zeros)
                )?
            }
        }
    }
    if info.backing_error.is_some() || !info.backing_chain.is_empty() {
        // What `backfill stream` still has to fetch. Without the chain,
        // some of what the overlay lacks may be holes (nothing to fetch):
        // bounds only.
        let left = info.backing_bytes;
        let (least, most) = match info.backing_error {
            Some(_) => ("at least ", "at most "),
            None => ("", ""),
        };
        // Less than all of it where the backing holds zeros it need not
        // send, or compressed clusters.
        let fetch = if info.backing_fetch_bytes < left {
            format!(", {} of it to fetch", format_size(info.backing_fetch_bytes))
        } else {
            String::new()
        };
        writeln!(
            out,
            "Streaming: {least}{:.1}% populated ({most}{} still read from the backing chain{fetch})",
            percent(whole - left.min(whole), whole),
            format_size(left)
        )?;
    }
    if let Some(e) = &info.backing_error {
        writeln!(out, "Backing chain: unavailable: {e}")?;
    }
    if !info.backing_chain.is_empty() {
        writeln!(out, "Backing chain:")?;
        for (depth, backing) in info.backing_chain.iter().enumerate() {
            writeln!(
                out,
                "    {}: {}, {}, {}",
                depth + 1,
                backing.filename,
                backing.format,
                size_line(backing.virtual_size)
            )?;
        }
    }
    Ok(())
}
