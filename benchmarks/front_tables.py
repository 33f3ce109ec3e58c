"""Markdown tables from ``popc eval --sweep --json`` files (for docs/results.md and the README).

    python benchmarks/front_tables.py front-smollm2.json [front-gemma3.json ...] [--plot]

One table per file: every row with its split, FFN bytes, decode ms/token, perplexity
(95 % interval), KL to dense (mean ± 95 %, median, p99), top-1 agreement and the fronts it
is on, and where the JSON has per-window numbers, each row's KL minus that of per-token
dynamic selection at the same FFN bytes, paired over windows (mean ± 95 %). ``--plot``
draws each file's front again (``popc.sweep.sweep_plot``) as ``<file>.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from popc.fidelity import paired_difference


def label(row: dict) -> str:
    if row["method"] == "dense":
        return "dense"
    score = "static" if row["static"] else row["score"]
    if row["method"] == "split":
        kind = "per-token dynamic" if is_dynamic(row) else "POP"
        return f"{kind} ({score})"
    return f"{row['title']}"


def is_dynamic(row: dict) -> bool:
    return row["method"] != "dense" and row["retain"] == 0 and row["candidate"] >= 0.999


def versus_dynamic(row: dict, rows: list[dict]) -> str:
    """KL(row) - KL(dynamic at the same bytes), paired over windows."""
    peer = [r for r in rows if is_dynamic(r) and abs(r["weight_fraction"] - row["weight_fraction"]) < 1e-3]
    if not peer or is_dynamic(row) or row["method"] == "dense" or not row["fidelity"].get("kl_windows"):
        return ""
    mean, half = paired_difference(row["fidelity"]["kl_windows"], peer[0]["fidelity"]["kl_windows"])
    return f"{mean:+.4f} ± {half:.4f}"


def table(data: dict) -> str:
    lines = [
        "| row | r / c / k | FFN bytes | ms/token | ppl (95 %) | KL mean ± 95 % | KL − dynamic (paired) | KL median | KL p99 | top-1 | front |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(data["rows"], key=lambda r: (-round(r["weight_fraction"], 4), r["fidelity"]["kl_mean"])):
        f = row["fidelity"]
        split = "dense" if row["method"] == "dense" else f"{row['retain']:.3g} / {row['candidate']:.3g} / {row['keep']:.3g}"
        ms = "" if row["ms_per_token"] is None else f"{row['ms_per_token']:.1f}"
        lines.append(
            f"| {label(row)} | {split} | {row['weight_fraction']:.3f} | {ms} | {f['ppl']:.2f} ({f['ppl_low']:.2f}–{f['ppl_high']:.2f}) "
            f"| {f['kl_mean']:.4f} ± {f['kl_ci']:.4f} | {versus_dynamic(row, data['rows'])} | {f['kl_median']:.4f} | {f['kl_p99']:.3f} | {f['top1']:.3f} "
            f"| {', '.join(row['front'])} |"
        )
    return "\n".join(lines)


def replot(path: Path) -> None:
    """The sweep's plot from its JSON, with today's plotting code."""
    from popc.eval import EvalResult, EvalRow
    from popc.fidelity import Fidelity
    from popc.pop import PopSettings
    from popc.sweep import sweep_plot

    data = json.loads(path.read_text())
    rows = []
    for r in data["rows"]:
        settings = PopSettings(r["retain"], r["candidate"], r["keep"], r["static"], r["score"])
        row = EvalRow(r["method"], r["sparsity"], settings, r["weight_fraction"])
        row.fidelity, row.ms_per_token, row.front = Fidelity(**r["fidelity"]), r["ms_per_token"], r["front"]
        rows.append(row)
    sweep_plot(EvalResult(rows, data), path.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--plot", action="store_true", help="also draw each file's front as <file>.png")
    args = parser.parse_args()
    for path in args.files:
        if args.plot:
            replot(path)
        data = json.loads(path.read_text())
        print(f"### {data['source'] or data['export']}\n")
        print(f"{data['scored_tokens']} scored tokens ({data['windows']} windows of {data['window']}, prompt "
              f"{data['prompt']}) of {Path(data['text']).name}; {data['machine']}.\n")  # fmt: skip
        print(table(data) + "\n")


if __name__ == "__main__":
    main()
