#!/usr/bin/env bash
# Create or update .venv-deepsparse, the separate virtual environment the runtime bench
# uses for DeepSparse 1.8.0 (DESIGN.md §6). DeepSparse pins its own dependencies
# (numpy<2, onnx<1.15, protobuf, pydantic, sparsezoo), so it never shares .venv with torch;
# torch is NOT installed here. onnxruntime is, so that bench/deepsparse_worker.py can time
# DeepSparse and onnxruntime side by side in one process.
#
# Idempotent: a stamp file records the requirement line it was built from; nothing is
# done when it matches. Prints "up to date" or "installed in N s" as its last line.
# DeepSparse 1.8.0 ships wheels for CPython 3.8-3.11 on x86_64/aarch64 Linux only, so the
# first of python3.11 .. python3.8 found on PATH is used (override with PYTHON=...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PRUNEKIT_DEEPSPARSE_VENV:-$ROOT/.venv-deepsparse}"
REQS="deepsparse==1.8.0 numpy<2 onnx onnxruntime"
STAMP="$VENV/.prunekit-deepsparse-installed"
export NM_DISABLE_ANALYTICS=1

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQS" ]; then
    echo "up to date"
    exit 0
fi
if [ -z "${PYTHON:-}" ]; then
    for candidate in python3.11 python3.10 python3.9 python3.8; do
        if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
    done
fi
if [ -z "${PYTHON:-}" ]; then
    echo "no python3.8-3.11 on PATH (deepsparse 1.8.0 has wheels for CPython 3.8-3.11 only)" >&2
    exit 1
fi
start=$(date +%s)
rm -f "$STAMP"
"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2086  # REQS is a list of requirement words
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $REQS
"$VENV/bin/python" -c "import deepsparse, onnx, onnxruntime, numpy" >/dev/null
echo "$REQS" > "$STAMP"
echo "installed in $(( $(date +%s) - start )) s"
