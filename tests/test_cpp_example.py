"""examples/cpp: build popc_generate against the pip wheel's libonnxruntime and check that
its greedy tokens equal popc's (``popc.load(DIR).generate(prompt_ids)``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_model_dir
from popc import oplib

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cpp"
PROMPT_IDS = [1, 72, 101, 108, 108, 111, 44, 32, 119]
NEW_TOKENS = 12


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def popc_generate(tmp_path_factory) -> Path:
    problem = oplib.toolchain_problem()
    if problem:
        if _in_ci():
            pytest.fail(f"CI must build the C++ example, but: {problem}")
        pytest.skip(f"cannot build the C++ example here: {problem}")
    build = tmp_path_factory.mktemp("cpp-build")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run([str(EXAMPLE / "build.sh"), str(build)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    binary = Path(result.stdout.strip().splitlines()[-1])
    assert binary.is_file()
    return binary


@pytest.fixture(scope="session")
def oplib_path() -> str | None:
    info = oplib.find_library()
    if info is None and not oplib.toolchain_problem():
        info = oplib.build()
    return str(info.path) if info else None


def _export(tmp_path: Path, pop) -> Path:  # noqa: ANN001 - PopSettings or None
    from popc.export import ExportPlan, export

    model_dir = make_tiny_model_dir(tmp_path, "llama")
    location = export(ExportPlan(model=str(model_dir), out=tmp_path / "export", pop=pop))
    return location.directory


def _run(binary: Path, directory: Path, library: str | None, *extra: str) -> list[int]:
    command = [str(binary), str(directory), "--ids", ",".join(map(str, PROMPT_IDS)),
               "--max-new-tokens", str(NEW_TOKENS), *extra]  # fmt: skip
    if library:
        command += ["--oplib", library]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [int(t) for t in result.stdout.split()]


@pytest.mark.parametrize("variant", ["dense", "pop"])
def test_cpp_tokens_equal_popc(tmp_path, popc_generate, oplib_path, variant):
    import popc

    pop = None
    if variant == "pop":
        try:
            from popc.pop import PopSettings

            pop = PopSettings(retain=0.25, candidate=0.5, keep=0.25)
        except Exception as error:  # POP-online not in this tree yet
            pytest.skip(f"POP-online export unavailable: {error}")
    directory = _export(tmp_path, pop)
    model = popc.load(directory)
    extra = []
    if "pop_config" in [i.name for i in model.session.get_inputs()]:
        # What popc feeds by default: the export's POP fractions as channel counts (popc.json "pop").
        from popc.pop import PopSettings

        section = json.loads((directory / "popc.json").read_text())["pop"]
        settings = PopSettings(retain=section["retain"], candidate=section["candidate"], keep=section["keep"])
        extra = ["--pop-config", ",".join(str(int(v)) for v in settings.counts(int(section["intermediate_size"])))]
    expected = model.generate(PROMPT_IDS, max_new_tokens=NEW_TOKENS).generated_ids
    assert expected
    assert _run(popc_generate, directory, oplib_path, *extra) == expected
    # The same .onnx runs without the library (the popc ops' function bodies).
    assert _run(popc_generate, directory, None, *extra) == expected


def test_cpp_rejects_bad_arguments(popc_generate, tmp_path):
    result = subprocess.run([str(popc_generate), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "--ids" in result.stderr
    result = subprocess.run([str(popc_generate), str(tmp_path), "--ids", "1,2"], capture_output=True, text=True)
    assert result.returncode == 1 and "error" in result.stderr
