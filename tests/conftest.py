"""Shared test helpers: tiny, deterministic, random-weight models built offline.

``make_tiny_model_dir(tmp_path, family)`` writes a Hugging Face model directory
(config.json + model.safetensors + tokenizer files with a chat template) and returns
its path. Families: "llama", "qwen2", "gemma3", "mistral". Same seed -> same weights.

Import it directly (``from conftest import make_tiny_model_dir``) or use the
``tiny_model_dir`` fixture (a factory: ``tiny_model_dir("gemma3")``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

TINY_FAMILIES = ("llama", "qwen2", "gemma3", "mistral", "mixtral", "qwen2_moe")

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
    """The tiny config for ``family`` (hidden 64, 4 heads / 2 kv heads, head_dim 16)."""
    common = dict(
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
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            num_hidden_layers=2,
            tie_word_embeddings=True,  # like SmolLM2
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common,
        )
    if family == "qwen2":
        from transformers import Qwen2Config

        # Qwen2 always has q/k/v biases (no o_proj bias); untied lm_head here.
        return Qwen2Config(
            num_hidden_layers=2,
            tie_word_embeddings=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            **common,
        )
    if family == "mistral":
        from transformers import MistralConfig

        return MistralConfig(
            num_hidden_layers=2,
            tie_word_embeddings=False,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common,
        )
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            num_hidden_layers=4,
            layer_types=[
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ],
            sliding_window=4,
            # != head_dim on purpose, so an exporter that assumes head_dim**-0.5 is caught.
            query_pre_attn_scalar=32,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            **common,
        )
    if family == "mixtral":
        from transformers import MixtralConfig

        common["intermediate_size"] = 96
        return MixtralConfig(
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common,
        )
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        # Experts narrower than the shared expert, as in Qwen-MoE; top-k weights not renormalised.
        return Qwen2MoeConfig(
            num_hidden_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            norm_topk_prob=False,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            **common,
        )
    raise ValueError(f"unknown tiny family {family!r}; expected one of {TINY_FAMILIES}")


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
