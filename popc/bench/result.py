"""What one ``popc bench`` run measured: typed rows, and their JSON form.

Every renderer (rich tables, Markdown, the plot, JSON) reads a :class:`BenchResult`;
nothing renders from loose dicts. The JSON layout is the one ``popc bench --json`` has
always written (timings as ``{"median", "min", "max", "samples"}``, the fastest peers
under ``best_peer``), so older result files still load with :meth:`BenchResult.from_json`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Timing:
    """Milliseconds over the repeats: the median, the range, and every sample (in round order)."""

    median: float
    low: float
    high: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        values = [float(v) for v in samples]
        return cls(float(np.median(values)), min(values), max(values), values)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "samples": list(self.samples)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Timing:
        return cls(data["median"], data["min"], data["max"], list(data.get("samples") or []))


@dataclass
class MachineInfo:
    cpu: str
    cores: int | None  # logical CPUs (os.cpu_count())
    threads: int  # given to every variant
    threads_note: str
    onnxruntime: str
    torch: str
    python: str
    device: str
    load_average_start: list[float]
    load_average_end: list[float] | None = None
    physical_cores: int | None = None
    onnxruntime_genai: str | None = None
    gpu: str | None = None
    seconds: float | None = None  # the whole run


@dataclass
class Bandwidth:
    """Streaming read bandwidth, GB/s (numpy): one thread (``sum``), BLAS threads (a gemv)."""

    numpy_sum_gbs: float
    numpy_gemv_gbs: float
    gbs: float  # the larger: the roofline's denominator


@dataclass
class BytesRead:
    """Weight bytes one batch-1 decode step reads: the FFN's (None: unknown without a POP export) and all."""

    ffn: float | None
    total: float


@dataclass
class TtftRow:
    """Time to first token of one variant at one prompt length (batch 1)."""

    variant: str
    prompt: int
    ms: Timing
    vs_dense: float | None = None  # ms ÷ dense ORT's ms (paired); below 1: faster
    best_peer: str | None = None
    vs_best_peer: float | None = None  # ms ÷ the fastest dense peer's ms (paired)


@dataclass
class DecodeRow:
    """Decode ms per step of one variant at one sparsity (0: dense) and batch size."""

    variant: str
    sparsity: float
    batch: int
    ms_per_step: Timing
    tokens_per_s: float | None = None
    speedup: float | None = None  # dense ORT's ms ÷ this one's (paired); above 1: faster
    best_peer: str | None = None
    vs_best_peer: float | None = None  # the fastest dense peer's ms ÷ this one's (paired)
    # The bytes model, at batch 1 only.
    bytes_ffn: float | None = None
    bytes_total: float | None = None
    roofline_ms: float | None = None  # bytes read ÷ read bandwidth
    roofline_fraction: float | None = None  # roofline_ms ÷ measured ms
    ideal_speedup: float | None = None  # dense bytes ÷ this variant's bytes


@dataclass
class MemoryRow:
    """Peak resident memory of one variant at one decode batch size, MiB, measured in a fresh
    process that loads that variant alone and runs one decode (``popc.bench.memory``).

    ``baseline_mib`` is that process before the model loads (Python, popc and the variant's
    runtime libraries imported), ``loaded_mib`` after it loads, ``peak_mib`` after the run:
    each the process's high-water mark of resident memory so far (``VmHWM``; ``ru_maxrss``
    where there is no /proc), so peak >= loaded >= baseline. All three
    are None, and ``error`` says why, where the variant could not be measured."""

    variant: str
    batch: int
    sparsity: float  # the POP sparsity it ran at (0: dense)
    baseline_mib: float | None = None
    loaded_mib: float | None = None
    peak_mib: float | None = None
    error: str | None = None

    @property
    def over_baseline_mib(self) -> float | None:
        """What loading and running the variant added to the bare process."""
        if self.peak_mib is None or self.baseline_mib is None:
            return None
        return round(self.peak_mib - self.baseline_mib, 1)


@dataclass
class FastestPeer:
    """The fastest dense peer (another runtime's dense build) at one prompt length or batch size."""

    variant: str
    ms: float  # its median


@dataclass
class BenchSettings:
    """What was measured (after the plan's defaults and the model's context limit applied)."""

    prompt_lengths: list[int]
    skipped_prompt_lengths: list[int]
    batches: list[int]
    sparsities: list[float]
    pop_settings: dict[str, dict[str, float]]  # "0.5" -> PopSettings fields
    repeats: int
    warmup: int
    decode_tokens: int
    decode_prompt: int
    variants: list[str]  # those that ran, in round-robin order
    skipped_variants: dict[str, str] = field(default_factory=dict)  # variant -> why
    prefill_measures: str = "TTFT: prefill + first greedy token, batch 1"
    memory_batches: list[int] = field(default_factory=list)  # decode batches whose peak memory was measured
    quant: dict[str, dict[str, Any]] = field(default_factory=dict)  # scheme -> QuantScheme.config() of its exports
    dtype: str = "float32"  # element type of popc's unquantized exports (fp16 on CUDA by default)


@dataclass
class BenchResult:
    model: str
    exports: dict[str, str | None]  # "dense" / "pop" -> directory
    machine: MachineInfo
    settings: BenchSettings
    bandwidth: Bandwidth
    bytes: dict[str, BytesRead]  # "dense" / "pop@0.5" -> bytes read
    prefill: list[TtftRow]
    decode: list[DecodeRow]
    fastest_ttft_peer: dict[int, FastestPeer] = field(default_factory=dict)  # prompt length -> peer
    fastest_decode_peer: dict[int, FastestPeer] = field(default_factory=dict)  # batch size -> peer
    memory: list[MemoryRow] = field(default_factory=list)  # per variant and decode batch size
    # The fastest quantized peer (ort-genai-int4, llama.cpp-q4_0): what quantized rows compare with.
    fastest_ttft_quant_peer: dict[int, FastestPeer] = field(default_factory=dict)
    fastest_decode_quant_peer: dict[int, FastestPeer] = field(default_factory=dict)

    @property
    def has_peers(self) -> bool:
        return bool(
            self.fastest_ttft_peer or self.fastest_decode_peer
            or self.fastest_ttft_quant_peer or self.fastest_decode_quant_peer
        )  # fmt: skip

    def ttft(self, variant: str, prompt: int) -> TtftRow | None:
        return next((r for r in self.prefill if (r.variant, r.prompt) == (variant, prompt)), None)

    def decode_row(self, variant: str, sparsity: float, batch: int) -> DecodeRow | None:
        return next((r for r in self.decode if (r.variant, r.sparsity, r.batch) == (variant, sparsity, batch)), None)

    def memory_row(self, variant: str, batch: int) -> MemoryRow | None:
        return next((r for r in self.memory if (r.variant, r.batch) == (variant, batch)), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "exports": dict(self.exports),
            "machine": dataclasses.asdict(self.machine),
            "settings": dataclasses.asdict(self.settings),
            "bandwidth": dataclasses.asdict(self.bandwidth),
            "bytes": {key: dataclasses.asdict(read) for key, read in self.bytes.items()},
            "prefill": [_row_json(row, "ms") for row in self.prefill],
            "decode": [_row_json(row, "ms_per_step") for row in self.decode],
            "best_peer": {
                "ttft": _peers_json(self.fastest_ttft_peer, "ms"),
                "decode": _peers_json(self.fastest_decode_peer, "ms_per_step"),
                "quant_ttft": _peers_json(self.fastest_ttft_quant_peer, "ms"),
                "quant_decode": _peers_json(self.fastest_decode_quant_peer, "ms_per_step"),
            },
            "memory": [{**dataclasses.asdict(row), "over_baseline_mib": row.over_baseline_mib} for row in self.memory],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResult:
        peers = data.get("best_peer") or {}
        return cls(
            model=data["model"],
            exports=dict(data.get("exports") or {}),
            machine=_known(MachineInfo, data["machine"]),
            settings=_known(BenchSettings, data["settings"]),
            bandwidth=_known(Bandwidth, data["bandwidth"]),
            bytes={key: _known(BytesRead, read) for key, read in (data.get("bytes") or {}).items()},
            prefill=[_row_from_json(TtftRow, row, "ms") for row in data["prefill"]],
            decode=[_row_from_json(DecodeRow, row, "ms_per_step") for row in data["decode"]],
            fastest_ttft_peer=_peers_from_json(peers.get("ttft"), "ms"),
            fastest_decode_peer=_peers_from_json(peers.get("decode"), "ms_per_step"),
            memory=[_known(MemoryRow, row) for row in data.get("memory") or []],
            fastest_ttft_quant_peer=_peers_from_json(peers.get("quant_ttft"), "ms"),
            fastest_decode_quant_peer=_peers_from_json(peers.get("quant_decode"), "ms_per_step"),
        )


def _peers_json(peers: dict[int, FastestPeer], ms: str) -> dict[str, dict[str, Any]]:
    return {str(at): {"variant": p.variant, ms: p.ms} for at, p in peers.items()}


def _peers_from_json(data: dict[str, Any] | None, ms: str) -> dict[int, FastestPeer]:
    return {int(at): FastestPeer(p["variant"], p[ms]) for at, p in (data or {}).items()}


def _row_json(row: TtftRow | DecodeRow, timing: str) -> dict[str, Any]:
    data = dataclasses.asdict(row)
    data[timing] = getattr(row, timing).to_json()  # min/max, as the JSON has always spelled them
    return data


def _row_from_json(cls: type, data: dict[str, Any], timing: str) -> Any:
    row = _known(cls, {**data, timing: None})
    setattr(row, timing, Timing.from_json(data[timing]))
    return row


def _known(cls: type, data: dict[str, Any]) -> Any:
    """``cls`` from the keys it has a field for (files from older versions carry fewer or more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in data.items() if key in names})
