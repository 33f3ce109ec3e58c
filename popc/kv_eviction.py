"""KV-cache eviction after a long prompt, on an exported graph: settings, scores, compaction.

An export made with ``popc export --kv-evict`` differs from a plain one in two ways:

* its attention mask is per layer, ``layer_attention_mask`` int64 [L, B, T] with
  ``layer_lengths`` int64 [L]: layer l's cache uses its first ``layer_lengths[l]`` slots
  (past + new) and ``layer_attention_mask[l, b, j]`` says whether slot j of row b holds a
  token. Every layer's cache can thus have its own length (LaProx's model-wide budget);
* it returns each layer's last ``window`` queries before RoPE, ``window_query.{l}``
  [B, min(window, S), H * d], which score the prompt's tokens here.

After the prefill (:func:`evict`) the window's attention probabilities are recomputed
from those queries and the cached keys, every method's selection runs
(:func:`popc.reference.kv_selection.select_tokens`, the same policy as the PyTorch
reference), and each layer's cache is gathered to its kept tokens, left-padded per row
to the layer's longest row (the mask hides the padding).

Positions. GroupQueryAttention rotates a new token by its slot in the layer's cache, which
after compaction is not its true position. Attention scores depend only on the difference
of the rotation angles of query and key, so every kept key is rotated once more, by minus
the number of slots the compaction removed (``prompt slots - kept slots``): later tokens
then see each kept key at exactly its true distance, whatever the compacted length.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popc.errors import PopcError
from popc.rotary import rotate_keys

LAYER_MASK = "layer_attention_mask"
LAYER_LENGTHS = "layer_lengths"
WINDOW_QUERY_PREFIX = "window_query."
PROMPT_PRESENT_PREFIX = "prompt_present."
DEFAULT_WINDOW = 16
DEFAULT_SINKS = 4
DEFAULT_MIX = 0.3  # popc.reference.kv_selection.DEFAULT_LAPROX_MIX (that module imports torch)
METHODS = ("full", "streaming", "snapkv", "random", "laprox")
SCORED = ("snapkv", "laprox")  # the methods that read the window's attention


def window_query_name(layer: int) -> str:
    return f"{WINDOW_QUERY_PREFIX}{layer}"


def prompt_present_name(layer: int, kind: str) -> str:
    """A POP-prefill deep layer's prefill cache (``kind``: key or value), an output of its own."""
    return f"{PROMPT_PRESENT_PREFIX}{layer}.{kind}"


def export_section(window: int, prompt_layers: list[int] | None = None) -> dict[str, Any]:
    """The ``kv_eviction`` section of popc.json."""
    prompt_layers = prompt_layers or []
    prompts = {}
    if prompt_layers:
        prompts = {"prompt_present.{i}.key|value": (
            "float32 [batch, kv_heads, sequence, head_dim], the prefill's cache of a layer POP-prefill "
            "skips (its independent K/V, then the window's): the runtime keeps these, not present.{i}.*, "
            "after a prefill; present.{i}.* is the decode cache, updated in place")}  # fmt: skip
    return {
        "window": window,
        "prompt_layers": prompt_layers,
        "methods": list(METHODS),
        "inputs": {
            LAYER_MASK: "int64 [num_layers, batch, slots]: 1 where slot j of layer l's cache holds a token of row b",
            LAYER_LENGTHS: "int64 [num_layers]: slots in use per layer (past + new)",
        },
        "outputs": {"window_query.{i}": "float32 [batch, min(window, sequence), heads * head_dim], before RoPE"}
        | prompts,
        "positions": "kept keys are re-rotated by -(removed slots): later tokens attend at their true distances",
    }


def check_export(window: int, fused: bool, dtype: str) -> None:
    """Refuse what an eviction export does not cover yet, before any work."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise PopcError(f"--kv-window must be a positive number of tokens, got {window!r}")
    if not fused:
        raise PopcError(
            "--kv-evict is built on the fused graph (GroupQueryAttention's per-layer cache lengths); "
            "drop --no-fuse and --drop-layers"
        )
    if dtype != "float32":
        raise PopcError("--kv-evict with --dtype fp16/bf16 is not supported yet: export it in fp32")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class EvictionSettings:
    """What to keep after the prefill: ``method`` (:data:`METHODS`) under ``budget`` (a
    fraction of the prompt in (0, 1], or an int: the average tokens per layer), the first
    ``sinks`` tokens and the observation window always kept. ``score``, ``floor`` and
    ``pool`` are LaProx's (:mod:`popc.reference.kv_selection`), ``seed`` random's."""

    method: str = "laprox"
    budget: float | int = 1.0
    sinks: int = DEFAULT_SINKS
    score: str = "sum-total"
    floor: float = 1.0
    pool: int | None = None  # the scores' token pooling: each method's default (SnapKV 7)
    shift: int = 0  # LaProx's pooling kernel moved back: more kept after a peak than before
    mix: float = DEFAULT_MIX  # LaProx's share of the score given to the window's attention mass
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PopcError(f"--kv-method must be one of {', '.join(METHODS)}; got {self.method!r}")
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise PopcError(f"--kv-budget must be a fraction in (0, 1] or a token count; got {budget!r}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise PopcError(f"--kv-budget {budget} is not a fraction in (0, 1] (or give a token count such as 256)")
        if isinstance(budget, int) and budget < 1:
            raise PopcError(f"--kv-budget {budget} tokens: give at least 1 (or a fraction such as 0.05)")
        if not 0.0 <= self.mix <= 1.0:
            raise PopcError(f"--kv-method ...:mix{self.mix}: the attention-mass share must be in [0, 1]")
        if self.sinks < 0:
            raise PopcError(f"--kv-sinks must be >= 0, got {self.sinks}")

    @property
    def evicts(self) -> bool:
        return self.method != "full" and self.budget != 1.0

    def options(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "score": self.score, "seed": self.seed, "floor": self.floor, "pool": self.pool,
                "shift": self.shift, "mix": self.mix}


def parse_method(label: str, budget: float | int = 1.0) -> EvictionSettings:
    """``laprox``, ``snapkv``, ... or a LaProx variant ``laprox:SCORE[:floorF][:poolN][:shiftN][:mixF]``
    (``laprox:per-head:floor0.5``) -> settings at ``budget``."""
    from popc.reference.kv_selection import LAPROX_SCORES

    method, *parts = str(label).strip().split(":")
    options: dict[str, Any] = {}
    for part in parts:
        try:
            if part in LAPROX_SCORES:
                options["score"] = part
            elif part.startswith("floor"):
                options["floor"] = float(part[len("floor") :])
            elif part.startswith("mix"):
                options["mix"] = float(part[len("mix") :])
            elif part.startswith("shift"):
                options["shift"] = int(part[len("shift") :])
            elif part.startswith("pool"):
                options["pool"] = int(part[len("pool") :])
            else:
                raise ValueError(part)
        except ValueError:
            raise PopcError(
                f"--kv-method {label!r}: {part!r} is not a LaProx option (a score {', '.join(LAPROX_SCORES)}, "
                "floorF, poolN, shiftN or mixF)"
            ) from None
    if set(options) - {"pool"} and method != "laprox":
        raise PopcError(f"--kv-method {label!r}: only laprox takes a score or a floor")
    if "pool" in options and method not in ("laprox", "snapkv"):
        raise PopcError(f"--kv-method {label!r}: only laprox and snapkv pool their scores")
    return EvictionSettings(method=method, budget=budget, **options)


def parse_budget(text: str) -> float | int:
    """``"0.05"`` -> 0.05 (a fraction), ``"256"`` -> 256 (tokens per layer on average)."""
    cleaned = str(text).strip()
    try:
        value: float | int = int(cleaned)
    except ValueError:
        try:
            value = float(cleaned.rstrip("%")) / (100 if cleaned.endswith("%") else 1)
        except ValueError:
            raise PopcError(f"--kv-budget {text!r} is neither a fraction (0.05, 5%) nor a token count (256)") from None
    if value == 1:
        value = 1.0  # "1": the whole cache (one token per layer would be below sinks + window anyway)
    EvictionSettings(budget=value)  # validates
    return value


# --------------------------------------------------------------------------- the graph


@dataclass
class LayerAttention:
    """What scoring needs of one layer, read from its GroupQueryAttention node."""

    heads: int
    kv_heads: int
    scale: float
    local_window: int | None  # sliding-window layers keep their window and are not scored
    cos: np.ndarray  # [max_positions, d/2], RoPE scaling folded in (GroupQueryAttention's tables)
    sin: np.ndarray
    o_weight: np.ndarray  # [hidden, heads * d], o_proj as nn.Linear stores it (no bias)

    @functools.cached_property
    def o_proj(self) -> Any:
        """:class:`popc.reference.kv_selection.OutputProjection` of ``o_weight`` (factorised once)."""
        import torch

        from popc.reference.kv_selection import OutputProjection

        return OutputProjection(torch.from_numpy(self.o_weight))


def read_layers(model_path: Path) -> list[LayerAttention]:
    """Every layer's attention, in layer order, from the exported graph: the attributes and
    rotary tables of its GroupQueryAttention and the weight of the MatMul that reads its
    output (o_proj)."""
    import onnx_ir as ir

    model = ir.load(model_path)
    layers = []
    for node in model.graph:
        # A POP-prefill deep layer has a second one, over the skipped tokens' K/V (its past
        # is computed, not the cache input): the layer's attention is the cache's.
        if node.op_type != "GroupQueryAttention" or not node.inputs[3].is_graph_input():
            continue
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        weight = output_projection(node)
        cos, sin = node.inputs[7].const_value, node.inputs[8].const_value
        if weight is None or cos is None or sin is None:
            raise PopcError(
                f"{model_path}: cannot read layer {len(layers)}'s o_proj weight or rotary tables for KV eviction; "
                "re-export it with `popc export --kv-evict`"
            )
        window = int(attrs.get("local_window_size", -1))
        layers.append(
            LayerAttention(
                heads=int(attrs["num_heads"]),
                kv_heads=int(attrs["kv_num_heads"]),
                scale=float(attrs.get("scale", 0.0)) or float(weight.shape[0] // int(attrs["num_heads"])) ** -0.5,
                local_window=None if window < 0 else window,
                cos=np.array(cos.numpy(), np.float32),
                sin=np.array(sin.numpy(), np.float32),
                o_weight=weight,
            )
        )
    return layers


def output_projection(attention: Any) -> np.ndarray | None:
    """The o_proj weight [hidden, H * d] (float32, as nn.Linear stores it) of the node that
    reads a GroupQueryAttention's output: a MatMul's constant [H * d, hidden], or a
    block-quantized ``com.microsoft.MatMulNBits``' rows dequantized (a ``--quant`` export,
    scored with the weights its decode reads). None when neither is there."""
    return _projection_of(attention.outputs[0])


def _projection_of(value: Any) -> np.ndarray | None:
    from popc.quantize import QuantScheme, dequantize_rows

    for user, _ in value.uses():
        if user.op_type == "Where":  # a POP-prefill deep layer picks one of two attentions
            return _projection_of(user.outputs[0])
        if user.op_type == "MatMul" and user.inputs[1].const_value is not None:
            return np.ascontiguousarray(np.asarray(user.inputs[1].const_value.numpy(), np.float32).T)
        if user.op_type == "MatMulNBits" and user.domain == "com.microsoft":
            packed, scales = user.inputs[1].const_value, user.inputs[2].const_value
            attrs = {name: attr.value for name, attr in user.attributes.items()}
            zero_points = len(user.inputs) > 3 and user.inputs[3] is not None
            if packed is None or scales is None or zero_points:  # popc's blocks are symmetric
                return None
            scheme = QuantScheme(int(attrs["bits"]), int(attrs["block_size"]))
            n = int(attrs["N"])
            rows = dequantize_rows(packed.numpy().reshape(n, -1), scales.numpy().reshape(n, -1), scheme, int(attrs["K"]))
            return np.ascontiguousarray(rows, np.float32)
    return None


# --------------------------------------------------------------------------- host math


def unrotate_by(keys: np.ndarray, layer: LayerAttention, shift: int) -> np.ndarray:
    """``keys`` [..., d] rotated by ``-shift`` positions (the tables' scale divided out)."""
    if shift == 0:
        return keys
    cos, sin = layer.cos[shift], layer.sin[shift]
    norm = np.maximum(np.sqrt(cos * cos + sin * sin), 1e-30)
    return rotate_keys(keys, cos / norm, -sin / norm)


def row_prefill(
    layers: list[LayerAttention],
    keys: list[Any],
    values: list[Any],
    queries: list[Any],
    pad: int,
    slots: int,
    attention: bool = True,
    outputs: bool = True,
) -> Any:
    """One batch row's :class:`popc.reference.kv_selection.Prefill` over its real tokens:
    ``keys``/``values`` [Hkv, slots, d] per layer (the row's ``pad`` left-padding slots
    first), ``queries`` [w, H * d] before RoPE. ``attention=False`` leaves out the window's
    probabilities and outputs (the methods that do not score: streaming, random),
    ``outputs=False`` the outputs only (read by LaProx's ``*-out`` scores alone)."""
    import torch

    from popc.ort_contrib import rotate
    from popc.reference.kv_selection import LayerKV, Prefill

    length = slots - pad
    window = min(queries[0].shape[0], length)
    query_slots = torch.arange(slots - window, slots)
    # Causality touches only the window's own columns: query i (at slot slots - w + i) does
    # not see the window's keys after it.
    future = torch.ones(window, window, dtype=torch.bool).triu(1)
    cache, probs, outs = [], [], []
    for layer, k, v, q in zip(layers, keys, values, queries):
        k, v = k[:, pad:], v[:, pad:]
        cache.append(LayerKV(k, v, torch.arange(length).expand(layer.kv_heads, -1)))
        if layer.local_window is not None or not attention:
            probs.append(None)
            outs.append(None)
            continue
        head_dim = k.shape[-1]
        q = q[-window:].reshape(window, layer.heads, head_dim).transpose(0, 1)  # [H, w, d]
        q = rotate(q, torch.from_numpy(layer.cos[query_slots]), torch.from_numpy(layer.sin[query_slots]))
        # Query head h = g * G + j reads KV head g: the G heads' queries as one [G * w] block.
        grouped = q.reshape(layer.kv_heads, -1, head_dim)  # [Hkv, G * w, d]
        logits = (grouped @ k.transpose(1, 2)).view(layer.heads, window, length).mul_(layer.scale)
        logits[:, :, length - window :].masked_fill_(future, float("-inf"))
        p = logits.softmax(-1)  # [H, w, length]
        probs.append(p)
        if not outputs:
            outs.append(None)
            continue
        attended = (p.view(layer.kv_heads, -1, length) @ v).view(layer.heads, window, head_dim)
        attended = attended.transpose(0, 1).reshape(window, -1)
        outs.append(attended @ torch.from_numpy(layer.o_weight).T)
    return Prefill(cache, probs, outs, torch.empty(0), length, window, 0.0)


@dataclass
class Compaction:
    """Per-layer caches after eviction: keys/values [B, Hkv, K_l + room, d] (numpy) whose
    first K_l slots are kept, their masks [B, K_l]; per row, each evictable layer's kept
    prompt tokens [Hkv, n] (indices among the row's real tokens; None for the full cache)
    and the kept count per evictable layer."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    masks: list[np.ndarray]
    kept_tokens: list[list[Any] | None]
    kept: list[list[int]]
    seconds: float


def evict(
    layers: list[LayerAttention],
    keys: list[np.ndarray],
    values: list[np.ndarray],
    queries: list[np.ndarray],
    attention_mask: np.ndarray,
    settings: EvictionSettings,
    room: int = 0,
) -> Compaction:
    """Compact a prefill's caches (keys/values [B, Hkv, T, d] per layer, window queries
    [B, w, H * d], the prompt's left-padded ``attention_mask`` [B, T]) under ``settings``,
    into buffers with ``room`` free slots after the kept ones (for the decode steps)."""
    import torch

    from popc.reference.kv_selection import select_tokens

    started = time.perf_counter()
    batch, slots = attention_mask.shape
    evictable = [i for i, layer in enumerate(layers) if layer.local_window is None]
    o_projs = [layers[i].o_proj for i in evictable]
    kept_slots: list[list[Any]] = [[None] * batch for _ in layers]  # [layer][row] -> [Hkv, n] slot indices
    kept_tokens: list[list[Any] | None] = [None] * batch
    for row in range(batch):
        pad = int(slots - attention_mask[row].sum())
        for index, layer in enumerate(layers):
            if layer.local_window is not None:
                start = max(slots - layer.local_window, 0)
                kept_slots[index][row] = torch.arange(start, slots).expand(layer.kv_heads, -1)
        if not settings.evicts:
            for index in evictable:
                kept_slots[index][row] = torch.arange(slots).expand(layers[index].kv_heads, -1)
            continue
        prefill = row_prefill(
            layers,
            [torch.from_numpy(k[row]) for k in keys],
            [torch.from_numpy(v[row]) for v in values],
            [torch.from_numpy(q[row]) for q in queries],
            pad,
            slots,
            attention=settings.method in SCORED,
            outputs=settings.method == "laprox" and settings.score.endswith("-out"),
        )
        kept = select_tokens(
            prefill, evictable, layers[0].kv_heads, o_projs, settings.method, settings.budget, **settings.options()
        )
        kept_tokens[row] = kept
        for index, indices in zip(evictable, kept):
            kept_slots[index][row] = indices + pad

    out_keys, out_values, masks, counts = [], [], [], []
    for index, layer in enumerate(layers):
        per_row = kept_slots[index]
        width = max(int(k.shape[1]) for k in per_row)
        heads, head_dim = keys[index].shape[1], keys[index].shape[3]
        # The decode buffers themselves: the kept slots first, ``room`` free ones after.
        new_keys = np.zeros((batch, heads, width + room, head_dim), keys[index].dtype)
        new_values = np.zeros_like(new_keys)
        mask = np.zeros((batch, width), np.int64)
        for row, slots_kept in enumerate(per_row):
            count = int(slots_kept.shape[1])
            gather = slots_kept.numpy()
            start = int(gather[0, 0])
            if (gather == np.arange(start, start + count)).all():  # a tail (full cache, sliding window): a slice
                rows_k, rows_v = keys[index][row, :, start : start + count], values[index][row, :, start : start + count]
            elif (gather == gather[:1]).all():  # the same tokens in every KV head: one index
                rows_k, rows_v = keys[index][row][:, gather[0]], values[index][row][:, gather[0]]
            else:
                rows_k = np.take_along_axis(keys[index][row], gather[..., None], axis=1)
                rows_v = np.take_along_axis(values[index][row], gather[..., None], axis=1)
            new_keys[row, :, width - count : width] = rows_k
            new_values[row, :, width - count : width] = rows_v
            # Padding slots kept by a sliding layer stay masked; every kept slot of an evicting row is a token.
            mask[row, width - count :] = attention_mask[row][gather[0]]
        shift = slots - width
        if shift:
            new_keys[:, :, :width] = unrotate_by(new_keys[:, :, :width], layer, shift)
        out_keys.append(new_keys)
        out_values.append(new_values)
        masks.append(mask)
        if layer.local_window is None:
            counts.append([int(k.shape[1]) for k in per_row])
    return Compaction(out_keys, out_values, masks, kept_tokens, counts, time.perf_counter() - started)


def layer_mask_inputs(masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``layer_attention_mask`` [L, B, max slots] (each layer's mask left-aligned, zeros
    after it) and ``layer_lengths`` [L] for per-layer masks [B, K_l]."""
    width = max(m.shape[1] for m in masks)
    stacked = np.zeros((len(masks), masks[0].shape[0], width), np.int64)
    for index, mask in enumerate(masks):
        stacked[index, :, : mask.shape[1]] = mask
    return stacked, np.array([m.shape[1] for m in masks], np.int64)
