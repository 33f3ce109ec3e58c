"""Where popc keeps what it builds once and reuses: one root for every cache.

``$POPC_CACHE_DIR``, else ``$XDG_CACHE_HOME/popc``, else ``~/.cache/popc``. Beneath it:
``fp32/`` (dequantised model copies), ``gguf/`` (assembled or fetched GGUF files),
``oplib/`` (the built op library), ``ort-headers/``, ``data/`` (evaluation text and
tasks) and ``bench/`` (peer builds and cached exports).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """popc's cache directory, read from the environment at each call."""
    explicit = os.environ.get("POPC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "popc"
