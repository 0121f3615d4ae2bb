//! `backfill stream`: populate the whole overlay from its backing chain and
//! make it standalone, with a progress display; and the progress text that
//! `backfill serve --stream` prints too.
//!
//! On a terminal the progress is a bar redrawn in place on stderr; when
//! stderr is not a terminal (a log, a pipe), a plain line every
//! [`LINE_INTERVAL`]. SIGINT or SIGTERM cancels the stream cleanly (what was
//! populated is flushed, and the next `backfill stream` resumes from it).
//! After a complete stream the refcounts are rebuilt if an earlier,
//! interrupted run leaked clusters it had reserved.

use crate::error::{Error, ErrorKind, Result};
use crate::stream::{StreamEnd, StreamOptions, StreamProgress, StreamState};
use crate::tools::units::format_size;
use crate::{Disk, Options};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

/// How often a plain progress line is printed when stderr is no terminal.
pub const LINE_INTERVAL: Duration = Duration::from_secs(2);
/// How often the bar is redrawn on a terminal.
const BAR_INTERVAL: Duration = Duration::from_millis(200);
const BAR_WIDTH: usize = 30;

#[derive(Debug, Clone, Default)]
pub struct StreamArgs {
    /// Bytes per second at most.
    pub rate_bytes_per_sec: Option<u64>,
    pub keep_backing: bool,
    pub cores: Option<usize>,
}

fn percent(p: &StreamProgress) -> f64 {
    if p.total_bytes == 0 {
        100.0
    } else {
        p.done_bytes as f64 * 100.0 / p.total_bytes as f64
    }
}

/// `12.5% (128 MiB of 1 GiB), 85.3 MiB/s`: the progress as one line.
pub fn progress_text(p: &StreamProgress) -> String {
    let mut s = format!(
        "{:.1}% ({} of {}), {}/s",
        percent(p),
        format_size(p.done_bytes),
        format_size(p.total_bytes),
        format_size(p.rate_bytes_per_sec as u64)
    );
    if p.state == StreamState::Paused {
        s.push_str(", paused");
    }
    if let Some(r) = p.rate_limit {
        s.push_str(&format!(", limit {}/s", format_size(r)));
    }
    s
}

/// The one-line summary of a finished stream.
pub fn summary(path: &Path, p: &StreamProgress, end: StreamEnd) -> String {
    let how = match end {
        StreamEnd::Finished {
            backing_dropped: true,
        } => "backing file dropped",
        StreamEnd::Finished { .. } => "backing file kept",
        StreamEnd::Cancelled => "cancelled",
    };
    let avg = if p.elapsed_secs > 0.0 {
        p.populated_bytes as f64 / p.elapsed_secs
    } else {
        0.0
    };
    let zeros = if p.backing_zero_bytes > 0 {
        format!(
            " ({} of it zeros in the backing image, not fetched)",
            format_size(p.backing_zero_bytes.min(p.populated_bytes))
        )
    } else {
        String::new()
    };
    format!(
        "streamed {}: {} populated{zeros} of {} in {:.2} s ({}/s); {how}",
        path.display(),
        format_size(p.populated_bytes),
        format_size(p.total_bytes),
        p.elapsed_secs,
        format_size(avg as u64)
    )
}

fn bar(p: &StreamProgress) -> String {
    let filled = ((percent(p) / 100.0) * BAR_WIDTH as f64) as usize;
    let filled = filled.min(BAR_WIDTH);
    format!(
        "\r[{}{}] {}\x1b[K",
        "#".repeat(filled),
        " ".repeat(BAR_WIDTH - filled),
        progress_text(p)
    )
}

/// Streams `path` to the end; returns the summary line. A signal cancels
/// it, which is an error ("cancelled ... run it again to resume").
pub fn stream(path: &Path, args: &StreamArgs) -> Result<String> {
    // Signals are taken before any thread starts, so that every thread has
    // them routed to the handler thread.
    let mut signals =
        Signals::new([SIGINT, SIGTERM]).map_err(|e| Error::io(e, "installing signal handlers"))?;
    let mut o = Options::default();
    if let Some(n) = args.cores {
        o.cores = n;
    }
    let disk = Disk::open(path, o)?;
    if !disk.has_backing() {
        // Finishes a header rewrite a crash cut short, if any.
        let dropped = disk.drop_backing();
        disk.close()?;
        dropped?;
        return Ok(format!(
            "{} has no backing file: nothing to stream",
            path.display()
        ));
    }
    let stream = std::sync::Arc::new(disk.stream(StreamOptions {
        rate_bytes_per_sec: args.rate_bytes_per_sec,
        keep_backing: args.keep_backing,
        // Nothing else uses the disk: a deep queue.
        window: crate::stream::OFFLINE_WINDOW,
        ..StreamOptions::default()
    })?);
    let handle = signals.handle();
    let s2 = stream.clone();
    let waiter = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            s2.cancel();
        }
    });
    let tty = std::io::stderr().is_terminal();
    let interval = if tty { BAR_INTERVAL } else { LINE_INTERVAL };
    let mut err = std::io::stderr();
    let last = loop {
        let p = stream.wait_until_timeout(interval, |p| p.state.is_stopped());
        if p.state.is_stopped() {
            break p;
        }
        // Progress is best effort: a closed stderr does not stop the stream.
        let _ = if tty {
            write!(err, "{}", bar(&p))
        } else {
            writeln!(err, "stream: {}", progress_text(&p))
        };
    };
    if tty {
        let _ = writeln!(err, "{}", bar(&last));
    }
    handle.close();
    let _ = waiter.join();
    let stream = std::sync::Arc::try_unwrap(stream)
        .map_err(|_| Error::new(ErrorKind::Io, "stream handle still shared"))?;
    let end = stream.wait();
    let closed = disk.close();
    let end = end?;
    closed?;
    match end {
        StreamEnd::Cancelled => Err(Error::new(
            ErrorKind::ShuttingDown,
            format!(
                "stream of {} cancelled at {:.1}% (what was populated is kept: run backfill stream again to resume)",
                path.display(),
                percent(&last)
            ),
        )),
        end => {
            // Clusters an interrupted run had reserved (refcount 1, no L2
            // entry: leaks, as `qemu-img check` reports them) are freed, so
            // that a stream that was killed and resumed ends clean. The
            // repair writes nothing when the refcounts are right.
            let repair = crate::qcow2::repair::rebuild_refcounts(path)
                .map_err(|e| e.context("freeing clusters leaked by an interrupted run"))?;
            let mut text = summary(path, &last, end);
            if repair.leaks_fixed > 0 {
                text.push_str(&format!(
                    "; {} leaked clusters (from an interrupted run) freed",
                    repair.leaks_fixed
                ));
            }
            Ok(text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StreamProgress {
        StreamProgress {
            state: StreamState::Running,
            done_bytes: 128 << 20,
            total_bytes: 1 << 30,
            populated_bytes: 100 << 20,
            backing_zero_bytes: 0,
            in_flight: 3,
            rate_bytes_per_sec: 85.0 * 1048576.0,
            rate_limit: None,
            elapsed_secs: 1.0,
            backing_dropped: false,
            error: None,
            error_kind: None,
        }
    }

    #[test]
    fn progress_reads_like_qemu_sizes() {
        assert_eq!(
            progress_text(&sample()),
            "12.5% (128 MiB of 1 GiB), 85 MiB/s"
        );
        let mut p = sample();
        p.state = StreamState::Paused;
        p.rate_limit = Some(10 << 20);
        assert_eq!(
            progress_text(&p),
            "12.5% (128 MiB of 1 GiB), 85 MiB/s, paused, limit 10 MiB/s"
        );
        assert!(bar(&p).starts_with("\r[###     "));
    }
}
