"""``popc eval --sweep``: every method over a grid of splits, on the accuracy-vs-cost plane.

Each point is one eval row (:mod:`popc.eval`) placed at two costs: the FFN weight bytes
one decode step reads (:func:`popc.eval.weight_fraction`) and its decode ms/token,
measured in the same run with the op library's kernels (batch 1, after a prompt of the
perplexity text). Its fidelity is its KL divergence to the dense model and its
perplexity (:mod:`popc.fidelity`). The Pareto front (no other point is both cheaper and
closer to dense) is marked, printed and plotted.

The grid, per decode sparsity s (budget b = 1 - s):

* ``pop`` / ``pop-output``: popc's default split (``popc.defaults``); two splits at the
  same FFN bytes that spend them on a larger candidate pool (more gate rows, fewer up/down
  rows); and the default's r and k with a full pool (more bytes). With the paper's score
  and with the output-aware one;
* ``dynamic`` / ``dynamic-output``: per-token top-k over every channel at the *same FFN
  bytes* as the default POP split (so it keeps fewer channels: it reads every gate row),
  and at the same sparsity;
* ``griffin`` and ``static``: the prompt-fixed and weight-magnitude baselines at s.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from popc.errors import PopcError
from popc.pop import PopSettings

# --sweep's own defaults (options given still win): 160 windows x 128 scored tokens = 20k
# tokens, the count at which the KL intervals separate neighbouring splits.
SWEEP_DEFAULTS = {"sparsities": (0.25, 0.5, 0.75), "windows": 160, "tasks": []}
DECODE_STEPS = 32
REPEATS = 5


def _split(retain: float, pool: float, keep: float, score: str = "activation") -> PopSettings:
    retain, pool, keep = (round(v, 6) for v in (retain, pool, keep))
    return PopSettings(retain=retain, candidate=round(pool - retain, 6), keep=keep, score=score)


def _dynamic_keep_for(bytes_fraction: float, gated: bool) -> float:
    """k of per-token dynamic selection (r 0, c 1) reading ``bytes_fraction`` of the FFN."""
    keep = (3 * bytes_fraction - 1) / 2 if gated else 2 * bytes_fraction - 1
    return round(min(max(keep, 1e-3), 1.0), 6)


GRIDS = ("full", "defaults")


def sweep_points(
    sparsities: Sequence[float], methods: Sequence[str], gated: bool = True, grid: str = "full"
) -> list[tuple[str, float, PopSettings]]:
    """``(method, sparsity, settings)`` for every grid point of ``methods`` (see the module doc).

    ``grid="defaults"`` keeps one point per method and sparsity: POP's default split,
    per-token dynamic at its FFN bytes, the baselines at the sparsity (the comparison the
    defaults are held to, cheap enough for 20k tokens on both models)."""
    if grid not in GRIDS:
        raise PopcError(f"--grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    small = grid == "defaults"
    from popc.defaults import default_split
    from popc.eval import weight_fraction

    points: list[tuple[str, float, PopSettings]] = []
    for sparsity in sparsities:
        budget = 1.0 - sparsity
        default = default_split(sparsity)
        cost = weight_fraction(default, gated)
        for method in methods:
            score = "output" if method.endswith("-output") else "activation"
            if method in ("pop", "pop-output"):
                pool = default.retain + default.candidate
                points.append((method, sparsity, _split(default.retain, pool, default.keep, score)))
                for wider in () if small else ((pool + 1) / 2, 1.0):  # the same bytes, spent on more gate rows
                    used = (3 * cost - wider) / 2 if gated else 2 * cost - wider  # r + k at that cost
                    points.append((method, sparsity, _split(used / 4, wider, 3 * used / 4, score)))
                if not small:
                    points.append((method, sparsity, _split(default.retain, 1.0, default.keep, score)))  # more bytes
            elif method in ("dynamic", "dynamic-output"):
                for keep in (_dynamic_keep_for(cost, gated),) if small else (_dynamic_keep_for(cost, gated), budget):
                    points.append((method, sparsity, _split(0.0, 1.0, keep, score)))
            elif method == "griffin":
                points.append((method, sparsity, _split(budget, budget, 0.0)))
            elif method == "static":
                points.append((method, sparsity, dataclasses.replace(_split(budget, budget, 0.0), static=True)))
            elif method != "dense":
                raise PopcError(f"--sweep has no grid for method {method!r}")
    unique: dict[PopSettings, tuple[str, float, PopSettings]] = {}
    for point in points:
        unique.setdefault(point[2], point)  # e.g. the default pool equal to a neighbour's
    return list(unique.values())


def decode_ms(
    directory: Path, settings: Sequence[PopSettings], prompt_ids: Sequence[int], threads: int, device: str = "cpu"
) -> list[float]:
    """Median decode ms/token of each ``settings`` (op library, batch 1, after ``prompt_ids``) on ``device``."""
    import numpy as np

    from popc.bench.runners import OrtRunner

    runner = OrtRunner(Path(directory), threads, device, use_oplib=True)
    if not runner.uses_oplib:
        raise PopcError("--sweep times decode with popc's op library; build it first: popc doctor --build")
    ids = np.array([list(prompt_ids)], np.int64)
    mask = np.ones_like(ids)
    runs = [runner.decode(ids, mask, DECODE_STEPS, setting) for setting in settings]
    for run in runs:
        run()  # warm-up
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(REPEATS):  # round-robin, so a slow spell of the machine hits every row alike
        for run, got in zip(runs, times):
            got.append(run())
    return [statistics.median(got) for got in times]


def pareto_front(costs: Sequence[float], losses: Sequence[float]) -> list[bool]:
    """Whether each point is on the front: no other point is at most as costly and as lossy,
    and better in one of the two."""
    return [
        not any(
            (cj <= ci and lj <= li) and (cj < ci or lj < li) for j, (cj, lj) in enumerate(zip(costs, losses)) if j != i
        )
        for i, (ci, li) in enumerate(zip(costs, losses))
    ]


def mark_fronts(rows: Sequence[Any]) -> None:
    """Set ``row.front`` to the fronts it is on: "bytes" (KL vs FFN bytes), "ms" (KL vs ms/token)."""
    kl = [row.fidelity.kl_mean for row in rows]
    for key, costs in (("bytes", [row.weight_fraction for row in rows]), ("ms", [row.ms_per_token for row in rows])):
        if any(c is None for c in costs):
            continue
        for row, on in zip(rows, pareto_front(costs, kl)):
            if on:
                row.front.append(key)


def reproduce_command(
    directory: str, settings: PopSettings, windows: int, window: int, prompt: int, text: Any = None
) -> str:
    """The ``popc eval`` command that scores this one split on the same windows."""
    split = f"{settings.retain:g}/{settings.candidate:g}/{settings.keep:g}"
    if settings.static:
        split += ":static"
    elif settings.score != "activation":
        split += f":{settings.score}"
    given = f" --text {text}" if text else ""
    return (f"popc eval {directory} --methods dense --split {split} --windows {windows} --window {window} "
            f"--prompt {prompt} --tasks none{given}")  # fmt: skip


# --------------------------------------------------------------------------- output


def sweep_table(result: Any):
    from rich.table import Table

    table = Table(title=f"popc eval --sweep: {result.info['source'] or result.info['export']}")
    for name in ("method", "r / c / k", "FFN bytes", "ms/token", "ppl", "KL mean ± 95 %", "KL median", "KL p99",
                 "top-1", "front"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("method", "front") else "right")
    for row in sorted(result.rows, key=lambda r: -r.weight_fraction):
        s, f = row.settings, row.fidelity
        table.add_row(
            row.title,
            "dense" if row.method == "dense" else f"{s.retain:.3g} / {s.candidate:.3g} / {s.keep:.3g}",
            f"{row.weight_fraction:.3f}",
            "" if row.ms_per_token is None else f"{row.ms_per_token:.2f}",
            f"{f.ppl:.2f}",
            f"{f.kl_mean:.4f} ± {f.kl_ci:.4f}",
            f"{f.kl_median:.4f}",
            f"{f.kl_p99:.3f}",
            f"{f.top1:.3f}",
            ", ".join(row.front),
        )
    return table


def sweep_plot(result: Any, path: str | Path) -> None:
    """KL and perplexity against FFN bytes and against ms/token; the front as a line."""
    from popc.eval_report import pyplot, save_figure

    plt = pyplot()
    rows = result.rows
    timed = all(r.ms_per_token is not None for r in rows)
    costs = [("weight_fraction", "FFN weight bytes per decode step (fraction of dense)")]
    if timed:
        costs.append(("ms_per_token", "decode ms/token (batch 1)"))
    fig, axes = plt.subplots(2, len(costs), figsize=(6.5 * len(costs), 9), squeeze=False)
    for column, (cost, xlabel) in enumerate(costs):
        for line, (metric, ylabel) in enumerate(
            (("kl_mean", "KL(dense || row), nats (log)"), ("ppl", "perplexity (log)"))
        ):
            ax = axes[line][column]
            # Dense has KL 0, which a log axis cannot show: it is left off the KL panels.
            shown = [r for r in rows if metric != "kl_mean" or r.method != "dense"]
            colours = {title: f"C{i}" for i, title in enumerate(dict.fromkeys(r.title for r in rows))}
            for title in dict.fromkeys(r.title for r in shown):
                group = [r for r in shown if r.title == title]
                dense = group[0].method == "dense"
                ax.plot([getattr(r, cost) for r in group], [getattr(r.fidelity, metric) for r in group],
                        "*" if dense else "o", color=colours[title], label=title, markersize=11 if dense else 6)  # fmt: skip
            on = "bytes" if cost == "weight_fraction" else "ms"
            front = sorted((getattr(r, cost), getattr(r.fidelity, metric)) for r in shown if on in r.front)
            if front:
                ax.plot(*zip(*front), "k--", linewidth=1, alpha=0.6, label="Pareto front (KL)")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if line == 0 and column == 0:
                ax.legend(fontsize=7)
    info = result.info
    source = str(info["source"] or info["export"]).split(" (")[0]  # without a built-in's file path
    fig.suptitle(f"{source}: {info['scored_tokens']} tokens of {Path(info['text'] or '').name}, {info['machine']}; "
                 "dense (KL 0) is on the perplexity panels only", fontsize=9)  # fmt: skip
    fig.tight_layout()
    save_figure(plt, fig, path)
