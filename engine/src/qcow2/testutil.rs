//! Test helpers: running qemu-img / qemu-io as oracles.
//!
//! A test that needs a tool fails when the tool is missing under CI
//! (`CI=true`), and says out loud that it skips otherwise.

use crate::qcow2::header::{qemu_feature_table, Header, V3_HEADER_LEN};
use std::path::Path;
use std::process::{Command, Output};

/// True when `tool` can be run. Panics when it cannot and `CI` is set.
pub(crate) fn tool_available(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{tool} is required under CI but could not be run");
        }
        eprintln!("SKIPPING: {tool} is not installed");
    }
    ok
}

/// Runs a tool; panics with its stderr when it fails.
pub(crate) fn run(tool: &str, args: &[&str]) -> Output {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(crate) fn qemu_img(args: &[&str]) -> Output {
    run("qemu-img", args)
}

/// `qemu-img create -q -f qcow2 -o OPTS PATH SIZE`.
pub(crate) fn qemu_create(path: &Path, opts: &str, size: &str) {
    let path = path.to_str().expect("a UTF-8 path");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, path, size]);
}

/// `qemu-io -f <fmt> -c <cmd>...` on an image.
pub(crate) fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img.to_str().unwrap());
    let out = run("qemu-io", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io {args:?}: {text}"
    );
}

/// `qemu-img check` exit code and stdout (not asserting success).
pub(crate) fn qemu_check(img: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .expect("run qemu-img check");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A valid version 3 header (64 KiB clusters, 1 GiB, backed by
/// `base.raw`) for unit tests to start from.
pub(crate) fn sample_header() -> Header {
    Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: 16,
        size: 1 << 30,
        crypt_method: 0,
        l1_size: 2,
        l1_table_offset: 3 << 16,
        refcount_table_offset: 1 << 16,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: V3_HEADER_LEN,
        compression_type: 0,
        extensions: vec![qemu_feature_table()],
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
    }
}
