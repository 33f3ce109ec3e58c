#!/usr/bin/env bash
# Reproduce docs/results.md's `popc bench` table: SmolLM2-135M fp32, popc dense and POP at 25/50/75 %
# against onnxruntime-genai's build of the same model and transformers eager (2 threads).
#
#   benchmarks/run_smollm2.sh [OUT_DIR] [extra popc bench options...]
#
# Exports the dense model and one POP export (the sparsity is a run-time input, so one
# POP export serves every sparsity) under OUT_DIR (default: benchmarks/work, not committed),
# then writes results/smollm2-135m.{json,md,png} next to this script. Run it on a quiet
# machine: other processes on the same cores change the figures (the JSON records the
# load average at the start and the end).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$here/work}"
shift || true
mkdir -p "$work" "$here/results"
[ -f "$work/dense/popc.json" ] || popc export smollm2-135m --out "$work/dense" --force
[ -f "$work/pop/popc.json" ] || popc export smollm2-135m --out "$work/pop" --sparsity 0.5 --force
popc doctor --build > /dev/null
python -c "import onnxruntime_genai" 2>/dev/null || pip install "onnxruntime-genai>=0.18"
popc bench "$work/pop" --dense "$work/dense" \
  --variants dense-ort,dense-genai-runtime,pop-oplib,ort-genai,hf-eager --threads 2 \
  --prompt-lengths 16,128,512 --batches 1,4 --sparsities 0.25,0.5,0.75 \
  --repeats 9 --decode-tokens 32 --decode-prompt 64 \
  --json "$here/results/smollm2-135m.json" --markdown "$here/results/smollm2-135m.md" \
  --plot "$here/results/smollm2-135m.png" "$@"
python "$here/profile_decode.py" "$work/dense" "$work/pop" --sparsity 0.5 --out "$here/results/smollm2-135m-profile.md"
