"""The op library's kernels on block-quantized weight rows (GatherMatMulTQ / GatherMatMulQ,
PopSwiGLUDecodeQ / PopGeGLUDecodeQ, PopSwiGLUQ / PopGeGLUQ) against their ONNX function bodies
(templates/ops.py, templates/pop_ffn_quant.py), on the AVX2 path and the portable one, and their
input contract: every bad input an ORT error naming the op, never a crash or a stray read.

Weights are small random matrices quantized with popc.quantize.quantize_rows. The POP ops run
with the activation score (config mode 0), the static one (1) and the output-aware one (2, the
output_norm input ``N``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from popc import oplib
from popc.quantize import QuantScheme, quantize_rows
from popc.templates.ops import DOMAIN, VERSION, GatherMatMulQ, GatherMatMulTQ
from popc.templates.pop_ffn import POP_FUNCTIONS
from popc.templates.pop_ffn_quant import POP_QUANT_FUNCTIONS

MSFT = "com.microsoft"
PATHS = pytest.mark.parametrize("avx2", [True, False], ids=["avx2", "portable"])


@pytest.fixture(scope="module")
def library():
    if oplib.toolchain_problem():
        pytest.skip("cannot build the popc op library here")
    return oplib.find_library() or oplib.build()


@pytest.fixture
def path(monkeypatch, request):
    """Set POPC_OPLIB_NO_AVX2 for the portable path (read when a session creates its kernels)."""

    def use(avx2: bool) -> None:
        if not avx2:
            monkeypatch.setenv("POPC_OPLIB_NO_AVX2", "1")

    return use


def function_protos(functions) -> list[onnx.FunctionProto]:
    protos = []
    for function in functions:
        proto = function.to_function_proto()
        for domain in (DOMAIN, MSFT):
            if not any(o.domain == domain for o in proto.opset_import):
                proto.opset_import.append(helper.make_opsetid(domain, VERSION))
        protos.append(proto)
    return protos


def elem_of(dtype) -> int:
    return TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT


def quantized(w: np.ndarray, bits: int, block: int, scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    q, s = quantize_rows(w, QuantScheme(bits, block))
    return q, s.astype(scale_dtype)


def model(node: onnx.NodeProto, inputs, outputs, initializers: dict, functions) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "quant", inputs, outputs, initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()]
    )
    out = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, VERSION), helper.make_opsetid(MSFT, 1)],
        functions=function_protos(functions),
    )
    out.ir_version = 10
    return out


def session(m: onnx.ModelProto, library):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library is not None:
        options.register_custom_ops_library(str(library.path))
    return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])


def both(m: onnx.ModelProto, library, feed: dict) -> tuple[list, list]:
    """(function body's outputs, library kernel's outputs)."""
    return session(m, None).run(None, feed), session(m, library).run(None, feed)


# ---- GatherMatMulTQ / GatherMatMulQ -------------------------------------------------------------
def gather_model(op: str, wq: np.ndarray, ws: np.ndarray, bits: int, block: int, dtype=np.float32) -> onnx.ModelProto:
    node = helper.make_node(op, ["A", "Wq", "Ws", "I"], ["Y"], domain=DOMAIN, bits=bits, block_size=block)
    inputs = [helper.make_tensor_value_info("A", elem_of(dtype), ["b", "s", "a"]),
              helper.make_tensor_value_info("I", TensorProto.INT64, ["b", "s", "k"])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("Y", elem_of(dtype), None)]
    return model(node, inputs, outputs, {"Wq": wq, "Ws": ws}, [GatherMatMulTQ, GatherMatMulQ])


@PATHS
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("op", ["GatherMatMulTQ", "GatherMatMulQ"])
def test_gather_kernels_equal_function_body(library, path, op, bits, block, dtype, avx2):
    path(avx2)
    rng = np.random.default_rng(bits * 100 + block)
    N, H, K = 37, 320, 7  # K: one group of four rows and a ragged one; H: 320 = 5 x 64 (tasks of 256 + 64)
    wq, ws = quantized(rng.standard_normal((N, H)).astype(np.float32), bits, block, dtype)
    m = gather_model(op, wq, ws, bits, block, dtype)
    a = rng.standard_normal((3, 2, H if op == "GatherMatMulTQ" else K)).astype(dtype)
    feed = {"A": a, "I": rng.integers(0, N, (3, 2, K), dtype=np.int64)}
    (expected,), (got,) = both(m, library, feed)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    tolerance = 2e-2 if dtype == np.float16 else 1e-4
    scale = float(np.abs(expected.astype(np.float32)).max())
    np.testing.assert_allclose(
        got.astype(np.float32), expected.astype(np.float32), rtol=tolerance, atol=tolerance * scale
    )


# ---- PopSwiGLUDecodeQ / PopGeGLUDecodeQ --------------------------------------------------------
def quant_weights(rng, D: int, H: int, bits: int, block: int, dtype=np.float32) -> dict:
    out = {}
    for name in ("Wg", "Wu", "Wd"):
        q, s = quantized((rng.standard_normal((D, H)) / 4).astype(np.float32), bits, block, dtype)
        out[name + "q"], out[name + "s"] = q, s
    return out


WEIGHTS = ["Wgq", "Wgs", "Wuq", "Wus", "Wdq", "Wds"]


def norms_for(weights: dict, output_norm: np.ndarray | None) -> dict:
    """The output_norm initializer ``N`` [D]: ``output_norm``, or ones (the activation score's
    order even in mode 2)."""
    if output_norm is None:
        output_norm = np.ones(weights["Wgq"].shape[0], weights["Wgs"].dtype)
    return {"N": output_norm}


def spread_norms(rng, D: int, dtype=np.float32) -> np.ndarray:
    """An output_norm [D] with a wide spread, so that mode 2 changes many selections."""
    return rng.uniform(0.2, 2.0, D).astype(dtype)


def decode_model(
    op: str, weights: dict, bits: int, block: int, approximate: str | None = None, dtype=np.float32, level=None,
    output_norm: np.ndarray | None = None,
):
    """``level``: the node's accuracy_level (None: no attribute, the default 0)."""
    attributes = {"bits": bits, "block_size": block} | ({"approximate": approximate} if approximate else {})
    attributes |= {} if level is None else {"accuracy_level": level}
    node = helper.make_node(op, ["X", "P", "C", *WEIGHTS, "N"], ["Y"], domain=DOMAIN, **attributes)
    inputs = [helper.make_tensor_value_info("X", elem_of(dtype), ["b", "s", "h"]),
              helper.make_tensor_value_info("P", TensorProto.INT64, ["b", "rc"]),
              helper.make_tensor_value_info("C", TensorProto.INT64, [4])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("Y", elem_of(dtype), ["b", "s", "h"])]
    initializers = weights | norms_for(weights, output_norm)
    return model(node, inputs, outputs, initializers, POP_FUNCTIONS + POP_QUANT_FUNCTIONS)


DECODE_OPS = {
    "swiglu": ("PopSwiGLUDecodeQ", None),
    "geglu-tanh": ("PopGeGLUDecodeQ", "tanh"),
    "geglu-erf": ("PopGeGLUDecodeQ", "none"),
    "geglu-default": ("PopGeGLUDecodeQ", None),  # no attribute: the function's default, tanh
}
# (R, C, K): a sparse split, and one whose batch union is every channel.
SPLITS = {"sparse": (13, 37, 19), "union-dense": (60, 30, 21)}
LAYOUTS = [(4, 32), (4, 64), (8, 32), (8, 64), (4, 16), (8, 16)]
# Every op and layout with both splits, except blocks of 16 and GeGLU's default (the sparse split).
DECODE_CASES = [
    pytest.param(*DECODE_OPS[name], bits, block, split, id=f"{name}-int{bits}-{block}-{split}")
    for name in DECODE_OPS
    for bits, block in LAYOUTS
    for split in SPLITS
    if split == "sparse" or (block != 16 and name != "geglu-default")
]


# accuracy_level: none (the default, float X), 4 (gate and up dots on int8 X), and 2 (below 4: float X).
LEVELS = pytest.mark.parametrize("level", [None, 4], ids=["level0", "level4"])


@PATHS
@LEVELS
@pytest.mark.parametrize("rows", [1, 3, 70], ids=["b1", "b3", "b70"])
@pytest.mark.parametrize("op,approximate,bits,block,split", DECODE_CASES)
def test_fused_decode_q_equals_function_body(library, path, op, approximate, bits, block, split, rows, level, avx2):
    path(avx2)
    rng = np.random.default_rng(rows * 7 + bits + block)
    H, D = 128, 101  # D odd: the channel union's slices end ragged across the 4 streams
    weights = quant_weights(rng, D, H, bits, block)
    m = decode_model(op, weights, bits, block, approximate, level=level)
    batch, seq = (rows, 1) if rows != 3 else (1, 3)  # b3: three tokens of one sequence
    retain, candidate, keep = SPLITS[split]
    x = rng.standard_normal((batch, seq, H)).astype(np.float32)
    x[0, 0, block : 2 * block] = 0  # an all-zero block (int8 X: scale 0, taken as 1)
    feed = {
        "X": x,
        "P": np.stack([rng.permutation(D)[: retain + candidate] for _ in range(batch)]).astype(np.int64),
        "C": np.array([retain, candidate, keep, 0], np.int64),
    }
    (expected,), (got,) = both(m, library, feed)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@LEVELS
@pytest.mark.parametrize("rows", [1, 3, 70], ids=["b1", "b3", "b70"])
@pytest.mark.parametrize("op,approximate", [DECODE_OPS["swiglu"], DECODE_OPS["geglu-tanh"]], ids=["swiglu", "geglu"])
def test_fused_decode_q_output_aware_equals_function_body(library, op, approximate, rows, level):
    """config mode 2: the candidates ranked by |activation| * output_norm (int4; the selection
    does not depend on the row layout)."""
    bits = 4
    rng = np.random.default_rng(rows * 3 + bits)
    H, D = 128, 101
    weights = quant_weights(rng, D, H, bits, 32)
    m = decode_model(op, weights, bits, 32, approximate, level=level, output_norm=spread_norms(rng, D))
    batch, seq = (rows, 1) if rows != 3 else (1, 3)
    feed = {
        "X": rng.standard_normal((batch, seq, H)).astype(np.float32),
        "P": np.stack([rng.permutation(D)[:50] for _ in range(batch)]).astype(np.int64),
        "C": np.array([13, 37, 19, 2], np.int64),
    }
    (expected,), (got,) = both(m, library, feed)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    (activation,) = session(m, library).run(None, feed | {"C": np.array([13, 37, 19, 0], np.int64)})
    assert np.abs(activation - got).max() > 1e-3  # mode 2 kept other channels


@PATHS
@pytest.mark.parametrize("level", [4, 2, 7], ids=["level4", "level2", "level7"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("rows", [1, 3], ids=["b1", "b3"])
def test_fused_decode_q_int8_x_ragged_chunks(library, path, bits, rows, level, avx2):
    """H = 80 in blocks of 16: two whole chunks of 32 and a block of 16 (the AVX2 int8 dot's
    tail); levels 1..3 run as 0, levels above 4 as 4 (the body's test is level >= 4)."""
    path(avx2)
    rng = np.random.default_rng(17 + bits + rows)
    H, D = 80, 64
    m = decode_model("PopSwiGLUDecodeQ", quant_weights(rng, D, H, bits, 16), bits, 16, level=level)
    x = rng.standard_normal((rows, 1, H)).astype(np.float32)
    x[-1, 0, 64:] = 0  # the tail block all zero
    x[0, 0, :16] *= 1e-3  # a block of small values: fine int8 steps
    feed = {"X": x, "P": np.stack([rng.permutation(D)[:40] for _ in range(rows)]).astype(np.int64),
            "C": np.array([12, 28, 14, 0], np.int64)}  # fmt: skip
    (expected,), (got,) = both(m, library, feed)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@PATHS
@LEVELS
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("rows", [1, 3], ids=["b1", "b3"])
def test_fused_decode_q_fp16(library, path, bits, rows, level, avx2):
    path(avx2)
    # level 4: the body rounds its int8 X back to float16 (CastLike) while the kernel's integer dots
    # take s_x q_x exactly, a float16 rounding apart: a near-tie at the top-K can flip (level 4's
    # data with level 0's seed, b3-int8: a relative gap of 1.5e-4 at the K-th candidate), so its
    # own seed.
    rng = np.random.default_rng(5 + rows + (40 if level == 4 else 0))
    H, D = 64, 96
    weights = quant_weights(rng, D, H, bits, 32, np.float16)
    m = decode_model("PopSwiGLUDecodeQ", weights, bits, 32, dtype=np.float16, level=level)
    feed = {
        "X": rng.standard_normal((rows, 1, H)).astype(np.float16),
        "P": np.stack([rng.permutation(D)[:56] for _ in range(rows)]).astype(np.int64),
        "C": np.array([16, 40, 20, 0], np.int64),
    }
    (expected,), (got,) = both(m, library, feed)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=2e-2, atol=2e-2)


# ---- PopSwiGLUQ / PopGeGLUQ: the whole FFN -----------------------------------------------------
def ffn_model(
    op: str, weights: dict, static_score: np.ndarray, bits: int, block: int, level=None,
    output_norm: np.ndarray | None = None,
) -> onnx.ModelProto:
    attributes = {"bits": bits, "block_size": block} | ({} if level is None else {"accuracy_level": level})
    node = helper.make_node(op, ["X", "M", "P", "C", *WEIGHTS, "S", "N"], ["Y", "P_out"], domain=DOMAIN, **attributes)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", "s", "h"]),
              helper.make_tensor_value_info("M", TensorProto.FLOAT, ["b", "s"]),
              helper.make_tensor_value_info("P", TensorProto.INT64, ["b", "rc"]),
              helper.make_tensor_value_info("C", TensorProto.INT64, [4])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "s", "h"]),
               helper.make_tensor_value_info("P_out", TensorProto.INT64, ["b", "k"])]  # fmt: skip
    initializers = weights | {"S": static_score} | norms_for(weights, output_norm)
    return model(node, inputs, outputs, initializers, POP_FUNCTIONS + POP_QUANT_FUNCTIONS)


def optimized_op_types(m: onnx.ModelProto, library, tmp_path) -> list[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library.path))
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


@PATHS
@LEVELS
@pytest.mark.parametrize(
    "bits,block,mode",
    [pytest.param(bits, block, mode, id=f"int{bits}-{block}-{name}")
     for bits, block in [(4, 32), (8, 64), (4, 16), (8, 16)]
     for mode, name in [(0, "scored"), (1, "static"), (2, "output")]
     if mode != 2 or block != 16],  # the output-aware score: two layouts
)  # fmt: skip
@pytest.mark.parametrize("op", ["PopSwiGLUQ", "PopGeGLUQ"])
def test_whole_ffn_q_equals_function_body_at_prefill_and_decode(
    library, path, tmp_path, op, bits, block, mode, level, avx2
):
    """level 4: the decode step's gate and up dots on int8 X; the prefill stays float."""
    path(avx2)
    rng = np.random.default_rng(11 + bits)
    B, T, H, D = 3, 7, 64, 97
    weights = quant_weights(rng, D, H, bits, block)
    m = ffn_model(op, weights, rng.random(D).astype(np.float32), bits, block, level, spread_norms(rng, D))
    mask = np.ones((B, T), np.float32)
    mask[1, :3] = 0  # left padding
    config = np.array([16, 40, 20, mode], np.int64)
    prefill = {"X": rng.standard_normal((B, T, H)).astype(np.float32), "M": mask, "P": np.zeros((B, 0), np.int64),
               "C": config}  # fmt: skip
    (expected_y, expected_p), (got_y, got_p) = both(m, library, prefill)
    np.testing.assert_allclose(got_y, expected_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got_p, expected_p)
    decode = {"X": rng.standard_normal((B, 1, H)).astype(np.float32), "M": np.ones((B, 1), np.float32),
              "P": expected_p, "C": config}  # fmt: skip
    (expected_y, _), (got_y, got_p) = both(m, library, decode)
    np.testing.assert_allclose(got_y, expected_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got_p, decode["P"])
    # With the library the node stays one kernel: no If (the function body's branch) is left.
    if avx2 and mode == 0:
        assert optimized_op_types(m, library, tmp_path) == [op]


def test_whole_ffn_q_kernel_can_be_left_out(library, tmp_path, monkeypatch):
    monkeypatch.setenv("POPC_OPLIB_WHOLE_FFN", "0")
    rng = np.random.default_rng(0)
    m = ffn_model("PopSwiGLUQ", quant_weights(rng, 96, 64, 4, 32), np.ones(96, np.float32), 4, 32)
    assert "If" in optimized_op_types(m, library, tmp_path)


# ---- bad inputs: ORT errors naming the op, never a crash ------------------------------------------
def expect_error(m: onnx.ModelProto, library, feed: dict, message: str) -> None:
    with pytest.raises(Exception, match=message) as caught:
        session(m, library).run(None, feed)
    assert "popc" in str(caught.value) or "Q" in str(caught.value)


GATHER_BAD = {
    "index-high": ({}, "index", r"outside \[0, 20\)"),
    "index-negative": ({}, "negative", r"outside \[0, 20\)"),
    "scales-shape": ({"ws": "wide"}, None, r"Ws must be \[N, H / block_size\] = \[20, 2\]"),
    "scales-rows": ({"ws": "rows"}, None, r"Ws must be"),
    "h-not-block": ({"h": 48}, None, r"H = 48 is not a multiple of block_size 32"),
    "bits": ({"bits": 3}, None, r"bits must be 4 or 8, not 3"),
    "block-size": ({"block": 24}, None, r"block_size must be a power of two >= 16, not 24"),
    "wq-width": ({"wq": "narrow"}, None, r"Wq must be \[N, H \* bits / 8\]|not a multiple|Ws must be"),
    "wq-rank": ({"wq": "flat"}, None, r"Wq must be 2-D"),
}


@pytest.mark.parametrize("case", GATHER_BAD)
@pytest.mark.parametrize("op", ["GatherMatMulTQ", "GatherMatMulQ"])
def test_gather_q_rejects_bad_inputs(library, op, case):
    change, bad_index, message = GATHER_BAD[case]
    rng = np.random.default_rng(0)
    N, H, K, bits, block = 20, change.get("h", 64), 5, 4, 32
    wq = rng.integers(0, 256, (N, H * bits // 8), dtype=np.uint8)
    ws = rng.random((N, max(1, H // block))).astype(np.float32)
    if change.get("ws") == "wide":
        ws = rng.random((N, H // block + 1)).astype(np.float32)
    if change.get("ws") == "rows":
        ws = rng.random((N + 1, H // block)).astype(np.float32)
    if change.get("wq") == "narrow":
        wq = wq[:, :-2].copy()
    if change.get("wq") == "flat":
        wq = wq.reshape(-1)
    m = gather_model(op, wq, ws, change.get("bits", bits), change.get("block", block))
    idx = rng.integers(0, N, (2, 1, K), dtype=np.int64)
    if bad_index:
        idx[1, 0, 3] = N if bad_index == "index" else -1
    a = rng.standard_normal((2, 1, H if op == "GatherMatMulTQ" else K)).astype(np.float32)
    expect_error(m, library, {"A": a, "I": idx}, f"{op}: .*({message})")


DECODE_BAD = {
    "partition-high": "outside",
    "partition-negative": "outside",
    "partition-duplicate": "twice",
    "scales-shape": r"Wgs must be \[N, H / block_size\]",
    "up-shape": "must have one shape",
    "bits": "bits must be 4 or 8",
    "h-not-block": "not a multiple of block_size",
}


@pytest.mark.parametrize("case", DECODE_BAD)
@pytest.mark.parametrize("op", ["PopSwiGLUDecodeQ", "PopGeGLUDecodeQ", "PopSwiGLUQ"])
def test_decode_q_rejects_bad_inputs(library, op, case):
    rng = np.random.default_rng(1)
    D, H, bits = 96, 64, 4
    weights = quant_weights(rng, D, H, bits, 32)
    if case == "scales-shape":
        weights["Wgs"] = np.ones((D, 3), np.float32)
    if case == "up-shape":
        weights["Wuq"] = weights["Wuq"][:-1].copy()
    if case == "h-not-block":  # rows of 48 elements in blocks of 32
        weights = {k: (v[:, :24].copy() if k.endswith("q") else v[:, :1].copy()) for k, v in weights.items()}
        H = 48
    bits_attr = 5 if case == "bits" else bits
    partition = np.stack([rng.permutation(D)[:24] for _ in range(2)]).astype(np.int64)
    if case.startswith("partition"):
        partition[1, 5] = {"partition-high": D, "partition-negative": -3, "partition-duplicate": partition[1, 2]}[case]
    feed = {"X": np.ones((2, 1, H), np.float32), "P": partition, "C": np.array([8, 16, 8, 0], np.int64)}
    if op == "PopSwiGLUQ":
        m = ffn_model(op, weights, np.ones(D, np.float32), bits_attr, 32)
        feed["M"] = np.ones((2, 1), np.float32)
    else:
        m = decode_model(op, weights, bits_attr, 32)
    expect_error(m, library, feed, f"{op}: .*{DECODE_BAD[case]}")


@pytest.mark.parametrize("case", ["config", "scales-shape", "static-score", "output-norm", "bits"])
def test_whole_ffn_q_prefill_rejects_bad_inputs(library, case):
    rng = np.random.default_rng(2)
    D, H = 96, 64
    weights = quant_weights(rng, D, H, 8, 32)
    static = np.ones(D + (case == "static-score"), np.float32)
    if case == "scales-shape":
        weights["Wds"] = np.ones((D, 1), np.float32)
    norm = np.ones(D - 1, np.float32) if case == "output-norm" else None
    m = ffn_model("PopGeGLUQ", weights, static, 3 if case == "bits" else 8, 32, output_norm=norm)
    config = np.array([80 if case == "config" else 8, 40, 8, 2 if case == "output-norm" else 0], np.int64)
    feed = {"X": np.ones((1, 4, H), np.float32), "M": np.ones((1, 4), np.float32), "P": np.zeros((1, 0), np.int64),
            "C": config}  # fmt: skip
    message = {"config": "config asks for 120 channels", "scales-shape": "must have one shape",
               "static-score": r"static_score must be \[D\]", "output-norm": r"output_norm must be \[D\] = \[96\]",
               "bits": "bits must be 4 or 8"}[case]  # fmt: skip
    expect_error(m, library, feed, f"PopGeGLUQ: .*{message}")
