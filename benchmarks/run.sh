#!/usr/bin/env bash
# Benchmarks against the peer tools, same machine, same thread count.
#   benchmarks/run.sh prefill      # paft vs transformers: prefill tokens/s, SmolLM2-135M f32, seq 512, batch 1 and 4
#   benchmarks/run.sh merge        # paft vs mergekit-yaml: TIES of three SmolLM2-135M-sized f32 models, wall time and peak RSS
#   benchmarks/run.sh merge-memory # peak RSS of a TIES merge whose largest tensor is 1.07 GB: paft at --block-size 64MB,
#                                  # 16MB and whole tensors (8GB), and mergekit-yaml
#   benchmarks/run.sh eval         # paft eval vs lm-evaluation-harness 0.4.13: the six tasks at --limit 40 (MMLU: three
#                                  # subjects), SmolLM2-135M f32, wall time, requests/s, tokens/s, peak RSS.
#                                  # PYTHON_LMEVAL (default scripts/.venv-lmeval/bin/python) runs the lm-eval side;
#                                  # CPUS (default: all) pins both to the same cores.
#   benchmarks/run.sh train        # seconds per optimizer step, paft vs TRL 1.16 + PEFT (torch CPU): SmolLM2-135M f32, LoRA r16,
#                                  # then paft's training memory: peak RSS and its excess per 512-token sequence, SFT and DPO,
#                                  # LoRA and full, without and with gradient checkpointing, and checkpointed with mixed precision
#                                  # (MIXED, default bf16; MIXED= skips) (MEMORY=0 skips; MEMORY_STEPS, default 1),
#                                  # batch 4 x 512, SFT and DPO (reference log-probs precomputed on both sides). PYTHON_TRL
#                                  # (default scripts/.venv-trl/bin/python) runs TRL; CPUS pins both to the same cores.
#                                  # paft's micro-batches: SFT_PER_FORWARD sequences (default 4), DPO_PAIRS_PER_FORWARD
#                                  # pairs (default 1); accumulated to the same 4-example step.
#   benchmarks/run.sh sparsity     # the L1 study: full-FT SFT of SmolLM2-135M, STEPS (default 20) steps at LR (default 2e-5)
#                                  # on the first 4×STEPS rows, one run per MODE:LAMBDA[:REFIT[:REFIT_LR]] in L1_RUNS (REFIT:
#                                  # l1_refit_steps, REFIT_LR: l1_refit_lr; default: proximal at 0, 0.5, 1.0, proximal_adam at
#                                  # 3e-5, 1e-4, and 5e-5 with 15 refit steps at 1e-4);
#                                  # exact-zero share of each delta and the mean loss of the last 5 steps (no peer: paft's own
#                                  # study)
#   benchmarks/run.sh search       # search efficiency: exhaustive GRID×GRID (default 5) TIES grid over the two weights in
#                                  # [0, HIGH] (default 1.5) vs Nelder-Mead, particle swarm and random search (SEEDS seeds,
#                                  # default 3) on one frozen subset (TASKS, default truthfulqa_mc2,winogrande; DOCS per task,
#                                  # default 20): evaluations each needs to come within 0.5 points of the grid's best. Deltas:
#                                  # the LoRA adapters of RUN (default runs/smollm2-paft, made by
#                                  # `paft parallel --config configs/experiment-smollm2.toml`).
#   benchmarks/run.sh objective    # screening objectives: a GRID×GRID (default 4) TIES grid over the two weights in [0, HIGH]
#                                  # (default 2; normalize off, so the weights scale the deltas rather than only their ratio
#                                  # mattering), each candidate scored on SCREEN (default 10) search-pool documents per task
#                                  # (accuracy and probability objectives from the same evaluation) and on REPORT (default 60)
#                                  # report-pool documents (accuracy): Spearman of each screening objective with the report
#                                  # accuracy. TASKS default arc_challenge,hellaswag,truthfulqa_mc2,winogrande. Deltas: LoRA SFT
#                                  # and DPO adapters of SmolLM2 trained STEPS (default 20) steps with the demo's settings into RUN.
#   benchmarks/run.sh candidate    # two per-candidate costs of a search: seconds per in-memory TIES merge (MERGES candidates,
#                                  # default 6; buffers reused, and --fresh ones as before, with each merge's sha256) and
#                                  # seconds of GSM8K generation for the first DOCS (default 16) documents at batch 8, per-document
#                                  # and shared shots. Deltas: the LoRA adapters of RUN (default: the objective study's).
#   benchmarks/run.sh scoring      # issue #15's fidelity benchmark: a fixed TIES grid (SFT_GRID × PREF_GRID weights, default
#                                  # 0,0.5,1,1.5,2 × 0,1) of two synthetic fine-tunes (noise SCALE, default 0.2, of each tensor's std),
#                                  # each candidate scored on DOCS (default 50) search-pool documents per task with lm-eval's
#                                  # per-document shots and with shared shots (these two first, for the whole grid), on the
#                                  # documents shared shots score in the faithful time (the grid's median ratio), and on REPORT (default 200) report-pool documents per task (per-document
#                                  # shots): seconds per candidate of both fidelities and each one's Spearman with the report
#                                  # ranking at equal compute, with 95% bootstrap intervals over the candidates. TASKS default: all six. Resumes from its cache
#                                  # (benchmarks/results/scoring-cache-*.jsonl); PHASES (e.g. report) runs only some phases.
#                                  # A second screening, `gold` (shared shots, GSM8K scored by the gold solution's likelihood
#                                  # instead of generation), has the same two phases (gold, gold_equal) and its own summary.
#                                  # TIMING_CACHE: the cache of a re-timing (e.g. SFT_GRID=0,2 PHASES=faithful,shared,gold, every
#                                  # phase of a candidate back to back in one session) to take the speed ratios from.
# Env: THREADS (default: nproc), PAFT_BIN (a built paft; default: build the dev profile), PAFT_SHARED (default ../shared), PYTHON (default scripts/.venv/bin/python,
# made as scripts/reference/README.md says). Results: target/bench-assets/<name>.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-prefill}
THREADS=${THREADS:-$(nproc)}
SHARED=${PAFT_SHARED:-../shared}
PY=${PYTHON:-scripts/.venv/bin/python}
OUT=target/bench-assets
mkdir -p "$OUT"
if [ "$what" != search ] && [ "$what" != sparsity ] && [ "$what" != objective ] && [ "$what" != candidate ]; then
  [ -x "$PY" ] || { echo "no Python at $PY: create the reference venv as scripts/reference/README.md says" >&2; exit 1; }
fi
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

# The dev profile: numeric dependencies (candle, gemm, tokenizers, …) at opt-level 3 without debug
# assertions (see Cargo.toml), shared with the tests, so no separate 20-minute release build.
# PAFT_BIN: an already-built paft to use instead (e.g. a copy, so rebuilding during a long study is safe).
if [ -n "${PAFT_BIN:-}" ]; then
  BIN=$PAFT_BIN
else
  cargo build --quiet --bin paft
  BIN=${CARGO_TARGET_DIR:-target}/debug/paft
fi
MODEL=$OUT/smollm-f32
[ -f "$MODEL/config.json" ] || "$BIN" --quiet import-gguf "$SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$MODEL"

case "$what" in
  sparsity)
    log=$OUT/sparsity.jsonl
    : > "$log"
    # MODE:LAMBDA pairs; the first, λ 0, is the unregularised reference.
    for run_spec in ${L1_RUNS:-proximal:0 proximal:0.5 proximal:1.0 proximal_adam:3e-5 proximal_adam:1e-4 proximal_adam:5e-5:15:1e-4}; do
      IFS=: read -r mode lambda refit refit_lr <<< "$run_spec"
      refit=${refit:-0}
      refit_flags=(--l1-refit-steps "$refit")
      [ -n "$refit_lr" ] && refit_flags+=(--l1-refit-lr "$refit_lr")
      run=$OUT/sparsity/$mode-$lambda-refit$refit${refit_lr:+-at$refit_lr}-lr${LR:-2e-5}
      rm -rf "$run"
      "$BIN" --quiet train sft --config configs/train-sft.toml --model "$MODEL" --output "$run" --lora-r 0 \
        --lr "${LR:-2e-5}" --max-steps "${STEPS:-20}" --limit $((4 * ${STEPS:-20})) --truncation keep_end --save-every 0 \
        --l1-mode "$mode" --l1-lambda "$lambda" "${refit_flags[@]}"
      "$BIN" --quiet inspect-delta --base "$MODEL" --model "$run/model" --json > "$run/delta.json"
      python3 - "$mode" "$lambda" "$refit" "${refit_lr:-}" "$run" "${LR:-2e-5}" <<'PY' | tee -a "$log"
import json, sys
mode, lam, refit, refit_lr, run, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
losses = [json.loads(l)["loss"] for l in open(f"{run}/metrics.jsonl")]
d = json.load(open(f"{run}/delta.json"))["overall"]
print(json.dumps({"l1_mode": mode, "l1_lambda": float(lam), "l1_refit_steps": refit,
                  "l1_refit_lr": float(refit_lr) if refit_lr else None, "lr": float(lr),
                  "first5_loss": sum(losses[:5]) / 5,
                  "last5_loss": sum(losses[-5:]) / 5, "frac_zero": d["frac_zero"],
                  "frac_below_1e6": d["frac_below_1e6"], "l1": d["l1"]}))
PY
    done
    ;;
  train)
    log=$OUT/train.jsonl
    : > "$log"
    PYT=${PYTHON_TRL:-scripts/.venv-trl/bin/python}
    CPUS=${CPUS:-$(seq -s, 0 $((THREADS - 1)))}
    for round in 1 2; do
      taskset -c "$CPUS" cargo bench --profile dev --quiet --bench train_step -- --model "$MODEL" --steps 3 \
        --sft-sequences-per-forward "${SFT_PER_FORWARD:-4}" --dpo-pairs-per-forward "${DPO_PAIRS_PER_FORWARD:-1}" | tee -a "$log"
      taskset -c "$CPUS" "$PYT" benchmarks/trl_step.py --model "$MODEL" --threads "$THREADS" --steps 3 --dpo-ref precomputed | tee -a "$log"
    done
    python3 benchmarks/ratio.py "$log"
    # Training memory, each configuration in its own process (its own peak): one 512-token
    # sequence per forward for SFT, one pair (two sequences) for DPO; LoRA and full fine-tuning;
    # without and with gradient checkpointing. MEMORY=0 skips it.
    if [ "${MEMORY:-1}" = 1 ]; then
      mem=$OUT/train-memory.jsonl
      : > "$mem"
      for objective in sft dpo; do
        for trainable in lora full; do
          for ckpt in "" --gradient-checkpointing; do
            taskset -c "$CPUS" cargo bench --profile dev --quiet --bench train_step -- --model "$MODEL" \
              --steps "${MEMORY_STEPS:-1}" --objectives $objective --sft-sequences-per-forward 1 \
              --dpo-pairs-per-forward 1 $([ $trainable = full ] && echo --full) $ckpt | tee -a "$mem"
          done
          # Mixed precision (checkpointed): MIXED="" skips it.
          for mixed in ${MIXED-bf16}; do
            taskset -c "$CPUS" cargo bench --profile dev --quiet --bench train_step -- --model "$MODEL" \
              --steps "${MEMORY_STEPS:-1}" --objectives $objective --sft-sequences-per-forward 1 \
              --dpo-pairs-per-forward 1 $([ $trainable = full ] && echo --full) --gradient-checkpointing \
              --mixed-precision "$mixed" | tee -a "$mem"
          done
        done
      done
      python3 benchmarks/train_memory.py "$mem"
    fi
    ;;
  search)
    log=$OUT/search.jsonl
    RUN=${RUN:-runs/smollm2-paft}
    for a in sft dpo; do
      [ -f "$RUN/train/$a/adapter/adapter_config.json" ] || { echo "no $a adapter in $RUN/train: run paft parallel first" >&2; exit 1; }
    done
    tasks=${TASKS:-truthfulqa_mc2,winogrande} docs=${DOCS:-20} high=${HIGH:-1.5}
    # Scores persist per deltas and subset, so a rerun (or a larger GRID, or more SEEDS) only pays for new points.
    cache=$OUT/search-cache/$(basename "$RUN")-${tasks//,/+}-$docs-$high.jsonl
    mkdir -p "$OUT/search-cache"
    cargo bench --profile dev --quiet --bench search_efficiency -- --base "$MODEL" \
      --sft "$MODEL+$RUN/train/sft/adapter" --pref "$MODEL+$RUN/train/dpo/adapter" \
      --tasks "$tasks" --docs "$docs" --grid "${GRID:-5}" --high "$high" --seeds "${SEEDS:-3}" \
      --cache "$cache" | tee "$log"
    ;;
  objective)
    RUN=${RUN:-$OUT/objective-run}
    if [ ! -f "$RUN/train/dpo/adapter/adapter_config.json" ]; then
      exp=$OUT/objective-experiment.toml
      sed -e "s|{shared}|$SHARED|g" -e "s|{space}|search-spaces/demo-ties.toml|" \
          -e "s|^max_steps = .*|max_steps = ${STEPS:-20}|" -e "s|^limit = 64|limit = 128|" \
          -e "s|^name = \"demo\"|name = \"objective\"\nout = \"$RUN\"|" configs/demo.toml > "$exp"
      "$BIN" parallel --config "$exp"
    fi
    tasks=${TASKS:-arc_challenge,hellaswag,truthfulqa_mc2,winogrande}
    cache=$OUT/objective-cache-${tasks//,/+}-${SCREEN:-10}-${REPORT:-60}-${HIGH:-2}.jsonl
    cargo bench --profile dev --quiet --bench objective_ranking -- --base "$MODEL" \
      --sft "$MODEL+$RUN/train/sft/adapter" --pref "$MODEL+$RUN/train/dpo/adapter" --tasks "$tasks" \
      --screen "${SCREEN:-10}" --report "${REPORT:-60}" --grid "${GRID:-4}" --high "${HIGH:-2}" \
      --cache "$cache" | tee "$OUT/objective.jsonl"
    ;;
  scoring)
    # Two synthetic fine-tunes whose noise (SCALE × each tensor's std) is large enough that the
    # candidates' accuracies differ, so there is a ranking to recover.
    scale=${SCALE:-0.2}
    for s in 1 2; do
      d=$OUT/smollm-noise$scale-ft$s
      [ -f "$d/config.json" ] || "$PY" benchmarks/perturb_model.py "$MODEL" "$d" --seed "$s" --scale "$scale"
    done
    tasks=${TASKS:-leaderboard}
    # The cache is kept in the repository (benchmarks/results/): the report pool takes hours
    # on a laptop, so a run spans sessions and machines, resuming where the last one stopped.
    mkdir -p benchmarks/results
    cache=benchmarks/results/scoring-cache-$scale-${tasks//,/+}-${DOCS:-50}-${REPORT:-200}-${SFT_GRID:-0,0.5,1,1.5,2}-${PREF_GRID:-0,1}.jsonl
    cargo bench --profile dev --quiet --bench scoring_fidelity -- --base "$MODEL" \
      --sft "$OUT/smollm-noise$scale-ft1" --pref "$OUT/smollm-noise$scale-ft2" --tasks "$tasks" \
      --docs "${DOCS:-50}" --report "${REPORT:-200}" --sft-grid "${SFT_GRID:-0,0.5,1,1.5,2}" \
      --pref-grid "${PREF_GRID:-0,1}" ${PHASES:+--phases "$PHASES"} ${TIMING_CACHE:+--timing-cache "$TIMING_CACHE"} \
      --cache "$cache" | tee "$OUT/scoring.jsonl"
    ;;
  candidate)
    RUN=${RUN:-$OUT/objective-run}
    for a in sft dpo; do
      [ -f "$RUN/train/$a/adapter/adapter_config.json" ] || { echo "no $a adapter in $RUN/train: run benchmarks/run.sh objective first, or set RUN" >&2; exit 1; }
    done
    log=$OUT/candidate.jsonl
    : > "$log"
    for fresh in "" --fresh; do
      cargo bench --profile dev --quiet --bench candidate_parts -- --base "$MODEL" --what merge $fresh \
        --sft "$MODEL+$RUN/train/sft/adapter" --pref "$MODEL+$RUN/train/dpo/adapter" --merges "${MERGES:-6}" | tee -a "$log"
    done
    cargo bench --profile dev --quiet --bench candidate_parts -- --base "$MODEL" --what gsm8k --docs "${DOCS:-16}" \
      --tasks-dir "$SHARED/data/leaderboard" --out "$OUT/candidate-generations.jsonl" | tee -a "$log"
    ;;
  prefill)
    log=$OUT/prefill.jsonl
    : > "$log"
    # Alternate the two implementations so background load hits both alike.
    for round in 1 2; do
      cargo bench --profile dev --quiet --bench prefill -- --model "$MODEL" --seq 512 --batches 1,4 --repeats 5 | tee -a "$log"
      "$PY" benchmarks/transformers_prefill.py --model "$MODEL" --threads "$THREADS" --seq 512 --batches 1,4 --repeats 5 | tee -a "$log"
    done
    python3 benchmarks/ratio.py "$log"
    ;;
  merge)
    log=$OUT/merge.jsonl
    : > "$log"
    for s in 1 2; do
      [ -f "$OUT/smollm-ft$s/config.json" ] || "$PY" benchmarks/perturb_model.py "$MODEL" "$OUT/smollm-ft$s" --seed "$s"
    done
    cat > "$OUT/ties.yaml" <<YAML
merge_method: ties
base_model: $MODEL
models:
  - model: $OUT/smollm-ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: $OUT/smollm-ft2
    parameters: {weight: 1.0, density: 0.5}
parameters: {normalize: true}
dtype: float32
YAML
    for round in 1 2; do
      rm -rf "$OUT/merged-paft" "$OUT/merged-mergekit" "$OUT/merged-mergekit.yaml"
      /usr/bin/time -v -o "$OUT/paft-time.txt" "$BIN" --quiet merge "$OUT/ties.yaml" "$OUT/merged-paft"
      awk -v threads="$THREADS" '
        /Elapsed \(wall clock\)/ { n = split($NF, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i] }
        /Maximum resident set size/ { rss = $NF }
        END { printf "{\"impl\":\"paft\",\"wall_s\":%.2f,\"max_rss_kb\":%d,\"threads\":%d}\n", s, rss, threads }
      ' "$OUT/paft-time.txt" | tee -a "$log"
      benchmarks/mergekit_ties.sh "$MODEL" "$OUT/smollm-ft1" "$OUT/smollm-ft2" "$OUT/merged-mergekit" | tee -a "$log"
    done
    python3 benchmarks/ratio.py "$log"
    ;;
  merge-memory)
    # Bounded memory: a TIES merge of three models whose tied embedding is 1.07 GB (f32), with
    # paft's default block size, with whole tensors (--block-size 8GB), and with mergekit; peak
    # RSS and wall time of each. Needs ~3.3 GB of disk in target/bench-assets/big.
    big=$OUT/big
    "$PY" benchmarks/big_tensor_models.py "$big"
    log=$OUT/merge-memory.jsonl
    : > "$log"
    cat > "$OUT/big-ties.yaml" <<YAML
merge_method: ties
base_model: $big/base
models:
  - model: $big/ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: $big/ft2
    parameters: {weight: 1.0, density: 0.5}
parameters: {normalize: true}
dtype: float32
YAML
    for block in 64MB 16MB 8GB; do
      rm -rf "$OUT/big-merged"
      /usr/bin/time -v -o "$OUT/paft-time.txt" "$BIN" --quiet merge "$OUT/big-ties.yaml" "$OUT/big-merged" --block-size $block
      awk -v threads="$THREADS" -v block="$block" '
        /Elapsed \(wall clock\)/ { n = split($NF, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i] }
        /Maximum resident set size/ { rss = $NF }
        END { printf "{\"impl\":\"paft\",\"block_size\":\"%s\",\"wall_s\":%.2f,\"max_rss_kb\":%d,\"threads\":%d}\n", block, s, rss, threads }
      ' "$OUT/paft-time.txt" | tee -a "$log"
    done
    rm -rf "$OUT/big-merged" "$OUT/big-mergekit" "$OUT/big-mergekit.yaml"
    benchmarks/mergekit_ties.sh "$big/base" "$big/ft1" "$big/ft2" "$OUT/big-mergekit" | tee -a "$log"
    rm -rf "$OUT/big-merged" "$OUT/big-mergekit"
    ;;
  eval)
    log=$OUT/eval.jsonl
    : > "$log"
    PYL=${PYTHON_LMEVAL:-scripts/.venv-lmeval/bin/python}
    CPUS=${CPUS:-$(seq -s, 0 $((THREADS - 1)))}
    TASKS=arc_challenge,hellaswag,mmlu_abstract_algebra,mmlu_anatomy,mmlu_astronomy,truthfulqa_mc2,winogrande,gsm8k
    rm -rf "$OUT/eval-paft"
    /usr/bin/time -v -o "$OUT/eval-time.txt" taskset -c "$CPUS" "$BIN" --quiet eval --model "$MODEL" \
      --tasks "$TASKS" --limit 40 --output "$OUT/eval-paft" > /dev/null
    python3 benchmarks/eval_summary.py paft "$OUT/eval-paft/results.json" "$OUT/eval-time.txt" "$THREADS" | tee -a "$log"
    # lm-eval on the same documents (its fixture script also records per-task wall time and token counts).
    "$PYL" scripts/reference/make_eval_fixtures.py --model "$MODEL" --out "$OUT/eval-lmeval" \
      --threads "$THREADS" --cpu "$CPUS" --limit 40
    python3 benchmarks/eval_summary.py lm-eval "$OUT/eval-lmeval/lm_eval_results.json" - "$THREADS" | tee -a "$log"
    python3 benchmarks/ratio.py "$log"
    ;;
  *) echo "unknown benchmark '$what' (known: prefill, merge, merge-memory, eval, train, sparsity, search, objective, candidate, scoring)" >&2; exit 2 ;;
esac
