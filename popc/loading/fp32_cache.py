"""The fp32 cache: a plain safetensors copy of each dequantised GGUF model.

Dequantising a GGUF with transformers takes tens of seconds, so the first load of a
GGUF writes the float32 weights, config and tokenizer to ``cache_root()/fp32/<key>``
and later loads read that copy. An entry is complete when its marker file exists
(it is written last, inside the staged directory); an entry that fails to load is
removed and rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from popc.atomic import atomic_directory
from popc.cache import cache_root
from popc.loading.hf_dir import load_hf_dir
from popc.loading.loaded import LoadedModel, short_error
from popc.progress import Progress

CACHE_FORMAT = 2  # 2: config names its architecture and drops the GGUF quantization_config
MARKER = "popc-cache.json"


def entry_path(key: str) -> Path:
    return cache_root() / "fp32" / key


def is_complete(entry: Path) -> bool:
    return (entry / MARKER).is_file()


def load_entry(entry: Path, progress: Progress, source: str) -> LoadedModel | None:
    """The model cached at ``entry``, or None when there is none (a broken one is removed)."""
    if not is_complete(entry):
        return None
    try:
        marker = json.loads((entry / MARKER).read_text())
        if marker.get("format") != CACHE_FORMAT:
            raise ValueError("old cache format")
        progress.stage(f"loading cached fp32 copy from {entry}")
        loaded = load_hf_dir(entry, source=source)
        if marker.get("chat_template") and not loaded.tokenizer.chat_template:
            raise ValueError("chat template lost")
        return loaded
    except Exception as e:  # noqa: BLE001 - a bad cache entry is rebuilt, not fatal
        progress.stage(f"cached copy at {entry} is unusable ({short_error(e)}); rebuilding it")
        shutil.rmtree(entry, ignore_errors=True)
        return None


def write_entry(entry: Path, model: Any, tokenizer: Any, *, source: str, family: str) -> None:
    """Write fp32 safetensors, config and tokenizer to ``entry``, all or nothing."""
    from safetensors.torch import save_file

    # Another process may finish the same entry first; its complete copy is kept.
    with atomic_directory(entry, complete=is_complete) as staging:
        save_file(_fp32_tensors(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        # A self-describing HF checkpoint: other tools (onnxruntime-genai's builder, `popc bench`'s
        # peers) dispatch on `architectures`, and the weights are already dequantised fp32.
        config.architectures = [type(model).__name__]
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            with contextlib.suppress(Exception):
                model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {
            "format": CACHE_FORMAT,
            "source": source,
            "family": family,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
        for f in staging.iterdir():  # safetensors leaves owner-only modes
            f.chmod(0o644)


def _fp32_tensors(model: Any) -> dict[str, Any]:
    """The state dict as contiguous fp32 CPU tensors, a tied lm_head stored once."""
    import torch

    state = model.state_dict()
    in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
    if (
        getattr(model.config, "tie_word_embeddings", False)
        and in_emb is not None
        and out_emb is not None
        and out_emb.weight.data_ptr() == in_emb.weight.data_ptr()
    ):
        # Keep only the input embedding; from_pretrained re-ties lm_head.
        in_name = _param_name(model, in_emb.weight)
        for k in [k for k, v in state.items() if v.data_ptr() == in_emb.weight.data_ptr()]:
            if k != in_name:
                del state[k]
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in state.items():
        v = v.detach().to("cpu", torch.float32).contiguous()
        ident = (v.data_ptr(), v.numel())
        if ident in seen:  # any other shared storage: safetensors refuses it, so store a copy
            v = v.clone()
        seen.add(ident)
        tensors[k] = v
    return tensors


def _param_name(model: Any, tensor: Any) -> str | None:
    for name, parameter in model.named_parameters():
        if parameter is tensor:
            return name
    return None
