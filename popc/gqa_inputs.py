"""GroupQueryAttention's inputs, derived once per graph call from the attention mask(s).

Every ``com.microsoft.GroupQueryAttention`` node of a fused export (popc.ort_contrib) takes
``seqlens_k``, ``total_sequence_length`` and an ``attention_bias`` that masks left padding.
A plain export derives them once from ``attention_mask`` (:func:`fused_inputs`); a
KV-eviction export, whose layers each have a cache length of their own, from its per-layer
mask and lengths (:func:`layer_inputs`, then :meth:`LayerInputs.layer` per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from popc import ort_contrib


@dataclass
class FusedInputs:
    """What every GroupQueryAttention node shares, derived once from ``attention_mask``."""

    seqlens_k: torch.Tensor  # int32 [B]: total - 1 in every row (left padding occupies slots)
    total: torch.Tensor  # int32 []: past + new
    bias: torch.Tensor  # float [B, 1, S, T]: 0 at tokens, most negative at padding


def fused_inputs(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> FusedInputs:
    """GroupQueryAttention's shared inputs for a cache of ``attention_mask.shape[1]`` slots."""
    total = torch._shape_as_tensor(attention_mask)[1]
    # A pad token's slot gets the most negative bias; ORT adds the causal mask itself.
    # GroupQueryAttention wants it [B, 1, S, T]: broadcast against zeros shaped like the
    # new tokens (fewer nodes than an Expand to a computed shape: decode runs them all).
    pad_bias = torch.where(attention_mask.bool(), 0.0, ort_contrib.NEGATIVE)[:, None, None, :]
    rows = (input_ids * 0).to(torch.float32)[:, None, :, None]
    return FusedInputs(
        seqlens_k=(attention_mask[:, 0] * 0 + (total - 1)).to(torch.int32),
        total=total.to(torch.int32),
        bias=pad_bias + rows,
    )


@dataclass
class LayerInputs:
    """GroupQueryAttention's inputs under KV eviction, where every layer's cache has a length
    of its own, derived once for all layers (a decode step would otherwise run ~20 small
    nodes per layer): :meth:`layer` picks one layer's."""

    seqlens_k: torch.Tensor  # int32 [L, B]: the layer's length - 1
    total: torch.Tensor  # int32 [L]: the layer's length (past + new)
    lengths: torch.Tensor  # int64 [L]
    pad_bias: torch.Tensor  # float [L, B, 1, 1, T]: 0 at tokens, most negative at padding
    rows: torch.Tensor  # float zeros [B, 1, S, 1]: broadcasts the bias to the new tokens

    def layer(self, index: int) -> FusedInputs:
        # The layer's first ``length`` (past + new) slots: the past's shape is not the
        # length (a shared KV buffer has spare slots).
        bias = ort_contrib.leading_slots(self.pad_bias[index], self.lengths[index]) + self.rows
        return FusedInputs(seqlens_k=self.seqlens_k[index], total=self.total[index], bias=bias)

    def prompt_mask(self, index: int, total: torch.Tensor, query_slots: torch.Tensor, window: int | None):
        """Additive [B, S', total] mask of queries at ``query_slots`` over layer ``index``'s
        first ``total`` slots: causal, padding, sliding window; one most-negative value per
        masked entry (a padding query's row stays finite)."""
        keys = torch.arange(total, dtype=torch.long)
        allowed = keys[None, :] <= query_slots[:, None]
        if window is not None:
            allowed = allowed & (keys[None, :] > query_slots[:, None] - window)
        tokens = ort_contrib.leading_slots(self.pad_bias[index], total)[:, 0] == 0  # [B, 1, total]
        return torch.where(allowed[None] & tokens, 0.0, ort_contrib.NEGATIVE)

    def spanning(self, index: int, total: torch.Tensor, rows: torch.Tensor) -> FusedInputs:
        """Layer ``index``'s inputs for a cache of ``total`` slots (int64 []) and the new
        tokens that ``rows`` (zeros [B, 1, S', 1]) spans."""
        bias = ort_contrib.leading_slots(self.pad_bias[index], total) + rows
        total = total.to(torch.int32)
        return FusedInputs(seqlens_k=self.seqlens_k[index] * 0 + (total - 1), total=total, bias=bias)


def layer_inputs(layer_mask: torch.Tensor, layer_lengths: torch.Tensor, input_ids: torch.Tensor) -> LayerInputs:
    """For the per-layer mask [L, B, T] and lengths [L] of a KV-eviction export."""
    total = layer_lengths.to(torch.int32)
    return LayerInputs(
        seqlens_k=(layer_mask[:, :, 0] * 0).to(torch.int32) + (total - 1)[:, None],
        total=total,
        lengths=layer_lengths,
        pad_bias=torch.where(layer_mask.bool(), 0.0, ort_contrib.NEGATIVE)[:, :, None, None, :],
        rows=(input_ids * 0).to(torch.float32)[:, None, :, None],
    )
