"""The ``popc`` command line: export, run, info, eval, analyze, bench, serve, doctor.

Every command is registered with :func:`command`, which turns any error into one line on
stderr and a non-zero exit (the traceback only with ``--debug``), and Ctrl-C into exit 130.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from popc.errors import PopcError
from popc.progress import console_progress

console = Console(stderr=True)

# Click's exception types as typer raises them (typer >= 0.29 vendors its own click).
ClickException = next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "ClickException")
NoArgsIsHelpError = getattr(sys.modules[ClickException.__module__], "NoArgsIsHelpError", ())


class OneLineUsageErrors(TyperGroup):
    """Click's own usage errors (a bad option value, an unknown option) end as popc's do: one
    ``error:`` line on stderr and exit 2, instead of a boxed multi-line panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # noqa: ANN002, ANN003, ANN201
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as error:
            error.show()  # `popc` alone, or a command without its arguments: the help
            sys.exit(error.exit_code)
        except ClickException as error:
            command = f"{error.ctx.command_path} " if getattr(error, "ctx", None) else "popc "
            message = f"{error.format_message()} (see `{command.strip()} --help`)"
            console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            sys.exit(error.exit_code)
        except typer.Abort:
            console.print("[bold red]error:[/] aborted", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    help="popc: compile Hugging Face causal LMs into ONNX models that prune their own FFNs online.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineUsageErrors,
)
state = {"debug": False}


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    state["debug"] = debug


def fail(error: BaseException) -> None:
    """One line on stderr and a non-zero exit; the traceback only with --debug."""
    if state["debug"]:
        traceback.print_exception(error)
    from rich.markup import escape

    message = str(error) if isinstance(error, PopcError) else f"{type(error).__name__}: {error}"
    # Escaped: messages name things like `popc[genai]` that rich would read as markup.
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if not isinstance(error, PopcError):
        console.print("(unexpected; re-run with --debug for the traceback)", style="dim")
    raise typer.Exit(1)


def command(name: str | None = None, interrupted: str = "stopped"):  # noqa: ANN201 - a decorator
    """Register a CLI command whose errors end as :func:`fail` says and whose Ctrl-C (or
    SIGTERM, where the command turns it into KeyboardInterrupt) exits 130 with ``interrupted``."""

    def register(function):  # noqa: ANN001, ANN202
        @functools.wraps(function)
        def guarded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            try:
                return function(*args, **kwargs)
            except typer.Exit:
                raise
            except KeyboardInterrupt:
                console.print(f"[bold red]interrupted:[/] {interrupted}")
                raise typer.Exit(130) from None
            except Exception as error:  # noqa: BLE001 - every error ends as one line
                fail(error)

        return app.command(name)(guarded)

    return register


def parse_list(value: str | None, option: str, kind: type = str) -> list | None:
    """``"a,b,c"`` -> a list of ``kind`` (None stays None), or a one-line error naming the option."""
    if value is None:
        return None
    try:
        return [kind(item.strip()) for item in value.split(",") if item.strip()]
    except ValueError:
        what = {int: "integers", float: "numbers"}.get(kind, "values")
        raise PopcError(f"{option} takes comma-separated {what}, got {value!r}") from None


def check_outputs(**paths: Path | None) -> None:
    """Output files named by options (``as_json=...`` -> ``--json``) must be writable where they
    are, checked before minutes of work rather than after."""
    for name, path in paths.items():
        if path is None:
            continue
        option = "--json" if name == "as_json" else f"--{name.replace('_', '-')}"
        parent = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise PopcError(f"{option} {path} is a directory; name a file")
        if not parent.is_dir():
            raise PopcError(f"{option} {path}: the directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise PopcError(f"{option} {path}: the directory {parent} is not writable")


def _terminate(signum, frame):  # noqa: ANN001 - signal handler signature
    raise KeyboardInterrupt


def pop_settings(sparsity, retain, candidate, keep, score=None):
    """--sparsity alone, or --retain/--candidate/--keep together, or neither (dense); --score
    (the default's otherwise) with either."""
    from popc.defaults import settings_for_sparsity
    from popc.pop import PopSettings

    explicit = (retain, candidate, keep)
    if sparsity is not None and any(v is not None for v in explicit):
        raise PopcError("give either --sparsity or --retain/--candidate/--keep, not both")
    if sparsity is not None:
        return settings_for_sparsity(sparsity, score)
    if all(v is None for v in explicit):
        if score is not None:
            raise PopcError("--score chooses how POP scores channels; give it with --sparsity or --retain/--candidate/--keep")
        return None
    if any(v is None for v in explicit):
        raise PopcError("--retain, --candidate and --keep go together; give all three (or use --sparsity)")
    return PopSettings(retain=retain, candidate=candidate, keep=keep, score=score or "activation")


KV_BUDGET_OPTION = typer.Option(
    help="KV eviction after the prompt (exports made with --kv-evict): a fraction of the prompt (0.05, 5%) "
    "or an average number of tokens per layer (256); 1 keeps the full cache."
)
KV_METHOD_OPTION = typer.Option(
    help="--kv-budget: laprox, snapkv, streaming, random or full; a LaProx variant as laprox:SCORE[:floorF] "
    "(docs/kv-eviction.md)."
)


def kv_settings(budget: str | None, method: str):  # noqa: ANN201 - EvictionSettings, imported lazily
    """EvictionSettings from --kv-budget/--kv-method (None: no eviction asked)."""
    from popc.kv_eviction import parse_budget, parse_method

    if budget is None:
        if method != "laprox":
            raise PopcError("--kv-method needs --kv-budget")
        return None
    return parse_method(method, parse_budget(budget))


@command(interrupted="nothing was written")
def export(
    model: Annotated[str, typer.Argument(help="HF id (local cache), local HF dir, .gguf file, or built-in name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory, or a path ending in .onnx.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export.")] = False,
    sparsity: Annotated[
        Optional[float], typer.Option(help="POP-online decode sparsity in [0, 1), with measured default ratios.")
    ] = None,
    retain: Annotated[Optional[float], typer.Option(help="POP: fraction of channels always kept (R).")] = None,
    candidate: Annotated[Optional[float], typer.Option(help="POP: fraction scored per token (C).")] = None,
    keep: Annotated[Optional[float], typer.Option(help="POP: fraction of channels kept from C per token (K).")] = None,
    score: Annotated[
        Optional[str],
        typer.Option(help="POP: how channels are scored, activation (the paper's) or output (times each channel's down-projection row norm). [default: the measured default]"),
    ] = None,
    prefill_skip: Annotated[
        Optional[int],
        typer.Option(help="POP-prefill: the deepest N layers are skipped at prefill by all prompt tokens but the last."),
    ] = None,
    drop_layers: Annotated[
        Optional[int], typer.Option(help="Baseline: remove the deepest N layers for every token (ShortGPT-style).")
    ] = None,
    fuse: Annotated[
        bool,
        typer.Option(
            help="ONNX Runtime's fused operators: GroupQueryAttention with packed QKV, RMSNorm and "
            "skip-add-RMSNorm (--no-fuse: plain ONNX attention; --prefill-skip/--drop-layers imply it)."
        ),
    ] = True,
    quant: Annotated[
        Optional[str],
        typer.Option(
            help="Block-quantized weights: int4 or int8 (linear layers as MatMulNBits, the tied embedding as "
            "GatherBlockQuantized, POP FFN rows quantized along the hidden size). Default: float32."
        ),
    ] = None,
    block_size: Annotated[int, typer.Option(help="--quant: elements per quantization block (a power of two >= 16).")] = 32,
    accuracy_level: Annotated[
        int, typer.Option(help="--quant: MatMulNBits accuracy_level (4 = int8 activations, as onnxruntime-genai on CPU).")
    ] = 4,
    dtype: Annotated[
        str,
        typer.Option(
            help="Weights, activations and KV cache: fp32, fp16 or bf16 (logits stay float32; fp16/bf16 need the "
            "fused graph and no --quant). bf16 has no ONNX Runtime CPU kernels: it is for the CUDA EP."
        ),
    ] = "fp32",
    kv_evict: Annotated[
        bool,
        typer.Option(
            "--kv-evict",
            help="KV-cache eviction after long prompts: per-layer cache lengths and the scores' window queries "
            "in the graph; `popc run --kv-budget` (LaProx, SnapKV, StreamingLLM, random) then sets the budget.",
        ),
    ] = False,
    kv_window: Annotated[int, typer.Option(help="--kv-evict: the observation window (last prompt tokens).")] = 16,
) -> None:
    """Export MODEL to ONNX with its KV cache as graph inputs/outputs (and POP-online FFNs)."""
    from popc.export import ExportPlan, canonical_dtype
    from popc.export import export as run_export
    from popc.quantize import QuantScheme

    signal.signal(signal.SIGTERM, _terminate)  # so staging files are cleaned up on kill
    pop = pop_settings(sparsity, retain, candidate, keep, score)
    if prefill_skip is not None and prefill_skip < 0:
        raise PopcError(f"--prefill-skip must be >= 0, got {prefill_skip}")
    if drop_layers is not None and drop_layers < 0:
        raise PopcError(f"--drop-layers must be >= 0, got {drop_layers}")
    scheme = None if quant is None else QuantScheme.parse(quant, block_size, accuracy_level)
    dtype = canonical_dtype(dtype)  # refused before any work
    plan = ExportPlan(
        model=model,
        out=out,
        force=force,
        pop=pop,
        prefill_skip=prefill_skip,
        drop_layers=drop_layers,
        fuse=fuse,
        quant=scheme,
        dtype=dtype,
        kv_window=kv_window if kv_evict else None,
    )
    with console_progress(console, echo=True) as progress:
        progress.stage(f"exporting {model}")
        location = run_export(plan, progress=progress)
    console.print(f"[green]exported[/] {model} -> {location.model_path}")


@command()
def run(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="An export directory or its .onnx file.")],
    prompt: Annotated[Optional[str], typer.Option(help="Prompt text.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from a file.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    kv_budget: Annotated[Optional[str], KV_BUDGET_OPTION] = None,
    kv_method: Annotated[str, KV_METHOD_OPTION] = "laprox",
) -> None:
    """Generate text with an exported model, streaming tokens as they come."""
    if (prompt is None) == (prompt_file is None):
        raise PopcError("give exactly one of --prompt or --prompt-file")
    kv = kv_settings(kv_budget, kv_method)
    if prompt_file is not None:
        from popc.textfile import read_text_file

        prompt = read_text_file(prompt_file, "--prompt-file")
    from popc.runtime import check_sampling, load

    check_sampling(temperature, top_p, seed)  # before minutes of loading, not after
    model = load(directory, device=device)
    out = sys.stdout

    def show(text: str) -> None:
        out.write(text)
        out.flush()

    result = model.generate(
        prompt,
        max_new_tokens=max_new_tokens,
        chat=chat,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        on_text=None if as_json else show,
        kv=kv,
    )
    if as_json:
        print(json.dumps(result.to_json()))
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    tokens_per_second = 1000.0 / result.decode_ms_per_token if result.decode_ms_per_token else float("inf")
    console.print(
        f"[dim]{len(result.prompt_ids)} prompt tokens, prefill {result.prefill_ms:.0f} ms; "
        f"{len(result.generated_ids)} new tokens, {result.decode_ms_per_token:.1f} ms/token "
        f"({tokens_per_second:.1f} tokens/s)[/]"
    )
    if result.kv_kept is not None:
        console.print(
            f"[dim]KV cache after the prompt: {result.kv_kept} of {result.kv_prompt} entries (tokens x layers, "
            f"{100 * result.kv_kept / max(result.kv_prompt, 1):.1f} %)[/]"
        )


@command()
def info(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="An export directory or its .onnx file.")],
) -> None:
    """Show what an export contains."""
    from popc.artifact import check_model_files, read_export

    location, config = read_export(directory)
    check_model_files(location, config)  # a truncated model or a missing data file is not shown as healthy
    table = Table(title=str(location.model_path), show_header=False)
    for key in ("source", "family", "model_type", "dtype", "num_layers", "num_kv_heads", "head_dim",
                "vocab_size", "max_positions", "eos_token_ids", "opset", "export_seconds"):
        table.add_row(key, str(config.get(key)))
    fusions = config.get("ort_fusions")
    table.add_row("graph", "fused ORT ops (GroupQueryAttention, packed QKV, skip-RMSNorm)" if fusions else "plain ONNX attention")
    if config.get("pop"):
        pop = config["pop"]
        table.add_row("pop", f"retain {pop['retain']}, candidate {pop['candidate']}, keep {pop['keep']}")
        if pop.get("weight_layout"):
            table.add_row("pop weight layout", pop["weight_layout"])
    kv = config.get("kv_eviction")
    if kv:
        table.add_row("kv eviction", f"per-layer cache lengths, observation window {kv['window']}: "
                      "popc run --kv-budget (laprox, snapkv, streaming, random)")  # fmt: skip
    quant = config.get("quant")
    table.add_row(
        "weights",
        f"{quant['scheme']} blocks of {quant['block_size']} (symmetric, float32 scales; "
        f"MatMulNBits accuracy_level {quant['accuracy_level']})"
        if quant
        else "float32",
    )
    if (location.directory / "genai_config.json").is_file():
        table.add_row("onnxruntime-genai", "genai_config.json: og.Model(DIR) runs this export")
    table.add_row("versions", ", ".join(f"{k} {v}" for k, v in config.get("versions", {}).items()))
    data = location.model_path.with_name(location.model_file + ".data")
    size = sum(p.stat().st_size for p in (location.model_path, data) if p.exists())
    table.add_row("size on disk", f"{size / 1e6:.1f} MB")
    Console().print(table)


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


@command()
def bench(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A POP export (or a dense one).")],
    dense: Annotated[Optional[Path], typer.Option(help="The dense export of the same model (else exported once).")] = None,
    pop: Annotated[Optional[Path], typer.Option(help="The POP export, when DIR is dense (else exported once).")] = None,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG plot of latency and speedup.")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="Write the tables as Markdown.")] = None,
    full: Annotated[bool, typer.Option("--full", help="The whole matrix: prompts 16-2048, batches 1,4,8, sparsities 0.25,0.5,0.75, 5 repeats.")] = False,
    prompt_lengths: Annotated[Optional[str], typer.Option(help="Prompt lengths for TTFT (prefill + first token, batch 1). [default: 16,128,512]")] = None,
    batches: Annotated[Optional[str], typer.Option(help="Decode batch sizes. [default: 1,4,8]")] = None,
    memory_batches: Annotated[Optional[str], typer.Option(help="Decode batch sizes at which each variant's peak memory is measured (a fresh process per variant and batch); 'none' skips. [default: the largest of --batches]")] = None,
    sparsities: Annotated[Optional[str], typer.Option(help="POP decode sparsities. [default: 0.5]")] = None,
    variants: Annotated[
        Optional[str],
        typer.Option(help="Comma list of dense-ort,pop-body,pop-oplib,hf-eager,pop-reference,ort-genai,dense-genai-runtime, the quantized {dense-ort,pop-body,pop-oplib}-{int4,int8}, ort-genai-int4, llama.cpp-q4_0 (default: the fp32 ones, the genai ones where onnxruntime-genai is installed; --quant adds the quantized)."),
    ] = None,
    repeats: Annotated[Optional[int], typer.Option(help="Timed runs per figure (median, min-max). [default: 3]")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 1,
    decode_tokens: Annotated[int, typer.Option(help="Decode steps per run.")] = 32,
    decode_prompt: Annotated[int, typer.Option(help="Prompt tokens before decode.")] = 64,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads of every variant (default: one per physical core).")] = None,
    torch_max_prompt: Annotated[Optional[int], typer.Option(help="Longest prompt the PyTorch variants prefill.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model for the PyTorch variants (default: the export's source).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[
        Optional[str],
        typer.Option(help="fp32, fp16 or bf16: the element type of the exports measured (re-exported where DIR's differs). [default: DIR's on cpu, fp16 on cuda]"),
    ] = None,
    quant: Annotated[Optional[str], typer.Option(help="Comma list of int4,int8: also popc's quantized exports (dense-ort-int4, pop-oplib-int4, ...; exported once into the cache), and with int4 the quantized peers ort-genai-int4 and llama.cpp-q4_0 (where llama-bench is found) unless --variants names them. A quantized DIR adds its own scheme.")] = None,
    kv_budgets: Annotated[Optional[str], typer.Option(help="KV eviction instead (an export made with --kv-evict): decode ms/token and KV memory after a --kv-context prompt at these budgets, e.g. 1,0.2,0.05.")] = None,
    kv_context: Annotated[int, typer.Option(help="--kv-budgets: prompt tokens before decoding.")] = 4096,
    kv_method: Annotated[str, KV_METHOD_OPTION] = "laprox",
) -> None:
    """TTFT and decode latency of dense vs POP and peers (PyTorch, onnxruntime-genai, llama.cpp), against the memory roofline."""
    from popc.bench import BenchPlan, report, run_bench

    if kv_budgets is not None:
        return kv_bench(directory, kv_budgets, kv_context, kv_method, decode_tokens, repeats, warmup, threads,
                        as_json, markdown)  # fmt: skip

    check_outputs(as_json=as_json, plot=plot, markdown=markdown)
    # Only the options given override the plan's matrix (the quick default, or --full's).
    matrix = {
        "prompt_lengths": parse_list(prompt_lengths, "--prompt-lengths", int),
        "batches": parse_list(batches, "--batches", int),
        "sparsities": parse_list(sparsities, "--sparsities", float),
        "repeats": repeats,
    }
    options = {key: value for key, value in matrix.items() if value is not None}
    options.update(
        dense=dense, pop=pop, model=model,
        variants=parse_list(variants, "--variants") or None,
        memory_batches=[] if (memory_batches or "").strip().lower() == "none" else parse_list(memory_batches, "--memory-batches", int),
        warmup=warmup, decode_tokens=decode_tokens, decode_prompt=decode_prompt,
        threads=threads, device=device, dtype=dtype, torch_max_prompt=torch_max_prompt,
        quant=parse_list(quant, "--quant") or (),
    )  # fmt: skip
    plan = BenchPlan.full(directory, **options) if full else BenchPlan(directory=directory, **options)
    with console_progress(console) as progress:
        result = run_bench(plan, progress=progress)
    if as_json is not None:
        report.write_json(result, as_json)
    if plot is not None:
        report.write_plot(result, plot)
    if markdown is not None:
        report.write_markdown(result, markdown)
    out = Console()
    if not out.is_terminal:
        out = Console(width=220)
    for table in report.tables(result):
        out.print(table)


def kv_bench(directory, budgets, context, method, steps, repeats, warmup, threads, as_json, markdown) -> None:  # noqa: ANN001
    """``popc bench --kv-budgets``: popc.bench.kv."""
    from popc.bench import kv
    from popc.kv_eviction import parse_budget, parse_method

    check_outputs(as_json=as_json, markdown=markdown)
    parse_method(method)  # an unknown method is refused before the prefill
    plan = kv.KvBenchPlan(
        directory, budgets=[parse_budget(b) for b in parse_list(budgets, "--kv-budgets")], method=method,
        context=context, steps=steps, repeats=repeats or 3, warmup=warmup, threads=threads,
    )  # fmt: skip
    with console_progress(console) as progress:
        result = kv.run_kv_bench(plan, progress)
    kv.write(result, as_json, markdown)
    print(kv.markdown(result))


@command(interrupted="the server stopped")
def serve(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="An export directory or its .onnx file.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; 0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together at most.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for a slot at most; more get HTTP 429.")] = 64,
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads (default: one per core).")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="Require `Authorization: Bearer KEY` on /v1 routes.")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="The model id clients send (default: DIR's name).")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Serve with Ray Serve replicas instead of one process.")] = False,
    replicas: Annotated[int, typer.Option(help="--ray: how many replicas.")] = 1,
    kv_budget: Annotated[Optional[str], KV_BUDGET_OPTION] = None,
    kv_method: Annotated[str, KV_METHOD_OPTION] = "laprox",
) -> None:
    """Serve an export over an OpenAI-compatible HTTP API (completions, chat, streaming), with continuous batching."""
    options = dict(host=host, port=port, max_batch=max_batch, max_queue=max_queue, threads=threads,
                   api_key=api_key, model_name=model_name)
    kv = kv_settings(kv_budget, kv_method)
    if kv is not None:
        if ray:
            raise PopcError("--kv-budget is not supported with --ray yet; serve in one process")
        options["kv"] = kv
    if ray:
        from popc.serve.ray_app import run as run_ray

        run_ray(directory, replicas=replicas, **options)
        return
    from popc.serve.server import serve as serve_http

    serve_http(directory, **options)


@command()
def doctor(
    build: Annotated[bool, typer.Option("--build", help="Build the popc op library if it is missing.")] = False,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build the op library again even if present.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check the popc op library (libpopc_ops.so): present, built for which EPs, loads into ONNX Runtime."""
    from popc import oplib

    with console_progress(console) as progress:
        progress.stage("checking the popc op library")
        report = oplib.doctor_report(build_now=build, force=rebuild, progress=progress)
    if as_json:
        print(json.dumps(report, default=str))
    else:
        table = Table(title="popc doctor", show_header=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        present = report["present"]
        table.add_row("op library", f"[green]{report['library']}[/] ({report['origin']})" if present else "[red]absent[/]")
        if present:
            build_info = report.get("build") or {}
            table.add_row("kernels for", ", ".join(report["providers"]) + ("" if report["cuda"] is not None else " (build info missing)"))
            if build_info.get("cuda_error"):
                table.add_row("CUDA build", f"[yellow]failed[/]: {build_info['cuda_error']}")
            table.add_row("built against", str(build_info.get("ort_headers", "?")))
            loaded = report.get("loaded")
            table.add_row(
                "loads into",
                f"onnxruntime {report.get('ort_version')}: ops "
                + ", ".join(f"{k} {'ok' if v else 'WRONG'}" for k, v in report.get("ops_ok", {}).items())
                if loaded
                else f"[red]failed to load[/]: {report.get('load_error')}",
            )
        table.add_row("onnxruntime", report["onnxruntime"])
        table.add_row("available providers", ", ".join(report["available_providers"]))
        table.add_row("nvcc", str(report["nvcc"] or "not found"))
        table.add_row("CUDA", str(report.get("cuda_majors", "?")))
        if report.get("cuda_problem"):
            table.add_row("CUDA problem", f"[red]{report['cuda_problem']}[/]")
        if report["toolchain_problem"]:
            table.add_row("build toolchain", f"[yellow]{report['toolchain_problem']}[/]")
        if report["build_error"]:
            table.add_row("build error", f"[red]{report['build_error']}[/]")
        if report["disabled"]:
            table.add_row("POPC_OPLIB", "off (the function bodies run)")
        Console().print(table)
        if not present and not report["disabled"]:
            console.print("build it with `popc doctor --build`", style="dim")
    ok = not report.get("cuda_problem") and (
        report["disabled"] or (report["present"] and report.get("loaded") and all(report.get("ops_ok", {}).values()))
    )
    if (build or rebuild) and not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
