"""onnxruntime-genai as a peer: its own build of the model (made once, cached) and its runner.

``ort-genai`` runs the model builder's fp32 CPU output (fp16 for the CUDA execution provider
with ``--device cuda``) through genai's Generator API; ``dense-genai-runtime`` runs popc's own
dense export (its genai_config.json) the same way. Both run with the bench's thread count, like
every other variant. On CUDA they need onnxruntime-genai's CUDA build (``onnxruntime-genai-cuda``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from popc.atomic import atomic_directory, staging_directory
from popc.bench.plan import GENAI_VARIANTS, ORT_VARIANTS, TORCH_VARIANTS, VARIANTS
from popc.cache import cache_root
from popc.errors import PopcError
from popc.pop import PopSettings
from popc.progress import Progress, or_silent

GENAI_INSTALL = 'pip install "popc[genai]" (or pip install onnxruntime-genai)'
GENAI_CUDA_INSTALL = "pip install onnxruntime-genai-cuda (next to popc[gpu]; not onnxruntime-genai)"
GENAI_MARKER = "popc-genai.json"  # written last into a finished build: its presence means complete


def import_genai() -> ModuleType:
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


def genai_version() -> str | None:
    return import_genai().__version__ if genai_available() else None


def import_genai_for(device: str) -> ModuleType:
    """``onnxruntime_genai`` able to run on ``device``, or a PopcError saying what to install
    (on CUDA: the onnxruntime-genai-cuda build, whose ``is_cuda_available()`` is true)."""
    og = import_genai()
    if device == "cuda" and not og.is_cuda_available():
        raise PopcError(f"the onnxruntime-genai variants on --device cuda need its CUDA build: {GENAI_CUDA_INSTALL}")
    if device not in ("cpu", "cuda"):
        raise PopcError(f"the onnxruntime-genai variants run on cpu or cuda, not {device}")
    return og


def genai_available_on(device: str) -> bool:
    """Whether the onnxruntime-genai variants can run on ``device`` here (on CUDA: its CUDA build)."""
    try:
        import_genai_for(device)
    except PopcError:
        return False
    return True


def builder_arguments(precision: str, device: str) -> list[str]:
    """The model builder's ``-p``/``-e``: on CUDA, fp16 stands in for fp32 (what genai's users run
    on a GPU, and what popc's CUDA exports are measured in); int4 stays int4."""
    if device == "cuda":
        return ["-p", "fp16" if precision == "fp32" else precision, "-e", "cuda"]
    return ["-p", precision, "-e", "cpu"]


def default_variants() -> list[str]:
    """Every fp32 variant; the onnxruntime-genai ones only where it is installed (the quantized
    ones come with ``--quant``: :func:`popc.bench.plan.with_quant`)."""
    fp32 = ORT_VARIANTS + TORCH_VARIANTS + GENAI_VARIANTS
    return [v for v in fp32 if v in VARIANTS and (v not in GENAI_VARIANTS or genai_available())]


def _is_hf_dir(path: Path) -> bool:
    """A Hugging Face checkpoint other tools can read: config.json naming its architecture,
    and safetensors weights."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("architectures")) and any(path.glob("*.safetensors"))


def hf_directory(spec: str, progress: Progress | None = None) -> Path:
    """The fp32 Hugging Face directory of a popc model spec: a local HF directory itself, else
    (built-in names, GGUF files, hub ids) the directory ``popc.loading`` loads it from, which
    for GGUF sources is popc's fp32 cache (written by the first load)."""
    path = Path(spec).expanduser()
    if path.is_dir() and _is_hf_dir(path):
        return path
    from popc.loading import load_model

    for _ in range(2):  # a GGUF's first load reads the GGUF and writes the fp32 cache; the second reads the cache
        loaded = load_model(spec, progress=progress)
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


def _is_genai_build(path: Path) -> bool:
    return (path / GENAI_MARKER).is_file()


GENAI_PRECISIONS = ("fp32", "int4")


def genai_model(spec: str, progress: Progress | None = None, precision: str = "fp32", device: str = "cpu") -> Path:
    """onnxruntime-genai's build of ``spec`` for ``device``: its model builder (``-p fp32`` or
    ``-p int4 -e cpu``; on CUDA ``-p fp16`` or ``-p int4`` with ``-e cuda``, see
    :func:`builder_arguments`), with the builder's own defaults otherwise (for int4 on the CPU,
    blocks of 32 and accuracy level 4), run once into ``cache_root()/bench/genai-<digest>``
    (``genai-int4-<digest>``, ``genai-cuda-fp16-<digest>``; staged, then renamed: a crash leaves
    no half build)."""
    progress = or_silent(progress)
    if precision not in GENAI_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(GENAI_PRECISIONS)}, not {precision!r}")
    og = import_genai_for(device)
    arguments = builder_arguments(precision, device)
    built_precision = arguments[1]
    if device == "cuda":
        prefix, key = f"genai-cuda-{built_precision}", f"{og.__version__}\0cuda\0{built_precision}"
    else:  # the CPU builds keep the names they always had
        prefix = "genai" if precision == "fp32" else f"genai-{precision}"
        key = og.__version__ if precision == "fp32" else f"{og.__version__}\0{precision}"
    digest = _source_digest(spec, key)
    target = cache_root() / "bench" / f"{prefix}-{digest}"
    if _is_genai_build(target):
        return target
    source = hf_directory(spec, progress)
    progress.stage(f"building the onnxruntime-genai {built_precision} {device} model of {spec} (cached in {target})")
    started = time.perf_counter()
    # The builder's Hugging Face cache is scratch: staged apart, so that it never lands in the build.
    with staging_directory(target.parent, "genai-hf-cache") as scratch, atomic_directory(
        target, complete=_is_genai_build
    ) as staging:
        command = [
            sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source),
            "-o", str(staging), *arguments, "-c", str(scratch),
        ]  # fmt: skip
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0 or not (staging / "genai_config.json").is_file():
            lines = [ln.strip() for ln in (done.stderr + "\n" + done.stdout).replace("\r", "\n").splitlines()]
            last = next((ln for ln in reversed(lines) if ln and not ln.startswith("Saving") and "it/s]" not in ln), "")
            raise PopcError(
                f"onnxruntime-genai's model builder failed on {source} (exit {done.returncode}): {last[:300]}"
            )
        marker = {"source": spec, "hf_directory": str(source), "onnxruntime_genai": og.__version__,
                  "precision": built_precision, "execution_provider": device,
                  "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        if precision != "fp32":
            marker["matmul_nbits"] = matmul_nbits_settings(staging / "model.onnx")
        (staging / GENAI_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return target


def matmul_nbits_settings(model_path: Path) -> dict[str, list[int]]:
    """The ``bits`` / ``block_size`` / ``accuracy_level`` a quantized build's MatMulNBits nodes
    use (each a sorted list of the values found): what the builder's defaults were."""
    import onnx

    found: dict[str, set[int]] = {"bits": set(), "block_size": set(), "accuracy_level": set()}
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name in found:
                    found[attribute.name].add(int(attribute.i))
    return {name: sorted(values) for name, values in found.items()}


class GenaiRunner:
    """A model onnxruntime-genai loads (its own build, or popc's dense export), driven by its
    Generator API. Implements :class:`popc.bench.runners.Runner`; dense only."""

    def __init__(self, directory: Path, threads: int, device: str = "cpu", progress: Progress | None = None) -> None:
        og = import_genai_for(device)
        self.og = og
        self.directory = Path(directory)
        self.threads = threads
        self.device = device
        config = og.Config(str(self.directory))
        # Overlaid, not written into genai_config.json: the directory may be the user's export.
        session_options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
        # The execution provider is the bench's device, whatever the directory's config names.
        config.clear_providers()
        if device == "cuda":
            config.append_provider("cuda")
        or_silent(progress).stage(f"loading the onnxruntime-genai model {self.directory}")
        self.model = og.Model(config)
        genai_config = json.loads((self.directory / "genai_config.json").read_text())
        self.vocab = int(genai_config["model"].get("vocab_size") or 32000)

    def generator(self, batch: int, max_length: int, min_length: int = 0):
        """A greedy generator; ``min_length`` keeps EOS from ending a timed run early (popc's and
        the PyTorch variants' timed loops ignore EOS too)."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, min_length=min_length, do_sample=False, batch_size=batch)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: np.ndarray, mask: np.ndarray, settings: PopSettings | None) -> Callable[[], float]:
        """The generator (it allocates the KV cache, as popc's prefill does), ``append_tokens``
        (the prefill) and the first ``generate_next_token``, which only picks the token from the
        prefill's logits. Equal-length prompts: no mask."""
        tokens = np.ascontiguousarray(ids, np.int32)
        batch, length = tokens.shape

        def run() -> float:
            start = time.perf_counter()
            generator = self.generator(batch, length + 1, length + 1)
            generator.append_tokens(tokens)
            generator.generate_next_token()
            return (time.perf_counter() - start) * 1000

        return run

    def decode(
        self, ids: np.ndarray, mask: np.ndarray, steps: int, settings: PopSettings | None
    ) -> Callable[[], float]:
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
            return (time.perf_counter() - start) * 1000 / steps

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
