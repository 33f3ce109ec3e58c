#!/usr/bin/env bash
# KV eviction on the exported graph: long-context accuracy (passkey 1k/2k/4k at three depths,
# continuation perplexity after four 2k and four 4k prefixes; every method at 5/10/20/50 %) and decode
# speed / KV memory at 4k context (full vs 20 % vs 5 %), for SmolLM2-135M and Gemma-3-270m, fp32 and int4.
#
#   benchmarks/run_kv_eviction.sh [OUT_DIR] [MODEL...]   (default models: smollm2-135m gemma3-270m)
#
# Exports each model once with --kv-evict under OUT_DIR (default benchmarks/work) and writes
# results/kv-eviction-{model}{,-int4}.{json,md,png} and results/kv-eviction-speed-{model}{,-int4}.{json,md}.
# Run it on a quiet machine (2 threads); about 30 min for both models here.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$here/work}"
shift || true
models=("${@:-smollm2-135m gemma3-270m}")
mkdir -p "$work" "$here/results"
for model in ${models[@]}; do
  out="$work/$model-kv"
  [ -f "$out/popc.json" ] || popc export "$model" --out "$out" --kv-evict --force
  popc bench "$out" --kv-budgets 1,0.2,0.05 --kv-context 4096 --decode-tokens 32 --repeats 5 --threads 2 \
    --json "$here/results/kv-eviction-speed-$model.json" --markdown "$here/results/kv-eviction-speed-$model.md"
  popc eval "$out" --long-context --threads 2 --ppl-count 4 \
    --kv-methods streaming,snapkv,snapkv:pool11,random,laprox,laprox:mix0,laprox:pool7,laprox:floor0.5 \
    --json "$here/results/kv-eviction-$model.json" --plot "$here/results/kv-eviction-$model.png" \
    > "$here/results/kv-eviction-$model.md"
  # The same with 4-bit weights (what a CPU deployment runs).
  [ -f "$out-int4/popc.json" ] || popc export "$model" --out "$out-int4" --kv-evict --quant int4 --force
  popc bench "$out-int4" --kv-budgets 1,0.2,0.05 --kv-context 4096 --decode-tokens 32 --repeats 5 --threads 2 \
    --json "$here/results/kv-eviction-speed-$model-int4.json" --markdown "$here/results/kv-eviction-speed-$model-int4.md"
  popc eval "$out-int4" --long-context --threads 2 --ppl-count 4 --kv-methods streaming,snapkv,laprox,laprox:mix0 \
    --json "$here/results/kv-eviction-$model-int4.json" --plot "$here/results/kv-eviction-$model-int4.png" \
    > "$here/results/kv-eviction-$model-int4.md"
done
# The int4 peer at the same context: onnxruntime-genai's int4 build against popc's plain int4 export.
dense="$work/smollm2-135m-dense"
[ -f "$dense/popc.json" ] || popc export smollm2-135m --out "$dense" --force
popc bench "$dense" --variants dense-ort-int4,ort-genai-int4 --decode-prompt 4096 --batches 1 --prompt-lengths 16 \
  --memory-batches none --decode-tokens 32 --repeats 5 --threads 2 \
  --json "$here/results/int4-decode-4k-context-smollm2.json" --markdown "$here/results/int4-decode-4k-context-smollm2.md"
