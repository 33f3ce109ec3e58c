"""POP-prefill (Prefill-Only Pruning, arXiv 2602.03295) as traced into the graph.

At a prefill (empty KV cache) every prompt token but the last skips the deepest
``N`` layers. Each skipped layer's keys/values for those tokens come from the
hidden state at the cut-off (the input of layer ``L - N``) through that layer's
own input norm, k/v projections, k-norm (Gemma's QK-norm) and rotary embedding
("independent KV projections"). The last prompt token runs through every layer,
attending in each deep layer to the independent K/V of the earlier tokens plus its
own, so the first generated token comes from the full model. Decode runs the full
model.

One graph serves both modes; prefill-vs-decode is decided in the graph from the
past length (0 => prefill) with tensor ops only: the deep layers process the new
tokens ``[start, S)`` where ``start = S - 1`` at a prefill and ``0`` otherwise
(``Range`` + ``Gather``), and the independent projections run on tokens
``[0, start)``, which is empty at decode. With left padding the last column is a
real token in every row. A prefill returns the logits of the last token only
(``[batch, 1, vocab]``); a decode call returns every new token's.

The same math in eager PyTorch over the Hugging Face layers is
:class:`popc.reference.SkipReference`.

Under KV eviction the graph is the fused one and the last ``kv_window`` prompt tokens run
every layer (:func:`prefill_skip_fused_layers`; its reference is
``popc.reference.EvictionReference.prefill(..., skip=N)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from popc.rotary import apply_rotary

if TYPE_CHECKING:
    from popc.gqa_inputs import FusedInputs


@dataclass
class SkippedPrefillInputs:
    """A deep layer's attention inputs in :func:`prefill_skip_fused_layers`: the attention
    over the skipped tokens' independent K/V that a prefill uses, the GroupQueryAttention
    over the cache that decode uses (``popc.gqa_inputs.FusedInputs``)."""

    prompt_mask: torch.Tensor  # float [B, S', n + S']: the window rows over the skipped tokens and themselves
    window_slots: torch.Tensor  # int64 [S']: the rows' slots at a prefill (n .. n + S' - 1)
    steps: FusedInputs
    is_prefill: torch.Tensor  # bool []
    skipped: torch.Tensor  # [B, n, H]: the skipped tokens' hidden at the cut, through the layer's input norm
    slots: torch.Tensor  # int64 [n]: their cache slots, 0 .. n - 1 (empty at decode)


def independent_kv(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """K/V of ``hidden`` [B, n, H] through ``layer``'s input norm, k/v proj, k-norm, RoPE."""
    attn = layer.self_attn
    batch, count = hidden.shape[0], hidden.shape[1]
    x = layer.input_layernorm(hidden)
    k = attn.k_proj(x).view(batch, count, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, count, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    if attn.k_norm is not None:
        k = attn.k_norm(k)
    return apply_rotary(k, cos, sin), v


def prefill_skip_layers(decoder, hidden, rope, masks, past):
    """The layer stack of ``ExportableDecoder`` with POP-prefill; returns (hidden, presents).

    ``hidden`` comes back for the tokens the deep layers processed: the last one at a
    prefill, all of them otherwise.
    """
    layers = decoder.layers
    presents = []
    if decoder.drop_layers:  # the baseline: deep layers removed, their (empty) cache passed through
        keep = len(layers) - decoder.drop_layers
        for index in range(len(layers)):
            if index >= keep:
                presents += [past[2 * index], past[2 * index + 1]]
                continue
            layer = layers[index]
            cos, sin = rope[layer.rope]
            hidden, key, value = layer(hidden, cos, sin, masks[layer.window], past[2 * index], past[2 * index + 1])
            presents += [key, value]
        return hidden, presents
    cut = len(layers) - decoder.prefill_skip
    for index in range(cut):
        layer = layers[index]
        cos, sin = rope[layer.rope]
        hidden, key, value = layer(hidden, cos, sin, masks[layer.window], past[2 * index], past[2 * index + 1])
        presents += [key, value]

    # start = S - 1 at a prefill (past length 0), else 0: all in tensor ops so that it traces.
    seq = torch._shape_as_tensor(hidden)[1]
    past_length = torch._shape_as_tensor(past[0])[2]
    start = torch.where(past_length == 0, seq - 1, seq * 0)
    deep_rows = torch.arange(start, seq, dtype=torch.long)
    cut_rows = torch.arange(seq * 0, start, dtype=torch.long)
    cut_hidden = hidden.index_select(1, cut_rows)  # [B, start, H]: empty at decode
    hidden = hidden.index_select(1, deep_rows)
    for index in range(cut, len(layers)):
        layer = layers[index]
        cos, sin = rope[layer.rope]
        k, v = independent_kv(layer, cut_hidden, cos.index_select(2, cut_rows), sin.index_select(2, cut_rows))
        past_key = torch.cat([past[2 * index], k], dim=2)
        past_value = torch.cat([past[2 * index + 1], v], dim=2)
        hidden, key, value = layer(
            hidden,
            cos.index_select(2, deep_rows),
            sin.index_select(2, deep_rows),
            masks[layer.window].index_select(1, deep_rows),
            past_key,
            past_value,
        )
        presents += [key, value]
    return hidden, presents


def prefill_skip_fused_layers(decoder, hidden, per_layer, past):
    """POP-prefill in a KV-eviction export's fused graph; returns (hidden, presents, prompt_kv).

    As :func:`prefill_skip_layers`, but the last ``kv_window`` prompt tokens (not only the
    last one) run through the deep layers, so that every layer has the window queries that
    score its cache. Each deep layer has two attentions (:class:`SkippedPrefillInputs`):
    over the skipped tokens' independent K/V at a prefill (plain ops, which the export puts
    in an If: passes/prefill_branch.py), over the cache at decode (GroupQueryAttention,
    updating its shared buffer in place; it also runs at a prefill, over the window's few
    slots), and ``is_prefill`` picks. A prefill's deep-layer cache is ``prompt_kv``
    (``prompt_present.{i}.key/value``, the skipped tokens then the window's); ``presents``
    are the decode cache.
    """
    layers = decoder.layers
    presents = []
    cut = len(layers) - decoder.prefill_skip
    for index in range(cut):
        layer = layers[index]
        inputs = per_layer.layer(index)
        hidden, key, value = layer(hidden, *decoder.rotary_caches(layer), inputs, past[2 * index], past[2 * index + 1])
        presents += [key, value]

    # A prefill: every layer's cache is exactly the new tokens (the runtime feeds lengths = S).
    seq = torch._shape_as_tensor(hidden)[1]
    is_prefill = per_layer.lengths[cut] == seq
    window = torch.minimum(seq, torch.tensor(decoder.kv_window, dtype=torch.long))
    start = torch.where(is_prefill, seq - window, seq * 0)
    cut_rows = torch.arange(seq * 0, start, dtype=torch.long)  # empty at decode
    cut_hidden = hidden.index_select(1, cut_rows)
    new = seq - start
    window_slots = torch.arange(start, seq, dtype=torch.long)
    hidden = hidden.index_select(1, window_slots)
    rows = (hidden[..., :1] * 0)[:, None]  # zeros [B, 1, S', 1]
    prompt_kv = []
    for index in range(cut, len(layers)):
        layer = layers[index]
        inputs = SkippedPrefillInputs(
            prompt_mask=per_layer.prompt_mask(index, seq, window_slots, layer.window),
            window_slots=window_slots,
            steps=per_layer.spanning(index, torch.where(is_prefill, new, per_layer.lengths[index]), rows),
            is_prefill=is_prefill,
            skipped=layer.input_layernorm(cut_hidden),
            slots=cut_rows,
        )
        hidden, key, value = layer(hidden, *decoder.rotary_caches(layer), inputs, past[2 * index], past[2 * index + 1])
        presents += [key, value]
        prompt_kv += [layer.self_attn.prompt_key, layer.self_attn.prompt_value]
    return hidden, presents, prompt_kv
