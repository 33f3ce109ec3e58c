"""Half precision: the fp32 graph, after every other pass, converted to float16 or bfloat16.

``ConvertDtypePass(dtype)`` rewrites the finished float32 graph in place so that the
half-precision graph is its fp32 twin plus casts:

* **what it matches**: every float32 tensor the graph holds or makes: initializers
  (weights, rotary tables, POP's channel rows and scores), ``Constant`` and
  ``ConstantOfShape`` values, ``Cast(to=FLOAT)`` nodes, float32 graph inputs and outputs
  (the KV cache), and the float32 types recorded on intermediate values;
* **what it puts instead**: the same tensors in ``dtype`` (values past the dtype's range,
  such as the attention bias's ``finfo(float32).min``, are clipped to its largest finite
  magnitude, so a mask stays a mask instead of becoming ``-inf``), ``Cast(to=dtype)``;
  and three casts to float32, where float32 is what the consumer needs:

  - ``logits``: the LM head runs in ``dtype`` (its GEMM accumulates in float32 inside
    MLAS / cuBLAS; a float32 head would need a second float32 copy of the tied embedding
    table, or a cast of the whole table every step) and one ``Cast`` to float32 follows, so
    the output stays float32 for sampling, log-softmax and perplexity;
  - the ``token_mask`` input of every ``ai.popc`` POP op: the kernels take it as float32
    (``templates/pop_ops_cpu.cc``); where the mask is a ``Cast`` of the int64 attention
    mask used only there, that ``Cast`` keeps ``to=FLOAT`` instead of gaining a second one;
  - POP's channel scores and top-k: inside the op bodies (``templates/pop_ffn.py``), which
    cast the activations to float32 before scoring (fp16 underflows the 1e-12 epsilon and
    ONNX TopK has no bfloat16).

* **what stays in float32 inside ONNX Runtime's kernels without a cast**: the norms
  (``SimplifiedLayerNormalization``, ``SkipSimplifiedLayerNormalization``: float32
  statistics) and GroupQueryAttention's softmax. The rotary tables cannot stay float32:
  GroupQueryAttention requires its cos/sin caches in the query's type (as onnxruntime-genai's
  fp16 builds do).

* **why a pass, not a half-precision trace**: the trace, the fusions and the POP rules stay
  one float32 pipeline (POP's ``static_score`` and ``output_norm`` are computed from the
  float32 weights, then rounded once), and the half graph is checkable node for node against
  its fp32 twin (``tests/test_export_dtype.py``). Measured on SmolLM2-135M (fp16, CPU EP):
  270 MB of weights instead of 538 MB, prefill logits within 0.09 of fp32 (scale ~25), and
  greedy decoding identical to fp32 for 128 of 128 tokens (4 prompts x 32).

* **when it applies**: ``dtype`` float16 or bfloat16, on the fused graph (the plain
  attention of ``--no-fuse`` / ``--prefill-skip`` / ``--drop-layers`` keeps its masks and
  softmax in float32 arithmetic this pass does not audit: popc refuses those there) and
  without block quantization (``MatMulNBits`` scales are a separate design). The
  model-local functions are left alone: their bodies are type-generic.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from popc.templates.ops import DOMAIN

HALF_TYPES = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
NUMPY_TYPES = {ir.DataType.FLOAT16: np.dtype(np.float16), ir.DataType.BFLOAT16: np.dtype(ml_dtypes.bfloat16)}

# ai.popc ops whose input 1 is the float32 token mask.
TOKEN_MASK_OPS = frozenset(
    {"PopSwiGLU", "PopGeGLU", "PopGeluMLP", "PopReluMLP", "PopPartition", "PopSwiGLUQ", "PopGeGLUQ"}
)
LOGITS = "logits"


def to_half(array: np.ndarray, target: ir.DataType) -> np.ndarray:
    """``array`` (float32) in ``target``, finite values clipped to its finite range."""
    dtype = NUMPY_TYPES[target]
    limit = float(ml_dtypes.finfo(dtype).max)
    if array.size and (array.max() > limit or array.min() < -limit):  # rare: no temporaries otherwise
        array = np.where(np.isfinite(array), np.clip(array, -limit, limit), array)
    return array.astype(dtype)


def _half_tensor(tensor: ir.TensorProtocol, target: ir.DataType) -> ir.Tensor:
    return ir.tensor(to_half(tensor.numpy(), target), name=tensor.name)


class ConvertDtypePass(ir.passes.InPlacePass):
    """The fp32 graph -> its float16 / bfloat16 twin (see the module docstring)."""

    def __init__(self, dtype: str) -> None:
        super().__init__()
        if dtype not in HALF_TYPES:
            raise ValueError(f"dtype must be one of {sorted(HALF_TYPES)}, not {dtype!r}")
        self.target = HALF_TYPES[dtype]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        float_masks = _float32_token_masks(graph)
        for value in graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT:
                value.const_value = _half_tensor(value.const_value, self.target)
                value.dtype = self.target
        for node in graph:
            self._convert_node(node, keep_float=node in float_masks)
        for value in graph.inputs:
            if value.dtype == ir.DataType.FLOAT:
                value.dtype = self.target
        for node in graph:
            for value in node.outputs:
                if value.dtype == ir.DataType.FLOAT and node not in float_masks:
                    value.dtype = self.target
        _cast_token_masks(graph, float_masks)
        _cast_logits(graph)
        return ir.passes.PassResult(model, modified=True)

    def _convert_node(self, node: ir.Node, keep_float: bool) -> None:
        if node.domain not in ("", "ai.onnx"):
            return
        if node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.FLOAT and not keep_float:
            node.attributes["to"] = ir.AttrInt64("to", self.target)
        elif node.op_type in ("Constant", "ConstantOfShape"):
            attribute = node.attributes.get("value")
            if attribute is not None and attribute.value.dtype == ir.DataType.FLOAT:
                node.attributes["value"] = ir.AttrTensor("value", _half_tensor(attribute.value, self.target))
            elif node.op_type == "Constant" and "value_float" in node.attributes:
                array = np.array(node.attributes.get_float("value_float"), np.float32)
                del node.attributes["value_float"]
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(to_half(array, self.target)))
            elif node.op_type == "Constant" and "value_floats" in node.attributes:
                array = np.array(node.attributes.get_floats("value_floats"), np.float32)
                del node.attributes["value_floats"]
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(to_half(array, self.target)))


def _token_mask_uses(graph: ir.Graph) -> dict[ir.Value, list[tuple[ir.Node, int]]]:
    """Each value feeding an ai.popc op's token_mask, with the slots it feeds."""
    uses: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
    for node in graph:
        if node.domain == DOMAIN and node.op_type in TOKEN_MASK_OPS and len(node.inputs) > 1:
            mask = node.inputs[1]
            if mask is not None:
                uses.setdefault(mask, []).append((node, 1))
    return uses


def _float32_token_masks(graph: ir.Graph) -> set[ir.Node]:
    """``Cast(int mask, to=FLOAT)`` nodes read only as token masks: they stay float32."""
    kept = set()
    for mask, slots in _token_mask_uses(graph).items():
        producer = mask.producer()
        source = producer.inputs[0] if producer is not None and producer.inputs else None
        if (
            producer is not None and producer.op_type == "Cast" and producer.domain in ("", "ai.onnx")
            and producer.attributes.get_int("to") == ir.DataType.FLOAT
            and source is not None and _is_integral(source)
            and len(mask.uses()) == len(slots) and not mask.is_graph_output()
        ):  # fmt: skip
            kept.add(producer)
    return kept


# Ops whose output has their first input's element type (the tracer leaves many types unset).
_TYPE_PRESERVING = frozenset({"Slice", "Reshape", "Squeeze", "Unsqueeze", "Expand", "Identity", "Transpose", "Flatten"})


def _is_integral(value: ir.Value) -> bool:
    """Whether ``value`` holds integers or booleans, looking through type-preserving ops."""
    while value.dtype is None and value.producer() is not None and value.producer().op_type in _TYPE_PRESERVING:
        value = value.producer().inputs[0]
    return value.dtype is not None and not value.dtype.is_floating_point()


def _cast_token_masks(graph: ir.Graph, float_masks: set[ir.Node]) -> None:
    """A ``Cast(to=FLOAT)`` before every token mask that is not float32 already."""
    for mask, slots in _token_mask_uses(graph).items():
        if mask.producer() in float_masks:
            continue
        cast = ir.node("Cast", [mask], {"to": ir.DataType.FLOAT}, name=f"{mask.name}/to_float32")
        cast.outputs[0].name = f"{mask.name}_float32"
        cast.outputs[0].dtype = ir.DataType.FLOAT
        cast.outputs[0].shape = mask.shape
        _insert_after(graph, mask, cast)
        for node, index in slots:
            node.replace_input_with(index, cast.outputs[0])


def _cast_logits(graph: ir.Graph) -> None:
    """The ``logits`` output stays float32: a ``Cast`` after the LM head."""
    for index, output in enumerate(graph.outputs):
        if output.name != LOGITS:
            continue
        half = output
        half.name = f"{LOGITS}_{half.dtype.name.lower()}"
        cast = ir.node("Cast", [half], {"to": ir.DataType.FLOAT}, name="logits/to_float32")
        logits = cast.outputs[0]
        logits.name, logits.dtype, logits.shape = LOGITS, ir.DataType.FLOAT, half.shape
        graph.append(cast)
        graph.outputs[index] = logits


def _insert_after(graph: ir.Graph, value: ir.Value, node: ir.Node) -> None:
    producer = value.producer()
    if producer is None or producer.graph is not graph:
        graph.insert_before(next(iter(graph)), node)  # a graph input or initializer: first
    else:
        graph.insert_after(producer, node)
