"""POP-online in eager PyTorch over the Hugging Face model: the ground truth.

``PopReference(model, settings)`` swaps each decoder layer's FFN for a wrapper that
runs the POP math of ``templates/pop_ffn.py`` directly on the Hugging Face weights:

* prefill (no cache yet): dense FFN; scores over the prompt's real tokens
  (each token's row of ``Z = act(x Wg^T) * (x Wu^T)`` at unit L2 norm, then each
  channel's L2 norm over tokens); the top ``R + C`` channels, sorted, are the
  partition of that sequence and layer;
* decode: gate for the partition's channels only, the top ``K`` candidates by
  |activation| per token, up and down for retained + kept channels only.

Ties are broken towards the lower index, as ONNX TopK does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from popc.pop import PopSettings

EPSILON = 1e-12


def _top(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest along the last axis, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :count]


class PopFFN(nn.Module):
    """One gated FFN (``down(act(gate(x)) * up(x))``) with POP-online."""

    def __init__(self, mlp: nn.Module, owner: PopReference):
        super().__init__()
        self.mlp = mlp
        self.owner = owner
        self.partition: torch.Tensor | None = None  # [batch, R + C]
        self.score: torch.Tensor | None = None  # [batch, D], kept for tests of near-ties

    def static_score(self) -> torch.Tensor:
        mlp = self.mlp
        return mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner, mlp = self.owner, self.mlp
        retain, candidate, keep, static = (int(v) for v in owner.counts)
        if owner.prefill:
            z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            normalised = z / (z.norm(dim=-1, keepdim=True) + EPSILON) * owner.token_mask.unsqueeze(-1).to(z.dtype)
            score = normalised.pow(2).sum(dim=1).sqrt()  # [B, D]
            if static:
                score = self.static_score().to(score.dtype).expand_as(score)
            self.score = score
            self.partition = _top(score, retain + candidate)
            return mlp.down_proj(z)

        batch, seq, _ = x.shape
        partition = self.partition.unsqueeze(1).expand(batch, seq, -1)  # [B, S, R + C]
        gate = torch.einsum("bsh,bskh->bsk", x, mlp.gate_proj.weight[partition])
        activated = mlp.act_fn(gate)
        chosen = _top(activated[..., retain:].abs(), keep)
        ids = torch.cat([partition[..., :retain], partition[..., retain:].gather(-1, chosen)], dim=-1)
        weights = torch.cat([activated[..., :retain], activated[..., retain:].gather(-1, chosen)], dim=-1)
        up = torch.einsum("bsh,bskh->bsk", x, mlp.up_proj.weight[ids])
        return torch.einsum("bsk,bskh->bsh", weights * up, mlp.down_proj.weight.t()[ids])


class PopReference:
    """A Hugging Face causal LM whose FFNs prune themselves (POP-online), in eager PyTorch.

    The wrapped model is modified in place (its layers' ``mlp`` modules are swapped);
    :meth:`remove` restores them.
    """

    def __init__(self, model: nn.Module, settings: PopSettings):
        self.model = model
        self.settings = settings
        self.counts = settings.counts(model.config.intermediate_size)
        self.prefill = True
        self.token_mask: torch.Tensor | None = None
        self.ffns: list[PopFFN] = []
        for layer in model.model.layers:
            wrapper = PopFFN(layer.mlp, self)
            layer.mlp = wrapper
            self.ffns.append(wrapper)

    def remove(self) -> None:
        for layer, wrapper in zip(self.model.model.layers, self.ffns):
            layer.mlp = wrapper.mlp

    @property
    def partitions(self) -> list[torch.Tensor]:
        return [ffn.partition for ffn in self.ffns]

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache=None):
        """One forward: a prefill when ``cache`` is None, else decode mode for every token given."""
        from transformers import DynamicCache

        self.prefill = cache is None
        self.token_mask = attention_mask[:, -input_ids.shape[1] :]
        if cache is None:
            cache = DynamicCache(config=self.model.config)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        return output.logits, output.past_key_values

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int = 0) -> list[list[int]]:
        """Greedy generation over left-padded prompts (no early stop): the new ids per prompt."""
        longest = max(map(len, prompts))
        ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            mask[row, longest - len(prompt) :] = 1
        logits, cache = self.step(ids, mask)
        generated = []
        for _ in range(max_new_tokens):
            next_ids = logits[:, -1].argmax(-1, keepdim=True)
            generated.append(next_ids)
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
            logits, cache = self.step(next_ids, mask, cache)
        return torch.cat(generated, dim=1).tolist()
