"""``popc analyze``: which layers the prompt can skip (POP-prefill), measured.

With the PyTorch reference (:class:`popc.reference.SkipReference`) over the model:

* **sweep**: continuation loss (mean NLL per token, scored in decode mode on the
  prefilled cache, as ``popc eval`` scores) when the deepest ``N`` layers are
  skipped at prefill only (POP-prefill) and when they are skipped for every token
  (ShortGPT-style layer removal), for every ``N``;
* **per layer** (optional): the same two losses with one layer skipped, which shows
  how much each layer matters for encoding the prompt vs for decoding.

The recommendation is the largest ``N`` whose prefill-only loss increase stays
within ``budget`` nats per token (and every smaller ``N`` too).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from popc.errors import PopcError
from popc.progress import Progress, or_silent
from popc.textfile import read_text_file


@dataclass
class AnalyzePlan:
    model: str
    budget: float = 0.05
    text: str | Path | None = None
    windows: int = 8
    window: int = 256
    prompt: int | None = None
    per_layer: bool = True
    batch: int = 8
    # N values to sweep (default: every N from 1 to layers - 1).
    counts: list[int] | None = None


def _windows(tokenizer, plan: AnalyzePlan, max_positions: int, text: str | None = None):
    from popc.datasets import default_text_path
    from popc.eval import make_windows, special_prefix

    path = Path(plan.text) if plan.text else default_text_path()
    text = text if text is not None else read_text_file(path, "--text")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    window = min(plan.window, max_positions)
    return torch.from_numpy(make_windows(ids, special_prefix(tokenizer), window, plan.windows)), str(path)


def analyze(
    plan: AnalyzePlan, progress: Progress | None = None, model: Any = None, tokenizer: Any = None
) -> dict[str, Any]:
    """Run the analysis; returns a JSON-able dict (see module docstring). ``progress`` gets a
    stage per loss measured, and one step of a bar over all of them."""
    from popc.loading import load_model
    from popc.reference import SkipReference, continuation_nll

    progress = or_silent(progress)
    started = time.perf_counter()
    given_text = read_text_file(Path(plan.text), "--text") if plan.text else None  # fails before the load
    if model is None:
        progress.stage(f"loading {plan.model}")
        loaded = load_model(plan.model, progress=progress)
        model, tokenizer = loaded.model, loaded.tokenizer
    if next(model.parameters()).dtype != torch.float32:
        model = model.float()
    model = model.eval()
    layers = model.config.num_hidden_layers
    windows, text = _windows(tokenizer, plan, model.config.max_position_embeddings, given_text)
    width = windows.shape[1]
    prompt = plan.prompt or width // 2
    if not 2 <= prompt < width:
        raise PopcError(f"--prompt must be in [2, {width}), got {prompt}")

    counts = sorted(set(plan.counts)) if plan.counts else list(range(1, layers))
    if any(not 1 <= c < layers for c in counts):
        raise PopcError(f"--counts must be in [1, {layers - 1}]")

    def loss(label: str, **skip) -> float:
        progress.stage(label)
        value = continuation_nll(SkipReference(model, **skip), windows, prompt, plan.batch)
        progress.advance()
        return value

    progress.start(1 + 2 * len(counts) + (2 * layers if plan.per_layer else 0))
    dense = loss("dense")
    sweep = []
    for count in counts:
        deepest = range(layers - count, layers)
        label = f"skipping the deepest {count} of {layers} layers"
        sweep.append({
            "skip": count,
            "prefill_only": loss(f"{label} at prefill", prefill_skip=deepest),
            "every_token": loss(f"{label} for every token", always_skip=deepest),
        })  # fmt: skip
    per_layer = []
    if plan.per_layer:
        for index in range(layers):
            label = f"skipping layer {index}"
            per_layer.append({
                "layer": index,
                "prefill_only": loss(f"{label} at prefill", prefill_skip=[index]),
                "every_token": loss(f"{label} for every token", always_skip=[index]),
            })  # fmt: skip
    recommended = 0
    for row in sweep:
        if row["prefill_only"] - dense > plan.budget:
            break
        recommended = row["skip"]
    return {
        "model": plan.model,
        "num_layers": layers,
        "dense_nll": dense,
        "budget": plan.budget,
        "recommended_skip": recommended,
        "sweep": sweep,
        "per_layer": per_layer,
        "info": {
            "text": text,
            "windows": int(windows.shape[0]),
            "window": int(width),
            "prompt": int(prompt),
            "scored_tokens_per_window": int(width - prompt),
            "seconds": round(time.perf_counter() - started, 1),
            "loss": "mean NLL (nats/token) of tokens [prompt, window), decode mode on the prefilled cache",
        },
    }


def result_tables(result: dict[str, Any]):
    from rich.table import Table

    dense = result["dense_nll"]
    sweep = Table(title=f"{result['model']}: deepest N layers skipped (dense NLL {dense:.4f}, ppl {math.exp(dense):.2f})")
    for name in ("N", "prefill-only ΔNLL", "prefill-only ppl", "every-token ΔNLL", "every-token ppl", ""):
        sweep.add_column(name, justify="right")
    for row in result["sweep"]:
        mark = "[green]<- recommended[/]" if row["skip"] == result["recommended_skip"] else ""
        over = row["prefill_only"] - dense > result["budget"]
        sweep.add_row(
            str(row["skip"]),
            ("[red]" if over else "") + f"{row['prefill_only'] - dense:+.4f}",
            f"{math.exp(row['prefill_only']):.2f}",
            f"{row['every_token'] - dense:+.4f}",
            f"{math.exp(row['every_token']):.2f}",
            mark,
        )
    tables = [sweep]
    if result["per_layer"]:
        layer = Table(title="one layer skipped: ΔNLL (importance for the prompt vs for every token)")
        for name in ("layer", "prefill-only ΔNLL", "every-token ΔNLL", "prefill share"):
            layer.add_column(name, justify="right")
        for row in result["per_layer"]:
            prefill, every = row["prefill_only"] - dense, row["every_token"] - dense
            share = f"{prefill / every:.2f}" if every > 1e-9 else "-"
            layer.add_row(str(row["layer"]), f"{prefill:+.4f}", f"{every:+.4f}", share)
        tables.append(layer)
    return tables


def plot(result: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = result["dense_nll"]
    panels = 2 if result["per_layer"] else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    counts = [0] + [r["skip"] for r in result["sweep"]]
    ax.plot(counts, [0.0] + [r["prefill_only"] - dense for r in result["sweep"]], "o-", label="skip at prefill only (POP-prefill)")
    ax.plot(counts, [0.0] + [r["every_token"] - dense for r in result["sweep"]], "s--", label="skip for every token (ShortGPT-style)")
    ax.axhline(result["budget"], color="grey", linestyle=":", label=f"budget {result['budget']} nats")
    ax.axvline(result["recommended_skip"], color="green", alpha=0.4, label=f"recommended N = {result['recommended_skip']}")
    ax.set_yscale("symlog", linthresh=0.01)
    lowest = min([0.0] + [min(r["prefill_only"], r["every_token"]) - dense for r in result["sweep"]])
    ax.set_ylim(bottom=lowest)
    ax.set_xlabel(f"deepest N of {result['num_layers']} layers skipped")
    ax.set_ylabel("continuation loss increase (nats/token)")
    ax.set_title(result["model"])
    ax.legend(fontsize=8)
    if result["per_layer"]:
        ax = axes[0][1]
        index = [r["layer"] for r in result["per_layer"]]
        ax.bar([i - 0.2 for i in index], [r["prefill_only"] - dense for r in result["per_layer"]], 0.4, label="prefill only")
        ax.bar([i + 0.2 for i in index], [r["every_token"] - dense for r in result["per_layer"]], 0.4, label="every token")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_ylim(bottom=min([0.0] + [min(r["prefill_only"], r["every_token"]) - dense for r in result["per_layer"]]))
        ax.set_xlabel("layer skipped")
        ax.set_ylabel("loss increase (nats/token)")
        ax.set_title("per-layer importance")
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
