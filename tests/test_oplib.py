"""The popc op library (libpopc_ops.so): kernels vs function bodies, index contract, doctor, nvcc.

The library is built once per session (into the popc cache; a no-op when the README
test command's `popc doctor --build` already built it). Without CMake/a C++ compiler
these tests skip locally but fail under CI=true: CI must build the library.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from popc import oplib

OPS = ("GatherMatMulT", "GatherMatMul")


@pytest.fixture(scope="session")
def library() -> oplib.LibraryInfo:
    problem = oplib.toolchain_problem()
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must build the popc op library, but: {problem}")
        pytest.skip(f"cannot build the popc op library here: {problem}")
    info = oplib.find_library()
    if info is None:
        info = oplib.build()
    return info


def _session(op: str, weight: np.ndarray, library: oplib.LibraryInfo | None, rank: int = 3):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library is not None:
        options.register_custom_ops_library(str(library.path))
    model = oplib.make_op_model(op, weight, rank=rank)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _inputs(rng, op: str, lead: tuple[int, ...], H: int, N: int, K: int, dtype) -> dict[str, np.ndarray]:
    a = rng.standard_normal((*lead, H if op == "GatherMatMulT" else K)).astype(dtype)
    idx = rng.integers(0, N, (*lead, K), dtype=np.int64)
    return {"A": a, "I": idx}


@pytest.mark.parametrize("avx2", [True, False], ids=["avx2", "portable"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op", OPS)
def test_kernels_equal_function_bodies(library, monkeypatch, op, dtype, avx2):
    if not avx2:
        monkeypatch.setenv("POPC_OPLIB_NO_AVX2", "1")  # read when the kernel is created
    rng = np.random.default_rng(hash((op, str(dtype), avx2)) % 2**32)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=2e-2, atol=2e-2)
    checked = 0
    # (H, N): multiples of the 8/32/64-wide vector blocks and ragged sizes.
    for H, N in ((64, 128), (576, 96), (37, 50), (130, 7), (8, 1)):
        weight = (rng.standard_normal((N, H)) / np.sqrt(H)).astype(dtype)
        fast, body = _session(op, weight, library), _session(op, weight, None)
        for B in (1, 2, 3, 5, 8):
            S = int(rng.integers(1, 4))
            for K in sorted({0, 1, int(rng.integers(1, 2 * N + 1)), N}):
                feed = _inputs(rng, op, (B, S), H, N, K, dtype)
                (got,) = fast.run(None, feed)
                (want,) = body.run(None, feed)
                assert got.dtype == want.dtype and got.shape == want.shape, (H, N, B, S, K)
                if K == 0 and op == "GatherMatMul":
                    assert not got.any()
                np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), **tol, err_msg=str((H, N, B, S, K)))
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("op", OPS)
def test_other_ranks(library, op):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((20, 33)).astype(np.float32)
    for rank, lead in ((1, ()), (2, (4,)), (4, (2, 3, 2))):
        fast, body = _session(op, weight, library, rank=rank), _session(op, weight, None, rank=rank)
        feed = _inputs(rng, op, lead, 33, 20, 6, np.float32)
        np.testing.assert_allclose(fast.run(None, feed)[0], body.run(None, feed)[0], rtol=1e-4, atol=1e-4)


def _bad_value(rng, N: int) -> int:
    return int(rng.choice([N, N + int(rng.integers(1, 1000)), -1, -int(rng.integers(1, N + 2)),
                           np.iinfo(np.int64).max, np.iinfo(np.int64).min]))  # fmt: skip


@pytest.mark.parametrize("op", OPS)
def test_out_of_range_indices_are_errors(library, op):
    rng = np.random.default_rng(2)
    N, H = 16, 24
    weight = rng.standard_normal((N, H)).astype(np.float32)
    session = _session(op, weight, library)
    for bad in (N, N + 1, -1, -N, np.iinfo(np.int64).max, np.iinfo(np.int64).min):
        feed = _inputs(rng, op, (2, 1), H, N, 5, np.float32)
        feed["I"][1, 0, 3] = bad
        with pytest.raises(Exception, match=r"outside \[0, 16\)"):
            session.run(None, feed)


def test_index_fuzz(library):
    """Random shapes, one or more random bad indices each: always an ORT error, never a crash."""
    rng = np.random.default_rng(3)
    deadline, cases = time.perf_counter() + 3.0, 0
    while time.perf_counter() < deadline or cases < 20:
        op = OPS[cases % 2]
        dtype = (np.float32, np.float16)[(cases // 2) % 2]
        N, H = int(rng.integers(1, 300)), int(rng.integers(1, 200))
        weight = rng.standard_normal((N, H)).astype(dtype)
        session = _session(op, weight, library)
        B, S, K = int(rng.integers(1, 9)), int(rng.integers(1, 4)), int(rng.integers(1, 64))
        feed = _inputs(rng, op, (B, S), H, N, K, dtype)
        session.run(None, feed)  # valid indices: fine
        flat = feed["I"].reshape(-1)
        for position in rng.choice(flat.size, size=int(rng.integers(1, min(4, flat.size) + 1)), replace=False):
            flat[position] = _bad_value(rng, N)
        with pytest.raises(Exception, match="outside"):
            session.run(None, feed)
        cases += 1


@pytest.mark.parametrize("op", OPS)
def test_shape_mismatch_is_an_error(library, op):
    rng = np.random.default_rng(4)
    session = _session(op, rng.standard_normal((10, 12)).astype(np.float32), library)
    feed = _inputs(rng, op, (2, 1), 12, 10, 3, np.float32)
    wrong_last = dict(feed, A=np.zeros((2, 1, 13 if op == "GatherMatMulT" else 4), np.float32))
    with pytest.raises(Exception, match="last dimension"):
        session.run(None, wrong_last)
    wrong_lead = dict(feed, I=np.zeros((3, 1, 3), np.int64))
    with pytest.raises(Exception, match="leading dimensions"):
        session.run(None, wrong_lead)


def test_library_exports_only_the_entry_point(library):
    if not shutil.which("nm"):
        pytest.skip("nm (binutils) not installed")
    out = subprocess.run(["nm", "-D", "--defined-only", str(library.path)], capture_output=True, text=True, check=True)
    assert [line.split()[-1] for line in out.stdout.splitlines()] == ["RegisterCustomOps"]


def test_doctor_reports_the_library(library):
    from typer.testing import CliRunner

    from popc.cli import app

    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.stdout)
    assert report["present"] and report["loaded"], report
    assert report["ops_ok"] == {"GatherMatMulT": True, "GatherMatMul": True}
    assert "CPUExecutionProvider" in report["providers"]
    assert report["library"] == str(library.path)


def test_missing_library_notice_once(tmp_path, monkeypatch, capsys):
    import onnxruntime as ort

    monkeypatch.setenv("POPC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("POPC_OPLIB_AUTOBUILD", "0")
    monkeypatch.delenv("POPC_OPLIB", raising=False)
    monkeypatch.setattr(oplib, "_notice_shown", False)
    if oplib.find_library() is not None:
        pytest.skip("a library is shipped inside the package")
    assert oplib.register_library(ort.SessionOptions()) is False
    assert oplib.register_library(ort.SessionOptions()) is False
    err = capsys.readouterr().err
    assert err.count("popc op library not found") == 1 and "popc doctor --build" in err


def test_register_library(library):
    import onnxruntime as ort

    assert oplib.register_library(ort.SessionOptions()) is True


def test_cuda_sources_compile_with_nvcc(library, tmp_path):
    """Every CUDA source compiles for GPUs CI cannot run (A100: sm_80, H100/H200: sm_90; one nvcc
    run per file for both), and the host side of the CUDA kernels (POPC_WITH_CUDA) compiles with
    the C++ compiler."""
    nvcc = oplib.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDACXX, PATH, /usr/local/cuda/bin): CUDA kernels not compiled")
    headers = oplib.find_headers()
    src = oplib.source_dir()
    cuda_sources = sorted(src.glob("*.cu"))
    assert {"popc_kernels.cu", "pop_decode_cuda.cu", "pop_partition_cuda.cu"} <= {f.name for f in cuda_sources}
    archs = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ("80", "90")]
    for source in cuda_sources:
        out = tmp_path / f"{source.stem}.o"
        subprocess.run([nvcc, "-c", "-std=c++17", "-O2", *archs, "-I", str(src), str(source), "-o", str(out)],
                       check=True, capture_output=True, text=True)  # fmt: skip
        assert out.stat().st_size > 0
    cxx = shutil.which("c++") or shutil.which("g++")
    for host in ("popc_ops.cc", "pop_ops_cuda.cc"):
        subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-DPOPC_WITH_CUDA=1", "-I", str(headers), "-I", str(src),
                        str(src / host)], check=True, capture_output=True, text=True)  # fmt: skip


def _ffn_op_names(library, monkeypatch, tmp_path, provider: str | None) -> set[str]:
    """The op names ONNX Runtime ran for one whole-FFN PopSwiGLU node (prefill) with the library
    registered under POPC_OPLIB_PROVIDER=``provider``: {"PopSwiGLU"} where its kernel ran, the
    body's ops where it did not."""
    import json

    import onnxruntime as ort
    from test_pop_decode_kernel import ffn_model

    if provider is None:
        monkeypatch.delenv("POPC_OPLIB_PROVIDER", raising=False)
    else:
        monkeypatch.setenv("POPC_OPLIB_PROVIDER", provider)  # read when the library is registered
    rng = np.random.default_rng(9)
    D, H = 48, 16
    weights = [rng.standard_normal((D, H)).astype(np.float32) for _ in range(3)]
    model = ffn_model("PopSwiGLU", weights, rng.random(D).astype(np.float32))
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library.path))
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / f"profile-{provider}")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"X": rng.standard_normal((1, 4, H)).astype(np.float32), "M": np.ones((1, 4), np.float32),
            "P": np.zeros((1, 0), np.int64), "C": np.array([8, 8, 4, 0], np.int64)}  # fmt: skip
    session.run(None, feed)
    with open(session.end_profiling()) as handle:
        return {e["args"]["op_name"] for e in json.load(handle) if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


def test_provider_cuda_leaves_cpu_only_ops_to_their_bodies(library, monkeypatch, tmp_path):
    """POPC_OPLIB_PROVIDER=cuda registers only the ops with CUDA kernels: the whole-FFN kernel (CPU
    only) is left out and its function body runs, with the partition kernel where the library has
    CUDA kernels (its CPU twin runs here) and the partition body where it has none."""
    assert _ffn_op_names(library, monkeypatch, tmp_path, None) == {"PopSwiGLU"}
    names = _ffn_op_names(library, monkeypatch, tmp_path, "cuda")
    assert "PopSwiGLU" not in names and "MatMul" in names
    assert ("PopPartition" in names) == bool(library.cuda), names


def test_provider_switch_rejects_unknown_values(library, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setenv("POPC_OPLIB_PROVIDER", "gpu")
    with pytest.raises(Exception, match="POPC_OPLIB_PROVIDER=gpu is not understood"):
        ort.SessionOptions().register_custom_ops_library(str(library.path))
