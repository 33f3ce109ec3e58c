"""The plain fc1/act/fc2 MLP rule (GELU and ReLU, with and without biases).

No supported family has a plain MLP, so this traces a small block of one with the
graph's usual inputs, applies the POP pass and checks ORT against popc.reference's
math on the same weights, at prefill and over decode steps, with the activation score and
the output-aware one (fc2's row norms).
"""

from __future__ import annotations

import types

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from popc.passes.pop_online import PopOnlinePass
from popc.pop import PopSettings
from popc.reference import GatedWeights, PopState, pop_ffn

HIDDEN, CHANNELS = 16, 40


class PlainMLPBlock(nn.Module):
    def __init__(self, activation: str, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, CHANNELS, bias=bias)
        self.fc2 = nn.Linear(CHANNELS, HIDDEN, bias=bias)
        self.activation = activation

    def act(self, x):
        return torch.relu(x) if self.activation == "relu" else nn.functional.gelu(x, approximate="tanh")

    def forward(self, input_ids, attention_mask, x):
        return self.fc2(self.act(self.fc1(x))) + 0 * attention_mask[:, :1, None] + 0 * input_ids[:, :1, None]


@pytest.mark.parametrize("score", ["activation", "output"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_plain_mlp_pop_equals_reference(tmp_path, activation, bias, score):
    settings = PopSettings(retain=0.25, candidate=0.5, keep=0.25, score=score)
    torch.manual_seed(0)
    block = PlainMLPBlock(activation, bias).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    example = (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, HIDDEN))
    path = tmp_path / "block.onnx"
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "t"}, "x": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}}
    torch.onnx.export(block, example, str(path), input_names=["input_ids", "attention_mask", "x"], output_names=["y"],
                      dynamic_axes=axes, opset_version=20, dynamo=False)  # fmt: skip
    model = ir.load(path)
    pop = PopOnlinePass()
    pop(model)
    assert pop.channels == CHANNELS
    assert any(n.op_type == ("PopReluMLP" if activation == "relu" else "PopGeluMLP") for n in model.graph)
    ir.save(model, tmp_path / "pop.onnx")
    session = ort.InferenceSession(str(tmp_path / "pop.onnx"))

    counts = settings.counts(CHANNELS)
    owner = types.SimpleNamespace(counts=counts, prefill=True)
    weights = GatedWeights(
        gate=block.fc1.weight, up=None, down_rows=block.fc2.weight.t(), act=block.act,
        gate_bias=block.fc1.bias, down_bias=block.fc2.bias,
    )  # fmt: skip
    state = PopState()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, HIDDEN)).astype(np.float32)
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0  # left padding: masked out of the scores
    feed = {"input_ids": np.zeros((2, 6), np.int64), "attention_mask": mask, "x": x,
            "past_partition.0": np.zeros((2, 0), np.int64), "pop_config": counts}  # fmt: skip
    y, partition = session.run(None, feed)
    with torch.no_grad():
        expected = pop_ffn(torch.from_numpy(x), weights, owner, state, torch.from_numpy(mask))
    np.testing.assert_allclose(y, expected.numpy(), atol=1e-4)
    np.testing.assert_array_equal(partition, state.partition.numpy())

    owner.prefill = False
    for _step in range(4):
        x = rng.standard_normal((2, 1, HIDDEN)).astype(np.float32)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        feed |= {"input_ids": np.zeros((2, 1), np.int64), "attention_mask": mask, "x": x, "past_partition.0": partition}
        y, partition = session.run(None, feed)
        with torch.no_grad():
            expected = pop_ffn(torch.from_numpy(x), weights, owner, state, torch.from_numpy(mask[:, -1:]))
        np.testing.assert_allclose(y, expected.numpy(), atol=1e-4)
