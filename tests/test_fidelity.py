"""KL divergence to dense and top-1 agreement (popc.fidelity), against direct numpy
computations over ``step()``'s logits, and their place in ``popc eval``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_model_dir
from popc.errors import PopcError
from popc.eval import EvalPlan, run_eval
from popc.fidelity import Fidelity, TokenScores, compare, paired_difference, score_windows, window_logits
from popc.pop import PopSettings
from popc.runtime import load
from popc.scoring import make_windows

TEXT = ("Rivers carve valleys over centuries, and the valleys guide the rivers in return. " * 3 +
        "A lighthouse keeper counts ships by night and gulls by day. ") * 5  # fmt: skip
POP = PopSettings(retain=0.25, candidate=0.5, keep=0.25)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def pop_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from popc.export import ExportPlan, export

    root = tmp_path_factory.mktemp("fidelity")
    out = root / "pop"
    export(ExportPlan(model=str(make_tiny_model_dir(root, "llama")), out=out, pop=POP))
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def test_compare_is_kl_over_the_whole_vocabulary() -> None:
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(2, 70, 300)).astype(np.float32) * 4  # 140 tokens: more than one chunk
    other = dense + rng.normal(size=dense.shape).astype(np.float32)
    other[0, 3] = dense[0, 3]  # one identical token: KL 0, top-1 agrees
    targets = rng.integers(0, 300, size=(2, 70))
    got = compare(dense, other, targets)
    p, q = _log_softmax(dense), _log_softmax(other)
    np.testing.assert_allclose(got.kl, (np.exp(p) * (p - q)).sum(-1), rtol=1e-4, atol=1e-6)  # float32 sums
    np.testing.assert_allclose(got.logprob, np.take_along_axis(q, targets[..., None], -1)[..., 0], atol=1e-5)
    np.testing.assert_array_equal(got.top1, dense.argmax(-1) == other.argmax(-1))
    assert got.kl[0, 3] == pytest.approx(0.0, abs=1e-6) and got.top1[0, 3]
    assert (got.kl > 0).sum() == got.kl.size - 1 and not got.top1.all()


def test_summary_intervals_are_over_windows() -> None:
    kl = np.array([[0.1, 0.3], [0.5, 0.7], [0.2, 0.2]])
    scores = TokenScores(logprob=-np.ones_like(kl), kl=kl, top1=np.array([[1, 0], [1, 1], [0, 0]], bool))
    summary = Fidelity.of(scores)
    per_window = kl.mean(axis=1)
    assert summary.kl_mean == pytest.approx(kl.mean())
    assert summary.kl_ci == pytest.approx(1.96 * per_window.std(ddof=1) / math.sqrt(3))
    assert summary.kl_median == pytest.approx(0.25) and summary.top1 == pytest.approx(0.5)
    assert summary.ppl == pytest.approx(math.e) and summary.ppl_low == pytest.approx(math.e)  # no spread
    assert summary.tokens == 6 and summary.windows == 3
    one = Fidelity.of(TokenScores(-np.ones((1, 2)), np.zeros((1, 2)), np.ones((1, 2), bool)))
    assert one.kl_ci == 0.0
    # Paired over windows: a constant shift has no spread, however spread each row is.
    assert summary.kl_windows == pytest.approx(per_window.tolist())
    mean, half = paired_difference([w + 0.01 for w in summary.kl_windows], summary.kl_windows)
    assert mean == pytest.approx(0.01) and half == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(PopcError, match="same windows"):
        paired_difference([0.1], [0.1, 0.2])


def test_scores_match_a_direct_computation(pop_export) -> None:
    model = load(pop_export)
    ids = [int(i) for i in model.tokenizer(TEXT, add_special_tokens=False)["input_ids"]]
    windows = make_windows(ids, [], 40, 3)
    prompt = 16
    dense_settings = PopSettings(retain=1.0)
    # Shared dense logits (batch of 2, then 1) equal per-row direct computations.
    dense_scores, pop_scores = score_windows(model, [(model, dense_settings), (model, POP)], windows, prompt, batch=2)
    for row in range(3):
        one = windows[row : row + 1]
        dense = window_logits(model, one, prompt, dense_settings)
        pruned = window_logits(model, one, prompt, POP)
        p, q = _log_softmax(dense), _log_softmax(pruned)
        np.testing.assert_allclose(pop_scores.kl[row], (np.exp(p) * (p - q)).sum(-1)[0], rtol=1e-4, atol=1e-6)  # float32
        np.testing.assert_array_equal(pop_scores.top1[row], (dense.argmax(-1) == pruned.argmax(-1))[0])
        targets = one[:, prompt:, None]
        np.testing.assert_allclose(pop_scores.logprob[row], np.take_along_axis(q, targets, -1)[0, :, 0], atol=1e-5)
        np.testing.assert_allclose(dense_scores.logprob[row], np.take_along_axis(p, targets, -1)[0, :, 0], atol=1e-5)
    assert np.all(dense_scores.kl == 0) and dense_scores.top1.all()
    assert pop_scores.kl.mean() > 1e-6  # the pruning shows (a tiny random model: small, not 0)


def test_eval_rows_carry_kl_and_top1(pop_export, text_file) -> None:
    plan = EvalPlan(pop_export, text=text_file, tasks=[], windows=3, window=40, prompt=16, methods=["dense", "pop", "griffin"])
    result = run_eval(plan)
    dense, pop, griffin = result.rows
    assert dense.fidelity.kl_mean == 0 and dense.fidelity.top1 == 1.0
    assert pop.fidelity.kl_mean > 0 and pop.fidelity.tokens == 3 * 24 == pop.scored_tokens
    assert pop.ppl == pop.fidelity.ppl and pop.fidelity.ppl_low <= pop.ppl <= pop.fidelity.ppl_high
    assert griffin.fidelity.kl_p99 >= griffin.fidelity.kl_median >= 0
    assert result.info["scored_tokens"] == 72
    row = result.to_json()["rows"][1]
    assert row["fidelity"]["kl_mean"] == pytest.approx(pop.fidelity.kl_mean) and row["score"] == "activation"
