"""Micro-benchmark: popc op library kernels vs the ops' ONNX function bodies in ONNX Runtime (CPU).

    python examples/bench_oplib.py [--batch 1] [--hidden 576] [--rows 1536] [--keep 768] [--threads 2]

Defaults are SmolLM2-135M's decode shapes (one token, H = 576, N = 1536, K = N / 2).
Prints the median over repeats of each op, with and without the library.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from popc import oplib


def median_us(session, feed, repeats: int) -> float:
    for _ in range(20):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--rows", type=int, default=1536)
    parser.add_argument("--keep", type=int, default=768)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ORT default)")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--fp16", action="store_true")
    args = parser.parse_args()
    info = oplib.find_library() or oplib.build()
    dtype = np.float16 if args.fp16 else np.float32
    rng = np.random.default_rng(0)
    B, H, N, K = args.batch, args.hidden, args.rows, args.keep
    print(f"onnxruntime {ort.__version__}, B={B} S=1 H={H} N={N} K={K} {np.dtype(dtype).name}, threads={args.threads or 'default'}")
    for op in ("GatherMatMulT", "GatherMatMul"):
        weight = rng.standard_normal((N, H)).astype(dtype)
        a = rng.standard_normal((B, 1, H if op == "GatherMatMulT" else K)).astype(dtype)
        idx = np.stack([rng.permutation(N)[:K] for _ in range(B)]).reshape(B, 1, K).astype(np.int64)
        model = oplib.make_op_model(op, weight).SerializeToString()
        row = []
        for use_library in (False, True):
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            if use_library:
                options.register_custom_ops_library(str(info.path))
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            row.append(median_us(session, {"A": a, "I": idx}, args.repeats))
        print(f"{op:14s} function body {row[0]:8.1f} us   kernel {row[1]:8.1f} us   speed-up x{row[0] / row[1]:.1f}")


if __name__ == "__main__":
    main()
