"""Read a user's text file (a prompt, a perplexity text), bounded.

``/dev/zero``, a FIFO or a multi-gigabyte file named by mistake must be an error,
not the kernel's OOM killer: only regular files are read, and only up to a size
no prompt or evaluation text comes near.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from popc.errors import PopcError

MAX_TEXT_BYTES = 64 << 20  # 64 MB: far past any context window or evaluation corpus


def _size(count: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def read_text_file(path: Path, option: str, *, limit: int = MAX_TEXT_BYTES, errors: str = "strict") -> str:
    """The text of the regular file ``path`` (given by the CLI option ``option``), at most ``limit`` bytes.

    Opened once and checked on the open file, so a path swapped for a device between the
    check and the read is still refused; the read stops one byte past ``limit`` whatever
    the file claims its size is."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore the flag).
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise PopcError(f"{option}: {path} is not a regular file")
            if info.st_size > limit:
                raise PopcError(f"{option}: {path} is {_size(info.st_size)}; popc reads at most {_size(limit)} of text")
            data = handle.read(limit + 1)
    except OSError as error:
        raise PopcError(f"cannot read {option} {path}: {error.strerror or error}") from None
    if len(data) > limit:  # it grew while being read
        raise PopcError(f"{option}: {path} is over {_size(limit)}; popc reads at most {_size(limit)} of text")
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as error:
        raise PopcError(f"cannot read {option} {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
