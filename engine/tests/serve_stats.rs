//! `backfill serve --stats SECS`: a line of counters on stderr every SECS
//! seconds. A client (`qemu-img convert` over NBD) reads the whole disk
//! once; the lines must then show every byte read, every byte fetched once
//! from the backing file (amplification 1.00 with cluster-aligned reads),
//! and the client's copy must equal the backing file. With `--stream`, the
//! lines carry the stream's progress while it runs.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};

/// The number in `(N bytes)` after `label` in a stats line.
fn bytes_after(line: &str, label: &str) -> u64 {
    let rest = &line[line
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} in {line}"))..];
    let open = rest.find('(').expect("(") + 1;
    let close = rest.find(" bytes)").expect(" bytes)");
    rest[open..close].parse().expect("a number")
}

/// `backfill serve --stats 1 [EXTRA...]` of a qemu-img overlay on `size`
/// bytes of seeded random data, once it printed its ready line.
struct Served {
    dir: tempfile::TempDir,
    base: PathBuf,
    bytes: Vec<u8>,
    image: PathBuf,
    uri: String,
    child: Child,
    stdout: BufReader<ChildStdout>,
    stderr: BufReader<ChildStderr>,
}

impl Served {
    fn start(prefix: &str, size: u64, seed: u64, extra: &[&str]) -> Served {
        require_tool("qemu-img");
        let dir = tempdir(prefix);
        let base = join(dir.path(), "base.raw");
        let bytes = write_random_file(&base, size, seed);
        let image = join(dir.path(), "ov.qcow2");
        qemu_create_qcow2(&image, "", Some(("base.raw", "raw")), None);
        let sock = join(dir.path(), "s.sock");
        let mut child = Command::new(backfill_bin())
            .args(["serve", "--socket", &path_str(&sock), "--stats", "1"])
            .args(extra)
            .arg(&image)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting backfill serve");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut ready = String::new();
        stdout.read_line(&mut ready).unwrap();
        assert!(ready.starts_with("serving "), "{ready:?}");
        Served {
            uri: format!("nbd+unix:///?socket={}", sock.display()),
            dir,
            base,
            bytes,
            image,
            child,
            stdout,
            stderr,
        }
    }

    /// The next line on stderr (serve must not have ended).
    fn stderr_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.stderr.read_line(&mut line).unwrap();
        assert!(n > 0, "serve ended");
        line
    }

    /// SIGTERM: the server finishes what is in flight and closes clean.
    fn stop(&mut self) {
        let out = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
        check_clean(&self.image);
    }
}

/// A test that failed before `stop` leaves no server behind.
impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn serve_prints_counters_periodically() {
    let size = 4 * MIB;
    let mut s = Served::start("serve-stats", size, 31, &[]);
    let out = join(s.dir.path(), "out.raw");
    qemu_img(["convert", "-f", "raw", "-O", "raw", &s.uri, &path_str(&out)]);
    assert_same_bytes(&read_file(&out), &s.bytes, "the client's copy");

    // Lines come every second; the first one after the copy has it all.
    let line = loop {
        let line = s.stderr_line();
        if line.starts_with("stats: ") && bytes_after(&line, "read ") >= size {
            break line;
        }
    };
    assert_eq!(bytes_after(&line, "read "), size, "{line}");
    assert_eq!(bytes_after(&line, "fetched "), size, "{line}");
    assert!(line.contains("amplification 1.00"), "{line}");
    s.stop();
}

/// With `--stream`, the stats lines carry the stream's progress and rate
/// while it runs (`; stream: P% (DONE of TOTAL), RATE/s, limit L/s`), the
/// share never going back, and no more once it has finished; the finished
/// stream leaves the overlay standalone and equal to its base.
#[test]
fn stats_lines_carry_the_stream_while_it_runs() {
    // 12 MiB at 2 MiB/s: the stream runs for about 6 s, over several lines
    // (at least 2 are asserted, which leaves room for a slow machine).
    let mut s = Served::start("serve-stats-stream", 12 * MIB, 37, &["--stream=2M"]);
    let mut shares = Vec::new();
    loop {
        let l = s.stderr_line();
        assert!(!l.starts_with("stream: "), "a separate progress line: {l}");
        if !l.starts_with("stats: ") {
            continue;
        }
        let Some(at) = l.find("; stream: ") else {
            // A 6 s stream shows in the first lines (a bound, not a wait).
            assert!(!shares.is_empty(), "no stream in a stats line: {l}");
            break;
        };
        let part = &l[at + "; stream: ".len()..];
        assert!(part.contains(" of 12 MiB), "), "{l}");
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
    let mut line = String::new();
    s.stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("streamed "), "{line:?}");
    s.stop();
    assert_standalone(&s.image);
    compare_identical(&s.image, &s.base);
}
