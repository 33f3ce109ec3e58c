"""The export driver: load -> trace -> graph-rewrite passes -> emit, atomically.

Every stage writes into a staging directory beside the destination; the
destination changes only in the final rename, so an interrupted export leaves it
as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from popc import atomic, kv_eviction
from popc.artifact import (
    CHAT_TEMPLATES_DIRECTORY,
    CONFIG_NAME,
    GENAI_CONFIG_NAME,
    ExportLocation,
    check_replaceable,
    drop_custom_code,
    export_file_names,
    location_for_output,
)
from popc.errors import PopcError
from popc.export_config import LOGITS_TO_KEEP, OPSET, export_config, genai_config, io_names, pop_channels, prompt_layers
from popc.loading import LoadedModel, load_model
from popc.modeling import ExportableDecoder
from popc.passes.convert_dtype import ConvertDtypePass
from popc.passes.ort_fusions import ort_fusion_passes
from popc.passes.pop_online import PopOnlinePass
from popc.passes.prefill_branch import PrefillBranchPass
from popc.passes.quantize_weights import QuantizeWeightsPass
from popc.pop import PopSettings
from popc.progress import Progress, or_silent
from popc.quantize import QuantScheme


@dataclass
class ExportPlan:
    """What to export and which graph-rewrite passes run between trace and emit."""

    model: str
    out: str | Path
    force: bool = False
    # POP-online defaults recorded in the export; None exports the dense model.
    pop: PopSettings | None = None
    # Further passes, run after POP's.
    passes: Sequence[ir.passes.PassBase] = field(default_factory=list)
    # POP-prefill: the deepest N layers skipped at prefill by all prompt tokens but the
    # last (popc.prefill_skip); None = every token runs every layer.
    prefill_skip: int | None = None
    # Baseline (ShortGPT-style): the deepest N layers removed for every token.
    drop_layers: int | None = None
    # ONNX Runtime's fused operators (GroupQueryAttention, RMSNorm, packed QKV, skip-add-norm);
    # not with drop_layers, nor prefill_skip without kv_window: their layer stacks keep the
    # plain attention.
    fuse: bool = True
    # Block-quantized weights (int4 / int8, popc.quantize); None keeps them float32.
    quant: QuantScheme | None = None
    # Weights, activations and KV cache: "float32", "float16" or "bfloat16" (canonical_dtype);
    # logits stay float32 (passes/convert_dtype.py).
    dtype: str = "float32"
    # KV eviction after long prompts (popc.kv_eviction): per-layer cache lengths and the
    # window queries the runtime scores tokens with; None exports the plain cache.
    kv_window: int | None = None

    def __post_init__(self) -> None:
        self.dtype = canonical_dtype(self.dtype)  # "fp16" -> "float16"; an unknown name is refused here

    @property
    def fused(self) -> bool:
        return self.fuse and not self.drop_layers and (self.prefill_skip is None or self.kv_window is not None)


# Spellings --dtype accepts, and the canonical name each stands for (what popc.json records).
DTYPES = {
    "fp32": "float32", "float32": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}  # fmt: skip


def canonical_dtype(name: str) -> str:
    """``name`` (fp32|fp16|bf16 or float32|float16|bfloat16) as float32, float16 or bfloat16."""
    canonical = DTYPES.get(str(name).strip().lower())
    if canonical is None:
        raise PopcError(f"--dtype {name!r} is not one of fp32, fp16, bf16 (or float32, float16, bfloat16)")
    return canonical


def check_dtype(plan: ExportPlan) -> str:
    """The plan's canonical dtype; refuses the combinations half precision does not cover yet."""
    dtype = canonical_dtype(plan.dtype)
    if dtype == "float32":
        return dtype
    short = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
    if plan.quant is not None:
        raise PopcError(
            f"--dtype {short} is not supported with --quant yet: block-quantized exports keep float32 "
            "activations and scales; drop one of the two options"
        )
    unfused = [
        option for option, used in (("--no-fuse", not plan.fuse), ("--prefill-skip", plan.prefill_skip is not None),
                                    ("--drop-layers", bool(plan.drop_layers))) if used
    ]  # fmt: skip
    if unfused:
        raise PopcError(
            f"--dtype {short} is not supported with {', '.join(unfused)} yet: half precision is built on the "
            "fused graph (GroupQueryAttention, fused norms), which these options replace with plain attention"
        )
    return dtype


def trace_to_onnx(
    loaded: LoadedModel,
    path: Path,
    prefill_skip: int | None = None,
    drop_layers: int | None = None,
    fused: bool = False,
    kv_window: int | None = None,
) -> None:
    """Trace the model with its KV cache into an ONNX file with dynamic batch and lengths."""
    decoder = ExportableDecoder(
        loaded.model, prefill_skip=prefill_skip, drop_layers=drop_layers, fused=fused, kv_window=kv_window
    ).eval()
    shape = decoder.shape
    deep = prompt_layers(shape.num_layers, prefill_skip, kv_window)
    inputs, outputs = io_names(shape.num_layers, kv_evict=kv_window is not None, prompt_layers=deep)
    batch, seq, past = 2, 3, 2  # any sizes; every one of them is marked dynamic below
    mask_shape = (batch, past + seq) if kv_window is None else (shape.num_layers, batch, past + seq)
    lengths = [torch.full((shape.num_layers,), past + seq, dtype=torch.long)] if kv_window is not None else []
    first_past = 2 + len(lengths)
    example = (
        torch.zeros(batch, seq, dtype=torch.long),
        torch.ones(mask_shape, dtype=torch.long),
        *lengths,
        *[torch.zeros(batch, shape.num_kv_heads, past, shape.head_dim) for _ in inputs[first_past:-1]],
        torch.tensor(0, dtype=torch.long),  # logits_to_keep
    )
    dynamic = {
        "input_ids": {0: "batch", 1: "sequence"},
        inputs[1]: {0: "batch", 1: "total_sequence"} if kv_window is None else {1: "batch", 2: "mask_sequence"},
        "logits": {0: "batch", 1: "sequence" if prefill_skip is None else "logits_sequence"},
    }
    dynamic |= {name: {0: "batch", 2: "past_sequence"} for name in inputs[first_past:-1]}
    # Under eviction every layer's cache has a length of its own.
    dynamic |= {
        name: {0: "batch", 2: "total_sequence" if kv_window is None else f"total_sequence_{index // 2}"}
        for index, name in enumerate(outputs[1 : 1 + 2 * shape.num_layers])
    }
    if kv_window is not None:
        windows = outputs[1 + 2 * shape.num_layers : 1 + 3 * shape.num_layers]
        dynamic |= {name: {0: "batch", 1: "window"} for name in windows}
        prompts = outputs[1 + 3 * shape.num_layers :]
        dynamic |= {name: {0: "batch", 2: "prompt_sequence"} for name in prompts}
        dynamic |= {
            name: {0: "batch", 2: f"past_sequence_{index // 2}"} for index, name in enumerate(inputs[first_past:-1])
        }
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived values are expected
        torch.onnx.export(
            _PositionalEntry(decoder) if kv_window is None else _EvictionEntry(decoder),
            example,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


class _PositionalEntry(torch.nn.Module):
    """``(input_ids, attention_mask, *past, logits_to_keep)``: the graph's input order."""

    def __init__(self, decoder: ExportableDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, attention_mask, *rest):  # noqa: ANN001, ANN201
        return self.decoder(input_ids, attention_mask, *rest[:-1], logits_to_keep=rest[-1])


class _EvictionEntry(_PositionalEntry):
    """``(input_ids, layer_attention_mask, layer_lengths, *past, logits_to_keep)``."""

    def forward(self, input_ids, layer_mask, layer_lengths, *rest):  # noqa: ANN001, ANN201
        return self.decoder(input_ids, layer_mask, *rest[:-1], logits_to_keep=rest[-1], layer_lengths=layer_lengths)


def give_default(graph: ir.Graph, name: str, value: np.ndarray) -> None:
    """Make graph input ``name`` optional: an initializer of the same name is its default."""
    (graph_input,) = [v for v in graph.inputs if v.name == name]
    graph_input.const_value = ir.tensor(value, name=name)
    graph.register_initializer(graph_input)


STAGING_PREFIX = "popc-export"


def staging_parent(location: ExportLocation) -> Path:
    """Where the staging directory goes: beside the destination (same filesystem, so renames are atomic)."""
    return location.directory.resolve().parent if location.owns_directory else location.directory


def staging_directory(location: ExportLocation) -> contextlib.AbstractContextManager[Path]:
    """A hidden directory beside the destination, removed however the export ends (and, after
    a SIGKILL, by a later export: it is marked with this process's id)."""
    return atomic.staging_directory(staging_parent(location), STAGING_PREFIX, mark_owner=True)


def check_writable(location: ExportLocation) -> None:
    """Raise unless the staging directory and the final renames can be made where the export
    goes: found now, not after minutes of loading and tracing."""
    parent = staging_parent(location)
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PopcError(f"cannot write the export to {location.directory}: {existing} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".popc-write-check-", dir=existing))
    except OSError as error:
        raise PopcError(
            f"cannot write the export to {location.directory}: {existing} is not writable "
            f"(creating a directory there fails: {error.strerror or error})"
        ) from None


def check_destination(location: ExportLocation, force: bool) -> None:
    """Refuse to overwrite anything unless --force, and never anything popc did not write."""
    directory = location.directory
    if directory.exists() and not directory.is_dir():
        raise PopcError(f"{directory} exists and is not a directory")
    if location.owns_directory:
        if str(directory) in ("", ".") or Path.cwd().resolve().is_relative_to(directory.resolve()):
            # The export replaces its directory with one rename, which cannot move the working directory.
            raise PopcError(
                f"--out {str(directory) or repr('')} is the working directory (or holds it); "
                "name a directory below it, e.g. --out my-export"
            )
        if directory.exists() and any(directory.iterdir()):
            check_replaceable(directory)
            if not force:
                raise PopcError(f"{directory} already holds an export; pass --force to replace it")
        check_writable(location)
        return
    # `--out dir/name.onnx`: every file an export may write there is checked, tokenizer files
    # included, before minutes of loading and tracing.
    names = export_file_names(location.model_file, with_genai=False) | {CHAT_TEMPLATES_DIRECTORY}
    for name in sorted(names):
        target = directory / name
        if target.is_dir() and not target.is_symlink() and name != CHAT_TEMPLATES_DIRECTORY:
            raise PopcError(f"{target} is a directory where the export writes a file; choose another --out")
        if not force and (target.exists() or target.is_symlink()):
            raise PopcError(f"{target} already exists; pass --force to replace it")
    check_writable(location)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends: an interrupt between two renames would
    leave neither the old export nor the new one in place."""
    deferred = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def publish(staging: Path, location: ExportLocation) -> None:
    """Move the finished export from ``staging/content`` into place with renames only."""
    with signals_deferred():
        _move_into_place(staging, location)


def _move_into_place(staging: Path, location: ExportLocation) -> None:
    content = staging / "content"
    directory = location.directory
    if location.owns_directory:
        if directory.exists():
            # Checked again: a file put there while the export ran must survive it too.
            if any(directory.iterdir()):
                check_replaceable(directory)
            os.replace(directory, staging / "previous")  # removed with the staging directory
        os.replace(content, directory)
        return
    # `--out some_dir/name.onnx` next to other files: move ours in one by one,
    # popc.json last, so that a config never describes a half-moved model.
    names = sorted(p.name for p in content.iterdir() if p.name != CONFIG_NAME) + [CONFIG_NAME]
    for name in names:
        target = directory / name
        if target.is_dir() and not target.is_symlink():  # the chat-templates folder (checked)
            os.replace(target, staging / f"previous-{name}")
        os.replace(content / name, target)


def own_every_tensor(model: ir.Model) -> None:
    """Make every tensor the model names part of what ``ir.save`` writes.

    Past the 2 GB protobuf limit the tracer stores large ``Constant`` values as external
    files of its own beside the traced model; ``ir.save(external_data=...)`` moves
    initializers into the export's data file but not attribute tensors, which would point
    at files the export does not have. Large constants become initializers (saved in the
    data file), and any other attribute tensor still on disk is read into memory.
    """
    ir.passes.common.LiftConstantsToInitializersPass(size_limit=1024)(model)
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for name, attribute in list(node.attributes.items()):
                if attribute.type == ir.AttributeType.TENSOR and isinstance(attribute.value, ir.ExternalTensor):
                    tensor = ir.tensor(attribute.value.numpy(), name=attribute.value.name)
                    node.attributes[name] = ir.AttrTensor(name, tensor)


def export(plan: ExportPlan, progress: Progress | None = None) -> ExportLocation:
    """Run the whole export; returns where it landed."""
    progress = or_silent(progress)
    location = location_for_output(plan.out)
    check_destination(location, plan.force)
    dtype = check_dtype(plan)
    if plan.kv_window is not None:
        kv_eviction.check_export(plan.kv_window, plan.fused, dtype)
    atomic.remove_stale_staging(staging_parent(location), STAGING_PREFIX)  # left by exports that were SIGKILLed
    started = time.perf_counter()

    loaded = load_model(plan.model, progress=progress)
    if plan.pop is not None:
        plan.pop.counts(pop_channels(loaded.model.config))  # refuses a split that rounds to no channels
    if plan.quant is not None:
        hidden = int(loaded.model.config.hidden_size)
        if hidden % plan.quant.block_size:
            raise PopcError(
                f"--quant: the hidden size {hidden} is not a multiple of --block-size {plan.quant.block_size}; "
                f"choose a block that divides it (e.g. {math.gcd(hidden, plan.quant.block_size)}, if >= 16)"
            )

    with staging_directory(location) as staging:
        content = staging / "content"
        content.mkdir()
        traced = staging / "traced.onnx"
        progress.stage("tracing the model to ONNX")
        trace_to_onnx(loaded, traced, plan.prefill_skip, plan.drop_layers, fused=plan.fused, kv_window=plan.kv_window)

        model = ir.load(traced)
        give_default(model.graph, LOGITS_TO_KEEP, np.array(0, np.int64))
        pop_pass = PopOnlinePass(per_ffn_token_mask=plan.prefill_skip is not None)
        passes = ([pop_pass] if plan.pop is not None else []) + (ort_fusion_passes() if plan.fused else [])
        if plan.kv_window is not None and plan.prefill_skip:
            # The independent K/V reuse the k/v weights, which the tracer hands over through an
            # Identity: remove it, so that the weight rules see the constant.
            passes.insert(0, ir.passes.common.IdentityEliminationPass())
        if plan.quant is not None:
            passes.append(QuantizeWeightsPass(plan.quant))  # last: it quantizes what the others produced
        passes += list(plan.passes)
        if plan.kv_window is not None and plan.prefill_skip:
            passes.append(PrefillBranchPass())  # after the weight passes: they match the top-level graph
        if dtype != "float32":
            passes.append(ConvertDtypePass(dtype))  # last: the half graph is the fp32 one's twin
        if passes:
            progress.stage(f"applying graph-rewrite passes: {', '.join(type(p).__name__ for p in passes)}")
            model = ir.passes.PassManager(passes)(model).model
        progress.stage("writing the model and its external weights")
        own_every_tensor(model)
        ir.save(model, content / location.model_file, external_data=location.model_file + ".data")
        del model  # its tensors may still map the traced files, removed with the staging directory

        progress.stage("writing the tokenizer and popc.json")
        loaded.tokenizer.save_pretrained(content)
        drop_custom_code(content)
        config = export_config(loaded, location, plan)
        config["export_seconds"] = round(time.perf_counter() - started, 1)
        (content / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        genai = genai_config(loaded, plan, location.model_file) if location.owns_directory else None
        if genai is not None:
            (content / GENAI_CONFIG_NAME).write_text(json.dumps(genai, indent=2) + "\n")
        publish(staging, location)
    return location
