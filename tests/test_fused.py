"""The fused ONNX Runtime graph: which fused operators it holds, and that every way of
running it (in-place KV buffers, last-token logits, row-split multi-token steps, POP on
top) computes what Hugging Face transformers computes."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

import popc
from conftest import make_tiny_model_dir, padded
from popc.defaults import settings_for_sparsity
from popc.export import ExportPlan, export
from popc.pop import PopSettings

TOLERANCE = 1e-4


def op_counts(directory) -> collections.Counter:
    graph = onnx.load(directory / "model.onnx", load_external_data=False).graph
    return collections.Counter((node.domain or "ai.onnx", node.op_type) for node in graph.node)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def fused(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"fused-{request.param}")
    source = make_tiny_model_dir(root, request.param)
    export(ExportPlan(model=str(source), out=root / "fused"))
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return request.param, hf, root / "fused"


def hf_logits(hf, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def test_fused_graph_holds_the_ort_fused_operators(fused):
    family, hf, directory = fused
    counts = op_counts(directory)
    layers = hf.config.num_hidden_layers
    assert counts[("com.microsoft", "GroupQueryAttention")] == layers
    # Two norms per layer follow a residual add (Gemma: the input and pre-FFN norms), except
    # the first layer's input norm (after the embedding); the final norm follows a Slice.
    assert counts[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 2 * layers - 1
    graph = onnx.load(directory / "model.onnx", load_external_data=False).graph
    for node in graph.node:
        if node.op_type == "SkipSimplifiedLayerNormalization":  # mean, inv_std_var omitted
            assert list(node.output[1:3]) == ["", ""] and node.output[3]
    # No plain softmax/transposes of an unfused attention left.
    assert counts[("ai.onnx", "Softmax")] == 0 and counts[("ai.onnx", "Transpose")] == 0
    tied = hf.config.tie_word_embeddings
    # Gemma's QK-norm sits between projection and attention: q, k, v stay apart there;
    # elsewhere one packed qkv + o + gate/up/down. An untied LM head is one more MatMul;
    # a tied one reads the embedding table through FusedMatMul(transB=1).
    per_layer = 7 if family == "gemma3" else 5
    assert counts[("ai.onnx", "MatMul")] == layers * per_layer + (0 if tied else 1)
    assert counts[("com.microsoft", "FusedMatMul")] == (1 if tied else 0)
    config = popc.load(directory).config
    assert config["ort_fusions"] is not None


def test_onnxscript_ort_fusions_match_nothing_on_the_plain_trace(tmp_path):
    """Why popc traces the ORT ops itself (docs/design.md): onnxscript's ORT fusions, run on popc's
    plain (--no-fuse) trace, fuse none of attention, rotary or the norms. If a future
    onnxscript does, this fails and the choice is worth revisiting."""
    import onnx_ir as ir
    from onnxscript.rewriter import ort_fusions

    source = make_tiny_model_dir(tmp_path, "llama")
    export(ExportPlan(model=str(source), out=tmp_path / "plain", fuse=False))
    _, counts = ort_fusions.optimize_for_ort(ir.load(tmp_path / "plain" / "model.onnx"))
    assert counts and not any(counts.values()), counts


def test_no_fuse_exports_plain_onnx_attention(tmp_path):
    source = make_tiny_model_dir(tmp_path, "llama")
    export(ExportPlan(model=str(source), out=tmp_path / "plain", fuse=False))
    counts = op_counts(tmp_path / "plain")
    assert not any(domain == "com.microsoft" for domain, _ in counts)
    assert counts[("ai.onnx", "Softmax")] == 2
    assert popc.load(tmp_path / "plain").config["ort_fusions"] is None


def test_in_place_kv_buffers_grow_and_match_transformers(fused):
    """BoundSteps' shared KV buffers, outrun twice (capacity prompt + 2, growth 3), give
    transformers' logits on a left-padded batch."""
    _, hf, directory = fused
    model = popc.load(directory)
    ids, mask = padded([9, 4, 6], hf.config.vocab_size, seed=1)
    stepper = model.bound(capacity=ids.shape[1] + 2)
    stepper.GROWTH = 3
    logits = stepper.prefill(ids, mask)
    assert logits.shape[1] == 1  # the LM head ran on the last position only
    np.testing.assert_allclose(logits[:, -1], hf_logits(hf, ids, mask)[:, -1], atol=TOLERANCE, rtol=0)
    assert stepper.kv_buffers, "a fused export keeps its KV cache in shared buffers"
    for _ in range(7):
        next_ids = logits[:, -1].argmax(-1).reshape(-1, 1)
        ids = np.concatenate([ids, next_ids], axis=1)
        mask = np.concatenate([mask, np.ones_like(next_ids)], axis=1)
        logits = stepper.decode(next_ids)
        np.testing.assert_allclose(logits[:, -1], hf_logits(hf, ids, mask)[:, -1], atol=TOLERANCE, rtol=0)
    assert stepper.slots >= ids.shape[1] and stepper.slots > 9 + 2  # grew past the first capacity


def test_logits_to_keep(fused):
    _, hf, directory = fused
    model = popc.load(directory)
    ids, mask = padded([8, 5], hf.config.vocab_size)
    every, _ = model.step(ids, mask, model.initial_state(2))
    last_two, _ = model.step(ids, mask, model.initial_state(2), logits_to_keep=2)
    assert every.shape[1] == 8 and last_two.shape[1] == 2
    np.testing.assert_allclose(last_two, every[:, -2:], atol=1e-5, rtol=0)


def test_multi_token_extend_of_a_batch_runs_row_by_row(fused):
    """Several new tokens over a non-empty cache with batch > 1 (what eval does): ORT's
    GroupQueryAttention takes one row at a time there; the runtime splits the call."""
    _, hf, directory = fused
    model = popc.load(directory)
    ids, mask = padded([7, 3, 5], hf.config.vocab_size, seed=2)
    _, state = model.step(ids[:, :4], mask[:, :4], model.initial_state(3))
    logits, state = model.step(ids[:, 4:], mask, state)
    expected = hf_logits(hf, ids, mask)[:, 4:]
    real = mask[:, 4:].astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], atol=TOLERANCE, rtol=0)
    assert state[0].shape[2] == ids.shape[1]


def test_pop_applies_on_top_of_the_fused_graph(tmp_path):
    """POP-online and the ORT fusions in one export: both present, and at sparsity 0 the
    result equals the fused dense export's."""
    source = make_tiny_model_dir(tmp_path, "llama")
    export(ExportPlan(model=str(source), out=tmp_path / "dense"))
    export(ExportPlan(model=str(source), out=tmp_path / "pop", pop=settings_for_sparsity(0.5)))
    counts = op_counts(tmp_path / "pop")
    assert counts[("com.microsoft", "GroupQueryAttention")] == 2
    assert counts[("ai.popc", "PopSwiGLU")] == 2
    dense, pop = popc.load(tmp_path / "dense"), popc.load(tmp_path / "pop")
    prompts = [list(range(10, 16)), list(range(40, 44))]
    expected, _, _ = dense.generate_ids(prompts, max_new_tokens=8)
    assert pop.generate_ids(prompts, max_new_tokens=8, pop=PopSettings(retain=1.0))[0] == expected
