#!/bin/bash
# The accuracy-vs-cost check of popc's defaults (docs/results.md, "The accuracy-vs-cost
# front"): on SmolLM2-135M and Gemma-3-270m, the default split at the three FFN costs
# 0.81 / 0.62 / 0.44 (output-aware and paper's score) against per-token dynamic selection
# at the same bytes, 20 480 scored tokens each, every row timed. About 33 min (SmolLM2) and
# 65 min (Gemma-3, measured while a CI run shared the cores) on 2 cores. Writes benchmarks/results/front-{smollm2,gemma3}.{json,png,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
work=benchmarks/work
mkdir -p "$work"
for model in smollm2 gemma3; do
  spec=$([ "$model" = smollm2 ] && echo smollm2-135m || echo gemma3-270m)
  [ -f "$work/$model-pop/popc.json" ] || popc export "$spec" --out "$work/$model-pop" --sparsity 0.5 --force
  extra=$([ "$model" = smollm2 ] && echo ",0.1797/0.8203/0.5391:activation,0.1116/0.8705/0.3348:output,0.0781/0.6094/0.2344:output,0.1875/0.8125/0.5625" || echo ",0.1797/0.8203/0.5391:activation")
  popc eval "$work/$model-pop" --sweep --grid defaults --methods dense,dynamic \
    --split "0.1797/0.8203/0.5391:output,0.1116/0.8705/0.3348,0.0781/0.6094/0.2344$extra" \
    --json "benchmarks/results/front-$model.json" --plot "benchmarks/results/front-$model.png"
  python benchmarks/front_tables.py "benchmarks/results/front-$model.json" > "benchmarks/results/front-$model.md"
done
