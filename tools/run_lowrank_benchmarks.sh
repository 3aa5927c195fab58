#!/usr/bin/env bash
# Reproduce BENCHMARKS.md's low-rank tables (issue 12): compress SmolLM2-135M with each low-rank recipe, then
# measure every artifact beside the fp32 export in one run of tools/bench.py (onnxruntime: quality on both
# texts, size, latency at 2 threads), and time the factorize pass alone (tools/bench_prune.py cost).
# Run on an otherwise idle machine.   bash tools/run_lowrank_benchmarks.sh [recipe ...]
source "$(dirname "$0")/bench_env.sh"
RECIPES=${*:-lowrank-20 lowrank-20-w4 tools/study/lowrank-60.yaml}
compress_recipes $RECIPES
# HELDOUT= (empty) measures the protocol's text only
.venv/bin/python tools/bench.py --reference "$OUT/exact" "${ARTIFACTS[@]}" --name smollm2-lowrank ${HELDOUT---heldout} \
  --runs 20 --json "$OUT/bench-lowrank.json" --markdown BENCHMARKS.md
/usr/bin/time -v .venv/bin/python tools/bench_prune.py cost --recipe lowrank-20 \
  --json "$OUT/lowrank-cost.json" 2> "$OUT/lowrank-cost.log"
