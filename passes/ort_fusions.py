"""ORT fusions over the traced decoder: packed QKV and skip-add-RMSNorm.

The decoder traces attention as one ``com.microsoft.GroupQueryAttention`` node and
RMSNorm as ``SimplifiedLayerNormalization`` (``popc/ort_contrib.py``). Two rules then
fold what stays around them into ONNX Runtime's fused forms (onnxscript rewriter):

* **packed QKV** ``GroupQueryAttention(MatMul(x, Wq)[+bq], MatMul(x, Wk)[+bk],
  MatMul(x, Wv)[+bv], ...)`` -> ``GroupQueryAttention(MatMul(x, [Wq|Wk|Wv])[+b], -, -, ...)``:
  one weight read and one GEMM instead of three. Applies when the three weights (and
  biases) are initializers; not when a per-head norm (Gemma's QK-norm) sits between the
  projection and the attention, since that is no longer three MatMuls feeding it.
* **skip-add-RMSNorm** ``SimplifiedLayerNormalization(Add(a, b), gamma)`` ->
  ``SkipSimplifiedLayerNormalization(a, b, gamma)``, whose fourth output is the residual
  sum ``a + b`` for the Add's other consumers (the next residual add). Applies when neither
  addend is a constant (a residual add sums two activations of one shape).

* **tied LM head** ``MatMul(h, W)`` where ``W`` is the transpose of the embedding table
  a ``Gather`` reads -> ``FusedMatMul(h, E, transB=1)`` over that table: the tracer
  constant-folds ``E^T`` into a second copy of the largest weight; this stores it once.

Neither touches the FFN, so the POP-online pass (``passes/pop_online.py``) matches the
same subgraphs before or after these rules.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

MICROSOFT = "com.microsoft"


def _gqa(op, query, key, value, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, attention_bias):
    return op.GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, None, attention_bias,
        _domain=MICROSOFT, _allow_other_attributes=True, _outputs=["attention", "present_key", "present_value"],
    )  # fmt: skip


def qkv_pattern(op, x, wq, wk, wv, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, attention_bias):
    q, k, v = op.MatMul(x, wq), op.MatMul(x, wk), op.MatMul(x, wv)
    return _gqa(op, q, k, v, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, attention_bias)


def qkv_bias_pattern(op, x, wq, wk, wv, bq, bk, bv, past_key, past_value, seqlens_k, total, cos_cache, sin_cache,
                     attention_bias):  # fmt: skip
    q = op.Add(op.MatMul(x, wq), bq)
    k = op.Add(op.MatMul(x, wk), bk)
    v = op.Add(op.MatMul(x, wv), bv)
    return _gqa(op, q, k, v, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, attention_bias)


def _constants(*values: ir.Value | None) -> list[np.ndarray] | None:
    arrays = [v.const_value.numpy() if v is not None and v.const_value is not None else None for v in values]
    return None if any(a is None for a in arrays) else arrays


def weights_pack(context, x, wq, wk, wv, bq=None, bk=None, bv=None, **_) -> bool:
    """Three 2-D weights [D, *] on the same D (and 1-D biases matching them), all constants."""
    weights = _constants(wq, wk, wv)
    if weights is None or any(w.ndim != 2 for w in weights) or len({w.shape[0] for w in weights}) != 1:
        return False
    if bq is None:
        return True
    biases = _constants(bq, bk, bv)
    return biases is not None and all(b.shape == (w.shape[1],) for b, w in zip(biases, weights))


def _packed(op, name: str, arrays: list[np.ndarray], axis: int) -> ir.Value:
    return op.initializer(ir.tensor(np.ascontiguousarray(np.concatenate(arrays, axis=axis)), name=name))


def pack_qkv(op, x, wq, wk, wv, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, attention_bias,
             attention, bq=None, bk=None, bv=None, **_):  # fmt: skip
    stem = wq.name.rsplit("q_proj", 1)[0] if wq.name and "q_proj" in wq.name else f"{attention.name}/"
    qkv = op.MatMul(x, _packed(op, f"{stem}qkv_proj.weight", _constants(wq, wk, wv), axis=1))
    if bq is not None:
        qkv = op.Add(qkv, _packed(op, f"{stem}qkv_proj.bias", _constants(bq, bk, bv), axis=0))
    attributes = {name: attr.value for name, attr in attention.producer().attributes.items()}
    return op.GroupQueryAttention(
        qkv, None, None, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, None, attention_bias,
        _domain=MICROSOFT, _outputs=3, **attributes,
    )  # fmt: skip


def skip_rms_norm_pattern(op, a, b, gamma):
    residual = op.Add(a, b)
    normalized = op.SimplifiedLayerNormalization(residual, gamma, _allow_other_attributes=True, _outputs=["normalized"])
    return normalized, residual


def skip_rms_norm_last_pattern(op, a, b, gamma):
    residual = op.Add(a, b)
    return op.SimplifiedLayerNormalization(residual, gamma, _allow_other_attributes=True, _outputs=["normalized"])


def is_residual_add(context, a, b, gamma, **_) -> bool:
    """Two computed activations (no constant addend that could broadcast) and a 1-D gamma.
    Shapes are often unknown here: shape inference stops at the contrib ops."""
    if a.const_value is not None or b.const_value is not None:
        return False
    if a.shape is not None and b.shape is not None and a.shape.rank() != b.shape.rank():
        return False
    return gamma.const_value is not None and gamma.const_value.shape.rank() == 1


def _epsilon(normalized: ir.Value) -> float:
    attribute = normalized.producer().attributes.get("epsilon")
    return attribute.value if attribute is not None else 1e-5


def skip_rms_norm(op, a, b, gamma, normalized, **_):
    out, _mean, _inv_std, residual = op.SkipSimplifiedLayerNormalization(
        a, b, gamma, _domain=MICROSOFT, _outputs=4, epsilon=_epsilon(normalized)
    )
    return out, residual


def skip_rms_norm_last(op, a, b, gamma, normalized, **_):
    return op.SkipSimplifiedLayerNormalization(a, b, gamma, _domain=MICROSOFT, _outputs=1, epsilon=_epsilon(normalized))


PACK_QKV_RULES = [
    pattern.RewriteRule(qkv_pattern, pack_qkv, weights_pack, name="PackedQKV"),
    # Linear's bias may come first or second in the traced Add.
    *pattern.RewriteRule(qkv_bias_pattern, pack_qkv, weights_pack, name="PackedQKVBias").commute(),
]
SKIP_RMS_NORM_RULES = [
    pattern.RewriteRule(skip_rms_norm_pattern, skip_rms_norm, is_residual_add, name="SkipRMSNorm"),
    pattern.RewriteRule(skip_rms_norm_last_pattern, skip_rms_norm_last, is_residual_add, name="SkipRMSNormLast"),
]


def tied_head_pattern(op, hidden, head_weight):
    return op.MatMul(hidden, head_weight)


def tied_head_rule(graph: ir.Graph) -> pattern.RewriteRule | None:
    """The tied-LM-head rule for ``graph``'s embedding tables (None if it has none)."""
    tables = [
        node.inputs[0]
        for node in graph
        if node.op_type == "Gather" and node.domain == "" and node.inputs[0].const_value is not None
        and node.inputs[0].const_value.shape.rank() == 2
    ]  # fmt: skip
    if not tables:
        return None
    tied: dict[int, ir.Value] = {}

    def is_transposed_table(context, hidden, head_weight, **_) -> bool:
        weight = head_weight.const_value
        if weight is None or weight.shape.rank() != 2:
            return False
        for table in tables:
            if tuple(table.shape) == tuple(reversed(weight.shape)) and np.array_equal(
                table.const_value.numpy().T, weight.numpy()
            ):
                tied[id(head_weight)] = table
                return True
        return False

    def read_table(op, hidden, head_weight, **_):
        return op.FusedMatMul(hidden, tied[id(head_weight)], _domain=MICROSOFT, transB=1, alpha=1.0)

    return pattern.RewriteRule(tied_head_pattern, read_table, is_transposed_table, name="TiedLmHead")


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
