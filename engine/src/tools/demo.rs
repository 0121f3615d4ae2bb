//! `backfill demo`: copy-on-read end to end, in a few seconds, on any machine.
//!
//! Steps: make a random backing image (with some all-zero regions), create a
//! qcow2 overlay on it, read the whole disk cold through the engine with many
//! requests in flight (every cluster is fetched from the backing file and
//! written into the overlay), read it again warm (nothing is fetched), close,
//! run `check` on the image, reopen it read-only and read it a third time
//! (still nothing fetched: the overlay now holds everything). Every pass
//! compares every byte with the backing file. When `qemu-img` is on PATH, its
//! `check` and `map` judge the image too.
//!
//! Any mismatch, any byte fetched when none should be, or an unclean check is
//! recorded in [`DemoReport::failures`]; errors from the engine are returned
//! as `Err`. The demo never changes anything outside its directory.

use crate::error::{Error, ErrorKind, Result};
use crate::tools::inflight::Queue;
use crate::tools::stats_delta;
use crate::tools::units::{format_size, mib_per_sec};
use crate::{CheckReport, Compat, CreateOptions, Disk, Options, Stats};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Default size of the demo disk.
pub const DEFAULT_SIZE_BYTES: u64 = 64 << 20;
/// Bytes per read request in each pass.
pub const CHUNK_BYTES: usize = 256 << 10;
/// Read requests in flight in each pass.
pub const DEPTH: usize = 32;
/// The backing image is made of regions this large, each random or zero.
const REGION_BYTES: u64 = 256 << 10;
/// One region in this many is left all zero (a hole in the backing file).
const ZERO_REGION_ONE_IN: u32 = 4;
const BACKING_NAME: &str = "base.raw";
const OVERLAY_NAME: &str = "disk.qcow2";

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where to put the images; a temporary directory (removed afterwards)
    /// when `None`.
    pub dir: Option<PathBuf>,
    /// Virtual size of the disk; a positive multiple of 512.
    pub size_bytes: u64,
    /// Reactor threads; `None` for the engine's default.
    pub cores: Option<usize>,
    /// Seed for the backing image's content; `None` picks one.
    pub seed: Option<u64>,
}

impl Default for DemoOptions {
    fn default() -> DemoOptions {
        DemoOptions {
            dir: None,
            size_bytes: DEFAULT_SIZE_BYTES,
            cores: None,
            seed: None,
        }
    }
}

/// One full read of the disk.
#[derive(Debug, Clone)]
pub struct Pass {
    /// From the first request to the last completion.
    pub elapsed: Duration,
    /// The flush after the reads (copy-on-read passes only): write-backs
    /// finish behind the reads, so the pass's counters are taken after it.
    pub flush: Option<Duration>,
    /// Engine counters over the pass.
    pub stats: Stats,
    /// Bytes that differed from the backing file.
    pub mismatched_bytes: u64,
    pub first_mismatch: Option<u64>,
}

/// What `qemu-img` said about the image, when it is installed.
#[derive(Debug, Clone)]
pub struct QemuVerdict {
    pub check_ok: bool,
    /// The last line of `qemu-img check` (its verdict).
    pub check_summary: String,
    /// From `qemu-img map --output=json`: bytes by where they live.
    pub map_overlay_data: u64,
    pub map_overlay_zero: u64,
    pub map_backing: u64,
    pub map_unallocated: u64,
}

/// Everything the demo did and saw.
#[derive(Debug)]
pub struct DemoReport {
    pub dir: PathBuf,
    /// False when the directory was temporary and is gone.
    pub kept: bool,
    pub seed: u64,
    pub size_bytes: u64,
    /// Bytes of the backing image left all zero.
    pub backing_zero_bytes: u64,
    pub cluster_bytes: u64,
    pub cold: Pass,
    pub warm: Pass,
    /// Read-only, after close and check.
    pub reopened: Pass,
    pub check: CheckReport,
    pub qemu: Option<QemuVerdict>,
    /// Empty when everything held.
    pub failures: Vec<String>,
}

impl DemoReport {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Runs the demo.
pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    if opts.size_bytes == 0 || !opts.size_bytes.is_multiple_of(512) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "demo size must be a positive multiple of 512 bytes, not {}",
                opts.size_bytes
            ),
        ));
    }
    let (temp, dir) = match &opts.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(e, format_args!("creating {}", dir.display())))?;
            let dir = dir
                .canonicalize()
                .map_err(|e| Error::io(e, format_args!("resolving {}", dir.display())))?;
            (None, dir)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("backfill-demo-")
                .tempdir()
                .map_err(|e| Error::io(e, "creating a temporary directory"))?;
            let dir = temp.path().to_path_buf();
            (Some(temp), dir)
        }
    };
    let seed = opts.seed.unwrap_or_else(rand::random);
    let report = run_in(&dir, seed, opts)?;
    let kept = temp.is_none();
    drop(temp);
    Ok(DemoReport { kept, ..report })
}

fn run_in(dir: &Path, seed: u64, opts: &DemoOptions) -> Result<DemoReport> {
    let backing_path = dir.join(BACKING_NAME);
    let overlay_path = dir.join(OVERLAY_NAME);
    let size = opts.size_bytes;
    let backing_zero_bytes = write_backing(&backing_path, size, seed)?;

    // The overlay must be new: stale data from an earlier run would be read
    // instead of the backing file's.
    match std::fs::remove_file(&overlay_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::io(
                e,
                format_args!("removing {}", overlay_path.display()),
            ))
        }
    }
    let create = CreateOptions {
        size: None,
        backing: Some(backing_path.display().to_string()),
        backing_format: Some("raw".into()),
        cluster_size: crate::tools::create::DEFAULT_CLUSTER_BYTES,
        compat: Compat::V3,
        ..CreateOptions::default()
    };
    crate::create(&overlay_path, &create)
        .map_err(|e| e.context(format_args!("creating {}", overlay_path.display())))?;

    let backing = File::open(&backing_path)
        .map_err(|e| Error::io(e, format_args!("opening {}", backing_path.display())))?;
    let mut failures = Vec::new();

    let mut disk_opts = Options {
        copy_on_read: true,
        ..Options::default()
    };
    if let Some(cores) = opts.cores {
        disk_opts.cores = cores;
    }
    let disk = Disk::open(&overlay_path, disk_opts.clone())
        .map_err(|e| e.context(format_args!("opening {}", overlay_path.display())))?;
    if disk.size() != size {
        failures.push(format!(
            "the overlay's size is {} bytes, the backing file's {size}",
            disk.size()
        ));
    }
    let cluster_bytes = disk.cluster_size();
    let passes = read_pass(&disk, &backing, size, true).and_then(|cold| {
        let warm = read_pass(&disk, &backing, size, true)?;
        Ok((cold, warm))
    });
    let closed = disk.close();
    let (cold, warm) = passes?;
    closed.map_err(|e| e.context(format_args!("closing {}", overlay_path.display())))?;

    let check = crate::check(&overlay_path)
        .map_err(|e| e.context(format_args!("checking {}", overlay_path.display())))?;

    let reopened_opts = Options {
        copy_on_read: false,
        read_only: true,
        ..disk_opts
    };
    let disk = Disk::open(&overlay_path, reopened_opts)
        .map_err(|e| e.context(format_args!("reopening {}", overlay_path.display())))?;
    let pass = read_pass(&disk, &backing, size, false);
    let closed = disk.close();
    let reopened = pass?;
    closed.map_err(|e| e.context(format_args!("closing {}", overlay_path.display())))?;

    for (name, pass) in [("cold", &cold), ("warm", &warm), ("reopened", &reopened)] {
        if let Some(at) = pass.first_mismatch {
            failures.push(format!(
                "{name} read: {} bytes differ from {BACKING_NAME}, the first at offset {at}",
                pass.mismatched_bytes
            ));
        }
    }
    if warm.stats.bytes_fetched != 0 {
        failures.push(format!(
            "warm read fetched {} bytes from the backing file; copy-on-read should have left none to fetch",
            warm.stats.bytes_fetched
        ));
    }
    if reopened.stats.bytes_fetched != 0 {
        failures.push(format!(
            "after reopening, a read fetched {} bytes from the backing file; the overlay should hold everything",
            reopened.stats.bytes_fetched
        ));
    }
    if check.exit_code() != 0 {
        failures.push(format!("backfill check is not clean: {check}"));
    }
    let qemu = qemu_verdict(&overlay_path)?;
    if let Some(q) = &qemu {
        if !q.check_ok {
            failures.push(format!("qemu-img check is not clean: {}", q.check_summary));
        }
    }
    Ok(DemoReport {
        dir: dir.to_path_buf(),
        kept: true,
        seed,
        size_bytes: size,
        backing_zero_bytes,
        cluster_bytes,
        cold,
        warm,
        reopened,
        check,
        qemu,
        failures,
    })
}

/// Writes `size` bytes of seeded random data, leaving one region in
/// [`ZERO_REGION_ONE_IN`] as a hole (all zero). Returns the zero bytes.
fn write_backing(path: &Path, size: u64, seed: u64) -> Result<u64> {
    let err =
        |e: std::io::Error, what: &str| Error::io(e, format_args!("{what} {}", path.display()));
    let file = File::create(path).map_err(|e| err(e, "creating"))?;
    file.set_len(size).map_err(|e| err(e, "sizing"))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut region = vec![0u8; REGION_BYTES as usize];
    let mut zero_bytes = 0;
    let mut offset = 0;
    while offset < size {
        let len = REGION_BYTES.min(size - offset);
        if rng.random_ratio(1, ZERO_REGION_ONE_IN) {
            zero_bytes += len;
        } else {
            let buf = &mut region[..len as usize];
            rng.fill_bytes(buf);
            file.write_all_at(buf, offset)
                .map_err(|e| err(e, "writing"))?;
        }
        offset += len;
    }
    file.sync_all().map_err(|e| err(e, "syncing"))?;
    Ok(zero_bytes)
}

/// Reads the whole disk with [`DEPTH`] requests of [`CHUNK_BYTES`] in flight
/// and compares every chunk with the backing file; then flushes, if asked.
fn read_pass(disk: &Disk, backing: &File, size: u64, flush: bool) -> Result<Pass> {
    let before = disk.stats();
    let start = Instant::now();
    let mut queue = Queue::new(disk, DEPTH);
    let mut expected = vec![0u8; CHUNK_BYTES];
    let mut next_offset = 0u64;
    let mut mismatched_bytes = 0u64;
    let mut first_mismatch = None;
    let chunk = CHUNK_BYTES as u64;
    for slot in 0..DEPTH {
        if next_offset >= size {
            break;
        }
        let len = chunk.min(size - next_offset) as usize;
        let mut buf = Vec::with_capacity(CHUNK_BYTES);
        buf.resize(len, 0);
        queue.submit_read(slot, next_offset, buf);
        next_offset += len as u64;
    }
    while let Some(done) = queue.next_done() {
        let mut buf = match done.result {
            Ok(buf) => buf,
            Err(e) => {
                queue.drain();
                return Err(e.context(format_args!("reading at offset {}", done.offset)));
            }
        };
        let want = &mut expected[..buf.len()];
        if let Err(e) = backing.read_exact_at(want, done.offset) {
            queue.drain();
            return Err(Error::io(
                e,
                format_args!("reading {BACKING_NAME} at {}", done.offset),
            ));
        }
        if buf != *want {
            for (i, (got, want)) in buf.iter().zip(want.iter()).enumerate() {
                if got != want {
                    mismatched_bytes += 1;
                    let at = done.offset + i as u64;
                    first_mismatch = Some(first_mismatch.map_or(at, |first: u64| first.min(at)));
                }
            }
        }
        if next_offset < size {
            let len = chunk.min(size - next_offset) as usize;
            buf.resize(len, 0);
            queue.submit_read(done.slot, next_offset, buf);
            next_offset += len as u64;
        }
    }
    let elapsed = start.elapsed();
    let flush = if flush {
        let start = Instant::now();
        disk.flush().map_err(|e| e.context("flushing"))?;
        Some(start.elapsed())
    } else {
        None
    };
    Ok(Pass {
        elapsed,
        flush,
        stats: stats_delta(&before, &disk.stats()),
        mismatched_bytes,
        first_mismatch,
    })
}

/// Runs `qemu-img check` and `qemu-img map` when qemu-img is installed.
fn qemu_verdict(overlay: &Path) -> Result<Option<QemuVerdict>> {
    let check = match Command::new("qemu-img").arg("check").arg(overlay).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(e, "running qemu-img check")),
    };
    let check_summary = check_verdict(&String::from_utf8_lossy(&check.stdout));
    let map = Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(overlay)
        .output()
        .map_err(|e| Error::io(e, "running qemu-img map"))?;
    if !map.status.success() {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "qemu-img map failed: {}",
                String::from_utf8_lossy(&map.stderr).trim()
            ),
        ));
    }
    let mut verdict = QemuVerdict {
        check_ok: check.status.success(),
        check_summary,
        map_overlay_data: 0,
        map_overlay_zero: 0,
        map_backing: 0,
        map_unallocated: 0,
    };
    summarise_map(&map.stdout, &mut verdict)?;
    Ok(Some(verdict))
}

/// The verdict lines of `qemu-img check` ("No errors were found on the
/// image.", "2 leaked clusters were found on the image.", ...), else its
/// first line.
fn check_verdict(output: &str) -> String {
    let verdicts: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("were found"))
        .collect();
    if verdicts.is_empty() {
        output
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("(no output)")
            .to_owned()
    } else {
        verdicts.join(" ")
    }
}

/// Adds up `qemu-img map --output=json` extents by where they live.
fn summarise_map(json: &[u8], verdict: &mut QemuVerdict) -> Result<()> {
    let bad = |why: String| {
        Error::new(
            ErrorKind::Io,
            format!("unexpected qemu-img map output: {why}"),
        )
    };
    let extents: Vec<serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    for extent in &extents {
        let field = |name: &str| {
            extent
                .get(name)
                .ok_or_else(|| bad(format!("no '{name}' in {extent}")))
        };
        let length = field("length")?
            .as_u64()
            .ok_or_else(|| bad(format!("bad length in {extent}")))?;
        let depth = field("depth")?.as_u64().unwrap_or(0);
        let present = field("present")?.as_bool().unwrap_or(false);
        let data = field("data")?.as_bool().unwrap_or(false);
        let slot = if !present {
            &mut verdict.map_unallocated
        } else if depth > 0 {
            &mut verdict.map_backing
        } else if data {
            &mut verdict.map_overlay_data
        } else {
            &mut verdict.map_overlay_zero
        };
        *slot += length;
    }
    Ok(())
}

fn pass_line(f: &mut fmt::Formatter<'_>, name: &str, size: u64, pass: &Pass) -> fmt::Result {
    let secs = pass.elapsed.as_secs_f64();
    let s = &pass.stats;
    let flush = match pass.flush {
        Some(flush) => format!(" + flush {:.3} s", flush.as_secs_f64()),
        None => String::new(),
    };
    writeln!(
        f,
        "{name:<10} {} in {secs:.3} s ({:.1} MiB/s){flush}: {} clusters filled with data, {} with zeros, {} fetched, {} overlay hits, {} dedup hits",
        format_size(size),
        mib_per_sec(size, secs),
        s.cor_fills,
        s.cor_zero_fills,
        format_size(s.bytes_fetched),
        s.overlay_hits,
        s.dedup_hits,
    )
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = if self.kept {
            "kept"
        } else {
            "temporary, now removed"
        };
        writeln!(f, "directory: {} ({kept})", self.dir.display())?;
        writeln!(
            f,
            "backing:   {BACKING_NAME}, {} of random data (seed {}), {} of it in all-zero regions",
            format_size(self.size_bytes),
            self.seed,
            format_size(self.backing_zero_bytes)
        )?;
        writeln!(
            f,
            "overlay:   {OVERLAY_NAME}, qcow2 on {BACKING_NAME}, {} clusters, created empty",
            format_size(self.cluster_bytes)
        )?;
        writeln!(
            f,
            "reads:     {} requests of {} in flight, every byte compared with {BACKING_NAME}",
            DEPTH,
            format_size(CHUNK_BYTES as u64)
        )?;
        pass_line(f, "cold", self.size_bytes, &self.cold)?;
        pass_line(f, "warm", self.size_bytes, &self.warm)?;
        pass_line(f, "reopened", self.size_bytes, &self.reopened)?;
        let check = self.check.to_string();
        writeln!(
            f,
            "backfill check: {} ({}/{} clusters allocated)",
            check.lines().next().unwrap_or("").trim(),
            self.check.allocated_clusters,
            self.check.total_clusters
        )?;
        if let Some(q) = &self.qemu {
            writeln!(f, "qemu-img check: {}", q.check_summary)?;
            writeln!(
                f,
                "qemu-img map: {} data and {} zero in the overlay, {} still in the backing file, {} unallocated",
                format_size(q.map_overlay_data),
                format_size(q.map_overlay_zero),
                format_size(q.map_backing),
                format_size(q.map_unallocated)
            )?;
        } else {
            writeln!(
                f,
                "qemu-img: not installed, so only backfill's own check judged the image"
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "What happened: the cold read fetched each cluster from {BACKING_NAME}, answered it, and wrote it into {OVERLAY_NAME} (copy-on-read; all-zero clusters are recorded as zero, not copied)."
        )?;
        writeln!(
            f,
            "The warm read and the read after reopening were served by the overlay alone: the overlay no longer needs its backing file for any byte it has read."
        )?;
        if self.ok() {
            write!(f, "Result: OK, every byte matched and the image is clean.")
        } else {
            writeln!(f, "Result: FAILED")?;
            for failure in &self.failures {
                writeln!(f, "  - {failure}")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::is_zero;

    #[test]
    fn backing_has_data_and_zero_regions_and_is_replayable() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.raw");
        let b = dir.path().join("b.raw");
        let size = 4 << 20;
        let zeros = write_backing(&a, size, 7).unwrap();
        assert_eq!(write_backing(&b, size, 7).unwrap(), zeros);
        let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        assert_eq!(a.len() as u64, size);
        assert_eq!(a, b, "same seed, same image");
        let counted: u64 = a
            .chunks(REGION_BYTES as usize)
            .filter(|r| is_zero(r))
            .map(|r| r.len() as u64)
            .sum();
        assert_eq!(counted, zeros);
        assert!(zeros > 0 && zeros < size, "16 regions: some zero, some not");
    }

    #[test]
    fn map_summary_adds_extents_by_place() {
        let json = br#"[
            {"start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680},
            {"start": 65536, "length": 131072, "depth": 0, "present": true, "zero": true, "data": false, "compressed": false},
            {"start": 196608, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "compressed": false, "offset": 196608},
            {"start": 262144, "length": 4096, "depth": 1, "present": false, "zero": true, "data": false, "compressed": false}
        ]"#;
        let mut v = QemuVerdict {
            check_ok: true,
            check_summary: String::new(),
            map_overlay_data: 0,
            map_overlay_zero: 0,
            map_backing: 0,
            map_unallocated: 0,
        };
        summarise_map(json, &mut v).unwrap();
        assert_eq!(
            (
                v.map_overlay_data,
                v.map_overlay_zero,
                v.map_backing,
                v.map_unallocated
            ),
            (65536, 131072, 65536, 4096)
        );
        assert!(summarise_map(b"not json", &mut v).is_err());
        assert!(summarise_map(br#"[{"start": 0}]"#, &mut v).is_err());
    }

    #[test]
    fn check_verdict_is_the_verdict_line() {
        let clean = "No errors were found on the image.\n768/1024 = 75.00% allocated\nImage end offset: 58785792\n";
        assert_eq!(check_verdict(clean), "No errors were found on the image.");
        let leaky = "Leaked cluster 0 refcount=2 reference=1\n\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n";
        assert_eq!(
            check_verdict(leaky),
            "1 leaked clusters were found on the image."
        );
        assert_eq!(
            check_verdict("\nqemu-img: Could not open\n"),
            "qemu-img: Could not open"
        );
        assert_eq!(check_verdict(""), "(no output)");
    }

    #[test]
    fn sizes_that_are_not_sector_multiples_are_refused() {
        for size_bytes in [0, 1000] {
            let opts = DemoOptions {
                size_bytes,
                ..DemoOptions::default()
            };
            assert_eq!(run(&opts).unwrap_err().kind(), ErrorKind::InvalidInput);
        }
    }
}
