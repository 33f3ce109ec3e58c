"""The POP-online FFN operators on block-quantized weight rows (domain ``ai.popc``).

``passes/quantize_weights.py`` turns a ``PopSwiGLU`` / ``PopGeGLU`` node of a quantized
export into its ``Q`` twin, each weight ``W [D, H]`` replaced by its rows quantized along
H (``popc/quantize.py``: ``Wq`` uint8 [D, H * bits / 8], ``Ws`` float [D, H / block_size],
symmetric)::

    PopSwiGLUQ / PopGeGLUQ(X, token_mask, partition, config, Wgq, Wgs, Wuq, Wus, Wdq, Wds,
                           static_score; bits, block_size) -> (Y, partition_out)
    PopSwiGLUDecodeQ / PopGeGLUDecodeQ(X, partition, config, Wgq, Wgs, Wuq, Wus, Wdq, Wds;
                                       bits, block_size) -> Y

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
def PopSwiGLUDecodeQ(X, partition, config, Wgq, Wgs, Wuq, Wus, Wdq, Wds, bits: int = 4, block_size: int = 32):
    """One SwiGLU decode step of POP-online on quantized rows (fused by the op library)."""
    G = GatherMatMulTQ(X, Wgq, Wgs, PopRowsExpand(X, partition), bits=bits, block_size=block_size)
    ids, A = PopSelect(op.Mul(G, op.Sigmoid(G)), X, partition, config)
    U = GatherMatMulTQ(X, Wuq, Wus, ids, bits=bits, block_size=block_size)
    return GatherMatMulQ(op.Mul(A, U), Wdq, Wds, ids, bits=bits, block_size=block_size)


@script(popc_ops, default_opset=op)
def PopGeGLUDecodeQ(
    X, partition, config, Wgq, Wgs, Wuq, Wus, Wdq, Wds, bits: int = 4, block_size: int = 32, approximate: str = "tanh"
):
    """One GeGLU decode step of POP-online on quantized rows (fused by the op library)."""
    G = GatherMatMulTQ(X, Wgq, Wgs, PopRowsExpand(X, partition), bits=bits, block_size=block_size)
    ids, A = PopSelect(op.Gelu(G, approximate=approximate), X, partition, config)
    U = GatherMatMulTQ(X, Wuq, Wus, ids, bits=bits, block_size=block_size)
    return GatherMatMulQ(op.Mul(A, U), Wdq, Wds, ids, bits=bits, block_size=block_size)


@script(popc_ops, default_opset=op)
def PopSwiGLUQ(
    X, token_mask, partition, config, Wgq, Wgs, Wuq, Wus, Wdq, Wds, static_score, bits: int = 4, block_size: int = 32
):
    if op.Equal(op.Size(partition), op.Constant(value_int=0)):
        G = DenseRowsQ(X, Wgq, Wgs, bits=bits, block_size=block_size)
        Z = op.Mul(op.Mul(G, op.Sigmoid(G)), DenseRowsQ(X, Wuq, Wus, bits=bits, block_size=block_size))
        Y = op.MatMul(Z, DequantizedRows(Wdq, Wds, bits=bits, block_size=block_size))
        partition_out = PopPartition(Z, token_mask, config, static_score)
    else:
        Y = PopSwiGLUDecodeQ(X, partition, config, Wgq, Wgs, Wuq, Wus, Wdq, Wds, bits=bits, block_size=block_size)
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
    bits: int = 4,
    block_size: int = 32,
    approximate: str = "tanh",
):
    if op.Equal(op.Size(partition), op.Constant(value_int=0)):
        G = DenseRowsQ(X, Wgq, Wgs, bits=bits, block_size=block_size)
        Z = op.Mul(op.Gelu(G, approximate=approximate), DenseRowsQ(X, Wuq, Wus, bits=bits, block_size=block_size))
        Y = op.MatMul(Z, DequantizedRows(Wdq, Wds, bits=bits, block_size=block_size))
        partition_out = PopPartition(Z, token_mask, config, static_score)
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
            bits=bits,
            block_size=block_size,
            approximate=approximate,
        )
        partition_out = op.Identity(partition)
    return Y, partition_out


# Every function a quantized POP model may call beyond POP_FUNCTIONS, helpers first.
POP_QUANT_FUNCTIONS = [
    GatherMatMulTQ,
    GatherMatMulQ,
    DequantizedRows,
    DenseRowsQ,
    PopSwiGLUDecodeQ,
    PopGeGLUDecodeQ,
    PopSwiGLUQ,
    PopGeGLUQ,
]
