"""KV-cache eviction after a long prompt, in eager PyTorch: the ground truth for LaProx.

Read top to bottom: a prefill that keeps each layer's keys (after rotary), values and
the attention probabilities of the last ``window`` prompt queries; the scores of every
method; the selection of kept tokens under a whole-cache budget; the compaction; and
a decode loop over the compacted, per-layer (and, for SnapKV, per-head) cache.

The methods, their scores, the chosen defaults and the budget:
:mod:`popc.reference.kv_selection`.

Sliding-window layers (Gemma 3: 5 of every 6) are left out of the eviction: their cache
is already bounded by their window (512 for Gemma-3-270m), does not grow with the
prompt, and holds exactly the local context the model was trained to see; evicting in
them would change the model even at "full" budget. They keep their last ``window``
prompt tokens and slide as usual; the budget counts the full-attention layers only.

Positions: each kept key keeps the rotary rotation of its original index, and later
tokens are rotated at their true position (prompt length + step), whatever the
compacted lengths. The attention mask is built from the stored positions, so causal
order and sliding windows need no cache-index arithmetic.

Batch: 1. A left-padded batch would carry each row's pad count, score only real
tokens (pads scored -inf), keep per-row lengths (the rows' compacted lengths differ
under LaProx), and pad the compacted caches to the longest row with a key mask.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from popc.modeling import family_spec
from popc.reference.kv_selection import (
    DEFAULT_WINDOW,
    LayerKV,
    OutputProjection,
    Prefill,
    select_tokens,
)
from popc.rotary import apply_rotary


@dataclass
class Compacted:
    """A compacted cache ready to decode: per-layer caches and the next true position."""

    cache: list[LayerKV]
    next_position: int
    kept: list[int] = field(default_factory=list)  # entries per evictable layer (per head)
    seconds: float = 0.0  # scores + selection + compaction


# --------------------------------------------------------------------------- the model


class EvictionReference:
    """A HF Llama-family or Gemma-3 causal LM run layer by layer over an evictable cache."""

    def __init__(self, model: nn.Module):
        self.model = model
        config = model.config
        self.base = model.model
        self.layers = list(self.base.layers)
        self.windows = family_spec(config).sliding_windows(config)
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.evictable = [index for index, window in enumerate(self.windows) if window is None]
        self.typed_rope = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters
        self.softcap = getattr(config, "final_logit_softcapping", None)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.o_projs = [OutputProjection(self.layers[i].self_attn.o_proj.weight.detach()) for i in self.evictable]

    # ---- one layer

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor, index: int):
        if self.typed_rope:
            cos, sin = self.base.rotary_emb(hidden, positions, self.layer_types[index])
        else:
            cos, sin = self.base.rotary_emb(hidden, positions)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _qkv(self, index: int, x: torch.Tensor, positions: torch.Tensor):
        """q [1, H, S, d], k, v [1, Hkv, S, d] of layer ``index``, rotated at ``positions``."""
        attn = self.layers[index].self_attn
        shape = (1, x.shape[1], -1, self.head_dim)
        q = attn.q_proj(x).view(shape)
        k = attn.k_proj(x).view(shape)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self._rope(x, positions, index)
        return apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin), v

    def _block(self, index: int, hidden: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layer around an attention function ``attend(x) -> [1, S, H*d]``
        (Gemma's sandwich norms where the layer has them)."""
        layer = self.layers[index]
        attn_out = layer.self_attn.o_proj(attend(layer.input_layernorm(hidden)))
        pre_ffn = getattr(layer, "pre_feedforward_layernorm", None)
        if pre_ffn is not None:  # Gemma: norm after attention, norms around the FFN
            hidden = hidden + layer.post_attention_layernorm(attn_out)
            return hidden + layer.post_feedforward_layernorm(layer.mlp(pre_ffn(hidden)))
        hidden = hidden + attn_out
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.base.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _check_softcap(self, index: int) -> None:
        if getattr(self.layers[index].self_attn, "attn_logit_softcapping", None) is not None:
            raise NotImplementedError("attention logit soft-capping is not supported by this reference")

    # ---- prefill

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, window: int = DEFAULT_WINDOW, skip: int = 0, pop=None) -> Prefill:
        """Run the prompt ``ids`` [1, T]; keep every layer's cache and the window's attention.

        ``skip`` > 0 adds POP-prefill: every prompt token but the last ``window`` skips the
        deepest ``skip`` layers, whose K/V for those tokens come from the hidden state at the
        cut through each layer's own input norm, k/v projections, k-norm and RoPE; the window
        runs every layer. ``pop`` (a :class:`popc.reference.PopReference` wrapping the model)
        then sees the window's tokens only in those layers' FFNs."""
        if ids.shape[0] != 1:
            raise ValueError("the eviction reference runs batch 1")
        start = time.perf_counter()
        length = ids.shape[1]
        window = min(window, length)
        cut = len(self.layers) - skip
        positions = torch.arange(length)[None]
        hidden = self.base.embed_tokens(ids)
        key_pos = torch.arange(length)
        causal = key_pos[None, :] <= key_pos[:, None]
        caches, probs, outs = [], [], []
        for index in range(len(self.layers)):
            self._check_softcap(index)
            attn = self.layers[index].self_attn
            span = self.windows[index]
            # A deep layer's queries are the window's; its skipped tokens' K/V independent.
            first = length - window if index >= cut else 0
            skipped = hidden[:, :first]

            def attend(x, index=index, attn=attn, span=span, first=first, skipped=skipped):
                q, k, v = self._qkv(index, x, positions[:, first:])
                if first:
                    _, k_skipped, v_skipped = self._qkv(index, self.layers[index].input_layernorm(skipped),
                                                        positions[:, :first])  # fmt: skip
                    k, v = torch.cat([k_skipped, k], dim=2), torch.cat([v_skipped, v], dim=2)
                caches.append(LayerKV(k[0], v[0], key_pos.expand(self.kv_heads, -1)))
                mask = causal[first:]
                if span is not None:
                    mask = mask & (key_pos[None, :] > key_pos[first:, None] - span)
                if span is None and not first:  # is_causal: SDPA's fused path, no T x T mask at 4k
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
                else:
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
                if span is None:
                    # The window rows only, recomputed: [H, w, T], never T x T for every layer.
                    qw = q[0, :, length - window - first :]
                    kw = k[0].repeat_interleave(self.heads // self.kv_heads, dim=0)
                    logits = (qw @ kw.transpose(1, 2)) * attn.scaling
                    p = logits.masked_fill(~causal[length - window :], float("-inf")).softmax(-1)
                    probs.append(p)
                    wo = out[0, :, length - window - first :].transpose(0, 1).reshape(window, -1)
                    outs.append(F.linear(wo, attn.o_proj.weight))
                else:
                    probs.append(None)
                    outs.append(None)
                return out.transpose(1, 2).reshape(1, length - first, -1)

            saved_mask = None
            if first and pop is not None:  # the deep FFNs see the window's tokens only
                saved_mask, pop.token_mask = pop.token_mask, pop.token_mask[:, first:]
            hidden = torch.cat([skipped, self._block(index, hidden[:, first:], attend)], dim=1)
            if saved_mask is not None:
                pop.token_mask = saved_mask
        last = self._logits(hidden[:, -1:])[0, -1]
        return Prefill(caches, probs, outs, last, length, window, time.perf_counter() - start)

    # ---- selection and compaction

    def select(self, prefill: Prefill, method: str, budget: float | int = 1.0, **options) -> list[torch.Tensor]:
        """Per evictable layer, the kept token indices [Hkv, n] (:func:`select_tokens`)."""
        return select_tokens(prefill, self.evictable, self.kv_heads, self.o_projs, method, budget, **options)

    def compact(self, prefill: Prefill, kept: list[torch.Tensor]) -> Compacted:
        """Each evictable layer's cache gathered to its kept tokens (per head); sliding-window
        layers keep their last ``window`` prompt tokens. Positions stay the original ones."""
        caches = []
        by_layer = dict(zip(self.evictable, kept))
        for index, layer in enumerate(prefill.cache):
            if index in by_layer:
                keep = by_layer[index]
            else:
                start = max(prefill.length - self.windows[index], 0)
                keep = torch.arange(start, prefill.length).expand(self.kv_heads, -1)
            gather = keep[..., None].expand(-1, -1, self.head_dim)
            caches.append(
                LayerKV(layer.keys.gather(1, gather), layer.values.gather(1, gather), layer.positions.gather(1, keep))
            )
        return Compacted(caches, prefill.length, [k.shape[1] for k in kept])

    def evict(self, prefill: Prefill, method: str, budget: float | int = 1.0, **options) -> Compacted:
        """``select`` then ``compact``, timed."""
        start = time.perf_counter()
        compacted = self.compact(prefill, self.select(prefill, method, budget, **options))
        compacted.seconds = time.perf_counter() - start
        return compacted

    # ---- decode over the compacted cache

    @torch.no_grad()
    def extend(self, state: Compacted, ids: torch.Tensor) -> torch.Tensor:
        """Run new tokens ``ids`` [1, S] at their true positions over ``state`` (appended in
        place); their logits [S, vocab]."""
        count = ids.shape[1]
        query_pos = torch.arange(state.next_position, state.next_position + count)
        hidden = self.base.embed_tokens(ids)
        for index in range(len(self.layers)):
            attn = self.layers[index].self_attn
            span = self.windows[index]
            cache = state.cache[index]

            def attend(x, index=index, attn=attn, span=span, cache=cache):
                q, k, v = self._qkv(index, x, query_pos[None])
                cache.append(k[0], v[0], query_pos[None])
                groups = self.heads // self.kv_heads
                keys = cache.keys.repeat_interleave(groups, dim=0)  # [H, N, d]
                values = cache.values.repeat_interleave(groups, dim=0)
                key_pos = cache.positions.repeat_interleave(groups, dim=0)[:, None, :]  # [H, 1, N]
                allowed = key_pos <= query_pos[None, :, None]
                if span is not None:
                    allowed = allowed & (key_pos > query_pos[None, :, None] - span)
                logits = (q[0] @ keys.transpose(1, 2)) * attn.scaling
                p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
                return (p @ values).transpose(0, 1).reshape(1, count, -1)

            hidden = self._block(index, hidden, attend)
        state.next_position += count
        return self._logits(hidden)[0]

    def greedy(self, state: Compacted, first_logits: torch.Tensor, steps: int) -> list[int]:
        """Greedy tokens from the prefill's last logits, decoding over ``state``."""
        tokens = [int(first_logits.argmax())]
        for _ in range(steps - 1):
            logits = self.extend(state, torch.tensor([[tokens[-1]]]))
            tokens.append(int(logits[-1].argmax()))
        return tokens

    def continuation_nll(self, state: Compacted, first_logits: torch.Tensor, ids: torch.Tensor) -> float:
        """Mean NLL of ``ids`` [1, S] following the prompt, teacher-forced over ``state``."""
        logits = torch.cat([first_logits[None], self.extend(state, ids[:, :-1])])
        return float(F.cross_entropy(logits.float(), ids[0]))
