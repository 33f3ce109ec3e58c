"""The bad-input corpus (``tests/bad_inputs/cases.toml``) run through the CLI.

Each case is data: the argv, what to lay out on disk first, and the text its one error line
must contain. Every case must fail as users should see it: a non-zero exit, exactly one
``error:`` line naming the problem, no traceback, and nothing on disk changed. A case marked
``xfail`` is a known bug; it is strict, so a fix flips it into a failure until the mark goes.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import assert_clean_failure, make_tiny_model_dir, snapshot
from popc.cli import app

CORPUS = Path(__file__).parent / "bad_inputs" / "cases.toml"
CASES: list[dict[str, Any]] = tomllib.loads(CORPUS.read_text())["case"]

runner = CliRunner()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The read-only inputs cases point at: a tiny llama source, a dense and a POP export of it."""
    root = tmp_path_factory.mktemp("bad-inputs")
    source = make_tiny_model_dir(root, "llama")
    for name, options in {"export": [], "pop-export": ["--sparsity", "0.5"]}.items():
        result = runner.invoke(app, ["export", str(source), "--out", str(root / name), *options])
        assert result.exit_code == 0, result.output
    return {"tiny_model": source, "tiny_export": root / "export", "tiny_pop_export": root / "pop-export"}


def fill(text: str, places: dict[str, Path]) -> str:
    for name, path in places.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def edit_json(path: Path, edit: dict[str, Any]) -> None:
    """``set`` and ``delete`` keys of a JSON object; a dotted key (``pop.keep``) reaches into a section."""
    document = json.loads(path.read_text())

    def section_of(key: str) -> tuple[dict, str]:
        *parents, name = key.split(".")
        section = document
        for parent in parents:
            section = section[parent]
        return section, name

    for key, value in edit.get("set", {}).items():
        section, name = section_of(key)
        section[name] = value
    for key in edit.get("delete", []):
        section, name = section_of(key)
        del section[name]
    path.write_text(json.dumps(document))


def lay_out(case: dict[str, Any], places: dict[str, Path]) -> None:
    """Copy, then remove, then write, then edit what the case names, all under ``{tmp}``."""
    work = places["tmp"]
    for target, source in case.get("copy", {}).items():
        source_path, target_path = Path(fill(source, places)), work / target
        target_path.parent.mkdir(parents=True, exist_ok=True)
        if source_path.is_dir():
            shutil.copytree(source_path, target_path)
        else:
            shutil.copy(source_path, target_path)
    for target in case.get("remove", []):
        (work / target).unlink()
    for target, content in case.get("files", {}).items():
        path = work / target
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):  # { hex = "..." }: bytes that no TOML string holds
            path.write_bytes(bytes.fromhex(content["hex"]))
        else:
            path.write_text(fill(content, places))
    for target, edit in case.get("json", {}).items():
        edit_json(work / target, edit)


def tree(root: Path) -> tuple[dict[str, str], list[str]]:
    """Files with their hashes, and the directories (an empty one left behind counts too)."""
    return snapshot(root), sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())


def as_param(case: dict[str, Any]):  # noqa: ANN201 - a pytest ParameterSet
    # raises=AssertionError: a known bug fails the checks; a case that cannot even be laid out is no xfail.
    marks = [pytest.mark.xfail(reason=case["xfail"], strict=True, raises=AssertionError)] if "xfail" in case else []
    return pytest.param(case, id=case["id"], marks=marks)


def test_the_corpus_is_well_formed():
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    allowed = {"id", "argv", "error", "copy", "remove", "files", "json", "env", "cwd", "xfail"}
    for case in CASES:
        assert set(case) <= allowed, (case["id"], set(case) - allowed)
        assert case["argv"] and case["error"], case["id"]


@pytest.mark.parametrize("case", [as_param(case) for case in CASES])
def test_bad_input(case: dict[str, Any], shared: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    work = tmp_path / "work"
    work.mkdir()
    places = {**shared, "tmp": work}
    # Every place popc may write is inside tmp_path, so the snapshot sees any write at all.
    monkeypatch.setenv("POPC_CACHE_DIR", str(tmp_path / "popc-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("POPC_OPLIB", "off")  # no case may wait for an op library build
    for name, value in case.get("env", {}).items():
        monkeypatch.setenv(name, fill(value, places))
    lay_out(case, places)
    monkeypatch.chdir(work / case.get("cwd", "."))
    before = {name: tree(path) for name, path in {**shared, "case": tmp_path}.items()}

    result = runner.invoke(app, [fill(arg, places) for arg in case["argv"]])

    assert_clean_failure(result, contains=case["error"])
    (error_line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert case["error"] in error_line, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    after = {name: tree(path) for name, path in {**shared, "case": tmp_path}.items()}
    assert after == before, "the command changed files on disk"
