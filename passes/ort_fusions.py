"""ORT fusions over the traced decoder: packed QKV, skip-add-RMSNorm, the tied LM head.

The decoder traces attention as one ``com.microsoft.GroupQueryAttention`` node and
RMSNorm as ``SimplifiedLayerNormalization`` (``popc/ort_contrib.py``). Three onnxscript
rule classes then fold what stays around them into ONNX Runtime's fused forms; each
``check`` returns a ``MatchResult`` that says why it refused a match:

* **packed QKV** (``PackedQKVRule``, with or without biases)
  ``GroupQueryAttention(MatMul(x, Wq)[+bq], MatMul(x, Wk)[+bk], MatMul(x, Wv)[+bv], ...)``
  -> ``GroupQueryAttention(MatMul(x, [Wq|Wk|Wv])[+b], -, -, ...)``: one weight read and
  one GEMM instead of three. Applies when the three weights (and biases) are
  initializers; not when a per-head norm (Gemma's QK-norm) sits between the projection
  and the attention, since that is no longer three MatMuls feeding it. Where the queries
  are read too (a KV-eviction export's ``window_query.{l}``), the ``query_out`` variant
  slices them back out of the packed product; where keys and values are too (POP-prefill's
  deep layers under KV eviction), the ``kv_out`` variant slices all three.
* **skip-add-RMSNorm** (``SkipRMSNormRule``) ``SimplifiedLayerNormalization(Add(a, b), gamma)``
  -> ``SkipSimplifiedLayerNormalization(a, b, gamma)``, whose fourth output is the
  residual sum ``a + b`` for the Add's other consumers (the next residual add). Applies
  when neither addend is a constant (a residual add sums two activations of one shape).
* **tied LM head** (``TiedLmHeadRule``) ``MatMul(h, W)`` where ``W`` is the transpose of
  the embedding table a ``Gather`` reads -> ``FusedMatMul(h, E, transB=1)`` over that
  table: the tracer constant-folds ``E^T`` into a second copy of the largest weight;
  this stores it once.

None touches the FFN, so the POP-online pass (``passes/pop_online.py``) matches the
same subgraphs before or after these rules.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

MICROSOFT = "com.microsoft"


def _gqa(op, query, key, value, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, attention_bias):
    return op.GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, None, attention_bias,
        _domain=MICROSOFT, _allow_other_attributes=True, _outputs=["attention", "present_key", "present_value"],
    )  # fmt: skip


def _constants(*values: ir.Value | None) -> list[np.ndarray] | None:
    arrays = [v.const_value.numpy() if v is not None and v.const_value is not None else None for v in values]
    return None if any(a is None for a in arrays) else arrays


def _packed(op, name: str, arrays: list[np.ndarray], axis: int) -> ir.Value:
    return op.initializer(ir.tensor(np.ascontiguousarray(np.concatenate(arrays, axis=axis)), name=name))


class PackedQKVRule(pattern.RewriteRuleClassBase):
    """Three projections of one ``x`` into a GroupQueryAttention -> one packed MatMul."""

    def __init__(self, bias: bool = False, query_out: bool = False, kv_out: bool = False) -> None:
        suffix = "QKV" if kv_out else "Query" if query_out else ""
        super().__init__(name=("PackedQKVBias" if bias else "PackedQKV") + suffix)
        self.bias = bias
        # KV eviction reads the queries too (``window_query.{l}``): the pattern then also
        # outputs q, which the rewrite slices back out of the packed projection; POP-prefill's
        # deep layers under eviction read k and v too (their prefill-only attention).
        self.query_out = query_out or kv_out
        self.kv_out = kv_out

    def pattern(self, op, x, wq, wk, wv, bq, bk, bv, past_key, past_value, seqlens_k, total, cos_cache, sin_cache,
                attention_bias):  # fmt: skip
        q, k, v = op.MatMul(x, wq), op.MatMul(x, wk), op.MatMul(x, wv)
        if self.bias:
            q, k, v = op.Add(q, bq), op.Add(k, bk), op.Add(v, bv)
        outputs = _gqa(op, q, k, v, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, attention_bias)
        if self.kv_out:
            return (*outputs, q, k, v)
        return (*outputs, q) if self.query_out else outputs

    def check(self, context, x, wq, wk, wv, bq=None, bk=None, bv=None, **_) -> MatchResult:
        """Three 2-D weights [D, *] on the same D (and 1-D biases matching them), all constants."""
        check_result = MatchResult()
        for role, weight in (("q", wq), ("k", wk), ("v", wv)):
            if weight.const_value is None:
                return check_result.fail(f"{role} weight is not a constant", weight)
        weights = _constants(wq, wk, wv)
        if any(w.ndim != 2 for w in weights):
            return check_result.fail(f"q/k/v weight shapes {[w.shape for w in weights]} are not all 2-D", [wq, wk, wv])
        if len({w.shape[0] for w in weights}) != 1:
            return check_result.fail(f"q/k/v weights {[w.shape for w in weights]} do not share D", [wq, wk, wv])
        if not self.bias:
            return check_result
        for role, bias in (("q", bq), ("k", bk), ("v", bv)):
            if bias.const_value is None:
                return check_result.fail(f"{role} bias is not a constant", bias)
        for role, bias, weight in zip("qkv", _constants(bq, bk, bv), weights):
            if bias.shape != (weight.shape[1],):
                return check_result.fail(f"{role} bias shape {bias.shape} is not [{weight.shape[1]}]", [bq, bk, bv])
        return check_result

    def rewrite(self, op, x, wq, wk, wv, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, attention_bias,
                attention, bq=None, bk=None, bv=None, **_):  # fmt: skip
        stem = wq.name.rsplit("q_proj", 1)[0] if wq.name and "q_proj" in wq.name else f"{attention.name}/"
        qkv = op.MatMul(x, _packed(op, f"{stem}qkv_proj.weight", _constants(wq, wk, wv), axis=1))
        if self.bias:
            qkv = op.Add(qkv, _packed(op, f"{stem}qkv_proj.bias", _constants(bq, bk, bv), axis=0))
        attributes = {name: attr.value for name, attr in attention.producer().attributes.items()}
        outputs = op.GroupQueryAttention(
            qkv, None, None, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, None, attention_bias,
            _domain=MICROSOFT, _outputs=3, **attributes,
        )  # fmt: skip
        if not self.query_out:
            return outputs
        widths = [w.const_value.shape[1] for w in ((wq, wk, wv) if self.kv_out else (wq,))]
        starts = np.cumsum([0, *widths])
        parts = [
            op.Slice(qkv, op.Constant(value_ints=[int(a)]), op.Constant(value_ints=[int(b)]), op.Constant(value_ints=[-1]))
            for a, b in zip(starts[:-1], starts[1:])
        ]  # fmt: skip
        return (*outputs, *parts)


class SkipRMSNormRule(pattern.RewriteRuleClassBase):
    """``SimplifiedLayerNormalization(Add(a, b), gamma)`` -> ``SkipSimplifiedLayerNormalization``.

    ``residual_used=True``: the Add's sum also feeds the next residual add, and the fused
    op's fourth output replaces it; ``False``: the last norm, whose sum nothing else reads.
    """

    def __init__(self, residual_used: bool = True) -> None:
        super().__init__(name="SkipRMSNorm" if residual_used else "SkipRMSNormLast")
        self.residual_used = residual_used

    def pattern(self, op, a, b, gamma):
        residual = op.Add(a, b)
        normalized = op.SimplifiedLayerNormalization(
            residual, gamma, _allow_other_attributes=True, _outputs=["normalized"]
        )
        return (normalized, residual) if self.residual_used else normalized

    def check(self, context, a, b, gamma, **_) -> MatchResult:
        """Two computed activations (no constant addend that could broadcast) and a 1-D gamma.
        Shapes are often unknown here: shape inference stops at the contrib ops."""
        check_result = MatchResult()
        for role, addend in (("first", a), ("second", b)):
            if addend.const_value is not None:
                return check_result.fail(f"the {role} addend is a constant, not a residual activation", addend)
        if a.shape is not None and b.shape is not None and a.shape.rank() != b.shape.rank():
            return check_result.fail(f"addends of rank {a.shape.rank()} and {b.shape.rank()} differ", [a, b])
        if gamma.const_value is None:
            return check_result.fail("gamma is not a constant", gamma)
        if gamma.const_value.shape.rank() != 1:
            return check_result.fail(f"gamma shape {tuple(gamma.const_value.shape)} is not 1-D", gamma)
        return check_result

    def rewrite(self, op, a, b, gamma, normalized, **_):
        attribute = normalized.producer().attributes.get("epsilon")
        epsilon = attribute.value if attribute is not None else 1e-5
        if not self.residual_used:
            return op.SkipSimplifiedLayerNormalization(a, b, gamma, _domain=MICROSOFT, _outputs=1, epsilon=epsilon)
        out, _mean, _inv_std, residual = op.SkipSimplifiedLayerNormalization(
            a, b, gamma, _domain=MICROSOFT, _outputs=4, epsilon=epsilon
        )
        return out, residual


class TiedLmHeadRule(pattern.RewriteRuleClassBase):
    """``MatMul(h, W)`` with ``W`` the transpose of an embedding table -> ``FusedMatMul(h, E, transB=1)``.

    ``tables`` are the graph's embedding tables (``embedding_tables(graph)``); the check
    remembers which one each matched head weight transposes, for the rewrite.
    """

    def __init__(self, tables: list[ir.Value]) -> None:
        super().__init__(name="TiedLmHead")
        self.tables = tables
        self._tied: dict[int, ir.Value] = {}

    def pattern(self, op, hidden, head_weight):
        return op.MatMul(hidden, head_weight)

    def check(self, context, hidden, head_weight, **_) -> MatchResult:
        check_result = MatchResult()
        weight = head_weight.const_value
        if weight is None:
            return check_result.fail("head weight is not a constant", head_weight)
        if weight.shape.rank() != 2:
            return check_result.fail(f"head weight shape {tuple(weight.shape)} is not 2-D", head_weight)
        for table in self.tables:
            if tuple(table.shape) == tuple(reversed(weight.shape)) and np.array_equal(
                table.const_value.numpy().T, weight.numpy()
            ):
                self._tied[id(head_weight)] = table
                return check_result
        return check_result.fail("head weight is not the transpose of an embedding table", head_weight)

    def rewrite(self, op, hidden, head_weight, **_):
        return op.FusedMatMul(hidden, self._tied[id(head_weight)], _domain=MICROSOFT, transB=1, alpha=1.0)


def embedding_tables(graph: ir.Graph) -> list[ir.Value]:
    """The 2-D constant tables that ``Gather`` nodes of ``graph`` read: its embeddings."""
    return [
        node.inputs[0]
        for node in graph
        if node.op_type == "Gather" and node.domain == "" and node.inputs[0].const_value is not None
        and node.inputs[0].const_value.shape.rank() == 2
    ]  # fmt: skip


PACK_QKV_RULES = [
    PackedQKVRule.rule(bias=False),
    # Linear's bias may come first or second in the traced Add.
    *PackedQKVRule.rule(bias=True).commute(),
    PackedQKVRule.rule(bias=False, query_out=True),
    *PackedQKVRule.rule(bias=True, query_out=True).commute(),
    PackedQKVRule.rule(bias=False, kv_out=True),
    *PackedQKVRule.rule(bias=True, kv_out=True).commute(),
]
SKIP_RMS_NORM_RULES = [SkipRMSNormRule.rule(residual_used=True), SkipRMSNormRule.rule(residual_used=False)]


def tied_head_rule(graph: ir.Graph) -> pattern.RewriteRule | None:
    """The tied-LM-head rule for ``graph``'s embedding tables (None if it has none)."""
    tables = embedding_tables(graph)
    return TiedLmHeadRule.rule(tables) if tables else None


class OrtFusionPass(ir.passes.InPlacePass):
    """Packed QKV, skip-add-RMSNorm, the tied LM head; records how many of each it applied."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        head = tied_head_rule(model.graph)
        for label, rules in (
            ("packed_qkv", PACK_QKV_RULES),
            ("skip_rms_norm", SKIP_RMS_NORM_RULES),
            ("tied_lm_head", [head] if head else []),
        ):
            if not rules:
                continue
            rule_set = pattern.RewriteRuleSet(rules)
            count = rule_set.apply_to_model(model)
            self.counts[label] = count
            modified |= bool(count)
        if modified:
            ir.passes.common.RemoveUnusedNodesPass()(model)  # and the unpacked weights
            _omit_unused_statistics(model.graph)
        return ir.passes.PassResult(model, modified)


def _omit_unused_statistics(graph: ir.Graph) -> None:
    """SkipSimplifiedLayerNormalization's mean and inv_std_var outputs are for training:
    name them "" (omitted) so ORT does not write them at every call (~25 % of its time)."""
    for node in graph:
        if node.op_type == "SkipSimplifiedLayerNormalization" and node.domain == MICROSOFT:
            for value in node.outputs[1:3]:
                if not value.uses() and not value.is_graph_output():
                    value.name = ""


def ort_fusion_passes() -> list[ir.passes.PassBase]:
    return [OrtFusionPass()]
