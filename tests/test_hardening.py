"""Hostile and careless inputs (issue "Hardening"): no code from a model or an export runs,
nothing popc did not write is touched, and a bad input is an error, never a wrong result.

Each test here failed before its fix; the security ones are written as regressions would
show: a marker file that must not appear, a user file that must survive.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import assert_clean_failure, make_tiny_model_dir, snapshot
from popc.cli import app
from popc.errors import PopcError

runner = CliRunner()


def invoke(*args: object, stdin: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=stdin, catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny llama source directory, a dense export of it); tests copy, never modify, them."""
    root = tmp_path_factory.mktemp("hardening")
    source = make_tiny_model_dir(root, "llama")
    result = invoke("export", source, "--out", root / "export")
    assert result.exit_code == 0, result.output
    return source, root / "export"


def copy_of(directory: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(directory, target)
    return target


# ---- 1. no code from an export or a model runs ---------------------------------------------


def plant_custom_tokenizer(directory: Path, marker: Path, *, keep_class: bool = False) -> None:
    """An ``auto_map`` naming a tokenizer class in a ``.py`` beside it that creates ``marker``.

    Without ``tokenizer_class`` transformers has no class of its own to fall back on, and
    without ``trust_remote_code=False`` it prompts "run the custom code? [y/N]" and, given
    "y", imports the file."""
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if not keep_class:
        config.pop("tokenizer_class", None)
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    config_path.write_text(json.dumps(config))
    (directory / "evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('code from the model ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )


@pytest.mark.parametrize("command", ["run", "eval", "load"])
def test_code_beside_an_export_never_runs(tiny, tmp_path, monkeypatch, command):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    export = copy_of(tiny[1], tmp_path)
    marker = tmp_path / "MARKER"
    plant_custom_tokenizer(export, marker)
    if command == "load":
        import popc

        with pytest.raises(PopcError, match="auto_map"):
            popc.load(export)
    else:
        args = ["--prompt", "hi", "--max-new-tokens", 2] if command == "run" else ["--methods", "dense", "--tasks", "none", "--windows", 0]
        assert_clean_failure(invoke(command, export, *args, stdin="y\ny\n"), contains="auto_map")
    assert not marker.exists()


def test_export_does_not_copy_auto_map(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    source = copy_of(tiny[0], tmp_path, "source")
    marker = tmp_path / "MARKER"
    # With its own tokenizer class named, transformers ignores auto_map (trust_remote_code=False).
    plant_custom_tokenizer(source, marker, keep_class=True)
    result = invoke("export", source, "--out", tmp_path / "export", stdin="y\ny\n")
    assert result.exit_code == 0, result.output
    assert "auto_map" not in json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert not list((tmp_path / "export").glob("*.py"))
    assert not marker.exists()
    assert invoke("run", tmp_path / "export", "--prompt", "hi", "--max-new-tokens", 2).exit_code == 0


# ---- 2. --force replaces a popc export, and nothing else -----------------------------------


def test_force_does_not_delete_a_directory_with_any_popc_json(tiny, tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "popc.json").write_text("{}")
    (target / "keep").write_text("x")
    before = snapshot(target)
    assert_clean_failure(invoke("export", tiny[0], "--out", target, "--force"), contains="not a popc export")
    assert snapshot(target) == before


def test_force_does_not_delete_files_added_to_an_export(tiny, tmp_path):
    export = copy_of(tiny[1], tmp_path)
    (export / "notes.txt").write_text("mine")
    before = snapshot(export)
    assert_clean_failure(invoke("export", tiny[0], "--out", export, "--force"), contains="notes.txt")
    assert snapshot(export) == before


def test_force_replaces_a_popc_export(tiny, tmp_path):
    export = copy_of(tiny[1], tmp_path)
    (export / "model.onnx.data").write_bytes(b"stale")
    assert invoke("export", tiny[0], "--out", export, "--force").exit_code == 0
    assert (export / "model.onnx.data").read_bytes() != b"stale"


def test_a_file_added_during_the_export_survives(tiny, tmp_path, monkeypatch):
    from popc import export as export_module

    export = copy_of(tiny[1], tmp_path)
    real_trace = export_module.trace_to_onnx

    def trace_then_add_a_file(*args, **kwargs):
        (export / "added-meanwhile.txt").write_text("mine")
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(export_module, "trace_to_onnx", trace_then_add_a_file)
    assert_clean_failure(invoke("export", tiny[0], "--out", export, "--force"), contains="added-meanwhile.txt")
    assert (export / "added-meanwhile.txt").read_text() == "mine"
    assert (export / "popc.json").is_file()


# ---- 3. --out DIR/name.onnx replaces nothing without --force --------------------------------


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tiny.onnx.data"])
def test_out_onnx_path_keeps_the_files_beside_it(tiny, tmp_path, name):
    (tmp_path / name).write_text("the user's own")
    before = snapshot(tmp_path)
    assert_clean_failure(invoke("export", tiny[0], "--out", tmp_path / "tiny.onnx"), contains=name)
    assert snapshot(tmp_path) == before
    assert invoke("export", tiny[0], "--out", tmp_path / "tiny.onnx", "--force").exit_code == 0
    assert (tmp_path / name).read_bytes() != b"the user's own"


def test_out_onnx_path_never_removes_a_directory(tiny, tmp_path):
    (tmp_path / "tokenizer.json").mkdir()
    (tmp_path / "tokenizer.json" / "inside").write_text("mine")
    result = invoke("export", tiny[0], "--out", tmp_path / "tiny.onnx", "--force")
    assert_clean_failure(result, contains="is a directory")
    assert (tmp_path / "tokenizer.json" / "inside").read_text() == "mine"


# ---- 4. every path an export names is inside it --------------------------------------------


def point_model_file(export: Path, model_file: str) -> None:
    config = json.loads((export / "popc.json").read_text())
    config["model_file"] = model_file
    (export / "popc.json").write_text(json.dumps(config))


@pytest.mark.parametrize("how", ["absolute", "parent", "nested", "dot"])
@pytest.mark.parametrize("command", ["run", "info"])
def test_model_file_outside_the_export_is_refused(tiny, tmp_path, how, command):
    other = copy_of(tiny[1], tmp_path, "other")
    export = copy_of(tiny[1], tmp_path)
    model_file = {
        "absolute": str(other / "model.onnx"),
        "parent": "../other/model.onnx",
        "nested": "sub/model.onnx",
        "dot": ".",
    }[how]
    (export / "sub").mkdir()
    shutil.copy(other / "model.onnx", export / "sub")
    point_model_file(export, model_file)
    args = ["--prompt", "hi", "--max-new-tokens", 2] if command == "run" else []
    assert_clean_failure(invoke(command, export, *args), contains="model_file")


def test_a_link_out_of_the_export_is_refused(tiny, tmp_path):
    other = copy_of(tiny[1], tmp_path, "other")
    export = copy_of(tiny[1], tmp_path)
    (export / "model.onnx").unlink()
    (export / "model.onnx").symlink_to(other / "model.onnx")
    result = invoke("run", export, "--prompt", "hi", "--max-new-tokens", 2)
    assert_clean_failure(result, contains="leads outside the export")


# ---- 5. weights that do not match the config are an error, not random values ---------------


@pytest.mark.parametrize("change, expected", [
    ("none of the model's", "missing"),
    ("one tensor dropped", "1 missing tensor(s) (model.norm.weight)"),
    ("one tensor added", "1 unexpected tensor(s) (model.extra.weight)"),
])  # fmt: skip
def test_weights_that_do_not_match_the_config_are_refused(tiny, tmp_path, change, expected):
    import torch
    from safetensors.torch import load_file, save_file

    source = copy_of(tiny[0], tmp_path, "source")
    tensors = load_file(source / "model.safetensors")
    if change == "none of the model's":
        tensors = {"something.else": torch.zeros(3)}
    elif change == "one tensor dropped":
        del tensors["model.norm.weight"]
    else:
        tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    result = invoke("export", source, "--out", tmp_path / "export")
    assert_clean_failure(result, contains=expected)
    assert not (tmp_path / "export").exists()


# ---- 6. a split that rounds to no channels is refused, never run dense under a POP label ----


def test_a_split_of_no_channels_is_refused():
    from popc.pop import PopSettings

    with pytest.raises(PopcError, match="no FFN channels"):
        PopSettings(retain=0.0, candidate=0.0, keep=0.0)
    with pytest.raises(PopcError, match="rounds to no channels of the 128-channel FFN"):
        PopSettings(retain=0.003, candidate=0.0, keep=0.0).counts(128)  # prompt-fixed at 99.7 %
    with pytest.raises(PopcError, match="rounds to no channels"):
        PopSettings(retain=0.0, candidate=1.0, keep=0.003).counts(128)  # per-token at 99.7 %
    assert PopSettings(retain=0.0, candidate=1.0, keep=0.01).counts(128).tolist() == [0, 128, 1, 0]


def test_export_refuses_retain_candidate_keep_all_zero(tiny, tmp_path):
    result = invoke("export", tiny[0], "--out", tmp_path / "pop", "--retain", 0, "--candidate", 0, "--keep", 0)
    assert_clean_failure(result, contains="no FFN channels")
    assert not (tmp_path / "pop").exists()


@pytest.fixture(scope="module")
def tiny_pop_export(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pop") / "export"
    assert invoke("export", tiny[0], "--out", out, "--sparsity", 0.5).exit_code == 0
    return out


def test_a_split_that_rounds_to_nothing_is_refused_at_export(tiny, tmp_path):
    out = tmp_path / "pop"
    result = invoke("export", tiny[0], "--out", out, "--retain", 0.001, "--candidate", 0.002, "--keep", 0.001)
    assert_clean_failure(result, contains="rounds to no channels of the 128-channel FFN")  # the FFN's width decides
    assert not out.exists()


def test_an_export_whose_split_rounds_to_nothing_does_not_run_dense(tiny, tmp_path):
    out = tmp_path / "pop"
    assert invoke("export", tiny[0], "--out", out, "--sparsity", 0.5).exit_code == 0
    config = json.loads((out / "popc.json").read_text())
    config["pop"].update(retain=0.001, candidate=0.002, keep=0.001)  # an export written by hand, or by an older popc
    (out / "popc.json").write_text(json.dumps(config))
    result = invoke("run", out, "--prompt", "hi", "--max-new-tokens", 2)
    assert_clean_failure(result, contains="rounds to no channels of the 128-channel FFN")


# Not "pop": its default split spends the sparsity's FFN cost (1 - 3S/4 of the bytes, at least
# a quarter), so it always keeps channels (popc.defaults).
@pytest.mark.parametrize("method", ["griffin", "dynamic", "static"])
def test_eval_gives_no_row_for_a_sparsity_of_no_channels(tiny_pop_export, tmp_path, method):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = ["--sparsities", 0.997, "--methods", method, "--tasks", "none", "--text", text, "--windows", 1]
    assert_clean_failure(invoke("eval", tiny_pop_export, *args), contains="rounds to no channels")


# ---- 9. popc.json is validated against one schema on read -----------------------------------


def edit_config(export: Path, key: str, value: object) -> None:
    """Set (or with ``...`` delete) ``key`` of popc.json; ``pop.x`` reaches into the POP section."""
    config = json.loads((export / "popc.json").read_text())
    section, name = (config["pop"], key[4:]) if key.startswith("pop.") else (config, key)
    if value is ...:
        del section[name]
    else:
        section[name] = value
    (export / "popc.json").write_text(json.dumps(config))


@pytest.mark.parametrize("key, value, expected", [
    ("num_layers", ..., "lacks num_layers"),
    ("num_layers", "2", "num_layers must be an integer"),
    ("head_dim", 0, "head_dim must be an integer >= 1"),
    ("format_version", "1", "format_version must be an integer, got '1'"),
    ("format_version", 2, "format version 2, this popc reads 1"),
    ("model_file", "/dev/zero", "model_file must be a file name inside the export"),
    ("model_file", ".", "model_file must be a file name inside the export"),
    ("model_file", 7, "model_file must be a file name inside the export"),
    ("eos_token_ids", "2", "eos_token_ids must be a list of token ids"),
    ("versions", ["torch"], "versions must be an object of strings"),
    ("pop", "yes", "pop must be an object or null"),
    ("pop.retain", "0.25", "pop.retain must be a fraction in [0, 1]"),
    ("pop.keep", ..., "lacks pop.keep"),
    ("pop.intermediate_size", True, "pop.intermediate_size must be an integer >= 1"),
])  # fmt: skip
@pytest.mark.parametrize("command", ["info", "run"])
def test_a_malformed_popc_json_is_named_not_a_traceback(tiny_pop_export, tmp_path, key, value, expected, command):
    export = copy_of(tiny_pop_export, tmp_path)
    edit_config(export, key, value)
    before = snapshot(export)
    args = ["--prompt", "hi", "--max-new-tokens", 2] if command == "run" else []
    assert_clean_failure(invoke(command, export, *args), contains=expected)
    assert snapshot(export) == before


def test_an_oversized_popc_json_is_not_read(tiny, tmp_path):
    export = copy_of(tiny[1], tmp_path)
    with open(export / "popc.json", "a") as config:
        config.write(" " * (1 << 20))
    assert_clean_failure(invoke("info", export), contains="larger than any popc.json")


# ---- 7. text inputs are regular files of bounded size ---------------------------------------


def text_commands(export: Path, path: Path) -> dict[str, list[object]]:
    return {
        "run": ["run", export, "--prompt-file", path, "--max-new-tokens", 2],
        "eval": ["eval", export, "--text", path, "--tasks", "none", "--windows", 1],
        "analyze": ["analyze", export, "--text", path, "--windows", 1],
    }


@pytest.mark.parametrize("command", ["run", "eval", "analyze"])
def test_a_device_is_not_read_as_text(tiny, command):
    option = "--prompt-file" if command == "run" else "--text"
    source_or_export = tiny[0] if command == "analyze" else tiny[1]
    result = invoke(*text_commands(source_or_export, Path("/dev/zero"))[command])
    assert_clean_failure(result, contains=f"{option}: /dev/zero is not a regular file")


@pytest.mark.parametrize("command", ["run", "eval", "analyze"])
def test_an_oversized_text_file_is_not_read(tiny, tmp_path, command):
    big = tmp_path / "big.txt"
    with open(big, "wb") as handle:
        handle.truncate(3 << 30)  # sparse: 3 GB on paper, nothing on disk
    source_or_export = tiny[0] if command == "analyze" else tiny[1]
    result = invoke(*text_commands(source_or_export, big)[command])
    assert_clean_failure(result, contains="is 3.0 GB; popc reads at most 64.0 MB of text")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tiny, tmp_path):
    fifo = tmp_path / "prompt.fifo"
    os.mkfifo(fifo)
    result = invoke("run", tiny[1], "--prompt-file", fifo)
    assert_clean_failure(result, contains="is not a regular file")


def test_a_prompt_file_is_still_read(tiny, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello there")
    result = invoke("run", tiny[1], "--prompt-file", prompt, "--max-new-tokens", 2, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["prompt_ids"]


# ---- 8. a cached op library is verified before it is loaded --------------------------------


@pytest.fixture
def cached_library_copy(tmp_path, monkeypatch) -> Path:
    """The real op library, copied (with a build-info.json recording it) into a fresh POPC_CACHE_DIR."""
    from popc import oplib

    real = oplib.find_library()
    if real is None or oplib._elf_problem(real.path) is not None:
        pytest.skip("no built op library to copy (popc doctor --build)")
    headers = oplib.find_headers()  # the real cache's: a rebuild in the fresh cache needs no download
    if headers is not None:
        monkeypatch.setenv("POPC_ORT_INCLUDE_DIR", str(headers))
    monkeypatch.setenv("POPC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("POPC_OPLIB", raising=False)
    monkeypatch.setenv("POPC_OPLIB_AUTOBUILD", "0")
    monkeypatch.setattr(oplib, "_notice_shown", False)
    target = oplib.build_dir()
    target.mkdir(parents=True)
    shutil.copyfile(real.path, target / oplib.LIBRARY_NAME)
    record = {"cuda": False, **oplib.file_record(target / oplib.LIBRARY_NAME)}
    (target / "build-info.json").write_text(json.dumps(record))
    return target / oplib.LIBRARY_NAME


def test_a_truncated_cached_library_is_refused_not_a_sigbus(cached_library_copy):
    import subprocess
    import sys

    os.truncate(cached_library_copy, cached_library_copy.stat().st_size // 2)
    done = subprocess.run([sys.executable, "-m", "popc", "doctor", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # was -7 (SIGBUS), nothing printed
    report = json.loads(done.stdout)
    assert report["loaded"] is False and "is truncated" in report["load_error"], report
    assert "refusing to load it" in report["load_error"]
    wide = {**os.environ, "COLUMNS": "400"}  # the table does not wrap the message
    done = subprocess.run([sys.executable, "-m", "popc", "doctor"], capture_output=True, text=True, timeout=300, env=wide)
    assert done.returncode == 0 and "is truncated" in done.stdout, done.stdout[-2000:]


def test_an_altered_cached_library_is_not_registered(cached_library_copy, capsys):
    import onnxruntime as ort

    from popc import oplib

    data = bytearray(cached_library_copy.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    cached_library_copy.write_bytes(bytes(data))
    assert oplib.register_library(ort.SessionOptions()) is False
    err = capsys.readouterr().err
    assert "sha256 mismatch" in " ".join(err.split()), err


def test_a_truncated_cached_library_is_rebuilt_when_building_is_allowed(cached_library_copy, monkeypatch):
    from popc import oplib

    if oplib.toolchain_problem() or oplib.find_headers() is None:
        pytest.skip("cannot build the op library here without a download")
    os.truncate(cached_library_copy, 4096)
    monkeypatch.setenv("POPC_OPLIB_AUTOBUILD", "1")
    monkeypatch.setenv("POPC_OPLIB_CUDA", "0")  # the CPU kernels are enough, and quicker
    info = oplib.ensure_library()
    assert info is not None and info.problem is None, info
    assert info.build["size"] == cached_library_copy.stat().st_size > 4096


# ---- 10. smaller: foreign graphs, sampling values, unwritable --out, broken exports, stale staging


def forge_foreign_export(tiny, tmp_path) -> Path:
    """A valid one-node ONNX graph (Add) under a copied, valid popc.json."""
    import onnx
    from onnx import TensorProto, helper

    export = copy_of(tiny[1], tmp_path, "foreign")
    graph = helper.make_graph(
        [helper.make_node("Add", ["A", "B"], ["C"])],
        "foreign",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ("A", "B")],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [1])],
    )
    (export / "model.onnx.data").unlink()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), export / "model.onnx")
    return export


@pytest.mark.parametrize("command", ["run", "info"])
def test_a_foreign_onnx_graph_is_named_as_foreign(tiny, tmp_path, command):
    export = forge_foreign_export(tiny, tmp_path)
    args = ["--prompt", "hi", "--max-new-tokens", 2] if command == "run" else []
    result = invoke(command, export, *args)
    assert_clean_failure(result, contains="is not a graph popc exported (no int64 input 'input_ids')")


def test_the_runtime_names_a_foreign_graph(tiny, tmp_path):
    from popc.runtime import load

    with pytest.raises(PopcError, match="is not a graph popc exported"):
        load(forge_foreign_export(tiny, tmp_path))


def test_a_graph_with_fewer_layers_than_its_config_is_foreign(tiny, tmp_path):
    export = copy_of(tiny[1], tmp_path)
    edit_config(export, "num_layers", json.loads((export / "popc.json").read_text())["num_layers"] + 1)
    assert_clean_failure(invoke("run", export, "--prompt", "hi"), contains="for layer")


def test_info_reports_a_truncated_model_file(tiny, tmp_path):
    export = copy_of(tiny[1], tmp_path)
    os.truncate(export / "model.onnx", (export / "model.onnx").stat().st_size // 2)
    assert_clean_failure(invoke("info", export), contains="does not parse as ONNX")


def test_info_reports_a_missing_data_file(tiny, tmp_path):
    export = copy_of(tiny[1], tmp_path)
    (export / "model.onnx.data").unlink()
    assert_clean_failure(invoke("info", export), contains="'model.onnx.data', which is missing")


def test_info_reports_a_truncated_data_file(tiny, tmp_path):
    export = copy_of(tiny[1], tmp_path)
    os.truncate(export / "model.onnx.data", (export / "model.onnx.data").stat().st_size - 1)
    assert_clean_failure(invoke("info", export), contains="the export is broken (truncated)")


def test_info_shows_a_healthy_export(tiny):
    result = invoke("info", tiny[1])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("option, value, expected", [
    ("--seed", -5, "--seed must be an integer >= 0, got -5"),
    ("--temperature", "nan", "--temperature must be a finite number >= 0"),
    ("--temperature", "inf", "--temperature must be a finite number >= 0"),
    ("--temperature", -1, "--temperature must be a finite number >= 0"),
    ("--top-p", 0, "--top-p must be in (0, 1]"),
    ("--top-p", 1.5, "--top-p must be in (0, 1]"),
    ("--top-p", "nan", "--top-p must be in (0, 1]"),
])  # fmt: skip
def test_bad_sampling_values_are_refused_before_the_model_loads(tiny, tmp_path, monkeypatch, option, value, expected):
    import popc.runtime

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the option was checked")

    monkeypatch.setattr(popc.runtime, "load", no_load)
    args = ["--temperature", 1.0] if option != "--temperature" else []
    result = invoke("run", tiny[1], "--prompt", "hi", *args, option, value)
    assert_clean_failure(result, contains=expected)


@pytest.mark.parametrize("values", [
    dict(temperature=float("nan")), dict(temperature=float("inf")), dict(seed=-5), dict(top_p=float("inf")),
])  # fmt: skip
def test_the_runtime_refuses_bad_sampling_values(values):
    from popc.runtime import SamplingOptions

    with pytest.raises(PopcError, match="must be"):
        SamplingOptions(**{"temperature": 1.0, **values})


def unwritable_directory(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return Path("/proc")  # root writes through any mode bits, but not into a pseudo-filesystem
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    return directory


@pytest.mark.parametrize("name", ["export", "model.onnx", "deeper/export"])
def test_an_unwritable_out_is_found_before_the_model_loads(tiny, tmp_path, monkeypatch, name):
    import popc.export

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(popc.export, "load_model", no_load)
    out = unwritable_directory(tmp_path) / name
    assert_clean_failure(invoke("export", tiny[0], "--out", out), contains="is not writable")


def make_staging(parent: Path, name: str, pid: int | None, age: float) -> Path:
    import socket
    import time

    staging = parent / f".popc-export-{name}"
    (staging / "content").mkdir(parents=True)
    (staging / "traced.onnx").write_bytes(b"\0" * 1024)
    if pid is not None:
        (staging / ".owner").write_text(f"{pid} {socket.gethostname()}\n")
        then = time.time() - age
        os.utime(staging / ".owner", (then, then))
    return staging


def test_an_export_removes_staging_directories_left_by_killed_exports(tiny, tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # exited: its pid names no process (unless reused within this test)
    stale = make_staging(tmp_path, "stale", dead_pid, age=3600)
    live = make_staging(tmp_path, "live", os.getpid(), age=3600)  # an export still running
    fresh = make_staging(tmp_path, "fresh", dead_pid, age=0)  # too young to judge
    unmarked = make_staging(tmp_path, "unmarked", None, age=3600)  # not provably popc's
    assert invoke("export", tiny[0], "--out", tmp_path / "export").exit_code == 0
    assert not stale.exists()
    assert live.exists() and fresh.exists() and unmarked.exists()
    left = sorted(p.name for p in tmp_path.glob(".popc-export-*"))
    assert left == [".popc-export-fresh", ".popc-export-live", ".popc-export-unmarked"]  # and no new one


def test_an_export_marks_its_staging_directory_with_its_pid(tiny, tmp_path, monkeypatch):
    import popc.export

    seen = []
    trace = popc.export.trace_to_onnx

    def watching_trace(loaded, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append((path.parent / ".owner").read_text().split()[0])
        return trace(loaded, path, *args, **kwargs)

    monkeypatch.setattr(popc.export, "trace_to_onnx", watching_trace)
    assert invoke("export", tiny[0], "--out", tmp_path / "export").exit_code == 0
    assert seen == [str(os.getpid())]
    assert not (tmp_path / "export" / ".owner").exists()


@pytest.mark.parametrize("command", ["run", "eval", "analyze"])
def test_a_bad_text_file_fails_before_the_model_loads(tiny, monkeypatch, command):
    import popc.loading
    import popc.runtime

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the text file was checked")

    monkeypatch.setattr(popc.runtime, "load", no_load)
    monkeypatch.setattr(popc.loading, "load_model", no_load)
    source_or_export = tiny[0] if command == "analyze" else tiny[1]
    result = invoke(*text_commands(source_or_export, Path("/dev/zero"))[command])
    assert_clean_failure(result, contains="/dev/zero is not a regular file")
