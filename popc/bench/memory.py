"""Peak resident memory of each bench variant, each measured in a fresh process.

The bench times its variants round-robin in one process, so that process's resident set
holds all of them at once and says nothing about any one. Here every (variant, decode
batch size) gets a child process of its own (``python -m popc.bench.memory JOB``) that:

1. imports popc's bench runners and the variant's runtime (ONNX Runtime; PyTorch and
   transformers; onnxruntime-genai), then reads its peak RSS so far: the **baseline**,
   what any process running that runtime holds before it loads a model;
2. builds the same :class:`~popc.bench.runners.Runner` the bench times, with the same
   thread count and device (the **loaded** figure);
3. runs that runner's ``decode`` once, untimed and without repeats: a prefill of the
   decode prompt and ``decode_tokens`` steps at that batch, at the first POP sparsity of
   the plan for the POP variants (the regions change which rows are read, not what is
   allocated), and reads the **peak**.

Every figure is the process's high-water mark of resident host memory so far (``VmHWM``,
what ``getrusage``'s ``ru_maxrss`` would say but for what a child inherits: see
:func:`peak_rss_mib`; a CUDA device's memory is not in it), so peak >= loaded >= baseline. The child
prints one ``popc-bench-memory: {json}`` line; a child that fails or times out gives a
:class:`MemoryRow` with no figures and the reason, never a failed bench.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popc.bench.plan import DENSE_VARIANTS, ORT_VARIANTS, TORCH_VARIANTS, BenchPlan, split_variant
from popc.bench.result import MemoryRow
from popc.progress import Progress, or_silent

if TYPE_CHECKING:
    from popc.bench.exports import BenchExports
    from popc.bench.runners import Runner

MARKER = "popc-bench-memory: "
# A child loads one model and runs one decode; a hung one is cut off, not waited on forever.
CHILD_TIMEOUT_SECONDS = 900
KINDS = ("ort", "torch", "genai")


@dataclass(frozen=True)
class MemoryJob:
    """What one child process loads and runs: everything is plain data (it travels as JSON)."""

    variant: str
    kind: str  # "ort" (OrtRunner), "torch" (TorchRunner), "genai" (GenaiRunner)
    source: str  # the export directory, the model spec, or the onnxruntime-genai model directory
    batch: int
    prompt: int  # decode prompt tokens
    steps: int  # decode steps
    threads: int
    device: str = "cpu"
    use_oplib: bool = False  # ort: the popc op library's kernels (a POP export)
    sparsity: float | None = None  # POP regions (popc.defaults), None: a dense run
    seed: int = 0


def peak_rss_mib() -> float:
    """This process's peak resident set so far, MiB: ``VmHWM`` of /proc/self/status on Linux,
    else ``ru_maxrss`` (KiB; bytes on macOS).

    Not ``ru_maxrss`` on Linux: a process started by another inherits that one's high-water
    mark (fork copies the memory map with its mark, and exec keeps the larger of the two), so
    a child of a bench that has held every variant would report the bench's peak. ``VmHWM``
    belongs to the memory map exec gave the child: its own peak from its first page on."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


# ---- the child ----------------------------------------------------------------------------
def _import_runtime(kind: str) -> None:
    """Import what any process running ``kind`` holds before its model loads (the baseline):
    the runtime and the libraries its loading imports (transformers for popc's tokenizer and
    for the PyTorch model), so that the figures above the baseline are the model's own."""
    import numpy  # noqa: F401

    import popc.bench.run  # noqa: F401 - the runners and their prompts
    import popc.defaults  # noqa: F401

    if kind == "ort":
        import onnxruntime  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401 - popc.runtime.load loads the export's tokenizer

        import popc.runtime  # noqa: F401
    elif kind == "torch":
        import torch  # noqa: F401
        import transformers.generation.utils  # noqa: F401 - imported lazily by the first model
        import transformers.modeling_utils  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        import popc.loading  # noqa: F401
        import popc.reference  # noqa: F401
    elif kind == "genai":
        import onnxruntime_genai  # noqa: F401
    else:
        raise ValueError(f"unknown runner kind {kind!r}; one of {', '.join(KINDS)}")


def _runner(job: MemoryJob) -> Any:  # a popc.bench.runners.Runner
    from popc.bench.peers import GenaiRunner
    from popc.bench.runners import OrtRunner, TorchRunner
    from popc.errors import PopcError

    if job.kind == "ort":
        runner = OrtRunner(Path(job.source), job.threads, job.device, use_oplib=job.use_oplib)
        if job.use_oplib and not runner.uses_oplib:
            raise PopcError("the popc op library is not available (popc doctor --build)")
        return runner
    if job.kind == "torch":
        return TorchRunner(job.source, job.threads)
    return GenaiRunner(Path(job.source), job.threads, job.device)


def measure_here(job: MemoryJob) -> MemoryRow:
    """Load ``job``'s variant and run one decode in this process; its RSS figures. Meant for a
    fresh process (``python -m popc.bench.memory``): anything already loaded counts too."""
    import numpy as np

    from popc.bench.run import random_prompt
    from popc.defaults import settings_for_sparsity

    _import_runtime(job.kind)
    baseline = peak_rss_mib()
    runner = _runner(job)
    loaded = peak_rss_mib()
    ids, mask = random_prompt(np.random.default_rng(job.seed), runner.vocab, job.batch, job.prompt)
    settings = settings_for_sparsity(job.sparsity) if job.sparsity else None
    runner.decode(ids, mask, job.steps, settings)()
    return MemoryRow(
        job.variant, job.batch, job.sparsity or 0.0, baseline_mib=baseline, loaded_mib=loaded, peak_mib=peak_rss_mib()
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m popc.bench.memory JOB_JSON``: one :class:`MemoryJob`; prints one marker line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m popc.bench.memory JOB_JSON", file=sys.stderr)
        return 2
    job = MemoryJob(**json.loads(args[0]))
    try:
        row = measure_here(job)
    except Exception as error:  # reported to the parent as a missing figure, with why
        print(MARKER + json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
        return 1
    print(MARKER + json.dumps(dataclasses.asdict(row)), flush=True)
    return 0


# ---- the parent ---------------------------------------------------------------------------
def memory_jobs(plan: BenchPlan, exports: BenchExports, runners: dict[str, Runner]) -> list[MemoryJob]:
    """A job per variant the bench timed (``runners``, from ``run.make_runners``) and batch size
    of the resolved ``plan``'s ``memory_batches``: the same source, threads and device as the runner."""
    if plan.threads is None or plan.memory_batches is None:
        raise ValueError("memory_jobs takes a resolved plan (BenchPlan.resolved())")
    sparsity = plan.sparsities[0] if plan.sparsities else 0.5
    jobs = []
    for variant, runner in runners.items():
        base = split_variant(variant)[0]
        if base in ORT_VARIANTS:  # fp32 or quantized: the export the runner loaded
            kind, source = "ort", str(exports.path_of(variant))
        elif variant in TORCH_VARIANTS:
            kind, source = "torch", exports.spec
        else:  # a GenaiRunner: the directory it loaded (genai's build, or popc's dense export)
            kind, source = "genai", str(runner.directory)
        for batch in plan.memory_batches:
            jobs.append(MemoryJob(
                variant, kind, source, batch=batch, prompt=plan.decode_prompt, steps=plan.decode_tokens,
                threads=plan.threads, device=plan.device, use_oplib=base == "pop-oplib",
                sparsity=None if variant in DENSE_VARIANTS else sparsity, seed=plan.seed,
            ))  # fmt: skip
    return jobs


def _failed(job: MemoryJob, why: str) -> MemoryRow:
    return MemoryRow(job.variant, job.batch, job.sparsity or 0.0, error=why)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def measure(job: MemoryJob, timeout: float = CHILD_TIMEOUT_SECONDS) -> MemoryRow:
    """``job`` in a fresh Python process (this interpreter, this environment, this popc)."""
    import popc

    env = dict(os.environ)
    # The child imports this very popc, installed or not.
    root = str(Path(popc.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "popc.bench.memory", json.dumps(dataclasses.asdict(job))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return _failed(job, f"timed out after {timeout:.0f} s")
    except OSError as error:
        return _failed(job, f"could not start {sys.executable}: {error}")
    reported = [line[len(MARKER) :] for line in done.stdout.splitlines() if line.startswith(MARKER)]
    try:
        data = json.loads(reported[-1]) if reported else {}
    except ValueError:
        data = {}
    if done.returncode == 0 and data.get("peak_mib") is not None:
        return MemoryRow(**{**data, "error": None})
    why = data.get("error") or _last_line(done.stderr) or _last_line(done.stdout)
    return _failed(job, f"exit {done.returncode}: {why}" if why else f"exit {done.returncode}")


def measure_all(jobs: Sequence[MemoryJob], progress: Progress | None = None) -> list[MemoryRow]:
    """Every job, one fresh process after the other (never side by side: they would share the cores)."""
    progress = or_silent(progress)
    progress.start(len(jobs))
    rows = []
    for job in jobs:
        row = measure(job)
        if row.error:
            progress.stage(f"peak memory of {job.variant} at batch {job.batch} not measured: {row.error}")
        rows.append(row)
        progress.advance()
    return rows


if __name__ == "__main__":
    sys.exit(main())
