"""POP-online: replace every FFN with a self-pruning ``ai.popc`` FFN node.

Rules (onnxscript rewriter):

* **SwiGLU** ``MatMul(Mul(Mul(g, Sigmoid(g)), MatMul(x, Wu)), Wd)`` with
  ``g = MatMul(x, Wg)`` -> ``PopSwiGLU``;
* **GeGLU** ``MatMul(Mul(Gelu(g), MatMul(x, Wu)), Wd)`` -> ``PopGeGLU``;
* **routed experts** (Mixtral, Qwen-MoE): either of the above times the expert's
  routing-weight column -> the same op scored on the expert's routed tokens;
* **plain MLP** ``[Add(]MatMul(act([Add(]MatMul(x, W1)[, b1)]), W2)[, b2)]`` with act
  GELU or ReLU -> ``PopGeluMLP`` / ``PopReluMLP``.

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
EXPERT_NAME = re.compile(r"experts\.(\d+)/")


def swiglu_pattern(op, x, gate_weight, up_weight, down_weight):
    gate = op.MatMul(x, gate_weight)
    return op.MatMul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), op.MatMul(x, up_weight)), down_weight)


def geglu_pattern(op, x, gate_weight, up_weight, down_weight):
    gate = op.MatMul(x, gate_weight)
    activated = op.Gelu(gate, _allow_other_attributes=True, _outputs=["activated"])
    return op.MatMul(op.Mul(activated, op.MatMul(x, up_weight)), down_weight)


def routed_swiglu_pattern(op, x, gate_weight, up_weight, down_weight, route):
    return op.Mul(swiglu_pattern(op, x, gate_weight, up_weight, down_weight), route)


def routed_geglu_pattern(op, x, gate_weight, up_weight, down_weight, route):
    return op.Mul(geglu_pattern(op, x, gate_weight, up_weight, down_weight), route)


def gelu_mlp_pattern(op, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    hidden = op.Add(op.MatMul(x, fc1_weight), fc1_bias)
    activated = op.Gelu(hidden, _allow_other_attributes=True, _outputs=["activated"])
    return op.Add(op.MatMul(activated, fc2_weight), fc2_bias)


def relu_mlp_pattern(op, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    return op.Add(op.MatMul(op.Relu(op.Add(op.MatMul(x, fc1_weight), fc1_bias)), fc2_weight), fc2_bias)


def gelu_mlp_no_bias_pattern(op, x, fc1_weight, fc2_weight):
    activated = op.Gelu(op.MatMul(x, fc1_weight), _allow_other_attributes=True, _outputs=["activated"])
    return op.MatMul(activated, fc2_weight)


def relu_mlp_no_bias_pattern(op, x, fc1_weight, fc2_weight):
    return op.MatMul(op.Relu(op.MatMul(x, fc1_weight)), fc2_weight)


def weights_are_a_plain_mlp(context, x, fc1_weight, fc2_weight, fc1_bias=None, fc2_bias=None, **_) -> bool:
    """fc1 [H, D], fc2 [D, H] (+ biases [D], [H]) constants."""
    arrays = [v.const_value for v in (fc1_weight, fc2_weight, fc1_bias, fc2_bias) if v is not None]
    if any(a is None for a in arrays):
        return False
    fc1, fc2 = arrays[0].shape, arrays[1].shape
    if len(fc1) != 2 or tuple(fc2) != (fc1[1], fc1[0]):
        return False
    biases = [tuple(a.shape) for a in arrays[2:]]
    return biases in ([], [(fc1[1],), (fc1[0],)])


def weights_are_an_ffn(context, x, gate_weight, up_weight, down_weight, **_) -> bool:
    """Gate/up [H, D] and down [D, H] constants: an FFN, not attention."""
    arrays = [w.const_value for w in (gate_weight, up_weight, down_weight)]
    if any(a is None for a in arrays):
        return False
    gate, up, down = (a.shape for a in arrays)
    return len(gate) == 2 and gate == up and tuple(down) == (gate[1], gate[0])


def is_routed_expert(context, x, gate_weight, up_weight, down_weight, route, **_) -> bool:
    """An expert FFN (named ``experts.{e}`` by the tracer) times its routing column; not
    Qwen-MoE's shared expert, whose product is with ``Sigmoid(gate(x))``."""
    producer = route.producer()
    if producer is not None and producer.op_type == "Sigmoid":
        return False
    return _expert_index(down_weight) is not None and weights_are_an_ffn(context, x, gate_weight, up_weight, down_weight)


def is_prunable_dense_ffn(context, x, gate_weight, up_weight, down_weight, **_) -> bool:
    """An FFN that is not a Qwen-MoE shared expert (``Sigmoid(gate) * FFN``), which stays dense."""
    if not weights_are_an_ffn(context, x, gate_weight, up_weight, down_weight):
        return False
    down_node = next(user for user, _ in down_weight.uses() if user.op_type == "MatMul")
    for consumer, _ in down_node.outputs[0].uses():
        if consumer.op_type == "Mul":
            others = [v for v in consumer.inputs if v is not down_node.outputs[0]]
            if any(v is not None and v.producer() is not None and v.producer().op_type == "Sigmoid" for v in others):
                return False
    return True


class PopOnlinePass(ir.passes.InPlacePass):
    """Insert POP-online into every matched FFN; fails if none matches."""

    def __init__(self, per_ffn_token_mask: bool = False) -> None:
        super().__init__()
        self.layers: list[int] = []
        # POP-prefill graphs feed deep FFNs fewer tokens than input_ids has at a prefill:
        # then each FFN's token mask is the last X.shape[1] columns of attention_mask.
        self.per_ffn_token_mask = per_ffn_token_mask

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {value.name: value for value in graph.inputs}
        if "attention_mask" not in inputs or "input_ids" not in inputs:
            raise ValueError("POP needs a popc-traced graph with input_ids and attention_mask inputs")
        shared = _SharedInputs(graph, inputs["input_ids"], inputs["attention_mask"])
        partitions: dict[tuple[int, ...], tuple[ir.Value, ir.Value]] = {}
        channels: set[int] = set()

        def new_partition(op, anchor: ir.Value, x: ir.Value, width: int):
            """The FFN's key (layer[, expert]), name label and partition state input."""
            layer = _layer_index(anchor, x, len(partitions))
            expert = _expert_index(anchor)
            key = (layer,) if expert is None else (layer, expert)
            label = ".".join(map(str, key))
            channels.add(width)
            partition_in = ir.Value(
                name=f"past_partition.{label}", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "partition_size"])
            )
            graph.inputs.append(partition_in)
            return key, label, partition_in

        def constant(op, label: str, name: str, array: np.ndarray) -> ir.Value:
            return op.initializer(ir.tensor(np.ascontiguousarray(array), name=f"pop.{label}.{name}"), name=f"pop.{label}.{name}")

        def replace(op, x, gate_weight, up_weight, down_weight, activated=None, route=None, **_):
            gate = gate_weight.const_value.numpy().T
            up = up_weight.const_value.numpy().T
            down = down_weight.const_value.numpy()
            key, label, partition_in = new_partition(op, down_weight, x, gate.shape[0])
            static = np.linalg.norm(gate, axis=1) * np.linalg.norm(up, axis=1) * np.linalg.norm(down, axis=1)
            token_mask = _token_mask_like(op, shared.attention_mask, x) if self.per_ffn_token_mask else shared.token_mask
            token_mask = token_mask if route is None else _routed_token_mask(op, token_mask, route)
            arguments = [
                x, token_mask, partition_in, shared.config,
                constant(op, label, "gate_rows", gate), constant(op, label, "up_rows", up),
                constant(op, label, "down_rows", down), constant(op, label, "static_score", static.astype(down.dtype)),
            ]  # fmt: skip
            if activated is None:
                y, partition_out = op.PopSwiGLU(*arguments, _domain=DOMAIN, _version=VERSION, _outputs=2)
            else:
                approximate = activated.producer().attributes.get_string("approximate", "none")
                y, partition_out = op.PopGeGLU(
                    *arguments, approximate=approximate, _domain=DOMAIN, _version=VERSION, _outputs=2
                )
            partitions[key] = (partition_in, partition_out)
            return y if route is None else op.Mul(y, route)

        def replace_plain(op, x, fc1_weight, fc2_weight, fc1_bias=None, fc2_bias=None, activated=None, **_):
            fc1 = fc1_weight.const_value.numpy().T
            fc2 = fc2_weight.const_value.numpy()
            key, label, partition_in = new_partition(op, fc2_weight, x, fc1.shape[0])
            bias1 = fc1_bias.const_value.numpy() if fc1_bias is not None else np.zeros(fc1.shape[0], fc1.dtype)
            bias2 = fc2_bias.const_value.numpy() if fc2_bias is not None else np.zeros(fc2.shape[1], fc2.dtype)
            static = np.linalg.norm(fc1, axis=1) * np.linalg.norm(fc2, axis=1)
            arguments = [
                x, shared.token_mask, partition_in, shared.config,
                constant(op, label, "fc1_rows", fc1), constant(op, label, "fc1_bias", bias1),
                constant(op, label, "fc2_rows", fc2), constant(op, label, "fc2_bias", bias2),
                constant(op, label, "static_score", static.astype(fc2.dtype)),
            ]  # fmt: skip
            if activated is None:
                y, partition_out = op.PopReluMLP(*arguments, _domain=DOMAIN, _version=VERSION, _outputs=2)
            else:
                approximate = activated.producer().attributes.get_string("approximate", "none")
                y, partition_out = op.PopGeluMLP(
                    *arguments, approximate=approximate, _domain=DOMAIN, _version=VERSION, _outputs=2
                )
            partitions[key] = (partition_in, partition_out)
            return y

        # Routed experts first: their pattern contains the plain FFN's, and the plain
        # rule would otherwise claim each expert without its routing weight. Rule sets
        # commute Add/Mul operands, so bias and routing products match in either order.
        routed_rules = [
            pattern.RewriteRule(routed_swiglu_pattern, replace, is_routed_expert, name="PopRoutedSwiGLU"),
            pattern.RewriteRule(routed_geglu_pattern, replace, is_routed_expert, name="PopRoutedGeGLU"),
        ]
        rewriter.rewrite(model, pattern_rewrite_rules=pattern.RewriteRuleSet(routed_rules, commute=True))
        dense_rules = [
            pattern.RewriteRule(swiglu_pattern, replace, is_prunable_dense_ffn, name="PopSwiGLU"),
            pattern.RewriteRule(geglu_pattern, replace, is_prunable_dense_ffn, name="PopGeGLU"),
            pattern.RewriteRule(gelu_mlp_pattern, replace_plain, weights_are_a_plain_mlp, name="PopGeluMLP"),
            pattern.RewriteRule(relu_mlp_pattern, replace_plain, weights_are_a_plain_mlp, name="PopReluMLP"),
            pattern.RewriteRule(gelu_mlp_no_bias_pattern, replace_plain, weights_are_a_plain_mlp, name="PopGeluMLP"),
            pattern.RewriteRule(relu_mlp_no_bias_pattern, replace_plain, weights_are_a_plain_mlp, name="PopReluMLP"),
        ]
        rewriter.rewrite(model, pattern_rewrite_rules=pattern.RewriteRuleSet(dense_rules, commute=True))
        if not partitions:
            raise ValueError("POP found no FFN block (SwiGLU, GeGLU or plain GELU/ReLU MLP) to rewrite in this graph")
        if len(channels) != 1:
            raise ValueError(f"POP needs one FFN width per model (pop_config holds counts); found {sorted(channels)}")

        for key in sorted(partitions):
            partitions[key][1].name = "present_partition." + ".".join(map(str, key))
            graph.outputs.append(partitions[key][1])
        # State inputs in layer order after the KV cache, then the model-wide config.
        ordered = [v for v in graph.inputs if not v.name.startswith("past_partition.")]
        ordered += [partitions[key][0] for key in sorted(partitions)]
        graph.inputs.clear()
        graph.inputs.extend([*ordered, shared.config])
        _add_functions(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        self.layers = sorted(partitions)
        self.channels = channels.pop()
        return ir.passes.PassResult(model, modified=True)


class _SharedInputs:
    """``pop_config`` (a new graph input) and the real-token mask of the current tokens.

    The mask's nodes are made on first use: a rewrite round that matches nothing
    would otherwise remove them as unused before the next round needs them.
    """

    def __init__(self, graph: ir.Graph, input_ids: ir.Value, attention_mask: ir.Value) -> None:
        self.graph = graph
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.config = ir.Value(name="pop_config", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([4]))
        self._token_mask: ir.Value | None = None

    @property
    def token_mask(self) -> ir.Value:
        """float(attention_mask[:, -S:]) with S = input_ids.shape[1]."""
        if self._token_mask is None:
            tape = ir.tape.Tape()
            sequence = tape.op("Shape", [self.input_ids], attributes={"start": 1, "end": 2})
            start = tape.op("Neg", [sequence])
            end = tape.op("Constant", [], attributes={"value": ir.tensor(np.array([np.iinfo(np.int64).max]))})
            axes = tape.op("Constant", [], attributes={"value": ir.tensor(np.array([1], np.int64))})
            window = tape.op("Slice", [self.attention_mask, start, end, axes])
            self._token_mask = tape.op("Cast", [window], attributes={"to": ir.DataType.FLOAT})
            self._token_mask.name = "pop_token_mask"
            for node in tape.nodes:
                node.name = f"/pop/{node.op_type}"
            self.graph.insert_before(self.graph.node(0), tape.nodes)
        return self._token_mask


def _layer_index(down_weight: ir.Value, x: ir.Value, fallback: int) -> int:
    for value in (x, down_weight):
        for user, _ in value.uses():
            match = LAYER_NAME.search(user.name or "")
            if match:
                return int(match.group(1))
    return fallback


def _expert_index(down_weight: ir.Value) -> int | None:
    for user, _ in down_weight.uses():
        match = EXPERT_NAME.search(user.name or "")
        if match:
            return int(match.group(1))
    return None


def _token_mask_like(op, attention_mask: ir.Value, x: ir.Value) -> ir.Value:
    """float(attention_mask[:, -S:]) with S = x.shape[1] (the tokens this FFN sees)."""
    start = op.Neg(op.Shape(x, start=1, end=2))
    end = op.Constant(value_ints=[np.iinfo(np.int64).max])
    window = op.Slice(attention_mask, start, end, op.Constant(value_ints=[1]))
    return op.Cast(window, to=ir.DataType.FLOAT)


def _routed_token_mask(op, token_mask: ir.Value, route: ir.Value) -> ir.Value:
    """Score an expert on the real tokens routed to it (all real tokens if none is)."""
    last, sequence = op.Constant(value_ints=[-1]), op.Constant(value_ints=[1])
    routed = op.Cast(op.Greater(op.Squeeze(route, last), op.Constant(value_float=0.0)), to=ir.DataType.FLOAT)
    mask = op.Mul(token_mask, routed)
    any_routed = op.Greater(op.ReduceMax(mask, sequence, keepdims=1), op.Constant(value_float=0.0))
    return op.Where(any_routed, mask, token_mask)


def _add_functions(model: ir.Model) -> None:
    import onnx

    for function in POP_FUNCTIONS:
        proto = function.to_function_proto()
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))
        ir_function = ir.serde.deserialize_function(proto)
        model.functions[ir_function.identifier()] = ir_function
    model.opset_imports[DOMAIN] = VERSION
