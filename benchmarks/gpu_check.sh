#!/usr/bin/env bash
# The prepared GPU check: on a fresh GPU machine without network, with the parts that
# `python benchmarks/gpu_carry.py prepare` made carried over (docs/gpu-check.md):
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# joins and verifies the carried wheels, installs them into $WORK/site on top of the image's
# Python (torch and its CUDA libraries stay the image's; popc is this tree), builds the op library for sm_90,
# checks `popc doctor`, runs the GPU tests (`pytest -m gpu`), then `popc bench --device cuda` on
# SmolLM2 (fp16: dense, POP 50 %, onnxruntime-genai's CUDA build) and on the Llama-3.2-1B-shaped
# model. Every stage runs under `timeout` within one budget (POPC_GPU_CHECK_SECONDS, 470 s); a
# stage that fails is recorded and the next one runs. OUT_DIR gets at most 8 files (what the
# device tool brings back): summary.md (printed last), stages.tsv, check.log, env.txt,
# doctor.json, pytest.xml, bench-smollm2.json, bench-llama1b.json. Exit 0 only if every stage passed.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO
export PY=${PYTHON:-python3}
export CARRY=${POPC_GPU_CARRY:-$REPO/benchmarks/work/gpu-carry}
export WORK=${POPC_GPU_WORK:-/tmp/popc-gpu-check}
export BUDGET=${POPC_GPU_CHECK_SECONDS:-470}
export L1B_LAYERS=${POPC_GPU_CHECK_L1B_LAYERS:-8}
export SITE=$WORK/site

# ---- the stages' bodies: run as `bash gpu_check.sh --do NAME` (so that `timeout` can run them)
do_join() {
  "$PY" "$REPO/benchmarks/gpu_carry.py" join --carry "$CARRY" --out "$WORK/wheels"
}

do_install() {
  local wheels=("$WORK"/wheels/*.whl)
  [[ -e ${wheels[0]} ]] || { echo "no joined wheels in $WORK/wheels"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    || return 1
  # popc itself is this tree, unbuilt: a package directory of links whose popc.templates and
  # popc.passes are the tree's templates/ and passes/ (as pyproject.toml's package-dir maps them).
  local shadow=$SITE/popc-src entry
  rm -rf "$shadow" && mkdir -p "$shadow/popc" || return 1
  for entry in "$REPO"/popc/*; do ln -sfn "$entry" "$shadow/popc/"; done
  ln -sfn "$REPO/templates" "$shadow/popc/templates" && ln -sfn "$REPO/passes" "$shadow/popc/passes"
  for entry in "$REPO"/*; do [[ $(basename "$entry") == popc ]] || ln -sfn "$entry" "$shadow/"; done
  mkdir -p "$WORK/ort-headers" && tar -xf "$WORK/wheels/ort-headers.tar" -C "$WORK/ort-headers" || return 1
  "$PY" -c "import popc.templates, popc.passes, onnxruntime; print('popc from', popc.__file__, '; onnxruntime', onnxruntime.__version__, onnxruntime.__file__)"
}

do_probe() {
  {
    echo "## machine"; nvidia-smi -L 2>&1; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    echo "## nvcc"; nvcc --version 2>&1 | tail -2
    echo "## python"; "$PY" -c "import sys; print(sys.executable, sys.version)"
    echo "## LD_LIBRARY_PATH"; echo "${LD_LIBRARY_PATH:-}" | tr ':' '\n'
    echo "## packages"
    "$PY" - <<'EOF' 2>&1
import importlib
for name in ("onnxruntime", "onnxruntime_genai", "torch", "transformers", "onnx", "onnx_ir", "onnxscript",
             "gguf", "tokenizers", "safetensors", "numpy", "popc"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} {getattr(module, '__file__', '')}")
    except Exception as error:  # noqa: BLE001 - a report, not a check
        print(f"{name}: {type(error).__name__}: {error}")
EOF
  } > "$OUT/env.txt" 2>&1
  # The CUDA execution provider must start a session on the GPU (it is listed even where it cannot).
  "$PY" - <<'EOF'
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
session.run(None, {"x": np.ones(1, np.float32)})
assert session.get_providers()[0] == "CUDAExecutionProvider", session.get_providers()
print("CUDA execution provider: ok")
EOF
}

do_build() {
  # The build's report is doctor's JSON; its exit status says whether the library loads and its ops agree.
  "$PY" -m popc doctor --rebuild --json > "$OUT/doctor.json"
  local rc=$?
  "$PY" - "$OUT/doctor.json" <<'EOF' || return 1
import json, sys
report = json.load(open(sys.argv[1]))
print("doctor:", {k: report.get(k) for k in ("library", "cuda", "providers", "cuda_majors", "cuda_problem", "loaded", "ops_ok")})
print("build:", {k: (report.get("build") or {}).get(k) for k in ("cuda_error", "cuda_version", "cuda_architectures", "build_seconds")})
assert report.get("cuda") is True, "the library was built without CUDA kernels"
assert not report.get("cuda_problem"), report.get("cuda_problem")
assert "CUDAExecutionProvider" in report.get("providers", []), report.get("providers")
EOF
  return $rc
}

# The GPU tests in three processes at once: SmolLM2's greedy test in each of its two variants
# (their fixture makes two SmolLM2 exports, minutes on the CPU) and the rest (over 4 xdist
# workers where pytest-xdist is installed). test_smollm2_bench_on_cuda is left out: the
# bench_smollm2 stage measures that, with the peer. Each ends 15 s before the stage would
# (SIGINT: pytest still writes its junit XML); the XMLs are merged into $OUT/pytest.xml.
do_pytest() {
  cd "$REPO" || return 1
  local files part pids=() failed=0
  mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
  [[ ${#files[@]} -gt 0 ]] || { echo "no test file uses the gpu marker"; return 1; }
  echo "GPU test files: ${files[*]}"
  local limit=$(( ${STAGE_LIMIT:-240} - 15 )) xdist=()
  "$PY" -c "import xdist" 2> /dev/null && xdist=(-n 4)
  local greedy=test_smollm2_greedy_tokens_equal_transformers_on_cuda
  declare -A selection=(
    [main]="not test_smollm2_bench_on_cuda and not $greedy"
    [smollm2-fp16]="$greedy and float16"
    [smollm2-fp32]="$greedy and float32"
  )
  for part in main smollm2-fp16 smollm2-fp32; do
    local extra=()
    [[ $part == main ]] && extra=("${xdist[@]}")
    timeout -s INT -k 10 "$limit" "$PY" -m pytest -q -m gpu -k "${selection[$part]}" -o addopts= -p no:cacheprovider \
      -rs --durations=10 "${extra[@]}" --junitxml="$WORK/pytest-$part.xml" "${files[@]}" > "$WORK/pytest-$part.log" 2>&1 &
    pids+=($!)
  done
  local i=0
  for part in main smollm2-fp16 smollm2-fp32; do
    wait "${pids[$i]}"
    local rc=$?
    i=$(( i + 1 ))
    echo "--- pytest $part (exit $rc):"
    cat "$WORK/pytest-$part.log"
    (( rc == 0 )) || failed=1
  done
  "$PY" - "$OUT/pytest.xml" "$WORK"/pytest-main.xml "$WORK"/pytest-smollm2-fp16.xml "$WORK"/pytest-smollm2-fp32.xml <<'EOF'
import sys, xml.etree.ElementTree as ET
merged = ET.Element("testsuites")
for path in sys.argv[2:]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        print(f"{path}: no junit XML ({error})")
        continue
    merged.extend(root.iter("testsuite"))
ET.ElementTree(merged).write(sys.argv[1], encoding="utf-8", xml_declaration=True)
EOF
  return $failed
}

# `--dtype fp16` where `popc export` has it; else the bench's own choice on CUDA (fp16).
export_dtype() { "$PY" -m popc export --help 2>/dev/null | grep -q -- "--dtype" && echo "--dtype fp16"; }

llama1b_help() { "$PY" "$REPO/benchmarks/llama1b_shaped.py" --help 2>&1; }

# The benches' CPU work (exports, genai's model build) runs in the background while the op
# library builds and the tests run; the timed runs come after the tests, alone on the GPU.
do_prewarm_smollm2() {
  local dir=$WORK/smollm2 dense flags
  export POPC_OPLIB_AUTOBUILD=0  # the build stage builds the op library, once
  flags=$(export_dtype)
  # Whether a fused fp16 export loads and generates on CUDA (ORT's CUDA GroupQueryAttention
  # takes no attention_bias: popc loads the graph without it), asked of a tiny export in
  # seconds, not of SmolLM2's after minutes. If not, SmolLM2 is measured as fp32 --no-fuse
  # (every op on the GPU), and the summary says so.
  mkdir -p "$dir"
  if [[ -n $flags ]] && ! "$PY" - "$WORK/fp16-probe" "$REPO/tests" <<'EOF'
import shutil, sys
from pathlib import Path

sys.path.insert(0, sys.argv[2])  # the tests' tiny random-weight models
from conftest import make_tiny_model_dir

import popc
from popc.export import ExportPlan, export

root = Path(sys.argv[1])
shutil.rmtree(root, ignore_errors=True)
tiny = make_tiny_model_dir(root, "llama")
export(ExportPlan(model=str(tiny), out=root / "export", dtype="float16"))
model = popc.load(root / "export", device="cuda", use_oplib=False)
ids = model.generate_ids([[5, 6, 7]], max_new_tokens=2)
print("a fused fp16 export generates on CUDA:", ids)
EOF
  then
    echo "the fused fp16 export does not run on CUDA (above): SmolLM2 is measured as fp32 --no-fuse instead"
    flags=--no-fuse
    touch "$dir/plain"
  fi
  # shellcheck disable=SC2086 # the flags are zero or more words
  "$PY" -m popc export smollm2-135m --out "$dir/pop" --sparsity 0.5 --force $flags || return 1
  # shellcheck disable=SC2086
  "$PY" -m popc export smollm2-135m --out "$dir/dense" --force $flags &
  dense=$!
  "$PY" -c "from popc.bench.peers import genai_model; print('genai build', genai_model('smollm2-135m', device='cuda'))" \
    || echo "onnxruntime-genai's CUDA build of SmolLM2 failed (the bench goes on without that peer)"
  wait "$dense"
}

do_prewarm_llama1b() {
  # One quick run builds the model and both exports into the work directory; the timed run reuses them.
  grep -q -- "--device" <<< "$(llama1b_help)" || { echo "benchmarks/llama1b_shaped.py has no --device"; return 2; }
  export POPC_OPLIB_AUTOBUILD=0  # the build stage builds the op library, once
  llama1b --repeats 1 --batches 1 --json "$WORK/llama1b-warm.json" --markdown "$WORK/llama1b-warm.md"
}

llama1b() {
  local dtype=()
  grep -q -- "--dtype" <<< "$(llama1b_help)" && dtype=(--dtype fp16)
  "$PY" "$REPO/benchmarks/llama1b_shaped.py" --layers "$L1B_LAYERS" --device cuda "${dtype[@]}" \
    --prompt-lengths 16 --sparsities 0.5 --out-dir "$WORK/llama1b" "$@"
}

# Waits for a background job of run_in_background (its .rc file) and shows its log.
wait_for() {
  while [[ ! -e $WORK/$1.rc ]]; do sleep 2; done
  echo "--- background $1 (exit $(cat "$WORK/$1.rc")):"
  cat "$WORK/$1.log"
  echo "---"
  return "$(cat "$WORK/$1.rc")"
}

do_bench_smollm2() {
  local dir=$WORK/smollm2
  wait_for prewarm_smollm2 || echo "the prewarm failed: the bench exports what is missing itself"
  local dense=()
  [[ -f $dir/dense/popc.json ]] && dense=(--dense "$dir/dense")
  if [[ -e $dir/plain ]]; then  # the fp32 --no-fuse fallback: the bench must not make fp16 twins of it
    if "$PY" -m popc bench --help 2>&1 | grep -q -- "--dtype"; then dense+=(--dtype float32)
    else echo "popc bench has no --dtype: on CUDA it will make fp16 twins of the fp32 exports"; fi
  fi
  # shellcheck disable=SC2054 # the commas are popc's list syntax
  local common=("${dense[@]}" --device cuda --batches 1,4 --prompt-lengths 16,128 --sparsities 0.5 --repeats 3
                --memory-batches none --json "$OUT/bench-smollm2.json" --markdown "$dir/bench.md")
  if [[ ! -f $dir/pop/popc.json ]]; then
    # shellcheck disable=SC2046 # the dtype flag is one or zero words
    "$PY" -m popc export smollm2-135m --out "$dir/pop" --sparsity 0.5 --force $(export_dtype) || return 1
  fi
  # A named genai variant that cannot be built fails the whole bench: then once more without it.
  "$PY" -m popc bench "$dir/pop" --variants dense-ort,pop-oplib,ort-genai "${common[@]}" && return 0
  echo "popc bench with the ort-genai peer failed: again without it"
  "$PY" -m popc bench "$dir/pop" --variants dense-ort,pop-oplib "${common[@]}" || return 1
  return 3  # measured, but without the peer
}

do_bench_llama1b() {
  wait_for prewarm_llama1b || echo "the prewarm failed: the timed run builds what is missing itself"
  if ! grep -q -- "--device" <<< "$(llama1b_help)"; then
    echo "benchmarks/llama1b_shaped.py has no --device option: the 1B-shaped check cannot run on CUDA"
    return 2
  fi
  # shellcheck disable=SC2054 # the commas are popc's list syntax
  llama1b --repeats 3 --batches 1,4 --json "$OUT/bench-llama1b.json" --markdown "$WORK/llama1b.md"
}

do_summary() {
  "$PY" - "$OUT" "$L1B_LAYERS" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, layers = Path(sys.argv[1]), sys.argv[2]
lines = ["# popc GPU check", "", "| stage | status | s | note |", "|---|---|---|---|"]
for row in (out / "stages.tsv").read_text().splitlines()[1:]:
    lines.append("| " + " | ".join((row.split("\t") + ["", "", "", ""])[:4]) + " |")

def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None

doctor = load("doctor.json")
if doctor:
    build = doctor.get("build") or {}
    lines += ["", f"op library: cuda={doctor.get('cuda')} ({doctor.get('cuda_majors')}); "
              f"archs {build.get('cuda_architectures')}; cuda_error {build.get('cuda_error')}; "
              f"cuda_problem {doctor.get('cuda_problem')}"]
greedy = "not run"
try:
    root = ET.parse(out / "pytest.xml").getroot()
    suites = list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k) or 0) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    lines += ["", f"pytest -m gpu: {counts}"]
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            lines.append(f"- FAILED {name}: {(bad.get('message') or '')[:200]}")
        elif skipped is not None:
            lines.append(f"- skipped {name}: {(skipped.get('message') or '')[:200]}")
        if "greedy" in name.lower() and "smollm" in name.lower():
            greedy = "FAILED" if bad is not None else "skipped" if skipped is not None else "passed"
except (OSError, ET.ParseError):
    lines += ["", "pytest -m gpu: no pytest.xml"]

def decode(data, variant, sparsity, batch):
    for row in (data or {}).get("decode", []):
        if (row.get("variant"), float(row.get("sparsity", -1)), int(row.get("batch", -1))) == (variant, sparsity, batch):
            return row
    return None

def verdict(ok):
    return "n/a" if ok is None else "MET" if ok else "MISSED"

targets = ["", "| target | measured | verdict |", "|---|---|---|"]
smol = load("bench-smollm2.json")
dense, genai = decode(smol, "dense-ort", 0.0, 1), decode(smol, "ort-genai", 0.0, 1)
dtype = ((smol or {}).get("settings") or {}).get("dtype") or "float16"  # a bench that records none: as asked
ratio = None
if dense and genai:
    ratio = genai.get("speedup") or dense["ms_per_step"]["median"] / genai["ms_per_step"]["median"]
    measured = f"{dense['ms_per_step']['median']:.3f} vs {genai['ms_per_step']['median']:.3f} ms/token: {ratio:.3f}x ({dtype})"
else:
    measured = "no dense-ort / ort-genai batch-1 rows"
ok = None if ratio is None or dtype != "float16" else ratio <= 1.0
targets.append(f"| SmolLM2 fp16 dense decode <= 1.0x genai CUDA fp16 (b1) | {measured} | {verdict(ok)} |")
for batch in (1, 4):
    row = decode(smol, "pop-oplib", 0.5, batch)
    if row and row.get("speedup"):
        targets.append(f"| (SmolLM2 POP 50% decode vs dense, b{batch}, {dtype}) | {row['speedup']:.3f}x | info |")
l1b = load("bench-llama1b.json")
for batch, floor in ((1, 1.15), (4, 1.0)):
    row = decode(l1b, "pop-oplib", 0.5, batch)
    speedup = row.get("speedup") if row else None
    measured = f"{speedup:.3f}x ({layers} layers)" if speedup else "no pop-oplib 0.5 row"
    targets.append(f"| 1B-shaped POP 50% decode >= {floor}x dense (b{batch}) | {measured} | {verdict(None if not speedup else speedup >= floor)} |")
targets.append(f"| SmolLM2 fp16 greedy 32 tokens == transformers' | test {greedy} | {verdict(None if greedy in ('not run', 'skipped') else greedy == 'passed')} |")
text = "\n".join(lines + targets) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
}

# Nvidia's libraries that the image's torch brought (cuBLAS, cuDNN, cuRAND, cudart of CUDA 13):
# onnxruntime-gpu's CUDA provider loads them by soname.
nvidia_library_path() {
  "$PY" - <<'EOF'
import glob, os, site, sys
dirs = []
for base in [*site.getsitepackages(), *sys.path]:
    for lib in sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib"))):
        if os.path.isdir(lib) and lib not in dirs:
            dirs.append(lib)
print(":".join(dirs))
EOF
}

# The environment of every stage, set once (a full run's, or one stage's: OUT=DIR bash
# gpu_check.sh --do NAME): popc and the carried packages before the image's; PYTHONSAFEPATH
# keeps the tree's own popc/ (no templates/ inside) off sys.path when the current directory
# is the tree (pytest runs there).
if [[ -z ${POPC_GPU_CHECK_ENV:-} ]]; then
  export POPC_GPU_CHECK_ENV=1
  export PYTHONPATH=$SITE/popc-src:$SITE${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONSAFEPATH=1
  export PATH=$SITE/bin:$PATH
  export POPC_CACHE_DIR=$WORK/cache
  export POPC_ORT_INCLUDE_DIR=$WORK/ort-headers/onnxruntime
  export POPC_CUDA_ARCHITECTURES=90  # the H200's only: a fraction of the default's build time
  unset POPC_OPLIB
  NVIDIA_LIBS=$(nvidia_library_path)
  export LD_LIBRARY_PATH=${NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STAGES"; echo "[$1] $2 ${4:-}"; }
skip() { record "$1" skipped 0 "$2"; }

# stage NAME CAP: `--do NAME` under timeout min(CAP, what is left of the budget); 0 if it passed.
limit_for() {
  local left=$(( BUDGET - (SECONDS - START) ))
  echo $(( $1 < left ? $1 : left ))
}

finished() {  # NAME RC SECONDS LIMIT
  if (( $2 == 0 )); then record "$1" ok "$3" ""
  elif (( $2 == 124 || $2 == 137 )); then record "$1" timeout "$3" "stopped after ${4}s"
  else record "$1" failed "$3" "exit $2: $(grep -v '^\s*$' "$5" | tail -1 | cut -c1-200)"
  fi
}

stage() {
  local name=$1 limit
  limit=$(limit_for "$2")
  if (( limit < 5 )); then skip "$name" "no time left in the ${BUDGET}s budget"; return 1; fi
  echo "=== $name (at most ${limit}s) $(date -u +%T)" >> "$LOG"
  local began=$SECONDS rc
  STAGE_LIMIT=$limit timeout --kill-after=10 "$limit" bash "$REPO/benchmarks/gpu_check.sh" --do "$name" >> "$LOG" 2>&1
  rc=$?
  finished "$name" "$rc" $(( SECONDS - began )) "$limit" "$LOG"
  return $rc
}

# in_background NAME CAP: like stage, but not waited for; its log and exit status land in
# $WORK/NAME.log and .rc, which the stage that needs it waits for (wait_for).
in_background() {
  local name=$1 limit
  limit=$(limit_for "$2")
  rm -f "$WORK/$name.rc"
  echo "=== $name in the background (at most ${limit}s) $(date -u +%T): its log comes with the stage that waits for it" >> "$LOG"
  (
    began=$SECONDS
    timeout --kill-after=10 "$limit" bash "$REPO/benchmarks/gpu_check.sh" --do "$name" > "$WORK/$name.log" 2>&1 &
    echo $! > "$WORK/$name.pid"
    wait $!
    rc=$?
    rm -f "$WORK/$name.pid"
    finished "$name" "$rc" $(( SECONDS - began )) "$limit" "$WORK/$name.log" > /dev/null
    echo "$rc" > "$WORK/$name.rc"
  ) &
}

# begin_run OUT_DIR: the results directory, its log and stage table, the budget's clock.
begin_run() {
  export OUT=$1
  mkdir -p "$OUT" "$WORK"
  OUT=$(cd "$OUT" && pwd)
  LOG=$OUT/check.log
  STAGES=$OUT/stages.tsv
  : > "$LOG"
  printf 'stage\tstatus\tseconds\tnote\n' > "$STAGES"
  START=$SECONDS
}

# The whole check: OUT_DIR gets the results (see the top of this file).
main() {
  begin_run "${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}"
  stage join 60 && joined=1 || joined=0
  if (( joined )); then stage install 120 && installed=1 || installed=0
  else skip install "the carried files did not join"; installed=0; fi
  stage probe 60 && gpu=1 || gpu=0
  if (( gpu )); then
    in_background prewarm_smollm2 300
    in_background prewarm_llama1b 360
    stage build 150
    stage pytest 240
    stage bench_smollm2 150
    stage bench_llama1b 600
  else
    for name in build pytest bench_smollm2 bench_llama1b; do skip "$name" "no working CUDA execution provider (probe)"; done
  fi
  for pid in "$WORK"/*.pid; do  # a background job nothing waited for: stop it (timeout passes TERM on)
    [[ -e $pid ]] && kill -TERM "$(cat "$pid")" 2> /dev/null
    rm -f "$pid"
  done
  wait
  not_ok=$(sed 1d "$STAGES" | cut -f2 | grep -cv '^ok$')
  record total "$( (( not_ok == 0 )) && echo ok || echo "$not_ok not ok")" "$(( SECONDS - START ))" "installed=$installed gpu=$gpu"
  bash "$REPO/benchmarks/gpu_check.sh" --do summary 2>> "$LOG"
  (( not_ok == 0 ))
}

# `bash gpu_check.sh OUT_DIR` runs the check, `--do NAME` one stage; sourced, it only defines.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  if [[ ${1:-} == --do ]]; then
    : "${OUT:?set OUT to the results directory}"
    "do_$2"
    exit $?
  fi
  main "$@"
fi
