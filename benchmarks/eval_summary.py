#!/usr/bin/env python3
"""One JSON line for the eval benchmark: wall time, peak RSS, requests/s and tokens/s.

  eval_summary.py paft    PAFT_RESULTS.json   /usr/bin/time-v-output THREADS
  eval_summary.py lm-eval LM_EVAL_RESULTS.json -                     THREADS

paft's wall time is the whole process (model load included) from `/usr/bin/time -v`; lm-eval's is
the sum of its per-task runs plus one model load, from make_eval_fixtures.py's timing. Token
counts are lm-eval's (every request's joint context+continuation encoding, and for GSM8K the
context plus generated tokens), the same workload for both sides; they come from the lm-eval
results file, given as LM_EVAL_RESULTS (default tests/fixtures/eval/lm_eval_results.json).
"""
import json
import os
import sys

impl, results_path, time_path, threads = sys.argv[1:5]
lm = json.load(open(os.environ.get("LM_EVAL_RESULTS", results_path if impl == "lm-eval" else "tests/fixtures/eval/lm_eval_results.json")))
tokens = sum(t.get("tokens", 0) for t in lm["timing"]["tasks"].values())
requests = sum(t.get("requests", 0) for t in lm["timing"]["tasks"].values())
if impl == "paft":
    text = open(time_path).read()
    wall = rss = None
    for line in text.splitlines():
        if "Elapsed (wall clock)" in line:
            parts = line.split()[-1].split(":")
            wall = 0.0
            for p in parts:
                wall = wall * 60 + float(p)
        if "Maximum resident set size" in line:
            rss = int(line.split()[-1])
    per_task = {k: v["seconds"] for k, v in json.load(open(results_path))["timing"]["tasks"].items()}
else:
    t = lm["timing"]
    per_task = {k: v["wall_s"] for k, v in t["tasks"].items()}
    wall = sum(per_task.values()) + t.get("model_load_s", 0.0)
    rss = t.get("max_rss_kb", 0)
print(json.dumps({"impl": impl, "wall_s": round(wall, 2), "max_rss_kb": rss or 0, "threads": int(threads),
                  "requests": requests, "tokens": tokens,
                  "requests_per_s": round(requests / wall, 3), "tokens_per_s": round(tokens / wall, 1),
                  "per_task_s": {k: round(v, 1) for k, v in per_task.items()}}))
