//! The seeded simulated I/O layer and its crash journal.
//!
//! [`SimIo`] implements [`Io`] for a reactor core in place of io_uring. An
//! operation pushed in one turn completes some turns later (a seeded random
//! delay), so completions come back reordered; its effect on the file (a
//! positioned read or write on the real descriptor) happens when it
//! completes. Faults are injected at completion, seeded too: EIO and short
//! reads from the backing image, ENOSPC on overlay writes (data writes on the
//! ring and the metadata writes of [`crate::meta::Meta`] alike).
//!
//! **Lockstep.** With [`SimConfig::lockstep`], every core parks at each
//! `submit_and_wait` until the driver (the test's thread) grants it one turn
//! with [`Sim::step`]; only one thread runs engine code at a time, so a run
//! is a pure function of the seed and the requests the driver makes: the
//! seed replays a failure exactly. Without lockstep the cores run freely
//! (delays and faults still seeded, interleavings not).
//!
//! **Journal.** Every write, hole punch, size change and fdatasync that
//! reaches the overlay is recorded in completion order, with the journal
//! position at which it was submitted. [`Journal::crash_image`] rebuilds the
//! file a crash at any position could leave: everything an fdatasync had
//! made durable, plus any subset (torn at sector granularity) of what was
//! written after it or was still in flight.

use crate::io::{self, Cqe, Io, Op, OpKind};
use crate::reactor::{FILE_BACKING0, FILE_DATA, FILE_WAKE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Faults per million operations of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Backing-image reads that fail with EIO.
    pub backing_eio_ppm: u32,
    /// Backing-image reads that come back short.
    pub backing_short_ppm: u32,
    /// Overlay writes (data and metadata) that fail with ENOSPC.
    pub overlay_enospc_ppm: u32,
    /// The core that completes this backing-image read (counted from 1,
    /// over all cores, while faults are on; 0: none) panics, as a bug in
    /// the engine would, before it sees the completion.
    pub panic_at_backing_read: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub seed: u64,
    /// Cores run one turn at a time, when the driver says (see the module doc).
    pub lockstep: bool,
    /// An operation completes 0 to this many turns after it was submitted.
    pub max_delay_turns: u32,
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            seed: 1,
            lockstep: true,
            max_delay_turns: 4,
            faults: Faults::default(),
        }
    }
}

/// One change to the overlay file, in completion order.
#[derive(Debug, Clone)]
pub enum Entry {
    /// `data` written at `offset`; submitted when the journal had
    /// `submitted` entries.
    Write {
        offset: u64,
        data: Vec<u8>,
        submitted: usize,
    },
    /// `[offset, offset + len)` punched (reads as zeros).
    Punch { offset: u64, len: u64 },
    /// The file's size set to `len` (`grow_only`: never shrinks it).
    SetLen { len: u64, grow_only: bool },
    /// An fdatasync submitted when the journal had `covers` entries: every
    /// entry before that is durable once this one is in the journal.
    Sync { covers: usize },
}

/// Counters of what the simulation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    pub turns: u64,
    pub ops: u64,
    pub backing_eio: u64,
    pub backing_short: u64,
    pub overlay_enospc: u64,
    /// Backing-image reads completed while faults were on.
    pub backing_reads: u64,
    pub panics: u64,
}

#[derive(Debug, Default)]
struct Gate {
    /// Times this core parked (waiting for a turn).
    parks: u64,
    parked: bool,
    granted: bool,
    gone: bool,
}

struct State {
    rng: StdRng,
    clock: u64,
    journal: Vec<Entry>,
    gates: Vec<Gate>,
    lockstep: bool,
    faults_on: bool,
    stats: SimStats,
}

/// The simulation shared by the cores of one disk and its driver.
pub struct Sim {
    cfg: SimConfig,
    state: Mutex<State>,
    cv: Condvar,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sim(seed {})", self.cfg.seed)
    }
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Arc<Sim> {
        Arc::new(Sim {
            cfg,
            state: Mutex::new(State {
                rng: StdRng::seed_from_u64(cfg.seed),
                clock: 0,
                journal: Vec::new(),
                gates: Vec::new(),
                lockstep: cfg.lockstep,
                faults_on: true,
                stats: SimStats::default(),
            }),
            cv: Condvar::new(),
        })
    }

    pub fn seed(&self) -> u64 {
        self.cfg.seed
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns fault injection on or off (e.g. off for a final verification).
    pub fn set_faults(&self, on: bool) {
        self.lock().faults_on = on;
    }

    /// Leaves lockstep: every core runs freely from now on.
    pub fn free_run(&self) {
        let mut s = self.lock();
        s.lockstep = false;
        self.cv.notify_all();
    }

    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    /// Entries in the journal so far: a position to compare crash points with.
    pub fn position(&self) -> usize {
        self.lock().journal.len()
    }

    /// The journal so far.
    pub fn journal(&self) -> Journal {
        Journal {
            entries: self.lock().journal.clone(),
        }
    }

    /// Registers core `id` (its gate), before it runs.
    fn register(&self, id: usize) {
        let mut s = self.lock();
        if s.gates.len() <= id {
            s.gates.resize_with(id + 1, Gate::default);
        }
        s.gates[id] = Gate::default();
    }

    /// Called by core `id` at each turn: in lockstep, waits for a grant.
    fn park(&self, id: usize) {
        let mut s = self.lock();
        s.gates[id].parks += 1;
        s.gates[id].parked = true;
        self.cv.notify_all();
        while s.lockstep && !s.gates[id].granted {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.gates[id].granted = false;
        s.gates[id].parked = false;
        s.clock += 1;
        s.stats.turns += 1;
    }

    fn gone(&self, id: usize) {
        let mut s = self.lock();
        if let Some(g) = s.gates.get_mut(id) {
            g.gone = true;
            g.parked = false;
        }
        self.cv.notify_all();
    }

    /// Waits until each of the `n` cores has parked (or ended): after open,
    /// so that no core runs engine code outside a granted turn.
    pub fn wait_parked(&self, n: usize) {
        let mut s = self.lock();
        while s.lockstep
            && (s.gates.len() < n || s.gates[..n].iter().any(|g| !(g.parked || g.gone)))
        {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Grants one turn to a core chosen by the seed and waits until that
    /// turn is over. Returns false once every core has ended.
    pub fn step(&self) -> bool {
        let mut s = self.lock();
        let live: Vec<usize> = (0..s.gates.len()).filter(|&i| !s.gates[i].gone).collect();
        if live.is_empty() {
            return false;
        }
        let id = live[s.rng.random_range(0..live.len())];
        // The chosen core is parked: everything runs in turns, and a core
        // that left its last turn parks again or ends before `step` returns.
        while !(s.gates[id].parked || s.gates[id].gone) {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.gates[id].gone {
            return true;
        }
        let before = s.gates[id].parks;
        s.gates[id].granted = true;
        self.cv.notify_all();
        while !(s.gates[id].gone || (s.gates[id].parked && s.gates[id].parks > before)) {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        true
    }

    /// A metadata write of [`crate::meta::Meta`] (synchronous, buffered):
    /// may fail with ENOSPC; journaled when it succeeds.
    pub(crate) fn meta_write(
        &self,
        file: &std::fs::File,
        buf: &[u8],
        offset: u64,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut s = self.lock();
        if self.roll(&mut s, self.cfg.faults.overlay_enospc_ppm) {
            s.stats.overlay_enospc += 1;
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        file.write_all_at(buf, offset)?;
        let at = s.journal.len();
        s.journal.push(Entry::Write {
            offset,
            data: buf.to_vec(),
            submitted: at,
        });
        Ok(())
    }

    /// A metadata fdatasync: covers everything completed so far.
    pub(crate) fn meta_sync(&self) {
        let mut s = self.lock();
        let covers = s.journal.len();
        s.journal.push(Entry::Sync { covers });
    }

    pub(crate) fn meta_punch(&self, offset: u64, len: u64) {
        self.lock().journal.push(Entry::Punch { offset, len });
    }

    pub(crate) fn meta_set_len(&self, len: u64, grow_only: bool) {
        self.lock().journal.push(Entry::SetLen { len, grow_only });
    }

    fn roll(&self, s: &mut State, ppm: u32) -> bool {
        // Always draw, so turning faults off does not shift the sequence.
        let r = s.rng.random_range(0..1_000_000u32);
        s.faults_on && r < ppm
    }
}

/// An operation in flight on the simulated layer.
struct Flight {
    token: u64,
    op: Op,
    due: u64,
    /// Journal position when it was submitted.
    submitted: usize,
}

/// The simulated I/O layer of one core (see the module doc).
pub struct SimIo {
    sim: Arc<Sim>,
    id: usize,
    files: Vec<RawFd>,
    queued: Vec<(u64, Op)>,
    flights: Vec<Flight>,
    done: Vec<Cqe>,
    /// Set by the injected panic; the core panics once the sim is unlocked.
    panic_pending: Option<u64>,
}

impl SimIo {
    /// The layer of core `id`; `files[i]` is `FileId(i)`, as on the ring.
    pub fn new(sim: Arc<Sim>, id: usize, files: Vec<RawFd>) -> SimIo {
        sim.register(id);
        SimIo {
            sim,
            id,
            files,
            queued: Vec::new(),
            flights: Vec::new(),
            done: Vec::new(),
            panic_pending: None,
        }
    }

    /// Runs one operation now, with faults, and journals its effect.
    fn complete(&mut self, s: &mut State, f: Flight) {
        let Flight {
            token,
            op,
            submitted,
            ..
        } = f;
        s.stats.ops += 1;
        let fd = self.files[op.file.0 as usize];
        let faults = self.sim.cfg.faults;
        let result = match op.kind {
            OpKind::Read if op.file.0 >= FILE_BACKING0 => {
                if s.faults_on {
                    s.stats.backing_reads += 1;
                    if s.stats.backing_reads == faults.panic_at_backing_read {
                        s.stats.panics += 1;
                        self.panic_pending = Some(s.stats.backing_reads);
                    }
                }
                if self.sim.roll(s, faults.backing_eio_ppm) {
                    s.stats.backing_eio += 1;
                    -libc::EIO
                } else if self.sim.roll(s, faults.backing_short_ppm) {
                    s.stats.backing_short += 1;
                    // Short, but sector-aligned as O_DIRECT transfers are.
                    let cut = s.rng.random_range(0..op.len as usize) & !511;
                    io::run_blocking(fd, &op, cut)
                } else {
                    io::run_blocking(fd, &op, usize::MAX)
                }
            }
            OpKind::Read => io::run_blocking(fd, &op, usize::MAX),
            OpKind::Write => {
                if op.file == FILE_DATA && self.sim.roll(s, faults.overlay_enospc_ppm) {
                    s.stats.overlay_enospc += 1;
                    -libc::ENOSPC
                } else {
                    let r = io::run_blocking(fd, &op, usize::MAX);
                    if op.file == FILE_DATA && r > 0 {
                        s.journal.push(Entry::Write {
                            offset: op.offset,
                            data: written_bytes(&op, r as usize),
                            submitted,
                        });
                    }
                    r
                }
            }
            OpKind::Fsync => {
                // The data is already in the file; what an fdatasync means
                // for a crash is recorded, not performed.
                if op.file == FILE_DATA {
                    s.journal.push(Entry::Sync { covers: submitted });
                }
                0
            }
            OpKind::WakeRead => unreachable!("wake-ups complete in wake_ready"),
            // Sockets are not simulated (the NBD frontend runs on the ring).
            OpKind::Recv | OpKind::Send => -libc::EOPNOTSUPP,
        };
        let buf = op.buf.clone();
        drop(op);
        self.done.push(Cqe { token, result, buf });
    }

    /// Completes the armed wake-up read if its eventfd was signalled,
    /// waiting up to `wait_ms` for it.
    fn wake_ready(&mut self, wait_ms: i32) {
        let Some(i) = self
            .flights
            .iter()
            .position(|f| f.op.kind == OpKind::WakeRead)
        else {
            return;
        };
        let fd = self.files[FILE_WAKE.0 as usize];
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) reads and writes the one pollfd on our stack,
        // which outlives the call.
        let n = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
        if n <= 0 {
            return;
        }
        let f = self.flights.swap_remove(i);
        let r = io::run_blocking(fd, &f.op_as_read(), 8);
        self.done.push(Cqe {
            token: f.token,
            result: r,
            buf: f.op.buf.clone(),
        });
    }
}

impl Flight {
    /// The wake-up read as a plain 8-byte read (eventfds ignore the offset).
    fn op_as_read(&self) -> Op {
        let buf = self.op.buf.clone().expect("a wake-up read has a buffer");
        Op::read(self.op.file, 0, buf, 0, 8)
    }
}

/// The bytes a write of `op` put in the file (its first `n`).
fn written_bytes(op: &Op, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    match &op.buf {
        Some(b) => out.extend_from_slice(&b.as_slice()[op.buf_off..op.buf_off + op.len as usize]),
        None => {
            for (b, o, l) in &op.iov {
                out.extend_from_slice(&b.as_slice()[*o..*o + *l]);
            }
        }
    }
    out.truncate(n);
    out
}

impl Io for SimIo {
    fn push(&mut self, token: u64, op: Op) {
        self.queued.push((token, op));
    }

    fn submit_and_wait(&mut self, want: usize) -> std::io::Result<()> {
        self.sim.park(self.id);
        let sim = self.sim.clone();
        let mut s = sim.lock();
        let now = s.clock;
        let submitted = s.journal.len();
        let max = u64::from(sim.cfg.max_delay_turns);
        for (token, op) in self.queued.drain(..) {
            let due = now + s.rng.random_range(0..=max);
            self.flights.push(Flight {
                token,
                op,
                due,
                submitted,
            });
        }
        // Everything due completes, in a seeded order (reordering).
        let mut ready: Vec<usize> = (0..self.flights.len())
            .filter(|&i| self.flights[i].op.kind != OpKind::WakeRead && self.flights[i].due <= now)
            .collect();
        if ready.is_empty() && want > 0 {
            // Waiting: time jumps to the next completion, if any.
            if let Some(i) = (0..self.flights.len())
                .filter(|&i| self.flights[i].op.kind != OpKind::WakeRead)
                .min_by_key(|&i| self.flights[i].due)
            {
                ready.push(i);
            }
        }
        let mut picked = Vec::with_capacity(ready.len());
        // Remove from the highest index down so indexes stay valid.
        ready.sort_unstable();
        for &i in ready.iter().rev() {
            picked.push(self.flights.swap_remove(i));
        }
        while !picked.is_empty() {
            let j = s.rng.random_range(0..picked.len());
            let f = picked.swap_remove(j);
            self.complete(&mut s, f);
        }
        let lockstep = s.lockstep;
        drop(s);
        // Nothing else to wait for: the wake-up. In lockstep an empty turn
        // just returns (the driver grants turns); running freely, block a
        // little on the eventfd instead of spinning.
        let wait_ms = if want > 0 && self.done.is_empty() && !lockstep {
            1
        } else {
            0
        };
        self.wake_ready(wait_ms);
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Cqe>) {
        if let Some(n) = self.panic_pending.take() {
            panic!("simulated bug: core {} panics at backing read {n}", self.id);
        }
        out.append(&mut self.done);
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
    }

    fn in_flight(&self) -> usize {
        self.queued.len() + self.flights.len() + self.done.len()
    }
}

impl Drop for SimIo {
    fn drop(&mut self) {
        self.sim.gone(self.id);
    }
}

/// The recorded changes to an overlay file (see [`Sim::journal`]).
#[derive(Debug, Clone, Default)]
pub struct Journal {
    pub entries: Vec<Entry>,
}

/// How much of what was not yet durable a crash image keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// Everything completed before the crash landed (a clean prefix).
    All,
    /// Only what an fdatasync had made durable.
    DurableOnly,
    /// Each sector of each non-durable write (completed or in flight)
    /// landed or not, by the seed.
    Torn(u64),
}

/// Sector size at which writes may tear.
pub const TEAR_BYTES: usize = 512;

impl Journal {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries durable at crash point `k` (a crash after the first `k`
    /// entries): those before the largest `covers` of a sync among them.
    pub fn durable_prefix(&self, k: usize) -> usize {
        self.entries[..k]
            .iter()
            .filter_map(|e| match e {
                Entry::Sync { covers } => Some(*covers),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// The file a crash after entry `k` could leave, starting from `base`
    /// (the file before the journal began): its bytes up to the last one
    /// written, and its size (a sparse tail past the bytes reads as zeros).
    pub fn crash_image(&self, base: &[u8], k: usize, landing: Landing) -> CrashImage {
        let d = self.durable_prefix(k);
        let mut rng = match landing {
            Landing::Torn(seed) => Some(StdRng::seed_from_u64(seed)),
            _ => None,
        };
        let mut img = base.to_vec();
        let mut size = base.len() as u64;
        // Entries after the crash point whose write was submitted before
        // it were in flight: they may have landed too (torn only).
        let in_flight = self.entries[k..]
            .iter()
            .filter(|e| matches!(e, Entry::Write { submitted, .. } if *submitted < k));
        for (i, e) in self.entries[..k]
            .iter()
            .enumerate()
            .chain(in_flight.map(|e| (usize::MAX, e)))
        {
            let durable = i < d;
            let lands_whole = durable || (landing == Landing::All && i != usize::MAX);
            match e {
                Entry::Write { offset, data, .. } => {
                    if lands_whole {
                        put(&mut img, *offset, data);
                    } else if let Some(rng) = rng.as_mut() {
                        for (j, sector) in data.chunks(TEAR_BYTES).enumerate() {
                            if rng.random_bool(0.5) {
                                put(&mut img, offset + (j * TEAR_BYTES) as u64, sector);
                            }
                        }
                    }
                }
                Entry::Punch { offset, len } => {
                    let lands = lands_whole || rng.as_mut().is_some_and(|r| r.random_bool(0.5));
                    if lands {
                        let end = (offset + len).min(img.len() as u64);
                        if *offset < end {
                            img[*offset as usize..end as usize].fill(0);
                        }
                    }
                }
                Entry::SetLen { len, grow_only } => {
                    let lands = lands_whole || rng.as_mut().is_some_and(|r| r.random_bool(0.5));
                    if lands && (!grow_only || *len > size) {
                        size = *len;
                        img.truncate(size as usize);
                    }
                }
                Entry::Sync { .. } => {}
            }
            size = size.max(img.len() as u64);
        }
        CrashImage { bytes: img, size }
    }
}

/// A file rebuilt from a journal: `bytes`, then zeros up to `size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashImage {
    pub bytes: Vec<u8>,
    pub size: u64,
}

impl CrashImage {
    /// Writes it to `path`, sparse past `bytes`.
    pub fn write_to(&self, path: &std::path::Path) -> std::io::Result<()> {
        let f = std::fs::File::create(path)?;
        std::io::Write::write_all(&mut &f, &self.bytes)?;
        f.set_len(self.size)
    }
}

fn put(img: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if img.len() < end {
        img.resize(end, 0);
    }
    img[offset as usize..end].copy_from_slice(data);
}
