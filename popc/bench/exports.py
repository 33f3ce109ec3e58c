"""The dense and POP exports a bench compares: the ones given, else exported once into the cache."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popc.bench.plan import POP_EXPORT_VARIANTS, BenchPlan
from popc.cache import cache_root
from popc.progress import Progress, or_silent

# The regions a cached POP export records. Any value serves: `pop_config` is a graph input,
# so one POP export runs at every sparsity the bench asks for.
CACHED_EXPORT_SPARSITY = 0.5


@dataclass(frozen=True)
class BenchExports:
    dense: Path | None  # the dense export's directory
    pop: Path | None  # the POP export's directory
    config: dict[str, Any]  # popc.json of the plan's directory
    spec: str  # the model spec for the PyTorch and genai variants


def model_spec(config: dict[str, Any]) -> str:
    """The model spec popc.json's ``source`` was exported from (a name ``popc export`` takes)."""
    source = str(config.get("source") or "")
    if source.startswith("built-in "):
        return source.split()[1]
    if " (Hugging Face cache: " in source:  # a hub id: "org/name (Hugging Face cache: ...)"
        return source.split(" (Hugging Face cache: ", 1)[0]
    return source


def resolve_exports(plan: BenchPlan, progress: Progress | None = None) -> BenchExports:
    """The plan's dense and POP exports; the ones its variants need but it does not name are
    exported from popc.json's source into ``cache_root()/bench/`` and reused by later runs."""
    from popc.artifact import read_export

    progress = or_silent(progress)
    location, config = read_export(plan.directory)
    dense, pop = plan.dense, plan.pop
    if config.get("pop"):
        pop = pop or location.directory
    else:
        dense = dense or location.directory
    spec = plan.model or model_spec(config)
    variants = plan.variants or ()
    needs = {"dense": "dense-ort" in variants, "pop": any(v in POP_EXPORT_VARIANTS for v in variants)}
    if dense is None and needs["dense"]:
        dense = _cached_export(spec, config, "dense", progress)
    if pop is None and needs["pop"]:
        pop = _cached_export(spec, config, "pop", progress)
    return BenchExports(dense=dense, pop=pop, config=config, spec=spec)


def _cached_export(spec: str, config: dict[str, Any], kind: str, progress: Progress) -> Path:
    from popc.defaults import settings_for_sparsity
    from popc.export import ExportPlan, export

    # hashlib, not hash(): str hashes differ between processes, and the cache must outlive one.
    key = f"{spec}\0{config.get('versions', {}).get('popc')}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    target = cache_root() / "bench" / f"{Path(spec).name or 'model'}-{digest}" / kind
    if not (target / "popc.json").is_file():
        progress.stage(f"exporting the {kind} model of {spec} to {target} (cached for later runs)")
        settings = settings_for_sparsity(CACHED_EXPORT_SPARSITY) if kind == "pop" else None
        # export() stages its output and renames it into place: an interrupted run leaves no half export.
        export(ExportPlan(model=spec, out=target, force=True, pop=settings), progress=progress)
    return target
