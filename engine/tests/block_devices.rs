//! Backing images on block devices (an LVM volume, a partition, here a
//! loop device over a file): stat(2) gives a block device a length of 0,
//! so its size must come from the device itself, or a raw backing device
//! reads as zeros, and a stream drops it after copying nothing but zeros.
//!
//! * `backing_images_on_block_devices`: a raw base and a qcow2 middle
//!   layer, each attached read-only to a loop device (`losetup`) and named
//!   by the device in an overlay's header (`qemu-img create -b /dev/loopN`).
//!   `backfill info` gives the devices' sizes, `backfill create` sizes an
//!   overlay from a device, and `backfill stream` ends standalone, clean
//!   and identical to the base (`qemu-img compare`), or to the middle
//!   layer read by QEMU.
//!
//! * `overlays_on_block_devices_are_read_not_written`: a qcow2 overlay on a
//!   (writable) loop device converts to QEMU's bytes, `backfill info`
//!   finds its data, and it checks clean;
//!   `stream`, `resize` and `create` refuse it, naming the device, and
//!   leave it as it was. backfill takes new clusters from past the end of
//!   the image, which on a device holds old bytes, not zeros.
//!
//! Loop devices are attached with `losetup --find` (the kernel hands each
//! test its own) and detached when the test ends, even when it fails.

mod common;

use common::*;
use std::path::Path;

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    /// Attaches `file` to a free loop device, read-only or not.
    fn attach(file: &Path, read_only: bool) -> Loop {
        let file = path_str(file);
        let mut args = vec!["--find", "--show"];
        if read_only {
            args.push("--read-only");
        }
        args.push(&file);
        Loop(run_ok("losetup", args).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["--detach", &self.0])
            .status();
    }
}

/// `backfill stream overlay` to the end, then the checks every stream
/// ends with: standalone, clean, and every byte in the overlay.
fn stream_standalone(overlay: &Path) {
    let out = backfill_ok(&["stream", &path_str(overlay)]);
    assert!(out.contains("backing file dropped"), "{out}");
    assert_standalone(overlay);
    check_clean(overlay);
    assert_all_in_overlay(&qemu_map(overlay));
}

#[test]
fn backing_images_on_block_devices() {
    require_tool("losetup");
    let dir = tempdir("blockdev");
    let size = 6 * MIB + 512;
    let base = dir.path().join("base.raw");
    write_random_file(&base, size, seed_from_env("blockdev"));
    // The middle layer names the base by its absolute path: a relative
    // name would be relative to /dev once the layer is a device.
    let mid = dir.path().join("mid.qcow2");
    qemu_create_qcow2(&mid, "", Some((&path_str(&base), "raw")), None);
    qemu_io(
        &mid,
        "qcow2",
        &["write -P 0x5a 1M 512K".into(), "write -z 3M 64K".into()],
    );

    // A raw layer on a device.
    let base_dev = Loop::attach(&base, true);
    let overlay = dir.path().join("raw-dev.qcow2");
    qemu_create_qcow2(&overlay, "", Some((&base_dev.0, "raw")), None);
    assert_eq!(virtual_size(&overlay), size);
    let info = backfill_ok(&["info", &path_str(&overlay)]);
    let layer = format!("1: {}, raw, 6 MiB ({size} bytes)", base_dev.0);
    assert!(info.contains(&layer), "{layer}: {info}");
    stream_standalone(&overlay);
    compare_identical(&overlay, &base);

    // backfill create takes the overlay's size from the device.
    let made = dir.path().join("made.qcow2");
    backfill_ok(&["create", "-b", &base_dev.0, "-F", "raw", &path_str(&made)]);
    assert_eq!(virtual_size(&made), size);
    compare_identical(&made, &base);

    // A qcow2 layer on a device, over the base file.
    let mid_dev = Loop::attach(&mid, true);
    let overlay = dir.path().join("qcow2-dev.qcow2");
    qemu_create_qcow2(&overlay, "", Some((&mid_dev.0, "qcow2")), None);
    let info = backfill_ok(&["info", &path_str(&overlay)]);
    let layers = format!(
        "1: {}, qcow2, 6 MiB ({size} bytes)\n    2: {}, raw",
        mid_dev.0,
        path_str(&base)
    );
    assert!(info.contains(&layers), "{layers}: {info}");
    stream_standalone(&overlay);
    compare_same(&overlay, &mid, "qcow2");
    assert_zero_in_overlay(&qemu_map(&overlay), 3 * MIB, 64 * KIB);
}

#[test]
fn overlays_on_block_devices_are_read_not_written() {
    require_tool("losetup");
    let dir = tempdir("blockdev-ov");
    let base = dir.path().join("base.raw");
    let size = 4 * MIB;
    write_random_file(&base, size, seed_from_env("blockdev-ov"));
    let file = dir.path().join("overlay.qcow2");
    qemu_create_qcow2(&file, "", Some((&path_str(&base), "raw")), None);
    qemu_io(&file, "qcow2", &["write -P 0x11 64K 128K".into()]);
    let expected = raw_contents(&file);
    let before = read_file(&file);
    // Attached writable: what refuses the writes is backfill, not the device.
    let dev = Loop::attach(&file, false);

    let out = dir.path().join("out.raw");
    backfill_ok(&["convert", &dev.0, &path_str(&out)]);
    assert_same_bytes(
        &read_file(&out),
        &expected,
        "convert of the overlay on a device",
    );
    let info = backfill_ok(&["info", &dev.0]);
    assert!(
        info.contains("overlay data: 128 KiB (131072 bytes"),
        "{info}"
    );
    let check = backfill_ok(&["check", &dev.0]);
    assert!(check.contains("No errors were found"), "{check}");

    let why = format!(
        "{} is a block device: backfill writes qcow2 images in files only",
        dev.0
    );
    let base_s = path_str(&base);
    for args in [
        vec!["stream", dev.0.as_str()],
        vec!["resize", dev.0.as_str(), "8M"],
        vec!["create", "-b", base_s.as_str(), "-F", "raw", dev.0.as_str()],
    ] {
        let out = backfill_output(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(&why), "{args:?}: {err}");
    }
    drop(dev);
    assert!(
        read_file(&file) == before,
        "the refused writers changed the image"
    );
}
