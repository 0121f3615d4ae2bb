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

/// With `--stream`, the stats lines carry the stream's progress and rate
/// while it runs (`; stream: P% (DONE of TOTAL), RATE/s, limit L/s`), with
/// the share it reports growing, and no more once it has finished; the
/// finished stream leaves the overlay standalone and equal to its base.
#[test]
fn stats_lines_carry_the_stream_while_it_runs() {
    require_tool("qemu-img");
    let dir = tempdir("serve-stats-stream");
    let size = 8 * MIB;
    let base = join(dir.path(), "base.raw");
    write_random_file(&base, size, 37);
    let image = join(dir.path(), "ov.qcow2");
    qemu_create_qcow2(&image, "", Some(("base.raw", "raw")), None);
    let sock = join(dir.path(), "s.sock");
    // 2 MiB/s: the stream runs for about 4 s, over several stats lines.
    let mut child = Command::new(backfill_bin())
        .args(["serve", "--socket", &path_str(&sock), "--stats", "1"])
        .arg("--stream=2M")
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting backfill serve");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("serving "), "{line:?}");

    // Stats lines while the stream runs carry its progress; once it has
    // finished, they do not.
    let mut shares = Vec::new();
    loop {
        let mut l = String::new();
        assert!(stderr.read_line(&mut l).unwrap() > 0, "serve ended early");
        assert!(!l.starts_with("stream: "), "a separate progress line: {l}");
        if !l.starts_with("stats: ") {
            continue;
        }
        let Some(at) = l.find("; stream: ") else {
            // A 4 s stream shows in the first lines (a bound, not a wait).
            assert!(!shares.is_empty(), "no stream in a stats line: {l}");
            break;
        };
        let part = &l[at + "; stream: ".len()..];
        assert!(part.contains(" of 8 MiB), "), "{l}");
        assert!(part.trim_end().ends_with(", limit 2 MiB/s"), "{l}");
        let pct: f64 = part[..part.find('%').expect("%")].parse().expect("a share");
        assert!((0.0..100.0).contains(&pct), "{l}");
        shares.push(pct);
    }
    assert!(shares.len() >= 2, "{shares:?}");
    assert!(
        shares.windows(2).all(|w| w[0] <= w[1]),
        "the share went back: {shares:?}"
    );
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("streamed "), "{line:?}");
    send_sigterm(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    check_clean(&image);
    assert_standalone(&image);
    compare_identical(&image, &base);
}

fn send_sigterm(pid: u32) {
    // SIGTERM: the server finishes what is in flight and closes clean.
    let out = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
