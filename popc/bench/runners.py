"""How a bench times one variant: the :class:`Runner` protocol, and popc's ORT and PyTorch runners.

The onnxruntime-genai runner, which implements the same protocol, is in ``popc.bench.peers``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from popc.pop import PopSettings
from popc.progress import Progress, or_silent


class Runner(Protocol):
    """One way of running the model, timed the same way as every other.

    ``ids`` and ``mask`` are int64 arrays of shape (batch, prompt): random token ids, equal
    lengths, no padding (the mask is all ones). ``settings`` are the POP regions to run with,
    or None for a dense run; a dense-only runner ignores them. Both methods do their setup
    (sessions, copies of the prompt) when called, and return a function that performs one
    timed run and returns its milliseconds; the bench calls that function for warm-up and
    for each repeat, round-robin with the other variants' functions.
    """

    vocab: int  # token ids below this are valid prompts
    threads: int  # the intra-op threads it runs with: the same for every runner of a bench

    def prefill(self, ids: np.ndarray, mask: np.ndarray, settings: PopSettings | None) -> Callable[[], float]:
        """Time to first token: a fresh KV cache (its allocation included), the prefill of the
        prompt and the greedy pick of the first token — what a user waits for. Returns ms."""
        ...

    def decode(
        self, ids: np.ndarray, mask: np.ndarray, steps: int, settings: PopSettings | None
    ) -> Callable[[], float]:
        """Decode speed: an untimed prefill and first token, then ``steps`` timed decode steps
        (one model run and the greedy pick each; EOS does not stop them). Returns ms per step."""
        ...


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class OrtRunner:
    """A popc export in ONNX Runtime, through ``popc.runtime``'s bound stepper, greedy as
    ``generate`` runs it: on CUDA the KV cache, partitions and logits stay on the GPU and only
    the picked ids come back."""

    def __init__(self, path: Path, threads: int, device: str = "cpu", use_oplib: bool = False) -> None:
        from popc.runtime import load

        self.threads = threads
        self.model = load(path, device=device, use_oplib=use_oplib, threads=threads)
        self.vocab = int(self.model.config.get("vocab_size") or 32000)

    @property
    def uses_oplib(self) -> bool:
        return bool(self.model.uses_oplib)

    def _stepper(self, settings: PopSettings | None, tokens: int) -> Any:
        """A bound stepper whose KV cache holds ``tokens``, sized up front as
        onnxruntime-genai's ``max_length`` sizes its cache."""
        return self.model.bound(settings, capacity=tokens)

    def prefill(self, ids: np.ndarray, mask: np.ndarray, settings: PopSettings | None) -> Callable[[], float]:
        stepper = self._stepper(settings, ids.shape[1] + 1)

        def run() -> float:
            start = time.perf_counter()
            stepper.prefill(ids, mask, logits=False)
            stepper.greedy()  # picked where the logits lie: only the ids reach the host
            return _ms_since(start)

        return run

    def decode(
        self, ids: np.ndarray, mask: np.ndarray, steps: int, settings: PopSettings | None
    ) -> Callable[[], float]:
        def run() -> float:
            stepper = self._stepper(settings, ids.shape[1] + 1 + steps)
            stepper.prefill(ids, mask, logits=False)
            next_ids = stepper.greedy().reshape(-1, 1)
            start = time.perf_counter()
            for _ in range(steps):
                stepper.decode(next_ids, logits=False)  # the logits stay on the device
                next_ids = stepper.greedy().reshape(-1, 1)
            return _ms_since(start) / steps

        return run


class TorchRunner:
    """The Hugging Face model in PyTorch: eager ``generate`` (settings None) and, with POP
    settings, the PyTorch POP reference (``popc.reference.PopReference``) over it."""

    def __init__(self, spec: str, threads: int, progress: Progress | None = None) -> None:
        import torch

        from popc.loading import load_model

        progress = or_silent(progress)
        self.threads = threads
        torch.set_num_threads(threads)
        progress.stage(f"loading {spec} in PyTorch")
        self.torch = torch
        self.model = load_model(spec, progress=progress).model.eval()
        self.vocab = int(self.model.config.vocab_size)
        # `generate` computes the prompt's last logits only; so does the TTFT measured here.
        wants_last = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.last_logits = {"logits_to_keep": 1} if wants_last else {}

    def prefill(self, ids: np.ndarray, mask: np.ndarray, settings: PopSettings | None) -> Callable[[], float]:
        torch = self.torch
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if settings is None:

            def run() -> float:
                start = time.perf_counter()
                with torch.no_grad():
                    out = self.model(input_ids=ids_t, attention_mask=mask_t, use_cache=True, **self.last_logits)
                    out.logits[:, -1].argmax(-1)
                return _ms_since(start)

            return run

        def reference_run(reference: Any) -> float:
            start = time.perf_counter()
            logits, _ = reference.step(ids_t, mask_t)
            logits[:, -1].argmax(-1)
            return _ms_since(start)

        return lambda: self._with_reference(settings, reference_run)

    def decode(
        self, ids: np.ndarray, mask: np.ndarray, steps: int, settings: PopSettings | None
    ) -> Callable[[], float]:
        torch = self.torch
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if settings is None:
            # HF `generate` has no per-step hook: (steps + 1 new tokens) - (1 new token), per step.
            def generate(new: int) -> float:
                start = time.perf_counter()
                with torch.no_grad():
                    self.model.generate(
                        input_ids=ids_t, attention_mask=mask_t, max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0,
                    )  # fmt: skip
                return time.perf_counter() - start

            return lambda: max(generate(steps + 1) - generate(1), 0.0) * 1000 / steps

        def run(reference: Any) -> float:
            logits, cache = reference.step(ids_t, mask_t)
            attention = mask_t
            start = time.perf_counter()
            for _ in range(steps):
                next_ids = logits[:, -1].argmax(-1, keepdim=True)
                attention = torch.cat([attention, torch.ones_like(next_ids)], dim=1)
                logits, cache = reference.step(next_ids, attention, cache)
            return _ms_since(start) / steps

        return lambda: self._with_reference(settings, run)

    def _with_reference(self, settings: PopSettings, fn: Callable[[Any], float]) -> float:
        """``fn`` over the model with POP's reference hooks in place, removed afterwards."""
        from popc.reference import PopReference

        reference = PopReference(self.model, settings)
        try:
            return fn(reference)
        finally:
            reference.remove()
