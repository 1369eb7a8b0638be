#!/usr/bin/env python3
"""Summarise a benchmark JSONL (one line per impl/run): paft against its peer.

Throughput rows (tokens_per_s, per batch): best run of each impl, ratio paft/peer (higher is better).
Wall-time rows (wall_s, max_rss_kb): best run of each impl, speed-up peer/paft and peak RSS of both.
"""
import json
import sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
if rows and "seconds_per_step" in rows[0]:
    # Training steps: best run of each impl per objective, ratio paft/peer (lower is better).
    best = {}
    for r in rows:
        key = (r["impl"], r["objective"])
        best[key] = min(best.get(key, float("inf")), r["seconds_per_step"])
    for obj in sorted({o for _, o in best}):
        for impl in sorted({i for i, o in best if o == obj and i != "paft"}):
            p, q = best.get(("paft", obj)), best[(impl, obj)]
            if p:
                print(f"{obj}: paft {p:.2f} s/step, {impl} {q:.2f} s/step, ratio paft/{impl} {p / q:.2f}x")
elif rows and "batch" in rows[0]:
    best = defaultdict(float)
    for r in rows:
        key = (r["impl"], r["batch"])
        best[key] = max(best[key], r["tokens_per_s"])
    peer = sorted({impl for impl, _ in best if impl != "paft"})
    print(f"{'batch':>5} {'paft tok/s':>11} " + " ".join(f"{p + ' tok/s':>18}" for p in peer) + "  ratio (paft/peer)")
    for b in sorted({b for _, b in best}):
        row = f"{b:>5} {best[('paft', b)]:>11.1f} "
        for p in peer:
            row += f"{best[(p, b)]:>18.1f}  {best[('paft', b)] / best[(p, b)]:.2f}x"
        print(row)
else:
    best = {}
    for r in rows:
        if r["impl"] not in best or r["wall_s"] < best[r["impl"]]["wall_s"]:
            best[r["impl"]] = r
    for impl, r in sorted(best.items()):
        print(f"{impl:>10}: {r['wall_s']:.2f} s, peak RSS {r['max_rss_kb'] / 1024:.0f} MiB")
    for impl in best:
        if impl != "paft" and "paft" in best:
            print(f"speed-up paft vs {impl}: {best[impl]['wall_s'] / best['paft']['wall_s']:.2f}x")
