//! Closing a disk over an NBD backing ends its connections (issue 5: the
//! NBD backing's connection pool, `backing::nbd`): once `Disk::close`
//! returns, no connection thread is left in the process and the server has
//! seen every connection close, whether the server was up, or gone and
//! being reconnected to.
//!
//! Its own test binary: the check counts the process's `backfill-nbd*`
//! threads, which other tests running alongside would add to.
//!
//! Oracles: `/proc/self/task/*/comm` (the threads), nbdkit's exitlast
//! filter (the server exits once its last client has gone), and the base
//! image's bytes for what was read.
//!
//! Synchronisation: servers are ready once they wrote their pid file and
//! gone when `wait` returns (`common/nbd_peer.rs`); no sleeps.

mod common;
#[path = "common/nbd_peer.rs"]
mod nbd_peer;

use common::*;
use nbd_peer::{socket_path, unix_uri};

/// The names of this process's threads that belong to NBD backings.
fn nbd_threads() -> Vec<String> {
    let mut names = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").expect("reading /proc/self/task") {
        let comm = t.expect("a task").path().join("comm");
        // A thread may end between the listing and the read.
        if let Ok(name) = std::fs::read_to_string(comm) {
            if name.starts_with("backfill-nbd") {
                names.push(name.trim_end().to_string());
            }
        }
    }
    names
}

#[test]
fn closing_the_disk_ends_every_nbd_connection() {
    let dir = tempdir("nbd-close");
    let base = dir.path().join("base.raw");
    let data = write_random_file(&base, 4 * MIB, seed_from_env("nbd-close"));
    let sock = socket_path(dir.path(), "b.sock");
    let overlay = dir.path().join("overlay.qcow2");
    assert!(nbd_threads().is_empty(), "{:?}", nbd_threads());

    // The server gone: the connections are reconnecting (or about to) when
    // the disk closes.
    let server = nbd_peer::nbdkit(dir.path(), &sock, &base, &[], &[]);
    qemu_create_qcow2(&overlay, "", Some((&unix_uri(&sock), "raw")), None);
    let disk = open(&overlay, options(2, true, false));
    let mut got = vec![0u8; 2 * MIB as usize];
    disk.read_at(&mut got, 0).unwrap();
    assert_same_bytes(&got, &data[..2 * MIB as usize], "read before the kill");
    assert!(
        !nbd_threads().is_empty(),
        "no NBD connection threads while open"
    );
    // Killed: its connections drop and their threads try to reconnect.
    server.stop_with(libc::SIGKILL);
    disk.close().unwrap();
    assert_eq!(
        nbd_threads(),
        Vec::<String>::new(),
        "after close, server gone"
    );

    // The server up: the connections say goodbye, and the server, which
    // exits after its last client, exits.
    let server = nbd_peer::nbdkit(dir.path(), &sock, &base, &["exitlast"], &[]);
    let disk = open(&overlay, options(2, true, false));
    disk.read_at(&mut got, 2 * MIB).unwrap();
    assert_same_bytes(&got, &data[2 * MIB as usize..], "read");
    disk.close().unwrap();
    assert_eq!(
        nbd_threads(),
        Vec::<String>::new(),
        "after close, server up"
    );
    assert!(server.wait_exit().success(), "nbdkit (exitlast)");
}
