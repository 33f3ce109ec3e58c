"""popc eval: perplexity and multiple-choice scoring against direct step() computations,
the parallel decode-mode pass against a token-by-token ONNX decode loop, the data
plumbing (no network), and the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import StageRecorder, make_tiny_model_dir
from popc import datasets
from popc.cli import app
from popc.defaults import default_score, ffn_cost
from popc.errors import NotOnIndex, PopcError
from popc.eval import (
    DEFAULT_METHODS,
    FULL_MATRIX,
    METHODS,
    EvalPlan,
    choice_loglikelihoods,
    continuation_logprobs,
    encode_item,
    make_windows,
    method_settings,
    plan_rows,
    run_eval,
    token_logprobs,
    weight_fraction,
)
from popc.pop import PopSettings
from popc.runtime import load

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "All that glitters is not gold; the early bird catches the worm, and still waters run deep. "
) * 6


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from popc.export import ExportPlan, export

    root = tmp_path_factory.mktemp("eval")
    source = make_tiny_model_dir(root, "llama")
    out = {"dense": root / "dense"}
    export(ExportPlan(model=str(source), out=out["dense"]))
    if "pop" in ExportPlan.__dataclass_fields__:
        out["pop"] = root / "pop"
        export(ExportPlan(model=str(source), out=out["pop"], pop=PopSettings(retain=0.25, candidate=0.5, keep=0.25)))
    return out


@pytest.fixture
def popc_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data cache (only datasets' dir moves: the rest of popc's cache stays put)."""
    cache = tmp_path / "popc-cache"
    monkeypatch.setattr(datasets, "data_dir", lambda: cache / "data")
    return cache


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def _windows(model, count=3, width=48):
    ids = [int(i) for i in model.tokenizer(TEXT, add_special_tokens=False)["input_ids"]]
    return make_windows(ids, [], width, count)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --------------------------------------------------------------------------- rows and costs


def test_rows_and_weight_fractions() -> None:
    assert [r.method for r in plan_rows([0.5], has_pop=False)] == ["dense"]
    rows = plan_rows([0.25, 0.5], has_pop=True)
    assert [(r.method, r.sparsity) for r in rows][:3] == [("dense", 0.0), ("pop", 0.25), ("pop", 0.5)]
    for row in rows:
        if row.method in ("pop", "pop-output"):  # the default split spends --sparsity's FFN bytes its own way
            assert weight_fraction(row.settings) == pytest.approx(ffn_cost(row.sparsity), abs=1e-5)
            expected = "output" if row.method == "pop-output" else default_score(row.sparsity)
            assert row.settings.score == expected
        else:
            assert row.settings.sparsity == pytest.approx(row.sparsity)
    assert weight_fraction(PopSettings(retain=1.0)) == 1.0
    assert weight_fraction(method_settings("griffin", 0.5)) == pytest.approx(0.5)
    assert weight_fraction(method_settings("static", 0.75)) == pytest.approx(0.25)
    # Per-token dynamic reads every gate row: (1 + 2 * 0.5) / 3.
    assert weight_fraction(method_settings("dynamic", 0.5)) == pytest.approx(2 / 3)
    assert weight_fraction(PopSettings(retain=0.25, candidate=0.5, keep=0.25)) == pytest.approx((0.75 + 1.0) / 3)
    assert weight_fraction(PopSettings(retain=0.25, candidate=0.5, keep=0.25), gated=False) == pytest.approx(0.625)
    assert method_settings("static", 0.5).static


def test_token_logprobs_matches_log_softmax() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 300)).astype(np.float32) * 10
    targets = rng.integers(0, 300, size=(2, 5))
    expected = np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs(logits, targets), expected, atol=1e-10)


# --------------------------------------------------------------------------- perplexity


def test_perplexity_matches_direct_computation(exports, text_file) -> None:
    plan = EvalPlan(exports["dense"], text=text_file, tasks=[], windows=3, window=48, prompt=20, methods=["dense"])
    result = run_eval(plan)
    (row,) = result.rows
    assert math.isfinite(row.ppl) and row.ppl > 1
    assert row.scored_tokens == 3 * 28
    # Dense: one prefill over the whole window gives the same logits as prefill + decode.
    model = load(exports["dense"])
    windows = _windows(model)
    logits, _ = model.step(windows, np.ones_like(windows), model.initial_state(3))
    logp = np.take_along_axis(_log_softmax(logits[:, 19:-1]), windows[:, 20:, None], -1)[..., 0]
    assert row.ppl == pytest.approx(math.exp(-logp.mean()), rel=1e-5)
    assert result.info["windows"] == 3 and result.info["prompt"] == 20


def _decode_loop(model, windows: np.ndarray, prompt: int, pop: PopSettings | None) -> np.ndarray:
    """Prefill [0, prompt-1), then one token per graph call, as generation does."""
    rows, width = windows.shape
    _, state = model.step(windows[:, : prompt - 1], np.ones((rows, prompt - 1), np.int64), model.initial_state(rows), pop)
    out = []
    for t in range(prompt - 1, width - 1):
        logits, state = model.step(windows[:, t : t + 1], np.ones((rows, t + 1), np.int64), state, pop)
        out.append(token_logprobs(logits[:, 0], windows[:, t + 1]))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("kind", ["dense", "pop"])
def test_parallel_continuation_equals_token_by_token_decode(exports, kind) -> None:
    if kind not in exports:
        pytest.skip("this tree's export has no POP support yet")
    model = load(exports[kind])
    pop = None if kind == "dense" else PopSettings(retain=0.25, candidate=0.5, keep=0.25)  # 50 % sparsity
    if kind == "pop":
        assert model.has_pop_config
    windows = _windows(model)
    parallel = continuation_logprobs(model, windows, 20, pop, batch=2)
    loop = _decode_loop(model, windows, 20, pop)
    np.testing.assert_allclose(parallel, loop, atol=1e-4)
    if kind == "pop":  # and pruning acts: the dense row differs
        dense = continuation_logprobs(model, windows, 20, PopSettings(retain=1.0))
        assert np.abs(dense - parallel).max() > 1e-3


def test_pop_rows_run_from_one_export(exports, text_file) -> None:
    if "pop" not in exports:
        pytest.skip("this tree's export has no POP support yet")
    plan = EvalPlan(exports["pop"], text=text_file, tasks=[], windows=2, window=40, sparsities=[0.5])
    recorder = StageRecorder()
    result = run_eval(plan, recorder)
    assert [(r.method, r.sparsity) for r in result.rows] == [
        ("dense", 0.0), ("pop", 0.5), ("griffin", 0.5), ("dynamic", 0.5), ("static", 0.5)
    ]
    assert all(math.isfinite(r.ppl) for r in result.rows)
    # One pass scores every row's windows (dense computed once per batch), no per-row stages.
    assert "perplexity and KL to dense: 2 windows x 5 rows" in recorder.stages
    assert not [stage for stage in recorder.stages if stage.startswith("questions")]
    dense_model_ppl = run_eval(EvalPlan(exports["dense"], text=text_file, tasks=[], windows=2, window=40)).rows[0].ppl
    assert result.rows[0].ppl == pytest.approx(dense_model_ppl, rel=1e-4)


# --------------------------------------------------------------------------- multiple choice


TASK = {
    "task_prefix": "Answer the question.",
    "append_choices_to_input": False,
    "examples": [
        {"input": "What colour is the sky?", "target_scores": {"blue": 1, "green": 0, "a very long red answer": 0}},
        {"input": "Two plus two?", "target_scores": {"four": 0, "4": 1}},
        {"input": "Longer question with more words in it, to pad the batch?", "target_scores": {"yes": 1, "no": 0}},
        {"no": "target_scores"},
    ],
}


def test_parse_task_prompt_format() -> None:
    items = datasets.parse_task(TASK, limit=None)
    assert len(items) == 3
    assert items[0].prompt == "Answer the question.\nQ: What colour is the sky?\nA: "
    assert items[1].answer == 1
    appended = datasets.parse_task({**TASK, "append_choices_to_input": True}, limit=2)
    assert appended[0].prompt.endswith("sky?\n  choice: blue\n  choice: green\n  choice: a very long red answer\nA: ")
    assert len(datasets.parse_task({"examples": TASK["examples"] * 10}, limit=4)) == 4
    with pytest.raises(PopcError):
        datasets.parse_task({"examples": [{"input": "x", "target": "y"}]})


def _direct_loglikelihood(model, context: list[int], answer: list[int]) -> float:
    ids = np.array([context + answer], np.int64)
    logits, _ = model.step(ids, np.ones_like(ids), model.initial_state(1))
    logp = _log_softmax(logits[0, len(context) - 1 : -1])
    return float(logp[np.arange(len(answer)), answer].sum())


def test_multiple_choice_scores_match_direct_computation(exports) -> None:
    model = load(exports["dense"])
    items = [encode_item(model.tokenizer, it, model.max_positions) for it in datasets.parse_task(TASK)]
    assert items[0].answers[0] == [int(i) for i in model.tokenizer(" blue", add_special_tokens=False)["input_ids"]]
    scores = choice_loglikelihoods(model, items, None, batch=3)  # different lengths: padding both ways
    for item, got in zip(items, scores):
        expected = [_direct_loglikelihood(model, item.context, answer) for answer in item.answers]
        np.testing.assert_allclose(got, expected, atol=1e-4)
    # A crafted item whose right answer is, by construction, the likeliest one.
    crafted = items[0]
    expected = [_direct_loglikelihood(model, crafted.context, a) for a in crafted.answers]
    crafted.answer = int(np.argmax(expected))
    (got,) = choice_loglikelihoods(model, [crafted], None)
    assert int(np.argmax(got)) == crafted.answer


def test_eval_reads_cached_tasks(exports, popc_cache: Path) -> None:
    (popc_cache / "data" / "bigbench").mkdir(parents=True)
    (popc_cache / "data" / "bigbench" / "crafted.json").write_text(json.dumps(TASK))
    result = run_eval(EvalPlan(exports["dense"], text="", tasks=["crafted"], limit=2))
    assert result.info["tasks"] == {"crafted": 2}
    assert 0.0 <= result.rows[0].accuracy["crafted"] <= 1.0
    assert result.rows[0].ppl is None


# --------------------------------------------------------------------------- data (no network)


def test_default_text_comes_from_cache(popc_cache: Path, monkeypatch) -> None:
    cached = popc_cache / "data" / datasets.LEE_NAME
    cached.parent.mkdir(parents=True)
    cached.write_text("cached text")
    monkeypatch.setattr(datasets, "_pip_download", lambda *a, **k: pytest.fail("must not download"))
    assert datasets.default_text_path() == cached


def test_download_failures_are_clear(popc_cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(datasets, "_pip_download", lambda *a, **k: 1)
    with pytest.raises(PopcError, match="--text FILE"):
        datasets.default_text_path()
    with pytest.raises(PopcError, match="bigbench"):
        datasets.fetch_bigbench(["hyperbaton"])
    with pytest.raises(PopcError, match="invalid"):
        datasets.fetch_bigbench(["../etc"])
    # Nothing half-written is left in the cache.
    assert not [p for p in (popc_cache / "data").rglob("*") if p.is_file()]


def test_lee_extraction_from_a_wheel(popc_cache: Path, monkeypatch) -> None:
    import zipfile

    def fake_pip(args, dest, what, env=None):
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / "gensim-4.4.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(datasets.LEE_MEMBER, "news text")
            wheel.writestr("gensim/__init__.py", "raise SystemExit")
        return 0

    monkeypatch.setattr(datasets, "_pip_download", fake_pip)
    path = datasets.default_text_path()
    assert path.read_text() == "news text"
    assert sorted(p.name for p in path.parent.iterdir()) == [datasets.LEE_NAME]


def test_bigbench_extraction_from_an_unpacked_sdist(popc_cache: Path, monkeypatch) -> None:
    def fake_pip(args, dest, what, env=None):
        # What recent pip leaves with --no-clean after refusing bigbench's metadata.
        root = Path(env["TMPDIR"]) / "pip-download-x" / "bigbench_1" / datasets.BIGBENCH_TASK_DIR
        for name in ("hyperbaton", "emoji_movie", "other"):
            (root / name).mkdir(parents=True)
            (root / name / "task.json").write_text(json.dumps({"name": name, **TASK}))
        return 1

    monkeypatch.setattr(datasets, "_pip_download", fake_pip)
    paths = datasets.fetch_bigbench(["hyperbaton"])
    assert json.loads(paths["hyperbaton"].read_text())["name"] == "hyperbaton"
    assert sorted(p.stem for p in (popc_cache / "data" / "bigbench").iterdir()) == ["emoji_movie", "hyperbaton"]
    assert len(datasets.load_task("emoji_movie", limit=2)) == 2
    with pytest.raises(PopcError, match="no JSON task named absent"):
        datasets.fetch_bigbench(["absent"])


# --------------------------------------------------------------------------- CLI


def test_cli_eval_json(exports, text_file, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        ["eval", str(exports["dense"]), "--text", str(text_file), "--tasks", "none", "--windows", "2",
         "--window", "40", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["rows"][0]["method"] == "dense" and math.isfinite(data["rows"][0]["ppl"])
    assert data["windows"] == 2 and data["window"] == 40
    assert "dense" in result.output


def test_quick_defaults_and_full_matrix() -> None:
    quick = EvalPlan("x")
    assert list(quick.methods) == list(DEFAULT_METHODS) == list(METHODS[:5]) and list(quick.sparsities) == [0.5]
    assert set(FULL_MATRIX["methods"]) == set(METHODS)  # --full includes the output-aware rows
    full = EvalPlan.full("x", windows=3)
    assert list(full.sparsities) == [0.25, 0.5, 0.75] and full.limit == 50 and full.windows == 3
    assert list(full.tasks) == list(datasets.DEFAULT_TASKS) and FULL_MATRIX["windows"] == 24


def test_cli_eval_prints_stage_lines_when_not_a_terminal(exports, text_file) -> None:
    result = CliRunner().invoke(
        app, ["eval", str(exports["dense"]), "--text", str(text_file), "--tasks", "none", "--windows", "2",
              "--window", "40"],
    )
    assert result.exit_code == 0, result.output
    stages = [line for line in result.stderr.splitlines() if re.match(r"\[\s*\d+ s\] ", line)]
    assert any("loading" in line for line in stages)
    assert any(line.endswith("perplexity and KL to dense: 2 windows x 1 rows") for line in stages)


def test_analyze_reports_stages(tmp_path: Path, text_file) -> None:
    from popc.analyze import AnalyzePlan, analyze

    source = make_tiny_model_dir(tmp_path, "llama")
    recorder = StageRecorder()
    report = analyze(AnalyzePlan(model=str(source), text=text_file, windows=2, window=32), recorder)
    layers = report["num_layers"]
    assert recorder.stages[0].startswith("loading") and "dense" in recorder.stages
    # One stage per loss measured: dense, two per swept N, two per layer.
    assert len([s for s in recorder.stages if not s.startswith("loading")]) >= 1 + 2 * (layers - 1) + 2 * layers


def test_cli_eval_bad_input(exports, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(exports["dense"]), "--text", str(tmp_path / "missing.txt"), "--tasks", "none"])
    assert result.exit_code == 1 and "cannot read --text" in result.output
    result = runner.invoke(app, ["eval", str(exports["dense"]), "--sparsities", "half"])
    assert result.exit_code == 1 and "--sparsities" in result.output


# --------------------------------------------------------------------------- downloads


@pytest.mark.slow
def test_real_downloads(popc_cache: Path) -> None:
    text = datasets.default_text_path().read_text()
    assert len(text) > 300_000 and "bushfire" in text
    try:
        items = datasets.load_task("emoji_movie", limit=5)
    except NotOnIndex as error:  # the index lacks the sdist (seen 2026-12-07: only bigbench 0.0.1)
        pytest.skip(f"BIG-bench items not downloadable here: {error}")
    assert len(items) == 5 and all(len(i.choices) == 5 for i in items)


# --------------------------------------------------------------------------- quantized rows and peers


@pytest.fixture(scope="module")
def genai_fp32(exports, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """onnxruntime-genai's fp32 build of the tiny Llama (a private cache)."""
    pytest.importorskip("onnxruntime_genai")
    from popc.bench.peers import genai_model

    source = Path(load(exports["dense"]).config["source"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POPC_CACHE_DIR", str(tmp_path_factory.mktemp("genai-cache")))
        return genai_model(str(source))


def test_onnx_decoder_scores_like_popc(exports, genai_fp32) -> None:
    """A genai build through scoring.OnnxDecoder gives popc's dense scores: same windows, same
    questions (its row-by-row calls and the state it forks included)."""
    from popc.scoring import OnnxDecoder

    model = load(exports["dense"])
    decoder = OnnxDecoder(genai_fp32 / "model.onnx", model.tokenizer, model.max_positions, model.pad_token_id, threads=1)
    windows = _windows(model)
    expected = continuation_logprobs(model, windows, 16, None, batch=3)
    got = continuation_logprobs(decoder, windows, 16, None, batch=3)  # a 3-row decode call: split per row
    np.testing.assert_allclose(got, expected, atol=1e-4)
    items = [encode_item(model.tokenizer, it, model.max_positions) for it in datasets.parse_task(TASK)]
    for a, b in zip(choice_loglikelihoods(decoder, items, None, batch=1), choice_loglikelihoods(model, items, None)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_quantized_rows_and_the_genai_int4_peer(exports, text_file, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime_genai")
    monkeypatch.setenv("POPC_CACHE_DIR", str(tmp_path / "cache"))
    stages = StageRecorder()
    plan = EvalPlan(exports["pop"], text=text_file, tasks=[], windows=2, window=48, methods=["dense", "pop", "griffin"],
                    quant=["int4", "int8"], peers=["ort-genai-int4"])  # fmt: skip
    result = run_eval(plan, stages)
    rows = [(r.method, r.weights) for r in result.rows]
    assert rows == [("dense", "fp32"), ("pop", "fp32"), ("griffin", "fp32"), ("dense", "int4"), ("pop", "int4"),
                    ("dense", "int8"), ("pop", "int8"), ("dense", "ort-genai-int4")]  # fmt: skip
    assert any("exporting the int4 pop model" in s for s in stages.stages)
    assert {r.scored_tokens for r in result.rows} == {result.rows[0].scored_tokens}  # the same windows
    fp32 = result.rows[0].ppl
    for row in result.rows[3:]:
        assert math.isfinite(row.ppl) and abs(row.ppl / fp32 - 1) < 0.1, (row.title, row.ppl, fp32)
    assert result.info["quant"]["int4"]["block_size"] == 32 and result.info["quant"]["fp32"] is None
    assert result.to_json()["rows"][-1]["title"] == "onnxruntime-genai int4 (dense)"
    # The cached exports and build are reused, and the CLI takes the same options.
    out = tmp_path / "eval.json"
    cli = CliRunner().invoke(app, ["eval", str(exports["pop"]), "--text", str(text_file), "--windows", "2", "--window",
                                   "48", "--tasks", "none", "--methods", "dense", "--quant", "int4", "--peers",
                                   "ort-genai-int4", "--json", str(out)])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert "exporting" not in cli.output and "building" not in cli.output
    assert [r["weights"] for r in json.loads(out.read_text())["rows"]] == ["fp32", "int4", "ort-genai-int4"]
    assert "dense int4" in cli.output and "onnxruntime-genai int4" in cli.output
    with pytest.raises(PopcError, match="--quant"):
        run_eval(EvalPlan(exports["pop"], text="", tasks=[], quant=["int3"]))
