"""Which loader a MODEL string goes to: a built-in name, a file, a directory or a hub id.

A path that exists always wins over a built-in or hub-id reading of the same string,
so that ``./smollm2-135m`` means the directory. Nothing here downloads from the
Hugging Face hub: a hub id is looked up in the local HF cache only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from popc.artifact import CONFIG_NAME as EXPORT_CONFIG_NAME
from popc.artifact import FORMAT_NAME as EXPORT_FORMAT_NAME
from popc.errors import PopcError
from popc.loading.builtin import load_builtin
from popc.loading.gguf import load_gguf
from popc.loading.hf_dir import load_hf_dir, refuse_pickles
from popc.loading.loaded import BUILTIN_MODELS, LoadedModel, check_supported, short_error
from popc.progress import Progress, or_silent

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def load_model(spec: str, progress: Progress | None = None) -> LoadedModel:
    """Resolve ``spec`` (built-in name, .gguf path, local dir, or cached hub id) and load it."""
    progress = or_silent(progress)
    if not isinstance(spec, str) or not spec.strip():
        raise PopcError(
            "no model given: pass a built-in name "
            f"({', '.join(BUILTIN_MODELS)}), a .gguf file, a model directory or a hub id"
        )
    spec = spec.strip()

    if spec in BUILTIN_MODELS:
        return load_builtin(spec, progress)

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            _refuse_export(spec, path.parent)
            raise PopcError(
                f"{spec} is a file but not a .gguf file: pass a .gguf file, or the directory "
                "holding config.json and *.safetensors"
            )
        return load_gguf(path, progress, source=str(path))
    if path.is_dir():
        _refuse_export(spec, path)
        return load_directory(path, progress, source=str(path))
    if path.exists():
        raise PopcError(f"{spec} is neither a file nor a directory")

    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _load_hub_id(spec, progress)

    raise PopcError(
        f"{spec}: no such file or directory, and not a built-in model{_near_miss_hint(spec)}; "
        f"built-in models: {', '.join(BUILTIN_MODELS)}; a hub id looks like 'org/name'"
    )


def load_directory(path: Path, progress: Progress, *, source: str) -> LoadedModel:
    """A Hugging Face checkpoint directory, or a directory holding one .gguf file."""
    config_file = path / "config.json"
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if not config_file.is_file():
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], progress, source=str(ggufs[0]))
        if len(ggufs) > 1:
            raise PopcError(f"{path} holds several .gguf files ({', '.join(p.name for p in ggufs)}): pass one of them")
        raise PopcError(
            f"{path} has no model in it: expected config.json plus *.safetensors weights "
            "(a Hugging Face model directory), or a single .gguf file"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise PopcError(f"{config_file} is not valid JSON: {short_error(e)}") from e
    if not isinstance(config, dict):
        raise PopcError(f"{config_file} is not a JSON object")
    family = check_supported(config)  # before touching any weights

    if not any(path.glob("*.safetensors")):
        refuse_pickles(path)
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], progress, source=str(ggufs[0]))
        raise PopcError(
            f"{path} has config.json but no *.safetensors weights: expected model.safetensors "
            "(or sharded model-0000x-of-0000y.safetensors with model.safetensors.index.json)"
        )
    progress.stage(f"loading {path}")
    return load_hf_dir(path, source=source, family=family)


def _refuse_export(spec: str, directory: Path) -> None:
    """A popc export is an output, not a model to export: say so, and name its source.
    (An export written into a checkpoint directory, beside its config.json, does not count.)"""
    if (directory / "config.json").is_file():
        return
    try:
        config = json.loads((directory / EXPORT_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT_NAME:
        return
    source = config.get("source")
    origin = f" (popc.json 'source': {source!r})" if source else ""
    raise PopcError(
        f"{spec} is a popc export, not a model to export: pass the model it was exported from"
        f"{origin}{_near_miss_hint(spec)}"
    )


def _near_miss_hint(spec: str) -> str:
    """" (did you mean 'smollm2-135m'?)" when ``spec`` looks like a built-in's name."""
    lowered = spec.lower().replace("_", "-").rstrip("/")
    close = [name for name in BUILTIN_MODELS if lowered == name or (lowered and lowered in name)]
    return f" (did you mean '{close[0]}'?)" if close else ""


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


def _load_hub_id(repo_id: str, progress: Progress) -> LoadedModel:
    hub_cache = _hf_hub_cache()
    snapshot: Path | None = None
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(repo_id=repo_id, cache_dir=str(hub_cache), local_files_only=True))
    except Exception:  # noqa: BLE001 - ImportError, LocalEntryNotFoundError, HFValidationError, ...
        snapshot = None
    if snapshot is None or not snapshot.is_dir():
        raise PopcError(
            f"'{repo_id}' is not a local path, and the Hugging Face model '{repo_id}' is not in "
            f"the local cache ({hub_cache}); popc does not download (this machine may be "
            f"offline): on a connected machine run `huggingface-cli download {repo_id}` and "
            "copy its cache (~/.cache/huggingface/hub) here (or set HF_HOME), or pass a local "
            "model directory or .gguf file"
        )
    progress.stage(f"using {repo_id} from the local Hugging Face cache")
    return load_directory(snapshot, progress, source=f"{repo_id} (Hugging Face cache: {snapshot})")
