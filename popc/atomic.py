"""Write a file or a directory so that readers see all of it or none of it.

Every writer in popc (exports, caches, fetched data, the op library) stages its
output in a hidden sibling of the destination — the same filesystem, so the last
step is a rename — and removes the staging copy however the write ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def staging_directory(parent: Path, prefix: str) -> Iterator[Path]:
    """A new hidden directory ``parent/.{prefix}-XXXX``, removed when the block ends."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_directory(source: Path, target: Path, complete: Callable[[Path], bool] | None = None) -> None:
    """Rename ``source`` to ``target``. An existing ``target`` is replaced, unless
    ``complete(target)`` says it is a finished copy (another process won the race)."""
    source.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        os.replace(source, target)  # succeeds when target is absent or an empty directory
        return
    except OSError:
        if complete is not None and complete(target):
            return
    previous = target.with_name(f".{target.name}.{os.getpid()}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(target, previous)
    try:
        os.replace(source, target)
    finally:
        shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: Path, complete: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Fill the yielded directory; when the block ends without error it becomes ``target``."""
    with staging_directory(target.parent, target.name) as staging:
        yield staging
        replace_directory(staging, target, complete)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Write the yielded path; when the block ends without error it becomes ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    staged = Path(name)
    try:
        yield staged
        staged.chmod(0o644)
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)


def atomic_write(target: Path, data: bytes) -> None:
    """``target`` holds ``data``, or what it held before."""
    with atomic_file(target) as staged:
        staged.write_bytes(data)
