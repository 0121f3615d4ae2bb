//! A seeded workload on the simulated I/O layer, its reference model, and
//! crash replay (DESIGN.md invariants 3, 4 and 5).
//!
//! [`run`] builds a raw backing image and a qcow2 overlay over it, opens the
//! overlay on a lockstep [`Sim`], and drives random reads (copy-on-read
//! fills), writes, write-zeroes, discards and flushes at a queue depth,
//! concentrated on a sliding window of hot clusters. Every sector a write
//! puts down names its write (a version number and the sector's address,
//! then bytes derived from both), so any sector read back says which write
//! it came from, or that it is backing data, zeros, or garbage.
//!
//! **The model.** Per sector, the writes that touched it, in submission
//! order (two writes that overlap are never in flight together, so that
//! order is the order they take effect). A read may return, per sector, the
//! last write that succeeded before it was submitted, or any later write
//! submitted before it completed (failed ones included: a failed write may
//! have landed in part). Zeroes and discards write version 0 (zeros).
//!
//! **Crash points.** At journal position `k`, a write is *durable* if it
//! succeeded before a flush was submitted that completed at or before `k`.
//! The crash image must read, per sector, as the last durable write to it
//! (or the backing data if none), or as any later write submitted before
//! `k`. [`Run::check_crash`] builds the image (see [`Journal::crash_image`]),
//! runs the caller's independent check on it (the tests use `qemu-img
//! check`), opens it with the engine, which must succeed, and reads every
//! sector against that rule.

use super::sim::{Faults, Journal, Landing, Sim, SimConfig};
use crate::{CacheMode, Disk, Options};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const SECTOR: u64 = 512;

/// A workload's shape. Everything random in it follows `seed`.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub seed: u64,
    /// Operations to complete.
    pub ops: usize,
    /// Operations in flight at most.
    pub queue_depth: usize,
    /// Virtual size of the overlay (a multiple of 512, not of the cluster).
    pub disk_bytes: u64,
    /// Size of the raw backing image (a multiple of 512; smaller than the disk).
    pub backing_bytes: u64,
    pub cluster_size: u32,
    /// Extended L2 entries (subclusters) in the overlay.
    pub extended_l2: bool,
    pub cores: usize,
    pub max_delay_turns: u32,
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            seed: 1,
            ops: 400,
            queue_depth: 16,
            disk_bytes: (4 << 20) + 3 * SECTOR,
            backing_bytes: (3 << 20) + 5 * SECTOR,
            cluster_size: 4096,
            extended_l2: false,
            cores: 2,
            max_delay_turns: 4,
            faults: Faults::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Zero,
    Discard,
    Flush,
}

/// One operation as the driver saw it.
#[derive(Debug, Clone)]
pub struct OpRec {
    pub kind: Kind,
    /// A write with FUA: a flush follows its completion.
    pub fua: bool,
    pub offset: u64,
    pub len: u64,
    /// Driver time of submission and of completion.
    pub submit_t: u64,
    pub ack_t: Option<u64>,
    /// Journal positions at submission and completion.
    pub submit_pos: usize,
    pub ack_pos: Option<usize>,
    pub ok: bool,
}

/// What a run did, for the test's output.
#[derive(Debug, Clone, Copy, Default)]
pub struct Report {
    pub ops: usize,
    pub reads_checked: usize,
    pub fua_writes: usize,
    pub failed_ops: usize,
    pub steps: u64,
    /// A metadata write failed, so the image refused writes from then on.
    pub poisoned: bool,
    pub journal_entries: usize,
    pub syncs: usize,
    pub sim: super::sim::SimStats,
}

/// A finished run: what is needed to replay crashes at any point of it.
pub struct Run {
    pub cfg: Config,
    pub dir: PathBuf,
    pub overlay: PathBuf,
    /// The overlay file before the run (the journal starts from it).
    pub base: Vec<u8>,
    pub journal: Journal,
    pub ops: Vec<OpRec>,
    /// Per sector: the writes (op indexes) that touched it, in order.
    hist: Vec<Vec<u32>>,
    initial: Vec<u32>,
    pub report: Report,
}

/// Version numbers: 0 zeros, 1 backing data, 2 + i the write of op i.
const V_ZERO: u32 = 0;
const V_BACKING: u32 = 1;

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The 512 bytes version `v` (not 0) puts at sector `lba`.
pub fn sector_bytes(v: u32, lba: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), SECTOR as usize);
    out[..4].copy_from_slice(&v.to_le_bytes());
    out[4..12].copy_from_slice(&lba.to_le_bytes());
    let mut x = mix((u64::from(v) << 40) ^ lba);
    for chunk in out[12..].chunks_mut(8) {
        x = mix(x);
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Which version a sector read back holds; `None` for anything else.
pub fn decode(sector: &[u8], lba: u64) -> Option<u32> {
    if sector.iter().all(|&b| b == 0) {
        return Some(V_ZERO);
    }
    let v = u32::from_le_bytes(sector[..4].try_into().unwrap());
    let mut want = [0u8; SECTOR as usize];
    sector_bytes(v, lba, &mut want);
    (v != V_ZERO && sector == want).then_some(v)
}

/// Whether backing sector `lba` is one of the all-zero stretches (so that
/// copy-on-read meets zero clusters).
fn backing_zero(lba: u64) -> bool {
    (lba / 128) % 7 == 3
}

fn version_of(op: usize, kind: Kind) -> u32 {
    match kind {
        Kind::Write => 2 + op as u32,
        _ => V_ZERO,
    }
}

/// A completion reported by a callback on a core thread.
struct Done {
    op: usize,
    ok: bool,
    data: Option<Vec<u8>>,
    pos: usize,
}

/// Runs the workload of `cfg` in `dir` (which it fills) and checks every
/// read against the model, then closes the disk and checks the whole final
/// image against it too.
pub fn run(dir: &Path, cfg: &Config) -> Result<Run, String> {
    run_with(dir, cfg, None)
}

/// Where the workload's choices come from: the seed, or the bytes of a fuzz
/// input (two bytes a choice; the workload ends when they run out).
struct Draws<'a> {
    rng: StdRng,
    bytes: Option<&'a [u8]>,
    exhausted: bool,
}

impl Draws<'_> {
    /// A number below `n`.
    fn below(&mut self, n: u64) -> u64 {
        match &mut self.bytes {
            None => self.rng.random_range(0..n),
            Some(b) if b.len() >= 2 => {
                let v = u64::from(u16::from_le_bytes([b[0], b[1]]));
                *b = &b[2..];
                v % n
            }
            Some(_) => {
                self.exhausted = true;
                0
            }
        }
    }
}

/// [`run`] with the workload's choices taken from `bytes` when given.
pub fn run_with(dir: &Path, cfg: &Config, bytes: Option<&[u8]>) -> Result<Run, String> {
    let fail = |m: String| format!("seed {}: {m}", cfg.seed);
    assert!(cfg.disk_bytes.is_multiple_of(SECTOR) && cfg.backing_bytes.is_multiple_of(SECTOR));
    let sectors = cfg.disk_bytes / SECTOR;
    // The backing image and the model's initial versions.
    let mut backing = vec![0u8; cfg.backing_bytes as usize];
    let mut initial = vec![V_ZERO; sectors as usize];
    for (lba, s) in backing.chunks_mut(SECTOR as usize).enumerate() {
        let lba = lba as u64;
        if !backing_zero(lba) {
            sector_bytes(V_BACKING, lba, s);
            if lba < sectors {
                initial[lba as usize] = V_BACKING;
            }
        }
    }
    std::fs::write(dir.join("backing.raw"), &backing).map_err(|e| e.to_string())?;
    let overlay = dir.join("overlay.qcow2");
    crate::create(
        &overlay,
        &crate::CreateOptions {
            size: Some(cfg.disk_bytes),
            backing: Some("backing.raw".into()),
            backing_format: Some("raw".into()),
            cluster_size: cfg.cluster_size,
            extended_l2: cfg.extended_l2,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let base = std::fs::read(&overlay).map_err(|e| e.to_string())?;

    let sim = Sim::new(SimConfig {
        seed: cfg.seed,
        lockstep: true,
        max_delay_turns: cfg.max_delay_turns,
        faults: cfg.faults,
    });
    let disk = Disk::open(
        &overlay,
        Options {
            cores: cfg.cores,
            sim: Some(sim.clone()),
            ..Options::default()
        },
    )
    .map_err(|e| fail(format!("open: {e}")))?;
    // On any early return, the cores must run freely again, or dropping
    // the disk (which waits for them) would wait for turns forever.
    let _unlock = FreeRunOnDrop(sim.clone());

    let mut d = Draws {
        rng: StdRng::seed_from_u64(mix(cfg.seed ^ 0x5eed)),
        bytes,
        exhausted: false,
    };
    let mut ops: Vec<OpRec> = Vec::with_capacity(cfg.ops);
    let mut hist: Vec<Vec<u32>> = vec![Vec::new(); sectors as usize];
    let done: Arc<Mutex<Vec<Done>>> = Arc::new(Mutex::new(Vec::new()));
    let mut in_flight: Vec<usize> = Vec::new();
    let mut t: u64 = 0;
    let mut report = Report::default();
    let cs = u64::from(cfg.cluster_size);
    let clusters = cfg.disk_bytes.div_ceil(cs);
    // The hot window: a few clusters that slide over the disk.
    let window = 6u64.min(clusters);
    let mut window_at = 0u64;
    let mut idle_steps = 0u64;
    // Flushes owed to FUA writes that completed, submitted before anything else.
    let mut fua_flushes = 0usize;

    while (ops.len() < cfg.ops && !d.exhausted) || !in_flight.is_empty() || fua_flushes > 0 {
        // Submit up to the queue depth.
        while (fua_flushes > 0 || (ops.len() < cfg.ops && !d.exhausted))
            && in_flight.len() < cfg.queue_depth
        {
            if d.below(16) == 0 {
                window_at = (window_at + 1) % (clusters - window + 1);
            }
            let roll = d.below(100);
            let mut kind = match roll {
                0..45 => Kind::Read,
                45..75 => Kind::Write,
                75..81 => Kind::Zero,
                81..87 => Kind::Discard,
                _ => Kind::Flush,
            };
            // FUA (as NBD clients send it): a write whose completion is
            // followed at once by a flush, which makes it durable.
            let fua = kind == Kind::Write && roll >= 70;
            if fua_flushes > 0 {
                fua_flushes -= 1;
                kind = Kind::Flush;
            }
            let (offset, len) = {
                let start = window_at * cs + d.below(window * cs / SECTOR) * SECTOR;
                let max = if d.below(4) == 0 { 3 * cs } else { cs };
                let len = ((1 + d.below(max / SECTOR)) * SECTOR)
                    .min(cfg.disk_bytes - start.min(cfg.disk_bytes));
                if len == 0 {
                    (0, SECTOR)
                } else {
                    (start, len)
                }
            };
            let changes = matches!(kind, Kind::Write | Kind::Zero | Kind::Discard);
            if changes
                && in_flight.iter().any(|&i| {
                    let o = &ops[i];
                    matches!(o.kind, Kind::Write | Kind::Zero | Kind::Discard)
                        && o.offset < offset + len
                        && offset < o.offset + o.len
                })
            {
                // Overlapping writes in flight together have no order.
                kind = Kind::Read;
            }
            let id = ops.len();
            t += 1;
            ops.push(OpRec {
                kind,
                fua: fua && kind == Kind::Write,
                offset,
                len,
                submit_t: t,
                ack_t: None,
                submit_pos: sim.position(),
                ack_pos: None,
                ok: false,
            });
            if kind != Kind::Read && kind != Kind::Flush {
                for lba in offset / SECTOR..(offset + len) / SECTOR {
                    hist[lba as usize].push(id as u32);
                }
            }
            in_flight.push(id);
            submit(&disk, &sim, &done, id, kind, offset, len);
        }
        if !sim.step() {
            return Err(fail("every core ended during the workload".into()));
        }
        report.steps += 1;
        let finished: Vec<Done> = std::mem::take(&mut *done.lock().unwrap());
        if finished.is_empty() {
            idle_steps += 1;
            if idle_steps > 200_000 {
                return Err(fail(format!(
                    "no completion in {idle_steps} turns: hung with {} in flight (ops {:?})",
                    in_flight.len(),
                    in_flight.iter().map(|&i| &ops[i]).collect::<Vec<_>>()
                )));
            }
            continue;
        }
        idle_steps = 0;
        for d in finished {
            t += 1;
            let o = &mut ops[d.op];
            o.ack_t = Some(t);
            o.ack_pos = Some(d.pos);
            o.ok = d.ok;
            if o.fua && o.ok {
                fua_flushes += 1;
                report.fua_writes += 1;
            }
            in_flight.retain(|&i| i != d.op);
            if !d.ok {
                report.failed_ops += 1;
            }
            if let Some(data) = d.data {
                check_read(&ops, &hist, &initial, d.op, &data).map_err(&fail)?;
                report.reads_checked += 1;
            }
        }
    }
    report.ops = ops.len();

    // A final flush in lockstep, then close running freely (close blocks
    // until the cores end, so it cannot be stepped from this thread; after
    // the flush the cores have nothing left to write, so the journal stays
    // a function of the seed).
    sim.set_faults(false);
    report.sim = sim.stats();
    let flushed = Arc::new(Mutex::new(None));
    let f2 = flushed.clone();
    disk.submit_flush_with(move |r| *f2.lock().unwrap() = Some(r));
    while flushed.lock().unwrap().is_none() {
        if !sim.step() {
            return Err(fail("every core ended during the final flush".into()));
        }
    }
    let r = flushed.lock().unwrap().take().expect("flushed");
    // A failed metadata write poisons the image (no more writes, no flush,
    // by design): then the image as closed is checked like a crash image.
    let poisoned = match r {
        Ok(()) => false,
        Err(e) if e.kind() == crate::ErrorKind::Poisoned && report.sim.overlay_enospc > 0 => true,
        Err(e) => return Err(fail(format!("final flush: {e}"))),
    };
    report.poisoned = poisoned;
    sim.free_run();
    let closed = disk.close();
    if !poisoned {
        closed.map_err(|e| fail(format!("close: {e}")))?;
    }
    let journal = sim.journal();
    report.journal_entries = journal.len();
    report.syncs = journal
        .entries
        .iter()
        .filter(|e| matches!(e, super::sim::Entry::Sync { .. }))
        .count();
    let run = Run {
        cfg: *cfg,
        dir: dir.to_path_buf(),
        overlay,
        base,
        journal,
        ops,
        hist,
        initial,
        report,
    };
    // The image as closed is one more crash point: everything is durable
    // (unless the image was poisoned).
    let cut = if poisoned {
        run.flush_cut(run.journal.len())
    } else {
        u64::MAX
    };
    run.check_image(&run.overlay, run.journal.len(), cut, &mut |_| Ok(()))
        .map_err(|e| fail(format!("after close: {e}")))?;
    Ok(run)
}

struct FreeRunOnDrop(Arc<Sim>);

impl Drop for FreeRunOnDrop {
    fn drop(&mut self) {
        self.0.free_run();
    }
}

fn submit(
    disk: &Disk,
    sim: &Arc<Sim>,
    done: &Arc<Mutex<Vec<Done>>>,
    op: usize,
    kind: Kind,
    offset: u64,
    len: u64,
) {
    let (d, s) = (done.clone(), sim.clone());
    let finish = move |ok: bool, data: Option<Vec<u8>>| {
        let pos = s.position();
        d.lock().unwrap().push(Done { op, ok, data, pos });
    };
    match kind {
        Kind::Read => disk.submit_read_with(offset, vec![0u8; len as usize], move |r| match r {
            Ok(v) => finish(true, Some(v)),
            Err(_) => finish(false, None),
        }),
        Kind::Write => {
            let mut buf = vec![0u8; len as usize];
            for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
                sector_bytes(version_of(op, kind), offset / SECTOR + i as u64, s);
            }
            disk.submit_write_with(offset, buf, move |r| finish(r.is_ok(), None))
        }
        Kind::Zero => disk.submit_zeroes_with(offset, len, move |r| finish(r.is_ok(), None)),
        Kind::Discard => disk.submit_discard_with(offset, len, move |r| finish(r.is_ok(), None)),
        Kind::Flush => disk.submit_flush_with(move |r| finish(r.is_ok(), None)),
    }
}

/// Invariants 3 and 4: every sector of read `op` is a version it may see.
fn check_read(
    ops: &[OpRec],
    hist: &[Vec<u32>],
    initial: &[u32],
    op: usize,
    data: &[u8],
) -> Result<(), String> {
    let r = &ops[op];
    let ack_t = r.ack_t.expect("completed");
    for (i, sector) in data.chunks(SECTOR as usize).enumerate() {
        let lba = r.offset / SECTOR + i as u64;
        // The last write that succeeded before the read was submitted, or
        // any write submitted before the read completed.
        let allowed = allowed_versions(
            ops,
            &hist[lba as usize],
            initial[lba as usize],
            |w| w.ack_t.is_some_and(|a| a < r.submit_t),
            |w| w.submit_t < ack_t,
        );
        let got = decode(sector, lba);
        if !got.is_some_and(|v| allowed.contains(&v)) {
            return Err(format!(
                "read op {op} ({r:?}): sector {lba} holds {} but may only hold {allowed:?} (versions: 0 zeros, 1 backing, 2+i write i)",
                got.map_or("garbage".to_string(), |v| v.to_string())
            ));
        }
    }
    Ok(())
}

/// The versions one sector may hold: the last of the writes `hist` (in
/// submission order) that succeeded and is `settled` (or `initial` if none
/// is), and every later write that is `seen`, failed ones included (a
/// failed write may have landed in part).
fn allowed_versions(
    ops: &[OpRec],
    hist: &[u32],
    initial: u32,
    settled: impl Fn(&OpRec) -> bool,
    seen: impl Fn(&OpRec) -> bool,
) -> Vec<u32> {
    let last = hist.iter().rposition(|&w| {
        let w = &ops[w as usize];
        w.ok && settled(w)
    });
    let mut allowed = vec![match last {
        Some(j) => version_of(hist[j] as usize, ops[hist[j] as usize].kind),
        None => initial,
    }];
    for &w in &hist[last.map_or(0, |j| j + 1)..] {
        if seen(&ops[w as usize]) {
            allowed.push(version_of(w as usize, ops[w as usize].kind));
        }
    }
    allowed
}

/// What the engine found in a crash image.
#[derive(Debug, Clone, Copy, Default)]
pub struct CrashReport {
    pub points: usize,
    pub images_with_leaks: usize,
}

impl Run {
    /// Driver time of the latest flush submission whose flush completed by
    /// journal position `k`: writes acknowledged before it are durable.
    fn flush_cut(&self, k: usize) -> u64 {
        self.ops
            .iter()
            .filter(|o| o.kind == Kind::Flush && o.ok && o.ack_pos.is_some_and(|p| p <= k))
            .map(|o| o.submit_t)
            .max()
            .unwrap_or(0)
    }

    /// Checks the crash image for journal position `k` with `landing`:
    /// `external` (an independent checker) must accept it, the engine must
    /// open it and every sector must read as the model allows.
    pub fn check_crash(
        &self,
        k: usize,
        landing: Landing,
        external: &mut dyn FnMut(&Path) -> Result<(), String>,
    ) -> Result<CrashReport, String> {
        let img = self.journal.crash_image(&self.base, k, landing);
        self.check_bytes(&img, k, external).map_err(|e| {
            format!(
                "seed {} crash at {k} of {} ({landing:?}): {e}",
                self.cfg.seed,
                self.journal.len()
            )
        })
    }

    /// Checks `img` as the image a crash at journal position `k` left (the
    /// crash replay builds it; a test of the checker itself may build a
    /// wrong one on purpose).
    pub fn check_bytes(
        &self,
        img: &super::sim::CrashImage,
        k: usize,
        external: &mut dyn FnMut(&Path) -> Result<(), String>,
    ) -> Result<CrashReport, String> {
        // One file per check, so checks can run on several threads.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(format!("crash-{n}.qcow2"));
        img.write_to(&path).map_err(|e| e.to_string())?;
        let r = self.check_image(&path, k, self.flush_cut(k), external);
        if r.is_ok() {
            let _ = std::fs::remove_file(&path);
        }
        r
    }

    fn check_image(
        &self,
        path: &Path,
        k: usize,
        cut: u64,
        external: &mut dyn FnMut(&Path) -> Result<(), String>,
    ) -> Result<CrashReport, String> {
        external(path)?;
        let report = crate::check(path).map_err(|e| format!("backfill check: {e}"))?;
        if report.corruptions > 0 || report.check_errors > 0 {
            return Err(format!("backfill check: {:?}", report.messages));
        }
        let disk = Disk::open(
            path,
            Options {
                cores: 1,
                copy_on_read: false,
                cache: CacheMode::Writeback,
                poll_us: 0,
                ..Options::default()
            },
        )
        .map_err(|e| format!("the engine cannot open it: {e}"))?;
        let mut data = vec![0u8; self.cfg.disk_bytes as usize];
        disk.read_at(&mut data, 0)
            .map_err(|e| format!("read: {e}"))?;
        disk.close().map_err(|e| format!("close: {e}"))?;
        for (lba, sector) in data.chunks(SECTOR as usize).enumerate() {
            let h = &self.hist[lba];
            // The last durable write, or any write submitted before the crash.
            let allowed = allowed_versions(
                &self.ops,
                h,
                self.initial[lba],
                |w| w.ack_t.is_some_and(|a| a < cut),
                |w| w.submit_pos < k,
            );
            let got = decode(sector, lba as u64);
            if !got.is_some_and(|v| allowed.contains(&v)) {
                return Err(format!(
                    "sector {lba} holds {} but may only hold {allowed:?} (0 zeros, 1 backing, 2+i write i; writes: {:?})",
                    got.map_or("garbage".to_string(), |v| v.to_string()),
                    h.iter().map(|&w| (w, &self.ops[w as usize])).collect::<Vec<_>>()
                ));
            }
        }
        Ok(CrashReport {
            points: 1,
            images_with_leaks: usize::from(report.leaks > 0),
        })
    }
}

/// The fuzz target "engine operations with a crash countdown": the first
/// bytes pick the configuration and a crash point, the rest drive the
/// operations. The run's reads are checked against the model, then the
/// image a crash at the countdown leaves (torn by the input) is checked
/// with `backfill check`, opened and read against the model. Returns an
/// error for a violated invariant (the fuzz target panics on it).
pub fn fuzz_ops_with_crash(data: &[u8]) -> Result<(), String> {
    if data.len() < 4 {
        return Ok(());
    }
    let (head, ops) = data.split_at(4);
    let cfg = Config {
        seed: u64::from(head[0]),
        ops: 256,
        queue_depth: 1 + usize::from(head[1] % 16),
        cores: 1 + usize::from(head[1] >> 7),
        cluster_size: if head[0] & 1 == 0 { 4096 } else { 65536 },
        // Half of the 64 KiB overlays have subclusters.
        extended_l2: head[0] & 3 == 3,
        disk_bytes: (1 << 20) + 3 * SECTOR,
        backing_bytes: (768 << 10) + SECTOR,
        max_delay_turns: u32::from(head[0] >> 5),
        faults: Faults::default(),
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let run = run_with(dir.path(), &cfg, Some(ops))?;
    let countdown = usize::from(u16::from_le_bytes([head[2], head[3]]));
    let k = countdown % (run.journal.len() + 1);
    run.check_crash(k, Landing::Torn(u64::from(head[3])), &mut |_| Ok(()))
        .map(|_| ())
}
