"""POP-online exports (ONNX function bodies) against popc.reference, for every family."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import popc
from conftest import TINY_FAMILIES, make_tiny_model_dir, padded
from popc.cli import app
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
    hf, _, model = pop_export
    settings = VARIANTS[variant]
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

        # The 32 greedy steps for POP itself; 8 for each baseline's special case.
        for _ in range(32 if variant == "pop-50" else 8):
            next_ids = expected[:, -1].argmax(-1, keepdim=True)
            assert (logits[:, -1].argmax(-1) == next_ids[:, 0].numpy()).all(), "greedy tokens diverged"
            mask = np.concatenate([mask, np.ones((len(lengths), 1), np.int64)], axis=1)
            logits, state = model.step(next_ids.numpy(), mask, state, settings)
            expected, cache = reference.step(next_ids, torch.from_numpy(mask), cache)
            np.testing.assert_allclose(logits[:, -1], expected[:, -1].numpy(), atol=TOLERANCE, rtol=0)
    finally:
        reference.remove()


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


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--sparsity", "1.5"], "--sparsity"),
        (["--sparsity", "0.5", "--retain", "0.2"], "not both"),
        (["--retain", "0.2"], "go together"),
        (["--retain", "0.8", "--candidate", "0.5", "--keep", "0.1"], "retain + candidate"),
        (["--retain", "0.2", "--candidate", "0.2", "--keep", "0.3"], "keep must be"),
        (["--retain", "-0.1", "--candidate", "0.2", "--keep", "0.1"], "fraction"),
    ],
)
def test_bad_ratios_are_rejected_before_any_work(tmp_path, arguments, message):
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *arguments])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
