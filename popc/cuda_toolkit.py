"""Which CUDA major each piece uses: nvcc, the built op library, the installed onnxruntime-gpu.

The op library links CUDA's runtime statically and launches on the stream ONNX Runtime's
CUDA execution provider hands it, so it must be built by an nvcc of the same CUDA major as
that provider (onnxruntime-gpu 1.31 uses CUDA 13; older wheels used CUDA 12). This module
reads the three majors without importing onnxruntime's CUDA provider (it may not load on a
machine without a GPU), and words the refusal when they differ.

nvcc is also looked for where PyPI's ``nvidia-cuda-nvcc`` wheel (CUDA 13) installs it:
``site-packages/nvidia/cu13/bin/nvcc``, next to the headers (``cuda_runtime.h``,
``cuda_fp16.h``, ``cuda_bf16.h``) that ``nvidia-cuda-runtime`` and ``nvidia-cuda-cccl`` put in
``nvidia/cu13/include``. CUDA 12's ``nvidia-cuda-nvcc-cu12`` wheel ships ptxas only, no nvcc.
"""

from __future__ import annotations

import re
import site
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

# The wheels that make a working nvcc from PyPI (CUDA 13 on): nvcc pulls nvidia-nvvm and
# nvidia-cuda-crt unpinned, so each is pinned to nvcc's own release (cicc, crt headers).
PYPI_NVCC_WHEELS = ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-runtime", "nvidia-cuda-cccl")
PYPI_NVCC_FIRST_MAJOR = 13  # CUDA 12's nvidia-cuda-nvcc-cu12 ships ptxas only
PROVIDER_LIBRARY = "libonnxruntime_providers_cuda.so"
# Sonames whose version suffix is the CUDA major (libcurand/libcufft carry their own numbers).
_CUDA_SONAMES = re.compile(r"^lib(cudart|cublas|cublasLt|nvrtc)\.so\.(\d+)$")


# ---- ELF: the DT_NEEDED entries of a shared library ---------------------------------------
def _u(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


def elf_needed(path: Path) -> list[str]:
    """The sonames ``path`` (a 64-bit little-endian ELF file) depends on, in order; [] when it
    is not such a file or has no dynamic section. Reads the headers and the dynamic section
    only, so a 300 MB provider library costs a few kilobytes of reads."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return []
            phoff, phentsize, phnum = _u(header, 0x20, 8), _u(header, 0x36, 2), _u(header, 0x38, 2)
            handle.seek(phoff)
            table = handle.read(phentsize * phnum)
            loads, dynamic = [], None
            for start in range(0, len(table) - phentsize + 1, phentsize):
                kind, offset = _u(table, start, 4), _u(table, start + 0x08, 8)
                vaddr, filesz = _u(table, start + 0x10, 8), _u(table, start + 0x20, 8)
                if kind == 1:  # PT_LOAD
                    loads.append((vaddr, offset, filesz))
                elif kind == 2:  # PT_DYNAMIC
                    dynamic = (offset, filesz)
            if dynamic is None:
                return []
            handle.seek(dynamic[0])
            entries = handle.read(dynamic[1])
            needed, strtab = [], None
            for start in range(0, len(entries) - 15, 16):
                tag, value = _u(entries, start, 8), _u(entries, start + 8, 8)
                if tag == 0:  # DT_NULL
                    break
                if tag == 1:  # DT_NEEDED: an offset into the string table
                    needed.append(value)
                elif tag == 5:  # DT_STRTAB: a virtual address
                    strtab = value
            if strtab is None:
                return []
            # The string table's file offset: through the PT_LOAD segment that maps it.
            mapped = (offset + strtab - vaddr for vaddr, offset, size in loads if vaddr <= strtab < vaddr + size)
            base = next(mapped, None)
            if base is None:
                return []
            names = []
            for name_offset in needed:
                handle.seek(base + name_offset)
                raw = handle.read(256)
                names.append(raw.split(b"\0", 1)[0].decode(errors="replace"))
            return names
    except OSError:
        return []


def cuda_major_of_sonames(names: list[str]) -> int | None:
    """The CUDA major that sonames such as ``libcudart.so.13`` / ``libcublas.so.12`` name."""
    majors = [int(m.group(2)) for m in map(_CUDA_SONAMES.match, names) if m]
    return majors[0] if majors else None


# ---- nvcc ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NvccVersion:
    path: str
    version: str | None  # "13.0.88" (None: `nvcc --version` failed or said no release)
    major: int | None


def parse_nvcc_version(text: str) -> tuple[str, int] | None:
    """``("13.0.88", 13)`` from ``nvcc --version``'s "release 13.0, V13.0.88"."""
    match = re.search(r"release (\d+)\.(\d+)(?:, V([\d.]+))?", text)
    if not match:
        return None
    return match.group(3) or f"{match.group(1)}.{match.group(2)}", int(match.group(1))


@lru_cache(maxsize=16)
def nvcc_version(nvcc: str) -> NvccVersion:
    """What ``nvcc --version`` says (cached per path: it takes tens of milliseconds)."""
    try:
        done = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60, check=False)
        parsed = parse_nvcc_version(done.stdout + done.stderr)
    except (OSError, subprocess.TimeoutExpired):
        parsed = None
    return NvccVersion(nvcc, *(parsed or (None, None)))


def site_directories() -> list[Path]:
    """Where pip puts packages for this interpreter: sys.path's directories, then site's."""
    seen: dict[str, None] = {}
    extra = site.getsitepackages() + [site.getusersitepackages()] if hasattr(site, "getsitepackages") else []
    for entry in [*sys.path, *extra]:
        if entry and Path(entry).is_dir():
            seen.setdefault(str(Path(entry).resolve()), None)
    return [Path(p) for p in seen]


def pip_nvcc_candidates(directories: list[Path] | None = None) -> list[str]:
    """nvcc executables that PyPI's nvidia wheels installed (``nvidia/cu13/bin/nvcc``), newest
    CUDA major first."""
    found = []
    for directory in directories if directories is not None else site_directories():
        for nvcc in sorted((directory / "nvidia").glob("cu[0-9]*/bin/nvcc"), reverse=True):
            if nvcc.is_file():
                found.append(str(nvcc))
    return list(dict.fromkeys(found))


def choose_nvcc(candidates: list[str], wanted_major: int | None) -> str | None:
    """The first candidate whose CUDA major is ``wanted_major`` (onnxruntime-gpu's), else the first."""
    if not candidates:
        return None
    if wanted_major is not None:
        for nvcc in candidates:
            if nvcc_version(nvcc).major == wanted_major:
                return nvcc
    return candidates[0]


# ---- onnxruntime-gpu --------------------------------------------------------------------------
@dataclass(frozen=True)
class OrtCuda:
    """The CUDA build of onnxruntime installed here."""

    version: str  # onnxruntime's own
    cuda_version: str | None  # "13.0", from build_and_package_info (None: not recorded)
    major: int | None
    source: str  # where the major was read


def onnxruntime_package_dir() -> Path | None:
    """The installed ``onnxruntime`` package's directory, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def onnxruntime_cuda(package_dir: Path | None = None) -> OrtCuda | None:
    """onnxruntime-gpu's CUDA major, or None where the installed onnxruntime has no CUDA
    provider library (the CPU wheel). Read from ``capi/build_and_package_info.py``'s
    ``cuda_version`` when the wheel records it, else from the sonames the provider library needs."""
    package_dir = package_dir or onnxruntime_package_dir()
    if package_dir is None:
        return None
    capi = package_dir / "capi"
    provider = capi / PROVIDER_LIBRARY
    if not provider.is_file():
        return None
    try:
        info = (capi / "build_and_package_info.py").read_text(errors="replace")
    except OSError:
        info = ""
    version = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", info)
    cuda = re.search(r"cuda_version\s*=\s*['\"](\d+)(?:\.(\d+))?", info)
    if cuda:
        cuda_version = cuda.group(1) + (f".{cuda.group(2)}" if cuda.group(2) else "")
        return OrtCuda(version.group(1) if version else "?", cuda_version, int(cuda.group(1)),
                       "onnxruntime/capi/build_and_package_info.py")  # fmt: skip
    major = cuda_major_of_sonames(elf_needed(provider))
    return OrtCuda(version.group(1) if version else "?", None, major, f"the sonames {PROVIDER_LIBRARY} needs")


# ---- the refusal -------------------------------------------------------------------------------
def nvcc_install_hint(major: int) -> str:
    """How to get an nvcc of CUDA ``major``."""
    if major >= PYPI_NVCC_FIRST_MAJOR:
        pins = "0.*" if major == 13 else "*"  # 13.0: what onnxruntime-gpu 1.31's wheels are built with
        return "pip install " + " ".join(f'"{name}=={major}.{pins}"' for name in PYPI_NVCC_WHEELS)
    return (f"install CUDA {major}'s nvcc (NVIDIA's CUDA {major} toolkit, or `conda install -c nvidia "
            f"cuda-nvcc={major}`; PyPI has no nvcc {major}) and point CUDACXX at it")  # fmt: skip


def cuda_mismatch(library_major: int | None, ort: OrtCuda | None, subject: str | None = None) -> str | None:
    """Why CUDA code of ``library_major`` must not run inside ``ort``, or None (also None when
    either major is unknown: nothing to compare). ``subject`` names the code (default: the
    popc op library's CUDA kernels)."""
    if ort is None or ort.major is None or library_major is None or library_major == ort.major:
        return None
    subject = subject or f"the popc op library's CUDA kernels are built with CUDA {library_major}"
    return (
        f"{subject} but onnxruntime-gpu {ort.version} uses CUDA {ort.major}: "
        f"{nvcc_install_hint(ort.major)}, then run `popc doctor --rebuild`"
    )


def cuda_summary(nvcc_version: str | None, library_major: int | None, ort: OrtCuda | None) -> str:
    """One line for ``popc doctor``: the CUDA version of nvcc, of the library's kernels and of onnxruntime-gpu."""
    parts = [f"nvcc CUDA {nvcc_version}" if nvcc_version else "nvcc not found"]
    if library_major is not None:
        parts.append(f"op library CUDA {library_major}")
    if ort is None:
        parts.append("onnxruntime-gpu not installed")
    else:
        cuda = ort.cuda_version or (str(ort.major) if ort.major is not None else "unknown")
        parts.append(f"onnxruntime-gpu {ort.version} CUDA {cuda}")
    return ", ".join(parts)


def cuda_report(nvcc: str | None) -> dict[str, Any]:
    """The CUDA part of ``popc doctor``: nvcc's and onnxruntime-gpu's CUDA versions, and why
    ``nvcc`` would build kernels onnxruntime-gpu refuses (None when it would not)."""
    release = nvcc_version(nvcc) if nvcc else None
    ort = onnxruntime_cuda()
    problem = None
    if release is not None and release.major is not None:
        problem = cuda_mismatch(release.major, ort, subject=f"nvcc {nvcc} is CUDA {release.version}")
    return {
        "nvcc_cuda": release.version if release else None,
        "onnxruntime_gpu": None if ort is None else {"version": ort.version, "cuda_version": ort.cuda_version,
                                                     "cuda_major": ort.major, "source": ort.source},  # fmt: skip
        "cuda_majors": cuda_summary(release.version if release else None, None, ort),
        "cuda_problem": problem,
    }


# ---- building with a PyPI nvcc -----------------------------------------------------------------
def nvcc_link_env(nvcc: str) -> dict[str, str] | None:
    """The environment a build with ``nvcc`` needs, or None for the caller's own. PyPI's nvcc
    wheel keeps its libraries in ``nvidia/cu13/lib`` while its nvcc.profile links from
    ``lib64``: the linker finds ``libcudart_static.a`` through ``LIBRARY_PATH`` instead."""
    import os

    top = Path(nvcc).resolve().parent.parent
    if (top / "lib64").is_dir() or not (top / "lib" / "libcudart_static.a").is_file():
        return None
    env = dict(os.environ)
    env["LIBRARY_PATH"] = os.pathsep.join(p for p in (str(top / "lib"), env.get("LIBRARY_PATH", "")) if p)
    return env
