"""llama.cpp as a quantized peer: ``llama-bench`` on a Q4_0 GGUF of the same model.

``benchmarks/llama_cpp.py build`` compiles llama.cpp's tools (``llama-bench``,
``llama-quantize``, ``llama-perplexity``) from the source the ``llama-cpp-python`` sdist
vendors, into ``cache_root()/llama.cpp/``; a ``llama-bench`` there, or else on ``PATH``, is
what :func:`find_tool` finds. Without one the bench leaves the ``llama.cpp-q4_0`` row out
with a note (:class:`NotFound`), never fails.

The GGUF: a built-in model's or a ``.gguf`` source's own file requantized to Q4_0
(``llama-quantize --allow-requantize``: llama.cpp dequantizes, then quantizes), else the
model's fp32 Hugging Face directory converted with the vendored ``convert_hf_to_gguf.py``
(``--outtype f32``) and quantized to Q4_0; made once, cached under ``llama.cpp/models/``.

``llama-bench -o json`` measures prompt processing (``n_prompt`` tokens in one batch, no
sampling) and token generation (``n_gen`` tokens, batch 1) itself, ``-r`` repetitions each;
its figures become a TTFT row per prompt length and a batch-1 decode row. They are not
round-robin with popc's variants, so their ratios are ratios of medians.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popc.bench.plan import LLAMA_CPP
from popc.bench.result import DecodeRow, Timing, TtftRow
from popc.cache import cache_root
from popc.errors import PopcError
from popc.progress import Progress, or_silent

TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity")
BUILD_MARKER = "popc-llama-cpp.json"  # written last into a finished build
SDIST = "llama-cpp-python"
BUILD_HINT = "build it with `python benchmarks/llama_cpp.py build` (or put llama-bench on PATH)"
BENCH_TIMEOUT_SECONDS = 1800
GEN_TOKENS = 64  # llama-bench -n: generated tokens per decode test


class NotFound(PopcError):
    """No llama.cpp tool here: the peer is left out (with this as the note), not an error."""


def root() -> Path:
    return cache_root() / "llama.cpp"


def find_tool(name: str) -> Path | None:
    """``name`` (llama-bench, llama-quantize, ...) from popc's build, else from ``PATH``."""
    built = root() / "build" / "bin" / name
    if built.is_file() and os.access(built, os.X_OK) and (root() / BUILD_MARKER).is_file():
        return built
    found = shutil.which(name)
    return Path(found) if found else None


def require_tool(name: str) -> Path:
    tool = find_tool(name)
    if tool is None:
        raise NotFound(f"no {name} found in {root() / 'build' / 'bin'} or on PATH; {BUILD_HINT}")
    return tool


# ---- llama-bench's JSON -------------------------------------------------------------------
@dataclass(frozen=True)
class BenchRecord:
    """One test of ``llama-bench -o json``: prompt processing (n_gen 0) or generation (n_prompt 0)."""

    n_prompt: int
    n_gen: int
    n_depth: int
    threads: int
    avg_ns: float
    stddev_ns: float
    samples_ns: tuple[float, ...]
    model_type: str
    build: str

    @property
    def is_prompt(self) -> bool:
        return self.n_prompt > 0 and self.n_gen == 0

    @property
    def tokens(self) -> int:
        return self.n_prompt if self.is_prompt else self.n_gen

    def timing(self, per_token: bool) -> Timing:
        """Milliseconds per test (a whole prompt), or per generated token. No samples: they are
        not paired with popc's rounds (a ratio with them is one of medians)."""
        scale = 1e6 * (self.tokens if per_token else 1)
        values = [v / scale for v in self.samples_ns] or [self.avg_ns / scale]
        ordered = sorted(values)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return Timing(median, ordered[0], ordered[-1], [])


def parse_bench_json(text: str) -> list[BenchRecord]:
    """The tests of ``llama-bench -o json`` output (a JSON array; anything before it, such as
    log lines, is skipped)."""
    start = text.find("[")
    if start < 0:
        raise PopcError("llama-bench printed no JSON array")
    try:
        data = json.loads(text[start : text.rindex("]") + 1])
    except ValueError as error:
        raise PopcError(f"llama-bench's JSON does not parse: {error}") from None
    records = []
    for item in data:
        if not isinstance(item, dict) or "avg_ns" not in item:
            continue
        records.append(BenchRecord(
            n_prompt=int(item.get("n_prompt") or 0), n_gen=int(item.get("n_gen") or 0),
            n_depth=int(item.get("n_depth") or 0), threads=int(item.get("n_threads") or 0),
            avg_ns=float(item["avg_ns"]), stddev_ns=float(item.get("stddev_ns") or 0.0),
            samples_ns=tuple(float(v) for v in item.get("samples_ns") or ()),
            model_type=str(item.get("model_type") or ""),
            build=str(item.get("build_commit") or "") + (f" ({item['build_number']})" if item.get("build_number") else ""),
        ))  # fmt: skip
    if not records:
        raise PopcError("llama-bench's JSON holds no test results")
    return records


def rows_of(records: Sequence[BenchRecord]) -> tuple[list[TtftRow], list[DecodeRow]]:
    """A TTFT row per prompt length (the prompt's processing, ms) and a batch-1 decode row
    (ms per generated token) under the ``llama.cpp-q4_0`` variant."""
    ttft = [TtftRow(LLAMA_CPP, r.n_prompt, r.timing(per_token=False)) for r in records if r.is_prompt]
    decode = [DecodeRow(LLAMA_CPP, 0.0, 1, r.timing(per_token=True)) for r in records if not r.is_prompt]
    return ttft, decode[:1]


# ---- running it ---------------------------------------------------------------------------
def supports_depth(bench: Path) -> bool:
    """Whether this llama-bench has ``-d`` (generation after a context of that many tokens)."""
    try:
        done = subprocess.run([str(bench), "--help"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--n-depth" in done.stdout + done.stderr


def bench_command(
    bench: Path, gguf: Path, threads: int, prompts: Sequence[int], gen: int, repeats: int, depth: int | None
) -> list[str]:
    command = [
        str(bench), "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, prompts)) or "0",
        "-n", str(gen), "-r", str(repeats), "-o", "json",
    ]  # fmt: skip
    if depth:
        command += ["-d", str(depth)]
    return command


def run_bench_tool(command: Sequence[str]) -> list[BenchRecord]:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=BENCH_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise PopcError(f"llama-bench timed out after {BENCH_TIMEOUT_SECONDS} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1][:300]
        raise PopcError(f"llama-bench failed (exit {done.returncode}): {last}")
    return parse_bench_json(done.stdout)


@dataclass
class LlamaCppPeer:
    """llama-bench and the Q4_0 GGUF it runs: the bench's ``llama.cpp-q4_0`` rows."""

    bench: Path
    gguf: Path

    @classmethod
    def prepare(cls, spec: str, progress: Progress | None = None) -> LlamaCppPeer:
        bench = require_tool("llama-bench")
        return cls(bench, q4_0_gguf(spec, progress))

    def measure(
        self, threads: int, prompts: Sequence[int], gen: int, repeats: int, depth: int | None = None
    ) -> tuple[list[TtftRow], list[DecodeRow]]:
        """TTFT rows at ``prompts`` and a batch-1 decode row over ``gen`` tokens (after ``depth``
        tokens of context where this llama-bench can), with ``threads`` threads."""
        depth = depth if depth and supports_depth(self.bench) else None
        command = bench_command(self.bench, self.gguf, threads, prompts, max(gen, 1), max(repeats, 1), depth)
        return rows_of(run_bench_tool(command))


# ---- the GGUF ----------------------------------------------------------------------------
def source_gguf(spec: str, progress: Progress | None = None) -> Path | None:
    """The GGUF file a spec loads from: a ``.gguf`` path, or a built-in's (fetched by loading
    it once where it is not here yet); None for a Hugging Face model."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    from popc.loading import builtin

    if spec not in builtin.BUILTINS:
        return None
    model = builtin.BUILTINS[spec]
    installed = builtin._installed_chunks(model)  # an installed package's one-piece GGUF, where it lies
    if installed is not None and model.sums is None:
        return installed[0]
    target = cache_root() / "gguf" / model.gguf_file
    if not target.is_file():
        builtin.load_builtin(spec, or_silent(progress))  # fetches and verifies it
    return target if target.is_file() else None


def source_dir() -> Path:
    """The llama.cpp source tree of popc's build (``convert_hf_to_gguf.py`` and ``gguf-py``)."""
    return root() / "src"


def q4_0_gguf(spec: str, progress: Progress | None = None) -> Path:
    """A Q4_0 GGUF of ``spec``, made once with llama.cpp's own tools (see the module's doc)."""
    progress = or_silent(progress)
    digest = hashlib.sha256(spec.encode())
    path = Path(spec).expanduser()
    if path.exists():
        stat = path.stat()
        digest.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    target = root() / "models" / f"{Path(spec).name or 'model'}-{digest.hexdigest()[:16]}.Q4_0.gguf"
    if target.is_file():
        return target
    quantize = require_tool("llama-quantize")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.partial")
    source = source_gguf(spec, progress)
    scratch = None
    if source is None:
        from popc.bench.peers import hf_directory

        convert = source_dir() / "convert_hf_to_gguf.py"
        if not convert.is_file():
            raise NotFound(f"no {convert} to convert {spec} to GGUF; {BUILD_HINT}")
        scratch = target.with_name(f".{target.name}.f32")
        progress.stage(f"converting {spec} to GGUF with llama.cpp's convert_hf_to_gguf.py")
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(source_dir() / "gguf-py"), os.environ.get("PYTHONPATH")])),
        )
        _run(
            [
                sys.executable,
                str(convert),
                str(hf_directory(spec, progress)),
                "--outtype",
                "f32",
                "--outfile",
                str(scratch),
            ],
            env,
        )
        source = scratch
    progress.stage(f"quantizing {source.name} to Q4_0 with llama-quantize")
    try:
        _run([str(quantize), "--allow-requantize", str(source), str(staged), "Q4_0"])
        os.replace(staged, target)
    finally:
        for leftover in (staged, scratch):
            if leftover is not None and leftover.exists():
                leftover.unlink()
    return target


def _run(command: Sequence[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(list(command), capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        last = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()][-1:] or [""]
        raise PopcError(f"{Path(command[0]).name} failed (exit {done.returncode}): {last[0][:300]}")


# ---- building it ------------------------------------------------------------------------
def build(jobs: int = 2, nice: int = 19, progress: Progress | None = None) -> dict[str, Any]:
    """Compile llama.cpp's CPU tools from the ``llama-cpp-python`` sdist's vendored source into
    ``cache_root()/llama.cpp/build`` (``-DGGML_NATIVE=ON``, CPU only, ``jobs`` jobs, at ``nice``):
    ``pip download`` the sdist (never installed), extract ``vendor/llama.cpp`` to ``src``,
    cmake. Returns what the marker file records."""
    import tarfile

    from popc.pip_fetch import pip_download

    progress = or_silent(progress)
    here = root()
    here.mkdir(parents=True, exist_ok=True)
    downloads = here / "sdist"
    sdists = sorted(downloads.glob(f"{SDIST.replace('-', '_')}-*.tar.gz")) + sorted(downloads.glob(f"{SDIST}-*.tar.gz"))
    if not sdists:
        progress.stage(f"pip download {SDIST} (sdist, no dependencies)")
        done = pip_download(["--no-binary", ":all:", SDIST], downloads, f"the {SDIST} sdist", progress)
        if done.status != 0:
            raise PopcError(f"pip download {SDIST} failed: {(done.log or [''])[-1]}")
        sdists = sorted(downloads.glob("*.tar.gz"))
    if not sdists:
        raise PopcError(f"pip download left no {SDIST} sdist in {downloads}")
    sdist = sdists[-1]
    source = source_dir()
    if not (source / "CMakeLists.txt").is_file():
        progress.stage(f"extracting llama.cpp from {sdist.name}")
        staging = here / ".src-staging"
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
            archive.extractall(staging, members=members, filter="data")
        vendored = next(staging.glob("*/vendor/llama.cpp"))
        shutil.rmtree(source, ignore_errors=True)
        os.replace(vendored, source)
        shutil.rmtree(staging, ignore_errors=True)
    build_dir = here / "build"
    prefix = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    configure = [
        "cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
        "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF",
    ]  # fmt: skip
    progress.stage("cmake: configuring llama.cpp (CPU, GGML_NATIVE)")
    _run(prefix + configure)
    progress.stage(f"cmake: building {', '.join(TOOLS)} with {jobs} jobs (nice {nice})")
    _run(prefix + ["cmake", "--build", str(build_dir), "--target", *TOOLS, "-j", str(jobs)])
    missing = [tool for tool in TOOLS if not (build_dir / "bin" / tool).is_file()]
    if "llama-bench" in missing:
        raise PopcError(f"the build made no llama-bench in {build_dir / 'bin'}")
    marker = {"sdist": sdist.name, "source": str(source), "tools": [t for t in TOOLS if t not in missing],
              "cmake": configure[3:]}  # fmt: skip
    (here / BUILD_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return marker
