"""Sweep POP-online's regions at each decode sparsity and pick popc's defaults.

For every sparsity s (budget b = 1 - s retained + kept channels), tries retain
r in {0, b/4, b/2, 3b/4} and candidate pools r + c in {b + (1-b)/4, b + (1-b)/2,
b + 3(1-b)/4, 1}, measures continuation perplexity (decode mode, as `popc eval`)
and the FFN weight bytes one decode step reads, and prints a table.

    python benchmarks/choose_defaults.py DIR [--windows 8] [--json OUT]

DIR is a POP export (any defaults: the regions are a graph input).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from rich.console import Console
from rich.table import Table

import popc
from popc.datasets import default_text_path
from popc.eval import continuation_logprobs, make_windows, special_prefix, weight_fraction
from popc.pop import PopSettings


def grid(sparsity: float, quick: bool = False) -> list[PopSettings]:
    """``quick``: only r in {0, b/4} and pools {b + 3(1-b)/4, 1} (the defaults and their neighbours)."""
    budget = 1.0 - sparsity
    retains = (0.0, budget / 4) if quick else (0.0, budget / 4, budget / 2, 3 * budget / 4)
    fractions = (0.75, 1.0) if quick else (0.25, 0.5, 0.75, 1.0)
    settings = []
    for retain in retains:
        for pool in (budget + f * (1 - budget) for f in fractions):
            settings.append(PopSettings(retain=round(retain, 4), candidate=round(pool - retain, 4), keep=round(budget - retain, 4)))
    return settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--sparsities", default="0.25,0.5,0.75")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true", help="4 settings per sparsity instead of 16")
    args = parser.parse_args()

    model = popc.load(args.directory)
    ids = model.tokenizer(default_text_path().read_text())["input_ids"]
    windows = make_windows(ids, special_prefix(model.tokenizer), args.window, args.windows)
    prompt = args.window // 2
    console = Console()

    def perplexity(settings: PopSettings) -> float:
        return float(np.exp(-continuation_logprobs(model, windows, prompt, settings).mean()))

    results = [{"sparsity": 0.0, "retain": 1.0, "candidate": 0.0, "keep": 0.0, "bytes": 1.0,
                "ppl": perplexity(PopSettings(retain=1.0))}]  # fmt: skip
    console.print(f"dense ppl {results[0]['ppl']:.2f}")
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        for settings in grid(sparsity, args.quick):
            started = time.perf_counter()
            row = {"sparsity": sparsity, "retain": settings.retain, "candidate": settings.candidate,
                   "keep": settings.keep, "bytes": weight_fraction(settings), "ppl": perplexity(settings)}  # fmt: skip
            results.append(row)
            console.print(f"s={sparsity} r={settings.retain:.3f} c={settings.candidate:.3f} k={settings.keep:.3f} "
                          f"bytes={row['bytes']:.3f} ppl={row['ppl']:.2f} ({time.perf_counter() - started:.0f} s)")  # fmt: skip

    table = Table(title=f"POP regions sweep, {args.directory} ({args.windows} x {args.window}-token windows)")
    for column in ("sparsity", "retain", "candidate", "keep", "FFN bytes", "ppl"):
        table.add_column(column, justify="right")
    for row in results:
        table.add_row(*(f"{row[k]:.3f}" for k in ("sparsity", "retain", "candidate", "keep", "bytes")), f"{row['ppl']:.2f}")
    console.print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"windows": args.windows, "window": args.window, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
