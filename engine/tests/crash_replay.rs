//! Crash replay and fault simulation on the seeded simulated I/O layer
//! (DESIGN.md invariants 3, 4 and 5; see `backfill::testing::crash`).
//!
//! Each configuration runs a random workload (copy-on-read fills, writes,
//! write-zeroes, discards, flushes) in lockstep on the simulated layer,
//! checking every read against the model, and records every write and
//! fdatasync that reaches the overlay. Then, for crash points along that
//! journal, it builds the image a crash there could leave — every prefix
//! (all completed writes landed), only what fdatasync made durable, and
//! random torn subsets of the rest — and checks each: `qemu-img check`
//! finds no corruption (leaks are allowed), `backfill check` agrees, the
//! engine opens it, and every sector reads as backing data or as a write the
//! client made, with every write acknowledged before a completed flush
//! there.
//!
//! Scale: `BACKFILL_CRASH_POINTS` (default 1050 crash points in all),
//! `BACKFILL_SIM_SEEDS` (fault-injection seeds, default 24). Replay: the base
//! seed is printed; `BACKFILL_SEED` sets it.

mod common;

use backfill::testing::crash::{self, Config, Run};
use backfill::testing::sim::{CrashImage, Faults, Landing};
use common::*;
use std::path::Path;

/// The tests of this file run one at a time. Each closes and reopens
/// images while others start `qemu-img`: a child forked from this process
/// holds copies of every open descriptor until it execs, image locks
/// included, and a reopen that met one would fail to get its lock.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The independent oracle: qemu-img check must find no corruption (leaks
/// are allowed).
fn qemu_check(p: &Path) -> Result<(), String> {
    qemu_check_no_corruption(p).map(|_leaks| ())
}

/// The configurations the crash replay covers.
fn configs(seed: u64) -> Vec<Config> {
    vec![
        Config {
            seed,
            ..Config::default()
        },
        Config {
            seed: seed.wrapping_add(1),
            cores: 1,
            cluster_size: 65536,
            disk_bytes: (8 << 20) + 3 * 512,
            backing_bytes: (6 << 20) + 512,
            ..Config::default()
        },
        Config {
            seed: seed.wrapping_add(2),
            queue_depth: 4,
            max_delay_turns: 1,
            ..Config::default()
        },
    ]
}

/// Checks crash points of `run` until `budget` are done: every prefix
/// first (sampled evenly if there are more positions than budget), then
/// durable-only and torn images at evenly spread positions.
fn replay(run: &Run, budget: usize) -> (usize, usize) {
    let n = run.journal.len();
    let mut points: Vec<(usize, Landing)> = Vec::new();
    let prefixes = (n + 1).min(budget / 2).max(1);
    for i in 0..prefixes {
        points.push((
            i * n / prefixes.max(2).saturating_sub(1).max(1),
            Landing::All,
        ));
    }
    let rest = budget.saturating_sub(points.len());
    for i in 0..rest {
        let k = (i * 7919) % (n + 1);
        let landing = if i % 4 == 0 {
            Landing::DurableOnly
        } else {
            Landing::Torn(run.cfg.seed ^ (i as u64) << 20)
        };
        points.push((k, landing));
    }
    let mut leaks = 0;
    for &(k, landing) in &points {
        match run.check_crash(k, landing, &mut qemu_check) {
            Ok(r) => leaks += r.images_with_leaks,
            Err(e) => panic!("{e}"),
        }
    }
    (points.len(), leaks)
}

#[test]
fn crash_replay() {
    let _serial = serial();
    require_tool("qemu-img");
    let seed = seed_from_env("crash_replay");
    let budget = env_u64("BACKFILL_CRASH_POINTS", 1050) as usize;
    let cfgs = configs(seed);
    let mut total = 0;
    for cfg in &cfgs {
        let dir = tempdir("crash-replay");
        let run = crash::run(dir.path(), cfg).unwrap_or_else(|e| panic!("{e}"));
        let (points, leaky) = replay(&run, budget / cfgs.len());
        total += points;
        eprintln!(
            "crash_replay: seed {:#x}, {} KiB clusters, {} core(s): {} ops ({} reads checked, {} FUA writes), {} journal entries ({} syncs); {points} crash points checked, {leaky} with leaks, 0 corrupt",
            cfg.seed,
            cfg.cluster_size / 1024,
            cfg.cores,
            run.report.ops,
            run.report.reads_checked,
            run.report.fua_writes,
            run.report.journal_entries,
            run.report.syncs,
        );
    }
    eprintln!("crash_replay: {total} crash points, 0 failures");
    assert!(total >= budget.min(1000), "only {total} crash points");
}

/// The same replay on overlays with extended L2 entries: subcluster fills
/// and writes into host clusters allocated once, 2 KiB subclusters (64 KiB
/// clusters: fills and writes move 4 KiB granules of two) and 512-byte ones
/// (16 KiB clusters). Fewer crash points (`BACKFILL_CRASH_POINTS_EXTL2`,
/// default 160), to keep CI short.
#[test]
fn crash_replay_extended_l2() {
    let _serial = serial();
    require_tool("qemu-img");
    let seed = seed_from_env("crash_replay_extended_l2");
    let budget = env_u64("BACKFILL_CRASH_POINTS_EXTL2", 160) as usize;
    let cfgs = [
        Config {
            seed,
            cluster_size: 65536,
            extended_l2: true,
            disk_bytes: (6 << 20) + 3 * 512,
            backing_bytes: (5 << 20) + 512,
            ..Config::default()
        },
        Config {
            seed: seed.wrapping_add(1),
            cluster_size: 16384,
            extended_l2: true,
            cores: 1,
            ..Config::default()
        },
    ];
    let mut total = 0;
    for cfg in &cfgs {
        let dir = tempdir("crash-replay-extl2");
        let run = crash::run(dir.path(), cfg).unwrap_or_else(|e| panic!("{e}"));
        let (points, leaky) = replay(&run, budget / cfgs.len());
        total += points;
        eprintln!(
            "crash_replay_extended_l2: seed {:#x}, {} KiB clusters: {} ops ({} reads checked), {} journal entries; {points} crash points checked, {leaky} with leaks, 0 corrupt",
            cfg.seed,
            cfg.cluster_size / 1024,
            run.report.ops,
            run.report.reads_checked,
            run.report.journal_entries,
        );
    }
    assert!(total >= budget.min(150), "only {total} crash points");
}

/// The checker must reject what a crash must never leave, or a green run
/// means nothing: here, an image that lost writes a completed flush had
/// made durable (the journal's entries dropped), and one whose written
/// data was lost while its metadata survived.
#[test]
fn crash_checker_rejects_lost_writes() {
    let _serial = serial();
    let dir = tempdir("crash-checker");
    let run = crash::run(dir.path(), &Config::default()).unwrap_or_else(|e| panic!("{e}"));
    let n = run.journal.len();
    let base = CrashImage {
        bytes: run.base.clone(),
        size: run.base.len() as u64,
    };
    let lost = run.check_bytes(&base, n, &mut |_| Ok(()));
    assert!(
        lost.is_err(),
        "an image without any of the flushed writes passed"
    );
    // Drop the data writes (those of whole clusters) but keep metadata.
    let mut j = run.journal.clone();
    j.entries.retain(
        |e| !matches!(e, backfill::testing::sim::Entry::Write { data, .. } if data.len() >= 4096),
    );
    let img = j.crash_image(&run.base, j.len(), Landing::All);
    let r = run.check_bytes(&img, n, &mut |_| Ok(()));
    assert!(r.is_err(), "an image whose data writes were lost passed");
}

/// Faults on the simulated layer: backing reads failing with EIO or coming
/// back short, overlay writes (data and metadata) failing with ENOSPC. Each
/// affected request fails; every read that succeeds is right; a failed
/// metadata write stops writes (the image is poisoned) but never corrupts;
/// crash images along the way still check clean.
#[test]
fn simulated_faults() {
    let _serial = serial();
    require_tool("qemu-img");
    let base = seed_from_env("simulated_faults");
    let seeds = env_u64("BACKFILL_SIM_SEEDS", 24);
    let mut sum = backfill::testing::sim::SimStats::default();
    let (mut ops, mut failed, mut poisoned, mut points) = (0, 0, 0, 0);
    for i in 0..seeds {
        let cfg = Config {
            seed: base.wrapping_add(i),
            ops: 300,
            cores: 1 + (i % 2) as usize,
            // Every fourth seed on an overlay with extended L2 entries.
            cluster_size: if i % 4 == 3 { 65536 } else { 4096 },
            extended_l2: i % 4 == 3,
            faults: Faults {
                backing_eio_ppm: 50_000,
                backing_short_ppm: 50_000,
                overlay_enospc_ppm: 10_000,
                ..Faults::default()
            },
            ..Config::default()
        };
        let dir = tempdir("sim-faults");
        let run = crash::run(dir.path(), &cfg).unwrap_or_else(|e| panic!("{e}"));
        let s = run.report.sim;
        sum.backing_eio += s.backing_eio;
        sum.backing_short += s.backing_short;
        sum.overlay_enospc += s.overlay_enospc;
        sum.ops += s.ops;
        ops += run.report.ops;
        failed += run.report.failed_ops;
        poisoned += usize::from(run.report.poisoned);
        // A few crash points of each faulty run too.
        let n = run.journal.len();
        for k in [n / 3, 2 * n / 3] {
            run.check_crash(k, Landing::Torn(cfg.seed ^ k as u64), &mut qemu_check)
                .unwrap_or_else(|e| panic!("{e}"));
            points += 1;
        }
    }
    eprintln!(
        "simulated_faults: {seeds} seeds from {base:#x}: {ops} client ops ({failed} failed), {} I/O ops simulated; injected {} backing EIO, {} short backing reads, {} ENOSPC ({poisoned} runs poisoned by a failed metadata write); {points} crash points; 0 wrong reads",
        sum.ops, sum.backing_eio, sum.backing_short, sum.overlay_enospc
    );
    assert!(sum.backing_eio > 0 && sum.backing_short > 0 && sum.overlay_enospc > 0);
}

/// A seed replays a run exactly: the same journal, byte for byte.
#[test]
fn simulation_is_deterministic() {
    let _serial = serial();
    let cfg = Config {
        seed: 0xdec1de,
        faults: Faults {
            backing_eio_ppm: 10_000,
            backing_short_ppm: 10_000,
            overlay_enospc_ppm: 2_000,
            ..Faults::default()
        },
        ..Config::default()
    };
    let a = crash::run(tempdir("sim-det").path(), &cfg).unwrap_or_else(|e| panic!("{e}"));
    let b = crash::run(tempdir("sim-det").path(), &cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.report.sim, b.report.sim);
    assert_eq!(a.journal.len(), b.journal.len());
    assert!(
        format!("{:?}", a.journal.entries) == format!("{:?}", b.journal.entries),
        "the same seed wrote a different journal"
    );
}

/// The fuzz target's entry point (ops from bytes, a crash countdown) on a
/// few fixed inputs, so it is exercised on the stable toolchain too.
#[test]
fn fuzz_entry_point_runs() {
    let _serial = serial();
    let mut x = 0x1234_5678_9abc_def0u64;
    for n in 0..12 {
        let bytes: Vec<u8> = (0..(64 + n * 97))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        backfill::testing::crash::fuzz_ops_with_crash(&bytes).unwrap_or_else(|e| panic!("{e}"));
    }
}
