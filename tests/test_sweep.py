"""``popc eval --sweep`` (popc.sweep): the grid, the Pareto front, timing with the op
library, and every point reproducible by ``popc eval --split``."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import assert_clean_failure, make_tiny_model_dir
from popc import oplib
from popc.cli import app
from popc.defaults import default_split
from popc.errors import PopcError
from popc.eval import parse_split, weight_fraction
from popc.pop import PopSettings
from popc.sweep import pareto_front, sweep_points

TEXT = ("Rivers carve valleys over centuries, and the valleys guide the rivers in return. " * 3 +
        "A lighthouse keeper counts ships by night and gulls by day. ") * 5  # fmt: skip


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from popc.export import ExportPlan, export

    root = tmp_path_factory.mktemp("sweep")
    source = make_tiny_model_dir(root, "llama")
    out = {"pop": root / "pop", "dense": root / "dense"}
    export(ExportPlan(model=str(source), out=out["pop"], pop=PopSettings(retain=0.25, candidate=0.5, keep=0.25)))
    export(ExportPlan(model=str(source), out=out["dense"]))
    (root / "text.txt").write_text(TEXT)
    out["text"] = root / "text.txt"
    return out


@pytest.fixture(scope="module")
def library() -> None:
    problem = oplib.toolchain_problem()
    if problem and oplib.find_library() is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the popc op library, but: {problem}")
        pytest.skip(f"the sweep times the op library's kernels, which cannot be built here: {problem}")
    if oplib.find_library() is None:
        oplib.build()


def test_pareto_front() -> None:
    costs = [1.0, 0.8, 0.8, 0.6, 0.5, 0.7]
    losses = [0.0, 0.2, 0.3, 0.5, 0.5, 0.6]
    # (0.8, 0.3) is beaten by (0.8, 0.2); (0.6, 0.5) by (0.5, 0.5); (0.7, 0.6) by (0.6, 0.5).
    assert pareto_front(costs, losses) == [True, True, False, False, True, False]
    assert pareto_front([0.5, 0.5], [0.1, 0.1]) == [True, True]  # equal points do not beat each other


def test_grid_matches_costs_and_defaults() -> None:
    points = sweep_points([0.25, 0.5], ["pop", "dynamic", "griffin", "static", "pop-output"])
    for sparsity in (0.25, 0.5):
        default = default_split(sparsity, "activation")  # the grid's "pop" rows: the paper's score
        mine = [(m, s) for m, sp, s in points if sp == sparsity]
        assert ("pop", default) in mine
        # Dynamic selection at the default's FFN bytes (it keeps fewer channels) and at its sparsity.
        dynamic = [s for m, s in mine if m == "dynamic"]
        assert any(abs(weight_fraction(s) - weight_fraction(default)) < 1e-5 for s in dynamic)
        assert any(abs(s.sparsity - sparsity) < 1e-6 for s in dynamic)
        assert all(s.retain == 0 and s.candidate == 1 for s in dynamic)
        assert {s.score for m, s in mine if m == "pop-output"} == {"output"}
        assert [s.static for m, s in mine if m == "static"] == [True]
    assert len({s for _, _, s in points}) == len(points)
    with pytest.raises(PopcError, match="no grid"):
        sweep_points([0.5], ["nonsense"])
    # The small grid: the default split and dynamic selection at its bytes, one each.
    small = sweep_points([0.5], ["pop", "dynamic", "griffin"], grid="defaults")
    assert [(m, s) for m, _, s in small][:1] == [("pop", default_split(0.5))] and len(small) == 3
    assert weight_fraction(small[1][2]) == pytest.approx(weight_fraction(default_split(0.5)), abs=1e-5)
    with pytest.raises(PopcError, match="--grid"):
        sweep_points([0.5], ["pop"], grid="huge")


def test_parse_split() -> None:
    assert parse_split("0.125/0.75/0.375") == PopSettings(retain=0.125, candidate=0.75, keep=0.375)
    assert parse_split("0.1/0.5/0.2:output").score == "output"
    assert parse_split("0.5/0/0:static").static
    for bad, message in (("0.1/0.5", "R/C/K"), ("a/b/c", "R/C/K"), ("0.1/0.5/0.2:best", "score"), ("0.5/0.6/0.1", "<= 1")):
        with pytest.raises(PopcError, match=message):
            parse_split(bad)


def test_sweep_times_every_point_and_each_reproduces(exports, library, tmp_path: Path) -> None:
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["eval", str(exports["pop"]), "--sweep", "--sparsities", "0.5", "--methods", "dense,pop,dynamic,griffin",
            "--windows", "3", "--window", "40", "--prompt", "16", "--text", str(exports["text"]),
            "--json", str(out), "--plot", str(plot)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["method"] for r in rows][:1] == ["dense"] and len(rows) == 1 + 4 + 2 + 1
    assert all(r["ms_per_token"] > 0 and r["fidelity"]["tokens"] == 3 * 24 for r in rows)
    assert "bytes" in rows[0]["front"] and "ms" in rows[0]["front"]  # KL 0: nothing beats dense on fidelity
    fronts = [r for r in rows if "bytes" in r["front"]]
    assert any(r["method"] == "griffin" for r in fronts)  # the cheapest point is on the bytes front
    assert plot.stat().st_size > 10_000 and "front" in result.output
    # Every point is reproduced by its own `popc eval --split` command on the same windows.
    for row in [r for r in rows if r["method"] != "dense"][:2]:
        command = shlex.split(row["reproduce"])
        assert command[:2] == ["popc", "eval"]
        again = tmp_path / "again.json"
        rerun = CliRunner().invoke(app, [*command[1:], "--json", str(again)])
        assert rerun.exit_code == 0, rerun.output
        (_, split) = json.loads(again.read_text())["rows"]
        assert split["method"] == "split" and split["weight_fraction"] == pytest.approx(row["weight_fraction"])
        assert split["fidelity"]["kl_mean"] == pytest.approx(row["fidelity"]["kl_mean"], rel=1e-6)
        assert split["ppl"] == pytest.approx(row["ppl"], rel=1e-9)


def test_sweep_and_split_refuse_what_they_cannot_do(exports, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["eval", "--text", str(exports["text"]), "--windows", "2", "--window", "40", "--tasks", "none"]
    cases = [
        ([str(exports["dense"]), "--split", "0.25/0.5/0.25"], "need a POP export"),
        ([str(exports["pop"]), "--split", "0.25/0.5"], "R/C/K"),
        ([str(exports["pop"]), "--sweep", "--full"], "choose one"),
        ([str(exports["pop"]), "--sweep", "--quant", "int4"], "--sweep"),
    ]
    for extra, message in cases:
        assert_clean_failure(runner.invoke(app, [base[0], *extra, *base[1:]]), contains=message)
