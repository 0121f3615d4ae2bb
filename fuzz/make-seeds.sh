#!/usr/bin/env bash
# Regenerates the seed corpora in fuzz/corpus/<target>/ (see fuzz/README.md).
#
#   open_and_read     qcow2 images made by qemu-img and written by qemu-io:
#                     v2 and v3, clusters from 512 bytes to 2 MiB, extended
#                     L2, refcount widths, lazy refcounts left dirty by a
#                     crash, compressed clusters, bitmaps, an internal
#                     snapshot, an external data file, zero clusters and
#                     discards, backing files named relatively (base.raw,
#                     base.qcow2, as the harness provides them) and hostile
#                     backing names. Small 4 KiB cluster images are stored
#                     as they are; the rest in the harness's sparse encoding
#                     (SPARSE_MAGIC "BFSP"), which keeps only their nonzero
#                     bytes.
#   nbd_client_bytes  what real clients (nbdinfo, qemu-io, qemu-img, nbdcopy)
#                     send, captured by a recording proxy in front of
#                     `backfill serve`, plus hand-built handshakes and
#                     requests (raw and in the harness's compact encoding).
#   nbd_handshake     the handshake part of the same client bytes, and
#                     hand-built option sequences.
#   lock_table_ops    a few hand-built operation sequences.
#   http_wire         response heads as nginx sends them for range reads
#                     (206, 200, 416, errors with Retry-After, redirects),
#                     chunked and HTTP/1.0 heads, and bare Content-Range,
#                     Retry-After and chunk-size values.
#   http_responses    hand-built exchanges in nginx's words: the open
#                     probe and range reads answered (keep-alive, chunked,
#                     Connection: close and a new connection), the image
#                     changed (412, 200, 416, another ETag or size), 503
#                     with Retry-After then success, interim 100 responses,
#                     short bodies, weak ETags and no validator.
#   nbd_backing_replies  what real servers (nbdkit, qemu-nbd) send the
#                     engine's NBD backing client, recorded on the way:
#                     each connection's handshake, and its replies to the
#                     reads on it; plus hand-built replies (errors, holes,
#                     simple replies, ESHUTDOWN).
#
# Needs qemu-img and qemu-io (qemu-utils), nbdinfo and nbdcopy (libnbd-bin),
# python3, and builds `backfill` (release) for the recorded NBD sessions.
# Seeds are deterministic except for the recorded sessions' cookies. Seeds
# with the same names are overwritten; minimized corpus entries (named by
# their hash) are left alone.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$here/corpus
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

for t in open_and_read nbd_client_bytes nbd_handshake lock_table_ops nbd_backing_replies http_wire \
    http_responses; do
    mkdir -p "$out/$t"
done

cat > "$work/tool.py" <<'PY'
import os, socket, struct, sys, threading

SPARSE_MAGIC = b"BFSP"
RAW_MAX = 48 << 10


def sparse(data):
    """Records (u32 offset, u16 length, bytes) of the nonzero runs."""
    out = bytearray(SPARSE_MAGIC + struct.pack(">I", len(data)))
    i, n = 0, len(data)
    while i < n:
        if data[i] == 0:
            i += 1
            continue
        j, last = i, i
        # Extend over short zero gaps; stop at long ones or 64 KiB.
        while j < n and j - i < 0xFFFF and j - last <= 32:
            if data[j]:
                last = j
            j += 1
        end = last + 1
        out += struct.pack(">IH", i, end - i) + data[i:end]
        i = end
    return bytes(out)


def seed(image, dest, mode):
    data = open(image, "rb").read()
    if mode == "raw" and len(data) <= RAW_MAX:
        body = data
    else:
        body = sparse(data)
    open(dest, "wb").write(body)


def unformat(image):
    """Drops the header extensions (backing format included), as images
    written before QEMU recorded the backing format look."""
    with open(image, "r+b") as f:
        h = f.read(112)
        version = struct.unpack(">I", h[4:8])[0]
        hdr_len = struct.unpack(">I", h[100:104])[0] if version >= 3 else 72
        f.seek(hdr_len)
        f.write(b"\0" * 8)


# --- NBD -------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513
DISK = (4 << 20) + 1536
EXPORT = b"fuzz"
OPT = dict(EXPORT_NAME=1, ABORT=2, LIST=3, STARTTLS=5, INFO=6, GO=7,
           STRUCTURED_REPLY=8, LIST_META_CONTEXT=9, SET_META_CONTEXT=10,
           EXTENDED_HEADERS=11)
CMD = dict(READ=0, WRITE=1, DISC=2, FLUSH=3, TRIM=4, CACHE=5,
           WRITE_ZEROES=6, BLOCK_STATUS=7)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def option(opt, data=b""):
    return struct.pack(">QII", IHAVEOPT, OPT[opt] if isinstance(opt, str) else opt,
                       len(data)) + data


def name_and_infos(name=EXPORT, infos=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + \
        b"".join(struct.pack(">H", i) for i in infos)


def meta(queries, name=EXPORT):
    d = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        d += struct.pack(">I", len(q)) + q
    return d


FLAGS = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
CONTEXTS = [b"base:allocation", b"qemu:allocation-depth"]
GO_SR_META = FLAGS + option("STRUCTURED_REPLY") + \
    option("SET_META_CONTEXT", meta(CONTEXTS)) + option("GO", name_and_infos(infos=(3,)))


def request(cmd, off=0, length=0, flags=0, cookie=1):
    c = CMD[cmd] if isinstance(cmd, str) else cmd
    h = struct.pack(">IHHQQI", REQ_MAGIC, flags, c, cookie, off, length)
    if cmd == "WRITE":
        h += bytes((cookie * 37 + i) & 0xFF for i in range(length))
    return h


def compact(cmd, off=0, length=0, flags=0):
    c = CMD[cmd] if isinstance(cmd, str) else cmd
    return struct.pack(">BB", c, flags) + off.to_bytes(3, "big") + length.to_bytes(3, "big")


SEQUENCES = {
    "reads": [("READ", 0, 4096), ("READ", 4096 * 3 + 17, 5000),
              ("READ", DISK - 1000, 1000), ("READ", (3 << 20) - 50, 200)],
    "write-read": [("WRITE", 8192, 4096, FUA), ("READ", 8192, 4096),
                   ("WRITE", 12288 + 100, 300), ("READ", 12288, 4096)],
    "zeroes-trim": [("WRITE_ZEROES", 65536, 65536), ("WRITE_ZEROES", 1000, 100, NO_HOLE),
                    ("WRITE_ZEROES", 200000, 8192, FAST_ZERO), ("TRIM", 131072, 8192),
                    ("READ", 65536, 8192), ("FLUSH",)],
    "cache-status": [("CACHE", 0, 1 << 20), ("BLOCK_STATUS", 0, 1 << 20),
                     ("BLOCK_STATUS", 4096, 4096, REQ_ONE), ("READ", 0, 65536, DF)],
    "cor-race": [("READ", 20480, 4096), ("WRITE", 20480, 512), ("READ", 20480, 4096),
                 ("READ", 20480 + 512, 100), ("TRIM", 20480, 4096), ("READ", 20480, 4096)],
    "errors": [("READ", DISK - 10, 20), ("WRITE", DISK, 1), (9, 0, 0), ("READ", 0, 0),
               ("BLOCK_STATUS", 0, 0), ("READ", 0, 4096, 0x20), ("FLUSH",)],
    "disc": [("READ", 0, 4096), ("DISC",), ("READ", 0, 4096)],
}


def seq_items(seq):
    for item in seq:
        cmd = item[0]
        off = item[1] if len(item) > 1 else 0
        length = item[2] if len(item) > 2 else 0
        flags = item[3] if len(item) > 3 else 0
        yield cmd, off, length, flags


def nbd_seeds(outdir, hsdir):
    def put(d, name, data):
        open(os.path.join(d, name), "wb").write(data)

    # Compact requests after each opening (mode: top bit + opening).
    openings = {"go": 0x82, "go-sr": 0x83, "go-sr-meta": 0x84, "export-name": 0x85}
    for oname, mode in openings.items():
        for sname, seq in SEQUENCES.items():
            body = b"".join(compact(c, o, l, f) for c, o, l, f in seq_items(seq))
            put(outdir, f"compact-{oname}-{sname}", bytes([mode]) + body)
    # The same requests as raw bytes after a handshake.
    for sname, seq in SEQUENCES.items():
        body = b"".join(request(c, o, l, f, cookie=i + 1)
                        for i, (c, o, l, f) in enumerate(seq_items(seq)))
        put(outdir, f"raw-after-go-sr-meta-{sname}", bytes([0x04]) + body)
        put(outdir, f"raw-after-go-{sname}", bytes([0x02]) + body)
    # Option haggling (after valid client flags), and whole handshakes.
    options = {
        "list": option("LIST"),
        "info": option("INFO", name_and_infos(infos=(0, 1, 2, 3))),
        "info-unknown": option("INFO", name_and_infos(b"nope")),
        "go-default": option("GO", name_and_infos(b"")),
        "starttls": option("STARTTLS"),
        "extended-headers": option("EXTENDED_HEADERS"),
        "meta-without-sr": option("SET_META_CONTEXT", meta(CONTEXTS)),
        "list-meta": option("STRUCTURED_REPLY") + option("LIST_META_CONTEXT", meta([]))
        + option("LIST_META_CONTEXT", meta([b"qemu:", b"base:"])),
        "set-meta-unknown": option("STRUCTURED_REPLY")
        + option("SET_META_CONTEXT", meta([b"qemu:dirty-bitmap:x"])),
        "malformed-go": option("GO", b"\xff\xff\xff\xff"),
        "unknown": option(42, b"abc"),
        "abort": option("LIST") + option("ABORT"),
        "export-name-unknown": option("EXPORT_NAME", b"nope"),
    }
    for n, o in options.items():
        put(outdir, f"options-{n}", bytes([0x01]) + o)
        for cfg in (0, 1, 2):
            put(hsdir, f"options-{n}-cfg{cfg}", bytes([cfg]) + FLAGS + o)
    put(hsdir, "go-sr-meta", b"\x00" + GO_SR_META)
    put(hsdir, "export-name-zeroes", b"\x00" + struct.pack(">I", 1) + option("EXPORT_NAME", EXPORT))
    put(outdir, "raw-go-sr-meta-read", b"\x00" + GO_SR_META + request("READ", 0, 4096))
    put(outdir, "raw-bad-flags", b"\x00" + struct.pack(">I", 0xFF))
    put(outdir, "raw-bad-request-magic", bytes([0x04]) + b"\x25\x60\x95\x14" + b"\0" * 24)
    put(outdir, "raw-partial-write", bytes([0x04]) + request("WRITE", 0, 4096)[:28 + 100])


def lock_seeds(outdir):
    # (op, arg) pairs: 0 read, 1 write, 2 release, 3 run woken, 4 query.
    seqs = {
        "fill-join-release": [0, 0, 0, 0, 2, 0, 4, 0],
        "write-waiters-fifo": [1, 3, 0, 3, 1, 3, 0, 3, 2, 0, 3, 3, 2, 0, 3, 3, 2, 0],
        "many-clusters": [1, 0, 1, 1, 0, 2, 0, 3, 1, 8, 0, 9, 2, 1, 2, 0, 3, 3],
        "contention": [1, 5] * 6 + [0, 5] * 4 + [2, 0, 3, 3] * 8,
    }
    for n, s in seqs.items():
        open(os.path.join(outdir, n), "wb").write(bytes(s))


# --- A recording proxy ------------------------------------------------------

def proxy(listen, upstream, prefix, both=""):
    """Relays connections on `listen` to `upstream`, saving what each
    client sent to prefix-N (and, with `both`, what the server sent to
    prefix-N.s)."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(listen)
    srv.listen(16)
    n = 0
    while True:
        c, _ = srv.accept()
        u = socket.socket(socket.AF_UNIX)
        u.connect(upstream)
        path = f"{prefix}-{n}"
        n += 1

        def pump(a, b, rec):
            f = open(rec, "wb") if rec else None
            try:
                while True:
                    d = a.recv(65536)
                    if not d:
                        break
                    if f:
                        f.write(d)
                        f.flush()
                    b.sendall(d)
            except OSError:
                pass
            finally:
                if f:
                    f.close()
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(c, u, path), daemon=True).start()
        threading.Thread(target=pump, args=(u, c, path + ".s" if both else None),
                         daemon=True).start()


def captured(capdir, outdir, hsdir, name):
    """Turns recorded client bytes into seeds: raw from the first byte."""
    for i, f in enumerate(sorted(os.listdir(capdir))):
        data = open(os.path.join(capdir, f), "rb").read()
        if not data:
            continue
        open(os.path.join(outdir, f"captured-{name}-{i}"), "wb").write(b"\x00" + data)
        open(os.path.join(hsdir, f"captured-{name}-{i}"), "wb").write(b"\x00" + data[:4096])
        os.remove(os.path.join(capdir, f))


def backing_seeds(capdir, outdir, name):
    """Turns recorded backing connections (client bytes in prefix-N, server
    bytes in prefix-N.s) into nbd_backing_replies seeds: the server's
    handshake (mode 0), and its replies to the reads the client sent, in
    cookie order (mode 1 | structured 2 | placed 4)."""
    for f in sorted(os.listdir(capdir)):
        if f.endswith(".s"):
            continue
        cli = open(os.path.join(capdir, f), "rb").read()
        srv = open(os.path.join(capdir, f + ".s"), "rb").read()
        os.remove(os.path.join(capdir, f))
        os.remove(os.path.join(capdir, f + ".s"))
        # The client: flags, options up to GO, then 28-byte requests.
        i, reads = 4, []
        while i + 16 <= len(cli):
            opt, n = struct.unpack(">II", cli[i + 8:i + 16])
            i += 16 + n
            if opt == OPT["GO"]:
                break
        while i + 28 <= len(cli):
            _, _, kind, cookie, off, length = struct.unpack(">IHHQQI", cli[i:i + 28])
            i += 28
            if kind == 0:
                reads.append((cookie, off, length))
        # The server: greeting, then option replies up to GO's ACK.
        j, structured = 18, False
        while j + 20 <= len(srv):
            _, opt, kind, n = struct.unpack(">QIII", srv[j:j + 20])
            j += 20 + n
            if opt == OPT["STRUCTURED_REPLY"] and kind == 1:
                structured = True
            if opt == OPT["GO"] and kind == 1:
                break
        tag = f"{name}-{f.rsplit('-', 1)[1]}"
        open(os.path.join(outdir, f"handshake-{tag}"), "wb").write(b"\x00" + srv[:j])
        reads.sort()
        ok = (0 < len(reads) <= 8 and [r[0] for r in reads] == list(range(1, len(reads) + 1))
              and all(o % 512 == 0 and o // 512 < 65536 and 0 < n <= 65536 for _, o, n in reads))
        if not ok:
            continue
        spec = b"".join(struct.pack(">HH", o // 512, n - 1) for _, o, n in reads)
        for placed in (0, 4):
            mode = 1 | (2 if structured else 0) | placed
            head = bytes([mode, len(reads) - 1]) + spec
            open(os.path.join(outdir, f"replies-{tag}-{mode}"), "wb").write(head + srv[j:])


def backing_hand_seeds(outdir):
    """Hand-built replies: two reads (cookies 1 and 2, 4 KiB at 0 and at
    64 KiB)."""
    def put(name, mode, body):
        spec = struct.pack(">HHHH", 0, 4095, 128, 4095)
        open(os.path.join(outdir, name), "wb").write(bytes([mode, 1]) + spec + body)

    def simple(cookie, err=0, data=b""):
        return struct.pack(">IIQ", 0x67446698, err, cookie) + data

    def chunk(cookie, kind, payload, done=True):
        return struct.pack(">IHHQI", 0x668E33EF, 1 if done else 0, kind, cookie,
                           len(payload)) + payload

    data = bytes(range(256)) * 16
    put("hand-simple", 1, simple(2, data=data) + simple(1, data=data))
    put("hand-simple-error", 1, simple(1, err=5) + simple(2, err=108))
    put("hand-data-hole", 3, chunk(1, 1, struct.pack(">Q", 0) + data[:2048], False)
        + chunk(1, 2, struct.pack(">QI", 2048, 2048))
        + chunk(2, 1, struct.pack(">Q", 65536) + data))
    put("hand-error-chunk", 7, chunk(1, 32769, struct.pack(">IH", 5, 4) + b"nope")
        + chunk(2, 32770, struct.pack(">IHQ", 28, 0, 65536)))
    put("hand-none", 3, chunk(1, 0, b"") + chunk(2, 0, b""))


def http_seeds(outdir):
    """Response heads and header values for http_wire."""
    def put(name, data):
        open(os.path.join(outdir, name), "wb").write(data)

    def head(status, *headers):
        return ("\r\n".join((status,) + headers) + "\r\n\r\n").encode()

    nginx = ("Server: nginx/1.22.1", "Date: Fri, 27 Nov 2026 08:00:00 GMT",
             "Content-Type: application/octet-stream",
             "Last-Modified: Thu, 26 Nov 2026 08:00:00 GMT", "Connection: keep-alive",
             'ETag: "6566-40000000"')
    put("nginx-206", head("HTTP/1.1 206 Partial Content", *nginx, "Content-Length: 65536",
                          "Content-Range: bytes 65536-131071/1073741824"))
    put("nginx-200", head("HTTP/1.1 200 OK", *nginx, "Content-Length: 1073741824",
                          "Accept-Ranges: bytes"))
    put("nginx-416", head("HTTP/1.1 416 Requested Range Not Satisfiable", *nginx[:3],
                          "Content-Length: 197", "Content-Range: bytes */1073741824"))
    put("nginx-412", head("HTTP/1.1 412 Precondition Failed", *nginx[:3],
                          "Content-Length: 173", "Connection: close"))
    put("503-retry-after", head("HTTP/1.1 503 Service Unavailable", "Content-Length: 0",
                                "Retry-After: 120"))
    put("429-retry-date", head("HTTP/1.1 429 Too Many Requests", "Content-Length: 0",
                               "Retry-After: Fri, 27 Nov 2026 09:00:00 GMT"))
    put("301", head("HTTP/1.1 301 Moved Permanently", "Location: https://example.com/disk.raw",
                    "Content-Length: 0"))
    put("chunked", head("HTTP/1.1 206 Partial Content", "Transfer-Encoding: chunked",
                        "Content-Range: bytes 0-4095/*") + b"1000;ext=1\r\n")
    put("http10", head("HTTP/1.0 206 Partial Content", "Connection: keep-alive",
                       "Content-Length: 4096", "Content-Range: bytes 0-4095/8192",
                       "Content-Encoding: identity"))
    put("both-framings", head("HTTP/1.1 200 OK", "Content-Length: 10",
                              "Transfer-Encoding: chunked"))
    put("value-range", b"bytes 4096-8191/1048576")
    put("value-range-star", b"bytes 0-511/*")
    put("value-unsatisfied", b"bytes */4096")
    put("value-retry-date", b"Sun, 06 Nov 1994 08:49:37 GMT")
    put("value-retry-secs", b"3600")
    put("value-chunk", b"7fffffffffffffff;name=value\r\n")


def http_resp_seeds(outdir):
    """Whole exchanges for http_responses: flags, reads, then the servers."""
    size = 1 << 20
    etag = '"6566-100000"'
    date = "Thu, 26 Nov 2026 08:00:00 GMT"

    def head(status, *headers):
        return ("\r\n".join((status,) + headers) + "\r\n\r\n").encode()

    def part(first, last, total=size, tag=etag, extra=(), body=None):
        n = last - first + 1
        body = bytes((first + i) % 251 for i in range(n)) if body is None else body
        validators = (f"ETag: {tag}",) if tag else ()
        return head("HTTP/1.1 206 Partial Content", "Server: nginx/1.22.1",
                    "Content-Type: application/octet-stream", f"Last-Modified: {date}",
                    *validators, f"Content-Length: {n}",
                    f"Content-Range: bytes {first}-{last}/{total}", *extra) + body

    def chunked(first, last):
        n = last - first + 1
        body = bytes((first + i) % 251 for i in range(n))
        return head("HTTP/1.1 206 Partial Content", f"ETag: {etag}",
                    "Transfer-Encoding: chunked",
                    f"Content-Range: bytes {first}-{last}/{size}") + \
            b"%x\r\n" % n + body + b"\r\n0\r\n\r\n"

    def ranges(reads):
        return [(o * 4096, o * 4096 + (c % 16 + 1) * 512 - 1) for o, c in reads]

    def put(name, reads, servers, require=True):
        data = bytes([(1 if require else 0) | (len(reads) - 1) << 1])
        data += b"".join(bytes([o, c]) for o, c in reads)
        for s in servers:
            data += struct.pack("<H", len(s)) + s
        open(os.path.join(outdir, name), "wb").write(data)

    probe = part(0, 0)
    reads = [(1, 7), (2, 15), (40, 3)]
    ok = probe + b"".join(part(f, l) for f, l in ranges(reads))
    put("nginx-keepalive", reads, [ok])
    put("nginx-chunked", reads, [probe + b"".join(chunked(f, l) for f, l in ranges(reads))])
    put("nginx-close-each", reads,
        [probe[:-1].replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + probe[-1:]]
        + [part(f, l, extra=("Connection: close",)) for f, l in ranges(reads)])
    f, l = ranges(reads)[0]
    put("changed-412", reads[:2], [probe + head("HTTP/1.1 412 Precondition Failed",
                                                "Content-Length: 0")])
    put("changed-200", reads[:2], [probe + head("HTTP/1.1 200 OK", f"ETag: {etag}",
                                                f"Content-Length: {size}")])
    put("changed-416", reads[:2], [probe + head("HTTP/1.1 416 Range Not Satisfiable",
                                                f"Content-Range: bytes */{size // 2}",
                                                "Content-Length: 0")])
    put("changed-etag", reads[:2], [probe + part(f, l, tag='"other"')])
    put("changed-size", reads[:2], [probe + part(f, l, total=2 * size)])
    put("retry-after-503", reads[:1],
        [probe + head("HTTP/1.1 503 Service Unavailable", "Retry-After: 1",
                      "Content-Length: 0"), part(f, l)])
    put("interim-100", reads[:1], [head("HTTP/1.1 100 Continue") + probe
                                   + head("HTTP/1.1 103 Early Hints") + part(f, l)])
    put("short-body", reads[:1], [probe + part(f, l)[:-100]])
    put("wrong-range", reads[:1], [probe + part(f + 512, l + 512)])
    put("weak-etag", reads[:1], [part(0, 0, tag='W/"6566"') + part(f, l, tag='W/"6566"')])
    put("no-validator", reads[:1],
        [part(0, 0, tag=None).replace(f"Last-Modified: {date}\r\n".encode(), b"")
         + part(f, l, tag=None)], require=False)
    put("past-the-end", [(255, 15)], [part(0, 0, total=8192)])
    put("refused", reads[:1], [])


if __name__ == "__main__":
    # Each command is the function of that name, with - for _.
    commands = {f.__name__.replace("_", "-"): f for f in (
        seed, unformat, nbd_seeds, lock_seeds, proxy, captured, backing_seeds,
        backing_hand_seeds, http_seeds, http_resp_seeds)}
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd not in commands:
        sys.exit(f"unknown command {cmd}")
    commands[cmd](*args)
PY

tool() { python3 "$work/tool.py" "$@"; }
wait_socket() { for _ in $(seq 100); do [ -S "$1" ] && break; sleep 0.1; done; }
img() { qemu-img create -q -f qcow2 "$@"; }
io() { local f=$1; shift; qemu-io -f qcow2 "$@" "$f" >/dev/null; }

# --- open_and_read ---------------------------------------------------------
cd "$work"
# Backing files as the harness names them. Mostly zeros, so that qemu's
# copy-on-write of partial clusters stays sparse.
qemu-img create -q -f raw base.raw 1M
qemu-io -f raw -c "write -P 0x5a 0 4k" base.raw >/dev/null
img -o cluster_size=4k -b base.raw -F raw base.qcow2 512k
io base.qcow2 -c "write -P 0x6b 8k 4k" -c "write -z 16k 4k"

n=0
save() { # save NAME MODE: store image.qcow2 as seed NAME, raw or sparse
    tool seed image.qcow2 "$out/open_and_read/$1" "$2"
    rm -f image.qcow2
    n=$((n + 1))
}
writes() { # a few data, zero and discard operations, cluster size $1
    local cs=$1
    io image.qcow2 -c "write -P 0x11 0 4k" -c "write -P 0x22 $((cs * 3 + 17)) 1000" \
        -c "write -z $((cs * 5)) $cs" -c "discard $((cs * 7)) $cs" \
        -c "write -P 0x33 $((cs * 9)) 4k" -c "write -P 0x34 $((cs * 20)) 512"
}

for compat in 0.10 1.1; do
    v=v3; [ $compat = 0.10 ] && v=v2
    img -o compat=$compat,cluster_size=4k image.qcow2 1M
    save $v-c4k-empty raw
    img -o compat=$compat,cluster_size=4k image.qcow2 1M
    writes 4096
    save $v-c4k-data raw
    img -o compat=$compat,cluster_size=4k -b base.raw -F raw image.qcow2 1M
    writes 4096
    save $v-c4k-backing-raw raw
    img -o compat=$compat,cluster_size=4k -b base.qcow2 -F qcow2 image.qcow2 768k
    writes 4096
    save $v-c4k-backing-qcow2 sparse
    img -o compat=$compat,cluster_size=64k -b base.raw -F raw image.qcow2 8M
    writes 65536
    save $v-c64k-backing-raw sparse
done

# Cluster sizes, from below what backfill takes to the largest.
for cs in 512 1k 16k 64k 256k 2M; do
    img -o cluster_size=$cs image.qcow2 16M
    io image.qcow2 -c "write -P 0x44 0 4k" -c "write -P 0x55 8M 512"
    save v3-c$cs-data sparse
done
img -o cluster_size=2M -b base.raw -F raw image.qcow2 8M
io image.qcow2 -c "write -P 0x66 2M 4k"
save v3-c2M-backing-raw sparse

# Extended L2 entries (subclusters).
for cs in 16k 64k; do
    img -o cluster_size=$cs,extended_l2=on -b base.raw -F raw image.qcow2 2M
    io image.qcow2 -c "write -P 0x77 1k 1k" -c "write -z 64k 2k" -c "write -P 0x78 200k 4k"
    save v3-c$cs-extl2 sparse
done

# A virtual size that is not a multiple of the cluster size, over a
# backing file that ends before it.
img -o cluster_size=4k -b base.raw -F raw image.qcow2 1000000
io image.qcow2 -c "write -P 0x12 999000 1000" -c "write -P 0x13 4096 4096"
save v3-c4k-odd-size raw

# Refcount widths.
for bits in 1 8 32 64; do
    img -o cluster_size=4k,refcount_bits=$bits image.qcow2 1M
    io image.qcow2 -c "write -P 0x21 0 8k"
    save v3-c4k-refcount$bits sparse
done

# Lazy refcounts, left dirty by a crash (qemu-io's abort).
img -o cluster_size=4k,lazy_refcounts=on -b base.raw -F raw image.qcow2 1M
qemu-io -f qcow2 -c "write -P 0x31 0 12k" -c "write -P 0x32 100k 4k" -c abort image.qcow2 \
    >/dev/null 2>&1 || true
save v3-c4k-lazy-dirty sparse

# Compressed clusters, zlib and zstd.
for ct in zlib zstd; do
    img -o cluster_size=4k,compression_type=$ct image.qcow2 1M
    io image.qcow2 -c "write -c -P 0x41 0 4k" -c "write -c -P 0x42 16k 4k" -c "write -P 0x43 8k 4k"
    save v3-c4k-compressed-$ct sparse
done

# A persistent bitmap (autoclear bit and bitmaps extension).
img -o cluster_size=4k image.qcow2 1M
qemu-img bitmap -f qcow2 --add image.qcow2 bm0
io image.qcow2 -c "write -P 0x51 0 4k"
save v3-c4k-bitmap sparse

# An internal snapshot (shared clusters with refcount 2, a snapshot table).
img -o cluster_size=4k image.qcow2 1M
io image.qcow2 -c "write -P 0x91 0 8k"
qemu-img snapshot -c snap1 image.qcow2
io image.qcow2 -c "write -P 0x92 0 4k"
save v3-c4k-snapshot sparse

# An external data file (which the harness does not provide).
img -o cluster_size=4k,data_file=image.data image.qcow2 1M
io image.qcow2 -c "write -P 0x61 0 4k"
rm -f image.data
save v3-c4k-data-file sparse

# Preallocated metadata; many L2 tables; a huge virtual size.
img -o cluster_size=4k,preallocation=metadata image.qcow2 256k
save v3-c4k-prealloc-metadata sparse
img -o cluster_size=4k image.qcow2 64M
for i in $(seq 0 31); do echo "write -P $i $((i * 2 * 1024 * 1024 + i * 4096)) 512"; done |
    qemu-io -f qcow2 image.qcow2 >/dev/null
save v3-c4k-scattered sparse
img -o cluster_size=4k image.qcow2 1T
io image.qcow2 -c "write -P 0x71 0 4k" -c "write -P 0x72 1023G 4k"
save v3-c4k-1T sparse
img -o cluster_size=64k image.qcow2 16T
io image.qcow2 -c "write -P 0x73 15T 4k"
save v3-c64k-16T sparse

# A backing file named without its format (as older QEMU wrote it).
img -o cluster_size=4k -b base.raw -F raw image.qcow2 1M
io image.qcow2 -c "write -P 0x81 4k 4k"
tool unformat image.qcow2
save v3-c4k-backing-probed raw
img -o compat=0.10,cluster_size=4k -b base.qcow2 -F qcow2 image.qcow2 1M
tool unformat image.qcow2
save v2-c4k-backing-probed raw

# Backing names the harness must refuse or cannot open: outside its
# directory, absolute, a protocol, itself, missing.
for b in ../outside.raw /etc/hostname nbd://localhost/x missing.raw; do
    img -o cluster_size=4k -u -b "$b" -F raw image.qcow2 1M
    save "v3-c4k-backing-$(echo "$b" | tr -c 'a-z0-9\n' '-')" sparse
done
img -o cluster_size=4k image.qcow2 1M
qemu-img rebase -q -u -f qcow2 -b image.qcow2 -F qcow2 image.qcow2
save v3-c4k-backing-itself sparse
echo "open_and_read: $n seeds"

# --- NBD ---------------------------------------------------------------------
tool nbd-seeds "$out/nbd_client_bytes" "$out/nbd_handshake"
tool lock-seeds "$out/lock_table_ops"

# Real clients, recorded on their way to `backfill serve` serving a disk
# like the harness's (4 MiB + 1536 bytes, 4 KiB clusters, over a raw backing
# file). Not qemu-nbd: clients would negotiate extended headers with it,
# which backfill does not offer, and the recorded requests would not fit.
(cd "$here/.." && cargo build -q --release -p backfill --bin backfill)
bf=$here/../target/release/backfill
qemu-img create -q -f raw nbdbase.raw 3M
img -o cluster_size=4k -b nbdbase.raw -F raw nbd.qcow2 $(((4 << 20) + 1536))
"$bf" serve --socket "$work/up.sock" --export fuzz --cores 1 \
    nbd.qcow2 >/dev/null &
pids+=($!)
mkdir cap
wait_socket up.sock
python3 "$work/tool.py" proxy "$work/proxy.sock" "$work/up.sock" "$work/cap/c" &
pids+=($!)
wait_socket proxy.sock
uri="nbd+unix:///fuzz?socket=$work/proxy.sock"
capture() { # capture NAME COMMAND...: run a client, keep what it sent
    local name=$1
    shift
    "$@" >/dev/null 2>&1 || echo "warning: $name: client failed" >&2
    sleep 0.3 # let the proxy finish writing
    tool captured cap "$out/nbd_client_bytes" "$out/nbd_handshake" "$name"
}
capture nbdinfo nbdinfo "$uri"
capture nbdinfo-list nbdinfo --list "nbd+unix://?socket=$work/proxy.sock"
capture nbdinfo-map nbdinfo --map "$uri"
capture nbdinfo-map-depth nbdinfo --map=qemu:allocation-depth "$uri"
capture qemu-img-map qemu-img map -f raw --output=json "$uri"
capture qemu-img-info qemu-img info -f raw "$uri"
capture nbdcopy nbdcopy --connections=1 --requests=4 "$uri" null:
capture qemu-io qemu-io -f raw -c "read 0 64k" -c "write -P 0x5a 4k 4k" -c "write -z 64k 64k" \
    -c "discard 128k 64k" -c "flush" -c "write -P 0x33 $(((4 << 20) + 512)) 1024" \
    -c "read 3145000 2000" "$uri"
capture qemu-io-fua qemu-io -f raw -c "write -f -P 0x44 8k 512" -c "write -z -u 16k 8k" \
    -c "write -z -f 32k 4k" -c "aio_write -P 1 0 4k" -c "aio_read 0 4k" -c "aio_flush" "$uri"

# Real servers, recorded on their way to the engine's NBD backing client:
# a copy-on-read bench of 24 random 4 KiB reads (4 KiB clusters, so a few
# small reads on each of its connections) over nbdkit and over qemu-nbd,
# serving a partly sparse 8 MiB raw image.
truncate -s 8M bbase.raw
for at in 0 3 5; do
    dd if=/dev/urandom of=bbase.raw bs=512k seek=$at count=2 conv=notrunc status=none
done
mkdir bcap
backing_capture() { # NAME SERVER-COMMAND...: serve bbase.raw on bup.sock, record a bench
    local name=$1 spid ppid
    shift
    rm -f bup.sock bproxy.sock
    "$@" &
    spid=$!
    wait_socket bup.sock
    python3 "$work/tool.py" proxy "$work/bproxy.sock" "$work/bup.sock" "$work/bcap/c" both &
    ppid=$!
    wait_socket bproxy.sock
    rm -f bov.qcow2
    "$bf" create -o cluster_size=4096 \
        -b "nbd+unix:///?socket=$work/bproxy.sock" -F raw bov.qcow2 >/dev/null
    "$bf" bench --copy-on-read --pattern rand -c 24 -d 8 -s 4k \
        --seed 7 bov.qcow2 >/dev/null || echo "warning: $name: bench failed" >&2
    sleep 0.3 # let the proxy finish writing
    kill "$ppid" "$spid" 2>/dev/null || true
    wait "$ppid" "$spid" 2>/dev/null || true
    tool backing-seeds bcap "$out/nbd_backing_replies" "$name"
}
backing_capture nbdkit nbdkit -f -U "$work/bup.sock" file bbase.raw
backing_capture qemu-nbd qemu-nbd -f raw -r -t -e 8 -k "$work/bup.sock" bbase.raw
tool backing-hand-seeds "$out/nbd_backing_replies"
tool http-seeds "$out/http_wire"
tool http-resp-seeds "$out/http_responses"

echo "nbd_client_bytes: $(ls "$out/nbd_client_bytes" | wc -l) files," \
    "nbd_handshake: $(ls "$out/nbd_handshake" | wc -l)," \
    "lock_table_ops: $(ls "$out/lock_table_ops" | wc -l)," \
    "nbd_backing_replies: $(ls "$out/nbd_backing_replies" | wc -l)," \
    "http_wire: $(ls "$out/http_wire" | wc -l)," \
    "http_responses: $(ls "$out/http_responses" | wc -l)"
du -sh --apparent-size "$out"/*
