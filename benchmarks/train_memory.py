#!/usr/bin/env python3
"""Table of benchmarks/run.sh train's memory runs: per objective and trainable, the peak RSS, its
excess over the resident set before the first step per 512-token sequence, and seconds per step,
without and with gradient checkpointing."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {(r["objective"], r["trainable"], r["gradient_checkpointing"]): r for r in rows}
print("| objective | trainable | peak RSS GB (plain → checkpointed) | excess GB per sequence | s per step |")
print("|---|---|---|---|---|")
for (objective, trainable) in sorted({(o, t) for o, t, _ in by}):
    a, b = by.get((objective, trainable, False)), by.get((objective, trainable, True))
    if not (a and b):
        continue
    print(f"| {objective} | {trainable} | {a['peak_rss_gb']:.2f} → {b['peak_rss_gb']:.2f} "
          f"| {a['peak_excess_gb_per_sequence']:.2f} → {b['peak_excess_gb_per_sequence']:.2f} "
          f"| {a['seconds_per_step']:.1f} → {b['seconds_per_step']:.1f} "
          f"({b['seconds_per_step'] / a['seconds_per_step']:.2f}×) |")
