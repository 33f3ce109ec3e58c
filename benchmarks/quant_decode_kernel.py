"""Microbenchmark: the fused POP decode step on block-quantized rows (PopSwiGLUDecodeQ) against
the float one (PopSwiGLUDecode), SmolLM2-135M shapes, through ONNX Runtime with the op library.

One graph per variant holds `--layers` independent decode nodes (their own weights, the same X
and partition), so the weights of a step do not fit in the cache, as in a real model. The float
variant runs on the dequantized int4 weights, so both read exactly the same rows; the bytes a
step reads are counted from the rows each layer's call touches (the union over its batch of the
partitions for the gate, of the kept channels for up and down), quantized bytes including the
scales. Effective GB/s = those bytes / median step time.

    .venv/bin/python benchmarks/quant_decode_kernel.py [--batches 1,4] [--threads 2] [--accuracy-level 0,4]

accuracy_level 4 takes the gate and up dots with X rounded to int8 per block (integer dot
products); 0 keeps X in float. The row counts come from the float gate (level 4's top-K may keep
a few other channels, as many of them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from popc import oplib
from popc.quantize import QuantScheme, dequantize_rows, quantize_rows
from popc.templates.ops import DOMAIN, VERSION
from popc.templates.pop_ffn import POP_FUNCTIONS
from popc.templates.pop_ffn_quant import POP_QUANT_FUNCTIONS


def functions() -> list[onnx.FunctionProto]:
    protos = []
    for function in POP_FUNCTIONS + POP_QUANT_FUNCTIONS:
        proto = function.to_function_proto()
        for domain in (DOMAIN, "com.microsoft"):
            if not any(o.domain == domain for o in proto.opset_import):
                proto.opset_import.append(helper.make_opsetid(domain, VERSION))
        protos.append(proto)
    return protos


def build(layers: list[dict], quant: QuantScheme | None, level: int = 0) -> onnx.ModelProto:
    nodes, inits, outputs = [], [], []
    for i, w in enumerate(layers):
        if quant is None:
            names = [f"Wg{i}", f"Wu{i}", f"Wd{i}"]
            for name, key in zip(names, ("g", "u", "d")):
                inits.append(numpy_helper.from_array(w[key + "f"], name))
            nodes.append(helper.make_node("PopSwiGLUDecode", ["X", "P", "C", *names], [f"Y{i}"], domain=DOMAIN))
        else:
            names = []
            for key in ("g", "u", "d"):
                q, s = w[key + "q"]
                names += [f"W{key}q{i}", f"W{key}s{i}"]
                inits += [numpy_helper.from_array(q, names[-2]), numpy_helper.from_array(s, names[-1])]
            nodes.append(
                helper.make_node(
                    "PopSwiGLUDecodeQ", ["X", "P", "C", *names], [f"Y{i}"], domain=DOMAIN,
                    bits=quant.bits, block_size=quant.block_size, accuracy_level=level,
                )
            )  # fmt: skip
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "decode",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", 1, "h"]),
         helper.make_tensor_value_info("P", TensorProto.INT64, ["b", "rc"]),
         helper.make_tensor_value_info("C", TensorProto.INT64, [4])],
        outputs, initializer=inits,
    )  # fmt: skip
    opsets = [
        helper.make_opsetid("", 20),
        helper.make_opsetid(DOMAIN, VERSION),
        helper.make_opsetid("com.microsoft", 1),
    ]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions())
    model.ir_version = 10
    return model


def rows_read(layers: list[dict], x: np.ndarray, partition: np.ndarray, R: int, K: int) -> int:
    """Weight rows one step reads over all layers: gate union + 2 x kept union, per layer."""
    total = 0
    for w in layers:
        gate = set(partition.ravel().tolist())
        kept: set[int] = set()
        for b in range(x.shape[0]):
            ids = partition[b]
            g = w["gf"][ids].astype(np.float64) @ x[b, 0].astype(np.float64)
            a = np.abs(g / (1 + np.exp(-g)))
            order = R + np.argsort(-a[R:], kind="stable")[:K]
            kept |= set(ids[:R].tolist()) | set(ids[order].tolist())
        total += len(gate) + 2 * len(kept)
    return total


def time_steps(session, feed: dict, seconds: float) -> float:
    session.run(None, feed)  # warm-up
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576, help="H (SmolLM2-135M: 576)")
    parser.add_argument("--ffn", type=int, default=1536, help="D (SmolLM2-135M: 1536)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--config", default="384,768,384", help="R,C,K of pop_config (POP 50%% of SmolLM2)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--bits", default="4,8", help="quantized variants to time (4, 8)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument(
        "--accuracy-level",
        default="0,4",
        help="accuracy_level values of the quantized variants (0: float X, 4: int8 X)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.5, help="timing per variant and batch")
    args = parser.parse_args()

    import onnxruntime as ort

    library = oplib.find_library() or oplib.build()
    H, D = args.hidden, args.ffn
    R, C, K = (int(v) for v in args.config.split(","))
    rng = np.random.default_rng(0)
    schemes = {bits: QuantScheme(bits, args.block_size) for bits in (int(b) for b in args.bits.split(","))}
    first = QuantScheme(4, args.block_size)  # the float variant runs on the dequantized int4 weights
    layers = []
    for _ in range(args.layers):
        w: dict = {}
        for key in ("g", "u", "d"):
            m = (rng.standard_normal((D, H)) * 0.05).astype(np.float32)
            w[key + "f"] = dequantize_rows(*quantize_rows(m, first), first, H)
        layers.append(w)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.register_custom_ops_library(str(library.path))
    variants: dict[str, tuple] = {"float32": (build(layers, None), H * 4)}
    for bits, scheme in schemes.items():
        for w in layers:
            for key in ("g", "u", "d"):
                w[key + "q"] = quantize_rows(w[key + "f"], scheme)
        row_bytes = H * bits // 8 + (H // scheme.block_size) * 4
        for level in (int(v) for v in args.accuracy_level.split(",")):
            variants[f"int{bits} (block {scheme.block_size}) level {level}"] = (build(layers, scheme, level), row_bytes)

    table = Table(title=f"PopSwiGLUDecode(Q), H={H}, D={D}, {args.layers} layers, (R, C, K)=({R}, {C}, {K}), "
                        f"{args.threads} threads")  # fmt: skip
    for column in ("variant", "batch", "ms / step", "MB read / step", "effective GB/s", "vs float32"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    sessions = {name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for name, (m, _) in variants.items()}  # fmt: skip
    for batch in (int(b) for b in args.batches.split(",")):
        x = rng.standard_normal((batch, 1, H)).astype(np.float32)
        partition = np.stack([rng.permutation(D)[: R + C] for _ in range(batch)]).astype(np.int64)
        feed = {"X": x, "P": partition, "C": np.array([R, C, K, 0], np.int64)}
        rows = rows_read(layers, x, partition, R, K)
        base = None
        for name, (_, row_bytes) in variants.items():
            seconds = time_steps(sessions[name], feed, args.seconds)
            base = base or seconds
            megabytes = rows * row_bytes / 1e6
            table.add_row(name, str(batch), f"{seconds * 1e3:.2f}", f"{megabytes:.1f}",
                          f"{megabytes / 1e3 / seconds:.1f}", f"{base / seconds:.2f}x")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
