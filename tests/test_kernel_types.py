"""Every op of the popc op library has a CPU kernel for every element type (float32, float16;
bfloat16 too for the ops with CUDA kernels, so that each CUDA kernel has a CPU twin of its type),
and each type's kernel validates its inputs equally strictly.

The ONNX function bodies would accept a negative index (Gather counts it from the end) and
word their errors differently, so a popc error message here shows that the library's kernel
for that element type ran, not the function body.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda_kernels import (
    BAD_SHAPES,
    DECODE_CASES,
    TOLERANCE,
    bad_shape_case,
    body_session,
    decode_feed,
    decode_weights,
    gather_model,
    library_session,
    node_providers,
    partition_feed,
    rounded,
)
from test_cuda_kernels import decode_model as typed_decode_model
from test_cuda_kernels import partition_model as typed_partition_model
from test_pop_decode_kernel import decode_model, partition_model, session

from popc import oplib


@pytest.fixture(scope="module")
def library():
    if oplib.toolchain_problem():
        pytest.skip("cannot build the popc op library here")
    return oplib.find_library() or oplib.build()


DTYPES = pytest.mark.parametrize(
    "dtype", [np.float32, np.float16], ids=["fp32", "fp16"]
)


@DTYPES
@pytest.mark.parametrize("op", ["GatherMatMulT", "GatherMatMul"])
@pytest.mark.parametrize("bad", [-1, 16])
def test_gather_kernels_reject_bad_indices(library, op, dtype, bad):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 24)).astype(dtype)
    a = rng.standard_normal((2, 1, 24 if op == "GatherMatMulT" else 5)).astype(dtype)
    idx = rng.integers(0, 16, (2, 1, 5), dtype=np.int64)
    s = session(oplib.make_op_model(op, weight), library)
    s.run(None, {"A": a, "I": idx})
    idx[1, 0, 3] = bad
    with pytest.raises(Exception, match=r"outside \[0, 16\)"):
        s.run(None, {"A": a, "I": idx})


@DTYPES
@pytest.mark.parametrize(
    "op,approximate", [("PopSwiGLUDecode", None), ("PopGeGLUDecode", "tanh")]
)
@pytest.mark.parametrize(
    "bad,message", [(-1, "outside"), (96, "outside"), ("dup", "twice")]
)
@pytest.mark.parametrize(
    "batch", [1, 3], ids=["b1", "b3"]
)  # one-row split and one task per row
def test_decode_kernels_reject_bad_partitions(
    library, op, approximate, dtype, bad, message, batch
):
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((96, 40)).astype(dtype) for _ in range(3)]
    partition = np.stack([rng.permutation(96)[:24] for _ in range(batch)]).astype(
        np.int64
    )
    feed = {
        "X": np.ones((batch, 1, 40), dtype),
        "P": partition,
        "C": np.array([8, 16, 8, 0], np.int64),
    }
    s = session(decode_model(op, weights, approximate), library)
    s.run(None, feed)
    partition[-1, 5] = partition[-1, 2] if bad == "dup" else bad
    with pytest.raises(Exception, match=message):
        s.run(None, feed)


@DTYPES
def test_partition_kernel_rejects_bad_config(library, dtype):
    rng = np.random.default_rng(2)
    B, T, D = 2, 3, 20
    feed = {
        "Z": rng.standard_normal((B, T, D)).astype(dtype),
        "M": np.ones((B, T), np.float32),
        "C": np.array([5, 5, 3, 0], np.int64),
        "S": rng.random(D).astype(dtype),
        "N": rng.random(D).astype(dtype),
    }
    s = session(partition_model(dtype), library)
    (got,) = s.run(None, feed)
    assert got.shape == (B, 10) and got.dtype == np.int64
    feed["C"] = np.array([15, 6, 3, 0], np.int64)
    with pytest.raises(Exception, match="config asks for 21 channels"):
        s.run(None, feed)


# ---- bfloat16: the CPU twins of the CUDA kernels -------------------------------------------------
# Models cast float32 values rounded to bfloat16 into the node and its output back (ONNX Runtime's
# Python API has no bfloat16 arrays); the reference is the float32 function body on the same values.
@pytest.mark.parametrize("op", ["GatherMatMulT", "GatherMatMul"])
def test_bf16_gather_kernels_equal_the_fp32_body(library, op, tmp_path):
    rng = np.random.default_rng(4)
    N, H, K = 80, 72, 11
    weight = rounded(rng.standard_normal((N, H)) / 4, "bf16")
    feed = {"A": rounded(rng.standard_normal((3, 2, H if op == "GatherMatMulT" else K)), "bf16"),
            "I": rng.integers(0, N, (3, 2, K), dtype=np.int64)}  # fmt: skip
    (expected,) = body_session(gather_model(op, weight, "fp32")).run(None, feed)
    s = library_session(gather_model(op, weight, "bf16"), library, "cpu", tmp_path)
    (got,) = s.run(None, feed)
    np.testing.assert_allclose(got, expected, rtol=TOLERANCE["bf16"], atol=TOLERANCE["bf16"])
    assert node_providers(s, op) == {"CPUExecutionProvider"}  # the kernel ran, not the body
    feed["I"][2, 1, 4] = -1
    with pytest.raises(Exception, match=r"outside \[0, 80\)"):
        library_session(gather_model(op, weight, "bf16"), library).run(None, feed)


@pytest.mark.parametrize("mode", [0, 2], ids=["activation", "output"])
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 3)], ids=["b1", "b3", "b2s3"])
def test_bf16_decode_kernels_equal_the_fp32_body(library, case, mode, shape, tmp_path):
    op, approximate = DECODE_CASES[case]
    rng = np.random.default_rng(5)
    H, D = 64, 256
    weights, norm = decode_weights(rng, D, H, "bf16")
    feed = decode_feed(rng, *shape, H, D, (32, 96, 40), mode, "bf16")
    (expected,) = body_session(typed_decode_model(op, approximate, weights, norm, "fp32")).run(None, feed)
    s = library_session(typed_decode_model(op, approximate, weights, norm, "bf16"), library, "cpu", tmp_path)
    (got,) = s.run(None, feed)
    np.testing.assert_allclose(got, expected, rtol=TOLERANCE["bf16"], atol=TOLERANCE["bf16"])
    assert node_providers(s, op) == {"CPUExecutionProvider"}


@pytest.mark.parametrize("bad,message", [(-1, "outside"), (256, "outside"), ("dup", "twice")])
def test_bf16_decode_kernel_rejects_bad_partitions(library, bad, message):
    rng = np.random.default_rng(6)
    weights, norm = decode_weights(rng, 256, 64, "bf16")
    feed = decode_feed(rng, 3, 1, 64, 256, (32, 96, 40), 0, "bf16")
    feed["P"][1, 7] = feed["P"][1, 3] if bad == "dup" else bad
    with pytest.raises(Exception, match=message):
        library_session(typed_decode_model("PopSwiGLUDecode", None, weights, norm, "bf16"), library).run(None, feed)


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["activation", "static", "output"])
def test_bf16_partition_kernel_equals_the_fp32_body(library, mode, tmp_path):
    rng = np.random.default_rng(7)
    feed = partition_feed(rng, 3, 9, 200, (50, 70), mode, "bf16")
    (expected,) = body_session(typed_partition_model("fp32")).run(None, feed)
    s = library_session(typed_partition_model("bf16"), library, "cpu", tmp_path)
    (got,) = s.run(None, feed)
    assert got.shape == expected.shape == (3, 120)
    if mode == 1:  # no arithmetic: the same order exactly (many ties, to the lower id)
        np.testing.assert_array_equal(got, expected)
    for row in range(3):
        assert set(got[row, :50]) == set(expected[row, :50])
        assert set(got[row, 50:]) == set(expected[row, 50:])
    assert node_providers(s, "PopPartition") == {"CPUExecutionProvider"}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case,op,changes,message", BAD_SHAPES, ids=[c[0] for c in BAD_SHAPES])
def test_fused_kernels_reject_bad_shapes(library, dtype, case, op, changes, message, tmp_path):
    """The shape checks the CPU and CUDA kernels share (pop_ffn_ort.h), for every type."""
    model, feed = bad_shape_case(op, changes, dtype)
    with pytest.raises(Exception, match=message):
        library_session(model, library).run(None, feed)
