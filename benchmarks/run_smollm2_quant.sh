#!/usr/bin/env bash
# Reproduce docs/results.md's quantized tables: SmolLM2-135M with int4 weights, popc dense and
# POP at 50/75 % against onnxruntime-genai's int4 build and llama.cpp's Q4_0 (when its tools
# are built: benchmarks/llama_cpp.py build), fp32 dense for reference (2 threads), then the
# perplexity of the same rows (and genai int4's) on the same windows.
#
#   benchmarks/run_smollm2_quant.sh [OUT_DIR] [extra popc bench options...]
#
# The quantized exports are made by `popc bench --quant int4` into popc's cache. Run it on a
# quiet machine (the JSON records the load average at the start and the end).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$here/work}"
shift || true
mkdir -p "$work" "$here/results"
[ -f "$work/pop/popc.json" ] || popc export smollm2-135m --out "$work/pop" --sparsity 0.5 --force
popc doctor --build > /dev/null
python -c "import onnxruntime_genai" 2>/dev/null || pip install "onnxruntime-genai>=0.18"
popc bench "$work/pop" --quant int4 \
  --variants dense-ort,dense-ort-int4,pop-oplib-int4,ort-genai-int4,llama.cpp-q4_0 --threads 2 \
  --prompt-lengths 512 --batches 1,4 --sparsities 0.5,0.75 --repeats 7 --memory-batches "" \
  --json "$here/results/smollm2-135m-int4.json" --markdown "$here/results/smollm2-135m-int4.md" "$@"
popc eval "$work/pop" --tasks none --methods dense,pop --sparsities 0.25,0.5,0.75 --windows 16 \
  --quant int4,int8 --peers ort-genai-int4 --json "$here/results/smollm2-135m-quant-eval.json"
