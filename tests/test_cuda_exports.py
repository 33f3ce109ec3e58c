"""Exports on the CUDA execution provider, through the device-resident runtime (popc.steps):
every tiny family, dense and POP, fp32 and fp16, against PyTorch; SmolLM2 in fp16 against
transformers' greedy tokens; ``popc bench --device cuda``. Every test needs a GPU (the
``cuda`` fixture skips without one).

The references run as tests/test_pop.py and tests/test_export_dtype.py run them (PyTorch on
the CPU, in the export's dtype), so that the one new thing here is ONNX Runtime's CUDA EP.
Its fp32 MatMuls may use TF32 (the CUDA EP's default), so fp32 tolerances are looser than on
the CPU. POP's top-k selections are discontinuous (docs/design.md, "fp32 and top-k"):
partitions may differ at near-ties only, decode continues from the graph's partitions, and
decode steps are compared until the reference's kept-count boundary has a near-tie.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import popc
import popc.errors
from conftest import TINY_FAMILIES, make_tiny_model_dir, padded
from popc.export import ExportPlan, export
from popc.pop import PopSettings
from popc.reference import PopReference

pytestmark = pytest.mark.gpu

HALF = PopSettings(retain=0.25, candidate=0.5, keep=0.25)
KEEP_ALL = PopSettings(retain=0.25, candidate=0.5, keep=0.5)  # decode keeps every candidate: ties-free
TORCH = {"float32": torch.float32, "float16": torch.float16}
# Each export variant: its dtype and whether ORT's fused operators are used. A fused fp32
# graph runs GroupQueryAttention on the CPU EP (its CUDA kernel is fp16/bf16 only); --no-fuse
# runs every attention op on the GPU.
VARIANTS = {"float32": ("float32", True), "float16": ("float16", True), "float32-plain": ("float32", False)}
# Logits of the tiny models are O(1); a wrong cache, position or mask is off by O(0.1-1).
ATOL = {"float32": 1e-2, "float16": 2e-2}
NEAR_TIE = 2e-2  # relative gap at which two prefill channel scores count as tied
DECODE_TIE = 5e-3  # ... and two decode candidates at the kept-count boundary
DECODE_STEPS = 6
LENGTHS = {"batch1": [9], "batch3-left-padded": [10, 4, 7]}


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family(request, tmp_path_factory):
    """A tiny model of one family and its dense and POP exports in each of VARIANTS."""
    root = tmp_path_factory.mktemp(f"cuda-{request.param}")
    source = make_tiny_model_dir(root, request.param)
    for variant, (dtype, fuse) in VARIANTS.items():
        export(ExportPlan(model=str(source), out=root / f"dense-{variant}", dtype=dtype, fuse=fuse))
        export(ExportPlan(model=str(source), out=root / f"pop-{variant}", dtype=dtype, fuse=fuse, pop=HALF))
    return source, root


def unpadded_where_needed(model, lengths: list[int]) -> list[int]:
    """``lengths``, or as many prompts of the longest length where the model cannot take left
    padding (a fused fp16/bf16 export on CUDA: ORT's CUDA GroupQueryAttention takes no
    attention_bias); that such a model refuses the padded batch is checked on the way."""
    if model.takes_padding or len(set(lengths)) == 1:
        return lengths
    ids, mask = padded(lengths, 262)
    with pytest.raises(popc.errors.PopcError, match="prompts of equal length"):
        model.bound().prefill(ids, mask)
    return [max(lengths)] * len(lengths)


def on_device(value, device: str) -> bool:
    name = value.device_name().lower()
    return name == "cpu" if device == "cpu" else name in ("cuda", "gpu")


def hf_step(hf, ids: np.ndarray, mask: np.ndarray, cache=None):
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), past_key_values=cache,
                 use_cache=True)  # fmt: skip
    return out.logits.float(), out.past_key_values


def check_state_on(stepper, device: str) -> None:
    """The KV cache and the POP partitions are where the session runs."""
    assert stepper.state and all(on_device(value, device) for value in stepper.state)
    assert all(on_device(buffer, device) for buffer in stepper.kv_buffers.values())
    assert on_device(stepper.logits, device)


def check_dense(source: Path, directory: Path, dtype: str, lengths: list[int], device: str) -> None:
    """Every prefill position's logits, then DECODE_STEPS decode steps (fed the reference's
    greedy token), through the bound stepper; its on-device greedy pick = the argmax of the
    logits it returns."""
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=TORCH[dtype]).eval()
    model = popc.load(directory, device=device)
    lengths = unpadded_where_needed(model, lengths)
    ids, mask = padded(lengths, hf.config.vocab_size)
    stepper = model.bound(capacity=ids.shape[1] + 2)
    stepper.GROWTH = 2  # grows on the device twice along the way
    logits = stepper.prefill(ids, mask, logits_to_keep=0)
    expected, cache = hf_step(hf, ids, mask)
    real = mask.astype(bool)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[real], expected.numpy()[real], atol=ATOL[dtype], rtol=0)
    check_state_on(stepper, device)
    for _ in range(DECODE_STEPS):
        next_ids = expected[:, -1:].argmax(-1).numpy()
        mask = np.concatenate([mask, np.ones((len(lengths), 1), np.int64)], axis=1)
        logits = stepper.decode(next_ids)
        np.testing.assert_array_equal(stepper.greedy(), logits[:, -1].argmax(-1))
        expected, cache = hf_step(hf, next_ids, mask, cache)
        np.testing.assert_allclose(logits[:, -1], expected[:, -1].numpy(), atol=ATOL[dtype], rtol=0)
    check_state_on(stepper, device)
    assert stepper.slots >= mask.shape[1] if model.shares_kv else not stepper.kv_buffers


def assert_same_partition_but_near_ties(mine: np.ndarray, theirs: np.ndarray, scores: np.ndarray, retain: int) -> None:
    """Equal regions (R, C) per sequence, but for channels whose scores tie a region boundary
    within NEAR_TIE."""
    for row in range(mine.shape[0]):
        boundaries = np.array([scores[row, theirs[row, :retain]].min(), scores[row, theirs[row]].min()])
        for region in (slice(0, retain), slice(retain, None)):
            for channel in sorted(set(mine[row, region]) ^ set(theirs[row, region])):
                gap = np.abs(scores[row, channel] - boundaries).min()
                assert gap <= NEAR_TIE * np.abs(boundaries).max(), (row, channel, scores[row, channel], boundaries)


def decode_near_ties(reference: PopReference, keep: int, candidate: int) -> np.ndarray:
    """Per row: whether the reference's last decode step ranked two candidates at the
    kept-count boundary within DECODE_TIE of each other, in any FFN (the graph may then keep
    the other one, and that row's later steps follow another path)."""
    batch = reference.states[0].decode_key.shape[0]
    tied = np.zeros(batch, bool)
    if not 0 < keep < candidate:
        return tied
    for state in reference.states:
        key = state.decode_key.float().sort(dim=-1, descending=True).values  # [batch, 1, candidates]
        close = (key[..., keep - 1] - key[..., keep]) <= DECODE_TIE * key[..., 0].abs()
        tied |= close.reshape(batch, -1).any(dim=1).numpy()
    return tied


def check_pop(
    source: Path, directory: Path, dtype: str, lengths: list[int], settings: PopSettings, use_oplib: bool, device: str
) -> int:
    """POP through the bound stepper against popc's PyTorch reference: prefill logits, the
    partitions (up to near-ties), then decode steps from the graph's partitions, each row until
    its first near-tied decode selection. Returns how many (row, step) pairs were compared."""
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=TORCH[dtype]).eval()
    model = popc.load(directory, device=device, use_oplib=use_oplib)
    assert model.uses_oplib == use_oplib
    lengths = unpadded_where_needed(model, lengths)
    reference = PopReference(hf, settings)
    compared = 0
    try:
        ids, mask = padded(lengths, hf.config.vocab_size)
        stepper = model.bound(settings)
        logits = stepper.prefill(ids, mask, logits_to_keep=0)
        expected, cache = reference.step(torch.from_numpy(ids), torch.from_numpy(mask))
        real = mask.astype(bool)
        assert np.isfinite(logits).all()
        np.testing.assert_allclose(logits[real], expected.float().numpy()[real], atol=ATOL[dtype], rtol=0)
        check_state_on(stepper, device)
        retain, candidate, keep, _ = (int(c) for c in settings.counts(model.pop_channels))
        partitions = [v.numpy() for meta, v in zip(model.state_inputs, stepper.state) if "partition" in meta.name]
        for mine, ffn in zip(partitions, reference.states, strict=True):
            assert mine.shape == (len(lengths), retain + candidate)
            assert_same_partition_but_near_ties(mine, ffn.partition.numpy(), ffn.score.float().numpy(), retain)
            ffn.partition = torch.from_numpy(mine)  # decode from the graph's selection
        diverged = np.zeros(len(lengths), bool)
        for _ in range(DECODE_STEPS):
            next_ids = expected[:, -1:].float().argmax(-1)
            mask = np.concatenate([mask, np.ones((len(lengths), 1), np.int64)], axis=1)
            logits = stepper.decode(next_ids.numpy())
            expected, cache = reference.step(next_ids, torch.from_numpy(mask), cache)
            np.testing.assert_array_equal(stepper.greedy(), logits[:, -1].argmax(-1))
            diverged |= decode_near_ties(reference, keep, candidate)
            same = ~diverged
            np.testing.assert_allclose(
                logits[same, -1], expected[same, -1].float().numpy(), atol=ATOL[dtype], rtol=0
            )
            compared += int(same.sum())
        check_state_on(stepper, device)
    finally:
        reference.remove()
    return compared


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_dense_on_cuda_equals_transformers(family, variant, lengths, cuda):
    source, root = family
    check_dense(source, root / f"dense-{variant}", VARIANTS[variant][0], lengths, cuda)


@pytest.mark.parametrize("runner", ["bodies", "oplib"])
@pytest.mark.parametrize("settings", [KEEP_ALL, HALF], ids=["keep-all-candidates", "pop-50"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pop_on_cuda_equals_reference(family, variant, settings, runner, cuda):
    """A left-padded batch of 3 (batch 1 is the dense test's and the bench's)."""
    source, root = family
    lengths, dtype = LENGTHS["batch3-left-padded"], VARIANTS[variant][0]
    compared = check_pop(source, root / f"pop-{variant}", dtype, lengths, settings, runner == "oplib", cuda)
    if settings is KEEP_ALL:
        assert compared == DECODE_STEPS * len(LENGTHS["batch3-left-padded"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_on_cuda_equals_generate_on_cpu(family, variant, cuda):
    """popc's generate (greedy ids picked on the GPU; a left-padded batch, or one prompt at a
    time where the graph cannot take padding) gives the CPU's tokens
    up to the first step where the CPU's own top-2 logits are near-tied (fp16 / TF32 rounding
    may flip those)."""
    _, root = family
    prompts = [[10, 11, 12, 13, 14, 15], [20, 21, 22]]
    dtype = VARIANTS[variant][0]
    got, _, _ = popc.load(root / f"dense-{variant}", device=cuda).generate_ids(prompts, DECODE_STEPS)
    on_cpu = popc.load(root / f"dense-{variant}")
    ids = np.array([prompts[0], [on_cpu.pad_token_id] * 3 + prompts[1]], np.int64)
    mask = (np.arange(6) >= np.array([[0], [3]])).astype(np.int64)
    stepper = on_cpu.bound()
    logits = stepper.prefill(ids, mask)
    for position in range(DECODE_STEPS):
        top2 = np.sort(logits[:, -1], axis=-1)[:, -2:]
        if (top2[:, 1] - top2[:, 0] <= 2 * ATOL[dtype]).any():
            break  # from here either token may be right
        picked = logits[:, -1].argmax(-1)
        for row in range(len(prompts)):
            if position < len(got[row]):
                assert got[row][position] == picked[row], (row, position)
        logits = stepper.decode(picked.reshape(-1, 1))


# ---- SmolLM2 (the built-in real model) -----------------------------------------------------
SMOLLM2 = "smollm2-135m"
SMOLLM2_PROMPT = "What is the capital of France? Answer in one sentence."
SMOLLM2_TOKENS = 32
# fp16: what people deploy on a GPU; fp32 --no-fuse: every op on the GPU in fp32.
SMOLLM2_VARIANTS = ["float16", "float32-plain"]


@pytest.fixture(scope="module", params=SMOLLM2_VARIANTS)
def smollm2(request, cuda, tmp_path_factory):
    """SmolLM2's dense and POP (50 %) exports of one variant, and that variant's dtype."""
    from popc.defaults import settings_for_sparsity

    dtype, fuse = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(f"smollm2-{request.param}")
    export(ExportPlan(model=SMOLLM2, out=root / "dense", dtype=dtype, fuse=fuse))
    export(ExportPlan(model=SMOLLM2, out=root / "pop", dtype=dtype, fuse=fuse, pop=settings_for_sparsity(0.5)))
    return root, dtype


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_transformers_on_cuda(smollm2, cuda):
    """32 greedy tokens of the export on CUDA = transformers' greedy generation on CUDA in the
    same dtype, up to the first step whose top-2 logits transformers itself has within
    rounding noise (there either may be right); that step is printed."""
    from popc.loading import load_model

    root, dtype = smollm2
    model = popc.load(root / "dense", device=cuda)
    result = model.generate(SMOLLM2_PROMPT, chat=True, max_new_tokens=SMOLLM2_TOKENS)
    hf = load_model(SMOLLM2).model.to(device="cuda", dtype=TORCH[dtype]).eval()
    ids = torch.tensor([result.prompt_ids], device="cuda")
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=SMOLLM2_TOKENS, do_sample=False,
                          output_scores=True, return_dict_in_generate=True)  # fmt: skip
    expected = out.sequences[0, ids.shape[1] :].tolist()
    margins = [float(s[0].float().topk(2).values.diff().abs()) for s in out.scores]
    # fp16 logits of ~20 are 1/64 apart: two implementations may differ by a few of those.
    trusted = next((i for i, m in enumerate(margins) if m < 0.25), len(expected))
    print(f"SmolLM2 {dtype} on CUDA: {result.text!r}; tokens compared: {trusted} of {len(expected)}")
    assert result.generated_ids[:trusted] == expected[:trusted]
    if trusted == len(expected):
        assert result.generated_ids == expected


@pytest.mark.slow
def test_smollm2_bench_on_cuda(smollm2, cuda):
    """``popc bench --device cuda``: dense vs POP 50 % at batch 1 and 4 (ms/token medians;
    the table is printed, and saved where POPC_GPU_BENCH_OUT points, one file per variant)."""
    from popc.bench import BenchPlan, report, run_bench

    root, dtype = smollm2
    plan = BenchPlan(directory=root / "pop", dense=root / "dense", device=cuda, dtype=dtype,
                     variants=["dense-ort", "pop-oplib"], prompt_lengths=[128], batches=[1, 4], repeats=3,
                     decode_tokens=32, decode_prompt=64, memory_batches=())  # fmt: skip
    result = run_bench(plan)
    assert result.settings.dtype == dtype and result.machine.device == "cuda"
    decode = {(r.variant, r.batch): r for r in result.decode}
    assert set(decode) == {(v, b) for v in ("dense-ort", "pop-oplib") for b in (1, 4)}
    assert all(r.ms_per_step.median > 0 and r.tokens_per_s for r in decode.values())
    text = report.markdown(result)
    print(text)
    if out := os.environ.get("POPC_GPU_BENCH_OUT"):
        target = Path(f"{out}-{root.name}")
        target.with_suffix(".md").write_text(text)
        target.with_suffix(".json").write_text(json.dumps(result.to_json(), indent=1))


@pytest.mark.parametrize("family", ["llama"], indirect=True)
def test_tiny_bench_on_cuda_defaults_to_fp16(family, cuda, monkeypatch, tmp_path):
    """A --device cuda bench of an fp32 export exports and runs the fp16 twins (popc's ORT
    variants only), naming the GPU."""
    from popc.bench import BenchPlan, run_bench

    _, root = family
    monkeypatch.setenv("POPC_CACHE_DIR", str(tmp_path / "cache"))
    plan = BenchPlan(directory=root / "pop-float32", device=cuda, prompt_lengths=[8], batches=[1, 4], repeats=1,
                     warmup=0, decode_tokens=4, decode_prompt=8, memory_batches=())  # fmt: skip
    result = run_bench(plan)
    assert result.settings.dtype == "float16" and result.machine.gpu
    popc_variants = {"dense-ort", "pop-body", "pop-oplib"}  # and genai's CUDA build where installed
    assert popc_variants <= set(result.settings.variants) <= popc_variants | {"ort-genai"}
    assert all(r.ms_per_step.median > 0 for r in result.decode)


@pytest.mark.parametrize("family", ["llama"], indirect=True)
@pytest.mark.parametrize("variant", ["float32-plain", "float16"])
def test_eval_on_cuda_equals_eval_on_cpu(family, variant, cuda, tmp_path):
    """``popc eval --device cuda``: every row's perplexity as on the CPU (POP rows included),
    the device and GPU recorded."""
    from popc.eval import EvalPlan, run_eval

    _, root = family
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins. " * 8)
    plans = {device: EvalPlan(root / f"pop-{variant}", text=text, tasks=[], windows=2, window=40, sparsities=[0.5],
                              device=device) for device in ("cpu", cuda)}  # fmt: skip
    results = {device: run_eval(plan) for device, plan in plans.items()}
    assert results[cuda].info["device"] == "cuda" and results[cuda].info["gpu"]
    for on_cpu, on_gpu in zip(results["cpu"].rows, results[cuda].rows, strict=True):
        assert (on_cpu.method, on_cpu.sparsity) == (on_gpu.method, on_gpu.sparsity)
        assert on_gpu.ppl == pytest.approx(on_cpu.ppl, rel=2e-2), on_cpu.method
