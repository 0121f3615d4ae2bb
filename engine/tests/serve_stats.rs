//! `backfill serve --stats SECS`: a line of counters on stderr every SECS
//! seconds. A client (`qemu-img convert` over NBD) reads the whole disk
//! once; the lines must then show every byte read, every byte fetched once
//! from the backing file (amplification 1.00 with cluster-aligned reads),
//! and the client's copy must equal the backing file.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The number in `(N bytes)` after `label` in a stats line.
fn bytes_after(line: &str, label: &str) -> u64 {
    let rest = &line[line
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} in {line}"))..];
    let open = rest.find('(').expect("(") + 1;
    let close = rest.find(" bytes)").expect(" bytes)");
    rest[open..close].parse().expect("a number")
}

#[test]
fn serve_prints_counters_periodically() {
    require_tool("qemu-img");
    let dir = tempdir("serve-stats");
    let size = 4 * MIB;
    let base = join(dir.path(), "base.raw");
    let bytes = write_random_file(&base, size, 31);
    let image = join(dir.path(), "ov.qcow2");
    qemu_create_qcow2(&image, "", Some(("base.raw", "raw")), None);
    let sock = join(dir.path(), "s.sock");
    let mut child = Command::new(backfill_bin())
        .args(["serve", "--socket", &path_str(&sock), "--stats", "1"])
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting backfill serve");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    stdout.read_line(&mut ready).unwrap();
    assert!(ready.starts_with("serving "), "{ready:?}");

    let out = join(dir.path(), "out.raw");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    qemu_img(["convert", "-f", "raw", "-O", "raw", &uri, &path_str(&out)]);
    assert_same_bytes(&read_file(&out), &bytes, "the client's copy");

    // Lines come every second; the first one after the copy has it all.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let line = loop {
        let mut line = String::new();
        let n = stderr.read_line(&mut line).unwrap();
        assert!(n > 0, "serve ended without a stats line showing the copy");
        if line.starts_with("stats: ") && bytes_after(&line, "read ") >= size {
            break line;
        }
    };
    assert_eq!(bytes_after(&line, "read "), size, "{line}");
    assert_eq!(bytes_after(&line, "fetched "), size, "{line}");
    assert!(line.contains("amplification 1.00"), "{line}");

    send_sigterm(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    check_clean(&image);
}

fn send_sigterm(pid: u32) {
    // SIGTERM: the server finishes what is in flight and closes clean.
    let out = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
