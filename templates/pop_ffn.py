"""The POP-online FFN operators (domain ``ai.popc``) and their ONNX function bodies.

A graph-rewrite pass (``passes/pop_online.py``) replaces every matched FFN with
one of these nodes::

    PopSwiGLU / PopGeGLU(X, token_mask, partition, config, Wg, Wu, Wd, static_score, output_norm)
        -> (Y, partition_out)

* ``X`` [B, S, H]: the FFN input; ``token_mask`` [B, S] float: 1 for real tokens.
* ``partition`` int64 [B, R+C]: channel ids, retained region first then candidates,
  each in decreasing score order. Empty ([B, 0]) means *prefill*.
* ``config`` int64 [4]: (R, C, K, mode): channel counts and the score mode
  (0 activation, 1 static, 2 output-aware).
* ``Wg``, ``Wu``, ``Wd`` [D, H]: one row per channel (``Wd`` is W_down transposed),
  so every gathered channel is a contiguous row.
* ``static_score`` [D]: weight-magnitude channel scores (the static baseline, mode 1).
* ``output_norm`` [D]: ``||Wd_j||``, the L2 norm of each channel's down-projection row
  (the output-aware score, mode 2). Exports made before it existed lack this input.

Plain MLPs (``fc2(act(fc1(x) + b1)) + b2``, GELU or ReLU) get ``PopGeluMLP`` /
``PopReluMLP(X, token_mask, partition, config, W1, B1, W2, B2, static_score, output_norm)``:
the same regions, with ``Z = act(fc1(x) + b1)`` as the channel activations and the norms of
W2's rows (fc2 as [D, H]) as ``output_norm``.

Prefill (empty partition): the FFN runs dense; each token's row of
``Z = act(X Wg^T) * (X Wu^T)`` is scaled to unit L2 norm, padding rows are zeroed,
and each channel scores the L2 norm of its column; the top R+C channels, sorted,
form the partition. Decode (``PopSwiGLUDecode`` / ``PopGeGLUDecode``, one op so that
the op library runs it as one fused kernel): gate rows of R and C only; the top-K
candidates by |activation| per token; up and down rows of R plus the kept candidates
only.

Scores (``config[3]``): mode 0, the paper's, is the above. Mode 1 (static) ranks the
prefill by ``static_score`` instead. Mode 2 (output-aware) weights each channel by what it
can contribute to the FFN's output, ``||Wd_j||``: the prefill score is ``score_j * ||Wd_j||``
and decode keeps the top-K candidates by ``|act(gate_j)| * ||Wd_j||`` (the retained region
is unchanged). Ties go to the lower position in every mode, as ONNX TopK.
"""

from __future__ import annotations

from onnxscript import opset20 as op
from onnxscript import script

from popc.templates.ops import GatherMatMul, GatherMatMulT, popc_ops

EPSILON = 1e-12


@script(popc_ops, default_opset=op)
def PopPartition(Z, token_mask, config, static_score, output_norm):
    """Channel ids [B, R+C] ranked by the prompt's normalised activations (times ``output_norm``
    in mode 2), or statically (mode 1). Scored in float32 whatever Z's type: in float16 the
    epsilon underflows and sums of squares overflow, and TopK has no bfloat16."""
    Z = op.Cast(Z, to=1)  # FLOAT
    row_norm = op.Sqrt(op.ReduceSum(op.Mul(Z, Z), [-1], keepdims=1))
    eps = op.Constant(value_float=1e-12)
    normalised = op.Mul(op.Div(Z, op.Add(row_norm, eps)), op.Unsqueeze(op.Cast(token_mask, to=1), [-1]))
    score = op.Sqrt(op.ReduceSum(op.Mul(normalised, normalised), [1], keepdims=0))  # [B, D]
    mode = op.Slice(config, [3], [4])
    output_aware = op.Equal(mode, op.Constant(value_ints=[2]))
    score = op.Where(output_aware, op.Mul(score, op.Cast(output_norm, to=1)), score)
    static = op.Equal(mode, op.Constant(value_ints=[1]))
    score = op.Where(static, op.Expand(op.Cast(static_score, to=1), op.Shape(score)), score)
    count = op.Add(op.Slice(config, [0], [1]), op.Slice(config, [1], [2]))
    values, indices = op.TopK(score, count, axis=-1, largest=1, sorted=1)
    return indices


@script(popc_ops, default_opset=op)
def PopSelect(A, X, partition, config, output_norm):
    """Per token: retained ids plus the top-K candidates by |A| (times their ``output_norm`` in
    mode 2); returns (ids, activations)."""
    retain = op.Slice(config, [0], [1])
    keep = op.Slice(config, [2], [3])
    total = op.Shape(partition, start=1, end=2)
    A_retained = op.Slice(A, [0], retain, [-1])
    A_candidates = op.Slice(A, retain, total, [-1])
    ids_shape = op.Concat(op.Shape(X, start=0, end=2), total, axis=0)
    ids = op.Expand(op.Unsqueeze(partition, [1]), ids_shape)  # [B, S, R+C]
    ids_retained = op.Slice(ids, [0], retain, [-1])
    ids_candidates = op.Slice(ids, retain, total, [-1])
    key = op.Abs(op.Cast(A_candidates, to=1))  # ranked in float32 (TopK has no bfloat16)
    output_aware = op.Equal(op.Slice(config, [3], [4]), op.Constant(value_ints=[2]))
    weighted = op.Mul(key, op.Gather(op.Cast(output_norm, to=1), ids_candidates, axis=0))
    key = op.Where(output_aware, weighted, key)
    values, chosen = op.TopK(key, keep, axis=-1, largest=1, sorted=1)
    selected_ids = op.Concat(ids_retained, op.GatherElements(ids_candidates, chosen, axis=-1), axis=-1)
    selected_A = op.Concat(A_retained, op.GatherElements(A_candidates, chosen, axis=-1), axis=-1)
    return selected_ids, selected_A


@script(popc_ops, default_opset=op)
def PopRowsExpand(X, partition):
    """The partition broadcast over tokens: [B, R+C] -> [B, S, R+C]."""
    shape = op.Concat(op.Shape(X, start=0, end=2), op.Shape(partition, start=1, end=2), axis=0)
    return op.Expand(op.Unsqueeze(partition, [1]), shape)


@script(popc_ops, default_opset=op)
def DenseRows(X, W):
    """X [B, S, H] @ W[D, H]^T without a transposed copy of W (Gemm transB on 2-D rows)."""
    rows = op.Flatten(X, axis=2)  # [B * S, H]: one node, no shape arithmetic (prefill of short prompts)
    Y = op.Gemm(rows, W, transB=1)
    return op.Reshape(Y, op.Concat(op.Shape(X, start=0, end=2), op.Constant(value_ints=[-1]), axis=0))


@script(popc_ops, default_opset=op)
def PopSwiGLUDecode(X, partition, config, Wg, Wu, Wd, output_norm):
    """One SwiGLU decode step of POP-online (the op library fuses it into one kernel)."""
    G = GatherMatMulT(X, Wg, PopRowsExpand(X, partition))
    ids, A = PopSelect(op.Mul(G, op.Sigmoid(G)), X, partition, config, output_norm)
    return GatherMatMul(op.Mul(A, GatherMatMulT(X, Wu, ids)), Wd, ids)


@script(popc_ops, default_opset=op)
def PopGeGLUDecode(X, partition, config, Wg, Wu, Wd, output_norm, approximate: str = "tanh"):
    """One GeGLU decode step of POP-online (the op library fuses it into one kernel)."""
    G = GatherMatMulT(X, Wg, PopRowsExpand(X, partition))
    ids, A = PopSelect(op.Gelu(G, approximate=approximate), X, partition, config, output_norm)
    return GatherMatMul(op.Mul(A, GatherMatMulT(X, Wu, ids)), Wd, ids)


@script(popc_ops, default_opset=op)
def PopSwiGLU(X, token_mask, partition, config, Wg, Wu, Wd, static_score, output_norm):
    if op.Equal(op.Size(partition), op.Constant(value_int=0)):
        G = DenseRows(X, Wg)
        Z = op.Mul(op.Mul(G, op.Sigmoid(G)), DenseRows(X, Wu))
        Y = op.MatMul(Z, Wd)
        partition_out = PopPartition(Z, token_mask, config, static_score, output_norm)
    else:
        Y = PopSwiGLUDecode(X, partition, config, Wg, Wu, Wd, output_norm)
        partition_out = op.Identity(partition)
    return Y, partition_out


@script(popc_ops, default_opset=op)
def PopGeGLU(X, token_mask, partition, config, Wg, Wu, Wd, static_score, output_norm, approximate: str = "tanh"):
    if op.Equal(op.Size(partition), op.Constant(value_int=0)):
        G = DenseRows(X, Wg)
        Z = op.Mul(op.Gelu(G, approximate=approximate), DenseRows(X, Wu))
        Y = op.MatMul(Z, Wd)
        partition_out = PopPartition(Z, token_mask, config, static_score, output_norm)
    else:
        Y = PopGeGLUDecode(X, partition, config, Wg, Wu, Wd, output_norm, approximate=approximate)
        partition_out = op.Identity(partition)
    return Y, partition_out


@script(popc_ops, default_opset=op)
def PopGeluMLP(X, token_mask, partition, config, W1, B1, W2, B2, static_score, output_norm, approximate: str = "none"):
    """Plain ``fc2(gelu(fc1(x)))`` MLP with biases; Z = gelu(fc1(x)) is scored and pruned."""
    if op.Equal(op.Size(partition), op.Constant(value_int=0)):
        Z = op.Gelu(op.Add(DenseRows(X, W1), B1), approximate=approximate)
        Y = op.Add(op.MatMul(Z, W2), B2)
        partition_out = PopPartition(Z, token_mask, config, static_score, output_norm)
    else:
        rows = PopRowsExpand(X, partition)
        A = op.Gelu(op.Add(GatherMatMulT(X, W1, rows), op.Gather(B1, rows, axis=0)), approximate=approximate)
        ids, kept = PopSelect(A, X, partition, config, output_norm)
        Y = op.Add(GatherMatMul(kept, W2, ids), B2)
        partition_out = op.Identity(partition)
    return Y, partition_out


@script(popc_ops, default_opset=op)
def PopReluMLP(X, token_mask, partition, config, W1, B1, W2, B2, static_score, output_norm):
    """Plain ``fc2(relu(fc1(x)))`` MLP with biases."""
    if op.Equal(op.Size(partition), op.Constant(value_int=0)):
        Z = op.Relu(op.Add(DenseRows(X, W1), B1))
        Y = op.Add(op.MatMul(Z, W2), B2)
        partition_out = PopPartition(Z, token_mask, config, static_score, output_norm)
    else:
        rows = PopRowsExpand(X, partition)
        A = op.Relu(op.Add(GatherMatMulT(X, W1, rows), op.Gather(B1, rows, axis=0)))
        ids, kept = PopSelect(A, X, partition, config, output_norm)
        Y = op.Add(GatherMatMul(kept, W2, ids), B2)
        partition_out = op.Identity(partition)
    return Y, partition_out


# Every function a POP model may call, helpers first (the order ONNX wants them listed in).
POP_FUNCTIONS = [
    GatherMatMulT,
    GatherMatMul,
    PopPartition,
    PopSelect,
    PopRowsExpand,
    DenseRows,
    PopSwiGLUDecode,
    PopGeGLUDecode,
    PopSwiGLU,
    PopGeGLU,
    PopGeluMLP,
    PopReluMLP,
]
