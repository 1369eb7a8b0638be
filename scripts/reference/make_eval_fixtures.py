#!/usr/bin/env python3
"""Reference fixtures for paft's evaluator from lm-evaluation-harness 0.4.13 (tests/fixtures/eval/).

Runs lm-eval's HF backend (float32, CPU) on the local leaderboard JSONL with the task YAMLs of
docs/leaderboard-tasks.md §10 (scripts/reference/lb_tasks/, rendered into a temp dir with the absolute
data path), one `simple_evaluate` call per task with the model loaded once, `--limit`-style prefix of
each eval split, `log_samples=True`, no num_fewshot override. Then condenses the logged samples into
small JSON/JSONL fixtures and records timings and token counts.

    scripts/.venv-lmeval/bin/python scripts/reference/make_eval_fixtures.py            # ~1 h, 1 thread
    scripts/.venv-lmeval/bin/python scripts/reference/make_eval_fixtures.py --limit 2 --out /tmp/fx --tasks winogrande

By default the process pins itself to CPU core 1 and runs torch with one thread (--cpu/--threads).
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASK_SRC = Path(__file__).resolve().parent / "lb_tasks"

# fixture name -> lm-eval task name (as defined in lb_tasks/)
TASKS = {
    "winogrande": "winogrande_lb",
    "truthfulqa_mc2": "truthfulqa_mc2_lb",
    "mmlu_abstract_algebra": "mmlu_lb_abstract_algebra",
    "mmlu_anatomy": "mmlu_lb_anatomy",
    "mmlu_astronomy": "mmlu_lb_astronomy",
    "arc_challenge": "arc_challenge_lb",
    "hellaswag": "hellaswag_lb",
    "gsm8k": "gsm8k_lb",
}

# docs/leaderboard-tasks.md §11: first 16 hex of sha256(context) for doc 0 / doc 1, in request order
# (Winogrande: option1 context, option2 context). Only distinct contexts are listed.
SPEC_S11 = {
    "arc_challenge": {"ctx_chars_doc0": 4733, 0: ["5b8ffc5d2a429b43"], 1: ["4cad27772555bab2"]},
    "hellaswag": {"ctx_chars_doc0": 3080, 0: ["4b81d6ac293923c8"], 1: ["249e586c53a06f81"]},
    "mmlu_abstract_algebra": {"ctx_chars_doc0": 993, 0: ["ff9b00310e214bea"], 1: ["2885f321f1938150"]},
    "truthfulqa_mc2": {"ctx_chars_doc0": 619, 0: ["add27f6e382a585e"], 1: ["9f41d64ce976a73f"]},
    "winogrande": {"ctx_chars_doc0": 592, 0: ["a66667096ca1e2c2", "093f5b6ea2dd5861"],
                   1: ["7bd83ac98e62e2fe", "9c3f275f29a28da9"]},
    "gsm8k": {"ctx_chars_doc0": 3187, 0: ["32680f263ba83280"], 1: ["e6b9a0195411932e"]},
}

MODEL_DESC = "SmolLM2-135M-Instruct Q4_1 GGUF imported by paft to f32"
N_FULL_CONTEXT_DOCS = 3  # docs 0..2 also carry the full context strings


def parse_args():
    shared = Path(os.environ.get("PAFT_SHARED", REPO.parent / "shared"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "target/bench-assets/smollm-f32"), help="HF-format model dir")
    p.add_argument("--data", default=str(shared / "data/leaderboard"), help="leaderboard JSONL root")
    p.add_argument("--out", default=str(REPO / "tests/fixtures/eval"))
    p.add_argument("--raw-out", default=None, help="also keep lm-eval's full per-task output here (default: temp dir, deleted)")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu", default="1", help="comma-separated CPU ids to pin to ('' = no pinning)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated fixture task names")
    return p.parse_args()


def setup_process(args):
    # Must happen before torch / numpy are imported.
    if args.cpu:
        os.sched_setaffinity(0, {int(c) for c in args.cpu.split(",")})
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[k] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"
    os.environ.setdefault("HF_ALLOW_CODE_EVAL", "0")


def render_tasks(data_root: Path, dst: Path):
    """Copy lb_tasks/ with /ABS replaced, and generate the per-subject MMLU yamls + groups (spec §10)."""
    data_root = data_root.resolve()
    for f in TASK_SRC.iterdir():
        if f.is_dir() or f.suffix == ".pyc":
            continue
        text = f.read_text()
        if f.name.endswith("yaml"):
            text = text.replace("/ABS/", str(data_root) + "/")
        name = {"_mmlu_lb_group_yaml": "mmlu_lb.yaml", "_openllm_lb_group_yaml": "openllm_lb.yaml"}.get(f.name, f.name)
        (dst / name).write_text(text)
    subjects = sorted({json.loads(l)["subject"] for l in open(data_root / "mmlu/dev.jsonl")})
    for s in subjects:
        (dst / f"mmlu_lb_{s}.yaml").write_text(
            f"include: _mmlu_lb_template_yaml\ntask: mmlu_lb_{s}\ntag: mmlu_lb_subjects\n"
            f"process_docs: !function utils.mmlu_{s}\n")
    return subjects


def sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Instrument:
    """Wraps an HFLM instance to time request calls and count what is fed to the model."""

    def __init__(self, lm):
        self.lm = lm
        self.reset()
        for name in ("loglikelihood", "generate_until"):
            orig = getattr(lm, name)
            setattr(lm, name, self._timed(orig))
        orig_call, orig_gen = lm._model_call, lm._model_generate

        def model_call(inps, *a, **kw):
            self.calls += 1
            self.padded_tokens += int(inps.shape[0] * inps.shape[1])
            return orig_call(inps, *a, **kw)

        def model_generate(context, max_length, stop, **kw):
            out = orig_gen(context, max_length, stop, **kw)
            self._record_generation(context, kw.get("attention_mask"), out, stop)
            return out

        lm._model_call, lm._model_generate = model_call, model_generate

    def reset(self):
        self.model_s = 0.0
        self.model_cpu_s = 0.0
        self.calls = 0
        self.padded_tokens = 0
        self.gen_batches = 0
        self.gen_batch_steps = 0
        self.gen_prefill_padded = 0
        self.gen_steps = {}  # tuple(context ids) -> generated tokens of that sequence

    def _timed(self, fn):
        def wrapper(*a, **kw):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.model_s += time.perf_counter() - t
                self.model_cpu_s += time.process_time() - c
        return wrapper

    def _record_generation(self, context, attn, out, stop):
        """Per sequence: tokens generated up to and including the one that stops it, as a per-sequence
        stop would (lm-eval's batch keeps generating until every row has hit the same stop string or EOS).
        Mirrors lm-eval's MultiTokenEOSCriteria (stop string within the decoded last len(enc(stop))+2
        tokens) and HF's EOS criterion."""
        tok = self.lm.tokenizer
        eos = self.lm.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
        windows = [(s_, len(tok.encode(s_, add_special_tokens=False)) + 2) for s_ in stop]
        ctx_len = context.shape[1]
        self.gen_batches += 1
        self.gen_batch_steps += int(out.shape[1] - ctx_len)
        self.gen_prefill_padded += int(context.shape[0] * ctx_len)
        for i in range(out.shape[0]):
            ids = context[i].tolist()
            if attn is not None:
                ids = [t for t, m in zip(ids, attn[i].tolist()) if m]
            gen = out[i, ctx_len:].tolist()
            steps = len(gen)
            for k in range(1, len(gen) + 1):
                if gen[k - 1] in eos or any(s_ in tok.decode(gen[max(0, k - w):k]) for s_, w in windows):
                    steps = k
                    break
            self.gen_steps[tuple(ids)] = steps


def main():
    args = parse_args()
    setup_process(args)

    import torch
    torch.set_num_threads(args.threads)
    import numpy as np
    import transformers
    import tokenizers
    import datasets
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    import logging
    from lm_eval.utils import setup_logging
    setup_logging(logging.INFO)

    wanted = [t for t in args.tasks.split(",") if t]
    for t in wanted:
        if t not in TASKS:
            sys.exit(f"unknown task {t}; choose from {list(TASKS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="paft-lmeval-"))
    task_dir = tmp / "lb_tasks"
    task_dir.mkdir()
    render_tasks(Path(args.data), task_dir)
    raw_dir = Path(args.raw_out) if args.raw_out else tmp / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    print(f"[eval-fixtures] tasks rendered to {task_dir}; raw output in {raw_dir}", flush=True)

    tk = tokenizers.Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))

    def enc(s):
        return tk.encode(s, add_special_tokens=True).ids

    t0 = time.perf_counter()
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    task_index_s = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), time.process_time()
    lm = HFLM(pretrained=args.model, dtype="float32", batch_size=args.batch_size, device="cpu")
    model_load_s, model_load_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    inst = Instrument(lm)
    print(f"[eval-fixtures] model loaded in {model_load_s:.1f}s; torch threads={torch.get_num_threads()} "
          f"affinity={sorted(os.sched_getaffinity(0))}", flush=True)

    versions = {
        "lm_eval": lm_eval.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__, "datasets": datasets.__version__, "numpy": np.__version__,
        "python": platform.python_version(),
    }
    summary = {
        "generator": "scripts/reference/make_eval_fixtures.py",
        "model": MODEL_DESC,
        "model_safetensors_sha256": file_sha256(Path(args.model) / "model.safetensors"),
        "versions": versions,
        "settings": {
            "backend": "hf (HFLM)", "dtype": "float32", "device": "cpu", "batch_size": args.batch_size,
            "limit": args.limit, "num_fewshot_override": None, "fewshot_random_seed": 1234,
            "add_bos_token": lm.add_bos_token, "logits_cache": lm.logits_cache, "max_length": lm.max_length,
            "pad_token_id": lm.tokenizer.pad_token_id, "eos_token_id": lm.tokenizer.eos_token_id,
            "threads": torch.get_num_threads(), "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "cpu": platform.processor() or platform.machine(),
            "tasks_yaml": "scripts/reference/lb_tasks/ (docs/leaderboard-tasks.md §10), /ABS -> local data dir",
        },
        "results": {},
        "timing": {"model_load_s": round(model_load_s, 3), "model_load_cpu_s": round(model_load_cpu_s, 3), "task_index_s": round(task_index_s, 3), "tasks": {}},
        "spec_s11_check": {},
    }

    total_t0, total_c0 = time.perf_counter(), time.process_time()
    for name in wanted:
        task = TASKS[name]
        inst.reset()
        print(f"[eval-fixtures] {name} ({task}) ...", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=args.limit, log_samples=True,
                                      task_manager=tm, batch_size=args.batch_size)
        wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        print(f"[eval-fixtures] {name}: {wall_s:.1f}s  {res['results'][task]}", flush=True)
        with open(raw_dir / f"{name}.json", "w") as f:
            json.dump(res, f, indent=1, default=str, ensure_ascii=False)

        r = {k: v for k, v in res["results"][task].items() if k != "alias"}
        r["n-shot"] = res["n-shot"][task]
        r["n-samples"] = res["n-samples"][task]
        summary["results"][name] = r

        samples = sorted(res["samples"][task], key=lambda s: (s["doc_id"], s["filter"]))
        # cpu_s = process CPU time (user+sys, all threads; 1 torch thread): unlike wall_s it does not grow
        # when another process shares the pinned core.
        timing = {"wall_s": round(wall_s, 3), "cpu_s": round(cpu_s, 3), "model_s": round(inst.model_s, 3),
                  "model_cpu_s": round(inst.model_cpu_s, 3)}
        lines = []
        if name == "gsm8k":
            by_doc = {}
            for s in samples:
                by_doc.setdefault(s["doc_id"], []).append(s)
            prompt_tokens = gen_tokens = 0
            for doc_id, group in sorted(by_doc.items()):
                s0 = group[0]
                ctx = s0["arguments"][0][0]
                ctx_ids = enc(ctx)
                n_gen = inst.gen_steps.get(tuple(ctx_ids))
                prompt_tokens += len(ctx_ids)
                gen_tokens += n_gen or 0
                line = {"doc_id": doc_id, "context_sha256": [sha(ctx)], "ctx_tokens": [len(ctx_ids)],
                        "target": s0["target"], "generation": s0["resps"][0][0],
                        "generated_tokens": n_gen,
                        "filtered": {g["filter"]: g["filtered_resps"][0] for g in group},
                        "exact_match": {g["filter"]: g["exact_match"] for g in group}}
                if doc_id < N_FULL_CONTEXT_DOCS:
                    line["contexts"] = [ctx]
                    line["gen_kwargs"] = s0["arguments"][0][1]
                lines.append(line)
            timing.update({"requests": len(by_doc), "request_type": "generate_until",
                           "prompt_tokens": prompt_tokens, "generated_tokens": gen_tokens,
                           "tokens": prompt_tokens + gen_tokens,
                           "generate_batches": inst.gen_batches, "generate_batch_steps": inst.gen_batch_steps,
                           "prefill_padded_tokens": inst.gen_prefill_padded})
        else:
            n_req = tokens = fwd_nocache = 0
            groups = set()
            mismatch = 0
            for s in samples:
                assert s["filter"] == "none"
                ctxs = [a[0] for a in s["arguments"]]
                conts = [a[1] for a in s["arguments"]]
                ctx_tok, cont_tok = [], []
                for c, x in zip(ctxs, conts):
                    n = len(c) - len(c.rstrip())  # lm-eval's whitespace move (no-op for these tasks)
                    if n:
                        c, x = c[:-n], c[-n:] + x
                    whole, ce = enc(c + x), enc(c)
                    cont_ids = whole[len(ce):]
                    le_ctx, le_cont = lm._encode_pair(c, x)
                    if le_ctx != ce or le_cont != cont_ids:
                        mismatch += 1
                    ctx_tok.append(len(ce))
                    cont_tok.append(len(cont_ids))
                    n_req += 1
                    tokens += len(whole)
                    fwd_nocache += len(whole) - 1
                    groups.add(tuple(ce + cont_ids[:-1]))
                line = {"doc_id": s["doc_id"], "context_sha256": [sha(c) for c in ctxs], "continuations": conts,
                        "loglikelihoods": [float(r[0][0]) for r in s["resps"]],
                        "is_greedy": [bool(r[0][1]) for r in s["resps"]],
                        "ctx_tokens": ctx_tok, "cont_tokens": cont_tok, "target": s["target"]}
                for m in s["metrics"]:
                    line[m] = s[m]
                if s["doc_id"] < N_FULL_CONTEXT_DOCS:
                    line["contexts"] = ctxs
                lines.append(line)
            timing.update({"requests": n_req, "request_type": "loglikelihood", "tokens": tokens,
                           "forward_tokens": sum(len(g) for g in groups), "forwards": len(groups),
                           "model_calls": inst.calls,
                           "forward_tokens_without_cache": fwd_nocache,
                           "padded_tokens_fed": inst.padded_tokens,
                           "tokenizer_mismatches_vs_lm_eval": mismatch})
        fed = timing.get("forward_tokens", timing["tokens"])
        timing["fed_tokens_per_model_s"] = round(fed / inst.model_s, 1) if inst.model_s else None
        timing["fed_tokens_per_model_cpu_s"] = round(fed / inst.model_cpu_s, 1) if inst.model_cpu_s else None
        summary["timing"]["tasks"][name] = timing

        with open(out_dir / f"samples_{name}.jsonl", "w") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")

        if name in SPEC_S11:
            spec = SPEC_S11[name]
            chk = {}
            for d in (0, 1):
                line = next(l for l in lines if l["doc_id"] == d)
                got = list(dict.fromkeys(h[:16] for h in line["context_sha256"]))
                chk[f"doc{d}"] = {"expected": spec[d], "got": got, "match": got == spec[d]}
            d0 = lines[0]["contexts"][0]
            chk["ctx_chars_doc0"] = {"expected": spec["ctx_chars_doc0"], "got": len(d0),
                                     "match": len(d0) == spec["ctx_chars_doc0"]}
            chk["all_match"] = all(v["match"] for v in chk.values())
            summary["spec_s11_check"][name] = chk
            print(f"[eval-fixtures] §11 check {name}: {chk['all_match']}", flush=True)

        summary["timing"]["total_wall_s"] = round(time.perf_counter() - total_t0, 3)
        with open(out_dir / "lm_eval_results.json", "w") as f:
            json.dump(summary, f, indent=1, ensure_ascii=False)
            f.write("\n")

    mm = [summary["results"][t]["acc,none"] for t in summary["results"] if t.startswith("mmlu_")]
    if mm:
        summary["results"]["mmlu_macro_mean_of_run_subjects"] = float(np.mean(mm))
    summary["timing"]["total_wall_s"] = round(time.perf_counter() - total_t0, 3)
    summary["timing"]["total_cpu_s"] = round(time.process_time() - total_c0, 3)
    summary["timing"]["total_wall_s_including_model_load"] = round(
        summary["timing"]["total_wall_s"] + model_load_s + task_index_s, 3)
    with open(out_dir / "lm_eval_results.json", "w") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
        f.write("\n")
    if not args.raw_out:
        shutil.rmtree(tmp)
    print(f"[eval-fixtures] done in {summary['timing']['total_wall_s']:.1f}s; wrote {out_dir}", flush=True)


if __name__ == "__main__":
    main()
