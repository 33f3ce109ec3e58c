"""POP-online settings: how each FFN's channels are split into regions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popc.errors import PopcError

# How channels are scored: "activation" (the paper's: the prompt's normalised activations at
# prefill, |act(gate)| at decode) or "output" (the same, each channel weighted by the L2 norm
# of its down-projection row ||Wd_j||: its contribution to the FFN's output).
SCORES = ("activation", "output")
# pop_config[3], the graph's score mode.
MODE_ACTIVATION, MODE_STATIC, MODE_OUTPUT = 0, 1, 2


@dataclass(frozen=True)
class PopSettings:
    """POP-online regions as fractions of each FFN's channels.

    ``retain`` (R, top-scored at prefill, always used), ``candidate`` (C, scored per
    token at decode) and ``keep`` (how many of C each decode step uses). Decode
    sparsity is ``1 - retain - keep``. ``static`` ranks channels by weight magnitude
    instead of by the prompt's activations (the static-pruning baseline). ``score`` is how
    channels are scored (``SCORES``): ``"activation"`` (the paper's) or ``"output"``
    (output-aware: each channel's prefill score and decode |activation| times the L2 norm of
    its down-projection row).
    """

    retain: float = 1.0
    candidate: float = 0.0
    keep: float = 0.0
    static: bool = False
    score: str = "activation"

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise PopcError(f"score must be one of {', '.join(map(repr, SCORES))}, got {self.score!r}")
        if self.static and self.score != "activation":
            raise PopcError(
                f"static ranks channels by weight magnitude alone; it cannot be combined with score {self.score!r}"
            )
        for name in ("retain", "candidate", "keep"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise PopcError(f"--{name} must be a fraction in [0, 1], got {value}")
        if self.retain + self.candidate > 1.0 + 1e-9:
            raise PopcError(f"retain + candidate must be <= 1, got {self.retain} + {self.candidate}")
        if self.keep > self.candidate + 1e-9:
            raise PopcError(f"keep must be <= candidate, got keep {self.keep} > candidate {self.candidate}")
        if self.retain + self.keep <= 0.0:
            # No channel left for decode; the graph would read the empty partition as a prefill's.
            raise PopcError("retain + keep is 0: decode would use no FFN channels; keep some (sparsity must be < 1)")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.retain - self.keep

    @property
    def mode(self) -> int:
        """``pop_config[3]``: 0 activation score, 1 static, 2 output-aware."""
        if self.static:
            return MODE_STATIC
        return MODE_OUTPUT if self.score == "output" else MODE_ACTIVATION

    def counts(self, channels: int) -> np.ndarray:
        """``pop_config`` for the graph: channel counts of R, C, kept-of-C, and the score mode
        (:attr:`mode`: 0 activation, 1 static, 2 output-aware)."""
        retain = round(self.retain * channels)
        candidate = min(round(self.candidate * channels), channels - retain)
        keep = min(round(self.keep * channels), candidate)
        if retain + keep == 0:
            # An empty split is not 100 % sparse: the graph reads an empty partition as "prefill"
            # and runs the FFN dense, so such a row would be dense under a POP label.
            raise PopcError(
                f"retain {self.retain:g} / candidate {self.candidate:g} / keep {self.keep:g} rounds to no channels "
                f"of the {channels}-channel FFN; raise --retain or --keep (or lower the sparsity) to at least "
                f"{1 / max(channels, 1):.4g}"
            )
        return np.array([retain, candidate, keep, self.mode], np.int64)
