//! Memory and threads across NBD server lifetimes: what a stopped server
//! and its closed disk held must all be freed, whatever its clients sent.
//!
//! `stopped_servers_leave_nothing` runs the `nbd_client_bytes` fuzz harness
//! (`backfill::testing::fuzz`: the real server on a Unix socket over a
//! qcow2 overlay with a raw backing file) through several epochs: a fresh
//! server, hostile clients (a slice of the fuzz corpus: garbage, broken
//! handshakes, pipelined and malformed requests, clients that hang up),
//! a well-behaved client, then the server stopped, its disk closed and its
//! image checked. After each epoch:
//!
//! * no server, connection or reactor thread is left (they are joined by
//!   the time stop and close return), read from /proc/self/task (where a
//!   joined thread may linger a moment: see `server_threads_after_exit`);
//! * the heap, counted by this binary's global allocator (every allocation
//!   of every thread goes through it), is back to what it was after the
//!   first epoch (which also pays for one-time initialisation: the
//!   harness's 4 MiB WRITE pattern), within a small slack: a reactor's
//!   state (its `Core`, buffer pool, rings' queues) left behind would be
//!   megabytes per epoch (a `Core` forgotten on purpose leaves 3.6 MB).
//!
//! This is the check the fuzzer's LeakSanitizer cannot make reliably for
//! this target (see fuzz/README.md): it runs with every thread of the
//! stopped server gone, so nothing is hidden on a live thread's stack.
//!
//! It is the only test in this binary: the counter sees every thread.

use backfill::testing::fuzz;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicIsize, Ordering};

/// Bytes currently allocated through the global allocator.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every method forwards to `System` unchanged; the counter is only
// arithmetic on the sizes the caller passes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Server epochs after the first (the baseline).
const EPOCHS: usize = 5;
/// An epoch replays every STRIDE-th corpus input.
const STRIDE: usize = 25;
/// Heap bytes an epoch may leave above the baseline: far less than one
/// reactor's state, which holds tens of KiB of queues and buffers at least.
const SLACK: isize = 16 << 10;

fn inputs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nbd_client_bytes");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!v.is_empty(), "the corpus {} is empty", dir.display());
    v.sort();
    v
}

/// Threads of this process that belong to a server or a disk.
fn server_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim_end().to_string())
        .filter(|n| {
            n.starts_with("backfill-core") || n.starts_with("nbd-conn") || n == "fuzz-nbd-server"
        })
        .collect()
}

/// [`server_threads`] once the joined threads are gone from /proc too.
///
/// A join returns when the thread's function has returned and the kernel
/// has cleared its thread id, which it does before it removes the thread's
/// /proc/self/task entry: on a loaded machine a joined thread stays listed
/// for a moment. A thread still listed after the guard was never joined.
/// The pause only keeps the poll from spinning.
fn server_threads_after_exit() -> Vec<String> {
    let guard = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = server_threads();
        if left.is_empty() || std::time::Instant::now() > guard {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// One server lifetime; `offset` picks which slice of the corpus it gets.
fn epoch(inputs: &[Vec<u8>], offset: usize) {
    for data in inputs.iter().skip(offset % STRIDE).step_by(STRIDE) {
        fuzz::nbd_client_bytes(data);
    }
    fuzz::nbd_finish();
    let left = server_threads_after_exit();
    assert!(
        left.is_empty(),
        "threads of a stopped server are still running: {left:?}"
    );
}

#[test]
fn stopped_servers_leave_nothing() {
    let inputs: Vec<Vec<u8>> = inputs().iter().map(|p| std::fs::read(p).unwrap()).collect();
    let before = LIVE.load(Ordering::SeqCst);
    epoch(&inputs, 0);
    let baseline = LIVE.load(Ordering::SeqCst);
    let mut after = Vec::new();
    for i in 1..=EPOCHS {
        epoch(&inputs, i);
        after.push(LIVE.load(Ordering::SeqCst) - baseline);
    }
    println!(
        "{} server epochs of {} hostile inputs each; heap before: {before} bytes, after the \
         first: {baseline}; after each next one, relative to that: {after:?}",
        EPOCHS + 1,
        inputs.len() / STRIDE
    );
    for (i, d) in after.iter().enumerate() {
        assert!(
            *d <= SLACK,
            "epoch {} left {d} bytes more allocated than the first (slack {SLACK}): \
             a stopped server leaks; all epochs: {after:?}",
            i + 2
        );
    }
}
