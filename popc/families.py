"""Every model family popc supports, in one table.

A :class:`FamilySpec` holds what popc knows of a family: the Hugging Face
``model_type`` values it covers, the GGUF ``general.architecture`` that maps to it,
the switches popc's one decoder forward needs (QK-norm, sandwich norms, embedding
scale, ``1 + w`` norms, which layers use the sliding window), whether
onnxruntime-genai runs its fused dense export, and the tiny config the tests build.

Adding a family is one entry in ``FAMILIES`` plus, where its math differs, one
modelling hook in ``popc/modeling.py``. This module imports nothing else from popc.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FamilySpec:
    """One family: how to recognise it, and the switches its forward pass takes."""

    name: str  # popc's family name (popc.json "family")
    model_types: tuple[str, ...]  # config.model_type values
    label: str  # for messages: "llama (Llama, SmolLM2)"
    gguf_architectures: tuple[str, ...] = ()  # GGUF general.architecture values
    qk_norm: bool = False  # per-head RMSNorm of q and k (Gemma 3)
    sandwich_norm: bool = False  # norms before and after attention and FFN (Gemma 3)
    embed_scale: bool = False  # embeddings times sqrt(hidden) (Gemma)
    unit_offset_norm: bool = False  # RMSNorm scale is 1 + w (Gemma)
    # "all": config.sliding_window applies to every layer (Mistral); "layer_types": only to the
    # layers config.layer_types marks "sliding_attention" (Gemma 3, Qwen2 with use_sliding_window).
    sliding_window: str = "layer_types"
    moe: bool = False  # routed experts (POP prunes each expert)
    genai_type: str | None = None  # onnxruntime-genai's model type, when its runtime runs our export
    # The tiny random-weight config the tests build: a transformers config class and its overrides
    # of the shared tiny shape (hidden 64, 4 heads / 2 KV heads, head_dim 16).
    tiny_config_class: str = ""
    tiny_config: Mapping[str, Any] = field(default_factory=dict)

    def sliding_windows(self, config: Any) -> list[int | None]:
        """Each layer's attention window (None: full attention), as Hugging Face applies it."""
        window = getattr(config, "sliding_window", None)
        layers = config.num_hidden_layers
        if window is None:
            return [None] * layers
        if self.sliding_window == "all":
            return [window] * layers
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
        return [window if kind == "sliding_attention" else None for kind in types]


_ROPE_10K = {"rope_type": "default", "rope_theta": 10000.0}
_ROPE_1M = {"rope_type": "default", "rope_theta": 1000000.0}

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="llama",
        model_types=("llama",),
        label="llama (Llama, SmolLM2)",
        gguf_architectures=("llama",),
        genai_type="llama",
        tiny_config_class="LlamaConfig",
        tiny_config={"num_hidden_layers": 2, "tie_word_embeddings": True, "rope_parameters": _ROPE_10K},
    ),
    FamilySpec(
        name="mistral",
        model_types=("mistral",),
        label="mistral",
        gguf_architectures=("mistral",),
        sliding_window="all",
        genai_type="mistral",
        tiny_config_class="MistralConfig",
        tiny_config={
            "num_hidden_layers": 2,
            "tie_word_embeddings": False,
            "sliding_window": None,
            "rope_parameters": _ROPE_10K,
        },
    ),
    FamilySpec(
        name="qwen2",
        model_types=("qwen2",),
        label="qwen2 (Qwen2, Qwen2.5)",
        gguf_architectures=("qwen2",),
        genai_type="qwen2",
        tiny_config_class="Qwen2Config",
        # Qwen2 always has q/k/v biases (no o_proj bias); untied lm_head here.
        tiny_config={
            "num_hidden_layers": 2,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "rope_parameters": _ROPE_1M,
        },
    ),
    FamilySpec(
        name="gemma3",
        model_types=("gemma3_text",),
        label="gemma3_text (text-only Gemma 3)",
        gguf_architectures=("gemma3",),
        qk_norm=True,
        sandwich_norm=True,
        embed_scale=True,
        unit_offset_norm=True,
        tiny_config_class="Gemma3TextConfig",
        tiny_config={
            "num_hidden_layers": 4,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            "sliding_window": 4,
            # != head_dim on purpose, so an exporter that assumes head_dim**-0.5 is caught.
            "query_pre_attn_scalar": 32,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
            "rope_parameters": {"sliding_attention": _ROPE_10K, "full_attention": _ROPE_1M},
        },
    ),
    FamilySpec(
        name="mixtral",
        model_types=("mixtral",),
        label="mixtral (Mixtral sparse MoE)",
        sliding_window="all",
        moe=True,
        tiny_config_class="MixtralConfig",
        tiny_config={
            "num_hidden_layers": 2,
            "intermediate_size": 96,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "rope_parameters": _ROPE_10K,
        },
    ),
    FamilySpec(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        label="qwen2_moe (Qwen-MoE, with shared expert)",
        moe=True,
        tiny_config_class="Qwen2MoeConfig",
        # Experts narrower than the shared expert, as in Qwen-MoE; top-k weights not renormalised.
        tiny_config={
            "num_hidden_layers": 2,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 96,
            "norm_topk_prob": False,
            "tie_word_embeddings": False,
            "rope_parameters": _ROPE_1M,
        },
    ),
)

BY_NAME: dict[str, FamilySpec] = {spec.name: spec for spec in FAMILIES}
BY_MODEL_TYPE: dict[str, FamilySpec] = {t: spec for spec in FAMILIES for t in spec.model_types}
BY_GGUF_ARCHITECTURE: dict[str, FamilySpec] = {a: spec for spec in FAMILIES for a in spec.gguf_architectures}


def family(name: str) -> FamilySpec:
    """The spec of popc family ``name`` (KeyError names the known ones)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(BY_NAME)}") from None


def for_model_type(model_type: str | None) -> FamilySpec | None:
    """The family a Hugging Face ``model_type`` belongs to, or None."""
    return BY_MODEL_TYPE.get(model_type or "")


def for_gguf(architecture: str, model_name: str | None = None) -> FamilySpec | None:
    """The family of a GGUF file: its ``general.architecture`` (a Mistral GGUF often says
    "llama" and names itself Mistral), or None."""
    spec = BY_GGUF_ARCHITECTURE.get(architecture)
    if spec is not None and spec.name == "llama" and model_name and "mistral" in model_name.lower():
        return BY_NAME["mistral"]
    return spec


def supported_labels() -> str:
    """``"llama (Llama, SmolLM2), mistral, ..."`` for messages."""
    return ", ".join(spec.label for spec in FAMILIES)
