"""The ``popc`` command line: export, run, info."""

from __future__ import annotations

import json
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from popc.errors import PopcError

app = typer.Typer(
    help="popc: compile Hugging Face causal LMs into ONNX models that prune their own FFNs online.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
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
    message = str(error) if isinstance(error, PopcError) else f"{type(error).__name__}: {error}"
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if not isinstance(error, PopcError):
        console.print("(unexpected; re-run with --debug for the traceback)", style="dim")
    raise typer.Exit(1)


def _terminate(signum, frame):  # noqa: ANN001 - signal handler signature
    raise KeyboardInterrupt


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="HF id (local cache), local HF dir, .gguf file, or built-in name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory, or a path ending in .onnx.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export.")] = False,
) -> None:
    """Export MODEL to ONNX with its KV cache as graph inputs/outputs."""
    from popc.export import ExportPlan
    from popc.export import export as run_export

    signal.signal(signal.SIGTERM, _terminate)  # so staging files are cleaned up on kill
    try:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task(f"exporting {model}", total=None)

            def report(message: str) -> None:
                progress.update(task, description=message)
                progress.console.print(f"  {message}", style="dim", highlight=False)

            location = run_export(ExportPlan(model=model, out=out, force=force), progress=report)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] nothing was written")
        raise typer.Exit(130) from None
    except Exception as error:
        fail(error)
    console.print(f"[green]exported[/] {model} -> {location.model_path}")


@app.command()
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
) -> None:
    """Generate text with an exported model, streaming tokens as they come."""
    try:
        if (prompt is None) == (prompt_file is None):
            raise PopcError("give exactly one of --prompt or --prompt-file")
        if prompt_file is not None:
            try:
                prompt = prompt_file.read_text()
            except (OSError, UnicodeDecodeError) as error:
                raise PopcError(f"cannot read --prompt-file {prompt_file}: {error}") from None
        from popc.runtime import load

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
        )
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as error:
        fail(error)
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


@app.command()
def info(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="An export directory or its .onnx file.")],
) -> None:
    """Show what an export contains."""
    from popc.artifact import read_export

    try:
        location, config = read_export(directory)
    except Exception as error:
        fail(error)
    table = Table(title=str(location.model_path), show_header=False)
    for key in ("source", "family", "model_type", "dtype", "num_layers", "num_kv_heads", "head_dim",
                "vocab_size", "max_positions", "eos_token_ids", "opset", "export_seconds"):
        table.add_row(key, str(config.get(key)))
    table.add_row("versions", ", ".join(f"{k} {v}" for k, v in config.get("versions", {}).items()))
    data = location.model_path.with_name(location.model_file + ".data")
    size = sum(p.stat().st_size for p in (location.model_path, data) if p.exists())
    table.add_row("size on disk", f"{size / 1e6:.1f} MB")
    Console().print(table)


if __name__ == "__main__":
    app()
