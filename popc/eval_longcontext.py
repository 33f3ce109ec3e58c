"""``popc eval DIR --long-context``: KV eviction on long prompts, every method and budget.

On an export made with ``popc export --kv-evict``: passkey retrieval (popc.longcontext:
synthetic, seeded, the needle at several depths of 1k-4k-token prompts) and the
perplexity of the held text's continuation after a compressed 2k-4k prefix. One prompt
run serves every (method, budget): :meth:`popc.evicting_steps.EvictingSteps.apply`
evicts from the same full cache again, so the methods differ in what they keep only.
The JSON it returns is the PyTorch reference benchmark's (popc.longcontext_report).
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from popc import longcontext
from popc.errors import PopcError
from popc.kv_eviction import EvictionSettings, parse_method
from popc.progress import Progress, or_silent

DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.5)
DEFAULT_METHODS = ("streaming", "snapkv", "random", "laprox")
ANSWER_TOKENS = 6  # the key's five digits and a little


@dataclass
class LongContextPlan:
    directory: Path
    lengths: Sequence[int] = longcontext.PASSKEY_LENGTHS
    depths: Sequence[float] = longcontext.PASSKEY_DEPTHS
    seeds: Sequence[int] = (0,)
    budgets: Sequence[float | int] = DEFAULT_BUDGETS
    methods: Sequence[str] = DEFAULT_METHODS
    ppl_prefixes: Sequence[int] = (2048, 4096)
    ppl_count: int = 1
    continuation: int = 128
    text: str | Path | None = None
    threads: int | None = None
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)  # LaProx's score/floor/pool, sinks, seed

    def check(self, max_positions: int) -> None:
        for label in self.methods:
            parse_method(label)  # refuses an unknown method or option
        for budget in self.budgets:
            EvictionSettings(budget=budget)  # refuses a bad one
        longest = max([*self.lengths, *(p + self.continuation for p in self.ppl_prefixes)], default=0)
        if longest >= max_positions:
            raise PopcError(
                f"a {longest}-token run (a passkey length, or a perplexity prefix + {self.continuation} continuation "
                f"tokens) exceeds the model's context of {max_positions}; shorten --lengths or --ppl-prefixes"
            )
        if not 0 < self.continuation:
            raise PopcError("--continuation must be at least 1")
        if not 0 < self.ppl_count:
            raise PopcError("--ppl-count must be at least 1")


def settings_grid(plan: LongContextPlan) -> list[tuple[str, EvictionSettings]]:
    """(label, settings): the full cache, then every method at every budget."""
    grid = [("full", EvictionSettings(method="full", **plan.options))]
    for label in plan.methods:
        if label == "full":
            continue
        base = dataclasses.replace(parse_method(label), **plan.options)
        grid += [(label, dataclasses.replace(base, budget=b)) for b in plan.budgets]
    return grid


def run_prompt(
    stepper: Any, ids: list[int], grid: list[tuple[str, EvictionSettings]], score: Callable[[Any], Any], layers: int
) -> tuple[float, list[dict[str, Any]]]:
    """One full-cache run of ``ids``, then for every setting: evict, ``score(stepper)``."""
    stepper.run_prompt(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64))
    rows = []
    for label, settings in grid:
        compaction = stepper.apply(settings)
        rows.append({
            "method": label, "budget": settings.budget, "value": score(stepper), "evict_s": compaction.seconds,
            "kept": int(sum(counts[0] for counts in compaction.kept)), "full": len(ids) * layers,
        })  # fmt: skip
    return stepper.prompt.seconds, rows


def run_long_context(
    plan: LongContextPlan, progress: Progress | None = None, on_update: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Passkey and continuation results of every setting (``on_update`` after each prompt)."""
    from popc.bench.machine import cpu_name
    from popc.runtime import load

    progress = or_silent(progress)
    model = load(plan.directory, device=plan.device, threads=plan.threads)
    if not model.kv_eviction:
        raise PopcError(f"{plan.directory} was exported without KV eviction; re-export it with `popc export --kv-evict`")
    plan.check(model.max_positions)
    tokenizer = model.tokenizer
    evictable = sum(layer.local_window is None for layer in model.attention_layers)
    grid = settings_grid(plan)
    text = longcontext.held_text(plan.text)
    sinks = grid[0][1].sinks
    quant = (model.config.get("quant") or {}).get("scheme")
    label = str(model.config.get("source") or plan.directory).split(" (")[0] + (f", --quant {quant}" if quant else "")
    result: dict[str, Any] = {
        "model": label,
        "machine": f"{cpu_name()}, {plan.threads or 'ORT default'} threads, onnxruntime (popc export, --kv-evict)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "window": int(model.kv_eviction["window"]), "sinks": sinks, "evictable_layers": evictable,
        "layers": model.num_layers, "passkey": [], "ppl": [],
    }  # fmt: skip
    try:
        items = longcontext.passkey_items(tokenizer, text, plan.lengths, plan.depths, plan.seeds)
        continuations = [
            item for prefix in plan.ppl_prefixes for item in longcontext.continuation_items(
                tokenizer, text, prefix, plan.continuation, plan.ppl_count)
        ]  # fmt: skip
    except ValueError as error:  # a length too short for the passkey's sentences, a text too short
        raise PopcError(f"--long-context: {error}; choose longer --lengths or shorter --ppl-prefixes") from None
    progress.stage(f"long context: {len(items)} passkey prompts, {len(continuations)} continuations, {len(grid)} settings each")
    progress.start(len(items) + len(continuations))
    capacity = max([*plan.lengths, *(p + plan.continuation for p in plan.ppl_prefixes)]) + ANSWER_TOKENS
    stepper = model.bound(capacity=capacity)
    for item in items:

        def answer(steps: Any, key: str = item.key) -> dict[str, Any]:
            tokens = [int(np.argmax(steps.prompt.logits[0, -1]))]
            for _ in range(ANSWER_TOKENS - 1):
                tokens.append(int(np.argmax(steps.decode(np.array([[tokens[-1]]], np.int64))[0, -1])))
            generated = model.decode(tokens)
            return {"correct": longcontext.passkey_correct(generated, key), "text": generated}

        started = time.perf_counter()
        prefill_s, rows = run_prompt(stepper, item.ids, grid, answer, evictable)
        result["passkey"].append({
            "length": len(item.ids), "depth": item.depth, "seed": item.seed, "key": item.key, "prefill_s": prefill_s,
            "seconds": time.perf_counter() - started, "rows": rows,
        })  # fmt: skip
        progress.advance()
        if on_update is not None:
            on_update(result)
    for item in continuations:

        def nll(steps: Any, follow: list[int] = item.continuation) -> float:
            logits = np.concatenate([steps.prompt.logits[0, -1:], steps.extend(np.array([follow[:-1]], np.int64))[0]])
            logits = logits.astype(np.float64)
            top = logits.max(-1, keepdims=True)
            log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            return float(-log_probs[np.arange(len(follow)), follow].mean())

        prefill_s, rows = run_prompt(stepper, item.prefix, grid, nll, evictable)
        result["ppl"].append({"prefix": len(item.prefix), "offset": item.offset, "prefill_s": prefill_s, "rows": rows})
        progress.advance()
        if on_update is not None:
            on_update(result)
    return result
