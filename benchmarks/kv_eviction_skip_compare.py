"""What POP-prefill costs under KV eviction: ``popc eval --long-context`` results of exports
with ``--prefill-skip N`` against the same export without it, prompt by prompt.

    python benchmarks/kv_eviction_skip_compare.py BASE.json SKIP4.json [SKIP8.json ...] \
        --labels 0,4,8 --markdown out.md

Every JSON is one ``popc eval --long-context --json`` run over the same prompts. For each
method and budget: passkey accuracy %, the geometric-mean continuation perplexity, and the
paired NLL difference against the first file (nats/token, mean ± 95 % over the prefixes).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def settings_of(run: dict) -> list[tuple[str, float]]:
    seen = []
    for row in run["ppl"][0]["rows"]:
        key = (row["method"], row["budget"])
        if key not in seen:
            seen.append(key)
    return seen


def passkey(run: dict, key: tuple[str, float]) -> float:
    hits = [row["value"]["correct"] for item in run["passkey"] for row in item["rows"] if (row["method"], row["budget"]) == key]
    return 100 * sum(hits) / len(hits)


def nlls(run: dict, key: tuple[str, float]) -> list[float]:
    return [row["value"] for item in run["ppl"] for row in item["rows"] if (row["method"], row["budget"]) == key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", help="comma-separated skipped-layer counts, one per run")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.runs]
    labels = args.labels.split(",") if args.labels else [path.stem for path in args.runs]
    base = runs[0]
    lines = [
        f"# KV eviction with POP-prefill: {base['model']}",
        "",
        "Passkey % / continuation perplexity (geometric mean), and the paired NLL difference "
        "against the export without the skip (nats/token, mean ± 95 % over the prefixes; "
        "positive = worse). Runs: " + ", ".join(f"{a} ({r['date']})" for a, r in zip(labels, runs)) + ".",
        "",
        "| skipped layers | " + " | ".join(f"{m} {b:g}" for m, b in settings_of(base)) + " |",
        "|---" * (1 + len(settings_of(base))) + "|",
    ]
    for label, run in zip(labels, runs):
        cells = []
        for key in settings_of(base):
            values = nlls(run, key)
            cell = f"{passkey(run, key):.0f} / {math.exp(statistics.fmean(values)):.2f}"
            if run is not base:
                diffs = [a - b for a, b in zip(values, nlls(base, key), strict=True)]
                spread = 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
                cell += f" ({statistics.fmean(diffs):+.3f} ± {spread:.3f})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    if args.markdown:
        args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
