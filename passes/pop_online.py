"""POP-online: replace every gated FFN with a self-pruning ``ai.popc`` FFN node.

Rules (onnxscript rewriter):

* **SwiGLU** ``MatMul(Mul(Mul(g, Sigmoid(g)), MatMul(x, Wu)), Wd)`` with
  ``g = MatMul(x, Wg)`` -> ``PopSwiGLU``;
* **GeGLU** ``MatMul(Mul(Gelu(g), MatMul(x, Wu)), Wd)`` -> ``PopGeGLU``.

They apply when all three weights are initializers of matching shapes (so the
attention MatMuls never match). The replacement lays the weights out one row per
channel (gate and up transposed back to ``[D, H]``; down already is), adds the
layer's partition as state (``past_partition.{i}`` -> ``present_partition.{i}``),
and the model-wide ``pop_config`` input. The op bodies live in
``templates/pop_ffn.py``.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter import pattern

from popc.templates.ops import DOMAIN, VERSION
from popc.templates.pop_ffn import POP_FUNCTIONS

LAYER_NAME = re.compile(r"layers\.(\d+)/")


def swiglu_pattern(op, x, gate_weight, up_weight, down_weight):
    gate = op.MatMul(x, gate_weight)
    return op.MatMul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), op.MatMul(x, up_weight)), down_weight)


def geglu_pattern(op, x, gate_weight, up_weight, down_weight):
    gate = op.MatMul(x, gate_weight)
    activated = op.Gelu(gate, _allow_other_attributes=True, _outputs=["activated"])
    return op.MatMul(op.Mul(activated, op.MatMul(x, up_weight)), down_weight)


def weights_are_an_ffn(context, x, gate_weight, up_weight, down_weight, **_) -> bool:
    """Gate/up [H, D] and down [D, H] constants: an FFN, not attention."""
    arrays = [w.const_value for w in (gate_weight, up_weight, down_weight)]
    if any(a is None for a in arrays):
        return False
    gate, up, down = (a.shape for a in arrays)
    return len(gate) == 2 and gate == up and tuple(down) == (gate[1], gate[0])


class PopOnlinePass(ir.passes.InPlacePass):
    """Insert POP-online into every matched FFN; fails if none matches."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: list[int] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {value.name: value for value in graph.inputs}
        if "attention_mask" not in inputs or "input_ids" not in inputs:
            raise ValueError("POP needs a popc-traced graph with input_ids and attention_mask inputs")
        shared = _SharedInputs(graph, inputs["input_ids"], inputs["attention_mask"])
        partitions: dict[int, tuple[ir.Value, ir.Value]] = {}

        def replace(op, x, gate_weight, up_weight, down_weight, activated=None, **_):
            layer = _layer_index(down_weight, x, len(partitions))
            gate = np.ascontiguousarray(gate_weight.const_value.numpy().T)
            up = np.ascontiguousarray(up_weight.const_value.numpy().T)
            down = down_weight.const_value.numpy()
            static = (np.linalg.norm(gate, axis=1) * np.linalg.norm(up, axis=1) * np.linalg.norm(down, axis=1))
            partition_in = ir.Value(
                name=f"past_partition.{layer}",
                type=ir.TensorType(ir.DataType.INT64),
                shape=ir.Shape(["batch", f"partition_size"]),
            )
            graph.inputs.append(partition_in)
            weights = [
                op.initializer(ir.tensor(array, name=f"pop.{layer}.{name}"), name=f"pop.{layer}.{name}")
                for name, array in (("gate_rows", gate), ("up_rows", up), ("down_rows", down))
            ]
            static_score = op.initializer(
                ir.tensor(static.astype(down.dtype), name=f"pop.{layer}.static_score"), name=f"pop.{layer}.static_score"
            )
            arguments = [x, shared.token_mask, partition_in, shared.config, *weights, static_score]
            if activated is None:
                y, partition_out = op.PopSwiGLU(*arguments, _domain=DOMAIN, _version=VERSION, _outputs=2)
            else:
                approximate = activated.producer().attributes.get_string("approximate", "none")
                y, partition_out = op.PopGeGLU(
                    *arguments, approximate=approximate, _domain=DOMAIN, _version=VERSION, _outputs=2
                )
            partitions[layer] = (partition_in, partition_out)
            return y

        rules = [
            pattern.RewriteRule(swiglu_pattern, replace, weights_are_an_ffn, name="PopSwiGLU"),
            pattern.RewriteRule(geglu_pattern, replace, weights_are_an_ffn, name="PopGeGLU"),
        ]
        rewriter.rewrite(model, pattern_rewrite_rules=rules)
        if not partitions:
            raise ValueError("POP found no FFN block (SwiGLU/GeGLU) to rewrite in this graph")

        for layer in sorted(partitions):
            partitions[layer][1].name = f"present_partition.{layer}"
            graph.outputs.append(partitions[layer][1])
        # State inputs in layer order after the KV cache, then the model-wide config.
        ordered = [v for v in graph.inputs if not v.name.startswith("past_partition.")]
        ordered += [partitions[layer][0] for layer in sorted(partitions)]
        graph.inputs.clear()
        graph.inputs.extend([*ordered, shared.config])
        _add_functions(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        self.layers = sorted(partitions)
        return ir.passes.PassResult(model, modified=True)


class _SharedInputs:
    """``pop_config`` (a new graph input) and the real-token mask of the current tokens."""

    def __init__(self, graph: ir.Graph, input_ids: ir.Value, attention_mask: ir.Value) -> None:
        self.config = ir.Value(name="pop_config", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([4]))
        # token_mask = float(attention_mask[:, -S:]), S = input_ids.shape[1]
        tape = ir.tape.Tape()
        sequence = tape.op("Shape", [input_ids], attributes={"start": 1, "end": 2})
        start = tape.op("Neg", [sequence])
        end = tape.op("Constant", [], attributes={"value": ir.tensor(np.array([np.iinfo(np.int64).max]))})
        axes = tape.op("Constant", [], attributes={"value": ir.tensor(np.array([1], np.int64))})
        window = tape.op("Slice", [attention_mask, start, end, axes])
        self.token_mask = tape.op("Cast", [window], attributes={"to": ir.DataType.FLOAT})
        self.token_mask.name = "pop_token_mask"
        for node in tape.nodes:
            node.name = f"/pop/{node.op_type}"
        graph.insert_before(graph.node(0), tape.nodes) if len(graph) else graph.extend(tape.nodes)


def _layer_index(down_weight: ir.Value, x: ir.Value, fallback: int) -> int:
    for value in (x, down_weight):
        for user, _ in value.uses():
            match = LAYER_NAME.search(user.name or "")
            if match:
                return int(match.group(1))
    return fallback


def _add_functions(model: ir.Model) -> None:
    import onnx

    for function in POP_FUNCTIONS:
        proto = function.to_function_proto()
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))
        ir_function = ir.serde.deserialize_function(proto)
        model.functions[ir_function.identifier()] = ir_function
    model.opset_imports[DOMAIN] = VERSION
