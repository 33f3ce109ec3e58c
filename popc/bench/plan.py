"""What a ``popc bench`` run measures: the variants it can compare, and :class:`BenchPlan`.

The default plan finishes in a few minutes on a 2-core CPU (three prompt lengths, three
batch sizes, one POP sparsity, three repeats, and a fresh process per variant for its peak
memory at the largest batch); :meth:`BenchPlan.full` is the whole matrix docs/results.md's
tables come from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popc.errors import PopcError

ORT_VARIANTS = ("dense-ort", "pop-body", "pop-oplib")
TORCH_VARIANTS = ("hf-eager", "pop-reference")
GENAI_VARIANT = "ort-genai"
# popc's dense export (its genai_config.json) driven by onnxruntime-genai's C++ runtime:
# the graph against genai's graph with the same driver.
DENSE_GENAI_RUNTIME = "dense-genai-runtime"
GENAI_VARIANTS = (GENAI_VARIANT, DENSE_GENAI_RUNTIME)
# Quantized exports (``popc export --quant``): popc's ORT variants on int4 / int8 weights,
# named ``{variant}-{scheme}`` (dense-ort-int4, pop-oplib-int8, ...).
QUANT_SCHEMES = ("int4", "int8")
QUANT_VARIANTS = tuple(f"{v}-{q}" for q in QUANT_SCHEMES for v in ORT_VARIANTS)
# The quantized peers: onnxruntime-genai's int4 CPU build (its builder's `-p int4 -e cpu`,
# its defaults: block 32, accuracy level 4) and llama.cpp's llama-bench on a Q4_0 GGUF.
GENAI_INT4 = "ort-genai-int4"
LLAMA_CPP = "llama.cpp-q4_0"
QUANT_PEERS = (GENAI_INT4, LLAMA_CPP)
GENAI_RUNNERS = (*GENAI_VARIANTS, GENAI_INT4)  # the variants onnxruntime-genai runs
VARIANTS = ORT_VARIANTS + TORCH_VARIANTS + GENAI_VARIANTS + QUANT_VARIANTS + QUANT_PEERS
POP_EXPORT_VARIANTS = ("pop-body", "pop-oplib")
# Variants that run the model dense (one decode row per batch, no sparsity).
DENSE_VARIANTS = ("dense-ort", "hf-eager", GENAI_VARIANT, DENSE_GENAI_RUNTIME, *QUANT_PEERS) + tuple(
    f"dense-ort-{q}" for q in QUANT_SCHEMES
)
# Other runtimes' dense builds of the same model: every row is also compared with the
# fastest of these in the same run (fp32 rows with the fp32 peers, quantized rows with the
# quantized peers).
PEERS = (GENAI_VARIANT, "hf-eager")
LABELS = {
    "dense-ort": "dense ORT",
    "pop-body": "POP (function bodies)",
    "pop-oplib": "POP (op library)",
    "hf-eager": "HF PyTorch eager",
    "pop-reference": "POP PyTorch reference",
    GENAI_VARIANT: "onnxruntime-genai",
    DENSE_GENAI_RUNTIME: "dense ORT, genai runtime",
    GENAI_INT4: "onnxruntime-genai int4",
    LLAMA_CPP: "llama.cpp Q4_0",
}
LABELS.update({f"{v}-{q}": f"{LABELS[v]} {q}" for q in QUANT_SCHEMES for v in ORT_VARIANTS})


def split_variant(variant: str) -> tuple[str, str | None]:
    """A popc ORT variant and its quantization scheme: ``pop-oplib-int4`` -> (pop-oplib, int4);
    every other variant -> (itself, None)."""
    for scheme in QUANT_SCHEMES:
        base = variant.removesuffix(f"-{scheme}")
        if base != variant and base in ORT_VARIANTS:
            return base, scheme
    return variant, None


def is_quantized(variant: str) -> bool:
    """A variant on quantized weights: popc's int4/int8 exports and the quantized peers."""
    return variant in QUANT_PEERS or split_variant(variant)[1] is not None


def with_quant(variants: Sequence[str], schemes: Sequence[str], peers: bool) -> list[str]:
    """``variants`` and, for each scheme, the quantized twin of each of popc's ORT variants
    among them; with ``peers``, the int4 peers too when int4 is among the schemes."""
    out = list(variants)
    for scheme in schemes:
        out += [f"{v}-{scheme}" for v in variants if v in ORT_VARIANTS]
    if peers and "int4" in schemes:
        out += list(QUANT_PEERS)
    return list(dict.fromkeys(out))


DEVICES = ("cpu", "cuda")
# The element type of popc's exports on each device when the plan names none: on a GPU
# people deploy fp16 (bf16 on request), on a CPU fp32 (or a quantization scheme).
DEVICE_DTYPES = {"cpu": "float32", "cuda": "float16"}
# What runs on --device cuda: popc's ORT variants and onnxruntime-genai's own (fp16) CUDA build
# (PyTorch, genai's runtime over popc's graph and the quantized variants run on the CPU).
CUDA_VARIANTS = (*ORT_VARIANTS, GENAI_VARIANT)

# `--full`: every measured sparsity, a 2048-token prompt, more repeats (~15 min
# for SmolLM2-135M on 2 cores, against a few minutes for the defaults).
FULL_MATRIX: dict[str, Any] = {
    "prompt_lengths": (16, 128, 512, 2048),
    "batches": (1, 4, 8),
    "sparsities": (0.25, 0.5, 0.75),
    "repeats": 5,
}


@dataclass(frozen=True)
class BenchPlan:
    directory: Path  # a POP export or a dense export
    dense: Path | None = None  # the dense export (else the one of `directory`, or exported once)
    pop: Path | None = None  # the POP export (else `directory` if it is one, or exported once)
    model: str | None = None  # model spec for the PyTorch and genai variants (default: popc.json's source)
    prompt_lengths: Sequence[int] = (16, 128, 512)
    batches: Sequence[int] = (1, 4, 8)
    sparsities: Sequence[float] = (0.5,)
    variants: Sequence[str] | None = None  # None: every variant this machine can run (default_variants())
    repeats: int = 3
    warmup: int = 1
    decode_tokens: int = 32
    decode_prompt: int = 64
    threads: int | None = None  # None: one per physical core, the same for every variant
    device: str = "cpu"
    torch_max_prompt: int | None = None  # longest prompt the PyTorch variants prefill
    seed: int = 0
    # Decode batch sizes at which each variant's peak memory is measured, one fresh process
    # per variant and batch size (popc.bench.memory). None: the largest of `batches`; (): none.
    memory_batches: Sequence[int] | None = None
    # Quantization schemes ("int4", "int8"): each adds the quantized twins of popc's ORT
    # variants (exported once into the cache in that scheme; a quantized `directory` adds its
    # own scheme), and int4 the quantized peers (ort-genai-int4, llama.cpp-q4_0) unless the
    # variants are named.
    quant: Sequence[str] = ()
    # Element type of popc's dense and POP exports ("float32", "float16", "bfloat16"; fp16 /
    # bf16 spellings too). None: the directory's own on the CPU, float16 on CUDA. A directory
    # of another element type stands for no variant: its twins are exported in this one.
    dtype: str | None = None

    @classmethod
    def full(cls, directory: Path, **overrides: Any) -> BenchPlan:
        """The whole matrix (:data:`FULL_MATRIX`); ``overrides`` still win."""
        return cls(directory=directory, **{**FULL_MATRIX, **overrides})

    def resolved(self) -> BenchPlan:
        """This plan checked, with its variants and thread count filled in."""
        from popc.bench.machine import default_threads
        from popc.bench.peers import default_variants, genai_available, genai_available_on, import_genai_for

        if self.device not in DEVICES:
            raise PopcError(f"--device must be one of {', '.join(DEVICES)}, got {self.device}")
        variants = list(dict.fromkeys(self.variants)) if self.variants is not None else default_variants()
        if self.device == "cuda":
            if self.variants is None:  # the genai peer where its CUDA build is installed
                variants = [*ORT_VARIANTS, *([GENAI_VARIANT] if genai_available_on("cuda") else [])]
            elif off := [v for v in variants if v in VARIANTS and v not in CUDA_VARIANTS]:
                raise PopcError(
                    f"{', '.join(off)} run on the CPU only; with --device cuda choose from {', '.join(CUDA_VARIANTS)}"
                )
        bad = [q for q in self.quant if q not in QUANT_SCHEMES]
        if bad:
            raise PopcError(f"unknown --quant {', '.join(bad)}; choose from {', '.join(QUANT_SCHEMES)}")
        schemes = list(dict.fromkeys([*self.quant, *directory_scheme(self.directory)]))
        variants = with_quant(variants, schemes, peers=self.variants is None)
        if self.device == "cuda" and schemes:
            raise PopcError(
                "quantized exports (--quant, or a quantized DIR) run on the CPU only; on --device cuda "
                "bench an fp16/bf16 or fp32 export"
            )
        if self.variants is None and not genai_available():  # by default, only where it is installed
            variants = [v for v in variants if v != GENAI_INT4]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise PopcError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        if not variants:
            raise PopcError("--variants names no variant")
        if any(v in GENAI_RUNNERS for v in variants):
            import_genai_for(self.device)  # asked for by name: a missing package is an error, not a silent skip
        if self.repeats < 1 or self.decode_tokens < 1:
            raise PopcError("--repeats and --decode-tokens must be at least 1")
        if self.warmup < 0:
            raise PopcError(f"--warmup must be at least 0, got {self.warmup}")
        if any(not 0 < s < 1 for s in self.sparsities):
            raise PopcError("--sparsities must lie in (0, 1)")
        if any(n < 1 for n in self.prompt_lengths) or self.decode_prompt < 1:
            raise PopcError("--prompt-lengths and --decode-prompt must be at least 1")
        if not self.batches or any(b < 1 for b in self.batches):
            raise PopcError("--batches must be at least 1")
        batches = tuple(int(b) for b in self.batches)
        memory_batches = (max(batches),) if self.memory_batches is None else tuple(map(int, self.memory_batches))
        if any(b not in batches for b in memory_batches):
            raise PopcError(f"--memory-batches must be among the decode batches ({', '.join(map(str, batches))})")
        if self.threads is not None and self.threads < 1:
            raise PopcError(f"--threads must be at least 1, got {self.threads}")
        return dataclasses.replace(
            self,
            variants=tuple(variants),
            threads=self.threads or default_threads(),
            prompt_lengths=tuple(int(n) for n in self.prompt_lengths),
            batches=batches,
            memory_batches=tuple(dict.fromkeys(b for b in batches if b in memory_batches)),
            sparsities=tuple(float(s) for s in self.sparsities),
            quant=tuple(dict.fromkeys([*schemes, *(q for v in variants if (q := split_variant(v)[1]))])),
            dtype=self.resolved_dtype(),
        )

    def resolved_dtype(self) -> str:
        """The canonical element type of the plan's exports (see ``dtype``)."""
        if self.dtype in ("float32", "float16", "bfloat16"):
            return self.dtype
        if self.dtype is not None:
            from popc.export import canonical_dtype  # the spellings --dtype takes (fp16, half, ...)

            return canonical_dtype(self.dtype)
        return DEVICE_DTYPES["cuda"] if self.device == "cuda" else directory_dtype(self.directory)


def directory_dtype(directory: Path) -> str:
    """The element type popc.json records for the export at ``directory`` (float32 when it
    records none or cannot be read)."""
    from popc.artifact import read_export

    try:
        return str(read_export(directory)[1].get("dtype") or "float32")
    except (PopcError, OSError, ValueError):
        return "float32"


def directory_scheme(directory: Path) -> list[str]:
    """The quantization scheme of the export at ``directory`` (``[]``: fp32, or unreadable)."""
    from popc.artifact import read_export

    try:
        quant = read_export(directory)[1].get("quant")
    except (PopcError, OSError, ValueError):
        return []
    return [str(quant["scheme"])] if isinstance(quant, dict) and quant.get("scheme") in QUANT_SCHEMES else []
