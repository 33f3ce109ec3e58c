"""A fused dense export carries onnxruntime-genai's genai_config.json: genai's own runtime
runs popc's graph as it is (same greedy tokens and logits as popc's runtime)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import popc
from conftest import make_tiny_model_dir
from popc import families
from popc.defaults import settings_for_sparsity
from popc.export import GENAI_CONFIG_NAME, ExportPlan, export

GENAI_FAMILIES = [spec.name for spec in families.FAMILIES if spec.genai_type is not None]


@pytest.mark.parametrize("family", GENAI_FAMILIES)
def test_genai_runtime_runs_a_popc_export(tmp_path, family):
    og = pytest.importorskip("onnxruntime_genai")
    source = make_tiny_model_dir(tmp_path, family)
    out = tmp_path / "dense"
    export(ExportPlan(model=str(source), out=out))
    config = json.loads((out / GENAI_CONFIG_NAME).read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"

    model = popc.load(out, threads=1)
    prompt = [int(t) for t in np.random.default_rng(5).integers(10, 250, 9)]
    expected, _, _ = model.generate_ids([prompt], max_new_tokens=10)

    genai = og.Model(str(out))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(prompt) + 10, do_sample=False, batch_size=1)
    generator = og.Generator(genai, params)
    generator.append_tokens(np.asarray([prompt], np.int32))
    stepper = model.bound()
    logits = stepper.prefill(np.asarray([prompt]), np.ones((1, len(prompt)), np.int64))
    tokens = []
    while not generator.is_done() and len(tokens) < 10:
        np.testing.assert_allclose(generator.get_logits()[0, -1], logits[0, -1], atol=1e-4, rtol=0)
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        logits = stepper.decode(np.asarray([[tokens[-1]]]))
    assert tokens == expected[0][: len(tokens)] and len(tokens) == len(expected[0])


def test_only_fused_dense_exports_carry_a_genai_config(tmp_path):
    source = make_tiny_model_dir(tmp_path, "llama")
    export(ExportPlan(model=str(source), out=tmp_path / "pop", pop=settings_for_sparsity(0.5)))
    export(ExportPlan(model=str(source), out=tmp_path / "plain", fuse=False))
    assert not (tmp_path / "pop" / GENAI_CONFIG_NAME).exists()
    assert not (tmp_path / "plain" / GENAI_CONFIG_NAME).exists()
    gemma = make_tiny_model_dir(tmp_path, "gemma3")  # genai's Gemma 3 interface is unchecked
    export(ExportPlan(model=str(gemma), out=tmp_path / "gemma"))
    assert not (tmp_path / "gemma" / GENAI_CONFIG_NAME).exists()
    # `--out dir/name.onnx` into a directory popc does not own: never a genai_config.json there.
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("someone else's")
    export(ExportPlan(model=str(source), out=shared / "m.onnx"))
    assert (shared / "m.onnx").is_file() and not (shared / GENAI_CONFIG_NAME).exists()
