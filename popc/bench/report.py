"""Every way a :class:`BenchResult` is shown: rich tables, Markdown, a plot, JSON.

The console tables and the Markdown are two renderings of the same :class:`Grid`s (same
columns, same cell text), so they cannot disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popc.atomic import atomic_file, atomic_write
from popc.bench.plan import DENSE_GENAI_RUNTIME, GENAI_INT4, GENAI_VARIANT, LABELS, LLAMA_CPP, QUANT_SCHEMES
from popc.bench.result import BenchResult, DecodeRow, FastestPeer, MemoryRow, Timing

NONE = "—"


@dataclass
class Grid:
    """One table as text: its title, column names, body rows and dimmed footer rows."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    footer: list[list[str]] = field(default_factory=list)
    note: str = ""  # what its columns mean, beyond the run's common notes


# ---- cells ------------------------------------------------------------------------------
def _timing(timing: Timing, digits: int = 1) -> str:
    return f"{timing.median:.{digits}f} ({timing.low:.{digits}f}–{timing.high:.{digits}f})"


def _times(ratio: float | None) -> str:
    return f"{ratio:.2f}×" if ratio else NONE


def _megabytes(row: DecodeRow | None) -> str:
    """Weights one decode step reads, MB, and the FFN's share (unknown without a POP export)."""
    if row is None or not row.bytes_total:
        return NONE
    ffn = f"{row.bytes_ffn / 1e6:.0f}" if row.bytes_ffn is not None else "?"
    return f"{row.bytes_total / 1e6:.0f} ({ffn})"


def _memory(row: MemoryRow | None) -> str:
    """Peak resident MiB, and in brackets what the variant added to its bare process."""
    if row is None or row.peak_mib is None:
        return NONE
    over = row.over_baseline_mib
    return f"{row.peak_mib:.0f}" + (f" (+{over:.0f})" if over is not None else "")


def label(variant: str) -> str:
    """A variant's name in the tables (its own name where it has no label)."""
    return LABELS.get(variant, variant)


def _peer(peer: FastestPeer | None) -> str:
    return label(peer.variant) if peer else NONE


def _sparsity(sparsity: float) -> str:
    return f"{sparsity:.0%}" if sparsity else "dense"


def _versions(result: BenchResult) -> str:
    info = result.machine
    genai = f", onnxruntime-genai {info.onnxruntime_genai}" if info.onnxruntime_genai else ""
    return f"onnxruntime {info.onnxruntime}{genai}, torch {info.torch}"


def machine_line(result: BenchResult) -> str:
    """Where and how it was measured: the tables' caption and the Markdown's first line."""
    info, settings = result.machine, result.settings
    end = info.load_average_end[0] if info.load_average_end else 0.0
    where = f"GPU {info.gpu or 'unnamed'} ({settings.dtype} exports); host " if info.device == "cuda" else ""
    return (
        f"Machine: {where}{info.cpu}, {info.cores} cores, {info.threads} threads (every variant); {_versions(result)}; "
        f"host read bandwidth {result.bandwidth.gbs:.1f} GB/s (numpy); median (min–max) of {settings.repeats} runs "
        f"of {settings.decode_tokens} decode steps after a {settings.decode_prompt}-token prompt; load average "
        f"{info.load_average_start[0]:.1f} at the start, {end:.1f} at the end."
    )


RATIOS_NOTE = (
    "TTFT: prefill plus picking the first token (batch 1); ratios are ms ÷ dense ORT ms and ms ÷ the "
    "fastest dense peer's ms (below 1: faster). Decode speedups and \"vs best peer\" are dense ORT's or "
    "the peer's ms/step ÷ the variant's (above 1: faster). Every ratio is the median of per-round ratios "
    "(variants run round-robin, so each round pairs them under the same host conditions); the ms "
    "columns are plain medians."
)
QUANT_NOTE = (
    "Quantized rows (int4 / int8 weights, the scheme in the name) compare with the fastest quantized "
    "peer (onnxruntime-genai int4, llama.cpp Q4_0), fp32 rows with the fastest fp32 one; every speedup "
    "and \"ideal\" is still against fp32 dense ORT. llama.cpp's figures are llama-bench's own (its "
    "prompt processing without sampling, its decode from the start of the context, batch 1; not "
    "round-robin, so its ratios are of medians)."
)


def quant_note(result: BenchResult) -> str:
    """What the quantized rows compare with ("" without any)."""
    from popc.bench.plan import is_quantized

    return QUANT_NOTE if any(is_quantized(r.variant) for r in result.decode) else ""


def memory_note(result: BenchResult) -> str:
    """What the peak-memory columns of the decode table hold ("" without them)."""
    batches = result.settings.memory_batches
    if not batches:
        return ""
    pop = sorted({r.sparsity for r in result.memory if r.sparsity})
    at = f" (POP variants at {', '.join(f'{s:.0%}' for s in pop)} sparsity)" if pop else ""
    return (
        "Peak MiB: the peak resident memory (VmHWM) of a fresh process that loads that variant alone and "
        f"runs one decode at that batch: the {result.settings.decode_prompt}-token prompt, then "
        f"{result.settings.decode_tokens} steps{at}; in brackets, the peak less the same process's before the "
        "model loaded (Python and the variant's runtime libraries imported). — : not measured (the JSON's "
        "memory rows say why)."
    )


# ---- the two tables ---------------------------------------------------------------------
def decode_grid(result: BenchResult) -> Grid:
    batches = result.settings.batches
    memory_batches = result.settings.memory_batches
    header = ["variant", "sparsity"] + [f"batch {b} ms/step (tok/s)" for b in batches]
    header += [f"peak MiB b{b} (+model)" for b in memory_batches]
    header += [f"speedup b{b}" for b in batches]
    header += ["ideal (bytes)", "of ideal", "MB read (FFN)", "roofline"]
    if result.has_peers:
        header += [f"vs best peer b{b}" for b in batches]
    title = "popc bench decode: ms per step (tokens/s)" + (", peak memory" if memory_batches else "")
    notes = " ".join(note for note in (memory_note(result), quant_note(result)) if note)
    grid = Grid(title + ", speedup vs dense ORT", header, note=notes)
    for variant, sparsity in dict.fromkeys((r.variant, r.sparsity) for r in result.decode):
        rows = {b: result.decode_row(variant, sparsity, b) for b in batches}
        cells = [label(variant), _sparsity(sparsity)]
        for row in rows.values():
            per_s = f"{row.tokens_per_s:.1f}" if row and row.tokens_per_s else NONE
            cells.append(f"{_timing(row.ms_per_step)} ({per_s})" if row else NONE)
        cells += [_memory(result.memory_row(variant, b)) for b in memory_batches]
        cells += [_times(row.speedup if row else None) for row in rows.values()]
        first = rows.get(1)
        speed, ideal = (first.speedup, first.ideal_speedup) if first else (None, None)
        cells.append(_times(ideal))
        cells.append(f"{speed / ideal:.2f}" if speed and ideal and variant != "dense-ort" else NONE)
        cells.append(_megabytes(first))
        cells.append(f"{first.roofline_fraction:.0%}" if first and first.roofline_fraction else NONE)
        if result.has_peers:
            cells += [_times(row.vs_best_peer if row else None) for row in rows.values()]
        grid.rows.append(cells)
    if result.fastest_decode_peer:
        peers = [_peer(result.fastest_decode_peer.get(b)) for b in batches]
        grid.footer.append(["fastest dense peer", "", *peers, *[""] * (len(header) - 2 - len(batches))])
    if result.fastest_decode_quant_peer:
        peers = [_peer(result.fastest_decode_quant_peer.get(b)) for b in batches]
        grid.footer.append(["fastest quantized peer", "", *peers, *[""] * (len(header) - 2 - len(batches))])
    return grid


def ttft_grid(result: BenchResult) -> Grid:
    lengths = result.settings.prompt_lengths
    grid = Grid(
        f"popc bench {result.model}: TTFT ms (prefill + first token), batch 1 (ratios: × dense ORT; peer ×)",
        ["TTFT ms, batch 1"] + [f"{n} tokens" for n in lengths],
    )
    for variant in dict.fromkeys(r.variant for r in result.prefill):
        cells = [label(variant)]
        for length in lengths:
            row = result.ttft(variant, length)
            if row is None:
                cells.append(NONE)
                continue
            ratios = [f"{row.vs_dense:.2f}×"] if row.vs_dense else []
            ratios += [f"peer {row.vs_best_peer:.2f}×"] if row.vs_best_peer else []
            cells.append(_timing(row.ms, 0) + (f" ({'; '.join(ratios)})" if ratios else ""))
        grid.rows.append(cells)
    if result.fastest_ttft_peer:
        grid.footer.append(["fastest dense peer", *[_peer(result.fastest_ttft_peer.get(n)) for n in lengths]])
    if result.fastest_ttft_quant_peer:
        grid.footer.append(["fastest quantized peer", *[_peer(result.fastest_ttft_quant_peer.get(n)) for n in lengths]])
    return grid


def tables(result: BenchResult) -> tuple[Any, Any]:  # rich.table.Table, twice
    """The TTFT table and the decode table, for a rich console."""
    from rich.table import Table

    rendered = []
    for grid in (ttft_grid(result), decode_grid(result)):
        notes = [machine_line(result), RATIOS_NOTE if result.has_peers else "", grid.note]
        caption = " ".join(note for note in notes if note)
        table = Table(title=grid.title, caption=caption)
        for position, name in enumerate(grid.header):
            table.add_column(name, no_wrap=position == 0, justify="left" if position == 0 else "right")
        for cells in grid.rows:
            table.add_row(*cells)
        for cells in grid.footer:
            table.add_row(*cells, style="dim")
        rendered.append(table)
    return rendered[0], rendered[1]


def _markdown_table(grid: Grid) -> list[str]:
    lines = ["| " + " | ".join(grid.header) + " |", "|" + "---|" * len(grid.header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in grid.rows + grid.footer]


def markdown(result: BenchResult) -> str:
    """The decode and TTFT tables as Markdown (for docs/results.md and benchmarks/results/)."""
    decode = decode_grid(result)
    lines = [machine_line(result), "", *_markdown_table(decode), ""]
    if decode.note:
        lines += [decode.note, ""]
    lines += _markdown_table(ttft_grid(result))
    if result.has_peers:
        lines += ["", RATIOS_NOTE]
    return "\n".join(lines) + "\n"


# ---- files ------------------------------------------------------------------------------
def write_markdown(result: BenchResult, path: Path) -> None:
    atomic_write(path, markdown(result).encode())


def write_json(result: BenchResult, path: Path) -> None:
    atomic_write(path, (json.dumps(result.to_json(), indent=2) + "\n").encode())


def read_json(path: Path) -> BenchResult:
    return BenchResult.from_json(json.loads(Path(path).read_text()))


def write_plot(result: BenchResult, path: Path) -> None:
    """Decode latency and speedup against sparsity (batch 1), and TTFT against prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in result.decode if r.batch == 1]
    dense = next((r for r in decode if r.variant == "dense-ort"), None)
    fig, (latency, speedup, prefill) = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"pop-oplib": "o-", "pop-body": "s--", "pop-reference": "^:"}
    styles.update({f"pop-oplib-{q}": f"{m}-" for q, m in zip(QUANT_SCHEMES, "Dv")})
    for variant, style in styles.items():
        rows = sorted((r for r in decode if r.variant == variant), key=lambda r: r.sparsity)
        if not rows:
            continue
        xs = [r.sparsity * 100 for r in rows]
        ys = [r.ms_per_step.median for r in rows]
        err = [[y - r.ms_per_step.low for y, r in zip(ys, rows)], [r.ms_per_step.high - y for y, r in zip(ys, rows)]]
        latency.errorbar(xs, ys, yerr=err, fmt=style, label=label(variant), capsize=3)
        if dense and variant != "pop-reference":
            # 0 % sparsity is the dense export itself (speedup 1).
            speedup.plot([0.0, *xs], [1.0, *[r.speedup or float("nan") for r in rows]], style, label=label(variant))
    baselines = (
        ("dense-ort", "black"), ("hf-eager", "gray"), (GENAI_VARIANT, "tab:green"), (DENSE_GENAI_RUNTIME, "tab:olive"),
        ("dense-ort-int4", "tab:purple"), ("dense-ort-int8", "tab:pink"), (GENAI_INT4, "tab:cyan"), (LLAMA_CPP, "tab:red"),
    )  # fmt: skip
    for variant, color in baselines:
        row = next((r for r in decode if r.variant == variant), None)
        if row:
            latency.axhline(row.ms_per_step.median, color=color, linestyle="-", linewidth=1, label=label(variant))
    ideal = sorted((r for r in decode if r.variant == "pop-oplib" and r.ideal_speedup), key=lambda r: r.sparsity)
    if ideal:
        xs = [0.0] + [r.sparsity * 100 for r in ideal]
        speedup.plot(xs, [1.0] + [r.ideal_speedup for r in ideal], "k-", label="ideal (bytes model)")
        if dense and dense.roofline_ms:
            roofline = [dense.roofline_ms] + [r.roofline_ms for r in ideal]
            latency.plot(xs, roofline, "k:", label="roofline (bytes / bandwidth)")
    speedup.axhline(1.0, color="gray", linewidth=0.8)
    sparsity_axis = "FFN sparsity at decode (%)"
    latency.set(xlabel=sparsity_axis, ylabel="ms per token (batch 1)", title="decode latency", yscale="log")
    speedup.set(xlabel=sparsity_axis, ylabel="× dense ORT", title="decode speedup over dense ORT")
    for variant in dict.fromkeys(r.variant for r in result.prefill):
        rows = sorted((r for r in result.prefill if r.variant == variant), key=lambda r: r.prompt)
        prefill.plot([r.prompt for r in rows], [r.ms.median for r in rows], "o-", label=label(variant))
    prefill.set(
        xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms (batch 1)", title="TTFT (prefill + first token)"
    )
    lengths = result.settings.prompt_lengths
    if lengths:
        prefill.set_xticks(lengths, [str(n) for n in lengths])
        prefill.minorticks_off()
    for ax in (latency, speedup, prefill):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    info = result.machine
    dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(result.settings.dtype, result.settings.dtype)
    weights = f"{dtype} and {', '.join(result.settings.quant)}" if result.settings.quant else dtype
    on = f"{info.gpu or 'a CUDA GPU'} (" if info.device == "cuda" else f"{info.cpu} ({info.threads} threads, "
    fig.suptitle(
        f"popc bench: {result.model} {weights} on {on}onnxruntime {info.onnxruntime})",
        fontsize=10,
    )
    fig.tight_layout()
    with atomic_file(path) as staged:
        fig.savefig(staged, dpi=80, format="png")
    plt.close(fig)
