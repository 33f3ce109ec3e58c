"""Write a file or a directory so that readers see all of it or none of it.

Every writer in popc (exports, caches, fetched data, the op library) stages its
output in a hidden sibling of the destination — the same filesystem, so the last
step is a rename — and removes the staging copy however the write ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

OWNER_FILE = ".owner"  # "pid host" of the process that made a staging directory
STALE_AFTER_SECONDS = 60.0


@contextlib.contextmanager
def staging_directory(parent: Path, prefix: str, *, mark_owner: bool = False) -> Iterator[Path]:
    """A new hidden directory ``parent/.{prefix}-XXXX``, removed when the block ends.

    ``mark_owner`` writes the process id into it (``.owner``), so that a later writer can
    tell a directory left by a killed process (SIGKILL skips every ``finally``) from one in
    use: see :func:`remove_stale_staging`. Not for a staging directory that becomes the
    target itself (the marker would be published with it)."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=parent))
    try:
        if mark_owner:
            (staging / OWNER_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_stale(staging: Path, min_age: float = STALE_AFTER_SECONDS) -> bool:
    """Whether ``staging`` was marked by a process of this host that is gone, over ``min_age`` s ago.
    Unmarked directories (an older popc, another tool) are never stale: popc cannot tell."""
    owner = staging / OWNER_FILE
    try:
        pid_text, host = owner.read_text().split()
        pid, age = int(pid_text), time.time() - owner.stat().st_mtime
    except (OSError, ValueError):
        return False
    return host == socket.gethostname() and age > min_age and not _process_alive(pid)


def remove_stale_staging(parent: Path, prefix: str, min_age: float = STALE_AFTER_SECONDS) -> list[Path]:
    """Remove the ``parent/.{prefix}-*`` directories their owners left behind; returns them."""
    removed = []
    try:
        entries = list(parent.glob(f".{prefix}-*"))
    except OSError:
        return removed
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink() and is_stale(entry, min_age):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
