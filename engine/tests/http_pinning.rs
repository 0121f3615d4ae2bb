//! The HTTP backing's validator pinned in the overlay (issue 5: "the
//! image's ETag or Last-Modified pinned when the overlay first uses it and
//! checked on every response, so a changed remote image is a clear error,
//! never mixed data"), across runs: `qcow2::pin`.
//!
//! Oracles: nginx on loopback as the server (its ETag is the file's
//! modification time and size), `qemu-img check`, `qemu-img compare`
//! against the base file, `qemu-img info`, qemu-img's own header rewrites
//! (resize, amend, rebase -u), and the overlay's bytes compared before and
//! after a refused open.
//!
//! * `stream_after_the_image_changed_between_runs_fails`: a stream is
//!   cancelled after 2 MiB; the file under nginx is replaced; `backfill
//!   stream` and every open (writable or read-only) fail naming the URL
//!   and both validators, and the overlay is byte for byte unchanged and
//!   checks clean. With the original file back, `backfill stream` finishes:
//!   identical to the base, standalone, and the pin is gone.
//! * `copy_on_read_after_the_image_changed_between_runs_fails`: the same for
//!   plain copy-on-read reads across a reopen.
//! * `qemu_keeps_the_pin_and_a_rebase_replaces_it`: with the pin present
//!   `qemu-img check` and `info` are fine; after `qemu-img resize` and
//!   `qemu-img amend` rewrote the header the pin is still there and still
//!   enforced; after `qemu-img rebase -u` onto another URL the old pin no
//!   longer applies and the next writable open pins the new URL.
//! * `last_modified_is_pinned_without_etags`: nginx with `etag off;`:
//!   Last-Modified is pinned, and a newer file is refused the same way.
//! * `malformed_pins_are_refused`: a pin with broken fields, or a length
//!   running past the header area, is a clear `Corrupt` error, never a
//!   panic, and nothing is written.
//! * `check_reports_a_malformed_pin_and_repair_removes_it`: `backfill check`
//!   counts a malformed (or doubled) pin as corruption (exit 2) while
//!   `qemu-img check`, which ignores the extension, stays clean, and
//!   `backfill info` still describes the image and names the problem; `backfill
//!   check --repair` changes exactly the pin's 8 type-and-length bytes into
//!   an end marker, after which `qemu-img info` still names the URL, `qemu-img
//!   compare` says identical to the base, and the next writable open pins the
//!   server's version again.
//!
//! Synchronisation is by observation only (nginx is ready once it accepts
//! connections; a stream is midway once its progress says so).

mod common;
#[path = "common/nginx.rs"]
mod nginx_common;

use backfill::backing::http::Validator;
use backfill::qcow2::pin::{stored_pin, EXT_REMOTE_PIN};
use backfill::qcow2::Header;
use backfill::{Disk, ErrorKind, StreamEnd, StreamOptions, StreamState};
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SIZE: u64 = 8 * MIB;

/// A random base image under nginx's root, and an overlay on its URL.
struct Setup {
    dir: tempfile::TempDir,
    base: PathBuf,
    original: Vec<u8>,
    overlay: PathBuf,
    url: String,
}

impl Setup {
    /// The server must be declared after the setup (dropped first).
    fn new(prefix: &str) -> (Setup, nginx_common::Nginx) {
        Setup::with_server(prefix, "")
    }

    /// Like [`Setup::new`], with `server_extra` in nginx's server block.
    fn with_server(prefix: &str, server_extra: &str) -> (Setup, nginx_common::Nginx) {
        let dir = tempdir(prefix);
        let www = dir.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        let base = www.join("base.raw");
        let original = write_random_file(&base, SIZE, seed_from_env(prefix));
        let nginx = nginx_common::Nginx::start(&dir.path().join("nginx"), &www, server_extra, None);
        let url = nginx.url("base.raw");
        let overlay = dir.path().join("overlay.qcow2");
        qemu_create_qcow2(&overlay, "", Some((&url, "raw")), None);
        let s = Setup {
            dir,
            base,
            original,
            overlay,
            url,
        };
        (s, nginx)
    }

    /// Replaces the file under nginx by other bytes of the same size, an
    /// hour newer (another ETag and Last-Modified). The original is kept
    /// aside, with its modification time, for [`Setup::restore`].
    fn replace(&self) {
        let saved = self.dir.path().join("original.raw");
        std::fs::rename(&self.base, &saved).unwrap();
        let new = self.base.with_extension("new");
        write_random_file(&new, SIZE, 0x5eed);
        let later =
            std::fs::metadata(&saved).unwrap().modified().unwrap() + Duration::from_secs(3600);
        set_mtime(&new, later);
        std::fs::rename(&new, &self.base).unwrap();
    }

    /// Puts the original file (same bytes, same modification time, so the
    /// same ETag) back under nginx.
    fn restore(&self) {
        std::fs::rename(self.dir.path().join("original.raw"), &self.base).unwrap();
    }

    fn pin(&self) -> Option<backfill::qcow2::pin::Pin> {
        let h = read_header(&self.overlay);
        stored_pin(&h, "t").expect("a well-formed pin")
    }
}

fn set_mtime(path: &Path, t: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn read_header(image: &Path) -> Header {
    let f = std::fs::File::open(image).unwrap();
    Header::read_from(&f, &path_str(image)).expect("the header parses")
}

/// Every open of the overlay (writable with and without copy-on-read,
/// read-only) fails at open with a clear "changed" error naming the URL.
#[track_caller]
fn assert_every_open_refused(s: &Setup) {
    for (cor, ro) in [(true, false), (false, false), (false, true)] {
        let e = Disk::open(&s.overlay, options(1, cor, ro))
            .err()
            .unwrap_or_else(|| panic!("open (cor {cor}, read-only {ro}) of a changed image"));
        assert_eq!(e.kind(), ErrorKind::BackingChanged, "{e}");
        let m = e.to_string();
        assert!(
            m.contains("changed") && m.contains(&s.url) && m.contains("pinned "),
            "{m}"
        );
    }
}

#[test]
fn stream_after_the_image_changed_between_runs_fails() {
    let (s, nginx) = Setup::new("pin-stream");
    let disk = open(&s.overlay, options(2, true, false));
    let pin = s.pin().expect("the first writable open pins the image");
    assert_eq!(pin.name, s.url);
    assert_eq!(pin.size, SIZE);
    let st = disk
        .stream(StreamOptions {
            rate_bytes_per_sec: Some(4 * MIB),
            ..StreamOptions::default()
        })
        .unwrap();
    let p = st.wait_until(|p| p.populated_bytes >= 2 * MIB);
    assert_eq!(p.state, StreamState::Running, "{p:?}");
    st.cancel();
    assert_eq!(st.wait().unwrap(), StreamEnd::Cancelled);
    disk.close().unwrap();
    check_clean(&s.overlay);
    let before = read_file(&s.overlay);

    s.replace();
    let out = backfill_output(&["stream", &path_str(&s.overlay)]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("changed") && err.contains(&s.url) && err.contains(&pin.validator.to_string()),
        "{err}"
    );
    assert_every_open_refused(&s);
    assert!(
        read_file(&s.overlay) == before,
        "a refused open changed the overlay"
    );
    check_clean(&s.overlay);

    // The original back under the same URL: the stream finishes.
    s.restore();
    let out = backfill_ok(&["stream", &path_str(&s.overlay)]);
    assert!(out.contains("backing file dropped"), "{out}");
    drop(nginx);
    assert_standalone(&s.overlay);
    check_clean(&s.overlay);
    compare_with_bytes(&s.overlay, &s.original, s.dir.path());
    assert!(
        read_header(&s.overlay)
            .extensions
            .iter()
            .all(|e| e.kind != EXT_REMOTE_PIN),
        "the pin went with the backing reference"
    );
}

#[test]
fn copy_on_read_after_the_image_changed_between_runs_fails() {
    let (s, nginx) = Setup::new("pin-cor");
    let disk = open(&s.overlay, options(1, true, false));
    let mut buf = vec![0u8; MIB as usize];
    disk.read_at(&mut buf, 3 * MIB).unwrap();
    assert_same_bytes(
        &buf,
        &s.original[3 * MIB as usize..4 * MIB as usize],
        "read",
    );
    disk.close().unwrap();
    assert!(s.pin().is_some());
    let before = read_file(&s.overlay);

    // Unchanged: a reopen works and reads the same (from the overlay and
    // from the server).
    let disk = open(&s.overlay, options(1, true, false));
    let all = read_all(&disk, MIB);
    disk.close().unwrap();
    assert_same_bytes(&all, &s.original, "after a reopen");
    compare_with_bytes(&s.overlay, &s.original, s.dir.path());
    let populated = read_file(&s.overlay);
    assert!(populated != before);

    s.replace();
    assert_every_open_refused(&s);
    assert!(
        read_file(&s.overlay) == populated,
        "a refused open changed the overlay"
    );
    check_clean(&s.overlay);
    drop(nginx);
}

#[test]
fn qemu_keeps_the_pin_and_a_rebase_replaces_it() {
    let (s, nginx) = Setup::new("pin-qemu");
    open(&s.overlay, options(1, true, false)).close().unwrap();
    let pin = s.pin().expect("pinned");
    check_clean(&s.overlay);
    assert_eq!(info_json(&s.overlay)["backing-filename"], s.url.as_str());
    // `backfill info` shows what the overlay is pinned to.
    let shown = format!(
        "remote image pinned: {}, {} bytes\n",
        pin.validator, pin.size
    );
    let out = backfill_ok(&["info", &path_str(&s.overlay)]);
    assert!(out.contains(&shown), "{out}");

    // qemu rewrites the header; it keeps the unknown extension.
    let ov = path_str(&s.overlay);
    qemu_img(["resize", "-q", &ov, "+1M"]);
    assert_eq!(s.pin().as_ref(), Some(&pin), "after qemu-img resize");
    qemu_img(["amend", "-q", "-o", "lazy_refcounts=on", &ov]);
    assert_eq!(s.pin().as_ref(), Some(&pin), "after qemu-img amend");
    check_clean(&s.overlay);
    let disk = open(&s.overlay, options(1, true, false));
    let mut buf = vec![0u8; 64 * KIB as usize];
    disk.read_at(&mut buf, 0).unwrap();
    assert_same_bytes(&buf, &s.original[..buf.len()], "read after qemu's rewrites");
    disk.close().unwrap();
    s.replace();
    assert_every_open_refused(&s);
    s.restore();

    // Rebased (unsafe: the user asserts the contents are the same) onto
    // another URL: the old pin does not apply to it, and the next
    // writable open pins the new URL instead.
    let other = s.base.with_file_name("copy.raw");
    std::fs::copy(&s.base, &other).unwrap();
    let other_url = nginx.url("copy.raw");
    qemu_img(["rebase", "-q", "-u", "-b", &other_url, "-F", "raw", &ov]);
    assert_eq!(s.pin().as_ref(), Some(&pin), "qemu-img rebase -u keeps it");
    let out = backfill_ok(&["info", &ov]);
    let of_old = format!("(of {}, not the current backing file)", s.url);
    assert!(out.contains(&of_old), "{out}");
    s.replace(); // the old URL changes: irrelevant now
    let ro = open(&s.overlay, options(1, false, true));
    ro.close().unwrap();
    assert_eq!(
        s.pin().as_ref(),
        Some(&pin),
        "a read-only open never writes"
    );
    let disk = open(&s.overlay, options(1, true, false));
    disk.read_at(&mut buf, 0).unwrap();
    disk.close().unwrap();
    let new = s.pin().expect("pinned again");
    assert_eq!(new.name, other_url);
    assert_ne!(new, pin);
    check_clean(&s.overlay);
    let h = read_header(&s.overlay);
    assert_eq!(h.backing_file.as_deref(), Some(other_url.as_str()));
    assert_eq!(
        h.extensions
            .iter()
            .filter(|e| e.kind == EXT_REMOTE_PIN)
            .count(),
        1
    );
    drop(nginx);
}

/// A server without ETags: Last-Modified is what gets pinned, and what
/// tells the replaced file.
#[test]
fn last_modified_is_pinned_without_etags() {
    let (s, nginx) = Setup::with_server("pin-lastmod", "etag off;");
    let disk = open(&s.overlay, options(1, true, false));
    let mut buf = vec![0u8; 256 * KIB as usize];
    disk.read_at(&mut buf, MIB).unwrap();
    disk.close().unwrap();
    let pin = s.pin().expect("pinned");
    assert!(
        matches!(&pin.validator, Validator::LastModified(d) if d.ends_with(" GMT")),
        "{pin:?}"
    );
    open(&s.overlay, options(1, true, false)).close().unwrap();
    let before = read_file(&s.overlay);
    s.replace();
    assert_every_open_refused(&s);
    let e = Disk::open(&s.overlay, options(1, true, false))
        .err()
        .unwrap();
    assert!(e.to_string().contains("pinned Last-Modified"), "{e}");
    assert!(
        read_file(&s.overlay) == before,
        "a refused open changed the overlay"
    );
    check_clean(&s.overlay);
    drop(nginx);
}

/// The offset of the pin extension's type field in the header area.
fn pin_offset(bytes: &[u8]) -> usize {
    bytes[..64 * KIB as usize]
        .windows(4)
        .position(|w| w == EXT_REMOTE_PIN.to_be_bytes())
        .expect("a pin in the header")
}

#[test]
fn malformed_pins_are_refused() {
    let (s, nginx) = Setup::new("pin-hostile");
    open(&s.overlay, options(1, true, false)).close().unwrap();
    let good = read_file(&s.overlay);
    let at = pin_offset(&good);
    let cases: &[(&str, usize, &[u8])] = &[
        ("layout version", at + 8 + 3, &[9]),
        ("validator kind", at + 8 + 4, &[7]),
        ("name length past the data", at + 8 + 16, &[0xff, 0xff]),
        ("truncated data", at + 4, &24u32.to_be_bytes()),
        (
            "length past the header area",
            at + 4,
            &0x00ff_0000u32.to_be_bytes(),
        ),
    ];
    for (what, off, bytes) in cases {
        let mut bad = good.clone();
        bad[*off..*off + bytes.len()].copy_from_slice(bytes);
        write_file(&s.overlay, &bad);
        for ro in [false, true] {
            let e = Disk::open(&s.overlay, options(1, true, ro))
                .err()
                .unwrap_or_else(|| panic!("{what}: opened"));
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
            assert!(e.to_string().contains(&path_str(&s.overlay)), "{what}: {e}");
        }
        assert!(
            read_file(&s.overlay) == bad,
            "{what}: the overlay was written"
        );
    }
    drop(nginx);
}

#[test]
fn check_reports_a_malformed_pin_and_repair_removes_it() {
    let (s, nginx) = Setup::new("pin-repair");
    // Some data in the overlay first, so that the repair has data to keep.
    let disk = open(&s.overlay, options(1, true, false));
    let mut head = vec![0u8; MIB as usize];
    disk.read_at(&mut head, 0).unwrap();
    disk.close().unwrap();
    let pinned = s
        .pin()
        .expect("the first writable open pinned the server's version");
    let good = read_file(&s.overlay);
    let at = pin_offset(&good);
    let pin_len = u32::from_be_bytes(good[at + 4..at + 8].try_into().unwrap()) as usize;
    // A second pin after the first: the extension repeated, a new end
    // marker, and the backing name moved to 4 KiB (the header names it
    // there; zeros in between, as qcow2.rst wants).
    let h = read_header(&s.overlay);
    let (name_off, name_len) = (h.backing_file_offset as usize, h.backing_file_size as usize);
    let name = good[name_off..name_off + name_len].to_vec();
    let ext = good[at..at + 8 + pin_len.next_multiple_of(8)].to_vec();
    let after = at + ext.len();
    let mut doubled = good.clone();
    doubled[after..after + ext.len()].copy_from_slice(&ext);
    doubled[after + ext.len()..4096].fill(0);
    doubled[4096..4096 + name_len].copy_from_slice(&name);
    doubled[8..16].copy_from_slice(&4096u64.to_be_bytes());
    doubled[16..20].copy_from_slice(&(name_len as u32).to_be_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("layout version", {
            let mut b = good.clone();
            b[at + 8 + 3] = 9;
            b
        }),
        ("validator kind", {
            let mut b = good.clone();
            b[at + 8 + 4] = 7;
            b
        }),
        ("two pins", doubled),
    ];
    let overlay = path_str(&s.overlay);
    for (what, bad) in cases {
        write_file(&s.overlay, &bad);
        let out = backfill_output(&["check", &overlay]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{what}: {text}");
        assert!(text.contains("remote-image pin"), "{what}: {text}");
        // qemu-img ignores the extension: nothing wrong for it.
        check_clean(&s.overlay);
        // `backfill info` still describes the image, and says what is wrong.
        let info = backfill_ok(&["info", &overlay]);
        assert!(
            info.contains("remote image pin: unusable") && info.contains("check --repair"),
            "{what}: {info}"
        );

        let fixed = backfill_ok(&["check", "--repair", &overlay]);
        assert!(
            fixed.contains("Removed the malformed remote-image pin"),
            "{what}: {fixed}"
        );
        assert!(fixed.contains("No errors were found"), "{what}: {fixed}");
        let now = read_file(&s.overlay);
        let changed: Vec<usize> = (0..now.len()).filter(|&i| now[i] != bad[i]).collect();
        assert!(
            !changed.is_empty() && changed.iter().all(|&i| (at..at + 8).contains(&i)),
            "{what}: the repair wrote outside the pin's type and length: {changed:?}"
        );
        assert_eq!(now.len(), bad.len(), "{what}");
        assert_eq!(s.pin(), None, "{what}");
        check_clean(&s.overlay);
        assert_eq!(info_json(&s.overlay)["backing-filename"], s.url.as_str());
        compare_identical(&s.overlay, &s.base);

        // Usable again, and pinned again by the next writable open.
        open(&s.overlay, options(1, true, false)).close().unwrap();
        assert_eq!(s.pin().as_ref(), Some(&pinned), "{what}");
    }
    drop(nginx);
}
