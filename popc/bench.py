"""``popc bench``: prefill and decode latency of dense vs POP, against the memory roofline.

One run measures, on the same machine and the same random prompts:

* **variants**: the dense ONNX Runtime export of the model (``dense-ort``, the baseline
  every ratio is taken against), the POP export with the ai.popc ops' ONNX function
  bodies (``pop-body``) and with the popc op library's kernels (``pop-oplib``), Hugging
  Face PyTorch eager (``hf-eager``), the PyTorch POP reference (``pop-reference``) and
  onnxruntime-genai's own build of the same model (``ort-genai``, when the
  ``onnxruntime_genai`` package is installed);
* **TTFT** (time to first token) at each prompt length (batch 1): the prefill plus picking
  the first token, what a user waits for;
* **decode** ms per step and tokens/s at each batch size, at each POP sparsity (the POP
  export takes its regions as the ``pop_config`` input, so one export serves all);
* ratios against dense ORT and against the fastest **dense peer** of the same run
  (``ort-genai``, ``hf-eager``) at each prompt length and batch size;
* a **bytes model**: the weight bytes one batch-1 decode step reads per variant (FFN and
  total), the machine's read bandwidth (numpy streaming reads), and from them each
  variant's ideal ms/token and fraction of that roofline.

Every figure is the median over repeats, with min and max, after warm-up runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from popc.errors import PopcError

ORT_VARIANTS = ("dense-ort", "pop-body", "pop-oplib")
TORCH_VARIANTS = ("hf-eager", "pop-reference")
GENAI_VARIANT = "ort-genai"
# popc's dense export (its genai_config.json) driven by onnxruntime-genai's C++ runtime:
# the graph against genai's graph with the same driver.
DENSE_GENAI_RUNTIME = "dense-genai-runtime"
VARIANTS = ORT_VARIANTS + TORCH_VARIANTS + (GENAI_VARIANT, DENSE_GENAI_RUNTIME)
# Variants that run the model dense (one decode row per batch, no sparsity).
DENSE_VARIANTS = ("dense-ort", "hf-eager", GENAI_VARIANT, DENSE_GENAI_RUNTIME)
# Other runtimes' dense builds of the same model: every row is also compared with the
# fastest of these in the same run.
PEERS = (GENAI_VARIANT, "hf-eager")
LABELS = {
    "dense-ort": "dense ORT",
    "pop-body": "POP (function bodies)",
    "pop-oplib": "POP (op library)",
    "hf-eager": "HF PyTorch eager",
    "pop-reference": "POP PyTorch reference",
    GENAI_VARIANT: "onnxruntime-genai",
    DENSE_GENAI_RUNTIME: "dense ORT, genai runtime",
}
GENAI_INSTALL = 'pip install "popc[genai]" (or pip install onnxruntime-genai)'

Log = Callable[[str], None]


@dataclass
class BenchPlan:
    directory: Path  # a POP export or a dense export
    dense: Path | None = None  # the dense export (else the one of `directory`, or exported)
    pop: Path | None = None  # the POP export (else `directory` if it is one, or exported)
    model: str | None = None  # model spec for HF variants / auto exports (default: popc.json's source)
    prompt_lengths: Sequence[int] = (16, 128, 512, 2048)
    batches: Sequence[int] = (1, 4)
    sparsities: Sequence[float] = (0.25, 0.5, 0.75)
    variants: Sequence[str] | None = None  # None: every variant this machine can run (default_variants())
    repeats: int = 5
    warmup: int = 1
    decode_tokens: int = 32
    decode_prompt: int = 64
    threads: int | None = None
    device: str = "cpu"
    torch_max_prompt: int | None = None  # longest prompt the PyTorch variants prefill
    seed: int = 0


@dataclass
class Timing:
    median: float
    low: float
    high: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        values = [float(v) for v in samples]
        return cls(float(np.median(values)), min(values), max(values), values)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "samples": self.samples}


# ---- the machine ------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None, device: str) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads or os.cpu_count(),
        "threads_note": "intra-op threads of ONNX Runtime and torch.set_num_threads",
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "load_average_start": list(os.getloadavg()),
    }
    with _suppress():
        info["onnxruntime_genai"] = import_genai().__version__
    if device == "cuda":
        with _suppress():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return True


def read_bandwidth(megabytes: int = 512, repeats: int = 7) -> dict[str, float]:
    """The machine's streaming read bandwidth in GB/s: median of numpy reductions over a
    buffer far larger than the caches (one thread: ``sum``; BLAS threads: a gemv)."""
    n = megabytes * (1 << 20) // 4
    data = np.ones(n, np.float32)
    results = {}

    def measure(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return n * 4 / float(np.median(times)) / 1e9

    results["numpy_sum_gbs"] = measure(lambda: data.sum())
    matrix = data.reshape(-1, 4096)
    vector = np.ones(4096, np.float32)
    results["numpy_gemv_gbs"] = measure(lambda: matrix @ vector)
    results["gbs"] = max(results["numpy_sum_gbs"], results["numpy_gemv_gbs"])
    del data, matrix
    return results


# ---- the bytes model --------------------------------------------------------------------
def weight_inventory(model_path: Path) -> dict[str, Any]:
    """Initializer bytes of an export, split into lookup tables (only the rows of the
    current tokens are read: embeddings), POP FFN rows (``pop.*``) and everything else."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    sizes: dict[str, tuple[int, int]] = {}  # name -> (bytes, row bytes)
    for init in graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        count = math.prod(init.dims) if init.dims else 1
        row = math.prod(init.dims[1:]) * itemsize if len(init.dims) > 1 else itemsize
        sizes[init.name] = (count * itemsize, row)
    uses: dict[str, list[tuple[str, int]]] = {}

    def visit(nodes) -> None:  # noqa: ANN001
        for node in nodes:
            for position, name in enumerate(node.input):
                if name in sizes:
                    uses.setdefault(name, []).append((node.op_type, position))
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g.node)

    visit(graph.node)
    tables = other = 0
    table_rows = 0
    ffn: dict[str, int] = {}
    for name, (size, row) in sizes.items():
        if name.startswith("pop.") and name.rsplit(".", 1)[-1].endswith("_rows"):
            kind = name.rsplit(".", 1)[-1]
            ffn[kind] = ffn.get(kind, 0) + size
        elif name.startswith("pop."):
            other += 0  # static scores and biases: read at prefill only / negligible
        elif uses.get(name) and all(op == "Gather" and pos == 0 for op, pos in uses[name]):
            tables += size
            table_rows += row
        else:
            other += size
    return {"tables": tables, "table_row_bytes": table_rows, "other": other, "ffn_rows": ffn}


def ffn_fraction(kinds: Sequence[str], counts: np.ndarray, channels: int) -> float:
    """Fraction of the FFN's weight bytes a decode step reads: gate rows of R ∪ C and up and
    down rows of R ∪ kept (gated FFNs); fc1 rows of R ∪ C and fc2 rows of R ∪ kept (plain)."""
    retain, candidate, keep = (int(v) / channels for v in counts[:3])
    if retain >= 1.0:
        return 1.0
    scored, used = retain + candidate, retain + keep
    if "gate_rows" in kinds:
        return (scored + 2 * used) / 3
    return (scored + used) / 2


def bytes_model(dense_path: Path | None, pop_path: Path | None, channels: int, sparsities, settings_of) -> dict[str, Any]:
    """Weight bytes one batch-1 decode step reads, per variant key (``dense`` / ``pop@S``)."""
    result: dict[str, Any] = {}
    if pop_path is not None:
        pop = weight_inventory(pop_path)
        ffn_total = sum(pop["ffn_rows"].values())
        base = pop["other"] + pop["table_row_bytes"]
        kinds = list(pop["ffn_rows"])
        result["dense"] = {"ffn": ffn_total, "total": base + ffn_total}
        for sparsity in sparsities:
            counts = settings_of(sparsity).counts(channels)
            ffn = ffn_total * ffn_fraction(kinds, counts, channels)
            result[f"pop@{sparsity:g}"] = {"ffn": ffn, "total": base + ffn}
    if dense_path is not None:
        dense = weight_inventory(dense_path)
        total = dense["other"] + dense["table_row_bytes"]
        ffn = result.get("dense", {}).get("ffn")
        result["dense"] = {"ffn": ffn, "total": total}
    return result


# ---- timing helpers ---------------------------------------------------------------------
def _prompt(rng: np.random.Generator, vocab: int, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(10, max(11, vocab - 1), (batch, length), dtype=np.int64)
    return ids, np.ones_like(ids)


SETTLE_SECONDS = 0.2


def _interleaved(jobs: dict[Any, Callable[[], float]], warmup: int, repeats: int) -> dict[Any, Timing]:
    """Time every job ``repeats`` times, round-robin: the machine's drift over the run (a
    shared host's bandwidth moves by a third within minutes) then hits all of them alike."""
    for fn in jobs.values():
        for _ in range(warmup):
            fn()
    samples: dict[Any, list[float]] = {key: [] for key in jobs}
    for _ in range(repeats):
        for key, fn in jobs.items():
            # Let the previous job's thread pools (ORT's spin-waiting workers, PyTorch's
            # OpenMP team) go idle first: else they steal cores from this one.
            time.sleep(SETTLE_SECONDS)
            samples[key].append(fn())
    return {key: Timing.of(values) for key, values in samples.items()}


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def prefill_repeats(repeats: int, length: int) -> int:
    """Fewer repeats for long prompts (at least 2): a 2048-token prefill takes seconds."""
    return max(2, min(repeats, math.ceil(repeats * 256 / max(length, 1))))


class OrtRunner:
    def __init__(self, path: Path, plan: BenchPlan, use_oplib: bool):
        from popc.runtime import load

        self.model = load(path, device=plan.device, use_oplib=use_oplib, threads=plan.threads)
        self.vocab = int(self.model.config.get("vocab_size") or 32000)

    def stepper(self, pop, tokens: int):  # noqa: ANN001, ANN201
        """A bound stepper whose KV cache holds ``tokens``, sized up front as
        onnxruntime-genai's ``max_length`` sizes its cache."""
        return self.model.bound(pop, capacity=tokens)

    def prefill(self, ids: np.ndarray, mask: np.ndarray, pop) -> Callable[[], float]:  # noqa: ANN001
        """TTFT: the prefill (the KV cache's allocation included) and the first (greedy) token,
        as ``generate`` does it."""
        stepper = self.stepper(pop, ids.shape[1] + 1)

        def run() -> float:
            start = time.perf_counter()
            logits = stepper.prefill(ids, mask)
            logits[:, -1].argmax(-1)
            return _ms_since(start)

        return run

    def decode(self, ids: np.ndarray, mask: np.ndarray, steps: int, pop) -> Callable[[], float]:  # noqa: ANN001
        """A function that prefills (untimed) and returns ms per decode step over ``steps``."""

        def run() -> float:
            stepper = self.stepper(pop, ids.shape[1] + 1 + steps)
            logits = stepper.prefill(ids, mask)
            next_ids = logits[:, -1].argmax(-1).reshape(-1, 1)
            start = time.perf_counter()
            for _ in range(steps):
                logits = stepper.decode(next_ids, copy=False)
                next_ids = logits[:, -1].argmax(-1).reshape(-1, 1)
            return (time.perf_counter() - start) * 1000 / steps

        return run


class TorchRunner:
    """HF eager and the PyTorch POP reference over one Hugging Face model."""

    def __init__(self, spec: str, plan: BenchPlan, log: Log):
        import torch

        from popc.loading import load_model

        if plan.threads:
            torch.set_num_threads(plan.threads)
        log(f"loading {spec} in PyTorch")
        self.torch = torch
        self.model = load_model(spec).model.eval()
        self.vocab = int(self.model.config.vocab_size)
        # `generate` computes the prompt's last logits only; so does the TTFT measured here.
        import inspect

        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}

    def prefill(self, ids: np.ndarray, mask: np.ndarray, settings=None) -> Callable[[], float]:  # noqa: ANN001
        """TTFT: the prefill and the first (greedy) token."""
        torch = self.torch
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if settings is None:

            def run() -> float:
                start = time.perf_counter()
                with torch.no_grad():
                    out = self.model(input_ids=ids_t, attention_mask=mask_t, use_cache=True, **self.last_logits)
                    out.logits[:, -1].argmax(-1)
                return _ms_since(start)

            return run

        def reference_run(reference) -> float:  # noqa: ANN001
            start = time.perf_counter()
            logits, _ = reference.step(ids_t, mask_t)
            logits[:, -1].argmax(-1)
            return _ms_since(start)

        return lambda: self._with_reference(settings, reference_run)

    def _with_reference(self, settings, fn):  # noqa: ANN001, ANN202
        from popc.reference import PopReference

        reference = PopReference(self.model, settings)
        try:
            return fn(reference)
        finally:
            reference.remove()

    def decode(self, ids: np.ndarray, mask: np.ndarray, steps: int, settings=None) -> Callable[[], float]:  # noqa: ANN001
        torch = self.torch
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if settings is None:
            # HF `generate`: (N + 1 new tokens) - (1 new token), per token.
            def generate(new: int) -> float:
                start = time.perf_counter()
                with torch.no_grad():
                    self.model.generate(
                        input_ids=ids_t, attention_mask=mask_t, max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0,
                    )  # fmt: skip
                return time.perf_counter() - start

            return lambda: max(generate(steps + 1) - generate(1), 0.0) * 1000 / steps

        def run(reference) -> float:  # noqa: ANN001
            logits, cache = reference.step(ids_t, mask_t)
            attention = mask_t
            start = time.perf_counter()
            for _ in range(steps):
                next_ids = logits[:, -1].argmax(-1, keepdim=True)
                attention = torch.cat([attention, torch.ones_like(next_ids)], dim=1)
                logits, cache = reference.step(next_ids, attention, cache)
            return (time.perf_counter() - start) * 1000 / steps

        return lambda: self._with_reference(settings, run)


# ---- the onnxruntime-genai peer ------------------------------------------------------------
def import_genai():  # noqa: ANN201 - the onnxruntime_genai module
    """``onnxruntime_genai``, or a PopcError naming the package to install."""
    try:
        import onnxruntime_genai
    except ImportError as error:
        raise PopcError(f"the ort-genai variant needs onnxruntime-genai: {GENAI_INSTALL} ({error})") from None
    return onnxruntime_genai


def genai_available() -> bool:
    try:
        import_genai()
    except PopcError:
        return False
    return True


def default_variants() -> list[str]:
    """Every variant; ``ort-genai`` only where onnxruntime-genai is installed."""
    return [v for v in VARIANTS if v not in (GENAI_VARIANT, DENSE_GENAI_RUNTIME) or genai_available()]


def _is_hf_dir(path: Path) -> bool:
    """A Hugging Face checkpoint other tools can read: config.json naming its architecture,
    and safetensors weights."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("architectures")) and any(path.glob("*.safetensors"))


def hf_directory(spec: str, log: Log = lambda message: None) -> Path:
    """The fp32 Hugging Face directory of a popc model spec: a local HF directory itself, else
    (built-in names, GGUF files, hub ids) the directory ``popc.loading`` loads it from, which
    for GGUF sources is popc's fp32 cache (``$POPC_CACHE_DIR/fp32/<name>-<hash>/``, written
    by the first load)."""
    path = Path(spec).expanduser()
    if path.is_dir() and _is_hf_dir(path):
        return path
    from popc.loading import load_model

    for _ in range(2):  # a GGUF's first load reads the GGUF and writes the fp32 cache; the second reads the cache
        loaded = load_model(spec, log)
        where = Path(getattr(loaded.model.config, "name_or_path", "") or "")
        del loaded
        if where.is_dir() and _is_hf_dir(where):
            return where
    raise PopcError(
        f"no fp32 Hugging Face directory for {spec}: popc's fp32 cache could not be written, or the "
        "model's config.json names no `architectures`"
    )


def _source_digest(spec: str, genai_version: str) -> str:
    """Cache key of a genai build: the spec and, for files and directories, what lies there now."""
    digest = hashlib.sha256(f"{spec}\0{genai_version}".encode())
    path = Path(spec).expanduser()
    if path.exists():
        digest.update(str(path.resolve()).encode())
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        for item in files:
            stat = item.stat()
            digest.update(f"\0{item.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


_GENAI_MARKER = "popc-genai.json"


def genai_model(spec: str, log: Log = lambda message: None) -> Path:
    """onnxruntime-genai's fp32 CPU build of ``spec`` (its model builder, run once and cached
    under ``$POPC_CACHE_DIR/bench/genai-<digest>``)."""
    from popc.oplib import cache_root

    og = import_genai()
    target = cache_root() / "bench" / f"genai-{_source_digest(spec, og.__version__)}"
    if (target / _GENAI_MARKER).is_file():
        return target
    source = hf_directory(spec, log)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    log(f"building the onnxruntime-genai model of {spec} (cached in {target})")
    started = time.perf_counter()
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source),
        "-o", str(staging / "model"), "-p", "fp32", "-e", "cpu", "-c", str(staging / "hf-cache"),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0 or not (staging / "model" / "genai_config.json").is_file():
            lines = [ln.strip() for ln in (done.stderr + "\n" + done.stdout).replace("\r", "\n").splitlines()]
            last = next((ln for ln in reversed(lines) if ln and not ln.startswith("Saving") and "it/s]" not in ln), "")
            raise PopcError(
                f"onnxruntime-genai's model builder failed on {source} (exit {done.returncode}): {last[:300]}"
            )
        marker = {"source": spec, "hf_directory": str(source), "onnxruntime_genai": og.__version__,
                  "precision": "fp32", "execution_provider": "cpu",
                  "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        (staging / "model" / _GENAI_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        try:
            os.replace(staging / "model", target)
        except OSError:
            if not (target / _GENAI_MARKER).is_file():  # not a lost race: a broken entry
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging / "model", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class GenaiRunner:
    """onnxruntime-genai's build of the same model, driven by its Generator API."""

    def __init__(self, spec: str, plan: BenchPlan, log: Log, directory: Path | None = None):
        if plan.device != "cpu":
            raise PopcError("the ort-genai variant is measured on CPU only (--device cpu)")
        og = import_genai()
        self.og = og
        # `directory`: a model genai can load as it is (popc's own dense export); else genai's build.
        self.directory = directory or genai_model(spec, log)
        config = og.Config(str(self.directory))
        if plan.threads:
            threads = {"intra_op_num_threads": plan.threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        log(f"loading the onnxruntime-genai model {self.directory}")
        self.model = og.Model(config)
        genai_config = json.loads((self.directory / "genai_config.json").read_text())
        self.vocab = int(genai_config["model"].get("vocab_size") or 32000)

    def generator(self, batch: int, max_length: int, min_length: int = 0):  # noqa: ANN201
        """A greedy generator; ``min_length`` keeps EOS from ending a timed run early (popc's and
        the PyTorch variants' timed loops ignore EOS too)."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, min_length=min_length, do_sample=False, batch_size=batch)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: np.ndarray, mask: np.ndarray, settings=None) -> Callable[[], float]:  # noqa: ANN001, ARG002
        """TTFT: the generator (it allocates the KV cache, as popc's prefill does),
        ``append_tokens`` (the prefill) and the first ``generate_next_token``, which only picks
        the token from the prefill's logits. Equal-length prompts: no mask."""
        tokens = np.ascontiguousarray(ids, np.int32)
        batch, length = tokens.shape

        def run() -> float:
            start = time.perf_counter()
            generator = self.generator(batch, length + 1, length + 1)
            generator.append_tokens(tokens)
            generator.generate_next_token()
            return _ms_since(start)

        return run

    def decode(self, ids: np.ndarray, mask: np.ndarray, steps: int, settings=None) -> Callable[[], float]:  # noqa: ANN001, ARG002
        """ms per ``generate_next_token`` (one model run and the greedy pick) over ``steps``,
        after an untimed prefill and first token."""
        tokens = np.ascontiguousarray(ids, np.int32)
        batch, length = tokens.shape

        def run() -> float:
            total = length + 1 + steps
            generator = self.generator(batch, total, total)
            generator.append_tokens(tokens)
            generator.generate_next_token()
            start = time.perf_counter()
            for _ in range(steps):
                generator.generate_next_token()
            return _ms_since(start) / steps

        return run

    def greedy(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
        """Greedy new tokens for one prompt (stopping at EOS, as popc's ``generate_ids``) and the
        logits each was picked from (a correctness check of the peer)."""
        generator = self.generator(1, len(prompt) + new_tokens)
        generator.append_tokens(np.asarray([list(prompt)], np.int32))
        tokens, logits = [], []
        while not generator.is_done() and len(tokens) < new_tokens:
            logits.append(np.array(generator.get_logits())[0, -1])
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens, logits


# ---- the run ----------------------------------------------------------------------------
def _model_spec(config: dict[str, Any]) -> str:
    source = str(config.get("source") or "")
    if source.startswith("built-in "):
        return source.split()[1]
    if " (Hugging Face cache: " in source:  # a hub id: "org/name (Hugging Face cache: ...)"
        return source.split(" (Hugging Face cache: ", 1)[0]
    return source


def resolve_exports(plan: BenchPlan, log: Log) -> tuple[Path | None, Path | None, dict[str, Any]]:
    """(dense export, POP export, a popc.json) — exporting what is missing from the recorded source."""
    from popc.artifact import read_export

    location, config = read_export(plan.directory)
    dense = plan.dense
    pop = plan.pop
    if config.get("pop"):
        pop = pop or location.directory
    else:
        dense = dense or location.directory
    spec = plan.model or _model_spec(config)
    wants_pop = any(v in plan.variants for v in ("pop-body", "pop-oplib"))
    for kind, present, needed in (("dense", dense, "dense-ort" in plan.variants), ("pop", pop, wants_pop)):
        if present is not None or not needed:
            continue
        from popc.export import ExportPlan, export
        from popc.oplib import cache_root
        from popc.pop import PopSettings

        # hashlib, not hash(): str hashes differ between processes, and the cache must outlive one.
        key = f"{spec}\0{config.get('versions', {}).get('popc')}".encode()
        digest = hashlib.sha256(key).hexdigest()[:16]
        target = cache_root() / "bench" / f"{Path(spec).name or 'model'}-{digest}" / kind
        if not (target / "popc.json").is_file():
            log(f"exporting the {kind} model of {spec} to {target} (cached for later runs)")
            settings = PopSettings(retain=0.25, candidate=0.5, keep=0.25) if kind == "pop" else None
            export(ExportPlan(model=spec, out=target, force=True, pop=settings), progress=log)
        if kind == "dense":
            dense = target
        else:
            pop = target
    return dense, pop, config


def run_bench(plan: BenchPlan, log: Log = lambda message: None) -> dict[str, Any]:
    from popc.artifact import read_export
    from popc.defaults import settings_for_sparsity
    from popc.pop import PopSettings

    explicit = plan.variants is not None
    plan = dataclasses.replace(plan, variants=list(dict.fromkeys(plan.variants)) if explicit else default_variants())
    unknown = [v for v in plan.variants if v not in VARIANTS]
    if unknown:
        raise PopcError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if GENAI_VARIANT in plan.variants:
        import_genai()  # named explicitly: a missing package is an error, not a silent skip
    if plan.repeats < 1 or plan.decode_tokens < 1:
        raise PopcError("--repeats and --decode-tokens must be at least 1")
    if any(not 0 < s < 1 for s in plan.sparsities):
        raise PopcError("--sparsities must lie in (0, 1)")
    started = time.perf_counter()
    dense_dir, pop_dir, config = resolve_exports(plan, log)
    info = machine_info(plan.threads, plan.device)
    log("measuring read bandwidth")
    bandwidth = read_bandwidth()
    max_positions = int(config.get("max_positions") or 1 << 30)
    lengths = [n for n in plan.prompt_lengths if n + 1 < max_positions]
    skipped = [n for n in plan.prompt_lengths if n not in lengths]

    pop_config = read_export(pop_dir)[1] if pop_dir else None
    channels = int((pop_config or {}).get("pop", {}).get("intermediate_size") or 0)
    dense_path = read_export(dense_dir)[0].model_path if dense_dir else None
    pop_path = read_export(pop_dir)[0].model_path if pop_dir else None
    weights = bytes_model(dense_path, pop_path, channels, plan.sparsities, settings_for_sparsity) if channels or dense_path else {}

    runners: dict[str, Any] = {}
    if "dense-ort" in plan.variants and dense_dir:
        runners["dense-ort"] = OrtRunner(dense_dir, plan, use_oplib=False)
    if "pop-body" in plan.variants and pop_dir:
        runners["pop-body"] = OrtRunner(pop_dir, plan, use_oplib=False)
    if "pop-oplib" in plan.variants and pop_dir:
        runner = OrtRunner(pop_dir, plan, use_oplib=True)
        if runner.model.uses_oplib:
            runners["pop-oplib"] = runner
        else:
            log("the popc op library is not available: pop-oplib skipped (popc doctor --build)")
    torch_runner = None
    if any(v in plan.variants for v in TORCH_VARIANTS):
        torch_runner = TorchRunner(plan.model or _model_spec(config), plan, log)
        for variant in TORCH_VARIANTS:
            if variant in plan.variants:
                runners[variant] = torch_runner
    skipped_variants: dict[str, str] = {}
    if GENAI_VARIANT in plan.variants:
        try:
            runners[GENAI_VARIANT] = GenaiRunner(plan.model or _model_spec(config), plan, log)
        except PopcError as error:
            if explicit:
                raise
            log(f"ort-genai skipped: {error}")
            skipped_variants[GENAI_VARIANT] = str(error)
    if DENSE_GENAI_RUNTIME in plan.variants and dense_dir:
        from popc.export import GENAI_CONFIG_NAME

        if genai_available() and (Path(dense_dir) / GENAI_CONFIG_NAME).is_file():
            runners[DENSE_GENAI_RUNTIME] = GenaiRunner(str(dense_dir), plan, log, directory=Path(dense_dir))
        else:
            log(f"{DENSE_GENAI_RUNTIME} skipped: needs onnxruntime-genai and a fused dense export (its {GENAI_CONFIG_NAME})")
    if not runners:
        raise PopcError("nothing to measure: no variant could be set up")
    # Round-robin order: the dense ORT runs side by side, so each round pairs them closely.
    first = ("dense-ort", GENAI_VARIANT, DENSE_GENAI_RUNTIME)
    runners = {v: runners[v] for v in sorted(runners, key=lambda v: (v not in first, first.index(v) if v in first else 0))}
    vocab = next(r.vocab for r in runners.values())
    rng = np.random.default_rng(plan.seed)
    default_pop = settings_for_sparsity(0.5)

    def setting(variant: str, sparsity: float | None) -> PopSettings | None:
        if variant in DENSE_VARIANTS:
            return None
        return settings_for_sparsity(sparsity) if sparsity else default_pop

    # TTFT (prefill + first token): batch 1, POP at its 50 % settings (prefill runs dense
    # FFNs at any sparsity). Every variant gets the same random prompt, unpadded.
    prefill: list[dict[str, Any]] = []
    for length in lengths:
        ids, mask = _prompt(rng, vocab, 1, length)
        jobs = {}
        for variant, runner in runners.items():
            if variant in TORCH_VARIANTS and plan.torch_max_prompt and length > plan.torch_max_prompt:
                continue
            jobs[variant] = runner.prefill(ids, mask, setting(variant, None))
        log(f"TTFT {length:>5} tokens: {', '.join(LABELS[v] for v in jobs)} (interleaved)")
        for variant, timing in _interleaved(jobs, plan.warmup, prefill_repeats(plan.repeats, length)).items():
            prefill.append({"variant": variant, "prompt": length, "ms": timing.to_json()})

    # Decode: each batch size (equal-length random prompts, no padding), dense variants
    # once, POP variants at each sparsity.
    decode: list[dict[str, Any]] = []
    for batch in plan.batches:
        ids, mask = _prompt(rng, vocab, batch, plan.decode_prompt)
        jobs = {}
        for variant, runner in runners.items():
            levels = [None] if variant in DENSE_VARIANTS else list(plan.sparsities)
            for sparsity in levels:
                jobs[(variant, sparsity)] = runner.decode(ids, mask, plan.decode_tokens, setting(variant, sparsity))
        log(f"decode batch {batch}: {len(jobs)} variants (interleaved)")
        for (variant, sparsity), timing in _interleaved(jobs, plan.warmup, plan.repeats).items():
            decode.append({"variant": variant, "sparsity": sparsity or 0.0, "batch": batch, "ms_per_step": timing.to_json()})

    peers = _add_ratios(prefill, decode, weights, bandwidth["gbs"])
    info["load_average_end"] = list(os.getloadavg())
    info["seconds"] = round(time.perf_counter() - started, 1)
    return {
        "model": _model_spec(config),
        "exports": {"dense": str(dense_dir) if dense_dir else None, "pop": str(pop_dir) if pop_dir else None},
        "machine": info,
        "settings": {
            "prompt_lengths": lengths,
            "skipped_prompt_lengths": skipped,
            "batches": list(plan.batches),
            "sparsities": list(plan.sparsities),
            "pop_settings": {f"{s:g}": vars(settings_for_sparsity(s)) for s in plan.sparsities},
            "repeats": plan.repeats,
            "warmup": plan.warmup,
            "decode_tokens": plan.decode_tokens,
            "decode_prompt": plan.decode_prompt,
            "variants": list(runners),
            "skipped_variants": skipped_variants,
            "prefill_measures": "TTFT: prefill + first greedy token, batch 1",
        },
        "bandwidth": bandwidth,
        "bytes": weights,
        "prefill": prefill,
        "decode": decode,
        "best_peer": peers,
    }


def _fastest(rows, key: str, timing: str) -> dict[Any, tuple[str, float]]:  # noqa: ANN001
    """Per prompt length / batch size: (variant, median ms) of the fastest dense peer."""
    best: dict[Any, tuple[str, float]] = {}
    for row in rows:
        ms = row[timing]["median"]
        if row["variant"] in PEERS and ms > 0:  # HF eager's decode (a difference of two runs) can come out 0
            if row[key] not in best or ms < best[row[key]][1]:
                best[row[key]] = (row["variant"], ms)
    return best


def _ratio(timing: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    """``timing / base``: the median of per-round ratios when both were timed in the same
    interleaved rounds (paired: the host's drift from round to round cancels), else the
    ratio of the medians."""
    if not base or not base["median"]:
        return None
    ours, theirs = timing.get("samples") or [], base.get("samples") or []
    if ours and len(ours) == len(theirs) and all(t > 0 for t in theirs):
        return float(np.median(np.asarray(ours) / np.asarray(theirs)))
    return timing["median"] / base["median"]


def _add_ratios(prefill, decode, weights, gbs: float) -> dict[str, Any]:  # noqa: ANN001
    """Ratios against dense ORT and against the fastest dense peer of the same run (paired
    per round, see ``_ratio``), and the roofline of each decode row. Returns the fastest
    peer (by median) per prompt length and batch size."""
    timing_of = {(r["variant"], r["prompt"]): r["ms"] for r in prefill}
    best_prefill = _fastest(prefill, "prompt", "ms")
    for row in prefill:
        row["vs_dense"] = _ratio(row["ms"], timing_of.get(("dense-ort", row["prompt"])))
        peer = best_prefill.get(row["prompt"])
        row["best_peer"] = peer[0] if peer else None
        # < 1: faster than the peer
        row["vs_best_peer"] = _ratio(row["ms"], timing_of.get((peer[0], row["prompt"]))) if peer else None
    step_of = {(r["variant"], r["batch"]): r["ms_per_step"] for r in decode if r["sparsity"] == 0}
    best_decode = _fastest(decode, "batch", "ms_per_step")
    for row in decode:
        ms = row["ms_per_step"]["median"]
        row["tokens_per_s"] = row["batch"] * 1000 / ms if ms else None
        dense = step_of.get(("dense-ort", row["batch"]))
        row["speedup"] = _ratio(dense, row["ms_per_step"]) if dense and ms else None
        peer = best_decode.get(row["batch"])
        row["best_peer"] = peer[0] if peer else None
        # a speedup: > 1 is faster than the peer
        row["vs_best_peer"] = _ratio(step_of[(peer[0], row["batch"])], row["ms_per_step"]) if peer and ms else None
        key = "dense" if row["sparsity"] == 0 else f"pop@{row['sparsity']:g}"
        read = weights.get(key)
        if read and row["batch"] == 1:
            row["bytes_ffn"] = read["ffn"]
            row["bytes_total"] = read["total"]
            row["roofline_ms"] = read["total"] / (gbs * 1e9) * 1000
            row["roofline_fraction"] = row["roofline_ms"] / ms if ms else None
            dense_read = weights.get("dense")
            row["ideal_speedup"] = dense_read["total"] / read["total"] if dense_read else None
    return {
        "ttft": {str(length): {"variant": v, "ms": ms} for length, (v, ms) in best_prefill.items()},
        "decode": {str(batch): {"variant": v, "ms_per_step": ms} for batch, (v, ms) in best_decode.items()},
    }


# ---- output -----------------------------------------------------------------------------
def _fmt(timing: dict[str, Any], digits: int = 1) -> str:
    return f"{timing['median']:.{digits}f} ({timing['min']:.{digits}f}–{timing['max']:.{digits}f})"


def _per_s(row: dict[str, Any]) -> str:
    return f"{row['tokens_per_s']:.1f}" if row.get("tokens_per_s") else "—"


def _megabytes(row: dict[str, Any] | None) -> str:
    """Weights one decode step reads, MB, and the FFN's share (unknown without a POP export)."""
    if not row or not row.get("bytes_total"):
        return "—"
    ffn = f"{row['bytes_ffn'] / 1e6:.0f}" if row.get("bytes_ffn") is not None else "?"
    return f"{row['bytes_total'] / 1e6:.0f} ({ffn})"


def _peer_label(result: dict[str, Any], kind: str, key: Any) -> str:
    peer = (result.get("best_peer") or {}).get(kind, {}).get(str(key))
    return LABELS.get(peer["variant"], peer["variant"]) if peer else "—"


def _versions(info: dict[str, Any]) -> str:
    genai = f", onnxruntime-genai {info['onnxruntime_genai']}" if info.get("onnxruntime_genai") else ""
    return f"onnxruntime {info['onnxruntime']}{genai}, torch {info['torch']}"


def tables(result: dict[str, Any]):  # noqa: ANN201 - rich tables
    from rich.table import Table

    info = result["machine"]
    caption = (
        f"{info['cpu']}, {info['cores']} cores, {info['threads']} threads; {_versions(info)}; "
        f"median (min–max) of {result['settings']['repeats']} runs; "
        f"load average {info['load_average_start'][0]:.1f} → {info.get('load_average_end', [0])[0]:.1f}"
    )
    has_peers = bool(result.get("best_peer", {}).get("ttft") or result.get("best_peer", {}).get("decode"))
    peer_note = "; peer × = vs the fastest dense peer" if has_peers else ""
    prefill = Table(
        title=f"popc bench {result['model']}: TTFT ms (prefill + first token), batch 1 (× dense ORT{peer_note})",
        caption=caption,
    )
    prefill.add_column("variant", no_wrap=True)
    lengths = result["settings"]["prompt_lengths"]
    for length in lengths:
        prefill.add_column(f"{length} tokens", justify="right")
    variants = list(dict.fromkeys(r["variant"] for r in result["prefill"]))
    for variant in variants:
        cells = []
        for length in lengths:
            row = next((r for r in result["prefill"] if r["variant"] == variant and r["prompt"] == length), None)
            ratio = f" ×{row['vs_dense']:.2f}" if row and row.get("vs_dense") else ""
            peer = f"; peer ×{row['vs_best_peer']:.2f}" if row and row.get("vs_best_peer") else ""
            cells.append(_fmt(row["ms"], 0) + ratio + peer if row else "—")
        prefill.add_row(LABELS[variant], *cells)
    if has_peers:
        prefill.add_row("fastest dense peer", *[_peer_label(result, "ttft", n) for n in lengths], style="dim")

    title = "decode: ms per step (tokens/s; speedup vs dense ORT" + ("; peer × = speedup vs the fastest dense peer)" if has_peers else ")")
    decode = Table(title=title, caption=caption)
    decode.add_column("variant", no_wrap=True)
    decode.add_column("sparsity", justify="right")
    batches = result["settings"]["batches"]
    for batch in batches:
        decode.add_column(f"batch {batch}", justify="right")
    decode.add_column("weights read (FFN), MB", justify="right")
    decode.add_column("ideal speedup", justify="right")
    decode.add_column("roofline", justify="right")
    keys = list(dict.fromkeys((r["variant"], r["sparsity"]) for r in result["decode"]))
    for variant, sparsity in keys:
        cells = []
        first = None
        for batch in batches:
            row = next((r for r in result["decode"] if (r["variant"], r["sparsity"], r["batch"]) == (variant, sparsity, batch)), None)
            if row is None:
                cells.append("—")
                continue
            speed = f"; ×{row['speedup']:.2f}" if row.get("speedup") else ""
            peer = f"; peer ×{row['vs_best_peer']:.2f}" if row.get("vs_best_peer") else ""
            cells.append(f"{_fmt(row['ms_per_step'])} ({_per_s(row)} tok/s{speed}{peer})")
            if batch == 1:
                first = row
        read = _megabytes(first)
        ideal = f"×{first['ideal_speedup']:.2f}" if first and first.get("ideal_speedup") else "—"
        roof = f"{first['roofline_fraction']:.0%}" if first and first.get("roofline_fraction") else "—"
        decode.add_row(LABELS[variant], f"{sparsity:.0%}" if sparsity else "dense", *cells, read, ideal, roof)
    if has_peers:
        decode.add_row("fastest dense peer", "", *[_peer_label(result, "decode", b) for b in batches], "", "", "", style="dim")
    return prefill, decode


def markdown(result: dict[str, Any]) -> str:
    """The decode and TTFT tables as Markdown (for the README)."""
    info = result["machine"]
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads; {_versions(info)}; "
        f"read bandwidth {result['bandwidth']['gbs']:.1f} GB/s "
        f"(numpy); median (min–max) of {result['settings']['repeats']} runs of {result['settings']['decode_tokens']} "
        f"decode steps after a {result['settings']['decode_prompt']}-token prompt; load average "
        f"{info['load_average_start'][0]:.1f} at the start, {info.get('load_average_end', [0])[0]:.1f} at the end.",
        "",
    ]
    batches = result["settings"]["batches"]
    lengths = result["settings"]["prompt_lengths"]
    peers = result.get("best_peer") or {}
    has_peers = bool(peers.get("ttft") or peers.get("decode"))
    header = ["variant", "sparsity"] + [f"batch {b} ms/step (tok/s)" for b in batches]
    header += ["speedup b1", "ideal (bytes)", "of ideal", "MB read (FFN)", "roofline"]
    if has_peers:
        header += [f"vs best peer b{b}" for b in batches]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = list(dict.fromkeys((r["variant"], r["sparsity"]) for r in result["decode"]))
    for variant, sparsity in keys:
        rows = {r["batch"]: r for r in result["decode"] if (r["variant"], r["sparsity"]) == (variant, sparsity)}
        cells = [LABELS[variant], f"{sparsity:.0%}" if sparsity else "dense"]
        for batch in batches:
            row = rows.get(batch)
            cells.append(f"{_fmt(row['ms_per_step'])} ({_per_s(row)})" if row else "—")
        first = rows.get(1, {})
        speed, ideal = first.get("speedup"), first.get("ideal_speedup")
        cells.append(f"{speed:.2f}×" if speed else "—")
        cells.append(f"{ideal:.2f}×" if ideal else "—")
        cells.append(f"{speed / ideal:.2f}" if speed and ideal and variant != "dense-ort" else "—")
        cells.append(_megabytes(first))
        cells.append(f"{first['roofline_fraction']:.0%}" if first.get("roofline_fraction") else "—")
        if has_peers:
            for batch in batches:
                vs = rows.get(batch, {}).get("vs_best_peer")
                cells.append(f"{vs:.2f}×" if vs else "—")
        lines.append("| " + " | ".join(cells) + " |")
    header = "| TTFT ms, batch 1 | " + " | ".join(f"{n} tokens" for n in lengths) + " |"
    lines += ["", header, "|---|" + "---|" * len(lengths)]
    for variant in dict.fromkeys(r["variant"] for r in result["prefill"]):
        cells = [LABELS[variant]]
        for length in lengths:
            row = next((r for r in result["prefill"] if r["variant"] == variant and r["prompt"] == length), None)
            ratios = []
            if row and row.get("vs_dense"):
                ratios.append(f"{row['vs_dense']:.2f}×")
            if row and row.get("vs_best_peer"):
                ratios.append(f"peer {row['vs_best_peer']:.2f}×")
            ratio = f" ({'; '.join(ratios)})" if ratios else ""
            cells.append(f"{_fmt(row['ms'], 0)}{ratio}" if row else "—")
        lines.append("| " + " | ".join(cells) + " |")
    if has_peers:
        lines.append("| fastest dense peer | " + " | ".join(_peer_label(result, "ttft", n) for n in lengths) + " |")
        decode_peers = ", ".join(f"batch {b}: {_peer_label(result, 'decode', b)}" for b in batches)
        lines += [
            "",
            "TTFT: prefill plus picking the first token (batch 1); ratios are ms ÷ dense ORT ms and "
            "ms ÷ the fastest dense peer's ms (below 1: faster). Decode \"vs best peer\" is the peer's "
            f"ms/step ÷ the variant's (above 1: faster). Fastest dense peer at decode: {decode_peers}. "
            "Every ratio is the median of per-round ratios (variants run round-robin, so each round "
            "pairs them under the same host conditions); the ms columns are plain medians.",
        ]
    return "\n".join(lines) + "\n"


def write_plot(result: dict[str, Any], path: Path) -> None:
    """Decode latency and speedup against sparsity (batch 1), and prefill against prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in result["decode"] if r["batch"] == 1]
    dense = next((r for r in decode if r["variant"] == "dense-ort"), None)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    latency, speedup, prefill = axes
    styles = {"pop-oplib": "o-", "pop-body": "s--", "pop-reference": "^:"}
    for variant, style in styles.items():
        rows = sorted((r for r in decode if r["variant"] == variant), key=lambda r: r["sparsity"])
        if not rows:
            continue
        xs = [r["sparsity"] * 100 for r in rows]
        ys = [r["ms_per_step"]["median"] for r in rows]
        err = [[y - r["ms_per_step"]["min"] for y, r in zip(ys, rows)], [r["ms_per_step"]["max"] - y for y, r in zip(ys, rows)]]
        latency.errorbar(xs, ys, yerr=err, fmt=style, label=LABELS[variant], capsize=3)
        if dense and variant != "pop-reference":
            # 0 % sparsity is the dense export itself (speedup 1).
            speedup.plot([0.0, *xs], [1.0, *[r["speedup"] for r in rows]], style, label=LABELS[variant])
    for variant, color in (
        ("dense-ort", "black"), ("hf-eager", "gray"), (GENAI_VARIANT, "tab:green"), (DENSE_GENAI_RUNTIME, "tab:olive")
    ):
        row = next((r for r in decode if r["variant"] == variant), None)
        if row:
            latency.axhline(row["ms_per_step"]["median"], color=color, linestyle="-", linewidth=1, label=LABELS[variant])
    ideal = sorted((r for r in decode if r["variant"] == "pop-oplib" and r.get("ideal_speedup")), key=lambda r: r["sparsity"])
    if ideal:
        xs = [0.0] + [r["sparsity"] * 100 for r in ideal]
        speedup.plot(xs, [1.0] + [r["ideal_speedup"] for r in ideal], "k-", label="ideal (bytes model)")
        if dense and dense.get("roofline_ms"):
            latency.plot(xs, [dense["roofline_ms"]] + [r["roofline_ms"] for r in ideal], "k:", label="roofline (bytes / bandwidth)")
    speedup.axhline(1.0, color="gray", linewidth=0.8)
    latency.set(xlabel="FFN sparsity at decode (%)", ylabel="ms per token (batch 1)", title="decode latency", yscale="log")
    speedup.set(xlabel="FFN sparsity at decode (%)", ylabel="× dense ORT", title="decode speedup over dense ORT")
    for variant in dict.fromkeys(r["variant"] for r in result["prefill"]):
        rows = sorted((r for r in result["prefill"] if r["variant"] == variant), key=lambda r: r["prompt"])
        prefill.plot([r["prompt"] for r in rows], [r["ms"]["median"] for r in rows], "o-", label=LABELS[variant])
    prefill.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms (batch 1)", title="TTFT (prefill + first token)")
    lengths = result["settings"]["prompt_lengths"]
    if lengths:
        prefill.set_xticks(lengths, [str(n) for n in lengths])
        prefill.minorticks_off()
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    info = result["machine"]
    fig.suptitle(f"popc bench: {result['model']} fp32 on {info['cpu']} ({info['threads']} threads, onnxruntime {info['onnxruntime']})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
