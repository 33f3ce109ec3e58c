"""POP-prefill with KV eviction: prefill time and decode speed of ``--kv-evict`` exports with
and without ``--prefill-skip N``, measured side by side in one process.

    python benchmarks/kv_eviction_prefill_skip.py BASE_DIR SKIP_DIR [SKIP_DIR ...] \
        --lengths 1024,2048,4096 --budgets 1,0.05 --repeats 5 --threads 2 \
        --json out.json --markdown out.md

Every directory is an eviction export of the same model; the first is the baseline of the
ratio columns. Prompts are prefixes of the held text. Prefill: per round every export runs
every length once (interleaved, so that drift hits them alike), median over rounds. Decode:
after one prefill at the longest length, per round every export evicts under each budget
(LaProx; 1 = the full cache) and decodes ``--decode-tokens`` greedy tokens, median ms/token.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directories", nargs="+")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--budgets", default="1,0.05")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    import popc
    from popc import longcontext
    from popc.bench.machine import machine_info
    from popc.kv_eviction import EvictionSettings, parse_budget

    lengths = [int(n) for n in args.lengths.split(",")]
    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    models = [popc.load(d, threads=args.threads) for d in args.directories]
    text = longcontext.held_text()
    prompts = {n: longcontext.continuation_items(models[0].tokenizer, text, n, 1, 1)[0].prefix for n in lengths}
    longest = max(lengths)
    steppers = [m.bound(capacity=longest + args.decode_tokens + 1) for m in models]

    def prefill(stepper, n: int) -> float:
        stepper.run_prompt(np.array([prompts[n]], np.int64), np.ones((1, n), np.int64))
        return stepper.prompt.seconds

    for stepper in steppers:  # warm-up
        prefill(stepper, lengths[0])
    prefills = {(i, n): [] for i in range(len(models)) for n in lengths}
    for _ in range(args.repeats):
        for n in lengths:
            for index, stepper in enumerate(steppers):
                prefills[index, n].append(prefill(stepper, n))

    settings = [EvictionSettings(method="full") if b == 1.0 else EvictionSettings(budget=b) for b in budgets]
    decodes = {(i, j): [] for i in range(len(models)) for j in range(len(settings))}
    for stepper in steppers:
        prefill(stepper, longest)
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for index, stepper in enumerate(steppers):
            for j, setting in enumerate(settings):
                stepper.apply(setting)
                token = int(np.argmax(stepper.prompt.logits[0, -1]))
                started = time.perf_counter()
                for _ in range(args.decode_tokens):
                    stepper.decode(np.array([[token]], np.int64), copy=False, logits=False)
                    token = int(stepper.greedy()[0])
                if round_:
                    decodes[index, j].append(1000 * (time.perf_counter() - started) / args.decode_tokens)

    rows = []
    for index, (directory, model) in enumerate(zip(args.directories, models)):
        skip = model.config.get("prefill_skip") or {}
        row = {"export": Path(directory).name, "prefill_skip": skip.get("layers", 0)}
        for n in lengths:
            median = statistics.median(prefills[index, n])
            row[f"prefill_s_{n}"] = median
            row[f"prefill_speedup_{n}"] = statistics.median(prefills[0, n]) / median
        for j, setting in enumerate(settings):
            median = statistics.median(decodes[index, j])
            row[f"decode_ms_{setting.budget:g}"] = median
            row[f"decode_vs_base_{setting.budget:g}"] = statistics.median(decodes[0, j]) / median
        rows.append(row)
    result = {
        "machine": asdict(machine_info(args.threads, "cpu")),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "repeats": args.repeats, "decode_tokens": args.decode_tokens, "lengths": lengths,
        "budgets": budgets, "rows": rows,
    }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)


def markdown(result: dict) -> str:
    machine, lengths, budgets = result["machine"], result["lengths"], result["budgets"]
    lines = [
        "# KV eviction with POP-prefill: prefill and decode, side by side",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('threads')} threads, onnxruntime {machine.get('onnxruntime')}. "
        f"Date: {result['date']}. Medians of {result['repeats']} interleaved rounds; ratios against the first "
        f"export in the same run. Decode: {result['decode_tokens']} greedy tokens after a {max(lengths)}-token "
        "prompt, LaProx at each budget (1 = the full cache).",
        "",
        "| export | " + " | ".join(f"prefill {n} s" for n in lengths) + " | "
        + " | ".join(f"decode ms/token, budget {b:g}" for b in budgets) + " |",
        "|---" * (1 + len(lengths) + len(budgets)) + "|",
    ]
    for row in result["rows"]:
        cells = [f"{row[f'prefill_s_{n}']:.2f} ({row[f'prefill_speedup_{n}']:.2f}x)" for n in lengths]
        cells += [f"{row[f'decode_ms_{b:g}']:.1f} ({row[f'decode_vs_base_{b:g}']:.2f}x)" for b in budgets]
        lines.append(f"| {row['export']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
