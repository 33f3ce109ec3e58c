"""POP-online settings: how each FFN's channels are split into regions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popc.errors import PopcError


@dataclass(frozen=True)
class PopSettings:
    """POP-online regions as fractions of each FFN's channels.

    ``retain`` (R, top-scored at prefill, always used), ``candidate`` (C, scored per
    token at decode) and ``keep`` (how many of C each decode step uses). Decode
    sparsity is ``1 - retain - keep``. ``static`` ranks channels by weight magnitude
    instead of by the prompt's activations (the static-pruning baseline).
    """

    retain: float = 1.0
    candidate: float = 0.0
    keep: float = 0.0
    static: bool = False

    def __post_init__(self) -> None:
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

    def counts(self, channels: int) -> np.ndarray:
        """``pop_config`` for the graph: channel counts of R, C, kept-of-C, static flag."""
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
        return np.array([retain, candidate, keep, int(self.static)], np.int64)
