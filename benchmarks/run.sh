#!/usr/bin/env bash
# Benchmarks against the peer tools, same machine, same thread count.
#   benchmarks/run.sh prefill      # paft vs transformers: prefill tokens/s, SmolLM2-135M f32, seq 512, batch 1 and 4
# Env: THREADS (default: nproc), PAFT_SHARED (default ../shared), PYTHON (default scripts/.venv/bin/python,
# made as scripts/reference/README.md says). Results: target/bench-assets/<name>.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-prefill}
THREADS=${THREADS:-$(nproc)}
SHARED=${PAFT_SHARED:-../shared}
PY=${PYTHON:-scripts/.venv/bin/python}
OUT=target/bench-assets
mkdir -p "$OUT"
[ -x "$PY" ] || { echo "no Python at $PY: create the reference venv as scripts/reference/README.md says" >&2; exit 1; }
export RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

cargo build --release --quiet --bin paft
MODEL=$OUT/smollm-f32
[ -f "$MODEL/config.json" ] || target/release/paft --quiet import-gguf "$SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$MODEL"

case "$what" in
  prefill)
    log=$OUT/prefill.jsonl
    : > "$log"
    # Alternate the two implementations so background load hits both alike.
    for round in 1 2; do
      cargo bench --quiet --bench prefill -- --model "$MODEL" --seq 512 --batches 1,4 --repeats 5 | tee -a "$log"
      "$PY" benchmarks/transformers_prefill.py --model "$MODEL" --threads "$THREADS" --seq 512 --batches 1,4 --repeats 5 | tee -a "$log"
    done
    python3 benchmarks/ratio.py "$log"
    ;;
  *) echo "unknown benchmark '$what' (known: prefill)" >&2; exit 2 ;;
esac
