"""Definitions of popc's ONNX operators (domain ``ai.popc``, version 1).

Each op has a body of standard ONNX ops (a model-local function), so a model that
uses it runs in plain ONNX Runtime; the op library (``templates/*.cc``, ``*.cu``)
registers fused kernels under the same names that read only the selected rows.

Index contract (both ops): ``I`` is int64 ``[B, S, K]`` with ``0 <= I < N`` (N =
rows of ``W``). Kernels reject anything else with an error and never read out of
bounds. (The function bodies use ONNX Gather, which also rejects indices >= N but
accepts negative ones, counting from the end; popc's passes never produce them.)

``GatherMatMulT(X [B,S,H], W [N,H], I [B,S,K]) -> Y [B,S,K]``
    ``Y[b,s,k] = sum_h X[b,s,h] * W[I[b,s,k], h]``: project each token onto its
    own selection of rows of W (the gate / up projections of a pruned FFN).

``GatherMatMul(Z [B,S,K], W [N,H], I [B,S,K]) -> Y [B,S,H]``
    ``Y[b,s,h] = sum_k Z[b,s,k] * W[I[b,s,k], h]``: combine the selected rows of W
    weighted by Z (the down projection of a pruned FFN, W = W_down transposed).

X, Z, W and Y share one float type (float32 or float16).
"""

from __future__ import annotations

from onnxscript import opset20 as op
from onnxscript import script
from onnxscript.values import Opset

DOMAIN = "ai.popc"
VERSION = 1
popc_ops = Opset(DOMAIN, VERSION)


@script(popc_ops, default_opset=op)
def GatherMatMulT(X, W, I):
    rows = op.Gather(W, I, axis=0)  # [B, S, K, H]
    column = op.Unsqueeze(X, [-1])  # [B, S, H, 1]
    return op.Squeeze(op.MatMul(rows, column), [-1])


@script(popc_ops, default_opset=op)
def GatherMatMul(Z, W, I):
    rows = op.Gather(W, I, axis=0)  # [B, S, K, H]
    weights = op.Unsqueeze(Z, [-2])  # [B, S, 1, K]
    return op.Squeeze(op.MatMul(weights, rows), [-2])


KERNEL_OPS = {"GatherMatMulT": GatherMatMulT, "GatherMatMul": GatherMatMul}


# ---- quantized rows ---------------------------------------------------------------
# ``GatherMatMulTQ(X, Wq, Ws, I)`` / ``GatherMatMulQ(Z, Wq, Ws, I)``: the ops above with W
# stored block-quantized along H (``popc/quantize.py``): ``Wq`` uint8 [N, H * bits / 8]
# (int4: element 2i in the low nibble of byte i), ``Ws`` [N, H / block_size] scales of the
# activations' float type, symmetric (zero point 2^(bits-1)): W[n, h] = Ws[n, h / block] *
# (q[n, h] - 2^(bits-1)). Attributes ``bits`` (4 or 8) and ``block_size``. Same index contract.
msft = Opset("com.microsoft", 1)


@script(popc_ops, default_opset=op)
def GatherMatMulTQ(X, Wq, Ws, I, bits: int = 4, block_size: int = 32):
    rows = msft.GatherBlockQuantized(Wq, I, Ws, bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)
    return op.Squeeze(op.MatMul(rows, op.Unsqueeze(X, [-1])), [-1])


@script(popc_ops, default_opset=op)
def GatherMatMulQ(Z, Wq, Ws, I, bits: int = 4, block_size: int = 32):
    rows = msft.GatherBlockQuantized(Wq, I, Ws, bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)
    return op.Squeeze(op.MatMul(op.Unsqueeze(Z, [-2]), rows), [-2])


QUANT_KERNEL_OPS = {"GatherMatMulTQ": GatherMatMulTQ, "GatherMatMulQ": GatherMatMulQ}
