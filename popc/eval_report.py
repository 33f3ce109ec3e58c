"""``popc eval``'s output: the table of rows and the plot against FFN bytes (``--sweep``'s
are in :mod:`popc.sweep`)."""

from __future__ import annotations

from pathlib import Path

from popc.errors import PopcError
from popc.eval import FP32, EvalResult

# --------------------------------------------------------------------------- output


def result_table(result: EvalResult):
    from rich.table import Table

    tasks = list(result.info["tasks"])
    table = Table(title=f"popc eval: {result.info['source'] or result.info['export']}")
    for name, justify in (("method", "left"), ("sparsity", "right"), ("r / c / k", "right"), ("FFN bytes", "right")):
        table.add_column(name, justify=justify)
    if result.info["windows"]:
        table.add_column("ppl", justify="right")
        table.add_column("KL to dense\n(± 95 %)", justify="right")
        table.add_column("top-1\n= dense", justify="right")
    for name in tasks:
        table.add_column(f"{name}\n(chance {result.info['chance'][name]:.2f})", justify="right")
    if tasks:
        table.add_column("mean acc", justify="right")
    table.add_column("s", justify="right")
    reference = next((r for r in result.rows if r.method == "dense"), None)  # the plan's export, dense
    dense_ppl = reference.ppl if reference else None
    for row in result.rows:
        s = row.settings
        cells = [
            row.title,
            f"{row.sparsity:.0%}",
            "dense" if row.method == "dense" else f"{s.retain:.3g} / {s.candidate:.3g} / {s.keep:.3g}",
            f"{row.weight_fraction:.2f}",
        ]
        if result.info["windows"]:
            delta = "" if row is reference or not dense_ppl else f" ({row.ppl / dense_ppl - 1:+.0%})"
            cells.append(f"{row.ppl:.2f}{delta}")
            cells += [f"{row.fidelity.kl_mean:.4f} ± {row.fidelity.kl_ci:.4f}", f"{row.fidelity.top1:.3f}"]
        cells += [f"{row.accuracy[name]:.3f}" for name in tasks]
        if tasks:
            cells.append(f"{row.mean_accuracy:.3f}")
        cells.append(f"{row.seconds:.0f}")
        table.add_row(*cells, end_section=row.method == "dense" and row.weights == FP32)
    return table


def pyplot():  # noqa: ANN201 - matplotlib.pyplot, imported on demand
    """matplotlib's pyplot on the Agg backend, or a PopcError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PopcError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def save_figure(plt, fig, path: str | Path) -> None:  # noqa: ANN001 - pyplot and a Figure
    """Write ``fig`` as a PNG at ``path`` (a PopcError if it cannot be written), then close it."""
    try:
        fig.savefig(path, dpi=120)
    except OSError as error:
        raise PopcError(f"cannot write --plot {path}: {error}") from None
    finally:
        plt.close(fig)


def plot(result: EvalResult, path: str | Path) -> None:
    """Perplexity and mean accuracy against the FFN weight bytes a decode step reads."""
    plt = pyplot()
    panels = []
    if result.info["windows"]:
        panels.append(("ppl", "continuation perplexity (log)"))
    if result.info["tasks"]:
        panels.append(("mean_accuracy", "mean multiple-choice accuracy"))
    if not panels:
        raise PopcError("nothing to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for method, weights in dict.fromkeys((r.method, r.weights) for r in result.rows):
            group = [r for r in result.rows if (r.method, r.weights) == (method, weights)]
            points = sorted((r.weight_fraction, r.ppl if key == "ppl" else r.mean_accuracy) for r in group)
            xs, ys = zip(*points)
            ax.plot(
                xs,
                ys,
                "*" if method == "dense" else "o-",
                label=group[0].title,
                markersize=10 if method == "dense" else 6,
            )
        if key == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("FFN weight bytes read per decode step (fraction of dense)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(str(result.info["source"] or result.info["export"])[:100], fontsize=9)
    fig.tight_layout()
    save_figure(plt, fig, path)
