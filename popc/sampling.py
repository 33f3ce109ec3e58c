"""Choosing the next token from logits on the host: greedy, or temperature + nucleus (top-p).

Greedy decoding need not come here: :meth:`popc.steps.BoundSteps.greedy` picks the ids where
the logits lie (on the GPU for CUDA sessions). Sampling copies a step's logits to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from popc.errors import PopcError


def check_sampling(temperature: float, top_p: float, seed: int | None) -> None:
    """Refuse sampling values numpy would reject with a traceback (a negative seed) or turn
    into nonsense without a word (a NaN or infinite temperature)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise PopcError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise PopcError(f"--top-p must be in (0, 1], got {top_p}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise PopcError(f"--seed must be an integer >= 0, got {seed}")


@dataclass
class SamplingOptions:
    """Greedy when ``temperature`` is 0; otherwise temperature + nucleus (top-p) sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.seed)
        self.rng = np.random.default_rng(self.seed)

    def pick(self, logits: np.ndarray) -> np.ndarray:
        """Next token per row of ``logits`` [batch, vocab]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        chosen = []
        for row in probs:
            keep = self._nucleus(row)
            cumulative = np.cumsum(row[keep])  # an inverse-CDF draw (rng.choice checks p at length)
            at = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
            chosen.append(keep[min(at, keep.size - 1)])
        return np.asarray(chosen)

    def _nucleus(self, row: np.ndarray) -> np.ndarray:
        """The most probable tokens whose mass first reaches ``top_p``, most probable first.
        Sorting a 50k-token vocabulary costs milliseconds per row; the nucleus is nearly
        always among the top few hundred, so those are sorted first."""
        if self.top_p >= 1:
            return np.arange(row.size)  # every token: no order needed
        if row.size > 256:
            top = np.argpartition(-row, 255)[:256]
            if (nucleus := self._mass_reaching_top_p(row, top)) is not None:
                return nucleus
        return self._mass_reaching_top_p(row, np.arange(row.size), whole=True)

    def _mass_reaching_top_p(self, row: np.ndarray, tokens: np.ndarray, whole: bool = False) -> np.ndarray | None:
        """``tokens`` by falling probability, cut where their mass reaches ``top_p``; None
        when their whole mass falls short (and they are not the whole vocabulary)."""
        order = tokens[np.argsort(-row[tokens], kind="stable")]
        cumulative = np.cumsum(row[order])
        if cumulative[-1] < self.top_p and not whole:
            return None
        return order[: int(np.searchsorted(cumulative, self.top_p) + 1)]
