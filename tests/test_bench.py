"""`popc bench` end to end on a tiny model: every variant runs and the report is complete.

Speed is never asserted here (benchmarks belong in benchmarks/); this checks the
command, the bytes model, the ratios against dense ORT and the fastest dense peer, the
JSON/plot/Markdown outputs (one BenchResult behind all of them), that every runner gets
the same thread count, and that the onnxruntime-genai peer runs the same model (same
logits, same greedy tokens as popc's runtime).
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import StageRecorder, make_tiny_model_dir
from popc.bench import BenchPlan, BenchResult, memory, report, run_bench
from popc.bench import run as bench_run
from popc.bench.exports import resolve_exports
from popc.bench.machine import default_threads
from popc.bench.peers import GenaiRunner, default_variants, genai_available, genai_model
from popc.bench.result import (
    Bandwidth,
    BenchSettings,
    BytesRead,
    DecodeRow,
    FastestPeer,
    MachineInfo,
    MemoryRow,
    Timing,
    TtftRow,
)
from popc.cli import app
from popc.errors import PopcError
from popc.export import ExportPlan, export
from popc.pop import PopSettings
from popc.quantize import QuantScheme


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, its dense popc export and a POP export."""
    root = tmp_path_factory.mktemp("bench")
    source = make_tiny_model_dir(root, "llama")
    export(ExportPlan(model=str(source), out=root / "dense"))
    export(ExportPlan(model=str(source), out=root / "pop", pop=PopSettings(0.125, 0.75, 0.375)))
    return source, root / "dense", root / "pop"


def test_bench_reports_every_variant(tiny, tmp_path):
    _, dense_dir, pop_dir = tiny
    result = CliRunner().invoke(
        app,
        ["bench", str(pop_dir), "--dense", str(dense_dir), "--prompt-lengths", "8,16",
         "--batches", "1,2", "--sparsities", "0.5", "--repeats", "2", "--decode-tokens", "4", "--decode-prompt", "8",
         "--variants", "dense-ort,pop-body,pop-oplib,hf-eager,pop-reference", "--memory-batches", "none",
         "--json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png"),
         "--markdown", str(tmp_path / "bench.md")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # Not a terminal: each stage is a plain timestamped line as it happens, not a live bar.
    assert "s] measuring read bandwidth" in result.output and "s] decode batch 2" in result.output
    report_json = json.loads((tmp_path / "bench.json").read_text())
    text = json.dumps(report_json)
    for variant in ("dense-ort", "pop-body", "pop-oplib", "hf-eager"):
        assert variant in text, variant
    assert (tmp_path / "bench.png").stat().st_size > 0
    decode = {(row["variant"], row["sparsity"], row["batch"]): row for row in report_json["decode"]}
    assert {batch for _, _, batch in decode} == {1, 2}
    dense, pop = decode[("dense-ort", 0.0, 1)], decode[("pop-oplib", 0.5, 1)]
    # The bytes model: a 50 % POP step reads fewer FFN bytes than dense, and predicts a speedup.
    assert pop["bytes_ffn"] < dense["bytes_ffn"] and pop["ideal_speedup"] > 1.0
    assert dense["speedup"] == 1.0 and report_json["bandwidth"]["gbs"] > 0
    assert report_json["memory"] == [] and "peak MiB" not in (tmp_path / "bench.md").read_text()  # none asked for
    # The JSON reads back into the same BenchResult, whose Markdown is the file written.
    loaded = report.read_json(tmp_path / "bench.json")
    assert loaded.to_json() == report_json
    assert report.markdown(loaded) == (tmp_path / "bench.md").read_text()


def test_defaults_are_quick_and_full_is_the_whole_matrix(tmp_path):
    quick, full = BenchPlan(directory=tmp_path), BenchPlan.full(tmp_path, repeats=2)
    assert (list(quick.prompt_lengths), list(quick.batches), list(quick.sparsities), quick.repeats) == (
        [16, 128, 512], [1, 4, 8], [0.5], 3
    )  # fmt: skip
    assert (list(full.prompt_lengths), list(full.batches), list(full.sparsities)) == (
        [16, 128, 512, 2048], [1, 4, 8], [0.25, 0.5, 0.75]
    )  # fmt: skip
    assert full.repeats == 2  # an explicit option still wins
    assert BenchPlan(directory=tmp_path, variants=["dense-ort"]).resolved().threads == default_threads() >= 1
    with pytest.raises(PopcError, match="--sparsities"):
        BenchPlan(directory=tmp_path, variants=["dense-ort"], sparsities=[1.0]).resolved()
    # Peak memory: at the largest decode batch unless told; only at batches that are timed.
    assert BenchPlan(directory=tmp_path, variants=["dense-ort"]).resolved().memory_batches == (8,)
    plan = BenchPlan(directory=tmp_path, variants=["dense-ort"], batches=[1, 4], memory_batches=[4, 1])
    assert plan.resolved().memory_batches == (1, 4)
    with pytest.raises(PopcError, match="--memory-batches"):
        BenchPlan(directory=tmp_path, variants=["dense-ort"], batches=[1, 4], memory_batches=[2]).resolved()


def test_every_runner_gets_the_same_thread_count(tiny):
    import torch

    source, dense_dir, pop_dir = tiny
    variants = ["dense-ort", "pop-body", "hf-eager", "pop-reference"]
    if genai_available():
        variants.append("dense-genai-runtime")  # popc's dense export, onnxruntime-genai's runtime
    plan = BenchPlan(directory=pop_dir, dense=dense_dir, model=str(source), variants=variants).resolved()
    runners, skipped = bench_run.make_runners(plan, resolve_exports(plan), named=True)
    assert not skipped and set(runners) == set(variants)
    assert plan.threads == default_threads()
    assert {runner.threads for runner in runners.values()} == {plan.threads}
    for variant in ("dense-ort", "pop-body"):
        assert runners[variant].model.session.get_session_options().intra_op_num_threads == plan.threads
    assert torch.get_num_threads() == plan.threads


# ---- peak memory: each variant alone in a fresh process ------------------------------------
def test_peak_memory_of_each_variant(tiny, monkeypatch, tmp_path):
    _, dense_dir, pop_dir = tiny
    monkeypatch.setattr(bench_run, "read_bandwidth", lambda: Bandwidth(10.0, 10.0, 10.0))
    result = CliRunner().invoke(
        app,
        ["bench", str(pop_dir), "--dense", str(dense_dir), "--variants", "dense-ort,pop-body",
         "--prompt-lengths", "8", "--batches", "1,2", "--repeats", "1", "--warmup", "0", "--decode-tokens", "2",
         "--decode-prompt", "8", "--threads", "1", "--json", str(tmp_path / "bench.json"),
         "--markdown", str(tmp_path / "bench.md")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "s] peak memory: 2 fresh processes" in result.output and "at batch 2 not measured" not in result.output
    report_json = json.loads((tmp_path / "bench.json").read_text())
    assert report_json["settings"]["memory_batches"] == [2]  # the largest decode batch, by default
    memory = {row["variant"]: row for row in report_json["memory"]}
    assert set(memory) == {"dense-ort", "pop-body"}
    text = (tmp_path / "bench.md").read_text()
    assert "| peak MiB b2 (+model) |" in text and "peak resident memory" in text
    for variant, row in memory.items():
        assert row["batch"] == 2 and row["error"] is None and row["sparsity"] == (0.5 if variant == "pop-body" else 0.0)
        # High-water marks: the bare process (Python, ORT, transformers), after loading, after the decode.
        assert 0 < row["baseline_mib"] <= row["loaded_mib"] <= row["peak_mib"]
        assert row["over_baseline_mib"] == round(row["peak_mib"] - row["baseline_mib"], 1) > 0
        assert f"{row['peak_mib']:.0f} (+{row['over_baseline_mib']:.0f})" in text
    assert report.read_json(tmp_path / "bench.json").to_json() == report_json


def test_a_child_does_not_inherit_the_parents_peak():
    held = np.ones(300 << 18, np.float32)  # 300 MiB resident here (ones: every page written)
    code = "from popc.bench.memory import peak_rss_mib; print(peak_rss_mib())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    # ru_maxrss would start at this process's peak (fork and exec keep it); VmHWM is the child's own.
    assert 0 < child < memory.peak_rss_mib() - 250 and held.sum() > 0


def test_peak_memory_that_cannot_be_measured_is_missing():
    job = memory.MemoryJob("dense-ort", "no-such-runtime", "/nowhere", batch=1, prompt=8, steps=2, threads=1)
    failed = memory.measure(job)  # the child fails: a row with no figures and why, not an exception
    assert failed.peak_mib is failed.baseline_mib is failed.over_baseline_mib is None
    assert "exit 1" in failed.error and "no-such-runtime" in failed.error
    slow = memory.measure(dataclasses.replace(job, kind="ort"), timeout=0.01)
    assert slow.peak_mib is None and "timed out" in slow.error


# ---- peers: onnxruntime-genai, and the fastest dense peer ------------------------------------
def _timing(ms: float) -> Timing:
    return Timing(ms, ms, ms, [ms])


def test_ratios_against_the_fastest_dense_peer():
    prefill = [TtftRow(v, n, _timing(ms)) for v, n, ms in (
        ("dense-ort", 8, 10.0), ("hf-eager", 8, 40.0), ("ort-genai", 8, 8.0),
        ("dense-ort", 64, 30.0), ("hf-eager", 64, 20.0), ("ort-genai", 64, 25.0))]
    decode = [DecodeRow(v, s, b, _timing(ms)) for v, s, b, ms in (
        ("dense-ort", 0.0, 1, 2.0), ("pop-oplib", 0.5, 1, 1.0), ("hf-eager", 0.0, 1, 8.0), ("ort-genai", 0.0, 1, 4.0),
        ("dense-ort", 0.0, 2, 3.0), ("hf-eager", 0.0, 2, 0.0))]  # fmt: skip
    ttft_peers, decode_peers, quant_ttft, quant_decode = bench_run.add_ratios(prefill, decode, {}, 10.0)
    assert quant_ttft == quant_decode == {}  # no quantized peer ran
    assert ttft_peers == {8: FastestPeer("ort-genai", 8.0), 64: FastestPeer("hf-eager", 20.0)}
    assert decode_peers == {1: FastestPeer("ort-genai", 4.0)}
    dense8, dense64 = prefill[0], prefill[3]
    assert dense8.best_peer == "ort-genai" and dense8.vs_best_peer == pytest.approx(10 / 8)  # ms ÷ peer ms
    assert dense64.best_peer == "hf-eager" and dense64.vs_best_peer == pytest.approx(30 / 20)
    assert prefill[2].vs_best_peer == 1.0 and prefill[2].vs_dense == pytest.approx(0.8)
    pop = decode[1]
    assert pop.speedup == 2.0 and pop.vs_best_peer == 4.0 and pop.best_peer == "ort-genai"  # speedups
    assert decode[0].vs_best_peer == 2.0 and decode[2].vs_best_peer == 0.5
    # A 0 ms figure (HF eager's decode is a difference of two runs) is no measurement: no peer.
    assert decode[4].best_peer is None and decode[4].vs_best_peer is None and decode[5].tokens_per_s is None


def _result_with_peers() -> BenchResult:
    prefill = [TtftRow("dense-ort", 8, Timing(10.0, 9.0, 12.0, [9.0, 10.0, 12.0])),
               TtftRow("ort-genai", 8, Timing(8.0, 7.5, 9.0, [7.5, 8.0, 9.0]))]  # fmt: skip
    decode = [DecodeRow("dense-ort", 0.0, 1, Timing(2.0, 1.9, 2.2, [1.9, 2.0, 2.2])),
              DecodeRow("ort-genai", 0.0, 1, Timing(2.5, 2.4, 2.6, [2.4, 2.5, 2.6])),
              DecodeRow("pop-oplib", 0.5, 1, Timing(1.2, 1.1, 1.3, [1.1, 1.2, 1.3])),
              DecodeRow("pop-oplib", 0.5, 4, Timing(3.0, 2.9, 3.1, [2.9, 3.0, 3.1])),
              DecodeRow("dense-ort", 0.0, 4, Timing(4.0, 3.9, 4.1, [3.9, 4.0, 4.1]))]  # fmt: skip
    weights = {"dense": BytesRead(ffn=6e6, total=10e6), "pop@0.5": BytesRead(ffn=3e6, total=7e6)}
    ttft_peers, decode_peers, _, _ = bench_run.add_ratios(prefill, decode, weights, 10.0)
    machine = MachineInfo(
        cpu="Test CPU", cores=2, threads=2, threads_note="every variant", onnxruntime="1.0", torch="2.0",
        python="3.12", device="cpu", load_average_start=[0.5, 0.5, 0.5], load_average_end=[0.7, 0.6, 0.5],
        physical_cores=2, onnxruntime_genai="0.18", seconds=12.5,
    )  # fmt: skip
    settings = BenchSettings(
        prompt_lengths=[8], skipped_prompt_lengths=[], batches=[1, 4], sparsities=[0.5],
        pop_settings={"0.5": {"retain": 0.125, "candidate": 0.75, "keep": 0.375}}, repeats=3, warmup=1,
        decode_tokens=4, decode_prompt=8, variants=["dense-ort", "ort-genai", "pop-oplib"], memory_batches=[4],
    )  # fmt: skip
    memory_rows = [MemoryRow("dense-ort", 4, 0.0, 100.0, 150.0, 161.2),
                   MemoryRow("pop-oplib", 4, 0.5, error="exit 1: the op library is not available")]  # fmt: skip
    return BenchResult(
        model="tiny", exports={"dense": "/d", "pop": "/p"}, machine=machine, settings=settings,
        bandwidth=Bandwidth(10.0, 12.0, 12.0), bytes=weights, prefill=prefill, decode=decode,
        fastest_ttft_peer=ttft_peers, fastest_decode_peer=decode_peers, memory=memory_rows,
    )  # fmt: skip


def test_json_round_trips():
    result = _result_with_peers()
    assert BenchResult.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_markdown_and_tables_come_from_one_result():
    from rich.console import Console

    result = _result_with_peers()
    text = report.markdown(result)
    console = Console(file=io.StringIO(), width=2000, color_system=None)
    for table in report.tables(result):
        console.print(table)
    rendered = console.file.getvalue()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 5 + 4  # decode: header, 3 rows, peer row; TTFT: header, 2 rows, peer row
    for line in rows:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        for cell in cells:
            assert cell in rendered, cell  # every Markdown cell is in the console tables, verbatim
    speedup = result.decode_row("pop-oplib", 0.5, 1).speedup  # paired: the median of per-round ratios
    assert speedup == pytest.approx(2.0 / 1.2, rel=0.02) and f"{speedup:.2f}×" in text
    # Peak memory at batch 4: dense ORT's peak and what it added to the bare process; POP's is missing.
    decode_rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in rows[:5]}
    column = decode_rows["variant"].index("peak MiB b4 (+model)")
    assert decode_rows["dense ORT"][column] == "161 (+61)" and decode_rows["POP (op library)"][column] == "—"
    assert decode_rows["onnxruntime-genai"][column] == "—"  # not measured at all


def test_ort_genai_missing_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # `import onnxruntime_genai` now fails
    assert "ort-genai" not in default_variants() and "dense-ort" in default_variants()
    assert not genai_available()
    with pytest.raises(PopcError, match=r'pip install "popc\[genai\]"'):
        run_bench(BenchPlan(directory=tmp_path, variants=["dense-ort", "ort-genai"]))
    result = CliRunner().invoke(app, ["bench", str(tmp_path), "--variants", "ort-genai"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and 'pip install "popc[genai]"' in errors[0] and "pip install onnxruntime-genai" in errors[0]


@pytest.fixture(scope="module")
def genai_tiny(tiny, tmp_path_factory):
    """The tiny Llama, its dense popc export and its onnxruntime-genai build (in a private cache)."""
    pytest.importorskip("onnxruntime_genai")
    root = tmp_path_factory.mktemp("genai")
    source, dense, _ = tiny
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POPC_CACHE_DIR", str(root / "cache"))
        built = genai_model(str(source))
        yield source, dense, built


def test_genai_peer_runs_the_same_model(genai_tiny):
    from popc.runtime import load

    source, dense, built = genai_tiny
    assert json.loads((built / "popc-genai.json").read_text())["hf_directory"] == str(source)
    assert genai_model(str(source)) == built  # cached: no second build
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    runner = GenaiRunner(built, threads=1)
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
    monkeypatch.setattr(bench_run, "read_bandwidth", lambda: Bandwidth(10.0, 10.0, 10.0))
    stages = StageRecorder()
    plan = BenchPlan(
        directory=dense, model=str(source), variants=["ort-genai", "dense-ort", "hf-eager", "dense-genai-runtime"],
        prompt_lengths=[8],
        batches=[1, 2], repeats=1, warmup=0, decode_tokens=2, decode_prompt=8, threads=1,
        memory_batches=(),  # peak memory has its own test
    )  # fmt: skip
    result = run_bench(plan, progress=stages)
    assert not any("building" in m for m in stages.stages)  # the fixture's build was reused
    every = ("ort-genai", "dense-ort", "hf-eager", "dense-genai-runtime")
    assert sorted(result.settings.variants) == sorted(every)
    assert result.machine.onnxruntime_genai and result.machine.threads == 1
    ttft = {row.variant: row for row in result.prefill}
    assert set(ttft) == set(every)
    decode = {(row.variant, row.batch): row for row in result.decode}
    assert set(decode) == {(v, b) for v in every for b in (1, 2)}
    for row in [*ttft.values(), *decode.values()]:
        ms = (row.ms if isinstance(row, TtftRow) else row.ms_per_step).median
        assert row.best_peer in ("ort-genai", "hf-eager")
        if ms > 0:  # HF eager's decode is a difference of two generate() runs: at 2 tokens it can come out 0
            ratio = row.vs_dense if isinstance(row, TtftRow) else row.speedup
            assert row.vs_best_peer > 0 and ratio > 0
    best = result.fastest_ttft_peer[8].variant
    assert ttft[best].vs_best_peer == 1.0
    for batch in (1, 2):
        assert decode[(result.fastest_decode_peer[batch].variant, batch)].vs_best_peer == 1.0
    text = report.markdown(result)
    assert "| TTFT ms, batch 1 |" in text and "| fastest dense peer |" in text and "vs best peer b2" in text
    assert "onnxruntime-genai" in text
    report.tables(result)
    report.write_json(result, tmp_path / "bench.json")
    assert report.read_json(tmp_path / "bench.json") == result


# ---- quantized exports, the int4 peers, the bytes model on quantized weights ----------------
def test_bytes_model_of_a_hand_built_quantized_graph(tmp_path):
    """MatMulNBits' packed weights and scales are read whole; an untied GatherBlockQuantized
    embedding (through a Reshape) is a lookup table, its scales too; POP rows carry their scales."""
    import onnx
    from onnx import TensorProto, helper

    from popc.bench.bytes_model import bytes_model, weight_inventory

    vocab, hidden, block, ffn = 100, 64, 32, 128

    def init(name, shape, dtype=TensorProto.UINT8):
        array = np.zeros(shape, helper.tensor_dtype_to_np_dtype(dtype))
        return onnx.numpy_helper.from_array(array, name)

    inits = [
        init("embed.q4", [vocab, hidden // block, block // 2]), init("embed.scales", [vocab, hidden // block], 1),
        init("head.q4", [vocab, hidden // block, block // 2]), init("head.scales", [vocab * hidden // block], 1),
        onnx.numpy_helper.from_array(np.array([vocab, -1], np.int64), "shape"),
        init("pop.0.gate_rows", [ffn, hidden // 2]), init("pop.0.gate_scales", [ffn, hidden // block], 1),
        init("pop.0.up_rows", [ffn, hidden // 2]), init("pop.0.up_scales", [ffn, hidden // block], 1),
        init("pop.0.down_rows", [ffn, hidden // 2]), init("pop.0.down_scales", [ffn, hidden // block], 1),
        init("pop.0.static_score", [ffn], 1),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Reshape", ["embed.q4", "shape"], ["embed.table"]),
        helper.make_node("GatherBlockQuantized", ["embed.table", "ids", "embed.scales"], ["x"], domain="com.microsoft",
                         bits=4, block_size=block),
        helper.make_node("PopSwiGLUQ", ["x", "pop.0.gate_rows", "pop.0.gate_scales", "pop.0.up_rows", "pop.0.up_scales",
                                        "pop.0.down_rows", "pop.0.down_scales", "pop.0.static_score"], ["h"],
                         domain="ai.popc"),
        helper.make_node("MatMulNBits", ["h", "head.q4", "head.scales"], ["logits"], domain="com.microsoft",
                         K=hidden, N=vocab, bits=4, block_size=block),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    inventory = weight_inventory(path)
    packed_row, scales_row = hidden // 2, hidden // block * 4
    assert inventory.tables == vocab * (packed_row + scales_row)
    assert inventory.table_row_bytes == packed_row + scales_row  # one token's packed row and its scales
    assert inventory.other == vocab * (packed_row + scales_row) + 16  # the LM head, and the Reshape's shape
    rows = ffn * (hidden // 2 + hidden // block * 4)
    assert inventory.ffn_rows == {"gate_rows": rows, "up_rows": rows, "down_rows": rows}
    weights = bytes_model(None, path, ffn, [0.5], lambda s: PopSettings(0.125, 0.75, 0.375), quant="int4")
    base = inventory.other + inventory.table_row_bytes
    assert weights["dense-int4"].total == base + 3 * rows
    # R ∪ C of the gate rows (0.875) and R ∪ kept of up and down (0.5), scales with their rows.
    assert weights["pop-int4@0.5"].ffn == pytest.approx(3 * rows * (0.875 + 2 * 0.5) / 3)


@pytest.fixture(scope="module")
def quant_cache(tiny, tmp_path_factory):
    """A private cache holding the tiny model's int4 POP export, made as the bench makes it."""
    root = tmp_path_factory.mktemp("quant-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POPC_CACHE_DIR", str(root))
        yield root


def test_bench_quantized_variants(tiny, quant_cache, monkeypatch, tmp_path):
    from popc.bench.bytes_model import weight_inventory

    source, dense_dir, pop_dir = tiny
    monkeypatch.setattr(bench_run, "read_bandwidth", lambda: Bandwidth(10.0, 10.0, 10.0))
    stages = StageRecorder()
    plan = BenchPlan(directory=pop_dir, dense=dense_dir, variants=["dense-ort", "pop-body", "llama.cpp-q4_0"],
                     quant=["int4", "int8"], prompt_lengths=[8], batches=[1], repeats=1, warmup=0, decode_tokens=2,
                     decode_prompt=8, threads=1, memory_batches=())  # fmt: skip
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-bench anywhere: the row is left out with a note
    result = run_bench(plan, progress=stages)
    expected = {"dense-ort", "pop-body", "dense-ort-int4", "pop-body-int4", "dense-ort-int8", "pop-body-int8"}
    assert set(result.settings.variants) == expected
    assert "no llama-bench found" in result.settings.skipped_variants["llama.cpp-q4_0"]
    assert set(result.settings.quant) == {"int4", "int8"} and result.settings.quant["int4"]["bits"] == 4
    # One export per kind and scheme, each keyed by its scheme; fp32 stays the user's.
    assert result.exports["dense"] == str(dense_dir) and len({result.exports[k] for k in result.exports}) == 6
    assert result.exports["pop-int4"] != result.exports["pop-int8"]
    decode = {(r.variant, r.sparsity): r for r in result.decode}
    dense, dense4, dense8 = decode[("dense-ort", 0.0)], decode[("dense-ort-int4", 0.0)], decode[("dense-ort-int8", 0.0)]
    pop4 = decode[("pop-body-int4", 0.5)]
    assert dense4.bytes_total < dense8.bytes_total < dense.bytes_total  # int4 < int8 < fp32 bytes per step
    assert pop4.bytes_ffn < dense4.bytes_ffn and pop4.ideal_speedup > dense4.ideal_speedup > 1.0
    assert dense4.speedup > 0 and pop4.best_peer is None  # no quantized peer ran
    inventory = weight_inventory(Path(result.exports["pop-int4"]) / "model.onnx")
    assert set(inventory.ffn_rows) == {"gate_rows", "up_rows", "down_rows"}  # scales travel with their rows
    text = report.markdown(result)
    assert "| dense ORT int4 | dense |" in text and "| POP (function bodies) int8 | 50% |" in text
    assert BenchResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    # A second run reuses the cached quantized exports.
    again = StageRecorder()
    resolve_exports(plan.resolved(), again)
    assert not any("exporting" in s for s in again.stages) and any("exporting the int4" in s for s in stages.stages)


def test_a_quantized_directory_brings_its_scheme(tiny, quant_cache):
    from popc.bench.exports import export_scheme

    _, dense_dir, pop_dir = tiny
    own = quant_cache / "own-int4"
    export(ExportPlan(model=str(tiny[0]), out=own, quant=QuantScheme.parse("int4", block_size=64),
                      pop=PopSettings(0.125, 0.75, 0.375)))  # fmt: skip
    plan = BenchPlan(directory=own, dense=dense_dir, pop=pop_dir, variants=["dense-ort", "pop-body"]).resolved()
    assert plan.quant == ("int4",) and "pop-body-int4" in plan.variants and "dense-ort-int4" in plan.variants
    exports = resolve_exports(plan)
    assert exports.pop == pop_dir and exports.quantized["int4"][1] == own  # the directory is the int4 POP export
    twin = exports.quantized["int4"][0]
    assert export_scheme(json.loads((twin / "popc.json").read_text())).block_size == 64  # same scheme as DIR
    assert exports.path_of("dense-ort-int4") == twin and exports.path_of("pop-body") == pop_dir


def test_quant_variants_by_default_and_by_name(tmp_path):
    from popc.bench.plan import is_quantized, split_variant, with_quant

    assert split_variant("pop-oplib-int4") == ("pop-oplib", "int4") and split_variant("ort-genai-int4")[1] is None
    assert is_quantized("ort-genai-int4") and is_quantized("dense-ort-int8") and not is_quantized("dense-ort")
    assert with_quant(["dense-ort", "hf-eager"], ["int4"], peers=True) == [
        "dense-ort", "hf-eager", "dense-ort-int4", "ort-genai-int4", "llama.cpp-q4_0"
    ]  # fmt: skip
    assert with_quant(["pop-oplib"], ["int8"], peers=True) == ["pop-oplib", "pop-oplib-int8"]  # int4 peers only
    quick = BenchPlan(directory=tmp_path, quant=["int4"]).resolved().variants
    assert "pop-oplib-int4" in quick and "llama.cpp-q4_0" in quick and "dense-ort" in quick  # fp32 stays
    assert ("ort-genai-int4" in quick) == genai_available()
    assert "dense-ort-int4" not in BenchPlan(directory=tmp_path).resolved().variants  # only with --quant
    assert BenchPlan(directory=tmp_path, variants=["pop-oplib-int8"]).resolved().quant == ("int8",)
    with pytest.raises(PopcError, match="--quant"):
        BenchPlan(directory=tmp_path, quant=["int3"]).resolved()


def test_genai_int4_peer(tiny, quant_cache, monkeypatch):
    pytest.importorskip("onnxruntime_genai")
    from popc.bench.bytes_model import model_bytes

    source, dense_dir, pop_dir = tiny
    built = genai_model(str(source), precision="int4")
    marker = json.loads((built / "popc-genai.json").read_text())
    assert marker["precision"] == "int4" and built.name.startswith("genai-int4-")
    # The builder's own CPU defaults: 4 bits, blocks of 32, accuracy level 4.
    assert marker["matmul_nbits"] == {"bits": [4], "block_size": [32], "accuracy_level": [4]}
    assert genai_model(str(source), precision="int4") == built and genai_model(str(source)) != built
    assert 0 < model_bytes(built / "model.onnx").total
    monkeypatch.setattr(bench_run, "read_bandwidth", lambda: Bandwidth(10.0, 10.0, 10.0))
    plan = BenchPlan(directory=pop_dir, dense=dense_dir, variants=["dense-ort", "ort-genai-int4", "dense-ort-int4"],
                     prompt_lengths=[8], batches=[1], repeats=1, warmup=0, decode_tokens=2, decode_prompt=8,
                     threads=1, memory_batches=())  # fmt: skip
    result = run_bench(plan)
    row = result.decode_row("dense-ort-int4", 0.0, 1)
    assert result.fastest_decode_quant_peer[1].variant == "ort-genai-int4" and row.best_peer == "ort-genai-int4"
    assert result.decode_row("dense-ort", 0.0, 1).best_peer is None  # fp32 rows: fp32 peers only
    assert result.decode_row("ort-genai-int4", 0.0, 1).bytes_total == model_bytes(built / "model.onnx").total
    assert "| fastest quantized peer |" in report.markdown(result)


# ---- llama.cpp: its JSON, and the peer where llama-bench is (or is not) found ------------------
LLAMA_BENCH_JSON = """build: 4d8b6c0f (5890) with cc (GCC) for x86_64-linux-gnu
[
  {
    "build_commit": "4d8b6c0f", "build_number": 5890, "cpu_info": "AMD EPYC", "gpu_info": "", "backends": "CPU",
    "model_filename": "smollm2.Q4_0.gguf", "model_type": "llama ?B Q4_0", "model_size": 85779584,
    "model_n_params": 134515008, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2, "type_k": "f16",
    "n_prompt": 512, "n_gen": 0, "n_depth": 0, "test_time": "2026-12-01T16:00:00Z",
    "avg_ns": 512000000, "stddev_ns": 2000000, "avg_ts": 1000.0, "stddev_ts": 4.0,
    "samples_ns": [510000000, 512000000, 514000000], "samples_ts": [1003.9, 1000.0, 996.1]
  },
  {
    "build_commit": "4d8b6c0f", "build_number": 5890, "model_type": "llama ?B Q4_0", "n_threads": 2,
    "n_prompt": 0, "n_gen": 64, "n_depth": 64, "avg_ns": 320000000, "stddev_ns": 6400000,
    "avg_ts": 200.0, "stddev_ts": 4.0, "samples_ns": [313600000, 320000000, 326400000]
  }
]
"""


def test_llama_bench_json_parses_into_rows():
    from popc.bench import llama_cpp

    records = llama_cpp.parse_bench_json(LLAMA_BENCH_JSON)  # the build line before the array is skipped
    assert [(r.n_prompt, r.n_gen, r.n_depth, r.threads) for r in records] == [(512, 0, 0, 2), (0, 64, 64, 2)]
    ttft, decode = llama_cpp.rows_of(records)
    assert [(r.variant, r.prompt) for r in ttft] == [("llama.cpp-q4_0", 512)]
    assert ttft[0].ms.median == pytest.approx(512.0) and ttft[0].ms.low == pytest.approx(510.0)
    assert len(decode) == 1 and decode[0].batch == 1 and decode[0].sparsity == 0.0
    assert decode[0].ms_per_step.median == pytest.approx(5.0) and decode[0].ms_per_step.high == pytest.approx(5.1)
    assert decode[0].ms_per_step.samples == []  # not round-robin with popc's variants: never paired
    command = llama_cpp.bench_command(Path("llama-bench"), Path("m.gguf"), 2, [16, 512], 64, 3, depth=64)
    assert command[1:] == ["-m", "m.gguf", "-t", "2", "-p", "16,512", "-n", "64", "-r", "3", "-o", "json", "-d", "64"]
    with pytest.raises(PopcError, match="no JSON"):
        llama_cpp.parse_bench_json("error: failed to load model")
    with pytest.raises(PopcError, match="no test results"):
        llama_cpp.parse_bench_json("[]")


def test_llama_cpp_peer_not_found_and_found(tiny, monkeypatch, tmp_path):
    from popc.bench import llama_cpp

    monkeypatch.setenv("POPC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + ":/usr/bin:/bin")
    assert llama_cpp.find_tool("llama-bench") is None
    with pytest.raises(llama_cpp.NotFound, match="benchmarks/llama_cpp.py build"):
        llama_cpp.LlamaCppPeer.prepare("smollm2-135m")
    # A llama-bench on PATH (here a stand-in printing the recorded JSON) is found and its rows join the bench.
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "llama-bench"
    (tmp_path / "out.json").write_text(LLAMA_BENCH_JSON)
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = --help ] && echo '-d, --n-depth' && exit 0\necho \"$@\" > {tmp_path}/args\n"
                    f"cat {tmp_path}/out.json\n")  # fmt: skip
    fake.chmod(0o755)
    assert llama_cpp.find_tool("llama-bench") == fake
    monkeypatch.setattr(llama_cpp, "q4_0_gguf", lambda spec, progress=None: tmp_path / "m.Q4_0.gguf")
    _, dense_dir, pop_dir = tiny
    monkeypatch.setattr(bench_run, "read_bandwidth", lambda: Bandwidth(10.0, 10.0, 10.0))
    plan = BenchPlan(directory=pop_dir, dense=dense_dir, variants=["dense-ort", "llama.cpp-q4_0"], prompt_lengths=[8],
                     batches=[1, 2], repeats=1, warmup=0, decode_tokens=2, decode_prompt=8, threads=1,
                     memory_batches=())  # fmt: skip
    result = run_bench(plan)
    assert "-t 1 -p 8 -n 64 -r 1 -o json -d 8" in (tmp_path / "args").read_text()  # the bench's threads, prompts, context
    assert "llama.cpp-q4_0" in result.settings.variants and not result.settings.skipped_variants
    row = result.decode_row("llama.cpp-q4_0", 0.0, 1)
    assert row.ms_per_step.median == pytest.approx(5.0) and result.decode_row("llama.cpp-q4_0", 0.0, 2) is None
    assert result.fastest_decode_quant_peer[1].variant == "llama.cpp-q4_0"
    # The stand-in answers with the recorded 512-token test: no dense ORT row at 512 to compare with.
    assert result.ttft("llama.cpp-q4_0", 512).ms.median == pytest.approx(512.0)
    text = report.markdown(result)
    assert "| llama.cpp Q4_0 | dense |" in text and "llama-bench's own" in text


def test_cached_pop_exports_without_the_default_score_are_made_again(tmp_path: Path) -> None:
    from popc.bench.exports import _scores_available

    (tmp_path / "popc.json").write_text(json.dumps({"pop": {"retain": 0.1}}))  # a popc from before output_norm
    assert _scores_available(tmp_path, PopSettings(0.1, 0.5, 0.2))
    assert not _scores_available(tmp_path, PopSettings(0.1, 0.5, 0.2, score="output"))
    (tmp_path / "popc.json").write_text(json.dumps({"pop": {"scores": ["activation", "output"]}}))
    assert _scores_available(tmp_path, PopSettings(0.1, 0.5, 0.2, score="output"))
    (tmp_path / "popc.json").write_text("{not json")
    assert not _scores_available(tmp_path, PopSettings(0.1, 0.5, 0.2)) and _scores_available(tmp_path, None)


# ---- --device cuda: fp16 by default, popc's ORT variants, the GPU named ----------------------
def test_cuda_plans_default_to_fp16_and_popc_variants(tiny):
    _, _, pop_dir = tiny
    from popc.bench.peers import genai_available_on

    plan = BenchPlan(directory=pop_dir, device="cuda").resolved()
    peer = ["ort-genai"] if genai_available_on("cuda") else []  # genai's CUDA build, where installed
    assert plan.dtype == "float16" and list(plan.variants) == ["dense-ort", "pop-body", "pop-oplib", *peer]
    assert BenchPlan(directory=pop_dir, device="cuda", dtype="bf16").resolved().dtype == "bfloat16"
    assert BenchPlan(directory=pop_dir).resolved().dtype == "float32"  # the CPU: the directory's own
    with pytest.raises(PopcError, match="hf-eager run on the CPU only"):
        BenchPlan(directory=pop_dir, device="cuda", variants=["dense-ort", "hf-eager"]).resolved()
    if not peer:  # named, a genai peer that cannot run on CUDA here is an error saying what to install
        with pytest.raises(PopcError, match="onnxruntime-genai"):
            BenchPlan(directory=pop_dir, device="cuda", variants=["dense-ort", "ort-genai"]).resolved()
    with pytest.raises(PopcError, match="dense-genai-runtime run on the CPU only"):
        BenchPlan(directory=pop_dir, device="cuda", variants=["dense-genai-runtime"]).resolved()
    with pytest.raises(PopcError, match="quantized exports"):
        BenchPlan(directory=pop_dir, device="cuda", quant=["int4"]).resolved()
    with pytest.raises(PopcError, match="--dtype"):
        BenchPlan(directory=pop_dir, device="cuda", dtype="fp8").resolved()


def test_fp16_bench_exports_fp16_twins_and_records_the_dtype(tiny, quant_cache, monkeypatch):
    """An fp32 directory stands for no variant of an fp16 bench: both exports are made in fp16
    (cached under their own key), run, and the result says fp16 (here on the CPU: the same
    runner and stepper a CUDA bench uses)."""
    _, dense_dir, pop_dir = tiny
    monkeypatch.setattr(bench_run, "read_bandwidth", lambda: Bandwidth(10.0, 10.0, 10.0))
    plan = BenchPlan(directory=pop_dir, variants=["dense-ort", "pop-body"], dtype="fp16", prompt_lengths=[8],
                     batches=[1, 3], repeats=1, warmup=0, decode_tokens=3, decode_prompt=8, threads=1,
                     memory_batches=())  # fmt: skip
    stages = StageRecorder()
    result = run_bench(plan, progress=stages)
    assert result.settings.dtype == "float16"
    for kind in ("dense", "pop"):
        exported = Path(result.exports[kind])
        assert exported not in (dense_dir, pop_dir) and exported.name == f"{kind}-float16"
        assert json.loads((exported / "popc.json").read_text())["dtype"] == "float16"
    assert any("exporting the float16 pop model" in s for s in stages.stages)
    assert {(r.variant, r.batch) for r in result.decode} == {(v, b) for v in ("dense-ort", "pop-body") for b in (1, 3)}
    assert all(r.ms_per_step.median > 0 for r in result.decode)
    again = StageRecorder()
    resolve_exports(plan.resolved(), again)
    assert not any("exporting" in s for s in again.stages)  # cached


def test_gpu_name_from_nvidia_smi(monkeypatch, tmp_path):
    from popc.bench.machine import gpu_name

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 143771 MiB, 580.65'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_name() == "NVIDIA H200 (143771 MiB, driver 580.65)"
    smi.write_text("#!/bin/sh\nexit 9\n")  # a driver that fails: unknown, never an error
    assert gpu_name() is None or "H200" not in gpu_name()


def test_a_cuda_result_names_the_gpu_and_the_dtype():
    result = _result_with_peers()
    result.machine.device, result.machine.gpu = "cuda", "NVIDIA H200 (143771 MiB, driver 580.65)"
    result.settings.dtype = "float16"
    line = report.machine_line(result)
    assert line.startswith("Machine: GPU NVIDIA H200 (143771 MiB, driver 580.65) (float16 exports); host Test CPU")
    assert BenchResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    for row in result.decode:
        row.roofline_ms = row.roofline_fraction = None
    bench_run.add_ratios(result.prefill, result.decode, result.bytes, None)  # a GPU bench: no host roofline
    assert result.decode_row("pop-oplib", 0.5, 1).roofline_ms is None
    assert result.decode_row("pop-oplib", 0.5, 1).bytes_total == 7e6
