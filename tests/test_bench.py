"""`popc bench` end to end on a tiny model: every variant runs and the report is complete.

Speed is never asserted here (benchmarks belong in benchmarks/); this checks the
command, the bytes model and the JSON/plot outputs.
"""

from __future__ import annotations

import json

from conftest import make_tiny_model_dir
from typer.testing import CliRunner

from popc.cli import app
from popc.export import ExportPlan, export
from popc.pop import PopSettings


def test_bench_reports_every_variant(tmp_path):
    source = make_tiny_model_dir(tmp_path, "llama")
    export(ExportPlan(model=str(source), out=tmp_path / "dense"))
    export(ExportPlan(model=str(source), out=tmp_path / "pop", pop=PopSettings(0.125, 0.75, 0.375)))
    result = CliRunner().invoke(
        app,
        ["bench", str(tmp_path / "pop"), "--dense", str(tmp_path / "dense"), "--prompt-lengths", "8,16",
         "--batches", "1,2", "--sparsities", "0.5", "--repeats", "2", "--decode-tokens", "4", "--decode-prompt", "8",
         "--json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    text = json.dumps(report)
    for variant in ("dense-ort", "pop-body", "pop-oplib", "hf-eager"):
        assert variant in text, variant
    assert (tmp_path / "bench.png").stat().st_size > 0
    decode = {(row["variant"], row["sparsity"], row["batch"]): row for row in report["decode"]}
    assert {batch for _, _, batch in decode} == {1, 2}
    dense, pop = decode[("dense-ort", 0.0, 1)], decode[("pop-oplib", 0.5, 1)]
    # The bytes model: a 50 % POP step reads fewer FFN bytes than dense, and predicts a speedup.
    assert pop["bytes_ffn"] < dense["bytes_ffn"] and pop["ideal_speedup"] > 1.0
    assert dense["speedup"] == 1.0 and report["bandwidth"]["gbs"] > 0
