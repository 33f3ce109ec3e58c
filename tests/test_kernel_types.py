"""Every op of the popc op library has a CPU kernel for every element type (float32, float16),
and each type's kernel validates its inputs equally strictly.

The ONNX function bodies would accept a negative index (Gather counts it from the end) and
word their errors differently, so a popc error message here shows that the library's kernel
for that element type ran, not the function body.
"""

from __future__ import annotations

import numpy as np
import pytest
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
