"""What an export declares: its graph's input and output names, and popc.json.

popc.json records what the graph takes and returns, the options it was made with (POP's
regions, POP-prefill's skipped layers, quantization, KV eviction) and the versions that
made it; onnxruntime-genai's ``genai_config.json`` is written beside a fused dense export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from popc import __version__, families, kv_eviction
from popc.artifact import FORMAT_NAME, FORMAT_VERSION, ExportLocation
from popc.loading import LoadedModel
from popc.modeling import decoder_shape
from popc.pop import SCORES, PopSettings

if TYPE_CHECKING:
    from popc.export import ExportPlan

OPSET = 20  # the ONNX opset popc traces to


# Overridable input (default 0 = every position): n > 0 keeps the last n positions' logits,
# so a prefill computes the LM head for the one token it samples from (Hugging Face's name).
LOGITS_TO_KEEP = "logits_to_keep"


def io_names(num_layers: int, kv_evict: bool = False, prompt_layers: Sequence[int] = ()) -> tuple[list[str], list[str]]:
    """Graph input and output names (the Optimum / onnxruntime-genai convention; an eviction
    export's per-layer mask, window queries and POP-prefill's prompt caches: popc.kv_eviction)."""
    cache_in = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    cache_out = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    if kv_evict:
        windows = [kv_eviction.window_query_name(i) for i in range(num_layers)]
        inputs = ["input_ids", kv_eviction.LAYER_MASK, kv_eviction.LAYER_LENGTHS, *cache_in, LOGITS_TO_KEEP]
        prompts = [kv_eviction.prompt_present_name(i, kind) for i in prompt_layers for kind in ("key", "value")]
        return inputs, ["logits", *cache_out, *windows, *prompts]
    return ["input_ids", "attention_mask", *cache_in, LOGITS_TO_KEEP], ["logits", *cache_out]


def prompt_layers(num_layers: int, prefill_skip: int | None, kv_window: int | None) -> list[int]:
    """The deep layers whose prefill cache is an output of its own (POP-prefill under KV
    eviction: popc.prefill_skip.prefill_skip_fused_layers)."""
    if kv_window is None or not prefill_skip:
        return []
    return list(range(num_layers - prefill_skip, num_layers))


def versions() -> dict[str, str]:
    found = {"popc": __version__}
    for package in ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """End-of-sequence ids: the generation config's, else the tokenizer's."""
    generation = getattr(loaded.model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return sorted({int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None})


def export_config(loaded: LoadedModel, location: ExportLocation, plan: ExportPlan) -> dict[str, Any]:
    config = loaded.model.config
    shape = decoder_shape(config)
    deep = prompt_layers(shape.num_layers, plan.prefill_skip, plan.kv_window)
    inputs, outputs = io_names(shape.num_layers, kv_evict=plan.kv_window is not None, prompt_layers=deep)
    tokenizer = loaded.tokenizer
    eos_ids = eos_token_ids(loaded)
    dtype = plan.dtype  # canonical (ExportPlan.__post_init__)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_file": location.model_file,
        "source": loaded.source,
        "family": loaded.family,
        "model_type": config.model_type,
        "dtype": dtype,
        "num_layers": shape.num_layers,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "max_positions": shape.max_positions,
        "num_experts": getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None),
        "eos_token_ids": eos_ids,
        "pad_token_id": tokenizer.pad_token_id,
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "inputs": {
            "input_ids": "int64 [batch, sequence]",
            "attention_mask": "int64 [batch, past_sequence + sequence]; 1 = token, 0 = left padding",
            "past_key_values.{i}.key|value": f"{dtype} [batch, num_kv_heads, past_sequence, head_dim]",
            LOGITS_TO_KEEP: "int64 [] (optional, default 0): > 0 returns the last n positions' logits only",
        },
        "outputs": {
            "logits": "float32 [batch, sequence (or logits_to_keep), vocab]",
            "present.{i}.key|value": f"{dtype} [batch, num_kv_heads, past_sequence + sequence, head_dim]",
        },
        "input_names": inputs,
        "output_names": outputs,
        "opset": OPSET,
        "versions": versions(),
        "pop": None if plan.pop is None else pop_config(plan.pop, config),
        "prefill_skip": None if plan.prefill_skip is None else prefill_config(plan.prefill_skip, shape.num_layers, plan.kv_window),
        "drop_layers": plan.drop_layers or None,
        "ort_fusions": ORT_FUSIONS_NOTE if plan.fused else None,
        "quant": None if plan.quant is None else plan.quant.config(),
        "kv_eviction": None if plan.kv_window is None else kv_eviction.export_section(plan.kv_window, deep),
    }


ORT_FUSIONS_NOTE = {
    "attention": "com.microsoft.GroupQueryAttention (RoPE, KV concat, grouped-query attention; packed QKV)",
    "norms": "SimplifiedLayerNormalization / com.microsoft.SkipSimplifiedLayerNormalization",
    "cache": "a left-padded row's keys are rotated by slot index (position + padding): a fused export's "
    "KV cache is its own, equal to Hugging Face's for unpadded rows",
    "multi_token_extend": "several new tokens over a non-empty cache: one row per call (ORT's kernel)",
}


def pop_channels(config) -> int:
    """Width of the FFNs POP prunes: the routed experts' in MoE models, else the FFN's."""
    return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


# How a POP FFN's weights lie in the file, for any runtime that reads them itself: one
# contiguous row per channel (the gather kernels read a kept channel as one stream), each
# matrix stored once and shared by the prefill (dense) and decode (gathered) branches.
WEIGHT_LAYOUT = "channel-rows-v1: gate, up and down as [D, H], row d = channel d (down is W_down transposed)"


def pop_config(pop: PopSettings, config) -> dict[str, Any]:
    """The POP section of popc.json: default regions (fractions) and what they mean."""
    return {
        "method": "pop-online",
        "retain": pop.retain,
        "candidate": pop.candidate,
        "keep": pop.keep,
        "sparsity": round(pop.sparsity, 6),
        "score": pop.score,
        # The channel scores the graph computes (its FFN nodes take output_norm): the runtime
        # refuses "output" on exports without this entry.
        "scores": list(SCORES),
        "intermediate_size": pop_channels(config),
        "weight_layout": WEIGHT_LAYOUT,
        "state_inputs": "past_partition.{i} int64 [batch, retain+candidate] -> present_partition.{i}",
        "config_input": "pop_config int64 [4] = (retain, candidate, keep channel counts, score mode: "
        "0 activation, 1 static, 2 output-aware)",
    }


def prefill_config(skip: int, num_layers: int, kv_window: int | None = None) -> dict[str, Any]:
    """The POP-prefill section of popc.json; under KV eviction the last ``kv_window`` prompt
    tokens run every layer (their queries score the cache), not only the last."""
    through = "the last prompt token" if kv_window is None else f"the last {kv_window} prompt tokens"
    return {
        "method": "pop-prefill",
        "layers": skip,
        "cutoff": num_layers - skip,
        "skipped_layers": list(range(num_layers - skip, num_layers)),
        "kv": "independent projections of the cut-off hidden state (input norm, k/v proj, k-norm, RoPE)",
        "every_layer": through,
        "logits": f"a prefill returns the logits of {through} only",
        "partitions": f"POP-online partitions of skipped layers: from {through}",
    }


def genai_config(loaded: LoadedModel, plan: ExportPlan, model_file: str) -> dict[str, Any] | None:
    """onnxruntime-genai's ``genai_config.json`` for a fused dense export (else None), so its
    runtime (C, C++, C#, Java, Python) runs the export as it is, KV cache shared in place."""
    config = loaded.model.config
    # FamilySpec.genai_type: set where the fused dense graph is exactly onnxruntime-genai's
    # decoder interface (checked by tests/test_genai_interop.py).
    genai_type = families.family(loaded.family).genai_type
    if not plan.fused or plan.pop is not None or genai_type is None or plan.kv_window is not None:
        return None
    shape = decoder_shape(config)
    tokenizer = loaded.tokenizer
    eos = eos_token_ids(loaded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    return {
        "model": {
            "type": genai_type,
            "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad,
            "vocab_size": shape.vocab_size,
            "context_length": shape.max_positions,
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "popc", "provider_options": []},
                "head_size": shape.head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": shape.num_kv_heads,
                "num_hidden_layers": shape.num_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": shape.max_positions,
            "past_present_share_buffer": True,
        },
    }


