"""The quantized math in PyTorch: a Hugging Face model whose weights are replaced, in place,
by what a quantized export stores (``popc/quantize.py``: quantize, then dequantize).

Which weights, and along which axis, mirrors ``passes/quantize_weights.py``: every linear
layer whose input width is a multiple of the block and whose output is at least one block
wide (routers stay float), quantized along its input (MatMulNBits' K); the LM head, and with
it a tied embedding; each MoE expert's matrices. With ``pop_layout`` the FFNs POP prunes keep
their down projection per channel instead (quantized along the hidden size, as POP's rows
are), so that a kept channel is one quantized row. Run the float model, or
:class:`popc.reference.PopReference` over it, to get the reference of a quantized export
(with ``accuracy_level`` 0: float activations, as here).
"""

from __future__ import annotations

import torch
from torch import nn

from popc.modeling import is_sparse_moe
from popc.quantize import QuantScheme, fake_quantize


def _fake(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    array = weight.detach().to(torch.float32).cpu().numpy()
    return torch.from_numpy(fake_quantize(array, scheme)).to(weight.dtype)


def _quantizable(weight: torch.Tensor, scheme: QuantScheme) -> bool:
    rows, columns = weight.shape
    return columns % scheme.block_size == 0 and rows >= scheme.block_size


@torch.no_grad()
def fake_quantize_model(model: nn.Module, scheme: QuantScheme, pop_layout: bool = False) -> nn.Module:
    """Quantize-dequantize ``model``'s weights in place as the export does; returns it."""
    per_channel: set[int] = set()  # down projections quantized along the hidden size
    for layer in model.model.layers:
        mlp = layer.mlp
        if is_sparse_moe(mlp):
            experts = mlp.experts
            for e in range(experts.gate_up_proj.shape[0]):
                if _quantizable(experts.gate_up_proj[e], scheme):
                    experts.gate_up_proj[e] = _fake(experts.gate_up_proj[e], scheme)
                down = experts.down_proj[e]
                if pop_layout and _quantizable(down.t(), scheme):
                    experts.down_proj[e] = _fake(down.t(), scheme).t()
                elif not pop_layout and _quantizable(down, scheme):
                    experts.down_proj[e] = _fake(down, scheme)
        elif pop_layout:
            per_channel.add(id(mlp.down_proj))
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))  # a tied table once (the rule is idempotent anyway)
        weight = module.weight
        if id(module) in per_channel:
            if _quantizable(weight.t(), scheme):
                weight.copy_(_fake(weight.t(), scheme).t())
        elif _quantizable(weight, scheme):
            weight.copy_(_fake(weight, scheme))
    return model
