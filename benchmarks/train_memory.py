#!/usr/bin/env python3
"""Table of benchmarks/run.sh train's memory runs: per objective and trainable, the peak RSS, its
excess over the resident set before the first step per 512-token sequence, and seconds per step,
without and with gradient checkpointing; then the checkpointed runs in f32 against mixed precision."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {(r["objective"], r["trainable"], r["gradient_checkpointing"]): r
      for r in rows if r.get("mixed_precision", "no") == "no"}
mixed = {(r["objective"], r["trainable"], r["mixed_precision"]): r
         for r in rows if r.get("mixed_precision", "no") != "no"}
pairs = [(by.get((o, t, False)), by.get((o, t, True))) for o, t in sorted({(o, t) for o, t, _ in by})]
pairs = [(a, b) for a, b in pairs if a and b]
if pairs:
    print("| objective | trainable | peak RSS GB (plain → checkpointed) | excess GB per sequence | s per step |")
    print("|---|---|---|---|---|")
for a, b in pairs:
    objective, trainable = a["objective"], a["trainable"]
    print(f"| {objective} | {trainable} | {a['peak_rss_gb']:.2f} → {b['peak_rss_gb']:.2f} "
          f"| {a['peak_excess_gb_per_sequence']:.2f} → {b['peak_excess_gb_per_sequence']:.2f} "
          f"| {a['seconds_per_step']:.1f} → {b['seconds_per_step']:.1f} "
          f"({b['seconds_per_step'] / a['seconds_per_step']:.2f}×) |")

if mixed:
    print()
    print("| objective | trainable | mixed precision | peak RSS GB (f32 → mixed, checkpointed) "
          "| excess GB per sequence | s per step |")
    print("|---|---|---|---|---|---|")
    for (objective, trainable, kind), b in sorted(mixed.items()):
        a = by.get((objective, trainable, True))
        if not a:
            continue
        print(f"| {objective} | {trainable} | {kind} | {a['peak_rss_gb']:.2f} → {b['peak_rss_gb']:.2f} "
              f"| {a['peak_excess_gb_per_sequence']:.2f} → {b['peak_excess_gb_per_sequence']:.2f} "
              f"| {a['seconds_per_step']:.1f} → {b['seconds_per_step']:.1f} "
              f"({b['seconds_per_step'] / a['seconds_per_step']:.2f}×) |")
