"""Default POP-online ratios per decode sparsity (``popc export --sparsity S``).

Sparsity is the fraction of FFN channels a decode step skips in up/down:
``1 - retain - keep``. The ratios below were chosen from `popc eval` measurements
(see docs/results.md, "Choosing the defaults").
"""

from __future__ import annotations

from popc.errors import PopcError
from popc.pop import PopSettings


# Measured with benchmarks/choose_defaults.py on smollm2-135m (16 splits per sparsity,
# continuation perplexity on lee_background.cor; table in docs/results.md). With budget
# b = 1 - s: a quarter of it retained (r = b/4), the candidate pool r + c covering b
# plus three quarters of the rest (so a quarter of the non-budget channels is pruned
# outright, saving their gate rows), and k = 3b/4 kept per token. Perplexity barely
# moved with r up to b/2 at 25-50 % and was best at b/4 for 75 %; it moved mostly
# with the pool size, i.e. with the gate bytes read.
def default_split(sparsity: float) -> PopSettings:
    """The measured rule: r = b/4, r + c = b + 3(1 - b)/4, k = 3b/4 for budget b = 1 - s."""
    budget = 1.0 - sparsity
    retain = budget / 4
    candidate = budget + 0.75 * (1 - budget) - retain
    return PopSettings(retain=round(retain, 6), candidate=round(candidate, 6), keep=round(budget - retain, 6))


MEASURED_SPARSITIES = (0.25, 0.5, 0.75)
DEFAULT_POP: dict[float, PopSettings] = {s: default_split(s) for s in MEASURED_SPARSITIES}


def settings_for_sparsity(sparsity: float) -> PopSettings:
    """POP's default regions for ``popc export --sparsity S`` (dense at 0)."""
    if not 0.0 <= sparsity < 1.0:
        raise PopcError(f"--sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return PopSettings(retain=1.0)
    return default_split(sparsity)
