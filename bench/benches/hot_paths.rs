//! Criterion benches of backfill's hot paths, through the public API.
//!
//! - `locks`: the per-core range-lock table, free and under contention
//!   (a held cluster with waiters parked behind it, woken on release);
//! - `router`: splitting a request into per-stripe parts, and `join`: the
//!   same warm read within one stripe and across a stripe boundary (two
//!   parts on two cores, joined by the request's completion counter);
//! - `l2_lookup`: decoding a block of L2 entries (the pure format step) and
//!   a warm `Disk::block_status` of one cluster (an L2 lookup answered from
//!   the core's cache, with its round trip through the reactor);
//! - `cor_fill`: one copy-on-read fill in process, until the read is
//!   answered, and until the fill is durable (read + flush);
//! - `warm_read_4k`: 4 KiB reads of a populated overlay, one at a time and
//!   32 in flight, with O_DIRECT (the default) and through the page cache.
//!
//! Images live under `BENCH_DIR` (default: the temporary directory, which
//! must allow O_DIRECT). Times are kept short (criterion's defaults would
//! take half an hour on the 2-core machine): `cargo bench -p bench` takes a
//! couple of minutes.

use backfill::locks::{Holder, LockTable};
use backfill::qcow2::{decode_l2, encode_l2, L2Entry};
use backfill::router::Router;
use backfill::{CacheMode, Disk, Options};
use bench::{create_overlay, populate, scratch_dir, warm_options, write_random_file, Rng};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::collections::VecDeque;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Backing image size for the disk benches: several stripes per core, and
/// enough clusters (4,096) that a fill bench rarely needs a new overlay.
const BACKING_BYTES: u64 = 256 << 20;
const CLUSTER_BYTES: u64 = 64 << 10;
/// 64 KiB clusters, 512 per stripe.
const CLUSTER_BITS: u32 = 16;
const READ_BYTES: usize = 4096;
const DEPTH: usize = 32;

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

/// A random backing file and a fully populated overlay on it.
struct Images {
    _dir: tempfile::TempDir,
    base: PathBuf,
    warm: PathBuf,
    dir: PathBuf,
}

impl Images {
    fn new() -> Images {
        let dir = scratch_dir("backfill-bench").expect("scratch directory");
        let base = dir.path().join("base.raw");
        let warm = dir.path().join("warm.qcow2");
        write_random_file(&base, BACKING_BYTES, 42).expect("backing file");
        create_overlay(&warm, &base).expect("overlay");
        populate(&warm).expect("populating the overlay");
        // The buffered benches measure the engine, not the disk: read the
        // overlay once so the page cache holds it (the O_DIRECT ones bypass
        // the page cache either way).
        let mut f = std::fs::File::open(&warm).expect("overlay");
        std::io::copy(&mut f, &mut std::io::sink()).expect("reading the overlay");
        Images {
            dir: dir.path().to_path_buf(),
            _dir: dir,
            base,
            warm,
        }
    }
}

fn locks(c: &mut Criterion) {
    let mut g = c.benchmark_group("locks");
    // A busy core: 1,024 fills in flight on other clusters.
    g.bench_function("acquire_release/1024_held", |b| {
        let mut t: LockTable<u32, u32> = LockTable::new();
        for i in 0..1024u32 {
            assert!(t.try_lock(u64::from(i) * 2 + 1, Holder::Fill(i)));
        }
        let mut k = 0u64;
        b.iter(|| {
            let cluster = (k % 1024) * 2;
            k += 1;
            assert!(t.try_lock(black_box(cluster), Holder::Write));
            black_box(t.unlock(cluster));
        });
    });
    // A fill holds a cluster; N readers or writers find it held and park;
    // the release wakes them in order and the first takes the lock.
    for waiters in [1u32, 8, 32] {
        g.bench_with_input(BenchmarkId::new("contended", waiters), &waiters, |b, &n| {
            let mut t: LockTable<u32, u32> = LockTable::new();
            b.iter(|| {
                assert!(t.try_lock(7, Holder::Fill(1)));
                for w in 0..n {
                    if !t.try_lock(7, Holder::Write) {
                        t.wait(7, w);
                    }
                }
                let woken = t.unlock(7);
                assert_eq!(woken.len(), n as usize);
                assert!(t.try_lock(7, Holder::Write));
                black_box(t.unlock(7));
            });
        });
    }
    g.finish();
}

fn router(c: &mut Criterion) {
    let mut g = c.benchmark_group("router");
    let r = Router::new(CLUSTER_BITS, 2);
    let stripe = r.stripe_bytes();
    let mut rng = Rng::new(3);
    g.bench_function("split/4k_in_stripe", |b| {
        b.iter(|| {
            let off = rng.below(1 << 15) * stripe + rng.below(stripe / 4096) * 4096;
            black_box(r.split(black_box(off), 4096).count())
        });
    });
    g.bench_function("split/1m_across_stripes", |b| {
        b.iter(|| {
            let off = (rng.below(1 << 15) + 1) * stripe - (512 << 10);
            black_box(r.split(black_box(off), 1 << 20).fold(0, |a, p| a + p.len))
        });
    });
    g.bench_function("split/64m_three_stripes", |b| {
        b.iter(|| black_box(r.split(black_box(stripe / 2), 64 << 20).count()));
    });
    g.finish();
}

/// Reads `len` bytes at `offsets()` one at a time, the disk opened `opts`.
fn bench_reads(
    g: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    name: &str,
    path: &Path,
    opts: Options,
    len: usize,
    mut offsets: impl FnMut() -> u64,
) {
    let disk = Disk::open(path, opts).expect("opening the warm overlay");
    let mut buf = vec![0u8; len];
    g.bench_function(name, |b| {
        b.iter(|| disk.read_at(&mut buf, offsets()).expect("read"));
    });
    disk.close().expect("close");
}

fn join(c: &mut Criterion, img: &Images) {
    let mut g = c.benchmark_group("join");
    let stripe = Router::new(CLUSTER_BITS, 2).stripe_bytes();
    let stripes = BACKING_BYTES / stripe;
    let mut rng = Rng::new(5);
    // 64 KiB inside one stripe: one part, one core.
    bench_reads(
        &mut g,
        "warm_64k/one_stripe",
        &img.warm,
        warm_options(CacheMode::Writeback),
        64 << 10,
        || rng.below(stripes) * stripe + (1 << 20),
    );
    // 64 KiB straddling a stripe boundary: two parts on the two cores,
    // joined into one completion.
    let mut rng = Rng::new(5);
    bench_reads(
        &mut g,
        "warm_64k/two_stripes",
        &img.warm,
        warm_options(CacheMode::Writeback),
        64 << 10,
        || (rng.below(stripes - 1) + 1) * stripe - (32 << 10),
    );
    g.finish();
}

fn l2_lookup(c: &mut Criterion, img: &Images) {
    let mut g = c.benchmark_group("l2_lookup");
    // The pure step: one 4 KiB block of L2 entries (what a cache block holds).
    let block: Vec<u64> = (0..512u64)
        .map(|i| {
            encode_l2(&L2Entry::Data {
                host: (i + 3) * CLUSTER_BYTES,
            })
        })
        .collect();
    g.throughput(Throughput::Elements(block.len() as u64));
    g.bench_function("decode_block_512", |b| {
        b.iter(|| {
            for &raw in &block {
                black_box(decode_l2(black_box(raw), 3, CLUSTER_BYTES).expect("valid entry"));
            }
        });
    });
    // Through the engine: where one cluster lives, on a warm overlay whose
    // L2 blocks (4 KiB of entries per 512 clusters, 8 blocks for 256 MiB)
    // are all in the cores' caches after the first pass.
    g.throughput(Throughput::Elements(1));
    let disk = Disk::open(&img.warm, warm_options(CacheMode::None)).expect("open");
    disk.block_status(0, disk.size())
        .expect("warming the cache");
    let mut rng = Rng::new(9);
    g.bench_function("block_status_warm", |b| {
        b.iter(|| {
            let off = rng.aligned_offset(BACKING_BYTES, CLUSTER_BYTES);
            black_box(disk.block_status(off, CLUSTER_BYTES).expect("status"))
        });
    });
    disk.close().expect("close");
    g.finish();
}

/// A fresh overlay on the bench's backing file, opened with copy-on-read;
/// `next` is the next cluster never read.
struct ColdDisk<'a> {
    img: &'a Images,
    path: PathBuf,
    disk: Option<Disk>,
    next: u64,
}

impl<'a> ColdDisk<'a> {
    fn new(img: &'a Images) -> ColdDisk<'a> {
        ColdDisk {
            img,
            path: img.dir.join("cold.qcow2"),
            disk: None,
            next: u64::MAX,
        }
    }

    /// The disk and a cluster offset that has never been read: a new
    /// overlay when the current one is used up (untimed by the callers).
    fn cluster(&mut self) -> (&Disk, u64) {
        if self.next >= BACKING_BYTES / CLUSTER_BYTES {
            if let Some(d) = self.disk.take() {
                d.close().expect("close");
            }
            create_overlay(&self.path, &self.img.base).expect("overlay");
            self.disk = Some(Disk::open(&self.path, Options::default()).expect("open"));
            self.next = 0;
        }
        // Spread the fills over both cores' stripes: a stride of 257
        // clusters (coprime with the count) visits every cluster once.
        let clusters = BACKING_BYTES / CLUSTER_BYTES;
        let cluster = (self.next * 257) % clusters;
        self.next += 1;
        (
            self.disk.as_ref().expect("open"),
            cluster * CLUSTER_BYTES + 4096,
        )
    }
}

fn cor_fill(c: &mut Criterion, img: &Images) {
    let mut g = c.benchmark_group("cor_fill");
    let mut cold = ColdDisk::new(img);
    let mut buf = vec![0u8; READ_BYTES];
    // A 4 KiB read of a cluster the overlay lacks: fetched from the
    // backing file and answered; the 64 KiB write-back lands behind it.
    g.bench_function("4k_read_answered", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (disk, off) = cold.cluster();
                let t = Instant::now();
                disk.read_at(&mut buf, off).expect("cold read");
                total += t.elapsed();
            }
            total
        });
    });
    // The whole fill: answered, written back and its L2 entry durable
    // (flush waits for the write-back and commits the metadata).
    g.bench_function("4k_read_and_flush", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (disk, off) = cold.cluster();
                let t = Instant::now();
                disk.read_at(&mut buf, off).expect("cold read");
                disk.flush().expect("flush");
                total += t.elapsed();
            }
            total
        });
    });
    if let Some(d) = cold.disk.take() {
        d.close().expect("close");
    }
    g.finish();
}

fn warm_reads(c: &mut Criterion, img: &Images) {
    let mut g = c.benchmark_group("warm_read_4k");
    for (cache, name) in [
        (CacheMode::None, "o_direct"),
        (CacheMode::Writeback, "buffered"),
    ] {
        let mut rng = Rng::new(11);
        bench_reads(
            &mut g,
            &format!("depth1/{name}"),
            &img.warm,
            warm_options(cache),
            READ_BYTES,
            || rng.aligned_offset(BACKING_BYTES, READ_BYTES as u64),
        );
        // 32 in flight, the buffers recycled: the figure is per read.
        let disk = Disk::open(&img.warm, warm_options(cache)).expect("open");
        let mut rng = Rng::new(13);
        let mut free: Vec<Vec<u8>> = (0..DEPTH).map(|_| vec![0u8; READ_BYTES]).collect();
        let mut pending = VecDeque::with_capacity(DEPTH);
        g.throughput(Throughput::Elements(DEPTH as u64));
        g.bench_function(format!("depth32/{name}"), |b| {
            b.iter(|| {
                for buf in free.drain(..) {
                    let off = rng.aligned_offset(BACKING_BYTES, READ_BYTES as u64);
                    pending.push_back(disk.submit_read(off, buf));
                }
                for p in pending.drain(..) {
                    free.push(p.wait().expect("read"));
                }
            });
        });
        g.throughput(Throughput::Elements(1));
        disk.close().expect("close");
    }
    g.finish();
}

fn disk_benches(c: &mut Criterion) {
    let img = Images::new();
    l2_lookup(c, &img);
    join(c, &img);
    cor_fill(c, &img);
    warm_reads(c, &img);
}

criterion_group! {
    name = pure;
    config = config();
    targets = locks, router
}
criterion_group! {
    name = disk;
    config = config();
    targets = disk_benches
}
criterion_main!(pure, disk);
