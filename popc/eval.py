"""``popc eval``: continuation perplexity and multiple-choice accuracy, dense vs POP vs baselines.

Every row runs from one export: a POP export takes its region sizes (``pop_config``)
as a graph input, so dense, POP and the baselines are just different settings. Every
scored token is scored in decode mode, so pruning acts as in generation (see
:mod:`popc.scoring`).

The defaults finish in minutes on a laptop CPU: every method at one sparsity, a few
windows and questions. :meth:`EvalPlan.full` (``popc eval --full``) is the whole
matrix the README reports.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from popc import datasets
from popc.errors import PopcError
from popc.fidelity import Fidelity, score_windows
from popc.pop import PopSettings
from popc.progress import Progress, or_silent

# Re-exported: the scoring functions were defined here before popc.scoring existed.
from popc.scoring import (  # noqa: F401
    EncodedItem,
    choice_loglikelihoods,
    continuation_logprobs,
    encode_item,
    make_windows,
    special_prefix,
    token_logprobs,
)
from popc.textfile import read_text_file

METHODS = ("dense", "pop", "griffin", "dynamic", "static", "pop-output", "dynamic-output")
METHOD_TITLES = {
    "dense": "dense",
    "pop": "POP",
    "griffin": "GRIFFIN-style (c=0)",
    "dynamic": "per-token dynamic (r=0, c=1)",
    "static": "static structured",
    # The same selections with output-aware scores (activation x |down row|), see templates/pop_ffn.py.
    "pop-output": "POP, output-aware",
    "dynamic-output": "per-token dynamic, output-aware",
    "split": "split",  # a --split row: the regions as given
}
# A row's default: the paper's five (the output-aware twins cost a row each; ask for them).
DEFAULT_METHODS = METHODS[:5]
# Defaults: every method at one sparsity, sized to take a few minutes on 2 CPU cores.
DEFAULT_SPARSITIES = (0.5,)
DEFAULT_WINDOW = 256
DEFAULT_WINDOWS = 8
# The task where SmolLM2-135M (dense) is furthest above chance (0.8 vs 0.2): questions cost
# ~10x a perplexity window's tokens, so the quick default asks few of them.
DEFAULT_TASKS = ("emoji_movie",)
DEFAULT_LIMIT = 10  # questions per task
# `--full`: the whole matrix (tens of minutes on 2 cores).
FULL_MATRIX: dict[str, Any] = {
    "sparsities": (0.25, 0.5, 0.75),
    "windows": 24,
    "tasks": datasets.DEFAULT_TASKS,
    "limit": datasets.DEFAULT_LIMIT,
    "methods": METHODS,
}


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
    if method in ("pop-output", "dynamic-output"):
        return dataclasses.replace(method_settings(method.removesuffix("-output"), sparsity), score="output")
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


# The accuracy peers: other runtimes' quantized builds, scored on the same windows and questions.
GENAI_INT4 = "ort-genai-int4"
PEERS = (GENAI_INT4,)
QUANT_METHODS = ("dense", "pop")  # the rows of each extra quantized export
FP32 = "fp32"


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
    # The weights it ran on: "fp32", a popc quantization scheme ("int4", "int8"), or a peer
    # (another runtime's build: "ort-genai-int4").
    weights: str = FP32
    fidelity: Fidelity | None = None  # KL to dense, top-1 agreement, intervals (with ppl)
    ms_per_token: float | None = None  # --sweep: measured decode cost
    front: list[str] = field(default_factory=list)  # --sweep: the Pareto fronts it is on
    reproduce: str | None = None  # --sweep: the popc eval command that scores this row alone

    @property
    def title(self) -> str:
        if self.weights in PEERS:
            return "onnxruntime-genai int4 (dense)"
        title = METHOD_TITLES[self.method]
        if self.method == "split":
            score = self.settings.score if not self.settings.static else "static"
            title = f"split ({score})"
        return title + ("" if self.weights == FP32 else f" {self.weights}")

    @property
    def mean_accuracy(self) -> float | None:
        return float(np.mean(list(self.accuracy.values()))) if self.accuracy else None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "title": self.title,
            "weights": self.weights,
            "sparsity": self.sparsity,
            "retain": self.settings.retain,
            "candidate": self.settings.candidate,
            "keep": self.settings.keep,
            "static": self.settings.static,
            "score": self.settings.score,
            "weight_fraction": self.weight_fraction,
            "ms_per_token": self.ms_per_token,
            "front": self.front,
            "reproduce": self.reproduce,
            "fidelity": self.fidelity.to_json() if self.fidelity else None,
            "ppl": self.ppl,
            "scored_tokens": self.scored_tokens,
            "accuracy": self.accuracy,
            "mean_accuracy": self.mean_accuracy,
            "seconds": self.seconds,
        }


def plan_rows(
    sparsities: Sequence[float],
    has_pop: bool,
    gated: bool = True,
    methods: Sequence[str] = METHODS,
    splits: Sequence[PopSettings] = (),
    sweep: bool = False,
    grid: str = "full",
) -> list[EvalRow]:
    """Dense first, then each method at each sparsity (POP exports only): one row each, or
    with ``sweep`` every point of :func:`popc.sweep.sweep_points`; then the ``splits``."""
    for sparsity in sparsities:  # checked on a dense export too: a wrong option is never ignored
        if not 0.0 < sparsity < 1.0:
            raise PopcError(f"--sparsities must be in (0, 1), got {sparsity}")
    rows = [EvalRow("dense", 0.0, PopSettings(retain=1.0), 1.0)] if "dense" in methods else []
    if not has_pop:
        if splits or sweep:
            raise PopcError("--split and --sweep need a POP export (popc export --sparsity S): a dense one has no regions")
        return rows
    if sweep:
        from popc.sweep import sweep_points

        points = sweep_points(sparsities, [m for m in methods if m != "dense"], gated, grid)
    else:
        points = [(m, s, method_settings(m, s)) for m in methods if m != "dense" for s in sparsities]
    points += [("split", split.sparsity, split) for split in splits]
    rows += [EvalRow(method, sparsity, settings, weight_fraction(settings, gated)) for method, sparsity, settings in points]
    return rows


def parse_split(text: str) -> PopSettings:
    """``R/C/K`` fractions, optionally ``:output`` (output-aware scores) or ``:static``."""
    body, _, score = text.strip().partition(":")
    try:
        retain, candidate, keep = (float(v) for v in body.split("/"))
    except ValueError:
        raise PopcError(f"--split takes R/C/K fractions (e.g. 0.125/0.75/0.375[:output]), got {text!r}") from None
    if score not in ("", "activation", "output", "static"):
        raise PopcError(f"--split score must be activation, output or static, got {score!r} in {text!r}")
    if score == "static":
        return PopSettings(retain=retain, candidate=candidate, keep=keep, static=True)
    return PopSettings(retain=retain, candidate=candidate, keep=keep, score=score or "activation")


# --------------------------------------------------------------------------- driver


@dataclass
class EvalPlan:
    """What one ``popc eval`` run measures; the defaults take minutes, :meth:`full` the whole matrix."""

    directory: str | Path
    text: str | Path | None = None  # None: lee_background.cor (fetched); "" : skip perplexity
    tasks: Sequence[str] | None = None  # None: DEFAULT_TASKS; []: skip
    sparsities: Sequence[float] = DEFAULT_SPARSITIES
    limit: int | None = DEFAULT_LIMIT  # questions per task (None: every one)
    windows: int | None = DEFAULT_WINDOWS  # None: every window the text holds
    window: int = DEFAULT_WINDOW
    prompt: int | None = None  # default: window // 2
    batch: int = 8
    methods: Sequence[str] = DEFAULT_METHODS
    device: str = "cpu"
    splits: Sequence[PopSettings] = ()  # extra rows with these exact regions (--split)
    # Every method over a grid of splits, each timed (decode ms/token, op library) and
    # placed on the KL-vs-cost Pareto front (popc.sweep).
    sweep: bool = False
    grid: str = "full"  # --sweep's grid: "full" or "defaults" (popc.sweep.GRIDS)
    # Quantization schemes ("int4", "int8"): popc's export of the same model in each (exported
    # once into the bench cache, POP if DIR is POP) adds its dense and POP rows.
    quant: Sequence[str] = ()
    # Other runtimes' quantized builds scored the same way: "ort-genai-int4".
    peers: Sequence[str] = ()

    @classmethod
    def full(cls, directory: str | Path, **overrides: Any) -> EvalPlan:
        """The whole matrix (:data:`FULL_MATRIX`); ``overrides`` still win."""
        return cls(directory, **{**FULL_MATRIX, **overrides})


@dataclass
class EvalResult:
    rows: list[EvalRow]
    info: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {**self.info, "rows": [row.to_json() for row in self.rows]}


def _read_text(path: Path) -> str:
    text = read_text_file(path, "--text", errors="replace")
    if not text.strip():
        raise PopcError(f"--text {path} is empty")
    return text


def _perplexity_windows(
    plan: EvalPlan, model: Any, width: int, progress: Progress, text: str | None = None
) -> tuple[np.ndarray, Path]:
    progress.stage("reading the perplexity text")
    text_path = Path(plan.text) if plan.text is not None else datasets.default_text_path()
    text = text if text is not None else _read_text(text_path)
    ids = [int(i) for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]]
    return make_windows(ids, special_prefix(model.tokenizer), width, plan.windows), text_path


def _choice_tasks(plan: EvalPlan, model: Any, progress: Progress) -> dict[str, list[EncodedItem]]:
    names = list(DEFAULT_TASKS if plan.tasks is None else plan.tasks)
    if not names:
        return {}
    progress.stage(f"reading {len(names)} BIG-bench tasks")
    datasets.fetch_bigbench(names)
    return {
        name: [encode_item(model.tokenizer, item, model.max_positions) for item in datasets.load_task(name, plan.limit)]
        for name in names
    }


def run_eval(plan: EvalPlan, progress: Progress | None = None) -> EvalResult:
    """Evaluate every row of ``plan``; ``progress`` gets a stage per row, advanced per window / question."""
    from popc.runtime import load

    progress = or_silent(progress)
    started = time.perf_counter()
    if plan.batch < 1:
        raise PopcError("--batch must be at least 1")
    bad = [q for q in plan.quant if q not in ("int4", "int8")] + [p for p in plan.peers if p not in PEERS]
    if bad:
        raise PopcError(f"unknown --quant / --peers {', '.join(bad)}; --quant takes int4,int8, --peers {', '.join(PEERS)}")
    unknown = [m for m in plan.methods if m not in METHODS]
    if unknown or not (plan.methods or plan.splits):
        raise PopcError(f"--methods takes names from {', '.join(METHODS)}; got {', '.join(plan.methods) or 'none'}")
    if plan.device == "cuda" and plan.quant:
        raise PopcError("--quant exports run on the CPU only: drop --quant with --device cuda")
    if plan.sweep and (plan.quant or plan.peers or plan.text == ""):
        raise PopcError("--sweep scores one export's rows on perplexity text: drop --quant / --peers / --windows 0")
    plan_rows(plan.sparsities, has_pop=False, methods=())  # the sparsities are checked before the model loads
    given_text = _read_text(Path(plan.text)) if plan.text else None  # a wrong --text fails before the load
    progress.stage(f"loading {plan.directory}")
    model = load(plan.directory, device=plan.device)
    gated = bool((model.config.get("pop") or {}).get("gated", True))
    rows = plan_rows(plan.sparsities, model.has_pop_config, gated, plan.methods, plan.splits, plan.sweep, plan.grid)

    windows, text_path = None, None
    width = min(plan.window, model.max_positions)
    prompt = plan.prompt if plan.prompt is not None else width // 2
    if plan.text != "":
        windows, text_path = _perplexity_windows(plan, model, width, progress, given_text)
        if not 2 <= prompt < width:
            raise PopcError(f"--prompt must be in [2, {width}), got {prompt}")
    tasks = _choice_tasks(plan, model, progress)

    own = (model.config.get("quant") or {}).get("scheme")
    for row in rows:
        row.weights = own or FP32
    models: list[tuple[Any, list[EvalRow], int]] = [(model, rows, plan.batch)]
    models += _quantized_models(plan, model, [q for q in plan.quant if q != own], gated, progress)
    models += _peer_models(plan, model, progress)
    pairs = [(scorer, row) for scorer, group, _ in models for row in group]

    if windows is not None:  # every row's perplexity and KL in one pass: dense once per batch
        progress.stage(f"perplexity and KL to dense: {len(windows)} windows x {len(pairs)} rows")
        progress.start(len(windows) * len(pairs))
        started_ppl = time.perf_counter()
        scores = score_windows(model, [(scorer, row.settings) for scorer, row in pairs], windows, prompt, plan.batch, progress)
        for (_, row), got in zip(pairs, scores):
            row.fidelity = Fidelity.of(got)
            row.ppl, row.scored_tokens = row.fidelity.ppl, row.fidelity.tokens
            row.seconds = (time.perf_counter() - started_ppl) / len(pairs)
    every = [row for _, row in pairs]
    number = 0
    for scorer, group, batch in models if tasks else ():
        for row in group:
            number += 1
            row_started = time.perf_counter()
            progress.stage(f"questions, row {number}/{len(every)}: {row.title} @ {row.sparsity:.0%}")
            progress.start(sum(len(v) for v in tasks.values()))
            for name, items in tasks.items():
                scores = choice_loglikelihoods(scorer, items, row.settings, batch, progress)
                correct = [int(np.argmax(s)) == it.answer for s, it in zip(scores, items)]
                row.accuracy[name] = float(np.mean(correct))
            row.seconds += time.perf_counter() - row_started
    rows = every
    if plan.sweep:
        _time_rows(plan, model, rows, windows, prompt, progress)

    info = {
        "export": str(model.location.directory),
        "source": model.config.get("source"),
        "pop_export": model.has_pop_config,
        # POP-prefill exports: every row runs with the deepest N layers skipped at prefill.
        "prefill_skip": (model.config.get("prefill_skip") or {}).get("layers"),
        "device": plan.device,
        "dtype": model.config.get("dtype", "float32"),
        "gpu": _gpu_name() if plan.device == "cuda" else None,
        "machine": f"{platform.machine()}, {_cpu_count()} CPU cores, {platform.system()}",
        "text": str(text_path) if text_path else None,
        "windows": 0 if windows is None else len(windows),
        "scored_tokens": 0 if windows is None else int(windows.shape[0] * (width - prompt)),
        "kl_reference": "the dense rows of this export (pop_config dense), the same windows",
        "window": width,
        "prompt": prompt,
        "tasks": {name: len(items) for name, items in tasks.items()},
        "chance": {name: float(np.mean([1 / len(it.answers) for it in items])) for name, items in tasks.items()},
        "seconds": time.perf_counter() - started,
        "quant": {row.weights: None for row in rows},
    }
    info["quant"] = {name: _scheme_config(model, name) for name in info["quant"]}
    if not model.has_pop_config:
        info["note"] = "dense export: only the dense row; export with --sparsity to evaluate POP and baselines"
    return EvalResult(rows, info)


def _time_rows(plan: EvalPlan, model: Any, rows: list[EvalRow], windows: Any, prompt: int, progress: Progress) -> None:
    """--sweep: each row's decode ms/token with the op library, then the Pareto fronts."""
    from popc.bench.machine import default_threads
    from popc.sweep import decode_ms, mark_fronts, reproduce_command

    progress.stage(f"timing decode of {len(rows)} rows (op library, batch 1)")
    timed_prompt = [int(i) for i in windows[0][: min(PROMPT_TIMED, prompt)]]
    timed = decode_ms(model.location.directory, [r.settings for r in rows], timed_prompt, default_threads(), plan.device)
    for row, ms in zip(rows, timed):
        row.ms_per_token = ms
    mark_fronts(rows)
    for row in rows:
        row.reproduce = reproduce_command(str(plan.directory), row.settings, len(windows), windows.shape[1], prompt, plan.text)


PROMPT_TIMED = 128


def _quantized_models(
    plan: EvalPlan, model: Any, schemes: Sequence[str], gated: bool, progress: Progress
) -> list[tuple[Any, list[EvalRow], int]]:
    """popc's export of the same model in each scheme (POP where the plan's export is POP,
    cached like ``popc bench``'s), with its dense and POP rows."""
    from popc.bench.exports import _cached_export, model_spec
    from popc.quantize import QuantScheme
    from popc.runtime import load

    out = []
    spec = model_spec(model.config)
    kind = "pop" if model.has_pop_config else "dense"
    for name in schemes:
        path = _cached_export(spec, model.config, kind, progress, QuantScheme.parse(name))
        progress.stage(f"loading the {name} export {path}")
        quantized = load(path, device=plan.device)
        rows = [r for r in plan_rows(plan.sparsities, quantized.has_pop_config, gated)
                if r.method in plan.methods and r.method in QUANT_METHODS]  # fmt: skip
        for row in rows:
            row.weights = name
        out.append((quantized, rows, plan.batch))
    return out


def _peer_models(plan: EvalPlan, model: Any, progress: Progress) -> list[tuple[Any, list[EvalRow], int]]:
    """onnxruntime-genai's int4 CPU build of the same model (its builder, cached like the
    bench's peer), its logits through ONNX Runtime (:class:`popc.scoring.OnnxDecoder`), with
    popc's tokenizer: one dense row. Questions one at a time (GroupQueryAttention reads
    positions off the mask's length, so no left padding)."""
    from popc.bench.exports import model_spec
    from popc.bench.peers import genai_model
    from popc.scoring import OnnxDecoder

    out = []
    for peer in plan.peers:
        built = genai_model(model_spec(model.config), progress, precision="int4")
        decoder = OnnxDecoder(built / "model.onnx", model.tokenizer, model.max_positions, model.pad_token_id)
        out.append((decoder, [EvalRow("dense", 0.0, PopSettings(retain=1.0), 1.0, weights=peer)], 1))
    return out


def _scheme_config(model: Any, name: str) -> dict[str, Any] | None:
    """popc.json's quant section of a scheme's rows (None: fp32, or a peer's own build)."""
    from popc.quantize import QuantScheme

    own = model.config.get("quant") or {}
    if own.get("scheme") == name:
        return own
    return QuantScheme.parse(name).config() if name in ("int4", "int8") else None


def _gpu_name() -> str | None:
    from popc.bench.machine import gpu_name

    return gpu_name()


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
