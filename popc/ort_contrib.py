"""PyTorch functions that trace to ONNX Runtime's fused (contrib) operators.

Each is a ``torch.autograd.Function`` whose ``forward`` is the operator's math in plain
PyTorch (what the tracer runs, and the reference the tests hold ORT to) and whose
``symbolic`` emits the ORT node, so the exported decoder carries:

* ``com.microsoft.GroupQueryAttention``: rotary embedding (``do_rotary``), the KV cache
  concat and grouped-query attention in one kernel;
* ``SimplifiedLayerNormalization`` (RMSNorm; ORT registers it in the ONNX domain);
* a ``Slice`` that keeps the last ``logits_to_keep`` positions before the LM head.

The fused packed-QKV and skip-add-RMSNorm forms are graph-rewrite passes over these
nodes (``passes/ort_fusions.py``).

Why not ``onnxscript.rewriter.ort_fusions``: its rules match the torch.export (dynamo)
form of the Hugging Face modules; on popc's traced decoder they match nothing (checked:
every fusion count 0 on SmolLM2), and ORT's GroupQueryAttention assumes *right*-aligned
sequences, so left padding needs the explicit ``attention_bias`` this module feeds.

Semantics of GroupQueryAttention as fed here (checked against ORT 1.32's CPU kernel):
``seqlens_k = total - 1`` for every row and ``total_sequence_length = total``, so each
row's cache holds ``total`` slots including its left padding; ``attention_bias`` masks
the padding (ORT applies the causal mask and ``local_window_size``, which equals the
Hugging Face ``sliding_window``). Rotary positions are therefore *slot* indices: a
left-padded row's keys are rotated by ``position + padding``. Attention scores depend
only on position differences, so the outputs equal Hugging Face's; the cached keys of
padded rows differ by that constant rotation.
"""

from __future__ import annotations

import torch
from torch.onnx import symbolic_helper

NEGATIVE = torch.finfo(torch.float32).min


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE of ``x`` [B, H, S, D] with ``cos``/``sin`` [S, D/2]."""
    cos = torch.cat([cos, cos], dim=-1)
    sin = torch.cat([sin, sin], dim=-1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class GroupQueryAttention(torch.autograd.Function):
    """``(query [B,S,N*D], key, value [B,S,KV*D], past_key, past_value [B,KV,P,D], seqlens_k
    int32 [B], total int32 [], cos_cache, sin_cache [max_positions, D/2], attention_bias
    [B,1,S,P+S])`` -> ``(out [B,S,N*D], present_key, present_value [B,KV,P+S,D])``."""

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, attention_bias,
                num_heads: int, kv_num_heads: int, scale: float, local_window_size: int):  # fmt: skip
        batch, seq, _ = query.shape
        past = past_key.shape[2]
        head_dim = past_key.shape[3]
        slots = torch.arange(past, past + seq)
        cos, sin = cos_cache[slots], sin_cache[slots]
        q = rotate(query.view(batch, seq, num_heads, head_dim).transpose(1, 2), cos, sin)
        k = rotate(key.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2), cos, sin)
        v = value.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
        present_key = torch.cat([past_key, k], dim=2)
        present_value = torch.cat([past_value, v], dim=2)
        groups = num_heads // kv_num_heads
        scores = torch.matmul(q, present_key.repeat_interleave(groups, dim=1).transpose(2, 3)) * scale
        key_slot = torch.arange(past + seq)[None, :]
        query_slot = slots[:, None]
        allowed = key_slot <= query_slot
        if local_window_size >= 0:
            allowed = allowed & (key_slot > query_slot - local_window_size)
        scores = (scores + attention_bias).masked_fill(~allowed, NEGATIVE)
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, present_value.repeat_interleave(groups, dim=1))
        return out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim), present_key, present_value

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, attention_bias,
                 num_heads, kv_num_heads, scale, local_window_size):  # fmt: skip
        absent = symbolic_helper._optional_input_placeholder_tensor(g)
        out, present_key, present_value = g.op(
            "com.microsoft::GroupQueryAttention",
            query, key, value, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, absent, attention_bias,
            num_heads_i=num_heads, kv_num_heads_i=kv_num_heads, scale_f=scale, local_window_size_i=local_window_size,
            do_rotary_i=1, rotary_interleaved_i=0, outputs=3,
        )  # fmt: skip
        out.setType(query.type())
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


class SimplifiedLayerNorm(torch.autograd.Function):
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * weight``."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    @staticmethod
    def symbolic(g, x, weight, eps):
        out = g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)
        out.setType(x.type())
        return out


class KeepLastPositions(torch.autograd.Function):
    """``hidden[:, -n:]`` for ``n = logits_to_keep > 0``, all positions for 0 (Slice start -0 = 0)."""

    @staticmethod
    def forward(ctx, hidden, logits_to_keep):
        keep = int(logits_to_keep)
        return hidden[:, -keep:] if keep > 0 else hidden

    @staticmethod
    def symbolic(g, hidden, logits_to_keep):
        starts = g.op("Neg", g.op("Reshape", logits_to_keep, g.op("Constant", value_t=torch.tensor([1]))))
        ends = g.op("Constant", value_t=torch.tensor([torch.iinfo(torch.int64).max]))
        axes = g.op("Constant", value_t=torch.tensor([1]))
        out = g.op("Slice", hidden, starts, ends, axes)
        out.setType(hidden.type().with_sizes([None, None, None]) if hasattr(hidden.type(), "with_sizes") else hidden.type())
        return out


class LeadingSlots(torch.autograd.Function):
    """``mask[..., :length]`` for a 0-d int64 ``length`` that stays a graph value (a Python
    slice would bake the traced length in as a constant)."""

    @staticmethod
    def forward(ctx, mask, length):
        return mask[..., : int(length)]

    @staticmethod
    def symbolic(g, mask, length):
        starts = g.op("Constant", value_t=torch.tensor([0]))
        ends = g.op("Reshape", length, g.op("Constant", value_t=torch.tensor([1])))
        axes = g.op("Constant", value_t=torch.tensor([-1]))
        out = g.op("Slice", mask, starts, ends, axes)
        rank = mask.type().dim() if hasattr(mask.type(), "dim") else None
        if rank is not None and hasattr(mask.type(), "with_sizes"):
            out.setType(mask.type().with_sizes([None] * rank))
        return out


PREFILL_ONLY_DOMAIN = "popc.internal"


class PrefillOnly(torch.autograd.Function):
    """``(is_prefill, out, key, value) -> (out, key, value)``: marks values that only a prefill
    needs. It traces to a ``popc.internal.PrefillOnly`` node, which the export's
    ``passes/prefill_branch.py`` replaces with an ``If`` that computes them at a prefill
    only (decode skips those nodes); ONNX Runtime refuses a graph that still has it."""

    @staticmethod
    def forward(ctx, is_prefill, out, key, value):
        return out.clone(), key.clone(), value.clone()

    @staticmethod
    def symbolic(g, is_prefill, out, key, value):
        outputs = g.op(f"{PREFILL_ONLY_DOMAIN}::PrefillOnly", is_prefill, out, key, value, outputs=3)
        for made, given in zip(outputs, (out, key, value)):
            made.setType(given.type())
        return outputs


def prefill_only(is_prefill, out, key, value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return PrefillOnly.apply(is_prefill, out, key, value)


def group_query_attention(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return GroupQueryAttention.apply(*args)


def simplified_layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return SimplifiedLayerNorm.apply(x, weight, eps)


def leading_slots(mask: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    return LeadingSlots.apply(mask, length)


def keep_last_positions(hidden: torch.Tensor, logits_to_keep: torch.Tensor) -> torch.Tensor:
    return KeepLastPositions.apply(hidden, logits_to_keep)
