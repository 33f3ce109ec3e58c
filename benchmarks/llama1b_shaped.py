"""Scale check: `popc bench` on a random-weight model shaped like Llama-3.2-1B.

    python benchmarks/llama1b_shaped.py                       # the full 16 layers (~5 GB fp32)
    python benchmarks/llama1b_shaped.py --sparsities 0.25,0.5,0.75 --batches 1,4 --repeats 5
    python benchmarks/llama1b_shaped.py --quant int4 --variants dense-ort-int4,pop-oplib-int4 \
        --json benchmarks/results/llama1b-shaped-int4.json --markdown benchmarks/results/llama1b-shaped-int4.md
    python benchmarks/llama1b_shaped.py --device cuda                 # on a GPU: fp16 exports, CUDA EP
    python benchmarks/llama1b_shaped.py --layers 1 --repeats 1 --batches 1 --out-dir /tmp/l1b
                                            # smoke test: 1 layer (~1.3 GB), 3-5 minutes on 2 cores

SmolLM2-135M (docs/results.md) is small enough that fixed per-op costs weigh as much as
the weights it reads; this measures POP where the FFNs dominate the bytes of a decode
step. The model is LlamaForCausalLM with Llama-3.2-1B's shapes: hidden 2048, FFN 8192,
16 layers, 32 query / 8 KV heads of 64, vocabulary 128256, tied embeddings, rope_theta
500000 (plain RoPE: Llama 3's frequency scaling changes a constant table, not the
speed), rms_norm_eps 1e-5, max_position_embeddings 4096 (``--max-positions``). Weights
are transformers' random init under ``torch.manual_seed(--seed)``: values do not change
the speed of a dense step, and POP's cost per step depends on its split (fixed by
``--sparsities``), not on which channels it picks. ``--layers N`` keeps every layer's
shape and the vocabulary, with N layers: a quick end-to-end check of the script.

The tokenizer is a byte-level BPE of 262 tokens (no merges; the tests' tiny tokenizer):
``popc export`` saves the source's tokenizer with the export, and the bench feeds
random token ids drawn from the model's own 128256-entry vocabulary, so it never
tokenizes text. BOS / EOS / PAD are its ids 1 / 2 / 0.

Steps, in the work directory (``--out-dir``; default ``<popc cache root>/bench/
llama1b-shaped``, ``...-<N>l`` with ``--layers N``; the cache root is
``$POPC_CACHE_DIR``, else ``~/.cache/popc``):

1. ``model/``: the Hugging Face directory (config.json, safetensors, tokenizer);
2. ``dense/`` and ``pop/``: ``popc export`` of it, dense and POP-online (one POP export
   serves every sparsity: the regions are the graph input ``pop_config``; it records
   the first of ``--sparsities`` as its defaults);
3. ``popc bench pop/ --dense dense/`` with ``--variants`` (default dense-ort,pop-oplib),
   printing the TTFT and decode tables (the decode table has the "ideal (bytes)" speedup
   of the bytes model and the fraction of it reached) and a summary: each POP row's
   decode speedup against that ideal; ``--json`` / ``--markdown`` default to
   benchmarks/results/llama1b-shaped.json / .md (``llama1b-shaped-<N>l`` with
   ``--layers N``). The JSON is the bench's (``BenchResult.from_json`` reads it) plus a
   ``llama1b_shaped`` entry: the model's shape and seed, the seconds of each step, and
   the peak resident memory of the build and bench (this process) and of the exports.

Each step's output is reused by later runs when it matches (same shape and seed; an
export of this model, of the same kind, newer than it); ``--reexport`` redoes the
exports (popc has changed), ``--force`` everything.

Resources, from the 1-layer run (1.29 GB of fp32 weights, of which 1.05 GB is the
embedding): an export peaked at 4.8 GB resident, about 3.7x the weights, so expect
roughly 18 GB for the full 4.9 GB model; each ONNX Runtime session keeps a prepacked copy
of its MatMul weights (about the model's size) besides the mapped file. Disk: about 15 GB
for the three copies of the full model, plus about 10 GB while an export stages its
output. The exports run as child processes (``python -m popc export``), so their memory
is returned before the bench loads both. Run it on a quiet machine: every timing shares
the cores with whatever else runs (the JSON records the load average at the start and
the end).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NAME = "llama1b-shaped"
FULL_LAYERS = 16
SHAPE_FILE = "llama1b_shaped.json"  # in model/: what was built, so a later run can reuse it

# Llama-3.2-1B's shapes (meta-llama/Llama-3.2-1B config.json); layers and context set by options.
LLAMA_3_2_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
}

# The tests' tiny tokenizer (tests/conftest.py): special tokens 0..5, then the 256 byte symbols.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

console = Console(stderr=True)


def byte_tokenizer(max_positions: int):  # noqa: ANN201 - transformers.PreTrainedTokenizerFast
    """A byte-level BPE tokenizer without merges: any text tokenizes, in 262 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE, model_max_length=max_positions,
    )  # fmt: skip


def shape(layers: int, max_positions: int, seed: int) -> dict:
    """What model/ holds: the LlamaConfig fields set here, and the seed of its weights."""
    return {
        **LLAMA_3_2_1B,
        "num_hidden_layers": layers,
        "max_position_embeddings": max_positions,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "seed": seed,
    }


def write_model(directory: Path, wanted: dict, force: bool) -> bool:
    """The Hugging Face directory of the model ``wanted`` describes, at ``directory``; built
    unless a matching one is there. Returns whether it was built."""
    marker = directory / SHAPE_FILE
    if not force and marker.is_file() and any(directory.glob("*.safetensors")):
        if json.loads(marker.read_text()) == wanted:
            console.print(f"[green]reusing[/] the model in {directory}")
            return False
        console.print(f"[yellow]{directory} holds another shape or seed: rebuilding it[/]")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its tqdm bar would fight rich's status line

    settings = {key: value for key, value in wanted.items() if key != "seed"}
    config = LlamaConfig(**settings)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place: an interrupted run leaves no half model.
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        with console.status(
            f"initialising {config.num_hidden_layers}-layer Llama-3.2-1B-shaped weights (seed {wanted['seed']})"
        ):
            torch.manual_seed(wanted["seed"])
            model = LlamaForCausalLM(config).to(torch.float32).eval()
        count = sum(p.numel() for p in model.parameters())  # tied embedding counted once
        console.print(f"  {count / 1e9:.3f} B parameters, {4 * count / 1e9:.2f} GB fp32")
        with console.status(f"writing safetensors to {directory}"):
            model.save_pretrained(staging)
            del model
            gc.collect()  # its ~5 GB go back before the exports and the bench
            byte_tokenizer(wanted["max_position_embeddings"]).save_pretrained(staging)
            (staging / SHAPE_FILE).write_text(json.dumps(wanted, indent=2) + "\n")
        staging.chmod(0o755)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def write_export(source: Path, out: Path, sparsity: float | None, force: bool, dtype: str = "fp32") -> bool:
    """``popc export source --out out --dtype dtype`` (``--sparsity`` when given), unless ``out``
    already holds an export of ``source`` of that kind and element type. Returns whether it exported.

    A child process: the export's peak memory (a few times the model's size) goes back to
    the system before the bench loads both exports."""
    kind = "dense" if sparsity is None else "POP"
    existing = out / "popc.json"
    if not force and existing.is_file():
        config = json.loads(existing.read_text())
        from popc.export import canonical_dtype

        same = config.get("source") == str(source) and bool(config.get("pop")) == (sparsity is not None)
        same = same and config.get("dtype", "float32") == canonical_dtype(dtype)
        # Made from this model, not from one built earlier in the same place.
        if same and existing.stat().st_mtime >= (source / SHAPE_FILE).stat().st_mtime:
            console.print(f"[green]reusing[/] the {kind} export in {out}")
            return False
    command = [sys.executable, "-m", "popc", "export", str(source), "--out", str(out), "--force", "--dtype", dtype]
    command += [] if sparsity is None else ["--sparsity", str(sparsity)]
    console.print(f"[bold]exporting {kind}[/]: popc {' '.join(command[3:])}", highlight=False)
    done = subprocess.run(command, check=False)
    if done.returncode:
        raise SystemExit(f"popc export ({kind}) failed with exit status {done.returncode}")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    console.print(f"[green]exported[/] {kind} -> {out} ({size / 1e9:.2f} GB)")
    return True


def summary(result) -> Table:  # noqa: ANN001 - popc.bench.BenchResult
    """Each POP variant against dense ORT, per sparsity: measured decode speedups and, at batch 1
    (where the bytes model applies), the ideal by bytes and the fraction of it reached."""
    from popc.bench import LABELS

    others = [b for b in result.settings.batches if b != 1]
    table = Table(title="POP vs dense ORT: decode speedup against the ideal by bytes (batch 1)")
    for name in ("variant", "sparsity", "MB read b1", "ideal (bytes)", "speedup b1", "of ideal", "roofline b1",
                 *(f"speedup b{b}" for b in others)):  # fmt: skip
        table.add_column(name, justify="left" if name == "variant" else "right")

    def times(value: float | None) -> str:
        return f"{value:.2f}×" if value else "—"

    for variant, sparsity in dict.fromkeys((r.variant, r.sparsity) for r in result.decode):
        if variant != "dense-ort" and not sparsity:
            continue  # the other dense variants (peers) are in the bench's own table
        row = result.decode_row(variant, sparsity, 1)
        table.add_row(
            LABELS.get(variant, variant),
            f"{sparsity:.0%}" if sparsity else "dense",
            f"{row.bytes_total / 1e6:.0f}" if row and row.bytes_total else "—",
            times(row.ideal_speedup if row else None),
            times(row.speedup if row else None),
            f"{row.speedup / row.ideal_speedup:.2f}" if row and sparsity and row.speedup and row.ideal_speedup else "—",
            f"{row.roofline_fraction:.0%}" if row and row.roofline_fraction else "—",
            *(times(getattr(result.decode_row(variant, sparsity, b), "speedup", None)) for b in others),
        )
    return table


def parse_list(text: str, kind: type) -> list:
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder layers (default: 16, Llama-3.2-1B's)")
    parser.add_argument("--max-positions", type=int, default=4096, help="max_position_embeddings (default: 4096)")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed of the weights (default: 0)")
    parser.add_argument(
        "--out-dir", type=Path, help="work directory (default: <popc cache>/bench/llama1b-shaped[-<N>l])"
    )
    parser.add_argument("--force", action="store_true", help="rebuild the model and both exports")
    parser.add_argument("--reexport", action="store_true", help="redo both exports, keep the model")
    parser.add_argument("--sparsities", type=lambda t: parse_list(t, float), default=[0.5],
                        help="POP decode sparsities, e.g. 0.25,0.5,0.75 (default: 0.5)")  # fmt: skip
    parser.add_argument(
        "--batches", type=lambda t: parse_list(t, int), default=[1, 4], help="decode batch sizes (default: 1,4)"
    )
    parser.add_argument("--prompt-lengths", type=lambda t: parse_list(t, int), default=[16, 128, 512],
                        help="TTFT prompt lengths (default: 16,128,512)")  # fmt: skip
    parser.add_argument(
        "--variants", default="dense-ort,pop-oplib", help="popc bench --variants (default: dense-ort,pop-oplib)"
    )
    parser.add_argument(
        "--quant", default="", help="popc bench --quant: int4 and/or int8 twins of the variants, e.g. int4"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps per run (default: 32)")
    parser.add_argument("--decode-prompt", type=int, default=64, help="prompt tokens before decode (default: 64)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: one per physical core)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the bench runs (default: cpu)")
    parser.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), help="element type of both exports (default: fp32 on cpu, fp16 on cuda)"
    )
    parser.add_argument("--json", type=Path, help="bench JSON (default: benchmarks/results/llama1b-shaped[-<N>l].json)")
    parser.add_argument(
        "--markdown", type=Path, help="bench tables (default: benchmarks/results/llama1b-shaped[-<N>l].md)"
    )
    args = parser.parse_args()
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    if not args.sparsities or any(not 0 < s < 1 for s in args.sparsities):
        parser.error("--sparsities must lie in (0, 1)")

    from popc.cache import cache_root
    from popc.errors import PopcError

    name = NAME if args.layers == FULL_LAYERS else f"{NAME}-{args.layers}l"
    work = (args.out_dir or cache_root() / "bench" / name).expanduser().resolve()
    as_json = args.json or RESULTS / f"{name}.json"
    markdown = args.markdown or RESULTS / f"{name}.md"
    for path in (as_json, markdown):
        if not path.parent.is_dir():
            parser.error(f"{path}: the directory {path.parent} does not exist")
    console.print(f"work directory {work}; results {as_json}, {markdown}", highlight=False)

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    try:
        wanted = shape(args.layers, args.max_positions, args.seed)
        built = write_model(work / "model", wanted, args.force)
        seconds["model"] = round(time.perf_counter() - started, 1)
        redo = args.force or args.reexport or built
        exported = False
        for kind, sparsity in (("dense", None), ("pop", args.sparsities[0])):
            mark = time.perf_counter()
            exported |= write_export(work / "model", work / kind, sparsity, redo, args.dtype)
            seconds[f"export_{kind}"] = round(time.perf_counter() - mark, 1)
        mark = time.perf_counter()
        result = bench(work, args)
        seconds["bench"] = round(time.perf_counter() - mark, 1)
    except PopcError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)
    seconds["total"] = round(time.perf_counter() - started, 1)

    from popc.bench import report

    # ru_maxrss is KiB on Linux; the children are the exports (the larger of the two).
    peak = {"build_and_bench": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)}
    if exported:
        peak["export"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9, 2)
    data = result.to_json()
    data["llama1b_shaped"] = {"shape": wanted, "work": str(work), "seconds": seconds, "peak_rss_gb": peak}
    as_json.write_text(json.dumps(data, indent=2) + "\n")
    report.write_markdown(result, markdown)

    out = Console() if Console().is_terminal else Console(width=220)
    for table in report.tables(result):
        out.print(table)
    out.print(summary(result))
    steps = ", ".join(f"{key} {value:.0f} s" for key, value in seconds.items())
    memory = f"peak memory: build and bench {peak['build_and_bench']:.1f} GB"
    memory += f", export {peak['export']:.1f} GB" if exported else ""
    console.print(f"[dim]{steps}; {memory}; wrote {as_json} and {markdown}[/]", highlight=False)


def bench(work: Path, args: argparse.Namespace):  # noqa: ANN201 - popc.bench.BenchResult
    from popc.bench import BenchPlan, run_bench
    from popc.progress import console_progress

    plan = BenchPlan(
        directory=work / "pop", dense=work / "dense", pop=work / "pop",
        variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        prompt_lengths=args.prompt_lengths, batches=args.batches, sparsities=args.sparsities,
        repeats=args.repeats, warmup=args.warmup, decode_tokens=args.decode_tokens,
        decode_prompt=args.decode_prompt, threads=args.threads, device=args.device, dtype=args.dtype,
        quant=[q.strip() for q in args.quant.split(",") if q.strip()],
    )  # fmt: skip
    with console_progress(console) as progress:
        progress.stage("popc bench")
        return run_bench(plan, progress=progress)


if __name__ == "__main__":
    main()
