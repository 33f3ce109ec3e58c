"""Weight quantization: block-quantized int4 / int8 weights, as onnxscript rule classes.

Run last, after POP and ONNX Runtime's fusions, with one ``QuantizeState`` the rules share
(a weight used twice, the tied embedding and LM head, is quantized once):

* ``LinearToMatMulNBits`` -- ``MatMul(x, W)`` with ``W [K, N]`` a constant, or the LM head's
  ``com.microsoft.FusedMatMul(x, W, transB=1)`` with ``W [N, K]`` -> ``com.microsoft.MatMulNBits``
  (packed QKV, output projections, dense FFNs, the LM head);
* ``EmbeddingToGatherBlockQuantized`` -- ``Gather(E, ids)`` whose table is also a quantized
  LM head (tied embeddings) -> ``com.microsoft.GatherBlockQuantized`` over the LM head's own
  packed weights (stored once, as onnxruntime-genai does);
* ``PopFfnToQuantized`` -- ``ai.popc.PopSwiGLU`` / ``PopGeGLU`` -> ``PopSwiGLUQ`` / ``PopGeGLUQ``
  (``templates/pop_ffn_quant.py``), each channel row quantized along the hidden dimension so
  that a kept channel is still one contiguous read; ``output_norm`` becomes the norms of the
  dequantized down rows.

Left as they are: MatMuls whose K is not a multiple of the block, routers and other
projections narrower than one block (tiny, and they decide discrete routing), untied
embeddings (a decode step reads one row per token), POP's plain-MLP ops (no family uses them).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter import MatchResult, pattern

from popc.passes.pop_online import add_functions
from popc.quantize import QuantScheme, dequantize_rows, quantize_rows
from popc.templates.ops import DOMAIN
from popc.templates.pop_ffn import POP_FUNCTIONS
from popc.templates.pop_ffn_quant import POP_QUANT_FUNCTIONS

MSFT = "com.microsoft"


@dataclasses.dataclass
class QuantizedWeight:
    packed: ir.Value  # uint8 [N, K / block, block * bits / 8] (MatMulNBits' B)
    scales: ir.Value  # float32 [N, K / block]
    rows: int
    columns: int


@dataclasses.dataclass
class QuantizeState:
    """What the rules of one pass share: the scheme, and each weight quantized so far."""

    scheme: QuantScheme
    # id of the float weight value -> its quantized rows (rows = output features).
    done: dict[int, QuantizedWeight] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def quantized(self, op, weight: ir.Value, rows: np.ndarray, name: str) -> QuantizedWeight:
        """The quantized ``rows [N, K]`` of ``weight`` (made once per weight)."""
        if id(weight) not in self.done:
            packed, scales = quantize_rows(rows, self.scheme)
            n, k = rows.shape
            blocks = k // self.scheme.block_size
            packed = packed.reshape(n, blocks, self.scheme.block_size * self.scheme.bits // 8)
            self.done[id(weight)] = QuantizedWeight(
                op.initializer(ir.tensor(packed, name=f"{name}.q{self.scheme.bits}"), name=f"{name}.q{self.scheme.bits}"),
                op.initializer(ir.tensor(scales, name=f"{name}.scales"), name=f"{name}.scales"),
                n,
                k,
            )
        return self.done[id(weight)]

    def count(self, rule: str) -> None:
        self.counts[rule] = self.counts.get(rule, 0) + 1


def _float_matrix(value: ir.Value | None) -> np.ndarray | None:
    tensor = None if value is None else value.const_value
    if tensor is None or len(tensor.shape) != 2 or tensor.dtype != ir.DataType.FLOAT:
        return None
    return tensor.numpy()


def _weight_name(value: ir.Value) -> str:
    return (value.name or "weight").replace("::", ".").replace("/", ".").strip(".")


class LinearToMatMulNBits(pattern.RewriteRuleClassBase):
    """``MatMul(x, W [K, N])`` or ``FusedMatMul(x, W [N, K], transB=1)`` -> ``MatMulNBits``."""

    def __init__(self, state: QuantizeState, fused: bool = False) -> None:
        super().__init__(name="FusedMatMulToMatMulNBits" if fused else "MatMulToMatMulNBits")
        self.state = state
        self.fused = fused

    def pattern(self, op, x, weight):
        if self.fused:
            return op.FusedMatMul(x, weight, _domain=MSFT, _allow_other_attributes=True, _outputs=["product"])
        return op.MatMul(x, weight)

    def check(self, context, x, weight, product=None, **_) -> MatchResult:
        result = MatchResult()
        matrix = _float_matrix(weight)
        if matrix is None:
            return result.fail("the weight is not a constant float32 matrix", weight)
        if self.fused:
            attributes = product.producer().attributes
            if attributes.get_int("transB", 0) != 1 or attributes.get_int("transA", 0) != 0:
                return result.fail("FusedMatMul is not x @ W^T", product)
            if attributes.get_float("alpha", 1.0) != 1.0:
                return result.fail("FusedMatMul scales its product (alpha != 1)", product)
            n, k = matrix.shape
        else:
            k, n = matrix.shape
        block = self.state.scheme.block_size
        if k % block:
            return result.fail(f"K = {k} is not a multiple of the block size {block}", weight)
        if n < block:
            return result.fail(f"N = {n} is narrower than one block (a router or gate): left in float", weight)
        return result

    def rewrite(self, op, x, weight, **_):
        matrix = weight.const_value.numpy()
        rows = matrix if self.fused else matrix.T
        q = self.state.quantized(op, weight, rows, _weight_name(weight))
        self.state.count(self.name)
        scheme = self.state.scheme
        return op.MatMulNBits(
            x,
            q.packed,
            q.scales,
            _domain=MSFT,
            K=q.columns,
            N=q.rows,
            bits=scheme.bits,
            block_size=scheme.block_size,
            accuracy_level=scheme.accuracy_level,
        )


class EmbeddingToGatherBlockQuantized(pattern.RewriteRuleClassBase):
    """``Gather(E, ids)`` over a table the LM head also reads (quantized) -> ``GatherBlockQuantized``."""

    def __init__(self, state: QuantizeState) -> None:
        super().__init__(name="EmbeddingToGatherBlockQuantized")
        self.state = state

    def pattern(self, op, table, ids):
        return op.Gather(table, ids, _allow_other_attributes=True, _outputs=["rows"])

    def check(self, context, table, ids, rows, **_) -> MatchResult:
        result = MatchResult()
        if rows.producer().attributes.get_int("axis", 0) != 0:
            return result.fail("not a row lookup (axis != 0)", rows)
        if id(table) not in self.state.done:
            return result.fail("the table is not a quantized LM head (untied embeddings stay float)", table)
        return result

    def rewrite(self, op, table, ids, **_):
        q = self.state.done[id(table)]
        scheme = self.state.scheme
        flat = op.Reshape(q.packed, op.Constant(value_ints=[q.rows, q.columns * scheme.bits // 8]))
        self.state.count(self.name)
        return op.GatherBlockQuantized(
            flat,
            ids,
            q.scales,
            _domain=MSFT,
            bits=scheme.bits,
            block_size=scheme.block_size,
            gather_axis=0,
            quantize_axis=1,
        )


class PopFfnToQuantized(pattern.RewriteRuleClassBase):
    """``PopSwiGLU`` / ``PopGeGLU`` -> their ``Q`` twins on rows quantized along H."""

    OPS: ClassVar[tuple[str, ...]] = ("PopSwiGLU", "PopGeGLU")

    def __init__(self, state: QuantizeState, op_type: str) -> None:
        if op_type not in self.OPS:
            raise ValueError(f"op_type must be one of {self.OPS}, not {op_type!r}")
        super().__init__(name=f"{op_type}ToQuantized")
        self.state = state
        self.op_type = op_type

    def pattern(self, op, x, mask, partition, config, gate, up, down, static, output_norm):
        return getattr(op, self.op_type)(
            x, mask, partition, config, gate, up, down, static, output_norm,
            _domain=DOMAIN, _allow_other_attributes=True, _outputs=["y", "partition_out"],
        )  # fmt: skip

    def check(self, context, gate, up, down, **_) -> MatchResult:
        result = MatchResult()
        block = self.state.scheme.block_size
        for weight in (gate, up, down):
            matrix = _float_matrix(weight)
            if matrix is None:
                return result.fail("a POP weight is not a constant float32 matrix", weight)
            if matrix.shape[1] % block:
                return result.fail(f"hidden size {matrix.shape[1]} is not a multiple of the block {block}", weight)
        return result

    def rewrite(self, op, x, mask, partition, config, gate, up, down, static, output_norm, y, partition_out, **_):
        scheme = self.state.scheme
        inputs = [x, mask, partition, config]
        for weight in (gate, up, down):
            rows = weight.const_value.numpy()
            packed, scales = quantize_rows(rows, scheme)
            base = weight.name[: -len("_rows")] if weight.name.endswith("_rows") else weight.name
            inputs.append(op.initializer(ir.tensor(packed, name=weight.name), name=weight.name))
            inputs.append(op.initializer(ir.tensor(scales, name=f"{base}_scales"), name=f"{base}_scales"))
        # The output-aware score of the rows the model runs: the norms of the dequantized down rows.
        restored = dequantize_rows(packed, scales, scheme, rows.shape[1])
        norms = np.linalg.norm(restored, axis=1).astype(rows.dtype)
        output_norm = op.initializer(ir.tensor(norms, name=output_norm.name), name=output_norm.name)
        attributes = {k: v.value for k, v in y.producer().attributes.items()}
        self.state.count(self.name)
        outputs = getattr(op, self.op_type + "Q")(
            *inputs,
            static,
            output_norm,
            _domain=DOMAIN,
            _outputs=2,
            bits=scheme.bits,
            block_size=scheme.block_size,
            accuracy_level=scheme.accuracy_level,
            **attributes,
        )
        for new, old in zip(outputs, (y, partition_out)):  # graph outputs keep their declared types
            new.type, new.shape = old.type, old.shape
        return outputs


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Quantize every dense linear layer, the tied embedding and every POP FFN.

    After the call ``counts`` says how many nodes each rule rewrote.
    """

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__()
        self.scheme = scheme
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        state = QuantizeState(self.scheme)
        rules = [PopFfnToQuantized.rule(state, op_type) for op_type in PopFfnToQuantized.OPS]
        rules += [LinearToMatMulNBits.rule(state, fused=True), LinearToMatMulNBits.rule(state)]
        rewriter.rewrite(model, pattern_rewrite_rules=pattern.RewriteRuleSet(rules))
        # The embedding after the LM head: it reuses the head's quantized weights.
        embedding = pattern.RewriteRuleSet([EmbeddingToGatherBlockQuantized.rule(state)])
        rewriter.rewrite(model, pattern_rewrite_rules=embedding)
        if state.counts.get("PopSwiGLUToQuantized") or state.counts.get("PopGeGLUToQuantized"):
            # The rewriter drops functions no node calls, so the helpers the Q ops share with
            # the float ops (PopPartition, PopSelect, ...) are added back with them.
            add_functions(model, [*POP_FUNCTIONS, *POP_QUANT_FUNCTIONS], domains=(DOMAIN, MSFT))
        model.opset_imports.setdefault(MSFT, 1)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        self.counts = state.counts
        if not any(state.counts.values()):
            raise ValueError("quantization found no weight to quantize in this graph")
        return ir.passes.PassResult(model, modified=True)

