//! backfill and QEMU's tools respect each other's image locks: no two
//! writers on one image, whichever opened it first.

mod common;

use backfill::{Disk, Options};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

fn qemu(tool: &str, args: &[&str]) -> std::process::Output {
    common::require_tool(tool);
    Command::new(tool)
        .args(args)
        .output()
        .expect("run qemu tool")
}

#[test]
fn qemu_tools_refuse_an_image_backfill_is_writing() {
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = d.path().join("img.qcow2");
    let imgs = img.to_str().unwrap();
    assert!(
        qemu("qemu-img", &["create", "-q", "-f", "qcow2", imgs, "16M"])
            .status
            .success()
    );
    let disk = Disk::open(&img, Options::default()).unwrap();
    disk.write_at(&[1u8; 4096], 0).unwrap();

    let out = qemu("qemu-io", &["-c", "write 0 4k", imgs]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("lock"),
        "qemu-io wrote beside backfill: {err}"
    );
    let out = qemu("qemu-img", &["check", imgs]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("lock"),
        "qemu-img check ran beside a writer: {err}"
    );
    // Forced sharing (-U) is the user's explicit choice, and works.
    assert!(qemu("qemu-img", &["info", "-U", imgs]).status.success());

    disk.close().unwrap();
    let out = qemu("qemu-img", &["check", imgs]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn backfill_refuses_an_image_qemu_is_writing() {
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = d.path().join("img.qcow2");
    let imgs = img.to_str().unwrap();
    assert!(
        qemu("qemu-img", &["create", "-q", "-f", "qcow2", imgs, "16M"])
            .status
            .success()
    );
    // An interactive qemu-io holds the image open read-write until it quits.
    let mut qio = Command::new("qemu-io")
        .arg(imgs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-io");
    let mut stdin = qio.stdin.take().unwrap();
    let mut stdout = BufReader::new(qio.stdout.take().unwrap());
    writeln!(stdin, "write -P 7 0 512").unwrap();
    stdin.flush().unwrap();
    // Its answer means it has the image open (and locked).
    let mut line = String::new();
    while !line.contains("wrote") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "qemu-io ended early"
        );
    }
    let e = Disk::open(&img, Options::default())
        .err()
        .expect("backfill opened a locked image");
    assert!(e.to_string().contains("lock"), "{e}");
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    assert!(qio.wait().unwrap().success());
    let disk = Disk::open(&img, Options::default()).expect("free again after qemu-io quit");
    let mut b = [0u8; 512];
    disk.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [7u8; 512]);
    disk.close().unwrap();
}
