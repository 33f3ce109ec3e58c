"""The machine a bench runs on: its CPU (and GPU), its thread count, its read bandwidth."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from popc.bench.result import Bandwidth, MachineInfo

THREADS_NOTE = (
    "given to every variant: ONNX Runtime intra-op threads, torch.set_num_threads, "
    "onnxruntime-genai session_options.intra_op_num_threads"
)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The first CUDA GPU's name (and memory) from nvidia-smi, else from torch.cuda; None
    where neither can tell (no GPU, no driver, a CPU build of torch): never an error."""
    if smi := shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10, check=True,
            )  # fmt: skip
            first = done.stdout.strip().splitlines()
            if first and first[0].strip():
                name, *rest = [part.strip() for part in first[0].split(",")]
                return f"{name} ({', driver '.join(rest)})" if rest else name
    with contextlib.suppress(Exception):  # any torch/CUDA failure only means "unknown"
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return None


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, else os.cpu_count())."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; None where it does not say."""
    cores, package = set(), None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "physical id":
                package = value.strip()
            elif key == "core id":
                cores.add((package, value.strip()))
    return len(cores) or None


def default_threads() -> int:
    """One thread per physical core (hyper-threads share a core's FPUs and caches: a
    memory-bound decode gains nothing from them), at most the CPUs this process may use."""
    return max(1, min(physical_cores() or usable_cpus(), usable_cpus()))


def machine_info(threads: int, device: str) -> MachineInfo:
    import onnxruntime as ort
    import torch

    from popc.bench.peers import genai_version

    gpu = gpu_name() if device == "cuda" else None  # a broken CUDA setup is the runners' error to report
    return MachineInfo(
        cpu=cpu_name(),
        cores=os.cpu_count(),
        physical_cores=physical_cores(),
        threads=threads,
        threads_note=THREADS_NOTE,
        onnxruntime=ort.__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        device=device,
        load_average_start=list(os.getloadavg()),
        onnxruntime_genai=genai_version(),
        gpu=gpu,
    )


def read_bandwidth(megabytes: int = 512, repeats: int = 7) -> Bandwidth:
    """The machine's streaming read bandwidth in GB/s: median of numpy reductions over a
    buffer far larger than the caches (one thread: ``sum``; BLAS threads: a gemv)."""
    n = megabytes * (1 << 20) // 4
    data = np.ones(n, np.float32)

    def measure(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return n * 4 / float(np.median(times)) / 1e9

    summed = measure(lambda: data.sum())
    matrix = data.reshape(-1, 4096)
    vector = np.ones(4096, np.float32)
    gemv = measure(lambda: matrix @ vector)
    return Bandwidth(numpy_sum_gbs=summed, numpy_gemv_gbs=gemv, gbs=max(summed, gemv))
