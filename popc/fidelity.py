"""Fidelity to the dense model: per-token KL divergence and top-1 agreement.

Perplexity moves little between close pruning settings and multiple-choice accuracy is
noisy at the question counts a CPU affords; llama.cpp's ``llama-perplexity
--kl-divergence`` measures a quantized model against its full-precision self instead.
popc does the same for every eval row: over the continuation tokens perplexity scores
(decode mode, :mod:`popc.scoring`), each token's

* ``KL(dense || row)`` in nats, over the full vocabulary, and
* whether the row's most likely token is the dense model's.

The dense distributions are computed once per batch of windows and shared by every row
of the run (the batch loop is outside the row loop), so a run pays for dense once
however many rows it scores. They are not written to disk: exact KL needs the whole
distribution (20k tokens x 49k-262k vocabulary is 4-21 GB in float32), and a top-k
summary underestimates it (measured on SmolLM2 at POP 50 %: -10 % at k = 128, -4 % at
k = 512).

Intervals are over windows, not tokens: tokens of one window share a prompt and a
partition, so they are not independent. A 95 % interval is mean +- 1.96 standard errors
of the per-window means.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from popc.errors import PopcError
from popc.pop import PopSettings
from popc.progress import Progress, or_silent

CHUNK = 64  # tokens per block: bounds the temporaries at a few x 64 x vocabulary floats
Z95 = 1.96


@dataclass
class TokenScores:
    """Per scored token of every window, ``[windows, tokens]``."""

    logprob: np.ndarray  # log p_row(next token)
    kl: np.ndarray  # KL(dense || row), nats
    top1: np.ndarray  # bool: the row's argmax is the dense model's


def _log_softmax(block: np.ndarray) -> np.ndarray:
    """float32 log-softmax of [tokens, V] (sums are pairwise, so 262k terms stay exact to ~1e-6)."""
    block = block.astype(np.float32, copy=False)
    top = block.max(axis=-1, keepdims=True)
    return block - (top + np.log(np.exp(block - top).sum(axis=-1, keepdims=True)))


class DenseReference:
    """The dense distributions of one batch of windows, [N, T, V] logits, kept as float32
    log-probabilities so that every row compared with them pays for one log-softmax of its
    own, not two."""

    def __init__(self, dense_logits: np.ndarray) -> None:
        self.shape = dense_logits.shape
        flat = dense_logits.reshape(-1, dense_logits.shape[-1])
        self.logp = np.empty(flat.shape, np.float32)
        for start in range(0, flat.shape[0], CHUNK):
            self.logp[start : start + CHUNK] = _log_softmax(flat[start : start + CHUNK])
        self.argmax = flat.argmax(-1)

    def itself(self, targets: np.ndarray) -> TokenScores:
        """The scores of the dense row itself: its log-probabilities, KL 0, top-1 always."""
        shape = targets.shape
        flat_targets = targets.reshape(-1)
        logprob = np.take_along_axis(self.logp, flat_targets[:, None], axis=-1)[:, 0].astype(np.float64)
        return TokenScores(logprob.reshape(shape), np.zeros(shape), np.ones(shape, bool))

    def compare(self, logits: np.ndarray, targets: np.ndarray) -> TokenScores:
        """Per-token scores of ``logits`` [N, T, V] (``targets`` [N, T]) against these."""
        if logits.shape != self.shape:
            raise PopcError(f"logits of shape {logits.shape} cannot be compared with dense {self.shape}")
        rows, tokens, vocab = logits.shape
        flat, flat_targets = logits.reshape(-1, vocab), targets.reshape(-1)
        logprob, kl = np.empty(flat.shape[0]), np.empty(flat.shape[0])
        for start in range(0, flat.shape[0], CHUNK):
            part = slice(start, start + CHUNK)
            p, q = self.logp[part], _log_softmax(flat[part])
            kl[part] = np.maximum((np.exp(p) * (p - q)).sum(axis=-1), 0.0)  # >= 0 up to rounding
            logprob[part] = np.take_along_axis(q, flat_targets[part, None], axis=-1)[:, 0]
        top1 = self.argmax == flat.argmax(-1)
        shape = (rows, tokens)
        return TokenScores(logprob.reshape(shape), kl.reshape(shape), top1.reshape(shape))


def compare(dense_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> TokenScores:
    """``dense_logits`` and ``logits`` [N, T, V], ``targets`` [N, T]: per-token scores of ``logits``."""
    if dense_logits.shape != logits.shape:
        raise PopcError(f"logits of shape {logits.shape} cannot be compared with dense {dense_logits.shape}")
    return DenseReference(dense_logits).compare(logits, targets)


def window_logits(model: Any, ids: np.ndarray, prompt: int, pop: PopSettings | None) -> np.ndarray:
    """Logits [rows, W - prompt, V] predicting tokens ``[prompt, W)`` of each window, decode mode.

    The prefill of ``[0, prompt - 1)`` keeps no logits where the graph allows it (its LM
    head would be wasted work); ``[prompt - 1, W - 1)`` is one decode-mode call.
    """
    rows, width = ids.shape
    mask = np.ones((rows, prompt - 1), np.int64)
    keep = {"logits_to_keep": 1} if getattr(model, "has_logits_to_keep", False) else {}
    _, state = model.step(ids[:, : prompt - 1], mask, model.initial_state(rows), pop, **keep)
    logits, _ = model.step(ids[:, prompt - 1 : -1], np.ones((rows, width - 1), np.int64), state, pop)
    return logits


def score_windows(
    dense_model: Any,
    rows: Sequence[tuple[Any, PopSettings | None]],
    windows: np.ndarray,
    prompt: int,
    batch: int = 8,
    progress: Progress | None = None,
) -> list[TokenScores]:
    """Scores of every ``(model, settings)`` row on ``windows``, against ``dense_model``'s
    dense distributions (computed once per batch). A row that *is* the reference (the same
    model object, dense settings) reuses its logits. Advances ``progress`` by one per
    window and row."""
    progress = or_silent(progress)
    count, width = windows.shape
    if not 2 <= prompt < width:
        raise PopcError(f"prompt length {prompt} must be in [2, {width})")
    dense_settings = PopSettings(retain=1.0)
    shape = (count, width - prompt)
    out = [TokenScores(np.empty(shape), np.empty(shape), np.empty(shape, bool)) for _ in rows]
    for start in range(0, count, batch):
        ids = windows[start : start + batch]
        part = slice(start, start + ids.shape[0])
        dense = window_logits(dense_model, ids, prompt, dense_settings)
        reference = DenseReference(dense)
        for (model, settings), scores in zip(rows, out):
            if model is dense_model and (settings is None or settings.retain >= 1.0):
                got = reference.itself(ids[:, prompt:])  # the reference row: KL 0, no second pass
            else:
                got = reference.compare(window_logits(model, ids, prompt, settings), ids[:, prompt:])
            scores.logprob[part], scores.kl[part], scores.top1[part] = got.logprob, got.kl, got.top1
            progress.advance(ids.shape[0])
    return out


# --------------------------------------------------------------------------- summaries


def _interval(per_window: np.ndarray) -> float:
    """Half-width of the 95 % interval of the mean of ``per_window`` (0 for one window)."""
    if per_window.size < 2:
        return 0.0
    return float(Z95 * per_window.std(ddof=1) / math.sqrt(per_window.size))


@dataclass
class Fidelity:
    """One row's summary over its scored tokens; ``*_ci`` are 95 % half-widths over windows."""

    tokens: int
    windows: int
    ppl: float
    ppl_low: float
    ppl_high: float
    kl_mean: float
    kl_ci: float
    kl_median: float
    kl_p99: float
    top1: float
    top1_ci: float
    # Per-window means, so two rows on the same windows can be compared pairwise
    # (:func:`paired_difference`), which separates far closer rows than their own intervals.
    kl_windows: list[float] = dataclasses.field(default_factory=list)
    nll_windows: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, scores: TokenScores) -> Fidelity:
        nll = -scores.logprob.mean(axis=1)
        nll_ci = _interval(nll)
        kl_windows = scores.kl.mean(axis=1)
        top1_windows = scores.top1.mean(axis=1)
        return cls(
            tokens=int(scores.logprob.size),
            windows=int(scores.logprob.shape[0]),
            ppl=float(math.exp(nll.mean())),
            ppl_low=float(math.exp(nll.mean() - nll_ci)),
            ppl_high=float(math.exp(nll.mean() + nll_ci)),
            kl_mean=float(scores.kl.mean()),
            kl_ci=_interval(kl_windows),
            kl_median=float(np.median(scores.kl)),
            kl_p99=float(np.percentile(scores.kl, 99)),
            top1=float(scores.top1.mean()),
            top1_ci=_interval(top1_windows),
            kl_windows=[float(v) for v in kl_windows],
            nll_windows=[float(v) for v in nll],
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and 95 % half-width of ``a - b`` over windows (two rows' per-window means)."""
    if len(a) != len(b) or not len(a):
        raise PopcError(f"paired rows need the same windows; got {len(a)} and {len(b)}")
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(diff.mean()), _interval(diff)
