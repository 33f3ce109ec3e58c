"""The POP-online rule classes (passes/pop_rules.py) on tiny hand-built graphs.

Each rule rewrites the FFN it is for, and the rewritten graph runs in ONNX Runtime
and equals the dense graph at a prefill and, with every channel retained, at a decode
step. Attention-like MatMuls (activation x activation), weights of mismatched shapes,
Qwen-MoE's shared expert and non-expert products are left alone, and the rule's
check says why (asserted through the rewriter's match tracer or by calling it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxscript import rewriter
from onnxscript.rewriter import MatchingTracer, MatchResult, MatchStatus, pattern

from popc.passes.pop_online import PopOnlinePass, PopRewriteState
from popc.passes.pop_rules import GatedFFNRule, PlainMLPRule, check_gated_weights, dense_ffn_rules

D, H = 8, 12
FLOAT, INT64 = ir.DataType.FLOAT, ir.DataType.INT64
ALL_RETAINED = np.array([H, 0, 0, 0], np.int64)  # pop_config: every channel retained, no candidates


class Builder:
    """A tiny graph with the inputs POP needs (input_ids, attention_mask) and ``x`` [b, s, D]."""

    def __init__(self, seed: int = 0) -> None:
        self.tape = ir.tape.Tape()
        self.rng = np.random.default_rng(seed)
        self.inputs = [
            ir.Value(name="input_ids", type=ir.TensorType(INT64), shape=ir.Shape(["b", "s"])),
            ir.Value(name="attention_mask", type=ir.TensorType(INT64), shape=ir.Shape(["b", "t"])),
            ir.Value(name="x", type=ir.TensorType(FLOAT), shape=ir.Shape(["b", "s", D])),
        ]
        self.x = self.inputs[2]

    def input(self, name: str, shape: list) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(FLOAT), shape=ir.Shape(shape))
        self.inputs.append(value)
        return value

    def weight(self, name: str, *shape: int) -> ir.Value:
        array = (self.rng.standard_normal(shape) * 0.5).astype(np.float32)
        return self.tape.initializer(ir.tensor(array, name=name))

    def op(self, op_type: str, *inputs: ir.Value, name: str | None = None, **attributes) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attributes=attributes or None, name=name)

    def model(self, y: ir.Value) -> ir.Model:
        y.name, y.type = "y", ir.TensorType(FLOAT)
        graph = ir.Graph(
            self.inputs, [y], nodes=self.tape.nodes, initializers=self.tape.initializers, opset_imports={"": 20}
        )
        return ir.Model(graph, ir_version=10)


def gated_ffn(b: Builder, activation: str = "silu", prefix: str = "/model/layers.0/mlp", shapes=None, x=None):
    """``down(act(gate(x)) * up(x))`` with weights [D, H], [D, H], [H, D] (or ``shapes``)."""
    x = b.x if x is None else x
    gate_shape, up_shape, down_shape = shapes or ((D, H), (D, H), (H, D))
    g = b.op("MatMul", x, b.weight(f"{prefix}.gate", *gate_shape), name=f"{prefix}/gate_proj/MatMul")
    if activation == "silu":
        activated = b.op("Mul", g, b.op("Sigmoid", g))
    else:
        activated = b.op("Gelu", g, approximate=activation.removeprefix("gelu-"))
    u = b.op("MatMul", x, b.weight(f"{prefix}.up", *up_shape), name=f"{prefix}/up_proj/MatMul")
    return b.op("MatMul", b.op("Mul", activated, u), b.weight(f"{prefix}.down", *down_shape),
                name=f"{prefix}/down_proj/MatMul")  # fmt: skip


def plain_mlp(b: Builder, activation: str, bias: bool, bias_first: bool = False, fc2_shape=(H, D), fc1_bias=(H,)):
    def add(y, bias_value):
        return b.op("Add", bias_value, y) if bias_first else b.op("Add", y, bias_value)

    hidden = b.op("MatMul", b.x, b.weight("fc1.weight", D, H), name="/model/layers.0/mlp/fc1/MatMul")
    if bias:
        hidden = add(hidden, b.weight("fc1.bias", *fc1_bias))
    activated = b.op("Relu", hidden) if activation == "relu" else b.op("Gelu", hidden, approximate="tanh")
    y = b.op("MatMul", activated, b.weight("fc2.weight", *fc2_shape), name="/model/layers.0/mlp/fc2/MatMul")
    return add(y, b.weight("fc2.bias", fc2_shape[1])) if bias else y


def routed_expert(b: Builder, activation: str = "silu", expert: int = 0, route_first: bool = False):
    ffn = gated_ffn(b, activation, prefix=f"/model/layers.0/mlp/experts.{expert}")
    route = b.input(f"route.{expert}", ["b", "s", 1])
    return b.op("Mul", route, ffn) if route_first else b.op("Mul", ffn, route)


def shared_expert(b: Builder):
    """Qwen-MoE's shared expert: ``Sigmoid(shared_gate(x)) * FFN(x)``."""
    gate = b.op("Sigmoid", b.op("MatMul", b.x, b.weight("shared_expert_gate", D, 1)))
    return b.op("Mul", gated_ffn(b, prefix="/model/layers.0/mlp/shared_expert"), gate)


def apply(model: ir.Model, make_rule: Callable[[PopRewriteState], pattern.RewriteRule]) -> PopRewriteState:
    """One rule applied as PopOnlinePass applies its rule sets, then the state wired in."""
    state = PopRewriteState.for_graph(model.graph)
    rewriter.rewrite(model, pattern_rewrite_rules=pattern.RewriteRuleSet([make_rule(state)], commute=True))
    state.add_to_model(model)
    return state


def refusals(model: ir.Model, make_rule: Callable[[PopRewriteState], pattern.RewriteRule]) -> list[str]:
    """The rule's check-failure reasons on ``model`` (the tracer changes nothing)."""
    tracer = MatchingTracer()
    rule_set = pattern.RewriteRuleSet([make_rule(PopRewriteState.for_graph(model.graph))], commute=True)
    assert rule_set.apply_to_model(model, tracer=tracer) == 0
    return [
        info.match_result.reason
        for infos in tracer.best_matches_map.values()
        for info in infos
        if info.status == MatchStatus.CONDITION_FAILED
    ]


def session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feed: dict) -> list[np.ndarray]:
    return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})


def assert_equals_dense(build: Callable[[], ir.Model], pop: ir.Model, routes: int = 0) -> None:
    """POP at a prefill (left padding) and at one decode step with every channel retained
    equals the dense graph; the prefill partition holds all H channels."""
    dense, pop_session = session(build()), session(pop)
    rng = np.random.default_rng(1)
    mask = np.ones((2, 5), np.int64)
    mask[1, :2] = 0
    feed = {"input_ids": np.zeros((2, 5), np.int64), "attention_mask": mask, "pop_config": ALL_RETAINED,
            "x": rng.standard_normal((2, 5, D)).astype(np.float32)}  # fmt: skip
    for e in range(routes):
        feed[f"route.{e}"] = np.where(rng.random((2, 5, 1)) < 0.5, rng.random((2, 5, 1)), 0).astype(np.float32)
    partitions = [i.name for i in pop_session.get_inputs() if i.name.startswith("past_partition.")]
    assert partitions
    feed |= {name: np.zeros((2, 0), np.int64) for name in partitions}
    (expected,), (y, *states) = run(dense, feed), run(pop_session, feed)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    for state in states:
        assert state.shape == (2, H) and all(sorted(row) == list(range(H)) for row in state)

    feed |= {"input_ids": np.zeros((2, 1), np.int64), "attention_mask": np.ones((2, 6), np.int64),
             "x": rng.standard_normal((2, 1, D)).astype(np.float32)}  # fmt: skip
    feed |= dict(zip(partitions, states))
    for e in range(routes):
        feed[f"route.{e}"] = rng.random((2, 1, 1)).astype(np.float32)
    (expected,), (y, *_) = run(dense, feed), run(pop_session, feed)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def assert_output_norm(node: ir.Node) -> None:
    """The node's last input is ``output_norm``: the L2 norm of each down (fc2) row, input 6."""
    norm, down = node.inputs[-1], node.inputs[6]
    assert norm.name.endswith(".output_norm") and down.name.endswith(("down_rows", "fc2_rows"))
    np.testing.assert_allclose(norm.const_value.numpy(), np.linalg.norm(down.const_value.numpy(), axis=1), rtol=1e-6)


GATED = {
    "swiglu": ("silu", "silu", "PopSwiGLU"),
    "geglu-none": ("gelu-none", "gelu", "PopGeGLU"),
    "geglu-tanh": ("gelu-tanh", "gelu", "PopGeGLU"),
}


@pytest.mark.parametrize("case", sorted(GATED))
def test_gated_ffn_rule_rewrites_and_equals_dense(case):
    graph_activation, rule_activation, op_type = GATED[case]

    def build():
        b = Builder()
        return b.model(gated_ffn(b, graph_activation))

    model = build()
    state = apply(model, lambda s: GatedFFNRule.rule(s, rule_activation))
    assert state.channels == {H} and list(state.partitions) == [(0,)]
    (node,) = [n for n in model.graph if n.op_type == op_type]
    assert "MatMul" not in ops(model)
    assert_output_norm(node)
    if op_type == "PopGeGLU":
        assert node.attributes.get_string("approximate") == graph_activation.removeprefix("gelu-")
    assert_equals_dense(build, model)


def test_gated_ffn_rule_leaves_the_other_activation_alone():
    b = Builder()
    model = b.model(gated_ffn(b, "silu"))
    with pytest.raises(ValueError, match="POP found no FFN block"):
        apply(model, lambda s: GatedFFNRule.rule(s, "gelu"))
    assert ops(model).count("MatMul") == 3


@pytest.mark.parametrize("route_first", [False, True], ids=["ffn-times-route", "route-times-ffn"])
@pytest.mark.parametrize("activation", ["silu", "gelu-tanh"])
def test_routed_expert_rule_rewrites_and_equals_dense(activation, route_first):
    def build():
        b = Builder()
        return b.model(routed_expert(b, activation, expert=3, route_first=route_first))

    model = build()
    state = apply(model, lambda s: GatedFFNRule.rule(s, activation.split("-")[0], routed=True))
    assert list(state.partitions) == [(0, 3)]
    assert [i.name for i in model.graph.inputs if i.name.startswith("past_")] == ["past_partition.0.3"]
    assert "MatMul" not in ops(model) and "Where" in ops(model)  # scored on the routed tokens
    assert_equals_dense(build, model, routes=4)


PLAIN = [("gelu", True, False), ("relu", True, False), ("gelu", False, False), ("relu", False, False),
         ("relu", True, True)]  # fmt: skip


@pytest.mark.parametrize(("activation", "bias", "bias_first"), PLAIN, ids=["gelu", "relu", "gelu-no-bias",
                         "relu-no-bias", "relu-bias-first"])  # fmt: skip
def test_plain_mlp_rule_rewrites_and_equals_dense(activation, bias, bias_first):
    def build():
        b = Builder()
        return b.model(plain_mlp(b, activation, bias, bias_first))

    model = build()
    apply(model, lambda s: PlainMLPRule.rule(s, activation, bias=bias))
    assert ("PopReluMLP" if activation == "relu" else "PopGeluMLP") in ops(model)
    assert_output_norm(next(n for n in model.graph if n.domain == "ai.popc"))
    assert "MatMul" not in ops(model) and "Add" not in ops(model)
    assert_equals_dense(build, model)


def test_bias_free_plain_mlp_rule_leaves_a_biased_mlp_alone():
    """The bias-free pattern does not match through the bias adds (the dense set tries
    the biased rule first, which claims the whole block)."""
    b = Builder()
    model = b.model(plain_mlp(b, "relu", bias=True))
    with pytest.raises(ValueError, match="POP found no FFN block"):
        apply(model, lambda s: PlainMLPRule.rule(s, "relu", bias=False))


def test_attention_like_matmuls_are_left_alone():
    """``(silu(x k^T) * (x k^T)) v`` and ``relu(x k^T) v``: activation x activation."""
    b = Builder()
    k, v = b.input("k", ["b", "s", D]), b.input("v", ["b", "s", D])
    keys = b.op("Transpose", k, perm=[0, 2, 1])
    scores = b.op("MatMul", b.x, keys)
    gated = b.op("MatMul", b.op("Mul", b.op("Mul", scores, b.op("Sigmoid", scores)), b.op("MatMul", b.x, keys)), v)
    plain = b.op("MatMul", b.op("Relu", b.op("MatMul", b.x, keys)), v)
    model = b.model(b.op("Add", gated, plain))
    assert refusals(model, lambda s: GatedFFNRule.rule(s, "silu")) == ["gate weight is not a constant"]
    assert refusals(model, lambda s: PlainMLPRule.rule(s, "relu", bias=False)) == ["fc1 weight is not a constant"]
    before = ops(model)
    with pytest.raises(ValueError, match="POP found no FFN block"):
        PopOnlinePass()(model)
    assert ops(model) == before


MISMATCHED = {
    "gate-3d": (((1, D, H), (D, H), (H, D)), "gate weight shape (1, 8, 12) is not 2-D [D, H]"),
    "up": (((D, H), (D, 1), (H, D)), "up weight shape (8, 1) is not the gate's (8, 12)"),
    "down": (((D, H), (D, H), (H, 5)), "down weight shape (12, 5) is not [H, D] = (12, 8)"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHED))
def test_mismatched_gated_weights_are_left_alone(case):
    shapes, reason = MISMATCHED[case]
    b = Builder()
    model = b.model(gated_ffn(b, shapes=shapes))
    assert refusals(model, lambda s: GatedFFNRule.rule(s, "silu")) == [reason]
    with pytest.raises(ValueError, match="POP found no FFN block"):
        PopOnlinePass()(model)


@pytest.mark.parametrize(
    ("fc2_shape", "fc1_bias", "reason"),
    [((H, 5), (H,), "fc2 weight shape (12, 5) is not [H, D] = (12, 8)"),
     ((H, D), (1,), "bias shapes [(1,), (8,)] are not [H], [D] = [(12,), (8,)]")],
    ids=["fc2", "bias"],
)  # fmt: skip
def test_mismatched_plain_mlp_weights_are_left_alone(fc2_shape, fc1_bias, reason):
    b = Builder()
    model = b.model(plain_mlp(b, "gelu", bias=True, fc2_shape=fc2_shape, fc1_bias=fc1_bias))
    assert refusals(model, lambda s: PlainMLPRule.rule(s, "gelu", bias=True)) == [reason]


def test_qwen_moe_shared_expert_stays_dense():
    b = Builder()
    model = b.model(shared_expert(b))
    reason = "product with Sigmoid(gate): Qwen-MoE shared expert stays dense"
    assert refusals(model, lambda s: GatedFFNRule.rule(s, "silu")) == [reason]
    assert refusals(model, lambda s: GatedFFNRule.rule(s, "silu", routed=True)) == [reason]


def test_a_product_without_an_expert_name_is_not_a_routed_expert():
    b = Builder()
    ffn = gated_ffn(b)  # layers.0/mlp, no experts.{e}
    model = b.model(b.op("Mul", ffn, b.input("route.0", ["b", "s", 1])))
    reasons = refusals(model, lambda s: GatedFFNRule.rule(s, "silu", routed=True))
    assert reasons == ["not a routed expert (no experts.{e} name on the down MatMul)"]


def test_moe_block_routes_experts_and_keeps_the_shared_expert_dense():
    """The pass's two phases on a Qwen-MoE-like block: both experts become routed POP
    ops (not claimed by the dense rule without their routing weight), the shared expert
    keeps its three MatMuls, and the block equals the dense one."""

    def build():
        b = Builder()
        experts = b.op("Add", routed_expert(b, expert=0), routed_expert(b, expert=1, route_first=True))
        return b.model(b.op("Add", experts, shared_expert(b)))

    model = build()
    pop = PopOnlinePass()
    pop(model)
    assert pop.layers == [(0, 0), (0, 1)] and pop.channels == H
    assert ops(model).count("PopSwiGLU") == 2 and ops(model).count("MatMul") == 4  # shared expert + its gate
    assert_equals_dense(build, model, routes=2)


def test_dense_rule_set_order_and_names():
    b = Builder()
    names = list(dict.fromkeys(rule.name for rule in dense_ffn_rules(PopRewriteState.for_graph(b.model(b.x).graph))))
    assert names[:2] == ["PopSwiGLU", "PopGeGLU"] and set(names[2:]) == {"PopGeluMLP", "PopReluMLP"}


def test_checks_called_directly_return_match_results():
    def constant(name, *shape):
        return ir.Value(name=name, const_value=ir.tensor(np.zeros(shape, np.float32), name=name))

    gate, up, down = constant("gate", D, H), constant("up", D, H), constant("down", H, D)
    assert check_gated_weights(MatchResult(), gate, up, down)
    failed = check_gated_weights(MatchResult(), gate, ir.Value(name="activation"), down)
    assert not failed and failed.reason == "up weight is not a constant"
    b = Builder()
    state = PopRewriteState.for_graph(b.model(b.x).graph)
    result = PlainMLPRule(state, "relu", bias=False).check(None, x=None, fc1_weight=gate, fc2_weight=constant("w", D, D))
    assert not result and result.reason == "fc2 weight shape (8, 8) is not [H, D] = (12, 8)"
    with pytest.raises(ValueError, match="activation"):
        GatedFFNRule(state, "relu")


def test_the_pass_needs_input_ids_and_attention_mask():
    b = Builder()
    model = b.model(gated_ffn(b))
    model.graph.inputs.pop(0)
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        PopOnlinePass()(model)
