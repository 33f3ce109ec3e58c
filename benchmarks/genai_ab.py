"""Graph vs driver: popc's and onnxruntime-genai's graphs, each run by each runtime.

    python benchmarks/genai_ab.py POPC_DENSE_DIR GENAI_DIR [--rounds 12] [--threads 2] [--batch 1] [--out FILE.md]

POPC_DENSE_DIR is a fused dense popc export (it carries genai_config.json); GENAI_DIR is
onnxruntime-genai's model builder output for the same model (``popc bench`` caches one
under $POPC_CACHE_DIR/bench/genai-*). Four batch-1 decode loops (32 greedy steps after a
64-token prompt), timed round-robin over ``--rounds`` rounds so the host's drift hits all
alike; each is reported as the median ms/token and as the median of its per-round ratio
to genai-runtime-on-genai-graph (paired: the drift cancels). The genai graph runs in
popc's runtime through a copy of popc's popc.json beside hard links to its files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

import popc

STEPS, PROMPT = 32, 64


def genai_loop(directory: Path, threads: int, batch: int):
    config = og.Config(str(directory))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    ids = np.random.default_rng(0).integers(10, 40000, (batch, PROMPT)).astype(np.int32)

    def run() -> float:
        params = og.GeneratorParams(model)
        length = PROMPT + STEPS + 1
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=batch)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        start = time.perf_counter()
        for _ in range(STEPS):
            generator.generate_next_token()
        return (time.perf_counter() - start) * 1000 / STEPS

    return run


def popc_loop(directory: Path, threads: int, batch: int):
    model = popc.load(directory, threads=threads)
    ids = np.random.default_rng(0).integers(10, 40000, (batch, PROMPT))

    def run() -> float:
        stepper = model.bound(capacity=PROMPT + STEPS + 1)
        logits = stepper.prefill(ids, np.ones_like(ids))
        start = time.perf_counter()
        for _ in range(STEPS):
            logits = stepper.decode(logits[:, -1].argmax(-1).reshape(batch, 1), copy=False)
        return (time.perf_counter() - start) * 1000 / STEPS

    return run


def as_popc_export(genai_dir: Path, popc_dir: Path, into: Path) -> Path:
    """The genai graph with popc's popc.json (same inputs/outputs), as hard links."""
    into.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        os.link(genai_dir / name, into / name)
    for path in popc_dir.glob("tokenizer*"):
        shutil.copy(path, into)
    shutil.copy(popc_dir / "popc.json", into)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("popc_dense", type=Path)
    parser.add_argument("genai", type=Path)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.genai.parent) as tmp:
        genai_as_popc = as_popc_export(args.genai, args.popc_dense, Path(tmp) / "genai-as-popc")
        jobs = {
            "genai runtime, genai graph": genai_loop(args.genai, args.threads, args.batch),
            "genai runtime, popc graph": genai_loop(args.popc_dense, args.threads, args.batch),
            "popc runtime, popc graph": popc_loop(args.popc_dense, args.threads, args.batch),
            "popc runtime, genai graph": popc_loop(genai_as_popc, args.threads, args.batch),
        }
        for run in jobs.values():
            run()  # warm-up
        samples: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(args.rounds):
            for name, run in jobs.items():
                time.sleep(0.2)
                samples[name].append(run())
    base = np.array(samples["genai runtime, genai graph"])
    lines = [
        f"Batch-{args.batch} decode, {STEPS} steps after a {PROMPT}-token prompt, {args.threads} threads, "
        f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| runtime, graph | ms/token (median, min–max) | paired ratio to genai/genai |",
        "|---|---|---|",
    ]
    for name, values in samples.items():
        ratio = float(np.median(np.array(values) / base))
        lines.append(f"| {name} | {np.median(values):.2f} ({min(values):.1f}–{max(values):.1f}) | {ratio:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
