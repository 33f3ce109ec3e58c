"""An export over the 2 GB protobuf limit loads and runs.

Past 2 GB the tracer keeps large constants as external files of its own; the export
must carry every tensor, initializer or node attribute, in its own data file. Random
weights (values do not matter here), ~2.3 GB of fp32: minutes, so marked slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_tokenizer

pytestmark = pytest.mark.slow

TWO_GB = 2**31
# At the peak: the source checkpoint, the tracer's per-tensor files and the export's data file.
DISK_NEEDED = 3 * 2.4e9 + 1e9


def write_large_llama(directory: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=8192, num_hidden_layers=20,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size > TWO_GB, f"the model must exceed 2 GB to reach the tracer's external-data path ({size / 1e9:.2f} GB)"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_export_over_two_gigabytes_loads_and_runs(tmp_path: Path, popc_cache: Path) -> None:
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    from popc.export import ExportPlan, export

    free = shutil.disk_usage(tmp_path).free
    if free < DISK_NEEDED:
        pytest.skip(f"needs {DISK_NEEDED / 1e9:.0f} GB free under {tmp_path.anchor}, has {free / 1e9:.1f} GB")
    source = write_large_llama(tmp_path / "large-llama")
    location = export(ExportPlan(model=str(source), out=tmp_path / "export"))

    files = sorted(p.name for p in location.directory.iterdir())
    data = location.directory / "model.onnx.data"
    assert data.stat().st_size > TWO_GB
    # Nothing but the export's own files: no per-tensor files left by the tracer.
    assert [name for name in files if not name.endswith((".json", ".jinja"))] == ["model.onnx", "model.onnx.data"]
    assert json.loads((location.directory / "popc.json").read_text())["num_layers"] == 20

    session = ort.InferenceSession(str(location.model_path), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 17, 42, 99, 7]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((1, 4, 0, 64), np.float32)
    logits = session.run(["logits"], feeds)[0]
    del session

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=1e-3)
