//! A core that panics (a bug in the engine) must not leave anyone waiting.
//!
//! The panic is injected on the simulated I/O layer
//! (`Faults::panic_at_backing_read`): the core that completes that
//! copy-on-read backing read panics in its run loop, as a bug there would.
//! Every request in flight on it fails with an error that says so, every
//! later request sent to it too; the other core keeps serving its stripes
//! with the right bytes; writes and flushes are refused (the image is
//! poisoned: the failed core's metadata may be half-updated); close returns
//! an error instead of hanging. What was flushed before the panic is in the
//! image: `qemu-img check` finds no corruption (leaks are allowed, as after
//! a crash) and `qemu-img compare` says it equals a reference built apart.

mod common;

use backfill::testing::sim::{Faults, Sim, SimConfig};
use backfill::{Disk, ErrorKind, Options};
use common::*;

const CLUSTER: u64 = 4096;
/// A stripe (512 clusters) belongs to core `stripe % cores`.
const STRIPE: u64 = 512 * CLUSTER;
const STRIPES: u64 = 8;
const CHUNK: u64 = 64 * KIB;

#[test]
fn a_panicked_core_fails_its_requests_and_the_other_keeps_serving() {
    require_tool("qemu-img");
    let dir = tempdir("core-panic");
    let size = STRIPES * STRIPE;
    let backing = dir.path().join("backing.raw");
    let mut expected = write_random_file(&backing, size, 11);
    let overlay = dir.path().join("overlay.qcow2");
    let b = Backing {
        name: path_str(&backing),
        format: "raw",
    };
    create_qcow2(&overlay, size, CLUSTER, Compat::V3, Some(&b));

    let sim = Sim::new(SimConfig {
        seed: 5,
        lockstep: false,
        max_delay_turns: 2,
        faults: Faults {
            panic_at_backing_read: 6,
            ..Faults::default()
        },
    });
    sim.set_faults(false);
    let disk = open(
        &overlay,
        Options {
            cores: 2,
            copy_on_read: true,
            sim: Some(sim.clone()),
            ..Options::default()
        },
    );

    // Before the panic: a write on each core's first stripe, flushed.
    let written = [(3 * CLUSTER, 0x5a_u8), (STRIPE + 5 * CLUSTER, 0xa5)];
    for (off, byte) in written {
        let data = vec![byte; 2 * CLUSTER as usize];
        disk.write_at(&data, off).expect("write before the panic");
        expected[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    disk.flush().expect("flush before the panic");

    // Cold reads of the whole disk, all in flight at once; one core panics
    // at the sixth backing read. Every read must come back.
    sim.set_faults(true);
    let pending: Vec<_> = (0..size / CHUNK)
        .map(|i| {
            let off = i * CHUNK;
            (off, disk.submit_read(off, vec![0u8; CHUNK as usize]))
        })
        .collect();
    let mut failed_cores = std::collections::BTreeSet::new();
    for (off, c) in pending {
        match c.wait() {
            Ok(data) => assert_same_bytes(
                &data,
                &expected[off as usize..(off + CHUNK) as usize],
                &format!("read at {off}"),
            ),
            Err(e) => {
                assert!(
                    e.to_string().contains("internal error: core"),
                    "read at {off}: {e}"
                );
                failed_cores.insert((off / STRIPE) % 2);
            }
        }
    }
    assert_eq!(sim.stats().panics, 1);
    assert_eq!(failed_cores.len(), 1, "reads failed on one core only");
    let dead = *failed_cores.first().unwrap();

    // After the panic: the dead core's stripes fail, the other's are served.
    for stripe in 0..STRIPES {
        let off = stripe * STRIPE + 7 * CLUSTER;
        let mut buf = vec![0u8; CHUNK as usize];
        let r = disk.read_at(&mut buf, off);
        if stripe % 2 == dead {
            let e = r.expect_err("a read on the failed core");
            assert!(e.to_string().contains("internal error: core"), "{e}");
        } else {
            r.unwrap_or_else(|e| panic!("a read on the live core at {off}: {e}"));
            assert_same_bytes(
                &buf,
                &expected[off as usize..(off + CHUNK) as usize],
                &format!("read at {off} after the panic"),
            );
        }
    }

    // Writes and flushes are refused, with the reason.
    let live_off = (1 - dead) * STRIPE + 9 * CLUSTER;
    let e = disk
        .write_at(&[1u8; 4096], live_off)
        .expect_err("a write after a core failed");
    assert_eq!(e.kind(), ErrorKind::Poisoned, "{e}");
    assert!(e.to_string().contains("internal error: core"), "{e}");
    assert!(disk.flush().is_err(), "a flush after a core failed");

    // Close answers (with the failure) instead of hanging.
    let observer = disk.clone();
    let closed = disk.close();
    assert!(closed.is_err(), "close after a core failed: {closed:?}");
    let e = observer
        .read_at(&mut [0u8; 4096], 0)
        .expect_err("a read after close");
    assert_eq!(e.kind(), ErrorKind::ShuttingDown, "{e}");
    drop(observer);

    // The image: what was flushed is there, nothing is corrupt.
    qemu_check_no_corruption(&overlay).unwrap_or_else(|e| panic!("{e}"));
    let reference = dir.path().join("reference.raw");
    write_file(&reference, &expected);
    let cmp = run_status(
        "qemu-img",
        [
            "compare".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            overlay.as_os_str(),
            reference.as_os_str(),
        ],
    );
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    // And the engine opens it again and serves it whole.
    let again = Disk::open(&overlay, options(2, true, false)).expect("reopen");
    assert_same_bytes(&read_all(&again, 256 * KIB), &expected, "after reopen");
    again.close().expect("close after reopen");
}
