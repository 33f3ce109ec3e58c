"""Property-based fuzz of what users hand popc: an export's popc.json, and CLI option values.

Whatever the input, popc either does its job or fails with one clean ``error:`` line (a
PopcError), never a traceback or an "unexpected" error. Bounded to stay a quick check:
a few dozen examples per property, one tiny export per module, no example database.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import make_tiny_model_dir
from popc.artifact import read_export
from popc.cli import app
from popc.errors import PopcError

runner = CliRunner()
fuzz = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

DELETE = object()  # a mutation that removes the key instead of setting it

# Small integers often: a count or a size popc.json names that is plausible but wrong.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-1, 1024) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def assert_ok_or_one_clean_error(result) -> None:  # noqa: ANN001 - a typer CliRunner Result
    output = result.output
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        return
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert "unexpected" not in output, output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A tiny llama source and a POP export of it (so popc.json has a ``pop`` section to fuzz too)."""
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as patch:
        # Offline, a cache of its own, and the ops' function bodies: no example waits on a build.
        patch.setenv("POPC_CACHE_DIR", str(root / "popc-cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("POPC_OPLIB", "off")
        source = make_tiny_model_dir(root, "llama")
        export = root / "export"
        result = runner.invoke(app, ["export", str(source), "--out", str(export), "--sparsity", "0.5"])
        assert result.exit_code == 0, result.output
        yield {"root": root, "source": source, "export": export}


# ---- popc.json --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch_export(tiny: dict[str, Path]) -> tuple[Path, dict[str, Any]]:
    """A copy of the export whose popc.json each example rewrites, and the original config."""
    scratch = tiny["root"] / "scratch"
    shutil.copytree(tiny["export"], scratch)
    return scratch, json.loads((tiny["export"] / "popc.json").read_text())


def config_keys(config: dict[str, Any]) -> list[str]:
    return [*config, *(f"pop.{key}" for key in config["pop"]), "not_a_popc_key"]


def lookup(config: dict[str, Any], key: str) -> Any:
    return config["pop"].get(key[4:]) if key.startswith("pop.") else config.get(key)


def like(value: Any) -> st.SearchStrategy:
    """Values of the same kind as ``value``: plausible, so the checks past the type checks run too."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-1, 2048)
    if isinstance(value, float):
        return st.floats(-0.1, 1.1)
    if isinstance(value, list) and all(isinstance(item, int) for item in value):
        return st.lists(st.integers(-1, 2048), max_size=3)
    return json_values


@st.composite
def mutated_configs(draw: st.DrawFn, original: dict[str, Any]) -> dict[str, Any]:
    """``original`` with one to four keys (top-level or ``pop.``) deleted, or replaced by any JSON
    value or by one of the same kind."""
    config = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(config_keys(original)))
        value = draw(st.just(DELETE) | json_values | like(lookup(original, key)))
        section, name = (config.get("pop"), key[4:]) if key.startswith("pop.") else (config, key)
        if not isinstance(section, dict):
            continue  # the pop section itself was replaced by an earlier change
        if value is DELETE:
            section.pop(name, None)
        else:
            section[name] = value
    return config


def check_config_file(directory: Path) -> None:
    """read_export and ``popc info`` on ``directory``: success, or one clean PopcError."""
    try:
        read_export(directory)
    except PopcError:
        pass
    assert_ok_or_one_clean_error(runner.invoke(app, ["info", str(directory)]))


@fuzz
@given(data=st.data())
def test_a_mutated_popc_json_is_read_or_refused_cleanly(scratch_export, data):
    directory, original = scratch_export
    config = data.draw(mutated_configs(original))
    (directory / "popc.json").write_text(json.dumps(config))
    check_config_file(directory)


@settings(fuzz)
@given(data=st.data())
def test_run_of_a_mutated_popc_json_works_or_fails_cleanly(scratch_export, data):
    directory, original = scratch_export
    config = data.draw(mutated_configs(original))
    (directory / "popc.json").write_text(json.dumps(config))
    argv = ["run", str(directory), "--prompt", "hi", "--max-new-tokens", "2", "--json"]
    assert_ok_or_one_clean_error(runner.invoke(app, argv))


@fuzz
@given(document=json_values)
def test_any_json_document_as_popc_json_is_refused_cleanly(scratch_export, document):
    directory, _ = scratch_export
    (directory / "popc.json").write_text(json.dumps(document))
    with pytest.raises(PopcError):
        read_export(directory)
    result = runner.invoke(app, ["info", str(directory)])
    assert result.exit_code != 0
    assert_ok_or_one_clean_error(result)


# ---- CLI option values ------------------------------------------------------------------------

# Anything at all (nan, inf, negatives, huge), and often a value in range, so checks past the
# first one are reached too.
numbers = st.floats() | st.integers(min_value=-(10**30), max_value=10**30) | st.sampled_from([0, 1, 0.5, 1e-9])
fractions = st.floats(min_value=0.0, max_value=1.0) | numbers


def option_text(value: float | int) -> str:
    """The value as a user would type it (``nan``, ``inf``, ``-1e+308``, ``12``)."""
    return str(value) if isinstance(value, int) or math.isfinite(value) else str(value).lower()


@pytest.fixture(scope="module")
def export_stops_before_tracing(tiny: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """``popc export`` with every check of its options and the model done, but no trace: a
    valid split ends in this one error line instead of a whole export per example."""
    from popc import export as export_module

    def stop(*args: object, **kwargs: object) -> None:
        raise PopcError("fuzz: stopped before tracing")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "trace_to_onnx", stop)
        yield tiny


@fuzz
@given(
    options=st.fixed_dictionaries(
        {}, optional={name: fractions for name in ("--sparsity", "--retain", "--candidate", "--keep")}
    )
)
def test_export_pop_ratios_are_checked_cleanly(export_stops_before_tracing, options):
    tiny = export_stops_before_tracing
    argv = ["export", str(tiny["source"]), "--out", str(tiny["root"] / "never-written")]
    for name, value in options.items():
        argv += [name, option_text(value)]
    assert_ok_or_one_clean_error(runner.invoke(app, argv))
    assert not (tiny["root"] / "never-written").exists()


@fuzz
@given(
    temperature=st.floats(min_value=0.0, max_value=3.0) | numbers,
    top_p=fractions,
    seed=st.none() | st.integers(min_value=-(10**30), max_value=10**30),
    max_new_tokens=st.integers(min_value=-(10**30), max_value=10**30) | st.integers(min_value=-2, max_value=8),
)
def test_run_sampling_options_are_checked_cleanly(tiny, temperature, top_p, seed, max_new_tokens):
    argv = ["run", str(tiny["export"]), "--prompt", "hi", "--json",
            "--temperature", option_text(temperature), "--top-p", option_text(top_p),
            "--max-new-tokens", str(max_new_tokens)]  # fmt: skip
    if seed is not None:
        argv += ["--seed", str(seed)]
    assert_ok_or_one_clean_error(runner.invoke(app, argv))
