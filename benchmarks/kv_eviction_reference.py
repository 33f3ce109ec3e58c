"""KV-eviction reference on a real model: passkey accuracy and continuation perplexity.

One prefill per prompt serves every method and budget (the scores come from that
prefill; only the compaction and the decode differ). Writes the JSON after every prompt
(a partial run keeps what it measured) and a Markdown table from it.

    nice -n 10 python benchmarks/kv_eviction_reference.py --model smollm2-135m \
        --out benchmarks/results/kv-eviction-reference-smollm2
    python benchmarks/kv_eviction_reference.py --report benchmarks/results/kv-eviction-reference-smollm2
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from popc import longcontext, longcontext_report
from popc.reference.kv_eviction import EvictionReference
from popc.reference.kv_selection import DEFAULT_SINKS, DEFAULT_WINDOW, LAPROX_SCORES

BUDGETS = longcontext_report.DEFAULT_BUDGETS
# (label, method, options): every LaProx variant pooled as SnapKV pools, and the default
# variant unpooled, to show what the pooling is worth.
VARIANTS = [
    ("streaming", "streaming", {}),
    ("snapkv", "snapkv", {}),
    ("random", "random", {}),
    *[(f"laprox:{score}", "laprox", {"score": score}) for score in LAPROX_SCORES],
    ("laprox:mean-out:nopool", "laprox", {"score": "mean-out", "pool": 1}),
]
# The second pass: how much of each layer's share is fixed before the model-wide top-k.
FLOOR_VARIANTS = [
    ("streaming", "streaming", {}),
    ("snapkv", "snapkv", {}),
    ("random", "random", {}),
    ("laprox:sum-total", "laprox", {"score": "sum-total"}),
    ("laprox:sum-total:floor0.5", "laprox", {"score": "sum-total", "floor": 0.5}),
    ("laprox:sum-total:floor1", "laprox", {"score": "sum-total", "floor": 1.0}),
    ("laprox:mean-out:floor0.5", "laprox", {"score": "mean-out", "floor": 0.5}),
    ("laprox:mean-out:floor1", "laprox", {"score": "mean-out", "floor": 1.0}),
]


def machine() -> str:
    from popc.bench.machine import cpu_name

    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.system()}"


def run_prompt(reference, ids, window, decode, variants):
    """Prefill once, then for full and every variant x budget: ``decode(state, logits)``."""
    prefill = reference.prefill(torch.tensor([ids]), window=window)
    rows = []
    configs = [("full", "full", {}, 1.0)] + [(label, m, o, b) for label, m, o in variants for b in BUDGETS]
    for label, method, options, budget in configs:
        state = reference.evict(prefill, method, budget, sinks=DEFAULT_SINKS, **options)
        value = decode(state, prefill.last_logits)
        rows.append({
            "method": label, "budget": budget, "value": value, "evict_s": state.seconds,
            "kept": sum(state.kept), "full": prefill.length * len(reference.evictable),
        })
    return prefill.seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, help="results path without extension")
    parser.add_argument("--lengths", type=int, nargs="*", default=list(longcontext.PASSKEY_LENGTHS))
    parser.add_argument("--depths", type=float, nargs="+", default=list(longcontext.PASSKEY_DEPTHS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ppl-prefixes", type=int, nargs="*", default=[2048, 4096])
    parser.add_argument("--ppl-count", type=int, default=1)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--floors", action="store_true", help="the floor variants instead of the score variants")
    parser.add_argument("--report", type=Path, help="only rewrite the .md from an existing .json")
    args = parser.parse_args()
    if args.report:
        write_report(args.report)
        return
    torch.set_num_threads(args.threads)
    from popc.loading import load_model

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    reference = EvictionReference(model)
    variants = FLOOR_VARIANTS if args.floors else VARIANTS
    text = longcontext.held_text()
    result = {
        "model": args.model, "machine": machine(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "window": args.window, "sinks": DEFAULT_SINKS, "evictable_layers": len(reference.evictable),
        "layers": len(reference.layers), "passkey": [], "ppl": [],
    }

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        write_report(args.out)

    for item in longcontext.passkey_items(tokenizer, text, args.lengths, args.depths, args.seeds):
        start = time.perf_counter()

        def decode(state, logits, item=item):
            generated = tokenizer.decode(reference.greedy(state, logits, 6))
            return {"correct": longcontext.passkey_correct(generated, item.key), "text": generated}

        prefill_s, rows = run_prompt(reference, item.ids, args.window, decode, variants)
        result["passkey"].append({
            "length": len(item.ids), "depth": item.depth, "seed": item.seed, "key": item.key,
            "prefill_s": prefill_s, "rows": rows,
        })
        save()
        print(f"passkey {len(item.ids)} {item.depth}: {time.perf_counter() - start:.0f}s", flush=True)
    for prefix in args.ppl_prefixes:
        for item in longcontext.continuation_items(tokenizer, text, prefix, args.continuation, args.ppl_count):
            start = time.perf_counter()

            def decode(state, logits, item=item):
                return reference.continuation_nll(state, logits, torch.tensor([item.continuation]))

            prefill_s, rows = run_prompt(reference, item.prefix, args.window, decode, variants)
            result["ppl"].append({"prefix": prefix, "offset": item.offset, "prefill_s": prefill_s, "rows": rows})
            save()
            print(f"ppl {prefix}: {time.perf_counter() - start:.0f}s", flush=True)


def write_report(out: Path) -> None:
    result = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".md").write_text(
        longcontext_report.markdown(result, "KV-eviction reference", "PyTorch reference (`popc/reference/kv_eviction.py`)")
    )


if __name__ == "__main__":
    main()
