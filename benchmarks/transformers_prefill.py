#!/usr/bin/env python3
"""Prefill throughput of Hugging Face transformers on CPU, the baseline for paft's forward pass.

    scripts/.venv/bin/python benchmarks/transformers_prefill.py \
        --model /tmp/smollm-ref-hf --threads 2 --seq 512 --batches 1,4 --repeats 3

For each batch size b: one full forward (logits for every position) over b x seq random token
ids (fixed seed, drawn from the vocabulary), float32, under torch.no_grad(), after one warm-up
run; prints one JSON line per batch size:
  {"impl":"transformers","batch":b,"seq":s,"threads":N,"tokens_per_s":...,"median_s":...}
tokens_per_s = b*seq / median_s.  No attention mask or padding: every row is full length.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attn_implementation")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    model.eval()
    vocab = model.config.vocab_size
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"attn {args.attn}", file=sys.stderr)

    for b in [int(x) for x in args.batches.split(",") if x]:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, vocab, (b, args.seq), generator=g, dtype=torch.long)
        times = []
        with torch.no_grad():
            for r in range(args.repeats + 1):
                t0 = time.perf_counter()
                logits = model(input_ids=ids, use_cache=False).logits
                dt = time.perf_counter() - t0
                assert logits.shape == (b, args.seq, vocab) and logits.dtype == torch.float32
                del logits
                if r > 0:  # first run is the warm-up
                    times.append(dt)
        med = statistics.median(times)
        print(json.dumps({"impl": "transformers", "batch": b, "seq": args.seq, "threads": args.threads,
                          "tokens_per_s": round(b * args.seq / med, 2), "median_s": round(med, 4),
                          "repeats": args.repeats, "attn": args.attn,
                          "torch": torch.__version__, "transformers": transformers.__version__}), flush=True)


if __name__ == "__main__":
    main()
