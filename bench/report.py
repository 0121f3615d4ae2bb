#!/usr/bin/env python3
"""Markdown report of a bench/run directory: results.tsv (one line per run:
workload, system, round, IOPS, MiB/s), commands.tsv, memory.jsonl,
serving.jsonl and meta.txt, all written by bench/run.

Usage: bench/report.py DIR
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

SYSTEMS = [
    ("limit", "limit: fio io_uring, raw file"),
    ("bf-bench", "backfill in process"),
    ("bf-serve", "backfill serve (NBD)"),
    ("qemu-cor", "qemu-nbd copy-on-read"),
    ("nbdkit-cow", "nbdkit cow-on-read"),
]
PEERS = ["qemu-cor", "nbdkit-cow"]
# workload -> (label, unit, which of the "IOPS MiB/s" pair is the figure)
WORKLOADS = {
    "cor-limit-rand": ("copy-on-read limit, random: 1/(1/R+1/W), 64 KiB", "fills/s", 0),
    "cor-limit-seq": ("copy-on-read limit, sequential: 1/(1/R+1/W), 1 MiB", "MiB/s", 1),
    "cold-rand": ("cold 4 KiB random reads, d32", "IOPS", 0),
    "cold-seq": ("cold 1 MiB sequential reads, d8", "MiB/s", 1),
    "warm-rand": ("warm 4 KiB random reads, d32", "IOPS", 0),
    "warm-seq": ("warm 1 MiB sequential reads, d8", "MiB/s", 1),
    "write-rand": ("4 KiB random writes, d32, unpopulated overlay", "IOPS", 0),
    "slow-rand": ("slow backing: cold 4 KiB random reads, d32", "IOPS", 0),
    "slow-seq": ("slow backing: cold 1 MiB sequential reads, d8", "MiB/s", 1),
}
COLD = ["cold-rand", "cold-seq", "slow-rand", "slow-seq"]
# The copy-on-read limit each cold local row is measured against.
COR_LIMIT = {"cold-rand": "cor-limit-rand", "cold-seq": "cor-limit-seq"}


def fmt(v):
    if v is None:
        return "pending"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def main(d):
    d = Path(d)
    meta = dict(
        line.split(": ", 1) for line in (d / "meta.txt").read_text().splitlines() if ": " in line
    )
    runs = defaultdict(dict)  # (workload, system) -> {round: value or None}
    for line in (d / "results.tsv").read_text().splitlines():
        w, s, r, v = line.split("\t")
        fields = v.split()
        value = fields[WORKLOADS[w][2]]
        runs[(w, s)][int(r)] = None if value == "pending" else float(value)

    def med(w, s):
        vals = [v for v in runs.get((w, s), {}).values() if v is not None]
        return statistics.median(vals) if vals else None

    def paired(w, s, base):
        """Per-round ratios of s to base, in round order."""
        a, b = runs.get((w, s), {}), runs.get((w, base), {})
        return [a[r] / b[r] for r in sorted(a) if a[r] and b.get(r)]

    out = []
    p = out.append
    p(f"### Peer comparison, {meta.get('date', '?')}")
    p("")
    p(
        f"Machine: {meta.get('cpu', '?')}, {meta.get('memory', '?')} of memory, Linux {meta.get('kernel', '?')}, "
        f"{meta.get('filesystem', '?')}; {meta.get('fio', '?')}, {meta.get('qemu-nbd', '?')}, "
        f"{meta.get('nbdkit', '?')}; backfill {meta.get('backfill', '?')}."
    )
    p(f"Knobs: {meta.get('knobs', '?')}. The runner took {meta.get('runtime', '?')}.")
    p("")
    p(
        "Each figure is the median of the rounds. In parentheses: for the peers, their ratio to "
        "backfill serve (below 1: backfill is ahead); for backfill in process on warm, write "
        "and slow-backing rows, its share of the limit (fio on the raw file; on slow-backing "
        "rows, fio reading the slow nbdkit export directly); for backfill on cold rows, its "
        "share of the machine's copy-on-read limit (a cold read costs a backing read and a "
        "write, measured with fio alone). All are ratios of the medians of this run."
    )
    p("")
    p("| workload | unit | " + " | ".join(label for _, label in SYSTEMS) + " |")
    p("|---|---|" + "---|" * len(SYSTEMS))
    for w, (label, unit, _) in WORKLOADS.items():
        if not any((w, s) in runs for s, _ in SYSTEMS):
            continue
        cells = []
        bf_serve = med(w, "bf-serve")
        cor_limit = med(COR_LIMIT[w], "limit") if w in COR_LIMIT else None
        for s, _ in SYSTEMS:
            m = med(w, s)
            cell = fmt(m)
            if (w, s) not in runs:
                cell = ""
            elif s.startswith("bf") and m is not None and cor_limit:
                cell += f" ({m / cor_limit:.2f} of the CoR limit)"
            elif s == "bf-bench" and m is not None and med(w, "limit"):
                cell += f" ({m / med(w, 'limit'):.2f} of limit)"
            elif s in PEERS and m is not None and bf_serve:
                cell += f" ({m / bf_serve:.2f}x)"
            if s == "bf-serve" and m is not None and w in COLD:
                cell = f"**{cell}**"
            cells.append(cell)
        p(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    p("")

    # Goals.
    p("Goals:")
    for w in COLD:
        if (w, "bf-serve") not in runs:
            continue
        label = WORKLOADS[w][0]
        b = med(w, "bf-serve")
        if b is None:
            p(f"- {label}: no figure for backfill serve.")
            continue
        parts = []
        for s in PEERS:
            m = med(w, s)
            if m is None:
                continue
            verdict = "ahead of" if b > m else "**behind**"
            parts.append(f"{verdict} {s} ({b / m:.2f}x)")
        p(f"- {label}: backfill serve " + ", ".join(parts) + ".")
    lim, bb = med("warm-rand", "limit"), med("warm-rand", "bf-bench")
    if lim and bb:
        pr = paired("warm-rand", "bf-bench", "limit")
        verdict = "met" if bb / lim >= 0.9 else "**not met**"
        p(
            f"- warm 4 KiB random reads in process: {bb / lim:.2f} of the limit (goal 0.9: {verdict}); "
            f"median of the paired per-round ratios {statistics.median(pr):.2f} "
            f"({' '.join(f'{x:.2f}' for x in pr)})."
        )
    p("")

    # Runs.
    p("<details><summary>Every run (in round order) and the paired ratios</summary>")
    p("")
    p("| workload | system | median | runs | paired ratio to backfill, per round |")
    p("|---|---|---|---|---|")
    for w, (label, unit, _) in WORKLOADS.items():
        for s, slabel in SYSTEMS:
            if (w, s) not in runs:
                continue
            vals = [runs[(w, s)][r] for r in sorted(runs[(w, s)])]
            if all(v is None for v in vals):
                continue
            base = "bf-bench" if s == "limit" else "bf-serve"
            pr = paired(w, s, base) if s not in ("bf-bench", "bf-serve") else []
            ratio = ""
            if pr:
                ratio = f"{statistics.median(pr):.2f} ({' '.join(f'{x:.2f}' for x in pr)}) vs {base}"
            p(
                f"| {label} | {slabel} | {fmt(med(w, s))} {unit} | "
                f"{' '.join(fmt(v) for v in vals)} | {ratio} |"
            )
    p("")
    p("</details>")
    p("")

    # Memory.
    mem = d / "memory.jsonl"
    if mem.exists():
        p("Open time and memory (`bench-probe`: opens the image read-only, then random 4 KiB reads "
          "over the whole virtual disk, 32 in flight; RSS of the probe process):")
        p("")
        p("| image | metadata cache budget | open | reads/s | RSS after open | peak RSS (VmHWM) | growth from before open |")
        p("|---|---|---|---|---|---|---|")
        names = {
            "sparse-1t": "1 TiB sparse overlay",
        }
        for line in mem.read_text().splitlines():
            j = json.loads(line)
            name = j["name"]
            if "skipped" in j:
                p(f"| {name} | | skipped: {j['skipped']} | | | | |")
                continue
            r = j["result"]
            if name.startswith("l2-1t"):
                label = "1 TiB, all 2,048 L2 tables allocated (128 MiB of L2 entries)"
            elif name.startswith("populated"):
                label = name.replace("-", " ") + " overlay"
            else:
                label = names.get(name, name)
            p(
                f"| {label} | {r['budget_bytes'] / 2**20:.0f} MiB | {r['open_ms']:.1f} ms | "
                f"{r['iops']:,.0f} ({r['reads']:,} reads) | {r['rss_open_kib'] / 1024:.1f} MiB | "
                f"{r['hwm_kib'] / 1024:.1f} MiB | {(r['hwm_kib'] - r['rss_before_kib']) / 1024:.1f} MiB |"
            )
        p("")
    serving = d / "serving.jsonl"
    if serving.exists():
        p("Resident memory while serving 4 KiB random reads at depth 128 (fio nbd engine, "
          "time-based; VmRSS sampled every 0.1 s, VmHWM at the end):")
        p("")
        p("| server | IOPS | max VmRSS | VmHWM |")
        p("|---|---|---|---|")
        for line in serving.read_text().splitlines():
            j = json.loads(line)
            p(
                f"| {j['name']} | {j['iops']:,} | {j['rss_max_kib'] / 1024:.1f} MiB | "
                f"{j['hwm_kib'] / 1024:.1f} MiB |"
            )
        p("")

    # Commands.
    cmds = d / "commands.tsv"
    if cmds.exists():
        p("<details><summary>Commands (as run in round 1; $DIR is the run's directory)</summary>")
        p("")
        # One line per distinct command, naming every (workload, system)
        # that ran it.
        users = defaultdict(list)
        for line in cmds.read_text().splitlines():
            w, s, c = line.split("\t", 2)
            users[c].append((w, s))
        for c, who in users.items():
            ws = defaultdict(list)
            for w, s in who:
                ws[w].append(s)
            names = "; ".join(f"{w}: {', '.join(ss)}" for w, ss in ws.items())
            p(f"- {names}: `{c}`")
        p("")
        p("</details>")
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
