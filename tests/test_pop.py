"""POP-online exports (ONNX function bodies) against popc.reference, for every family."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import popc
from conftest import TINY_FAMILIES, make_tiny_model_dir, padded
from popc.cli import app
from popc.defaults import settings_for_sparsity
from popc.errors import PopcError
from popc.export import ExportPlan, export
from popc.pop import PopSettings
from popc.reference import PopReference

TOLERANCE = 1e-4
HALF = PopSettings(retain=0.25, candidate=0.5, keep=0.25)
VARIANTS = {
    "pop-50": HALF,
    "pop-25": PopSettings(retain=0.375, candidate=0.5, keep=0.375),
    "griffin-50": PopSettings(retain=0.5, candidate=0.0, keep=0.0),
    "per-token-50": PopSettings(retain=0.0, candidate=1.0, keep=0.5),
    "static-50": PopSettings(retain=0.5, candidate=0.0, keep=0.0, static=True),
}
# The output-aware score (mode 2): HALF's regions, channels weighted by ||Wd_j||.
OUTPUT = PopSettings(retain=0.25, candidate=0.5, keep=0.25, score="output")


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_exports(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"pop-{request.param}")
    source = make_tiny_model_dir(root, request.param)
    export(ExportPlan(model=str(source), out=root / "dense"))
    export(ExportPlan(model=str(source), out=root / "pop", pop=HALF))
    return AutoModelForCausalLM.from_pretrained(source).eval(), root


@pytest.fixture(scope="module", params=["bodies", "oplib"])
def pop_export(request, family_exports):
    """(HF model, dense PopcModel, POP PopcModel) for one tiny family, with the ai.popc ops
    run by their ONNX function bodies (plain ONNX Runtime) or by the op library's kernels."""
    hf, root = family_exports
    model = popc.load(root / "pop", use_oplib=request.param == "oplib")
    if request.param == "oplib" and not model.uses_oplib:
        if os.environ.get("CI"):
            pytest.fail("the popc op library is missing in CI (the README's test command builds it)")
        pytest.skip("popc op library not built (popc doctor --build)")
    return hf, popc.load(root / "dense"), model


def assert_same_partition(mine: np.ndarray, theirs: np.ndarray, scores: np.ndarray, retain: int) -> None:
    """Equal regions (R, C) per sequence. Order inside a region does not change the math;
    a channel may only cross a region boundary where fp32 scores tie (docs/design.md, "fp32 and top-k")."""
    for row in range(mine.shape[0]):
        for region in (slice(0, retain), slice(retain, None)):
            ours, reference = set(mine[row, region]), set(theirs[row, region])
            if ours == reference:
                continue
            moved = sorted(ours ^ reference)
            boundary = scores[row, theirs[row, region]].min()
            assert np.allclose(scores[row, moved], boundary, rtol=1e-5), (row, moved)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("lengths", [[9], [10, 4, 7]], ids=["batch1", "batch3-left-padded"])
def test_onnx_equals_reference(pop_export, variant, lengths):
    """Logits at prefill and over 32 greedy decode steps, and the partitions themselves."""
    # The 32 greedy steps for POP itself; 8 for each baseline's special case.
    assert_equals_reference(pop_export, VARIANTS[variant], lengths, steps=32 if variant == "pop-50" else 8)


@pytest.mark.parametrize("family_exports", ["llama", "gemma3"], indirect=True)
@pytest.mark.parametrize("lengths", [[9], [10, 4, 7]], ids=["batch1", "batch3-left-padded"])
def test_output_aware_onnx_equals_reference(pop_export, lengths):
    """The output-aware score: the same partitions and logits as the reference, prefill + decode."""
    assert_equals_reference(pop_export, OUTPUT, lengths, steps=6)


def assert_equals_reference(pop_export, settings: PopSettings, lengths: list[int], steps: int) -> None:
    """Logits at prefill and over ``steps`` greedy decode steps, and the partitions themselves."""
    hf, _, model = pop_export
    reference = PopReference(hf, settings)
    try:
        ids, mask = padded(lengths, hf.config.vocab_size)
        logits, state = model.step(ids, mask, model.initial_state(len(lengths)), settings)
        expected, cache = reference.step(torch.from_numpy(ids), torch.from_numpy(mask))
        real = mask.astype(bool)
        np.testing.assert_allclose(logits[real], expected.numpy()[real], atol=TOLERANCE, rtol=0)
        partitions = state[-len(reference.states) :]
        counts = settings.counts(model.pop_channels)
        for mine, ffn in zip(partitions, reference.states, strict=True):
            assert mine.shape == (len(lengths), counts[0] + counts[1])
            assert_same_partition(mine, ffn.partition.numpy(), ffn.score.numpy(), int(counts[0]))
            # Continue from the same selection, so a legitimate fp32 tie flip is not
            # amplified by the decode steps into a spurious mismatch.
            ffn.partition = torch.from_numpy(mine)

        for _ in range(steps):
            next_ids = expected[:, -1].argmax(-1, keepdim=True)
            assert (logits[:, -1].argmax(-1) == next_ids[:, 0].numpy()).all(), "greedy tokens diverged"
            mask = np.concatenate([mask, np.ones((len(lengths), 1), np.int64)], axis=1)
            logits, state = model.step(next_ids.numpy(), mask, state, settings)
            expected, cache = reference.step(next_ids, torch.from_numpy(mask), cache)
            np.testing.assert_allclose(logits[:, -1], expected[:, -1].numpy(), atol=TOLERANCE, rtol=0)
    finally:
        reference.remove()


@pytest.mark.parametrize("family_exports", ["llama"], indirect=True)
def test_output_aware_score_changes_the_selection(pop_export):
    """Mode 2 picks other channels than mode 0: other partitions at prefill, and from one
    partition other kept candidates at decode (so the equality tests above can fail)."""
    _, _, model = pop_export
    ids, mask = padded([10, 4, 7], model.config["vocab_size"])
    _, activation_state = model.step(ids, mask, model.initial_state(3), HALF)
    _, output_state = model.step(ids, mask, model.initial_state(3), OUTPUT)
    partitions = slice(-model.num_layers, None)
    assert any(
        set(a[row]) != set(o[row]) for a, o in zip(activation_state[partitions], output_state[partitions]) for row in range(3)
    )
    next_ids, mask = np.array([[7], [8], [9]]), np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
    activation, _ = model.step(next_ids, mask, activation_state, HALF)
    output, _ = model.step(next_ids, mask, activation_state, OUTPUT)  # the same partitions
    assert np.abs(activation - output).max() > 1e-4


def test_bad_scores_are_refused():
    with pytest.raises(PopcError, match="score must be one of 'activation', 'output', got 'foo'"):
        PopSettings(score="foo")
    with pytest.raises(PopcError, match="static .* cannot be combined with score 'output'"):
        PopSettings(retain=0.5, static=True, score="output")
    modes = [PopSettings(retain=0.5, **kw).counts(8)[3] for kw in ({}, {"static": True}, {"score": "output"})]
    assert modes == [0, 1, 2]


@pytest.mark.parametrize("family_exports", ["llama"], indirect=True)
def test_an_export_from_before_output_norm_runs_and_refuses_the_output_score(pop_export, tmp_path):
    """An older export: no ``scores`` in popc.json and no output_norm input on its FFN nodes.
    Modes 0 and 1 run as before (with the op library, whose kernels take output_norm as an
    optional input); the output-aware score is a PopcError that says to re-export."""
    _, _, model = pop_export
    old = tmp_path / "old"
    shutil.copytree(model.location.directory, old)
    config = json.loads((old / "popc.json").read_text())
    del config["pop"]["score"], config["pop"]["scores"]
    (old / "popc.json").write_text(json.dumps(config))
    if model.uses_oplib:  # the function bodies of this popc need output_norm: old graphs carry their own
        graph = onnx.load(old / "model.onnx", load_external_data=False)
        for node in graph.graph.node:
            if node.domain == "ai.popc":
                assert node.input[-1].endswith("output_norm")
                del node.input[-1]
        kept = [i for i in graph.graph.initializer if not i.name.endswith("output_norm")]
        del graph.graph.initializer[:]
        graph.graph.initializer.extend(kept)
        onnx.save(graph, old / "model.onnx")
    older = popc.load(old, use_oplib=model.uses_oplib)
    assert older.uses_oplib == model.uses_oplib
    ids, mask = padded([10, 4, 7], model.config["vocab_size"])
    for settings in (HALF, VARIANTS["static-50"]):
        expected, expected_state = model.step(ids, mask, model.initial_state(3), settings)
        logits, state = older.step(ids, mask, older.initial_state(3), settings)
        np.testing.assert_array_equal(logits, expected)
        step = np.array([[7], [8], [9]]), np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
        np.testing.assert_array_equal(older.step(*step, state, settings)[0], model.step(*step, expected_state, settings)[0])
    for run in (lambda: older.step(ids, mask, older.initial_state(3), OUTPUT), lambda: older.bound(OUTPUT)):
        with pytest.raises(PopcError, match="score 'output' is not available in .* older popc.*re-export"):
            run()


def test_runtime_generate_equals_reference_generate(pop_export):
    hf, _, model = pop_export
    prompts = [model.encode(t) for t in ("the first prompt", "and a second, longer prompt", "third")]
    generated, _, _ = model.generate_ids(prompts, max_new_tokens=32)
    reference = PopReference(hf, model.pop_defaults)
    try:
        expected = reference.generate(prompts, max_new_tokens=32, pad_token_id=model.pad_token_id)
    finally:
        reference.remove()
    for mine, theirs in zip(generated, expected):
        assert mine == theirs[: len(mine)]


def test_sparsity_zero_reproduces_the_dense_export(pop_export):
    _, dense, model = pop_export
    everything = PopSettings(retain=1.0)
    ids, mask = padded([8, 5], dense.config["vocab_size"])
    dense_logits, dense_state = dense.step(ids, mask, dense.initial_state(2))
    pop_logits, pop_state = model.step(ids, mask, model.initial_state(2), everything)
    np.testing.assert_allclose(pop_logits, dense_logits, atol=TOLERANCE, rtol=0)
    for _ in range(4):
        next_ids = dense_logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(next_ids)], axis=1)
        dense_logits, dense_state = dense.step(next_ids, mask, dense_state)
        pop_logits, pop_state = model.step(next_ids, mask, pop_state, everything)
        np.testing.assert_allclose(pop_logits, dense_logits, atol=TOLERANCE, rtol=0)


def test_pruning_changes_the_output(pop_export):
    """A check that the decode path really prunes: 50 % differs from dense."""
    _, dense, model = pop_export
    ids, mask = padded([8], dense.config["vocab_size"])
    _, state = model.step(ids, mask, model.initial_state(1), HALF)
    next_ids, mask = np.array([[7]]), np.ones((1, 9), np.int64)
    pruned, _ = model.step(next_ids, mask, state, HALF)
    full, _ = model.step(next_ids, mask, state, PopSettings(retain=1.0))
    assert np.abs(pruned - full).max() > 1e-3


def test_exported_graph_uses_popc_ops_with_function_bodies(pop_export):
    _, _, model = pop_export
    graph = onnx.load(model.location.model_path, load_external_data=False)
    pop_nodes = [n for n in graph.graph.node if n.domain == "ai.popc"]
    experts = model.config.get("num_experts") or 1
    assert len(pop_nodes) == model.num_layers * experts  # one per FFN, or per routed expert
    assert len([i for i in graph.graph.input if i.name.startswith("past_partition.")]) == len(pop_nodes)
    functions = {f.name for f in graph.functions}
    assert {"GatherMatMulT", "GatherMatMul", pop_nodes[0].op_type} <= functions
    assert [i.name for i in graph.graph.input][-1] == "pop_config"
    # The rewritten FFNs' dense MatMuls are gone; routers and shared experts stay dense.
    dense_ffn = [n.name for n in graph.graph.node if n.op_type == "MatMul" and "/mlp/" in n.name]
    assert all("shared_expert" in name or "/mlp/MatMul" in name for name in dense_ffn), dense_ffn
    if model.config["family"] == "qwen2_moe":
        assert any("shared_expert/down_proj" in name for name in dense_ffn)


def test_cli_export_with_ratios_records_them(tmp_path):
    source = make_tiny_model_dir(tmp_path, "llama")
    runner = CliRunner()
    result = runner.invoke(
        app, ["export", str(source), "--out", str(tmp_path / "pop"), "--retain", "0.3", "--candidate", "0.4", "--keep", "0.2"]
    )
    assert result.exit_code == 0, result.output
    pop = json.loads((tmp_path / "pop" / "popc.json").read_text())["pop"]
    assert (pop["retain"], pop["candidate"], pop["keep"]) == (0.3, 0.4, 0.2)
    assert pop["sparsity"] == pytest.approx(0.5)
    run = runner.invoke(app, ["run", str(tmp_path / "pop"), "--prompt", "hello", "--max-new-tokens", "4", "--json"])
    assert run.exit_code == 0, run.output
    # --sparsity takes the measured default split at that cost; --score records its score.
    result = runner.invoke(app, ["export", str(source), "--out", str(tmp_path / "out"), "--sparsity", "0.5", "--score", "output"])
    assert result.exit_code == 0, result.output
    pop = json.loads((tmp_path / "out" / "popc.json").read_text())["pop"]
    expected = settings_for_sparsity(0.5, "output")
    assert (pop["retain"], pop["candidate"], pop["keep"], pop["score"]) == (
        expected.retain, expected.candidate, expected.keep, "output"
    )
    assert popc.load(tmp_path / "out").pop_defaults.score == "output"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--sparsity", "1.5"], "--sparsity"),
        (["--sparsity", "0.5", "--retain", "0.2"], "not both"),
        (["--retain", "0.2"], "go together"),
        (["--retain", "0.8", "--candidate", "0.5", "--keep", "0.1"], "retain + candidate"),
        (["--retain", "0.2", "--candidate", "0.2", "--keep", "0.3"], "keep must be"),
        (["--retain", "-0.1", "--candidate", "0.2", "--keep", "0.1"], "fraction"),
        (["--score", "output"], "give it with --sparsity"),
        (["--sparsity", "0.5", "--score", "best"], "score must be one of"),
    ],
)
def test_bad_ratios_are_rejected_before_any_work(tmp_path, arguments, message):
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *arguments])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
