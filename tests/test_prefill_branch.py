"""passes/prefill_branch.py: a PrefillOnly marker becomes an If over its exclusive cone.

A small hand-built graph run in ONNX Runtime: the guarded values at a prefill, placeholders
otherwise; a value the rest of the graph also reads stays outside the If."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort
import pytest

from popc.ort_contrib import PREFILL_ONLY_DOMAIN
from popc.passes.prefill_branch import PrefillBranchPass, exclusive_cone


def marked_graph() -> ir.Model:
    """``shared = x * 2`` (also an output), ``only = shared + 1``, ``key = Concat(only, only)`` and
    ``value = -only`` guarded by the marker; ``out = Where(cond, guarded_out, x)``."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2, 3]))  # [batch, rows, hidden], as a layer's output
    cond = ir.Value(name="cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    tape = ir.tape.Tape()
    two = tape.op("Constant", [], attributes={"value": ir.tensor(np.array(2.0, np.float32))})
    shared = tape.op("Mul", [x, two])
    one = tape.op("Constant", [], attributes={"value": ir.tensor(np.array(1.0, np.float32))})
    only = tape.op("Add", [shared, one])
    key = tape.op("Concat", [only, only], attributes={"axis": 0})
    value = tape.op("Neg", [only])
    guarded = tape.op_multi_out("PrefillOnly", [cond, only, key, value], num_outputs=3, domain=PREFILL_ONLY_DOMAIN)
    out = tape.op("Where", [cond, guarded[0], x])
    shared.name, out.name, guarded[1].name = "shared", "out", "prompt_key"
    graph = ir.Graph([x, cond], [out, guarded[1], shared], nodes=tape.nodes, opset_imports={"": 20, PREFILL_ONLY_DOMAIN: 1})
    return ir.Model(graph, ir_version=10)


def run(model: ir.Model, x: np.ndarray, cond: bool) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "cond": np.array(cond)})


def test_marker_becomes_an_if_over_what_only_it_needs():
    model = marked_graph()
    marker = next(n for n in model.graph if n.op_type == "PrefillOnly")
    assert [n.op_type for n in exclusive_cone(model.graph, marker)] == ["Constant", "Add", "Concat", "Neg"]
    PrefillBranchPass()(model)
    ops = [n.op_type for n in model.graph]
    assert "PrefillOnly" not in ops and ops.count("If") == 1
    assert "Mul" in ops  # shared is a graph output: it stays outside
    assert [v.name for v in model.graph.outputs] == ["out", "prompt_key", "shared"]
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    out, key, shared = run(model, x, True)
    np.testing.assert_array_equal(out, 2 * x + 1)
    np.testing.assert_array_equal(key, np.concatenate([2 * x + 1] * 2))
    out, key, shared = run(model, x, False)  # decode: the Where picks x; key is a placeholder
    np.testing.assert_array_equal(out, x)
    assert key.size == 0
    np.testing.assert_array_equal(shared, 2 * x)


def test_a_value_guarded_twice_comes_out_twice():
    model = marked_graph()
    marker = next(n for n in model.graph if n.op_type == "PrefillOnly")
    marker.replace_input_with(3, marker.inputs[2])  # value := key
    ir.passes.common.RemoveUnusedNodesPass()(model)
    PrefillBranchPass()(model)
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    _, key, _ = run(model, x, True)
    np.testing.assert_array_equal(key, np.concatenate([2 * x + 1] * 2))


def test_a_marker_over_shared_values_only_is_refused():
    model = marked_graph()
    marker = next(n for n in model.graph if n.op_type == "PrefillOnly")
    shared = next(v for n in model.graph for v in n.outputs if v.name == "shared")
    marker.replace_input_with(1, shared)
    marker.replace_input_with(2, shared)
    marker.replace_input_with(3, shared)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    with pytest.raises(ValueError, match="no If to make"):
        PrefillBranchPass()(model)
