"""The POP-online FFN operators on block-quantized weight rows (domain ``ai.popc``).

``passes/quantize_weights.py`` turns a ``PopSwiGLU`` / ``PopGeGLU`` node of a quantized
export into its ``Q`` twin, each weight ``W [D, H]`` replaced by its rows quantized along
H (``popc/quantize.py``: ``Wq`` uint8 [D, H * bits / 8], ``Ws`` float [D, H / block_size],
symmetric)::

    PopSwiGLUQ / PopGeGLUQ(X, token_mask, partition, config, Wgq, Wgs, Wuq, Wus, Wdq, Wds,
                           static_score, output_norm; bits, block_size) -> (Y, partition_out)
    PopSwiGLUDecodeQ / PopGeGLUDecodeQ(X, partition, config, Wgq, Wgs, Wuq, Wus, Wdq, Wds,
                                       output_norm; bits, block_size, accuracy_level) -> Y

``output_norm`` [D] (float, the activations' type) holds the L2 norms of the *dequantized*
down rows, computed at export: the output-aware score (``config[3] == 2``) of the weights the
model actually runs.

``accuracy_level`` (as MatMulNBits'): 4 takes the decode step's gate and up dot products
with X quantized to int8 per block of ``block_size`` (``Int8Activations``: scale = max|x| /
127, x -> round(x / scale) * scale), so that a kernel can use integer dot products; 0 keeps X
in float. The prefill is always float.

The math is that of ``templates/pop_ffn.py`` on the dequantized weights: a kept channel is
one quantized row of each matrix (its scales beside it), which is what the op library's
kernels read. The bodies dequantize with ONNX Runtime's ``GatherBlockQuantized`` (the rows a
decode step needs; every row at a prefill) and are the reference the kernels are tested
against.
"""

from __future__ import annotations

from onnxscript import opset20 as op
from onnxscript import script

from popc.templates.ops import GatherMatMulQ, GatherMatMulTQ, msft, popc_ops
from popc.templates.pop_ffn import PopPartition, PopRowsExpand, PopSelect


@script(popc_ops, default_opset=op)
def Int8Activations(X, block_size: int = 32):
    """X with each block of ``block_size`` along the last axis rounded to int8 steps of
    max|block| / 127 (round half to even), computed in float32."""
    Xf = op.Cast(X, to=1)
    block = op.Constant(value_int=block_size)
    shape = op.Concat(op.Shape(Xf, start=0, end=-1), op.Constant(value_ints=[-1]), op.Reshape(block, [1]), axis=0)
    blocks = op.Reshape(Xf, shape)
    scale = op.Div(op.ReduceMax(op.Abs(blocks), [-1], keepdims=1), op.Constant(value_float=127.0))
    zero = op.Equal(scale, op.Constant(value_float=0.0))
    safe = op.Where(zero, op.Constant(value_float=1.0), scale)
    steps = op.Clip(op.Round(op.Div(blocks, safe)), op.Constant(value_float=-127.0), op.Constant(value_float=127.0))
    return op.CastLike(op.Reshape(op.Mul(steps, safe), op.Shape(X)), X)


@script(popc_ops, default_opset=op)
def DecodeActivations(X, block_size: int = 32, accuracy_level: int = 0):
    """What a quantized decode step's gate and up rows are multiplied with (see above)."""
    level = op.Constant(value_int=accuracy_level)
    if op.GreaterOrEqual(level, op.Constant(value_int=4)):
        Xa = Int8Activations(X, block_size=block_size)
    else:
        Xa = op.Identity(X)
    return Xa


@script(popc_ops, default_opset=op)
def DequantizedRows(Wq, Ws, bits: int = 4, block_size: int = 32):
    """Every row of a quantized [N, H] matrix, dequantized: [N, H]."""
    count = op.Squeeze(op.Shape(Wq, start=0, end=1), [0])
    every = op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1))
    return msft.GatherBlockQuantized(Wq, every, Ws, bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)


@script(popc_ops, default_opset=op)
def DenseRowsQ(X, Wq, Ws, bits: int = 4, block_size: int = 32):
    """X [B, S, H] @ W^T for a quantized W [D, H]: [B, S, D]."""
    W = DequantizedRows(Wq, Ws, bits=bits, block_size=block_size)
    Y = op.Gemm(op.Flatten(X, axis=2), W, transB=1)
    return op.Reshape(Y, op.Concat(op.Shape(X, start=0, end=2), op.Constant(value_ints=[-1]), axis=0))


@script(popc_ops, default_opset=op)
def PopSwiGLUDecodeQ(
    X,
    partition,
    config,
    Wgq,
    Wgs,
    Wuq,
    Wus,
    Wdq,
    Wds,
    output_norm,
    bits: int = 4,
    block_size: int = 32,
    accuracy_level: int = 0,
):
    """One SwiGLU decode step of POP-online on quantized rows (fused by the op library)."""
    Xa = DecodeActivations(X, block_size=block_size, accuracy_level=accuracy_level)
    G = GatherMatMulTQ(Xa, Wgq, Wgs, PopRowsExpand(X, partition), bits=bits, block_size=block_size)
    ids, A = PopSelect(op.Mul(G, op.Sigmoid(G)), X, partition, config, output_norm)
    U = GatherMatMulTQ(Xa, Wuq, Wus, ids, bits=bits, block_size=block_size)
    return GatherMatMulQ(op.Mul(A, U), Wdq, Wds, ids, bits=bits, block_size=block_size)


@script(popc_ops, default_opset=op)
def PopGeGLUDecodeQ(
    X,
    partition,
    config,
    Wgq,
    Wgs,
    Wuq,
    Wus,
    Wdq,
    Wds,
    output_norm,
    bits: int = 4,
    block_size: int = 32,
    approximate: str = "tanh",
    accuracy_level: int = 0,
):
    """One GeGLU decode step of POP-online on quantized rows (fused by the op library)."""
    Xa = DecodeActivations(X, block_size=block_size, accuracy_level=accuracy_level)
    G = GatherMatMulTQ(Xa, Wgq, Wgs, PopRowsExpand(X, partition), bits=bits, block_size=block_size)
    ids, A = PopSelect(op.Gelu(G, approximate=approximate), X, partition, config, output_norm)
    U = GatherMatMulTQ(Xa, Wuq, Wus, ids, bits=bits, block_size=block_size)
    return GatherMatMulQ(op.Mul(A, U), Wdq, Wds, ids, bits=bits, block_size=block_size)


@script(popc_ops, default_opset=op)
def PopSwiGLUQ(
    X,
    token_mask,
    partition,
    config,
    Wgq,
    Wgs,
    Wuq,
    Wus,
    Wdq,
    Wds,
    static_score,
    output_norm,
    bits: int = 4,
    block_size: int = 32,
    accuracy_level: int = 0,
):
    if op.Equal(op.Size(partition), op.Constant(value_int=0)):
        G = DenseRowsQ(X, Wgq, Wgs, bits=bits, block_size=block_size)
        Z = op.Mul(op.Mul(G, op.Sigmoid(G)), DenseRowsQ(X, Wuq, Wus, bits=bits, block_size=block_size))
        Y = op.MatMul(Z, DequantizedRows(Wdq, Wds, bits=bits, block_size=block_size))
        partition_out = PopPartition(Z, token_mask, config, static_score, output_norm)
    else:
        Y = PopSwiGLUDecodeQ(
            X,
            partition,
            config,
            Wgq,
            Wgs,
            Wuq,
            Wus,
            Wdq,
            Wds,
            output_norm,
            bits=bits,
            block_size=block_size,
            accuracy_level=accuracy_level,
        )
        partition_out = op.Identity(partition)
    return Y, partition_out


@script(popc_ops, default_opset=op)
def PopGeGLUQ(
    X,
    token_mask,
    partition,
    config,
    Wgq,
    Wgs,
    Wuq,
    Wus,
    Wdq,
    Wds,
    static_score,
    output_norm,
    bits: int = 4,
    block_size: int = 32,
    approximate: str = "tanh",
    accuracy_level: int = 0,
):
    if op.Equal(op.Size(partition), op.Constant(value_int=0)):
        G = DenseRowsQ(X, Wgq, Wgs, bits=bits, block_size=block_size)
        Z = op.Mul(op.Gelu(G, approximate=approximate), DenseRowsQ(X, Wuq, Wus, bits=bits, block_size=block_size))
        Y = op.MatMul(Z, DequantizedRows(Wdq, Wds, bits=bits, block_size=block_size))
        partition_out = PopPartition(Z, token_mask, config, static_score, output_norm)
    else:
        Y = PopGeGLUDecodeQ(
            X,
            partition,
            config,
            Wgq,
            Wgs,
            Wuq,
            Wus,
            Wdq,
            Wds,
            output_norm,
            bits=bits,
            block_size=block_size,
            approximate=approximate,
            accuracy_level=accuracy_level,
        )
        partition_out = op.Identity(partition)
    return Y, partition_out


# Every function a quantized POP model may call beyond POP_FUNCTIONS, helpers first.
POP_QUANT_FUNCTIONS = [
    GatherMatMulTQ,
    GatherMatMulQ,
    Int8Activations,
    DecodeActivations,
    DequantizedRows,
    DenseRowsQ,
    PopSwiGLUDecodeQ,
    PopGeGLUDecodeQ,
    PopSwiGLUQ,
    PopGeGLUQ,
]
