"""The dense and POP exports a bench compares: the ones given, else exported once into the cache."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popc.bench.plan import POP_EXPORT_VARIANTS, BenchPlan, split_variant
from popc.cache import cache_root
from popc.progress import Progress, or_silent
from popc.quantize import QuantScheme

# The regions a cached POP export records. Any value serves: `pop_config` is a graph input,
# so one POP export runs at every sparsity the bench asks for.
CACHED_EXPORT_SPARSITY = 0.5


@dataclass(frozen=True)
class BenchExports:
    dense: Path | None  # the unquantized dense export's directory (in the plan's dtype)
    pop: Path | None  # the unquantized POP export's directory (in the plan's dtype)
    config: dict[str, Any]  # popc.json of the plan's directory
    spec: str  # the model spec for the PyTorch and genai variants
    # Per quantization scheme ("int4"): its (dense, POP) exports, and the scheme itself.
    quantized: dict[str, tuple[Path | None, Path | None]] = field(default_factory=dict)
    schemes: dict[str, QuantScheme] = field(default_factory=dict)

    def path_of(self, variant: str) -> Path | None:
        """The export a popc ORT variant runs (``dense-ort-int4`` -> the int4 dense export)."""
        base, scheme = split_variant(variant)
        dense, pop = self.quantized.get(scheme, (None, None)) if scheme else (self.dense, self.pop)
        return dense if base == "dense-ort" else pop


def model_spec(config: dict[str, Any]) -> str:
    """The model spec popc.json's ``source`` was exported from (a name ``popc export`` takes)."""
    source = str(config.get("source") or "")
    if source.startswith("built-in "):
        return source.split()[1]
    if " (Hugging Face cache: " in source:  # a hub id: "org/name (Hugging Face cache: ...)"
        return source.split(" (Hugging Face cache: ", 1)[0]
    return source


def export_scheme(config: dict[str, Any]) -> QuantScheme | None:
    """The quantization scheme popc.json records (``quant``), None for an fp32 export."""
    quant = config.get("quant")
    if not isinstance(quant, dict) or not quant.get("bits"):
        return None
    return QuantScheme(int(quant["bits"]), int(quant.get("block_size") or 32), int(quant.get("accuracy_level", 4)))


def resolve_exports(plan: BenchPlan, progress: Progress | None = None) -> BenchExports:
    """The plan's dense and POP exports, unquantized (in the plan's dtype: fp16 on CUDA by
    default) and in each of its quantization schemes; the ones its variants need but it does
    not name are exported from popc.json's source into ``cache_root()/bench/`` and reused by
    later runs. A quantized plan directory stands for its own scheme, whose twin (dense or
    POP) is exported in the same scheme (block size and accuracy level included); the fp32
    ones are exported for reference. An unquantized directory of another element type than
    the plan's stands for nothing: both are exported in the plan's."""
    from popc.artifact import read_export

    progress = or_silent(progress)
    location, config = read_export(plan.directory)
    own = export_scheme(config)
    spec = plan.model or model_spec(config)
    variants = plan.variants or ()

    def needs(scheme: str | None) -> dict[str, bool]:
        names = [base for base, q in map(split_variant, variants) if q == scheme]
        return {"dense": "dense-ort" in names, "pop": any(v in POP_EXPORT_VARIANTS for v in names)}

    dtype = plan.resolved_dtype()
    dense, pop = plan.dense, plan.pop  # --dense / --pop: unquantized exports, taken as given
    if not own and str(config.get("dtype") or "float32") == dtype:
        if config.get("pop"):
            pop = pop or location.directory
        else:
            dense = dense or location.directory
    if dense is None and needs(None)["dense"]:
        dense = _cached_export(spec, config, "dense", progress, dtype=dtype)
    if pop is None and needs(None)["pop"]:
        pop = _cached_export(spec, config, "pop", progress, dtype=dtype)
    schemes = {name: QuantScheme.parse(name) for name in plan.quant}
    if own:
        schemes[own.name] = own  # the directory's own block size and accuracy level
    quantized: dict[str, tuple[Path | None, Path | None]] = {}
    for name, scheme in schemes.items():
        q_dense = q_pop = None
        if own and own.name == name:
            if config.get("pop"):
                q_pop = location.directory
            else:
                q_dense = location.directory
        wanted = needs(name)
        if q_dense is None and wanted["dense"]:
            q_dense = _cached_export(spec, config, "dense", progress, scheme)
        if q_pop is None and wanted["pop"]:
            q_pop = _cached_export(spec, config, "pop", progress, scheme)
        quantized[name] = (q_dense, q_pop)
    return BenchExports(dense=dense, pop=pop, config=config, spec=spec, quantized=quantized, schemes=schemes)


def _cached_export(
    spec: str,
    config: dict[str, Any],
    kind: str,
    progress: Progress,
    quant: QuantScheme | None = None,
    dtype: str = "float32",
) -> Path:
    from popc.defaults import settings_for_sparsity
    from popc.export import ExportPlan, export

    # hashlib, not hash(): str hashes differ between processes, and the cache must outlive one.
    key = f"{spec}\0{config.get('versions', {}).get('popc')}"
    if quant is not None:  # the scheme is part of the key (fp32 keys stay what they were)
        key += f"\0{quant.name}\0{quant.block_size}\0{quant.accuracy_level}"
    if dtype != "float32":  # so is a half-precision dtype (fp32 keys stay what they were)
        key += f"\0{dtype}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = kind if quant is None else f"{kind}-{quant.name}"
    folder += "" if dtype == "float32" else f"-{dtype}"
    target = cache_root() / "bench" / f"{Path(spec).name or 'model'}-{digest}" / folder
    settings = settings_for_sparsity(CACHED_EXPORT_SPARSITY) if kind == "pop" else None
    if not (target / "popc.json").is_file() or not _scores_available(target, settings):
        what = " ".join([*([] if dtype == "float32" else [dtype]), *([] if quant is None else [quant.name]), kind])
        progress.stage(f"exporting the {what} model of {spec} to {target} (cached for later runs)")
        extra: dict[str, Any] = {} if quant is None else {"quant": quant}
        if dtype != "float32":  # only then: an ExportPlan from before --dtype still works
            extra["dtype"] = dtype
        # export() stages its output and renames it into place: an interrupted run leaves no half export.
        export(ExportPlan(model=spec, out=target, force=True, pop=settings, **extra), progress=progress)
    return target


def _scores_available(target: Path, settings: Any) -> bool:
    """Whether a cached export's graph computes the default score (one cached by a popc from
    before the output-aware score does not: it is exported again)."""
    import json

    if settings is None:
        return True
    try:
        pop = json.loads((target / "popc.json").read_text()).get("pop") or {}
    except (OSError, ValueError):
        return False
    return settings.score in (pop.get("scores") or ["activation"])
