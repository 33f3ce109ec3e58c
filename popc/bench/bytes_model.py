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
    ffn_rows: dict[str, int] = field(default_factory=dict)  # POP FFN rows by kind ("gate_rows", ...)


def weight_inventory(model_path: Path) -> WeightInventory:
    """Initializer bytes of an export, split into lookup tables (only the rows of the
    current tokens are read: embeddings), POP FFN rows (``pop.*``) and everything else."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    sizes: dict[str, tuple[int, int]] = {}  # name -> (bytes, row bytes)
    for init in graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        count = math.prod(init.dims) if init.dims else 1
        row = math.prod(init.dims[1:]) * itemsize if len(init.dims) > 1 else itemsize
        sizes[init.name] = (count * itemsize, row)
    uses: dict[str, list[tuple[str, int]]] = {}

    def visit(nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            for position, name in enumerate(node.input):
                if name in sizes:
                    uses.setdefault(name, []).append((node.op_type, position))
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g.node)

    visit(graph.node)
    inventory = WeightInventory()
    for name, (size, row) in sizes.items():
        kind = name.rsplit(".", 1)[-1]
        if name.startswith("pop.") and kind.endswith("_rows"):
            inventory.ffn_rows[kind] = inventory.ffn_rows.get(kind, 0) + size
        elif name.startswith("pop."):
            pass  # static scores and biases: read at prefill only, or negligible
        elif uses.get(name) and all(op == "Gather" and pos == 0 for op, pos in uses[name]):
            inventory.tables += size
            inventory.table_row_bytes += row
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
) -> dict[str, BytesRead]:
    """Weight bytes one batch-1 decode step reads, per variant key (``dense`` / ``pop@S``).

    The POP export knows which bytes are FFN rows; the dense export's total is its own
    (its graph may be fused differently), with the FFN share taken from the POP export."""
    result: dict[str, BytesRead] = {}
    if pop_path is not None and channels:
        pop = weight_inventory(pop_path)
        ffn_total = sum(pop.ffn_rows.values())
        base = pop.other + pop.table_row_bytes
        kinds = list(pop.ffn_rows)
        result["dense"] = BytesRead(ffn=ffn_total, total=base + ffn_total)
        for sparsity in sparsities:
            counts = settings_of(sparsity).counts(channels)
            ffn = ffn_total * ffn_fraction(kinds, counts, channels)
            result[f"pop@{sparsity:g}"] = BytesRead(ffn=ffn, total=base + ffn)
    if dense_path is not None:
        dense = weight_inventory(dense_path)
        ffn = result["dense"].ffn if "dense" in result else None
        result["dense"] = BytesRead(ffn=ffn, total=dense.other + dense.table_row_bytes)
    return result


def bytes_key(sparsity: float) -> str:
    """The :func:`bytes_model` key of a decode row's sparsity."""
    return "dense" if sparsity == 0 else f"pop@{sparsity:g}"
