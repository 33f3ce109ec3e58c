"""llama.cpp as popc bench's quantized peer: build its tools, make a Q4_0 GGUF, run llama-bench.

    python benchmarks/llama_cpp.py build              # once: llama-bench, llama-quantize, llama-perplexity
    python benchmarks/llama_cpp.py bench smollm2-135m # llama-bench -t 2 -p 512 -n 64 on its Q4_0 GGUF

``build`` downloads the ``llama-cpp-python`` sdist with pip (never installed), compiles the
llama.cpp it vendors (CPU only, ``-DGGML_NATIVE=ON``, 2 jobs, ``nice -n 19``) into popc's
cache (``popc.bench.llama_cpp``). After that, ``popc bench DIR --quant int4`` includes a
``llama.cpp-q4_0`` row (same thread count as every variant). ``bench`` prints llama-bench's
figures for one model (its GGUF made once and cached: a built-in's GGUF requantized to Q4_0,
or an HF directory converted with the vendored convert_hf_to_gguf.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from popc.bench import llama_cpp  # noqa: E402
from popc.progress import Progress  # noqa: E402


class Print(Progress):
    def stage(self, message: str) -> None:
        print(message, flush=True)

    def start(self, total: int | None) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="compile llama.cpp's tools into popc's cache")
    build.add_argument("--jobs", type=int, default=2)
    build.add_argument("--nice", type=int, default=19)
    bench = commands.add_parser("bench", help="llama-bench on a model's Q4_0 GGUF")
    bench.add_argument("model", help="a popc model spec: built-in name, .gguf file or HF directory")
    bench.add_argument("-t", "--threads", type=int, default=2)
    bench.add_argument("-p", "--prompt", default="512", help="comma list of prompt lengths")
    bench.add_argument("-n", "--gen", type=int, default=llama_cpp.GEN_TOKENS)
    bench.add_argument("-r", "--repeats", type=int, default=3)
    bench.add_argument("-d", "--depth", type=int, default=0, help="context before the generation test (if supported)")
    bench.add_argument("--json", type=Path, help="also write the parsed rows here")
    args = parser.parse_args(argv)
    progress = Print()
    if args.command == "build":
        print(json.dumps(llama_cpp.build(jobs=args.jobs, nice=args.nice, progress=progress), indent=1))
        return 0
    peer = llama_cpp.LlamaCppPeer.prepare(args.model, progress)
    prompts = [int(n) for n in args.prompt.split(",") if n.strip()]
    ttft, decode = peer.measure(args.threads, prompts, args.gen, args.repeats, depth=args.depth or None)
    print(f"llama-bench {peer.bench}, model {peer.gguf}, {args.threads} threads")
    for row in ttft:
        print(f"prompt {row.prompt:>5} tokens: {row.ms.median:8.1f} ms ({row.ms.low:.1f}-{row.ms.high:.1f})")
    for row in decode:
        t = row.ms_per_step
        print(f"decode {args.gen} tokens, batch 1: {t.median:.2f} ms/token ({t.low:.2f}-{t.high:.2f}), {1000 / t.median:.1f} tok/s")
    if args.json:
        rows = [{"kind": "ttft", "prompt": r.prompt, "ms": r.ms.median} for r in ttft]
        rows += [{"kind": "decode", "batch": 1, "ms_per_token": r.ms_per_step.median} for r in decode]
        args.json.write_text(json.dumps({"gguf": str(peer.gguf), "threads": args.threads, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
