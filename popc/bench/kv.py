"""``popc bench DIR --kv-budgets``: decode speed and KV memory after a long prompt, per budget.

On an export made with ``popc export --kv-evict``. One long prompt (the held text, a
``context``-token prefix) runs once with the full cache; then, ``repeats`` times, every
budget in turn evicts from that same cache (:meth:`EvictingSteps.apply`) and decodes
``steps`` greedy tokens over its shared per-layer buffers, timed per step. The figures:
the median decode ms/token (min-max over repeats), its ratio to the full cache measured
in the same run, the KV bytes the compacted cache holds, and the eviction's cost as a
share of the prefill it follows.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from popc.errors import PopcError
from popc.kv_eviction import EvictionSettings, parse_method
from popc.progress import Progress, or_silent

DEFAULT_KV_BUDGETS = (1.0, 0.2, 0.05)


@dataclass
class KvBenchPlan:
    directory: Path
    budgets: Sequence[float | int] = DEFAULT_KV_BUDGETS
    method: str = "laprox"
    context: int = 4096
    steps: int = 32
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None


@dataclass
class KvBenchRow:
    budget: float | int
    method: str
    kv_slots: int  # tokens x layers held after the prompt
    kv_bytes: int
    decode_ms: float  # median over repeats of the mean step time
    decode_ms_min: float
    decode_ms_max: float
    speedup: float  # full cache / this, same run
    evict_s: float
    evict_share: float  # evict_s / prefill seconds


@dataclass
class KvBenchResult:
    model: str
    machine: dict[str, Any]
    date: str
    context: int
    steps: int
    repeats: int
    prefill_s: float
    rows: list[KvBenchRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_kv_bench(plan: KvBenchPlan, progress: Progress | None = None) -> KvBenchResult:
    from popc import longcontext
    from popc.bench.machine import default_threads, machine_info
    from popc.runtime import load

    progress = or_silent(progress)
    threads = plan.threads or default_threads()
    model = load(plan.directory, threads=threads)
    if not model.kv_eviction:
        raise PopcError(f"{plan.directory} was exported without KV eviction; re-export it with `popc export --kv-evict`")
    if plan.context + plan.steps >= model.max_positions:
        raise PopcError(f"--kv-context {plan.context} + {plan.steps} steps exceeds the model's context of {model.max_positions}")
    if plan.steps < 2 or plan.repeats < 1:
        raise PopcError("--decode-tokens must be at least 2 and --repeats at least 1")
    settings = [
        EvictionSettings(method="full") if budget == 1.0 else parse_method(plan.method, budget) for budget in plan.budgets
    ]
    if settings[0].evicts:
        settings.insert(0, EvictionSettings(method="full"))  # the baseline, measured in the same run
    (item,) = longcontext.continuation_items(model.tokenizer, longcontext.held_text(), plan.context, 1, 1)
    stepper = model.bound(capacity=plan.context + plan.steps + 1)
    progress.stage(f"prefill of {plan.context} tokens (full cache)")
    stepper.run_prompt(np.array([item.prefix], np.int64), np.ones((1, plan.context), np.int64))
    itemsize = np.dtype(stepper.prompt.state[0].dtype).itemsize
    times: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    evict_seconds: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    slots: dict[int, int] = {}
    progress.stage(f"decoding {plan.steps} tokens per budget, {plan.warmup} + {plan.repeats} rounds")
    progress.start((plan.warmup + plan.repeats) * len(settings))
    for round_ in range(plan.warmup + plan.repeats):
        for index, setting in enumerate(settings):  # interleaved: drift hits every budget alike
            compaction = stepper.apply(setting)
            slots[index] = sum(stepper.kv_slots())
            token = int(np.argmax(stepper.prompt.logits[0, -1]))
            started = time.perf_counter()
            for _ in range(plan.steps):
                stepper.decode(np.array([[token]], np.int64), copy=False, logits=False)
                token = int(stepper.greedy()[0])
            if round_ >= plan.warmup:
                times[index].append(1000 * (time.perf_counter() - started) / plan.steps)
                evict_seconds[index].append(compaction.seconds)
            progress.advance()
    prefill = stepper.prompt.seconds
    base = statistics.median(times[0])
    result = KvBenchResult(
        model=str(model.config.get("source") or plan.directory).split(" (")[0],
        machine=asdict(machine_info(threads, "cpu")),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        context=plan.context, steps=plan.steps, repeats=plan.repeats, prefill_s=prefill,
    )  # fmt: skip
    for index, setting in enumerate(settings):
        median = statistics.median(times[index])
        evict = statistics.median(evict_seconds[index])
        result.rows.append(KvBenchRow(
            budget=setting.budget, method=setting.method, kv_slots=slots[index],
            kv_bytes=2 * model.num_kv_heads * model.head_dim * itemsize * slots[index],
            decode_ms=median, decode_ms_min=min(times[index]), decode_ms_max=max(times[index]),
            speedup=base / median, evict_s=evict, evict_share=evict / prefill,
        ))  # fmt: skip
    return result


def markdown(result: KvBenchResult) -> str:
    machine = result.machine
    lines = [
        f"# KV eviction: decode at {result.context} tokens of context, {result.model}",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('threads')} threads, onnxruntime {machine.get('onnxruntime')}. "
        f"Date: {result.date}. One {result.context}-token prefill (full cache, {result.prefill_s:.1f} s), then per budget "
        f"the eviction and {result.steps} greedy decode steps; median of {result.repeats} interleaved rounds (min-max).",
        "",
        "| budget | method | KV entries (tokens x layers) | KV MiB | decode ms/token | vs full | eviction s | eviction / prefill |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        lines.append(
            f"| {row.budget:g} | {row.method} | {row.kv_slots} | {row.kv_bytes / 2**20:.1f} | "
            f"{row.decode_ms:.1f} ({row.decode_ms_min:.1f}-{row.decode_ms_max:.1f}) | {row.speedup:.2f}x | "
            f"{row.evict_s:.2f} | {100 * row.evict_share:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def write(result: KvBenchResult, as_json: Path | None, as_markdown: Path | None) -> None:
    if as_json is not None:
        as_json.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    if as_markdown is not None:
        as_markdown.write_text(markdown(result))
