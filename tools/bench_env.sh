# Sourced by the benchmark scripts: the repository root, the output folder, and the held-out news text of the
# evaluation protocol (graphpress/evaluation.py), read from gensim's distribution.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
G=.venv/bin/graphpress
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gensim') is None)" \
  || .venv/bin/pip install -q --no-deps gensim==4.4.0

# compress_recipes RECIPE...: compress SmolLM2-135M with `exact` and each recipe (a name or a YAML file) into
# $OUT/NAME (skipped where NAME/model.onnx exists), each with /usr/bin/time's log; ARTIFACTS: the recipes' folders
compress_recipes() {
  ARTIFACTS=()
  for r in exact "$@"; do
    local n
    n=$(basename "$r" .yaml)
    if [ ! -f "$OUT/$n/model.onnx" ]; then
      /usr/bin/time -v $G compress smollm2-135m --recipe "$r" --out "$OUT/$n" --no-eval 2> "$OUT/$n.log"
    fi
    [ "$r" = exact ] || ARTIFACTS+=("$OUT/$n")
  done
}
