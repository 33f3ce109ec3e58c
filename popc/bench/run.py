"""One bench run: set up every variant's runner, time them round-robin, take paired ratios.

Every variant gets the same random prompts and the same thread count. Within one TTFT
length or one decode batch size the variants run interleaved, round by round, so a shared
host's drift hits all of them alike; a ratio between two variants is then the median of
their per-round ratios (paired), not the ratio of two medians.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from popc.bench import memory as measure
from popc.bench.bytes_model import bytes_key, bytes_model, model_bytes
from popc.bench.exports import BenchExports, model_spec, resolve_exports
from popc.bench.machine import machine_info, read_bandwidth
from popc.bench.plan import (
    DENSE_GENAI_RUNTIME,
    DENSE_VARIANTS,
    GENAI_INT4,
    GENAI_VARIANT,
    LABELS,
    LLAMA_CPP,
    ORT_VARIANTS,
    PEERS,
    QUANT_PEERS,
    QUANT_SCHEMES,
    TORCH_VARIANTS,
    BenchPlan,
    is_quantized,
    split_variant,
)
from popc.bench.result import BenchResult, BenchSettings, BytesRead, DecodeRow, FastestPeer, Timing, TtftRow
from popc.bench.runners import OrtRunner, Runner, TorchRunner
from popc.errors import PopcError
from popc.pop import PopSettings
from popc.progress import Progress, or_silent

# Let the previous job's thread pools (ORT's spin-waiting workers, PyTorch's OpenMP team)
# go idle before the next job starts: else they steal its cores.
SETTLE_SECONDS = 0.2
# The dense ORT variants run side by side at the start of each round: their ratios pair closest.
FIRST_IN_ROUND = (
    "dense-ort",
    GENAI_VARIANT,
    DENSE_GENAI_RUNTIME,
    *(f"dense-ort-{q}" for q in QUANT_SCHEMES),
    GENAI_INT4,
)


def run_bench(plan: BenchPlan, progress: Progress | None = None) -> BenchResult:
    """Measure TTFT and decode of every variant in ``plan`` (see ``popc.bench``)."""
    from popc.defaults import settings_for_sparsity

    progress = or_silent(progress)
    named = plan.variants is not None  # named variants that cannot run are errors, not skips
    plan = plan.resolved()
    started = time.perf_counter()
    exports = resolve_exports(plan, progress)
    info = machine_info(plan.threads, plan.device)
    progress.stage("measuring read bandwidth")
    bandwidth = read_bandwidth()
    max_positions = int(exports.config.get("max_positions") or 1 << 30)
    lengths = [n for n in plan.prompt_lengths if n + 1 < max_positions]

    weights = weights_read(exports, plan.sparsities)
    runners, skipped_variants = make_runners(plan, exports, named, progress)
    for variant, runner in runners.items():  # another runtime's int4 build: its own graph's bytes
        if variant == GENAI_INT4 and (runner.directory / "model.onnx").is_file():
            weights[variant] = model_bytes(runner.directory / "model.onnx")
    llama = None
    if LLAMA_CPP in plan.variants:
        llama, why = llama_cpp_peer(exports.spec, named, progress)
        if llama is None:
            skipped_variants[LLAMA_CPP] = why
    vocab = next(iter(runners.values())).vocab
    rng = np.random.default_rng(plan.seed)

    def settings(variant: str, sparsity: float | None) -> PopSettings | None:
        if variant in DENSE_VARIANTS:
            return None
        # TTFT (sparsity None): prefill runs POP's FFNs dense at any sparsity; 50 % stands for all.
        return settings_for_sparsity(sparsity if sparsity else 0.5)

    # TTFT: batch 1, every variant the same random prompt, unpadded.
    prefill: list[TtftRow] = []
    for length in lengths:
        ids, mask = random_prompt(rng, vocab, 1, length)
        jobs = {
            variant: runner.prefill(ids, mask, settings(variant, None))
            for variant, runner in runners.items()
            if not (variant in TORCH_VARIANTS and plan.torch_max_prompt and length > plan.torch_max_prompt)
        }
        progress.stage(f"TTFT {length:>5} tokens: {', '.join(LABELS.get(v, v) for v in jobs)} (interleaved)")
        timings = interleaved(jobs, plan.warmup, prefill_repeats(plan.repeats, length), progress)
        prefill += [TtftRow(variant, length, timing) for variant, timing in timings.items()]

    # Decode at each batch size (equal-length random prompts, no padding): dense variants
    # once, POP variants at each sparsity.
    decode: list[DecodeRow] = []
    for batch in plan.batches:
        ids, mask = random_prompt(rng, vocab, batch, plan.decode_prompt)
        jobs = {}
        for variant, runner in runners.items():
            for sparsity in [None] if variant in DENSE_VARIANTS else plan.sparsities:
                jobs[(variant, sparsity)] = runner.decode(ids, mask, plan.decode_tokens, settings(variant, sparsity))
        progress.stage(f"decode batch {batch}: {len(jobs)} variants (interleaved)")
        for (variant, sparsity), timing in interleaved(jobs, plan.warmup, plan.repeats, progress).items():
            decode.append(DecodeRow(variant, sparsity or 0.0, batch, timing))

    # Peak memory: every variant alone in a fresh process (this one holds them all). This
    # process lets its models go first, so that the children do not share the host with them.
    timed = list(runners)
    memory_jobs = measure.memory_jobs(plan, exports, runners)
    del jobs, runner  # the loops' last timed closures and runner
    runners.clear()
    gc.collect()
    from popc.bench import llama_cpp

    if llama is not None:  # llama-bench times itself (not round-robin): with this process's models gone
        time.sleep(SETTLE_SECONDS)
        progress.stage(f"{LABELS[LLAMA_CPP]}: llama-bench -t {plan.threads} (prompts {', '.join(map(str, lengths))})")
        ttft_rows, decode_rows = llama.measure(
            plan.threads, lengths, llama_cpp.GEN_TOKENS, plan.repeats, depth=plan.decode_prompt
        )
        prefill += ttft_rows
        decode += decode_rows
        timed.append(LLAMA_CPP)
    if memory_jobs:
        progress.stage(f"peak memory: {len(memory_jobs)} fresh processes, one per variant and batch size")
    memory = measure.measure_all(memory_jobs, progress)

    # The roofline divides by the host's read bandwidth: it says nothing of a GPU's.
    roofline_gbs = bandwidth.gbs if plan.device == "cpu" else None
    fastest_ttft, fastest_decode, quant_ttft, quant_decode = add_ratios(prefill, decode, weights, roofline_gbs)
    info.load_average_end = list(os.getloadavg())
    info.seconds = round(time.perf_counter() - started, 1)
    return BenchResult(
        model=model_spec(exports.config),
        exports={
            "dense": _str(exports.dense),
            "pop": _str(exports.pop),
            **{
                f"{kind}-{scheme}": _str(path)
                for scheme, pair in exports.quantized.items()
                for kind, path in zip(("dense", "pop"), pair)
                if path is not None
            },
        },  # fmt: skip
        machine=info,
        settings=BenchSettings(
            prompt_lengths=lengths,
            skipped_prompt_lengths=[n for n in plan.prompt_lengths if n not in lengths],
            batches=list(plan.batches),
            sparsities=list(plan.sparsities),
            pop_settings={f"{s:g}": vars(settings_for_sparsity(s)) for s in plan.sparsities},
            repeats=plan.repeats,
            warmup=plan.warmup,
            decode_tokens=plan.decode_tokens,
            decode_prompt=plan.decode_prompt,
            variants=timed,
            skipped_variants=skipped_variants,
            memory_batches=list(plan.memory_batches or ()),
            quant={name: scheme.config() for name, scheme in exports.schemes.items()},
            dtype=plan.dtype or "float32",
        ),
        bandwidth=bandwidth,
        bytes=weights,
        prefill=prefill,
        decode=decode,
        fastest_ttft_peer=fastest_ttft,
        fastest_decode_peer=fastest_decode,
        memory=memory,
        fastest_ttft_quant_peer=quant_ttft,
        fastest_decode_quant_peer=quant_decode,
    )


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def make_runners(
    plan: BenchPlan, exports: BenchExports, named: bool, progress: Progress | None = None
) -> tuple[dict[str, Runner], dict[str, str]]:
    """A runner per variant of a resolved ``plan`` that can run here, every one with
    ``plan.threads``, in round-robin order; and the variants skipped, with why. ``named``:
    the caller chose the variants, so an onnxruntime-genai build that fails is an error."""
    from popc.bench.peers import GenaiRunner, genai_available, genai_model
    from popc.export import GENAI_CONFIG_NAME

    progress = or_silent(progress)
    threads, device, variants = plan.threads, plan.device, plan.variants
    if threads is None:
        raise ValueError("make_runners takes a resolved plan (BenchPlan.resolved())")
    runners: dict[str, Runner] = {}
    skipped: dict[str, str] = {}

    def skip(variant: str, why: str) -> None:
        progress.stage(f"{variant} skipped: {why}")
        skipped[variant] = why

    for variant in variants:  # popc's exports: fp32, then each quantization scheme
        base, _ = split_variant(variant)
        path = exports.path_of(variant) if base in ORT_VARIANTS else None
        if path is None:
            continue
        runner = OrtRunner(path, threads, device, use_oplib=base == "pop-oplib")
        if base == "pop-oplib" and not runner.uses_oplib:
            skip(variant, "the popc op library is not available (popc doctor --build)")
            continue
        runners[variant] = runner
    if any(v in variants for v in TORCH_VARIANTS):
        torch_runner = TorchRunner(exports.spec, threads, progress)  # one model serves both
        runners.update({v: torch_runner for v in TORCH_VARIANTS if v in variants})
    for variant, precision in ((GENAI_VARIANT, "fp32"), (GENAI_INT4, "int4")):
        if variant not in variants:
            continue
        try:
            built = genai_model(exports.spec, progress, precision=precision, device=device)
            runners[variant] = GenaiRunner(built, threads, device, progress)
        except PopcError as error:
            if named:
                raise
            skip(variant, str(error))
    if DENSE_GENAI_RUNTIME in variants and exports.dense:
        if genai_available() and (exports.dense / GENAI_CONFIG_NAME).is_file():
            runners[DENSE_GENAI_RUNTIME] = GenaiRunner(exports.dense, threads, device, progress)
        else:
            skip(DENSE_GENAI_RUNTIME, f"needs onnxruntime-genai and a fused dense export (its {GENAI_CONFIG_NAME})")
    if not runners:
        raise PopcError("nothing to measure: no variant could be set up")
    order = sorted(runners, key=lambda v: FIRST_IN_ROUND.index(v) if v in FIRST_IN_ROUND else len(FIRST_IN_ROUND))
    return {v: runners[v] for v in order}, skipped


def weights_read(exports: BenchExports, sparsities: Sequence[float]) -> dict[str, BytesRead]:
    """The bytes model of every popc export of the run: fp32 and each quantization scheme."""
    from popc.artifact import read_export
    from popc.defaults import settings_for_sparsity

    weights: dict[str, BytesRead] = {}
    for scheme, (dense, pop) in [(None, (exports.dense, exports.pop)), *exports.quantized.items()]:
        pop_location, pop_config = read_export(pop) if pop else (None, {})
        channels = int(pop_config.get("pop", {}).get("intermediate_size") or 0)
        dense_path = read_export(dense)[0].model_path if dense else None
        weights.update(bytes_model(
            dense_path, pop_location.model_path if pop_location else None, channels, sparsities,
            settings_for_sparsity, quant=scheme,
        ))  # fmt: skip
    return weights


def llama_cpp_peer(spec: str, named: bool, progress: Progress) -> tuple[Any, str]:
    """llama.cpp's llama-bench on a Q4_0 GGUF of ``spec`` (:mod:`popc.bench.llama_cpp`), or
    None and why not (no llama-bench found: the row is left out; named, that is an error)."""
    from popc.bench import llama_cpp

    try:
        return llama_cpp.LlamaCppPeer.prepare(spec, progress), ""
    except PopcError as error:
        if named and not isinstance(error, llama_cpp.NotFound):
            raise
        progress.stage(f"{LLAMA_CPP} skipped: {error}")
        return None, str(error)


def bytes_key_of(variant: str, sparsity: float) -> str:
    """The bytes-model key of a decode row: popc's exports by scheme and sparsity; another
    runtime's quantized build by its variant name."""
    if variant in QUANT_PEERS:
        return variant
    return bytes_key(sparsity, split_variant(variant)[1])


def random_prompt(rng: np.random.Generator, vocab: int, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(10, max(11, vocab - 1), (batch, length), dtype=np.int64)
    return ids, np.ones_like(ids)


def prefill_repeats(repeats: int, length: int) -> int:
    """Fewer repeats for long prompts (at least 2): a 2048-token prefill takes seconds."""
    return max(2, min(repeats, math.ceil(repeats * 256 / max(length, 1))))


def interleaved(
    jobs: dict[Hashable, Callable[[], float]], warmup: int, repeats: int, progress: Progress | None = None
) -> dict[Hashable, Timing]:
    """Time every job ``repeats`` times, round-robin: the machine's drift over the run (a
    shared host's bandwidth moves by a third within minutes) then hits all of them alike."""
    progress = or_silent(progress)
    progress.start(len(jobs) * (warmup + repeats))
    for fn in jobs.values():
        for _ in range(warmup):
            fn()
            progress.advance()
    samples: dict[Hashable, list[float]] = {key: [] for key in jobs}
    for _ in range(repeats):
        for key, fn in jobs.items():
            time.sleep(SETTLE_SECONDS)
            samples[key].append(fn())
            progress.advance()
    return {key: Timing.of(values) for key, values in samples.items()}


# ---- ratios -----------------------------------------------------------------------------
def paired_ratio(timing: Timing | None, base: Timing | None) -> float | None:
    """``timing / base``: the median of per-round ratios when both were timed in the same
    interleaved rounds (paired: the host's drift from round to round cancels), else the
    ratio of the medians."""
    if timing is None or base is None or not base.median:
        return None
    ours, theirs = timing.samples, base.samples
    if ours and len(ours) == len(theirs) and all(t > 0 for t in theirs):
        return float(np.median(np.asarray(ours) / np.asarray(theirs)))
    return timing.median / base.median


def fastest_peers(
    rows: list[TtftRow] | list[DecodeRow], key: str, peers: Sequence[str] = PEERS
) -> dict[int, FastestPeer]:
    """Per prompt length (``key="prompt"``) or batch size (``"batch"``): the fastest dense peer
    (of ``peers``: the fp32 ones, or the quantized ones) by median."""
    best: dict[int, FastestPeer] = {}
    for row in rows:
        ms = (row.ms if isinstance(row, TtftRow) else row.ms_per_step).median
        at = getattr(row, key)
        # > 0: HF eager's decode (a difference of two runs) can come out 0, which is no measurement.
        if row.variant in peers and ms > 0 and (at not in best or ms < best[at].ms):
            best[at] = FastestPeer(row.variant, ms)
    return best


def add_ratios(
    prefill: list[TtftRow], decode: list[DecodeRow], weights: dict[str, BytesRead], gbs: float | None
) -> tuple[dict[int, FastestPeer], dict[int, FastestPeer], dict[int, FastestPeer], dict[int, FastestPeer]]:
    """Fill in each row's ratios against dense ORT (fp32) and against the fastest dense peer of
    the same run (paired per round, see :func:`paired_ratio`): fp32 rows against the fp32
    peers, quantized rows against the quantized peers (ort-genai-int4, llama.cpp-q4_0); and the
    bytes model of each batch-1 decode row (its roofline only with a bandwidth ``gbs``). Returns the fastest fp32 peer per prompt length
    and per batch size, then the fastest quantized peer per prompt length and batch size."""
    ttft_of = {(r.variant, r.prompt): r.ms for r in prefill}
    best_ttft = fastest_peers(prefill, "prompt")
    quant_ttft = fastest_peers(prefill, "prompt", QUANT_PEERS)
    for row in prefill:
        row.vs_dense = paired_ratio(row.ms, ttft_of.get(("dense-ort", row.prompt)))
        peer = (quant_ttft if is_quantized(row.variant) else best_ttft).get(row.prompt)
        row.best_peer = peer.variant if peer else None
        # below 1: faster than the peer
        row.vs_best_peer = paired_ratio(row.ms, ttft_of.get((peer.variant, row.prompt))) if peer else None
    step_of = {(r.variant, r.batch): r.ms_per_step for r in decode if r.sparsity == 0}
    best_decode = fastest_peers(decode, "batch")
    quant_decode = fastest_peers(decode, "batch", QUANT_PEERS)
    dense_read = weights.get("dense")
    for row in decode:
        ms = row.ms_per_step.median
        row.tokens_per_s = row.batch * 1000 / ms if ms else None
        dense = step_of.get(("dense-ort", row.batch))
        row.speedup = paired_ratio(dense, row.ms_per_step) if dense and ms else None
        peer = (quant_decode if is_quantized(row.variant) else best_decode).get(row.batch)
        row.best_peer = peer.variant if peer else None
        # a speedup: above 1 is faster than the peer
        row.vs_best_peer = paired_ratio(step_of[(peer.variant, row.batch)], row.ms_per_step) if peer and ms else None
        read = weights.get(bytes_key_of(row.variant, row.sparsity))
        if read and row.batch == 1:
            row.bytes_ffn, row.bytes_total = read.ffn, read.total
            if gbs:
                row.roofline_ms = read.total / (gbs * 1e9) * 1000
                row.roofline_fraction = row.roofline_ms / ms if ms else None
            row.ideal_speedup = dense_read.total / read.total if dense_read else None
    return best_ttft, best_decode, quant_ttft, quant_decode
