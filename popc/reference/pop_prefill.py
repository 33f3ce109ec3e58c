"""POP-prefill in eager PyTorch over the Hugging Face layers: the ground truth.

``SkipReference`` runs a Hugging Face causal LM layer by layer with any set of
layers skipped at prefill only (POP-prefill: their prompt K/V from independent
projections of the hidden state reaching them, the last prompt token through every
layer) or for every token (the ShortGPT-style baseline), optionally combined with
POP-online (:class:`popc.reference.PopReference`). The traced graph of the same
math is ``popc/prefill_skip.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from popc.modeling import family_spec
from popc.reference.generate import greedy_generate
from popc.reference.pop_online import PopFFN, pop_ffn, top_indices
from popc.rotary import apply_rotary


class LayerCache:
    """The minimal cache HF attention modules call: ``update(k, v, layer_idx) -> (K, V)``."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=2)
            value = torch.cat([self.values[layer_idx], value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if layer_idx in self.keys else 0


PARTITION_SOURCES = ("last", "cutoff", "static")


def ffn_input_norm(layer: nn.Module) -> nn.Module:
    """The norm in front of a HF decoder layer's FFN (Gemma's pre-FFN norm, else post-attention)."""
    norm = getattr(layer, "pre_feedforward_layernorm", None)
    return norm if norm is not None else layer.post_attention_layernorm


class SkipReference:
    """A HF causal LM run layer by layer with layers skipped at prefill and/or always.

    ``prefill_skip``: layers that every prompt token but the last skips at a prefill
    (their K/V for those tokens from the hidden state reaching them, through their own
    input norm / k,v projections / k-norm / RoPE). ``always_skip``: layers removed for
    every token (ShortGPT-style). ``pop``: a :class:`popc.reference.PopReference`
    already wrapping ``model`` (POP-online); ``partition_source`` says where the
    partitions of prefill-skipped layers come from:

    * ``"last"``: the last prompt token's FFN activations (the only token those FFNs see);
    * ``"cutoff"``: every real prompt token's hidden state at that layer through the
      layer's own FFN input norm, scored as POP scores a prompt;
    * ``"static"``: weight magnitudes.
    """

    def __init__(
        self,
        model: nn.Module,
        prefill_skip: Iterable[int] = (),
        always_skip: Iterable[int] = (),
        pop=None,
        partition_source: str = "last",
    ):
        self.model = model
        config = model.config
        self.base = model.model
        self.layers = list(self.base.layers)
        self.prefill_skip = set(prefill_skip)
        self.always_skip = set(always_skip)
        self.pop = pop
        if partition_source not in PARTITION_SOURCES:
            raise ValueError(f"partition_source must be one of {PARTITION_SOURCES}")
        self.partition_source = partition_source
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.windows = family_spec(config).sliding_windows(config)
        self.typed_rope = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @staticmethod
    def skip_deepest(model: nn.Module, count: int, **kwargs) -> SkipReference:
        """POP-prefill as exported: the deepest ``count`` layers skipped at prefill."""
        total = model.config.num_hidden_layers
        return SkipReference(model, prefill_skip=range(total - count, total), **kwargs)

    def _rope(self, hidden, positions, layer_type):
        if self.typed_rope:
            return self.base.rotary_emb(hidden, positions, layer_type)
        return self.base.rotary_emb(hidden, positions)

    @staticmethod
    def _mask(attention_mask, query_index, window):
        """Additive [B, 1, Q, T] mask in cache-index coordinates."""
        key_index = torch.arange(attention_mask.shape[1])
        allowed = (key_index[None, :] <= query_index[:, None])[None] & attention_mask.bool()[:, None, :]
        if window is not None:
            allowed = allowed & (key_index[None, :] > query_index[:, None] - window)[None]
        return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]

    def _layer(self, index, hidden, attention_mask, query_index, positions, cache):
        layer = self.layers[index]
        out = layer(
            hidden,
            attention_mask=self._mask(attention_mask, query_index, self.windows[index]),
            position_ids=positions,
            cache=cache,
            position_embeddings=self._rope(hidden, positions, self.layer_types[index]),
            use_cache=True,
        )
        return out[0] if isinstance(out, tuple) else out

    def _independent_kv(self, index, hidden, positions):
        layer = self.layers[index]
        attn = layer.self_attn
        batch, count = hidden.shape[:2]
        x = layer.input_layernorm(hidden)
        k = attn.k_proj(x).view(batch, count, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, count, -1, attn.head_dim).transpose(1, 2)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        cos, sin = self._rope(hidden, positions, self.layer_types[index])
        return apply_rotary(k, cos.unsqueeze(1), sin.unsqueeze(1)), v

    def _set_partition(self, index, hidden, token_mask):
        """Partitions of a prefill-skipped layer from the cut-off hidden, or static."""
        wrapper = self.pop.wrappers[index]
        if not isinstance(wrapper, PopFFN):
            raise ValueError("partition sources other than 'last' support dense FFNs only")
        retain, candidate = (int(v) for v in self.pop.counts[:2])
        state = wrapper.states[0]
        if self.partition_source == "static":
            score = wrapper.weights.static_score().expand(hidden.shape[0], -1)
            state.score, state.partition = score, top_indices(score, retain + candidate)
            return
        x = ffn_input_norm(self.layers[index])(hidden)
        saved = self.pop.prefill
        self.pop.prefill = True
        pop_ffn(x, wrapper.weights, self.pop, state, token_mask)
        self.pop.prefill = saved

    @torch.no_grad()
    def step(self, input_ids, attention_mask, cache=None, logits: str = "all"):
        """One forward: a prefill when ``cache`` is None (returns the last token's logits
        only), else every new token's logits. ``logits="none"`` skips the LM head."""
        prefill = cache is None
        cache = cache or LayerCache()
        batch, seq = input_ids.shape
        total = attention_mask.shape[1]
        token_mask = attention_mask[:, total - seq :]
        if self.pop is not None:
            self.pop.prefill = prefill
            self.pop.token_mask = token_mask
        positions = (torch.cumsum(attention_mask, -1) - 1).clamp(min=0)
        new_positions = positions[:, total - seq :]
        query_index = torch.arange(total - seq, total)
        hidden = self.base.embed_tokens(input_ids)
        for index in range(len(self.layers)):
            if index in self.always_skip:
                continue
            if prefill and index in self.prefill_skip and seq > 1:
                k, v = self._independent_kv(index, hidden[:, :-1], new_positions[:, :-1])
                cache.update(k, v, self.layers[index].self_attn.layer_idx)
                if self.pop is not None:
                    self.pop.token_mask = token_mask[:, -1:]
                last = self._layer(index, hidden[:, -1:], attention_mask, query_index[-1:], new_positions[:, -1:], cache)
                if self.pop is not None:
                    self.pop.token_mask = token_mask
                    if self.partition_source != "last":
                        self._set_partition(index, hidden, token_mask)
                hidden = torch.cat([hidden[:, :-1], last], dim=1)
            else:
                hidden = self._layer(index, hidden, attention_mask, query_index, new_positions, cache)
        if logits == "none":
            return None, cache
        if prefill:
            hidden = hidden[:, -1:]
        out = self.model.lm_head(self.base.norm(hidden))
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out, cache

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int = 0):
        """Greedy generation over left-padded prompts (no early stop): new ids per prompt."""
        return greedy_generate(self.step, prompts, max_new_tokens, pad_token_id)


@torch.no_grad()
def continuation_nll(reference: SkipReference, windows: torch.Tensor, prompt: int, batch: int = 8) -> float:
    """Mean NLL of tokens ``[prompt, W)`` of each window after a prefill of ``[0, prompt - 1)``
    (what ``popc eval`` scores: every scored token in decode mode, on the prefilled cache)."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        ids = windows[start : start + batch]
        rows, width = ids.shape
        _, cache = reference.step(ids[:, : prompt - 1], torch.ones(rows, prompt - 1, dtype=torch.long), logits="none")
        logits, _ = reference.step(ids[:, prompt - 1 : -1], torch.ones(rows, width - 1, dtype=torch.long), cache)
        logp = torch.log_softmax(logits.double(), dim=-1)
        nll = -logp.gather(-1, ids[:, prompt:, None]).squeeze(-1)
        total += float(nll.sum())
        count += nll.numel()
    return total / count
