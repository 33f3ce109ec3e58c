"""The op library's CUDA kernels (GatherMatMulT / GatherMatMul, PopSwiGLUDecode, PopGeGLUDecode,
PopPartition) against their ONNX function bodies run in float32 on the CPU EP, for float32,
float16 and bfloat16, and their index contract without a host sync per call.

Every test here is ``gpu``-marked and takes the ``cuda`` fixture (skips without a GPU). Models
compute in the tested type: their float inputs and weights are float32 rounded to that type and
cast to it inside the graph (ONNX Runtime's Python API has no bfloat16 arrays), and their float
outputs are cast back. The reference is the function body on the same rounded values in float32
(the kernels accumulate in float32 whatever the type).

The helpers (``op_model``, ``rounded``, ...) are also used by the CPU twins' tests
(test_kernel_types.py).
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from popc import oplib
from popc.templates.ops import DOMAIN, VERSION
from popc.templates.pop_ffn import POP_FUNCTIONS

ELEMENT = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
TYPES = list(ELEMENT)
# Output rounding (fp16: 2^-11, bf16: 2^-8 relative) on sums of ~100 terms.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 4e-2}


def rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` (round to nearest even), as float32."""
    values = np.asarray(values, np.float32)
    if dtype == "fp16":
        return values.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        bits = values.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32)
    return values


def pop_function_protos() -> list[onnx.FunctionProto]:
    """The ai.popc function bodies, each importing the domain it calls (a model's functions)."""
    functions = []
    for function in POP_FUNCTIONS:
        proto = function.to_function_proto()
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
        functions.append(proto)
    return functions


def op_model(
    op: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]], dtype: str,
    initializers: dict[str, np.ndarray] | None = None, **attributes,
) -> onnx.ModelProto:
    """One ``op`` node computing in ``dtype``. ``inputs`` / ``outputs``: (name, kind) in node order,
    kind "float" (float32 outside the node, cast to and from ``dtype``) or "int64"; an input named
    in ``initializers`` is a constant (float32 or int64 array), the others graph inputs of any
    shape. The node's absent optional inputs are given as ("", "")."""
    initializers = initializers or {}
    elem = ELEMENT[dtype]
    nodes, graph_inputs, inits, node_inputs = [], [], [], []
    for name, kind in inputs:
        if not name:
            node_inputs.append("")
            continue
        if name in initializers:
            inits.append(numpy_helper.from_array(initializers[name], name))
        else:
            elem_in = TensorProto.FLOAT if kind == "float" else TensorProto.INT64
            graph_inputs.append(helper.make_tensor_value_info(name, elem_in, None))
        if kind == "float":
            nodes.append(helper.make_node("Cast", [name], [f"{name}_t"], to=elem))
            node_inputs.append(f"{name}_t")
        else:
            node_inputs.append(name)
    node_outputs, graph_outputs = [], []
    for name, kind in outputs:
        if kind == "float":
            node_outputs.append(f"{name}_t")
            graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        else:
            node_outputs.append(name)
            graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, None))
    nodes.append(helper.make_node(op, node_inputs, node_outputs, domain=DOMAIN, **attributes))
    for name, kind in outputs:
        if kind == "float":
            nodes.append(helper.make_node("Cast", [f"{name}_t"], [name], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, op, graph_inputs, graph_outputs, initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, VERSION)],
        functions=pop_function_protos(),
    )  # fmt: skip
    model.ir_version = 10
    return model


def body_session(model: onnx.ModelProto):
    """The model's function bodies on the CPU EP (no op library)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def library_session(model: onnx.ModelProto, library: oplib.LibraryInfo, device: str = "cpu", profile_dir=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(library.path))
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_dir / "profile")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def node_providers(session, op: str) -> set[str]:
    """The providers that ran ``op`` nodes in a profiled session (ends its profiling)."""
    with open(session.end_profiling()) as handle:
        events = json.load(handle)
    return {e["args"].get("provider", "?") for e in events
            if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == op}  # fmt: skip


# ---- the models of each op ------------------------------------------------------------------
def gather_model(op: str, weight: np.ndarray, dtype: str) -> onnx.ModelProto:
    return op_model(op, [("A", "float"), ("W", "float"), ("I", "int64")], [("Y", "float")], dtype, {"W": weight})


DECODE_CASES = {
    "swiglu": ("PopSwiGLUDecode", None),
    "geglu-tanh": ("PopGeGLUDecode", "tanh"),
    "geglu-erf": ("PopGeGLUDecode", "none"),
}


def decode_model(op: str, approximate: str | None, weights: list[np.ndarray], norm: np.ndarray, dtype: str):
    attributes = {"approximate": approximate} if approximate else {}
    inits = {"Wg": weights[0], "Wu": weights[1], "Wd": weights[2], "N": norm}
    inputs = [("X", "float"), ("P", "int64"), ("C", "int64"), ("Wg", "float"), ("Wu", "float"), ("Wd", "float"),
              ("N", "float")]  # fmt: skip
    return op_model(op, inputs, [("Y", "float")], dtype, inits, **attributes)


def partition_model(dtype: str) -> onnx.ModelProto:
    inputs = [("Z", "float"), ("M", "float"), ("C", "int64"), ("S", "float"), ("N", "float")]
    model = op_model("PopPartition", inputs, [("P", "int64")], dtype)
    for node in model.graph.node:  # the token mask stays float32 (the op's contract)
        if node.op_type == "Cast" and node.input[0] == "M":
            node.attribute[0].i = TensorProto.FLOAT
    return model


# Decode inputs lie on a grid (X integers in [-2, 2], weights multiples of 1/64 in [-1/4, 1/4]) so
# that every dot product is exact in float32 whatever the summation order: the kernel and the body
# then rank candidates by equal gates, and differ only where ties are broken (to the lower
# position in both), never by a rounding difference that flips a near-tied channel.
def decode_feed(rng, batch: int, seq: int, H: int, D: int, split: tuple[int, int, int], mode: int, dtype: str):
    retain, candidate, keep = split
    return {
        "X": rng.integers(-2, 3, (batch, seq, H)).astype(np.float32),
        # Different partitions per sequence: the batch's union logic is exercised.
        "P": np.stack([rng.permutation(D)[: retain + candidate] for _ in range(batch)]).astype(np.int64),
        "C": np.array([retain, candidate, keep, mode], np.int64),
    }


def decode_weights(rng, D: int, H: int, dtype: str) -> tuple[list[np.ndarray], np.ndarray]:
    weights = [(rng.integers(-16, 17, (D, H)) / 64).astype(np.float32) for _ in range(3)]  # exact in every type
    return weights, rounded(rng.uniform(0.2, 2.0, D), dtype)  # a wide output_norm: mode 2 changes selections


def partition_feed(rng, B: int, T: int, D: int, split: tuple[int, int], mode: int, dtype: str):
    mask = np.ones((B, T), np.float32)
    mask[1 % B, : T // 2] = 0  # left padding
    return {
        "Z": rounded(rng.standard_normal((B, T, D)), dtype),
        "M": mask,
        "C": np.array([split[0], split[1], 0, mode], np.int64),
        # Static scores with many ties (ranked to the lower id), output norms with a wide spread.
        "S": rounded(np.round(rng.random(D), 2), dtype),
        "N": rounded(rng.uniform(0.2, 2.0, D), dtype),
    }


def reference_scores(feed: dict[str, np.ndarray], mode: int) -> np.ndarray:
    """PopPartition's scores [B, D] in float64."""
    if mode == 1:
        return np.broadcast_to(feed["S"].astype(np.float64), feed["Z"].shape[::2]).copy()
    Z = feed["Z"].astype(np.float64)
    normalised = Z / (np.linalg.norm(Z, axis=-1, keepdims=True) + 1e-12) * feed["M"][..., None]
    score = np.sqrt((normalised**2).sum(axis=1))
    return score * feed["N"].astype(np.float64) if mode == 2 else score


def assert_ranked(got: np.ndarray, score: np.ndarray, count: int, relative: float) -> None:
    """Each row of ``got`` is ``count`` distinct channels in decreasing score, and none left out
    scores higher, up to ``relative`` of the row's top score (float32 summation order)."""
    assert got.shape == (score.shape[0], count)
    for row, ids in enumerate(got):
        assert len(set(ids.tolist())) == count and ids.min() >= 0 and ids.max() < score.shape[1]
        s = score[row]
        tol = relative * s.max()
        assert np.all(np.diff(s[ids]) <= tol), "not in decreasing score"
        rest = np.setdiff1d(np.arange(s.size), ids)
        if rest.size:
            assert s[ids].min() >= s[rest].max() - tol, "a higher-scoring channel was left out"


# Inputs of the wrong shape and the error each names (the host-side checks the CPU and CUDA
# kernels share): (id, op, feed and weight changes, message). D = 96, H = 40, R + C = 24.
BAD_SHAPES = [
    ("x-rank", "PopSwiGLUDecode", {"X": (2, 40)}, r"X must be \[B, S, H\]"),
    ("p-batch", "PopSwiGLUDecode", {"P": (3, 24)}, r"partition must be \[B, R\+C\] with X's batch"),
    ("x-width", "PopSwiGLUDecode", {"X": (2, 1, 41)}, r"weights must be \[D, H\] with X's H"),
    ("wu-shape", "PopSwiGLUDecode", {"Wu": (95, 40)}, "Wg, Wu and Wd must have one shape"),
    ("config", "PopSwiGLUDecode", {"C": (3,)}, r"config must be int64 \[4\]"),
    ("p-width", "PopSwiGLUDecode", {"P": (2, 97)}, "more channels than the FFN"),
    ("z-rank", "PopPartition", {"Z": (2, 96)}, r"Z must be \[B, T, D\]"),
    ("mask", "PopPartition", {"M": (2, 4)}, r"token_mask must be \[B, T\] like Z"),
    ("static", "PopPartition", {"S": (95,)}, r"static_score must be \[D\]"),
    ("p-config", "PopPartition", {"C": (3,)}, r"config must be int64 \[4\]"),
]


def bad_shape_case(op: str, changes: dict[str, tuple[int, ...]], dtype: str):
    """(model, feed) of a valid call of ``op`` with the inputs in ``changes`` given those shapes."""
    rng = np.random.default_rng(0)
    if op == "PopPartition":
        feed = partition_feed(rng, 2, 5, 96, (8, 16), 0, dtype)
        for name, shape in changes.items():
            feed[name] = np.zeros(shape, feed[name].dtype)
        return partition_model(dtype), feed
    weights, norm = decode_weights(rng, 96, 40, dtype)
    if "Wu" in changes:
        weights[1] = np.zeros(changes["Wu"], np.float32)
    feed = decode_feed(rng, 2, 1, 40, 96, (8, 16, 8), 0, dtype)
    for name, shape in changes.items():
        if name in feed:
            feed[name] = np.zeros(shape, feed[name].dtype)
    return decode_model(op, None, weights, norm, dtype), feed


# ---- GPU tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_library(cuda) -> oplib.LibraryInfo:
    info = oplib.find_library()
    assert info is not None and info.cuda
    return info


@pytest.fixture(autouse=True)
def _default_checks(monkeypatch):
    monkeypatch.delenv("POPC_CUDA_SYNC_CHECKS", raising=False)  # each test says which it wants
    monkeypatch.delenv("POPC_OPLIB_PROVIDER", raising=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("op", ["GatherMatMulT", "GatherMatMul"])
@pytest.mark.parametrize("lead,H,N,K", [((1, 1), 64, 50, 7), ((3, 2), 200, 300, 33), ((2, 1), 2048, 8192, 1024)])
def test_gather_kernels_on_cuda_equal_function_bodies(gpu_library, op, dtype, lead, H, N, K):
    rng = np.random.default_rng(N + K)
    weight = rounded(rng.standard_normal((N, H)) / 4, dtype)
    feed = {"A": rounded(rng.standard_normal((*lead, H if op == "GatherMatMulT" else K)), dtype),
            "I": rng.integers(0, N, (*lead, K), dtype=np.int64)}  # fmt: skip
    (expected,) = body_session(gather_model(op, weight, "fp32")).run(None, feed)
    (got,) = library_session(gather_model(op, weight, dtype), gpu_library, "cuda").run(None, feed)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["activation", "static", "output"])
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1)], ids=["b1", "b3"])
def test_decode_on_cuda_equals_function_body(gpu_library, case, mode, dtype, shape):
    op, approximate = DECODE_CASES[case]
    rng = np.random.default_rng(5)
    H, D = 64, 256
    weights, norm = decode_weights(rng, D, H, dtype)
    feed = decode_feed(rng, *shape, H, D, (32, 96, 40), mode, dtype)
    (expected,) = body_session(decode_model(op, approximate, weights, norm, "fp32")).run(None, feed)
    (got,) = library_session(decode_model(op, approximate, weights, norm, dtype), gpu_library, "cuda").run(None, feed)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [0, 2], ids=["activation", "output"])
def test_decode_on_cuda_with_several_tokens_per_sequence(gpu_library, mode):
    """X [2, 3, H]: the rows of one sequence share its partition (the gate's union is per sequence)."""
    test_decode_on_cuda_equals_function_body(gpu_library, "swiglu", mode, "fp32", (2, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("split", [(1024, 2048, 1024), (0, 8192, 2048), (2048, 0, 0), (0, 0, 0)],
                         ids=["pop", "dynamic", "fixed", "empty"])  # fmt: skip
def test_decode_on_cuda_at_llama_1b_width(gpu_library, dtype, split):
    """D = 8192 (Llama-3.2-1B's FFN), three sequences with different partitions."""
    rng = np.random.default_rng(6)
    H, D = 256, 8192
    weights, norm = decode_weights(rng, D, H, dtype)
    feed = decode_feed(rng, 3, 1, H, D, split, 0, dtype)
    model = decode_model("PopSwiGLUDecode", None, weights, norm, dtype)
    (expected,) = body_session(decode_model("PopSwiGLUDecode", None, weights, norm, "fp32")).run(None, feed)
    (got,) = library_session(model, gpu_library, "cuda").run(None, feed)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["activation", "static", "output"])
def test_partition_on_cuda_equals_function_body(gpu_library, dtype, mode):
    rng = np.random.default_rng(3)
    feed = partition_feed(rng, 3, 9, 200, (50, 70), mode, dtype)
    (expected,) = body_session(partition_model("fp32")).run(None, feed)
    (got,) = library_session(partition_model(dtype), gpu_library, "cuda").run(None, feed)
    assert got.shape == expected.shape == (3, 120)
    if mode == 1:  # no arithmetic: the same order exactly, ties to the lower id
        np.testing.assert_array_equal(got, expected)
    for row in range(3):  # the same regions; order inside may differ only at float ties
        assert set(got[row, :50]) == set(expected[row, :50])
        assert set(got[row, 50:]) == set(expected[row, 50:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["activation", "static", "output"])
@pytest.mark.parametrize("D", [8192, 16384])  # the global-memory sort (D <= 4096 sorts in shared memory)
def test_partition_on_cuda_ranks_wide_ffns(gpu_library, dtype, mode, D):
    rng = np.random.default_rng(D)
    feed = partition_feed(rng, 2, 5, D, (D // 8, D // 4), mode, dtype)
    (got,) = library_session(partition_model(dtype), gpu_library, "cuda").run(None, feed)
    assert_ranked(got, reference_scores(feed, mode), D // 8 + D // 4, relative=1e-5)
    if mode == 1:
        order = np.lexsort((np.arange(D), -feed["S"].astype(np.float64)))[: D // 8 + D // 4]
        np.testing.assert_array_equal(got, np.stack([order, order]))


@pytest.mark.gpu
def test_every_op_runs_on_the_cuda_ep(gpu_library, tmp_path):
    rng = np.random.default_rng(1)
    H, D = 64, 256
    weights, norm = decode_weights(rng, D, H, "fp16")
    session = library_session(decode_model("PopSwiGLUDecode", None, weights, norm, "fp16"), gpu_library, "cuda",
                              tmp_path)  # fmt: skip
    session.run(None, decode_feed(rng, 2, 1, H, D, (32, 96, 40), 0, "fp16"))
    assert node_providers(session, "PopSwiGLUDecode") == {"CUDAExecutionProvider"}
    session = library_session(partition_model("bf16"), gpu_library, "cuda", tmp_path)
    session.run(None, partition_feed(rng, 2, 5, D, (32, 96), 0, "bf16"))
    assert node_providers(session, "PopPartition") == {"CUDAExecutionProvider"}
    session = library_session(gather_model("GatherMatMulT", weights[0], "fp32"), gpu_library, "cuda", tmp_path)
    session.run(None, {"A": rng.standard_normal((2, 1, H)).astype(np.float32),
                       "I": rng.integers(0, D, (2, 1, 9), dtype=np.int64)})  # fmt: skip
    assert node_providers(session, "GatherMatMulT") == {"CUDAExecutionProvider"}


def _bad_feeds(rng, op: str):
    """(session model, a valid feed, [(bad feed, message)]) for one op, N = D = 96."""
    H, N = 40, 96
    if op.startswith("Gather"):
        weight = rounded(rng.standard_normal((N, H)), "fp32")
        valid = {"A": rng.standard_normal((2, 1, H if op == "GatherMatMulT" else 5)).astype(np.float32),
                 "I": rng.integers(0, N, (2, 1, 5), dtype=np.int64)}  # fmt: skip
        bad = []
        for value in (N, -1, np.iinfo(np.int64).min):
            feed = {k: v.copy() for k, v in valid.items()}
            feed["I"][1, 0, 3] = value
            bad.append((feed, r"outside \[0, 96\)"))
        return gather_model(op, weight, "fp32"), valid, bad
    weights, norm = decode_weights(rng, N, H, "fp32")
    valid = decode_feed(rng, 3, 1, H, N, (8, 16, 8), 0, "fp32")
    bad = []
    for value, message in ((N, r"outside \[0, 96\)"), (-1, r"outside \[0, 96\)"), ("dup", "twice")):
        feed = {k: v.copy() for k, v in valid.items()}
        feed["P"][2, 5] = feed["P"][2, 2] if value == "dup" else value
        bad.append((feed, message))
    return decode_model(op, None, weights, norm, "fp32"), valid, bad


BAD_OPS = ["GatherMatMulT", "GatherMatMul", "PopSwiGLUDecode"]


@pytest.mark.gpu
@pytest.mark.parametrize("op", BAD_OPS)
def test_bad_indices_are_errors_with_sync_checks(gpu_library, monkeypatch, op):
    monkeypatch.setenv("POPC_CUDA_SYNC_CHECKS", "1")  # read when the kernels are created
    model, valid, bad = _bad_feeds(np.random.default_rng(2), op)
    session = library_session(model, gpu_library, "cuda")
    (expected,) = session.run(None, valid)
    for feed, message in bad:
        with pytest.raises(Exception, match=message):
            session.run(None, feed)
        (again,) = session.run(None, valid)  # the error was this call's only: the session goes on
        np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("op", BAD_OPS)
def test_bad_indices_are_reported_by_a_later_call(gpu_library, op):
    """Without sync checks the call with a bad index returns (the GPU skipped the index) and a
    later call of the node fails with the error, once; the calls after it run."""
    model, valid, bad = _bad_feeds(np.random.default_rng(3), op)
    session = library_session(model, gpu_library, "cuda")
    (expected,) = session.run(None, valid)
    for feed, message in bad:
        session.run(None, feed)  # no error yet: no host sync per call (a CPU kernel would raise here)
        reported = None
        for _ in range(5):  # the report needs the GPU to have finished the bad call: Run waits for it
            try:
                session.run(None, valid)
            except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types
                reported = str(error)
                break
            time.sleep(0.05)
        assert reported is not None, "the bad index was never reported"
        assert "earlier call" in reported and re.search(message, reported), reported
        (after,) = session.run(None, valid)
        np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_decode_step_replays_as_a_cuda_graph(gpu_library):
    """Fixed output shapes, config on the host and no allocation or host sync per call: ONNX
    Runtime captures the decode node in a CUDA graph, and replays compute with new inputs."""
    import onnxruntime as ort

    rng = np.random.default_rng(8)
    H, D, B = 64, 256, 2
    weights, norm = decode_weights(rng, D, H, "fp32")
    config = np.array([32, 96, 40, 0], np.int64)
    graph = helper.make_graph(
        [helper.make_node("PopSwiGLUDecode", ["X", "P", "C", "Wg", "Wu", "Wd", "N"], ["Y"], domain=DOMAIN)], "step",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [B, 1, H]),
         helper.make_tensor_value_info("P", TensorProto.INT64, [B, 128])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [B, 1, H])],
        initializer=[numpy_helper.from_array(a, n) for a, n in zip([config, *weights, norm], ["C", "Wg", "Wu", "Wd", "N"])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, VERSION)],
                              functions=pop_function_protos())  # fmt: skip
    model.ir_version = 10
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(gpu_library.path))
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])  # fmt: skip
    feeds = [decode_feed(rng, B, 1, H, D, (32, 96, 40), 0, "fp32") for _ in range(4)]
    x = ort.OrtValue.ortvalue_from_numpy(feeds[0]["X"], "cuda", 0)
    p = ort.OrtValue.ortvalue_from_numpy(feeds[0]["P"], "cuda", 0)
    y = ort.OrtValue.ortvalue_from_shape_and_type([B, 1, H], np.float32, "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("X", x)
    binding.bind_ortvalue_input("P", p)
    binding.bind_ortvalue_output("Y", y)
    reference = body_session(decode_model("PopSwiGLUDecode", None, weights, norm, "fp32"))
    for feed in feeds:  # a plain run, the capture, then replays
        x.update_inplace(feed["X"])
        p.update_inplace(feed["P"])
        session.run_with_iobinding(binding)
        (expected,) = reference.run(None, {"X": feed["X"], "P": feed["P"], "C": config})
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case,op,changes,message", BAD_SHAPES, ids=[c[0] for c in BAD_SHAPES])
def test_bad_shapes_are_errors_on_cuda(gpu_library, dtype, case, op, changes, message):
    model, feed = bad_shape_case(op, changes, dtype)
    with pytest.raises(Exception, match=message):
        library_session(model, gpu_library, "cuda").run(None, feed)


@pytest.mark.gpu
def test_provider_cuda_keeps_the_whole_ffn_on_the_gpu(gpu_library, monkeypatch, tmp_path):
    """POPC_OPLIB_PROVIDER=cuda (popc's CUDA sessions): the CPU-only whole-FFN kernel is left out,
    so its body runs on the CUDA EP with the decode kernel inside it on the GPU."""
    from test_pop_decode_kernel import ffn_model

    monkeypatch.setenv("POPC_OPLIB_PROVIDER", "cuda")  # read when the library is registered
    rng = np.random.default_rng(10)
    H, D = 64, 256
    weights, norm = decode_weights(rng, D, H, "fp32")
    model = ffn_model("PopSwiGLU", weights, rng.random(D).astype(np.float32), norm)
    feed = decode_feed(rng, 2, 1, H, D, (32, 96, 40), 0, "fp32")
    feed = {"X": feed["X"], "M": np.ones((2, 1), np.float32), "P": feed["P"], "C": feed["C"]}
    (expected, _) = body_session(model).run(None, feed)
    session = library_session(model, gpu_library, "cuda", tmp_path)
    (got, partition) = session.run(None, feed)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(partition, feed["P"])
    assert node_providers(session, "PopSwiGLUDecode") == {"CUDAExecutionProvider"}
