"""GGUF files: read the header cheaply, then dequantise to float32 with transformers.

``read_gguf_architecture`` walks only the header, so an unsupported file fails in
milliseconds. Loading parses the file once for config, tokenizer and weights (a
shared ``gguf.GGUFReader``) and keeps an fp32 copy in the fp32 cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from popc import families
from popc.errors import PopcError
from popc.loading import fp32_cache
from popc.loading.hf_dir import quiet_transformers
from popc.loading.loaded import LoadedModel, check_supported, short_error, supported_summary
from popc.progress import Progress

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_STRING, _ARRAY = 8, 9


def read_gguf_architecture(path: Path) -> tuple[str, str | None]:
    """``general.architecture`` (and ``general.name``) from a GGUF header.

    Raises PopcError if the file is not a readable GGUF file.
    """

    def bad(why: str) -> PopcError:
        return PopcError(f"{path} is not a readable GGUF file: {why}")

    try:
        with path.open("rb") as f:

            def read(n: int) -> bytes:
                data = f.read(n)
                if len(data) != n:
                    raise bad("file is truncated (ends inside the header)")
                return data

            def u32() -> int:
                return struct.unpack("<I", read(4))[0]

            def u64() -> int:
                return struct.unpack("<Q", read(8))[0]

            def string() -> str:
                n = u64()
                if n > 1 << 24:
                    raise bad("implausible string length in header")
                return read(n).decode("utf-8", errors="replace")

            def skip(vtype: int) -> None:
                if vtype in _SCALAR_SIZES:
                    f.seek(_SCALAR_SIZES[vtype], 1)
                elif vtype == _STRING:
                    f.seek(u64(), 1)
                elif vtype == _ARRAY:
                    etype, count = u32(), u64()
                    if etype in _SCALAR_SIZES:
                        f.seek(_SCALAR_SIZES[etype] * count, 1)
                    else:
                        for _ in range(count):
                            skip(etype)
                else:
                    raise bad(f"unknown metadata value type {vtype}")

            magic = f.read(4)
            if magic != b"GGUF":
                raise bad(f"wrong magic bytes {magic!r} (expected b'GGUF')")
            version = u32()
            if version not in (2, 3):
                raise bad(f"unsupported GGUF version {version} (expected 2 or 3)")
            u64()  # tensor count
            kv_count = u64()
            if kv_count > 1 << 20:
                raise bad("implausible metadata count in header")
            arch: str | None = None
            name: str | None = None
            for _ in range(kv_count):
                key = string()
                vtype = u32()
                if key in ("general.architecture", "general.name") and vtype == _STRING:
                    value = string()
                    if key == "general.architecture":
                        arch = value
                    else:
                        name = value
                    if arch is not None and name is not None:
                        break
                elif arch is not None and key.startswith("tokenizer."):
                    break  # general.* keys come first; don't walk the vocabulary
                else:
                    skip(vtype)
            if f.tell() > path.stat().st_size:
                raise bad("file is truncated (ends inside the header)")
    except PopcError:
        raise
    except OSError as e:
        raise PopcError(f"cannot read {path}: {e.strerror or e}") from e
    if arch is None:
        raise bad("no general.architecture in its metadata")
    return arch, name


def cache_key(path: Path) -> str:
    """The fp32 cache key of a GGUF file: its name, and a hash of where it is, its size and mtime."""
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:48]
    return f"{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def load_gguf(path: Path, progress: Progress, *, source: str, key: str | None = None) -> LoadedModel:
    """The float32 model in ``path``: from the fp32 cache, else dequantised (and then cached)."""
    arch, name = read_gguf_architecture(path)
    if families.for_gguf(arch, name) is None:
        raise PopcError(f"{path}: unsupported GGUF architecture '{arch}'; {supported_summary()}")

    entry = fp32_cache.entry_path(key or cache_key(path))
    cached = fp32_cache.load_entry(entry, progress, source)
    if cached is not None:
        return cached

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    progress.stage(f"reading GGUF {path.name}")
    t0 = time.perf_counter()
    with shared_gguf_reader(), quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        except Exception as e:
            raise PopcError(f"{path} is not a readable GGUF file: {short_error(e)}") from e
        family = check_supported(config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                path.parent, gguf_file=path.name, local_files_only=True, trust_remote_code=False
            )
        except Exception as e:
            raise PopcError(f"cannot read the tokenizer in {path}: {short_error(e)}") from e
        progress.stage("dequantising GGUF to float32 (first time only; ~20-60 s)")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent,
                gguf_file=path.name,
                config=config,
                dtype=torch.float32,
                local_files_only=True,
                trust_remote_code=False,
            )
        except Exception as e:
            raise PopcError(f"{path} is not a readable GGUF file: {short_error(e)}") from e
    model.eval()
    progress.stage(f"dequantised in {time.perf_counter() - t0:.1f} s; writing fp32 cache")
    try:
        fp32_cache.write_entry(entry, model, tokenizer, source=source, family=family)
    except OSError as e:  # the model is loaded; only the next load is slower
        progress.stage(f"warning: could not write the fp32 cache at {entry}: {e}")
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, family=family)


@contextlib.contextmanager
def shared_gguf_reader() -> Iterator[None]:
    """Parse each GGUF once: transformers re-parses the file for config, tokenizer and
    weights (about 7 s each for Gemma's 262k-token vocabulary)."""
    try:
        import gguf
    except ImportError as e:
        raise PopcError("loading GGUF files needs the gguf package: run `pip install gguf`") from e
    original = gguf.GGUFReader
    readers: dict[str, Any] = {}

    def cached_reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return original(path, *args, **kwargs)
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = original(path)
        return readers[key]

    gguf.GGUFReader = cached_reader  # type: ignore[misc]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]
        readers.clear()
