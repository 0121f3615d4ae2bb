//! `backfill serve`: open a disk and serve it over NBD until SIGINT or
//! SIGTERM, then finish what is in flight, flush and close the image clean.

use crate::disk::LEARN_ZEROS_BYTES;
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::{Config, Listener, Server};
use crate::stream::{Stream, StreamEnd, StreamOptions, StreamState};
use crate::{Disk, Options};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

/// Default listen address: loopback only, the NBD port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: Listen,
    pub export: String,
    pub read_only: bool,
    pub copy_on_read: bool,
    pub cores: Option<usize>,
    /// Refuse backing files outside this directory.
    pub backing_dir: Option<PathBuf>,
    /// Stream the backing data into the overlay while serving.
    pub stream: Option<StreamWhileServing>,
    /// Print a line of counters on stderr this often (`--stats SECS`).
    pub stats_interval: Option<std::time::Duration>,
    /// Readahead window limit (`--readahead SIZE`); `None` for the default.
    pub readahead: Option<u64>,
    /// Write-back hold budget (`--writeback-hold SIZE`); `None` for the
    /// engine's default.
    pub writeback_hold: Option<u64>,
}

/// One line of the engine's counters, as `serve --stats` prints it:
/// what clients read and wrote, what was fetched from the backing chain and
/// how much that is per byte read (the amplification), and for a remote
/// backing the reads it took and their latency.
pub fn stats_line(s: &crate::Stats) -> String {
    use crate::tools::units::format_size;
    let amplification = if s.bytes_read == 0 {
        0.0
    } else {
        s.bytes_fetched as f64 / s.bytes_read as f64
    };
    let mut line = format!(
        "stats: read {} ({} bytes), written {}, fetched {} ({} bytes) from the backing \
         chain, amplification {amplification:.2} fetched per byte read, {} in flight",
        format_size(s.bytes_read),
        s.bytes_read,
        format_size(s.bytes_written),
        format_size(s.bytes_fetched),
        s.bytes_fetched,
        s.in_flight
    );
    if s.writeback_errors > 0 {
        line.push_str(&format!(
            ", {} copy-on-read write-backs failed",
            s.writeback_errors
        ));
    }
    if s.remote_reads > 0 {
        let mean_ms = s.remote_latency_us as f64 / s.remote_reads as f64 / 1000.0;
        line.push_str(&format!(
            "; remote backing: {} reads, {}, mean {mean_ms:.1} ms, max {:.1} ms, {} failed",
            s.remote_reads,
            format_size(s.remote_bytes),
            s.remote_latency_max_us as f64 / 1000.0,
            s.remote_errors
        ));
        if s.readahead_bytes > 0 {
            line.push_str(&format!(
                ", readahead {} ({} reads from its buffers)",
                format_size(s.readahead_bytes),
                s.readahead_hits
            ));
        }
        if s.writebacks_held_bytes > 0 {
            line.push_str(&format!(
                ", write-backs held {}",
                format_size(s.writebacks_held_bytes)
            ));
        }
    }
    line
}

/// Prints [`stats_line`] on stderr every `every` until `stop` is dropped;
/// while `stream` runs, with its progress and rate (`; stream: ...`).
fn report_stats(
    disk: Disk,
    stream: Option<CurrentStream>,
    every: std::time::Duration,
    stop: crossbeam_channel::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
            let mut line = stats_line(&disk.stats());
            if let Some(p) = stream.as_ref().map(|s| current(s).progress()) {
                if !p.state.is_stopped() {
                    line.push_str("; stream: ");
                    line.push_str(&crate::tools::stream::progress_text(&p));
                }
            }
            eprintln!("{line}");
        }
    })
}

/// Asks the backing chain, [`LEARN_ZEROS_BYTES`] at a time from the disk's
/// start, which of it reads as zeros (an NBD server's block status, a raw
/// file's holes; see [`Disk::learn_backing_zeros`]): reads of those ranges
/// then fetch (or read) nothing, and clients' block status queries show
/// them as zeros, so `nbdcopy` or `qemu-img convert` reading from this
/// server skip them rather than pull them over the link. Says on stderr
/// what it found once through the disk. Stops when `stop` is dropped;
/// never joined, since a query to a server that hangs may wait for its
/// timeout.
fn learn_zeros(disk: Disk, stop: crossbeam_channel::Receiver<()>) {
    use crate::tools::units::format_size;
    std::thread::spawn(move || {
        let size = disk.size();
        let (mut pos, mut found) = (0, 0);
        while pos < size {
            if !matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty)) {
                return;
            }
            found += disk.learn_backing_zeros(pos, LEARN_ZEROS_BYTES);
            pos += LEARN_ZEROS_BYTES;
        }
        if found == 0 {
            return;
        }
        if disk.backing_is_remote() {
            eprintln!(
                "backfill serve: the backing image's server says {} of the disk read as zeros: \
                 they are not fetched",
                format_size(found)
            );
        } else {
            eprintln!(
                "backfill serve: the backing file's holes cover {} of the disk: they read as \
                 zeros without a read",
                format_size(found)
            );
        }
    });
}

/// How often `serve` looks for new failures to report.
const FAILURE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// The least time between two reports of one kind of failure on stderr.
pub const FAILURE_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// One kind of failure `serve` reports on stderr, and how much of it it
/// has reported.
#[derive(Default)]
struct Failures {
    reported: u64,
    last: Option<std::time::Instant>,
}

impl Failures {
    /// The reason and the count of the failures since the last report, if
    /// there are any and a report is due (always when `stopping`).
    fn due(
        &mut self,
        total: u64,
        stopping: bool,
        why: impl FnOnce() -> Option<Error>,
    ) -> Option<(String, u64)> {
        let due = stopping
            || self
                .last
                .is_none_or(|t| t.elapsed() >= FAILURE_REPORT_INTERVAL);
        if !due || total <= self.reported {
            return None;
        }
        self.last = Some(std::time::Instant::now());
        let new = total - std::mem::replace(&mut self.reported, total);
        let why = why().map_or_else(|| "no reason recorded".to_string(), |e| e.to_string());
        Some((why, new))
    }
}

/// Reports on stderr what goes wrong out of a client's sight, or that a
/// client sees only as its own I/O error:
/// - copy-on-read write-backs that failed (an overlay without room, say):
///   the reads succeed, and the overlay silently stops filling;
/// - reads of a remote backing medium that failed after their retries:
///   the clients that needed them got an I/O error, the operator nothing.
///
/// The first of each within [`FAILURE_CHECK`], then at most one line of
/// each every [`FAILURE_REPORT_INTERVAL`] while more fail; when `stop` is
/// dropped, any not reported yet.
fn watch_failures(
    disk: Disk,
    stop: crossbeam_channel::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut writebacks, mut remote) = (Failures::default(), Failures::default());
        loop {
            let stopping = !matches!(
                stop.recv_timeout(FAILURE_CHECK),
                Err(crossbeam_channel::RecvTimeoutError::Timeout)
            );
            let s = disk.stats();
            if let Some((why, new)) =
                writebacks.due(s.writeback_errors, stopping, || disk.last_writeback_error())
            {
                eprintln!(
                    "backfill serve: copy-on-read could not write into the overlay: {why}; {new} \
                     write-backs failed, {} since start; the reads were answered, and that data \
                     is still read from the backing image",
                    s.writeback_errors
                );
            }
            if let Some((why, new)) =
                remote.due(s.remote_errors, stopping, || disk.last_remote_error())
            {
                eprintln!(
                    "backfill serve: reads of the backing image failed: {why}; {new} failed, {} \
                     since start; the requests that needed them got an I/O error",
                    s.remote_errors
                );
            }
            if stopping {
                return;
            }
        }
    })
}

/// `serve --stream[=RATE] [--keep-backing]`.
#[derive(Debug, Clone, Default)]
pub struct StreamWhileServing {
    pub rate_bytes_per_sec: Option<u64>,
    pub keep_backing: bool,
}

/// How often `serve --stream` prints a progress line on stderr.
pub const STREAM_LINE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How long `serve --stream` waits before it starts a failed stream again;
/// the wait doubles after each failure, up to [`STREAM_RETRY_MAX`].
pub const STREAM_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
pub const STREAM_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a stream that failed with an error of `kind` may succeed when
/// started again: a backing medium that was unreachable may come back, and
/// an overlay without room may get some. A changed remote image, a corrupt
/// or poisoned overlay, or an unsupported feature stay as they are: a new
/// stream would fail the same way, once a minute, for as long as the
/// server runs.
fn passes(kind: crate::ErrorKind) -> bool {
    matches!(
        kind,
        crate::ErrorKind::BackingUnavailable | crate::ErrorKind::Io
    )
}

/// The stream `serve --stream` runs now: a failed one is replaced by a new
/// one when it starts again.
type CurrentStream = Arc<std::sync::Mutex<Arc<Stream>>>;

fn current(s: &CurrentStream) -> Arc<Stream> {
    s.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Runs a stream beside the server: a progress line on stderr now and
/// then (unless `--stats` lines carry its progress), and at the end the
/// summary on stdout (scripts wait for the line starting with `streamed `).
/// Serving goes on whatever the stream does. A stream that fails (its
/// backing unreachable for longer than the medium retries, say) is reported
/// on stderr and started again after [`STREAM_RETRY_FIRST`], then after
/// twice as long each time, up to [`STREAM_RETRY_MAX`]: a long stream
/// over a remote backing survives an outage, fetching only what is still
/// missing, as `backfill stream` run again would; one whose failure will
/// not pass (see [`passes`]) is reported and not started again. Ends when
/// the stream finishes, is cancelled, fails for good, or `stop` is
/// dropped.
fn watch_stream(
    path: PathBuf,
    disk: Disk,
    options: StreamOptions,
    stream: CurrentStream,
    progress_lines: bool,
    stop: crossbeam_channel::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut wait = STREAM_RETRY_FIRST;
        loop {
            let now = current(&stream);
            let last = loop {
                let p = now.wait_until_timeout(STREAM_LINE_INTERVAL, |p| p.state.is_stopped());
                if p.state.is_stopped() {
                    break p;
                }
                if progress_lines {
                    eprintln!("stream: {}", crate::tools::stream::progress_text(&p));
                }
            };
            match (&last.state, &last.error) {
                (StreamState::Failed, e) => {
                    let why = e
                        .as_ref()
                        .map_or_else(|| "no reason".into(), |e| e.to_string());
                    if !last.error_kind.is_some_and(passes) {
                        eprintln!(
                            "backfill: stream failed: {why}; not starting it again (serving goes on)"
                        );
                        return;
                    }
                    eprintln!(
                        "backfill: stream failed: {why}; starting it again in {} s (serving goes on)",
                        wait.as_secs()
                    );
                }
                (StreamState::Cancelled, _) => return,
                _ => {
                    let end = StreamEnd::Finished {
                        backing_dropped: last.backing_dropped,
                    };
                    let text = if disk.has_backing() || last.backing_dropped {
                        crate::tools::stream::summary(&path, &last, end)
                    } else {
                        format!(
                            "streamed {}: no backing file, nothing to stream",
                            path.display()
                        )
                    };
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{text}").and_then(|_| out.flush());
                    return;
                }
            }
            if !matches!(
                stop.recv_timeout(wait),
                Err(crossbeam_channel::RecvTimeoutError::Timeout)
            ) {
                return;
            }
            wait = (wait * 2).min(STREAM_RETRY_MAX);
            // Under the lock, so that a server stopping now either sees the
            // new stream (and cancels it) or keeps it from starting.
            let mut slot = stream.lock().unwrap_or_else(|p| p.into_inner());
            if !matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty)) {
                return;
            }
            match disk.stream(options.clone()) {
                Ok(s) => *slot = Arc::new(s),
                Err(e) => {
                    eprintln!("backfill: stream could not start again: {e}");
                    return;
                }
            }
        }
    })
}

/// Serves `path` until a signal stops it. Prints `serving PATH at URI` on
/// stdout once clients can connect (scripts wait for that line).
pub fn serve(path: &Path, opts: &ServeOptions) -> Result<()> {
    let mut o = Options {
        copy_on_read: opts.copy_on_read,
        read_only: opts.read_only,
        backing_dir: opts.backing_dir.clone(),
        ..Options::default()
    };
    if let Some(n) = opts.cores {
        o.cores = n;
    }
    if let Some(bytes) = opts.readahead {
        o.readahead_max_bytes = bytes;
    }
    if let Some(bytes) = opts.writeback_hold {
        o.writeback_hold_bytes = bytes as usize;
    }
    if opts.stream.is_some() && (opts.read_only || !opts.copy_on_read) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "--stream needs a writable disk with copy-on-read (not --read-only or --no-copy-on-read)",
        ));
    }
    // Every client would lose its connection over one write without room:
    // such a write fails with EFBIG instead, which its client gets as
    // ENOSPC, as on a full disk, and everyone else is still served.
    crate::tools::ignore_sigxfsz()?;
    // Signals are taken before any thread starts, so every thread has them
    // routed to the handler thread rather than killing the process.
    let mut signals =
        Signals::new([SIGINT, SIGTERM]).map_err(|e| Error::io(e, "installing signal handlers"))?;
    let disk = Disk::open(path, o)?;
    let listener = match &opts.listen {
        Listen::Unix(p) => Listener::unix(p)?,
        Listen::Tcp(a) => Listener::tcp(a)?,
    };
    let uri = listener.uri(&opts.export);
    let cfg = Config {
        export: opts.export.clone(),
        description: format!("backfill copy-on-read disk {}", path.display()),
        read_only: opts.read_only,
    };
    let server = Server::new(disk.clone(), listener, cfg);
    let stop = server.stop_handle();
    let handle = signals.handle();
    let waiter = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stop.stop();
        }
    });
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "serving {} at {uri}", path.display())
            .and_then(|_| out.flush())
            .map_err(|e| Error::io(e, "writing to stdout"))?;
    }
    // After the ready line, so that it is the first line on stdout.
    let stream = match &opts.stream {
        Some(s) => {
            let options = StreamOptions {
                rate_bytes_per_sec: s.rate_bytes_per_sec,
                keep_backing: s.keep_backing,
                ..StreamOptions::default()
            };
            let stream: CurrentStream = Arc::new(std::sync::Mutex::new(Arc::new(
                disk.stream(options.clone())?,
            )));
            let (stop, stop_rx) = crossbeam_channel::bounded::<()>(0);
            let watcher = watch_stream(
                path.to_path_buf(),
                disk.clone(),
                options,
                stream.clone(),
                opts.stats_interval.is_none(),
                stop_rx,
            );
            Some((stream, stop, watcher))
        }
        _ => None,
    };
    let stats = opts.stats_interval.map(|every| {
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let streaming = stream.as_ref().map(|(s, _, _)| s.clone());
        (tx, report_stats(disk.clone(), streaming, every, rx))
    });
    let (watch_stop, watch_rx) = crossbeam_channel::bounded::<()>(0);
    let watch = watch_failures(disk.clone(), watch_rx);
    let (learn_stop, learn_rx) = crossbeam_channel::bounded::<()>(0);
    if disk.has_backing() {
        learn_zeros(disk.clone(), learn_rx);
    }
    let result = server.run();
    drop(learn_stop);
    if let Some((tx, reporter)) = stats {
        drop(tx);
        let _ = reporter.join();
    }
    handle.close();
    let _ = waiter.join();
    if let Some((stream, stop, watcher)) = stream {
        // A stream still running is cancelled (its work so far is flushed);
        // it ends before the disk closes. First no new one may start.
        drop(stop);
        current(&stream).cancel();
        let _ = watcher.join();
        drop(stream);
    }
    drop(server);
    // Held write-backs go out now, so that the last report counts them
    // (any error is the close's to report).
    let _ = disk.flush();
    drop(watch_stop);
    let _ = watch.join();
    let closed = disk.close();
    result.and(closed).map_err(|e| match e.kind() {
        ErrorKind::ShuttingDown => e,
        _ => e.context("backfill serve"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_that_may_pass_start_the_stream_again() {
        use crate::ErrorKind::*;
        for kind in [BackingUnavailable, Io] {
            assert!(passes(kind), "{kind:?}");
        }
        for kind in [BackingChanged, Corrupt, Poisoned, Unsupported, ReadOnly] {
            assert!(!passes(kind), "{kind:?}");
        }
    }

    #[test]
    fn stats_lines_count_failed_write_backs_only_when_there_are_some() {
        let mut s = crate::Stats {
            bytes_read: 4096,
            bytes_fetched: 65536,
            ..crate::Stats::default()
        };
        assert!(!stats_line(&s).contains("write-backs failed"));
        s.writeback_errors = 12;
        assert!(stats_line(&s).contains(", 12 copy-on-read write-backs failed"));
    }

    #[test]
    fn failures_are_reported_once_then_at_most_once_an_interval() {
        let why = || Some(Error::new(ErrorKind::Io, "no room"));
        let mut f = Failures::default();
        assert_eq!(f.due(0, false, why), None, "nothing failed");
        assert_eq!(f.due(3, false, why), Some(("no room".into(), 3)));
        // More fail within the interval: held back until it passes, or
        // until the server stops.
        assert_eq!(f.due(5, false, why), None);
        assert_eq!(f.due(5, true, why), Some(("no room".into(), 2)));
        assert_eq!(f.due(5, true, why), None, "nothing new");
        // An interval later (the monotonic clock counts from boot, so it
        // is that far along on any machine up for a minute).
        if let Some(then) = std::time::Instant::now().checked_sub(FAILURE_REPORT_INTERVAL) {
            f.last = Some(then);
            assert_eq!(
                f.due(6, false, || None),
                Some(("no reason recorded".into(), 1))
            );
        }
    }
}
