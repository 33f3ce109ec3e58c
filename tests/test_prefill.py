"""POP-prefill exports (--prefill-skip) against popc.reference.SkipReference, and popc analyze."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import popc
from conftest import make_tiny_model_dir, padded
from popc import families
from popc.cli import app
from popc.export import ExportPlan, export
from popc.pop import PopSettings
from popc.reference import PopReference, SkipReference

TOLERANCE = 1e-4
FAMILIES = tuple(spec.name for spec in families.FAMILIES if not spec.moe)  # POP-prefill: dense families
HALF = PopSettings(retain=0.25, candidate=0.5, keep=0.25)


@pytest.fixture(scope="module", params=FAMILIES)
def skip_export(request, tmp_path_factory):
    """(HF model, PopcModel, N): the deepest N = layers // 2 skipped at prefill."""
    root = tmp_path_factory.mktemp(f"prefill-{request.param}")
    source = make_tiny_model_dir(root, request.param)
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    skip = hf.config.num_hidden_layers // 2
    export(ExportPlan(model=str(source), out=root / "skip", prefill_skip=skip))
    return hf, popc.load(root / "skip"), skip


def follow(model, reference, ids, mask, steps, pop=None, state=None, cache=None):
    """Prefill, then ``steps`` greedy decode steps and one 3-token decode call; compare all."""
    batch = ids.shape[0]
    logits, state = model.step(ids, mask, model.initial_state(batch))
    expected, cache = reference.step(torch.from_numpy(ids), torch.from_numpy(mask))
    assert logits.shape == (batch, 1, expected.shape[-1])  # a prefill returns the last token's logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=TOLERANCE, rtol=0)
    for _ in range(steps):
        next_ids = expected[:, -1].argmax(-1, keepdim=True)
        assert (logits[:, -1].argmax(-1) == next_ids[:, 0].numpy()).all(), "greedy tokens diverged"
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        logits, state = model.step(next_ids.numpy(), mask, state)
        expected, cache = reference.step(next_ids, torch.from_numpy(mask), cache)
        np.testing.assert_allclose(logits, expected.numpy(), atol=TOLERANCE, rtol=0)
    chunk = np.random.default_rng(1).integers(6, 200, (batch, 3))
    mask = np.concatenate([mask, np.ones((batch, 3), np.int64)], axis=1)
    logits, state = model.step(chunk, mask, state)
    expected, cache = reference.step(torch.from_numpy(chunk), torch.from_numpy(mask), cache)
    assert logits.shape[1] == 3  # decode mode with several new tokens: every token's logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=TOLERANCE, rtol=0)
    assert state[0].shape[2] == mask.shape[1]


@pytest.mark.parametrize("lengths", [[9], [10, 1, 7]], ids=["batch1", "batch3-left-padded"])
def test_onnx_equals_reference(skip_export, lengths):
    hf, model, skip = skip_export
    ids, mask = padded(lengths, hf.config.vocab_size)
    follow(model, SkipReference.skip_deepest(hf, skip), ids, mask, steps=4)


def test_reference_skips_and_is_dense_without_skips(skip_export):
    """N=0 is the dense model; skipping >= 2 layers changes the deepest layer's cached K/V."""
    hf, _, skip = skip_export
    ids, mask = padded([10, 6], hf.config.vocab_size)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        dense = hf(input_ids=ids, attention_mask=mask).logits[:, -1:]
    logits, full_cache = SkipReference(hf).step(ids, mask)
    np.testing.assert_allclose(logits, dense, atol=TOLERANCE, rtol=0)
    _, cache = SkipReference.skip_deepest(hf, max(skip, 2)).step(ids, mask)
    deepest = hf.model.layers[-1].self_attn.layer_idx
    assert (cache.keys[deepest] - full_cache.keys[deepest]).abs().max() > 1e-4


def test_generate_equals_reference_generate(skip_export):
    hf, model, skip = skip_export
    if not hf.config.model_type.startswith(("llama", "gemma3")):
        pytest.skip("runtime generation is family-independent; two families suffice")
    prompts = [model.encode(t) for t in ("the first prompt", "and a second, longer prompt", "third")]
    generated, _, _ = model.generate_ids(prompts, max_new_tokens=8)
    expected = SkipReference.skip_deepest(hf, skip).generate(prompts, 8, pad_token_id=model.pad_token_id)
    for mine, theirs in zip(generated, expected):
        assert mine == theirs[: len(mine)]
    assert model.config["prefill_skip"]["layers"] == skip


@pytest.mark.parametrize("family, use_oplib", [("llama", True), ("gemma3", False)], ids=["llama-oplib", "gemma3-bodies"])
def test_both_pops_in_one_export(tmp_path, family, use_oplib):
    """--sparsity with --prefill-skip: partitions of skipped layers from the last prompt token."""
    source = make_tiny_model_dir(tmp_path, family)
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    skip = hf.config.num_hidden_layers // 2
    export(ExportPlan(model=str(source), out=tmp_path / "both", pop=HALF, prefill_skip=skip))
    model = popc.load(tmp_path / "both", use_oplib=use_oplib)
    if use_oplib and not model.uses_oplib:
        pytest.skip("popc op library not built (popc doctor --build)")
    pop = PopReference(hf, HALF)
    try:
        reference = SkipReference.skip_deepest(hf, skip, pop=pop)
        for lengths in ([10, 4, 7],):
            ids, mask = padded(lengths, hf.config.vocab_size)
            logits, state = model.step(ids, mask, model.initial_state(len(lengths)))
            expected, cache = reference.step(torch.from_numpy(ids), torch.from_numpy(mask))
            np.testing.assert_allclose(logits, expected.numpy(), atol=TOLERANCE, rtol=0)
            partitions = state[-len(pop.states) :]
            for mine, ffn in zip(partitions, pop.states):
                ffn.partition = torch.from_numpy(mine)  # continue from the same selection (fp32 ties)
            for _ in range(4):
                next_ids = expected[:, -1].argmax(-1, keepdim=True)
                assert (logits[:, -1].argmax(-1) == next_ids[:, 0].numpy()).all()
                mask = np.concatenate([mask, np.ones((len(lengths), 1), np.int64)], axis=1)
                logits, state = model.step(next_ids.numpy(), mask, state)
                expected, cache = reference.step(next_ids, torch.from_numpy(mask), cache)
                np.testing.assert_allclose(logits, expected.numpy(), atol=TOLERANCE, rtol=0)
    finally:
        pop.remove()


def test_cli_export_records_prefill_skip_and_analyze(tmp_path):
    source = make_tiny_model_dir(tmp_path, "llama")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(source), "--out", str(tmp_path / "s"), "--prefill-skip", "1"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "s" / "popc.json").read_text())
    assert config["prefill_skip"]["layers"] == 1 and config["prefill_skip"]["cutoff"] == 1
    run = runner.invoke(app, ["run", str(tmp_path / "s"), "--prompt", "hello there", "--max-new-tokens", "4", "--json"])
    assert run.exit_code == 0, run.output

    bad = runner.invoke(app, ["export", str(source), "--out", str(tmp_path / "b"), "--prefill-skip", "2"])
    assert bad.exit_code != 0 and "--prefill-skip" in bad.output

    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat and then it ran away"] * 60))
    out = runner.invoke(
        app,
        ["analyze", str(source), "--text", str(text), "--windows", "2", "--window", "32",
         "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")],
    )
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "a.json").read_text())
    assert [row["skip"] for row in report["sweep"]] == [1]
    assert len(report["per_layer"]) == 2 and 0 <= report["recommended_skip"] <= 1
    # Skipping the last layer at prefill leaves the cache exact: its K/V come from its own input.
    assert report["sweep"][0]["prefill_only"] == pytest.approx(report["dense_nll"], abs=1e-6)
    assert (tmp_path / "a.png").stat().st_size > 0


def test_drop_layers_baseline_equals_reference(tmp_path):
    """--drop-layers N (ShortGPT-style baseline): the deepest N layers removed for every token."""
    source = make_tiny_model_dir(tmp_path, "gemma3")
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    export(ExportPlan(model=str(source), out=tmp_path / "drop", drop_layers=2))
    model = popc.load(tmp_path / "drop")
    layers = hf.config.num_hidden_layers
    reference = SkipReference(hf, always_skip=range(layers - 2, layers))
    ids, mask = padded([9, 5], hf.config.vocab_size)
    logits, state = model.step(ids, mask, model.initial_state(2))
    expected, cache = reference.step(torch.from_numpy(ids), torch.from_numpy(mask))
    np.testing.assert_allclose(logits[:, -1:], expected.numpy(), atol=TOLERANCE, rtol=0)
    for _ in range(4):
        next_ids = expected[:, -1].argmax(-1, keepdim=True)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        logits, state = model.step(next_ids.numpy(), mask, state)
        expected, cache = reference.step(next_ids, torch.from_numpy(mask), cache)
        np.testing.assert_allclose(logits, expected.numpy(), atol=TOLERANCE, rtol=0)
    assert json.loads((tmp_path / "drop" / "popc.json").read_text())["drop_layers"] == 2
