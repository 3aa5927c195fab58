# Sourced by the benchmark scripts: the repository root, the output folder, and the held-out news text of the
# evaluation protocol (graphpress/evaluation.py), read from gensim's distribution.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
G=.venv/bin/graphpress
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gensim') is None)" \
  || .venv/bin/pip install -q --no-deps gensim==4.4.0
