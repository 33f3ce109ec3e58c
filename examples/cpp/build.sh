#!/usr/bin/env bash
# Build popc_generate against the onnxruntime pip wheel of the active Python environment.
#   examples/cpp/build.sh [BUILD_DIR]        (default: build/cpp)
# Headers: popc's cached copy (fetched from Debian's libonnxruntime-dev if missing).
# Library: symlinks libonnxruntime.so{,.1} in BUILD_DIR/ort to the wheel's libonnxruntime.so.<version>.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="${1:-build/cpp}"
mkdir -p "$build/ort"
build="$(cd "$build" && pwd)"
include="$(python -c 'from popc import oplib; print(oplib.find_headers() or oplib.fetch_headers())')"
wheel_lib="$(python -c 'import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.*")))[0])')"
ln -sf "$wheel_lib" "$build/ort/libonnxruntime.so.1"
ln -sf "$wheel_lib" "$build/ort/libonnxruntime.so"
cmake -S "$here" -B "$build" -DORT_INCLUDE_DIR="$include" -DORT_LIBRARY_DIR="$build/ort" >/dev/null
cmake --build "$build" --parallel >/dev/null
echo "$build/popc_generate"
