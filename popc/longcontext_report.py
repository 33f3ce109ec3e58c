"""Tables and a plot of a long-context run (popc.eval_longcontext, or the PyTorch
reference benchmark ``benchmarks/kv_eviction_reference.py``, which write the same JSON).

The JSON: ``passkey`` prompts (``length``, ``depth``, ``prefill_s``, ``rows``) and ``ppl``
prefixes (``prefix``, ``prefill_s``, ``rows``), each row ``{method, budget, value, evict_s,
kept, full}`` with value ``{"correct": bool, "text": str}`` (passkey) or a mean NLL (ppl).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.5)


def budgets_of(result: dict[str, Any]) -> list[float]:
    found = {r["budget"] for p in result["passkey"] + result["ppl"] for r in p["rows"]}
    return [1.0, *sorted(b for b in found if b != 1.0)]


def methods_of(result: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["method"] for p in result["passkey"] + result["ppl"] for r in p["rows"]))


def hits(prompts: list[dict], method: str, budget: float) -> list[bool]:
    return [r["value"]["correct"] for p in prompts for r in p["rows"] if r["method"] == method and r["budget"] == budget]


def perplexity(result: dict[str, Any], method: str, budget: float) -> float | None:
    """The geometric mean over prefixes of the continuation perplexity."""
    nll = [r["value"] for p in result["ppl"] for r in p["rows"] if r["method"] == method and r["budget"] == budget]
    return math.exp(statistics.mean(nll)) if nll else None


def _table_head(columns: list[str]) -> list[str]:
    return ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]


def _passkey_rows(prompts: list[dict], methods: list[str], budgets: list[float], cell) -> list[str]:  # noqa: ANN001
    """One table row per method: ``cell(hits)`` per budget (blank where not measured)."""
    rows = []
    for method in methods:
        cells = [hits(prompts, method, budget) for budget in budgets]
        rows.append(f"| {method} | " + " | ".join(cell(found) if found else "" for found in cells) + " |")
    return rows


def markdown(result: dict[str, Any], title: str, source: str) -> str:
    """The passkey, perplexity and eviction-cost tables."""
    methods, budgets = methods_of(result), budgets_of(result)
    evictable = result.get("evictable_layers")
    lines = [
        f"# {title}: {result['model']}",
        "",
        f"Machine: {result['machine']}. Date: {result['date']}. Sinks {result['sinks']}, observation window "
        f"{result['window']} (both always kept); budget = fraction of prompt x {evictable} evictable layers "
        f"(of {result['layers']}), whole cache. {source}, one prefill per prompt for every method and budget.",
        "",
    ]
    header = _table_head([f"{b:g}" for b in budgets])
    prompts = result["passkey"]
    if prompts:
        lengths = sorted({p["length"] for p in prompts})
        lines += [
            f"## Passkey retrieval: accuracy % (n = {len(prompts)} prompts: lengths {lengths}, "
            f"depths {sorted({p['depth'] for p in prompts})})",
            "",
            *header,
        ]
        lines += _passkey_rows(prompts, methods, budgets, lambda found: f"{100 * sum(found) / len(found):.0f} ({len(found)})")
        for length in lengths:
            subset = [p for p in prompts if p["length"] == length]
            lines += ["", f"{length} tokens (n = {len(subset)}): correct / n", "", *header]
            lines += _passkey_rows(subset, methods, budgets, lambda found: f"{sum(found)}/{len(found)}")
        lines.append("")
    if result["ppl"]:
        lines += [
            f"## Continuation perplexity of the next tokens (n = {len(result['ppl'])} prefixes: "
            f"{[p['prefix'] for p in result['ppl']]} tokens); geometric mean over prefixes",
            "",
            *header,
        ]
        for method in methods:
            values = [perplexity(result, method, budget) for budget in budgets]
            lines.append(f"| {method} | " + " | ".join("" if v is None else f"{v:.2f}" for v in values) + " |")
        lines.append("")
        lines += _paired_rows(result, methods, budgets[1:])
    every = prompts + result["ppl"]
    if every:
        lines += _cost_rows(every, methods)
    return "\n".join(lines)


def _paired_rows(result: dict[str, Any], methods: list[str], budgets: list[float], base: str = "laprox") -> list[str]:
    """LaProx's continuation NLL minus each other method's on the same prefixes, per budget:
    mean and 95 % interval (t, n - 1). The geometric means above can hide a tie, or one prefix."""
    others = [m for m in methods if m not in ("full", base)]
    if base not in methods or not others or len(result["ppl"]) < 2:
        return []
    lines = [
        f"Paired: {base}'s NLL minus each method's (nats/token, mean ± 95 % over the {len(result['ppl'])} prefixes; "
        f"negative = {base} better)",
        "",
        *_table_head([f"{b:g}" for b in budgets]),
    ]
    for method in others:
        cells = []
        for budget in budgets:
            diffs = []
            for prefix in result["ppl"]:
                values = {(r["method"], r["budget"]): r["value"] for r in prefix["rows"]}
                if (base, budget) in values and (method, budget) in values:
                    diffs.append(values[(base, budget)] - values[(method, budget)])
            cells.append(_mean_interval(diffs) if len(diffs) > 1 else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


# Student's t, two-sided 95 %, for 1..20 degrees of freedom (a handful of prefixes); 1.96 beyond.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
       2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)  # fmt: skip


def _mean_interval(values: list[float]) -> str:
    freedom = len(values) - 1
    t = T95[freedom - 1] if freedom <= len(T95) else 1.96
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):+.3f} ± {half:.3f}"


def _cost_rows(prompts: list[dict], methods: list[str]) -> list[str]:
    """Eviction seconds / prefill seconds, median per prompt length and method."""
    lengths = sorted({p.get("length", p.get("prefix")) for p in prompts})
    lines = [
        "## Eviction cost (scores + selection + compaction) / prefill, median over prompts and budgets",
        "",
        *_table_head([f"{n} tokens" for n in lengths]),
    ]
    for method in methods:
        cells = []
        for length in lengths:
            ratios = [
                r["evict_s"] / p["prefill_s"] for p in prompts if p.get("length", p.get("prefix")) == length
                for r in p["rows"] if r["method"] == method and r["budget"] != 1.0
            ]  # fmt: skip
            cells.append(f"{100 * statistics.median(ratios):.1f} % ({len(ratios)})" if ratios else "")
        if any(cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    prefill: dict[int, list[float]] = {}
    for p in prompts:
        prefill.setdefault(p.get("length", p.get("prefix")), []).append(p["prefill_s"])
    lines.append(
        "| prefill s (median) | " + " | ".join(f"{statistics.median(prefill[n]):.1f}" for n in lengths) + " |"
    )
    return [*lines, ""]


def plot(result: dict[str, Any], path: Path, title: str) -> None:
    """Passkey accuracy and continuation perplexity against the budget, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    methods = [m for m in methods_of(result) if m != "full"]
    budgets = [b for b in budgets_of(result) if b != 1.0]
    panels = [("passkey", "passkey accuracy (%)")] * bool(result["passkey"]) + [("ppl", "continuation perplexity")] * bool(
        result["ppl"]
    )
    figure, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 4), squeeze=False)
    for axis, (kind, label) in zip(axes[0], panels):
        for method in methods:
            if kind == "passkey":
                values = [hits(result["passkey"], method, b) for b in budgets]
                ys = [100 * sum(v) / len(v) if v else math.nan for v in values]
            else:
                ys = [perplexity(result, method, b) or math.nan for b in budgets]
            axis.plot(budgets, ys, marker="o", label=method)
        full = hits(result["passkey"], "full", 1.0) if kind == "passkey" else None
        reference = (100 * sum(full) / len(full) if full else None) if kind == "passkey" else perplexity(result, "full", 1.0)
        if reference is not None:
            axis.axhline(reference, color="black", linestyle="--", linewidth=1, label="full cache")
        axis.set_xscale("log")
        axis.set_xticks(budgets, [f"{b:g}" for b in budgets])
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("KV budget (fraction of the prompt)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{title}: {result['model']}, {result['date'][:10]} ({result['machine'].split(',')[0]})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
