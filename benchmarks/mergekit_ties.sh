#!/usr/bin/env bash
# Baseline for the merge benchmark: time one mergekit TIES merge on CPU.
#   benchmarks/mergekit_ties.sh BASE_DIR MODEL_A_DIR MODEL_B_DIR OUT_DIR
# Writes OUT_DIR.yaml next to OUT_DIR (density 0.5, weights 1/1, normalize true, dtype float32),
# runs mergekit-yaml on CPU under GNU time and prints one JSON line:
#   {"impl":"mergekit","wall_s":...,"max_rss_kb":...,"threads":N}
# mergekit's own log goes to OUT_DIR.log.  The model dirs are HF layout (config.json + safetensors);
# benchmarks/perturb_model.py makes the two "fine-tunes" from one base.
# Env: MERGEKIT_YAML (default scripts/.venv-mergekit/bin/mergekit-yaml, made as
# scripts/reference/README.md says), THREADS (default: nproc; mergekit's executor is single-threaded,
# THREADS only sets torch's intra-op threads via --num-threads).
# mergekit 0.1.5 has no `--cuda false`: CPU is `--no-cuda` (the default) or `--device cpu`.
set -euo pipefail
[ $# -eq 4 ] || { sed -n '2,3p' "$0" >&2; exit 2; }
# absolute paths first: the script then works from the repository root
base=$(realpath -m "$1") a=$(realpath -m "$2") b=$(realpath -m "$3") out=$(realpath -m "$4")
cd "$(dirname "$0")/.."
MK=${MERGEKIT_YAML:-scripts/.venv-mergekit/bin/mergekit-yaml}
THREADS=${THREADS:-$(nproc)}
[ -x "$MK" ] || { echo "no mergekit at $MK: create scripts/.venv-mergekit as scripts/reference/README.md says" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "GNU time missing: apt-get update && apt-get install -y time" >&2; exit 1; }
for d in "$base" "$a" "$b"; do [ -f "$d/config.json" ] || { echo "not a model dir: $d" >&2; exit 1; }; done
[ ! -e "$out" ] || { echo "refusing to overwrite $out" >&2; exit 1; }

cfg=$out.yaml
timing=$(mktemp)
trap 'rm -f "$timing"' EXIT
cat > "$cfg" <<EOF
merge_method: ties
base_model: $base
models:
  - model: $a
    parameters: {weight: 1.0, density: 0.5}
  - model: $b
    parameters: {weight: 1.0, density: 0.5}
parameters: {normalize: true}
dtype: float32
EOF

export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1
/usr/bin/time -v -o "$timing" "$MK" "$cfg" "$out" \
  --no-cuda --device cpu --num-threads "$THREADS" --out-shard-size 5B --copy-tokenizer --quiet \
  > "$out.log" 2>&1 || { echo "mergekit failed, see $out.log" >&2; cat "$timing" >&2; exit 1; }

# GNU time: "Elapsed (wall clock) time (h:mm:ss or m:ss): 1:02.35", "Maximum resident set size (kbytes): 123"
awk -v threads="$THREADS" '
  /Elapsed \(wall clock\)/ { n = split($NF, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i] }
  /Maximum resident set size/ { rss = $NF }
  END { printf "{\"impl\":\"mergekit\",\"wall_s\":%.2f,\"max_rss_kb\":%d,\"threads\":%d}\n", s, rss, threads }
' "$timing"
