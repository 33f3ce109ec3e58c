"""`popc bench` end to end on a tiny model: every variant runs and the report is complete.

Speed is never asserted here (benchmarks belong in benchmarks/); this checks the
command, the bytes model, the ratios against dense ORT and the fastest dense peer, the
JSON/plot/Markdown outputs, and that the onnxruntime-genai peer runs the same model
(same logits, same greedy tokens as popc's runtime).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import make_tiny_model_dir
from typer.testing import CliRunner

from popc import bench
from popc.cli import app
from popc.errors import PopcError
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
         "--variants", "dense-ort,pop-body,pop-oplib,hf-eager,pop-reference",
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


# ---- peers: onnxruntime-genai, and the fastest dense peer ------------------------------------
def _row(variant, ms, **key):  # noqa: ANN001, ANN202
    timing = {"median": ms, "min": ms, "max": ms, "samples": [ms]}
    return {"variant": variant, **key, ("ms" if "prompt" in key else "ms_per_step"): timing}


def test_ratios_against_the_fastest_dense_peer():
    prefill = [_row("dense-ort", 10.0, prompt=8), _row("hf-eager", 40.0, prompt=8), _row("ort-genai", 8.0, prompt=8),
               _row("dense-ort", 30.0, prompt=64), _row("hf-eager", 20.0, prompt=64), _row("ort-genai", 25.0, prompt=64)]
    decode = [_row("dense-ort", 2.0, sparsity=0.0, batch=1), _row("pop-oplib", 1.0, sparsity=0.5, batch=1),
              _row("hf-eager", 8.0, sparsity=0.0, batch=1), _row("ort-genai", 4.0, sparsity=0.0, batch=1),
              _row("dense-ort", 3.0, sparsity=0.0, batch=2), _row("hf-eager", 0.0, sparsity=0.0, batch=2)]  # fmt: skip
    peers = bench._add_ratios(prefill, decode, {}, 10.0)
    assert peers["ttft"] == {"8": {"variant": "ort-genai", "ms": 8.0}, "64": {"variant": "hf-eager", "ms": 20.0}}
    assert peers["decode"] == {"1": {"variant": "ort-genai", "ms_per_step": 4.0}}
    dense8, dense64 = prefill[0], prefill[3]
    assert dense8["best_peer"] == "ort-genai" and dense8["vs_best_peer"] == pytest.approx(10 / 8)  # ms ÷ peer ms
    assert dense64["best_peer"] == "hf-eager" and dense64["vs_best_peer"] == pytest.approx(30 / 20)
    assert prefill[2]["vs_best_peer"] == 1.0 and prefill[2]["vs_dense"] == pytest.approx(0.8)
    pop = decode[1]
    assert pop["speedup"] == 2.0 and pop["vs_best_peer"] == 4.0 and pop["best_peer"] == "ort-genai"  # speedups
    assert decode[0]["vs_best_peer"] == 2.0 and decode[2]["vs_best_peer"] == 0.5
    # A 0 ms figure (HF eager's decode is a difference of two runs) is no measurement: no peer.
    assert decode[4]["best_peer"] is None and decode[4]["vs_best_peer"] is None and decode[5]["tokens_per_s"] is None


def test_ort_genai_missing_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # `import onnxruntime_genai` now fails
    assert "ort-genai" not in bench.default_variants() and "dense-ort" in bench.default_variants()
    assert not bench.genai_available()
    with pytest.raises(PopcError, match=r'pip install "popc\[genai\]"'):
        bench.run_bench(bench.BenchPlan(directory=tmp_path, variants=["dense-ort", "ort-genai"]))
    result = CliRunner().invoke(app, ["bench", str(tmp_path), "--variants", "ort-genai"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and 'pip install "popc[genai]"' in errors[0] and "pip install onnxruntime-genai" in errors[0]


@pytest.fixture(scope="module")
def genai_tiny(tmp_path_factory):  # noqa: ANN001, ANN201
    """A tiny Llama, its dense popc export and its onnxruntime-genai build (in a private cache)."""
    pytest.importorskip("onnxruntime_genai")
    root = tmp_path_factory.mktemp("genai")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POPC_CACHE_DIR", str(root / "cache"))
        source = make_tiny_model_dir(root, "llama")
        export(ExportPlan(model=str(source), out=root / "dense"))
        built = bench.genai_model(str(source))
        yield source, root / "dense", built


def test_genai_peer_runs_the_same_model(genai_tiny):
    from popc.runtime import load

    source, dense, built = genai_tiny
    assert json.loads((built / "popc-genai.json").read_text())["hf_directory"] == str(source)
    assert bench.genai_model(str(source)) == built  # cached: no second build
    runner = bench.GenaiRunner(str(source), bench.BenchPlan(directory=dense, threads=1), log=lambda m: None)
    model = load(dense, use_oplib=False, threads=1)
    prompt = [int(t) for t in np.random.default_rng(3).integers(10, 250, 12)]
    tokens, logits = runner.greedy(prompt, 8)
    expected = model.generate_ids([prompt], max_new_tokens=8)[0][0]
    assert len(tokens) == 8 and tokens == expected
    # The logits each token was picked from, step by step, agree with popc's dense export.
    stepper = model.bound()
    out = stepper.prefill(np.asarray([prompt]), np.ones((1, len(prompt)), np.int64))
    reference = [out[0, -1]]
    for token in tokens[:-1]:
        reference.append(stepper.decode(np.asarray([[token]]))[0, -1])
    np.testing.assert_allclose(np.stack(logits), np.stack(reference), atol=1e-4, rtol=0)


def test_bench_with_peers(genai_tiny, monkeypatch, tmp_path):
    source, dense, _ = genai_tiny
    monkeypatch.setattr(bench, "read_bandwidth", lambda: {"numpy_sum_gbs": 10.0, "numpy_gemv_gbs": 10.0, "gbs": 10.0})
    messages = []
    plan = bench.BenchPlan(
        directory=dense, model=str(source), variants=["ort-genai", "dense-ort", "hf-eager", "dense-genai-runtime"],
        prompt_lengths=[8],
        batches=[1, 2], repeats=1, warmup=0, decode_tokens=2, decode_prompt=8, threads=1,
    )  # fmt: skip
    result = bench.run_bench(plan, log=messages.append)
    assert not any("building" in m for m in messages)  # the fixture's build was reused
    every = ("ort-genai", "dense-ort", "hf-eager", "dense-genai-runtime")
    assert sorted(result["settings"]["variants"]) == sorted(every)
    assert result["machine"]["onnxruntime_genai"]
    ttft = {row["variant"]: row for row in result["prefill"]}
    assert set(ttft) == set(every)
    decode = {(row["variant"], row["batch"]): row for row in result["decode"]}
    assert set(decode) == {(v, b) for v in every for b in (1, 2)}
    for row in [*ttft.values(), *decode.values()]:
        ms = row.get("ms", row.get("ms_per_step"))["median"]
        assert row["best_peer"] in ("ort-genai", "hf-eager")
        if ms > 0:  # HF eager's decode is a difference of two generate() runs: at 2 tokens it can come out 0
            assert row["vs_best_peer"] > 0 and row.get("vs_dense", row.get("speedup")) > 0
    best = result["best_peer"]["ttft"]["8"]["variant"]
    assert ttft[best]["vs_best_peer"] == 1.0
    for batch in (1, 2):
        assert decode[(result["best_peer"]["decode"][str(batch)]["variant"], batch)]["vs_best_peer"] == 1.0
    text = bench.markdown(result)
    assert "| TTFT ms, batch 1 |" in text and "| fastest dense peer |" in text and "vs best peer b2" in text
    assert "onnxruntime-genai" in text
    bench.tables(result)
    bench.write_json(result, tmp_path / "bench.json")
