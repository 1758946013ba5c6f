#!/usr/bin/env bash
# Creates .venv (or uses $VENV) and installs medir-fast with its test and kernel extras.
# PyTorch is pinned to the CPU 2.13.0 wheel first: an unpinned `torch` would pull a
# multi-GB CUDA build, and pip keeps an installed torch that satisfies `torch>=2.4`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==2.13.0"
"$VENV/bin/pip" install --quiet -e ".[dev]"
echo "installed into $VENV"
