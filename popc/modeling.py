"""An export-friendly view of a Hugging Face decoder: the same math, explicit KV cache.

The Hugging Face modules carry Python-side caches, mask builders and dispatch that
tracing cannot follow (the TorchScript exporter fails on transformers' mask code). ``ExportableDecoder`` re-expresses the forward pass of every supported
family with plain tensor ops over the *same parameter objects*, so that:

* the KV cache is ordinary inputs/outputs (``past_key_values.{i}.key`` ->
  ``present.{i}.key``) with dynamic batch and sequence, and one graph serves
  prefill and decode;
* positions come from ``attention_mask`` inside the graph (left padding works);
* every FFN is ``down(act(gate(x)) * up(x))`` under ``layers.{i}/mlp``, a stable
  shape for the graph-rewrite passes to match.

Tests check this module's ONNX export against the Hugging Face model itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from popc import families, ort_contrib
from popc.errors import PopcError
from popc.families import FamilySpec
from popc.gqa_inputs import FusedInputs, fused_inputs, layer_inputs
from popc.prefill_skip import SkippedPrefillInputs, prefill_skip_fused_layers, prefill_skip_layers
from popc.rotary import apply_rotary, rotary_tables

ACTIVATIONS = {
    "silu": lambda x: nn.functional.silu(x),
    "swish": lambda x: nn.functional.silu(x),
    "gelu": lambda x: nn.functional.gelu(x),
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class DecoderShape:
    """The numbers a runtime needs to feed the graph: layers, KV heads, head size."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int


def family_spec(config) -> FamilySpec:
    """The family of a (text) config; the families share one forward with its switches."""
    spec = families.for_model_type(getattr(config, "model_type", None))
    if spec is None:
        raise PopcError(
            f"unsupported architecture {getattr(config, 'model_type', None)!r}; supported: {families.supported_labels()}"
        )
    return spec


def decoder_shape(config) -> DecoderShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return DecoderShape(
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
    )


class RMSNorm(nn.Module):
    """RMSNorm in fp32 with an effective scale (Gemma's ``1 + w`` is folded in at build time)."""

    def __init__(self, hf_norm: nn.Module, unit_offset: bool):
        super().__init__()
        weight = hf_norm.weight.detach().float()
        self.weight = nn.Parameter(weight + 1.0 if unit_offset else weight, requires_grad=False)
        self.eps = float(getattr(hf_norm, "variance_epsilon", getattr(hf_norm, "eps", 1e-6)))
        self.fused = False  # trace as ORT's SimplifiedLayerNormalization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return ort_contrib.simplified_layer_norm(x, self.weight, self.eps)
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.eps) * self.weight


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: the FFN shape POP rewrites (SwiGLU / GeGLU)."""

    def __init__(self, hf_mlp: nn.Module, activation: str):
        super().__init__()
        self.gate_proj = hf_mlp.gate_proj
        self.up_proj = hf_mlp.up_proj
        self.down_proj = hf_mlp.down_proj
        if activation not in ACTIVATIONS:
            raise PopcError(f"unsupported FFN activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Projection(nn.Module):
    """A bias-free linear layer over a slice of a fused HF expert tensor (``[out, in]``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.t())


class Expert(nn.Module):
    """One routed expert as a gated FFN, so that it has the same shape POP matches."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, activation: str):
        super().__init__()
        channels = gate_up.shape[0] // 2
        self.gate_proj = Projection(gate_up[:channels])
        self.up_proj = Projection(gate_up[channels:])
        self.down_proj = Projection(down)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Top-k routed experts (Mixtral, Qwen-MoE), plus Qwen-MoE's gated shared expert.

    Every expert runs on every token and is weighted by its routing weight, zero for
    experts a token is not routed to: the same sums as Hugging Face's gather/scatter,
    in a traceable form. (Each expert's FFN is followed by ``Mul`` with its routing
    weight column, which the POP pass uses to score experts on their own tokens.)
    """

    def __init__(self, hf_moe: nn.Module, config):
        super().__init__()
        activation = config.hidden_act
        router = hf_moe.gate
        self.router_weight = router.weight
        self.top_k = router.top_k
        self.normalize = bool(getattr(router, "norm_topk_prob", True))
        experts = hf_moe.experts
        self.experts = nn.ModuleList(
            Expert(experts.gate_up_proj[e], experts.down_proj[e], activation) for e in range(experts.num_experts)
        )
        shared = getattr(hf_moe, "shared_expert", None)
        self.shared_expert = GatedMLP(shared, activation) if shared is not None else None
        self.shared_expert_gate = getattr(hf_moe, "shared_expert_gate", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(torch.matmul(x, self.router_weight.t()), dim=-1)
        top_values, top_index = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            top_values = top_values / top_values.sum(dim=-1, keepdim=True)
        routing = torch.zeros_like(probs).scatter(-1, top_index, top_values)
        out = None
        for index, expert in enumerate(self.experts):
            contribution = expert(x) * routing[..., index : index + 1]
            out = contribution if out is None else out + contribution
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def is_sparse_moe(module: nn.Module) -> bool:
    return hasattr(module, "experts") and hasattr(module, "gate")


class Attention(nn.Module):
    """Grouped-query attention over ``past ++ new`` keys, without repeating the KV heads."""

    def __init__(self, hf_attn: nn.Module, config, features: FamilySpec, scaling: float):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            hf_attn.q_proj,
            hf_attn.k_proj,
            hf_attn.v_proj,
            hf_attn.o_proj,
        )
        shape = decoder_shape(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.scaling = scaling
        self.q_norm = RMSNorm(hf_attn.q_norm, features.unit_offset_norm) if features.qk_norm else None
        self.k_norm = RMSNorm(hf_attn.k_norm, features.unit_offset_norm) if features.qk_norm else None
        self.fused = False  # trace as ORT's GroupQueryAttention (see ExportableDecoder)
        self.window: int | None = None
        # KV eviction (popc.kv_eviction): the last ``kv_window`` queries (before RoPE) of
        # each call, a graph output the runtime scores the prompt's tokens with.
        self.kv_window: int | None = None
        self.window_query: torch.Tensor | None = None
        # POP-prefill under KV eviction: a deep layer's prompt K/V (independent + window rows).
        self.prompt_key: torch.Tensor | None = None
        self.prompt_value: torch.Tensor | None = None

    def forward(self, x, cos, sin, mask, past_key, past_value):
        if self.fused:
            return self.forward_fused(x, cos, sin, mask, past_key, past_value)
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        key = torch.cat([past_key, k], dim=2)
        value = torch.cat([past_value, v], dim=2)
        return self.o_proj(self._grouped_attention(q, key, value, mask)), key, value

    def forward_fused(self, x, cos_cache, sin_cache, inputs: FusedInputs, past_key, past_value):
        """q/k/v projections (+ Gemma's per-head QK-norm), then one GroupQueryAttention node
        doing RoPE, the cache concat and the attention."""
        batch, seq, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q = self.q_norm(q.view(batch, seq, self.num_heads, self.head_dim)).view(batch, seq, -1)
            k = self.k_norm(k.view(batch, seq, self.num_kv_heads, self.head_dim)).view(batch, seq, -1)
        if self.kv_window is not None:
            self.window_query = q[:, -self.kv_window :]
        if isinstance(inputs, SkippedPrefillInputs):
            # At a prefill the window rows attend over the skipped tokens' independent K/V
            # (plain ops, which the export puts in an If: passes/prefill_branch.py); at decode
            # over the cache (``steps``), whose buffer GQA updates in place. GQA also runs at a
            # prefill, over the window's few slots; is_prefill picks.
            skipped_key, skipped_value = self.independent_kv(inputs.skipped, cos_cache, sin_cache, inputs.slots)
            prompt_out, self.prompt_key, self.prompt_value = ort_contrib.prefill_only(
                inputs.is_prefill, *self._attend_prompt(q, k, v, skipped_key, skipped_value, inputs, cos_cache, sin_cache)
            )
            out, key, value = self._attend(q, k, v, past_key, past_value, inputs.steps, cos_cache, sin_cache)
            out = torch.where(inputs.is_prefill, prompt_out, out)
        else:
            out, key, value = self._attend(q, k, v, past_key, past_value, inputs, cos_cache, sin_cache)
        return self.o_proj(out), key, value

    def _attend(self, q, k, v, past_key, past_value, inputs: FusedInputs, cos_cache, sin_cache):
        return ort_contrib.group_query_attention(
            q, k, v, past_key, past_value, inputs.seqlens_k, inputs.total, cos_cache, sin_cache, inputs.bias,
            self.num_heads, self.num_kv_heads, self.scaling, -1 if self.window is None else self.window,
        )  # fmt: skip

    def _attend_prompt(self, q, k, v, skipped_key, skipped_value, inputs: SkippedPrefillInputs, cos_cache, sin_cache):
        """The window rows over the skipped tokens' K/V and their own, in plain ops: ORT's
        GroupQueryAttention takes several new tokens over a past for one row at a time only."""
        batch = q.shape[0]
        cos, sin = cos_cache.index_select(0, inputs.window_slots), sin_cache.index_select(0, inputs.window_slots)
        q = ort_contrib.rotate(q.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = ort_contrib.rotate(k.view(batch, -1, self.num_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(batch, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        key, value = torch.cat([skipped_key, k], dim=2), torch.cat([skipped_value, v], dim=2)
        return self._grouped_attention(q, key, value, inputs.prompt_mask), key, value

    def _grouped_attention(self, q, key, value, mask):
        """``q`` [B, H, S, d] over ``key``, ``value`` [B, KVH, T, d] under the additive ``mask``
        [B, S, T], without repeating the KV heads."""
        batch, _, seq, _ = q.shape
        groups = self.num_heads // self.num_kv_heads
        # Query heads of one KV head side by side: [B, KVH, G*S, D] @ [B, KVH, D, T].
        q = q.reshape(batch, self.num_kv_heads, groups * seq, self.head_dim)
        scores = torch.matmul(q, key.transpose(2, 3)) * self.scaling
        total = scores.shape[-1]
        scores = scores.view(batch, self.num_kv_heads, groups, seq, total) + mask[:, None, None]
        probs = torch.softmax(scores, dim=-1).view(batch, self.num_kv_heads, groups * seq, total)
        out = torch.matmul(probs, value).view(batch, self.num_heads, seq, self.head_dim)
        return out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)

    def independent_kv(self, x, cos_cache, sin_cache, slots):
        """POP-prefill's K/V of normed hidden states ``x`` [B, n, H] at cache ``slots`` [n]:
        k/v projections, k-norm, and the rotation GQA gives the keys it caches."""
        batch = x.shape[0]
        k = self.k_proj(x).view(batch, -1, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        v = self.v_proj(x).view(batch, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos_cache.index_select(0, slots), sin_cache.index_select(0, slots)
        return ort_contrib.rotate(k.transpose(1, 2), cos, sin), v


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer: nn.Module, config, features: FamilySpec, scaling: float, window: int | None, rope: str):
        super().__init__()
        offset = features.unit_offset_norm
        self.sandwich = features.sandwich_norm
        self.window = window
        self.rope = rope
        self.input_layernorm = RMSNorm(hf_layer.input_layernorm, offset)
        self.self_attn = Attention(hf_layer.self_attn, config, features, scaling)
        self.self_attn.window = window
        self.post_attention_layernorm = RMSNorm(hf_layer.post_attention_layernorm, offset)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(hf_layer.pre_feedforward_layernorm, offset)
            self.post_feedforward_layernorm = RMSNorm(hf_layer.post_feedforward_layernorm, offset)
        activation = getattr(config, "hidden_activation", None) or config.hidden_act
        self.mlp = SparseMoE(hf_layer.mlp, config) if is_sparse_moe(hf_layer.mlp) else GatedMLP(hf_layer.mlp, activation)

    def forward(self, hidden, cos, sin, mask, past_key, past_value):
        attn, key, value = self.self_attn(self.input_layernorm(hidden), cos, sin, mask, past_key, past_value)
        if self.sandwich:
            hidden = hidden + self.post_attention_layernorm(attn)
            hidden = hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))
        else:
            hidden = hidden + attn
            hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, key, value


class ExportableDecoder(nn.Module):
    """``forward(input_ids, attention_mask, *past) -> (logits, *present)``.

    ``attention_mask`` is ``[batch, past + new]`` with 1 for real tokens, 0 for padding
    (left padding). ``past`` alternates key, value per layer, each ``[batch, kv_heads,
    past, head_dim]``.
    """

    def __init__(
        self,
        hf_model: nn.Module,
        prefill_skip: int | None = None,
        drop_layers: int | None = None,
        fused: bool = False,
        kv_window: int | None = None,
    ):
        super().__init__()
        config = hf_model.config
        features = family_spec(config)
        if getattr(config, "attn_logit_softcapping", None):
            raise PopcError("attention logit soft-capping (Gemma 2) is not supported")
        base = hf_model.model
        shape = decoder_shape(config)
        self.shape = shape
        # The weight, not HF's module: Gemma's module scales inside its forward.
        self.embed_weight = base.embed_tokens.weight
        scale = getattr(base.embed_tokens, "embed_scale", None)
        self.embed_scale = float(scale) if features.embed_scale and scale is not None else None
        self.softcap = getattr(config, "final_logit_softcapping", None)
        scalar = getattr(config, "query_pre_attn_scalar", None)
        scaling = float(scalar) ** -0.5 if scalar else shape.head_dim**-0.5

        # Rotary tables come from the HF module, so every static RoPE variant it knows works.
        rotary = base.rotary_emb
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * shape.num_layers)
        self.rope_names: list[str] = []
        for name in sorted(set(layer_types)):
            inv_freq = getattr(rotary, f"{name}_inv_freq", None)
            scale = getattr(rotary, f"{name}_attention_scaling", None)
            if inv_freq is None:
                inv_freq, scale = rotary.inv_freq, rotary.attention_scaling
            self.register_buffer(f"inv_freq_{name}", inv_freq.detach().float().clone(), persistent=False)
            setattr(self, f"rope_scale_{name}", float(scale))
            self.rope_names.append(name)

        windows = features.sliding_windows(config)
        layers = [
            DecoderLayer(hf_layer, config, features, scaling, windows[index], layer_types[index])
            for index, hf_layer in enumerate(base.layers)
        ]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(base.norm, features.unit_offset_norm)
        self.lm_head = hf_model.lm_head
        # POP-prefill (popc.prefill_skip): the deepest N layers skipped by all prompt tokens but the last.
        if prefill_skip is not None and not 0 <= prefill_skip < shape.num_layers:
            raise PopcError(f"--prefill-skip must be in [0, {shape.num_layers - 1}], got {prefill_skip}")
        self.prefill_skip = prefill_skip
        # The ShortGPT-style baseline: the deepest N layers removed for every token.
        if drop_layers is not None and not 0 <= drop_layers < shape.num_layers:
            raise PopcError(f"--drop-layers must be in [0, {shape.num_layers - 1}], got {drop_layers}")
        if drop_layers and prefill_skip is not None:
            raise PopcError("give --prefill-skip or --drop-layers, not both")
        self.drop_layers = drop_layers or 0
        # ORT's fused operators (popc.ort_contrib); POP-prefill keeps its own attention, except
        # under KV eviction (popc.prefill_skip.prefill_skip_fused_layers).
        if fused and (self.drop_layers or (prefill_skip is not None and kv_window is None)):
            raise PopcError("the fused ORT graph does not combine with --prefill-skip/--drop-layers; add --no-fuse")
        self.fused = fused
        if fused:
            for module in self.modules():
                if isinstance(module, (RMSNorm, Attention)):
                    module.fused = True
            # GroupQueryAttention's rotary tables: one row per slot, RoPE scaling folded in.
            slots = torch.arange(shape.max_positions, dtype=torch.float32)
            for name in self.rope_names:
                freqs = torch.outer(slots, getattr(self, f"inv_freq_{name}"))
                scale = getattr(self, f"rope_scale_{name}")
                self.register_buffer(f"cos_cache_{name}", (freqs.cos() * scale).contiguous(), persistent=False)
                self.register_buffer(f"sin_cache_{name}", (freqs.sin() * scale).contiguous(), persistent=False)
        # KV eviction: per-layer masks in, every layer's window queries out (forward_fused).
        if kv_window is not None and not fused:
            raise PopcError("--kv-evict is built on the fused graph (GroupQueryAttention); drop --no-fuse")
        self.kv_window = kv_window
        for layer in self.layers:
            layer.self_attn.kv_window = kv_window

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *past: torch.Tensor,
        logits_to_keep: torch.Tensor | None = None,
        layer_lengths: torch.Tensor | None = None,
    ):
        batch, seq = input_ids.shape
        total = attention_mask.shape[1]
        hidden = nn.functional.embedding(input_ids, self.embed_weight)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        if self.fused:
            return self.forward_fused(hidden, input_ids, attention_mask, past, logits_to_keep, layer_lengths)

        # Positions count real tokens only, so left padding does not shift them.
        positions = (torch.cumsum(attention_mask, dim=-1) - 1).clamp(min=0)[:, total - seq :]
        rope = {
            name: rotary_tables(positions, getattr(self, f"inv_freq_{name}"), getattr(self, f"rope_scale_{name}"))
            for name in self.rope_names
        }

        # Additive masks [B, S, T] in cache-index coordinates (what HF's mask builders use).
        key_index = (torch.cumsum(torch.ones_like(attention_mask[0]), dim=0) - 1).unsqueeze(0)
        query_index = key_index[:, total - seq :].transpose(0, 1)
        allowed = (key_index <= query_index).unsqueeze(0) & attention_mask.bool().unsqueeze(1)
        negative = torch.finfo(torch.float32).min
        masks: dict[int | None, torch.Tensor] = {}
        for layer in self.layers:
            if layer.window not in masks:
                keep = allowed
                if layer.window is not None:
                    keep = keep & (key_index > query_index - layer.window).unsqueeze(0)
                masks[layer.window] = torch.where(keep, 0.0, negative)

        presents = []
        if self.prefill_skip is not None or self.drop_layers:
            hidden, presents = prefill_skip_layers(self, hidden, rope, masks, past)
        else:
            for index, layer in enumerate(self.layers):
                cos, sin = rope[layer.rope]
                hidden, key, value = layer(
                    hidden, cos, sin, masks[layer.window], past[2 * index], past[2 * index + 1]
                )
                presents += [key, value]
        if logits_to_keep is not None:
            hidden = ort_contrib.keep_last_positions(hidden, logits_to_keep)
        return (self.logits(hidden), *presents)

    def forward_fused(self, hidden, input_ids, attention_mask, past, logits_to_keep, layer_lengths=None):
        # With KV eviction, attention_mask is per layer [L, B, T] (layer_inputs, per layer).
        if self.kv_window is not None:
            per_layer = layer_inputs(attention_mask, layer_lengths, input_ids)
        else:
            inputs = fused_inputs(attention_mask, input_ids)
        presents, prompt_kv = [], []
        if self.prefill_skip:
            hidden, presents, prompt_kv = prefill_skip_fused_layers(self, hidden, per_layer, past)
        else:
            for index, layer in enumerate(self.layers):
                if self.kv_window is not None:
                    inputs = per_layer.layer(index)
                hidden, key, value = layer(hidden, *self.rotary_caches(layer), inputs, past[2 * index], past[2 * index + 1])
                presents += [key, value]
        if logits_to_keep is not None:
            hidden = ort_contrib.keep_last_positions(hidden, logits_to_keep)
        if self.kv_window is not None:
            presents += [layer.self_attn.window_query for layer in self.layers]
        return (self.logits(hidden), *presents, *prompt_kv)

    def rotary_caches(self, layer: DecoderLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """GroupQueryAttention's cos and sin tables for ``layer``'s RoPE."""
        return getattr(self, f"cos_cache_{layer.rope}"), getattr(self, f"sin_cache_{layer.rope}")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq = hidden.shape[0], hidden.shape[1]
        hidden = self.norm(hidden)
        if self.fused:
            # One 3-D MatMul, no reshapes; the tracer folds the transposed weight into a copy,
            # which passes/ort_fusions.py's tied-head rule turns back into the embedding table.
            logits = nn.functional.linear(hidden, self.lm_head.weight, self.lm_head.bias)
        else:
            # A 2-D linear traces to Gemm(transB=1) over the weight as stored.
            logits = nn.functional.linear(hidden.reshape(batch * seq, -1), self.lm_head.weight, self.lm_head.bias)
            logits = logits.view(batch, seq, -1)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
