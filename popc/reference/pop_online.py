"""POP-online in eager PyTorch over the Hugging Face model: the ground truth.

``PopReference(model, settings)`` swaps each decoder layer's FFN (or, in sparse MoE
layers, the routed experts) for a wrapper that runs the POP math of
``templates/pop_ffn.py`` directly on the Hugging Face weights:

* prefill (no cache yet): dense FFN; scores over the prompt's real tokens
  (each token's row of ``Z = act(x Wg^T) * (x Wu^T)`` at unit L2 norm, then each
  channel's L2 norm over tokens); the top ``R + C`` channels, sorted, are the
  partition of that sequence and layer (and expert: an expert scores the real
  tokens routed to it, or all real tokens when none is);
* decode: gate for the partition's channels only, the top ``K`` candidates by
  |activation| per token, up and down for retained + kept channels only.

With ``settings.score == "output"`` (score mode 2, output-aware) both scores are weighted by
each channel's down-projection row norm ``||Wd_j||`` (:meth:`GatedWeights.output_norm`): the
prefill score times it, and the decode candidates ranked by |activation| times it.

Routers and shared experts stay dense. Ties go to the lower index, as ONNX TopK.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from popc.modeling import is_sparse_moe
from popc.pop import MODE_OUTPUT, MODE_STATIC, PopSettings
from popc.reference.generate import greedy_generate

EPSILON = 1e-12


def top_indices(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest along the last axis, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :count]


@dataclass
class GatedWeights:
    """One FFN, one row per channel: gate (fc1), up and down-transposed (fc2^T) are ``[D, H]``.

    ``up`` is None for a plain ``fc2(act(fc1(x) + b1)) + b2`` MLP (biases optional).
    """

    gate: torch.Tensor
    up: torch.Tensor | None
    down_rows: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]
    gate_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def static_score(self) -> torch.Tensor:
        score = self.gate.norm(dim=1) * self.down_rows.norm(dim=1)
        return score if self.up is None else score * self.up.norm(dim=1)

    def output_norm(self) -> torch.Tensor:
        """``||Wd_j||`` [D]: the L2 norm of each channel's down-projection row."""
        return self.down_rows.norm(dim=1)


class PopState:
    """The partition of one FFN for every sequence of the batch, and its prefill scores."""

    def __init__(self) -> None:
        self.partition: torch.Tensor | None = None  # [batch, R + C]
        self.score: torch.Tensor | None = None  # [batch, D], kept for tests of near-ties
        # The last decode step's candidate ranking keys [batch, seq, C] (near-ties, again).
        self.decode_key: torch.Tensor | None = None


def pop_ffn(x: torch.Tensor, weights: GatedWeights, owner: PopReference, state: PopState, token_mask) -> torch.Tensor:
    """POP-online for ``x`` [B, S, H]: dense + partition at prefill, pruned at decode."""
    retain, candidate, keep, mode = (int(v) for v in owner.counts)
    static, output_aware = mode == MODE_STATIC, mode == MODE_OUTPUT
    gate_bias = weights.gate_bias if weights.gate_bias is not None else 0.0
    down_bias = weights.down_bias if weights.down_bias is not None else 0.0
    # Scores and top-k in float32 at least, as the graph's ops do in float16 / bfloat16 exports.
    score_dtype = torch.promote_types(x.dtype, torch.float32)
    if owner.prefill:
        z = weights.act(x @ weights.gate.t() + gate_bias)
        if weights.up is not None:
            z = z * (x @ weights.up.t())
        wide = z.to(score_dtype)
        normalised = wide / (wide.norm(dim=-1, keepdim=True) + EPSILON) * token_mask.unsqueeze(-1).to(score_dtype)
        score = normalised.pow(2).sum(dim=1).sqrt()  # [B, D]
        if output_aware:
            score = score * weights.output_norm().to(score.dtype)
        if static:
            score = weights.static_score().to(score.dtype).expand_as(score)
        state.score = score
        state.partition = top_indices(score, retain + candidate)
        return z @ weights.down_rows + down_bias

    batch, seq, _ = x.shape
    partition = state.partition.unsqueeze(1).expand(batch, seq, -1)  # [B, S, R + C]
    gate = torch.einsum("bsh,bskh->bsk", x, weights.gate[partition])
    if weights.gate_bias is not None:
        gate = gate + weights.gate_bias[partition]
    activated = weights.act(gate)
    key = activated[..., retain:].to(score_dtype).abs()
    if output_aware:
        key = key * weights.output_norm().to(key.dtype)[partition[..., retain:]]
    state.decode_key = key
    chosen = top_indices(key, keep)
    ids = torch.cat([partition[..., :retain], partition[..., retain:].gather(-1, chosen)], dim=-1)
    kept = torch.cat([activated[..., :retain], activated[..., retain:].gather(-1, chosen)], dim=-1)
    if weights.up is not None:
        kept = kept * torch.einsum("bsh,bskh->bsk", x, weights.up[ids])
    return torch.einsum("bsk,bskh->bsh", kept, weights.down_rows[ids]) + down_bias


class PopFFN(nn.Module):
    """A dense layer's gated FFN (``down(act(gate(x)) * up(x))``) with POP-online."""

    def __init__(self, mlp: nn.Module, owner: PopReference):
        super().__init__()
        self.mlp = mlp
        self.owner = owner
        self.states = [PopState()]
        self.weights = GatedWeights(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.t(), mlp.act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pop_ffn(x, self.weights, self.owner, self.states[0], self.owner.token_mask)


class PopExperts(nn.Module):
    """The routed experts of a sparse MoE layer, each with its own POP-online partition."""

    def __init__(self, experts: nn.Module, owner: PopReference):
        super().__init__()
        self.experts = experts
        self.owner = owner
        channels = experts.gate_up_proj.shape[1] // 2
        self.weights = [
            GatedWeights(gate_up[:channels], gate_up[channels:], down.t(), experts.act_fn)
            for gate_up, down in zip(experts.gate_up_proj, experts.down_proj)
        ]
        self.states = [PopState() for _ in self.weights]

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        token_mask = self.owner.token_mask
        batch, seq = token_mask.shape
        x = hidden.view(batch, seq, -1)
        out = torch.zeros_like(x)
        for expert, (weights, state) in enumerate(zip(self.weights, self.states)):
            routing = (top_k_weights * (top_k_index == expert)).sum(-1).view(batch, seq, 1).to(x.dtype)
            mask = token_mask * (routing[..., 0] > 0)
            mask = torch.where(mask.amax(dim=1, keepdim=True) > 0, mask, token_mask)
            out = out + pop_ffn(x, weights, self.owner, state, mask) * routing
        return out.view_as(hidden)


class PopReference:
    """A Hugging Face causal LM whose FFNs prune themselves (POP-online), in eager PyTorch.

    The wrapped model is modified in place; :meth:`remove` restores it.
    """

    def __init__(self, model: nn.Module, settings: PopSettings):
        self.model = model
        self.settings = settings
        config = model.config
        self.counts = settings.counts(int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size))
        self.prefill = True
        self.token_mask: torch.Tensor | None = None
        self.wrappers: list[PopFFN | PopExperts] = []
        for layer in model.model.layers:
            if is_sparse_moe(layer.mlp):
                wrapper = PopExperts(layer.mlp.experts, self)
                layer.mlp.experts = wrapper
            else:
                wrapper = PopFFN(layer.mlp, self)
                layer.mlp = wrapper
            self.wrappers.append(wrapper)

    def remove(self) -> None:
        for layer, wrapper in zip(self.model.model.layers, self.wrappers):
            if isinstance(wrapper, PopExperts):
                layer.mlp.experts = wrapper.experts
            else:
                layer.mlp = wrapper.mlp

    @property
    def states(self) -> list[PopState]:
        """One per pruned FFN, in the order of the graph's ``past_partition.*`` inputs."""
        return [state for wrapper in self.wrappers for state in wrapper.states]

    @property
    def partitions(self) -> list[torch.Tensor]:
        return [state.partition for state in self.states]

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache=None):
        """One forward: a prefill when ``cache`` is None, else decode mode for every token given."""
        from transformers import DynamicCache

        self.prefill = cache is None
        self.token_mask = attention_mask[:, -input_ids.shape[1] :]
        if cache is None:
            cache = DynamicCache(config=self.model.config)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        return output.logits, output.cache

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int = 0) -> list[list[int]]:
        """Greedy generation over left-padded prompts (no early stop): the new ids per prompt."""
        return greedy_generate(self.step, prompts, max_new_tokens, pad_token_id)
