"""Prefill-only work behind an ``If``: what a ``popc.internal.PrefillOnly`` marker guards.

POP-prefill under KV eviction (``popc/prefill_skip.py``) gives each deep layer an attention
that only a prefill uses: the window rows over the skipped tokens' independent K/V. Traced
as tensor ops it would run at every decode step too, on empty tensors, about a hundred small
nodes per layer. The trace marks its results with ``PrefillOnly(is_prefill, out, key,
value)`` (``popc.ort_contrib.PrefillOnly``); this pass

* matches each marker;
* takes the nodes that compute nothing but its inputs (those whose every output is used
  only by such nodes or by the marker: the marker's exclusive cone);
* puts instead an ``If(is_prefill)`` whose then-branch is that cone and whose else-branch
  returns placeholders (a 1 x 1 x 1 ``out``, which the layer's ``Where`` never picks at
  decode, and empty ``key``/``value``).

It applies to exports made with ``--kv-evict --prefill-skip N``; it fails on a graph with a
marker it cannot move (ONNX Runtime would refuse the marker anyway).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from popc.ort_contrib import PREFILL_ONLY_DOMAIN


class PrefillBranchPass(ir.passes.InPlacePass):
    """Every ``PrefillOnly`` marker -> an ``If`` over its exclusive cone."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        markers = [n for n in graph if n.domain == PREFILL_ONLY_DOMAIN and n.op_type == "PrefillOnly"]
        for marker in markers:
            branch(graph, marker)
        model.opset_imports.pop(PREFILL_ONLY_DOMAIN, None)
        return ir.passes.PassResult(model, modified=bool(markers))


def exclusive_cone(graph: ir.Graph, marker: ir.Node) -> list[ir.Node]:
    """The nodes before ``marker`` (graph order) whose outputs feed only ``marker`` or nodes
    already in the cone, and are not graph outputs; in graph order."""
    nodes = list(graph)
    position = nodes.index(marker)
    cone: set[ir.Node] = {marker}
    outputs = set(graph.outputs)
    for node in reversed(nodes[:position]):  # a node's users come after it
        values = node.outputs
        if values and all(v not in outputs and all(user in cone for user, _ in v.uses()) for v in values):
            cone.add(node)
    cone.discard(marker)
    return [n for n in nodes if n in cone]


def branch(graph: ir.Graph, marker: ir.Node) -> ir.Node:
    """Replace ``marker`` by an ``If`` over its exclusive cone; returns the ``If``."""
    condition, *guarded = marker.inputs
    cone = exclusive_cone(graph, marker)
    if not cone:
        raise ValueError(f"{marker.name}: nothing computes its values alone; no If to make")
    graph.remove(cone)
    results, seen = [], set()
    for index, value in enumerate(guarded):  # ONNX Runtime mishandles a value that is two outputs of a branch
        if value in seen:
            copy = ir.node("Identity", [value], name=f"{marker.name}_copy_{index}")
            copy.outputs[0].name = copy.name
            cone.append(copy)
            value = copy.outputs[0]
        seen.add(value)
        results.append(value)
    then_branch = ir.Graph([], results, nodes=cone, name=f"{marker.name}_prefill")
    placeholders = [
        _constant(np.zeros((1, 1, 1), np.float32), f"{marker.name}_decode_out"),
        _constant(np.zeros((1, 1, 0, 1), np.float32), f"{marker.name}_decode_key"),
        _constant(np.zeros((1, 1, 0, 1), np.float32), f"{marker.name}_decode_value"),
    ]
    else_branch = ir.Graph([], [p.outputs[0] for p in placeholders], nodes=placeholders, name=f"{marker.name}_decode")
    choice = ir.node(
        "If",
        [condition],
        attributes={"then_branch": then_branch, "else_branch": else_branch},
        num_outputs=3,
        name=f"{marker.name}_If",
    )
    graph.insert_before(marker, choice)
    for old, new in zip(marker.outputs, choice.outputs):
        name, new.type, new.shape = old.name, old.type, old.shape
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name, new.name = None, name  # the graph output keeps its name
    graph.remove(marker, safe=True)
    return choice


def _constant(array: np.ndarray, name: str) -> ir.Node:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)}, name=name)
    node.outputs[0].name = name
    return node
