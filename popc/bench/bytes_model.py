"""The bytes model: how many weight bytes one batch-1 decode step reads, per variant.

Decode at batch 1 is memory-bound, so bytes read ÷ read bandwidth is its roofline, and
dense bytes ÷ a POP variant's bytes its ideal speedup. Lookup tables (embeddings) cost
only the rows of the current tokens; POP's FFN rows (``pop.*_rows`` initializers) cost
the fraction of channels a step touches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from popc.bench.result import BytesRead
from popc.pop import PopSettings


@dataclass
class WeightInventory:
    """Initializer bytes of one export, by how a decode step reads them."""

    tables: int = 0  # lookup tables: a step reads one row per token
    table_row_bytes: int = 0  # one row of every table
    other: int = 0  # read whole at every step
    # POP FFN rows by kind ("gate_rows", ...): a quantized export's scales (and zero points)
    # count under the rows they scale ("gate_scales" -> "gate_rows"): a step reads the same
    # fraction of both.
    ffn_rows: dict[str, int] = field(default_factory=dict)


# The inputs of a lookup op that are read one row per token: (op type, input position).
# GatherBlockQuantized(data, indices, scales, zero_points): the quantized embedding.
LOOKUP_INPUTS = {("Gather", 0), ("GatherBlockQuantized", 0), ("GatherBlockQuantized", 2),
                 ("GatherBlockQuantized", 3)}  # fmt: skip
# Ops a table may pass through on its way to a lookup (a tied LM head's packed weights
# reshaped into the embedding's [vocab, row] layout).
PASS_THROUGH = ("Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten")
# A POP FFN weight's companions in a quantized export, and the row kind they travel with.
ROW_COMPANIONS = ("_scales", "_zero_points", "_zeros")


def row_kind(name: str) -> str | None:
    """The POP row kind (``gate_rows``...) an initializer ``pop.{label}.{what}`` belongs to:
    its rows, or their scales or zero points; None for other ``pop.*`` tensors."""
    if not name.startswith("pop."):
        return None
    what = name.rsplit(".", 1)[-1]
    if what.endswith("_rows"):
        return what
    for suffix in ROW_COMPANIONS:
        if what.endswith(suffix) and len(what) > len(suffix):
            return what[: -len(suffix)] + "_rows"
    return None


def weight_inventory(model_path: Path) -> WeightInventory:
    """Initializer bytes of an export, split into lookup tables (only the rows of the
    current tokens are read: embeddings, also a quantized ``GatherBlockQuantized`` one with
    its scales, through a Reshape), POP FFN rows (``pop.*_rows`` with their scales) and
    everything else (``MatMulNBits``' packed weights, scales and zero points among them)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    sizes: dict[str, tuple[int, int]] = {}  # name -> (bytes, first dimension)
    for init in graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        count = math.prod(init.dims) if init.dims else 1
        sizes[init.name] = (count * itemsize, int(init.dims[0]) if init.dims else 1)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}  # tensor -> (node, input position)
    producers: dict[str, onnx.NodeProto] = {}

    def visit(graph_nodes: Iterable[onnx.NodeProto]) -> None:
        for node in graph_nodes:
            for position, name in enumerate(node.input):
                consumers.setdefault(name, []).append((node, position))
            for name in node.output:
                producers[name] = node
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g.node)

    visit(graph.node)

    def final_uses(name: str, depth: int = 0) -> list[tuple[onnx.NodeProto, int]]:
        """Where a tensor is used, looking through reshapes (ops that only relabel it)."""
        found = []
        for node, position in consumers.get(name, []):
            if node.op_type in PASS_THROUGH and position == 0 and depth < 4:
                found += final_uses(node.output[0], depth + 1) or [(node, position)]
            else:
                found.append((node, position))
        return found

    def lookup_rows(node: onnx.NodeProto) -> int:
        """A lookup's rows (the vocabulary): the first dimension of the initializer its data
        input comes from, back through the reshapes."""
        source = node.input[0]
        for _ in range(5):
            if source in sizes or source not in producers or producers[source].op_type not in PASS_THROUGH:
                break
            source = producers[source].input[0]
        return max(sizes[source][1], 1) if source in sizes else 1

    inventory = WeightInventory()
    for name, (size, _) in sizes.items():
        kind = row_kind(name)
        used = final_uses(name)
        if kind is not None:
            inventory.ffn_rows[kind] = inventory.ffn_rows.get(kind, 0) + size
        elif name.startswith("pop."):
            pass  # static scores and biases: read at prefill only, or negligible
        elif used and all((node.op_type, position) in LOOKUP_INPUTS for node, position in used):
            inventory.tables += size
            inventory.table_row_bytes += size // lookup_rows(used[0][0])
        else:
            inventory.other += size
    return inventory


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


def bytes_model(
    dense_path: Path | None,
    pop_path: Path | None,
    channels: int,
    sparsities: Sequence[float],
    settings_of: Callable[[float], PopSettings],
    quant: str | None = None,
) -> dict[str, BytesRead]:
    """Weight bytes one batch-1 decode step reads, per variant key (:func:`bytes_key`:
    ``dense`` / ``pop@S``, or ``dense-int4`` / ``pop-int4@S`` for the exports of a ``quant``
    scheme).

    The POP export knows which bytes are FFN rows; the dense export's total is its own
    (its graph may be fused differently), with the FFN share taken from the POP export."""
    result: dict[str, BytesRead] = {}
    dense_key = bytes_key(0.0, quant)
    if pop_path is not None and channels:
        pop = weight_inventory(pop_path)
        ffn_total = sum(pop.ffn_rows.values())
        base = pop.other + pop.table_row_bytes
        kinds = list(pop.ffn_rows)
        result[dense_key] = BytesRead(ffn=ffn_total, total=base + ffn_total)
        for sparsity in sparsities:
            counts = settings_of(sparsity).counts(channels)
            ffn = ffn_total * ffn_fraction(kinds, counts, channels)
            result[bytes_key(sparsity, quant)] = BytesRead(ffn=ffn, total=base + ffn)
    if dense_path is not None:
        dense = weight_inventory(dense_path)
        ffn = result[dense_key].ffn if dense_key in result else None
        result[dense_key] = BytesRead(ffn=ffn, total=dense.other + dense.table_row_bytes)
    return result


def model_bytes(model_path: Path) -> BytesRead:
    """Weight bytes one batch-1 decode step of any dense ONNX decoder reads (another
    runtime's build, e.g. onnxruntime-genai's): its FFN share is unknown."""
    inventory = weight_inventory(model_path)
    return BytesRead(ffn=None, total=inventory.other + inventory.table_row_bytes + sum(inventory.ffn_rows.values()))


def bytes_key(sparsity: float, quant: str | None = None) -> str:
    """The :func:`bytes_model` key of a decode row's sparsity (and quantization scheme)."""
    suffix = f"-{quant}" if quant else ""
    return f"dense{suffix}" if sparsity == 0 else f"pop{suffix}@{sparsity:g}"
