"""POP-online rewrite rules: which FFN subgraphs POP prunes, as onnxscript rule classes.

* ``GatedFFNRule(activation="silu")`` -- **SwiGLU**
  ``MatMul(Mul(Mul(g, Sigmoid(g)), MatMul(x, Wu)), Wd)`` with ``g = MatMul(x, Wg)``
  -> ``PopSwiGLU``; ``activation="gelu"`` -- **GeGLU**
  ``MatMul(Mul(Gelu(g), MatMul(x, Wu)), Wd)`` -> ``PopGeGLU``;
* ``GatedFFNRule(..., routed=True)`` -- a **routed expert** (Mixtral, Qwen-MoE): either
  of the above times the expert's routing-weight column -> the same op scored on the
  expert's routed tokens, times the routing column;
* ``PlainMLPRule(activation="gelu" | "relu", bias=True | False)`` -- a **plain MLP**
  ``[Add(]MatMul(act([Add(]MatMul(x, W1)[, b1)]), W2)[, b2)]`` -> ``PopGeluMLP`` /
  ``PopReluMLP``.

Every rewritten FFN gets two per-channel initializers beside its weight rows:
``static_score`` (weight magnitudes, the static baseline) and ``output_norm`` (``||Wd_j||``,
the L2 norm of each channel's down/fc2 row: the output-aware score), last among its inputs.

Weights are in ONNX ``MatMul`` layout: gate/up/fc1 ``[D, H]`` (model width D, FFN width
H), down/fc2 ``[H, D]``. A rule applies only when they are constants of these matching
shapes, which leaves the attention MatMuls (activation x activation, or projections of
other shapes) alone. Every ``check`` returns an ``onnxscript.rewriter.MatchResult`` whose
``reason`` says why a match was refused.

The rules share one per-pass state object (``passes/pop_online.py``'s ``PopRewriteState``:
the partitions found, the channel widths, ``pop_config`` and the token masks); the rule
sets here are what ``PopOnlinePass`` applies, routed experts first.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from popc.templates.ops import DOMAIN, VERSION

if TYPE_CHECKING:
    from popc.passes.pop_online import PopRewriteState

LAYER_NAME = re.compile(r"layers\.(\d+)/")
EXPERT_NAME = re.compile(r"experts\.(\d+)/")


def layer_index(down_weight: ir.Value, x: ir.Value, fallback: int) -> int:
    """The FFN's decoder layer, from the tracer's ``layers.{i}/`` node names."""
    for value in (x, down_weight):
        for user, _ in value.uses():
            match = LAYER_NAME.search(user.name or "")
            if match:
                return int(match.group(1))
    return fallback


def expert_index(down_weight: ir.Value) -> int | None:
    """The expert ``e`` of an FFN whose down projection the tracer named ``experts.{e}/``."""
    for user, _ in down_weight.uses():
        match = EXPERT_NAME.search(user.name or "")
        if match:
            return int(match.group(1))
    return None


def _produced_by(value: ir.Value | None, op_type: str) -> bool:
    return value is not None and value.producer() is not None and value.producer().op_type == op_type


def _initializer(op, label: str, name: str, array: np.ndarray) -> ir.Value:
    """A new weight ``pop.{label}.{name}`` of the rewritten FFN."""
    return op.initializer(
        ir.tensor(np.ascontiguousarray(array), name=f"pop.{label}.{name}"), name=f"pop.{label}.{name}"
    )


def _routed_token_mask(op, token_mask: ir.Value, route: ir.Value) -> ir.Value:
    """Score an expert on the real tokens routed to it (all real tokens if none is)."""
    last, sequence = op.Constant(value_ints=[-1]), op.Constant(value_ints=[1])
    routed = op.Cast(op.Greater(op.Squeeze(route, last), op.Constant(value_float=0.0)), to=ir.DataType.FLOAT)
    mask = op.Mul(token_mask, routed)
    any_routed = op.Greater(op.ReduceMax(mask, sequence, keepdims=1), op.Constant(value_float=0.0))
    return op.Where(any_routed, mask, token_mask)


def _approximate(activated: ir.Value) -> str:
    """The matched Gelu's ``approximate`` attribute ("none" or "tanh")."""
    return activated.producer().attributes.get_string("approximate", "none")


class GatedFFNRule(pattern.RewriteRuleClassBase):
    """A gated FFN (SwiGLU or GeGLU), dense or a routed expert -> ``PopSwiGLU`` / ``PopGeGLU``.

    Dense: not Qwen-MoE's shared expert (``Sigmoid(gate(x)) * FFN(x)``), which stays dense.
    Routed: the FFN times its routing column, and its down projection is named
    ``experts.{e}`` by the tracer; the op scores channels on the expert's routed tokens.
    """

    OPS: ClassVar[dict[str, str]] = {"silu": "PopSwiGLU", "gelu": "PopGeGLU"}

    def __init__(self, state: PopRewriteState, activation: Literal["silu", "gelu"], routed: bool = False) -> None:
        if activation not in self.OPS:
            raise ValueError(f"gated FFN activation must be one of {sorted(self.OPS)}, not {activation!r}")
        op_type = self.OPS[activation]
        super().__init__(name=op_type.replace("Pop", "PopRouted") if routed else op_type)
        self.state = state
        self.activation = activation
        self.routed = routed
        self.op_type = op_type

    def pattern(self, op, x, gate_weight, up_weight, down_weight, route):
        gate = op.MatMul(x, gate_weight)
        if self.activation == "silu":
            activated = op.Mul(gate, op.Sigmoid(gate))
        else:
            activated = op.Gelu(gate, _allow_other_attributes=True, _outputs=["activated"])
        ffn = op.MatMul(op.Mul(activated, op.MatMul(x, up_weight)), down_weight)
        return op.Mul(ffn, route) if self.routed else ffn

    def check(self, context, x, gate_weight, up_weight, down_weight, route=None, **_) -> MatchResult:
        check_result = MatchResult()
        if self.routed:
            if _produced_by(route, "Sigmoid"):
                return check_result.fail("product with Sigmoid(gate): Qwen-MoE shared expert stays dense", route)
            if expert_index(down_weight) is None:
                return check_result.fail("not a routed expert (no experts.{e} name on the down MatMul)", down_weight)
            return check_gated_weights(check_result, gate_weight, up_weight, down_weight)
        if not check_gated_weights(check_result, gate_weight, up_weight, down_weight):
            return check_result
        down_node = next(user for user, _ in down_weight.uses() if user.op_type == "MatMul")
        for consumer, _ in down_node.outputs[0].uses():
            if consumer.op_type == "Mul":
                others = [v for v in consumer.inputs if v is not down_node.outputs[0]]
                if any(_produced_by(v, "Sigmoid") for v in others):
                    return check_result.fail("product with Sigmoid(gate): Qwen-MoE shared expert stays dense", consumer)
        return check_result

    def rewrite(self, op, x, gate_weight, up_weight, down_weight, route=None, activated=None, **_):
        state = self.state
        gate = gate_weight.const_value.numpy().T
        up = up_weight.const_value.numpy().T
        down = down_weight.const_value.numpy()
        key, label, partition_in = state.new_partition(down_weight, x, gate.shape[0])
        output_norm = np.linalg.norm(down, axis=1)
        static = np.linalg.norm(gate, axis=1) * np.linalg.norm(up, axis=1) * output_norm
        token_mask = state.token_mask_for(op, x)
        token_mask = token_mask if route is None else _routed_token_mask(op, token_mask, route)
        arguments = [
            x, token_mask, partition_in, state.config,
            _initializer(op, label, "gate_rows", gate), _initializer(op, label, "up_rows", up),
            _initializer(op, label, "down_rows", down), _initializer(op, label, "static_score", static.astype(down.dtype)),
            _initializer(op, label, "output_norm", output_norm.astype(down.dtype)),
        ]  # fmt: skip
        attributes = {} if self.activation == "silu" else {"approximate": _approximate(activated)}
        y, partition_out = getattr(op, self.op_type)(
            *arguments, _domain=DOMAIN, _version=VERSION, _outputs=2, **attributes
        )
        state.record(key, partition_in, partition_out)
        return y if route is None else op.Mul(y, route)


def check_gated_weights(check_result: MatchResult, gate_weight, up_weight, down_weight) -> MatchResult:
    """Gate and up ``[D, H]``, down ``[H, D]``, all constants: an FFN, not attention."""
    for role, weight in (("gate", gate_weight), ("up", up_weight), ("down", down_weight)):
        if weight.const_value is None:
            return check_result.fail(f"{role} weight is not a constant", weight)
    gate, up, down = (tuple(w.const_value.shape) for w in (gate_weight, up_weight, down_weight))
    if len(gate) != 2:
        return check_result.fail(f"gate weight shape {gate} is not 2-D [D, H]", gate_weight)
    if up != gate:
        return check_result.fail(f"up weight shape {up} is not the gate's {gate}", up_weight)
    if down != (gate[1], gate[0]):
        return check_result.fail(f"down weight shape {down} is not [H, D] = {(gate[1], gate[0])}", down_weight)
    return check_result


class PlainMLPRule(pattern.RewriteRuleClassBase):
    """fc1 -> GELU/ReLU -> fc2, with or without biases -> ``PopGeluMLP`` / ``PopReluMLP``."""

    OPS: ClassVar[dict[str, str]] = {"gelu": "PopGeluMLP", "relu": "PopReluMLP"}

    def __init__(self, state: PopRewriteState, activation: Literal["gelu", "relu"], bias: bool = True) -> None:
        if activation not in self.OPS:
            raise ValueError(f"plain MLP activation must be one of {sorted(self.OPS)}, not {activation!r}")
        super().__init__(name=self.OPS[activation])
        self.state = state
        self.activation = activation
        self.bias = bias

    def pattern(self, op, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        hidden = op.MatMul(x, fc1_weight)
        if self.bias:
            hidden = op.Add(hidden, fc1_bias)
        if self.activation == "gelu":
            activated = op.Gelu(hidden, _allow_other_attributes=True, _outputs=["activated"])
        else:
            activated = op.Relu(hidden)
        y = op.MatMul(activated, fc2_weight)
        return op.Add(y, fc2_bias) if self.bias else y

    def check(self, context, x, fc1_weight, fc2_weight, fc1_bias=None, fc2_bias=None, **_) -> MatchResult:
        """fc1 ``[D, H]``, fc2 ``[H, D]`` (biases ``[H]``, ``[D]``), all constants."""
        check_result = MatchResult()
        named = [("fc1 weight", fc1_weight), ("fc2 weight", fc2_weight), ("fc1 bias", fc1_bias), ("fc2 bias", fc2_bias)]
        named = [(role, value) for role, value in named if value is not None]
        for role, value in named:
            if value.const_value is None:
                return check_result.fail(f"{role} is not a constant", value)
        fc1, fc2 = tuple(fc1_weight.const_value.shape), tuple(fc2_weight.const_value.shape)
        if len(fc1) != 2:
            return check_result.fail(f"fc1 weight shape {fc1} is not 2-D [D, H]", fc1_weight)
        if fc2 != (fc1[1], fc1[0]):
            return check_result.fail(f"fc2 weight shape {fc2} is not [H, D] = {(fc1[1], fc1[0])}", fc2_weight)
        biases = [tuple(value.const_value.shape) for _, value in named[2:]]
        if biases not in ([], [(fc1[1],), (fc1[0],)]):
            return check_result.fail(f"bias shapes {biases} are not [H], [D] = {[(fc1[1],), (fc1[0],)]}", fc1_bias)
        return check_result

    def rewrite(self, op, x, fc1_weight, fc2_weight, fc1_bias=None, fc2_bias=None, activated=None, **_):
        state = self.state
        fc1 = fc1_weight.const_value.numpy().T
        fc2 = fc2_weight.const_value.numpy()
        key, label, partition_in = state.new_partition(fc2_weight, x, fc1.shape[0])
        bias1 = fc1_bias.const_value.numpy() if fc1_bias is not None else np.zeros(fc1.shape[0], fc1.dtype)
        bias2 = fc2_bias.const_value.numpy() if fc2_bias is not None else np.zeros(fc2.shape[1], fc2.dtype)
        output_norm = np.linalg.norm(fc2, axis=1)
        static = np.linalg.norm(fc1, axis=1) * output_norm
        # The graph-wide mask even with per_ffn_token_mask: no supported family has a plain
        # MLP, so none is exported with prefill_skip (kept as the pass has always done).
        arguments = [
            x, state.token_mask, partition_in, state.config,
            _initializer(op, label, "fc1_rows", fc1), _initializer(op, label, "fc1_bias", bias1),
            _initializer(op, label, "fc2_rows", fc2), _initializer(op, label, "fc2_bias", bias2),
            _initializer(op, label, "static_score", static.astype(fc2.dtype)),
            _initializer(op, label, "output_norm", output_norm.astype(fc2.dtype)),
        ]  # fmt: skip
        attributes = {"approximate": _approximate(activated)} if self.activation == "gelu" else {}
        y, partition_out = getattr(op, self.OPS[self.activation])(
            *arguments, _domain=DOMAIN, _version=VERSION, _outputs=2, **attributes
        )
        state.record(key, partition_in, partition_out)
        return y


def routed_expert_rules(state: PopRewriteState) -> pattern.RewriteRuleSet:
    """Phase 1: routed experts. Their pattern contains the dense FFN's, which would
    otherwise claim each expert without its routing weight. ``commute=True``: the
    routing product matches in either operand order."""
    rules = [GatedFFNRule.rule(state, "silu", routed=True), GatedFFNRule.rule(state, "gelu", routed=True)]
    return pattern.RewriteRuleSet(rules, commute=True)


def dense_ffn_rules(state: PopRewriteState) -> pattern.RewriteRuleSet:
    """Phase 2: dense gated FFNs, then plain MLPs (biased before bias-free, so a biased
    MLP is claimed whole). ``commute=True``: bias adds match in either operand order."""
    rules = [
        GatedFFNRule.rule(state, "silu"),
        GatedFFNRule.rule(state, "gelu"),
        PlainMLPRule.rule(state, "gelu", bias=True),
        PlainMLPRule.rule(state, "relu", bias=True),
        PlainMLPRule.rule(state, "gelu", bias=False),
        PlainMLPRule.rule(state, "relu", bias=False),
    ]
    return pattern.RewriteRuleSet(rules, commute=True)
