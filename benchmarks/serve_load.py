#!/usr/bin/env python
"""Load benchmark for ``popc serve``: concurrent streaming clients against dense and POP
exports, one process or Ray Serve replicas, the same total threads in every variant.

    python benchmarks/serve_load.py --dense DENSE_DIR --pop POP_DIR --threads 8 \\
        --ray-replicas 0,1,2 --concurrency 1,4,16 --rounds 3 --out benchmarks/results/serve

Each variant is a ``python -m popc serve DIR`` subprocess (``--ray --replicas R`` with
``--threads T/R`` per replica; replicas ``0`` means the plain one-process server with ``T``
threads), waited on through ``GET /health`` and stopped at the end. Each concurrency level
runs C clients that each send ``--requests`` streamed completions (a fixed-seed mix of
prompt lengths, cut from a repeated passage; fixed ``max_tokens``, greedy, no early stop
expected on random text). Per level: aggregate decode tokens/s, requests/s, TTFT p50/p99,
per-token gap p50/p99 (between streamed chunks), failures; medians over ``--rounds``.
Ratios: tokens/s at 4 clients over 1 client, and POP over dense at each level.

``--url URL`` points at a running server instead (one variant, nothing started).
``--soak SECONDS`` instead mixes valid requests with malformed JSON, too-long prompts, bad
``max_tokens`` and clients that disconnect mid-stream, and reports accepted / refused /
failed counts and whether the server stayed up (same PID, ``/health`` ok).

Writes ``serve_load.json`` and ``serve_load.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

PASSAGE = (
    "The river ran slowly past the old mill, where the wheel had not turned in years. "
    "Children from the village came in summer to throw stones into the pond, counting the rings "
    "as they spread and vanished against the reeds. An old man who lived by the bridge told them "
    "stories of the floods, of the winter the ice cracked the stones, and of the miller's daughter "
    "who left for the city and never wrote back. "
)
console = Console()


# ---- prompts -------------------------------------------------------------------------------
def prompt_of(tokens: int, offset: int, tokens_per_word: float = 1.3) -> str:
    """About ``tokens`` tokens of the passage, starting at word ``offset``."""
    words = PASSAGE.split()
    count = max(1, round(tokens / tokens_per_word))
    return " ".join(words[(offset + i) % len(words)] for i in range(count))


def prompt_mix(lengths: list[int], count: int, seed: int, tokens_per_word: float) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    return [
        (n, prompt_of(n, rng.randrange(1000), tokens_per_word)) for n in (rng.choice(lengths) for _ in range(count))
    ]


def tokens_per_word(url: str, model: str, api_key: str | None) -> float:
    """The served tokenizer's tokens per passage word (from a one-token request's usage)."""
    words = 16  # short enough for a tiny context
    body = dict(model=model, prompt=prompt_of(words, 0, 1.0), max_tokens=1, temperature=0)
    response = httpx.post(f"{url}/v1/completions", json=body, headers=auth(api_key), timeout=120)
    response.raise_for_status()
    return max(0.1, response.json()["usage"]["prompt_tokens"] / words)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


# ---- servers -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def stop(self, timeout: float = 60) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGTERM, not SIGINT: a shell's background jobs ignore SIGINT. popc serve (and its Ray) stop cleanly.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def start_server(
    directory: str,
    replicas: int,
    threads: int,
    max_batch: int,
    max_queue: int,
    timeout: float,
    log_dir: Path,
    name: str,
) -> Server:
    port = free_port()
    per_replica = max(1, threads // replicas) if replicas else threads
    command = [sys.executable, "-m", "popc", "serve", directory, "--port", str(port), "--threads", str(per_replica)]
    command += ["--max-batch", str(max_batch), "--max-queue", str(max_queue)]
    if replicas:
        command += ["--ray", "--replicas", str(replicas)]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    # Own session: signals reach the server alone (Ray's children are its to stop).
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name}: the server exited ({process.returncode}); see {log}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"{name}: no /health within {timeout:.0f} s; see {log}")


def model_id(url: str, api_key: str | None) -> str:
    response = httpx.get(f"{url}/v1/models", headers=auth(api_key), timeout=10)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def auth(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


# ---- one streamed request --------------------------------------------------------------------
@dataclass
class Outcome:
    ok: bool
    status: int | None = None
    error: str | None = None
    prompt_tokens: int = 0
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    seconds: float = 0.0


async def stream_completion(
    client: httpx.AsyncClient, url: str, body: dict, disconnect_after: int | None = None
) -> Outcome:
    started = time.perf_counter()
    last = None
    outcome = Outcome(ok=False)
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                outcome.error = (await response.aread()).decode(errors="replace")[:200]
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    outcome.ok = True
                    break
                event = json.loads(data)
                if event.get("usage"):
                    outcome.prompt_tokens = event["usage"]["prompt_tokens"]
                    outcome.tokens = event["usage"]["completion_tokens"]
                if event.get("error"):
                    outcome.error = str(event["error"])[:200]
                    return outcome
                if any(choice.get("text") for choice in event.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        outcome.ttft = now - started
                    else:
                        outcome.gaps.append(now - last)
                    last = now
                    chunks += 1
                    if disconnect_after is not None and chunks >= disconnect_after:
                        outcome.ok = True  # we hang up on purpose
                        return outcome
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        outcome.error = f"{type(error).__name__}: {error}"[:200]
        outcome.ok = False
    finally:
        outcome.seconds = time.perf_counter() - started
    if outcome.ok and not outcome.tokens:
        outcome.tokens = chunks  # no usage chunk: count text chunks
    return outcome


# ---- a concurrency level ---------------------------------------------------------------------
async def run_level(url: str, model: str, args: argparse.Namespace, clients: int, seed: int) -> dict:
    prompts = prompt_mix(args.prompt_tokens, clients * args.requests, seed, args.tokens_per_word)
    timeout = httpx.Timeout(args.request_timeout)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=auth(args.api_key)) as client:

        async def one_client(index: int) -> list[Outcome]:
            results = []
            for _, prompt in prompts[index::clients]:
                body = dict(
                    model=model,
                    prompt=prompt,
                    max_tokens=args.max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                results.append(await stream_completion(client, url, body))
            return results

        started = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(i) for i in range(clients)))
        wall = time.perf_counter() - started
    outcomes = [o for group in per_client for o in group]
    good = [o for o in outcomes if o.ok]
    ttfts = [o.ttft for o in good if o.ttft is not None]
    gaps = [g for o in good for g in o.gaps]
    tokens = sum(o.tokens for o in good)
    errors = sorted({o.error or f"HTTP {o.status}" for o in outcomes if not o.ok})
    return dict(
        clients=clients,
        requests=len(outcomes),
        failures=len(outcomes) - len(good),
        errors=errors[:5],
        wall_s=wall,
        tokens=tokens,
        tokens_per_s=tokens / wall if wall else 0.0,
        requests_per_s=len(good) / wall if wall else 0.0,
        mean_prompt_tokens=statistics.fmean([o.prompt_tokens for o in good]) if good else None,
        ttft_p50_ms=ms(percentile(ttfts, 50)),
        ttft_p99_ms=ms(percentile(ttfts, 99)),
        token_p50_ms=ms(percentile(gaps, 50)),
        token_p99_ms=ms(percentile(gaps, 99)),
    )


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


MEDIAN_KEYS = ("tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "token_p50_ms", "token_p99_ms")


def median_of(rounds: list[dict]) -> dict:
    merged = dict(
        clients=rounds[0]["clients"],
        rounds=len(rounds),
        requests=sum(r["requests"] for r in rounds),
        failures=sum(r["failures"] for r in rounds),
        errors=sorted({e for r in rounds for e in r["errors"]})[:5],
        mean_prompt_tokens=rounds[0]["mean_prompt_tokens"],
    )
    for key in MEDIAN_KEYS:
        values = [r[key] for r in rounds if r[key] is not None]
        merged[key] = statistics.median(values) if values else None
    return merged


def bench_variant(url: str, args: argparse.Namespace) -> dict:
    model = model_id(url, args.api_key)
    args.tokens_per_word = tokens_per_word(url, model, args.api_key)
    warm = argparse.Namespace(**{**vars(args), "requests": 1})
    asyncio.run(run_level(url, model, warm, 1, seed=12345))  # warm-up: sessions, first allocations
    levels = []
    for clients in args.concurrency:
        rounds = []
        for round_index in range(args.rounds):
            result = asyncio.run(run_level(url, model, args, clients, seed=args.seed + round_index))
            rounds.append(result)
            console.print(
                f"  {clients:>3} clients, round {round_index + 1}: {result['tokens_per_s']:.1f} tok/s, "
                f"{result['failures']} failed"
            )
        levels.append(dict(median_of(rounds), per_round=rounds))
    return dict(model=model, levels=levels)


# ---- soak ----------------------------------------------------------------------------------------
async def soak(url: str, server: Server, args: argparse.Namespace) -> dict:
    model = model_id(url, args.api_key)
    per_word = tokens_per_word(url, model, args.api_key)
    rng = random.Random(args.seed)
    counts = {"accepted": 0, "refused": 0, "failed": 0, "disconnected": 0}
    by_kind: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    kinds = ["stream", "stream", "plain", "malformed", "too_long", "bad_max_tokens", "disconnect"]
    deadline = time.monotonic() + args.soak
    timeout = httpx.Timeout(args.request_timeout)
    workers = max(args.concurrency)

    def tally(kind: str, result: str, detail: str | None = None) -> None:
        counts[result] += 1
        by_kind.setdefault(kind, {}).setdefault(result, 0)
        by_kind[kind][result] += 1
        if result == "failed" and detail and len(failures) < 10:
            failures.append(f"{kind}: {detail}")

    async with httpx.AsyncClient(timeout=timeout, headers=auth(args.api_key)) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                kind = rng.choice(kinds)
                prompt = prompt_of(rng.choice(args.prompt_tokens), rng.randrange(1000), per_word)
                body = dict(model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0)
                try:
                    if kind in ("stream", "disconnect"):
                        stream_body = dict(body, stream=True)
                        outcome = await stream_completion(client, url, stream_body, 2 if kind == "disconnect" else None)
                        if outcome.ok:
                            tally(kind, "disconnected" if kind == "disconnect" else "accepted")
                        elif outcome.status in (400, 422, 429):
                            tally(kind, "refused")
                        else:
                            tally(kind, "failed", outcome.error or f"HTTP {outcome.status}")
                        continue
                    if kind == "plain":
                        response = await client.post(f"{url}/v1/completions", json=body)
                    elif kind == "malformed":
                        response = await client.post(
                            f"{url}/v1/completions",
                            content=b'{"prompt": "x", "max_tok',
                            headers={"content-type": "application/json"},
                        )
                    elif kind == "too_long":
                        response = await client.post(f"{url}/v1/completions", json=dict(body, prompt=PASSAGE * 400))
                    else:
                        response = await client.post(
                            f"{url}/v1/completions", json=dict(body, max_tokens=rng.choice([-1, 0, 10**9, "many"]))
                        )
                    expected_ok = kind == "plain"
                    if response.status_code == 200 and expected_ok:
                        tally(kind, "accepted")
                    elif response.status_code in (400, 413, 422, 429):
                        tally(kind, "refused")
                    else:
                        tally(kind, "failed", f"HTTP {response.status_code} {response.text[:120]}")
                except httpx.HTTPError as error:
                    tally(kind, "failed", f"{type(error).__name__}: {error}")

        await asyncio.gather(*(worker() for _ in range(workers)))
    await asyncio.sleep(1.0)  # let the server drop the hung-up streams
    try:
        health = httpx.get(f"{url}/health", timeout=10)
        healthy = health.status_code == 200
    except httpx.HTTPError:
        healthy = False
    return dict(
        seconds=args.soak,
        workers=workers,
        counts=counts,
        by_kind=by_kind,
        failures=failures,
        pid=server.pid,
        same_pid=server.alive(),
        health_ok=healthy,
        stayed_up=server.alive() and healthy,
    )


# ---- reporting -------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = [
    ("clients", "clients", 0),
    ("tok/s", "tokens_per_s", 1),
    ("req/s", "requests_per_s", 2),
    ("TTFT p50 ms", "ttft_p50_ms", 1),
    ("TTFT p99 ms", "ttft_p99_ms", 1),
    ("tok p50 ms", "token_p50_ms", 2),
    ("tok p99 ms", "token_p99_ms", 2),
    ("failed", "failures", 0),
]


def ratios(variants: list[dict]) -> dict:
    out: dict = {"scaling_4_over_1": {}, "pop_over_dense": {}}
    for variant in variants:
        levels = {level["clients"]: level for level in variant["levels"]}
        if 1 in levels and 4 in levels and levels[1]["tokens_per_s"]:
            out["scaling_4_over_1"][variant["name"]] = levels[4]["tokens_per_s"] / levels[1]["tokens_per_s"]
    by_name = {v["name"]: v for v in variants}
    for variant in variants:
        if not variant["name"].startswith("pop"):
            continue
        dense = by_name.get("dense" + variant["name"][3:])
        if dense is None:
            continue
        dense_levels = {level["clients"]: level for level in dense["levels"]}
        out["pop_over_dense"][variant["name"][4:] or "plain"] = {
            level["clients"]: level["tokens_per_s"] / dense_levels[level["clients"]]["tokens_per_s"]
            for level in variant["levels"]
            if dense_levels.get(level["clients"], {}).get("tokens_per_s")
        }
    return out


def print_tables(result: dict) -> None:
    for variant in result["variants"]:
        table = Table(title=f"{variant['name']}  ({variant['label']})")
        for title, _, _ in COLUMNS:
            table.add_column(title, justify="right")
        for level in variant["levels"]:
            table.add_row(*(fmt(level[key], digits) if digits else str(level[key]) for _, key, digits in COLUMNS))
        console.print(table)
    r = result.get("ratios") or {}
    if r.get("scaling_4_over_1") or r.get("pop_over_dense"):
        table = Table(title="ratios (tokens/s)")
        table.add_column("what")
        table.add_column("value", justify="right")
        for name, value in r.get("scaling_4_over_1", {}).items():
            table.add_row(f"{name}: 4 clients / 1 client", f"{value:.2f}x")
        for setup, levels in r.get("pop_over_dense", {}).items():
            for clients, value in levels.items():
                table.add_row(f"POP / dense, {setup}, {clients} clients", f"{value:.2f}x")
        console.print(table)


def markdown(result: dict) -> str:
    lines = ["# popc serve load benchmark", "", f"- date: {result['date']}", f"- settings: `{result['settings']}`", ""]
    if "soak" in result:
        s = result["soak"]
        lines += [f"## Soak ({s['seconds']} s, {s['workers']} workers)", "", "| result | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in s["counts"].items()]
        lines += [
            "",
            f"- server stayed up: **{s['stayed_up']}** (same PID {s['pid']}: {s['same_pid']}, "
            f"/health ok: {s['health_ok']})",
        ]
        lines += [f"- failure: {f}" for f in s["failures"]]
        return "\n".join(lines) + "\n"
    header = "| " + " | ".join(title for title, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    for variant in result["variants"]:
        lines += [f"## {variant['name']} ({variant['label']})", "", header, rule]
        for level in variant["levels"]:
            lines.append("| " + " | ".join(fmt(level[k], d) if d else str(level[k]) for _, k, d in COLUMNS) + " |")
        lines.append("")
    r = result.get("ratios") or {}
    if r.get("scaling_4_over_1") or r.get("pop_over_dense"):
        lines += ["## Ratios (tokens/s)", "", "| what | value |", "|---|---:|"]
        lines += [f"| {n}: 4 clients / 1 client | {v:.2f}x |" for n, v in r.get("scaling_4_over_1", {}).items()]
        for setup, levels in r.get("pop_over_dense", {}).items():
            lines += [f"| POP / dense, {setup}, {c} clients | {v:.2f}x |" for c, v in levels.items()]
    return "\n".join(lines) + "\n"


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dense", help="the dense export directory")
    parser.add_argument("--pop", help="the POP export directory")
    parser.add_argument("--url", help="a running server's base URL (http://host:port) instead of starting servers")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="total ONNX Runtime threads per variant")
    parser.add_argument(
        "--ray-replicas",
        type=int_list,
        default=[0],
        help="comma list; 0 = one-process popc serve, R > 0 = --ray with R replicas of threads/R",
    )
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 16], help="clients per level (comma list)")
    parser.add_argument("--requests", type=int, default=4, help="requests each client sends per level and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level (medians reported)")
    parser.add_argument("--prompt-tokens", type=int_list, default=[16, 64, 256], help="prompt length mix (tokens)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--max-batch", type=int, default=16, help="popc serve --max-batch")
    parser.add_argument("--max-queue", type=int, default=64, help="popc serve --max-queue")
    parser.add_argument("--api-key", default=None, help="the server's --api-key (for --url)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for /health")
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument(
        "--soak",
        type=float,
        default=None,
        metavar="SECONDS",
        help="soak mode: valid and bad requests and mid-stream disconnects for SECONDS",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load"))
    args = parser.parse_args()
    if not (args.url or args.dense or args.pop):
        parser.error("give --dense and/or --pop export directories, or --url")
    args.out.mkdir(parents=True, exist_ok=True)

    targets: list[tuple[str, str, str | None, int]] = []  # (name, label, directory, replicas)
    if args.url:
        targets.append(("server", args.url, None, 0))
    else:
        for kind in ("dense", "pop"):
            directory = getattr(args, kind)
            if not directory:
                continue
            for replicas in args.ray_replicas:
                suffix = "" if replicas == 0 else f"-ray{replicas}"
                per = args.threads if replicas == 0 else max(1, args.threads // replicas)
                label = "1 process" if replicas == 0 else f"Ray, {replicas} replica(s)"
                targets.append((kind + suffix, f"{label} x {per} threads, {directory}", directory, replicas))
        if args.soak is not None:
            targets = targets[:1]

    result: dict = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        settings=" ".join(sys.argv[1:]),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        variants=[],
    )
    for name, label, directory, replicas in targets:
        console.print(f"[bold]{name}[/]: {label}")
        if directory is None:
            server = Server(args.url)
        else:
            started = time.perf_counter()
            server = start_server(
                directory,
                replicas,
                args.threads,
                args.max_batch,
                args.max_queue,
                args.startup_timeout,
                args.out / "logs",
                name,
            )
            console.print(f"  up in {time.perf_counter() - started:.1f} s at {server.url} (pid {server.pid})")
        try:
            if args.soak is not None:
                result["soak"] = asyncio.run(soak(server.url, server, args))
                result["soak"]["variant"] = name
            else:
                result["variants"].append(
                    dict(name=name, label=label, replicas=replicas, **bench_variant(server.url, args))
                )
        finally:
            server.stop()
    if args.soak is None:
        result["ratios"] = ratios(result["variants"])
        print_tables(result)
    else:
        s = result["soak"]
        table = Table(title=f"soak, {s['seconds']:g} s, {s['workers']} workers ({s['variant']})")
        table.add_column("result")
        table.add_column("count", justify="right")
        for key, value in s["counts"].items():
            table.add_row(key, str(value))
        table.add_row("server stayed up", "yes" if s["stayed_up"] else "[red]NO[/]")
        console.print(table)
        for failure in s["failures"]:
            console.print(f"  failed: {failure}")
    (args.out / "serve_load.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "serve_load.md").write_text(markdown(result))
    console.print(f"wrote {args.out / 'serve_load.json'} and {args.out / 'serve_load.md'}")
    if args.soak is not None:
        return 0 if result["soak"]["stayed_up"] and not result["soak"]["counts"]["failed"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
