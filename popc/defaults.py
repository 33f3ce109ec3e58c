"""Default POP-online splits per ``popc export --sparsity S``: the best measured at S's cost.

``--sparsity S`` fixes what a decode step costs: for a gated FFN it reads
``B = 1 - 3S/4`` of the FFN weight bytes (gate rows of the pool R ∪ C, up and down rows
of R ∪ kept: ``B = (pool + 2u) / 3`` with ``u = r + k``), the cost popc's defaults have
had from the start. Within that cost, the split is the one ``popc eval --sweep`` found
best (docs/results.md, "The accuracy-vs-cost front"): on SmolLM2-135M the best candidate
pool shrank with the budget: a full pool while it leaves at least about 45 % of the
channels for up/down, below that ``pool = 2.2 u``, i.e. the bytes go to gate rows only
where enough up/down rows are left to use what the gates find. A quarter of the used
channels is retained (r = u/4, k = 3u/4), as before. The score is the paper's.

The rows per sparsity therefore use a little fewer up/down channels than ``1 - S``
(``PopSettings.sparsity`` is 0.28 / 0.55 / 0.69 at S = 0.25 / 0.5 / 0.75): the bytes
they save go to scoring more candidates per token.
"""

from __future__ import annotations

from popc.errors import PopcError
from popc.pop import PopSettings

POOL_PER_USED = 2.2  # pool = min(1, 2.2 u): the measured best pool at low budgets
RETAINED_SHARE = 0.25  # r = u / 4
# The score of the defaults: the paper's activation score at every cost. Output-aware
# (activation x ||W_down row||) was closer to dense on SmolLM2 at 0.81 of the bytes but much
# further on Gemma-3 (KL 0.104 against 0.055), so it stays opt-in (--score output).
OUTPUT_SCORE_UP_TO = 0.0  # --sparsity S <= this: output-aware (0: never)


def default_score(sparsity: float) -> str:
    """The measured best score at ``--sparsity S``'s cost."""
    return "output" if sparsity <= OUTPUT_SCORE_UP_TO else "activation"


def ffn_cost(sparsity: float) -> float:
    """FFN weight bytes per decode step, as a fraction of dense, of ``--sparsity S``."""
    return 1.0 - 0.75 * sparsity


def default_split(sparsity: float, score: str | None = None) -> PopSettings:
    """The measured rule: at cost B = 1 - 3S/4, u = r + k and the pool solve
    ``(pool + 2u) / 3 = B`` with ``pool = min(1, 2.2 u)``; r = u/4, k = 3u/4. ``score``
    None: :func:`default_score`."""
    cost = ffn_cost(sparsity)
    used = (3 * cost - 1) / 2  # with a full pool
    if POOL_PER_USED * used < 1:
        used = 3 * cost / (POOL_PER_USED + 2)
    pool = min(1.0, POOL_PER_USED * used)
    retain = RETAINED_SHARE * used
    return PopSettings(
        retain=round(retain, 6),
        candidate=round(pool - retain, 6),
        keep=round(used - retain, 6),
        score=score or default_score(sparsity),
    )


MEASURED_SPARSITIES = (0.25, 0.5, 0.75)
DEFAULT_POP: dict[float, PopSettings] = {s: default_split(s) for s in MEASURED_SPARSITIES}


def settings_for_sparsity(sparsity: float, score: str | None = None) -> PopSettings:
    """POP's default regions for ``popc export --sparsity S`` (dense at 0)."""
    if not 0.0 <= sparsity < 1.0:
        raise PopcError(f"--sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return PopSettings(retain=1.0)
    return default_split(sparsity, score)
