"""The ORT-fusion rule classes (passes/ort_fusions.py) on tiny hand-built graphs.

Each rule rewrites what it is for and the rewritten graph computes the same in ONNX
Runtime; each leaves alone what it must not fuse, and its check says why (asserted
through the rewriter's match tracer).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxscript.rewriter import MatchingTracer, MatchStatus, pattern

from popc.passes.ort_fusions import (
    MICROSOFT,
    OrtFusionPass,
    PackedQKVRule,
    SkipRMSNormRule,
    TiedLmHeadRule,
    embedding_tables,
    ort_fusion_passes,
    tied_head_rule,
)

D, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 8, 2, 1, 16, 11
FLOAT = ir.DataType.FLOAT


class Builder:
    def __init__(self, seed: int = 0) -> None:
        self.tape = ir.tape.Tape()
        self.rng = np.random.default_rng(seed)
        self.inputs: list[ir.Value] = []

    def input(self, name: str, shape: list, dtype: ir.DataType = FLOAT) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.inputs.append(value)
        return value

    def weight(self, name: str, *shape: int, array: np.ndarray | None = None) -> ir.Value:
        array = (self.rng.standard_normal(shape) * 0.5).astype(np.float32) if array is None else array
        return self.tape.initializer(ir.tensor(array, name=name))

    def op(self, op_type: str, *inputs, domain: str = "", outputs: int = 1, **attributes):
        if outputs == 1:
            return self.tape.op(op_type, list(inputs), attributes=attributes or None, domain=domain)
        return self.tape.op_multi_out(op_type, list(inputs), attributes=attributes or None, domain=domain,
                                      num_outputs=outputs)  # fmt: skip

    def model(self, *outputs: ir.Value) -> ir.Model:
        for i, value in enumerate(outputs):
            value.name, value.type = f"y{i}", ir.TensorType(FLOAT)
        graph = ir.Graph(self.inputs, list(outputs), nodes=self.tape.nodes, initializers=self.tape.initializers,
                         opset_imports={"": 20, MICROSOFT: 1})  # fmt: skip
        return ir.Model(graph, ir_version=10)


def run(model: ir.Model, feed: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})


def refusals(model: ir.Model, rules: list[pattern.RewriteRule]) -> list[str]:
    tracer = MatchingTracer()
    assert pattern.RewriteRuleSet(rules).apply_to_model(model, tracer=tracer) == 0
    return sorted({
        info.match_result.reason
        for infos in tracer.best_matches_map.values()
        for info in infos
        if info.status == MatchStatus.CONDITION_FAILED
    })  # fmt: skip


def attention_block(bias: bool = False, wq_shape=(D, HEADS * HEAD_DIM), q_bias=(HEADS * HEAD_DIM,), qk_norm=False,
                    constant_wq=True, query_out=False, kv_out=False):  # fmt: skip
    b = Builder()
    x = b.input("x", ["b", "s", D])
    rest = [
        b.input("past_key", ["b", KV_HEADS, "p", HEAD_DIM]), b.input("past_value", ["b", KV_HEADS, "p", HEAD_DIM]),
        b.input("seqlens_k", ["b"], ir.DataType.INT32), b.input("total", [], ir.DataType.INT32),
        b.input("cos", [16, HEAD_DIM // 2]), b.input("sin", [16, HEAD_DIM // 2]),
    ]  # fmt: skip
    attention_bias = b.input("attention_bias", ["b", 1, "s", "t"])
    wq = b.weight("layers.0.q_proj.weight", *wq_shape) if constant_wq else b.input("wq", list(wq_shape))
    projections = [b.op("MatMul", x, wq)]
    projections += [b.op("MatMul", x, b.weight(f"layers.0.{n}_proj.weight", D, KV_HEADS * HEAD_DIM)) for n in "kv"]
    if bias:
        shapes = [q_bias, (KV_HEADS * HEAD_DIM,), (KV_HEADS * HEAD_DIM,)]
        projections = [b.op("Add", p, b.weight(f"layers.0.{n}_proj.bias", *s)) for p, n, s in zip(projections, "qkv", shapes)]
    if qk_norm:
        projections[0] = b.op("SimplifiedLayerNormalization", projections[0], b.weight("q_norm", HEADS * HEAD_DIM))
    out, key, value = b.op("GroupQueryAttention", *projections, *rest, None, attention_bias, domain=MICROSOFT,
                           outputs=3, num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1)  # fmt: skip
    if kv_out:  # q, k and v read too, as POP-prefill's deep layers under KV eviction do
        return b.model(out, key, value, *projections)
    if query_out:  # the queries as an output too, as a KV-eviction export reads them
        return b.model(out, key, value, projections[0])
    return b.model(out, key, value)


def attention_feed(rng) -> dict:
    past, seq, batch = 2, 3, 1  # ORT: batch 1 when a multi-token step has a past
    angles = np.arange(16)[:, None] * (1.0 / 10000 ** (np.arange(HEAD_DIM // 2) / (HEAD_DIM // 2)))
    return {
        "x": rng.standard_normal((batch, seq, D)).astype(np.float32),
        "past_key": rng.standard_normal((batch, KV_HEADS, past, HEAD_DIM)).astype(np.float32),
        "past_value": rng.standard_normal((batch, KV_HEADS, past, HEAD_DIM)).astype(np.float32),
        "seqlens_k": np.full(batch, past + seq - 1, np.int32), "total": np.array(past + seq, np.int32),
        "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
        "attention_bias": np.zeros((batch, 1, seq, past + seq), np.float32),
    }  # fmt: skip


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_packed_qkv_rule_packs_and_computes_the_same(bias):
    feed = attention_feed(np.random.default_rng(1))
    expected = run(attention_block(bias), feed)
    model = attention_block(bias)
    fusion = OrtFusionPass()
    fusion(model)
    assert fusion.counts["packed_qkv"] == 1
    (gqa,) = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert gqa.inputs[1] is None and gqa.inputs[2] is None and gqa.attributes.get_int("do_rotary") == 1
    assert [n.op_type for n in model.graph].count("MatMul") == 1
    assert "layers.0.qkv_proj.weight" in model.graph.initializers
    for got, want in zip(run(model, feed), expected):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("read", ["query", "qkv"])
def test_packed_qkv_rule_packs_when_projections_are_read_too(bias, read):
    # A KV-eviction export also outputs q (window_query.{l}); POP-prefill's deep layers under
    # eviction read k and v too: packed, and what is read sliced back out.
    options = {"query_out": True} if read == "query" else {"kv_out": True}
    feed = attention_feed(np.random.default_rng(2))
    expected = run(attention_block(bias, **options), feed)
    model = attention_block(bias, **options)
    fusion = OrtFusionPass()
    fusion(model)
    assert fusion.counts["packed_qkv"] == 1
    assert [n.op_type for n in model.graph].count("MatMul") == 1
    assert [v.producer().op_type for v in model.graph.outputs[3:]] == ["Slice"] * (1 if read == "query" else 3)
    for got, want in zip(run(model, feed), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    ("block", "rules", "reason"),
    [
        ({"constant_wq": False}, [PackedQKVRule.rule()], "q weight is not a constant"),
        ({"wq_shape": (1, D, HEADS * HEAD_DIM)}, [PackedQKVRule.rule()],
         "q/k/v weight shapes [(1, 8, 32), (8, 16), (8, 16)] are not all 2-D"),
        ({"bias": True, "q_bias": (1,)}, PackedQKVRule.rule(bias=True).commute(), "q bias shape (1,) is not [32]"),
    ],
    ids=["activation-weight", "3d-weight", "bias-shape"],
)  # fmt: skip
def test_packed_qkv_rule_refuses_with_a_reason(block, rules, reason):
    assert refusals(attention_block(**block), rules) == [reason]


def test_packed_qkv_rule_leaves_a_qk_norm_alone():
    model = attention_block(qk_norm=True)
    tracer = MatchingTracer()
    assert pattern.RewriteRuleSet([PackedQKVRule.rule()]).apply_to_model(model, tracer=tracer) == 0
    statuses = {info.status for infos in tracer.best_matches_map.values() for info in infos}
    assert MatchStatus.SUCCESS not in statuses and MatchStatus.CONDITION_FAILED not in statuses


def norm_block(last: bool, constant_addend: bool = False, constant_gamma: bool = True):
    b = Builder()
    a = b.input("a", ["b", "s", D])
    addend = b.weight("bias", D) if constant_addend else b.input("b", ["b", "s", D])
    gamma = b.weight("gamma", D) if constant_gamma else b.input("gamma", [D])
    residual = b.op("Add", a, addend)
    normalized = b.op("SimplifiedLayerNormalization", residual, gamma, epsilon=1e-6, axis=-1)
    if last:
        return b.model(normalized)
    return b.model(normalized, b.op("Add", residual, b.input("c", ["b", "s", D])))


@pytest.mark.parametrize("last", [False, True], ids=["residual-used", "last"])
def test_skip_rms_norm_rule_fuses_and_computes_the_same(last):
    rng = np.random.default_rng(2)
    feed = {name: rng.standard_normal((2, 3, D)).astype(np.float32) for name in ("a", "b", "c")}
    expected = run(norm_block(last), feed)
    model = norm_block(last)
    fusion = OrtFusionPass()
    fusion(model)
    assert fusion.counts["skip_rms_norm"] == 1
    (node,) = [n for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert node.attributes.get_float("epsilon") == pytest.approx(1e-6)
    assert node.outputs[1].name == "" and node.outputs[2].name == ""  # training statistics omitted
    assert [n.op_type for n in model.graph].count("Add") == (0 if last else 1)  # only the next residual add
    for got, want in zip(run(model, feed), expected):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    ("block", "reason"),
    [({"constant_addend": True}, "the second addend is a constant, not a residual activation"),
     ({"constant_gamma": False}, "gamma is not a constant")],
    ids=["constant-addend", "gamma-input"],
)  # fmt: skip
def test_skip_rms_norm_rule_refuses_with_a_reason(block, reason):
    rules = [SkipRMSNormRule.rule(residual_used=True), SkipRMSNormRule.rule(residual_used=False)]
    assert refusals(norm_block(last=True, **block), rules) == [reason]


def head_block(tied: bool):
    b = Builder()
    ids = b.input("ids", ["b", "s"], ir.DataType.INT64)
    table = (b.rng.standard_normal((VOCAB, D)) * 0.5).astype(np.float32)
    hidden = b.op("Gather", b.weight("embed_tokens.weight", array=table), ids)
    head = table.T.copy() if tied else (b.rng.standard_normal((D, VOCAB))).astype(np.float32)
    return b.model(b.op("MatMul", hidden, b.weight("lm_head.weight", array=head)))


def test_tied_lm_head_rule_reads_the_embedding_table():
    feed = {"ids": np.array([[1, 4, 10], [0, 2, 3]], np.int64)}
    expected = run(head_block(tied=True), feed)
    model = head_block(tied=True)
    fusion = OrtFusionPass()
    fusion(model)
    assert fusion.counts["tied_lm_head"] == 1
    (node,) = [n for n in model.graph if n.op_type == "FusedMatMul"]
    assert node.inputs[1].name == "embed_tokens.weight" and node.attributes.get_int("transB") == 1
    assert "lm_head.weight" not in model.graph.initializers
    np.testing.assert_allclose(run(model, feed)[0], expected[0], atol=1e-5)


def test_tied_lm_head_rule_refuses_an_untied_head():
    model = head_block(tied=False)
    rule = TiedLmHeadRule.rule(embedding_tables(model.graph))
    assert refusals(model, [rule]) == ["head weight is not the transpose of an embedding table"]


def test_no_embedding_table_no_tied_head_rule():
    model = norm_block(last=True)
    assert embedding_tables(model.graph) == [] and tied_head_rule(model.graph) is None
    fusion = ort_fusion_passes()[0]
    fusion(model)
    assert "tied_lm_head" not in fusion.counts
