"""Evaluation data, fetched on demand from PyPI with pip and cached.

* The default perplexity text is ``lee_background.cor`` (Lee news corpus, ~360 kB of
  English news text) from the test data of the ``gensim`` wheel. popc downloads the
  wheel with ``pip download`` (gensim is never installed or imported), extracts that
  one file with :mod:`zipfile` and keeps it in the cache.
* Multiple-choice items are BIG-bench JSON tasks (``task.json`` files) from the
  ``bigbench`` sdist. The sdist is large (~1.8 GB unpacked), so popc fetches it once,
  copies the ``task.json`` of the tasks it uses into the cache and deletes the rest.
  Nothing in it is imported, executed by popc, or unpickled: only JSON is read.

Everything lands under ``$POPC_CACHE_DIR/data`` (default ``~/.cache/popc/data``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popc.atomic import atomic_write, staging_directory
from popc.cache import cache_root
from popc.errors import NotOnIndex, PopcError
from popc.pip_fetch import pip_download

LEE_NAME = "lee_background.cor"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
BIGBENCH_VERSION = "1.0.0"
BIGBENCH_TASK_DIR = "bigbench/benchmark_tasks"

# JSON multiple-choice tasks on which SmolLM2-135M (dense, zero-shot, sum of answer
# log-likelihoods) does clearly better than chance; see the README's eval section.
DEFAULT_TASKS = ("emoji_movie", "general_knowledge", "date_understanding", "logical_sequence", "human_organs_senses")
# Extracted together with the defaults whenever the sdist is fetched (cheap; it's the
# download that costs), so `--tasks` can pick among them without a second download.
EXTRA_TASKS = (
    "hyperbaton",
    "anachronisms",
    "known_unknowns",
    "misconceptions",
    "periodic_elements",
    "physical_intuition",
    "riddle_sense",
    "novel_concepts",
    "sports_understanding",
    "navigate",
    "timedial",
    "logical_sequence",
    "swahili_english_proverbs",
    "odd_one_out",
    "implicatures",
    "strategyqa",
    "winowhy",
    "snarks",
    "date_understanding",
    "entailed_polarity",
    "fantasy_reasoning",
)
DEFAULT_LIMIT = 50  # examples per task (popc eval --full)


def data_dir() -> Path:
    return cache_root() / "data"


# --------------------------------------------------------------------------- pip


def _pip_download(args: Sequence[str], dest: Path, what: str, env: dict[str, str] | None = None) -> int:
    """Run ``pip download ARGS -d DEST`` with a progress bar on stderr; pip's exit status.

    pip's log is kept for :func:`_pip_tail`; raises PopcError only if pip cannot be started.
    """
    from rich.console import Console

    from popc.progress import console_progress

    with console_progress(Console(stderr=True)) as progress:
        progress.stage(f"pip download {what}")
        result = pip_download(args, dest, what, progress, env=env)
    _pip_download.last_result = result  # type: ignore[attr-defined]
    return result.status


def _pip_tail() -> str:
    result = getattr(_pip_download, "last_result", None)
    return result.last_line if result is not None else "no output"


@contextlib.contextmanager
def _work_directory(prefix: str, hint: str = "") -> Iterator[Path]:
    """A staging directory under the data dir, removed afterwards; an unwritable cache is a
    one-line error rather than a traceback."""
    with contextlib.ExitStack() as stack:
        try:
            work = stack.enter_context(staging_directory(data_dir(), prefix))
        except OSError as error:
            raise PopcError(f"cannot write popc's cache under {data_dir()}: {error}{hint}") from None
        yield work


# --------------------------------------------------------------------------- perplexity text


def default_text_path() -> Path:
    """``lee_background.cor``, fetched from the gensim wheel on first use."""
    target = data_dir() / LEE_NAME
    if target.is_file():
        return target
    hint = "pass a text file with --text FILE instead"
    with _work_directory("gensim", f"; {hint}") as work:
        status = _pip_download(["--only-binary=:all:", "gensim"], work, "gensim wheel (for its test text)")
        if status != 0:  # no wheel for this interpreter: any platform's wheel has the same text
            status = _pip_download(
                ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "gensim"],
                work, "gensim wheel (for its test text)",
            )
        wheels = sorted(work.glob("gensim-*.whl"))
        if status != 0 or not wheels:
            raise PopcError(f"could not download the gensim wheel with pip ({_pip_tail()}); {hint}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                data = wheel.read(LEE_MEMBER)
        except (KeyError, zipfile.BadZipFile) as error:
            raise PopcError(f"{wheels[0].name} has no readable {LEE_MEMBER} ({error}); {hint}") from None
        atomic_write(target, data)
    return target


# --------------------------------------------------------------------------- BIG-bench


@dataclass
class ChoiceItem:
    """One multiple-choice question: the prompt, its answers and which is right."""

    prompt: str
    choices: list[str]
    answer: int


def _task_path(name: str) -> Path:
    return data_dir() / "bigbench" / f"{name}.json"


def _check_task_name(name: str) -> None:
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise PopcError(f"invalid BIG-bench task name {name!r}")


def fetch_bigbench(tasks: Sequence[str]) -> dict[str, Path]:
    """The cached ``task.json`` of each task, fetching the bigbench sdist if any is missing."""
    for name in tasks:
        _check_task_name(name)
    missing = [name for name in tasks if not _task_path(name).is_file()]
    if missing:
        wanted = list(dict.fromkeys([*missing, *DEFAULT_TASKS, *EXTRA_TASKS]))
        _extract_bigbench(wanted, required=missing)
    return {name: _task_path(name) for name in tasks}


def _extract_bigbench(wanted: list[str], required: list[str]) -> None:
    """Download the bigbench sdist with pip and copy the wanted task.json files to the cache.

    Recent pip refuses to finish downloading bigbench (its metadata names a direct-URL
    dependency), after it has unpacked the sdist; ``--no-clean`` keeps that unpacked tree
    in our own temp dir, and the task files are read from there. Older pip saves the
    .tar.gz into ``-d``; then they are read from the archive.
    """
    hint = "check your network / pip configuration, or pass task names that are cached"
    found: dict[str, bytes] = {}
    with _work_directory("bigbench") as work:
        (work / "tmp").mkdir()
        env = dict(os.environ, TMPDIR=str(work / "tmp"), TEMP=str(work / "tmp"), TMP=str(work / "tmp"))
        _pip_download(
            ["--no-binary=:all:", "--no-clean", f"bigbench=={BIGBENCH_VERSION}"],
            work / "dist", "bigbench sdist (large; once)", env=env,
        )
        archives = sorted((work / "dist").glob("bigbench-*.tar.gz")) if (work / "dist").is_dir() else []
        if archives:
            with tarfile.open(archives[0]) as archive:
                for member in archive.getmembers():
                    parts = member.name.split("/")
                    if (member.isfile() and len(parts) == 5 and parts[1:3] == BIGBENCH_TASK_DIR.split("/")
                            and parts[4] == "task.json" and parts[3] in wanted):
                        handle = archive.extractfile(member)
                        if handle is not None:
                            found[parts[3]] = handle.read()
        else:
            roots = list((work / "tmp").glob(f"pip-*/*/{BIGBENCH_TASK_DIR}"))
            for root in roots[:1]:
                for name in wanted:
                    path = root / name / "task.json"
                    if path.is_file() and not path.is_symlink():
                        found[name] = path.read_bytes()
        if not found:
            message = f"could not fetch the bigbench sdist with pip ({_pip_tail()}); {hint}"
            raise (NotOnIndex if "No matching distribution" in _pip_tail() else PopcError)(message)
        for name, data in found.items():
            try:
                json.loads(data)
            except ValueError:
                continue
            atomic_write(_task_path(name), data)
    absent = [name for name in required if name not in found]
    if absent:
        raise PopcError(f"no JSON task named {', '.join(absent)} in bigbench {BIGBENCH_VERSION}")


def parse_task(data: dict[str, Any], limit: int | None = DEFAULT_LIMIT, name: str = "task") -> list[ChoiceItem]:
    """A BIG-bench JSON task -> zero-shot multiple-choice items, in BIG-bench's prompt format.

    Prompt: ``task_prefix + example_input_prefix + input [+ choices] + example_output_prefix``
    (defaults "\\nQ: ", "\\nA: ", choices appended unless ``append_choices_to_input`` is
    false). The right answer is the choice of highest ``target_scores`` (ties: the first).
    """
    examples = data.get("examples")
    if not isinstance(examples, list):
        raise PopcError(f"BIG-bench task {name} has no examples list")
    prefix = str(data.get("task_prefix", ""))
    input_prefix = str(data.get("example_input_prefix", "\nQ: "))
    output_prefix = str(data.get("example_output_prefix", "\nA: "))
    choice_prefix = str(data.get("choice_prefix", "\n  choice: "))
    append = data.get("append_choices_to_input", True)
    append = append if isinstance(append, bool) else str(append).lower() != "false"
    items = []
    for example in examples:
        scores = example.get("target_scores") if isinstance(example, dict) else None
        if not isinstance(scores, dict) or len(scores) < 2 or "input" not in example:
            continue
        choices = [str(c) for c in scores]
        values = [float(v) for v in scores.values()]
        answer = values.index(max(values))
        text = str(example["input"])
        if append:
            text += "".join(choice_prefix + c for c in choices)
        items.append(ChoiceItem(prompt=prefix + input_prefix + text + output_prefix, choices=choices, answer=answer))
    if not items:
        raise PopcError(f"BIG-bench task {name} has no multiple-choice examples")
    if limit is not None and len(items) > limit:
        # Evenly spaced, not the first N: some tasks list their examples grouped by kind.
        step = len(items) / limit
        items = [items[int(i * step)] for i in range(limit)]
    return items


def load_task(name: str, limit: int | None = DEFAULT_LIMIT) -> list[ChoiceItem]:
    path = fetch_bigbench([name])[name]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PopcError(f"cached task {path} is unreadable ({error}); delete it to re-fetch") from None
    return parse_task(data, limit, name)
