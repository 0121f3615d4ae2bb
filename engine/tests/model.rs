//! The concurrency model test: DESIGN.md invariants 3 (writes win) and 4
//! (reads are whole), checked byte by byte against a reference model while
//! 64+ random operations are in flight, concentrated on a few hot clusters.
//!
//! The disk is a qcow2 overlay with copy-on-read over a random raw backing
//! image (smaller than the overlay, neither size a multiple of the cluster
//! size). One driver thread submits reads and writes through the async API
//! (`submit_read` / `submit_write` futures polled by a tiny executor in this
//! file, `submit_read_with` / `submit_write_with` callbacks) and the sync API
//! on a small thread pool (`read_at`, `write_at`, `write_at_fua`,
//! `write_zeroes`, `discard`, `flush`). The hot set is a window of a few clusters that slides over the
//! whole disk, so that fresh, unfilled clusters keep meeting reads (fills),
//! partial writes (merges with backing data) and zeroing at the same time.
//! When the disk has too few clusters for the window to reach a fresh one
//! about every 20 operations, the run is cut into epochs, each on a fresh
//! overlay over the same backing image and each ending with the final checks.
//!
//! ## The model
//!
//! `committed` holds, per byte, the value of the last write that completed
//! (as the driver observed it) — initially the backing bytes, then zeros past
//! the backing image's end. Write-zeroes and discard are writes of zeros.
//! Two writes whose byte ranges overlap are never in flight together (their
//! order would be undefined), so `committed` is always well defined; a write
//! that would overlap one in flight is moved just past it (so writes to
//! different bytes of one cluster do run together), or becomes a read.
//!
//! A read submitted at time `s` and completed at `c` may return, for each
//! byte, the committed value at `s`, or the value of any write that was in
//! flight at some point in `[s, c]` (submitted before `c`, completed after
//! `s`). Anything else — stale backing data after a completed write, zeros
//! from a half-populated cluster, garbage — fails the test with the seed, the
//! operation, the offset and the candidate set. Observed times bracket the
//! real ones, which only ever makes the model more permissive, never wrong.
//!
//! At the end of each epoch: quiesce, read the whole disk and compare it
//! exactly with `committed`; `close()`; `qemu-img check` must be clean,
//! `qemu-img compare` must find the overlay identical to `committed`, and a
//! read-only reopen must read it back.
//!
//! Scale: `BACKFILL_MODEL_OPS` (operations per configuration, default
//! 20000), `BACKFILL_MODEL_QD` (default 64), `BACKFILL_MODEL_MIB` (disk size,
//! default 16), `BACKFILL_MODEL_HANG_SECS` (deadlock detector, default 300).
//! Replay: `BACKFILL_SEED` fixes the operation stream (which writes move or
//! become reads because of an in-flight overlap still depends on timing).

mod common;

use backfill::testing::sim::{Sim, SimConfig};
use backfill::{CacheMode, Completion, Disk, Options};
use common::*;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
struct Config {
    name: &'static str,
    cluster: u64,
    compat: Compat,
    cores: usize,
    cache: CacheMode,
    /// `Options::metadata_cache_bytes`, or 0 for the default.
    metadata_cache_bytes: usize,
    /// Run the cores on the seeded simulated I/O layer (free-running:
    /// completions delayed by up to 8 loop turns and reordered) instead of
    /// io_uring.
    simulated: bool,
    /// An overlay with extended L2 entries (subclusters).
    extended_l2: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Zeroes,
    Discard,
    Flush,
}

/// How a request reaches the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// `submit_read` / `submit_write`, polled as a `Future`.
    Future,
    /// `submit_read_with` / `submit_write_with`, completed by a callback on a
    /// reactor thread.
    Callback,
    /// The blocking call (`read_at`, `write_at`, ...) on a pool thread.
    Sync,
    /// `write_at_fua` on a pool thread.
    SyncFua,
}

/// A write (or zeroing) as the model remembers it.
#[derive(Debug)]
struct WriteRec {
    id: u64,
    kind: Kind,
    api: Api,
    off: u64,
    len: u64,
    /// `None` for write-zeroes and discard.
    data: Option<Arc<Vec<u8>>>,
    submit_seq: u64,
    complete_seq: Option<u64>,
}

impl WriteRec {
    fn covers(&self, abs: u64) -> bool {
        self.off <= abs && abs < self.off + self.len
    }
    fn overlaps(&self, off: u64, len: u64) -> bool {
        self.off < off + len && off < self.off + self.len
    }
    fn value_at(&self, abs: u64) -> u8 {
        match &self.data {
            Some(d) => d[(abs - self.off) as usize],
            None => 0,
        }
    }
}

/// One request in flight.
struct Pending {
    id: u64,
    kind: Kind,
    api: Api,
    off: u64,
    len: u64,
    submit_seq: u64,
    /// For reads: `committed[off..off + len]` at submission.
    snapshot: Option<Vec<u8>>,
    /// For writes: the record shared with the candidate lists.
    write: Option<Arc<WriteRec>>,
    future: Option<Pin<Box<Completion<Vec<u8>>>>>,
    waker: Option<Waker>,
}

enum Event {
    Wake(u64),
    Done(u64, backfill::Result<Vec<u8>>),
}

struct OpWaker {
    id: u64,
    tx: mpsc::Sender<Event>,
}

impl Wake for OpWaker {
    fn wake(self: Arc<Self>) {
        // The driver may have finished and gone: then nobody cares.
        let _ = self.tx.send(Event::Wake(self.id));
    }
}

enum Job {
    Read(u64, u64, u64),
    Write(u64, u64, Arc<Vec<u8>>, bool),
    Zeroes(u64, u64, u64),
    Discard(u64, u64, u64),
    Flush(u64),
}

/// The pool that runs blocking calls, so that they overlap the async ones.
fn spawn_pool(
    disk: &Disk,
    threads: usize,
    tx: &mpsc::Sender<Event>,
) -> (
    crossbeam_channel::Sender<Job>,
    Vec<std::thread::JoinHandle<()>>,
) {
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (disk, jobs, tx) = (disk.clone(), jobs_rx.clone(), tx.clone());
        handles.push(std::thread::spawn(move || {
            for job in jobs {
                let (id, r) = match job {
                    Job::Read(id, off, len) => {
                        let mut buf = vec![0u8; len as usize];
                        (id, disk.read_at(&mut buf, off).map(|()| buf))
                    }
                    Job::Write(id, off, data, fua) => {
                        let r = if fua {
                            disk.write_at_fua(&data, off)
                        } else {
                            disk.write_at(&data, off)
                        };
                        (id, r.map(|()| Vec::new()))
                    }
                    Job::Zeroes(id, off, len) => {
                        (id, disk.write_zeroes(off, len).map(|()| Vec::new()))
                    }
                    Job::Discard(id, off, len) => (id, disk.discard(off, len).map(|()| Vec::new())),
                    Job::Flush(id) => (id, disk.flush().map(|()| Vec::new())),
                };
                if tx.send(Event::Done(id, r)).is_err() {
                    return;
                }
            }
        }));
    }
    (jobs_tx, handles)
}

#[derive(Debug, Default)]
struct Counts {
    ops: u64,
    reads: u64,
    writes: u64,
    zeroes: u64,
    discards: u64,
    flushes: u64,
    /// Writes moved next to an overlapping write in flight (same cluster,
    /// other bytes), so that writes to one cluster do run together.
    moved: u64,
    /// Writes turned into reads because they could not be moved.
    converted: u64,
    /// Read bytes that were not the committed value at submission (so the
    /// candidate set decided): shows that the test does see races.
    raced_bytes: u64,
    max_in_flight: usize,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.ops += o.ops;
        self.reads += o.reads;
        self.writes += o.writes;
        self.zeroes += o.zeroes;
        self.discards += o.discards;
        self.flushes += o.flushes;
        self.moved += o.moved;
        self.converted += o.converted;
        self.raced_bytes += o.raced_bytes;
        self.max_in_flight = self.max_in_flight.max(o.max_in_flight);
    }
}

struct Model {
    cfg: Config,
    seed: u64,
    disk: Disk,
    size: u64,
    backing: Vec<u8>,
    committed: Vec<u8>,
    seq: u64,
    pending: HashMap<u64, Pending>,
    /// Writes in flight (ranges pairwise disjoint).
    writes_in_flight: Vec<Arc<WriteRec>>,
    /// Completed writes that a pending read may still have overlapped, in
    /// completion order.
    recently_completed: VecDeque<Arc<WriteRec>>,
    tx: mpsc::Sender<Event>,
    jobs: crossbeam_channel::Sender<Job>,
    counts: Counts,
}

/// A generated operation: the stream of these depends on the seed only.
struct Gen {
    kind: Kind,
    api: Api,
    off: u64,
    len: u64,
    data_seed: u64,
}

fn generate(rng: &mut Rng, issued: u64, total: u64, size: u64, cs: u64) -> Gen {
    const HOT_CLUSTERS: u64 = 6;
    let clusters = size.div_ceil(cs);
    // The hot window sweeps the whole disk once per run.
    let window = (issued * clusters / total.max(1)).min(clusters - 1);
    let (kind, api) = match rng.below(100) {
        0..=29 => (Kind::Read, Api::Future),
        30..=37 => (Kind::Read, Api::Callback),
        38..=41 => (Kind::Read, Api::Sync),
        42..=62 => (Kind::Write, Api::Future),
        63..=69 => (Kind::Write, Api::Callback),
        70..=74 => (Kind::Write, Api::Sync),
        75 | 76 => (Kind::Write, Api::SyncFua),
        77..=87 => (Kind::Zeroes, Api::Sync),
        88..=98 => (Kind::Discard, Api::Sync),
        _ => (Kind::Flush, Api::Sync),
    };
    let mut off = if rng.percent(85) {
        window * cs + rng.below(HOT_CLUSTERS * cs)
    } else {
        rng.below(size)
    };
    match rng.below(10) {
        0 | 1 => off -= off % cs,
        2 | 3 => off -= off % 512,
        _ => {}
    }
    let off = off.min(size - 1);
    let len = match rng.below(20) {
        0..=6 => rng.range(1, 513),
        7..=12 => rng.range(1, cs + 1),
        13..=16 => rng.range(1, 2 * cs + 1),
        17 | 18 => cs * rng.range(1, 3),
        _ => rng.range(1, 4 * cs + 1),
    }
    .min(size - off);
    Gen {
        kind,
        api,
        off,
        len,
        data_seed: rng.next_u64(),
    }
}

/// Writes that overlapped a read (submitted at `read_submit`, completing now)
/// in time and in space: those in flight now (all submitted before this
/// completion) and those that completed after the read was submitted.
fn candidates<'a>(
    in_flight: &'a [Arc<WriteRec>],
    recently_completed: &'a VecDeque<Arc<WriteRec>>,
    read_submit: u64,
    off: u64,
    len: u64,
) -> Vec<&'a WriteRec> {
    in_flight
        .iter()
        .chain(
            recently_completed
                .iter()
                .filter(|w| w.complete_seq.unwrap() > read_submit),
        )
        .filter(|w| w.overlaps(off, len))
        .map(|w| &**w)
        .collect()
}

/// Judges each byte of a read: legal if it is the committed value at
/// submission (`snap`) or the value of a candidate write covering it.
/// Returns the offsets of illegal bytes and the number of bytes that only a
/// candidate explains.
fn classify(off: u64, buf: &[u8], snap: &[u8], candidates: &[&WriteRec]) -> (Vec<u64>, u64) {
    let mut illegal = Vec::new();
    let mut raced = 0;
    if buf == snap {
        return (illegal, raced);
    }
    for (i, (&got, &was)) in buf.iter().zip(snap).enumerate() {
        if got == was {
            continue;
        }
        let abs = off + i as u64;
        if candidates
            .iter()
            .any(|w| w.covers(abs) && w.value_at(abs) == got)
        {
            raced += 1;
        } else {
            illegal.push(abs);
        }
    }
    (illegal, raced)
}

impl Model {
    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn submit(&mut self, id: u64, g: Gen) {
        let (mut kind, mut api) = (g.kind, g.api);
        let (mut off, len) = (g.off, g.len);
        let is_write = matches!(kind, Kind::Write | Kind::Zeroes | Kind::Discard);
        if is_write {
            // Overlapping writes in flight together have no defined result:
            // move the write just past the one it hits (a few times), else
            // make it a read.
            let mut moves = 0;
            while let Some(w) = self.writes_in_flight.iter().find(|w| w.overlaps(off, len)) {
                off = w.off + w.len;
                moves += 1;
                if moves > 4 || off + len > self.size {
                    break;
                }
            }
            if off + len > self.size || self.writes_in_flight.iter().any(|w| w.overlaps(off, len)) {
                self.counts.converted += 1;
                (kind, api, off) = (Kind::Read, Api::Future, g.off);
            } else if moves > 0 {
                self.counts.moved += 1;
            }
        }
        let submit_seq = self.tick();
        let mut p = Pending {
            id,
            kind,
            api,
            off,
            len,
            submit_seq,
            snapshot: None,
            write: None,
            future: None,
            waker: None,
        };
        self.counts.ops += 1;
        match kind {
            Kind::Read => {
                self.counts.reads += 1;
                p.snapshot = Some(self.committed[off as usize..(off + len) as usize].to_vec());
                match api {
                    Api::Future => {
                        p.future = Some(Box::pin(
                            self.disk.submit_read(off, vec![0u8; len as usize]),
                        ))
                    }
                    Api::Callback => {
                        let tx = self.tx.clone();
                        self.disk
                            .submit_read_with(off, vec![0u8; len as usize], move |r| {
                                let _ = tx.send(Event::Done(id, r));
                            });
                    }
                    _ => self.jobs.send(Job::Read(id, off, len)).unwrap(),
                }
            }
            Kind::Write | Kind::Zeroes | Kind::Discard => {
                let data = (kind == Kind::Write).then(|| {
                    let mut d = vec![0u8; len as usize];
                    Rng::new(g.data_seed).fill(&mut d);
                    Arc::new(d)
                });
                let rec = Arc::new(WriteRec {
                    id,
                    kind,
                    api,
                    off,
                    len,
                    data: data.clone(),
                    submit_seq,
                    complete_seq: None,
                });
                self.writes_in_flight.push(rec.clone());
                p.write = Some(rec);
                match (kind, api) {
                    (Kind::Write, Api::Future) => {
                        self.counts.writes += 1;
                        let buf = data.as_deref().unwrap().clone();
                        p.future = Some(Box::pin(self.disk.submit_write(off, buf)));
                    }
                    (Kind::Write, Api::Callback) => {
                        self.counts.writes += 1;
                        let tx = self.tx.clone();
                        let buf = data.as_deref().unwrap().clone();
                        self.disk.submit_write_with(off, buf, move |r| {
                            let _ = tx.send(Event::Done(id, r));
                        });
                    }
                    (Kind::Write, _) => {
                        self.counts.writes += 1;
                        let fua = api == Api::SyncFua;
                        self.jobs
                            .send(Job::Write(id, off, data.unwrap(), fua))
                            .unwrap();
                    }
                    (Kind::Zeroes, _) => {
                        self.counts.zeroes += 1;
                        self.jobs.send(Job::Zeroes(id, off, len)).unwrap();
                    }
                    _ => {
                        self.counts.discards += 1;
                        self.jobs.send(Job::Discard(id, off, len)).unwrap();
                    }
                }
            }
            Kind::Flush => {
                self.counts.flushes += 1;
                self.jobs.send(Job::Flush(id)).unwrap();
            }
        }
        if p.future.is_some() {
            p.waker = Some(Waker::from(Arc::new(OpWaker {
                id,
                tx: self.tx.clone(),
            })));
        }
        self.pending.insert(id, p);
        self.counts.max_in_flight = self.counts.max_in_flight.max(self.pending.len());
        if self.pending[&id].future.is_some() {
            self.poll(id);
        }
    }

    /// Polls a future-based request; completes it when ready.
    fn poll(&mut self, id: u64) {
        let Some(p) = self.pending.get_mut(&id) else {
            return; // A late or spurious wake-up.
        };
        let waker = p.waker.clone().expect("future ops have a waker");
        let fut = p.future.as_mut().expect("future op");
        if let Poll::Ready(r) = fut.as_mut().poll(&mut Context::from_waker(&waker)) {
            self.complete(id, r);
        }
    }

    fn complete(&mut self, id: u64, result: backfill::Result<Vec<u8>>) {
        let p = self
            .pending
            .remove(&id)
            .unwrap_or_else(|| panic!("completion for unknown request {id}"));
        let complete_seq = self.tick();
        let buf = result.unwrap_or_else(|e| {
            panic!(
                "{}: {:?} {:?} #{id} at {}+{} failed: {e} ({:?}) (seed {:#x})",
                self.cfg.name,
                p.kind,
                p.api,
                p.off,
                p.len,
                e.kind(),
                self.seed
            )
        });
        match p.kind {
            Kind::Read => {
                assert_eq!(
                    buf.len() as u64,
                    p.len,
                    "read #{id}: buffer came back resized"
                );
                self.check_read(&p, &buf, complete_seq);
            }
            Kind::Write | Kind::Zeroes | Kind::Discard => {
                let rec = p.write.as_ref().unwrap();
                if let (Some(data), Api::Future | Api::Callback) = (&rec.data, p.api) {
                    assert!(
                        buf == **data,
                        "write #{id}: the engine gave back a different buffer (seed {:#x})",
                        self.seed
                    );
                }
                let range = p.off as usize..(p.off + p.len) as usize;
                match &rec.data {
                    Some(d) => self.committed[range].copy_from_slice(d),
                    None => self.committed[range].fill(0),
                }
                let pos = self
                    .writes_in_flight
                    .iter()
                    .position(|w| w.id == id)
                    .expect("write in flight");
                self.writes_in_flight.swap_remove(pos);
                let done = Arc::new(WriteRec {
                    id,
                    kind: rec.kind,
                    api: rec.api,
                    off: rec.off,
                    len: rec.len,
                    data: rec.data.clone(),
                    submit_seq: rec.submit_seq,
                    complete_seq: Some(complete_seq),
                });
                self.recently_completed.push_back(done);
            }
            Kind::Flush => {}
        }
        self.prune();
    }

    /// Forgets completed writes that no pending read overlapped in time.
    fn prune(&mut self) {
        let oldest_read = self
            .pending
            .values()
            .filter(|p| p.kind == Kind::Read)
            .map(|p| p.submit_seq)
            .min()
            .unwrap_or(u64::MAX);
        while let Some(w) = self.recently_completed.front() {
            if w.complete_seq.unwrap() < oldest_read {
                self.recently_completed.pop_front();
            } else {
                break;
            }
        }
    }

    fn check_read(&mut self, p: &Pending, buf: &[u8], complete_seq: u64) {
        let snap = p.snapshot.as_ref().unwrap();
        let candidates = candidates(
            &self.writes_in_flight,
            &self.recently_completed,
            p.submit_seq,
            p.off,
            p.len,
        );
        let (illegal, raced) = classify(p.off, buf, snap, &candidates);
        self.counts.raced_bytes += raced;
        if illegal.is_empty() {
            return;
        }
        let abs = illegal[0];
        let i = (abs - p.off) as usize;
        let run = illegal.windows(2).take_while(|w| w[1] == w[0] + 1).count() + 1;
        let backing = match self.backing.get(abs as usize) {
            Some(b) => format!("{b:#04x}"),
            None => "none (past its end)".to_string(),
        };
        let mut msg = format!(
            "{name}: ILLEGAL READ (seed {seed:#x}; replay with BACKFILL_SEED={seed:#x})\n\
             read #{id} via {api:?} of {off}+{len} (submitted at seq {s}, completed at seq {c})\n\
             {n} illegal bytes; the first at offset {abs} (cluster {cl}, +{within} in it), \
             a run of {run}\n\
             got {got:#04x}; committed at submission {was:#04x}; committed now {now:#04x}; \
             backing {backing}\n\
             candidates covering {abs}:",
            name = self.cfg.name,
            seed = self.seed,
            id = p.id,
            api = p.api,
            off = p.off,
            len = p.len,
            s = p.submit_seq,
            c = complete_seq,
            n = illegal.len(),
            cl = abs / self.cfg.cluster,
            within = abs % self.cfg.cluster,
            got = buf[i],
            was = p.snapshot.as_ref().unwrap()[i],
            now = self.committed[abs as usize],
        );
        for w in candidates.iter().filter(|w| w.covers(abs)) {
            msg += &format!(
                "\n  {:?} #{} via {:?} of {}+{} (submitted {}, completed {:?}) value {:#04x}",
                w.kind,
                w.id,
                w.api,
                w.off,
                w.len,
                w.submit_seq,
                w.complete_seq,
                w.value_at(abs)
            );
        }
        panic!("{msg}");
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Wake(id) => self.poll(id),
            Event::Done(id, r) => self.complete(id, r),
        }
    }
}

fn run(cfg: Config) {
    let seed = seed_from_env(&format!("model::{}", cfg.name));
    let total = env_u64("BACKFILL_MODEL_OPS", 20_000);
    let qd = env_u64("BACKFILL_MODEL_QD", 64) as usize;
    let mib = env_u64("BACKFILL_MODEL_MIB", 16);
    let mut rng = Rng::new(seed);

    let dir = tempdir(cfg.name);
    let backing_path = dir.path().join("backing.raw");
    // Neither size is a multiple of the cluster size; the backing image ends
    // before the overlay does.
    let backing_size = mib * MIB - 2560;
    let size = mib * MIB + 7680;
    let backing = write_random_file(&backing_path, backing_size, rng.next_u64());

    // A cluster races with its fill only while it is new, so the hot window
    // should meet fresh clusters often: about every 20 operations. When the
    // disk has too few clusters for that, the run is cut into epochs, each
    // on a fresh overlay over the same backing image (and each ending with
    // the full set of final checks).
    let clusters = size.div_ceil(cfg.cluster);
    let epochs = (total / (clusters * 20)).clamp(1, 64);
    let mut counts = Counts::default();
    let mut stats = Vec::new();
    for epoch in 0..epochs {
        let ops = total / epochs + if epoch == 0 { total % epochs } else { 0 };
        let overlay = dir.path().join(format!("overlay-{epoch}.qcow2"));
        let c = run_epoch(
            &cfg,
            seed,
            &mut rng,
            &backing_path,
            &backing,
            &overlay,
            size,
            ops,
            qd,
        );
        counts.add(&c.0);
        stats.push(c.1);
        std::fs::remove_file(&overlay).expect("removing the epoch's overlay");
    }
    let sum = |f: fn(&backfill::Stats) -> u64| stats.iter().map(f).sum::<u64>();
    eprintln!(
        "model::{}: seed {seed:#x}: {} ops in {epochs} epoch(s) ({} reads, {} writes, \
         {} write-zeroes, {} discards, {} flushes; {} writes moved, {} became reads), \
         max {} in flight, {} read bytes decided by races; engine: {} CoR fills, {} zero fills, \
         {} dedup hits, {} misses, {} overlay hits",
        cfg.name,
        counts.ops,
        counts.reads,
        counts.writes,
        counts.zeroes,
        counts.discards,
        counts.flushes,
        counts.moved,
        counts.converted,
        counts.max_in_flight,
        counts.raced_bytes,
        sum(|s| s.cor_fills),
        sum(|s| s.cor_zero_fills),
        sum(|s| s.dedup_hits),
        sum(|s| s.misses),
        sum(|s| s.overlay_hits),
    );
    assert_eq!(counts.ops, total, "every operation ran");
}

/// One fresh overlay over `backing`, driven with `ops` operations, then
/// checked against the model: full read, close, `qemu-img check`,
/// `qemu-img compare`, and a read-only reopen.
#[allow(clippy::too_many_arguments)]
fn run_epoch(
    cfg: &Config,
    seed: u64,
    rng: &mut Rng,
    backing_path: &Path,
    backing: &[u8],
    overlay: &Path,
    size: u64,
    ops: u64,
    qd: usize,
) -> (Counts, backfill::Stats) {
    let hang = Duration::from_secs(env_u64("BACKFILL_MODEL_HANG_SECS", 300));
    let b = Backing {
        name: path_str(backing_path),
        format: "raw",
    };
    if cfg.extended_l2 {
        backfill::create(
            overlay,
            &backfill::CreateOptions {
                size: Some(size),
                backing: Some(b.name.clone()),
                backing_format: Some("raw".into()),
                cluster_size: cfg.cluster as u32,
                extended_l2: true,
                ..backfill::CreateOptions::default()
            },
        )
        .expect("creating an overlay with extended L2 entries");
    } else {
        create_qcow2(overlay, size, cfg.cluster, cfg.compat, Some(&b));
    }
    let mut committed = backing.to_vec();
    committed.resize(size as usize, 0);

    let disk = open(
        overlay,
        Options {
            cores: cfg.cores,
            copy_on_read: true,
            cache: cfg.cache,
            metadata_cache_bytes: if cfg.metadata_cache_bytes == 0 {
                Options::default().metadata_cache_bytes
            } else {
                cfg.metadata_cache_bytes
            },
            sim: cfg.simulated.then(|| {
                Sim::new(SimConfig {
                    seed,
                    lockstep: false,
                    max_delay_turns: 8,
                    ..SimConfig::default()
                })
            }),
            ..Options::default()
        },
    );
    assert_eq!(disk.size(), size);
    assert_eq!(disk.cluster_size(), cfg.cluster);
    let (tx, rx) = mpsc::channel();
    let (jobs, pool) = spawn_pool(&disk, 8, &tx);
    let mut m = Model {
        cfg: *cfg,
        seed,
        disk: disk.clone(),
        size,
        backing: backing.to_vec(),
        committed,
        seq: 0,
        pending: HashMap::new(),
        writes_in_flight: Vec::new(),
        recently_completed: VecDeque::new(),
        tx,
        jobs,
        counts: Counts::default(),
    };

    let mut issued = 0;
    while issued < ops || !m.pending.is_empty() {
        while issued < ops && m.pending.len() < qd {
            let g = generate(rng, issued, ops, m.size, cfg.cluster);
            m.submit(issued, g);
            issued += 1;
        }
        if m.pending.is_empty() {
            continue;
        }
        // Not a timing assertion: a deadlock detector, so that a hung engine
        // fails with the list of stuck requests instead of hanging CI.
        let ev = rx.recv_timeout(hang).unwrap_or_else(|_| {
            let mut stuck: Vec<_> = m
                .pending
                .values()
                .map(|p| format!("#{} {:?} {:?} {}+{}", p.id, p.kind, p.api, p.off, p.len))
                .collect();
            stuck.sort();
            panic!(
                "{}: no completion for {hang:?} with {} requests in flight (seed {seed:#x}): {stuck:?}",
                cfg.name,
                stuck.len()
            )
        });
        m.handle(ev);
        // Drain what else is ready before refilling the queue.
        while let Ok(ev) = rx.try_recv() {
            m.handle(ev);
        }
    }

    // Quiesced: the disk must equal the committed state exactly.
    disk.flush().expect("final flush");
    assert_eq!(
        disk.stats().in_flight,
        0,
        "requests in flight after quiescing"
    );
    assert_same_bytes(
        &read_all(&disk, 4 * MIB + 512),
        &m.committed,
        &format!("{}: final full read vs model (seed {seed:#x})", cfg.name),
    );
    let counts = std::mem::take(&mut m.counts);
    let committed = std::mem::take(&mut m.committed);
    // Every clone of the handle is gone before close(): the model's, and the
    // pool's (its threads end when the job channel closes).
    drop(m);
    for t in pool {
        t.join().expect("pool thread");
    }
    let observer = disk.clone();
    disk.close().expect("close");
    let stats = observer.stats();
    drop(observer);
    assert!(
        counts.max_in_flight >= qd.min(ops as usize),
        "the driver never reached queue depth {qd}"
    );

    check_clean(overlay);
    let dir = overlay.parent().unwrap();
    compare_with_bytes(overlay, &committed, dir);
    let disk = open(overlay, options(2, false, true));
    assert_same_bytes(&read_all(&disk, 4 * MIB), &committed, "read after reopen");
    disk.close().expect("close");
    (counts, stats)
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn model_64k_two_cores() {
    run(Config {
        name: "64k_two_cores",
        cluster: 64 * KIB,
        compat: Compat::V3,
        cores: 2,
        cache: CacheMode::None,
        metadata_cache_bytes: 0,
        simulated: false,
        extended_l2: false,
    });
}

#[test]
fn model_4k_two_cores() {
    run(Config {
        name: "4k_two_cores",
        cluster: 4 * KIB,
        compat: Compat::V3,
        cores: 2,
        cache: CacheMode::None,
        metadata_cache_bytes: 0,
        simulated: false,
        extended_l2: false,
    });
}

#[test]
fn model_64k_all_cores_writeback() {
    run(Config {
        name: "64k_all_cores_writeback",
        cluster: 64 * KIB,
        compat: Compat::V3,
        cores: available_cores(),
        cache: CacheMode::Writeback,
        metadata_cache_bytes: 0,
        simulated: false,
        extended_l2: false,
    });
}

/// A metadata cache of two L2 blocks per core: blocks are evicted and
/// loaded again all the time, while fills and writes publish into them.
#[test]
fn model_4k_tiny_metadata_cache() {
    run(Config {
        name: "4k_tiny_metadata_cache",
        cluster: 4 * KIB,
        compat: Compat::V3,
        cores: 2,
        cache: CacheMode::None,
        metadata_cache_bytes: 1,
        simulated: false,
        extended_l2: false,
    });
}

/// The same races on the simulated I/O layer: completions come back late
/// and out of order, as a loaded device returns them.
#[test]
fn model_4k_two_cores_simulated() {
    run(Config {
        name: "4k_two_cores_simulated",
        cluster: 4 * KIB,
        compat: Compat::V3,
        cores: 2,
        cache: CacheMode::None,
        metadata_cache_bytes: 0,
        simulated: true,
        extended_l2: false,
    });
}

/// compat 0.10 has no zero clusters: zeroing over backing data must write
/// zeroed data clusters, a different path for the same races.
#[test]
fn model_64k_compat_v2() {
    run(Config {
        name: "64k_compat_v2",
        cluster: 64 * KIB,
        compat: Compat::V2,
        cores: 2,
        cache: CacheMode::None,
        metadata_cache_bytes: 0,
        simulated: false,
        extended_l2: false,
    });
}

/// Extended L2 entries: fills and writes of parts of a cluster (4 KiB
/// granules of two 2 KiB subclusters) race with each other and with
/// write-zeroes and discards of whole subclusters.
#[test]
fn model_64k_extended_l2() {
    run(Config {
        name: "64k_extended_l2",
        cluster: 64 * KIB,
        compat: Compat::V3,
        cores: 2,
        cache: CacheMode::None,
        metadata_cache_bytes: 0,
        simulated: false,
        extended_l2: true,
    });
}

/// 512-byte subclusters (16 KiB clusters), on the simulated layer with
/// late, reordered completions.
#[test]
fn model_16k_extended_l2_simulated() {
    run(Config {
        name: "16k_extended_l2_simulated",
        cluster: 16 * KIB,
        compat: Compat::V3,
        cores: 2,
        cache: CacheMode::None,
        metadata_cache_bytes: 0,
        simulated: true,
        extended_l2: true,
    });
}

/// The checker itself must reject what the engine must never do, or a green
/// run means nothing.
#[test]
fn model_checker_rejects_stale_reads() {
    let rec = |id, off, data: Option<Vec<u8>>, submit_seq, complete_seq| {
        Arc::new(WriteRec {
            id,
            kind: if data.is_some() {
                Kind::Write
            } else {
                Kind::Zeroes
            },
            api: Api::Future,
            off,
            len: data.as_ref().map_or(4, |d| d.len() as u64),
            data: data.map(Arc::new),
            submit_seq,
            complete_seq,
        })
    };
    // Write #1 of 7s at 10..14, seq 2..5; zeroing #2 at 12..16, seq 6..8;
    // write #3 of 9s at 20..22, in flight since seq 9.
    let completed: VecDeque<_> = [
        rec(1, 10, Some(vec![7; 4]), 2, Some(5)),
        rec(2, 12, None, 6, Some(8)),
    ]
    .into();
    let in_flight = vec![rec(3, 20, Some(vec![9; 2]), 9, None)];
    let judge = |read_submit: u64, snap: &[u8], buf: &[u8]| -> Vec<u64> {
        let c = candidates(&in_flight, &completed, read_submit, 8, snap.len() as u64);
        classify(8, buf, snap, &c).0
    };
    // A read of 8..24 submitted at seq 3 (before #1 completed) may see old
    // bytes, #1's 7s, #2's zeros, #3's 9s, in any per-byte mix.
    let old = [0xAA; 16];
    assert!(judge(3, &old, &old).is_empty());
    let mut mixed = old;
    mixed[2..6].copy_from_slice(&[7, 7, 0, 7]);
    mixed[12] = 9;
    assert!(judge(3, &old, &mixed).is_empty());
    // Zeros outside any zeroing, or 9s outside #3: illegal.
    let mut bad = old;
    bad[0] = 0;
    bad[15] = 9;
    assert_eq!(judge(3, &old, &bad), vec![8, 23]);
    // Submitted at seq 9 (after #1 and #2 completed): 10..12 must be 7s and
    // 12..16 zeros; stale backing bytes there are illegal.
    let mut committed = old;
    committed[2..4].fill(7);
    committed[4..8].fill(0);
    assert!(judge(9, &committed, &committed).is_empty());
    let mut stale = committed;
    stale[3] = 0xAA;
    stale[5] = 7;
    assert_eq!(judge(9, &committed, &stale), vec![11, 13]);
}
