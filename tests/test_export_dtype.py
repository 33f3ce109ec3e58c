"""``popc export --dtype fp16|bf16``: half-precision exports against PyTorch in the same dtype.

float16 runs on ONNX Runtime's CPU EP (every op of the fused graph has a float16 CPU kernel),
so fp16 exports, dense and POP, are compared with the Hugging Face model and popc's POP
reference run in float16. bfloat16 does not: MatMul, FusedMatMul, Softmax, Sigmoid, Mul, Abs,
Gelu and GroupQueryAttention have no bfloat16 CPU kernel (onnxruntime 1.32). A bf16 export is
checked structurally against its fp32 twin (same nodes but the casts, every weight the
rounded fp32 one, logits float32) and numerically through that twin: the bf16 graph widened
back to float32 (exact), run against PyTorch in bfloat16.

POP's top-k selections are discontinuous (docs/design.md, "fp32 and top-k"): in half
precision the graph and the reference round activations differently, so partitions may
differ only at near-ties, and decode steps are compared until the reference's candidate
ranking has a near-tie at the kept-count boundary (where the two may choose differently).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import make_tiny_model_dir, padded
from popc import oplib
from popc.cli import app
from popc.errors import PopcError
from popc.export import ExportPlan, canonical_dtype, export
from popc.passes.convert_dtype import to_half
from popc.pop import PopSettings
from popc.quantize import QuantScheme
from popc.reference import PopReference

# SwiGLU; GeGLU with QK-norm and a scaled embedding; routed experts.
FAMILIES = ["llama", "gemma3", "qwen2_moe"]
HALF = PopSettings(retain=0.25, candidate=0.5, keep=0.25)
# The same regions, every candidate kept: decode selections are ties-free (the kept set is C).
KEEP_ALL = PopSettings(retain=0.25, candidate=0.5, keep=0.5)
NUMPY = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# fp16 keeps 11 significant bits (2^-11 ~ 4.9e-4 relative); the graph and PyTorch round
# each of a few dozen ops differently. Logits of the tiny models are O(1).
FP16_ATOL = 8e-3
# bf16 keeps 8 bits (2^-8 ~ 3.9e-3): PyTorch in bfloat16 against the graph's weights in float32.
BF16_ATOL = 6e-2
# Relative gap below which two prefill channel scores count as tied in half precision.
NEAR_TIE = 2e-2
# A decode step's candidates at the kept-count boundary within this fraction of the largest
# key (~4 fp16 ulps) may be ranked the other way by the graph.
DECODE_TIE = 2e-3
DECODE_STEPS = 4
LENGTHS = {"batch1": [9], "batch3-left-padded": [10, 4, 7]}


class Graph:
    """A plain ONNX Runtime session over an export: one step at a time, state fed back."""

    def __init__(
        self, directory: Path, use_oplib: bool = False, providers: tuple[str, ...] = ("CPUExecutionProvider",)
    ) -> None:
        self.config = json.loads((directory / "popc.json").read_text())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if use_oplib:
            info = oplib.find_library()
            if info is None:
                if os.environ.get("CI"):
                    pytest.fail("the popc op library is missing in CI")
                pytest.skip("popc op library not built (popc doctor --build)")
            # As popc.load registers it for a half export: the whole-FFN kernels (float32 only)
            # left out, so the FFN's function body runs the decode and partition kernels.
            half = {} if self.config["dtype"] == "float32" else {"POPC_OPLIB_WHOLE_FFN": "0"}
            with mock.patch.dict(os.environ, half):
                options.register_custom_ops_library(str(info.path))
        self.session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=list(providers))
        self.dtype = NUMPY[self.config["dtype"]]
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def initial_state(self, batch: int) -> dict[str, np.ndarray]:
        kv = (batch, self.config["num_kv_heads"], 0, self.config["head_dim"])
        state = {name: np.zeros(kv, self.dtype) for name in self.inputs if name.startswith("past_key_values.")}
        state |= {name: np.zeros((batch, 0), np.int64) for name in self.inputs if name.startswith("past_partition.")}
        return state

    def step(self, ids: np.ndarray, mask: np.ndarray, state: dict, pop: PopSettings | None = None):
        feed = {"input_ids": ids, "attention_mask": mask, **state}
        if pop is not None:
            feed["pop_config"] = pop.counts(self.config["pop"]["intermediate_size"])
        results = dict(zip(self.outputs, self.session.run(None, feed)))
        new_state = {
            name: results[name.replace("past_key_values.", "present.").replace("past_partition.", "present_partition.")]
            for name in state
        }
        return results["logits"], new_state


@pytest.fixture(scope="module", params=FAMILIES)
def fp16_exports(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"fp16-{request.param}")
    source = make_tiny_model_dir(root, request.param)
    export(ExportPlan(model=str(source), out=root / "dense", dtype="fp16"))
    export(ExportPlan(model=str(source), out=root / "pop", dtype="fp16", pop=HALF))
    return source, root


def torch_model(source: Path, dtype: str):
    return AutoModelForCausalLM.from_pretrained(source, dtype=TORCH[dtype]).eval()


def hf_step(hf, ids: np.ndarray, mask: np.ndarray, cache=None):
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), past_key_values=cache,
                 use_cache=True)  # fmt: skip
    return out.logits.float(), out.past_key_values


def test_fp16_export_records_its_dtype_and_io_types(fp16_exports):
    _, root = fp16_exports
    for name in ("dense", "pop"):
        graph = Graph(root / name)
        assert graph.config["dtype"] == "float16"
        assert graph.config["inputs"]["past_key_values.{i}.key|value"].startswith("float16 ")
        types = {i.name: i.type for i in graph.session.get_inputs()} | {
            o.name: o.type for o in graph.session.get_outputs()
        }
        assert types["logits"] == "tensor(float)"
        assert types["input_ids"] == types["attention_mask"] == "tensor(int64)"
        kv = [t for n, t in types.items() if n.startswith(("past_key_values.", "present."))]
        assert kv and set(kv) == {"tensor(float16)"}
        partitions = [t for n, t in types.items() if "partition" in n or n == "pop_config"]
        assert set(partitions) == ({"tensor(int64)"} if name == "pop" else set())


@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_fp16_dense_equals_torch_fp16(fp16_exports, lengths):
    """Prefill logits and DECODE_STEPS decode steps through the fp16 KV cache."""
    source, root = fp16_exports
    hf, graph = torch_model(source, "float16"), Graph(root / "dense")
    ids, mask = padded(lengths, hf.config.vocab_size)
    logits, state = graph.step(ids, mask, graph.initial_state(len(lengths)))
    expected, cache = hf_step(hf, ids, mask)
    real = mask.astype(bool)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[real], expected.numpy()[real], atol=FP16_ATOL, rtol=0)
    for _ in range(DECODE_STEPS):
        next_ids = expected[:, -1:].argmax(-1).numpy()
        mask = np.concatenate([mask, np.ones((len(lengths), 1), np.int64)], axis=1)
        logits, state = graph.step(next_ids, mask, state)
        expected, cache = hf_step(hf, next_ids, mask, cache)
        np.testing.assert_allclose(logits[:, -1], expected[:, -1].numpy(), atol=FP16_ATOL, rtol=0)


def assert_same_partition_but_near_ties(mine: np.ndarray, theirs: np.ndarray, scores: np.ndarray, retain: int) -> int:
    """Equal regions per sequence, but for channels whose scores tie a region boundary (R/C or
    C/pruned) within NEAR_TIE (half-precision activations round differently in the graph and
    PyTorch). Returns how many channels moved."""
    moved_count = 0
    for row in range(mine.shape[0]):
        boundaries = np.array([scores[row, theirs[row, :retain]].min(), scores[row, theirs[row]].min()])
        for region in (slice(0, retain), slice(retain, None)):
            moved = sorted(set(mine[row, region]) ^ set(theirs[row, region]))
            moved_count += len(moved)
            for channel in moved:
                gap = np.abs(scores[row, channel] - boundaries).min()
                assert gap <= NEAR_TIE * boundaries.max(), (row, channel, scores[row, channel], boundaries)
    return moved_count


def decode_near_tie(reference: PopReference, keep: int, candidate: int) -> bool:
    """Whether the reference's last decode step ranked two candidates at the kept-count boundary
    within DECODE_TIE of each other (then the graph may keep the other one)."""
    if not 0 < keep < candidate:
        return False
    for state in reference.states:
        key = state.decode_key.sort(dim=-1, descending=True).values
        last, first_dropped = key[..., keep - 1], key[..., keep]
        if ((last - first_dropped) <= DECODE_TIE * key[..., 0]).any():
            return True
    return False


@pytest.mark.parametrize("runner", ["bodies", "oplib"])
@pytest.mark.parametrize("settings", [KEEP_ALL, HALF], ids=["keep-all-candidates", "pop-50"])
@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_fp16_pop_equals_reference_fp16(fp16_exports, lengths, settings, runner):
    """POP in float16: the partitions (up to near-ties), prefill logits, and decode steps: all
    of them where every candidate is kept, else until the first near-tied candidate selection."""
    source, root = fp16_exports
    graph = Graph(root / "pop", use_oplib=runner == "oplib")
    hf = torch_model(source, "float16")
    reference = PopReference(hf, settings)
    compared = 0
    try:
        ids, mask = padded(lengths, hf.config.vocab_size)
        logits, state = graph.step(ids, mask, graph.initial_state(len(lengths)), settings)
        expected, cache = reference.step(torch.from_numpy(ids), torch.from_numpy(mask))
        real = mask.astype(bool)
        assert np.isfinite(logits).all()
        np.testing.assert_allclose(logits[real], expected.float().numpy()[real], atol=FP16_ATOL, rtol=0)
        retain, candidate, keep, _ = (int(c) for c in settings.counts(graph.config["pop"]["intermediate_size"]))
        partitions = [value for name, value in state.items() if name.startswith("past_partition.")]
        for mine, ffn in zip(partitions, reference.states, strict=True):
            assert mine.shape == (len(lengths), retain + candidate)
            assert_same_partition_but_near_ties(mine, ffn.partition.numpy(), ffn.score.numpy(), retain)
            ffn.partition = torch.from_numpy(mine)  # decode from the graph's selection
        for _ in range(DECODE_STEPS):
            next_ids = expected[:, -1:].float().argmax(-1)
            mask = np.concatenate([mask, np.ones((len(lengths), 1), np.int64)], axis=1)
            logits, state = graph.step(next_ids.numpy(), mask, state, settings)
            expected, cache = reference.step(next_ids, torch.from_numpy(mask), cache)
            if decode_near_tie(reference, keep, candidate):
                break
            np.testing.assert_allclose(logits[:, -1], expected[:, -1].float().numpy(), atol=FP16_ATOL, rtol=0)
            compared += 1
    finally:
        reference.remove()
    if keep == candidate:
        assert compared == DECODE_STEPS


def test_popc_load_runs_an_fp16_pop_export_with_the_op_library(fp16_exports):
    """popc.load registers the library as a half export needs it (no float32-only whole-FFN
    kernels), so the fp16 decode and partition kernels run inside the FFN's body and give the
    bodies' logits."""
    import popc

    if oplib.find_library() is None:
        pytest.skip("popc op library not built (popc doctor --build)")
    _, root = fp16_exports
    with_library = popc.load(root / "pop")
    bodies = popc.load(root / "pop", use_oplib=False)
    assert with_library.uses_oplib and not bodies.uses_oplib
    ids, mask = padded([9], 262)
    logits = [model.step(ids, mask, model.initial_state(1), KEEP_ALL)[0] for model in (with_library, bodies)]
    np.testing.assert_allclose(logits[0], logits[1], atol=FP16_ATOL, rtol=0)


# ---- bfloat16: no CPU kernels; checked against the fp32 twin ---------------------------------
@pytest.fixture(scope="module")
def bf16_twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    source = make_tiny_model_dir(root, "llama")
    for dtype in ("float32", "bfloat16"):
        export(ExportPlan(model=str(source), out=root / dtype, dtype=dtype, pop=HALF))
    return source, root


def casts_to(graph: ir.Graph, dtype: ir.DataType) -> list[ir.Node]:
    return [n for n in graph if n.op_type == "Cast" and n.attributes.get_int("to") == dtype]


def test_bf16_graph_is_the_fp32_graph_with_casts(bf16_twins):
    _, root = bf16_twins
    fp32, bf16 = (ir.load(root / d / "model.onnx") for d in ("float32", "bfloat16"))
    assert json.loads((root / "bfloat16" / "popc.json").read_text())["dtype"] == "bfloat16"
    # The same nodes, in order, apart from the one Cast before the logits.
    assert casts_to(bf16.graph, ir.DataType.FLOAT)[-1].outputs[0].name == "logits"
    ops = [(n.domain, n.op_type) for n in fp32.graph]
    assert [(n.domain, n.op_type) for n in bf16.graph][:-1] == ops and bf16.graph.node(-1).op_type == "Cast"
    # Casts of int tensors to float32 become casts to bfloat16, except the POP ops' token mask.
    fp32_casts, bf16_casts = casts_to(fp32.graph, ir.DataType.FLOAT), casts_to(bf16.graph, ir.DataType.BFLOAT16)
    token_masks = [n for n in casts_to(bf16.graph, ir.DataType.FLOAT)[:-1] if n.outputs[0].name == "pop_token_mask"]
    assert len(token_masks) == 1 and len(bf16_casts) == len(fp32_casts) - 1
    # Every float initializer is the rounded fp32 one, bit for bit.
    floats = {name: v for name, v in fp32.graph.initializers.items() if v.dtype == ir.DataType.FLOAT}
    assert floats
    for name, value in floats.items():
        half = bf16.graph.initializers[name]
        assert half.dtype == ir.DataType.BFLOAT16, name
        rounded = value.const_value.numpy().astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(half.const_value.numpy().view(np.uint16), rounded.view(np.uint16), err_msg=name)
    # Graph I/O: the cache in bfloat16, logits float32, the rest (int64 ids, masks, partitions) as in fp32.
    io = {v.name: v.dtype for v in [*bf16.graph.inputs, *bf16.graph.outputs]}
    io32 = {v.name: v.dtype for v in [*fp32.graph.inputs, *fp32.graph.outputs]}
    assert io.keys() == io32.keys() and io["logits"] == ir.DataType.FLOAT
    for name, dtype in io.items():
        if name.startswith(("past_key_values.", "present.")):
            assert dtype == ir.DataType.BFLOAT16, name
        elif name != "logits":
            assert dtype == io32[name] and dtype != ir.DataType.FLOAT, name


def widened(model_dir: Path, out: Path) -> Path:
    """The bf16 export with every bfloat16 tensor and cast widened to float32: exact, since
    bfloat16 -> float32 is; what the bf16 graph computes, run in float32 arithmetic."""
    model = ir.load(model_dir / "model.onnx")
    for value in model.graph.initializers.values():
        if value.dtype == ir.DataType.BFLOAT16:
            value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
            value.dtype = ir.DataType.FLOAT
    for node in model.graph:
        if node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.BFLOAT16:
            node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
        attribute = node.attributes.get("value")
        if node.op_type == "Constant" and attribute is not None and attribute.value.dtype == ir.DataType.BFLOAT16:
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(attribute.value.numpy().astype(np.float32)))
        for value in node.outputs:
            if value.dtype == ir.DataType.BFLOAT16:
                value.dtype = ir.DataType.FLOAT
    for value in model.graph.inputs:
        if value.dtype == ir.DataType.BFLOAT16:
            value.dtype = ir.DataType.FLOAT
    out.mkdir(exist_ok=True)
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    config = json.loads((model_dir / "popc.json").read_text()) | {"dtype": "float32"}
    (out / "popc.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_bf16_graph_computes_what_torch_computes_in_bf16(bf16_twins, tmp_path, lengths):
    """The bf16 graph's numbers (its weights, rotary tables, mask constant), run in float32
    arithmetic, against PyTorch in bfloat16: POP prefill logits and its partitions."""
    source, root = bf16_twins
    graph = Graph(widened(root / "bfloat16", tmp_path / "widened"))
    hf = torch_model(source, "bfloat16")
    reference = PopReference(hf, HALF)
    try:
        ids, mask = padded(lengths, hf.config.vocab_size)
        logits, state = graph.step(ids, mask, graph.initial_state(len(lengths)), HALF)
        expected, _ = reference.step(torch.from_numpy(ids), torch.from_numpy(mask))
        real = mask.astype(bool)
        np.testing.assert_allclose(logits[real], expected.float().numpy()[real], atol=BF16_ATOL, rtol=0)
        # And closer to the bf16 model than the fp32 export is (the weights really are bf16's).
        fp32 = Graph(root / "float32").step(ids, mask, Graph(root / "float32").initial_state(len(lengths)), HALF)[0]
        assert (
            np.abs(logits - expected.float().numpy())[real].mean()
            < np.abs(fp32 - expected.float().numpy())[real].mean()
        )
        retain = int(HALF.counts(graph.config["pop"]["intermediate_size"])[0])
        partitions = [value for name, value in state.items() if name.startswith("past_partition.")]
        for mine, ffn in zip(partitions, reference.states, strict=True):
            assert_same_partition_but_near_ties(mine, ffn.partition.numpy(), ffn.score.numpy(), retain)
    finally:
        reference.remove()


def test_to_half_clips_to_the_finite_range_and_rounds_to_nearest():
    values = np.array([np.finfo(np.float32).min, -1.0, 1 + 2**-9, np.inf, 1e-30], np.float32)
    half = to_half(values, ir.DataType.FLOAT16)
    assert half.dtype == np.float16 and half[0] == -65504 and half[3] == np.inf and half[4] == 0
    bf16 = to_half(values, ir.DataType.BFLOAT16)
    assert np.isfinite(bf16[0]) and float(bf16[0]) == -float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    assert float(bf16[2]) == 1.0  # 1 + 2^-9 rounds to 1 in bfloat16 (8 bits), to nearest
    assert float(to_half(np.array([1 + 3 * 2**-9], np.float32), ir.DataType.BFLOAT16)[0]) == 1 + 2**-7


# ---- options ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [("fp32", "float32"), ("FP16", "float16"), ("float16", "float16"), ("bf16", "bfloat16"), ("bfloat16", "bfloat16")],
)
def test_dtype_spellings(spelling, canonical):
    assert canonical_dtype(spelling) == canonical


def test_unknown_dtype_is_refused_with_the_choices():
    with pytest.raises(PopcError, match="fp32, fp16, bf16"):
        canonical_dtype("int8")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quant": QuantScheme.parse("int4", 32, 4)}, "not supported with --quant"),
        ({"fuse": False}, "not supported with --no-fuse"),
        ({"prefill_skip": 1}, "not supported with --prefill-skip"),
        ({"drop_layers": 1}, "not supported with --drop-layers"),
    ],
)
def test_unsupported_combinations_are_refused_before_loading(tmp_path, options, message):
    plan = ExportPlan(model=str(tmp_path / "no-such-model"), out=tmp_path / "out", dtype="fp16", **options)
    with pytest.raises(PopcError, match=message):
        export(plan)


def test_cli_export_dtype(tmp_path):
    source = make_tiny_model_dir(tmp_path, "llama")
    result = CliRunner().invoke(app, ["export", str(source), "--out", str(tmp_path / "out"), "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "popc.json").read_text())["dtype"] == "float16"
    result = CliRunner().invoke(app, ["export", str(source), "--out", str(tmp_path / "bad"), "--dtype", "fp8"])
    assert result.exit_code != 0 and "fp32, fp16, bf16" in result.output


# ---- the CUDA EP (pytest -m gpu): fp16 and bf16 run for real -------------------------------
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
GPU_ATOL = {"float16": FP16_ATOL, "bfloat16": BF16_ATOL}


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def gpu_exports(request, cuda, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gpu-{request.param}")
    source = make_tiny_model_dir(root, "llama")
    export(ExportPlan(model=str(source), out=root / "dense", dtype=request.param))
    export(ExportPlan(model=str(source), out=root / "pop", dtype=request.param, pop=KEEP_ALL))
    return request.param, source, root


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "pop"])
@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_half_export_on_cuda_equals_torch_in_its_dtype(gpu_exports, kind, lengths):
    """fp16 / bf16 exports on the CUDA EP with the op library: prefill logits and DECODE_STEPS
    decode steps against PyTorch (CPU) in the same dtype; POP with every candidate kept, so
    that no near-tie can make the two select differently."""
    dtype, source, root = gpu_exports
    graph = Graph(root / kind, use_oplib=True, providers=CUDA)
    assert graph.session.get_providers()[0] == "CUDAExecutionProvider"
    hf = torch_model(source, dtype)
    settings = KEEP_ALL if kind == "pop" else None
    reference = PopReference(hf, KEEP_ALL) if kind == "pop" else None

    def expected_step(ids: np.ndarray, mask: np.ndarray, cache):
        if reference is None:
            return hf_step(hf, ids, mask, cache)
        logits, cache = reference.step(torch.from_numpy(ids), torch.from_numpy(mask), cache)
        return logits.float(), cache

    try:
        ids, mask = padded(lengths, hf.config.vocab_size)
        logits, state = graph.step(ids, mask, graph.initial_state(len(lengths)), settings)
        expected, cache = expected_step(ids, mask, None)
        real = mask.astype(bool)
        assert np.isfinite(logits).all()
        np.testing.assert_allclose(logits[real], expected.numpy()[real], atol=GPU_ATOL[dtype], rtol=0)
        for _ in range(DECODE_STEPS):
            next_ids = expected[:, -1:].argmax(-1).numpy()
            mask = np.concatenate([mask, np.ones((len(lengths), 1), np.int64)], axis=1)
            logits, state = graph.step(next_ids, mask, state, settings)
            expected, cache = expected_step(next_ids, mask, cache)
            np.testing.assert_allclose(logits[:, -1], expected[:, -1].numpy(), atol=GPU_ATOL[dtype], rtol=0)
    finally:
        if reference is not None:
            reference.remove()
