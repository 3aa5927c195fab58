#!/usr/bin/env bash
# Reproduce BENCHMARKS.md's sparsity tables (issue 13): compress SmolLM2-135M with each sparsity recipe, then
# measure every artifact beside the fp32 export in one run of tools/bench.py (onnxruntime: quality on both
# texts, size, latency at 2 threads), and time the sparsify pass of sparse-50 alone (tools/bench_prune.py cost).
# Run on an otherwise idle machine.   bash tools/run_sparse_benchmarks.sh [recipe ...]
source "$(dirname "$0")/bench_env.sh"
RECIPES=${*:-sparse-50 sparse-2-4 sparse-2-4-w4 tools/study/wanda-50.yaml}
compress_recipes $RECIPES
# HELDOUT= (empty) measures the protocol's text only
.venv/bin/python tools/bench.py --reference "$OUT/exact" "${ARTIFACTS[@]}" --name smollm2-sparse ${HELDOUT---heldout} \
  --runs 20 --json "$OUT/bench-sparse.json" --markdown BENCHMARKS.md
/usr/bin/time -v .venv/bin/python tools/bench_prune.py cost --recipe sparse-50 \
  --json "$OUT/sparse-cost.json" 2> "$OUT/sparse-cost.log"
