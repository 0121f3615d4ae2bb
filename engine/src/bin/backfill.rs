//! The `backfill` command: argument parsing and human output only.
//!
//! Every subcommand is a thin shell over the library (`backfill::tools` and
//! the crate's public API). The commands and flags are a scripted interface
//! modelled on `qemu-img`: keep them stable. Errors print
//! `backfill: <message>` on stderr and exit 1; `check` exits with its
//! report's code instead (0 clean, 2 corrupt, 3 leaks).

use backfill::tools::{bench, convert, create, demo, info, serve, stream, units};
use backfill::CacheMode;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "backfill",
    version,
    about = "Copy-on-read qcow2 overlays on a thread-per-core io_uring engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a qcow2 overlay (like `qemu-img create -f qcow2`).
    Create {
        /// Image format; only qcow2.
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// Backing file, recorded in the header as given.
        #[arg(short = 'b', value_name = "BACKING")]
        backing: Option<String>,
        /// Backing file format (raw or qcow2).
        #[arg(short = 'F', value_name = "BACKING_FMT")]
        backing_format: Option<String>,
        /// Options: cluster_size=65536,compat=1.1 (also backing_file, backing_fmt, size).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Do not open the backing file (it may not exist yet): the size and
        /// the backing format must then be given.
        #[arg(short = 'u')]
        unsafe_backing: bool,
        /// Quiet: print nothing on success.
        #[arg(short = 'q')]
        quiet: bool,
        /// The image to create.
        filename: PathBuf,
        /// Virtual size (512, 64K, 1M, 10G); default: the backing file's.
        size: Option<String>,
    },
    /// Show an image's format, size, backing chain and where its bytes live.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        filename: PathBuf,
    },
    /// Read a whole disk through the engine into a sparse raw file.
    Convert {
        /// Populate the overlay while reading (else the image is opened read-only).
        #[arg(long)]
        copy_on_read: bool,
        /// Reactor threads (default: all cores).
        #[arg(long, value_name = "N")]
        cores: Option<usize>,
        source: PathBuf,
        dest: PathBuf,
    },
    /// Measure request rate (like `qemu-img bench`).
    Bench {
        /// Number of requests.
        #[arg(short = 'c', value_name = "COUNT", default_value_t = 75_000)]
        count: u64,
        /// Requests in flight.
        #[arg(short = 'd', value_name = "DEPTH", default_value_t = 64)]
        depth: usize,
        /// Request size (e.g. 4K).
        #[arg(short = 's', value_name = "SIZE", default_value = "4K")]
        size: String,
        /// Distance between sequential requests (default: the request size).
        #[arg(short = 'S', value_name = "STEP")]
        step: Option<String>,
        /// Offset pattern.
        #[arg(long, value_enum, default_value_t = PatternArg::Seq)]
        pattern: PatternArg,
        /// Seed for --pattern rand (default: random, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Write (0xa5 bytes) instead of reading.
        #[arg(short = 'w')]
        write: bool,
        /// Enable copy-on-read (off by default).
        #[arg(long)]
        copy_on_read: bool,
        /// Reactor threads (default: all cores).
        #[arg(long, value_name = "N")]
        cores: Option<usize>,
        /// Overlay cache mode.
        #[arg(long, value_enum, default_value_t = CacheArg::None)]
        cache: CacheArg,
        /// Offset of the first request.
        #[arg(short = 'o', value_name = "OFFSET", default_value = "0")]
        offset: String,
        /// Largest readahead window for sequential reads over a remote
        /// backing (NBD, HTTP), e.g. 16M (the default); 0 turns it off.
        #[arg(long, value_name = "SIZE")]
        readahead: Option<String>,
        /// Memory for write-backs of data fetched from a remote backing
        /// (NBD, HTTP) that wait while more remote reads are in flight,
        /// all cores together, e.g. 64M (default 256M, or a sixteenth of
        /// the memory the process may use when that is less); 0 writes each 1 MiB
        /// per core as soon as it is ready.
        #[arg(long, value_name = "SIZE")]
        writeback_hold: Option<String>,
        filename: PathBuf,
    },
    /// Serve the disk over NBD (until SIGINT or SIGTERM).
    Serve {
        /// Listen on a Unix socket at PATH.
        #[arg(long, value_name = "PATH", conflicts_with = "listen")]
        socket: Option<PathBuf>,
        /// Listen on TCP HOST:PORT (default 127.0.0.1:10809; port 0 picks one).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// Export name ("" always reaches it too).
        #[arg(long, value_name = "NAME", default_value = "")]
        export: String,
        /// Refuse writes; never modify the image.
        #[arg(long)]
        read_only: bool,
        /// Pass reads of data not in the overlay through to the backing image.
        #[arg(long)]
        no_copy_on_read: bool,
        /// Reactor threads (default: all cores).
        #[arg(long, value_name = "N")]
        cores: Option<usize>,
        /// Refuse backing files outside DIR (for images someone else supplied).
        #[arg(long, value_name = "DIR")]
        backing_dir: Option<PathBuf>,
        /// Stream the backing data into the overlay while serving (client
        /// I/O first), at most RATE bytes/s (e.g. 50M) if given; the backing
        /// file is dropped from the header at the end. A stream that fails
        /// starts again after 1 s, then twice as long each time, up to a
        /// minute; not when trying again cannot help (the remote image
        /// changed, the overlay is corrupt).
        #[arg(
            long,
            value_name = "RATE",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = ""
        )]
        stream: Option<String>,
        /// With --stream: keep the backing file reference at the end.
        #[arg(long, requires = "stream")]
        keep_backing: bool,
        /// Print the engine's counters on stderr every SECS seconds (bytes
        /// read, written and fetched, amplification, failed write-backs,
        /// remote fetch latency; with --stream, its progress and rate).
        /// Failed write-backs and remote reads are reported on stderr with
        /// their reason either way.
        #[arg(long, value_name = "SECS")]
        stats: Option<u64>,
        /// Largest readahead window for sequential reads over a remote
        /// backing (NBD, HTTP), e.g. 16M (the default); 0 turns it off.
        #[arg(long, value_name = "SIZE")]
        readahead: Option<String>,
        /// Memory for write-backs of data fetched from a remote backing
        /// (NBD, HTTP) that wait while more remote reads are in flight,
        /// all cores together, e.g. 64M (default 256M, or a sixteenth of
        /// the memory the process may use when that is less); 0 writes each 1 MiB
        /// per core as soon as it is ready.
        #[arg(long, value_name = "SIZE")]
        writeback_hold: Option<String>,
        filename: PathBuf,
    },
    /// Populate the whole overlay from its backing chain, then drop the
    /// backing file from the header (resumable: run it again after a stop).
    Stream {
        /// At most this many bytes per second (e.g. 50M).
        #[arg(long, value_name = "BYTES/s")]
        rate: Option<String>,
        /// Keep the backing file reference at the end.
        #[arg(long)]
        keep_backing: bool,
        /// Reactor threads (default: all cores).
        #[arg(long, value_name = "N")]
        cores: Option<usize>,
        filename: PathBuf,
    },
    /// Check an image's consistency; exit 0 clean, 2 corrupt, 3 leaked clusters.
    Check {
        /// First rebuild the refcounts (fixes leaks, wrong refcounts and a
        /// dirty image, like `qemu-img check -r all`) and remove a malformed
        /// remote-image pin; the exit code is then the check's after the
        /// repair.
        #[arg(long)]
        repair: bool,
        filename: PathBuf,
    },
    /// Grow an image's virtual size (like `qemu-img resize`); the new area
    /// reads as zeros, even where the backing image is larger.
    Resize {
        /// Accepted for qemu-img compatibility; shrinking is refused anyway.
        #[arg(long)]
        shrink: bool,
        /// Image format; only qcow2.
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        filename: PathBuf,
        /// New size (10G), or a change (+1G; -1G is refused).
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Show copy-on-read end to end on a generated image.
    Demo {
        /// Keep the images in DIR (default: a temporary directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Disk size.
        #[arg(long, value_name = "SIZE", default_value = "64M")]
        size: String,
        /// Reactor threads (default: all cores).
        #[arg(long, value_name = "N")]
        cores: Option<usize>,
        /// Seed for the backing image's content (default: random, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PatternArg {
    Seq,
    Rand,
}

#[derive(Clone, Copy, ValueEnum)]
enum CacheArg {
    None,
    Writeback,
}

/// What a command ended with: a normal exit code, or an error to print.
type Outcome = Result<u8, backfill::Error>;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors. Usage errors exit 1, as in
            // qemu-img, so that a script never mistakes one for `check`'s 2.
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match backfill::tools::ignore_sigxfsz().and_then(|()| run(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("backfill: {e}");
            ExitCode::from(1)
        }
    }
}

/// A rate in bytes per second, with qemu size suffixes (`50M` is 50 MiB/s).
fn parse_rate(text: &str) -> Result<u64, backfill::Error> {
    match units::parse_size(text)? {
        0 => Err(backfill::Error::new(
            backfill::ErrorKind::InvalidInput,
            format!("rate {text:?} must be at least 1 byte/s"),
        )),
        n => Ok(n),
    }
}

fn run(command: Command) -> Outcome {
    match command {
        Command::Create {
            format,
            backing,
            backing_format,
            options,
            unsafe_backing,
            quiet,
            filename,
            size,
        } => {
            let args = create::CreateArgs {
                format,
                backing,
                backing_format,
                options,
                size,
                unsafe_backing,
            };
            let line = create::create_image(&filename, &args)?;
            if !quiet {
                println!("{line}");
            }
            Ok(0)
        }
        Command::Info { json, filename } => {
            let image = backfill::info(&filename)?;
            if json {
                let text = serde_json::to_string_pretty(&image).map_err(|e| {
                    backfill::Error::new(backfill::ErrorKind::InvalidInput, e.to_string())
                })?;
                println!("{text}");
            } else {
                print!("{}", info::render(&image));
            }
            Ok(0)
        }
        Command::Convert {
            copy_on_read,
            cores,
            source,
            dest,
        } => {
            let opts = convert::ConvertOptions {
                copy_on_read,
                cores,
                ..convert::ConvertOptions::default()
            };
            println!("{}", convert::convert(&source, &dest, &opts)?);
            Ok(0)
        }
        Command::Bench {
            count,
            depth,
            size,
            step,
            pattern,
            seed,
            write,
            copy_on_read,
            cores,
            cache,
            offset,
            readahead,
            writeback_hold,
            filename,
        } => {
            let request_bytes = usize::try_from(units::parse_size(&size)?).map_err(|_| {
                backfill::Error::new(backfill::ErrorKind::InvalidInput, "request size too large")
            })?;
            let opts = bench::BenchOptions {
                count,
                depth,
                request_bytes,
                step_bytes: step.as_deref().map(units::parse_size).transpose()?,
                pattern: match pattern {
                    PatternArg::Seq => bench::Pattern::Sequential,
                    PatternArg::Rand => bench::Pattern::Random,
                },
                write,
                copy_on_read,
                cores,
                cache: match cache {
                    CacheArg::None => CacheMode::None,
                    CacheArg::Writeback => CacheMode::Writeback,
                },
                offset: units::parse_size(&offset)?,
                seed,
                readahead: readahead.as_deref().map(units::parse_size).transpose()?,
                writeback_hold: writeback_hold
                    .as_deref()
                    .map(units::parse_size)
                    .transpose()?,
            };
            println!("{}", bench::run(&filename, &opts)?);
            Ok(0)
        }
        Command::Serve {
            socket,
            listen,
            export,
            read_only,
            no_copy_on_read,
            cores,
            backing_dir,
            stream,
            keep_backing,
            stats,
            readahead,
            writeback_hold,
            filename,
        } => {
            let stats_interval = match stats {
                None => None,
                Some(0) => {
                    return Err(backfill::Error::new(
                        backfill::ErrorKind::InvalidInput,
                        "--stats needs a number of seconds above 0",
                    ))
                }
                Some(n) => Some(std::time::Duration::from_secs(n)),
            };
            let stream = match stream.as_deref() {
                None => None,
                Some("") => Some(serve::StreamWhileServing {
                    rate_bytes_per_sec: None,
                    keep_backing,
                }),
                Some(rate) => Some(serve::StreamWhileServing {
                    rate_bytes_per_sec: Some(parse_rate(rate)?),
                    keep_backing,
                }),
            };
            let listen = match (socket, listen) {
                (Some(p), _) => serve::Listen::Unix(p),
                (None, Some(a)) => serve::Listen::Tcp(a),
                (None, None) => serve::Listen::Tcp(serve::DEFAULT_LISTEN.to_string()),
            };
            let opts = serve::ServeOptions {
                listen,
                export,
                read_only,
                copy_on_read: !no_copy_on_read,
                cores,
                backing_dir,
                stream,
                stats_interval,
                readahead: readahead.as_deref().map(units::parse_size).transpose()?,
                writeback_hold: writeback_hold
                    .as_deref()
                    .map(units::parse_size)
                    .transpose()?,
            };
            serve::serve(&filename, &opts)?;
            Ok(0)
        }
        Command::Stream {
            rate,
            keep_backing,
            cores,
            filename,
        } => {
            let args = stream::StreamArgs {
                rate_bytes_per_sec: rate.as_deref().map(parse_rate).transpose()?,
                keep_backing,
                cores,
            };
            println!("{}", stream::stream(&filename, &args)?);
            Ok(0)
        }
        Command::Check { repair, filename } => {
            if repair {
                if let Some(done) = backfill::qcow2::pin::repair_pin(&filename)? {
                    println!("{done}");
                }
                match backfill::qcow2::repair::rebuild_refcounts(&filename) {
                    Ok(r) => println!("{r}"),
                    // Broken mapping metadata is not a refcount problem: say
                    // why, leave the image untouched, and report as check does.
                    Err(e) if e.kind() == backfill::ErrorKind::Corrupt => {
                        eprintln!("backfill: not repaired: {e}")
                    }
                    Err(e) => return Err(e),
                }
            }
            let report = backfill::check(&filename)?;
            let text = report.to_string();
            println!("{}", text.trim_end());
            // Exit codes are qemu-img check's: 0, 2 or 3 (never more than 63).
            Ok(u8::try_from(report.exit_code()).unwrap_or(1))
        }
        Command::Resize {
            shrink: _,
            format,
            filename,
            size,
        } => {
            if let Some(f) = format.filter(|f| f != "qcow2") {
                return Err(backfill::Error::new(
                    backfill::ErrorKind::InvalidInput,
                    format!("unsupported image format '{f}' (backfill resizes qcow2 only)"),
                ));
            }
            let current = backfill::info(&filename)?.virtual_size;
            let new_size = units::parse_resize(&size, current)?;
            backfill::resize(&filename, new_size)?;
            println!("Image resized.");
            Ok(0)
        }
        Command::Demo {
            dir,
            size,
            cores,
            seed,
        } => {
            let opts = demo::DemoOptions {
                dir,
                size_bytes: units::parse_size(&size)?,
                cores,
                seed,
            };
            let report = demo::run(&opts)?;
            println!("{report}");
            if report.ok() {
                Ok(0)
            } else {
                eprintln!("backfill: demo failed: {}", report.failures.join("; "));
                Ok(1)
            }
        }
    }
}
