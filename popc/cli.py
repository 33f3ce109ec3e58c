"""The ``popc`` command line: export, run, info, serve, doctor here; eval and analyze in
:mod:`popc.cli_eval`, bench in :mod:`popc.cli_bench`.

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


COMMAND_ORDER = ("export", "run", "info", "eval", "analyze", "bench", "serve", "doctor")


class OneLineUsageErrors(TyperGroup):
    """Click's own usage errors (a bad option value, an unknown option) end as popc's do: one
    ``error:`` line on stderr and exit 2, instead of a boxed multi-line panel."""

    def list_commands(self, ctx) -> list[str]:  # noqa: ANN001 - click's Context
        # The help lists commands in the order of a user's work, whichever module defines them.
        order = {name: index for index, name in enumerate(COMMAND_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: order.get(name, len(order)))

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
    help="--kv-budget: laprox, snapkv, streaming, random or full; a LaProx variant as "
    "laprox:SCORE[:floorF][:poolN][:shiftN][:mixF] (docs/kv-eviction.md)."
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
    skip = config.get("prefill_skip")
    if skip:
        through = skip.get("every_layer", "the last prompt token")
        table.add_row("pop-prefill", f"layers {skip['cutoff']}-{config['num_layers'] - 1} skipped at prefill; "
                      f"{through} run every layer")  # fmt: skip
    if config.get("drop_layers"):
        table.add_row("drop layers", f"the deepest {config['drop_layers']} layers removed (baseline)")
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


# The commands that live in modules of their own register themselves on import.
from popc import cli_bench, cli_eval  # noqa: E402, F401
