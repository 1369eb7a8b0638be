#!/usr/bin/env python3
"""Summarise a benchmark JSONL (one line per impl/batch/run): best tokens/s per impl and batch, and paft's ratio."""
import json
import sys
from collections import defaultdict

best = defaultdict(float)
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    key = (r["impl"], r["batch"])
    best[key] = max(best[key], r["tokens_per_s"])
peer = sorted({impl for impl, _ in best if impl != "paft"})
print(f"{'batch':>5} {'paft tok/s':>11} " + " ".join(f"{p + ' tok/s':>18}" for p in peer) + "  ratio (paft/peer)")
for b in sorted({b for _, b in best}):
    row = f"{b:>5} {best[('paft', b)]:>11.1f} "
    for p in peer:
        row += f"{best[(p, b)]:>18.1f}  {best[('paft', b)] / best[(p, b)]:.2f}x"
    print(row)
