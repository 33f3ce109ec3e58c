"""The device-resident generation path (popc.steps, popc.device_ops) run on the CPU.

CUDA sessions run this same code with device="cuda": the greedy pick is an ArgMax session
bound to the logits where they lie, the shared KV buffers are filled and grown by small ORT
sessions on the device. Here each of those is held to the plain host path: numpy argmax
over ``PopcModel.step``'s logits (``session.run``, no binding), numpy copies of buffers.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import popc
from conftest import make_tiny_model_dir
from popc.device_ops import DeviceOps
from popc.errors import PopcError
from popc.export import ExportPlan, export
from popc.pop import PopSettings

POP = PopSettings(0.125, 0.75, 0.375)
PROMPTS = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37]]  # batch 3, left-padded
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny Llama exports: fused dense and POP (shared in-place KV buffers), plain POP
    (--no-fuse: every state value a bound output), fused fp16 POP (run by its function
    bodies: the state handling is under test here, the fp16 kernels are the op library's)."""
    root = tmp_path_factory.mktemp("device-steps")
    source = make_tiny_model_dir(root, "llama")
    plans = {
        "dense": {},
        "pop": {"pop": POP},
        "pop-plain": {"pop": POP, "fuse": False},
        "pop-fp16": {"pop": POP, "dtype": "float16"},
    }
    for name, options in plans.items():
        export(ExportPlan(model=str(source), out=root / name, **options))
    return root


def load(exports, name):
    return popc.load(exports / name, use_oplib=not name.endswith("fp16"))


def left_padded(model, prompts):
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), model.pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = prompt
        mask[row, longest - len(prompt) :] = 1
    return ids, mask


def host_greedy(model, prompts, steps):
    """Greedy ids through ``PopcModel.step`` (numpy in, numpy out) and numpy's argmax."""
    ids, mask = left_padded(model, prompts)
    logits, state = model.step(ids, mask, model.initial_state(len(prompts)), logits_to_keep=1)
    picked = []
    for _ in range(steps):
        next_ids = logits[:, -1].argmax(-1)
        picked.append(next_ids)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        logits, state = model.step(next_ids.reshape(-1, 1), mask, state)
    return np.stack(picked, axis=1)


@pytest.mark.parametrize("name", ["dense", "pop", "pop-plain", "pop-fp16"])
def test_device_greedy_equals_host_argmax_through_kv_growth(exports, name):
    """ArgMax on the device = numpy's argmax of the host path, step by step, on a left-padded
    batch of 3 whose shared KV buffers outrun their capacity three times."""
    model = load(exports, name)
    expected = host_greedy(model, PROMPTS, NEW_TOKENS)
    ids, mask = left_padded(model, PROMPTS)
    stepper = model.bound(capacity=ids.shape[1] + 1)
    stepper.GROWTH = 3
    stepper.prefill(ids, mask, logits=False)
    assert stepper.kv_buffers if model.fused_attention else not stepper.kv_buffers
    got = []
    for _ in range(NEW_TOKENS):
        next_ids = stepper.greedy()
        assert next_ids.dtype == np.int64 and next_ids.shape == (3,)
        got.append(next_ids)
        stepper.decode(next_ids.reshape(-1, 1), logits=False)
    np.testing.assert_array_equal(np.stack(got, axis=1), expected)
    if model.fused_attention:
        assert stepper.slots == ids.shape[1] + 1 + 3 * 3  # grew three times, by GROWTH each
        kv_type = "tensor(float16)" if name.endswith("fp16") else "tensor(float)"
        assert {buffer.data_type() for buffer in stepper.kv_buffers.values()} == {kv_type}
        assert all(buffer.shape()[2] == stepper.slots for buffer in stepper.kv_buffers.values())


def test_generate_ids_greedy_and_sampled(exports):
    """generate_ids: greedy (the device pick) equals the host path; sampling (host logits)
    stays reproducible per seed."""
    model = popc.load(exports / "pop")
    generated, _, _ = model.generate_ids(PROMPTS, NEW_TOKENS)
    expected = host_greedy(model, PROMPTS, NEW_TOKENS)
    eos = model.eos_token_ids
    for row, ids in enumerate(generated):
        assert ids == [int(i) for i in expected[row, : len(ids)]]
        assert len(ids) == NEW_TOKENS or ids[-1] in eos
    sampled = [model.generate_ids(PROMPTS, 6, popc.runtime.SamplingOptions(1.0, 0.9, seed=3))[0] for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_fp16_export_keeps_fp16_state_and_float_logits(exports):
    model = load(exports, "pop-fp16")
    assert model.config["dtype"] == "float16" and model.kv_type == "tensor(float16)"
    assert model.logits_type == "tensor(float)" and model.shares_kv
    ids, mask = left_padded(model, PROMPTS)
    stepper = model.bound()
    logits = stepper.prefill(ids, mask)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    partitions = [v for meta, v in zip(model.state_inputs, stepper.state) if "partition" in meta.name]
    assert partitions and {v.data_type() for v in partitions} == {"tensor(int64)"}


def to_float(value):
    """An OrtValue of any float type (bfloat16 too, which numpy lacks) as float32 numpy."""
    elem = {"tensor(float)": TensorProto.FLOAT, "tensor(float16)": TensorProto.FLOAT16,
            "tensor(bfloat16)": TensorProto.BFLOAT16}[value.data_type()]  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "to_float",
        [helper.make_tensor_value_info("x", elem, None)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run_with_ort_values(["y"], {"x": value})[0].numpy()


@pytest.mark.parametrize("type_string", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"])
def test_zeros_and_growth_keep_the_element_type(type_string):
    """Fresh buffers are zero; growth keeps every old slot and appends zero slots, in the
    buffer's own element type (bfloat16 included, which numpy cannot hold)."""
    ops = DeviceOps("cpu", ["CPUExecutionProvider"])
    zeros = ops.zeros([2, 3, 4, 5], type_string)
    assert zeros.data_type() == type_string and zeros.shape() == [2, 3, 4, 5]
    assert not to_float(zeros).any()
    values = np.random.default_rng(0).integers(-8, 8, (2, 3, 4, 5)).astype(np.float32) / 4  # exact in bf16
    cast = {"tensor(float)": TensorProto.FLOAT, "tensor(float16)": TensorProto.FLOAT16,
            "tensor(bfloat16)": TensorProto.BFLOAT16}[type_string]  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=cast)], "cast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], [helper.make_tensor_value_info("y", cast, None)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    buffer = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run_with_ort_values(
        ["y"], {"x": ort.OrtValue.ortvalue_from_numpy(values)}
    )[0]
    grown = ops.grow(buffer, 7)
    assert grown.data_type() == type_string and grown.shape() == [2, 3, 7, 5]
    out = to_float(grown)
    np.testing.assert_array_equal(out[:, :, :4], values)
    assert not out[:, :, 4:].any()
    empty = ops.empty([2, 3, 0, 5], type_string)
    assert empty.data_type() == type_string and empty.shape() == [2, 3, 0, 5]


def test_device_argmax_matches_numpy_on_ties_and_half_logits():
    ops = DeviceOps("cpu", ["CPUExecutionProvider"])
    logits = np.zeros((3, 2, 7), np.float32)
    logits[0, -1, [2, 5]] = 1.0  # a tie: numpy takes the first maximum
    logits[1, -1, 6] = 3.0
    logits[1, 0, 1] = 9.0  # not the last position: ignored
    logits[2, -1] = -np.arange(7)
    for dtype in (np.float32, np.float16):
        picked = ops.greedy(ort.OrtValue.ortvalue_from_numpy(logits.astype(dtype)))
        np.testing.assert_array_equal(picked, logits[:, -1].argmax(-1))
    with pytest.raises(PopcError, match="int32"):
        ops.zeros([1], "tensor(int32)")


def test_greedy_before_prefill_is_a_clear_error(exports):
    stepper = popc.load(exports / "dense").bound()
    with pytest.raises(PopcError, match="before prefill"):
        stepper.greedy()


def test_half_fused_exports_on_cuda_drop_the_padding_mask():
    from popc.runtime import _needs_bias_free_attention

    fused = {"ort_fusions": {"attention": "GroupQueryAttention"}}
    assert _needs_bias_free_attention("cuda", {**fused, "dtype": "float16"})
    assert _needs_bias_free_attention("cuda", {**fused, "dtype": "bfloat16"})
    assert not _needs_bias_free_attention("cuda", {**fused, "dtype": "float32"})  # its attention runs on the CPU EP
    assert not _needs_bias_free_attention("cpu", {**fused, "dtype": "float16"})
    assert not _needs_bias_free_attention("cuda", {"ort_fusions": None, "dtype": "float16"})


def test_the_bias_free_graph_equals_the_export_without_padding_and_refuses_padding(exports, monkeypatch):
    """The graph a CUDA session of a fused fp16 export runs (GroupQueryAttention without
    attention_bias, which ORT's CUDA kernel rejects), built here on the CPU: the same greedy
    ids as the export on an unpadded batch; a padded batch is refused with why; generate_ids
    runs unequal prompts one at a time, with each one's own tokens."""
    whole = load(exports, "pop-fp16")
    monkeypatch.setattr(popc.runtime, "_needs_bias_free_attention", lambda device, config: True)
    bias_free = load(exports, "pop-fp16")
    assert whole.takes_padding and not bias_free.takes_padding
    equal = [[10, 11, 12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]]
    np.testing.assert_array_equal(host_greedy(bias_free, equal, NEW_TOKENS), host_greedy(whole, equal, NEW_TOKENS))
    ids, mask = left_padded(bias_free, PROMPTS)
    with pytest.raises(PopcError, match="prompts of equal length"):
        bias_free.bound().prefill(ids, mask)
    with pytest.raises(PopcError, match="prompts of equal length"):
        bias_free.step(ids, mask, bias_free.initial_state(3))
    one_by_one, _, _ = bias_free.generate_ids(PROMPTS, 6)
    assert one_by_one == [whole.generate_ids([p], 6)[0][0] for p in PROMPTS]


def test_eval_on_cuda_refuses_quantized_rows_before_loading(exports):
    from popc.eval import EvalPlan, run_eval

    with pytest.raises(PopcError, match="--quant exports run on the CPU only"):
        run_eval(EvalPlan(exports / "pop", device="cuda", quant=["int4"], tasks=[]))
