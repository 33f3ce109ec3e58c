"""``popc eval``: continuation perplexity and multiple-choice accuracy, dense vs POP vs baselines.

Every row runs from one export: a POP export takes its region sizes (``pop_config``)
as a graph input, so dense, POP and the baselines are just different settings.

Decode-mode scoring. Every scored token's logits come from a *decode-mode* graph call
(state non-empty: fixed per-sequence partition, each token its own top-k mask), so
pruning acts as it does in generation:

* perplexity: each window of ``window`` tokens is split at ``prompt``; tokens
  ``[0, prompt-1)`` are prefilled (dense FFNs; builds the partitions), then tokens
  ``[prompt-1, window-1)`` go through one decode-mode call and predict tokens
  ``[prompt, window)``. One call over S tokens with non-empty state is exactly S
  one-token decode steps (each token's mask depends only on its own activations and
  the fixed partition); ``tests/test_eval.py`` checks this against a token-by-token
  ONNX decode loop.
* multiple choice: the question minus its last token is prefilled (dense), the
  prefilled state is forked (rows repeated) once per answer, and ``[last question
  token] + answer[:-1]`` is scored in decode mode: the answer's log-likelihood is the
  sum of its tokens' log-probabilities (BIG-bench's ``multiple_choice_grade``).

Feeding the prompt's last token in decode mode (instead of reading the first scored
token off the prefill's logits, which are always dense) makes every scored token,
including one-token answers, feel the pruning.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from popc.datasets import ChoiceItem
from popc.errors import PopcError
from popc.pop import PopSettings

DEFAULT_SPARSITIES = (0.25, 0.5, 0.75)
DEFAULT_WINDOW = 256
DEFAULT_WINDOWS = 24
METHODS = ("dense", "pop", "griffin", "dynamic", "static")
METHOD_TITLES = {
    "dense": "dense",
    "pop": "POP",
    "griffin": "GRIFFIN-style (c=0)",
    "dynamic": "per-token dynamic (r=0, c=1)",
    "static": "static structured",
}

Tick = Callable[[int], None]


# --------------------------------------------------------------------------- rows


def pop_settings(sparsity: float) -> PopSettings:
    """POP's default ratios at ``sparsity`` (popc.defaults, as ``popc export --sparsity`` uses)."""
    from popc.defaults import settings_for_sparsity

    return settings_for_sparsity(sparsity)


def method_settings(method: str, sparsity: float) -> PopSettings:
    """The PopSettings of one eval row."""
    budget = 1.0 - sparsity
    if method == "dense":
        return PopSettings(retain=1.0)
    if method == "pop":
        return pop_settings(sparsity)
    if method == "griffin":  # prompt-fixed selection: no candidate region
        return PopSettings(retain=budget, candidate=0.0, keep=0.0)
    if method == "dynamic":  # per-token top-k over every channel
        return PopSettings(retain=0.0, candidate=1.0, keep=budget)
    if method == "static":  # partition from weight magnitudes, no context
        return PopSettings(retain=budget, candidate=0.0, keep=0.0, static=True)
    raise PopcError(f"unknown eval method {method!r}; choose from {', '.join(METHODS)}")


def weight_fraction(settings: PopSettings, gated: bool = True) -> float:
    """FFN weight bytes one decode step reads, as a fraction of the dense FFN's.

    Gated FFN (gate, up, down matrices of D rows each): gate rows of R ∪ C (R is used,
    C must be scored), up and down rows of R ∪ kept. Plain fc1/act/fc2 MLP: fc1 rows
    of R ∪ C, fc2 rows of R ∪ kept. Dynamic selection (r=0, c=1) reads every gate row;
    GRIFFIN-style and static read R only.
    """
    r, c, k = settings.retain, settings.candidate, settings.keep
    if r >= 1.0:
        return 1.0
    if gated:
        return (r + c + 2 * (r + k)) / 3
    return (r + c + (r + k)) / 2


@dataclass
class EvalRow:
    method: str
    sparsity: float
    settings: PopSettings
    weight_fraction: float
    ppl: float | None = None
    scored_tokens: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mean_accuracy(self) -> float | None:
        return float(np.mean(list(self.accuracy.values()))) if self.accuracy else None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "title": METHOD_TITLES[self.method],
            "sparsity": self.sparsity,
            "retain": self.settings.retain,
            "candidate": self.settings.candidate,
            "keep": self.settings.keep,
            "static": self.settings.static,
            "weight_fraction": self.weight_fraction,
            "ppl": self.ppl,
            "scored_tokens": self.scored_tokens,
            "accuracy": self.accuracy,
            "mean_accuracy": self.mean_accuracy,
            "seconds": self.seconds,
        }


def plan_rows(sparsities: Sequence[float], has_pop: bool, gated: bool = True) -> list[EvalRow]:
    """Dense first, then each method at each sparsity (POP exports only)."""
    rows = [EvalRow("dense", 0.0, PopSettings(retain=1.0), 1.0)]
    if not has_pop:
        return rows
    for method in METHODS[1:]:
        for sparsity in sparsities:
            if not 0.0 < sparsity < 1.0:
                raise PopcError(f"--sparsities must be in (0, 1), got {sparsity}")
            settings = method_settings(method, sparsity)
            rows.append(EvalRow(method, sparsity, settings, weight_fraction(settings, gated)))
    return rows


# --------------------------------------------------------------------------- math


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits)[target] in float64; logits [..., V], targets [...]."""
    flat = logits.reshape(-1, logits.shape[-1])
    picked = np.take_along_axis(flat, targets.reshape(-1, 1), axis=1)[:, 0].astype(np.float64)
    out = np.empty(flat.shape[0], np.float64)
    for start in range(0, flat.shape[0], 256):  # chunks bound the float64 copy's memory
        block = flat[start : start + 256].astype(np.float64)
        top = block.max(axis=1)
        out[start : start + 256] = top + np.log(np.exp(block - top[:, None]).sum(axis=1))
    return (picked - out).reshape(targets.shape)


def special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before any text (e.g. BOS), so windows start like prompts."""
    try:
        ids = tokenizer("", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - any tokenizer without that behaviour: no prefix
        return []
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(i) for i in ids if i != eos]


def make_windows(ids: Sequence[int], prefix: Sequence[int], window: int, count: int | None) -> np.ndarray:
    """Non-overlapping windows of ``window`` tokens (``prefix`` + text), evenly spread over the text."""
    body = window - len(prefix)
    if body < 2:
        raise PopcError(f"window of {window} tokens is too short")
    available = len(ids) // body
    if available == 0:
        raise PopcError(f"the text is {len(ids)} tokens, shorter than one window of {body}; give a longer --text")
    starts = [i * body for i in range(available)]
    if count is not None and count < available:
        step = available / count
        starts = [starts[int(i * step)] for i in range(count)]
    return np.array([list(prefix) + list(ids[s : s + body]) for s in starts], np.int64)


# --------------------------------------------------------------------------- scoring


def continuation_logprobs(
    model: Any, windows: np.ndarray, prompt: int, pop: PopSettings | None, batch: int = 8,
    tick: Tick | None = None,
) -> np.ndarray:
    """Log-probabilities [N, W - prompt] of tokens ``[prompt, W)`` of each window, decode mode.

    Prefill ``[0, prompt-1)``; one decode-mode call over ``[prompt-1, W-1)``.
    """
    count, width = windows.shape
    if not 2 <= prompt < width:
        raise PopcError(f"prompt length {prompt} must be in [2, {width})")
    out = np.empty((count, width - prompt), np.float64)
    for start in range(0, count, batch):
        ids = windows[start : start + batch]
        rows = ids.shape[0]
        _, state = model.step(ids[:, : prompt - 1], np.ones((rows, prompt - 1), np.int64), model.initial_state(rows), pop)
        logits, _ = model.step(ids[:, prompt - 1 : -1], np.ones((rows, width - 1), np.int64), state, pop)
        out[start : start + rows] = token_logprobs(logits, ids[:, prompt:])
        if tick:
            tick(rows)
    return out


@dataclass
class EncodedItem:
    context: list[int]
    answers: list[list[int]]
    answer: int


def encode_item(tokenizer: Any, item: ChoiceItem, max_positions: int) -> EncodedItem:
    """Token ids of the question and of each answer (lm-eval style: trailing spaces of the
    prompt move to the answer, and answers are tokenized in context)."""
    stripped = item.prompt.rstrip(" ")
    spaces = item.prompt[len(stripped) :]
    context = [int(i) for i in tokenizer(stripped)["input_ids"]]
    answers = []
    for choice in item.choices:
        whole = [int(i) for i in tokenizer(stripped + spaces + choice)["input_ids"]]
        if whole[: len(context)] == context and len(whole) > len(context):
            answer = whole[len(context) :]
        else:
            answer = [int(i) for i in tokenizer(spaces + choice, add_special_tokens=False)["input_ids"]]
        if not answer:
            raise PopcError(f"answer {choice!r} tokenizes to nothing")
        answers.append(answer)
    longest = max(len(a) for a in answers)
    room = max_positions - longest
    if room < 2:
        raise PopcError(f"an answer of {longest} tokens does not fit the model's context of {max_positions}")
    if len(context) > room:
        context = context[-room:]
    if len(context) < 2:
        context = [int(getattr(tokenizer, "eos_token_id", 0) or 0)] * (2 - len(context)) + context
    return EncodedItem(context, answers, item.answer)


def choice_loglikelihoods(
    model: Any, items: Sequence[EncodedItem], pop: PopSettings | None, batch: int = 8, tick: Tick | None = None
) -> list[np.ndarray]:
    """Per item, the summed log-likelihood of each answer, scored in decode mode."""
    results: list[np.ndarray] = []
    pad = int(model.pad_token_id)
    for start in range(0, len(items), batch):
        group = items[start : start + batch]
        prefixes = [it.context[:-1] for it in group]
        longest = max(len(p) for p in prefixes)
        ids = np.full((len(group), longest), pad, np.int64)
        mask = np.zeros((len(group), longest), np.int64)
        for row, prefix in enumerate(prefixes):
            ids[row, longest - len(prefix) :] = prefix
            mask[row, longest - len(prefix) :] = 1
        _, state = model.step(ids, mask, model.initial_state(len(group)), pop)
        owner = np.array([i for i, it in enumerate(group) for _ in it.answers], np.int64)
        answers = [a for it in group for a in it.answers]
        width = max(len(a) for a in answers)
        chunk = np.full((len(answers), width), pad, np.int64)
        for row, (item_index, answer) in enumerate(zip(owner, answers)):
            tokens = [group[item_index].context[-1], *answer[:-1]]
            chunk[row, : len(tokens)] = tokens
        forked = [np.take(s, owner, axis=0) for s in state]
        # Right padding of the answer chunk is harmless: causal attention keeps real
        # tokens from seeing the pads after them, and the pads' outputs are ignored.
        full_mask = np.concatenate([mask[owner], np.ones((len(answers), width), np.int64)], axis=1)
        logits, _ = model.step(chunk, full_mask, forked, pop)
        scores = np.empty(len(answers), np.float64)
        for row, answer in enumerate(answers):
            scores[row] = token_logprobs(logits[row, : len(answer)], np.array(answer, np.int64)).sum()
        offset = 0
        for it in group:
            results.append(scores[offset : offset + len(it.answers)])
            offset += len(it.answers)
        if tick:
            tick(len(group))
    return results


# --------------------------------------------------------------------------- driver


@dataclass
class EvalPlan:
    directory: str | Path
    text: str | Path | None = None  # None: lee_background.cor (fetched); "" : skip perplexity
    tasks: Sequence[str] | None = None  # None: datasets.DEFAULT_TASKS; []: skip
    sparsities: Sequence[float] = DEFAULT_SPARSITIES
    limit: int | None = None  # examples per task (None: datasets.DEFAULT_LIMIT)
    windows: int | None = DEFAULT_WINDOWS
    window: int = DEFAULT_WINDOW
    prompt: int | None = None  # default: window // 2
    batch: int = 8
    methods: Sequence[str] = METHODS
    device: str = "cpu"


@dataclass
class EvalResult:
    rows: list[EvalRow]
    info: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {**self.info, "rows": [row.to_json() for row in self.rows]}


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise PopcError(f"cannot read --text {path}: {error}") from None
    if not text.strip():
        raise PopcError(f"--text {path} is empty")
    return text


class EvalProgress(Protocol):
    """What ``run_eval`` reports to: the total work (windows + questions, per row) and steps of it."""

    def start(self, total: int) -> None: ...
    def describe(self, label: str) -> None: ...
    def advance(self, count: int) -> None: ...


def run_eval(plan: EvalPlan, progress: EvalProgress | None = None) -> EvalResult:
    """Evaluate every row of ``plan``."""
    from popc import datasets
    from popc.runtime import load

    started = time.perf_counter()
    model = load(plan.directory, device=plan.device)
    gated = bool((model.config.get("pop") or {}).get("gated", True))
    rows = [r for r in plan_rows(plan.sparsities, model.has_pop_config, gated) if r.method in plan.methods]
    if plan.batch < 1:
        raise PopcError("--batch must be at least 1")

    # Perplexity windows.
    windows = None
    text_path = None
    width = min(plan.window, model.max_positions)
    prompt = plan.prompt if plan.prompt is not None else width // 2
    if plan.text != "":
        text_path = Path(plan.text) if plan.text is not None else datasets.default_text_path()
        ids = [int(i) for i in model.tokenizer(_read_text(text_path), add_special_tokens=False)["input_ids"]]
        windows = make_windows(ids, special_prefix(model.tokenizer), width, plan.windows)
        if not 2 <= prompt < width:
            raise PopcError(f"--prompt must be in [2, {width}), got {prompt}")

    # Multiple-choice tasks.
    task_names = list(datasets.DEFAULT_TASKS if plan.tasks is None else plan.tasks)
    limit = datasets.DEFAULT_LIMIT if plan.limit is None else plan.limit
    tasks: dict[str, list[EncodedItem]] = {}
    if task_names:
        datasets.fetch_bigbench(task_names)
        for name in task_names:
            items = datasets.load_task(name, limit)
            tasks[name] = [encode_item(model.tokenizer, item, model.max_positions) for item in items]

    units = (len(windows) if windows is not None else 0) + sum(len(v) for v in tasks.values())
    tick = progress.advance if progress else None
    if progress:
        progress.start(units * len(rows))
    for row in rows:
        row_started = time.perf_counter()
        if progress:
            progress.describe(f"{METHOD_TITLES[row.method]} @ {row.sparsity:.0%}")
        if windows is not None:
            logprobs = continuation_logprobs(model, windows, prompt, row.settings, plan.batch, tick)
            row.ppl = float(math.exp(-logprobs.mean()))
            row.scored_tokens = int(logprobs.size)
        for name, items in tasks.items():
            scores = choice_loglikelihoods(model, items, row.settings, plan.batch, tick)
            correct = [int(np.argmax(s)) == it.answer for s, it in zip(scores, items)]
            row.accuracy[name] = float(np.mean(correct))
        row.seconds = time.perf_counter() - row_started

    info = {
        "export": str(model.location.directory),
        "source": model.config.get("source"),
        "pop_export": model.has_pop_config,
        # POP-prefill exports: every row runs with the deepest N layers skipped at prefill.
        "prefill_skip": (model.config.get("prefill_skip") or {}).get("layers"),
        "device": plan.device,
        "machine": f"{platform.machine()}, {_cpu_count()} CPU cores, {platform.system()}",
        "text": str(text_path) if text_path else None,
        "windows": 0 if windows is None else int(len(windows)),
        "window": width,
        "prompt": prompt,
        "tasks": {name: len(items) for name, items in tasks.items()},
        "chance": {name: float(np.mean([1 / len(it.answers) for it in items])) for name, items in tasks.items()},
        "seconds": time.perf_counter() - started,
    }
    if not model.has_pop_config:
        info["note"] = "dense export: only the dense row; export with --sparsity to evaluate POP and baselines"
    return EvalResult(rows, info)


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- output


def result_table(result: EvalResult):
    from rich.table import Table

    tasks = list(result.info["tasks"])
    table = Table(title=f"popc eval: {result.info['source'] or result.info['export']}")
    for name, justify in (("method", "left"), ("sparsity", "right"), ("r / c / k", "right"),
                          ("FFN bytes", "right")):
        table.add_column(name, justify=justify)
    if result.info["windows"]:
        table.add_column("ppl", justify="right")
    for name in tasks:
        table.add_column(f"{name}\n(chance {result.info['chance'][name]:.2f})", justify="right")
    if tasks:
        table.add_column("mean acc", justify="right")
    table.add_column("s", justify="right")
    dense_ppl = next((r.ppl for r in result.rows if r.method == "dense"), None)
    for row in result.rows:
        s = row.settings
        cells = [
            METHOD_TITLES[row.method],
            f"{row.sparsity:.0%}",
            "dense" if row.method == "dense" else f"{s.retain:.3g} / {s.candidate:.3g} / {s.keep:.3g}",
            f"{row.weight_fraction:.2f}",
        ]
        if result.info["windows"]:
            delta = "" if row.method == "dense" or not dense_ppl else f" ({row.ppl / dense_ppl - 1:+.0%})"
            cells.append(f"{row.ppl:.2f}{delta}")
        cells += [f"{row.accuracy[name]:.3f}" for name in tasks]
        if tasks:
            cells.append(f"{row.mean_accuracy:.3f}")
        cells.append(f"{row.seconds:.0f}")
        table.add_row(*cells, end_section=row.method == "dense")
    return table


def plot(result: EvalResult, path: str | Path) -> None:
    """Perplexity and mean accuracy against the FFN weight bytes a decode step reads."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PopcError("--plot needs matplotlib: pip install matplotlib") from None
    panels = []
    if result.info["windows"]:
        panels.append(("ppl", "continuation perplexity (log)"))
    if result.info["tasks"]:
        panels.append(("mean_accuracy", "mean multiple-choice accuracy"))
    if not panels:
        raise PopcError("nothing to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for method in METHODS:
            points = sorted(
                (r.weight_fraction, r.ppl if key == "ppl" else r.mean_accuracy)
                for r in result.rows if r.method == method
            )
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, "*" if method == "dense" else "o-", label=METHOD_TITLES[method], markersize=10 if method == "dense" else 6)
        if key == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("FFN weight bytes read per decode step (fraction of dense)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(str(result.info["source"] or result.info["export"])[:100], fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as error:
        raise PopcError(f"cannot write --plot {path}: {error}") from None
    finally:
        plt.close(fig)
