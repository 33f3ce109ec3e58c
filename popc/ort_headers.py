"""ONNX Runtime's C/C++ headers, which the op library is built against.

PyPI's onnxruntime wheels ship no headers; Debian's ``libonnxruntime-dev`` does
(trixie: API 21, sid: API 23), and a library built against either loads into newer
runtimes. They are found in ``$POPC_ORT_INCLUDE_DIR`` or popc's cache, or fetched once
with ``apt-get download`` through a private apt configuration (nothing is installed)
and unpacked with ``dpkg-deb -x`` into ``<cache root>/ort-headers/<suite>``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from popc.atomic import atomic_directory
from popc.cache import cache_root
from popc.errors import PopcError
from popc.progress import Progress, or_silent

HEADER_SUITES = ("trixie", "sid")  # Debian suites with libonnxruntime-dev (API 21 and 23 headers)
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def header_version(include: Path) -> str:
    try:
        text = (include / "onnxruntime_c_api.h").read_text(errors="replace")
    except OSError:
        return "?"
    match = re.search(r"#define ORT_API_VERSION (\d+)", text)
    api = f"API {match.group(1)}" if match else "API ?"
    package = (include / "PACKAGE_VERSION").read_text().strip() if (include / "PACKAGE_VERSION").is_file() else ""
    return f"{package} ({api})" if package else api


def find_headers() -> Path | None:
    """A directory holding ``onnxruntime_cxx_api.h``, or None."""
    candidates = []
    if os.environ.get("POPC_ORT_INCLUDE_DIR"):
        candidates.append(Path(os.environ["POPC_ORT_INCLUDE_DIR"]).expanduser())
    for suite in HEADER_SUITES:
        candidates.append(cache_root() / "ort-headers" / suite / "usr" / "include" / "onnxruntime")
    candidates.append(Path("/usr/include/onnxruntime"))
    for include in candidates:
        if (include / "onnxruntime_cxx_api.h").is_file():
            return include
    return None


def fetch_headers(progress: Progress | None = None) -> Path:
    """Download Debian's ``libonnxruntime-dev`` with a private apt configuration and unpack it."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise PopcError(
            "ONNX Runtime's C++ headers are needed to build the op library and apt-get/dpkg-deb are not "
            "available to fetch them: set POPC_ORT_INCLUDE_DIR to a directory with onnxruntime_cxx_api.h"
        )
    errors = []
    for suite in HEADER_SUITES:
        or_silent(progress).stage(f"fetching ONNX Runtime headers (Debian {suite} libonnxruntime-dev)")
        target = cache_root() / "ort-headers" / suite
        with tempfile.TemporaryDirectory(prefix="popc-apt-") as tmp:
            apt = Path(tmp)
            for sub in ("lists/partial", "cache/archives/partial", "download"):
                (apt / sub).mkdir(parents=True)
            keyring = f" [signed-by={DEBIAN_KEYRING}]" if Path(DEBIAN_KEYRING).is_file() else ""
            (apt / "sources.list").write_text(f"deb{keyring} {DEBIAN_MIRROR} {suite} main\n")
            options = [
                "-q", "-o", f"Dir::Etc::SourceList={apt / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
                "-o", "Debug::NoLocking=1",
            ]  # fmt: skip
            if os.geteuid() == 0:  # apt's _apt sandbox user cannot write into our private dirs
                options += ["-o", "APT::Sandbox::User=root"]
            try:
                for command in (["apt-get", *options, "update"], ["apt-get", *options, "download", "libonnxruntime-dev"]):
                    subprocess.run(command, cwd=apt / "download", check=True, capture_output=True, text=True, timeout=300)
                debs = sorted((apt / "download").glob("libonnxruntime-dev_*.deb"))
                if not debs:
                    raise PopcError("apt-get download produced no .deb")
                with atomic_directory(target) as staging:
                    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True, capture_output=True, text=True)
                    include = staging / "usr" / "include" / "onnxruntime"
                    if not (include / "onnxruntime_cxx_api.h").is_file():
                        raise PopcError("the package has no onnxruntime_cxx_api.h")
                    version = debs[0].name.split("_")[1]
                    (include / "PACKAGE_VERSION").write_text(f"libonnxruntime-dev {version} (Debian {suite})\n")
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, PopcError, OSError) as error:
                detail = getattr(error, "stderr", None) or str(error)
                errors.append(f"{suite}: {detail.strip().splitlines()[-1] if detail.strip() else error}")
                continue
            return target / "usr" / "include" / "onnxruntime"
    raise PopcError("could not fetch ONNX Runtime headers from Debian: " + "; ".join(errors))
