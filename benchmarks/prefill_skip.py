"""Time-to-first-token of POP-prefill exports vs dense, with ONNX Runtime.

    python benchmarks/prefill_skip.py DENSE_DIR SKIP_DIR [SKIP_DIR ...] \
        --prompt-tokens 512 --runs 5 --json out.json

For each export: one warm-up prefill, then ``--runs`` prefills of the same
``--prompt-tokens`` prompt (text from lee_background.cor), in interleaved rounds
(every export once per round), median wall time; then
``--decode`` greedy decode steps after one prefill (one export at a time), median ms/token. The first
directory is the baseline for the speedup column. The machine's load average is
recorded over the runs: on a shared machine, say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu})"


def prompt_ids(model, count: int, text: str | None) -> list[int]:
    from popc.datasets import default_text_path

    body = Path(text).read_text() if text else default_text_path().read_text()
    ids = model.tokenizer(body)["input_ids"]
    if len(ids) < count:
        raise SystemExit(f"the text has only {len(ids)} tokens")
    return [int(i) for i in ids[:count]]


def measure_all(directories: list[str], tokens: int, runs: int, decode: int, text: str | None) -> list[dict]:
    """Interleaved rounds (each round times every export once), so that load changes on a
    shared machine hit every export alike."""
    import popc

    models = [popc.load(d) for d in directories]
    ids = np.array([prompt_ids(models[0], tokens, text)], np.int64)
    mask = np.ones_like(ids)
    times: list[list[float]] = [[] for _ in models]
    loads: list[list[float]] = [[] for _ in models]
    for model in models:
        model.step(ids, mask, model.initial_state(1))  # warm-up
    for _ in range(runs):
        for index, model in enumerate(models):
            loads[index].append(os.getloadavg()[0])
            started = time.perf_counter()
            model.step(ids, mask, model.initial_state(1))
            times[index].append(time.perf_counter() - started)
    # Decode one export at a time: interleaving sessions step by step makes each one wait
    # for the previous session's spinning ORT threads (3x slower steps on 2 cores).
    steps: list[list[float]] = [[] for _ in models]
    for index, model in enumerate(models):
        logits, state = model.step(ids, mask, model.initial_state(1))
        step_mask = mask
        for _ in range(decode):
            next_ids = logits[:, -1].argmax(-1)[:, None]
            step_mask = np.concatenate([step_mask, np.ones((1, 1), np.int64)], axis=1)
            started = time.perf_counter()
            logits, state = model.step(next_ids, step_mask, state)
            steps[index].append(time.perf_counter() - started)
    rows = []
    for index, (directory, model) in enumerate(zip(directories, models)):
        pop = model.config.get("pop") or {}
        rows.append({
            "export": directory,
            "prefill_skip": (model.config.get("prefill_skip") or {}).get("layers"),
            "sparsity": pop.get("sparsity"),
            "num_layers": model.num_layers,
            "prompt_tokens": tokens,
            "ttft_ms_median": 1000 * statistics.median(times[index]),
            "ttft_ms_all": [round(1000 * t, 1) for t in times[index]],
            "decode_ms_per_token_median": 1000 * statistics.median(steps[index]) if steps[index] else None,
            "load_average_min": min(loads[index]),
            "load_average_max": max(loads[index]),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--text")
    parser.add_argument("--json")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    rows = measure_all(args.exports, args.prompt_tokens, args.runs, args.decode, args.text)
    base = rows[0]["ttft_ms_median"]
    table = Table(title=f"TTFT, {args.prompt_tokens}-token prompt, batch 1, median of {args.runs}; {machine()}")
    for name in ("export", "skip N", "TTFT ms", "speedup", "decode ms/tok", "load avg"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(
            Path(row["export"]).name,
            "-" if row["prefill_skip"] is None else f"{row['prefill_skip']}/{row['num_layers']}",
            f"{row['ttft_ms_median']:.0f}",
            f"{base / row['ttft_ms_median']:.2f}x",
            f"{row['decode_ms_per_token_median']:.1f}" if row["decode_ms_per_token_median"] else "-",
            f"{row['load_average_min']:.1f}-{row['load_average_max']:.1f}",
        )
    Console(width=160).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
