"""Load a Hugging Face checkpoint directory (config.json + safetensors) as a float32 model.

Safety: weights are read with ``use_safetensors=True`` (never unpickled) and
``trust_remote_code`` is always False.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from popc.errors import PopcError
from popc.loading.loaded import LoadedModel, check_supported, short_error

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def load_hf_dir(path: Path, *, source: str, family: str | None = None) -> LoadedModel:
    """Config, tokenizer and safetensors weights of ``path``, on CPU in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise PopcError(f"cannot read the config in {path}: {short_error(e)}") from e
        family = family or check_supported(config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise PopcError(
                f"cannot load a tokenizer from {path} (expected tokenizer.json or "
                f"tokenizer.model with tokenizer_config.json): {short_error(e)}"
            ) from e
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                path,
                config=config,
                dtype=torch.float32,
                use_safetensors=True,
                local_files_only=True,
                trust_remote_code=False,
                output_loading_info=True,
            )
        except Exception as e:
            raise PopcError(f"cannot load the weights in {path}: {short_error(e)}") from e
    # transformers fills missing weights with random values and drops unknown ones, with a
    # warning only: either way the export would not be this checkpoint's model.
    for kind in ("missing", "unexpected", "mismatched"):
        names = sorted(str(name) for name in info.get(f"{kind}_keys") or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise PopcError(
                f"the weights in {path} do not match its config.json: {len(names)} {kind} tensor(s) ({shown}); "
                "check that the safetensors files belong to this model"
            )
    model.to("cpu").eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, family=family)


def refuse_pickles(path: Path) -> None:
    """Raise if ``path``'s only weights are PyTorch pickles: unpickling can run code."""
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
    if pickles:
        raise PopcError(
            f"{path} only has PyTorch pickle weights ({', '.join(pickles[:3])}); popc never "
            "unpickles files (they can run code): convert them to safetensors on a trusted "
            "machine (model.save_pretrained(dir) in transformers >= 4.35 writes safetensors) "
            "or pass a .gguf file"
        )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' tqdm bars: popc reports its own progress."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF dequantiser uses tqdm directly, not transformers' switchable wrapper.
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - gguf support missing
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = _no_tqdm
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if enabled:
            hf_logging.enable_progress_bar()


def _no_tqdm(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
    return iterable
