"""The popc op library, ``libpopc_ops.so``: find it, build it, register it with ONNX Runtime.

The library holds fused CPU (and, when built with nvcc, CUDA) kernels for the
``ai.popc`` ops defined in ``templates/ops.py`` (installed as ``popc.templates``). Exported models run without
it (each popc op carries a function body of standard ONNX ops); with it, the
pruned FFNs read only the selected weight rows.

Where the library is looked for, in order:

1. ``$POPC_OPLIB`` -- an explicit path (``POPC_OPLIB=off`` disables the library);
2. ``popc/templates/libpopc_ops.so`` -- a copy shipped inside the package;
3. ``<cache root>/oplib/<sources digest>/libpopc_ops.so`` (``popc.cache.cache_root()``,
   ``~/.cache/popc`` by default) -- what :func:`build` writes.

:func:`build` needs CMake and a C++17 compiler. ONNX Runtime's PyPI wheels ship no
C/C++ headers, so the headers come from Debian's ``libonnxruntime-dev`` package,
fetched with ``apt-get download`` through a private apt configuration (nothing is
installed; no system state is touched) and unpacked with ``dpkg-deb -x`` into the
cache, unless ``$POPC_ORT_INCLUDE_DIR`` names a directory that has them. The
CUDA kernels are built when ``nvcc`` is found (``$CUDACXX``, ``PATH``,
``/usr/local/cuda/bin``, PyPI's ``nvidia-cuda-nvcc`` wheel; one of onnxruntime-gpu's CUDA major
first) for ``$POPC_CUDA_ARCHITECTURES`` (e.g. ``90``; default 75;80;86;89;90); ``POPC_OPLIB_CUDA=0``
skips them. CUDA kernels of another CUDA major than the installed onnxruntime-gpu's are not
built, and a library holding such kernels is not loaded into CUDA sessions
(``popc.cuda_toolkit``).

At first use (:func:`register_library`, called for every runtime session) a
missing library is built automatically when CMake is on PATH
(``POPC_OPLIB_AUTOBUILD=0`` turns that off); a failed build is not retried until
``popc doctor --build``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from popc.atomic import atomic_file, atomic_write
from popc.cache import cache_root
from popc.cuda_toolkit import (
    choose_nvcc,
    cuda_mismatch,
    cuda_report,
    cuda_summary,
    nvcc_link_env,
    nvcc_version,
    onnxruntime_cuda,
    pip_nvcc_candidates,
)
from popc.errors import PopcError
from popc.ort_headers import fetch_headers, find_headers, header_version
from popc.progress import Progress, console_progress, or_silent

LIBRARY_NAME = "libpopc_ops.so"
# The files the library is built from (and its build digest): every C++/CUDA source, header,
# CMake file and linker map in templates/ (the same globs as the package data).
SOURCE_PATTERNS = ("CMakeLists.txt", "*.cc", "*.cu", "*.h", "*.map")


def source_files() -> list[str]:
    """Names of the library's source files, sorted (the build digest depends on the order)."""
    return sorted({path.name for pattern in SOURCE_PATTERNS for path in source_dir().glob(pattern)})
NOTICE = (
    "popc op library not found; running the ops' ONNX function bodies (slower). "
    "Build it with `popc doctor --build`"
)
_notice_shown = False



@dataclass
class LibraryInfo:
    path: Path
    origin: str  # "env", "package" or "cache"
    cuda: bool | None = None  # None: unknown (no build-info.json beside it)
    build: dict[str, Any] = field(default_factory=dict)
    # Why the file must not be loaded (truncated, altered, not a library), or None.
    problem: str | None = None
    cuda_major: int | None = None  # the CUDA major of its CUDA kernels (None: none, or unknown)
    # Why its CUDA kernels must not run here (another CUDA major than onnxruntime-gpu's), or None.
    cuda_problem: str | None = None

    @property
    def providers(self) -> list[str]:
        return ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if self.cuda and not self.cuda_problem else [])


# ---- places ---------------------------------------------------------------------------
def source_dir() -> Path:
    from popc import templates

    return Path(templates.__file__).resolve().parent


def sources_digest() -> str:
    digest = hashlib.sha256()
    for name in source_files():
        digest.update(name.encode() + b"\0" + (source_dir() / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_dir() -> Path:
    """Where :func:`build` puts the library for the current sources."""
    return cache_root() / "oplib" / sources_digest()


def disabled() -> bool:
    return os.environ.get("POPC_OPLIB", "").strip().lower() in ("0", "off", "none", "false")


NVCC_LOCATIONS = ("/usr/local/cuda/bin/nvcc",)  # after PATH, before PyPI's wheels


def find_nvcc() -> str | None:
    """``$CUDACXX`` if set; else the first nvcc (PATH, /usr/local/cuda, PyPI's nvidia wheels) of
    the installed onnxruntime-gpu's CUDA major, else the first found."""
    if os.environ.get("CUDACXX"):
        return shutil.which(os.environ["CUDACXX"])  # a path or a name on PATH; None if not executable
    found = [c for c in (shutil.which("nvcc"), *NVCC_LOCATIONS, *pip_nvcc_candidates())
             if c and Path(c).is_file() and os.access(c, os.X_OK)]  # fmt: skip
    if len(found) < 2:
        return found[0] if found else None
    ort = onnxruntime_cuda()
    return choose_nvcc(found, ort.major if ort else None)


def _read_build_info(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _info(path: Path, origin: str, build_info: Path) -> LibraryInfo:
    data = _read_build_info(build_info)
    info = LibraryInfo(path=path, origin=origin, cuda=data.get("cuda"), build=data)
    info.problem = library_problem(info)
    if info.cuda:
        info.cuda_major = data.get("cuda_major")
        if info.cuda_major is None and data.get("nvcc") and Path(data["nvcc"]).is_file():  # built before it was recorded
            info.cuda_major = nvcc_version(data["nvcc"]).major
        info.cuda_problem = cuda_mismatch(info.cuda_major, onnxruntime_cuda())
    return info


# ---- verification -----------------------------------------------------------------------
# Loading a truncated shared library maps pages past its end: the process dies of SIGBUS
# with nothing printed. So every library is checked before ONNX Runtime loads it.
def file_record(path: Path) -> dict[str, Any]:
    """The size and sha256 that ``build-info.json`` records for the library."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _elf_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole 64-bit ELF file: every segment and the section table lie inside it."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = handle.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return "is not a 64-bit little-endian shared library"
        phoff, shoff = int.from_bytes(header[0x20:0x28], "little"), int.from_bytes(header[0x28:0x30], "little")
        phentsize, phnum = int.from_bytes(header[0x36:0x38], "little"), int.from_bytes(header[0x38:0x3A], "little")
        shentsize, shnum = int.from_bytes(header[0x3A:0x3C], "little"), int.from_bytes(header[0x3C:0x3E], "little")
        end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
        for start in range(0, len(table) - phentsize + 1, phentsize):
            offset = int.from_bytes(table[start + 0x08 : start + 0x10], "little")
            file_size = int.from_bytes(table[start + 0x20 : start + 0x28], "little")
            end = max(end, offset + file_size)
    return f"is truncated ({size} bytes, its ELF headers need {end})" if end > size else None


_verified: dict[tuple[str, int, int, int], str | None] = {}  # (path, inode, size, mtime) -> problem


def library_problem(info: LibraryInfo) -> str | None:
    """Why ``info.path`` must not be loaded, or None. A cached build must match the size and
    sha256 recorded when it was built; any library must be a whole ELF file."""
    try:
        stat = info.path.stat()
        key = (str(info.path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key in _verified:
            return _verified[key]
        problem = _elf_problem(info.path)
        recorded = {name: info.build.get(name) for name in ("size", "sha256")}
        if problem is None and all(recorded.values()):
            actual = file_record(info.path)
            if actual["size"] != recorded["size"]:
                problem = f"is {actual['size']} bytes, but {recorded['size']} were built"
            elif actual["sha256"] != recorded["sha256"]:
                problem = "differs from what was built (sha256 mismatch)"
        elif problem is None and info.origin == "cache":
            problem = "has no size and sha256 recorded in build-info.json (built by an older popc)"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    _verified[key] = problem
    return problem


def check_library(info: LibraryInfo) -> None:
    """Raise (one line) unless ``info`` may be loaded."""
    if info.problem is not None:
        raise PopcError(f"{info.path} {info.problem}: refusing to load it")


def find_library() -> LibraryInfo | None:
    """The library to load, or None (also None when ``POPC_OPLIB=off``)."""
    if disabled():
        return None
    explicit = os.environ.get("POPC_OPLIB")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise PopcError(f"POPC_OPLIB={explicit} is not a file")
        return _info(path.resolve(), "env", path.with_name("build-info.json"))
    shipped = source_dir() / LIBRARY_NAME
    if shipped.is_file():
        return _info(shipped, "package", source_dir() / "build-info.json")
    built = build_dir() / LIBRARY_NAME
    if built.is_file():
        return _info(built, "cache", build_dir() / "build-info.json")
    return None


# ---- build ------------------------------------------------------------------------------
def toolchain_problem() -> str | None:
    """Why :func:`build` cannot run here, or None."""
    if not shutil.which("cmake"):
        return "cmake is not installed (apt-get install cmake, or pip install cmake)"
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        return "no C++ compiler found (apt-get install g++)"
    return None


def _run(command: list[str], log_file: Path, env: dict[str, str] | None = None) -> None:
    with open(log_file, "a") as out:
        out.write("+ " + " ".join(command) + "\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-15:]
        raise PopcError(f"`{' '.join(command[:3])} ...` failed (log: {log_file}):\n" + "\n".join(tail))


def cuda_architectures() -> str | None:
    """``$POPC_CUDA_ARCHITECTURES`` (``90``, ``80;90``), or None for CMakeLists.txt's default."""
    value = os.environ.get("POPC_CUDA_ARCHITECTURES", "").strip().replace(",", ";")
    if value and not all(part.isdigit() for part in value.split(";")):
        raise PopcError(f"POPC_CUDA_ARCHITECTURES={value!r}: give compute capabilities such as 90 or 80;90")
    return value or None


def _cmake_build(build: Path, include: Path, cuda: str | None, log_file: Path) -> None:
    if build.exists():
        shutil.rmtree(build)
    command = ["cmake", "-S", str(source_dir()), "-B", str(build), f"-DORT_INCLUDE_DIR={include}",
               "-DCMAKE_BUILD_TYPE=Release", f"-DPOPC_WITH_CUDA={'ON' if cuda else 'OFF'}"]  # fmt: skip
    env = None
    if cuda:
        command.append(f"-DCMAKE_CUDA_COMPILER={cuda}")
        if cuda_architectures():
            command.append(f"-DPOPC_CUDA_ARCHITECTURES={cuda_architectures()}")
        env = nvcc_link_env(cuda)
    _run(command, log_file, env)
    _run(["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 2)], log_file, env)


def build(force: bool = False, cuda: bool | None = None, progress: Progress | None = None) -> LibraryInfo:
    """Build ``libpopc_ops.so`` for the current sources into the cache; returns where it is.

    ``cuda``: None builds the CUDA kernels when nvcc is found (and ``POPC_OPLIB_CUDA`` is not 0);
    True requires nvcc; False builds the CPU kernels only. A CUDA build that fails falls back to
    CPU only (recorded in ``build-info.json``) unless ``cuda`` is True.
    """
    progress = or_silent(progress)
    problem = toolchain_problem()
    if problem:
        raise PopcError(f"cannot build the popc op library: {problem}")
    target = build_dir()
    target.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time, across processes
        if not force and (target / LIBRARY_NAME).is_file():
            existing = _info(target / LIBRARY_NAME, "cache", target / "build-info.json")
            if existing.problem is None:
                return existing
            progress.stage(f"rebuilding the popc op library: {existing.path} {existing.problem}")
        log_file = target / "build.log"
        log_file.write_text("")
        failed = target / "FAILED"
        failed.unlink(missing_ok=True)
        try:
            include = find_headers() or fetch_headers(progress)
            nvcc = find_nvcc()
            want_cuda = cuda if cuda is not None else (nvcc is not None and os.environ.get("POPC_OPLIB_CUDA", "1") != "0")
            if want_cuda and not nvcc:
                raise PopcError("a CUDA build was requested but nvcc was not found (set CUDACXX)")
            started = time.perf_counter()
            cuda_error = None
            nvcc_release = nvcc_version(nvcc) if nvcc else None
            if want_cuda and nvcc_release is not None:
                subject = f"nvcc {nvcc} is CUDA {nvcc_release.version}"
                mismatch = cuda_mismatch(nvcc_release.major, onnxruntime_cuda(), subject=subject)
                if mismatch and cuda:
                    raise PopcError(mismatch)
                if mismatch:  # kernels onnxruntime-gpu would refuse: the CPU kernels only
                    cuda_error, want_cuda = mismatch, False
                    progress.stage(f"not building the CUDA kernels: {mismatch}")
            build_tree = target / "build"
            if want_cuda:
                progress.stage(f"building libpopc_ops.so (CPU + CUDA, nvcc {nvcc})")
                try:
                    _cmake_build(build_tree, include, nvcc, log_file)
                except PopcError as error:
                    if cuda:
                        raise
                    cuda_error = str(error).splitlines()[0]
                    progress.stage("CUDA build failed; building the CPU kernels only")
                    want_cuda = False
            if not want_cuda:
                progress.stage("building libpopc_ops.so (CPU)")
                _cmake_build(build_tree, include, None, log_file)
            seconds = time.perf_counter() - started
            built = build_tree / LIBRARY_NAME
            if not built.is_file():
                raise PopcError(f"the build produced no {LIBRARY_NAME} (log: {log_file})")
            info = {
                "cuda": bool(want_cuda),
                "cuda_error": cuda_error,
                "nvcc": nvcc if want_cuda else None,
                "cuda_version": nvcc_release.version if want_cuda and nvcc_release else None,
                "cuda_major": nvcc_release.major if want_cuda and nvcc_release else None,
                "cuda_architectures": (cuda_architectures() or "75;80;86;89;90") if want_cuda else None,
                "ort_headers": header_version(include),
                "headers_dir": str(include),
                "sources": sources_digest(),
                "build_seconds": round(seconds, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **file_record(built),
            }
            # The record first, then the library: both under the lock, so no reader that
            # takes it sees one without the other. A loaded old copy stays valid.
            atomic_write(target / "build-info.json", (json.dumps(info, indent=2) + "\n").encode())
            with atomic_file(target / LIBRARY_NAME) as staged:
                shutil.copy2(built, staged)
            shutil.rmtree(build_tree, ignore_errors=True)
            return _info(target / LIBRARY_NAME, "cache", target / "build-info.json")
        except Exception as error:
            failed.write_text(f"{type(error).__name__}: {error}\n")
            raise


def ensure_library(autobuild: bool | None = None) -> LibraryInfo | None:
    """The library, building it first if it is missing and an automatic build is allowed."""
    info = find_library()
    if disabled() or (info is not None and info.problem is None):
        return info
    if info is not None and info.origin == "cache":
        with open(build_dir().parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # a build in progress finishes first
            info = find_library()
        if info is not None and info.problem is None:
            return info
    if autobuild is None:
        autobuild = os.environ.get("POPC_OPLIB_AUTOBUILD", "1") != "0"
    can_build = autobuild and not toolchain_problem() and not (build_dir() / "FAILED").exists()
    if info is not None and (info.origin != "cache" or not can_build):
        check_library(info)  # raises: a library that is there but broken is named, not skipped
    if not can_build:
        return None
    from rich.console import Console

    console = Console(stderr=True)
    try:
        with console_progress(console) as progress:
            progress.stage("building the popc op library (once)")
            info = build(progress=progress)
    except PopcError as error:
        console.print(f"[yellow]popc op library build failed:[/] {str(error).splitlines()[0]}", highlight=False)
        return None
    console.print(f"[dim]built {info.path} ({info.build.get('build_seconds')} s)[/]", highlight=False)
    return info


# ---- loading ------------------------------------------------------------------------------
def register_library(options, device: str | None = None) -> bool:  # noqa: ANN001 - onnxruntime.SessionOptions
    """Register the op library with ``options``; False (and a one-time notice) when absent.

    ``device``: the session's ("cpu" or "cuda"; None: not said). CUDA kernels of another CUDA
    major than onnxruntime-gpu's are refused unless the session is said to be CPU-only."""
    global _notice_shown
    if disabled():
        return False
    reason = None
    try:
        info = ensure_library()
    except PopcError as error:
        info, reason = None, str(error)
    if info is not None:
        try:
            check_library(info)
            if info.cuda_problem and device != "cpu":
                raise PopcError(info.cuda_problem)
            options.register_custom_ops_library(str(info.path))
            return True
        except PopcError as error:
            reason = str(error)
        except Exception as error:  # ORT raises its own types
            reason = f"cannot load {info.path}: {str(error).splitlines()[0]}"
    if not _notice_shown:
        _notice_shown = True
        from rich.console import Console

        message = NOTICE if reason is None else f"popc op library unusable ({reason}); running the ops' ONNX function bodies (slower). Rebuild it with `popc doctor --build`"
        Console(stderr=True).print(f"[yellow]note:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    return False


# ---- a one-op model (self-test, tests, benchmarks) ------------------------------------------
def make_op_model(op: str, weight: np.ndarray, rank: int = 3):
    """An ONNX model with one ``ai.popc`` node and its function body: inputs A (X or Z) and I, W a constant.

    ``op``: "GatherMatMulT" (A = X [.., H] -> Y [.., K]) or "GatherMatMul" (A = Z [.., K] -> Y [.., H]).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from popc.templates import ops

    functions = [fn.to_function_proto() for fn in ops.KERNEL_OPS.values()]
    base_opset = next(o.version for o in functions[0].opset_import if o.domain == "")
    elem = TensorProto.FLOAT16 if weight.dtype == np.float16 else TensorProto.FLOAT
    dims = [f"d{i}" for i in range(rank - 1)]
    graph = helper.make_graph(
        [helper.make_node(op, ["A", "W", "I"], ["Y"], domain=ops.DOMAIN)],
        f"popc_{op}",
        [helper.make_tensor_value_info("A", elem, [*dims, "a"]),
         helper.make_tensor_value_info("I", TensorProto.INT64, [*dims, "k"])],
        [helper.make_tensor_value_info("Y", elem, [*dims, "o"])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )  # fmt: skip
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", base_opset), helper.make_opsetid(ops.DOMAIN, ops.VERSION)],
        functions=functions,
    )
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model


def self_test(info: LibraryInfo) -> dict[str, Any]:
    """Load the library into a CPU session and run both ops against numpy."""
    import onnxruntime as ort

    check_library(info)

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((24, 40)).astype(np.float32)
    idx = rng.integers(0, 24, (2, 1, 7))
    results = {}
    for op, a in (("GatherMatMulT", rng.standard_normal((2, 1, 40))), ("GatherMatMul", rng.standard_normal((2, 1, 7)))):
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(info.path))
        session = ort.InferenceSession(
            make_op_model(op, weight).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        (y,) = session.run(None, {"A": a.astype(np.float32), "I": idx})
        rows = weight[idx]  # [B, S, K, H]
        expected = np.einsum("bskh,bsh->bsk", rows, a) if op == "GatherMatMulT" else np.einsum("bskh,bsk->bsh", rows, a)
        results[op] = bool(np.allclose(y, expected, rtol=1e-4, atol=1e-4))
    return {"ort_version": ort.__version__, "ops_ok": results}


def doctor_report(build_now: bool = False, force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """What ``popc doctor`` prints, as data."""
    import onnxruntime as ort

    report: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "nvcc": find_nvcc(),
        **cuda_report(find_nvcc()),
        "toolchain_problem": toolchain_problem(),
        "headers": (lambda h: f"{h} ({header_version(h)})" if h else None)(find_headers()),
        "disabled": disabled(),
    }
    error = None
    try:
        if build_now or force:
            present = find_library()
            usable = present is not None and present.problem is None
            info = present if usable and not force else build(force=force, progress=progress)
        else:
            info = ensure_library()
    except PopcError as exc:
        info, error = find_library(), str(exc)
    report["build_error"] = error
    report["present"] = info is not None
    if info is not None:
        report |= {"library": str(info.path), "origin": info.origin, "cuda": info.cuda, "providers": info.providers,
                   "build": info.build}  # fmt: skip
        report["cuda_majors"] = cuda_summary(report["nvcc_cuda"], info.cuda_major, onnxruntime_cuda())
        report["cuda_problem"] = info.cuda_problem or report["cuda_problem"]
        try:
            report |= {"loaded": True, **self_test(info)}
        except Exception as exc:
            report |= {"loaded": False, "load_error": str(exc).splitlines()[0]}
    return report


def describe(info: LibraryInfo | None) -> str:  # pragma: no cover - convenience for debugging
    return json.dumps(asdict(info), default=str) if info else "absent"


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(doctor_report(build_now="--build" in sys.argv), indent=2, default=str))
