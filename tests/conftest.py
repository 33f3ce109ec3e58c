"""Shared test helpers: tiny, deterministic, random-weight models built offline.

``make_tiny_model_dir(tmp_path, family)`` writes a Hugging Face model directory
(config.json + model.safetensors + tokenizer files with a chat template) and returns
its path, for any family of ``popc.families`` (each carries its tiny config). Same seed ->
same weights.

Import it directly (``from conftest import make_tiny_model_dir``) or use the
``tiny_model_dir`` fixture (a factory: ``tiny_model_dir("gemma3")``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest

from popc import families

TINY_FAMILIES = tuple(spec.name for spec in families.FAMILIES)

# Special tokens first (ids 0..5), then the 256 byte-level symbols: any text tokenizes.
TINY_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
TINY_PAD_ID, TINY_BOS_ID, TINY_EOS_ID = 0, 1, 2
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: loads real models (tens of seconds); deselect with -m 'not slow'"
    )
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU, onnxruntime-gpu and the op library built with CUDA; skips without"
    )


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA checks cannot run here (None when they can): onnxruntime-gpu must start its
    CUDA execution provider on a real GPU (it lists the provider even where none works), and the
    popc op library must have been built with its CUDA kernels."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDA execution provider (install popc[gpu])"
    import numpy as np
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        session.run(None, {"x": np.ones(1, np.float32)})
    except Exception as error:  # noqa: BLE001 - any failure means no usable GPU
        return f"the CUDA execution provider does not start: {str(error).splitlines()[0]}"
    if "CUDAExecutionProvider" not in session.get_providers():
        return "the CUDA execution provider does not start (no GPU, or CUDA/cuDNN libraries missing)"
    from popc import oplib

    info = oplib.find_library()
    if info is None:
        return "the popc op library is not built (popc doctor --build)"
    if info.cuda_problem:
        return info.cuda_problem
    if "CUDAExecutionProvider" not in info.providers:
        return "the popc op library was built without CUDA kernels (popc doctor --rebuild with nvcc)"
    return None


@pytest.fixture(scope="session")
def cuda() -> str:
    """Skips the test unless CUDA checks can run (see ``cuda_unavailable_reason``); returns "cuda"."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return "cuda"


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer (no merges) of 262 tokens, with chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    byte_symbols.sort()
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    for sym in byte_symbols:
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TINY_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=128,
    )


def make_tiny_config(family: str, vocab_size: int):
    """The tiny config for ``family`` (hidden 64, 4 heads / 2 kv heads, head_dim 16), with the
    family's own overrides from ``popc.families``."""
    import transformers

    spec = families.family(family)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        bos_token_id=TINY_BOS_ID,
        eos_token_id=TINY_EOS_ID,
        pad_token_id=TINY_PAD_ID,
    )
    settings.update(copy.deepcopy(dict(spec.tiny_config)))
    return getattr(transformers, spec.tiny_config_class)(**settings)


def make_tiny_model_dir(tmp_path: Path, family: str, *, seed: int = 0) -> Path:
    """Write a tiny random-weight ``family`` model dir under ``tmp_path``; return it."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(tmp_path) / f"tiny-{family}-{seed}"
    if (out / "config.json").is_file():
        return out
    tokenizer = make_tiny_tokenizer()
    config = make_tiny_config(family, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Norm weights (ones, or zeros for Gemma's 1 + w) and biases (zeros) start constant;
    # perturb them so that an exporter that drops or mis-wires one is caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.gate.weight"):
                # MoE routers: at init scale every expert scores ~equally and top-k
                # routing is decided by fp32 noise; make routing decisive.
                p.mul_(50.0)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def padded(lengths: list[int], vocab: int, seed: int = 0):
    """Random token ids [B, max(lengths)], left-padded with 0, and their attention mask."""
    import numpy as np

    rng = np.random.default_rng(seed)
    longest = max(lengths)
    ids = np.zeros((len(lengths), longest), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, longest - n :] = rng.integers(6, vocab, n)
        mask[row, longest - n :] = 1
    return ids, mask


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory fixture: ``tiny_model_dir("llama")`` -> Path of a tiny model dir."""

    def make(family: str, *, seed: int = 0) -> Path:
        return make_tiny_model_dir(tmp_path, family, seed=seed)

    return make


@pytest.fixture
def popc_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point popc's cache at a fresh temp dir."""
    cache = tmp_path / "popc-cache"
    monkeypatch.setenv("POPC_CACHE_DIR", str(cache))
    return cache


class StageRecorder:
    """A popc.progress.Progress that keeps each stage's message, for tests to assert on."""

    def __init__(self) -> None:
        self.stages: list[str] = []

    def stage(self, message: str) -> None:
        self.stages.append(message)

    def start(self, total: int | None) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden staging directories included) with a hash of its content."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_clean_failure(result, *, contains: str) -> None:  # noqa: ANN001 - a typer CliRunner Result
    """A CLI failure as users must see it: a non-zero exit, one ``error:`` line naming the
    problem, no traceback."""
    output = result.output.strip()
    assert result.exit_code != 0, output
    assert "Traceback" not in output
    assert contains in output, output
    assert len([line for line in output.splitlines() if line.startswith("error:")]) == 1, output


# ---- popc serve's engine ------------------------------------------------------------------
def collect(engine, request) -> tuple:  # noqa: ANN001 - popc.serve types, imported lazily
    """Submit ``request``; an Event set when it finishes and the dict its events fill."""
    import threading

    done, result = threading.Event(), {"text": []}

    def on_event(event) -> None:
        result["text"].append(event.text)
        if event.finish_reason:
            result.update(reason=event.finish_reason, usage=event.usage, error=event.error)
            done.set()

    request.on_event = on_event
    result["handle"] = engine.submit(request)
    return done, result


def serve_all(engine, requests: list) -> list[dict]:  # noqa: ANN001
    """Queue ``requests`` before the engine starts, run them all, return their results."""
    waits = [collect(engine, request) for request in requests]
    engine.start()
    try:
        for done, _ in waits:
            assert done.wait(30)
    finally:
        engine.close()
    return [result for _, result in waits]
