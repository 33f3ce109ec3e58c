"""ONNX Runtime profile of batch-1 decode steps: where each export's time goes, by op type.

    python benchmarks/profile_decode.py DENSE_DIR POP_DIR [--sparsity 0.5] [--steps 32] [--threads N] [--out FILE.md]

Runs a 64-token prefill, then profiles `--steps` decode steps of the dense export and of the
POP export (op library and function bodies) with SessionOptions.enable_profiling, and
prints a Markdown table of kernel time per step by op type (top 15). Kernel times of an
`If` include the nodes of its branch, which are listed too.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import popc
from popc.defaults import settings_for_sparsity
from popc.oplib import register_library


def profile(directory: Path, use_oplib: bool, sparsity: float, steps: int, threads: int | None) -> dict:
    model = popc.load(directory, use_oplib=use_oplib, threads=threads)
    pop = settings_for_sparsity(sparsity) if model.has_pop_config else None
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if use_oplib:
            register_library(options)
        model.session = ort.InferenceSession(str(model.location.model_path), options, providers=["CPUExecutionProvider"])
        ids = np.random.default_rng(0).integers(10, 40000, (1, 64))
        stepper = model.bound(pop)
        logits = stepper.prefill(ids, np.ones_like(ids))
        for _ in range(steps):
            logits = stepper.decode(logits[:, -1].argmax(-1).reshape(1, 1))
        events = json.loads(Path(model.session.end_profiling()).read_text())
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][1:]
    by_op: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    skip_prefill = True
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            skip_prefill = False  # the first model_run event closes the prefill
            continue
        if skip_prefill or event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"].get("op_name", "?")
        by_op[op] += event["dur"]
        calls[op] += 1
    n = max(len(runs), 1)
    return {
        "run_us": float(np.median(runs)) if runs else None,
        "ops": {op: (us / n, calls[op] / n) for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense", type=Path)
    parser.add_argument("pop", type=Path)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = []
    for label, directory, oplib in (
        ("dense ORT", args.dense, False),
        (f"POP {args.sparsity:.0%} (op library)", args.pop, True),
        (f"POP {args.sparsity:.0%} (function bodies)", args.pop, False),
    ):
        result = profile(directory, oplib, args.sparsity, args.steps, args.threads)
        lines += [f"### {label}: median step {result['run_us'] / 1000:.1f} ms", "", "| op | µs/step | calls/step |", "|---|---|---|"]
        for op, (us, count) in list(result["ops"].items())[: args.top]:
            lines.append(f"| {op} | {us:.0f} | {count:.0f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
