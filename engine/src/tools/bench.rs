//! `backfill bench`: a request-rate benchmark modelled on `qemu-img bench`.
//!
//! It sends `count` requests of `request_bytes` each, keeping `depth` of them
//! in flight from one thread, at sequential offsets (`step_bytes` apart,
//! wrapping like qemu-img) or at uniformly random offsets aligned to the
//! request size (seeded; the seed is reported so a run can be replayed).
//! Writes use a fixed byte pattern (0xa5, as qemu-img bench does).
//!
//! The loop allocates nothing per request: `depth` buffers are made up front
//! and recycled through an [`inflight::Queue`](crate::tools::inflight::Queue).
//! Only the request loop is timed: opening and closing the disk are not.

use crate::error::{Error, ErrorKind, Result};
use crate::tools::stats_delta;
use crate::tools::units::mib_per_sec;
use crate::{CacheMode, Disk, Options, Stats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The byte `-w` writes, as in `qemu-img bench`.
pub const WRITE_PATTERN: u8 = 0xa5;

/// Where requests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pattern {
    /// `offset`, `offset + step`, ... wrapping before the end of the disk.
    #[default]
    Sequential,
    /// Uniformly random, aligned to the request size, within the disk.
    Random,
}

/// What to run. [`BenchOptions::default`] matches `qemu-img bench`'s defaults.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub count: u64,
    pub depth: usize,
    pub request_bytes: usize,
    /// Distance between sequential requests; `None` means `request_bytes`.
    pub step_bytes: Option<u64>,
    pub pattern: Pattern,
    pub write: bool,
    pub copy_on_read: bool,
    /// Reactor threads; `None` for the engine's default.
    pub cores: Option<usize>,
    pub cache: CacheMode,
    /// Where the first request goes (and the base of random offsets).
    pub offset: u64,
    /// Seed for `Pattern::Random`; `None` picks one (and reports it).
    pub seed: Option<u64>,
    /// Readahead window limit; `None` for the engine's default.
    pub readahead: Option<u64>,
    /// Write-back hold budget (`--writeback-hold SIZE`); `None` for the
    /// engine's default.
    pub writeback_hold: Option<u64>,
}

impl Default for BenchOptions {
    fn default() -> BenchOptions {
        BenchOptions {
            count: 75_000,
            depth: 64,
            request_bytes: 4096,
            step_bytes: None,
            pattern: Pattern::Sequential,
            write: false,
            copy_on_read: false,
            cores: None,
            cache: CacheMode::None,
            offset: 0,
            seed: None,
            readahead: None,
            writeback_hold: None,
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub count: u64,
    pub depth: usize,
    pub request_bytes: usize,
    pub step_bytes: u64,
    pub offset: u64,
    pub pattern: Pattern,
    /// The seed used (random pattern only).
    pub seed: Option<u64>,
    pub write: bool,
    pub copy_on_read: bool,
    pub disk_size: u64,
    /// Time from the first submission to the last completion.
    pub elapsed: Duration,
    /// Time the flush after the run took (untimed in `elapsed`, as
    /// `qemu-img bench` does not flush): write-backs still held or in
    /// flight when the last read returned. Zero without writes or
    /// copy-on-read.
    pub flushed: Duration,
    /// Engine counters over the run.
    pub stats: Stats,
}

impl BenchReport {
    /// The line `qemu-img bench` prints before it starts.
    pub fn start_line(&self) -> String {
        let kind = if self.write { "write" } else { "read" };
        match self.pattern {
            Pattern::Sequential => format!(
                "Sending {} {kind} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
                self.count, self.request_bytes, self.depth, self.offset, self.step_bytes
            ),
            Pattern::Random => format!(
                "Sending {} {kind} requests, {} bytes each, {} in parallel (random offsets from offset {}, seed {})",
                self.count,
                self.request_bytes,
                self.depth,
                self.offset,
                self.seed.unwrap_or_default()
            ),
        }
    }

    pub fn iops(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.count as f64 / secs
        } else {
            0.0
        }
    }

    pub fn mib_per_sec(&self) -> f64 {
        mib_per_sec(
            self.count * self.request_bytes as u64,
            self.elapsed.as_secs_f64(),
        )
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        writeln!(f, "{}", self.start_line())?;
        writeln!(
            f,
            "Run completed in {:.3} seconds.",
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "{:.0} IOPS, {:.1} MiB/s",
            self.iops(),
            self.mib_per_sec()
        )?;
        write!(
            f,
            "fills: {} data + {} zero, bytes fetched: {}, overlay hits: {}, dedup hits: {}, misses: {}, write-back errors: {}",
            s.cor_fills, s.cor_zero_fills, s.bytes_fetched, s.overlay_hits, s.dedup_hits, s.misses, s.writeback_errors
        )?;
        if s.writebacks_held_peak_bytes > 0 {
            write!(
                f,
                "\nwrite-backs held while remote reads continued: at most {} bytes; flushed {:.3} seconds after the run",
                s.writebacks_held_peak_bytes,
                self.flushed.as_secs_f64()
            )?;
        }
        if s.remote_reads > 0 {
            write!(
                f,
                "\nremote backing: {} reads, bytes: {}, errors: {}, latency mean {} us, max {} us",
                s.remote_reads,
                s.remote_bytes,
                s.remote_errors,
                s.remote_latency_us / s.remote_reads,
                s.remote_latency_max_us
            )?;
            if s.readahead_bytes > 0 {
                write!(
                    f,
                    ", readahead: {} bytes, {} reads answered from its buffers",
                    s.readahead_bytes, s.readahead_hits
                )?;
            }
        }
        Ok(())
    }
}

/// The offsets of a run, in order. Pure, so it is tested without a disk.
#[derive(Debug, Clone)]
pub struct Offsets {
    pattern: Pattern,
    next: u64,
    base: u64,
    step: u64,
    request: u64,
    disk_size: u64,
    /// Number of request-sized blocks from `base` to the end of the disk.
    blocks: u64,
    rng: StdRng,
}

impl Offsets {
    /// Checks the geometry and returns the generator.
    pub fn new(
        pattern: Pattern,
        base: u64,
        step: u64,
        request: u64,
        disk_size: u64,
        seed: u64,
    ) -> Result<Offsets> {
        let invalid = |m: String| Error::new(ErrorKind::InvalidInput, m);
        if request == 0 {
            return Err(invalid("request size must be at least 1 byte".into()));
        }
        if base.checked_add(request).is_none_or(|end| end > disk_size) {
            return Err(invalid(format!(
                "a {request}-byte request at offset {base} does not fit in the {disk_size}-byte disk"
            )));
        }
        Ok(Offsets {
            pattern,
            next: base,
            base,
            step,
            request,
            disk_size,
            blocks: (disk_size - base) / request,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// The offset of the next request.
    pub fn next_offset(&mut self) -> u64 {
        match self.pattern {
            Pattern::Sequential => {
                let offset = self.next;
                // As qemu-img bench: advance by the step, and wrap so that a
                // whole request always fits before the end of the disk.
                // (That wraps modulo `size - request`, so the last offset
                // that fits exactly is also skipped, and the base is not kept.)
                let limit = self.disk_size - self.request;
                self.next = match offset.checked_add(self.step) {
                    Some(n) if limit > 0 => n % limit,
                    _ => 0,
                };
                offset
            }
            Pattern::Random => self.base + self.rng.random_range(0..self.blocks) * self.request,
        }
    }
}

/// Runs the benchmark on the image at `path`.
pub fn run(path: &Path, opts: &BenchOptions) -> Result<BenchReport> {
    if opts.depth == 0 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "depth must be at least 1",
        ));
    }
    let mut disk_opts = Options {
        copy_on_read: opts.copy_on_read,
        // Plain reads never touch the image; open it so it cannot be.
        read_only: !opts.write && !opts.copy_on_read,
        cache: opts.cache,
        ..Options::default()
    };
    if let Some(cores) = opts.cores {
        disk_opts.cores = cores;
    }
    if let Some(bytes) = opts.readahead {
        disk_opts.readahead_max_bytes = bytes;
    }
    if let Some(bytes) = opts.writeback_hold {
        disk_opts.writeback_hold_bytes = bytes as usize;
    }
    let disk = Disk::open(path, disk_opts)
        .map_err(|e| e.context(format_args!("opening {}", path.display())))?;
    let result = run_on(&disk, opts);
    let closed = disk
        .close()
        .map_err(|e| e.context(format_args!("closing {}", path.display())));
    let report = result?;
    closed?;
    Ok(report)
}

fn run_on(disk: &Disk, opts: &BenchOptions) -> Result<BenchReport> {
    let request = opts.request_bytes as u64;
    let step = opts.step_bytes.unwrap_or(request);
    let seed = match opts.pattern {
        Pattern::Random => Some(opts.seed.unwrap_or_else(rand::random)),
        Pattern::Sequential => None,
    };
    let disk_size = disk.size();
    let offsets = Offsets::new(
        opts.pattern,
        opts.offset,
        step,
        request,
        disk_size,
        seed.unwrap_or_default(),
    )?;
    let fill = if opts.write { WRITE_PATTERN } else { 0 };
    let depth = opts
        .depth
        .min(usize::try_from(opts.count).unwrap_or(usize::MAX))
        .max(1);
    let buffers: Vec<Vec<u8>> = (0..depth).map(|_| vec![fill; opts.request_bytes]).collect();

    let before = disk.stats();
    let start = Instant::now();
    let driver = Arc::new(Driver {
        disk: disk.clone(),
        write: opts.write,
        count: opts.count,
        offsets: Mutex::new(offsets),
        submitted: AtomicU64::new(0),
        state: Mutex::new(DriverState::default()),
        done: Condvar::new(),
    });
    for buf in buffers {
        Driver::next(&driver, buf);
    }
    let failure = {
        let mut st = driver.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.finished < depth as u64 {
            st = driver.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.error.take()
    };
    if let Some((offset, e)) = failure {
        let what = if opts.write { "writing" } else { "reading" };
        return Err(e.context(format_args!("{what} at offset {offset}")));
    }
    let elapsed = start.elapsed();
    let flushed = if opts.write || opts.copy_on_read {
        // Untimed, as qemu-img bench does not flush either; but write-backs
        // finish behind the reads, and the counters should include them.
        disk.flush().map_err(|e| e.context("flushing"))?;
        start.elapsed() - elapsed
    } else {
        Duration::ZERO
    };
    Ok(BenchReport {
        count: opts.count,
        depth: opts.depth,
        request_bytes: opts.request_bytes,
        step_bytes: step,
        offset: opts.offset,
        pattern: opts.pattern,
        seed,
        write: opts.write,
        copy_on_read: opts.copy_on_read,
        disk_size,
        elapsed,
        flushed,
        stats: stats_delta(&before, &disk.stats()),
    })
}

/// Keeps `depth` requests in flight without a thread of its own: each
/// completion callback (which runs on the reactor that finished the request)
/// submits the next request with the same buffer, the way an in-process
/// client living on the reactors would. The calling thread only waits for
/// the end, so it takes no CPU from the cores and adds no wake-ups.
struct Driver {
    disk: Disk,
    write: bool,
    count: u64,
    offsets: Mutex<Offsets>,
    submitted: AtomicU64,
    state: Mutex<DriverState>,
    done: Condvar,
}

#[derive(Default)]
struct DriverState {
    /// Request chains that have ended (one per slot).
    finished: u64,
    error: Option<(u64, Error)>,
}

impl Driver {
    /// Submits the next request with `buf`, or ends this chain.
    fn next(this: &Arc<Driver>, buf: Vec<u8>) {
        let failed = this
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .error
            .is_some();
        if failed || this.submitted.fetch_add(1, Ordering::Relaxed) >= this.count {
            let mut st = this.state.lock().unwrap_or_else(|p| p.into_inner());
            st.finished += 1;
            this.done.notify_all();
            return;
        }
        let offset = this
            .offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_offset();
        let me = this.clone();
        let done = move |result: Result<Vec<u8>>| match result {
            Ok(buf) => Driver::next(&me, buf),
            Err(e) => {
                let mut st = me.state.lock().unwrap_or_else(|p| p.into_inner());
                st.error.get_or_insert((offset, e));
                st.finished += 1;
                me.done.notify_all();
            }
        };
        if this.write {
            this.disk.submit_write_with(offset, buf, done);
        } else {
            this.disk.submit_read_with(offset, buf, done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_offsets_step_and_wrap_like_qemu_img() {
        let mut o = Offsets::new(Pattern::Sequential, 0, 4096, 4096, 16384, 0).unwrap();
        let got: Vec<u64> = (0..6).map(|_| o.next_offset()).collect();
        // qemu-img bench wraps modulo (size - request): 12288 wraps to 0.
        assert_eq!(got, [0, 4096, 8192, 0, 4096, 8192]);

        let mut o = Offsets::new(Pattern::Sequential, 512, 1024, 512, 4096, 0).unwrap();
        let got: Vec<u64> = (0..5).map(|_| o.next_offset()).collect();
        assert_eq!(got, [512, 1536, 2560, 0, 1024]);
    }

    #[test]
    fn a_request_as_large_as_the_disk_always_goes_to_zero() {
        let mut o = Offsets::new(Pattern::Sequential, 0, 4096, 4096, 4096, 0).unwrap();
        assert!((0..4).all(|_| o.next_offset() == 0));
    }

    #[test]
    fn random_offsets_are_aligned_in_bounds_and_replayable() {
        let size = 1 << 20;
        let mut a = Offsets::new(Pattern::Random, 8192, 0, 4096, size + 100, 42).unwrap();
        let mut b = Offsets::new(Pattern::Random, 8192, 0, 4096, size + 100, 42).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let off = a.next_offset();
            assert_eq!(off, b.next_offset(), "same seed, same offsets");
            assert_eq!((off - 8192) % 4096, 0);
            assert!(off >= 8192 && off + 4096 <= size + 100);
            seen.insert(off);
        }
        // (2^20 - 8192) / 4096 = 254 blocks, all of which 10k draws hit.
        assert_eq!(seen.len(), 254);
    }

    #[test]
    fn rejects_requests_that_do_not_fit() {
        assert!(Offsets::new(Pattern::Sequential, 0, 4096, 0, 1 << 20, 0).is_err());
        assert!(Offsets::new(Pattern::Sequential, 0, 4096, 8192, 4096, 0).is_err());
        assert!(Offsets::new(Pattern::Random, 4096, 0, 4096, 4096, 0).is_err());
        assert!(Offsets::new(Pattern::Random, u64::MAX, 0, 4096, 4096, 0).is_err());
    }

    #[test]
    fn report_prints_like_qemu_img_bench() {
        let report = BenchReport {
            count: 75_000,
            depth: 64,
            request_bytes: 4096,
            step_bytes: 4096,
            offset: 0,
            pattern: Pattern::Sequential,
            seed: None,
            write: false,
            copy_on_read: false,
            disk_size: 1 << 30,
            elapsed: Duration::from_millis(1500),
            flushed: Duration::ZERO,
            stats: Stats::default(),
        };
        let text = report.to_string();
        assert!(text.starts_with(
            "Sending 75000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)\n"
        ));
        assert!(text.contains("Run completed in 1.500 seconds.\n"), "{text}");
        assert!(text.contains("50000 IOPS, 195.3 MiB/s"), "{text}");
    }
}
