"""Do layer-adaptive POP budgets (or output-aware scores) help? A PyTorch experiment.

POP gives every layer the same fraction of channels. This script asks whether one
model-wide budget split across layers by how concentrated each layer's prompt scores
are does better, before anyone builds it into the graph. It runs the POP-online math
of ``popc/reference/pop_online.py`` as masked dense matmuls (the same selections: the
prompt's normalised activation scores, top R+C partition, per-token top-K of the
candidates by |act(gate)|), so a window costs three dense forwards:

1. dense over the whole window: the reference distributions;
2. the prompt alone (dense): every layer's channel scores s_l;
3. the whole window, prompt tokens dense (as POP's prefill), continuation tokens pruned
   with each layer's counts (as POP's decode steps: causal attention makes one pass over
   the continuation equal to token-by-token decode).

Budget splits, all with the same total channel count L * b * D (so the same FFN bytes
on average under popc's rule r = b_l/4, pool = b_l + 3/4 (1 - b_l), k = 3 b_l / 4):

* ``uniform``: b_l = b (popc today);
* ``share``: one model-wide top-(L b D) over every layer's channels ranked by their share
  s_lj^2 / sum_j s_lj^2 of their layer's score mass (maximises the total mass covered);
* ``coverage``: each layer the fewest channels covering the same fraction of its mass,
  that fraction chosen so the counts add up to the budget;
* ``mass``: the other direction: b_l proportional to the mass m_l that layer's top b D
  channels cover (concentrated layers get more), scaled so the counts add up;

each clamped to [b/2, min(1, 2b)] per layer. ``--score output`` weights scores by
||W_down row|| as popc's output-aware score does.

    python benchmarks/layer_budget.py smollm2-135m --sparsity 0.5 --windows 32

Prints mean KL to dense (with a paired 95 % interval of the difference to uniform),
perplexity and each layer's budget; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from popc.datasets import default_text_path
from popc.loading import load_model
from popc.scoring import make_windows, special_prefix

EPSILON = 1e-12
SPLITS = ("uniform", "share", "coverage", "mass")


def layer_counts(scores: list[torch.Tensor], budget: float, split: str) -> list[int]:
    """Channels per layer (b_l * D) for one prompt; ``scores`` are each layer's s_l [D]."""
    channels = scores[0].numel()
    total = round(len(scores) * budget * channels)
    low, high = round(budget / 2 * channels), round(min(1.0, 2 * budget) * channels)
    if split == "uniform":
        return [round(budget * channels)] * len(scores)
    shares = [(s.double() ** 2 / (s.double() ** 2).sum()).sort(descending=True).values for s in scores]
    if split == "mass":
        covered = np.array([sh[: round(budget * channels)].sum().item() for sh in shares])

        def counts_at(t: float) -> list[int]:  # t in [0, 1] scales b_l = 2 t b m_l / mean(m)
            return [int(min(max(round(2 * t * budget * channels * m / covered.mean()), low), high)) for m in covered]

        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if sum(counts_at(mid)) < total:
                lo = mid
            else:
                hi = mid
        return counts_at(hi)
    if split == "share":  # threshold on the share, found by bisection
        def counts_at(t: float) -> list[int]:
            return [int(min(max((sh >= t).sum().item(), low), high)) for sh in shares]
    elif split == "coverage":  # threshold on the covered fraction of each layer's mass
        cumulative = [sh.cumsum(0) for sh in shares]

        def counts_at(t: float) -> list[int]:  # t is 1 - coverage, so larger t keeps fewer
            return [int(min(max((c < 1 - t).sum().item() + 1, low), high)) for c in cumulative]
    else:
        raise ValueError(split)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(counts_at(mid)) > total:
            lo = mid
        else:
            hi = mid
    return counts_at(hi)


class MaskedPop:
    """Hooks on every layer's gated MLP: prompt scores (collect) or masked POP decode (prune)."""

    def __init__(self, model: torch.nn.Module, score: str) -> None:
        self.mlps = [layer.mlp for layer in model.model.layers]
        self.weights = [mlp.down_proj.weight.norm(dim=0) if score == "output" else None for mlp in self.mlps]
        self.mode = "dense"
        self.prompt = 0  # positions [0, prompt) are the prompt (dense); the rest are decode
        self.scores: list[torch.Tensor] = []
        self.counts: list[tuple[int, int, int]] = []
        for index, mlp in enumerate(self.mlps):
            mlp.forward = self._forward(mlp, index)

    def _forward(self, mlp: torch.nn.Module, index: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            act = mlp.act_fn(mlp.gate_proj(x))
            z = act * mlp.up_proj(x)
            if self.mode == "collect":
                normalised = z / (z.norm(dim=-1, keepdim=True) + EPSILON)
                score = normalised.pow(2).sum(dim=1).sqrt()[0]  # batch 1: [D]
                if self.weights[index] is not None:
                    score = score * self.weights[index]
                self.scores.append(score)
            elif self.mode == "prune":
                retain, pool, keep = self.counts[index]
                order = torch.sort(self.scores[index], descending=True, stable=True).indices
                mask = torch.zeros_like(z[0])  # [S, D]
                mask[:, order[:retain]] = 1
                candidates = order[retain:pool]
                strength = act[0][:, candidates].abs()
                if self.weights[index] is not None:
                    strength = strength * self.weights[index][candidates]
                chosen = torch.sort(strength, dim=-1, descending=True, stable=True).indices[:, :keep]
                mask.scatter_(1, candidates[chosen], 1.0)
                mask[: self.prompt] = 1  # prompt tokens: dense, as POP's prefill
                z = z * mask.unsqueeze(0)
            return mlp.down_proj(z)

        return forward


def split_counts(channels: int, fraction: float) -> tuple[int, int, int]:
    """popc's default rule for budget fraction b: r = b/4, pool = b + 3(1-b)/4, k = 3b/4."""
    retain = round(fraction / 4 * channels)
    pool = round((fraction + 0.75 * (1 - fraction)) * channels)
    keep = round(fraction * channels) - retain
    return retain, pool, keep


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--score", choices=("activation", "output"), default="activation")
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    ids = tokenizer(default_text_path().read_text(), add_special_tokens=False)["input_ids"]
    windows = make_windows(ids, special_prefix(tokenizer), args.window, args.windows)
    prompt = args.window // 2
    splits = args.splits.split(",")
    hooks = MaskedPop(model, args.score)
    channels = hooks.mlps[0].gate_proj.weight.shape[0]
    budget = 1 - args.sparsity
    kl = {s: [] for s in splits}
    nll = {s: [] for s in splits}
    budgets = {s: [] for s in splits}
    with torch.no_grad():
        for number, window in enumerate(windows):
            tokens = torch.from_numpy(window).unsqueeze(0)
            hooks.mode = "dense"
            dense = log_softmax(model(tokens).logits[0, prompt - 1 : -1])
            hooks.mode, hooks.scores = "collect", []
            model(tokens[:, : prompt - 1])
            targets = tokens[0, prompt:]
            for split in splits:
                counts = layer_counts(hooks.scores, budget, split)
                hooks.counts = [split_counts(channels, c / channels) for c in counts]
                hooks.mode, hooks.prompt = "prune", prompt - 1
                pruned = log_softmax(model(tokens).logits[0, prompt - 1 : -1])
                kl[split].append((dense.exp() * (dense - pruned)).sum(-1).mean().item())
                nll[split].append(-pruned.gather(-1, targets[:, None]).mean().item())
                budgets[split].append([c / channels for c in counts])
            print(f"window {number + 1}/{len(windows)}: " + ", ".join(f"{s} KL {kl[s][-1]:.4f}" for s in splits), flush=True)

    table = Table(title=f"{args.model}: layer budgets at {args.sparsity:.0%} sparsity, {args.score} scores, "
                        f"{len(windows)} x {args.window - prompt} tokens")  # fmt: skip
    for name in ("split", "KL mean", "vs uniform (95 %)", "ppl", "layer budgets (first / min / max)"):
        table.add_column(name)
    base = np.array(kl[splits[0]])
    results = {}
    for split in splits:
        values = np.array(kl[split])
        diff = values - base
        half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
        layer = np.mean(budgets[split], axis=0)
        results[split] = {"kl_mean": float(values.mean()), "kl_vs_first": float(diff.mean()), "kl_vs_first_ci": float(half),
                          "ppl": float(math.exp(np.mean(nll[split]))), "layer_budgets": layer.tolist()}  # fmt: skip
        table.add_row(split, f"{values.mean():.4f}", f"{diff.mean():+.4f} ± {half:.4f}", f"{math.exp(np.mean(nll[split])):.2f}",
                      f"{layer[0]:.2f} / {layer.min():.2f} / {layer.max():.2f}")  # fmt: skip
    Console().print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "sparsity": args.sparsity, "score": args.score, "windows": len(windows),
                       "window": args.window, "prompt": prompt, "results": results}, handle, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
