"""Default POP-online ratios per decode sparsity (``popc export --sparsity S``).

Sparsity is the fraction of FFN channels a decode step skips in up/down:
``1 - retain - keep``. The ratios below were chosen from `popc eval` measurements
(see README, "Choosing the defaults").
"""

from __future__ import annotations

from popc.errors import PopcError
from popc.pop import PopSettings

# Provisional until measured: half of the kept budget retained, the other half chosen
# per token from a candidate region twice its size.
DEFAULT_POP: dict[float, PopSettings] = {
    0.25: PopSettings(retain=0.5, candidate=0.5, keep=0.25),
    0.5: PopSettings(retain=0.25, candidate=0.5, keep=0.25),
    0.75: PopSettings(retain=0.125, candidate=0.25, keep=0.125),
}


def settings_for_sparsity(sparsity: float) -> PopSettings:
    """The measured defaults, interpolated between the measured sparsities."""
    if not 0.0 <= sparsity < 1.0:
        raise PopcError(f"--sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return PopSettings(retain=1.0)
    points = sorted(DEFAULT_POP)
    if sparsity in DEFAULT_POP:
        return DEFAULT_POP[sparsity]
    lower = max([p for p in points if p < sparsity], default=None)
    upper = min([p for p in points if p > sparsity], default=None)
    if lower is None or upper is None:
        # Outside the measured range: keep the nearest point's shape, scaled to this budget.
        nearest = DEFAULT_POP[points[0] if lower is None else points[-1]]
        scale = (1 - sparsity) / (1 - nearest.sparsity)
        candidate = min(nearest.candidate * scale, 1 - nearest.retain * scale)
        return PopSettings(retain=nearest.retain * scale, candidate=candidate, keep=nearest.keep * scale)
    t = (sparsity - lower) / (upper - lower)
    a, b = DEFAULT_POP[lower], DEFAULT_POP[upper]
    return PopSettings(
        retain=a.retain + t * (b.retain - a.retain),
        candidate=a.candidate + t * (b.candidate - a.candidate),
        keep=a.keep + t * (b.keep - a.keep),
    )
