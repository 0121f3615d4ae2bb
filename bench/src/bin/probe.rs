//! `bench-probe`: open time and memory of one `Disk`, for `bench/run`.
//!
//! It opens IMAGE (read-only unless `--copy-on-read`) with the given
//! metadata cache budget, times the open, sends `--reads` random 4 KiB reads
//! over the whole virtual disk with `--depth` in flight, and prints one JSON
//! line with the open time, the read rate, and this process's resident
//! memory before the open, after it, and at its peak (`VmHWM`). Random reads
//! over a disk whose L2 tables are all allocated touch every L2 block, so
//! the peak shows whether the metadata cache keeps to its budget.
//!
//! Usage: bench-probe [--budget BYTES] [--reads N] [--depth N] [--cores N]
//!                    [--seed N] [--copy-on-read] IMAGE

use backfill::{Disk, Options};
use bench::{proc_status_kib, Rng};
use std::collections::VecDeque;
use std::time::Instant;

const REQUEST_BYTES: usize = 4096;

struct Args {
    image: String,
    budget_bytes: usize,
    reads: u64,
    depth: usize,
    cores: Option<usize>,
    seed: u64,
    copy_on_read: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        image: String::new(),
        budget_bytes: Options::default().metadata_cache_bytes,
        reads: 100_000,
        depth: 32,
        cores: None,
        seed: 1,
        copy_on_read: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse().map_err(|_| format!("{name}: not a number: {v}"))
        };
        match a.as_str() {
            "--budget" => args.budget_bytes = value("--budget")? as usize,
            "--reads" => args.reads = value("--reads")?,
            "--depth" => args.depth = value("--depth")?.max(1) as usize,
            "--cores" => args.cores = Some(value("--cores")? as usize),
            "--seed" => args.seed = value("--seed")?,
            "--copy-on-read" => args.copy_on_read = true,
            _ if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ => args.image = a,
        }
    }
    if args.image.is_empty() {
        return Err("usage: bench-probe [--budget BYTES] [--reads N] [--depth N] [--cores N] [--seed N] [--copy-on-read] IMAGE".into());
    }
    Ok(args)
}

fn run(args: &Args) -> backfill::Result<String> {
    let kib = |field| proc_status_kib(field).unwrap_or(0);
    let rss_before_kib = kib("VmRSS");
    let mut opts = Options {
        metadata_cache_bytes: args.budget_bytes,
        copy_on_read: args.copy_on_read,
        read_only: !args.copy_on_read,
        ..Options::default()
    };
    if let Some(cores) = args.cores {
        opts.cores = cores;
    }
    let start = Instant::now();
    let disk = Disk::open(&args.image, opts)?;
    let open_ms = start.elapsed().as_secs_f64() * 1e3;
    let rss_open_kib = kib("VmRSS");

    let size = disk.size();
    let mut rng = Rng::new(args.seed);
    let mut pending = VecDeque::with_capacity(args.depth);
    let mut free: Vec<Vec<u8>> = (0..args.depth).map(|_| vec![0u8; REQUEST_BYTES]).collect();
    let mut sent = 0;
    let start = Instant::now();
    while sent < args.reads || !pending.is_empty() {
        while sent < args.reads {
            let Some(buf) = free.pop() else { break };
            let offset = rng.aligned_offset(size, REQUEST_BYTES as u64);
            pending.push_back(disk.submit_read(offset, buf));
            sent += 1;
        }
        if let Some(done) = pending.pop_front() {
            free.push(done.wait()?);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let stats = disk.stats();
    let rss_end_kib = kib("VmRSS");
    let hwm_kib = kib("VmHWM");
    disk.close()?;
    Ok(format!(
        concat!(
            "{{\"image\":{:?},\"size_bytes\":{},\"budget_bytes\":{},\"open_ms\":{:.2},",
            "\"reads\":{},\"depth\":{},\"secs\":{:.3},\"iops\":{:.0},",
            "\"rss_before_kib\":{},\"rss_open_kib\":{},\"rss_end_kib\":{},\"hwm_kib\":{},",
            "\"overlay_hits\":{},\"misses\":{},\"cor_fills\":{}}}"
        ),
        args.image,
        size,
        args.budget_bytes,
        open_ms,
        args.reads,
        args.depth,
        secs,
        args.reads as f64 / secs.max(1e-9),
        rss_before_kib,
        rss_open_kib,
        rss_end_kib,
        hwm_kib,
        stats.overlay_hits,
        stats.misses,
        stats.cor_fills
    ))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-probe: {e}");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("bench-probe: {e}");
            std::process::exit(1);
        }
    }
}
