"""Quantized exports (--quant int4 / int8) against the PyTorch reference of the same math.

The reference is the Hugging Face model with its weights quantized and dequantized as the
export stores them (``popc.reference.fake_quantize_model``), run in float: with MatMulNBits'
``accuracy_level`` 0 (float activations) the ONNX logits equal it to float rounding; level 4
(int8 activations, the CPU default) stays close to it.
"""

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
from conftest import TINY_FAMILIES, assert_clean_failure, make_tiny_model_dir, padded, snapshot
from popc.cli import app
from popc.export import ExportPlan, export
from popc.pop import PopSettings
from popc.quantize import QuantScheme, dequantize_rows, quantize_rows
from popc.reference import PopReference, fake_quantize_model

TOLERANCE = 2e-4
HALF = PopSettings(retain=0.25, candidate=0.5, keep=0.25)
OUTPUT = PopSettings(retain=0.25, candidate=0.5, keep=0.25, score="output")  # output-aware (mode 2)
# Every family in int4; int8 on two (the same rules, other bits).
CASES = [(family, 4) for family in TINY_FAMILIES] + [("llama", 8), ("gemma3", 8)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-int{b}" for f, b in CASES])
def quantized_exports(request, tmp_path_factory):
    family, bits = request.param
    scheme = QuantScheme(bits, 32, accuracy_level=0)
    root = tmp_path_factory.mktemp(f"quant-{family}-{bits}")
    source = make_tiny_model_dir(root, family)
    export(ExportPlan(model=str(source), out=root / "dense", quant=scheme))
    export(ExportPlan(model=str(source), out=root / "pop", pop=HALF, quant=scheme))
    return source, scheme, root


def reference_model(source, scheme, pop_layout):
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return fake_quantize_model(model, scheme, pop_layout=pop_layout)


@pytest.mark.parametrize("lengths", [[11], [12, 5, 9]], ids=["batch1", "batch3-left-padded"])
def test_dense_logits_equal_the_quantized_reference(quantized_exports, lengths):
    source, scheme, root = quantized_exports
    hf = reference_model(source, scheme, pop_layout=False)
    model = popc.load(root / "dense")
    ids, mask = padded(lengths, hf.config.vocab_size)
    logits, cache = model.step(ids, mask, model.initial_state(len(lengths)))
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], atol=TOLERANCE, rtol=0)
    rng = np.random.default_rng(1)
    for _ in range(3):
        next_ids = rng.integers(6, hf.config.vocab_size, (len(lengths), 1))
        ids = np.concatenate([ids, next_ids], axis=1)
        mask = np.concatenate([mask, np.ones_like(next_ids)], axis=1)
        logits, cache = model.step(next_ids, mask, cache)
        with torch.no_grad():
            full = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        np.testing.assert_allclose(logits[:, -1], full[:, -1].numpy(), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("use_oplib", [False, True], ids=["bodies", "oplib"])
@pytest.mark.parametrize("lengths", [[9], [10, 4, 7]], ids=["batch1", "batch3-left-padded"])
def test_pop_logits_equal_the_quantized_reference(quantized_exports, lengths, use_oplib):
    assert_equals_quantized_reference(quantized_exports, HALF, lengths, use_oplib)


@pytest.mark.parametrize("quantized_exports", [("llama", 4), ("gemma3", 4)], ids=["llama-int4", "gemma3-int4"],
                         indirect=True)  # fmt: skip
@pytest.mark.parametrize("use_oplib", [False, True], ids=["bodies", "oplib"])
@pytest.mark.parametrize("lengths", [[9], [10, 4, 7]], ids=["batch1", "batch3-left-padded"])
def test_output_aware_pop_equals_the_quantized_reference(quantized_exports, lengths, use_oplib):
    """The output-aware score on quantized rows: ``output_norm`` holds the norms of the
    dequantized down rows (the reference's weights), and the logits and partitions follow."""
    source, scheme, root = quantized_exports
    graph = onnx.load(str(root / "pop" / "model.onnx"))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    norms = [name for name in weights if name.endswith(".output_norm")]
    assert norms and all(weights[n].dtype == np.float32 for n in norms)
    for name in norms:
        base = name.removesuffix("output_norm")
        packed, scales = weights[base + "down_rows"], weights[base + "down_scales"]
        rows = dequantize_rows(packed, scales, scheme, packed.shape[1] * 8 // scheme.bits)
        np.testing.assert_allclose(weights[name], np.linalg.norm(rows, axis=1), rtol=1e-6)
    assert_equals_quantized_reference(quantized_exports, OUTPUT, lengths, use_oplib)


def assert_equals_quantized_reference(quantized_exports, settings: PopSettings, lengths, use_oplib) -> None:
    source, scheme, root = quantized_exports
    model = popc.load(root / "pop", use_oplib=use_oplib)
    if use_oplib and not model.uses_oplib:
        if os.environ.get("CI"):
            pytest.fail("the popc op library is missing in CI (the README's test command builds it)")
        pytest.skip("popc op library not built (popc doctor --build)")
    hf = reference_model(source, scheme, pop_layout=True)
    reference = PopReference(hf, settings)
    try:
        ids, mask = padded(lengths, hf.config.vocab_size)
        logits, state = model.step(ids, mask, model.initial_state(len(lengths)), settings)
        expected, cache = reference.step(torch.from_numpy(ids), torch.from_numpy(mask))
        real = mask.astype(bool)
        np.testing.assert_allclose(logits[real], expected.numpy()[real], atol=TOLERANCE, rtol=0)
        for mine, ffn in zip(state[-len(reference.states) :], reference.states, strict=True):
            for row in range(len(lengths)):  # the same regions (a swap only at an fp32 near-tie)
                retain = int(reference.counts[0])
                for region in (slice(0, retain), slice(retain, None)):
                    moved = sorted(set(mine[row, region]) ^ set(ffn.partition[row, region].tolist()))
                    scores = ffn.score[row].numpy()
                    boundary = scores[ffn.partition[row, region].numpy()].min()
                    assert np.allclose(scores[moved], boundary, rtol=1e-5), (row, moved)
            ffn.partition = torch.from_numpy(mine)  # continue from one selection (fp32 near-ties)
        for _ in range(8):
            next_ids = expected[:, -1].argmax(-1, keepdim=True)
            mask = np.concatenate([mask, np.ones((len(lengths), 1), np.int64)], axis=1)
            logits, state = model.step(next_ids.numpy(), mask, state, settings)
            expected, cache = reference.step(next_ids, torch.from_numpy(mask), cache)
            np.testing.assert_allclose(logits[:, -1], expected[:, -1].numpy(), atol=TOLERANCE, rtol=0)
    finally:
        reference.remove()


def test_quantized_graph_uses_ort_quantized_ops_and_no_float_weights(quantized_exports):
    source, scheme, root = quantized_exports
    for kind in ("dense", "pop"):
        directory = root / kind
        graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
        ops = {(n.domain, n.op_type) for n in graph.node}
        assert ("com.microsoft", "MatMulNBits") in ops
        if kind == "pop":
            assert {op for domain, op in ops if domain == "ai.popc"} <= {"PopSwiGLUQ", "PopGeGLUQ"}
        big_float = [
            i.name
            for i in graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 64 * 64 and "embed" not in i.name
        ]
        assert big_float == [], big_float  # every large float matrix was quantized (untied tables aside)
        config = json.loads((directory / "popc.json").read_text())
        assert config["quant"]["bits"] == scheme.bits and config["quant"]["block_size"] == 32


def test_accuracy_level_4_stays_close_to_the_reference(tmp_path):
    """int8 activations (MatMulNBits' CPU default): close, not equal."""
    source = make_tiny_model_dir(tmp_path, "llama")
    scheme = QuantScheme(4, 32, accuracy_level=4)
    export(ExportPlan(model=str(source), out=tmp_path / "q", quant=scheme))
    model = popc.load(tmp_path / "q")
    hf = reference_model(source, scheme, pop_layout=False)
    ids, mask = padded([12], hf.config.vocab_size)
    logits, _ = model.step(ids, mask, model.initial_state(1))
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    error = np.abs(logits - expected).max()
    assert 0 < error < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_is_idempotent_and_round_trips(bits):
    """Q4_0 / Q8_0 blocks quantize back to themselves (a GGUF in those formats maps losslessly)."""
    scheme = QuantScheme(bits, 32)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 96)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    packed, scales = quantize_rows(w, scheme)
    assert packed.shape == (8, 96 * bits // 8) and scales.shape == (8, 3)
    restored = dequantize_rows(packed, scales, scheme, 96)
    step = np.repeat(np.abs(scales), 32, axis=1)
    # Half a step, or one where int4 clamps (-m / d = +8 has no code: the range is -8..7).
    assert (np.abs(restored - w) <= step * (1.0 if bits == 4 else 0.5) + 1e-6).all()
    again, again_scales = quantize_rows(restored, scheme)
    assert (again == packed).all() and (again_scales == scales).all()
    assert (restored[0, :32] == 0).all()


def test_cli_quant_export_shows_in_info(tmp_path):
    source = make_tiny_model_dir(tmp_path, "qwen2")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(source), "--out", str(tmp_path / "q"), "--quant", "int8", "--sparsity", "0.5"])
    assert result.exit_code == 0, result.output
    info = runner.invoke(app, ["info", str(tmp_path / "q")])
    assert info.exit_code == 0 and "int8 blocks of 32" in info.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--quant", "int3"], "unknown --quant 'int3'"),
        (["--quant", "int4", "--block-size", "48"], "--block-size must be a power of two"),
        (["--quant", "int4", "--block-size", "128"], "hidden size 64 is not a multiple of --block-size 128"),
        (["--quant", "int4", "--accuracy-level", "7"], "--accuracy-level must be 0..4"),
    ],
)
def test_bad_quant_options_fail_cleanly_and_write_nothing(tmp_path, arguments, message):
    source = make_tiny_model_dir(tmp_path, "llama")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["export", str(source), "--out", str(tmp_path / "q"), *arguments])
    assert_clean_failure(result, contains=message)
    assert snapshot(tmp_path) == before
