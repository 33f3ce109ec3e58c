"""``popc bench`` (TTFT and decode latency against peers and the roofline; decode and KV
memory per KV budget): its command line. Registered on :data:`popc.cli.app` when
:mod:`popc.cli` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from popc.cli import KV_METHOD_OPTION, check_outputs, command, console, parse_list
from popc.progress import console_progress


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
