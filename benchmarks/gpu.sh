#!/usr/bin/env bash
# The GPU check (issue #17): on a CUDA machine, each stage of paft on the device, with its wall
# time, tokens/s or step time, and peak device memory; fails when a stage fails or when a model
# op ran on the CPU (paft's dispatch log, RUST_LOG=paft::model::dispatch=debug, names the device
# of every op's first use; a GPU stage must show none on Cpu).
#
#   benchmarks/gpu.sh
#
# Stages: import SmolLM2-135M from the shared GGUF; evaluate the six tasks at DOCS (default 50)
# documents per task with lm-eval's shots; STEPS (default 10) LoRA SFT and DPO steps, in f32 and
# with bf16 mixed precision, and the evaluation again in bf16; a TIES merge
# of the two adapters (the merge runs on the CPU by design); `paft parallel` of the demo's
# experiment with SFT on cuda:0 and DPO on cuda:1 when two GPUs exist (else both on cuda:0); a
# 4-candidate search (search-spaces/demo-ties.toml). Env: PAFT_SHARED (default ../shared), OUT
# (default target/gpu-check), DOCS, STEPS, CUDA_COMPUTE_CAP (default: from nvidia-smi).
# Summary: OUT/summary.jsonl and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${PAFT_SHARED:-../shared}
OUT=${OUT:-target/gpu-check}
DOCS=${DOCS:-50}
STEPS=${STEPS:-10}
command -v nvidia-smi >/dev/null || { echo "gpu.sh: no nvidia-smi here: not a CUDA machine" >&2; exit 1; }
ngpu=$(nvidia-smi -L | wc -l)
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
cargo build --release --features cuda
BIN=target/release/paft
rm -rf "$OUT"
mkdir -p "$OUT"
export RUST_LOG=${RUST_LOG:-info,paft::model::dispatch=debug}
summary=$OUT/summary.jsonl
: >"$summary"

# stage NAME DEVICE_EXPECTED(gpu|cpu) CMD...: runs CMD, samples device memory every 200 ms, checks
# the dispatch log, appends a summary line.
stage() {
  local name=$1 where=$2
  shift 2
  local log=$OUT/$name.log mem=$OUT/$name.mem
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 >"$mem" &
  local smi=$!
  local t0=$SECONDS
  if ! "$@" >"$log" 2>&1; then
    kill "$smi" 2>/dev/null || true
    echo "gpu.sh: stage $name failed ($log):" >&2
    tail -20 "$log" >&2
    exit 1
  fi
  local secs=$((SECONDS - t0))
  kill "$smi" 2>/dev/null || true
  wait "$smi" 2>/dev/null || true
  if [ "$where" = gpu ]; then
    # The log may be coloured: strip ANSI escapes before matching `field=value`.
    sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -a " dispatch " >"$OUT/$name.dispatch" || true
    if grep -q "device=Cpu" "$OUT/$name.dispatch"; then
      echo "gpu.sh: stage $name ran model ops on the CPU:" >&2
      grep "device=Cpu" "$OUT/$name.dispatch" >&2
      exit 1
    fi
    grep -q "device=Cuda" "$OUT/$name.dispatch" || {
      echo "gpu.sh: stage $name logged no op on the GPU ($log)" >&2
      exit 1
    }
  fi
  python3 - "$name" "$secs" "$mem" "$OUT" >>"$summary" <<'EOF'
import json, sys, os, glob
name, secs, mem, out = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
peak = {}
for line in open(mem):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 2 and parts[1].isdigit():
        peak[parts[0]] = max(peak.get(parts[0], 0), int(parts[1]))
row = {"stage": name, "seconds": secs, "peak_device_mib": peak}
res = os.path.join(out, name, "results.json")
if os.path.exists(res):
    t = json.load(open(res))["timing"]["tasks"].values()
    tok = sum(x.get("tokens_prefilled", 0) + x.get("tokens_generated", 0) for x in t)
    row["tokens_per_s"] = round(tok / max(sum(x["seconds"] for x in t), 1e-9), 1)
for m in sorted(glob.glob(os.path.join(out, name, "**", "metrics.jsonl"), recursive=True)):
    steps = [json.loads(l) for l in open(m) if l.strip()]
    if steps:
        run = os.path.relpath(os.path.dirname(m), os.path.join(out, name)) or "."
        row.setdefault("training", {})[run] = {
            "steps": len(steps),
            "seconds_per_step": round(sum(s["seconds"] for s in steps) / len(steps), 3),
            "tokens_per_s": round(sum(s["tokens_per_s"] for s in steps) / len(steps), 1),
        }
print(json.dumps(row))
EOF
  tail -1 "$summary"
}

model=$OUT/smollm
stage import cpu "$BIN" import-gguf "$SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$model"
stage eval gpu "$BIN" eval --model "$model" --tasks leaderboard --sample "$DOCS" --device cuda:0 \
  --tasks-dir "$SHARED/data/leaderboard" --output "$OUT/eval"
stage sft gpu "$BIN" train sft --config configs/train-sft.toml --model "$model" --output "$OUT/sft" \
  --dataset "$SHARED/data/train/sft/mixed_qa.jsonl" --max-steps "$STEPS" --save-every 0 --device cuda:0
stage dpo gpu "$BIN" train dpo --config configs/train-dpo.toml --model "$model" --output "$OUT/dpo" \
  --dataset "$SHARED/data/train/preference/hh_harmless.jsonl" --max-steps "$STEPS" --save-every 0 \
  --device cuda:0
# The same two runs with bf16 passes and f32 LoRA factors and optimizer state, and the
# evaluation in bf16: what a user runs on a GPU.
stage sft-bf16 gpu "$BIN" train sft --config configs/train-sft.toml --model "$model" --output "$OUT/sft-bf16" \
  --dataset "$SHARED/data/train/sft/mixed_qa.jsonl" --max-steps "$STEPS" --save-every 0 --device cuda:0 \
  --mixed-precision bf16
stage dpo-bf16 gpu "$BIN" train dpo --config configs/train-dpo.toml --model "$model" --output "$OUT/dpo-bf16" \
  --dataset "$SHARED/data/train/preference/hh_harmless.jsonl" --max-steps "$STEPS" --save-every 0 \
  --device cuda:0 --mixed-precision bf16
stage eval-bf16 gpu "$BIN" eval --model "$model" --tasks leaderboard --sample "$DOCS" --device cuda:0 \
  --dtype bf16 --tasks-dir "$SHARED/data/leaderboard" --output "$OUT/eval-bf16"
cat >"$OUT/ties.yml" <<EOF
merge_method: ties
base_model: $model
models:
  - model: $model+$OUT/sft/adapter
    parameters: {weight: 1.0, density: 0.5}
  - model: $model+$OUT/dpo/adapter
    parameters: {weight: 1.0, density: 0.5}
dtype: float32
EOF
stage merge cpu "$BIN" merge "$OUT/ties.yml" "$OUT/merge"
pref_device=cuda:$([ "$ngpu" -ge 2 ] && echo 1 || echo 0)
sed -e "s|{shared}|$SHARED|g" -e "s|{space}|search-spaces/demo-ties.toml|" \
  -e "s|^name = \"demo\"|name = \"gpu-check\"\nout = \"$OUT/parallel\"\ndevices = [\"cuda:0\", \"$pref_device\"]|" \
  configs/demo.toml >"$OUT/experiment.toml"
stage parallel gpu "$BIN" parallel --config "$OUT/experiment.toml"
stage search gpu "$BIN" search --space search-spaces/demo-ties.toml --base "$model" \
  --sft "$model+$OUT/sft/adapter" --pref "$model+$OUT/dpo/adapter" --out "$OUT/search" --device cuda:0 \
  --tasks-dir "$SHARED/data/leaderboard"

echo
echo "GPUs: $ngpu ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)), sm_$CUDA_COMPUTE_CAP"
python3 - "$summary" <<'EOF'
import json, sys
print("| stage | seconds | peak device MiB | tokens/s | training |")
print("|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    train = "; ".join(f"{k}: {v['seconds_per_step']} s/step, {v['tokens_per_s']} tok/s"
                      for k, v in r.get("training", {}).items())
    peak = ", ".join(f"gpu{k} {v}" for k, v in r["peak_device_mib"].items())
    print(f"| {r['stage']} | {r['seconds']:.0f} | {peak} | {r.get('tokens_per_s', '')} | {train} |")
EOF
