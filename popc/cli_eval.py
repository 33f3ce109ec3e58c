"""``popc eval`` (accuracy: perplexity, KL, MC questions, the cost front, long-context KV
eviction) and ``popc analyze`` (POP-prefill's layer importance): their command lines.
Registered on :data:`popc.cli.app` when :mod:`popc.cli` loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from popc.cli import check_outputs, command, console, parse_list
from popc.errors import PopcError
from popc.progress import console_progress


@command("eval")
def eval_(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="An export directory or its .onnx file.")],
    text: Annotated[Optional[Path], typer.Option(help="Perplexity text (default: lee_background.cor, fetched once).")] = None,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
    full: Annotated[bool, typer.Option("--full", help="The whole matrix: sparsities 0.25,0.5,0.75, 24 windows, 5 tasks x 50 questions (tens of minutes on a CPU).")] = False,
    sparsities: Annotated[Optional[str], typer.Option(help="Comma-separated decode sparsities. [default: 0.5]")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated BIG-bench JSON tasks; 'none' to skip. [default: emoji_movie; --full: 5 tasks]")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Questions per task. [default: 10; --full 50]")] = None,
    windows: Annotated[Optional[int], typer.Option(help="Perplexity windows, spread over the text; 0 skips perplexity. [default: 8; --full 24]")] = None,
    window: Annotated[int, typer.Option(help="Tokens per perplexity window (capped at the model's context).")] = 256,
    prompt: Annotated[Optional[int], typer.Option(help="Prompt tokens per window (default: half the window).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated rows: dense,pop,griffin,dynamic,static,pop-output,dynamic-output. [default: the first five; --sweep: all]")] = None,
    split: Annotated[Optional[str], typer.Option(help="Comma list of extra rows with exact regions R/C/K (fractions), each optionally :output or :static, e.g. 0.125/0.75/0.375:output.")] = None,
    grid: Annotated[str, typer.Option(help="--sweep's grid: full (every split above) or defaults (POP's default split and per-token dynamic at its FFN bytes, one baseline row each).")] = "full",
    sweep: Annotated[bool, typer.Option("--sweep", help="Every method over a grid of splits at each sparsity, each timed (decode ms/token, op library) and placed on the KL-vs-cost Pareto front. [defaults: sparsities 0.25,0.5,0.75, 160 windows (20k tokens), no questions]")] = False,
    batch: Annotated[int, typer.Option(help="Windows / questions per graph call.")] = 8,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of accuracy/perplexity vs FFN weight bytes.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    quant: Annotated[Optional[str], typer.Option(help="Comma list of int4,int8: also the dense and POP rows of popc's export in each scheme (exported once into the cache; POP where DIR is POP), on the same windows and questions.")] = None,
    peers: Annotated[Optional[str], typer.Option(help="Comma list of other runtimes' builds scored the same way: ort-genai-int4 (onnxruntime-genai's int4 CPU build, made once).")] = None,
    long_context: Annotated[bool, typer.Option("--long-context", help="KV eviction on long prompts (an export made with --kv-evict): passkey retrieval and continuation perplexity for every --kv-methods x --kv-budgets.")] = False,
    lengths: Annotated[Optional[str], typer.Option(help="--long-context: passkey prompt lengths. [default: 1024,2048,4096]")] = None,
    depths: Annotated[Optional[str], typer.Option(help="--long-context: needle depths (fractions). [default: 0.1,0.5,0.9]")] = None,
    kv_budgets: Annotated[Optional[str], typer.Option(help="--long-context: budgets (fractions or token counts). [default: 0.05,0.1,0.2,0.5]")] = None,
    kv_methods: Annotated[Optional[str], typer.Option(help="--long-context: streaming,snapkv,random,laprox (the full cache is always measured).")] = None,
    ppl_prefixes: Annotated[Optional[str], typer.Option(help="--long-context: continuation prefixes in tokens; 'none' skips. [default: 2048,4096]")] = None,
    continuation: Annotated[int, typer.Option(help="--long-context: continuation tokens scored after each prefix.")] = 128,
    ppl_count: Annotated[int, typer.Option(help="--long-context: continuations per prefix length (non-overlapping spans of the text).")] = 1,
    threads: Annotated[Optional[int], typer.Option(help="--long-context: ONNX Runtime intra-op threads.")] = None,
) -> None:
    """Continuation perplexity and BIG-bench accuracy: dense vs POP vs baselines, at equal sparsity and cost.

    The defaults take a few minutes on a CPU; --full runs the whole matrix. Options given override either."""
    if long_context:
        return long_context_eval(directory, text, as_json, plot, device, threads, lengths=lengths, depths=depths,
                                 kv_budgets=kv_budgets, kv_methods=kv_methods, ppl_prefixes=ppl_prefixes,
                                 continuation=continuation, ppl_count=ppl_count)  # fmt: skip
    from popc.eval import METHODS, EvalPlan, parse_split, run_eval
    from popc.eval_report import plot as write_plot
    from popc.eval_report import result_table
    from popc.sweep import SWEEP_DEFAULTS, sweep_plot, sweep_table

    check_outputs(as_json=as_json, plot=plot)
    if limit is not None and limit < 1:
        raise PopcError("--limit must be at least 1")
    if windows is not None and windows < 0:
        raise PopcError("--windows must be >= 0")
    # Only the options given override the plan's matrix (the quick default, or --full's).
    matrix = {
        "sparsities": parse_list(sparsities, "--sparsities", float),
        "tasks": None if tasks is None else [t for t in parse_list(tasks, "--tasks") if t != "none"],
        "limit": limit,
        "windows": windows,
        "methods": parse_list(methods, "--methods"),
    }
    if full and sweep:
        raise PopcError("--full and --sweep are two different matrices; choose one")
    options = {**(SWEEP_DEFAULTS | {"methods": METHODS} if sweep else {})}
    options.update({key: value for key, value in matrix.items() if value is not None})
    options.update(splits=[parse_split(s) for s in parse_list(split, "--split") or ()], sweep=sweep, grid=grid)
    options.update(text="" if windows == 0 else text, window=window, prompt=prompt, batch=batch, device=device)
    options.update(quant=parse_list(quant, "--quant") or (), peers=parse_list(peers, "--peers") or ())
    plan = EvalPlan.full(directory, **options) if full else EvalPlan(directory, **options)
    with console_progress(console) as progress:
        result = run_eval(plan, progress)
    if as_json is not None:
        try:
            as_json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        except OSError as error:
            raise PopcError(f"cannot write --json {as_json}: {error}") from None
    if plot is not None:
        (sweep_plot if sweep else write_plot)(result, plot)
    out = Console()
    if not out.is_terminal:  # a pipe or file: don't squeeze the table into 80 columns
        out = Console(width=200)
    out.print(sweep_table(result) if sweep else result_table(result))
    info = result.info
    console.print(
        f"[dim]{info['windows']} windows of {info['window']} tokens ({info['prompt']} prompt), "
        f"{sum(info['tasks'].values())} questions; {info['machine']}; {info['seconds']:.0f} s[/]"
    )
    if info.get("prefill_skip") is not None:
        console.print(f"POP-prefill export: every row skips the deepest {info['prefill_skip']} layers at prefill")
    if info.get("note"):
        console.print(f"[yellow]note:[/] {info['note']}")


def long_context_eval(directory, text, as_json, plot, device, threads, **lists) -> None:  # noqa: ANN001
    """``popc eval --long-context``: popc.eval_longcontext, then its tables (and plot)."""
    from popc.eval_longcontext import LongContextPlan, run_long_context
    from popc.kv_eviction import parse_budget
    from popc.longcontext_report import markdown
    from popc.longcontext_report import plot as write_plot

    check_outputs(as_json=as_json, plot=plot)
    options: dict = {"text": text, "device": device, "threads": threads}
    options |= {key: lists.pop(key) for key in ("continuation", "ppl_count")}
    for key, kind in (("lengths", int), ("depths", float), ("kv_methods", str), ("ppl_prefixes", int)):
        raw = lists[key]
        if raw is not None:
            options[key.removeprefix("kv_")] = () if raw == "none" else parse_list(raw, f"--{key.replace('_', '-')}", kind)
    if lists["kv_budgets"] is not None:
        options["budgets"] = [parse_budget(b) for b in parse_list(lists["kv_budgets"], "--kv-budgets")]
    plan = LongContextPlan(directory, **options)
    with console_progress(console) as progress:
        result = run_long_context(plan, progress)
    if as_json is not None:
        try:
            as_json.write_text(json.dumps(result, indent=1) + "\n")
        except OSError as error:
            raise PopcError(f"cannot write --json {as_json}: {error}") from None
    if plot is not None:
        write_plot(result, plot, "KV eviction")
    print(markdown(result, "KV eviction, long context", "ONNX export (popc eval --long-context)"))


@command()
def analyze(
    model: Annotated[str, typer.Argument(help="HF id (local cache), local HF dir, .gguf file, or built-in name.")],
    budget: Annotated[float, typer.Option(help="Allowed continuation-loss increase (nats/token) for the recommended N.")] = 0.05,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of loss vs N and per-layer importance.")] = None,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
    text: Annotated[Optional[Path], typer.Option(help="Text to score (default: lee_background.cor, fetched once).")] = None,
    windows: Annotated[int, typer.Option(help="Text windows scored.")] = 8,
    window: Annotated[int, typer.Option(help="Tokens per window.")] = 256,
    prompt: Annotated[Optional[int], typer.Option(help="Prompt tokens per window (default: half the window).")] = None,
    per_layer: Annotated[bool, typer.Option(help="Also skip each layer alone (2 runs per layer).")] = True,
    counts: Annotated[Optional[str], typer.Option(help="Comma-separated N to sweep (default: every N).")] = None,
) -> None:
    """POP-prefill: per-layer importance for the prompt vs every token, and the N to skip for a loss budget."""
    from popc.analyze import AnalyzePlan, result_tables
    from popc.analyze import analyze as run_analyze
    from popc.analyze import plot as write_plot

    check_outputs(as_json=as_json, plot=plot)
    if budget < 0 or windows < 1:
        raise PopcError("--budget must be >= 0 and --windows >= 1")
    plan = AnalyzePlan(model=model, budget=budget, text=text, windows=windows, window=window, prompt=prompt,
                       per_layer=per_layer, counts=parse_list(counts, "--counts", int))
    with console_progress(console) as progress:
        result = run_analyze(plan, progress)
    if as_json is not None:
        as_json.write_text(json.dumps(result, indent=2) + "\n")
    if plot is not None:
        write_plot(result, plot)
    out = Console() if Console().is_terminal else Console(width=160)
    for table in result_tables(result):
        out.print(table)
    console.print(
        f"recommended --prefill-skip {result['recommended_skip']} (budget {budget} nats/token); "
        f"{result['info']['windows']} windows of {result['info']['window']} tokens, {result['info']['seconds']:.0f} s",
        highlight=False,
    )
