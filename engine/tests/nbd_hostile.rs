//! `backfill serve` against a raw NBD client written from the protocol
//! specification (`tests/common/nbd.rs`), which can send what no real client
//! would. Invariant 7 of DESIGN.md: hostile input is an error, not a crash,
//! and the server keeps serving everyone else.
//!
//! * `negotiation_options`: LIST returns the export; INFO reports the size,
//!   the transmission flags and the block sizes (1, 4096, 32 MiB); INFO/GO
//!   of an unknown name get ERR_UNKNOWN; unknown options, STARTTLS and
//!   EXTENDED_HEADERS get an error and negotiation continues; malformed
//!   option data gets ERR_INVALID; meta contexts list and select exactly
//!   `base:allocation` and `qemu:allocation-depth`; ABORT gets an ACK and a
//!   close; EXPORT_NAME works for the name and for "", and closes the
//!   connection for an unknown name.
//! * `bad_handshakes_close_only_their_connection`: unknown client flags,
//!   truncated client flags, a bad option magic, a truncated option header,
//!   an option whose data never arrives, an immediate hang-up: each of those
//!   connections is closed, while a connection opened before keeps reading
//!   correct data and new connections are accepted.
//! * `transmission_errors_keep_the_connection`: requests past the end
//!   (EINVAL, ENOSPC for WRITE), longer than 32 MiB (EINVAL; an oversized
//!   WRITE's payload is consumed), unknown commands and flags (EINVAL),
//!   BLOCK_STATUS without meta contexts (EINVAL), with simple and structured
//!   replies; after each, the same connection reads correct data.
//! * `broken_and_stuck_clients_do_not_stop_the_server`: a bad request magic
//!   closes that connection; clients that hang up in the middle of a request
//!   header or a WRITE payload change nothing; a client that sends reads and
//!   never reads its replies is pushed back (bounded memory) without
//!   stopping anyone else; SIGTERM with all of those still connected exits 0
//!   and leaves a clean image holding exactly the completed writes. (The
//!   server gives clients that take no replies a drain timeout at stop, so
//!   this test lasts that long.)
//! * `replies_are_matched_by_cookie`: a pipeline of reads and writes with
//!   random cookies; every reply carries its request's cookie and data.
//! * `sigterm_answers_requests_in_flight`: SIGTERM in the middle of a
//!   pipeline of writes: each request read before is answered (success or
//!   ESHUTDOWN), the connection closes, the server exits 0, and every
//!   acknowledged write is in the image, nothing else changed.
//! * `holes_without_backing`: on an image without backing, never-written
//!   ranges come back as OFFSET_HOLE chunks; DF gives one content chunk; both
//!   meta contexts describe qemu-written data, zero clusters and holes.
//! * `reads_status_and_cache_over_backing`: structured reads equal the
//!   backing bytes (also in a partial last cluster); CACHE, writes,
//!   write-zeroes and trims show up in both meta contexts cluster by cluster;
//!   the image after SIGTERM equals the model.
//! * `read_only_export_refuses_writes`: READ_ONLY is advertised; WRITE,
//!   WRITE_ZEROES and TRIM fail with EPERM; reads work and never fill; the
//!   image file is byte-for-byte unchanged.
//!
//! Every random choice comes from `BACKFILL_SEED`; nothing sleeps.

mod common;
#[path = "common/nbd.rs"]
mod nbd_common;

use common::*;
use nbd_common::*;
use std::io::Write;
use std::net::Shutdown;

const ALL_FLAGS: u16 = TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_SEND_DF
    | TF_CAN_MULTI_CONN
    | TF_SEND_CACHE
    | TF_SEND_FAST_ZERO;

/// The disk as the tests expect it to read.
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn new(data: &[u8]) -> Model {
        Model {
            bytes: data.to_vec(),
        }
    }
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn slice(&self, off: u64, len: u64) -> &[u8] {
        &self.bytes[off as usize..(off + len) as usize]
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        self.bytes[off as usize..off as usize + data.len()].copy_from_slice(data);
    }
    fn zero(&mut self, off: u64, len: u64) {
        self.bytes[off as usize..(off + len) as usize].fill(0);
    }
}

/// A random range of at most `max` bytes inside the disk.
fn random_range(rng: &mut Rng, size: u64, max: u64) -> (u64, u32) {
    let len = rng.range(1, max.min(size) + 1);
    let off = rng.below(size - len + 1);
    (off, len as u32)
}

/// A few random reads on `c`, compared with the model.
#[track_caller]
fn check_reads(c: &mut Client, model: &Model, rng: &mut Rng, what: &str) {
    for _ in 0..4 {
        let (off, len) = random_range(rng, model.size(), 256 * KIB);
        let got = c
            .read(off, len)
            .unwrap_or_else(|e| panic!("{what}: READ [{off}, +{len}) failed with {e}"));
        assert_same_bytes(
            &got,
            model.slice(off, len as u64),
            &format!("{what}: READ [{off}, +{len})"),
        );
    }
}

/// A new connection still negotiates and reads correct data.
#[track_caller]
fn check_new_connection(server: &Server, model: &Model, rng: &mut Rng, what: &str) {
    let mut c = server.client();
    check_reads(&mut c, model, rng, &format!("{what} (new connection)"));
    c.disconnect();
}

/// Random bytes for a write payload.
fn payload(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// A handshake with the usual client flags sent.
fn start(server: &Server) -> Handshake {
    let mut h = server.connect();
    h.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    h
}

/// A well-framed but invalid option: one ERR_INVALID (or ERR_UNSUP) reply,
/// and the connection stays in negotiation.
#[track_caller]
fn refused(h: &mut Handshake, option: u32, data: &[u8]) {
    let r = h.option(option, data);
    assert!(
        r.len() == 1 && matches!(r[0].typ, REP_ERR_INVALID | REP_ERR_UNSUP),
        "invalid option {option} ({data:02x?}): {r:?}"
    );
}

// ------------------------------------------------------------- negotiation

#[test]
fn negotiation_options() {
    let seed = seed_from_env("negotiation_options");
    let mut rng = Rng::new(seed);
    let size = 8 * MIB + 4 * KIB;
    let f = Fixture::with_backing("nbdh-opt", size, rng.next_u64());
    let model = Model::new(&f.data);
    let server = f.serve(&["--export", "vm1"]);

    let mut h = start(&server);
    // Options the server does not know or refuses: an error, then go on.
    let r = h.option(0x1234, b"junk");
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].typ, REP_ERR_UNSUP, "unknown option: {r:?}");
    let r = h.option(OPT_STARTTLS, &[]);
    assert!(
        r.len() == 1 && matches!(r[0].typ, REP_ERR_POLICY | REP_ERR_UNSUP),
        "STARTTLS without TLS: {r:?}"
    );
    h.option_expect(OPT_EXTENDED_HEADERS, &[], REP_ERR_UNSUP);
    h.option_expect(OPT_LIST, b"x", REP_ERR_INVALID);

    // LIST: the one export, by name.
    let r = h.option(OPT_LIST, &[]);
    assert_eq!(r.len(), 2, "LIST: one SERVER reply and an ACK: {r:?}");
    assert_eq!(r[0].typ, REP_SERVER, "{r:?}");
    let name_len = u32::from_be_bytes(r[0].data[..4].try_into().unwrap()) as usize;
    assert!(4 + name_len <= r[0].data.len(), "{r:?}");
    assert_eq!(&r[0].data[4..4 + name_len], b"vm1", "{r:?}");
    assert_eq!(r[1].typ, REP_ACK, "{r:?}");

    // INFO before structured replies: no DF flag.
    for name in ["vm1", ""] {
        let info = h
            .info_or_go(OPT_INFO, name)
            .unwrap_or_else(|r| panic!("INFO {name:?}: {r:?}"));
        assert_eq!(info.size, size, "INFO {name:?}");
        assert_eq!(
            info.flags,
            ALL_FLAGS & !TF_SEND_DF,
            "INFO {name:?} flags {:#x}: DF must be clear without structured replies",
            info.flags
        );
        assert_eq!(
            info.block_size,
            Some((1, 4096, MAX_REQUEST)),
            "INFO {name:?} block sizes"
        );
    }
    for opt in [OPT_INFO, OPT_GO] {
        let e = h.info_or_go(opt, "nope").expect_err("unknown export");
        assert_eq!(e.typ, REP_ERR_UNKNOWN, "option {opt} for \"nope\": {e:?}");
    }
    // Meta contexts need structured replies first (proto.md: SHOULD be
    // ERR_INVALID); any error will do, as long as negotiation goes on.
    let r = h.option(OPT_LIST_META_CONTEXT, &meta_context_data("vm1", &[]));
    assert!(
        r.len() == 1 && r[0].is_error(),
        "LIST_META_CONTEXT before STRUCTURED_REPLY: {r:?}"
    );

    h.structured_reply();
    let mut all = h.list_meta_context("vm1", &[]);
    all.sort_by(|a, b| a.1.cmp(&b.1));
    let names: Vec<&str> = all.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(names, [BASE_ALLOCATION, ALLOCATION_DEPTH], "{all:?}");
    let one = h.list_meta_context("", &[BASE_ALLOCATION]);
    assert_eq!(one.len(), 1, "{one:?}");
    assert_eq!(one[0].1, BASE_ALLOCATION);
    let none = h.set_meta_context("", &["x-nothing:here"]);
    assert!(
        none.is_empty(),
        "an unknown context selects nothing: {none:?}"
    );
    // Malformed data, well framed: ERR_INVALID, and negotiation continues.
    let mut bad = meta_context_data("", &[]);
    bad.truncate(bad.len() - 4);
    bad.extend_from_slice(&3u32.to_be_bytes());
    refused(&mut h, OPT_SET_META_CONTEXT, &bad);
    let mut bad_go = go_data("", &[]);
    bad_go[..4].copy_from_slice(&100u32.to_be_bytes());
    refused(&mut h, OPT_GO, &bad_go);
    refused(&mut h, OPT_STRUCTURED_REPLY, &[1, 2]);

    let set = h.set_meta_context("vm1", &[ALLOCATION_DEPTH, "base:nonsense", BASE_ALLOCATION]);
    let mut names: Vec<&str> = set.iter().map(|c| c.1.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, [BASE_ALLOCATION, ALLOCATION_DEPTH], "{set:?}");
    let info = h.info_or_go(OPT_INFO, "vm1").unwrap();
    assert_eq!(info.flags, ALL_FLAGS, "flags with structured replies");

    let mut c = h.go("vm1");
    assert_eq!(c.size(), size);
    assert_eq!(c.info.flags, ALL_FLAGS);
    check_reads(&mut c, &model, &mut rng, "after GO");
    let depth = c.status_map(ALLOCATION_DEPTH, 0, size);
    assert!(!depth.is_empty());
    c.disconnect();

    // ABORT: an ACK, then the server closes.
    let mut h = start(&server);
    h.option_expect(OPT_ABORT, &[], REP_ACK);
    let closed = h.closed("after NBD_OPT_ABORT");
    assert!(closed.bytes.is_empty(), "{closed:?}");

    // EXPORT_NAME: by name and by "", with simple replies; an unknown name
    // closes the connection (EXPORT_NAME cannot return an error).
    for name in ["vm1", ""] {
        let mut c = start(&server).export_name(name);
        assert_eq!(c.size(), size, "EXPORT_NAME {name:?}");
        assert_eq!(
            c.info.flags,
            ALL_FLAGS & !TF_SEND_DF,
            "EXPORT_NAME {name:?}"
        );
        check_reads(&mut c, &model, &mut rng, "after EXPORT_NAME");
        c.disconnect();
    }
    let mut h = start(&server);
    h.send_option(OPT_EXPORT_NAME, b"nope");
    h.closed("EXPORT_NAME of an unknown export");

    server.stop();
    f.check_image(&model.bytes);
}

#[test]
fn bad_handshakes_close_only_their_connection() {
    let seed = seed_from_env("bad_handshakes_close_only_their_connection");
    let mut rng = Rng::new(seed);
    let f = Fixture::with_backing("nbdh-hs", 8 * MIB, rng.next_u64());
    let model = Model::new(&f.data);
    let server = f.serve(&[]);
    let mut good = server.client();
    // A client that stops in the middle of the handshake and stays connected:
    // it must not keep the server from stopping.
    let idle = server.connect();

    type Case = (&'static str, Box<dyn Fn(&mut Handshake)>);
    let cases: Vec<Case> = vec![
        (
            "unknown client flag",
            Box::new(|h| h.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES | 1 << 7)),
        ),
        (
            "client flags cut short",
            Box::new(|h| {
                h.send_raw(&[0, 0]);
                h.stream().shutdown(Shutdown::Write).unwrap();
            }),
        ),
        (
            "bad option magic",
            Box::new(|h| {
                h.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
                h.send_raw(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
            }),
        ),
        (
            "option header cut short",
            Box::new(|h| {
                h.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
                h.send_raw(&IHAVEOPT.to_be_bytes());
                h.send_raw(&[0, 0]);
                h.stream().shutdown(Shutdown::Write).unwrap();
            }),
        ),
        (
            "option data that never comes",
            Box::new(|h| {
                h.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
                let mut m = IHAVEOPT.to_be_bytes().to_vec();
                m.extend_from_slice(&OPT_GO.to_be_bytes());
                m.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
                m.extend_from_slice(&[0; 100]);
                h.send_raw(&m);
                h.stream().shutdown(Shutdown::Write).unwrap();
            }),
        ),
        (
            "hang-up right after the greeting",
            Box::new(|h| h.stream().shutdown(Shutdown::Both).unwrap()),
        ),
    ];
    for (what, case) in &cases {
        let mut h = server.connect();
        case(&mut h);
        if *what != "hang-up right after the greeting" {
            let closed = h.closed(what);
            // Whatever the server sent before closing must be option replies
            // (an error), never the start of a transmission phase.
            if !closed.bytes.is_empty() {
                assert!(
                    closed.bytes.len() >= 8 && closed.bytes[..8] == OPT_REPLY_MAGIC.to_be_bytes(),
                    "{what}: the server sent {:02x?} before closing",
                    &closed.bytes[..closed.bytes.len().min(32)]
                );
            }
        }
        check_reads(&mut good, &model, &mut rng, what);
        check_new_connection(&server, &model, &mut rng, what);
    }

    // An option longer than any valid one, with its data sent: the server
    // may refuse it (an error reply, then negotiation continues) or close,
    // but must stay up.
    let mut h = start(&server);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_SET_META_CONTEXT.to_be_bytes());
    m.extend_from_slice(&(1u32 << 20).to_be_bytes());
    m.resize(m.len() + (1 << 20), b'a');
    // The server may close before it has read it all: a failed send is fine.
    let _ = h.stream().write_all(&m);
    drop(h);
    check_reads(&mut good, &model, &mut rng, "a 1 MiB option");

    drop(idle);
    let idle = server.connect();
    server.stop();
    drop(idle);
    drop(good);
    f.check_image(&model.bytes);
}

// ------------------------------------------------------------ transmission

#[test]
fn transmission_errors_keep_the_connection() {
    let seed = seed_from_env("transmission_errors_keep_the_connection");
    let mut rng = Rng::new(seed);
    // Larger than one maximal request, so that exactly 32 MiB is readable.
    let size = 36 * MIB;
    let f = Fixture::with_backing("nbdh-err", size, rng.next_u64());
    let mut model = Model::new(&f.data);
    let server = f.serve(&[]);
    let mut c = server.client();

    // Past the end, and offsets that overflow.
    for (off, len) in [
        (size - 512, 4096u32),
        (size, 1),
        (u64::MAX - 100, 512),
        (size + MIB, 512),
    ] {
        let r = c.call(0, CMD_READ, off, len, &[]);
        c.check_read_reply(&r);
        assert_eq!(r.error, EINVAL, "READ [{off}, +{len}): {}", r.describe());
        check_reads(&mut c, &model, &mut rng, "after a READ past the end");
    }
    for typ in [CMD_BLOCK_STATUS, CMD_CACHE, CMD_TRIM, CMD_WRITE_ZEROES] {
        for (off, len) in [(size - 512, 4096u32), (size, 1), (u64::MAX - 100, 512)] {
            let r = c.call(0, typ, off, len, &[]);
            // proto.md wants ENOSPC for writes past the end and is unclear
            // whether WRITE_ZEROES counts as one (qemu-nbd says ENOSPC).
            let ok = r.error == EINVAL || (typ == CMD_WRITE_ZEROES && r.error == ENOSPC);
            assert!(
                ok,
                "command {typ} [{off}, +{len}): EINVAL expected: {}",
                r.describe()
            );
        }
        check_reads(&mut c, &model, &mut rng, "after a command past the end");
    }
    let data = payload(&mut rng, 4096);
    assert_eq!(
        c.write(size - 100, &data, 0),
        ENOSPC,
        "WRITE across the end"
    );
    assert_eq!(c.write(size, &data[..1], 0), ENOSPC, "WRITE at the end");
    let e = c.write(u64::MAX - 100, &data, 0);
    assert!(
        e == ENOSPC || e == EINVAL,
        "WRITE at an overflowing offset: error {e}"
    );
    // A failed write changes nothing, not even its part inside the disk.
    assert_same_bytes(
        &c.read_ok(size - 4096, 4096),
        model.slice(size - 4096, 4096),
        "the end after failed writes",
    );

    // Length limits: exactly 32 MiB is fine, one byte more is EINVAL; an
    // oversized WRITE's payload is read and discarded.
    let r = c.call(0, CMD_READ, 0, MAX_REQUEST + 1, &[]);
    c.check_read_reply(&r);
    assert_eq!(r.error, EINVAL, "READ of 32 MiB + 1: {}", r.describe());
    assert_same_bytes(
        &c.read_ok(MIB, MAX_REQUEST),
        model.slice(MIB, MAX_REQUEST as u64),
        "READ of 32 MiB",
    );
    let big = payload(&mut rng, MAX_REQUEST as usize + 1);
    assert_eq!(c.write(0, &big, 0), EINVAL, "WRITE of 32 MiB + 1");
    check_reads(&mut c, &model, &mut rng, "after an oversized WRITE");
    let off = 2 * MIB + 512;
    c.write_ok(off, &big[..MAX_REQUEST as usize], 0);
    model.write(off, &big[..MAX_REQUEST as usize]);
    check_reads(&mut c, &model, &mut rng, "after a 32 MiB WRITE");

    // Unknown commands and flags.
    for typ in [8u16, 9, 42, 0xffff] {
        let r = c.call(0, typ, 0, 512, &[]);
        assert_eq!(r.error, EINVAL, "command type {typ}: {}", r.describe());
    }
    for flag in [1u16 << 6, 1 << 9, 1 << 15] {
        let r = c.call(flag, CMD_READ, 0, 512, &[]);
        c.check_read_reply(&r);
        assert_eq!(
            r.error,
            EINVAL,
            "READ with flag {flag:#x}: {}",
            r.describe()
        );
        let data = payload(&mut rng, 1000);
        assert_eq!(
            c.write(4 * MIB, &data, flag),
            EINVAL,
            "WRITE with flag {flag:#x}"
        );
        check_reads(&mut c, &model, &mut rng, "after unknown flags");
    }
    assert_same_bytes(
        &c.read_ok(4 * MIB, 1000),
        model.slice(4 * MIB, 1000),
        "a WRITE refused for its flags wrote nothing",
    );

    // Flags that are valid: FUA on a read (proto.md: accepted on any
    // command), DF, REQ_ONE, NO_HOLE, FAST_ZERO.
    let got = c.read_flags(5 * MIB, 8192, CMD_FLAG_FUA);
    assert_eq!(
        got.as_deref(),
        Ok(model.slice(5 * MIB, 8192)),
        "READ with FUA"
    );
    let r = c.call(CMD_FLAG_DF, CMD_READ, 5 * MIB + 7, 300 * 1024, &[]);
    assert_eq!(r.error, 0, "READ with DF: {}", r.describe());
    assert_eq!(
        r.content_chunks(),
        1,
        "DF: one content chunk: {}",
        r.describe()
    );
    assert_same_bytes(
        &r.assemble(5 * MIB + 7, 300 * 1024),
        model.slice(5 * MIB + 7, 300 * 1024),
        "READ with DF",
    );
    let st = c
        .block_status(0, size as u32, CMD_FLAG_REQ_ONE)
        .expect("BLOCK_STATUS with REQ_ONE");
    for (id, ext) in &st {
        assert_eq!(ext.len(), 1, "REQ_ONE: one extent for context {id}: {st:?}");
    }
    assert_eq!(
        c.command(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 6 * MIB, 5000),
        0,
        "WRITE_ZEROES with NO_HOLE"
    );
    model.zero(6 * MIB, 5000);
    let e = c.command(
        CMD_WRITE_ZEROES,
        CMD_FLAG_FAST_ZERO,
        7 * MIB,
        CLUSTER as u32,
    );
    match e {
        0 => model.zero(7 * MIB, CLUSTER),
        ENOTSUP => {}
        e => panic!("WRITE_ZEROES with FAST_ZERO: error {e} (0 or ENOTSUP)"),
    }
    check_reads(&mut c, &model, &mut rng, "after valid flags");
    assert_same_bytes(
        &c.read_ok(6 * MIB - 10, 5020),
        model.slice(6 * MIB - 10, 5020),
        "around WRITE_ZEROES",
    );

    // BLOCK_STATUS without meta contexts: EINVAL, with structured replies
    // and without (where errors come as simple replies, READ included).
    let mut h = start(&server);
    h.structured_reply();
    let mut plain_structured = h.go("");
    let r = plain_structured.call(0, CMD_BLOCK_STATUS, 0, 4096, &[]);
    assert_eq!(
        r.error,
        EINVAL,
        "BLOCK_STATUS without contexts: {}",
        r.describe()
    );
    check_reads(
        &mut plain_structured,
        &model,
        &mut rng,
        "after BLOCK_STATUS",
    );
    plain_structured.disconnect();
    let mut simple = start(&server).go("");
    let r = simple.call(0, CMD_BLOCK_STATUS, 0, 4096, &[]);
    assert_eq!(r.error, EINVAL, "BLOCK_STATUS without structured replies");
    assert!(r.simple, "{}", r.describe());
    let r = simple.call(0, CMD_READ, size - 10, 20, &[]);
    assert_eq!(r.error, EINVAL, "simple READ past the end");
    assert!(r.simple && r.data.is_empty(), "{}", r.describe());
    check_reads(&mut simple, &model, &mut rng, "simple replies after errors");
    simple.disconnect();

    check_reads(&mut c, &model, &mut rng, "at the end");
    c.disconnect();
    server.stop();
    f.check_image(&model.bytes);
}

#[test]
fn broken_and_stuck_clients_do_not_stop_the_server() {
    let seed = seed_from_env("broken_and_stuck_clients_do_not_stop_the_server");
    let mut rng = Rng::new(seed);
    let size = 16 * MIB;
    let f = Fixture::with_backing("nbdh-stuck", size, rng.next_u64());
    let mut model = Model::new(&f.data);
    let server = f.serve(&[]);
    let mut good = server.client();

    // A request with a bad magic: the server closes that connection.
    let mut c = server.client();
    c.stream()
        .write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(7))
        .unwrap();
    c.closed("a request with a bad magic");
    check_reads(&mut good, &model, &mut rng, "after a bad request magic");

    // Hang-ups in the middle of a request header, and of a WRITE payload:
    // the half-sent write must not happen.
    let mut c = server.client();
    let req = encode_request(0, CMD_READ, 7, 0, 4096);
    c.stream().write_all(&req[..14]).unwrap();
    drop(c);
    let mut c = server.client();
    let mut req = encode_request(0, CMD_WRITE, 8, MIB, 64 * 1024);
    req.extend_from_slice(&[0x5a; 10_000]);
    c.stream().write_all(&req).unwrap();
    drop(c);
    check_reads(&mut good, &model, &mut rng, "after hang-ups mid-request");
    assert_same_bytes(
        &good.read_ok(MIB, 64 * 1024),
        model.slice(MIB, 64 * 1024),
        "a WRITE whose payload never fully arrived",
    );
    check_new_connection(&server, &model, &mut rng, "after hang-ups mid-request");

    // Clients that stay connected with half a request sent.
    let mut half_header = server.client();
    half_header.stream().write_all(&req[..20]).unwrap();
    let mut half_payload = server.client();
    half_payload.stream().write_all(&req[..28 + 5000]).unwrap();

    // Clients that send reads and never read the replies. A server that
    // bounds its memory per connection stops reading their requests once it
    // holds enough unsent replies, so a thread sending 100 000 reads blocks
    // until the connection closes. If it finishes, the server read every
    // request and buffered (or dropped) 50 MiB of replies to a client that
    // reads nothing. (A server that is merely slow could hide that here:
    // the check is one-sided, never a false failure.) One of them hangs up
    // afterwards, the other stays connected until after SIGTERM.
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let mut s = server.client();
        let mut m = Vec::with_capacity(28 * 100_000);
        for i in 0..100_000u64 {
            let off = rng.below(size / 512) * 512;
            m.extend_from_slice(&encode_request(0, CMD_READ, i, off, 512));
        }
        let mut w = s.stream().try_clone().unwrap();
        w.set_write_timeout(None).unwrap();
        // Ends with an error when the connection is closed, by either side.
        let writer = std::thread::spawn(move || w.write_all(&m));
        check_reads(
            &mut good,
            &model,
            &mut rng,
            "with a client that reads nothing",
        );
        check_new_connection(
            &server,
            &model,
            &mut rng,
            "with a client that reads nothing",
        );
        stuck.push((s, writer));
    }
    // A finished writer is fine only if the server closed the connection.
    let mut stuck: Vec<_> = stuck
        .into_iter()
        .map(|(s, writer)| {
            if !writer.is_finished() {
                return (s, Some(writer));
            }
            let sent = writer.join().unwrap();
            assert!(
                sent.is_err(),
                "the server read all 100 000 requests of a client that reads no replies: \
                 its memory for that connection is not bounded"
            );
            (s, None)
        })
        .collect();
    let (mut first, writer) = stuck.remove(0);
    first.stream().shutdown(Shutdown::Both).unwrap();
    if let Some(w) = writer {
        let _ = w.join().unwrap();
    }

    // Everything still works, writes included, and they survive shutdown.
    for _ in 0..8 {
        let (off, len) = random_range(&mut rng, size, 200 * 1024);
        let data = payload(&mut rng, len as usize);
        good.write_ok(off, &data, 0);
        model.write(off, &data);
    }
    check_reads(&mut good, &model, &mut rng, "after writes");
    check_new_connection(&server, &model, &mut rng, "at the end");

    server.stop();
    // The server closed the connection of the client that reads nothing.
    let (last, writer) = stuck.remove(0);
    if let Some(w) = writer {
        assert!(
            w.join().unwrap().is_err(),
            "the server read all 100 000 requests of a client that reads no replies"
        );
    }
    drop((good, half_header, half_payload, last));
    f.check_image(&model.bytes);
}

#[test]
fn replies_are_matched_by_cookie() {
    let seed = seed_from_env("replies_are_matched_by_cookie");
    let mut rng = Rng::new(seed);
    let size = 16 * MIB;
    let f = Fixture::with_backing("nbdh-cookie", size, rng.next_u64());
    let mut model = Model::new(&f.data);
    let server = f.serve(&[]);
    let mut c = server.client();

    // Reads stay in [0, 8 MiB), writes in [8 MiB, 16 MiB): no request
    // depends on another one in flight. A large read goes first, so that
    // small ones may overtake it. The requests go out from another thread
    // while this one reads the replies, as a real client does.
    #[derive(Debug)]
    enum Sent {
        Read(u64, u32),
        Write,
    }
    let mut sent = std::collections::HashMap::new();
    let mut reqs = Vec::new();
    let mut read = |rng: &mut Rng, reqs: &mut Vec<Request>, off: u64, len: u32| {
        let cookie = rng.next_u64();
        sent.insert(cookie, Sent::Read(off, len));
        reqs.push(Request {
            cookie,
            flags: 0,
            typ: CMD_READ,
            offset: off,
            len,
            payload: Vec::new(),
        });
    };
    read(&mut rng, &mut reqs, 0, 8 * MIB as u32);
    for _ in 0..100 {
        let (off, len) = random_range(&mut rng, 8 * MIB, 128 * KIB);
        read(&mut rng, &mut reqs, off, len);
    }
    for i in 0..32u64 {
        let off = 8 * MIB + i * 256 * KIB + rng.below(1000);
        let len = rng.range(1, 200 * KIB) as usize;
        let data = payload(&mut rng, len);
        let cookie = rng.next_u64();
        model.write(off, &data);
        sent.insert(cookie, Sent::Write);
        reqs.push(Request {
            cookie,
            flags: 0,
            typ: CMD_WRITE,
            offset: off,
            len: len as u32,
            payload: data,
        });
    }
    let order: Vec<u64> = reqs.iter().map(|r| r.cookie).collect();
    let sender = c.send_in_background(reqs);
    let mut overtaken = 0;
    let mut answered = Vec::new();
    while !sent.is_empty() {
        let r = c.recv_any();
        let req = sent
            .remove(&r.cookie)
            .unwrap_or_else(|| panic!("reply to unknown cookie {:#x}", r.cookie));
        match req {
            Sent::Read(off, len) => {
                c.check_read_reply(&r);
                assert_same_bytes(
                    &r.assemble(off, len),
                    model.slice(off, len as u64),
                    &format!("pipelined READ [{off}, +{len})"),
                );
            }
            Sent::Write => assert_eq!(r.error, 0, "pipelined WRITE: {}", r.describe()),
        }
        answered.push(r.cookie);
    }
    sender
        .join()
        .expect("the sending thread")
        .expect("sending the pipeline");
    for (i, cookie) in answered.iter().enumerate() {
        if order[i] != *cookie {
            overtaken += 1;
        }
    }
    eprintln!("{overtaken} of {} replies came out of order", order.len());
    check_reads(&mut c, &model, &mut rng, "after the pipeline");
    assert_same_bytes(
        &c.read_ok(8 * MIB, 8 * MIB as u32),
        model.slice(8 * MIB, 8 * MIB),
        "the written half",
    );
    c.disconnect();
    server.stop();
    f.check_image(&model.bytes);
}

#[test]
fn sigterm_answers_requests_in_flight() {
    let seed = seed_from_env("sigterm_answers_requests_in_flight");
    let mut rng = Rng::new(seed);
    let size = 16 * MIB;
    let f = Fixture::with_backing("nbdh-term", size, rng.next_u64());
    let server = f.serve(&[]);
    let mut c = server.client();

    // 128 writes of 64 KiB to distinct places (some FUA), a FLUSH among
    // them; SIGTERM once the first reply is in. Whatever was in flight then
    // is answered (or refused with ESHUTDOWN), the connection closes, and
    // every acknowledged write is in the image.
    let mut writes = std::collections::HashMap::new();
    let mut reqs = Vec::new();
    for i in 0..128u64 {
        let off = i * 128 * KIB + rng.below(64 * KIB);
        let data = payload(&mut rng, 64 * 1024);
        let cookie = rng.next_u64();
        let flags = if i % 8 == 0 { CMD_FLAG_FUA } else { 0 };
        reqs.push(Request {
            cookie,
            flags,
            typ: CMD_WRITE,
            offset: off,
            len: data.len() as u32,
            payload: data.clone(),
        });
        writes.insert(cookie, (off, data));
        if i == 64 {
            reqs.push(Request {
                cookie: rng.next_u64(),
                flags: 0,
                typ: CMD_FLUSH,
                offset: 0,
                len: 0,
                payload: Vec::new(),
            });
        }
    }
    let sender = c.send_in_background(reqs);
    let first = c.recv_any();
    server.signal(libc::SIGTERM);
    let mut replies = vec![first];
    while let Some(r) = c.try_recv_any() {
        replies.push(r);
    }
    let mut acked = 0;
    for r in &replies {
        assert!(
            r.error == 0 || r.error == ESHUTDOWN,
            "a request in flight at SIGTERM failed: {}",
            r.describe()
        );
        if r.error == 0 && writes.contains_key(&r.cookie) {
            acked += 1;
        }
    }
    eprintln!(
        "{acked} writes acknowledged, {} replies, {} requests unanswered",
        replies.len(),
        c.in_flight()
    );
    // The sender fails if the server stopped reading before it was done.
    let _ = sender.join().expect("the sending thread");
    server.wait_stopped();
    check_clean(&f.image);
    // Unacknowledged writes may or may not have landed: compare only the
    // ranges whose fate is known.
    let contents = raw_contents(&f.image);
    for r in replies.iter().filter(|r| r.error == 0) {
        if let Some((off, data)) = writes.get(&r.cookie) {
            let o = *off as usize;
            assert_same_bytes(
                &contents[o..o + data.len()],
                data,
                &format!("acknowledged write at {off}"),
            );
        }
    }
    let untouched: Vec<(u64, u64)> = {
        let mut v = Vec::new();
        let mut pos = 0;
        let mut ranges: Vec<(u64, u64)> = writes
            .values()
            .map(|(o, d)| (*o, *o + d.len() as u64))
            .collect();
        ranges.sort_unstable();
        for (a, b) in ranges {
            if a > pos {
                v.push((pos, a));
            }
            pos = pos.max(b);
        }
        v.push((pos, size));
        v
    };
    for (a, b) in untouched {
        assert_same_bytes(
            &contents[a as usize..b as usize],
            &f.data[a as usize..b as usize],
            &format!("never written [{a}, {b})"),
        );
    }
}

// ------------------------------------------------------------ block status

/// Expected extents from a per-cluster classification, merged.
fn cluster_map(size: u64, f: impl Fn(u64) -> u32) -> Vec<(u64, u64, u32)> {
    let v: Vec<(u64, u64, u32)> = (0..size.div_ceil(CLUSTER))
        .map(|i| {
            let o = i * CLUSTER;
            (o, CLUSTER.min(size - o), f(o))
        })
        .collect();
    merge_extents(&v)
}

#[test]
fn holes_without_backing() {
    let seed = seed_from_env("holes_without_backing");
    let mut rng = Rng::new(seed);
    let size = 16 * MIB;
    let f = Fixture::without_backing("nbdh-hole", size);
    let mut model = Model::new(&f.data);
    // Data and a zero cluster, written by qemu before the server runs.
    qemu_io(
        &f.image,
        "qcow2",
        &["write -P 0x61 1M 64k".into(), "write -z 2M 64k".into()],
    );
    model.write(MIB, &[0x61; 64 * 1024]);
    let server = f.serve(&[]);
    let mut c = server.client();

    let r = c.call(0, CMD_READ, 4 * MIB, MIB as u32, &[]);
    c.check_read_reply(&r);
    assert!(
        r.data.is_empty() && !r.holes.is_empty(),
        "a never-written range of an image without backing must come back as \
         OFFSET_HOLE chunks: {}",
        r.describe()
    );
    assert_same_bytes(
        &r.assemble(4 * MIB, MIB as u32),
        model.slice(4 * MIB, MIB),
        "hole",
    );

    // Data surrounded by holes: the holes are never sent as data.
    let (off, len) = (MIB - 4096, 72 * 1024u32);
    let r = c.call(0, CMD_READ, off, len, &[]);
    assert_same_bytes(&r.assemble(off, len), model.slice(off, len as u64), "data");
    for (o, d) in &r.data {
        let end = o + d.len() as u64;
        assert!(
            *o >= MIB && end <= MIB + 64 * 1024,
            "data chunk [{o}, {end}) covers unallocated space: {}",
            r.describe()
        );
    }
    let r = c.call(0, CMD_READ, 2 * MIB, 64 * 1024, &[]);
    assert!(
        r.data.is_empty(),
        "a zero cluster reads as a hole: {}",
        r.describe()
    );

    // DF: exactly one content chunk, whatever the mix.
    let r = c.call(CMD_FLAG_DF, CMD_READ, 0, 3 * MIB as u32, &[]);
    assert_eq!(r.error, 0, "{}", r.describe());
    assert_eq!(r.content_chunks(), 1, "DF: {}", r.describe());
    assert_same_bytes(
        &r.assemble(0, 3 * MIB as u32),
        model.slice(0, 3 * MIB),
        "DF read",
    );

    let in_data = |o: u64| (MIB..MIB + 64 * KIB).contains(&o);
    let in_zero = |o: u64| (2 * MIB..2 * MIB + 64 * KIB).contains(&o);
    let base = c.status_map(BASE_ALLOCATION, 0, size);
    let want = cluster_map(size, |o| {
        if in_data(o) {
            0
        } else if in_zero(o) {
            OVERLAY_ZERO
        } else {
            STATE_HOLE | STATE_ZERO
        }
    });
    assert_eq!(base, want, "base:allocation");
    let depth = c.status_map(ALLOCATION_DEPTH, 0, size);
    let want = cluster_map(size, |o| u32::from(in_data(o) || in_zero(o)));
    assert_eq!(depth, want, "qemu:allocation-depth");
    // A query that starts and ends inside clusters.
    let part = c.status_map(BASE_ALLOCATION, MIB - 1000, 3000);
    assert_eq!(
        part,
        vec![(MIB - 1000, 1000, STATE_HOLE | STATE_ZERO), (MIB, 2000, 0)],
        "unaligned base:allocation"
    );

    check_reads(&mut c, &model, &mut rng, "without backing");
    c.disconnect();
    server.stop();
    f.check_image(&model.bytes);
}

#[test]
fn reads_status_and_cache_over_backing() {
    let seed = seed_from_env("reads_status_and_cache_over_backing");
    let mut rng = Rng::new(seed);
    // Not a multiple of the cluster size: the last cluster is partial.
    let size = 16 * MIB + 12 * KIB;
    let f = Fixture::with_backing("nbdh-bs", size, rng.next_u64());
    let mut model = Model::new(&f.data);
    let server = f.serve(&[]);
    let mut c = server.client();

    let all_backing = vec![(0, size, 2)];
    assert_eq!(
        c.status_map(ALLOCATION_DEPTH, 0, size),
        all_backing,
        "depth before I/O"
    );
    assert_eq!(c.status_map(BASE_ALLOCATION, 0, size), vec![(0, size, 0)]);

    // Reads from the backing file, the partial last cluster included. Each
    // fills its clusters (copy-on-read), which FLUSH makes visible.
    let mut local = std::collections::BTreeSet::new();
    let touch = |local: &mut std::collections::BTreeSet<u64>, off: u64, len: u64| {
        for cl in off / CLUSTER..(off + len).div_ceil(CLUSTER) {
            local.insert(cl);
        }
    };
    for (off, len) in [
        (size - 20_000, 20_000u32),
        (12_345, 100_000),
        (3 * MIB + 1, 1),
    ] {
        assert_same_bytes(
            &c.read_ok(off, len),
            model.slice(off, len as u64),
            &format!("READ [{off}, +{len})"),
        );
        touch(&mut local, off, len as u64);
    }
    // CACHE fills without sending data back.
    for (off, len) in [(2 * MIB, 256 * 1024u32), (5 * MIB + 1000, 5000)] {
        assert_eq!(
            c.command(CMD_CACHE, 0, off, len),
            0,
            "CACHE [{off}, +{len})"
        );
        touch(&mut local, off, len as u64);
    }
    // Writes, write-zeroes and trims (which must hide the backing data:
    // they read as zeros, here and after a restart).
    let data = payload(&mut rng, 3000);
    c.write_ok(6 * MIB + 100, &data, CMD_FLAG_FUA);
    model.write(6 * MIB + 100, &data);
    touch(&mut local, 6 * MIB + 100, 3000);
    let zeroed = [(7 * MIB, 128 * KIB), (9 * MIB, 128 * KIB)];
    assert_eq!(
        c.command(CMD_WRITE_ZEROES, 0, zeroed[0].0, zeroed[0].1 as u32),
        0
    );
    assert_eq!(c.command(CMD_TRIM, 0, zeroed[1].0, zeroed[1].1 as u32), 0);
    for (off, len) in [(8 * MIB + 512, 1024u64), (10 * MIB + 100, 200)] {
        let typ = if off == 8 * MIB + 512 {
            CMD_WRITE_ZEROES
        } else {
            CMD_TRIM
        };
        assert_eq!(
            c.command(typ, 0, off, len as u32),
            0,
            "command {typ} [{off}, +{len})"
        );
        model.zero(off, len);
        touch(&mut local, off, len);
    }
    for (off, len) in zeroed {
        model.zero(off, len);
        touch(&mut local, off, len);
    }
    // FLUSH also waits for the copy-on-read write-backs in flight.
    c.flush_ok();

    // Nothing has read outside `local` since: the maps are exact.
    let depth = c.status_map(ALLOCATION_DEPTH, 0, size);
    let want = cluster_map(size, |o| if local.contains(&(o / CLUSTER)) { 1 } else { 2 });
    assert_eq!(depth, want, "qemu:allocation-depth after fills and writes");
    let is_zeroed = |o: u64| zeroed.iter().any(|&(z, l)| (z..z + l).contains(&o));
    let base = c.status_map(BASE_ALLOCATION, 0, size);
    let want = cluster_map(size, |o| if is_zeroed(o) { OVERLAY_ZERO } else { 0 });
    assert_eq!(base, want, "base:allocation after fills and writes");

    // The data, around the zeroed ranges too (these reads fill clusters:
    // they join `local`).
    for (off, len) in [(8 * MIB, 2 * KIB), (10 * MIB, KIB), (7 * MIB - 10, 20)] {
        assert_same_bytes(
            &c.read_ok(off, len as u32),
            model.slice(off, len),
            &format!("around zeroed [{off}, +{len})"),
        );
        touch(&mut local, off, len);
    }
    for _ in 0..8 {
        let (off, len) = random_range(&mut rng, size, 256 * KIB);
        assert_same_bytes(
            &c.read_ok(off, len),
            model.slice(off, len as u64),
            &format!("READ [{off}, +{len})"),
        );
        touch(&mut local, off, len as u64);
    }

    c.disconnect();
    server.stop();
    f.check_image(&model.bytes);
    // The overlay itself, read by qemu: filled clusters are in it.
    let map = qemu_map(&f.image);
    for cl in 0..size.div_ceil(CLUSTER) {
        let e = map_at(&map, cl * CLUSTER);
        let want_depth = if local.contains(&cl) { 0 } else { 1 };
        assert_eq!(e.depth, want_depth, "qemu-img map, cluster {cl}: {e:?}");
    }
}

#[test]
fn read_only_export_refuses_writes() {
    let seed = seed_from_env("read_only_export_refuses_writes");
    let mut rng = Rng::new(seed);
    let size = 8 * MIB;
    let f = Fixture::with_backing("nbdh-ro", size, rng.next_u64());
    let model = Model::new(&f.data);
    let before = read_file(&f.image);
    let server = f.serve(&["--read-only"]);
    let mut c = server.client();
    assert_ne!(c.info.flags & TF_READ_ONLY, 0, "flags {:#x}", c.info.flags);
    assert_ne!(c.info.flags & TF_HAS_FLAGS, 0, "flags {:#x}", c.info.flags);

    for flags in [0, CMD_FLAG_FUA] {
        let data = payload(&mut rng, 5000);
        assert_eq!(c.write(MIB, &data, flags), EPERM, "WRITE flags {flags:#x}");
        check_reads(&mut c, &model, &mut rng, "after a refused WRITE");
    }
    assert_eq!(
        c.command(CMD_WRITE_ZEROES, 0, 0, 4096),
        EPERM,
        "WRITE_ZEROES"
    );
    assert_eq!(c.command(CMD_TRIM, 0, 0, 4096), EPERM, "TRIM");
    assert_same_bytes(
        &c.read_ok(0, MIB as u32 * 2),
        model.slice(0, 2 * MIB),
        "reads",
    );
    check_reads(&mut c, &model, &mut rng, "read-only");
    assert_eq!(
        c.status_map(ALLOCATION_DEPTH, 0, size),
        vec![(0, size, 2)],
        "read-only reads never fill the overlay"
    );
    c.disconnect();
    server.stop();
    assert!(
        read_file(&f.image) == before,
        "a read-only export changed the image file"
    );
    f.check_image(&model.bytes);
}
