"""The op library's fused POP decode kernels (PopSwiGLUDecode / PopGeGLUDecode), partition and
whole-FFN kernels against their ONNX function bodies, with the activation score (config mode 0),
the static one (1) and the output-aware one (2, weighted by the output_norm input), and their
index and shape contracts. Nodes without output_norm (exports made before it) still run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cuda_kernels import pop_function_protos

from popc import oplib
from popc.templates.ops import DOMAIN, VERSION


@pytest.fixture(scope="module")
def library():
    if oplib.toolchain_problem():
        pytest.skip("cannot build the popc op library here")
    return oplib.find_library() or oplib.build()


def spread_norms(rng, D: int, dtype) -> np.ndarray:
    """An output_norm [D] with a wide spread, so that mode 2 changes many selections."""
    return rng.uniform(0.2, 2.0, D).astype(dtype)


def decode_model(
    op: str, weights: list[np.ndarray], approximate: str | None = None, output_norm: np.ndarray | None = None,
    with_norm: bool = True,
) -> onnx.ModelProto:
    """One decode node; its output_norm input ``N`` is ``output_norm`` (default: Wd's row norms),
    or absent (an older export's node) without ``with_norm``."""
    elem = TensorProto.FLOAT16 if weights[0].dtype == np.float16 else TensorProto.FLOAT
    attributes = {"approximate": approximate} if approximate else {}
    if output_norm is None:
        output_norm = np.linalg.norm(weights[2].astype(np.float32), axis=1).astype(weights[2].dtype)
    norm = [numpy_helper.from_array(output_norm, "N")] if with_norm else []
    node = helper.make_node(op, ["X", "P", "C", "Wg", "Wu", "Wd", *(["N"] if with_norm else [])], ["Y"], domain=DOMAIN,
                            **attributes)  # fmt: skip
    graph = helper.make_graph(
        [node], "decode",
        [helper.make_tensor_value_info("X", elem, ["b", "s", "h"]),
         helper.make_tensor_value_info("P", TensorProto.INT64, ["b", "rc"]),
         helper.make_tensor_value_info("C", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("Y", elem, ["b", "s", "h"])],
        initializer=[numpy_helper.from_array(w, n) for w, n in zip(weights, ("Wg", "Wu", "Wd"))] + norm,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, VERSION)],
        functions=pop_function_protos(),
    )
    model.ir_version = 10
    return model


def session(model: onnx.ModelProto, library):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library is not None:
        options.register_custom_ops_library(str(library.path))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


CASES = [("PopSwiGLUDecode", None), ("PopGeGLUDecode", "tanh"), ("PopGeGLUDecode", "none"), ("PopGeGLUDecode", None)]
CASE_IDS = ["swiglu", "geglu-tanh", "geglu-erf", "geglu-default"]
# Every activation with the activation score (mode 0); the output-aware selection (mode 2) is
# the same code for every activation, checked on SwiGLU and tanh GeGLU.
MODE_CASES = [pytest.param(*case, 0, id=name) for case, name in zip(CASES, CASE_IDS)] + [
    pytest.param(*case, 2, id=f"{name}-output") for case, name in zip(CASES[:2], CASE_IDS[:2])
]


@pytest.mark.parametrize("avx2", [True, False], ids=["avx2", "portable"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op,approximate,mode", MODE_CASES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 5), (70, 1)], ids=["b1", "b3", "b2s5", "b70"])
def test_fused_decode_equals_function_body(library, monkeypatch, op, approximate, mode, dtype, avx2, shape):
    if shape[0] > 64 and dtype == np.float16:
        pytest.skip(
            "fp16 gates tie often over 70 rows, and a tie broken differently flips a channel; fp32 checks the row groups"
        )
    if not avx2:
        monkeypatch.setenv("POPC_OPLIB_NO_AVX2", "1")
    rng = np.random.default_rng(7)
    H, D = 40, 96
    weights = [(rng.standard_normal((D, H)) / 4).astype(dtype) for _ in range(3)]
    model = decode_model(op, weights, approximate, spread_norms(rng, D, dtype))
    batch, seq = shape
    retain, candidate, keep = 16, 40, 20
    feed = {
        "X": rng.standard_normal((batch, seq, H)).astype(dtype),
        "P": np.stack([rng.permutation(D)[: retain + candidate] for _ in range(batch)]).astype(np.int64),
        "C": np.array([retain, candidate, keep, mode], np.int64),
    }
    (expected,) = session(model, None).run(None, feed)
    (got,) = session(model, library).run(None, feed)
    tolerance = 2e-2 if dtype == np.float16 else 1e-4
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("bad,message", [(96, "outside"), (-1, "outside"), ("dup", "twice")])
def test_fused_decode_rejects_bad_partitions(library, bad, message):
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((96, 40)).astype(np.float32) for _ in range(3)]
    partition = rng.permutation(96)[None, :24].astype(np.int64)
    partition[0, 5] = partition[0, 2] if bad == "dup" else bad
    feed = {"X": np.ones((1, 1, 40), np.float32), "P": partition, "C": np.array([8, 16, 8, 0], np.int64)}
    with pytest.raises(Exception, match=message):
        session(decode_model("PopSwiGLUDecode", weights), library).run(None, feed)


def test_a_nan_candidate_key_ranks_highest(library):
    """A NaN selection key (here a NaN output_norm entry, mode 2) ranks above every finite key,
    as on the GPU: exactly K candidates are kept, the same as with a huge finite norm there."""
    rng = np.random.default_rng(3)
    H, D = 40, 96
    weights = [(rng.standard_normal((D, H)) / 4).astype(np.float32) for _ in range(3)]
    partition = np.stack([rng.permutation(D)[:56] for _ in range(3)]).astype(np.int64)
    norms = spread_norms(rng, D, np.float32)
    huge, nan = norms.copy(), norms.copy()
    for row in partition:  # one candidate channel of each sequence
        huge[row[30]], nan[row[30]] = 1e30, np.nan
    feed = {"X": rng.standard_normal((3, 1, H)).astype(np.float32), "P": partition,
            "C": np.array([16, 40, 20, 2], np.int64)}  # fmt: skip
    (expected,) = session(decode_model("PopSwiGLUDecode", weights, output_norm=huge), None).run(None, feed)
    for _ in range(2):  # twice: a second call must not reuse the first one's selection
        (got,) = session(decode_model("PopSwiGLUDecode", weights, output_norm=nan), library).run(None, feed)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def partition_model(dtype, with_norm: bool = True) -> onnx.ModelProto:
    """One PopPartition node; static_score ``S`` and output_norm ``N`` are inputs (``N`` absent,
    as in an older export's node, without ``with_norm``)."""
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    node = helper.make_node("PopPartition", ["Z", "M", "C", "S", *(["N"] if with_norm else [])], ["P"], domain=DOMAIN)
    norm = [helper.make_tensor_value_info("N", elem, ["d"])] if with_norm else []
    graph = helper.make_graph(
        [node], "partition",
        [helper.make_tensor_value_info("Z", elem, ["b", "t", "d"]),
         helper.make_tensor_value_info("M", TensorProto.FLOAT, ["b", "t"]),
         helper.make_tensor_value_info("C", TensorProto.INT64, [4]),
         helper.make_tensor_value_info("S", elem, ["d"]), *norm],
        [helper.make_tensor_value_info("P", TensorProto.INT64, ["b", "k"])],
    )  # fmt: skip
    model = decode_model("PopSwiGLUDecode", [np.zeros((2, 2), dtype)] * 3)  # for its functions
    out = helper.make_model(graph, opset_imports=list(model.opset_import), functions=list(model.functions))
    out.ir_version = 10
    return out


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["scored", "static", "output"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_fused_partition_equals_function_body(library, dtype, mode):
    rng = np.random.default_rng(3)
    B, T, D = 3, 9, 200
    mask = np.ones((B, T), np.float32)
    mask[1, :4] = 0  # left padding
    feed = {
        "Z": rng.standard_normal((B, T, D)).astype(dtype),
        "M": mask,
        "C": np.array([50, 70, 30, mode], np.int64),
        "S": rng.random(D).astype(dtype),
        "N": spread_norms(rng, D, dtype),
    }
    model = partition_model(dtype)
    (expected,) = session(model, None).run(None, feed)
    (got,) = session(model, library).run(None, feed)
    assert got.shape == (B, 120)
    for row in range(B):  # same regions; order inside may differ only at fp ties
        assert set(got[row, :50]) == set(expected[row, :50])
        assert set(got[row, 50:]) == set(expected[row, 50:])


def ffn_model(
    op: str, weights: list[np.ndarray], static_score: np.ndarray, output_norm: np.ndarray | None = None
) -> onnx.ModelProto:
    """One whole POP FFN node (both branches), as the POP pass emits it (output_norm ``N``:
    Wd's row norms unless given)."""
    if output_norm is None:
        output_norm = np.linalg.norm(weights[2], axis=1).astype(weights[2].dtype)
    node = helper.make_node(op, ["X", "M", "P", "C", "Wg", "Wu", "Wd", "S", "N"], ["Y", "P_out"], domain=DOMAIN)
    graph = helper.make_graph(
        [node], "ffn",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", "s", "h"]),
         helper.make_tensor_value_info("M", TensorProto.FLOAT, ["b", "s"]),
         helper.make_tensor_value_info("P", TensorProto.INT64, ["b", "rc"]),
         helper.make_tensor_value_info("C", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "s", "h"]),
         helper.make_tensor_value_info("P_out", TensorProto.INT64, ["b", "k"])],
        initializer=[numpy_helper.from_array(w, n)
                     for w, n in zip([*weights, static_score, output_norm], ("Wg", "Wu", "Wd", "S", "N"))],
    )  # fmt: skip
    model = decode_model("PopSwiGLUDecode", weights)  # for its functions
    out = helper.make_model(graph, opset_imports=list(model.opset_import), functions=list(model.functions))
    out.ir_version = 10
    return out


# (R, C, K): a sparse split, and one whose batch union is every channel.
SPLITS = {"sparse": (16, 40, 20), "union-dense": (64, 32, 24)}


@pytest.mark.parametrize("mode", [0, 2], ids=["activation", "output"])
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("op", ["PopSwiGLU", "PopGeGLU"])
def test_whole_ffn_kernel_equals_function_body_at_prefill_and_decode(library, tmp_path, op, split, mode):
    rng = np.random.default_rng(11)
    B, T, H, D = 3, 7, 40, 96
    weights = [(rng.standard_normal((D, H)) / 4).astype(np.float32) for _ in range(3)]
    model = ffn_model(op, weights, rng.random(D).astype(np.float32), spread_norms(rng, D, np.float32))
    mask = np.ones((B, T), np.float32)
    mask[1, :3] = 0  # left padding
    retain, candidate, keep = SPLITS[split]
    config = np.array([retain, candidate, keep, mode], np.int64)
    prefill = {
        "X": rng.standard_normal((B, T, H)).astype(np.float32),
        "M": mask,
        "P": np.zeros((B, 0), np.int64),
        "C": config,
    }
    expected_y, expected_p = session(model, None).run(None, prefill)
    got_y, got_p = session(model, library).run(None, prefill)
    np.testing.assert_allclose(got_y, expected_y, rtol=1e-4, atol=1e-4)
    assert got_p.shape == (B, retain + candidate)
    for row in range(B):  # same regions; order inside may differ only at fp ties
        assert set(got_p[row, :retain]) == set(expected_p[row, :retain])
        assert set(got_p[row, retain:]) == set(expected_p[row, retain:])
    decode = {
        "X": rng.standard_normal((B, 1, H)).astype(np.float32),
        "M": np.ones((B, 1), np.float32),
        "P": expected_p,
        "C": config,
    }
    expected_y, expected_p = session(model, None).run(None, decode)
    got_y, got_p = session(model, library).run(None, decode)
    np.testing.assert_allclose(got_y, expected_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got_p, decode["P"])

    # With the library the node stays one kernel: no If (the function body's branch) is left,
    # unless POPC_OPLIB_WHOLE_FFN=0 leaves that kernel out.
    assert optimized_op_types(model, library, tmp_path) == [op]


def optimized_op_types(model: onnx.ModelProto, library, tmp_path) -> list[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library.path))
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


def test_whole_ffn_kernel_can_be_left_out(library, tmp_path, monkeypatch):
    monkeypatch.setenv("POPC_OPLIB_WHOLE_FFN", "0")
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((96, 40)).astype(np.float32) for _ in range(3)]
    assert "If" in optimized_op_types(ffn_model("PopSwiGLU", weights, np.ones(96, np.float32)), library, tmp_path)


def test_whole_ffn_kernel_rejects_a_bad_config(library):
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((96, 40)).astype(np.float32) for _ in range(3)]
    feed = {"X": np.ones((1, 4, 40), np.float32), "M": np.ones((1, 4), np.float32), "P": np.zeros((1, 0), np.int64),
            "C": np.array([80, 40, 8, 0], np.int64)}  # fmt: skip
    with pytest.raises(Exception, match="config asks for 120 channels"):
        session(ffn_model("PopSwiGLU", weights, np.ones(96, np.float32)), library).run(None, feed)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_output_norm_is_read_in_mode_2_only(library, dtype):
    """Modes 0 and 1 give the same bits whatever output_norm holds (kernels and bodies alike);
    mode 2 selects other channels than mode 0 (so the equality tests above can fail)."""
    rng = np.random.default_rng(5)
    B, T, H, D = 3, 6, 40, 96
    weights = [(rng.standard_normal((D, H)) / 4).astype(dtype) for _ in range(3)]
    norms = [spread_norms(rng, D, dtype) for _ in range(2)]
    decode = {"X": rng.standard_normal((B, 1, H)).astype(dtype),
              "P": np.stack([rng.permutation(D)[:56] for _ in range(B)]).astype(np.int64)}  # fmt: skip
    mask = np.ones((B, T), np.float32)
    partition = {"Z": rng.standard_normal((B, T, D)).astype(dtype), "M": mask, "S": rng.random(D).astype(dtype)}
    for lib in (None, library):
        def run(mode, norm, lib=lib):
            config = np.array([16, 40, 20, mode], np.int64)
            (y,) = session(decode_model("PopSwiGLUDecode", weights, None, norm), lib).run(None, decode | {"C": config})
            (p,) = session(partition_model(dtype), lib).run(None, partition | {"C": config, "N": norm})
            return y, p

        for mode in (0, 1):
            for first, second in zip(run(mode, norms[0]), run(mode, norms[1])):
                np.testing.assert_array_equal(first, second)
        (y0, p0), (y2, p2) = run(0, norms[0]), run(2, norms[0])
        assert np.abs(y2.astype(np.float32) - y0.astype(np.float32)).max() > 1e-2
        assert any(set(p2[row]) != set(p0[row]) for row in range(B))


def test_nodes_without_output_norm_run_and_refuse_mode_2(library):
    """An older export's nodes (no output_norm input) bind to the kernels: modes 0 and 1 as
    before, mode 2 a clear error."""
    rng = np.random.default_rng(2)
    D, H = 96, 40
    weights = [rng.standard_normal((D, H)).astype(np.float32) for _ in range(3)]
    decode = {"X": rng.standard_normal((2, 1, H)).astype(np.float32),
              "P": np.stack([rng.permutation(D)[:24] for _ in range(2)]).astype(np.int64)}  # fmt: skip
    partition = {"Z": rng.standard_normal((2, 5, D)).astype(np.float32), "M": np.ones((2, 5), np.float32),
                 "S": rng.random(D).astype(np.float32)}  # fmt: skip
    old_decode = session(decode_model("PopSwiGLUDecode", weights, with_norm=False), library)
    new_decode = session(decode_model("PopSwiGLUDecode", weights), library)
    old_partition, new_partition = session(partition_model(np.float32, False), library), session(partition_model(np.float32), library)
    for mode in (0, 1):
        config = np.array([8, 16, 8, mode], np.int64)
        np.testing.assert_array_equal(old_decode.run(None, decode | {"C": config})[0],
                                      new_decode.run(None, decode | {"C": config})[0])  # fmt: skip
        np.testing.assert_array_equal(old_partition.run(None, partition | {"C": config})[0],
                                      new_partition.run(None, partition | {"C": config, "N": np.ones(D, np.float32)})[0])  # fmt: skip
    config = np.array([8, 16, 8, 2], np.int64)
    for run in (lambda: old_decode.run(None, decode | {"C": config}), lambda: old_partition.run(None, partition | {"C": config})):
        with pytest.raises(Exception, match="config.3. = 2 .the output-aware score. needs the node's output_norm input"):
            run()


@pytest.mark.parametrize("node", ["decode", "partition", "whole-ffn"])
def test_a_wrong_output_norm_shape_is_an_error(library, node):
    rng = np.random.default_rng(0)
    D, H = 96, 40
    weights = [rng.standard_normal((D, H)).astype(np.float32) for _ in range(3)]
    config = np.array([8, 16, 8, 2], np.int64)
    bad = np.ones(D - 1, np.float32)
    if node == "decode":
        model = decode_model("PopSwiGLUDecode", weights, output_norm=bad)
        feed = {"X": np.ones((1, 1, H), np.float32), "P": rng.permutation(D)[None, :24].astype(np.int64), "C": config}
    elif node == "partition":
        model = partition_model(np.float32)
        feed = {"Z": np.ones((1, 4, D), np.float32), "M": np.ones((1, 4), np.float32), "C": config,
                "S": np.ones(D, np.float32), "N": bad}  # fmt: skip
    else:
        model = ffn_model("PopSwiGLU", weights, np.ones(D, np.float32), bad)
        feed = {"X": np.ones((1, 4, H), np.float32), "M": np.ones((1, 4), np.float32), "P": np.zeros((1, 0), np.int64),
                "C": config}  # fmt: skip
    with pytest.raises(Exception, match=r"output_norm must be \[D\] = \[96\], got \[95\]"):
        session(model, library).run(None, feed)
