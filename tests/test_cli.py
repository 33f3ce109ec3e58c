"""The command line: end to end on a tiny model, and every kind of bad input.

Bad input must give a one-line error, a non-zero exit, no traceback (unless
--debug) and no change on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from conftest import assert_clean_failure, make_tiny_model_dir, snapshot
from popc.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    source = make_tiny_model_dir(root, "llama")
    result = invoke("export", source, "--out", root / "export")
    assert result.exit_code == 0, result.output
    return source, root / "export"


def test_run_json_greedy_equals_transformers(tiny_export):
    source, export_dir = tiny_export
    result = invoke("run", export_dir, "--prompt", "Once upon a time", "--max-new-tokens", 32, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(payload) == {"prompt_ids", "generated_ids", "text", "prefill_ms", "decode_ms_per_token"}
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    inputs = tokenizer("Once upon a time", return_tensors="pt")
    assert payload["prompt_ids"] == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert payload["generated_ids"] == expected[: len(payload["generated_ids"])]


def test_run_streams_text_and_reports_speed(tiny_export):
    _, export_dir = tiny_export
    result = invoke("run", export_dir / "model.onnx", "--prompt", "hi", "--chat", "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output


def test_sampling_is_reproducible_with_a_seed(tiny_export):
    _, export_dir = tiny_export
    args = ("run", export_dir, "--prompt", "hi", "--max-new-tokens", 8, "--temperature", 1.5, "--top-p", 0.9, "--json")
    first = json.loads(invoke(*args, "--seed", 3).stdout.splitlines()[-1])
    again = json.loads(invoke(*args, "--seed", 3).stdout.splitlines()[-1])
    assert first["generated_ids"] == again["generated_ids"]


def test_info_describes_the_export(tiny_export):
    _, export_dir = tiny_export
    result = invoke("info", export_dir)
    assert result.exit_code == 0
    assert "llama" in result.output
    config = json.loads((export_dir / "popc.json").read_text())
    assert config["num_layers"] == 2 and config["input_names"][:2] == ["input_ids", "attention_mask"]


def test_kv_eviction_with_pop_prefill_from_the_command_line(tiny_export, tmp_path):
    source, _ = tiny_export
    out = tmp_path / "kv-skip"
    result = invoke("export", source, "--out", out, "--kv-evict", "--kv-window", 4, "--prefill-skip", 1)
    assert result.exit_code == 0, result.output
    info = invoke("info", out)
    assert "pop-prefill" in info.output and "last 4 prompt tokens" in info.output.replace("\n", " ")
    prompt = " ".join(["hello world"] * 4)
    result = invoke("run", out, "--prompt", prompt, "--max-new-tokens", 3, "--kv-budget", 0.5, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[-1])
    assert len(report["generated_ids"]) == 3


def test_out_as_onnx_path_puts_sidecars_beside_it(tiny_export, tmp_path):
    source, _ = tiny_export
    (tmp_path / "notes.txt").write_text("keep me")
    result = invoke("export", source, "--out", tmp_path / "tiny.onnx")
    assert result.exit_code == 0, result.output
    assert {"tiny.onnx", "tiny.onnx.data", "popc.json", "tokenizer.json", "notes.txt"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".popc-export-")]
    result = invoke("run", tmp_path / "tiny.onnx", "--prompt", "hello", "--max-new-tokens", 3, "--json")
    assert result.exit_code == 0, result.output


def test_existing_export_needs_force(tiny_export):
    source, export_dir = tiny_export
    before = snapshot(export_dir)
    assert_clean_failure(invoke("export", source, "--out", export_dir), contains="--force")
    assert snapshot(export_dir) == before
    assert invoke("export", source, "--out", export_dir, "--force").exit_code == 0


def test_refuses_to_replace_a_directory_popc_did_not_write(tiny_export, tmp_path):
    source, _ = tiny_export
    (tmp_path / "mine.txt").write_text("precious")
    before = snapshot(tmp_path)
    assert_clean_failure(invoke("export", source, "--out", tmp_path, "--force"), contains="not a popc export")
    assert snapshot(tmp_path) == before


def made(path: Path, content: bytes | None) -> Path:
    """A directory (content None) or a file with content; returns the path."""
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "make_input, expected",
    [
        (lambda root: root / "does-not-exist", "no such file or directory"),
        (lambda root: "no-such-org/no-such-model", "not in the local"),
        (lambda root: made(root / "empty", None), "no model"),
        (lambda root: made(root / "bad.gguf", b"GGUF" + os.urandom(64)), "GGUF"),
    ],
    ids=["missing-path", "uncached-hub-id", "empty-dir", "corrupt-gguf"],
)
def test_export_bad_model_input(tmp_path, monkeypatch, make_input, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    model = make_input(tmp_path)
    before = snapshot(tmp_path)
    result = invoke("export", model, "--out", tmp_path / "out")
    assert_clean_failure(result, contains=expected)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "out").exists()


def test_export_unsupported_architecture(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    before = snapshot(tmp_path)
    result = invoke("export", tmp_path / "gpt2", "--out", tmp_path / "out")
    assert_clean_failure(result, contains="gpt2")
    assert "llama" in result.output and "gemma3" in result.output  # lists what is supported
    assert snapshot(tmp_path) == before


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "Traceback" in result.output


def test_prompt_longer_than_context(tiny_export):
    _, export_dir = tiny_export
    before = snapshot(export_dir)
    result = invoke("run", export_dir, "--prompt", "word " * 200)
    assert_clean_failure(result, contains="context")
    assert snapshot(export_dir) == before


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(tiny_export, prompt):
    _, export_dir = tiny_export
    assert_clean_failure(invoke("run", export_dir, "--prompt", prompt), contains="empty")


def test_run_on_a_directory_popc_did_not_write(tiny_export, tmp_path):
    source, _ = tiny_export
    assert_clean_failure(invoke("run", source, "--prompt", "hi"), contains="not a popc export")
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"\x08\x07 this is not a protobuf")
    assert_clean_failure(invoke("run", foreign, "--prompt", "hi"), contains="not a popc export")


def test_corrupt_model_file_in_an_export(tiny_export, tmp_path):
    source, _ = tiny_export
    assert invoke("export", source, "--out", tmp_path / "e").exit_code == 0
    (tmp_path / "e" / "model.onnx").write_bytes(b"garbage")
    assert_clean_failure(invoke("run", tmp_path / "e", "--prompt", "hi"), contains="cannot load")


def test_cuda_device_unavailable_is_a_clear_error(tiny_export):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    _, export_dir = tiny_export
    assert_clean_failure(invoke("run", export_dir, "--prompt", "hi", "--device", "cuda"), contains="CUDA")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_export_leaves_destination_as_it_was(tiny_export, tmp_path, sig):
    source, export_dir = tiny_export
    target = tmp_path / "export"
    assert invoke("export", source, "--out", target).exit_code == 0
    before = snapshot(target)
    process = subprocess.Popen(
        [sys.executable, "-m", "popc", "export", str(source), "--out", str(target), "--force"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".popc-export-*")):  # wait until it is mid-export
        assert process.poll() is None and time.monotonic() < deadline, "export ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(sig)
    process.wait(timeout=60)
    assert snapshot(target) == before
    if sig == signal.SIGTERM:
        assert not list(tmp_path.glob(".popc-export-*")), "staging files left behind"
